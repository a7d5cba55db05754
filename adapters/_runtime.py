"""Glue shared by every adapter: no I/O, no event loop, no protocol decisions.

The core decides what the protocol requires; this module only maps core
events to application calls the same way for asyncio, anyio and gevent:
capability handlers on the agent side, and waiters for dispatch outcomes on
the mesh side. Each adapter supplies how to start a task and how to wake one.

`AgentBase`, `AgentLinkBase` and `MeshBase` hold what the three adapters'
`Agent`, `AgentLink` and `MeshServer` do alike (settings, event routing, the
reconnect and shutdown steps), so each adapter keeps only its I/O and its
concurrency: the hooks those bases name.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar
from urllib.parse import urlsplit

from svantic_proto import (
    AgentConnection,
    AgentSession,
    AgentState,
    Config,
    DispatchAuthVerifier,
    InstanceRecord,
    MeshConnection,
    ResumeStore,
    RetryDecision,
    check_upgrade,
)
from svantic_proto.capabilities import (
    Capability,
    CapabilityRegistry,
    DispatchContext,
    handler_outcome,
)
from svantic_proto.codec import FrameFactory
from svantic_proto.errors import DispatchError, HandlerError
from svantic_proto.events import (
    ChunkReceived,
    ConnectionClosed,
    DispatchCancelled,
    DispatchCompleted,
    DispatchFailed,
    DispatchReceived,
    DispatchTimedOut,
    Event,
    SessionStarted,
    UpgradeRequest,
)
from svantic_proto.handshake import Reject, build_upgrade_request
from svantic_proto.mesh import MintDispatchAuth, held_failures

from ._agent import client_ssl_context
from ._pump import Pump

__all__ = [
    "AgentBase",
    "AgentLinkBase",
    "Capability",
    "CapabilityRegistry",
    "DispatchContext",
    "DispatchError",
    "HandlerError",
    "MeshBase",
    "MeshWaiters",
    "Outcome",
    "client_ssl_context",
    "handler_outcome",
]

log = logging.getLogger("svantic_adapters")


def make_context(event: DispatchReceived, send_chunk: Callable[[Any], object]) -> DispatchContext:
    return DispatchContext(
        dispatch_id=event.dispatch_id,
        capability=event.capability,
        attempt=event.attempt,
        deadline_ms=event.deadline_ms,
        task_id=event.task_id,
        session_context=event.session_context,
        send_chunk=send_chunk,
    )


class Waiter(Protocol):
    """A one-shot result slot of the adapter's concurrency model."""

    def set_result(self, value: Any) -> None: ...
    def set_exception(self, exc: BaseException) -> None: ...


@dataclass(slots=True)
class _Pending:
    waiter: Waiter
    on_chunk: Callable[[Any], object] | None


class MeshWaiters:
    """Correlates mesh events with the callers waiting on their dispatches."""

    def __init__(self) -> None:
        self._pending: dict[str, _Pending] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, dispatch_id: str, waiter: Waiter,
            on_chunk: Callable[[Any], object] | None = None) -> None:
        self._pending[dispatch_id] = _Pending(waiter, on_chunk)

    def discard(self, dispatch_id: str) -> None:
        self._pending.pop(dispatch_id, None)

    def dispatch_event(self, event: Event) -> bool:
        """Resolve a waiter from an event; False when the event is not a dispatch outcome."""
        kind = type(event)
        if kind is ChunkReceived:
            pending = self._pending.get(event.dispatch_id)  # type: ignore[attr-defined]
            if pending is not None and pending.on_chunk is not None:
                pending.on_chunk(event.data)  # type: ignore[attr-defined]
            return True
        if kind is DispatchCompleted:
            pending = self._pending.pop(event.dispatch_id, None)  # type: ignore[attr-defined]
            if pending is not None:
                pending.waiter.set_result(event.result)  # type: ignore[attr-defined]
            return True
        if kind is DispatchFailed or kind is DispatchTimedOut:
            dispatch_id: str = event.dispatch_id  # type: ignore[attr-defined]
            pending = self._pending.pop(dispatch_id, None)
            if pending is not None:
                if kind is DispatchTimedOut:
                    error = DispatchError(dispatch_id, "DEADLINE_EXCEEDED", "no answer in time")
                else:
                    error = DispatchError(dispatch_id, event.code, event.message, event.detail)  # type: ignore[attr-defined]
                pending.waiter.set_exception(error)
            return True
        return False

    def fail_all(self, code: str, message: str) -> None:
        for dispatch_id, pending in list(self._pending.items()):
            pending.waiter.set_exception(DispatchError(dispatch_id, code, message))
        self._pending.clear()


