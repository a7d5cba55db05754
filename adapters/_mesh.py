"""What every driver's `MeshServer` shares: the mesh runtime, one pump per transport, and
the runtime's actions handed to the driver's own I/O and concurrency.

The decisions (admission, handshake bounds and timeouts, the instance table, waiters,
resume, shutdown steps) are the `MeshRuntime`'s; this module routes its actions. A driver
supplies how to listen, how to wait, one timer, and how to look an upgrade up when the
application's lookups are coroutines.
"""

from __future__ import annotations

import inspect
import logging
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

from svantic_proto import Config, InstanceRecord, ResumeStore
from svantic_proto.events import Event
from svantic_proto.http import HttpClosed, HttpRequest, HttpServerConnection
from svantic_proto.mesh import MintDispatchAuth
from svantic_proto.mesh_runtime import (
    AdmissionNeeded,
    AgentArrived,
    DropLink,
    MeshRuntime,
    ServeHttp,
    ServiceLink,
    ShutdownComplete,
    Waiter,
)

from ._pump import Pump

__all__ = ["AgentHandle", "AsyncAgentHandle", "HttpResponder", "MeshDriver"]

log = logging.getLogger("svantic.mesh")
LinkT = TypeVar("LinkT")


class AgentHandle(Generic[LinkT]):
    """The mesh's handle on one connected agent's transport."""

    __slots__ = ("link", "server")

    def __init__(self, server: Any, link: LinkT) -> None:
        self.server, self.link = server, link

    @property
    def conn(self) -> Any:
        return self.link.pump.conn  # type: ignore[attr-defined]

    @property
    def instance_id(self) -> str | None:
        conn = self.conn
        return conn.instance_id if conn is not None else None


class AsyncAgentHandle(AgentHandle[LinkT]):
    """The handle of the async drivers (asyncio, anyio): await a dispatch or the end."""

    __slots__ = ()

    async def wait_closed(self) -> None:
        """Until this agent's connection has ended."""
        await self.link.done.wait()  # type: ignore[attr-defined]

    async def dispatch(self, capability: str, arguments: Mapping[str, Any] | None = None, *,
                       deadline_ms: int = 30_000,
                       on_chunk: Callable[[Any], object] | None = None,
                       task_id: str | None = None, session_context: Any = None) -> Any:
        """Send a dispatch to this agent's instance; raise `DispatchError` on failure."""
        return await self.server.dispatch(
            self.instance_id, capability, arguments, deadline_ms=deadline_ms,
            on_chunk=on_chunk, task_id=task_id, session_context=session_context)


class HttpResponder:
    """How an `http_app` answers one plain HTTP request on the mesh's port: `respond()`
    once, or `start()`, any `send()`s and `end()` for a streamed answer (Server-Sent
    Events). Each call writes at once. After the client went away (`closed`) the calls do
    nothing, so an application never fails for writing to a gone peer.

    A long answer that waits for something else (an event stream waits for events) sets
    `on_close`: the driver calls it once when the connection ends, by either side, so the
    answer ends and frees what it holds at once instead of at its next write."""

    __slots__ = ("_conn", "_driver", "_link", "_on_close", "started")

    def __init__(self, driver: MeshDriver[Any], link: Any, conn: HttpServerConnection) -> None:
        self._driver, self._link, self._conn = driver, link, conn
        self._on_close: Callable[[], object] | None = None
        self.started = False

    @property
    def closed(self) -> bool:
        return self._conn.closed

    @property
    def on_close(self) -> Callable[[], object] | None:
        """Called once, without arguments, when the connection has ended (`closed` is then
        True); set it before waiting. It runs inside the driver's I/O callback: it must
        only wake the waiting answer, never block."""
        return getattr(self, "_on_close", None)  # a subclass may skip __init__ (ASGI)

    @on_close.setter
    def on_close(self, callback: Callable[[], object] | None) -> None:
        self._on_close = callback

    def _notify_closed(self) -> None:
        """The connection ended: run `on_close` once (a driver may learn it twice)."""
        callback = self.on_close
        if callback is None:
            return
        self._on_close = None
        try:
            callback()
        except Exception:  # the application's callback must not take the mesh down
            log.exception("an HTTP answer's on_close failed")

    def respond(self, status: int, headers: Sequence[tuple[str, str]], body: bytes) -> None:
        self.started = True
        self._conn.respond(status, headers, body, now=self._driver._now())
        self._flush()

    def start(self, status: int, headers: Sequence[tuple[str, str]]) -> None:
        self.started = True
        self._conn.start_stream(status, headers)
        self._flush()

    def send(self, data: bytes) -> None:
        self._conn.send_data(data)
        self._flush()

    def end(self) -> None:
        self._conn.end_stream(self._driver._now())
        self._flush()

    def _flush(self) -> None:
        self._link.pump.service()
        self._driver._service()

    def _abort(self, reason: str) -> None:
        """Cut an answer that started: the client must not take part of it for the whole."""
        self._conn.abort(reason)
        self._flush()


