"""svantic.v1 over anyio (asyncio or trio backend): an agent client and a mesh server.

The same public shape as `svantic_adapters.asyncio`. Every protocol decision is the
core's: the agent's are `AgentRuntime`'s (`_agent.AgentDriver` routes its actions). On
trio, connections are anyio byte streams (`_streams.py`: reader, writer and timer tasks)
and handlers run in the agent's task group, each in a cancel scope.

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
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any

import anyio
import anyio.lowlevel
from anyio.abc import ByteStream, Listener, SocketAttribute, TaskGroup

from svantic_proto import LocalProtocolError
from svantic_proto.agent_runtime import Dial, StartHandler
from svantic_proto.capabilities import DispatchContext
from svantic_proto.errors import DispatchError, HandlerError

from . import _protocol
from ._agent import AgentDriver
from ._protocol import ProtocolLink
from ._runtime import AgentLinkBase, MeshBase, Outcome
from ._streams import WRITE_BUFFER_LIMIT, QuietTLSListener, StreamLink, Timer

__all__ = ["Agent", "AgentLink", "DispatchContext", "DispatchError", "HandlerError", "MeshServer",
           "connect"]

log = logging.getLogger(__name__)


def _backend() -> tuple[bool, Any]:
    """On asyncio or not, and the backend's class, looked up once: anyio's own functions
    look the backend up per call, which fails in protocol callbacks."""
    token = anyio.lowlevel.current_token()
    return isinstance(token.native_token, asyncio.AbstractEventLoop), token.backend_class


class Agent(AgentDriver[Awaitable[str]]):
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
        self._timer: Timer | None = None
        self._settled, self._finished = anyio.Event(), anyio.Event()  # up or stopped; stopped
        self._error: BaseException | None = None

    def _now(self) -> float:
        now: float = self._backend.current_time()
        return now

    def _arm(self, deadline: float | None) -> None:
        if self._timer is not None:
            self._timer.arm(deadline)

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
            _protocol.spawn_handler(self, start)
        else:  # its scope now: a cancel before the task first runs counts
            self._handlers[start.dispatch_id] = scope = self._backend.create_cancel_scope()
            self._spawn(self._run_handler, start, scope)

    async def _run_handler(self, start: StartHandler, scope: anyio.CancelScope) -> None:
        dispatch_id = start.dispatch_id
        try:
            with scope:
                try:
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
        self._timer = timer = Timer(lambda _: self._fire())
        group.start_soon(timer.run)
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
        if self._timer is not None:
            self._timer.close()
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


connect = Agent
"""`async with connect(url, ...) as agent:` (connected and ready), or `await agent.run()`."""


AnyLink = StreamLink | ProtocolLink


class AgentLink(AgentLinkBase["MeshServer", AnyLink]):
    """The mesh's handle on one connected agent: send dispatches, await their outcome."""

    async def wait_closed(self) -> None:
        """Until this agent's connection has ended."""
        await self.link.done.wait()

    async def dispatch(self, capability: str, arguments: Mapping[str, Any] | None = None, *,
                       deadline_ms: int = 30_000,
                       on_chunk: Callable[[Any], object] | None = None) -> Any:
        """Send a dispatch and return its result; raise `DispatchError` on failure."""
        link, server = self.link, self.server
        settled = server._new_event()
        outcome = Outcome(settled.set)
        dispatch_id = self._send_dispatch(capability, arguments, deadline_ms=deadline_ms,
                                          waiter=outcome, on_chunk=on_chunk, now=server._now())
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
        self._entered = self._started = self._shut = False
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
        native, backend = _backend()
        self._now, self._new_event = backend.current_time, backend.create_event
        if native:
            return await self._start_native(host, port)
        tcp = await anyio.create_tcp_listener(local_host=host, local_port=port,
                                              backlog=self.backlog)
        listener: Listener[Any] = tcp if self._ssl is None else QuietTLSListener(
            tcp, self._ssl, standard_compatible=False, handshake_timeout=self.config.hello_timeout)
        group = self._group or await self._open_group()
        self._started = True
        group.start_soon(self._accept, listener, group)
        group.start_soon(self._store_timer.run)
        address = tcp.extra(SocketAttribute.local_address)
        return str(address[0]), tcp.extra(SocketAttribute.local_port)

    async def _start_native(self, host: str, port: int) -> tuple[str, int]:
        self._server, address = await _protocol.listen(self, ProtocolLink, host, port)
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
        link = StreamLink(stream, self.config.close_timeout)
        self._open_link(link.attach)
        try:
            link.pump.service()
            await link.run()
        finally:
            self.links.discard(link)

    # `_protocol.listen`'s calls, on the asyncio backend
    def _accepted(self, link: ProtocolLink) -> bool:
        """TCP accepted: False (drop it) over the connection cap."""
        return len(self.links) < self.max_connections

    def _opened(self, link: ProtocolLink) -> None:
        """TLS done: a core connection for the link."""
        self._open_link(link.attach).pump.service()

    def _closed(self, link: ProtocolLink) -> None:
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
        if not self._started or self._shut:
            return
        self._shut = True
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