AsyncHandler = Callable[[Mapping[str, Any], DispatchContext], Awaitable[Any]]


class Outcome:
    """A dispatch's outcome for `MeshWaiters`, for adapters whose wake-up carries no value.

    `wake` (e.g. an `anyio.Event`'s `set`) is called once the outcome is in.
    """

    __slots__ = ("_wake", "error", "value")

    def __init__(self, wake: Callable[[], object]) -> None:
        self._wake = wake
        self.value: Any = None
        self.error: BaseException | None = None

    def set_result(self, value: Any) -> None:
        self.value = value
        self._wake()

    def set_exception(self, exc: BaseException) -> None:
        self.error = exc
        self._wake()

    def result(self) -> Any:
        """The dispatch's result; raises its `DispatchError`."""
        if self.error is not None:
            raise self.error
        return self.value


class PumpedLink(Protocol):
    """What the shared bases need of an adapter's link: its pump, and a hard drop."""

    pump: Pump

    def abort(self) -> None: ...


LinkT = TypeVar("LinkT", bound=PumpedLink)
TokenT = TypeVar("TokenT")
AgentT = TypeVar("AgentT", bound="AgentLinkBase[Any, Any]")
ServerT = TypeVar("ServerT", bound="MeshBase[Any, Any]")


class AgentBase(CapabilityRegistry, Generic[LinkT, TokenT]):
    """The agent side every adapter shares: settings, core events to handlers, reconnect rules.

    No I/O here. An adapter dials, runs the pump, and implements the hooks:
    `_init_adapter`, `_clock`, `_spawn_handler`, `_session_started` (and
    optionally `_cancel_handler`, `_connection_closed`, `_handler_unavailable`).
    `TokenT` is what its `token_provider` returns (a `str`, or an awaitable of one).
    """

    def __init__(self, url: str, *, token: str, instance_id: str,
                 dispatch_auth: DispatchAuthVerifier, agent_type: str | None = None,
                 ssl_context: ssl.SSLContext | None = None, cafile: str | None = None,
                 config: Config | None = None, session: AgentSession | None = None,
                 token_provider: Callable[[], TokenT] | None = None,
                 allow_insecure_loopback: bool = False) -> None:
        super().__init__()
        # Refuse a bad URL, token or instance id here, at once, not in the first connect attempt.
        build_upgrade_request(url, token=token, instance_id=instance_id,
                              allow_insecure_loopback=allow_insecure_loopback)
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
        self.link: LinkT | None = None
        self._handlers: dict[str, Any] = {}
        """Running handlers by dispatch id, as `_spawn_handler` records them."""
        self._stopping = False
        self.handler_runs = 0
        self.last_closed: ConnectionClosed | None = None
        self._init_adapter()

    # -- hooks each adapter implements ------------------------------------------------------

    def _init_adapter(self) -> None:
        """The adapter's own state (ready event, running handlers); called by `__init__`."""

    def _clock(self) -> float:
        """Monotonic `now` for the core, on the adapter's clock."""
        raise NotImplementedError

    def _spawn_handler(self, handler: Callable[..., Any], event: DispatchReceived,
                       context: DispatchContext) -> None:
        raise NotImplementedError

    def _cancel_handler(self, event: DispatchCancelled) -> None:
        """The mesh cancelled (spec 3): cancel the handler's task; its runner answers."""
        running = self._handlers.get(event.dispatch_id)
        if running is not None:
            running.cancel()

    def _session_started(self, event: SessionStarted) -> None:
        """A welcome was seen (spec 2): set the adapter's `ready`."""
        raise NotImplementedError

    def _connection_closed(self, event: ConnectionClosed) -> None:
        """After `last_closed` is set; nothing by default."""

    def _handler_unavailable(self) -> str | None:
        """Why no handler can start now (answered INTERNAL), or None."""
        return "no connection" if self.conn is None else None

    # -- shared behaviour -------------------------------------------------------------------

    @property
    def conn(self) -> AgentConnection | None:
        return self.link.pump.conn if self.link is not None else None

    def _new_connection(self) -> AgentConnection:
        """The core connection for a transport just dialled (spec 1: the upgrade request)."""
        return AgentConnection(
            self.url, token=self.token, instance_id=self.instance_id,
            dispatch_auth=self._verifier, session=self.session, agent_type=self.agent_type,
            capabilities=self.capabilities, config=self.config, now=self._clock(),
            wall_clock=time.time, allow_insecure_loopback=self._insecure,
        )

    def _on_event(self, event: Event) -> None:
        """Hand core events to the application: handlers, cancels (spec 3), readiness."""
        if isinstance(event, DispatchReceived):
            self._start_handler(event)
        elif isinstance(event, DispatchCancelled):
            self._cancel_handler(event)
        elif isinstance(event, SessionStarted):
            self._session_started(event)
        elif isinstance(event, ConnectionClosed):
            self.last_closed = event
            self._connection_closed(event)

    def _start_handler(self, event: DispatchReceived) -> None:
        """Run the capability's handler, or answer the refusal (spec 3: CAPABILITY_NOT_FOUND,
        INVALID_ARGUMENTS) without running anything."""
        capability, refusal = self.resolve(event)
        unavailable = self._handler_unavailable() if capability is not None else None
        dispatch_id = event.dispatch_id
        if capability is None or unavailable is not None:
            code, message = refusal or ("INTERNAL", unavailable or "")
            self._answer(dispatch_id, "send_error", code, message)
            return
        context = make_context(event, lambda data: self._answer(dispatch_id, "send_chunk", data))
        self._spawn_handler(capability.handler, event, context)

    def _answer(self, dispatch_id: str, method: str, *args: Any) -> None:
        """Send through the current connection (or the session outbox while down)."""
        link = self.link
        if link is None:
            return
        # Not contextlib.suppress: this runs once per answer, and a manager costs a microsecond.
        try:  # noqa: SIM105
            getattr(link.pump.conn, method)(dispatch_id, *args)
        except Exception:  # a dispatch that already ended is not an error
            pass
        link.pump.service()

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
        link.pump.service()
        return sent

    def _retry_decision(self) -> RetryDecision:
        """After a connection ended: the core's retry decision (spec 5); a final one raises
        (the typed `HandshakeRejected`, or the close as a `DispatchError`)."""
        closed = self.last_closed
        retry = closed.retry if closed is not None else RetryDecision.RETRY
        if retry is RetryDecision.FINAL and not self._stopping and closed is not None:
            raise closed.error or DispatchError("", "CONNECTION_CLOSED", closed.reason)
        return retry

    def _token_refresher(self, retry: RetryDecision) -> Callable[[], TokenT] | None:
        """The token provider to call before the next dial, when the core asked for it."""
        if retry is RetryDecision.REFRESH_TOKEN_THEN_RETRY:
            return self._token_provider
        return None

    def _use_fresh_token(self, token: str) -> None:
        self.token = token
        self.session.token_refreshed = True

    def _begin_stop(self, grace: float | None) -> LinkT | None:
        """Stop reconnecting; close_request when a session is up (spec 3: in-flight work
        finishes within the grace), else close 1000. Returns the link to wait for."""
        self._stopping = True
        link, conn = self.link, self.conn
        if link is None or conn is None or conn.closed:
            return None
        with contextlib.suppress(Exception):
            if conn.state is AgentState.READY:
                conn.close_request(None if grace is None else int(grace), "agent stopping",
                                   now=self._clock())
            else:
                conn.close(1000, "agent stopping", now=self._clock())
        link.pump.service()
        return link


