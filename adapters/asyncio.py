"""svantic.v1 over plain asyncio (standard library only): an agent client and a mesh server.

Every protocol decision is the core's; this module reads and writes bytes,
keeps one timer per connection at the core's deadline, and runs handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from svantic_proto import (
    AgentConnection,
    AgentSession,
    Config,
    DispatchAuthVerifier,
    InstanceRecord,
    MeshConnection,
    ResumeStore,
    RetryDecision,
    check_upgrade,
    held_failures,
)
from svantic_proto.events import (
    ConnectionClosed,
    DispatchCancelled,
    DispatchReceived,
    Event,
    SessionStarted,
    UpgradeRequest,
)
from svantic_proto.mesh import MintDispatchAuth

from ._pump import Pump
from ._runtime import (
    CapabilityRegistry,
    DispatchContext,
    DispatchError,
    HandlerError,
    MeshWaiters,
    client_ssl_context,
    handler_outcome,
    make_context,
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


class Agent(CapabilityRegistry):
    """A connected-mode agent: dials the mesh, runs capability handlers, reconnects.

    `async with connect(...) as agent` returns once the first welcome is seen;
    `await agent.run()` keeps it connected until `stop()` or a final refusal
    (which raises the typed `HandshakeRejected`).
    """

    def __init__(self, url: str, *, token: str, instance_id: str,
                 dispatch_auth: DispatchAuthVerifier, agent_type: str | None = None,
                 ssl_context: ssl.SSLContext | None = None, cafile: str | None = None,
                 config: Config | None = None, session: AgentSession | None = None,
                 token_provider: Callable[[], Awaitable[str]] | None = None,
                 allow_insecure_loopback: bool = False) -> None:
        super().__init__()
        self.url, self.token, self.instance_id = url, token, instance_id
        self.agent_type = agent_type
        self.config = config or Config()
        self.session = session or AgentSession(self.config)
        self._verifier = dispatch_auth
        self._token_provider = token_provider
        self._insecure = allow_insecure_loopback
        parts = urlsplit(url)
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or (443 if parts.scheme == "wss" else 80)
        self._ssl = client_ssl_context(ssl_context, cafile) if parts.scheme == "wss" else None
        self.link: _Link | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stopping = False
        self.ready = asyncio.Event()
        self.handler_runs = 0
        self.last_closed: ConnectionClosed | None = None

    @property
    def conn(self) -> AgentConnection | None:
        return self.link.pump.conn if self.link is not None else None

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
        loop = asyncio.get_running_loop()
        conn = AgentConnection(
            self.url, token=self.token, instance_id=self.instance_id,
            dispatch_auth=self._verifier, session=self.session, agent_type=self.agent_type,
            capabilities=self.capabilities, config=self.config, now=loop.time(),
            wall_clock=time.time, allow_insecure_loopback=self._insecure,
        )
        self.ready.clear()
        link = _Link(conn, reader, writer, self._on_event)
        self.link = link
        link.service()
        return link

    def _on_event(self, event: Event) -> None:
        if isinstance(event, DispatchReceived):
            self._start_handler(event)
        elif isinstance(event, DispatchCancelled):
            task = self._tasks.get(event.dispatch_id)
            if task is not None:
                task.cancel()
        elif isinstance(event, SessionStarted):
            self.ready.set()
        elif isinstance(event, ConnectionClosed):
            self.last_closed = event

    def _start_handler(self, event: DispatchReceived) -> None:
        capability, refusal = self.resolve(event)
        conn = self.conn
        if capability is None or conn is None:
            code, message = refusal or ("INTERNAL", "no connection")
            self._answer(event.dispatch_id, "send_error", code, message)
            return
        dispatch_id = event.dispatch_id
        context = make_context(event, lambda data: self._answer(dispatch_id, "send_chunk", data))
        self._tasks[event.dispatch_id] = asyncio.create_task(
            self._run_handler(capability.handler, event, context))

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
            self._tasks.pop(event.dispatch_id, None)

    def _answer(self, dispatch_id: str, method: str, *args: Any) -> None:
        """Send through the current connection (or the session outbox while down)."""
        link = self.link
        if link is None:
            return
        with contextlib.suppress(Exception):  # a dispatch that already ended is not an error
            getattr(link.pump.conn, method)(dispatch_id, *args)
        link.service()

    def refresh_token(self, token: str) -> bool:
        """Use a fresh transport JWT: now through `token_refresh`, and for every reconnect.

        Returns False when the mesh does not know the extension; the new token is
        then used at the next reconnect (spec 3).
        """
        self.token = token
        link, conn = self.link, self.conn
        if link is None or conn is None:
            return False
        sent = conn.refresh_token(token)
        link.service()
        return sent

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
                closed = self.last_closed
                retry = closed.retry if closed is not None else RetryDecision.RETRY
                if retry is RetryDecision.FINAL and not self._stopping and closed is not None:
                    raise closed.error or DispatchError("", "CONNECTION_CLOSED", closed.reason)
            except (TimeoutError, OSError, ssl.SSLError):
                retry = RetryDecision.RETRY
            if self._stopping:
                return
            if retry is RetryDecision.REFRESH_TOKEN_THEN_RETRY and self._token_provider:
                self.token = await self._token_provider()
                self.session.token_refreshed = True
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
        self._stopping = True
        link, conn = self.link, self.conn
        if link is not None and conn is not None and not conn.closed:
            with contextlib.suppress(Exception):
                if conn.ready and conn.state.name == "READY":
                    conn.close_request(None if grace is None else int(grace),
                                       "agent stopping", now=link.loop.time())
                else:
                    conn.close(1000, "agent stopping", now=link.loop.time())
            link.service()
            await link.done.wait()
        runner = getattr(self, "_runner", None)
        if runner is not None and not runner.done():
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await runner


def connect(url: str, **options: Any) -> Agent:
    """`async with connect(url, ...) as agent:`, or `async for conn in agent.connections()`."""
    return Agent(url, **options)


class AgentLink:
    """The mesh's handle on one connected agent: send dispatches, await their outcome."""

    def __init__(self, server: MeshServer, link: _Link) -> None:
        self.server, self.link = server, link

    @property
    def conn(self) -> MeshConnection:
        conn: MeshConnection = self.link.pump.conn
        return conn

    @property
    def instance_id(self) -> str | None:
        return self.conn.instance_id

    async def wait_closed(self) -> None:
        """Until this agent's connection has ended."""
        await self.link.done.wait()

    async def dispatch(self, capability: str, arguments: Mapping[str, Any] | None = None, *,
                       deadline_ms: int = 30_000,
                       on_chunk: Callable[[Any], object] | None = None) -> Any:
        """Send a dispatch and return its result; raise `DispatchError` on failure."""
        future: asyncio.Future[Any] = self.link.loop.create_future()
        dispatch_id = self.conn.send_dispatch(
            capability, dict(arguments or {}), deadline_ms=deadline_ms, now=self.link.loop.time())
        self.server.waiters.add(dispatch_id, future, on_chunk)
        self.link.service()
        if self.link.writer.transport.get_write_buffer_size() > WRITE_BUFFER_LIMIT // 4:
            await self.link.writer.drain()  # backpressure for callers, not memory growth
        try:
            return await future
        finally:
            self.server.waiters.discard(dispatch_id)


