"""The mesh side above single connections, sans-IO: one object per mesh process that owns
every decision a mesh makes across its connections, with one timer for all of them.

`MeshRuntime` bounds and times out handshakes, admits upgrades (spec 1) from values the
driver looked up, keeps the instance table (one connection per instance: the newest
wins), sends dispatches and resolves their callers' waiters across a resume (spec 3, 5),
expires the resume store, and shuts the mesh down in steps (spec 3 `close_request`, spec 4
`1001`). Like the core it never touches a socket, never reads a clock (`now` is always an
argument) and never calls the application's lookups (they may be coroutines).

A driver identifies each transport by an opaque hashable `link` (its connection wrapper)
and, for every link:

1. `transport_accepted(link, now)` when TCP is accepted: drop the links it returns.
2. `open_connection(link, now)` when TLS is done (or at once without TLS): the core
   `MeshConnection` to feed the link's bytes to.
3. A pump per link, as for any core connection: after feeding bytes or EOF, hand
   `conn.events_received()` to `connection_events(link, events, now)`, write
   `conn.data_to_send()` (an empty `bytes` last: close the transport), and report
   `schedule(link, conn.next_deadline())`.
4. `transport_closed(link, now)` once the transport is gone, whatever the reason.

After any call into the runtime, the driver performs `take_actions()` and re-arms its one
timer at `next_deadline()`, calling `handle_timer(now)` when it passes:

* `ServiceLink(link)`: run the link's pump (its connection has output or events).
* `DropLink(link, reason)`: abort the transport now (then `transport_closed`).
* `AdmissionNeeded(link, token, instance_id)`: verify `token` and look `instance_id` up
  (either may be None: skip that step), then call `admit(link, claims=..., record=...)`.
* `AgentArrived(instance_id)`: wake `wait_for_agent` callers.
* `ShutdownComplete()`: `begin_shutdown` finished.

It logs under `svantic.mesh`: INFO for each refused upgrade, each agent connected,
resumed, replaced or disconnected, each handshake dropped (over `max_handshakes` or past
`Config.hello_timeout`), and each shutdown step; WARNING when an upgrade is answered 503
because a lookup failed; ERROR when an `on_chunk` callback or a waiter raises. `logging` is
imported when the first runtime is built, not with this module: it imports `threading`, which
gevent must patch first.
"""

from __future__ import annotations

import enum
import heapq
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeAlias, TypeVar

from .codec import FrameFactory
from .config import Config
from .errors import DispatchError, LocalProtocolError
from .events import (
    ChunkReceived,
    ConnectionClosed,
    DispatchCompleted,
    DispatchFailed,
    DispatchTimedOut,
    Event,
    HttpRequested,
    SessionStarted,
    UpgradeRequest,
)
from .frames import SessionContext
from .handshake import Accept, InstanceRecord, Reject, check_upgrade
from .http import HttpServerConnection
from .mesh import MeshConnection, MintDispatchAuth, TokenVerifier, held_failures
from .resume import ResumeStore
from .states import MeshState

if TYPE_CHECKING:
    import logging

__all__ = [
    "AT_CAPACITY",
    "SHUTTING_DOWN",
    "Action",
    "AdmissionNeeded",
    "AgentArrived",
    "DropLink",
    "MeshPhase",
    "MeshRuntime",
    "ServeHttp",
    "ServiceLink",
    "ShutdownComplete",
    "Waiter",
]

L = TypeVar("L", bound=Hashable)

AT_CAPACITY = "AT_CAPACITY"
"""The 503 code of an upgrade refused because `max_connections` sessions are up."""
SHUTTING_DOWN = "SHUTTING_DOWN"
"""The 503 code of an upgrade that was waiting for its answer when the shutdown began."""
REPLACED_REASON = "replaced by a newer connection"
SHUTDOWN_REASON = "mesh shutting down"

LOGGER_NAME = "svantic.mesh"

_OUTAGE = Reject(503, "INTERNAL", "try again later")
_AT_CAPACITY = Reject(503, AT_CAPACITY, "the mesh is at capacity: try again later")
_SHUTTING_DOWN = Reject(503, SHUTTING_DOWN, "the mesh is shutting down: try again later")


# -- actions: what the driver must do ------------------------------------------------------------


@dataclass(slots=True)  # not frozen: one is made per dispatch, and frozen costs twice as much
class ServiceLink(Generic[L]):
    """Run the link's pump: its connection has output to write or events to hand over."""

    link: L


@dataclass(frozen=True, slots=True)
class DropLink(Generic[L]):
    """Abort the link's transport now, without a goodbye; then call `transport_closed`."""

    link: L
    reason: str


@dataclass(frozen=True, slots=True)
class AdmissionNeeded(Generic[L]):
    """An upgrade waits for its answer (spec 1): verify `token` (unless None), look
    `instance_id` up (unless None), and pass both outcomes to `MeshRuntime.admit`."""

    link: L
    token: str | None
    instance_id: str | None


@dataclass(frozen=True, slots=True)
class AgentArrived:
    """A session started for `instance_id`: it is in `agents` now."""

    instance_id: str


