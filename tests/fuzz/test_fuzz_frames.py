"""Fuzz target: the frame decoder and a connection's receive path (spec 2 and 4).

Inputs are valid frames from the conformance vectors, mutated the way a broken or hostile peer
would: a field dropped, a value of another type, an unknown field, a deep nesting, a cut or a
flipped byte. The oracle is the spec's receiver table: `decode_frame` either returns a frame
that satisfies every envelope rule (and re-encodes to the same frame) or raises `FrameError`
with one of the three documented outcomes; a connection fed the same messages, cut anywhere,
either keeps going or ends once with the code the decoder named.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

import msgspec
from fuzz_settings import FUZZ
from hypothesis import given
from hypothesis import strategies as st

from svantic_proto import events as ev
from svantic_proto.codec import decode_frame, encode_frame
from svantic_proto.config import Config
from svantic_proto.connection import CLOSE_TRANSPORT
from svantic_proto.errors import FrameError
from svantic_proto.testing import Pair

VECTORS = json.loads(
    (Path(__file__).parent.parent / "vectors" / "frames.json").read_text(encoding="utf-8")
)
SEEDS = [case["text"] for case in VECTORS["cases"] if case["outcome"] == "ok"]
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
LIMIT = Config().max_message_bytes

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
FIELD_NAMES = ["v", "type", "id", "ts", "in_reply_to", "trace_id", "parent_span_id", "payload",
               "dispatch_id", "capability", "deadline_ms", "arguments", "dispatch_auth", "seq",
               "token", "instance_id", "result", "code", "grace_seconds", "load", "status"]


NEST = "\u0000nest:"
"""A placeholder for a deep nesting, spliced into the text after `json.dumps` (which
would recurse as deep as the nesting)."""


def _nest(depth: int) -> str:
    return f"{NEST}{depth}"


def _splice_nesting(text: str) -> str:
    def deep(match: re.Match[str]) -> str:
        depth = int(match.group(1))
        return "[" * depth + "{}" + "]" * depth

    return re.sub(r'"\\u0000nest:(\d+)"', deep, text)


@st.composite
def mutated_object(draw: st.DrawFn) -> Any:
    """A seed frame as JSON, with a few structural mutations."""
    obj = json.loads(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 4))):
        target = obj
        if isinstance(obj.get("payload"), dict) and draw(st.booleans()):
            target = obj["payload"]
        op = draw(st.sampled_from(["drop", "retype", "add", "nest", "type", "bool_v"]))
        keys = list(target)
        if op == "drop" and keys:
            target.pop(draw(st.sampled_from(keys)))
        elif op == "retype" and keys:
            target[draw(st.sampled_from(keys))] = draw(json_values)
        elif op == "add":
            target[draw(st.sampled_from(FIELD_NAMES) | st.text(max_size=8))] = draw(json_values)
        elif op == "nest" and keys:
            target[draw(st.sampled_from(keys))] = _nest(draw(st.integers(1, 3000)))
        elif op == "type":
            obj["type"] = draw(st.sampled_from(["hello", "dispatch", "dispatch_result", "ping",
                                                "pong", "error", "cancel", "welcome",
                                                "token_refresh", "", "x" * 300]))
        elif op == "bool_v":
            obj["v"] = draw(st.sampled_from([True, "1", 1.0, 2, 0, None]))
    return obj


@st.composite
def mutated_message(draw: st.DrawFn) -> bytes:
    obj = draw(mutated_object())
    text = _splice_nesting(json.dumps(obj, ensure_ascii=draw(st.booleans()),
                                      separators=(",", ":")))
    data = bytearray(text.encode("utf-8", "surrogatepass"))
    for _ in range(draw(st.integers(0, 2)) if draw(st.integers(0, 3)) == 0 else 0):
        op = draw(st.sampled_from(["flip", "cut", "insert"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[at:]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
    return bytes(data)


def _meets_envelope_rules(text: bytes) -> bool:
    """What spec 2 requires of every frame, checked independently of the decoder."""
    try:
        obj = json.loads(text)
    except RecursionError:  # deeper than Python's parser goes: msgspec refuses it too
        return False
    return (
        isinstance(obj, dict)
        and type(obj.get("v")) is int and obj["v"] == 1
        and isinstance(obj.get("type"), str) and obj["type"] != ""
        and isinstance(obj.get("id"), str) and UUID.fullmatch(obj["id"]) is not None
        and isinstance(obj.get("payload"), dict)
    )


@FUZZ
@given(message=mutated_message())
def test_decode_frame_returns_a_valid_frame_or_a_documented_refusal(message: bytes) -> None:
    try:
        frame = decode_frame(message)
    except FrameError as refusal:
        assert refusal.close_code in (None, 1002, 1007), refusal.close_code
        if refusal.close_code is None:  # "unknown type": only for a valid envelope
            assert _meets_envelope_rules(message)
        if refusal.frame_id is not None:
            assert UUID.fullmatch(refusal.frame_id)
        return
    assert _meets_envelope_rules(message)
    again = decode_frame(encode_frame(frame))
    assert again == frame


@FUZZ
@given(message=st.binary(max_size=300) | st.text(max_size=200))
def test_decode_frame_on_arbitrary_input_only_raises_frame_error(message: bytes | str) -> None:
    try:
        decode_frame(message)
    except FrameError as refusal:
        assert refusal.close_code in (None, 1002, 1007)


def _masked_text(payload: bytes, mask: bytes) -> bytes:
    size = len(payload)
    if size < 126:
        header = bytes([0x81, 0x80 | size])
    elif size < 1 << 16:
        header = bytes([0x81, 0x80 | 126]) + size.to_bytes(2, "big")
    else:
        header = bytes([0x81, 0x80 | 127]) + size.to_bytes(8, "big")
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


@FUZZ
@given(data=st.data())
def test_the_mesh_receive_path_ends_as_the_decoder_says(data: st.DataObject) -> None:
    pair = Pair()
    pair.connect()
    pair.mesh_events.clear()
    mesh = pair.mesh
    messages = data.draw(st.lists(mutated_message(), min_size=1, max_size=4))
    mask = data.draw(st.binary(min_size=4, max_size=4))
    stream = b"".join(_masked_text(m, mask) for m in messages)
    cuts = sorted(set(data.draw(st.lists(st.integers(1, max(1, len(stream) - 1)),
                                         max_size=5))))
    events: list[ev.Event] = []
    output: list[bytes] = []
    now = pair.clock.now
    for begin, end in itertools.pairwise([0, *cuts, len(stream)]):
        mesh.receive_data(stream[begin:end], now)
        events += mesh.events_received()
        output += mesh.data_to_send()
    ends = [e for e in events if isinstance(e, ev.ConnectionClosed)]
    assert len(ends) <= 1
    try:
        decode_frame(messages[0])
        first_code: int | None = None
    except FrameError as refusal:
        first_code = refusal.close_code
    if first_code in (1002, 1007):
        # The first message already ends the connection with the decoder's code.
        assert ends and ends[0].code == first_code and not ends[0].by_peer
    if ends:
        assert events[-1] is ends[0]
        assert ends[0].code in (1002, 1007, 1009) or ends[0].by_peer
        assert output and output[-1] == CLOSE_TRANSPORT
    else:
        assert CLOSE_TRANSPORT not in output
    # Whatever it answered, the agent reads without failing the connection.
    agent = pair.agent
    for chunk in output:
        if chunk == CLOSE_TRANSPORT:
            agent.receive_eof(now)
        else:
            agent.receive_data(chunk, now)
    for event in agent.events_received():
        if isinstance(event, ev.ConnectionClosed):
            assert event.by_peer
    # Error frames carry the spec's code and never echo more than a bounded message.
    for chunk in output:
        assert len(chunk) <= LIMIT + 16


def test_seeds_are_valid_frames() -> None:
    """The mutations start from frames the decoder accepts."""
    assert len(SEEDS) >= 10
    for text in SEEDS:
        decode_frame(text.encode())
    assert msgspec.json.decode(SEEDS[0].encode())["v"] == 1