class MeshServer:
    """A mesh endpoint serving `GET /agents/connect` over TLS (spec 1-5).

    `verify_token(token)` returns claims with `tenant_id` (and optionally `exp`,
    `sub`) or raises; `lookup_instance(id)` returns an `InstanceRecord` or None.
    """

    def __init__(self, *, ssl_context: ssl.SSLContext | None,
                 verify_token: Callable[[str], Any],
                 lookup_instance: Callable[[str], InstanceRecord | None],
                 dispatch_auth: MintDispatchAuth | None, config: Config | None = None,
                 resume_store: ResumeStore | None = None, max_connections: int = 10_000,
                 backlog: int = 4096) -> None:
        self.config = config or Config()
        self._ssl = ssl_context
        self._verify_token, self._lookup = verify_token, lookup_instance
        self._mint = dispatch_auth
        self.store = resume_store or ResumeStore(window=self.config.resume_window)
        self.max_connections, self.backlog = max_connections, backlog
        self.waiters = MeshWaiters()
        self.agents: dict[str, AgentLink] = {}
        self.links: set[_Link] = set()
        self.agent_connected = asyncio.Condition()
        self._server: asyncio.Server | None = None
        self._store_timer: asyncio.TimerHandle | None = None
        self.on_event: Callable[[AgentLink, Event], None] | None = None
        self._notify_task: asyncio.Future[None] | None = None

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
        agent = self.agents.get(instance_id)
        if agent is None or not agent.conn.accepting_dispatches:
            raise DispatchError("", "AGENT_UNAVAILABLE", f"{instance_id} is not connected")
        return await agent.dispatch(capability, arguments, **options)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self.links) >= self.max_connections:
            writer.transport.abort()
            return
        loop = asyncio.get_running_loop()
        conn = MeshConnection(dispatch_auth=self._mint, now=loop.time(), wall_clock=time.time,
                              config=self.config, resume_store=self.store,
                              verify_token=self._verify_token)
        handle: list[AgentLink] = []
        link = _Link(conn, reader, writer, lambda event: self._on_event(handle[0], event))
        handle.append(AgentLink(self, link))
        self.links.add(link)
        try:
            link.service()
            await link.run()
        finally:
            self.links.discard(link)

    def _on_event(self, agent: AgentLink, event: Event) -> None:
        conn = agent.conn
        if isinstance(event, UpgradeRequest):
            decision = check_upgrade(event.request, verify_token=self._verify_token,
                                     lookup_instance=self._lookup)
            now = agent.link.loop.time()
            if hasattr(decision, "claims"):
                record = self._lookup(decision.instance_id)
                conn.accept(decision, agent_type=record.agent_type if record else None, now=now)
            else:
                conn.reject(decision, now=now)  # type: ignore[arg-type]
        elif isinstance(event, SessionStarted):
            self.agents[event.instance_id] = agent
            self._notify_task = asyncio.ensure_future(self._notify())
        elif isinstance(event, ConnectionClosed):
            if conn.instance_id and self.agents.get(conn.instance_id) is agent:
                del self.agents[conn.instance_id]
            self._arm_store_timer()
        else:
            self.waiters.dispatch_event(event)
        if self.on_event is not None:  # every event, for metrics and the application
            self.on_event(agent, event)

    async def _notify(self) -> None:
        async with self.agent_connected:
            self.agent_connected.notify_all()

    def _arm_store_timer(self) -> None:
        if self._store_timer is not None:
            self._store_timer.cancel()
        deadline = self.store.next_deadline()
        if deadline is not None:
            self._store_timer = asyncio.get_running_loop().call_at(deadline, self._expire_store)

    def _expire_store(self) -> None:
        for event in held_failures(self.store.expire(asyncio.get_running_loop().time())):
            self.waiters.dispatch_event(event)
        self._arm_store_timer()

    async def close(self, grace: float | None = None) -> None:
        """Graceful shutdown: close_request to every agent, wait the grace, 1001 for the rest."""
        if self._server is not None:
            self._server.close()
        grace = self.config.close_grace if grace is None else grace
        loop = asyncio.get_running_loop()
        for link in list(self.links):
            with contextlib.suppress(Exception):
                link.pump.conn.close_request(int(grace), "mesh shutting down", now=loop.time())
            link.service()
        pending = [asyncio.ensure_future(link.done.wait()) for link in self.links]
        if pending:
            await asyncio.wait(pending, timeout=grace + self.config.close_timeout)
        for link in list(self.links):
            with contextlib.suppress(Exception):
                link.pump.conn.close(1001, "mesh shutting down", now=loop.time())
            link.service()
            link.abort()
        if self._store_timer is not None:
            self._store_timer.cancel()
        self.waiters.fail_all("AGENT_DISCONNECTED", "mesh shut down")
        if self._server is not None:
            await self._server.wait_closed()

