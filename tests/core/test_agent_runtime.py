"""`AgentRuntime` (spec 1, 3, 5) driven against a real `MeshConnection`, in memory, on a
fake clock: reconnect and backoff deadlines, handshake answers, the stop policy in every
phase, handler bookkeeping, resume across a cut, and the INFO log lines.

`rand=lambda: 0.5` pins the backoff jitter to a factor of 1.0: delays are 1, 2, 4 s.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from itertools import count
from typing import Any, TypeVar

import pytest

from svantic_proto.agent import AgentSession
from svantic_proto.agent_runtime import (
    AbortTransport,
    AgentPhase,
    AgentRuntime,
    CancelHandler,
    Dial,
    DialFailure,
    FetchToken,
    StartHandler,
    Stopped,
)
from svantic_proto.auth import DispatchAuthMinter, DispatchAuthVerifier
from svantic_proto.capabilities import CapabilityRegistry, DispatchContext, handler_outcome
from svantic_proto.config import Config
from svantic_proto.errors import (
    DeploymentModeMismatch,
    HandlerError,
    HandshakeRejected,
    InstanceNotFound,
    LocalProtocolError,
    MissingInstanceId,
    TenantMismatch,
    UpgradeRequired,
)
from svantic_proto.events import (
    ChunkReceived,
    CloseRequested,
    ConnectionClosed,
    DispatchCompleted,
    DispatchFailed,
    Event,
    SessionStarted,
    UpgradeRequest,
)
from svantic_proto.frames import Cancel, CancelPayload
from svantic_proto.mesh import MeshConnection, jwt_dispatch_auth
from svantic_proto.resume import ResumeStore
from svantic_proto.testing import TEST_SIGNING_SECRET, FakeClock

T = TypeVar("T")
T0 = 1000.0  # FakeClock's start
CONFIG = Config(
    hello_timeout=10.0, close_timeout=5.0, close_grace=30.0, heartbeat_interval=1000.0,
    dead_peer_timeout=10_000.0, ws_ping_interval=1000.0, app_ping_interval=1000.0,
    app_ping_offset=1000.0,
)
URL = "wss://mesh.test/agents/connect"


class Harness:
    """One `AgentRuntime` and, per dial the test opens, a fresh `MeshConnection` sharing
    one `ResumeStore`; `pump()` moves bytes both ways and collects the runtime's output."""

    def __init__(self, config: Config = CONFIG, *, token_refresher: bool = False) -> None:
        self.clock = FakeClock(T0)
        self.config = config
        tokens = count()
        self.store = ResumeStore(window=config.resume_window,
                                 token_factory=lambda: f"resume-{next(tokens)}")
        self.mint = jwt_dispatch_auth(DispatchAuthMinter(TEST_SIGNING_SECRET))
        self.caps = CapabilityRegistry()
        self.caps.add("echo", lambda args, context: dict(args))
        self.rt = AgentRuntime(
            URL, token="transport-token", instance_id="agent-1", agent_type="test-agent",
            dispatch_auth=DispatchAuthVerifier("agent-1", hs256_keys=[TEST_SIGNING_SECRET]),
            config=config, session=AgentSession(config, rand=lambda: 0.5),
            capabilities=self.caps, token_refresher=token_refresher, wall_clock=self.clock.wall,
        )
        self.mesh: MeshConnection | None = None
        self.answers: list[tuple[int, str] | None] = []
        """How the mesh answers the next upgrades, in order: (status, code) rejects, None
        holds the request unanswered; accepted once the list is empty."""
        self.bearer_tokens: list[str | None] = []
        self.mesh_silent = False  # what the mesh writes is lost
        self.out: list[object] = []  # every action and event the runtime handed over
        self.mesh_events: list[Event] = []
        self._new: list[object] = []

    @property
    def now(self) -> float:
        return self.clock.now

    def take(self) -> list[object]:
        """What the runtime handed over since the last `take()`."""
        self.pump()
        new, self._new = self._new, []
        return new

    def of(self, kind: type[T]) -> list[T]:
        return [a for a in self.out if isinstance(a, kind)]

    def mesh_of(self, kind: type[T]) -> list[T]:
        return [e for e in self.mesh_events if isinstance(e, kind)]

    def pump(self) -> None:
        now = self.now
        for _ in range(100):
            moved = False
            for chunk in self.rt.data_to_send():
                moved = True
                if self.mesh is not None:
                    if chunk:
                        self.mesh.receive_data(chunk, now)
                    else:
                        self.mesh.receive_eof(now)
            mesh = self.mesh
            if mesh is not None:
                for chunk in mesh.data_to_send():
                    moved = True
                    if self.mesh_silent:
                        continue
                    if chunk:
                        self.rt.receive_data(chunk, now)
                    else:
                        self.rt.receive_eof(now)
                for event in mesh.events_received():
                    moved = True
                    self.mesh_events.append(event)
                    if isinstance(event, UpgradeRequest):
                        self._answer(mesh, event)
            for action in self.rt.events_received():
                moved = True
                self.out.append(action)
                self._new.append(action)
            if not moved:
                return
        raise AssertionError("pump did not settle")

    def _answer(self, mesh: MeshConnection, event: UpgradeRequest) -> None:
        self.bearer_tokens.append(event.request.bearer_token)
        answer = self.answers.pop(0) if self.answers else (101, "")
        if answer is None:
            return
        status, code = answer
        if status == 101:
            mesh.accept(instance_id=event.request.instance_id, tenant_id="tenant-1",
                        agent_type="test-agent", now=self.now)
        else:
            mesh.reject(status=status, code=code, message="refused by test", now=self.now)

    # -- the driver's side ---------------------------------------------------------------------

    def start(self) -> None:
        self.rt.start(self.now)
        self.pump()

    def last_dial(self) -> Dial:
        return self.of(Dial)[-1]

    def open(self, attempt: int | None = None) -> bool:
        """The transport of the last (or the given) `Dial` opened."""
        attempt = self.last_dial().attempt if attempt is None else attempt
        if not self.rt.transport_open(attempt, self.now):
            return False
        self.mesh = MeshConnection(dispatch_auth=self.mint, resume_store=self.store,
                                   config=self.config, now=self.now, wall_clock=self.clock.wall)
        self.pump()
        return True

    def fail(self, attempt: int | None = None) -> None:
        attempt = self.last_dial().attempt if attempt is None else attempt
        self.rt.dial_failed(attempt, DialFailure.REFUSED, "connection refused", self.now)
        self.pump()

    def connect(self) -> None:
        self.start()
        self.open()
        assert self.rt.phase is AgentPhase.CONNECTED and self.of(SessionStarted)

    def advance_to(self, when: float) -> None:
        """Move the clock to `when`, firing every timer at its exact deadline, in order."""
        assert when >= self.now
        for _ in range(1000):
            mesh = self.mesh
            due = [d for d in (self.rt.next_deadline(),
                               mesh.next_deadline() if mesh is not None else None,
                               self.store.next_deadline()) if d is not None and d <= when]
            if not due:
                break
            self.clock.now = max(self.now, min(due))
            self.rt.handle_timer(self.now)
            if mesh is not None:
                mesh.handle_timer(self.now)
            self.store.expire(self.now)
            self.pump()
        else:
            raise AssertionError("timers did not settle")
        self.clock.now = when
        self.pump()

    def cut(self) -> None:
        """The TCP connection breaks under both ends."""
        self.rt.receive_eof(self.now)
        if self.mesh is not None:
            self.mesh.data_to_send()
            self.mesh.receive_eof(self.now)
        self.pump()

    def dispatch(self, capability: str = "echo", arguments: dict[str, Any] | None = None,
                 deadline_ms: int = 60_000) -> str:
        assert self.mesh is not None
        dispatch_id = self.mesh.send_dispatch(capability, arguments or {"x": 1},
                                              deadline_ms=deadline_ms, now=self.now)
        self.pump()
        return dispatch_id

    def started(self) -> StartHandler:
        return self.of(StartHandler)[-1]

    def run(self, start: StartHandler) -> None:
        """Run the handler of `start` to its end and report the outcome."""
        try:
            result = start.handler(start.arguments, start.context)
        except Exception as exc:
            self.rt.handler_raised(start.dispatch_id, exc)
        else:
            self.rt.handler_returned(start.dispatch_id, result)
        self.pump()


