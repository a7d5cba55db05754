"""I/O adapters for svantic_proto: anyio, asyncio and gevent agent clients and mesh servers.

Import the one you use (`svantic_adapters.asyncio`, `.anyio`, `.gevent`); this package
itself imports no event loop, so the gevent patch-first rule holds.
"""

from ._runtime import DispatchContext, DispatchError, HandlerError

__all__ = ["DispatchContext", "DispatchError", "HandlerError"]