_INTERNAL = (("content-type", "application/json"),)
_INTERNAL_BODY = b'{"error":{"code":"INTERNAL","message":"internal error"}}'


class MeshDriver(Generic[LinkT]):
    """A mesh endpoint serving `GET /agents/connect` (spec 1-5): runtime actions to hooks.

    `verify_token(token)` returns claims with `tenant_id` (an object, or the mapping PyJWT
    returns) or raises; `lookup_instance(id)` returns an `InstanceRecord` or None. On the
    async drivers either may be a coroutine function.

    `http_app(request, responder)` (a coroutine function on the async drivers, a plain
    function run in a greenlet of its own on gevent) answers every other request on the
    same port (the control plane); without it those get the spec 1 refusals (426, 404).
    """

    def __init__(self, *, ssl_context: ssl.SSLContext | None,
                 verify_token: Callable[[str], Any],
                 lookup_instance: Callable[[str], Any],
                 dispatch_auth: MintDispatchAuth | None, config: Config | None = None,
                 resume_store: ResumeStore | None = None, max_connections: int = 10_000,
                 max_handshakes: int = 1024, backlog: int = 4096,
                 http_app: Callable[[HttpRequest, HttpResponder], Any] | None = None,
                 max_http_connections: int = 1024,
                 max_http_body_bytes: int = 1 << 20) -> None:
        self._ssl = ssl_context
        self._verify, self._lookup = verify_token, lookup_instance
        self._http_app = http_app
        self.runtime: MeshRuntime[Any] = MeshRuntime(
            dispatch_auth=dispatch_auth, wall_clock=time.time, config=config,
            resume_store=resume_store, verify_token=self._verify_refresh,
            max_connections=max_connections, max_handshakes=max_handshakes,
            serve_http=http_app is not None, max_http_connections=max_http_connections,
            max_http_body_bytes=max_http_body_bytes)
        self.backlog = backlog
        self.links: set[LinkT] = set()
        """Every transport the runtime knows of (handshakes and sessions)."""
        self._responders: dict[Any, HttpResponder] = {}
        """The HTTP link -> the responder of its latest request: told when the link ends."""
        self._handles: dict[LinkT, AgentHandle[LinkT]] = {}
        self._deadline: float | None = None
        self.on_event: Callable[[Any, Event], None] | None = None
        """Told every core event with the agent's handle, for metrics and the application."""
        self._setup()

    @property
    def config(self) -> Config:
        return self.runtime.config

    @property
    def store(self) -> ResumeStore:
        return self.runtime.store

    @property
    def max_connections(self) -> int:
        return self.runtime.max_connections

    @property
    def agents(self) -> Mapping[str, Any]:
        """Instance id -> the handle of its running session."""
        handles = self._handles
        return {iid: handles[link] for iid, link in self.runtime.agents.items()
                if link in handles}

    # -- hooks -----------------------------------------------------------------------------

    def _setup(self) -> None:
        """The driver's own state; called last by `__init__`, so every driver keeps the one
        keyword signature above."""

    def _now(self) -> float:
        raise NotImplementedError

    def _arm(self, deadline: float | None) -> None:
        """Move the one timer; when it fires, call `_fire()`."""
        raise NotImplementedError

    def _new_handle(self, link: LinkT) -> AgentHandle[LinkT]:
        return AgentHandle(self, link)

    def _admit_async(self, action: AdmissionNeeded[Any], claims: Any, record: Any) -> None:
        """A lookup returned an awaitable: await it (and the rest) in the driver's concurrency,
        then `_admitted(...)`."""
        raise NotImplementedError

    def _agent_arrived(self) -> None:
        raise NotImplementedError

    def _run_http(self, request: HttpRequest, responder: HttpResponder) -> None:
        """Run `http_app` for one request in the driver's concurrency: `_http_async` on the
        async drivers, `_http_sync` on gevent."""
        raise NotImplementedError

    def _shutdown_complete(self) -> None:
        raise NotImplementedError

    # -- transports ------------------------------------------------------------------------

    def _accepted(self, link: LinkT) -> bool:
        """TCP accepted: False when the link itself must go (over the bound, or closing)."""
        self.links.add(link)
        keep = True
        for dropped in self.runtime.transport_accepted(link, self._now()):
            if dropped is link:
                keep = False
            else:
                dropped.abort()  # type: ignore[attr-defined]
        if not keep:
            self.links.discard(link)
        self._service()
        return keep

    def _opened(self, link: LinkT) -> None:
        """TLS done (or none): the core connection and this link's pump."""
        conn = self.runtime.open_connection(link, self._now())
        runtime = self.runtime
        self._handles[link] = handle = self._new_handle(link)

        def on_event(event: Event) -> None:
            runtime.connection_events(link, (event,), self._now())
            actions = runtime.take_actions()
            if actions:
                self._perform(actions)
                self._service()
            if self.on_event is not None:
                try:
                    self.on_event(handle, event)
                except Exception:  # an application callback must not take the mesh down
                    log.exception("on_event failed")

        link.pump = self._new_pump(  # type: ignore[attr-defined]
            link, conn, on_event, lambda deadline: self._schedule(link, deadline))
        link.pump.service()  # type: ignore[attr-defined]
        self._service()

    def _new_pump(self, link: LinkT, conn: Any, on_event: Callable[[Event], None],
                  arm_timer: Callable[[float | None], None]) -> Any:
        """The link's pump over its core connection: bytes to `link.write`, the end to
        `link.close`. A driver whose transport moves messages, not bytes, gives its own
        (with the same `conn`, `closed` and `service()`)."""
        return Pump(conn, on_event=on_event, write=link.write,  # type: ignore[attr-defined]
                    close=link.close, arm_timer=arm_timer)  # type: ignore[attr-defined]

    def _closed(self, link: LinkT) -> None:
        """The transport is gone, whatever the reason."""
        self.links.discard(link)
        self._handles.pop(link, None)
        self.runtime.transport_closed(link, self._now())
        self._http_closed(link)  # after the runtime closed its HTTP connection: `closed`
        self._service()

    def _schedule(self, link: LinkT, deadline: float | None) -> None:
        """A link's timer moved: re-arm only when it came earlier than the one armed (one
        that fires early finds nothing due and re-arms at the runtime's real deadline)."""
        self.runtime.schedule(link, deadline)
        armed = self._deadline
        if deadline is not None and (armed is None or deadline < armed):
            self._deadline = deadline
            self._arm(deadline)

    # -- the runtime's actions -------------------------------------------------------------

    def _service(self) -> None:
        """Perform what the runtime asks, until it asks nothing; then move the one timer."""
        runtime = self.runtime
        while actions := runtime.take_actions():
            self._perform(actions)
        self._rearm()

    def _perform(self, actions: list[Any]) -> None:
        for action in actions:
            kind = type(action)
            if kind is ServiceLink:
                action.link.pump.service()
            elif kind is DropLink:  # with TLS up, its close_notify first (bounded in time)
                link = action.link
                link.close() if link in self._handles else link.abort()
            elif kind is AdmissionNeeded:
                self._admit(action)
            elif kind is AgentArrived:
                self._agent_arrived()
            elif kind is ShutdownComplete:
                self._shutdown_complete()
            elif kind is ServeHttp:
                self._serve_http(action.link, action.conn)

    def _rearm(self) -> None:
        deadline = self.runtime.next_deadline()
        if deadline != self._deadline:
            self._deadline = deadline
            self._arm(deadline)

    def _fire(self) -> None:
        self._deadline = None
        self.runtime.handle_timer(self._now())
        self._service()

    def _admit(self, action: AdmissionNeeded[Any]) -> None:
        claims: Any = None
        record: Any = None
        try:
            if action.token is not None:
                claims = self._verify(action.token)
                if inspect.isawaitable(claims):
                    self._admit_async(action, claims, None)
                    return
            if action.instance_id is not None and not isinstance(claims, BaseException):
                record = self._lookup(action.instance_id)
                if inspect.isawaitable(record):
                    self._admit_async(action, claims, record)
                    return
        except Exception as exc:  # the runtime tells 401 from 503
            if action.token is not None and claims is None:
                claims = exc
            else:
                record = exc
        self._admitted(action, claims, record)

    async def _admission(self, action: AdmissionNeeded[Any], claims: Any, record: Any) -> None:
        """The rest of an admission whose verify or lookup is a coroutine (async drivers run
        it in a task of their own)."""
        try:
            if inspect.isawaitable(claims):
                claims = await claims
            if record is None and action.instance_id is not None:
                record = self._lookup(action.instance_id)
            if inspect.isawaitable(record):
                record = await record
        except Exception as exc:  # the runtime tells 401 from 503
            if claims is None or inspect.isawaitable(claims):
                claims = exc
            else:
                record = exc
        self._admitted(action, claims, record)

    def _admitted(self, action: AdmissionNeeded[Any], claims: Any,
                  record: InstanceRecord | BaseException | None) -> None:
        if action.link in self._handles:
            self.runtime.admit(action.link, claims=claims, record=record, now=self._now())
        self._service()

    def _verify_refresh(self, token: str) -> Any:
        """`token_refresh` checks (spec 3) run inside the core: only a plain verifier works
        there; a coroutine verifier refuses refreshed tokens (the agent reconnects instead)."""
        claims = self._verify(token)
        if inspect.isawaitable(claims):
            close = getattr(claims, "close", None)
            if close is not None:
                close()
            raise LookupError("token_refresh needs a synchronous verify_token")
        return claims

    # -- plain HTTP on the same port --------------------------------------------------------

    def _serve_http(self, link: Any, conn: HttpServerConnection) -> None:
        self._handles.pop(link, None)  # not an agent: no handle, no on_event

        def on_event(event: Any) -> None:
            kind = type(event)
            if kind is HttpRequest:
                self._responders[link] = responder = HttpResponder(self, link, conn)
                self._run_http(event, responder)
            elif kind is HttpClosed:  # before the transport is gone: wake the answer now
                self._http_closed(link)

        link.pump.switch(conn, on_event)
        link.pump.service()

    def _http_closed(self, link: Any) -> None:
        responder = self._responders.pop(link, None)
        if responder is not None:
            responder._notify_closed()

    async def _http_async(self, request: HttpRequest, responder: HttpResponder) -> None:
        try:
            await self._http_app(request, responder)  # type: ignore[misc]
        except Exception:
            self._http_failed(request, responder)
        else:
            self._http_unanswered(request, responder)

    def _http_sync(self, request: HttpRequest, responder: HttpResponder) -> None:
        try:
            self._http_app(request, responder)  # type: ignore[misc]
        except Exception:
            self._http_failed(request, responder)
        else:
            self._http_unanswered(request, responder)

    @staticmethod
    def _http_failed(request: HttpRequest, responder: HttpResponder) -> None:
        log.exception("HTTP application failed on %s %s", request.method, request.path)
        if not responder.started:
            responder.respond(500, _INTERNAL, _INTERNAL_BODY)
        elif not responder.closed:
            responder._abort("the application failed mid-answer")

    @staticmethod
    def _http_unanswered(request: HttpRequest, responder: HttpResponder) -> None:
        if not responder.started:
            log.error("HTTP application gave no answer to %s %s", request.method, request.path)
            responder.respond(500, _INTERNAL, _INTERNAL_BODY)

    # -- dispatches ------------------------------------------------------------------------

    def _send(self, instance_id: str, capability: str, arguments: Mapping[str, Any] | None,
              *, deadline_ms: int, waiter: Waiter, on_chunk: Callable[[Any], object] | None,
              task_id: str | None, session_context: Any,
              dispatch_id: str | None = None) -> tuple[str, LinkT]:
        dispatch_id, link = self.runtime.dispatch(
            instance_id, capability, arguments, deadline_ms=deadline_ms, now=self._now(),
            waiter=waiter, on_chunk=on_chunk, task_id=task_id, session_context=session_context,
            dispatch_id=dispatch_id)
        self._perform(self.runtime.take_actions())  # the link's pump schedules its timer
        return dispatch_id, link

    def _begin_close(self, grace: float | None) -> None:
        self.runtime.begin_shutdown(self._now(), grace)
        self._service()
