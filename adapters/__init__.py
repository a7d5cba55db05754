"""I/O adapters for svantic_proto: anyio, asyncio and gevent agent clients and mesh servers.

Import the one you use (`svantic_adapters.asyncio`, `.anyio`, `.gevent`). This package imports
no event loop (no asyncio, anyio, trio or gevent), but through the driver code every adapter
shares it loads `ssl`, `socket` and `threading` (with `logging`). Under gevent, patch first:
call `gevent.monkey.patch_all()` before importing this package or any of its modules.
`DispatchContext`, `DispatchError` and `HandlerError` here are `svantic_proto`'s own.
"""

from ._runtime import DispatchContext, DispatchError, HandlerError

__all__ = ["DispatchContext", "DispatchError", "HandlerError"]