def connected(config: Config = CONFIG, **kwargs: Any) -> Harness:
    h = Harness(config, **kwargs)
    h.connect()
    h.take()
    return h


# -- reconnecting and backoff ------------------------------------------------------------------


def test_backoff_deadlines_are_exact_and_dials_count_up() -> None:
    h = Harness()
    h.start()
    assert h.take() == [Dial("mesh.test", 443, True, 1)]
    assert h.rt.next_deadline() == T0 + 10.0  # the dial timeout
    deadline = T0
    for attempt, delay in ((1, 1.0), (2, 2.0), (3, 4.0)):
        h.fail()
        assert h.rt.phase is AgentPhase.BACKOFF
        deadline += delay
        assert h.rt.next_deadline() == deadline
        h.advance_to(deadline - 0.001)
        assert h.take() == []
        h.advance_to(deadline)
        assert h.take() == [Dial("mesh.test", 443, True, attempt + 1)]


def test_backoff_resets_after_a_welcome() -> None:
    h = Harness()
    h.start()
    h.fail()
    h.advance_to(T0 + 1)
    h.fail()
    h.advance_to(T0 + 3)
    h.open()
    assert h.of(SessionStarted)
    h.cut()
    assert h.rt.phase is AgentPhase.BACKOFF
    assert h.rt.next_deadline() == T0 + 3 + 1.0  # the first delay again
    h.advance_to(T0 + 4)
    assert h.last_dial().attempt == 4


