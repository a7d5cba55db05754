"""The codec benchmark runs, and its baselines validate what the codec validates.

A baseline that accepted less (or more) than the spec would make the comparison
meaningless, so every validating baseline must reach the same outcome as the
conformance vectors, and as the codec itself, on every case of frames.json.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from svantic_proto.errors import FrameError

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_codec  # noqa: E402
from baselines import BASELINES, FLOOR  # noqa: E402

VECTORS = json.loads((Path(__file__).parent / "vectors" / "frames.json").read_text("utf-8"))
CASES = VECTORS["cases"]
OK_CASES = [case for case in CASES if case["outcome"] == "ok"]
VALIDATING = [baseline for baseline in BASELINES if baseline.validates]
OUTCOME_BY_CLOSE_CODE = {1002: "bad_frame_close", None: "bad_frame_keep", 1007: "close_1007"}
UUID = "01936f3e-5c4b-7a21-9f3e-2b1c0d4e5f60"


def message(case: dict[str, Any]) -> bytes:
    return case["text"].encode() if "text" in case else bytes.fromhex(case["hex"])


def outcome(decode: Callable[[bytes], Any], data: bytes) -> str:
    """The vectors' outcome name for what `decode` did; any other exception fails."""
    try:
        decode(data)
    except FrameError as exc:
        return OUTCOME_BY_CLOSE_CODE[exc.close_code]
    return "ok"


def case_id(case: dict[str, Any]) -> str:
    return str(case["name"])


# --- the harness ---------------------------------------------------------------------


def test_quick_run_times_every_candidate_for_every_frame_type(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert bench_codec.main(["--quick"]) == 0
    out = capsys.readouterr().out
    for frame_type in bench_codec.load_cases():
        assert f"### {frame_type} (" in out
    for baseline in BASELINES:
        assert f"| {baseline.name} |" in out
    assert "### Summary" in out
    assert "Not timed" not in out  # every candidate round-trips every message
    ours, _ = bench_codec.load_ours()
    if ours is not None:
        assert "| svantic_proto |" in out
        assert "### Stamping" in out


def test_check_exits_1_only_when_asked_and_a_target_is_missed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench_codec, "ROUNDTRIP_TARGET", 0.0)  # nothing can meet it
    args = ["--quick", "--repeats", "1", "--types", "ping"]
    assert bench_codec.main(args) == 0
    assert bench_codec.main([*args, "--check"]) == 1
    assert "Targets missed" in capsys.readouterr().out


