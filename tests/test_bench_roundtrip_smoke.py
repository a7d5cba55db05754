"""The core round-trip benchmark runs, and compares like with like.

The figures mean something only if the baseline echoes the very frames a real round
trip puts on the wire, every timed round trip really completes, and the ablation that
stubs the agent's trace-context parse leaves the core as it found it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from wsproto.connection import Connection, ConnectionType
from wsproto.events import TextMessage

from svantic_proto import COMPILED
from svantic_proto.codec import decode_frame
from svantic_proto.events import DispatchCompleted

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_roundtrip  # noqa: E402


def test_quick_run_reports_every_candidate_and_component(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert bench_roundtrip.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "## Core round trip" in out
    assert "| ours, without dispatch auth |" in out
    assert "| ours, with HS256 dispatch auth |" in out
    assert out.count("| bare wsproto echo of these bytes |") == 2
    assert "| without dispatch auth |" in out and "| with HS256 dispatch auth |" in out
    for component in (
        "Framing wrapper",
        "codec",
        "ids and timestamps",
        "events (build)",
        "timer polling",
        "auth mint (HS256)",
        "auth verify (HS256)",
        "the rest:",
        "dispatch auth: (ours - echo)",
    ):
        assert f"| {component}" in out, component


def test_check_exits_1_only_when_asked_and_the_target_is_missed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench_roundtrip, "OVERHEAD_TARGET", -1.0)  # nothing can meet it
    args = ["--quick", "--repeats", "1", "--iterations", "5"]
    assert bench_roundtrip.main(args) == 0
    assert bench_roundtrip.main([*args, "--check"]) == 1
    assert "**missed**" in capsys.readouterr().out


@pytest.mark.parametrize("dispatch_auth", [False, True])
def test_the_echo_carries_the_frames_of_a_real_round_trip(dispatch_auth: bool) -> None:
    recorded = bench_roundtrip.record(dispatch_auth)
    dispatch = decode_frame(recorded.dispatch_text)
    result = decode_frame(recorded.result_text)
    assert dispatch.type == "dispatch" and result.type == "dispatch_result"
    assert result.in_reply_to == dispatch.id  # type: ignore[union-attr]
    assert (dispatch.payload.dispatch_auth is not None) is dispatch_auth  # type: ignore[union-attr]

    # What the baseline's wsproto server and client exchange is exactly that text.
    server, client = Connection(ConnectionType.SERVER), Connection(ConnectionType.CLIENT)
    client.receive_data(server.send(TextMessage(data=recorded.dispatch_text)))
    server.receive_data(client.send(TextMessage(data=recorded.result_text)))
    assert [e.data for e in client.events()] == [recorded.dispatch_text]  # type: ignore[attr-defined]
    assert [e.data for e in server.events()] == [recorded.result_text]  # type: ignore[attr-defined]
    bench_roundtrip.wsproto_echo_batch(recorded.dispatch_text, recorded.result_text)(3)
    bench_roundtrip.framing_echo_batch(recorded.dispatch_text, recorded.result_text)(3)


@pytest.mark.parametrize("dispatch_auth", [False, True])
def test_every_timed_round_trip_completes_a_dispatch(dispatch_auth: bool) -> None:
    pair = bench_roundtrip.connected_pair(dispatch_auth)
    bench_roundtrip.protocol_batch(pair)(25)
    assert pair.mesh.stats.frames_received == 1 + 1 + 25  # hello, heartbeat, 25 results
    assert pair.mesh.stats.bad_frames == 0 and pair.agent.stats.bad_frames == 0
    assert not pair.mesh.in_flight and not pair.session.running
    assert pair.mesh.accepting_dispatches and pair.agent.ready
    # The batch itself checks each DispatchCompleted; none is left over for the pair.
    assert not pair.mesh_events_of(DispatchCompleted)


def test_the_rate_limit_is_the_only_default_changed() -> None:
    from svantic_proto.config import Config

    config, default = bench_roundtrip.bench_config(), Config()
    changed = {
        name
        for name in Config.__dataclass_fields__
        if getattr(config, name) != getattr(default, name)
    }
    assert changed == {"max_frames_per_second", "frame_burst"}


@pytest.mark.skipif(COMPILED, reason="a compiled IdFactory cannot be wrapped; see the source run")
def test_the_stamp_component_matches_what_a_round_trip_stamps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from svantic_proto.ids import IdFactory

    calls = 0
    original = IdFactory.stamp

    def counting(self: IdFactory) -> tuple[str, str]:
        nonlocal calls
        calls += 1
        return original(self)

    monkeypatch.setattr(IdFactory, "stamp", counting)
    run = bench_roundtrip.protocol_batch(bench_roundtrip.connected_pair(dispatch_auth=True))
    calls = 0
    run(10)
    assert calls == 10 * bench_roundtrip.STAMPS_PER_ROUND_TRIP


def test_round_trips_leave_no_per_dispatch_state_behind() -> None:
    """The benchmark measures a steady state: a long-lived connection must not grow.

    (Regression: the agent remembered every dispatch id it ever answered on a
    connection, long after the finished cache had forgotten them.)
    """
    from svantic_proto.config import Config
    from svantic_proto.testing import Pair

    config = Config(max_frames_per_second=1e9, frame_burst=10**9, finished_cache_size=16)
    pair = Pair(config, dispatch_auth=False)
    pair.connect()
    bench_roundtrip.protocol_batch(pair)(300)
    assert len(pair.session.finished) == 16
    assert len(pair.agent._sent_terminal) <= 2 * 16
    assert not pair.mesh.in_flight and not pair.session.running
    assert len(pair.mesh._deadlines) <= 1 and len(pair.agent._deadlines) <= 1