@dataclass(frozen=True, slots=True)
class ShutdownComplete:
    """Every connection is gone (or was dropped) and every waiter has its answer."""


@dataclass(frozen=True, slots=True)
class ServeHttp(Generic[L]):
    """The link carries plain HTTP (a mesh with `serve_http`): from now on its pump feeds
    `conn`, and each `HttpRequest` it reports goes to the application, whose answers are
    written through `conn`. The runtime keeps the link's timer and its shutdown."""

    link: L
    conn: HttpServerConnection


Action: TypeAlias = (
    ServiceLink[L] | DropLink[L] | AdmissionNeeded[L] | AgentArrived | ShutdownComplete
    | ServeHttp[L]
)


class MeshPhase(enum.Enum):
    """Where the mesh's shutdown is."""

    RUNNING = "running"
    DRAINING = "draining"
    """`close_request` sent to every agent; in-flight work finishes within the grace."""
    CLOSING = "closing"
    """`1001` sent to every connection still there; dropped after `Config.close_timeout`."""
    CLOSED = "closed"


_RUNNING = MeshPhase.RUNNING  # read once: a member read through its class costs ~0.1 µs


class Waiter(Protocol):
    """A one-shot result slot of the driver's concurrency model (a future, say)."""

    def set_result(self, value: Any, /) -> None: ...
    def set_exception(self, exc: BaseException, /) -> None: ...


# -- internal state ------------------------------------------------------------------------------


@dataclass(slots=True)
class _Pending:
    waiter: Waiter
    on_chunk: Callable[[Any], object] | None
    next_seq: int = 0
    """Chunks below this were delivered already: a resumed connection may send them again."""
    raw: bool = False
    """`on_chunk` gets `(seq, data)`: a relay that passes chunks on with their numbers."""


@dataclass(slots=True)
class _Link:
    handshake_deadline: float | None
    """Until the session starts; None after."""
    conn: MeshConnection | None = None
    instance_id: str | None = None
    """Set when the upgrade is accepted."""
    admission: bool = False
    """`AdmissionNeeded` was emitted and `admit` not called yet."""
    session: bool = False
    """Its session started and entered the table (it may have ended since)."""
    ended: bool = False
    """Its connection reported `ConnectionClosed`."""
    retired: bool = False
    """The runtime gave up on it (replaced, dropped, shut down): never in the tables again."""
    dropped: bool = False
    """`DropLink` was emitted (or the driver was told to drop it)."""
    http: HttpServerConnection | None = None
    """Set when the link carries plain HTTP (`serve_http`) instead of an agent."""


class _Outage(Exception):
    def __init__(self, cause: BaseException) -> None:
        super().__init__(repr(cause))
        self.cause = cause


_CONN = 0
_HANDSHAKE = 1

_UPGRADE_PENDING = MeshState.UPGRADE_PENDING
_AWAITING_HELLO = MeshState.AWAITING_HELLO
_READY = MeshState.READY
_ENDING = (MeshState.CLOSING, MeshState.CLOSED)

_logger: logging.Logger | None = None


def _get_logger() -> logging.Logger:
    global _logger
    if _logger is None:
        import logging  # noqa: PLC0415  # lazily: it imports threading (see the module doc)

        _logger = logging.getLogger(LOGGER_NAME)
    return _logger