def test_str_input_runs(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--quick", "--repeats", "1", "--types", "dispatch", "--input", "str"]
    assert bench_codec.main(args) == 0
    assert "input as str" in capsys.readouterr().out


def test_one_message_per_frame_type_and_a_1kb_dispatch() -> None:
    cases = bench_codec.load_cases()
    assert set(cases) == {case["type"] for case in OK_CASES}
    assert len(cases["dispatch"]) == bench_codec.DISPATCH_BYTES
    for baseline in VALIDATING:
        assert outcome(baseline.decode, cases["dispatch"]) == "ok"


# --- the baselines against the vectors and the codec ---------------------------------


@pytest.mark.parametrize("baseline", VALIDATING, ids=lambda b: b.name)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_baseline_reaches_the_vector_outcome(baseline: Any, case: dict[str, Any]) -> None:
    assert outcome(baseline.decode, message(case)) == case["outcome"]


@pytest.mark.parametrize("baseline", VALIDATING, ids=lambda b: b.name)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_baseline_agrees_with_the_codec(baseline: Any, case: dict[str, Any]) -> None:
    ours, why = bench_codec.load_ours()
    if ours is None:
        pytest.skip(why)
    data = message(case)
    assert outcome(baseline.decode, data) == outcome(ours.decode, data)


@pytest.mark.parametrize("baseline", VALIDATING, ids=lambda b: b.name)
@pytest.mark.parametrize(
    "case", [c for c in CASES if c["outcome"] == "bad_frame_keep"], ids=case_id
)
def test_unknown_type_reports_the_frame_id(baseline: Any, case: dict[str, Any]) -> None:
    with pytest.raises(FrameError) as caught:
        baseline.decode(message(case))
    assert caught.value.frame_id == json.loads(case["text"])["id"]


@pytest.mark.parametrize("baseline", [*VALIDATING, FLOOR], ids=lambda b: b.name)
@pytest.mark.parametrize("case", OK_CASES, ids=case_id)
def test_encode_output_decodes_to_the_same_frame(baseline: Any, case: dict[str, Any]) -> None:
    frame = baseline.decode(message(case))
    again = baseline.decode(baseline.encode(frame))
    assert again == frame


def _frame(**changes: Any) -> bytes:
    frame: dict[str, Any] = {
        "v": 1,
        "type": "ping",
        "id": UUID,
        "ts": "2026-11-21T10:00:00.123Z",
        "payload": {},
    }
    frame.update(changes)
    return json.dumps(frame, ensure_ascii=False).encode()


def _heartbeat(**payload: Any) -> bytes:
    return _frame(type="heartbeat", payload={"active_sessions": 1, **payload})


# Rules of spec section 2 the vectors leave out; each one is easy to get wrong.
SPEC_EDGE_CASES: dict[str, tuple[bytes, str]] = {
    "id with a trailing newline": (_frame(id=UUID + "\n"), "bad_frame_close"),
    "ts with a trailing newline": (_frame(ts="2026-11-21T10:00:00Z\n"), "bad_frame_close"),
    "ts in non-ASCII digits": (_frame(ts="٢٠٢٦-11-21T10:00:00Z"), "bad_frame_close"),
    "ts with a space for T": (_frame(ts="2026-11-21 10:00:00Z"), "bad_frame_close"),
    "ts month 13": (_frame(ts="2026-13-21T10:00:00Z"), "bad_frame_close"),
    "ts negative offset": (_frame(ts="2026-11-21T05:00:00-05:00"), "ok"),
    "trace_id uppercase": (_frame(trace_id="4BF92F3577B34DA6A3CE929D0E0E4736"), "bad_frame_close"),
    "v is 1.0": (_frame(v=1.0), "bad_frame_close"),
    "integer written 1e3": (
        _heartbeat().replace(b'"active_sessions": 1', b'"active_sessions": 1e3'),
        "bad_frame_close",
    ),
    "integer given a boolean": (_heartbeat(active_sessions=True), "bad_frame_close"),
    "integer given a string": (_heartbeat(active_sessions="1"), "bad_frame_close"),
    "float given a boolean": (_heartbeat(load=True), "bad_frame_close"),
    "float given NaN": (_heartbeat().replace(b"}}", b', "load": NaN}}'), "bad_frame_close"),
    "float given an integer": (_heartbeat(load=1), "ok"),
    "unknown type with an invalid id": (_frame(type="subscribe", id="nope"), "bad_frame_close"),
    "unknown type with a list payload": (_frame(type="subscribe", payload=[]), "bad_frame_close"),
    "tool_result error is null": (
        _frame(type="tool_result", in_reply_to=UUID, payload={"error": None}),
        "bad_frame_close",
    ),
    "dispatch_auth token not a string": (
        _frame(
            type="dispatch",
            payload={
                "dispatch_id": UUID,
                "capability": "c",
                "deadline_ms": 5,
                "dispatch_auth": {"type": "svantic_jwt", "token": 5},
            },
        ),
        "bad_frame_close",
    ),
    "JSON text that is not UTF-8 inside a string": (b'{"v":1,"x":"\xc3\x28"}', "close_1007"),
}


@pytest.mark.parametrize("baseline", VALIDATING, ids=lambda b: b.name)
@pytest.mark.parametrize("name", list(SPEC_EDGE_CASES))
def test_baseline_applies_spec_rules_the_vectors_leave_out(baseline: Any, name: str) -> None:
    data, expected = SPEC_EDGE_CASES[name]
    assert outcome(baseline.decode, data) == expected