class AgentLinkBase(Generic[ServerT, LinkT]):
    """The mesh's handle on one connected agent, less the adapter's way of waiting."""

    def __init__(self, server: ServerT, link: LinkT) -> None:
        self.server, self.link = server, link

    @property
    def conn(self) -> MeshConnection:
        conn: MeshConnection = self.link.pump.conn
        return conn

    @property
    def instance_id(self) -> str | None:
        return self.conn.instance_id

    def _send_dispatch(self, capability: str, arguments: Mapping[str, Any] | None, *,
                       deadline_ms: int, waiter: Waiter,
                       on_chunk: Callable[[Any], object] | None, now: float) -> str:
        """Send a dispatch (spec 3) and register its waiter; the caller discards it when done."""
        dispatch_id = self.conn.send_dispatch(
            capability, dict(arguments or {}), deadline_ms=deadline_ms, now=now)
        self.server.waiters.add(dispatch_id, waiter, on_chunk)
        self.link.pump.service()
        return dispatch_id


class MeshBase(Generic[AgentT, LinkT]):
    """The mesh side every adapter shares: settings, and core events to agents and waiters.

    No I/O here. An adapter listens, runs the pump, and implements the hooks:
    `_init_adapter`, `_clock`, `_new_agent_link`, `_agent_arrived`,
    `_arm_store_timer` (and optionally `_answer_upgrade`, `_tell_application`).
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
        self._frames = FrameFactory(time.time)  # one id source for every connection
        self.max_connections, self.backlog = max_connections, backlog
        self.waiters = MeshWaiters()
        self.agents: dict[str, AgentT] = {}
        self.links: set[LinkT] = set()
        self.on_event: Callable[[AgentT, Event], None] | None = None
        self._init_adapter()

    # -- hooks each adapter implements ------------------------------------------------------

    def _init_adapter(self) -> None:
        """The adapter's own state (listener, store timer, arrival signal); called by `__init__`."""

    def _clock(self) -> float:
        """Monotonic `now` for the core, on the adapter's clock."""
        raise NotImplementedError

    def _new_agent_link(self, link: LinkT) -> AgentT:
        raise NotImplementedError

    def _agent_arrived(self) -> None:
        """A session started (`agents` has it): wake `wait_for_agent()` callers."""
        raise NotImplementedError

    def _arm_store_timer(self) -> None:
        """Move the resume store's timer to `store.next_deadline()`; call `_expire_store`."""
        raise NotImplementedError

    def _answer_upgrade(self, conn: MeshConnection, event: UpgradeRequest, now: float) -> None:
        """Section 1's checks in the core's order, then 101 or the table's rejection.

        A failing instance lookup is an outage, not a rejection: 503, which clients retry.
        """
        try:
            decision = check_upgrade(event.request, verify_token=self._verify_token,
                                     lookup_instance=self._lookup)
            record = None if isinstance(decision, Reject) else self._lookup(decision.instance_id)
        except Exception:
            log.exception("upgrade check failed")
            conn.reject(status=503, code="INTERNAL", message="try again later", now=now)
            return
        if isinstance(decision, Reject):
            conn.reject(decision, now=now)
        else:
            conn.accept(decision, agent_type=record.agent_type if record else None, now=now)

    def _tell_application(self, agent: AgentT, event: Event, routed: bool) -> None:
        """Every event to `on_event`, for metrics and the application; `routed` says
        whether the mesh consumed it (handshake, session, a dispatch outcome)."""
        if self.on_event is not None:
            try:
                self.on_event(agent, event)
            except Exception:  # an application callback must not take the server down
                log.exception("on_event failed")

    # -- shared behaviour -------------------------------------------------------------------

    def _open_link(self, make_link: Callable[[MeshConnection, Callable[[Event], None]], LinkT]
                   ) -> LinkT:
        """A core connection for an accepted transport, its link and agent handle, in `links`."""
        conn = MeshConnection(dispatch_auth=self._mint, now=self._clock(), wall_clock=time.time,
                              config=self.config, resume_store=self.store,
                              verify_token=self._verify_token, frames=self._frames)
        handle: list[AgentT] = []
        link = make_link(conn, lambda event: self._on_event(handle[0], event))
        handle.append(self._new_agent_link(link))
        self.links.add(link)
        return link

    def _on_event(self, agent: AgentT, event: Event) -> None:
        """Route core events: upgrade checks (spec 1), the agent table, dispatch waiters."""
        conn = agent.conn
        routed = True
        if isinstance(event, UpgradeRequest):
            self._answer_upgrade(conn, event, self._clock())
        elif isinstance(event, SessionStarted):
            self.agents[event.instance_id] = agent
            self._agent_arrived()
        elif isinstance(event, ConnectionClosed):
            if conn.instance_id and self.agents.get(conn.instance_id) is agent:
                del self.agents[conn.instance_id]
            self._arm_store_timer()
        else:
            routed = self.waiters.dispatch_event(event)
        self._tell_application(agent, event, routed)

    def _available_agent(self, instance_id: str) -> AgentT:
        """The agent's handle when it takes dispatches now, else AGENT_UNAVAILABLE (spec 3)."""
        agent = self.agents.get(instance_id)
        if agent is None or not agent.conn.accepting_dispatches:
            raise DispatchError("", "AGENT_UNAVAILABLE", f"{instance_id} is not connected")
        return agent

    def _expire_store(self, now: float) -> None:
        """Resume windows that ended fail the dispatches they held (spec 5): wake the callers."""
        for event in held_failures(self.store.expire(now)):
            self.waiters.dispatch_event(event)
        self._arm_store_timer()

    def _request_close_all(self, grace: float | None) -> float:
        """Shutdown, first step (spec 3): close_request to every agent. Returns the grace."""
        grace = self.config.close_grace if grace is None else grace
        for link in list(self.links):
            with contextlib.suppress(Exception):
                link.pump.conn.close_request(int(grace), "mesh shutting down", now=self._clock())
            link.pump.service()
        return grace

    def _close_all(self) -> None:
        """Shutdown, after the grace (spec 4): 1001 to every agent still here, then drop it."""
        for link in list(self.links):
            with contextlib.suppress(Exception):
                link.pump.conn.close(1001, "mesh shutting down", now=self._clock())
            link.pump.service()
            link.abort()
