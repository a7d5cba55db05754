"""A rule-based state machine drives an agent and a mesh through random sessions.

Dispatches with random deadlines, handlers that answer (result, error, chunks then
result), broken TCP connections, reconnects with resume, clock jumps, close
requests from either side, and handlers that try to answer twice. After every
step the guarantees users build on must hold (spec sections 3 and 5):

* the mesh reports at most one terminal outcome per dispatch (first terminal wins);
* every dispatch ends (result, error, timeout or AGENT_DISCONNECTED) by its deadline:
  a held dispatch is never kept past it, so the resume window adds nothing;
* no handler runs twice: the agent reports `DispatchReceived` once per dispatch id;
* chunks reach the mesh in `seq` order, without duplicates, before the terminal outcome.
"""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import event as label
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from svantic_proto.agent import AgentConnection
from svantic_proto.config import Config
from svantic_proto.errors import LocalProtocolError
from svantic_proto.events import (
    ChunkReceived,
    DispatchCompleted,
    DispatchFailed,
    DispatchReceived,
    DispatchTimedOut,
    Event,
    SessionStarted,
)
from svantic_proto.states import AgentState, MeshState
from svantic_proto.testing import Pair

CONFIG = Config(
    heartbeat_interval=5.0,
    app_ping_interval=5.0,
    app_ping_offset=2.5,
    ws_ping_interval=5.0,
    dead_peer_timeout=15.0,
    close_grace=4.0,
    close_timeout=1.0,
    resume_window=6.0,
)
TERMINAL = (DispatchCompleted, DispatchFailed, DispatchTimedOut)

pick = st.integers(min_value=0, max_value=1 << 16)
"""Which of the eligible dispatches a rule acts on (modulo how many there are)."""


def _terminal_id(event: Event) -> str | None:
    return event.dispatch_id if isinstance(event, TERMINAL) else None


