"""svantic.v1 over plain asyncio (standard library only): an agent client and a mesh server.

Every protocol decision is the core's; this module reads and writes bytes,
keeps one timer per connection at the core's deadline, and runs handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from svantic_proto import AgentConnection, RetryDecision
from svantic_proto.events import DispatchReceived, Event, SessionStarted

from ._pump import Pump
from ._runtime import (
    AgentBase,
    AgentLinkBase,
    DispatchContext,
    DispatchError,
    HandlerError,
    MeshBase,
    handler_outcome,
)

__all__ = [
    "Agent",
    "AgentLink",
    "DispatchContext",
    "DispatchError",
    "HandlerError",
    "MeshServer",
    "connect",
]

READ_SIZE = 65536
WRITE_BUFFER_LIMIT = 4 * 1024 * 1024
"""Bytes queued for a peer that does not read before we give up on it (slow reader)."""


class _Link:
    """One transport and one core connection, driven by a `Pump`."""

    def __init__(self, conn: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 on_event: Callable[[Event], None]) -> None:
        self.loop = asyncio.get_running_loop()
        self.reader, self.writer = reader, writer
        self._timer: asyncio.TimerHandle | None = None
        self.pump = Pump(conn, on_event=on_event, write=self._write, close=self._close,
                         arm_timer=self._arm)
        self.done = asyncio.Event()

    def _write(self, chunks: list[bytes]) -> None:
        self.writer.writelines(chunks)  # one batched write per pump pass
        if self.writer.transport.get_write_buffer_size() > WRITE_BUFFER_LIMIT:
            self.abort()  # the peer stopped reading: do not grow memory without limit

    def _close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        with contextlib.suppress(Exception):
            self.writer.close()

    def _arm(self, deadline: float | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if deadline is not None:
            self._timer = self.loop.call_at(deadline, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self.pump.timer(self.loop.time())

    def abort(self) -> None:
        """Drop TCP at once, without a close frame, as a network fault would."""
        self.writer.transport.abort()

    def service(self) -> None:
        self.pump.service()

    async def run(self) -> None:
        try:
            while not self.pump.closed:
                try:
                    data = await self.reader.read(READ_SIZE)
                except (ConnectionError, OSError, ssl.SSLError):
                    data = b""
                if not data:
                    self.pump.eof(self.loop.time())
                    break
                self.pump.feed(data, self.loop.time())
        finally:
            if not self.pump.closed:
                self.pump.eof(self.loop.time())
            self._close()
            self.done.set()


def _sync_or_async(result: Any) -> Awaitable[Any]:
    if inspect.isawaitable(result):
        return result
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    future.set_result(result)
    return future


class Agent(AgentBase[_Link, Awaitable[str]]):
    """A connected-mode agent: dials the mesh, runs capability handlers, reconnects.

    `async with connect(...) as agent` returns once the first welcome is seen;
    `await agent.run()` keeps it connected until `stop()` or a final refusal
    (which raises the typed `HandshakeRejected`).
    """

    def _init_adapter(self) -> None:
        self.ready = asyncio.Event()

    def _clock(self) -> float:
        return asyncio.get_running_loop().time()

    async def _connect_once(self) -> _Link:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self._host, self._port, ssl=self._ssl,
                                    server_hostname=self._host if self._ssl else None,
                                    limit=READ_SIZE,
                                    # spec 4: a dead peer is dropped, not awaited for 30 s
                                    ssl_shutdown_timeout=(self.config.close_timeout
                                                          if self._ssl else None)),
            timeout=self.config.hello_timeout,
        )
        conn = self._new_connection()
        self.ready.clear()
        link = _Link(conn, reader, writer, self._on_event)
        self.link = link
        link.service()
        return link

    def _session_started(self, event: SessionStarted) -> None:
        self.ready.set()

    def _spawn_handler(self, handler: Callable[..., Any], event: DispatchReceived,
                       context: DispatchContext) -> None:
        self._handlers[event.dispatch_id] = asyncio.create_task(
            self._run_handler(handler, event, context))

    async def _run_handler(self, handler: Callable[..., Any], event: DispatchReceived,
                           context: Any) -> None:
        self.handler_runs += 1
        try:
            result = await _sync_or_async(handler(event.arguments, context))
        except asyncio.CancelledError:
            self._answer(event.dispatch_id, "send_cancelled")
        except Exception as exc:  # a handler failure is the dispatch's failure, not ours
            code, message, detail = handler_outcome(exc)
            self._answer(event.dispatch_id, "send_error", code, message, detail)
        else:
            self._answer(event.dispatch_id, "send_result", result)
        finally:
            self._handlers.pop(event.dispatch_id, None)

    async def connections(self) -> AsyncIterator[AgentConnection]:
        """Yield each established connection; reconnect with the core's backoff and retry rules."""
        while not self._stopping:
            retry: RetryDecision
            try:
                link = await self._connect_once()
                runner = asyncio.create_task(link.run())
                ready = asyncio.create_task(self.ready.wait())
                await asyncio.wait({runner, ready}, return_when=asyncio.FIRST_COMPLETED)
                ready.cancel()
                if self.ready.is_set():
                    yield link.pump.conn
                await runner
                retry = self._retry_decision()
            except (TimeoutError, OSError, ssl.SSLError):
                retry = RetryDecision.RETRY
            if self._stopping:
                return
            if provider := self._token_refresher(retry):
                self._use_fresh_token(await provider())
            await asyncio.sleep(self.session.next_delay())

    async def run(self) -> None:
        async for _ in self.connections():
            pass

    async def __aenter__(self) -> Agent:
        self._runner = asyncio.create_task(self.run())
        waiter = asyncio.create_task(self.ready.wait())
        await asyncio.wait({self._runner, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if self._runner.done():
            waiter.cancel()
            self._runner.result()  # raises the final error
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self, grace: float | None = None) -> None:
        """close_request: finish in-flight work (up to the grace), then close 1000."""
        link = self._begin_stop(grace)
        if link is not None:
            await link.done.wait()
        runner = getattr(self, "_runner", None)
        if runner is not None and not runner.done():
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await runner


def connect(url: str, **options: Any) -> Agent:
    """`async with connect(url, ...) as agent:`, or `async for conn in agent.connections()`."""
    return Agent(url, **options)


class AgentLink(AgentLinkBase["MeshServer", _Link]):
    """The mesh's handle on one connected agent: send dispatches, await their outcome."""

    async def wait_closed(self) -> None:
        """Until this agent's connection has ended."""
        await self.link.done.wait()

    async def dispatch(self, capability: str, arguments: Mapping[str, Any] | None = None, *,
                       deadline_ms: int = 30_000,
                       on_chunk: Callable[[Any], object] | None = None) -> Any:
        """Send a dispatch and return its result; raise `DispatchError` on failure."""
        future: asyncio.Future[Any] = self.link.loop.create_future()
        dispatch_id = self._send_dispatch(capability, arguments, deadline_ms=deadline_ms,
                                          waiter=future, on_chunk=on_chunk,
                                          now=self.link.loop.time())
        if self.link.writer.transport.get_write_buffer_size() > WRITE_BUFFER_LIMIT // 4:
            await self.link.writer.drain()  # backpressure for callers, not memory growth
        try:
            return await future
        finally:
            self.server.waiters.discard(dispatch_id)


class MeshServer(MeshBase[AgentLink, _Link]):
    """A mesh endpoint serving `GET /agents/connect` over TLS (spec 1-5).

    `verify_token(token)` returns claims with `tenant_id` (and optionally `exp`,
    `sub`) or raises; `lookup_instance(id)` returns an `InstanceRecord` or None.
    """

    def _init_adapter(self) -> None:
        self.agent_connected = asyncio.Condition()
        self._server: asyncio.Server | None = None
        self._store_timer: asyncio.TimerHandle | None = None
        self._notify_task: asyncio.Future[None] | None = None

    def _clock(self) -> float:
        return asyncio.get_running_loop().time()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        # asyncio refuses a handshake timeout without TLS (plain ws:// on loopback).
        tls_options = {"ssl_handshake_timeout": self.config.hello_timeout,
                       # spec 4: drop a silent peer, do not await its close_notify for 30 s
                       "ssl_shutdown_timeout": self.config.close_timeout} if self._ssl else {}
        self._server = await asyncio.start_server(
            self._serve, host, port, ssl=self._ssl, backlog=self.backlog, limit=READ_SIZE,
            **tls_options)
        address = self._server.sockets[0].getsockname()
        return address[0], address[1]

    async def wait_for_agent(self, instance_id: str, timeout: float = 10.0) -> AgentLink:
        async def ready() -> AgentLink:
            async with self.agent_connected:
                await self.agent_connected.wait_for(lambda: instance_id in self.agents)
                return self.agents[instance_id]
        return await asyncio.wait_for(ready(), timeout)

    async def dispatch(self, instance_id: str, capability: str,
                       arguments: Mapping[str, Any] | None = None, **options: Any) -> Any:
        return await self._available_agent(instance_id).dispatch(capability, arguments, **options)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self.links) >= self.max_connections:
            writer.transport.abort()
            return
        link = self._open_link(lambda conn, on_event: _Link(conn, reader, writer, on_event))
        try:
            link.service()
            await link.run()
        finally:
            self.links.discard(link)

    def _new_agent_link(self, link: _Link) -> AgentLink:
        return AgentLink(self, link)

    def _agent_arrived(self) -> None:
        self._notify_task = asyncio.ensure_future(self._notify())

    async def _notify(self) -> None:
        async with self.agent_connected:
            self.agent_connected.notify_all()

    def _arm_store_timer(self) -> None:
        if self._store_timer is not None:
            self._store_timer.cancel()
        deadline = self.store.next_deadline()
        if deadline is not None:
            loop = asyncio.get_running_loop()
            self._store_timer = loop.call_at(deadline, lambda: self._expire_store(loop.time()))

    async def close(self, grace: float | None = None) -> None:
        """Graceful shutdown: close_request to every agent, wait the grace, 1001 for the rest."""
        if self._server is not None:
            self._server.close()
        grace = self._request_close_all(grace)
        pending = [asyncio.ensure_future(link.done.wait()) for link in self.links]
        if pending:
            await asyncio.wait(pending, timeout=grace + self.config.close_timeout)
        self._close_all()
        if self._store_timer is not None:
            self._store_timer.cancel()
        self.waiters.fail_all("AGENT_DISCONNECTED", "mesh shut down")
        if self._server is not None:
            await self._server.wait_closed()

