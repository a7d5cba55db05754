"""Reconnect and resume (spec section 5), with the same `AgentSession` and `ResumeStore`.

Matched, not matched, expired, wrong instance, single use; the agent's outbox flushed
after welcome in order; no dispatch runs twice and no terminal frame is delivered twice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from test_conn_kit import MeshHarness

from svantic_proto.config import Config
from svantic_proto.events import (
    ChunkReceived,
    ConnectionClosed,
    DispatchCancelled,
    DispatchCompleted,
    DispatchFailed,
    DispatchReceived,
    SessionStarted,
)
from svantic_proto.frames import DispatchAuth, DispatchPayload
from svantic_proto.mesh import DispatchRoute, MeshConnection
from svantic_proto.resume import HeldDispatch, ResumeStore
from svantic_proto.testing import Pair

CONFIG = Config(resume_window=10.0, heartbeat_interval=100.0, dead_peer_timeout=1000.0)


def connected(config: Config = CONFIG, **kwargs: Any) -> Pair:
    pair = Pair(config, **kwargs)
    pair.connect()
    return pair


def advance_to(pair: Pair, when: float) -> None:
    pair.advance(when - pair.clock.now)


def last_started(events: list[Any]) -> SessionStarted:
    return [e for e in events if isinstance(e, SessionStarted)][-1]


def failed(pair: Pair) -> list[tuple[str, str]]:
    return [(e.dispatch_id, e.code) for e in pair.mesh_events_of(DispatchFailed)]


def record_mints(pair: Pair) -> list[DispatchRoute]:
    """Wrap the pair's minter (used by the next `reconnect()`) to see every envelope minted."""
    routes: list[DispatchRoute] = []
    original = pair.mint
    assert original is not None

    def mint(route: DispatchRoute) -> DispatchAuth:
        routes.append(route)
        return original(route)

    pair.mint = mint
    return routes


# -- matched -------------------------------------------------------------------------------------


def test_a_matching_token_resumes_and_replays_with_attempt_plus_one_and_fresh_auth() -> None:
    pair = connected()
    sent_at = pair.clock.now
    dispatch_id = pair.mesh.send_dispatch("job", {"n": 1}, deadline_ms=60_000, now=sent_at)
    pair.cut()  # the dispatch was in transit: the agent never saw it
    (closed,) = pair.mesh_events_of(ConnectionClosed)
    assert closed.in_flight == (dispatch_id,)
    assert failed(pair) == []
    pair.advance(3)
    routes = record_mints(pair)
    pair.reconnect()
    mesh_started = last_started(pair.mesh_events)
    agent_started = last_started(pair.agent_events)
    assert mesh_started.resumed and agent_started.resumed
    assert mesh_started.replayed_dispatches == agent_started.replayed_dispatches == (dispatch_id,)
    (received,) = pair.agent_events_of(DispatchReceived)
    assert (received.dispatch_id, received.attempt) == (dispatch_id, 2)
    assert dict(received.arguments) == {"n": 1} and received.deadline_ms == 60_000
    # a fresh envelope, minted now for the replay, verified by the agent
    assert [(r.dispatch_id, r.now) for r in routes] == [(dispatch_id, pair.clock.wall())]
    # the deadline is the original one, not restarted by the replay
    assert pair.mesh.in_flight[dispatch_id].deadline_at == sent_at + 60.0
    pair.agent.send_result(dispatch_id, "done")
    pair.pump()
    assert pair.mesh_events_of(DispatchCompleted) == [DispatchCompleted(dispatch_id, "done")]
    assert failed(pair) == []


def test_each_replay_adds_one_to_attempt() -> None:
    pair = connected()
    dispatch_id = pair.mesh.send_dispatch("job", deadline_ms=60_000, now=pair.clock.now)
    for attempt in (2, 3):
        pair.cut()
        pair.reconnect()
        assert pair.mesh.in_flight[dispatch_id].payload.attempt == attempt
    assert len(pair.agent_events_of(DispatchReceived)) == 1  # ran once, though sent three times


def test_a_session_with_nothing_in_flight_resumes_too() -> None:
    pair = connected()
    pair.cut()
    pair.advance(9.0)
    pair.reconnect()
    assert last_started(pair.mesh_events).resumed is True
    assert last_started(pair.agent_events).replayed_dispatches == ()


