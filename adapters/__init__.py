"""I/O adapters for svantic_proto: anyio, asyncio and gevent agent clients and mesh servers,
and an ASGI mesh endpoint.

Import the one you use (`svantic_adapters.asyncio`, `.anyio`, `.gevent`, `.asgi`). This package
itself loads no event loop, `ssl`, `socket` or `threading`: each adapter module does, through the
driver code they share. Under gevent, patch first: call `gevent.monkey.patch_all()` before
importing an adapter module. `DispatchContext`, `DispatchError` and `HandlerError` here are
`svantic_proto`'s own.
"""

from svantic_proto.capabilities import DispatchContext
from svantic_proto.errors import DispatchError, HandlerError

__all__ = ["DispatchContext", "DispatchError", "HandlerError"]