def test_a_stale_attempt_is_ignored() -> None:
    h = Harness()
    h.start()
    h.fail()
    h.advance_to(T0 + 1)
    assert h.last_dial().attempt == 2
    h.take()
    h.rt.dial_failed(1, DialFailure.REFUSED, "late", h.now)
    assert h.rt.phase is AgentPhase.DIALLING and h.rt.next_deadline() == T0 + 11
    assert h.open(attempt=1) is False
    assert h.take() == []
    assert h.open(attempt=2) is True
    assert h.of(SessionStarted)


def test_dial_timeout_aborts_and_backs_off() -> None:
    h = Harness()
    h.start()
    h.take()
    h.advance_to(T0 + 10)
    assert h.take() == [AbortTransport("dial timed out")]
    assert h.rt.phase is AgentPhase.BACKOFF and h.rt.next_deadline() == T0 + 11
    assert h.open(attempt=1) is False
    h.advance_to(T0 + 11)
    assert h.take() == [Dial("mesh.test", 443, True, 2)]


# -- handshake answers -------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "code", "kind"), [
    (400, "MISSING_INSTANCE_ID", MissingInstanceId),
    (403, "TENANT_MISMATCH", TenantMismatch),
    (404, "INSTANCE_NOT_FOUND", InstanceNotFound),
    (409, "DEPLOYMENT_MODE_MISMATCH", DeploymentModeMismatch),
    (426, "UPGRADE_REQUIRED", UpgradeRequired),
])
def test_final_handshake_answers_stop_with_the_typed_error(
        status: int, code: str, kind: type[HandshakeRejected]) -> None:
    h = Harness()
    h.answers = [(status, code)]
    h.start()
    h.open()
    stops = h.of(Stopped)
    assert len(stops) == 1
    error = stops[0].error
    assert type(error) is kind
    assert isinstance(error, HandshakeRejected) and error.status == status
    assert error.code == code
    assert h.rt.phase is AgentPhase.STOPPED and h.rt.next_deadline() is None
    h.advance_to(T0 + 100)
    assert len(h.of(Dial)) == 1