def test_each_welcome_issues_a_new_token() -> None:
    pair = connected()
    first = pair.session.resume_token
    pair.cut()
    pair.reconnect()
    assert pair.session.resume_token not in (None, first)


# -- not matched ---------------------------------------------------------------------------------


@pytest.mark.parametrize("token", [None, "bogus-token"], ids=["no token", "bogus token"])
def test_without_a_matching_token_held_dispatches_fail_agent_disconnected(
    token: str | None,
) -> None:
    pair = connected()
    dispatch_id = pair.mesh.send_dispatch("job", deadline_ms=60_000, now=pair.clock.now)
    pair.pump()
    pair.cut()
    pair.session.resume_token = token
    pair.reconnect()
    assert last_started(pair.mesh_events).resumed is False
    assert last_started(pair.agent_events).resumed is False
    assert failed(pair) == [(dispatch_id, "AGENT_DISCONNECTED")]
    assert dispatch_id not in pair.mesh.in_flight


def test_the_window_expires_at_exactly_resume_window_and_fails_what_was_held() -> None:
    pair = connected()
    dispatch_id = pair.mesh.send_dispatch("job", deadline_ms=60_000, now=pair.clock.now)
    pair.pump()
    cut_at = pair.clock.now
    pair.cut()
    assert pair.store.next_deadline() == cut_at + 10.0
    advance_to(pair, cut_at + 9.999)
    assert failed(pair) == []
    advance_to(pair, cut_at + 10.0)
    assert failed(pair) == [(dispatch_id, "AGENT_DISCONNECTED")]
    pair.reconnect()
    assert last_started(pair.mesh_events).resumed is False
    assert len(failed(pair)) == 1  # failed once, not again at the hello


def test_a_held_dispatch_fails_when_its_deadline_passes_during_the_window() -> None:
    pair = connected()
    sent_at = pair.clock.now
    short = pair.mesh.send_dispatch("short", deadline_ms=3000, now=sent_at)
    long = pair.mesh.send_dispatch("long", deadline_ms=60_000, now=sent_at)
    pair.pump()
    pair.cut()
    advance_to(pair, sent_at + 2.999)
    assert failed(pair) == []
    advance_to(pair, sent_at + 3.0)
    assert failed(pair) == [(short, "AGENT_DISCONNECTED")]
    advance_to(pair, sent_at + 5.0)
    pair.reconnect()
    assert last_started(pair.mesh_events).resumed is True
    assert last_started(pair.mesh_events).replayed_dispatches == (long,)


def test_another_instance_presenting_the_token_gets_nothing_and_the_owner_still_resumes() -> None:
    pair = connected()
    dispatch_id = pair.mesh.send_dispatch("job", deadline_ms=60_000, now=pair.clock.now)
    pair.pump()
    pair.cut()
    stolen = pair.session.resume_token
    for instance_id, tenant_id in (("agent-2", "tenant-1"), ("agent-1", "tenant-2")):
        thief = Pair(CONFIG, clock=pair.clock, store=pair.store, instance_id=instance_id,
                     tenant_id=tenant_id)
        thief.session.resume_token = stolen
        thief.connect()
        assert last_started(thief.mesh_events).resumed is False
        assert thief.mesh_events_of(DispatchFailed) == []
        assert thief.mesh.in_flight == {}
    pair.reconnect()
    assert last_started(pair.mesh_events).resumed is True
    assert last_started(pair.mesh_events).replayed_dispatches == (dispatch_id,)


def test_a_token_is_single_use() -> None:
    pair = connected()
    dispatch_id = pair.mesh.send_dispatch("job", deadline_ms=60_000, now=pair.clock.now)
    pair.pump()
    pair.cut()
    used = pair.session.resume_token
    pair.reconnect()
    assert last_started(pair.mesh_events).resumed is True
    pair.cut()
    pair.session.resume_token = used  # presented a second time
    pair.reconnect()
    assert last_started(pair.mesh_events).resumed is False
    assert failed(pair) == [(dispatch_id, "AGENT_DISCONNECTED")]