class MeshRuntime(Generic[L]):
    """Every decision of one mesh process above its single connections (see the module doc).

    Admission (spec 1): `check_upgrade`'s order, from the values the driver prefetched, one
    verification and one lookup per upgrade. A verifier exception is the 401 refusal
    unless it is one of `outage_errors` (default `OSError`: a network failure, a timeout);
    a lookup that raises is always an outage. An outage is answered `503` with code
    `INTERNAL` and message "try again later" (the peer never sees the exception), and
    logged at WARNING. An accepted upgrade over `max_connections` (sessions up plus
    upgrades accepted and waiting for their hello) is refused `503` with code
    `AT_CAPACITY`, unless the instance already holds one of those connections, which it
    replaces. An upgrade still waiting for `admit` when the shutdown begins gets `503`
    `SHUTTING_DOWN`.

    Handshakes (a transport accepted, until its session starts) do not count toward
    `max_connections`: they have their own bound, `max_handshakes`, beyond which the
    oldest are dropped, and each is dropped when it lasts longer than
    `Config.hello_timeout` from the moment its transport was accepted.

    Instance table: one connection per instance, the newest wins. When an upgrade for an
    instance is accepted, the connection that instance already had (running, or itself
    still waiting for its hello) is closed `1001` "replaced by a newer connection" at once,
    before the newer one's hello is read: its in-flight dispatches are then held in the
    resume store (spec 5), and the newer connection's hello resumes them with the token
    the agent holds. The table lists an instance only while its newest connection's
    session runs, so a replaced connection closing later never removes the newer one,
    and no live connection is ever left outside the table.

    Shutdown and the resume store: once `begin_shutdown` ran, no upgrade is admitted, so
    nothing held for a resume can resume on this runtime. With a process-local store (a
    plain `ResumeStore`) every held dispatch fails `AGENT_DISCONNECTED` at once, and each
    one held later as soon as its connection closes, so its caller gets the answer while
    its own link is still up (within `Config.close_timeout`). `resume_elsewhere` says the
    store can hand held dispatches to another mesh process the agent reconnects to (the
    scale-out's store): those are kept until the close timeout, when they fail as every
    waiter left does. Its default is True for any subclass of `ResumeStore` (those exist
    to honour tokens across processes), False for a plain one.
    """

    def __init__(
        self,
        *,
        dispatch_auth: MintDispatchAuth | None,
        wall_clock: Callable[[], float],
        config: Config | None = None,
        resume_store: ResumeStore | None = None,
        verify_token: TokenVerifier | None = None,
        max_connections: int = 10_000,
        max_handshakes: int = 1024,
        outage_errors: tuple[type[BaseException], ...] = (OSError,),
        random_bytes: Callable[[int], bytes] | None = None,
        serve_http: bool = False,
        max_http_connections: int = 1024,
        max_http_body_bytes: int = 1 << 20,
        resume_elsewhere: bool | None = None,
    ) -> None:
        if max_connections < 0 or max_handshakes < 0 or max_http_connections < 0:
            raise LocalProtocolError(
                "max_connections, max_handshakes and max_http_connections must be >= 0")
        self.config = config if config is not None else Config()
        self.store = (
            resume_store if resume_store is not None
            else ResumeStore(window=self.config.resume_window)
        )
        self.max_connections = max_connections
        self.max_handshakes = max_handshakes
        self._resume_elsewhere = (
            type(self.store) is not ResumeStore if resume_elsewhere is None else resume_elsewhere
        )
        self._mint = dispatch_auth
        self._verify_token = verify_token
        self._wall_clock = wall_clock
        self._random_bytes = random_bytes
        self._outage_errors = outage_errors
        self.serve_http = serve_http
        self.max_http_connections = max_http_connections
        self.max_http_body_bytes = max_http_body_bytes
        self._http: dict[L, None] = {}  # links carrying plain HTTP, oldest first
        self._frames = FrameFactory(wall_clock, random_bytes)  # one id source for all
        self._log = _get_logger()

        self._links: dict[L, _Link] = {}
        self._handshakes: dict[L, None] = {}  # oldest first
        self._sessions: set[L] = set()  # sessions up, in the table
        self._admitted: set[L] = set()  # upgrades accepted, hello pending
        self._owner: dict[str, L] = {}  # instance -> its newest admitted connection
        self._agents: dict[str, L] = {}  # instance -> its running session
        self._agents_view: Mapping[str, L] = MappingProxyType(self._agents)
        self._waiters: dict[str, _Pending] = {}

        self._heap: list[tuple[float, int, int, L]] = []  # (when, seq, kind, link); lazy
        self._seq = 0
        self._conn_deadlines: dict[L, float] = {}
        self._actions: list[Action[L]] = []

        self._phase = MeshPhase.RUNNING
        self._phase_deadline: float | None = None

    # -- reading ---------------------------------------------------------------------------------

    @property
    def phase(self) -> MeshPhase:
        return self._phase

    @property
    def agents(self) -> Mapping[str, L]:
        """Instance id -> the link of its running session (a read-only live view)."""
        return self._agents_view

    def available(self, instance_id: str) -> bool:
        """Whether `dispatch` to this instance would be sent now."""
        link = self._agents.get(instance_id)
        if link is None or self._phase is not MeshPhase.RUNNING:
            return False
        conn = self._links[link].conn
        return conn is not None and conn.accepting_dispatches

    def connections(self) -> int:
        """Sessions up (what `max_connections` bounds, with the accepted upgrades)."""
        return len(self._sessions)

    def handshakes(self) -> int:
        """Transports accepted whose session has not started (what `max_handshakes` bounds)."""
        return len(self._handshakes)

    def http_connections(self) -> int:
        """Links carrying plain HTTP (what `max_http_connections` bounds)."""
        return len(self._http)

    def waiting(self) -> int:
        """Dispatches whose caller waits for an outcome."""
        return len(self._waiters)

    def take_actions(self) -> list[Action[L]]:
        """What the driver must do now, oldest first (one `ServiceLink` per link)."""
        actions = self._actions
        if not actions:
            return actions  # empty: nothing to do, and no new list per call
        self._actions = []
        if len(actions) > 1:
            seen: set[L] = set()
            kept: list[Action[L]] = []
            for action in actions:
                if type(action) is ServiceLink:
                    if action.link in seen:
                        continue
                    seen.add(action.link)
                kept.append(action)
            actions = kept
        return actions

    # -- transports ------------------------------------------------------------------------------

    def transport_accepted(self, link: L, now: float) -> list[L]:
        """A TCP connection was accepted: a handshake starts. Returns the links to drop now:
        the oldest handshakes beyond `max_handshakes` (possibly `link` itself), or `link`
        when the mesh is shutting down."""
        if self._phase is not MeshPhase.RUNNING:
            return [link]
        if link in self._links:
            return []
        deadline = now + self.config.hello_timeout
        self._links[link] = _Link(handshake_deadline=deadline)
        self._handshakes[link] = None
        self._push(deadline, _HANDSHAKE, link)
        dropped: list[L] = []
        while len(self._handshakes) > self.max_handshakes:
            oldest = next(iter(self._handshakes))
            self._retire(oldest, self._links[oldest])
            self._links[oldest].dropped = True
            dropped.append(oldest)
        if dropped:
            self._log.info(
                "handshake limit (%d) reached: dropping the %d oldest", self.max_handshakes,
                len(dropped),
            )
        return dropped

    def open_connection(self, link: L, now: float) -> MeshConnection:
        """TLS is done (or there is none): the core connection to feed this link's bytes to."""
        state = self._links.get(link)
        if state is None:
            raise LocalProtocolError("open_connection: call transport_accepted(link) first")
        if state.conn is not None:
            raise LocalProtocolError("open_connection: this link has its connection already")
        conn = MeshConnection(
            dispatch_auth=self._mint, now=now, wall_clock=self._wall_clock, config=self.config,
            resume_store=self.store, verify_token=self._verify_token,
            random_bytes=self._random_bytes, frames=self._frames, serve_http=self.serve_http,
        )
        state.conn = conn
        self._refresh(link, state)
        return conn

    def connection_events(self, link: L, events: Sequence[Event], now: float) -> None:
        """Every event of the link's connection, in order (from the driver's pump)."""
        state = self._links.get(link)
        debug = self._log.debug
        for event in events:
            debug("%s: %r", state.instance_id if state is not None else None, event)
            if isinstance(event, ChunkReceived | DispatchCompleted | DispatchFailed
                          | DispatchTimedOut):
                self._outcome(event)
            elif state is None:
                continue
            elif isinstance(event, UpgradeRequest):
                self._upgrade_requested(link, state, event, now)
            elif isinstance(event, SessionStarted):
                self._session_started(link, state, event)
            elif isinstance(event, HttpRequested):
                self._http_requested(link, state, event, now)
            elif isinstance(event, ConnectionClosed):
                self._connection_closed(link, state, event, now)

    def transport_closed(self, link: L, now: float) -> None:
        """The link's transport ended, whatever the reason: forget the link everywhere.

        A connection that had not reported its end is told of the EOF first, and the
        runtime handles its last events itself (its in-flight dispatches go to the resume
        store, their callers keep waiting)."""
        state = self._links.get(link)
        if state is None:
            return
        conn = state.conn
        if state.http is not None:
            self._http.pop(link, None)
            state.http.abort("the transport closed")
            state.http.events_received()  # the driver's pump is detached: nobody reads them
            state.http.data_to_send()
        elif conn is not None and not state.ended:
            conn.receive_eof(now)
            self.connection_events(link, conn.events_received(), now)
            conn.data_to_send()  # nowhere to write it
        del self._links[link]
        self._handshakes.pop(link, None)
        self._conn_deadlines.pop(link, None)
        self._release(link, state)
        self._check_shutdown(now)

    def schedule(self, link: L, deadline: float | None) -> None:
        """The link's connection wants `handle_timer` at `deadline` (None: no timer)."""
        if link in self._links:
            self._set_deadline(link, deadline)

    # -- the one timer ---------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """The earliest of every connection's timer, the handshake timeouts, the resume
        store's and the shutdown's next step; None when nothing is due ever."""
        if self._phase is MeshPhase.CLOSED:
            return None
        heap = self._heap
        while heap and not self._live(heap[0]):
            heapq.heappop(heap)
        candidates = [
            d for d in (heap[0][0] if heap else None, self.store.next_deadline(),
                        self._phase_deadline)
            if d is not None
        ]
        return min(candidates, default=None)

    def handle_timer(self, now: float) -> None:
        """Run everything due at `now`; what the driver must do next is in `take_actions()`."""
        if self._phase is MeshPhase.CLOSED:
            return
        # A shutdown step due now goes first: its 1001 wins over a connection's own
        # close_request grace timer that ends at the same instant.
        if self._shutdown_step(now):
            return
        due: list[L] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            item = heapq.heappop(heap)
            if not self._live(item):
                continue
            link = item[3]
            if item[2] == _CONN:
                del self._conn_deadlines[link]
                due.append(link)
            else:
                self._handshake_timed_out(link)
        for link in due:
            state = self._links.get(link)
            if state is None:
                continue
            target = state.http if state.http is not None else state.conn
            if target is None:
                continue
            target.handle_timer(now)
            self._refresh(link, state)
            self._actions.append(ServiceLink(link))
        for event in held_failures(self.store.expire(now)):
            self._outcome(event)

    # -- admission (spec 1) ----------------------------------------------------------------------

    def admit(self, link: L, *, claims: Any, record: InstanceRecord | BaseException | None,
              now: float) -> None:
        """Answer the link's upgrade from what the driver looked up for its `AdmissionNeeded`.

        `claims`: what `verify_token(token)` returned, or the exception it raised (None when
        the token was None, or verification was skipped). `record`: what
        `lookup_instance(instance_id)` returned, or the exception it raised (None when not
        looked up; a driver may skip the lookup once the token failed). A stale call (the
        link was dropped meanwhile) does nothing.
        """
        state = self._links.get(link)
        conn = state.conn if state is not None else None
        if (state is None or conn is None or not state.admission or state.retired
                or conn.state is not _UPGRADE_PENDING or conn.request is None):
            return
        state.admission = False
        request = conn.request
        outage: list[BaseException] = []
        outage_errors = self._outage_errors

        def verify(token: str) -> Any:
            if isinstance(claims, BaseException):
                if isinstance(claims, outage_errors):
                    outage.append(claims)
                return None  # the refusal: 401
            return claims

        def lookup(instance_id: str) -> InstanceRecord | None:
            if isinstance(record, BaseException):
                raise _Outage(record)
            return record

        decision: Accept[Any] | Reject | None = None
        try:
            decision = check_upgrade(request, verify_token=verify, lookup_instance=lookup)
        except _Outage as exc:
            outage.append(exc.cause)
        except Exception as exc:  # e.g. claims of an unusable shape: a bug, not the peer's
            outage.append(exc)
        if outage or decision is None:
            self._log.warning(
                "upgrade for instance %s answered 503: the token or instance lookup failed: %r",
                request.instance_id, outage[0] if outage else None,
            )
            self._reject(link, state, _OUTAGE, now)
            return
        if isinstance(decision, Reject):
            self._reject(link, state, decision, now)
            return
        instance_id = decision.instance_id
        agent_type = record.agent_type if isinstance(record, InstanceRecord) else None
        if (instance_id not in self._owner
                and len(self._sessions) + len(self._admitted) >= self.max_connections):
            self._reject(link, state, _AT_CAPACITY, now)
            return
        older = self._owner.get(instance_id)
        if older is not None and older != link:
            # Before the newer hello is read: the older's in-flight dispatches are held
            # under the token the agent will present (spec 5).
            self._replace(older, instance_id, now)
        conn.accept(decision, agent_type=agent_type, now=now)
        state.instance_id = instance_id
        self._owner[instance_id] = link
        self._admitted.add(link)
        self._refresh(link, state)
        self._actions.append(ServiceLink(link))

    def _upgrade_requested(self, link: L, state: _Link, event: UpgradeRequest,
                           now: float) -> None:
        if state.retired:
            return
        if self._phase is not MeshPhase.RUNNING:
            self._reject(link, state, _SHUTTING_DOWN, now)
            return
        request = event.request
        # Ask check_upgrade itself whether it would verify the token: the order stays its own.
        reached: list[str] = []

        def probe(token: str) -> None:
            reached.append(token)

        check_upgrade(request, verify_token=probe, lookup_instance=lambda _: None)
        state.admission = True
        if reached:
            self._actions.append(AdmissionNeeded(link, reached[0], request.instance_id))
        else:
            self._actions.append(AdmissionNeeded(link, None, None))

    def _reject(self, link: L, state: _Link, answer: Reject, now: float) -> None:
        conn = state.conn
        if conn is None:
            return
        request = conn.request
        instance_id = request.instance_id if request is not None else None
        state.admission = False
        conn.reject(answer, now=now)
        self._log.info("upgrade refused: %d %s (instance %s)", answer.status, answer.code,
                       instance_id)
        self._refresh(link, state)
        self._actions.append(ServiceLink(link))

    # -- the instance table ----------------------------------------------------------------------

    def _session_started(self, link: L, state: _Link, event: SessionStarted) -> None:
        self._handshakes.pop(link, None)
        state.handshake_deadline = None
        self._admitted.discard(link)
        instance_id = event.instance_id
        if state.retired or state.ended or self._owner.get(instance_id) != link:
            return  # replaced (or dropped) before this was seen: it is closing already
        state.session = True
        self._sessions.add(link)
        self._agents[instance_id] = link
        conn = state.conn
        connection_id = conn.connection_id if conn is not None else None
        if event.resumed:
            self._log.info("agent %s resumed on connection %s, replayed dispatches: %s",
                           instance_id, connection_id, list(event.replayed_dispatches))
        else:
            self._log.info("agent %s connected on connection %s", instance_id, connection_id)
        self._actions.append(AgentArrived(instance_id))

    def _connection_closed(self, link: L, state: _Link, event: ConnectionClosed,
                           now: float) -> None:
        if state.ended:
            return
        state.ended = True
        state.admission = False
        self._handshakes.pop(link, None)
        self._release(link, state)
        if state.session:
            self._log.info("agent %s disconnected: code %s (%s)", state.instance_id, event.code,
                           event.reason)
        if self._phase is not _RUNNING:
            self._fail_held()  # what this connection just parked can never resume here
        self._check_shutdown(now)

    def _replace(self, older: L, instance_id: str, now: float) -> None:
        state = self._links[older]
        self._retire(older, state)
        conn = state.conn
        if conn is not None and conn.state not in _ENDING:
            conn.close(1001, REPLACED_REASON, now=now)
            self._refresh(older, state)
            self._actions.append(ServiceLink(older))
        self._log.info("agent %s: connection %s replaced by a newer connection", instance_id,
                       conn.connection_id if conn is not None else None)

    def _retire(self, link: L, state: _Link) -> None:
        """The runtime gives up on this link: out of every table and bound for good."""
        state.retired = True
        state.admission = False
        self._handshakes.pop(link, None)
        self._release(link, state)

    def _release(self, link: L, state: _Link) -> None:
        self._sessions.discard(link)
        self._admitted.discard(link)
        instance_id = state.instance_id
        if instance_id is not None:
            if self._owner.get(instance_id) == link:
                del self._owner[instance_id]
            if self._agents.get(instance_id) == link:
                del self._agents[instance_id]

    def _http_requested(self, link: L, state: _Link, event: HttpRequested, now: float) -> None:
        """Plain HTTP on this link: it leaves the handshakes (and their bound and timeout)
        for the HTTP links, bounded by `max_http_connections` (the oldest idle one goes
        first; with none idle, the newcomer is answered 503)."""
        self._handshakes.pop(link, None)
        state.handshake_deadline = None
        config = self.config
        http = HttpServerConnection(
            now=now, max_header_bytes=config.max_handshake_bytes,
            max_body_bytes=self.max_http_body_bytes,
            max_buffered_bytes=self.max_http_body_bytes + config.max_handshake_bytes,
            request_timeout=config.hello_timeout,
        )
        state.http = http
        self._http[link] = None
        if len(self._http) > self.max_http_connections:
            idle = self._idle_http(exclude=link)
            if idle is None:
                http.refuse(503, AT_CAPACITY, "too many HTTP connections: try again later")
                self._log.info("HTTP connection limit (%d) reached: answered 503",
                               self.max_http_connections)
                self._actions.append(ServeHttp(link, http))
                return
            idle_state = self._links[idle]
            if idle_state.http is not None:
                idle_state.http.abort("HTTP connection limit")
            self._refresh(idle, idle_state)
            self._actions.append(ServiceLink(idle))
        http.receive_data(event.data, now)
        self._refresh(link, state)
        self._actions.append(ServeHttp(link, http))

    def _idle_http(self, exclude: L) -> L | None:
        """The oldest HTTP link waiting for a request (none is answering on it)."""
        for link in self._http:
            http = self._links[link].http
            if link != exclude and http is not None and not http.answering:
                return link
        return None

    def _handshake_timed_out(self, link: L) -> None:
        state = self._links[link]
        self._retire(link, state)
        if not state.dropped:
            state.dropped = True
            self._actions.append(DropLink(link, "handshake timeout"))
        self._log.info("handshake dropped after %s s (instance %s)", self.config.hello_timeout,
                       state.instance_id)

    # -- dispatches (spec 3, 5) ------------------------------------------------------------------

    def dispatch(
        self,
        instance_id: str,
        capability: str,
        arguments: Mapping[str, Any] | None,
        *,
        deadline_ms: int,
        now: float,
        waiter: Waiter,
        on_chunk: Callable[[Any], object] | None = None,
        task_id: str | None = None,
        session_context: SessionContext | None = None,
        dispatch_id: str | None = None,
    ) -> tuple[str, L]:
        """Send a dispatch; its outcome goes to `waiter` (a result, or a `DispatchError`),
        its chunks to `on_chunk` in `seq` order, once each, across a resume. Returns the
        dispatch id (`dispatch_id` when the caller chose one: a canonical UUID not in
        flight) and the link to service (and to wait on for backpressure).

        Raises `DispatchError` `AGENT_UNAVAILABLE` when the instance has no running session
        that takes dispatches (not connected, asked to close, or the mesh is shutting down).
        """
        if self._phase is not _RUNNING:
            raise DispatchError("", "AGENT_UNAVAILABLE", "the mesh is shutting down")
        link = self._agents.get(instance_id)
        state = self._links.get(link) if link is not None else None
        conn = state.conn if state is not None else None
        if link is None or state is None or conn is None or not conn.accepting_dispatches:
            raise DispatchError("", "AGENT_UNAVAILABLE", f"{instance_id} is not connected")
        dispatch_id = conn.send_dispatch(
            capability, dict(arguments) if arguments else {}, deadline_ms=deadline_ms, now=now,
            task_id=task_id, session_context=session_context, dispatch_id=dispatch_id,
        )
        self._waiters[dispatch_id] = _Pending(waiter, on_chunk)
        self._actions.append(ServiceLink(link))  # whose pump then schedules its new deadline
        return dispatch_id, link

    def discard(self, dispatch_id: str) -> None:
        """The caller gave up: its waiter is told nothing more."""
        self._waiters.pop(dispatch_id, None)

    # -- dispatches between mesh processes (scale-out) --------------------------------------------

    def adopt(self, dispatch_id: str, waiter: Waiter,
              on_chunk: Callable[[tuple[int, Any]], object] | None = None) -> None:
        """Wait here for a dispatch this runtime did not send: one held by another mesh
        process and re-sent by a connection here that resumed with that process's token
        (spec 5). Its outcome goes to `waiter` as for `dispatch`; its chunks to `on_chunk`
        as `(seq, data)`, so the process whose caller waits can drop what it already had."""
        self._waiters[dispatch_id] = _Pending(waiter, on_chunk, raw=True)

    def deliver_chunk(self, dispatch_id: str, seq: int, data: Any) -> None:
        """A chunk of a dispatch this runtime waits for, received by another mesh process
        (its agent resumed there): to `on_chunk` in `seq` order, once each."""
        self._outcome(ChunkReceived(dispatch_id=dispatch_id, seq=seq, data=data))

    def settle(self, dispatch_id: str, *, result: Any = None,
               error: tuple[str, str] | None = None) -> bool:
        """The outcome of a dispatch this runtime waits for, decided by another mesh process
        (its agent resumed there): `result`, or `error` as `(code, message)`, to the waiter,
        once. False when nobody waits (it ended here already, or was never sent here)."""
        if dispatch_id not in self._waiters:
            return False
        if error is None:
            self._outcome(DispatchCompleted(dispatch_id=dispatch_id, result=result))
        else:
            self._outcome(DispatchFailed(dispatch_id=dispatch_id, code=error[0],
                                         message=error[1]))
        return True

    def _outcome(self, event: ChunkReceived | DispatchCompleted | DispatchFailed
                 | DispatchTimedOut) -> None:
        if isinstance(event, ChunkReceived):
            pending = self._waiters.get(event.dispatch_id)
            if pending is None or event.seq < pending.next_seq:
                return  # nobody waits, or already delivered before a resume
            pending.next_seq = event.seq + 1
            if pending.on_chunk is not None:
                try:
                    pending.on_chunk((event.seq, event.data) if pending.raw else event.data)
                except Exception:  # the application's callback must not take the mesh down
                    self._log.exception("on_chunk failed for dispatch %s", event.dispatch_id)
            return
        pending = self._waiters.pop(event.dispatch_id, None)
        if pending is None:
            return
        try:
            if isinstance(event, DispatchCompleted):
                pending.waiter.set_result(event.result)
            elif isinstance(event, DispatchFailed):
                pending.waiter.set_exception(
                    DispatchError(event.dispatch_id, event.code, event.message, event.detail)
                )
            else:
                pending.waiter.set_exception(
                    DispatchError(event.dispatch_id, "DEADLINE_EXCEEDED", "no answer in time")
                )
        except Exception:  # e.g. a future cancelled meanwhile
            self._log.exception("waiter failed for dispatch %s", event.dispatch_id)

    # -- shutdown --------------------------------------------------------------------------------

    def begin_shutdown(self, now: float, grace: float | None = None) -> None:
        """RUNNING -> DRAINING: `close_request` (with the grace, default
        `Config.close_grace`) to every running session, handshakes closed, new transports
        refused. When every session has ended, or at `now + grace`: CLOSING, `1001` to
        every connection left; `Config.close_timeout` later: `DropLink` for what remains,
        CLOSED, every waiter left fails `AGENT_DISCONNECTED` (before the links are dropped),
        `ShutdownComplete`. Dispatches held for a resume fail as soon as they are held
        (see the class doc for `resume_elsewhere`)."""
        if self._phase is not MeshPhase.RUNNING:
            return
        grace = self.config.close_grace if grace is None else grace
        self._phase = MeshPhase.DRAINING
        self._phase_deadline = now + grace
        self._log.info("mesh shutdown: close_request to %d agents, grace %s s",
                       len(self._sessions), grace)
        for link, state in list(self._links.items()):
            conn = state.conn
            if state.http is not None:  # answer what was asked, keep nothing alive
                state.http.close_when_idle()
                self._actions.append(ServiceLink(link))
                continue
            if conn is None:
                self._retire(link, state)
                self._drop(link, state, SHUTDOWN_REASON)
                continue
            conn_state = conn.state
            if conn_state is _READY:
                conn.close_request(math.ceil(grace), SHUTDOWN_REASON, now=now)
            elif conn_state is _AWAITING_HELLO:
                self._retire(link, state)
                conn.close(1001, SHUTDOWN_REASON, now=now)
            elif conn_state is _UPGRADE_PENDING:
                self._retire(link, state)
                self._reject(link, state, _SHUTTING_DOWN, now)
            elif conn_state is MeshState.HANDSHAKE:
                self._retire(link, state)
                self._drop(link, state, SHUTDOWN_REASON)
                continue
            else:
                continue
            self._refresh(link, state)
            self._actions.append(ServiceLink(link))
        self._fail_held()  # parked before the shutdown: no upgrade is admitted any more
        self._check_shutdown(now)

    def _fail_held(self) -> None:
        """Fail every dispatch the resume store holds, `AGENT_DISCONNECTED`, now: once the
        shutdown began this runtime admits no upgrade, so no hello can resume them here,
        and a caller waiting for the close timeout would only find its own connection
        dropped with the mesh. A store that can hand them to another mesh process
        (`resume_elsewhere`, scale-out) keeps them: the agent may resume there, and the
        outcome comes back here (`settle`) until the close timeout."""
        if self._resume_elsewhere:
            return
        held = self.store.expire(math.inf)  # every window and deadline: all that is held
        if not held:
            return
        self._log.info("mesh shutdown: %d held dispatches failed AGENT_DISCONNECTED (no agent "
                       "can resume them on a mesh shutting down)", len(held))
        for dispatch in held:
            self._outcome(DispatchFailed(dispatch_id=dispatch.dispatch_id,
                                         code="AGENT_DISCONNECTED", message=SHUTDOWN_REASON))

    def _shutdown_step(self, now: float) -> bool:
        """The shutdown steps due at `now`; True once the mesh is CLOSED."""
        deadline = self._phase_deadline
        if deadline is not None and deadline <= now and self._phase is MeshPhase.DRAINING:
            self._log.info("mesh shutdown: the grace ended")
            self._enter_closing(now)
        deadline = self._phase_deadline
        if deadline is not None and deadline <= now and self._phase is MeshPhase.CLOSING:
            self._enter_closed(now)
        return self._phase is MeshPhase.CLOSED

    def _check_shutdown(self, now: float) -> None:
        if self._phase is MeshPhase.DRAINING and not self._sessions and not self._admitted:
            self._log.info("mesh shutdown: every agent left")
            self._enter_closing(now)
        if self._phase is MeshPhase.CLOSING and not self._links:
            self._enter_closed(now)

    def _enter_closing(self, now: float) -> None:
        self._phase = MeshPhase.CLOSING
        self._phase_deadline = now + self.config.close_timeout
        closing = 0
        for link, state in list(self._links.items()):
            conn = state.conn
            self._retire(link, state)
            if state.http is not None:
                # An answer in progress finishes (the link closes after it, see
                # begin_shutdown), within the close timeout; an idle link goes now.
                if not state.http.answering:
                    self._drop(link, state, SHUTDOWN_REASON)
            elif conn is not None and conn.state in (_AWAITING_HELLO, _READY, MeshState.DRAINING):
                conn.close(1001, SHUTDOWN_REASON, now=now)
                closing += 1
                self._refresh(link, state)
                self._actions.append(ServiceLink(link))
            elif conn is None or conn.state not in _ENDING:
                self._drop(link, state, SHUTDOWN_REASON)
        self._log.info("mesh shutdown: 1001 to %d connections, %d transports left", closing,
                       len(self._links))
        self._check_shutdown(now)

    def _enter_closed(self, now: float) -> None:
        # The waiters first, then the drops: an answer written from the waiter itself (a
        # relay) still finds its link. An application that answers later, from a task of
        # its own, finds it dropped: hence held dispatches fail earlier (`_fail_held`).
        self._phase = MeshPhase.CLOSED
        self._phase_deadline = None
        waiters, self._waiters = self._waiters, {}
        for dispatch_id, pending in waiters.items():
            try:
                pending.waiter.set_exception(
                    DispatchError(dispatch_id, "AGENT_DISCONNECTED", "mesh shut down")
                )
            except Exception:
                self._log.exception("waiter failed for dispatch %s", dispatch_id)
        for link, state in self._links.items():
            self._drop(link, state, "mesh shut down")
        self._log.info("mesh shutdown complete: %d transports dropped, %d dispatches failed",
                       len(self._links), len(waiters))
        self._actions.append(ShutdownComplete())

    def _drop(self, link: L, state: _Link, reason: str) -> None:
        if not state.dropped:
            state.dropped = True
            self._actions.append(DropLink(link, reason))

    # -- timers ----------------------------------------------------------------------------------

    def _refresh(self, link: L, state: _Link) -> None:
        target = state.http if state.http is not None else state.conn
        self._set_deadline(link, target.next_deadline() if target is not None else None)

    def _set_deadline(self, link: L, deadline: float | None) -> None:
        deadlines = self._conn_deadlines
        if deadline is None:
            deadlines.pop(link, None)
        elif deadlines.get(link) != deadline:
            deadlines[link] = deadline
            self._push(deadline, _CONN, link)

    def _push(self, when: float, kind: int, link: L) -> None:
        heap = self._heap
        self._seq += 1
        heapq.heappush(heap, (when, self._seq, kind, link))
        if len(heap) > 64 and len(heap) > 4 * (len(self._conn_deadlines) + len(self._handshakes)):
            # Lazy deletion leaves stale entries behind; keep the heap near the live count.
            self._heap = [item for item in heap if self._live(item)]
            heapq.heapify(self._heap)

    def _live(self, item: tuple[float, int, int, L]) -> bool:
        when, _, kind, link = item
        if kind == _CONN:
            return self._conn_deadlines.get(link) == when
        if link not in self._handshakes:
            return False
        return self._links[link].handshake_deadline == when
