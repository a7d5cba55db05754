"""I/O adapters for svantic_proto: anyio, asyncio and gevent clients and servers."""