# -- the agent's outbox and finished cache -------------------------------------------------------


def test_the_outbox_is_flushed_after_welcome_in_order_and_the_result_lands_once() -> None:
    pair = connected()
    dispatch_id = pair.mesh.send_dispatch("stream", deadline_ms=60_000, now=pair.clock.now)
    pair.pump()
    pair.cut()
    assert not pair.agent.ready
    assert [pair.agent.send_chunk(dispatch_id, d) for d in ("a", "b")] == [0, 1]
    pair.agent.send_result(dispatch_id, "end")
    assert [f.type for f in pair.session.outbox] == [
        "dispatch_chunk", "dispatch_chunk", "dispatch_result"
    ]
    pair.reconnect()
    relevant = [e for e in pair.mesh_events if isinstance(e, ChunkReceived | DispatchCompleted)]
    assert relevant == [
        ChunkReceived(dispatch_id, 0, "a"),
        ChunkReceived(dispatch_id, 1, "b"),
        DispatchCompleted(dispatch_id, "end"),
    ]
    assert not pair.session.outbox
    # the replay of a dispatch whose result was just flushed is not answered again
    assert pair.agent.stats.redelivered_dispatches == 1
    assert pair.mesh.stats.late_terminal_frames == 0
    assert len(pair.agent_events_of(DispatchReceived)) == 1


def test_a_finished_dispatch_redelivered_gets_its_stored_terminal_and_never_reruns() -> None:
    pair = connected()
    dispatch_id = pair.mesh.send_dispatch("job", deadline_ms=60_000, now=pair.clock.now)
    pair.pump()
    pair.agent.send_error(dispatch_id, "DISPATCH_FAILED", "boom")
    stored = pair.session.finished[dispatch_id]
    pair.cut()  # the error frame is lost in transit
    pair.reconnect()
    assert last_started(pair.mesh_events).replayed_dispatches == (dispatch_id,)
    assert pair.mesh_events_of(DispatchFailed) == [
        DispatchFailed(dispatch_id, "DISPATCH_FAILED", "boom")
    ]
    assert len(pair.agent_events_of(DispatchReceived)) == 1
    assert pair.session.finished[dispatch_id] is stored  # the same frame, same id
    assert pair.agent.stats.redelivered_dispatches == 1


def test_a_running_dispatch_keeps_its_deadline_across_a_reconnect_without_resume() -> None:
    pair = connected()
    received_at = pair.clock.now
    dispatch_id = pair.mesh.send_dispatch("job", deadline_ms=5000, now=received_at)
    pair.pump()
    pair.advance(1.0)
    pair.cut()
    pair.session.resume_token = None  # the mesh will not replay it, nor send a cancel
    pair.advance(1.0)
    pair.reconnect()
    margin = pair.config.agent_deadline_margin  # the mesh's own timeout comes first
    advance_to(pair, received_at + 5.0 + margin - 0.001)
    assert pair.agent_events_of(DispatchCancelled) == []
    advance_to(pair, received_at + 5.0 + margin)
    assert pair.agent_events_of(DispatchCancelled) == [
        DispatchCancelled(dispatch_id, "DEADLINE_EXCEEDED")
    ]


def test_an_ack_while_disconnected_is_dropped_not_queued() -> None:
    pair = connected()
    dispatch_id = pair.mesh.send_dispatch("job", deadline_ms=60_000, now=pair.clock.now)
    pair.pump()
    pair.cut()
    pair.agent.send_ack(dispatch_id)  # only worth sending live
    assert not pair.session.outbox


def test_a_running_dispatch_redelivered_is_left_to_finish() -> None:
    pair = connected()
    dispatch_id = pair.mesh.send_dispatch("job", deadline_ms=60_000, now=pair.clock.now)
    pair.pump()
    pair.cut()
    pair.reconnect()
    assert len(pair.agent_events_of(DispatchReceived)) == 1
    assert pair.agent.stats.redelivered_dispatches == 1
    assert pair.mesh.data_to_send() == [] and pair.agent.data_to_send() == []
    pair.agent.send_result(dispatch_id, 42)
    pair.pump()
    assert pair.mesh_events_of(DispatchCompleted) == [DispatchCompleted(dispatch_id, 42)]


