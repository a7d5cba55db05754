"""svantic.v1 over anyio (asyncio or trio backend): an agent client and a mesh server.

The same public shape as `svantic_adapters.asyncio`. Every protocol decision is the
core's. On trio, connections are anyio byte streams (`_streams.py`: reader, writer and
timer tasks) and handlers run in the agent's task group, each in a cancel scope.

On the asyncio backend, connections use the asyncio adapter's transport (`_protocol.py`:
a protocol with TLS over `ssl.MemoryBIO`s, no reader or writer task, no stream layers)
instead of anyio's streams, and handlers run as the asyncio adapter runs them: each in a
task of its own, which the agent cancels when it stops. Cancel scopes, `anyio.sleep` and
the rest work in them as in any task on that backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, cast

import anyio
import anyio.lowlevel
from anyio.abc import ByteStream, Listener, SocketAttribute, TaskGroup
from anyio.streams.tls import TLSListener

from svantic_proto import AgentConnection, LocalProtocolError, RetryDecision
from svantic_proto.events import (
    ConnectionClosed,
    DispatchReceived,
    SessionStarted,
)

from . import _protocol
from ._runtime import (
    AgentBase,
    AgentLinkBase,
    DispatchContext,
    DispatchError,
    HandlerError,
    MeshBase,
    Outcome,
    handler_outcome,
)
from ._streams import WRITE_BUFFER_LIMIT, StreamLink, Timer

__all__ = ["Agent", "AgentLink", "DispatchContext", "DispatchError", "HandlerError", "MeshServer",
           "connect"]

log = logging.getLogger(__name__)


def _backend() -> tuple[bool, Callable[[], float], Callable[[], anyio.Event]]:
    """On asyncio or not, and the backend's clock and event factory, looked up once: anyio's
    own functions look the backend up per call, which fails in protocol callbacks."""
    token = anyio.lowlevel.current_token()
    loop = token.native_token
    if isinstance(loop, asyncio.AbstractEventLoop):
        return True, loop.time, token.backend_class.create_event
    return False, token.backend_class.current_time, token.backend_class.create_event


class _AsyncioLink(_protocol.ProtocolLink):
    """On the asyncio backend: the asyncio adapter's transport, with the names `StreamLink` has."""

    __slots__ = ("settled",)

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.settled = asyncio.Event()

    async def run(self) -> None:
        await self.done.wait()

    def _end(self) -> None:
        super()._end()
        self.settled.set()


AnyLink = StreamLink | _AsyncioLink