def test_401_fetches_a_token_and_the_dial_waits_for_it() -> None:
    h = Harness(token_refresher=True)
    h.answers = [(401, "UNAUTHORIZED")]
    h.start()
    h.open()
    assert FetchToken() in h.take()
    assert h.rt.next_deadline() == T0 + 1
    h.advance_to(T0 + 5)
    assert h.take() == [] and h.rt.next_deadline() is None  # waits for the provider
    h.rt.token_fetched("fresh-token", h.now)
    assert h.take() == [Dial("mesh.test", 443, True, 2)]
    h.open()
    assert h.bearer_tokens == ["transport-token", "fresh-token"]
    assert h.of(SessionStarted)


def test_401_twice_backs_off_and_keeps_trying() -> None:
    h = Harness(token_refresher=True)
    h.answers = [(401, "UNAUTHORIZED")] * 3
    h.start()
    h.open()
    h.rt.token_fetched("fresh-token", h.now)  # before the backoff ends: dial at its end
    h.advance_to(T0 + 1)
    h.open()
    assert h.rt.phase is AgentPhase.BACKOFF and h.rt.next_deadline() == T0 + 3
    h.advance_to(T0 + 3)
    h.open()
    assert h.rt.next_deadline() == T0 + 7
    assert len(h.of(FetchToken)) == 1 and not h.of(Stopped)
    h.advance_to(T0 + 7)
    h.open()
    assert h.of(SessionStarted)
    assert h.bearer_tokens == ["transport-token"] + ["fresh-token"] * 3


def test_503_is_retried() -> None:
    h = Harness()
    h.answers = [(503, "UNAVAILABLE")]
    h.start()
    h.open()
    assert not h.of(Stopped) and not h.of(FetchToken)
    assert h.rt.phase is AgentPhase.BACKOFF and h.rt.next_deadline() == T0 + 1
    h.advance_to(T0 + 1)
    h.open()
    assert h.of(SessionStarted)


# -- stopping ----------------------------------------------------------------------------------


def test_stop_when_idle() -> None:
    h = Harness()
    h.rt.stop(h.now)
    assert h.take() == [Stopped(None)]
    with pytest.raises(LocalProtocolError):
        h.rt.start(h.now)


def test_stop_while_dialling_aborts_at_once() -> None:
    h = Harness()
    h.start()
    h.take()
    h.rt.stop(h.now)
    assert h.take() == [AbortTransport("agent stopping"), Stopped(None)]
    assert h.rt.next_deadline() is None
    assert h.open(attempt=1) is False


def test_stop_in_backoff_is_immediate() -> None:
    h = Harness()
    h.start()
    h.fail()
    h.take()
    h.rt.stop(h.now)
    assert h.take() == [Stopped(None)]
    assert h.rt.next_deadline() is None
    h.advance_to(T0 + 100)
    assert len(h.of(Dial)) == 1


def test_stop_when_ready_sends_close_request_then_close() -> None:
    h = connected()
    h.clock.advance(2.0)
    h.rt.stop(h.now)
    out = h.take()
    assert out[-1] == Stopped(None)
    closed = [e for e in out if isinstance(e, ConnectionClosed)]
    assert [c.code for c in closed] == [1000]
    requested = h.mesh_of(CloseRequested)
    assert [(r.grace_seconds, r.reason) for r in requested] == [(30, "agent stopping")]
    mesh_closed = h.mesh_of(ConnectionClosed)
    assert [(c.code, c.by_peer) for c in mesh_closed] == [(1000, True)]
    assert h.mesh_events.index(requested[0]) < h.mesh_events.index(mesh_closed[0])
    assert h.rt.phase is AgentPhase.STOPPED and h.rt.next_deadline() is None