def test_the_mesh_ignores_a_flushed_result_for_a_dispatch_it_no_longer_holds() -> None:
    pair = connected()
    dispatch_id = pair.mesh.send_dispatch("job", deadline_ms=60_000, now=pair.clock.now)
    pair.pump()
    pair.cut()
    pair.agent.send_result(dispatch_id, "late")
    pair.session.resume_token = None
    pair.reconnect()
    assert failed(pair) == [(dispatch_id, "AGENT_DISCONNECTED")]
    assert pair.mesh_events_of(DispatchCompleted) == []
    assert pair.mesh.stats.late_terminal_frames == 1


def test_a_full_outbox_drops_the_oldest_chunk_first() -> None:
    pair = connected(Config(resume_window=10.0, outbox_limit=3, heartbeat_interval=100.0))
    dispatch_id = pair.mesh.send_dispatch("stream", deadline_ms=60_000, now=pair.clock.now)
    pair.pump()
    pair.cut()
    for data in ("c0", "c1", "c2"):
        pair.agent.send_chunk(dispatch_id, data)
    pair.agent.send_result(dispatch_id, "end")
    assert pair.session.dropped_from_outbox == 1
    assert [getattr(f.payload, "seq", "result") for f in pair.session.outbox] == [1, 2, "result"]
    pair.reconnect()
    relevant = [e for e in pair.mesh_events if isinstance(e, ChunkReceived | DispatchCompleted)]
    assert relevant == [
        ChunkReceived(dispatch_id, 1, "c1"),
        ChunkReceived(dispatch_id, 2, "c2"),
        DispatchCompleted(dispatch_id, "end"),
    ]


def test_a_terminal_dropped_from_a_full_outbox_is_answered_from_the_finished_cache() -> None:
    pair = connected(Config(resume_window=10.0, outbox_limit=1, heartbeat_interval=100.0))
    first = pair.mesh.send_dispatch("a", deadline_ms=60_000, now=pair.clock.now)
    second = pair.mesh.send_dispatch("b", deadline_ms=60_000, now=pair.clock.now)
    pair.pump()
    pair.cut()
    pair.agent.send_result(first, 1)
    pair.agent.send_result(second, 2)
    assert pair.session.dropped_from_outbox == 1 and len(pair.session.outbox) == 1
    pair.reconnect()
    assert sorted(
        (e.dispatch_id, e.result) for e in pair.mesh_events_of(DispatchCompleted)
    ) == sorted([(first, 1), (second, 2)])
    assert pair.mesh.stats.late_terminal_frames == 0  # each answered exactly once
    assert len(pair.agent_events_of(DispatchReceived)) == 2


def test_the_finished_cache_is_bounded() -> None:
    pair = connected(Config(finished_cache_size=2))
    ids = [pair.mesh.send_dispatch("a", deadline_ms=9000, now=pair.clock.now) for _ in range(3)]
    pair.pump()
    for dispatch_id in ids:
        pair.agent.send_result(dispatch_id, None)
    assert list(pair.session.finished) == ids[1:]


def test_at_most_one_terminal_per_connection_holds_past_the_answered_set_bound() -> None:
    pair = connected(Config(finished_cache_size=2, heartbeat_interval=100.0))
    ids = [pair.mesh.send_dispatch("a", deadline_ms=9000, now=pair.clock.now) for _ in range(6)]
    pair.pump()
    for dispatch_id in ids:
        pair.agent.send_result(dispatch_id, None)
    pair.pump()
    # the mesh delivers the latest finished one again, on the same connection
    pair.mesh.send_dispatch("a", deadline_ms=9000, now=pair.clock.now, dispatch_id=ids[-1])
    pair.pump()
    assert pair.agent.stats.redelivered_dispatches == 1
    assert len(pair.mesh_events_of(DispatchCompleted)) == 6  # not answered a second time
    assert len(pair.agent_events_of(DispatchReceived)) == 6


