"""The optional C checks (`svantic_proto._speedups`) and the regex fallback agree.

Users without a compiler get the fallback, so both must give the same
answer on every string and frame; and the codec must work with either.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_codec import _case_bytes, any_frame  # tests/core is on sys.path

from svantic_proto import FrameError, codec
from svantic_proto import frames as f
from svantic_proto.codec import decode_frame

speedups = pytest.importorskip("svantic_proto._speedups")

VECTORS = json.loads((Path(__file__).parents[1] / "vectors" / "frames.json").read_text())["cases"]


def _mutations(pattern: str) -> st.SearchStrategy[str]:
    """Valid strings, and valid strings with one character changed, inserted or removed."""
    valid = st.from_regex(pattern, fullmatch=True)
    alphabet = st.sampled_from("0123456789abcdefABCDEF-:.+TtZz \n\u0660\u00e9")

    @st.composite
    def mutated(draw: st.DrawFn) -> str:
        text = draw(valid)
        where = draw(st.integers(0, len(text)))
        how = draw(st.sampled_from(["replace", "insert", "delete"]))
        char = draw(alphabet)
        if how == "insert":
            return text[:where] + char + text[where:]
        if how == "delete":
            return text[:where] + text[where + 1 :]
        return text[:where] + char + text[where + 1 :]

    return st.one_of(valid, mutated(), st.text(max_size=40))


def _regex(pattern: str) -> Any:
    return re.compile(pattern, re.ASCII).search  # as msgspec applies a Meta pattern


@settings(max_examples=600, deadline=None)
@given(_mutations(f.UUID_PATTERN))
def test_uuid_check_matches_the_pattern(text: str) -> None:
    assert speedups.is_uuid(text) == (_regex(f.UUID_PATTERN)(text) is not None)


@settings(max_examples=600, deadline=None)
@given(_mutations(f.TIMESTAMP_PATTERN))
def test_timestamp_check_matches_the_pattern(text: str) -> None:
    assert speedups.is_timestamp(text) == (_regex(f.TIMESTAMP_PATTERN)(text) is not None)


@settings(max_examples=300, deadline=None)
@given(_mutations(f.TRACE_ID_PATTERN), _mutations(f.SPAN_ID_PATTERN))
def test_hex_checks_match_the_patterns(trace: str, span: str) -> None:
    assert speedups.is_lower_hex(trace, 32) == (_regex(f.TRACE_ID_PATTERN)(trace) is not None)
    assert speedups.is_lower_hex(span, 16) == (_regex(f.SPAN_ID_PATTERN)(span) is not None)


@pytest.mark.parametrize(
    "ts",
    [
        "2026-11-21T23:59:60Z",
        "2026-11-21T10:00:00+23:59",
        "2026-11-21T10:00:00.5-00:00",
        "2026-00-21T10:00:00Z",
        "2026-11-32T10:00:00Z",
        "2026-11-21T24:00:00Z",
        "2026-11-21T10:00:00.Z",
        "2026-11-21T10:00:00.123",
        "2026-11-21T10:00:00+2400",
        "2026-11-21T10:00:00+24:00",
        "2026-11-21t10:00:00Z",
    ],
)
def test_timestamp_edges_agree(ts: str) -> None:
    assert speedups.is_timestamp(ts) == (_regex(f.TIMESTAMP_PATTERN)(ts) is not None)


def test_non_strings_are_not_valid() -> None:
    for value in (None, 1, b"01936f3e-5c4b-7a21-9f3e-2b1c0d4e5f60", ["x"]):
        assert not speedups.is_uuid(value)
        assert not speedups.is_timestamp(value)
        assert not speedups.is_lower_hex(value, 32)


def _set(frame: f.Frame, name: str, value: Any) -> f.Frame:
    """A copy of a frame with one field replaced, bypassing the constructor's checks."""
    import msgspec

    return msgspec.structs.replace(frame, **{name: value})


@settings(max_examples=300, deadline=None)
@given(any_frame(), st.data())
def test_frame_check_matches_the_fallback(frame: f.Frame, data: st.DataObject) -> None:
    field = data.draw(st.sampled_from(["id", "ts", "trace_id", "parent_span_id", "none"]))
    if field != "none":
        pattern = {
            "id": f.UUID_PATTERN,
            "ts": f.TIMESTAMP_PATTERN,
            "trace_id": f.TRACE_ID_PATTERN,
            "parent_span_id": f.SPAN_ID_PATTERN,
        }[field]
        frame = _set(frame, field, data.draw(_mutations(pattern)))
    assert speedups.frame_ok(frame) == codec._frame_ok_re(frame)