def test_stop_when_ready_waits_for_the_close_at_most_close_timeout() -> None:
    h = connected()
    h.mesh_silent = True  # the mesh never answers our close
    h.rt.stop(h.now)
    assert h.take()  # the ConnectionClosed of our own close
    assert not h.of(Stopped) and h.rt.phase is AgentPhase.STOPPING
    assert h.rt.next_deadline() == T0 + 5.0
    h.advance_to(T0 + 4.999)
    assert not h.of(Stopped)
    h.advance_to(T0 + 5.0)
    assert h.take() == [AbortTransport("stop timed out"), Stopped(None)]


def test_stop_with_a_running_handler_waits_for_its_answer() -> None:
    h = connected()
    dispatch_id = h.dispatch()
    start = h.started()
    h.rt.stop(h.now, grace=10)
    h.pump()
    assert [r.grace_seconds for r in h.mesh_of(CloseRequested)] == [10]
    assert not h.of(Stopped)
    assert h.rt.next_deadline() == T0 + 10  # the core's grace
    h.advance_to(T0 + 3)
    assert not h.of(Stopped)
    h.run(start)
    assert [c.dispatch_id for c in h.mesh_of(DispatchCompleted)] == [dispatch_id]
    assert h.of(Stopped) == [Stopped(None)] and not h.of(CancelHandler)
    assert h.rt.next_deadline() is None


def test_stop_with_a_running_handler_gives_up_at_grace_plus_close_timeout() -> None:
    h = connected()
    dispatch_id = h.dispatch()
    h.mesh_silent = True
    h.rt.stop(h.now, grace=10)
    h.advance_to(T0 + 14.999)
    assert not h.of(Stopped)
    h.advance_to(T0 + 15)
    assert h.take()[-3:] == [AbortTransport("stop timed out"),
                             CancelHandler(dispatch_id, "agent stopped"), Stopped(None)]
    h.rt.handler_cancelled(dispatch_id)
    assert h.rt.running_handlers == 0


def test_stop_after_the_grace_closes_and_cancels_the_handler() -> None:
    h = connected()
    dispatch_id = h.dispatch()
    h.rt.stop(h.now, grace=10)
    h.advance_to(T0 + 10)
    assert [c.code for c in h.mesh_of(ConnectionClosed)] == [1000]
    assert h.take()[-2:] == [CancelHandler(dispatch_id, "agent stopped"), Stopped(None)]


def test_stop_during_the_upgrade_closes_1000() -> None:
    h = Harness()
    h.answers = [None]  # the mesh does not answer the upgrade
    h.start()
    h.open()
    h.take()
    h.rt.stop(h.now)
    out = h.take()
    assert [c.code for c in out if isinstance(c, ConnectionClosed)] == [1000]
    assert Stopped(None) in out and h.bearer_tokens == ["transport-token"]
    assert h.rt.phase is AgentPhase.STOPPED and h.rt.next_deadline() is None
    assert not h.of(SessionStarted)



def test_a_dispatch_crossing_our_close_request_is_refused() -> None:
    h = connected()
    first = h.dispatch()
    assert h.mesh is not None
    crossing = h.mesh.send_dispatch("echo", {"x": 2}, deadline_ms=60_000, now=h.now)
    h.rt.stop(h.now, grace=10)  # the close_request reaches the mesh before the dispatch lands
    h.pump()
    assert len(h.of(StartHandler)) == 1
    failed = h.mesh_of(DispatchFailed)
    assert [(f.dispatch_id, f.code) for f in failed] == [(crossing, "AGENT_UNAVAILABLE")]
    h.run(h.started())
    assert [c.dispatch_id for c in h.mesh_of(DispatchCompleted)] == [first]
    assert h.of(Stopped) == [Stopped(None)]

# -- handlers ----------------------------------------------------------------------------------


def test_a_known_capability_starts_its_handler() -> None:
    h = connected()
    dispatch_id = h.dispatch("echo", {"x": 1}, deadline_ms=5000)
    start = h.started()
    assert start.dispatch_id == dispatch_id and start.arguments == {"x": 1}
    assert start.handler is h.caps.capabilities["echo"].handler
    assert (start.context.capability, start.context.deadline_ms, start.context.attempt) == (
        "echo", 5000, 1)
    assert h.rt.running_handlers == 1 and h.rt.handler_runs == 1
    h.run(start)
    assert [(c.dispatch_id, c.result) for c in h.mesh_of(DispatchCompleted)] == [
        (dispatch_id, {"x": 1})]
    assert h.rt.running_handlers == 0


