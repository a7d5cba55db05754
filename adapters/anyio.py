"""svantic.v1 over anyio (asyncio or trio backend): an agent client and a mesh server.

The same public shape as `svantic_adapters.asyncio`. Every protocol decision is the
core's: the agent's are `AgentRuntime`'s (`_agent.AgentDriver` routes its actions), the
mesh's are `MeshRuntime`'s (`_mesh.MeshDriver`), each with one timer (`_streams.TaskTimer`).
On trio, connections are anyio byte streams (`_streams.py`: a reader and a writer task)
and handlers run in the agent's task group, each in a cancel scope.

On the asyncio backend, connections use the asyncio adapter's transport (`_protocol.py`:
a protocol with TLS over `ssl.MemoryBIO`s, no reader or writer task, no stream layers)
instead of anyio's streams, and handlers run as the asyncio adapter runs them: each in a
task of its own, which the agent cancels when it stops. Cancel scopes, `anyio.sleep` and
the rest work in them as in any task on that backend.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, cast

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
from anyio.abc import ByteStream, Listener, SocketAttribute, TaskGroup
from anyio.streams.tls import TLSStream

from svantic_proto.agent_runtime import Dial, StartHandler
from svantic_proto.capabilities import DispatchContext
from svantic_proto.errors import DispatchError, HandlerError, LocalProtocolError
from svantic_proto.frames import SessionContext
from svantic_proto.mesh_runtime import AdmissionNeeded

from . import _protocol, _tasks
from ._agent import AgentDriver
from ._mesh import AsyncAgentHandle, MeshDriver
from ._protocol import ProtocolLink
from ._streams import WRITE_BUFFER_LIMIT, StreamLink, TaskTimer

__all__ = ["Agent", "AgentLink", "DispatchContext", "DispatchError", "HandlerError", "MeshServer",
           "connect"]

log = logging.getLogger(__name__)


def _backend() -> tuple[bool, Any]:
    """On asyncio or not, and the backend's class, looked up once: anyio's own functions
    look the backend up per call, which fails in protocol callbacks."""
    token = anyio.lowlevel.current_token()
    return isinstance(token.native_token, asyncio.AbstractEventLoop), token.backend_class


class Agent(TaskTimer, AgentDriver[Awaitable[str]]):
    """A connected-mode agent: dials the mesh, runs capability handlers, reconnects.

    `async with connect(...) as agent` returns once the first welcome is seen and
    keeps the agent connected from its own task group; `await agent.run()` stays
    connected until `stop()` or a final refusal (raised as the typed
    `HandshakeRejected`). `ready` is an `anyio.Event` set while a session is up,
    replaced by a fresh one when it ends: read the attribute when you wait.
    """

    def _setup(self) -> None:
        self.ready = anyio.Event()
        self._backend: Any = None  # anyio's backend class, once it runs
        self._native = False  # on the asyncio backend: its transport and handler tasks
        self._handlers: dict[str, Any] = {}
        """Running handlers by dispatch id: asyncio tasks, or cancel scopes on trio."""
        self._dialling: Any = None  # the dial's task (asyncio) or cancel scope
        self._group: TaskGroup | None = None  # while it runs
        self._settled, self._finished = anyio.Event(), anyio.Event()  # up or stopped; stopped
        self._error: BaseException | None = None
        self.runtime.tool_caller = self._call_tool

    async def _call_tool(self, tool: str, arguments: Any = None, **options: Any) -> Any:
        """`DispatchContext.call_tool` here: send the tool call, await its result."""
        waiter = _Waiter(anyio.Event())
        call_id = self.runtime.call_tool(tool, arguments, waiter=waiter, **options)
        try:
            await waiter.settled.wait()
        finally:
            self.runtime.forget_tool_call(call_id)
        if waiter.error is not None:
            raise waiter.error
        return waiter.value

    def _now(self) -> float:
        return self._backend.current_time()  # type: ignore[no-any-return]

    def _dial(self, dial: Dial) -> None:
        if self._native:
            self._dialling = _protocol.dial(self, dial, ProtocolLink)
        else:
            self._dialling = scope = self._backend.create_cancel_scope()
            self._spawn(self._connect, dial, scope)

    async def _connect(self, dial: Dial, scope: anyio.CancelScope) -> None:
        """Dial on trio: TCP, then TLS (`wss://`); the runtime's deadline bounds both."""
        with scope:
            try:  # TLS close without close_notify: a closing read would race the reader task
                stream = await anyio.connect_tcp(dial.host, dial.port, ssl_context=self._ssl,
                                                 tls_standard_compatible=False)
            except Exception as exc:  # refused, TLS, name resolution, ...: the runtime decides
                self._dial_failed(dial.attempt, exc)
                return
        if scope.cancelled_caught:
            return
        link = StreamLink(stream, self.config.close_timeout)
        self._opened(dial.attempt, link)  # or aborted: then `run()` just closes the stream
        await link.run()

    def _cancel_dial(self) -> None:
        if self._dialling is not None:  # a cancel scope, or the asyncio transport's Dialling
            self._dialling.cancel()
        self._dialling = None

    def _start_handler(self, start: StartHandler) -> None:
        if self._native:
            _tasks.spawn_handler(self, start)
        else:  # its scope now: a cancel before the task first runs counts
            self._handlers[start.dispatch_id] = scope = self._backend.create_cancel_scope()
            self._spawn(self._run_handler, start, scope)

    async def _run_handler(self, start: StartHandler, scope: anyio.CancelScope) -> None:
        dispatch_id = start.dispatch_id
        try:
            with scope:
                try:
                    if start.blocking:  # a plain function that may block: a worker thread
                        start.context.portal = _thread_portal
                        result = await anyio.to_thread.run_sync(
                            start.handler, start.arguments, start.context,
                            abandon_on_cancel=True)
                    else:
                        result = start.handler(start.arguments, start.context)
                    if inspect.isawaitable(result):
                        result = await result
                except Exception as exc:  # a handler failure is the dispatch's failure
                    self._raised(dispatch_id, exc)
                else:
                    self._returned(dispatch_id, result)
        except anyio.get_cancelled_exc_class():  # not ours: it ends the handler, not the agent
            log.debug("%s: handler of %s cancelled from outside", self.instance_id, dispatch_id)
        finally:  # cancelled, by our CancelHandler or anything else: the runtime answers
            self._handlers.pop(dispatch_id, None)
            self._cancelled(dispatch_id)  # nothing once the handler answered

    def _cancel_handler(self, dispatch_id: str) -> None:
        running = self._handlers.get(dispatch_id)
        if running is not None:
            running.cancel()

    def _fetch_token(self, provider: Callable[[], Awaitable[str]]) -> None:
        self._spawn(self._fetch_token_async, provider)

    def _spawn(self, function: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
        if self._group is not None:  # None only once the agent ended
            self._group.start_soon(function, *args)

    def _ready_changed(self, ready: bool) -> None:
        if ready:
            self.ready.set()
            self._settled.set()
        elif self.ready.is_set():
            self.ready = self._backend.create_event()

    def _stopped(self, error: BaseException | None) -> None:
        self._error = error
        self._settled.set()
        self._finished.set()

    async def run(self) -> None:
        """Stay connected until `stop()`; raise a final refusal (spec 5)."""
        if self._group is None:
            async with self:
                await self.run()
            return
        await self._finished.wait()
        if self._error is not None:
            raise self._error

    async def __aenter__(self) -> Agent:
        if self._group is not None:
            raise LocalProtocolError("this agent is already running")
        self._native, self._backend = _backend()
        self._group = group = anyio.create_task_group()
        await group.__aenter__()
        group.start_soon(self._run_timer)
        try:
            self.runtime.start(self._now())
            self.pump.service()
            await self._settled.wait()
            if self._error is not None:
                raise self._error
        except BaseException:
            await self._exit()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.stop()
        finally:
            await self._exit()

    async def _exit(self) -> None:
        """End the task group: what still runs gets `close_timeout` to finish (a closing
        stream its flush), then is cancelled. Handlers are cancelled now, on any backend."""
        group, self._group = self._group, None
        if group is None:
            return
        self.runtime.stop(self._now(), 0)  # cancelled before it stopped: stop at once
        self.pump.service()
        if self.link is not None:
            self.link.abort()
        self._stop_timer()
        for running in list(self._handlers.values()):
            running.cancel()
        group.cancel_scope.deadline = self._now() + self.config.close_timeout
        await group.__aexit__(None, None, None)

    async def stop(self, grace: float | None = None) -> None:
        """close_request: finish in-flight work (up to the grace), then close 1000; at once
        while dialling or backing off. Returns once the agent has stopped."""
        if self._group is not None:
            self.runtime.stop(self._now(), grace)
            self.pump.service()
            await self._finished.wait()


def _thread_portal(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`DispatchContext.portal` on trio: from the handler's worker thread, run `function` in
    the event loop's thread (awaiting what it returns) and block for its result."""

    async def call() -> Any:
        result = function(*args, **kwargs)
        if inspect.isawaitable(result):
            result = await result
        return result

    return anyio.from_thread.run(call)


connect = Agent
"""`async with connect(url, ...) as agent:` (connected and ready), or `await agent.run()`."""


AnyLink = StreamLink | ProtocolLink


class AgentLink(AsyncAgentHandle[AnyLink]):
    """The mesh's handle on one connected agent: `await dispatch(...)`, `await wait_closed()`."""

    __slots__ = ()


class _Waiter:
    """A dispatch's outcome on trio: kept, and an event set once it is in."""

    __slots__ = ("error", "settled", "value")

    def __init__(self, settled: anyio.Event) -> None:
        self.settled = settled

    def set_result(self, value: Any, error: BaseException | None = None) -> None:
        self.value, self.error = value, error
        self.settled.set()

    def set_exception(self, exc: BaseException) -> None:
        self.set_result(None, exc)


class MeshServer(TaskTimer, MeshDriver[AnyLink]):
    """A mesh endpoint serving `GET /agents/connect` over TLS (spec 1-5).

    `verify_token(token)` returns claims with `tenant_id` (an object or a mapping) or
    raises; `lookup_instance(id)` returns an `InstanceRecord` or None; either may be a
    coroutine function. Its tasks need a task group: `async with server:` opens one around
    `start()` and `close()`. Without it, `start()` opens one that `close()` ends, so then
    call `close()` in the same task as `start()`. The keywords are `MeshDriver`'s, and so
    the asyncio adapter's; the rest of its state is made by `start()`.
    """

    _native = _entered = _started = False  # _native: the asyncio backend (its transport)
    _group: TaskGroup | None = None
    _server: asyncio.Server | None = None  # on the asyncio backend
    _clock: Callable[[], float]
    _arrived: anyio.Event

    def _now(self) -> float:
        return self._clock()

    def _new_handle(self, link: AnyLink) -> AgentLink:
        return AgentLink(self, link)

    def _admit_async(self, action: AdmissionNeeded[Any], claims: Any, record: Any) -> None:
        if self._group is not None:  # None only once the mesh closed: no link waits then
            self._group.start_soon(self._admission, action, claims, record)

    def _run_http(self, request: Any, responder: Any) -> None:
        if self._group is not None:
            self._group.start_soon(self._http_async, request, responder)

    def _agent_arrived(self) -> None:
        arrived, self._arrived = self._arrived, self._new_event()
        arrived.set()

    def _shutdown_complete(self) -> None:
        self._shut.set()

    async def _open_group(self) -> TaskGroup:
        self._group = group = anyio.create_task_group()
        await group.__aenter__()
        return group

    async def _exit_group(self) -> None:
        group, self._group = self._group, None
        if group is not None:  # whatever still runs now is cancelled
            group.cancel_scope.cancel()
            await group.__aexit__(None, None, None)

    async def __aenter__(self) -> MeshServer:
        await self._open_group()
        self._entered = True
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.close()
        finally:
            await self._exit_group()

    async def start(self, host: str = "127.0.0.1", port: int = 0, *,
                    reuse_port: bool = False) -> tuple[str, int]:
        """Listen on plain TCP (a large backlog, for reconnect storms); TLS is each link's.

        `reuse_port=True` (SO_REUSEPORT) lets several mesh processes listen on one port, the
        kernel spreading new connections among them (`svantic mesh --workers`)."""
        if self._started:
            raise LocalProtocolError("a MeshServer starts once")
        self._native, backend = _backend()
        self._clock, self._new_event = backend.current_time, backend.create_event
        self._arrived, self._shut = backend.create_event(), backend.create_event()
        self._accepting = backend.create_cancel_scope()
        if self._native:
            self._server, address = await _protocol.listen(self, ProtocolLink, host, port,
                                                           reuse_port=reuse_port)
        else:
            tcp = await anyio.create_tcp_listener(local_host=host, local_port=port,
                                                  backlog=self.backlog, reuse_port=reuse_port)
            address = cast(tuple[str, int], tcp.extra(SocketAttribute.local_address)[:2])
        group = self._group or await self._open_group()
        self._started = True
        group.start_soon(self._run_timer)
        if not self._native:
            group.start_soon(self._accept, tcp, group)
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

    async def _serve(self, stream: ByteStream) -> None:
        """One connection on trio: TCP accepted (the runtime bounds and times out the
        handshake), TLS within hello_timeout (a failure is routine: DEBUG), then the link."""
        link = StreamLink(stream, self.config.close_timeout)
        try:
            if self._accepted(link) and self._ssl is not None:
                try:  # bounded by hello_timeout: the runtime drops a handshake past it
                    link.stream = await TLSStream.wrap(
                        stream, server_side=True, ssl_context=self._ssl, standard_compatible=False)
                except Exception as exc:  # scanners, health checks, plain-TCP peers
                    log.debug("TLS handshake failed: %r", exc)
            if link in self.links and (self._ssl is None or link.stream is not stream):
                self._opened(link)
                await link.run()  # which closes the stream
            else:  # over the bound, dropped meanwhile, or no TLS
                await anyio.aclose_forcefully(link.stream)
        finally:
            self._closed(link)

    async def wait_for_agent(self, instance_id: str, timeout: float = 10.0) -> AgentLink:
        """The handle of `instance_id` once its session started (call it after `start()`);
        TimeoutError otherwise."""
        with anyio.fail_after(timeout):
            while (agent := self.agents.get(instance_id)) is None:
                await self._arrived.wait()
        return cast(AgentLink, agent)

    async def dispatch(self, instance_id: str, capability: str,
                       arguments: Mapping[str, Any] | None = None, *,
                       deadline_ms: int = 30_000,
                       on_chunk: Callable[[Any], object] | None = None,
                       task_id: str | None = None,
                       session_context: SessionContext | None = None,
                       dispatch_id: str | None = None) -> Any:
        """Send a dispatch and return its result; raise `DispatchError` on failure."""
        if self._native:
            return await _protocol.dispatch(
                self, instance_id, capability, arguments, deadline_ms=deadline_ms,
                on_chunk=on_chunk, task_id=task_id, session_context=session_context,
                dispatch_id=dispatch_id)
        waiter = _Waiter(self._new_event())
        dispatch_id, link = self._send(instance_id, capability, arguments,
                                       deadline_ms=deadline_ms, waiter=waiter,
                                       on_chunk=on_chunk, task_id=task_id,
                                       session_context=session_context, dispatch_id=dispatch_id)
        try:
            await link.drain(WRITE_BUFFER_LIMIT // 4)  # backpressure, not memory growth
            await waiter.settled.wait()
        finally:
            self.runtime.discard(dispatch_id)
        if waiter.error is not None:
            raise waiter.error
        return waiter.value

    async def close(self, grace: float | None = None) -> None:
        """Graceful shutdown: close_request to every agent, wait the grace, 1001 for the rest."""
        if not self._started:
            return
        self._accepting.cancel()
        if self._server is not None:
            self._server.close()
        self._begin_close(grace)  # once: the runtime's shutdown starts once
        await self._shut.wait()
        self._stop_timer()
        if self._server is not None:
            await self._server.wait_closed()
        if not self._entered:
            await self._exit_group()