class Agent(AgentBase[AnyLink, Awaitable[str]]):
    """A connected-mode agent: dials the mesh, runs capability handlers, reconnects.

    `async with connect(...) as agent` returns once the first welcome is seen and
    keeps the agent connected from its own task group; `await agent.run()` stays
    connected until `stop()` or a final refusal (raised as the typed
    `HandshakeRejected`). `async for conn in agent.connections()` yields each
    connection as python-websockets' `connect` does; it holds its task group
    across yields, so iterate it in one task and end it with `stop()` (or inside
    `contextlib.aclosing`). `ready` is an `anyio.Event` set while a session is
    up, replaced by a fresh one when it ends: read the attribute when you wait.
    """

    def _init_adapter(self) -> None:
        self._now: Callable[[], float] = anyio.current_time  # until it runs: then _backend()'s
        self._new_event: Callable[[], anyio.Event] = anyio.Event
        self._stop_requested = anyio.Event()
        self._dial_scope = anyio.CancelScope()
        self._group: TaskGroup | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._finished: anyio.Event | None = None
        self._error: Exception | None = None
        self._native = False  # on the asyncio backend: its transport and handler tasks
        self.ready = anyio.Event()
        self.last_started: SessionStarted | None = None

    async def _connect_once(self) -> AnyLink | None:
        stream: ByteStream | None = None
        native: _AsyncioLink | None = None
        with anyio.CancelScope() as self._dial_scope, anyio.fail_after(self.config.hello_timeout):
            if self._native:
                native = await _protocol.dial_agent(self, _AsyncioLink, self._forget_closed)
            elif self._ssl is None:
                stream = await anyio.connect_tcp(self._host, self._port)
            else:  # TLS close without close_notify: a closing read would race the reader task
                stream = await anyio.connect_tcp(self._host, self._port, ssl_context=self._ssl,
                                                 tls_hostname=self._host,
                                                 tls_standard_compatible=False)
        if self._stopping:  # stop() came during the dial, or cancelled it
            if native is not None:
                native.abort()
            return None
        if native is not None or stream is None:
            return native
        conn = self._new_connection()
        self.last_closed = None
        self.link = link = StreamLink(conn, stream, self._on_event, self.config.close_timeout)
        link.service()
        return link

    def _forget_closed(self) -> None:
        self.last_closed = None

    def _session_started(self, event: SessionStarted) -> None:
        self.last_started = event
        self.ready.set()
        if self.link is not None:
            self.link.settled.set()

    def _connection_closed(self, event: ConnectionClosed) -> None:
        if self.ready.is_set():
            self.ready = self._new_event()

    def _clock(self) -> float:
        return self._now()

    def _handler_unavailable(self) -> str | None:
        return "the agent is not running" if self._group is None else None

    def _spawn_handler(self, handler: Callable[..., Any], event: DispatchReceived,
                       context: DispatchContext) -> None:
        if self._native:
            _protocol.spawn_handler(self, handler, event, context)
            return
        scope = cast(StreamLink, self.link).new_scope()  # now: a cancel before its start counts
        self._handlers[event.dispatch_id] = scope
        group = cast(TaskGroup, self._group)  # `_handler_unavailable()` saw it set
        group.start_soon(self._run_handler, handler, event, context, scope)

    async def _run_handler(self, handler: Callable[..., Any], event: DispatchReceived,
                           context: DispatchContext, scope: anyio.CancelScope) -> None:
        self.handler_runs += 1
        dispatch_id = event.dispatch_id
        try:
            with scope:
                try:
                    result = handler(event.arguments, context)
                    if inspect.isawaitable(result):
                        result = await result
                except Exception as exc:  # a handler failure is the dispatch's failure
                    code, message, detail = handler_outcome(exc)
                    self._answer(dispatch_id, "send_error", code, message, detail)
                else:
                    self._answer(dispatch_id, "send_result", result)
            if scope.cancelled_caught:
                context.cancelled = True
                self._answer(dispatch_id, "send_cancelled")
        finally:
            self._handlers.pop(dispatch_id, None)

    @contextlib.asynccontextmanager
    async def _task_group(self) -> AsyncIterator[TaskGroup]:
        if self._group is not None:
            raise LocalProtocolError("this agent is already running")
        self._native, self._now, self._new_event = _backend()
        async with anyio.create_task_group() as group:
            self._group = group
            try:
                yield group
            finally:
                self._group = None
                group.cancel_scope.cancel()  # handlers outliving stop() end with the agent
                for running in list(self._handlers.values()):
                    running.cancel()  # those in tasks of their own (asyncio backend) too

    async def _dial(self, group: TaskGroup) -> AsyncIterator[AgentConnection]:
        """The reconnect loop, with the core's backoff and retry decisions (spec 5)."""
        while not self._stopping:
            retry = RetryDecision.RETRY
            try:
                link = await self._connect_once()
            except (TimeoutError, OSError, ssl.SSLError, anyio.BrokenResourceError):
                link = None
            if link is not None:
                group.start_soon(link.run)
                await link.settled.wait()
                if link.pump.conn.connection_id is not None:  # a welcome was seen
                    yield link.pump.conn
                await link.done.wait()
                retry = self._retry_decision()
            if self._stopping:
                return
            if provider := self._token_refresher(retry):
                self._use_fresh_token(await provider())
            with anyio.move_on_after(self.session.next_delay()):
                await self._stop_requested.wait()

    async def connections(self) -> AsyncIterator[AgentConnection]:
        """Yield each established connection; reconnect with the core's backoff and retry rules."""
        async with self._task_group() as group:
            async for conn in self._dial(group):
                yield conn

    async def _runner(self, group: TaskGroup, first: anyio.Event, finished: anyio.Event) -> None:
        try:
            async for _ in self._dial(group):
                first.set()
        except Exception as exc:  # a final refusal: raised by __aenter__ or run()
            self._error = exc
        finally:
            first.set()
            finished.set()

    async def run(self) -> None:
        """Stay connected until `stop()`; raise a final refusal (spec 5)."""
        if self._finished is None:
            async with self:
                await self.run()
            return
        await self._finished.wait()
        if self._error is not None:
            raise self._error

    async def __aenter__(self) -> Agent:
        self._stack, self._error = contextlib.AsyncExitStack(), None
        group = await self._stack.enter_async_context(self._task_group())
        first, self._finished = anyio.Event(), anyio.Event()
        group.start_soon(self._runner, group, first, self._finished)
        await first.wait()
        if self._error is not None:
            await self._exit_group()
            raise self._error
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.stop()
        finally:
            await self._exit_group()

    async def _exit_group(self) -> None:
        stack, self._stack, self._finished = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    async def stop(self, grace: float | None = None) -> None:
        """close_request: finish in-flight work (up to the grace), then close 1000."""
        self._stop_requested.set()
        self._dial_scope.cancel()
        link = self._begin_stop(grace)
        if link is not None:
            await link.done.wait()
        if self._finished is not None:
            await self._finished.wait()


