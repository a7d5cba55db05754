"""`AgentRuntime.max_concurrent_sessions`: a dispatch beyond the limit is refused
`AGENT_UNAVAILABLE` ("busy") without running its handler, and heartbeats report the limit,
the running count and status `busy` at the limit, `available` below it. In memory, against
a real `MeshConnection`, on a fake clock (the harness of test_agent_runtime.py)."""

from __future__ import annotations

import pytest
from test_agent_runtime import CONFIG, Harness

from svantic_proto.agent_runtime import StartHandler
from svantic_proto.errors import LocalProtocolError
from svantic_proto.events import DispatchCompleted, DispatchFailed, HeartbeatReceived


def limited(limit: int) -> Harness:
    h = Harness(CONFIG)
    h.rt.set_max_concurrent_sessions(limit)
    h.connect()
    h.take()
    return h


def beats(h: Harness) -> list[HeartbeatReceived]:
    return h.mesh_of(HeartbeatReceived)


def test_the_first_heartbeat_carries_the_limit() -> None:
    h = limited(2)
    first = beats(h)[0]
    assert (first.status, first.max_concurrent_sessions, first.active_sessions) == (
        "available", 2, 0)


def test_a_dispatch_beyond_the_limit_is_refused_busy_without_a_handler() -> None:
    h = limited(2)
    one, two = h.dispatch(), h.dispatch()
    assert [s.dispatch_id for s in h.of(StartHandler)] == [one, two]
    three = h.dispatch()
    assert len(h.of(StartHandler)) == 2 and h.rt.handler_runs == 2
    [refused] = h.mesh_of(DispatchFailed)
    assert refused.dispatch_id == three
    assert refused.code == "AGENT_UNAVAILABLE" and (refused.message or "").startswith("busy")
    h.run(h.of(StartHandler)[0])  # one ends: room again
    four = h.dispatch()
    assert h.of(StartHandler)[-1].dispatch_id == four
    assert {c.dispatch_id for c in h.mesh_of(DispatchCompleted)} == {one}


def test_heartbeats_say_busy_at_the_limit_and_available_below_it() -> None:
    h = limited(1)
    before = len(beats(h))
    h.dispatch()
    busy = beats(h)[before:]
    assert [(b.status, b.active_sessions, b.max_concurrent_sessions) for b in busy] == [
        ("busy", 1, 1)]  # sent at once, not at the next interval
    h.run(h.started())
    after = beats(h)[before + 1:]
    assert [(b.status, b.active_sessions) for b in after] == [("available", 0)]


def test_no_limit_refuses_nothing_and_sends_no_extra_heartbeats() -> None:
    h = Harness(CONFIG)
    h.connect()
    h.take()
    before = len(beats(h))
    ids = [h.dispatch() for _ in range(20)]
    assert [s.dispatch_id for s in h.of(StartHandler)] == ids
    assert len(beats(h)) == before and not h.mesh_of(DispatchFailed)
    assert beats(h)[0].max_concurrent_sessions is None  # the registered cap stands


def test_the_limit_changes_at_run_time() -> None:
    h = limited(1)
    h.dispatch()
    assert beats(h)[-1].status == "busy"
    h.rt.set_max_concurrent_sessions(3)
    h.pump()
    h.advance_to(h.now + CONFIG.heartbeat_interval)  # the next regular heartbeat
    assert (beats(h)[-1].status, beats(h)[-1].max_concurrent_sessions) == ("available", 3)
    h.dispatch()
    assert len(h.of(StartHandler)) == 2
    with pytest.raises(LocalProtocolError):
        h.rt.set_max_concurrent_sessions(-1)


def test_the_limit_counts_across_a_reconnect() -> None:
    h = limited(1)
    h.dispatch()
    h.cut()
    deadline = h.rt.next_deadline()
    assert deadline is not None
    h.advance_to(deadline)
    h.open()
    h.take()
    assert beats(h)[-1].status == "busy"  # the new connection's first heartbeat
    h.dispatch()
    assert h.mesh_of(DispatchFailed)[-1].code == "AGENT_UNAVAILABLE"