def test_unknown_capability_and_bad_arguments_are_answered_without_a_handler() -> None:
    h = connected()
    h.caps.add("typed", lambda args, context: None,
               parameters={"type": "object", "properties": {"x": {"type": "integer"}}})
    missing = h.dispatch("nope")
    bad = h.dispatch("typed", {"x": "one"})
    assert not h.of(StartHandler) and h.rt.handler_runs == 0
    failed = {f.dispatch_id: f for f in h.mesh_of(DispatchFailed)}
    assert failed[missing].code == "CAPABILITY_NOT_FOUND"
    assert failed[bad].code == "INVALID_ARGUMENTS"
    assert (failed[bad].message or "").startswith("x: ")


def test_a_handler_that_raises_answers_dispatch_failed_and_logs_the_traceback(
        caplog: pytest.LogCaptureFixture) -> None:
    h = connected()
    dispatch_id = h.dispatch()
    boom = ValueError("db password is hunter2")
    with caplog.at_level(logging.WARNING, logger="svantic.agent"):
        h.rt.handler_raised(dispatch_id, boom)
        h.pump()
    [failed] = h.mesh_of(DispatchFailed)
    assert (failed.code, failed.message) == handler_outcome(boom)[:2]
    assert failed.code == "DISPATCH_FAILED" and "Traceback" not in (failed.message or "")
    [record] = [r for r in caplog.records if r.name == "svantic.agent"]
    assert record.levelno == logging.WARNING and record.exc_info is not None
    assert record.exc_info[1] is boom


def test_a_handler_error_chooses_its_code() -> None:
    h = connected()
    dispatch_id = h.dispatch()
    h.rt.handler_raised(dispatch_id, HandlerError("QUOTA", "over quota", {"limit": 3}))
    h.pump()
    [failed] = h.mesh_of(DispatchFailed)
    assert (failed.code, failed.message, failed.detail) == ("QUOTA", "over quota", {"limit": 3})


def test_a_mesh_cancel_cancels_the_handler() -> None:
    h = connected()
    dispatch_id = h.dispatch()
    mesh = h.mesh
    assert mesh is not None
    # MeshConnection sends `cancel` itself only at a deadline; any reason is valid (spec 3).
    mesh._send(mesh.frames.new(Cancel, CancelPayload(dispatch_id=dispatch_id,
                                                     reason="caller went away")))
    assert CancelHandler(dispatch_id, "caller went away") in h.take()
    assert h.started().context.cancelled
    h.rt.handler_cancelled(dispatch_id)
    h.pump()
    [failed] = h.mesh_of(DispatchFailed)
    assert failed.code == "CANCELLED" and "caller went away" in (failed.message or "")


def test_a_handler_killed_without_our_cancel_gave_no_answer() -> None:
    h = connected()
    dispatch_id = h.dispatch()
    h.rt.handler_cancelled(dispatch_id)
    h.pump()
    [failed] = h.mesh_of(DispatchFailed)
    assert (failed.code, failed.message) == ("DISPATCH_FAILED", "the handler gave no answer")
    assert not h.of(CancelHandler)


def test_the_agent_side_deadline_cancels_the_handler() -> None:
    h = connected()
    dispatch_id = h.dispatch(deadline_ms=2000)
    h.take()
    h.mesh_silent = True  # the mesh's own cancel at T0 + 2 is lost
    h.advance_to(T0 + 2.999)
    assert not h.of(CancelHandler)
    h.advance_to(T0 + 3)  # the deadline plus `agent_deadline_margin`
    assert CancelHandler(dispatch_id, "DEADLINE_EXCEEDED") in h.take()
    assert h.started().context.cancelled
    h.rt.handler_cancelled(dispatch_id)
    terminal = h.rt.session.finished[dispatch_id]
    assert terminal.payload.code == "DEADLINE_EXCEEDED"  # type: ignore[union-attr]