class AgentAndMesh(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pair = Pair(CONFIG)
        self.pair.connect()
        self.deadlines: dict[str, float] = {}  # dispatch id -> when the mesh gives up

    # -- helpers -----------------------------------------------------------------------------

    @property
    def agent(self) -> AgentConnection:
        return self.pair.agent

    def _running(self) -> list[str]:
        return sorted(self.pair.session.running)

    def _finished(self) -> list[str]:
        return sorted(self.pair.session.finished)

    @property
    def disconnected(self) -> bool:
        return self.pair.agent.closed and self.pair.mesh.closed

    # -- the mesh ----------------------------------------------------------------------------

    @precondition(lambda self: self.pair.mesh.accepting_dispatches)
    @rule(deadline_ms=st.integers(1, 50) | st.integers(1_000, 30_000))
    def send_dispatch(self, deadline_ms: int) -> None:
        now = self.pair.clock.now
        dispatch_id = self.pair.mesh.send_dispatch(
            "work", {"n": len(self.deadlines)}, deadline_ms=deadline_ms, now=now
        )
        self.deadlines[dispatch_id] = now + deadline_ms / 1000
        self.pair.pump()

    @precondition(lambda self: self.pair.mesh.state is MeshState.READY)
    @rule(grace_seconds=st.integers(min_value=0, max_value=10))
    def mesh_close_request(self, grace_seconds: int) -> None:
        self.pair.mesh.close_request(grace_seconds, "deploy", now=self.pair.clock.now)
        self.pair.pump()

    # -- the agent ---------------------------------------------------------------------------

    @precondition(lambda self: bool(self.pair.session.running))
    @rule(which=pick, outcome=st.sampled_from(["result", "error", "chunks then result"]))
    def handler_completes(self, which: int, outcome: str) -> None:
        running = self._running()
        dispatch_id = running[which % len(running)]
        agent = self.agent  # the current connection, open or not: the session queues
        if outcome == "error":
            agent.send_error(dispatch_id, "DISPATCH_FAILED", "handler raised")
        else:
            if outcome == "chunks then result":
                assert agent.send_chunk(dispatch_id, "a") == 0
                assert agent.send_chunk(dispatch_id, "b") == 1
            agent.send_result(dispatch_id, {"ok": True})
        self.pair.pump()

    @precondition(lambda self: bool(self.pair.session.finished))
    @rule(which=pick, attempt=st.sampled_from(["result", "error", "chunk", "ack"]))
    def handler_answers_again(self, which: int, attempt: str) -> None:
        finished = self._finished()
        dispatch_id = finished[which % len(finished)]
        agent = self.agent
        with pytest.raises(LocalProtocolError, match="already ended"):
            if attempt == "result":
                agent.send_result(dispatch_id, "again")
            elif attempt == "error":
                agent.send_error(dispatch_id, "DISPATCH_FAILED")
            elif attempt == "chunk":
                agent.send_chunk(dispatch_id, "late")
            else:
                agent.send_ack(dispatch_id)

    @precondition(lambda self: self.pair.agent.state is AgentState.READY)
    @rule(grace_seconds=st.integers(min_value=0, max_value=10))
    def agent_close_request(self, grace_seconds: int) -> None:
        self.agent.close_request(grace_seconds, "shutting down", now=self.pair.clock.now)
        self.pair.pump()

    # -- the network and the clock -----------------------------------------------------------

    @precondition(lambda self: not self.disconnected)
    @rule()
    def cut(self) -> None:
        self.pair.cut()

    @precondition(lambda self: self.disconnected)
    @rule()
    def reconnect(self) -> None:
        outbox = len(self.pair.session.outbox)
        self.pair.reconnect()
        assert self.agent.state is AgentState.READY
        assert self.pair.mesh.state is MeshState.READY
        assert not self.pair.session.outbox, "the outbox is flushed after the welcome"
        resumed = self.pair.agent_events_of(SessionStarted)[-1].resumed
        label(f"reconnect: resumed={resumed}, outbox={bool(outbox)}")
        if self.pair.agent.stats.redelivered_dispatches:
            label("reconnect: a replayed dispatch was not run again")

    @rule(
        seconds=st.one_of(
            st.floats(min_value=0, max_value=1, allow_nan=False),
            st.floats(min_value=1, max_value=40, allow_nan=False),
            st.sampled_from([CONFIG.resume_window, CONFIG.dead_peer_timeout, 100.0, 500.0]),
        )
    )
    def advance(self, seconds: float) -> None:
        self.pair.advance(seconds)
        self.check_every_dispatch_ends_by_its_deadline()

    def teardown(self) -> None:
        for event in self.pair.mesh_events:
            if isinstance(event, TERMINAL):
                label(f"outcome: {type(event).__name__} {getattr(event, 'code', '')}".rstrip())

    # -- invariants --------------------------------------------------------------------------

    @invariant()
    def at_most_one_terminal_outcome_per_dispatch(self) -> None:
        ends = Counter(_terminal_id(e) for e in self.pair.mesh_events)
        ends.pop(None, None)
        assert all(count == 1 for count in ends.values()), ends
        assert set(ends) <= set(self.deadlines), "an outcome for a dispatch never sent"

    @invariant()
    def no_handler_runs_twice(self) -> None:
        received = Counter(e.dispatch_id for e in self.pair.agent_events_of(DispatchReceived))
        assert all(count == 1 for count in received.values()), received
        assert set(received) <= set(self.deadlines)

    @invariant()
    def chunks_arrive_in_order_before_the_end(self) -> None:
        last_seq: dict[str, int] = {}
        ended: set[str] = set()
        for event in self.pair.mesh_events:
            if isinstance(event, ChunkReceived):
                assert event.dispatch_id not in ended, "chunk after the terminal outcome"
                assert event.seq > last_seq.get(event.dispatch_id, -1), "chunk out of order"
                last_seq[event.dispatch_id] = event.seq
            elif isinstance(event, TERMINAL):
                ended.add(event.dispatch_id)

    def check_every_dispatch_ends_by_its_deadline(self) -> None:
        now = self.pair.clock.now
        ended = {_terminal_id(e) for e in self.pair.mesh_events}
        overdue = [d for d, deadline in self.deadlines.items() if deadline <= now]
        assert all(d in ended for d in overdue), [d for d in overdue if d not in ended]


AgentAndMesh.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestAgentAndMesh = AgentAndMesh.TestCase
