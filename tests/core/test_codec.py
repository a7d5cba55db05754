"""The frame codec against the spec's conformance vectors and hypothesis."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from svantic_proto import FrameError, LocalProtocolError
from svantic_proto import frames as f
from svantic_proto.codec import FrameFactory, decode_frame, encode_frame
from svantic_proto.frames import FRAME_TYPES, Dispatch

VECTORS = json.loads((Path(__file__).parents[1] / "vectors" / "frames.json").read_text())
OUTCOME_BY_CLOSE_CODE = {1002: "bad_frame_close", None: "bad_frame_keep", 1007: "close_1007"}
FRAME_ID = "01936f3e-5c4b-7a21-9f3e-2b1c0d4e5f60"


def _case_bytes(case: dict[str, Any]) -> bytes:
    return bytes.fromhex(case["hex"]) if "hex" in case else case["text"].encode()


@pytest.mark.parametrize("case", VECTORS["cases"], ids=[c["name"] for c in VECTORS["cases"]])
def test_conformance_vector(case: dict[str, Any]) -> None:
    data = _case_bytes(case)
    if case["outcome"] == "ok":
        frame = decode_frame(data)
        assert frame.type == case["type"]
        assert decode_frame(encode_frame(frame)) == frame
        assert decode_frame(data.decode()) == frame  # str input is the same as bytes
        return
    with pytest.raises(FrameError) as info:
        decode_frame(data)
    assert OUTCOME_BY_CLOSE_CODE[info.value.close_code] == case["outcome"]
    assert info.value.code == "BAD_FRAME"
    if case["outcome"] == "bad_frame_keep":
        assert info.value.frame_id == json.loads(data)["id"]


def test_error_names_the_field_and_the_expectation() -> None:
    data = VECTORS["cases"][0]["text"].replace('"navigator-prod-01"', "7")
    with pytest.raises(FrameError) as info:
        decode_frame(data)
    assert "payload.instance_id" in str(info.value)
    assert "str" in str(info.value)
    assert info.value.frame_id == FRAME_ID


def test_id_is_reported_for_reply_when_readable() -> None:
    text = f'{{"v":2,"type":"ping","id":"{FRAME_ID}","ts":"x","payload":{{}}}}'
    with pytest.raises(FrameError) as info:
        decode_frame(text)
    assert info.value.frame_id == FRAME_ID and info.value.close_code == 1002


def test_id_is_not_reported_when_not_canonical() -> None:
    with pytest.raises(FrameError) as info:
        decode_frame('{"v":1,"type":"ping","id":"ABC","ts":"x","payload":{}}')
    assert info.value.frame_id is None


def test_invalid_utf8_in_an_ignored_field_is_still_1007() -> None:
    text = (
        f'{{"v":1,"type":"ping","id":"{FRAME_ID}","ts":"2026-11-21T10:00:00Z",'
        '"payload":{},"x":"'
    ).encode() + b'\xff"}'
    with pytest.raises(FrameError) as info:
        decode_frame(text)
    assert info.value.close_code == 1007


def test_deep_nesting_is_bad_frame_not_recursion_error() -> None:
    def nested(depth: int) -> str:
        return (
            f'{{"v":1,"type":"dispatch_result","id":"{FRAME_ID}","ts":"2026-11-21T10:00:00Z",'
            f'"in_reply_to":"{FRAME_ID}","payload":{{"result":' + "[" * depth + "]" * depth + "}}"
        )

    assert decode_frame(nested(300)).type == "dispatch_result"
    for depth in (5000, 100_000):
        with pytest.raises(FrameError) as info:
            decode_frame(nested(depth))
        assert info.value.close_code == 1002
        with pytest.raises(FrameError):
            decode_frame(nested(depth)[:-5])  # not even JSON: still no RecursionError


def test_duplicate_keys_last_wins_consistently() -> None:
    """The frame acted on and the id replied to come from the same (last) occurrence."""
    other = "01936f3e-5c4b-7a21-9f3e-2b1c0d4e5f69"
    text = (
        f'{{"v":1,"type":"ping","id":"{FRAME_ID}","id":"{other}",'
        '"ts":"2026-11-21T10:00:00Z","payload":{}}'
    )
    assert decode_frame(text).id == other
    bad = text.replace('"payload":{}', '"payload":[]')
    with pytest.raises(FrameError) as info:
        decode_frame(bad)
    assert info.value.frame_id == other == msgspec.json.decode(bad)["id"]


def test_duplicate_type_with_different_values_is_rejected() -> None:
    text = (
        f'{{"v":1,"type":"ping","id":"{FRAME_ID}","ts":"2026-11-21T10:00:00Z",'
        '"payload":{},"type":"pong"}'
    )
    with pytest.raises(FrameError):
        decode_frame(text)


@pytest.mark.parametrize(
    "ts",
    [
        "2026-13-01T00:00:00Z",
        "2026-11-21T24:00:00Z",
        "2026-11-21t10:00:00z",
        "2026-11-21 10:00:00Z",
        "2026-11-21T10:00:00+0100",
        "2026-11-21T10:00Z",
        "2026-11-21T10:00:00.Z",
    ],
)
def test_timestamps_outside_the_profile_are_rejected(ts: str) -> None:
    with pytest.raises(FrameError):
        decode_frame(f'{{"v":1,"type":"ping","id":"{FRAME_ID}","ts":"{ts}","payload":{{}}}}')


@pytest.mark.parametrize("value", ["1.0", "1e3", "true", '"1"', "1.5"])
def test_integer_fields_reject_non_integers(value: str) -> None:
    text = (
        f'{{"v":1,"type":"heartbeat","id":"{FRAME_ID}","ts":"2026-11-21T10:00:00Z",'
        f'"payload":{{"active_sessions":{value}}}}}'
    )
    with pytest.raises(FrameError):
        decode_frame(text)


def test_non_text_input_is_a_frame_error() -> None:
    with pytest.raises(FrameError):
        decode_frame(123)  # type: ignore[arg-type]


def test_mtls_auth_parses_so_the_agent_can_refuse_it() -> None:
    factory = FrameFactory(lambda: 1_795_000_000.0)
    frame = factory.dispatch(capability="c", deadline_ms=5, dispatch_auth=f.MtlsAuth())
    assert decode_frame(encode_frame(frame)).payload.dispatch_auth == f.MtlsAuth()


def test_shared_secret_is_not_in_repr() -> None:
    assert "hunter2" not in repr(f.SharedSecretAuth(secret="hunter2"))


# --- factory --------------------------------------------------------------------------------


def test_factory_stamps_valid_envelopes() -> None:
    factory = FrameFactory(lambda: 1_795_000_000.123)
    ping = factory.new(f.Ping, f.PingPayload())
    pong = factory.new(f.Pong, f.PongPayload(), in_reply_to=ping.id)
    assert ping.ts == "2026-11-18T11:06:40.123Z"
    assert decode_frame(encode_frame(pong)).in_reply_to == ping.id
    assert ping.id != pong.id and ping.id < pong.id


def test_factory_dispatch_ids_agree_and_redelivery_keeps_the_id() -> None:
    factory = FrameFactory(lambda: 1_795_000_000.0)
    first = factory.dispatch(capability="get_ticket", deadline_ms=1000, arguments={"a": 1})
    assert first.id == first.payload.dispatch_id
    again = factory.dispatch(
        capability="get_ticket", deadline_ms=1000, dispatch_id=first.id, attempt=2
    )
    assert again.id == first.id and again.payload.attempt == 2
    assert isinstance(decode_frame(encode_frame(again)), Dispatch)


@pytest.mark.parametrize("deadline", [0, -1, 1.5, True])
def test_factory_refuses_bad_deadline(deadline: Any) -> None:
    with pytest.raises(LocalProtocolError):
        FrameFactory(lambda: 0.0).dispatch(capability="c", deadline_ms=deadline)


def test_encode_refuses_unserializable_values() -> None:
    factory = FrameFactory(lambda: 0.0)
    frame = factory.new(
        f.DispatchResult, f.DispatchResultPayload(result=object()), in_reply_to=FRAME_ID
    )
    with pytest.raises(LocalProtocolError):
        encode_frame(frame)


# --- hypothesis -------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=10,
)
json_objects = st.dictionaries(st.text(max_size=6), json_values, max_size=3)
uuids = st.uuids().map(str)
short = st.text(min_size=1, max_size=10)
counts = st.integers(0, 2**31)


def _payloads() -> dict[str, st.SearchStrategy[Any]]:
    return {
        "hello": st.builds(
            f.HelloPayload,
            instance_id=short,
            agent_type=st.none() | short,
            resume_token=st.none() | short,
            sdk=st.none() | st.builds(f.Sdk, name=short, version=short),
            capabilities=st.none() | st.lists(short, max_size=3),
        ),
        "welcome": st.builds(
            f.WelcomePayload,
            connection_id=short,
            resumed=st.booleans(),
            replayed_dispatches=st.lists(uuids, max_size=3),
            resume_token=short,
            heartbeat_interval_ms=st.integers(1, 10**9),
            max_message_bytes=st.none() | st.integers(1, 10**9),
        ),
        "dispatch_ack": st.just(f.DispatchAckPayload()),
        "dispatch_chunk": st.builds(f.DispatchChunkPayload, seq=counts, data=json_values),
        "dispatch_result": st.builds(f.DispatchResultPayload, result=json_values),
        "tool_call": st.builds(
            f.ToolCallPayload,
            tool=short,
            arguments=json_objects,
            deadline_ms=st.none() | st.integers(1, 10**9),
            agent_type=st.none() | short,
        ),
        "tool_result": st.builds(f.ToolResultPayload, result=json_values)
        | st.builds(
            f.ToolResultPayload, error=st.builds(f.ToolError, code=short, message=st.text())
        ),
        "heartbeat": st.builds(
            f.HeartbeatPayload,
            active_sessions=counts,
            status=st.sampled_from([None, "available", "busy", "offline"]),
            max_concurrent_sessions=st.none() | counts,
            in_flight=st.none() | counts,
            load=st.none() | st.floats(0, 1),
            health=st.none() | json_objects,
        ),
        "ping": st.just(f.PingPayload()),
        "pong": st.just(f.PongPayload()),
        "error": st.builds(
            f.ErrorPayload,
            code=short,
            message=st.none() | st.text(),
            detail=st.none() | json_objects,
        ),
        "close_request": st.builds(
            f.CloseRequestPayload, grace_seconds=counts, reason=st.none() | st.text()
        ),
        "cancel": st.builds(f.CancelPayload, dispatch_id=uuids, reason=st.text()),
        "token_refresh": st.builds(f.TokenRefreshPayload, token=short),
    }


PAYLOADS = _payloads()


@st.composite
def any_frame(draw: st.DrawFn) -> f.Frame:
    clock = draw(st.floats(0, 4_000_000_000))
    factory = FrameFactory(lambda: clock)
    kind = draw(st.sampled_from(sorted(FRAME_TYPES)))
    if kind == "dispatch":
        auth = draw(
            st.none()
            | st.builds(f.SvanticJwtAuth, token=st.text())
            | st.builds(f.SharedSecretAuth, secret=st.text())
        )
        return factory.dispatch(
            capability=draw(short),
            deadline_ms=draw(st.integers(1, 10**9)),
            arguments=draw(json_objects),
            attempt=draw(st.integers(1, 100)),
            dispatch_auth=auth,
        )
    reply = draw(uuids) if kind in f.REPLY_TYPES or kind in ("welcome", "error") else None
    trace = draw(st.none() | st.text("0123456789abcdef", min_size=32, max_size=32))
    return factory.new(FRAME_TYPES[kind], draw(PAYLOADS[kind]), in_reply_to=reply, trace_id=trace)


def test_every_frame_type_has_a_strategy() -> None:
    assert set(PAYLOADS) | {"dispatch"} == set(FRAME_TYPES)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(any_frame())
def test_encode_then_decode_is_identity(frame: f.Frame) -> None:
    assert decode_frame(encode_frame(frame)) == frame


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_yield_a_frame_or_frame_error(data: bytes) -> None:
    try:
        decode_frame(data)
    except FrameError as exc:
        assert exc.close_code in (1002, 1007, None)


@settings(max_examples=500, deadline=None)
@given(json_values)
def test_any_json_document_yields_a_frame_or_frame_error(value: Any) -> None:
    try:
        decode_frame(json.dumps(value))
    except FrameError as exc:
        assert exc.close_code in (1002, None)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(any_frame(), st.data())
def test_mutated_frames_yield_a_frame_or_frame_error(frame: f.Frame, data: st.DataObject) -> None:
    """Valid frames with one field replaced by an arbitrary JSON value."""
    document = msgspec.json.decode(encode_frame(frame))
    target = document if data.draw(st.booleans()) else document["payload"]
    if target:
        key = data.draw(st.sampled_from(sorted(target)))
        target[key] = data.draw(json_values)
    try:
        decode_frame(msgspec.json.encode(document))
    except FrameError as exc:
        assert exc.close_code in (1002, None)