def connect(url: str, **options: Any) -> Agent:
    """`async with connect(url, ...) as agent:`, or `async for conn in agent.connections()`."""
    return Agent(url, **options)


class AgentLink(AgentLinkBase["MeshServer", AnyLink]):
    """The mesh's handle on one connected agent: send dispatches, await their outcome."""

    async def wait_closed(self) -> None:
        """Until this agent's connection has ended."""
        await self.link.done.wait()

    async def dispatch(self, capability: str, arguments: Mapping[str, Any] | None = None, *,
                       deadline_ms: int = 30_000,
                       on_chunk: Callable[[Any], object] | None = None) -> Any:
        """Send a dispatch and return its result; raise `DispatchError` on failure."""
        link = self.link
        if isinstance(link, _AsyncioLink):
            return await _protocol.dispatch(self, capability, arguments, deadline_ms, on_chunk)
        settled = link.new_event()
        outcome = Outcome(settled.set)
        dispatch_id = self._send_dispatch(capability, arguments, deadline_ms=deadline_ms,
                                          waiter=outcome, on_chunk=on_chunk, now=link.now())
        try:
            await link.drain(WRITE_BUFFER_LIMIT // 4)  # backpressure for callers
            await settled.wait()
        finally:
            self.server.waiters.discard(dispatch_id)
        return outcome.result()


class MeshServer(MeshBase[AgentLink, AnyLink]):
    """A mesh endpoint serving `GET /agents/connect` over TLS (spec 1-5).

    `verify_token(token)` returns claims with `tenant_id` (and optionally `exp`,
    `sub`) or raises; `lookup_instance(id)` returns an `InstanceRecord` or None.
    Its tasks need a task group: `async with server:` opens one around `start()`
    and `close()`. Without it, `start()` opens one that `close()` ends, so then
    call `close()` in the same task and block as `start()`.
    """

    def _init_adapter(self) -> None:
        self._now: Callable[[], float] = anyio.current_time  # until it starts: then _backend()'s
        self._new_event: Callable[[], anyio.Event] = anyio.Event
        self._arrival = anyio.Event()
        self._store_timer = Timer(self._expire_store)
        self._stack: contextlib.AsyncExitStack | None = None
        self._group: TaskGroup | None = None
        self._entered = self._started = self._closed = False
        self._accepting = anyio.CancelScope()
        self._server: asyncio.Server | None = None  # on the asyncio backend

    async def _open_group(self) -> TaskGroup:
        self._stack = contextlib.AsyncExitStack()
        self._group = group = await self._stack.enter_async_context(anyio.create_task_group())
        self._stack.callback(group.cancel_scope.cancel)  # whatever still runs at the exit
        return group

    async def _exit_group(self) -> None:
        stack, self._stack, self._group = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    async def __aenter__(self) -> MeshServer:
        await self._open_group()
        self._entered = True
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.close()
        finally:
            await self._exit_group()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        if self._started:
            raise LocalProtocolError("a MeshServer starts once")
        native, self._now, self._new_event = _backend()
        if native:
            return await self._start_native(host, port)
        tcp = await anyio.create_tcp_listener(local_host=host, local_port=port,
                                              backlog=self.backlog)
        listener: Listener[Any] = tcp if self._ssl is None else TLSListener(
            tcp, self._ssl, standard_compatible=False, handshake_timeout=self.config.hello_timeout)
        group = self._group or await self._open_group()
        self._started = True
        group.start_soon(self._accept, listener, group)
        group.start_soon(self._store_timer.run)
        address = tcp.extra(SocketAttribute.local_address)
        return str(address[0]), tcp.extra(SocketAttribute.local_port)

    async def _start_native(self, host: str, port: int) -> tuple[str, int]:
        self._server, address = await _protocol.listen(self, _AsyncioLink, host, port)
        group = self._group or await self._open_group()
        self._started = True
        group.start_soon(self._store_timer.run)
        return address

    async def _accept(self, listener: Listener[Any], group: TaskGroup) -> None:
        with self._accepting:
            async with listener:  # closed when close() cancels accepting
                while True:
                    try:
                        await listener.serve(self._serve, group)
                    except* OSError:  # e.g. out of file descriptors
                        log.exception("accept failed")
                    await anyio.sleep(0.1)  # pause before accepting again, as asyncio does

    async def wait_for_agent(self, instance_id: str, timeout: float = 10.0) -> AgentLink:
        with anyio.fail_after(timeout):
            while instance_id not in self.agents:
                await self._arrival.wait()
        return self.agents[instance_id]

    async def dispatch(self, instance_id: str, capability: str,
                       arguments: Mapping[str, Any] | None = None, **options: Any) -> Any:
        return await self._available_agent(instance_id).dispatch(capability, arguments, **options)

    async def _serve(self, stream: ByteStream) -> None:
        if len(self.links) >= self.max_connections:
            await anyio.aclose_forcefully(stream)
            return
        link = self._open_link(
            lambda conn, on_event: StreamLink(conn, stream, on_event, self.config.close_timeout))
        try:
            link.service()
            await link.run()
        finally:
            self.links.discard(link)

    def _clock(self) -> float:
        return self._now()

    def _new_agent_link(self, link: AnyLink) -> AgentLink:
        return AgentLink(self, link)

    def _agent_arrived(self) -> None:
        arrived, self._arrival = self._arrival, self._new_event()
        arrived.set()

    def _arm_store_timer(self) -> None:
        self._store_timer.arm(self.store.next_deadline())

    async def close(self, grace: float | None = None) -> None:
        """Graceful shutdown: close_request to every agent, wait the grace, 1001 for the rest."""
        if not self._started or self._closed:
            return
        self._closed = True
        self._accepting.cancel()
        if self._server is not None:
            self._server.close()
        grace = self._request_close_all(grace)
        with anyio.move_on_after(grace + self.config.close_timeout):
            for link in list(self.links):
                await link.done.wait()
        self._close_all()
        self._store_timer.close()
        self.waiters.fail_all("AGENT_DISCONNECTED", "mesh shut down")
        if not self._entered:
            await self._exit_group()
