"""The agent side above one connection, sans-IO: every decision an agent makes between
connections and around its handlers, so that each driver only dials, moves bytes, runs
handlers and sleeps until one deadline.

`AgentRuntime` owns the capability registry, handler bookkeeping (start, outcome to frame,
cancel, "gave no answer"), reconnecting as a state machine (dial, connected, backoff, dial
again), which dial failures and handshake answers are retried (spec 5), the token-refresh
step and the stop policy. It is driven like a core connection, with the same five steps:

1. Write `data_to_send()` to the current transport; an empty `bytes` last means close it.
2. Feed reads to `receive_data(data, now)`, end of stream to `receive_eof(now)`.
3. Act on `events_received()`: the actions below, and the core's events passed through.
4. Keep one timer at `next_deadline()`; call `handle_timer(now)` when it passes.
5. After each of 2-4 (and after `start`, `stop`, a dial's outcome or a handler's answer),
   repeat 1 and 3.

Actions: `Dial` (open a transport; report `transport_open()` or `dial_failed()`),
`AbortTransport` (drop the transport or the dial in progress, now), `StartHandler`,
`CancelHandler`, `FetchToken` (call the token provider, then `token_fetched()`), and
`Stopped` (the agent is done: `error` is the final refusal, or None after `stop()`).

Like the core it never touches a socket or a clock. It logs under `svantic.agent`, each line
starting with the instance id: INFO for each step of the reconnect machine (dialling, a failed
dial, the backoff delay, connected or resumed, refused, closed, stopping, stopped), WARNING for
a TLS dial failure, a handler that raised (with its traceback) or gave no answer, a result that
is not JSON, a failed token fetch, and giving up after a final refusal. `logging` is imported
when the first runtime is made, not with this module: it imports `threading`, which gevent must
patch first.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .agent import AgentConnection, AgentSession
from .auth import DispatchAuthVerifier
from .backoff import RetryDecision
from .capabilities import (
    CapabilityRegistry,
    DispatchContext,
    Handler,
    handler_outcome,
)
from .config import Config
from .errors import DispatchError, HandshakeRejected, LocalProtocolError
from .events import (
    CloseRequested,
    ConnectionClosed,
    DispatchCancelled,
    DispatchReceived,
    Event,
    SessionStarted,
    ToolResultReceived,
)
from .handshake import build_upgrade_request
from .states import AgentState

__all__ = [
    "AbortTransport",
    "AgentAction",
    "AgentPhase",
    "AgentRuntime",
    "CancelHandler",
    "Dial",
    "DialFailure",
    "FetchToken",
    "StartHandler",
    "Stopped",
]

if TYPE_CHECKING:
    import logging

LOGGER_NAME = "svantic.agent"


def _logger() -> logging.Logger:
    """`svantic.agent`, imported when the first runtime is made: `logging` loads `threading`,
    which the core must not import (gevent patches it first)."""
    import logging  # noqa: PLC0415

    return logging.getLogger(LOGGER_NAME)


class AgentPhase(enum.Enum):
    """Where the reconnect machine is (docs/state-machines.md)."""

    IDLE = "idle"
    DIALLING = "dialling"
    CONNECTED = "connected"
    """A transport is open: the upgrade, the hello, or a running session."""
    BACKOFF = "backoff"
    STOPPING = "stopping"
    STOPPED = "stopped"


class DialFailure(enum.Enum):
    """Why a transport could not be opened; each is retried with backoff (spec 5)."""

    REFUSED = "connection refused"
    TIMED_OUT = "timed out"
    TLS = "TLS failure"
    NAME_RESOLUTION = "name resolution failed"
    NETWORK = "network error"


@dataclass(frozen=True, slots=True)
class Dial:
    """Open a TCP connection (with TLS when `tls`) to `host:port`; `attempt` names it."""

    host: str
    port: int
    tls: bool
    attempt: int


@dataclass(frozen=True, slots=True)
class AbortTransport:
    """Drop the current transport, or the dial in progress, at once."""

    reason: str


@dataclass(slots=True)  # not frozen: one is made per dispatch, and frozen costs 4x as much
class StartHandler:
    """Run `handler(arguments, context)` in the driver's concurrency; report its outcome
    with `handler_returned`, `handler_raised` or `handler_cancelled`."""

    dispatch_id: str
    handler: Handler
    arguments: Mapping[str, Any]
    context: DispatchContext
    blocking: bool = False
    """A plain function that may block: an async driver runs it in a worker thread."""


@dataclass(frozen=True, slots=True)
class CancelHandler:
    """Interrupt the handler of `dispatch_id` (the mesh cancelled it, its deadline passed,
    or the agent stopped); it then reports `handler_cancelled`."""

    dispatch_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class FetchToken:
    """The mesh refused the token (spec 5): call the token provider, then `token_fetched`."""


@dataclass(frozen=True, slots=True)
class Stopped:
    """The agent is done: `error` is why (a final refusal), None after `stop()`."""

    error: BaseException | None


AgentAction = Dial | AbortTransport | StartHandler | CancelHandler | FetchToken | Stopped


class AgentRuntime:
    """One agent instance across its connections (spec 1, 3, 5), sans-IO.

    `token_refresher` says whether the driver has a token provider: without one, a 401
    or `AUTH_EXPIRED` is retried with the same token. `wall_clock` gives Unix time to
    the core (frame `ts`, dispatch-auth `exp` checks): the driver passes `time.time`.

    `max_concurrent_sessions` (0: no limit) bounds the handlers running at once: a dispatch
    beyond it is refused `AGENT_UNAVAILABLE` ("busy") without running user code. The mesh
    counts its leases against the same number and should not send more; the refusal covers
    a mesh that does (or a cap lowered at run time). Heartbeats report the limit, the
    running count as `active_sessions`, and status `busy` while at the limit.
    """

    def __init__(self, url: str, *, token: str, instance_id: str,
                 dispatch_auth: DispatchAuthVerifier, agent_type: str | None = None,
                 config: Config | None = None, session: AgentSession | None = None,
                 capabilities: CapabilityRegistry | None = None,
                 token_refresher: bool = False, allow_insecure_loopback: bool = False,
                 max_concurrent_sessions: int = 0,
                 wall_clock: Callable[[], float]) -> None:
        # A bad URL, token or instance id raises here, at once, not in the first attempt.
        build_upgrade_request(url, token=token, instance_id=instance_id,
                              allow_insecure_loopback=allow_insecure_loopback)
        parts = urlsplit(url)
        self.url, self.token, self.instance_id = url, token, instance_id
        self.agent_type = agent_type
        self.config = config or (session.config if session is not None else Config())
        self.session = session or AgentSession(self.config)
        self.capabilities = capabilities if capabilities is not None else CapabilityRegistry()
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if parts.scheme == "wss" else 80)
        self.tls = parts.scheme == "wss"
        self._verifier = dispatch_auth
        self._token_refresher = token_refresher
        self._insecure = allow_insecure_loopback
        self._wall_clock = wall_clock
        self._log = _logger()
        self.phase = AgentPhase.IDLE
        self.conn: AgentConnection | None = None
        """The current (or last) core connection; answers go through it or its outbox."""
        self._transport_open = False  # the current conn's transport has not been closed
        self._attempt = 0
        self._deadline: float | None = None  # dial timeout, backoff end, or stop limit
        self._fetching_token = False
        self._dial_after_token = False
        self._actions: list[AgentAction | Event] = []
        self._running: dict[str, DispatchContext] = {}
        self._cancel_sent: set[str] = set()
        self._now = 0.0
        self.handler_runs = 0
        self.max_concurrent_sessions = 0
        self._reported: str | None = None  # the load status the connection was last given
        self._reporting = False  # heartbeats carry the limit once one was ever set
        if max_concurrent_sessions:
            self.set_max_concurrent_sessions(max_concurrent_sessions)
        self.last_closed: ConnectionClosed | None = None
        self.last_started: SessionStarted | None = None
        self._tool_waiters: dict[str, Any] = {}  # call id -> its waiter
        self.tool_caller: Callable[..., Any] | None = None
        """The driver's `call_tool` (it sends through `call_tool` below and waits in its own
        way): handed to every handler as `DispatchContext.call_tool`."""
        self.on_output: Callable[[], object] | None = None
        """Called after a handler's chunk queued output outside the driver's own calls, so
        the driver can write it (its step 1)."""

    # -- the driver's calls ------------------------------------------------------------------

    @property
    def running_handlers(self) -> int:
        return len(self._running)

    @property
    def load_status(self) -> str:
        """`busy` while the running handlers are at `max_concurrent_sessions`, else
        `available`: what heartbeats report."""
        limit = self.max_concurrent_sessions
        return "busy" if 0 < limit <= len(self._running) else "available"

    def set_max_concurrent_sessions(self, limit: int) -> None:
        """Change the limit (0: none); the next heartbeat reports it, at once when it
        changes the status."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise LocalProtocolError(
                f"max_concurrent_sessions must be an integer >= 0, not {limit!r}")
        self.max_concurrent_sessions = limit
        self._reporting = True
        self._report_load(force=True)

    def start(self, now: float) -> None:
        """Begin: dial at once."""
        if self.phase is not AgentPhase.IDLE:
            raise LocalProtocolError(f"the agent runtime is {self.phase.value}, not idle")
        self._now = now
        self._dial(now)

    def transport_open(self, attempt: int, now: float) -> bool:
        """The transport of `Dial(attempt)` is open (TLS done): make its core connection.

        Returns False when that dial was abandoned meanwhile (timed out, or stopped): then
        close the transport.
        """
        self._now = now
        if attempt != self._attempt or self.phase is not AgentPhase.DIALLING:
            return False
        self.phase = AgentPhase.CONNECTED
        self._deadline = None
        self.last_closed = None
        self._transport_open = True
        self.conn = AgentConnection(
            self.url, token=self.token, instance_id=self.instance_id,
            dispatch_auth=self._verifier, session=self.session, agent_type=self.agent_type,
            capabilities=self.capabilities.capabilities, config=self.config, now=now,
            wall_clock=self._wall_clock, allow_insecure_loopback=self._insecure,
        )
        self._report_load(force=True)  # the first heartbeat (after the welcome) carries it
        return True

    def dial_failed(self, attempt: int, failure: DialFailure, reason: str, now: float) -> None:
        """`Dial(attempt)` could not open a transport: back off and dial again (spec 5)."""
        self._now = now
        if attempt != self._attempt or self.phase is not AgentPhase.DIALLING:
            return
        level = 30 if failure is DialFailure.TLS else 20  # WARNING for TLS: likely our setup
        self._log.log(level, "%s: dial %s:%d failed (%s): %s", self.instance_id, self.host,
                      self.port, failure.value, reason)
        self._back_off(now)

    def receive_data(self, data: bytes, now: float) -> None:
        self._now = now
        if self.conn is not None and self._transport_open:
            self.conn.receive_data(data, now)

    def receive_eof(self, now: float) -> None:
        """The transport ended (EOF, reset, or closed under us)."""
        self._now = now
        if self.conn is not None and self._transport_open and not self.conn.closed:
            self.conn.receive_eof(now)

    def data_to_send(self) -> list[bytes]:
        conn = self.conn
        if conn is None or not self._transport_open:
            return []
        chunks = conn.data_to_send()
        if chunks and chunks[-1] == b"":
            self._transport_open = False
            if self.phase is AgentPhase.STOPPING and self.last_closed is not None:
                self._stopped(None)  # our close completed (or the core gave up on it)
        return chunks

    def events_received(self) -> list[AgentAction | Event]:
        """Actions for the driver, and the core's events (for the application)."""
        conn = self.conn
        if conn is not None:
            for event in conn.events_received():
                self._on_event(event)
        actions, self._actions = self._actions, []
        return actions

    def next_deadline(self) -> float | None:
        deadline = self._deadline
        conn = self.conn
        if conn is not None and self._transport_open:
            theirs = conn.next_deadline()
            if theirs is not None and (deadline is None or theirs < deadline):
                return theirs
        return deadline

    def handle_timer(self, now: float) -> None:
        self._now = now
        conn = self.conn
        if conn is not None and self._transport_open:
            conn.handle_timer(now)
        if self._deadline is None or now < self._deadline:
            return
        self._deadline = None
        phase = self.phase
        if phase is AgentPhase.DIALLING:
            self._actions.append(AbortTransport("dial timed out"))
            self.dial_failed(self._attempt, DialFailure.TIMED_OUT,
                             f"no connection within {self.config.hello_timeout:g} s", now)
        elif phase is AgentPhase.BACKOFF:
            if self._fetching_token:
                self._dial_after_token = True
            else:
                self._dial(now)
        elif phase is AgentPhase.STOPPING:
            self._log.info("%s: the mesh did not close in time: dropping the connection",
                     self.instance_id)
            self._actions.append(AbortTransport("stop timed out"))
            self._transport_open = False
            self._stopped(None)

    def token_fetched(self, token: str | None, now: float) -> None:
        """The token provider answered (`None`: it failed; the old token is kept)."""
        self._now = now
        self._fetching_token = False
        if token is not None:
            self.token = token
            self.session.token_refreshed = True
        else:
            self._log.warning("%s: the token provider failed; retrying with the old token",
                        self.instance_id)
        if self._dial_after_token and self.phase is AgentPhase.BACKOFF:
            self._dial_after_token = False
            self._dial(now)

    def refresh_token(self, token: str) -> bool:
        """Use a fresh transport JWT: now through `token_refresh`, and for every reconnect.

        Returns False when it could not be sent now (no session, or the mesh does not
        know the extension); the new token is then used at the next reconnect (spec 3).
        """
        self.token = token
        conn = self.conn
        if conn is None or not self._transport_open:
            return False
        return conn.refresh_token(token)

    def stop(self, now: float, grace: float | None = None) -> None:
        """Stop: close_request when a session is up (in-flight work gets `grace`), at once
        while dialling or in backoff. `Stopped` follows, at the latest after the grace
        plus `Config.close_timeout`."""
        self._now = now
        phase = self.phase
        if phase in (AgentPhase.STOPPING, AgentPhase.STOPPED):
            return
        self._log.info("%s: stopping", self.instance_id)
        if phase is AgentPhase.DIALLING:
            self._actions.append(AbortTransport("agent stopping"))
        if phase is not AgentPhase.CONNECTED:
            self._stopped(None)
            return
        self.phase = AgentPhase.STOPPING
        conn = self.conn
        assert conn is not None
        wait = self.config.close_timeout
        if conn.state is AgentState.READY:
            grace_s = self.config.close_grace if grace is None else grace
            if self.session.running:
                wait += grace_s
            conn.close_request(int(grace_s), "agent stopping", now=now)
        elif not conn.closed:
            conn.close(1000, "agent stopping", now=now)
        self._deadline = now + wait

    # -- handlers' outcomes ------------------------------------------------------------------

    def handler_returned(self, dispatch_id: str, result: Any) -> None:
        if self._running.pop(dispatch_id, None) is None:
            return
        self._cancel_sent.discard(dispatch_id)
        if dispatch_id not in self.session.running:
            self._report_load()
            return  # already answered (e.g. its chunks could not be sent): first answer wins
        try:
            self._answer().send_result(dispatch_id, result)
        except LocalProtocolError as exc:  # not JSON: the core answered DISPATCH_FAILED
            self._log.warning("%s: the result of %s is not JSON: %s", self.instance_id, dispatch_id,
                        exc)
        self._report_load()

    def handler_raised(self, dispatch_id: str, exc: BaseException) -> None:
        context = self._running.pop(dispatch_id, None)
        if context is None:
            return
        self._cancel_sent.discard(dispatch_id)
        code, message, detail = handler_outcome(exc)
        if code == "DISPATCH_FAILED":
            self._log.warning("%s: handler of %r raised (dispatch %s)", self.instance_id,
                        context.capability, dispatch_id, exc_info=exc)
        if dispatch_id in self.session.running:
            self._answer().send_error(dispatch_id, code, message, detail)
        self._report_load()

    def handler_cancelled(self, dispatch_id: str) -> None:
        """The handler ended without an answer: cancelled by us (answered CANCELLED or
        DEADLINE_EXCEEDED), or killed by something else ("gave no answer")."""
        context = self._running.pop(dispatch_id, None)
        if context is None:
            return
        if dispatch_id in self._cancel_sent:
            self._cancel_sent.discard(dispatch_id)
            context.cancel()
            if dispatch_id in self.session.running:
                self._answer().send_cancelled(dispatch_id)
            self._report_load()
            return
        self._log.warning("%s: handler of %r ended without an answer (dispatch %s)",
                    self.instance_id, context.capability, dispatch_id)
        if dispatch_id in self.session.running:
            self._answer().send_error(dispatch_id, "DISPATCH_FAILED", "the handler gave no answer")
        self._report_load()

    def call_tool(self, tool: str, arguments: Mapping[str, Any] | None = None, *,
                  waiter: Any, deadline_ms: int | None = None, agent_type: str | None = None,
                  instance_id: str | None = None, session_id: str | None = None) -> str:
        """Ask the mesh to run `tool` on another agent (spec 3 `tool_call`); its
        `tool_result` goes to `waiter` (`set_result(result)`, or `set_exception` with a
        `DispatchError` carrying the mesh's code). Fails at once with `AGENT_DISCONNECTED`
        while no connection is ready; a connection lost before the answer fails it too."""
        conn = self.conn
        if conn is None or conn.state is not AgentState.READY:
            raise DispatchError("", "AGENT_DISCONNECTED", "not connected to the mesh")
        call_id = conn.send_tool_call(
            tool, dict(arguments) if arguments else {}, deadline_ms=deadline_ms,
            agent_type=agent_type, instance_id=instance_id, session_id=session_id)
        self._tool_waiters[call_id] = waiter
        if self.on_output is not None:
            self.on_output()
        return call_id

    def forget_tool_call(self, call_id: str) -> None:
        """The caller stopped waiting (cancelled): its answer is dropped when it comes."""
        self._tool_waiters.pop(call_id, None)

    def _tool_result(self, event: ToolResultReceived) -> None:
        waiter = self._tool_waiters.pop(event.call_id, None)
        if waiter is None:
            return
        error = event.error
        try:
            if error is None:
                waiter.set_result(event.result)
            else:
                waiter.set_exception(DispatchError(
                    event.call_id, str(error.get("code") or "TOOL_FAILED"), error.get("message")))
        except Exception:  # a waiter that was cancelled meanwhile
            self._log.debug("%s: tool result %s had nobody waiting", self.instance_id,
                            event.call_id)

    def _fail_tool_calls(self, reason: str) -> None:
        waiters, self._tool_waiters = self._tool_waiters, {}
        for call_id, waiter in waiters.items():
            try:
                waiter.set_exception(DispatchError(call_id, "AGENT_DISCONNECTED", reason))
            except Exception:
                self._log.debug("%s: tool call %s had nobody waiting", self.instance_id, call_id)

    def _answer(self) -> AgentConnection:
        conn = self.conn
        assert conn is not None  # a handler only starts from a connection
        return conn

    def _chunk(self, dispatch_id: str, data: Any) -> None:
        if dispatch_id not in self._running:
            raise LocalProtocolError(f"dispatch {dispatch_id} has already ended")
        self._answer().send_chunk(dispatch_id, data)
        if self.on_output is not None:
            self.on_output()

    # -- inside ------------------------------------------------------------------------------

    def _report_load(self, *, force: bool = False) -> None:
        """Tell the connection what heartbeats carry: a status change goes out at once.
        Without a limit nothing changes per dispatch, so nothing is done; an agent that never
        set one leaves the heartbeat's status and cap as they were (the registered cap)."""
        conn = self.conn
        if conn is None or not self._reporting or not (force or self.max_concurrent_sessions):
            return
        status = self.load_status
        if not force and status == self._reported:
            return
        self._reported = status
        conn.set_status(status, self._now,
                        max_concurrent_sessions=self.max_concurrent_sessions)

    def _dial(self, now: float) -> None:
        self._attempt += 1
        self.phase = AgentPhase.DIALLING
        self._deadline = now + self.config.hello_timeout
        self._log.info("%s: dialling %s (attempt %d)", self.instance_id, self.url, self._attempt)
        self._actions.append(Dial(self.host, self.port, self.tls, self._attempt))

    def _back_off(self, now: float) -> None:
        delay = self.session.next_delay()
        self.phase = AgentPhase.BACKOFF
        self._deadline = now + delay
        self._log.info("%s: retrying in %.2f s", self.instance_id, delay)

    def _stopped(self, error: BaseException | None) -> None:
        self.phase = AgentPhase.STOPPED
        self._deadline = None
        for dispatch_id in list(self._running):
            if dispatch_id not in self._cancel_sent:
                self._cancel_sent.add(dispatch_id)
                self._actions.append(CancelHandler(dispatch_id, "agent stopped"))
        if error is None:
            self._log.info("%s: stopped", self.instance_id)
        self._actions.append(Stopped(error))

    def _on_event(self, event: Event) -> None:
        self._log.debug("%s: %r", self.instance_id, event)  # one line per frame received
        kind = type(event)
        if kind is DispatchReceived:
            self._start_handler(event)  # type: ignore[arg-type]
            return
        if kind is DispatchCancelled:
            self._cancel(event)  # type: ignore[arg-type]
        elif kind is SessionStarted:
            self._session_started(event)  # type: ignore[arg-type]
        elif kind is ConnectionClosed:
            if self._tool_waiters:
                self._fail_tool_calls("the connection to the mesh was lost")
            self._connection_closed(event)  # type: ignore[arg-type]
        elif kind is ToolResultReceived:
            self._tool_result(event)  # type: ignore[arg-type]
        elif kind is CloseRequested:
            self._log.info("%s: the mesh asked to close: %s", self.instance_id,
                     event.reason or "no reason given")  # type: ignore[attr-defined]
        self._actions.append(event)

    def _start_handler(self, event: DispatchReceived) -> None:
        capability, refusal = self.capabilities.resolve(event)
        dispatch_id = event.dispatch_id
        conn = self._answer()
        if capability is None:
            code, message = refusal or ("INTERNAL", "")
            self._log.debug("%s: dispatch %s refused: %s", self.instance_id, dispatch_id, code)
            conn.send_error(dispatch_id, code, message)
            return
        if self.phase in (AgentPhase.STOPPING, AgentPhase.STOPPED):  # spec 3 close_request
            conn.send_error(dispatch_id, "AGENT_UNAVAILABLE", "the agent is stopping")
            return
        limit = self.max_concurrent_sessions
        if 0 < limit <= len(self._running):
            self._log.debug("%s: dispatch %s refused: busy", self.instance_id, dispatch_id)
            conn.send_error(dispatch_id, "AGENT_UNAVAILABLE",
                            f"busy: the agent runs {limit} sessions at most")
            return
        context = DispatchContext(
            dispatch_id=dispatch_id, capability=event.capability, attempt=event.attempt,
            deadline_ms=event.deadline_ms, task_id=event.task_id,
            session_context=event.session_context,
            send_chunk=lambda data: self._chunk(dispatch_id, data),
            tool_caller=self.tool_caller,
        )
        self._running[dispatch_id] = context
        self.handler_runs += 1
        self._actions.append(StartHandler(dispatch_id, capability.handler, event.arguments,
                                          context, capability.blocking))
        if limit:
            self._report_load()

    def _cancel(self, event: DispatchCancelled) -> None:
        context = self._running.get(event.dispatch_id)
        if context is None or event.dispatch_id in self._cancel_sent:
            return
        context.cancel()
        self._cancel_sent.add(event.dispatch_id)
        self._actions.append(CancelHandler(event.dispatch_id, event.reason))

    def _session_started(self, event: SessionStarted) -> None:
        self.last_started = event
        if event.resumed:
            self._log.info("%s: connected (connection %s), resumed; replayed dispatches: %s",
                     self.instance_id, event.connection_id,
                     ", ".join(event.replayed_dispatches) or "none")
        else:
            self._log.info("%s: connected (connection %s)", self.instance_id, event.connection_id)

    def _connection_closed(self, event: ConnectionClosed) -> None:
        self.last_closed = event
        now = self._now
        error = event.error
        if isinstance(error, HandshakeRejected):
            self._log.info("%s: refused by the mesh: %d %s (%s)", self.instance_id, error.status,
                     error.code, error.message)
        else:
            self._log.info("%s: connection closed with code %s%s", self.instance_id,
                     event.code if event.code is not None else "none (transport lost)",
                     f" ({event.reason})" if event.reason else "")
        if self.phase is AgentPhase.STOPPING:
            if not self._transport_open:
                self._stopped(None)
            return  # else once the transport closes (`data_to_send`), or at the stop deadline
        if self.phase is not AgentPhase.CONNECTED:
            return
        retry = event.retry
        if retry is RetryDecision.FINAL:
            final = error or DispatchError("", "CONNECTION_CLOSED", event.reason)
            self._log.warning("%s: giving up: %s", self.instance_id, final)
            self._stopped(final)
            return
        if retry is RetryDecision.REFRESH_TOKEN_THEN_RETRY and self._token_refresher:
            self._fetching_token = True
            self._actions.append(FetchToken())
        self._back_off(now)