def test_backoff_grows_between_attempts_and_restarts_after_welcome() -> None:
    pair = connected()
    pair.cut()
    first, second = pair.session.next_delay(), pair.session.next_delay()
    assert 0.75 <= first <= 1.25 and 1.5 <= second <= 2.5
    pair.session.token_refreshed = True
    pair.reconnect()
    assert pair.session.backoff.attempts == 0 and pair.session.token_refreshed is False
    assert 0.75 <= pair.session.next_delay() <= 1.25
    assert pair.session.connections == 2


# -- without a store, and the store's own rules --------------------------------------------------


def test_a_mesh_without_a_resume_store_fails_in_flight_dispatches_at_once() -> None:
    h = MeshHarness(store=None)
    welcome = h.hello()
    assert welcome.payload.resume_token
    dispatch_id = h.mesh.send_dispatch("job", deadline_ms=60_000, now=h.clock.now)
    h.mesh.receive_eof(h.clock.now)
    assert [(e.dispatch_id, e.code) for e in h.events_of(DispatchFailed)] == [
        (dispatch_id, "AGENT_DISCONNECTED")
    ]


def _held(dispatch_id: str, deadline_at: float) -> HeldDispatch:
    payload = DispatchPayload(dispatch_id=dispatch_id, capability="c", deadline_ms=1000)
    return HeldDispatch(payload, deadline_at)


def _store(window: float = 10.0) -> tuple[ResumeStore, Callable[[], str]]:
    counter = iter(range(1000))
    return ResumeStore(window=window, token_factory=lambda: f"t{next(counter)}"), lambda: ""


def test_store_with_zero_window_holds_nothing() -> None:
    store, _ = _store(window=0.0)
    token = store.issue("i", "t")
    held = [_held("d1", 50.0)]
    assert store.hold(token, held, now=0.0) == held
    assert len(store) == 0 and store.next_deadline() is None


def test_store_refuses_to_hold_under_an_unknown_token() -> None:
    store, _ = _store()
    held = [_held("d1", 50.0)]
    assert store.hold("never-issued", held, now=0.0) == held


def test_store_fails_at_once_what_is_already_past_its_deadline() -> None:
    store, _ = _store()
    token = store.issue("i", "t")
    late, live = _held("late", 5.0), _held("live", 50.0)
    assert store.hold(token, [late, live], now=5.0) == [late]
    assert len(store) == 1
    assert store.next_deadline() == 15.0  # the window; `live` outlasts it


def test_store_issue_replaces_the_instance_older_token() -> None:
    store, _ = _store()
    old = store.issue("i", "t")
    new = store.issue("i", "t")
    store.hold(new, [], now=0.0)
    assert store.claim(old, "i", "t", now=1.0).resumed is False
    assert store.claim(new, "i", "t", now=1.0).resumed is False  # the failed claim reset it


def test_store_claim_splits_live_and_expired_held_dispatches() -> None:
    store, _ = _store()
    token = store.issue("i", "t")
    short, long = _held("short", 3.0), _held("long", 50.0)
    store.hold(token, [short, long], now=0.0)
    claim = store.claim(token, "i", "t", now=3.0)  # `short` passed, not yet expired by expire()
    assert claim.resumed and claim.replay == (long,) and claim.failed == (short,)
    assert len(store) == 0
    assert store.next_deadline() is None  # the stale heap entries are skipped
    assert store.expire(100.0) == []


def test_store_expire_drops_the_window_and_skips_claimed_entries() -> None:
    store, _ = _store()
    token_a = store.issue("a", "t")
    token_b = store.issue("b", "t")
    store.hold(token_a, [_held("a1", 5.0), _held("a2", 50.0)], now=0.0)
    store.hold(token_b, [_held("b1", 50.0)], now=1.0)
    assert store.expire(5.0) == [_held("a1", 5.0)]
    store.claim(token_b, "b", "t", now=6.0)
    assert [h.dispatch_id for h in store.expire(20.0)] == ["a2"]
    assert store.claim(token_a, "a", "t", now=21.0).resumed is False


def test_a_mesh_connection_uses_the_store_it_is_given() -> None:
    store = ResumeStore(window=5.0, token_factory=lambda: "fixed-token")
    h = MeshHarness(store=store)
    assert h.hello().payload.resume_token == "fixed-token"
    assert isinstance(h.mesh, MeshConnection)
