"""Outcomes of bad input on the wire, on both sides (spec sections 2 and 4).

Every message is crafted as exact WebSocket bytes (by the peer's `Framing`, or by
hand for what a `Framing` refuses to send) and the answer is read back from the
bytes the connection wrote: an `error` frame naming the bad frame then close 1002,
or `error` and keep the socket, or close 1007 / 1003 / 1009 with no error frame.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_conn_kit import (
    BINARY,
    CLOSE,
    CONTINUATION,
    PING,
    TEXT,
    AgentHarness,
    MeshHarness,
    readable_id,
    ws_frame,
)

from svantic_proto.backoff import RetryDecision
from svantic_proto.codec import encode_frame
from svantic_proto.config import Config
from svantic_proto.errors import FrameError, RemoteProtocolError
from svantic_proto.events import (
    ConnectionClosed,
    DispatchCompleted,
    DispatchReceived,
    ErrorReceived,
    HeartbeatReceived,
)
from svantic_proto.frames import (
    DispatchResult,
    DispatchResultPayload,
    Error,
    ErrorPayload,
    Heartbeat,
    HeartbeatPayload,
    Ping,
    PingPayload,
    Pong,
)
from svantic_proto.states import AgentState, MeshState

VECTORS = json.loads(
    (Path(__file__).parent.parent / "vectors" / "frames.json").read_text(encoding="utf-8")
)["cases"]
BAD_CASES = [case for case in VECTORS if case["outcome"] != "ok"]
SIDES = ["mesh", "agent"]


def ready(side: str, config: Config | None = None) -> MeshHarness | AgentHarness:
    """A connection of `side` in READY, its peer played by hand."""
    if side == "mesh":
        harness = MeshHarness(config)
        harness.hello()
        return harness
    harness_a = AgentHarness(config)
    harness_a.read()
    return harness_a


def send_message(harness: MeshHarness | AgentHarness, payload: bytes, opcode: int = TEXT) -> None:
    """One WebSocket message with exactly these payload bytes, masked as the peer must."""
    harness.send_raw(ws_frame(opcode, payload, masked=isinstance(harness, MeshHarness)))


def case_bytes(case: dict[str, Any]) -> bytes:
    return bytes.fromhex(case["hex"]) if "hex" in case else case["text"].encode("utf-8")


def assert_still_open(harness: MeshHarness | AgentHarness) -> None:
    ping_id = harness.ping()
    wire = harness.read()
    assert wire.types == ["pong"] and wire.frames[0].in_reply_to == ping_id
    assert wire.close_code is None and not wire.transport_closed


def test_the_vectors_cover_every_outcome() -> None:
    outcomes = {case["outcome"] for case in VECTORS}
    assert outcomes == {"ok", "bad_frame_close", "bad_frame_keep", "close_1007"}


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("case", BAD_CASES, ids=[c["name"] for c in BAD_CASES])
def test_every_bad_vector_gets_the_spec_outcome_on_the_wire(
    case: dict[str, Any], side: str
) -> None:
    harness = ready(side)
    data = case_bytes(case)
    send_message(harness, data)
    wire = harness.read()
    outcome = case["outcome"]
    if outcome == "close_1007":
        assert wire.frames == []  # no error frame for text that is not UTF-8
        assert wire.close_code == 1007 and wire.transport_closed
        closed = harness.closed_event()
        assert closed.code == 1007 and isinstance(closed.error, RemoteProtocolError)
        return
    (error,) = wire.frames
    assert isinstance(error, Error) and error.payload.code == "BAD_FRAME"
    assert error.payload.message
    assert error.in_reply_to == readable_id(data.decode())
    if outcome == "bad_frame_keep":
        assert error.in_reply_to is not None
        assert wire.close_code is None and not wire.transport_closed
        assert harness.events_of(ConnectionClosed) == []
        assert_still_open(harness)
    else:
        assert wire.close_code == 1002 and wire.transport_closed
        closed = harness.closed_event()
        assert closed.code == 1002 and not closed.by_peer
        assert isinstance(closed.error, FrameError) and closed.error.close_code == 1002
    assert harness._conn().stats.bad_frames == 1


@pytest.mark.parametrize("side", SIDES)
def test_binary_message_closes_1003_without_error_frame(side: str) -> None:
    harness = ready(side)
    send_message(harness, b"\x00\x01binary", BINARY)
    wire = harness.read()
    assert wire.frames == [] and wire.close_code == 1003 and wire.transport_closed
    closed = harness.closed_event()
    assert closed.code == 1003 and not closed.by_peer


def _ping_text_of_size(harness: MeshHarness | AgentHarness, size: int) -> bytes:
    """A valid ping frame padded (with an ignored field) to exactly `size` bytes."""
    frame = harness.factory.new(Ping, PingPayload())
    base = json.loads(json.dumps({"v": 1, "type": "ping", "id": frame.id, "ts": frame.ts,
                                  "payload": {}, "pad": ""}))
    text = json.dumps(base, separators=(",", ":"))
    base["pad"] = "x" * (size - len(text))
    data = json.dumps(base, separators=(",", ":")).encode()
    assert len(data) == size
    return data


@pytest.mark.parametrize("side", SIDES)
def test_a_message_at_the_size_limit_passes_and_one_byte_more_closes_1009(side: str) -> None:
    harness = ready(side, Config(max_message_bytes=1024))
    send_message(harness, _ping_text_of_size(harness, 1024))
    assert harness.read().types == ["pong"]
    send_message(harness, _ping_text_of_size(harness, 1025))
    wire = harness.read()
    assert wire.frames == [] and wire.close_code == 1009 and wire.transport_closed
    assert harness.closed_event().code == 1009


def _fragmented(payload: bytes, parts: int, *, masked: bool) -> bytes:
    size = -(-len(payload) // parts)
    chunks = [payload[i * size:(i + 1) * size] for i in range(parts)]
    return b"".join(
        ws_frame(TEXT if i == 0 else CONTINUATION, chunk, masked=masked, fin=i == parts - 1)
        for i, chunk in enumerate(chunks)
    )


@pytest.mark.parametrize("side", SIDES)
def test_a_message_over_the_fragment_limit_closes_1009(side: str) -> None:
    harness = ready(side, Config(max_fragments=4))
    masked = side == "mesh"
    harness.send_raw(_fragmented(_ping_text_of_size(harness, 200), 4, masked=masked))
    assert harness.read().types == ["pong"]  # four fragments: allowed
    harness.send_raw(_fragmented(_ping_text_of_size(harness, 200), 5, masked=masked))
    wire = harness.read()
    assert wire.frames == [] and wire.close_code == 1009 and wire.transport_closed
    assert harness.closed_event().code == 1009


@pytest.mark.parametrize("side", SIDES)
def test_unknown_type_keeps_the_socket_and_later_frames_still_work(side: str) -> None:
    harness = ready(side)
    frame = harness.factory.new(Ping, PingPayload())
    text = json.dumps({"v": 1, "type": "x_future", "id": frame.id, "ts": frame.ts,
                       "payload": {"a": [1, 2]}})
    harness.send_text(text)
    wire = harness.read()
    assert wire.types == ["error"] and wire.frames[0].in_reply_to == frame.id
    assert wire.close_code is None
    assert_still_open(harness)
    if isinstance(harness, MeshHarness):
        dispatch_id = harness.mesh.send_dispatch("echo", deadline_ms=1000, now=harness.clock.now)
        assert harness.read().types == ["dispatch"]
        harness.send(harness.factory.new(
            DispatchResult, DispatchResultPayload(result="ok"), in_reply_to=dispatch_id))
        assert harness.events_of(DispatchCompleted) == [DispatchCompleted(dispatch_id, "ok")]
    else:
        harness.send(harness.dispatch_frame("echo"))
        assert len(harness.events_of(DispatchReceived)) == 1


def test_an_unmasked_frame_from_an_agent_is_a_websocket_protocol_error() -> None:
    harness = ready("mesh")
    harness.send_raw(ws_frame(TEXT, b"{}", masked=False))
    wire = harness.read()
    assert wire.frames == [] and wire.close_code == 1002 and wire.transport_closed
    closed = harness.closed_event()
    assert closed.code == 1002 and isinstance(closed.error, RemoteProtocolError)


def test_a_masked_frame_from_the_mesh_is_a_websocket_protocol_error() -> None:
    harness = ready("agent")
    harness.send_raw(ws_frame(TEXT, b"{}", masked=True))
    wire = harness.read()
    assert wire.close_code == 1002 and wire.transport_closed
    closed = harness.closed_event()
    assert closed.code == 1002 and closed.retry is RetryDecision.RETRY


@pytest.mark.parametrize("side", SIDES)
def test_websocket_pings_are_answered_and_count_as_traffic(side: str) -> None:
    harness = ready(side)
    harness.send_raw(ws_frame(PING, b"are you there", masked=side == "mesh"))
    assert harness.read().pongs == [b"are you there"]


# -- closes started by the peer ------------------------------------------------------------------


def _close_payload(code: int | None, reason: bytes = b"") -> bytes:
    return b"" if code is None else code.to_bytes(2, "big") + reason


@pytest.mark.parametrize("code", [1000, 1001, 1011, None])
def test_agent_echoes_a_close_from_the_mesh_and_will_reconnect(code: int | None) -> None:
    harness = ready("agent")
    harness.send_raw(ws_frame(CLOSE, _close_payload(code, b"bye"), masked=False))
    wire = harness.read()
    assert wire.close_seen and wire.close_code == code and wire.transport_closed
    closed = harness.closed_event()
    assert closed.code == code and closed.by_peer and closed.retry is RetryDecision.RETRY
    assert harness.agent.state is AgentState.CLOSED


def test_mesh_echoes_a_close_from_the_agent() -> None:
    harness = ready("mesh")
    harness.send_raw(ws_frame(CLOSE, _close_payload(1000, b"done"), masked=True))
    wire = harness.read()
    assert wire.close_code == 1000 and wire.transport_closed
    closed = harness.closed_event()
    assert (closed.code, closed.reason, closed.by_peer) == (1000, "done", True)
    assert closed.retry is RetryDecision.FINAL  # the mesh never reconnects
    assert harness.mesh.state is MeshState.CLOSED


@pytest.mark.parametrize("side", SIDES)
def test_nothing_follows_the_close_echo_when_a_request_and_a_close_arrive_together(
    side: str,
) -> None:
    harness = ready(side)
    masked = side == "mesh"
    ping = harness.factory.new(Ping, PingPayload())
    harness.send_raw(
        ws_frame(TEXT, encode_frame(ping), masked=masked)
        + ws_frame(CLOSE, _close_payload(1000), masked=masked)
    )
    wire = harness.read()
    assert wire.close_code == 1000 and wire.transport_closed
    assert wire.frames == []  # the pong would come after our close echo: it is not sent
    assert harness.closed_event().code == 1000


@pytest.mark.parametrize("side", SIDES)
def test_frames_after_our_close_are_ignored_until_the_peer_answers(side: str) -> None:
    harness = ready(side)
    harness._conn().close(1001, "going away", now=harness.clock.now)
    wire = harness.read()
    assert wire.close_code == 1001 and not wire.transport_closed  # waits for the reply
    harness.ping()
    assert harness.read().frames == []  # no pong after our close
    harness.send_raw(ws_frame(CLOSE, _close_payload(1001), masked=side == "mesh"))
    wire = harness.read()
    assert wire.transport_closed
    (closed,) = harness.events_of(ConnectionClosed)
    assert closed.code == 1001 and not closed.by_peer
    assert closed.retry is RetryDecision.FINAL  # we asked for it


@pytest.mark.parametrize("side", SIDES)
def test_binary_after_our_close_drops_the_transport_without_a_second_close(side: str) -> None:
    harness = ready(side)
    harness._conn().close(1000, "done", now=harness.clock.now)
    assert harness.read().close_code == 1000
    send_message(harness, b"\x00", BINARY)
    wire = harness.read()
    assert wire.transport_closed and not wire.close_seen
    (closed,) = harness.events_of(ConnectionClosed)
    assert closed.code == 1000  # the close we started is what is reported


@pytest.mark.parametrize("side", SIDES)
def test_eof_without_close_is_an_abnormal_end(side: str) -> None:
    harness = ready(side)
    harness._conn().receive_eof(harness.clock.now)
    wire = harness.read()
    assert wire.transport_closed and not wire.close_seen
    closed = harness.closed_event()
    assert closed.code is None and closed.by_peer
    expected = RetryDecision.RETRY if side == "agent" else RetryDecision.FINAL
    assert closed.retry is expected
    harness.send_raw(b"late bytes")  # ignored after the end
    assert harness.read().empty and len(harness.events_of(ConnectionClosed)) == 1


# -- inbound rate limit (error RATE_LIMITED, spec 3) ---------------------------------------------


def test_mesh_answers_a_request_flood_with_rate_limited_and_keeps_the_socket() -> None:
    config = Config(max_frames_per_second=2.0, frame_burst=2, rate_limit_retry_after=0.1)
    harness = ready("mesh", config)
    ids = [harness.ping() for _ in range(3)]
    wire = harness.read()
    assert wire.types == ["pong", "pong", "error"]
    error = wire.frames[2]
    assert isinstance(error, Error) and error.payload.code == "RATE_LIMITED"
    assert error.in_reply_to == ids[2]
    assert error.payload.detail == {"retry_after_ms": 500}  # one token refills in 0.5 s
    assert harness.mesh.stats.rate_limited == 1
    # replies are never limited: data would be lost
    dispatch_id = harness.mesh.send_dispatch("echo", deadline_ms=5000, now=harness.clock.now)
    harness.read()
    harness.send(harness.factory.new(
        DispatchResult, DispatchResultPayload(result=1), in_reply_to=dispatch_id))
    assert harness.events_of(DispatchCompleted)
    harness.at(harness.clock.now + 0.5)
    harness.read()
    harness.ping()
    assert harness.read().types == ["pong"]


def test_mesh_rate_limit_hint_is_at_least_the_configured_retry_after() -> None:
    config = Config(max_frames_per_second=1000.0, frame_burst=1, rate_limit_retry_after=2.0)
    harness = ready("mesh", config)
    harness.ping()
    harness.ping()
    error = harness.read().frames[1]
    assert isinstance(error, Error) and error.payload.detail == {"retry_after_ms": 2000}


def test_heartbeats_count_against_the_mesh_inbound_limit() -> None:
    harness = ready("mesh", Config(max_frames_per_second=1.0, frame_burst=1))
    harness.send(harness.factory.new(Heartbeat, HeartbeatPayload(active_sessions=1)))
    harness.send(harness.factory.new(Heartbeat, HeartbeatPayload(active_sessions=2)))
    assert len(harness.events_of(HeartbeatReceived)) == 1
    assert harness.read().types == ["error"]


def test_agent_answers_a_dispatch_flood_with_rate_limited_and_runs_nothing_extra() -> None:
    harness = ready("agent", Config(max_frames_per_second=1.0, frame_burst=1))
    first, second = harness.dispatch_frame(), harness.dispatch_frame()
    harness.send(first)
    harness.send(second)
    wire = harness.read()
    (error,) = wire.of(Error)
    assert error.payload.code == "RATE_LIMITED" and error.in_reply_to == second.id
    assert [e.dispatch_id for e in harness.events_of(DispatchReceived)] == [first.id]
    assert harness.agent.stats.rate_limited == 1


def test_an_error_frame_unrelated_to_any_dispatch_is_reported() -> None:
    harness = ready("mesh")
    harness.send(harness.factory.new(
        Error, ErrorPayload(code="NEW_CODE", message="future", detail={"k": 1})))
    (error,) = harness.events_of(ErrorReceived)
    assert (error.code, error.message, error.detail, error.in_reply_to) == (
        "NEW_CODE", "future", {"k": 1}, None)
    assert_still_open(harness)


def test_a_pong_to_an_app_ping_is_accepted_silently_both_ways() -> None:
    for side in SIDES:
        harness = ready(side)
        ping_id = harness._conn().send_ping()
        wire = harness.read()
        assert wire.types == ["ping"] and wire.frames[0].id == ping_id
        before = len(harness.events())
        harness.send(harness.factory.new(Pong, PingPayload(), in_reply_to=ping_id))
        assert harness.read().empty
        assert len(harness.events()) == before