def stream(arguments: Mapping[str, Any], context: DispatchContext) -> str:
    for n in range(3):
        context.chunk(n)
    return "done"


def test_chunks_reach_the_mesh_in_order() -> None:
    h = connected()
    outputs: list[int] = []
    h.rt.on_output = lambda: outputs.append(len(outputs))
    h.caps.add("stream", stream)
    dispatch_id = h.dispatch("stream")
    start = h.started()
    h.run(start)
    assert [(c.seq, c.data) for c in h.mesh_of(ChunkReceived)] == [(0, 0), (1, 1), (2, 2)]
    assert [c.result for c in h.mesh_of(DispatchCompleted)] == ["done"]
    assert len(outputs) == 3
    with pytest.raises(LocalProtocolError):
        start.context.chunk("late")
    assert dispatch_id == start.dispatch_id


# -- resume ------------------------------------------------------------------------------------


def test_a_cut_mid_dispatch_resumes_and_the_handler_runs_once() -> None:
    h = connected()
    dispatch_id = h.dispatch()
    start = h.started()
    h.cut()
    assert h.rt.phase is AgentPhase.BACKOFF and h.rt.next_deadline() == T0 + 1
    h.advance_to(T0 + 1)
    h.open()
    started = h.of(SessionStarted)[-1]
    assert started.resumed and started.replayed_dispatches == (dispatch_id,)
    assert len(h.of(StartHandler)) == 1  # the replay found it still running
    h.run(start)
    assert [c.dispatch_id for c in h.mesh_of(DispatchCompleted)] == [dispatch_id]
    assert h.rt.handler_runs == 1


def test_answers_made_while_disconnected_are_flushed_after_welcome() -> None:
    h = connected()
    dispatch_id = h.dispatch()
    start = h.started()
    h.cut()
    start.context.chunk("partial")
    h.run(start)
    assert len(h.rt.session.outbox) == 2 and not h.mesh_of(DispatchCompleted)
    h.advance_to(T0 + 1)
    h.open()
    assert [(c.seq, c.data) for c in h.mesh_of(ChunkReceived)] == [(0, "partial")]
    assert [c.dispatch_id for c in h.mesh_of(DispatchCompleted)] == [dispatch_id]
    assert not h.rt.session.outbox and h.rt.handler_runs == 1
    assert not h.mesh_of(DispatchFailed)


# -- logs --------------------------------------------------------------------------------------


def test_info_lines_for_each_state_change(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="svantic.agent")
    h = Harness()
    h.answers = [(503, "UNAVAILABLE")]
    h.start()
    h.open()
    h.advance_to(T0 + 1)
    h.open()
    h.rt.stop(h.now)
    h.pump()
    lines = [r.getMessage() for r in caplog.records
             if r.name == "svantic.agent" and r.levelno == logging.INFO]
    expected = [
        f"agent-1: dialling {URL} (attempt 1)",
        "agent-1: refused by the mesh: 503 UNAVAILABLE (refused by test)",
        "agent-1: retrying in 1.00 s",
        f"agent-1: dialling {URL} (attempt 2)",
        "agent-1: connected (connection ",
        "agent-1: stopping",
        "agent-1: connection closed with code 1000 (drained)",
        "agent-1: stopped",
    ]
    assert len(lines) == len(expected)
    for line, start in zip(lines, expected, strict=True):
        assert line.startswith(start), (line, start)


def test_debug_lines_name_each_frame_received(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="svantic.agent")
    harness = connected()
    harness.dispatch("echo", {"x": 1})
    lines = [r.getMessage() for r in caplog.records
             if r.name == "svantic.agent" and r.levelno == logging.DEBUG]
    assert any("SessionStarted" in line for line in lines)
    assert any("DispatchReceived" in line and "'echo'" in line for line in lines)