def test_payload_rules_match_the_fallback() -> None:
    good = codec.FrameFactory(lambda: 1_700_000_000.0).dispatch(capability="c", deadline_ms=5)
    other = _set(good, "payload", _set(good.payload, "dispatch_id", "x"))  # type: ignore[arg-type]
    cases: list[f.Frame] = [good, other]
    for vector in VECTORS:
        try:
            cases.append(decode_frame(_case_bytes(vector)))
        except FrameError:
            continue
    for frame in list(cases):
        if isinstance(frame, f.Cancel):
            cases.append(_set(frame, "payload", _set(frame.payload, "dispatch_id", "X" * 36)))
        if isinstance(frame, f.Welcome):
            payload = _set(frame.payload, "replayed_dispatches", ["A" * 36])
            cases.append(_set(frame, "payload", payload))
    for frame in cases:
        assert speedups.frame_ok(frame) == codec._frame_ok_re(frame), frame
    assert not speedups.frame_ok(other)


def test_frame_check_reads_fields_by_name_without_a_slot_layout() -> None:
    """A type whose fields are not slots (say, another msgspec's Structs) is still checked."""
    from types import SimpleNamespace

    good = codec.FrameFactory(lambda: 1_700_000_000.0).new(f.Ping, f.PingPayload())
    fields = {name: getattr(good, name) for name in ("id", "ts", "trace_id", "parent_span_id")}
    stand_in = SimpleNamespace(in_reply_to=None, payload=good.payload, **fields)
    assert speedups.frame_ok(stand_in) is True
    assert speedups.frame_ok(SimpleNamespace(**{**vars(stand_in), "ts": "yesterday"})) is False
    with pytest.raises(AttributeError):
        speedups.frame_ok(object())


@pytest.mark.parametrize("case", VECTORS, ids=lambda case: case["name"])
def test_vectors_pass_with_the_fallback(case: dict[str, Any], monkeypatch: Any) -> None:
    monkeypatch.setattr(codec, "_frame_ok", codec._frame_ok_re)
    fallback = _outcome(_case_bytes(case))
    monkeypatch.undo()
    assert _outcome(_case_bytes(case)) == fallback


def _outcome(text: bytes) -> tuple[Any, ...]:
    try:
        frame = decode_frame(text)
    except FrameError as exc:
        return ("error", exc.close_code, exc.frame_id)
    return ("ok", frame)


def test_codec_works_without_the_extension() -> None:
    """A user who installed without a compiler gets the same codec, on regexes."""
    program = (
        "import sys; sys.modules['svantic_proto._speedups'] = None\n"
        "from svantic_proto import codec, FrameError\n"
        "from svantic_proto.codec import decode_frame\n"
        "assert codec._frame_ok is codec._frame_ok_re\n"
        "text = sys.stdin.read()\n"
        "decode_frame(text)\n"
        "try:\n"
        "    decode_frame(text.replace('T10', 't10'))\n"
        "except FrameError as exc:\n"
        "    print(exc.close_code)\n"
    )
    ping = next(v["text"] for v in VECTORS if v["name"] == "ping")
    done = subprocess.run(
        [sys.executable, "-c", program],
        check=False,
        input=ping,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1002"


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300), st.binary(min_size=4, max_size=4), st.data())
def test_xor_mask_matches_the_fallback(data: bytes, key: bytes, draw: st.DataObject) -> None:
    from svantic_proto import framing

    start = draw.draw(st.integers(0, len(data)))
    stop = draw.draw(st.integers(start, len(data)))
    assert speedups.xor_mask(data, start, stop, key) == framing._xor_mask_py(data, start, stop, key)
    assert speedups.xor_mask(bytearray(data), start, stop, key) == bytes(
        framing._xor_mask_py(bytearray(data), start, stop, key)
    )


def test_xor_mask_refuses_bad_bounds() -> None:
    for args in ((b"abc", 0, 4, b"1234"), (b"abc", 2, 1, b"1234"), (b"abc", 0, 3, b"12")):
        with pytest.raises(ValueError):
            speedups.xor_mask(*args)
