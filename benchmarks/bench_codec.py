"""Frame codec benchmark: svantic_proto against three baselines, in one run.

    python benchmarks/bench_codec.py            # full run, markdown tables on stdout
    python benchmarks/bench_codec.py --quick    # seconds; figures are only a smoke test
    python benchmarks/bench_codec.py --check    # exit 1 when a target is missed

For one representative message per frame type (the longest `ok` case of
tests/vectors/frames.json for that type; for `dispatch`, the full dispatch padded
to 1,024 bytes) it times decode, encode (of the decoded object) and the two in a
row, for the codec (`svantic_proto.decode_frame` / `encode_frame`) and for:

1. the floor: bare `msgspec.json.decode` / `msgspec.json.encode` to dicts, no validation;
2. stdlib `json` with the spec's rules hand-written in Python;
3. pydantic v2, a discriminated union on `type`.

Targets: the codec's decode+encode within 1.25x of the floor for every type (that
is, validation costs at most a quarter), and stamping a new frame's id and ts in at
most 1 µs. The machine's speed drifts, so every repeat runs all candidates of a
type back to back in a shuffled order, ratios are taken within a repeat, and
medians are reported. Figures are reported, not asserted: the exit status is 0
unless `--check` is given.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
import timeit
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
VECTORS = HERE.parent / "tests" / "vectors" / "frames.json"
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import msgspec  # noqa: E402
import pydantic  # noqa: E402
from baselines import BASELINES, FLOOR  # noqa: E402

ROUNDTRIP_TARGET = 1.25
"""The codec's decode+encode may cost at most this multiple of the floor's."""
STAMP_TARGET_US = 1.0
"""Stamping a new frame's id and ts may cost at most this many microseconds."""
DISPATCH_BYTES = 1024
"""Size the representative dispatch is padded to (spec section 3: a typical dispatch)."""

OPS = ("decode", "encode", "roundtrip")
OURS_NAME = "svantic_proto"
STAMP_CASE = "(stamp id+ts)"


@dataclass(frozen=True)
class Candidate:
    """A codec under test: `decode(bytes | str)` and `encode(decoded) -> bytes`."""

    name: str
    decode: Callable[[Any], Any]
    encode: Callable[[Any], bytes]


@dataclass
class Settings:
    repeats: int
    seconds_per_measurement: float
    fixed_loops: int | None  # skip calibration (the smoke test)
    input_kind: str
    only_types: frozenset[str] | None
    seed: int


@dataclass
class Results:
    """Seconds per call, one entry per repeat, keyed by (case, candidate, op)."""

    per_call: dict[tuple[str, str, str], list[float]] = field(default_factory=dict)

    def add(self, key: tuple[str, str, str], seconds: float) -> None:
        self.per_call.setdefault(key, []).append(seconds)

    def median_us(self, key: tuple[str, str, str]) -> float:
        return statistics.median(self.per_call[key]) * 1e6

    def median_ratio(self, key: tuple[str, str, str], base: tuple[str, str, str]) -> float:
        """Median of per-repeat ratios: each pair was measured moments apart."""
        pairs = zip(self.per_call[key], self.per_call[base], strict=True)
        return statistics.median(value / reference for value, reference in pairs)


# --- what we measure ---------------------------------------------------------------


def load_ours() -> tuple[Candidate | None, str]:
    """The codec under test, or None and why (it may not be written yet)."""
    try:
        import svantic_proto
    except ImportError as exc:
        return None, f"svantic_proto does not import: {exc}"
    decode = getattr(svantic_proto, "decode_frame", None)
    encode = getattr(svantic_proto, "encode_frame", None)
    source = "svantic_proto"
    if decode is None or encode is None:
        try:
            from svantic_proto import codec
        except ImportError as exc:
            return None, (
                "svantic_proto.decode_frame / encode_frame do not exist yet "
                f"(and svantic_proto.codec does not import: {exc}); "
                "timing the baselines only"
            )
        decode, encode, source = codec.decode_frame, codec.encode_frame, "svantic_proto.codec"
    return Candidate(OURS_NAME, decode, encode), source


def load_stamp() -> tuple[Callable[[], tuple[str, str]] | None, str]:
    """The cheapest public way to stamp a new frame's (id, ts): `IdFactory.stamp`, one
    clock read for both (`FrameFactory.new` calls it, then builds the Struct)."""
    try:
        from svantic_proto.ids import IdFactory
    except ImportError as exc:
        return None, f"svantic_proto.ids.IdFactory is not available: {exc}"
    return IdFactory(time.time).stamp, "IdFactory(time.time).stamp()"


def stdlib_stamp() -> tuple[str, str]:
    """What a hand-rolled stamp costs, for context: uuid4 plus an ISO timestamp."""
    return str(uuid.uuid4()), datetime.now(UTC).isoformat()


def load_cases(only_types: frozenset[str] | None = None) -> dict[str, bytes]:
    """One representative `ok` message per frame type, as the bytes of a text message."""
    vectors = json.loads(VECTORS.read_text(encoding="utf-8"))
    longest: dict[str, str] = {}
    for case in vectors["cases"]:
        if case["outcome"] != "ok":
            continue
        frame_type, text = case["type"], case["text"]
        if len(text) > len(longest.get(frame_type, "")):
            longest[frame_type] = text
    cases = {frame_type: text.encode() for frame_type, text in longest.items()}
    cases["dispatch"] = padded_dispatch(longest["dispatch"])
    if only_types is not None:
        unknown = only_types - cases.keys()
        if unknown:
            raise SystemExit(f"no ok vector for type(s): {', '.join(sorted(unknown))}")
        cases = {name: data for name, data in cases.items() if name in only_types}
    return cases


def padded_dispatch(full_dispatch: str, size: int = DISPATCH_BYTES) -> bytes:
    """The full dispatch vector with realistic arguments, padded to exactly `size` bytes."""
    frame = json.loads(full_dispatch)
    frame["payload"]["arguments"] = {
        "ticket_id": "T-1",
        "fields": ["status", "priority", "assignee", "labels", "updated_at"],
        "include_history": True,
        "limit": 50,
        "query": {"project": "OPS", "updated_after": "2026-11-01T00:00:00Z", "open": True},
        "comment": "",
    }
    missing = size - len(msgspec.json.encode(frame))
    if missing < 0:
        raise ValueError(f"dispatch is already {size - missing} bytes, over {size}")
    frame["payload"]["arguments"]["comment"] = ("lorem ipsum dolor sit amet " * 64)[:missing]
    data = msgspec.json.encode(frame)
    if len(data) != size:
        raise ValueError(f"padded dispatch is {len(data)} bytes, not {size}")
    return data


def candidates(ours: Candidate | None) -> list[Candidate]:
    found = [] if ours is None else [ours]
    found.extend(Candidate(b.name, b.decode, b.encode) for b in BASELINES)
    return found


def check_decodes(cands: Sequence[Candidate], cases: dict[str, Any]) -> list[tuple[str, str]]:
    """Each candidate must accept every message and re-read its own output: a
    benchmark of an error path, or of an encoder that loses data, would be a lie.
    Returns (candidate name, problem) pairs."""
    problems = []
    for case, data in cases.items():
        for cand in cands:
            try:
                cand.decode(cand.encode(cand.decode(data)))
            except Exception as exc:
                problems.append((cand.name, f"cannot round-trip the {case} message: {exc!r}"))
    return problems


# --- timing ------------------------------------------------------------------------


def make_timers(
    cands: Sequence[Candidate],
    cases: dict[str, Any],
    stamps: Sequence[tuple[str, Callable[[], Any]]],
) -> dict[tuple[str, str, str], timeit.Timer]:
    """One timeit.Timer per (case, candidate, op). Statements are inlined so only the
    call being measured (plus timeit's loop) is timed."""
    timers: dict[tuple[str, str, str], timeit.Timer] = {}
    for case, data in cases.items():
        for cand in cands:
            env = {
                "decode": cand.decode,
                "encode": cand.encode,
                "data": data,
                "frame": cand.decode(data),
            }
            timers[(case, cand.name, "decode")] = timeit.Timer("decode(data)", globals=env)
            timers[(case, cand.name, "encode")] = timeit.Timer("encode(frame)", globals=env)
            timers[(case, cand.name, "roundtrip")] = timeit.Timer(
                "encode(decode(data))", globals=env
            )
    for name, stamp in stamps:
        timers[(STAMP_CASE, name, "stamp")] = timeit.Timer("stamp()", globals={"stamp": stamp})
    return timers


def calibrate(timer: timeit.Timer, seconds: float) -> int:
    """Loops so that one measurement takes about `seconds`."""
    loops = 1
    while True:
        elapsed = timer.timeit(loops)
        if elapsed >= seconds / 10 or loops >= 10**7:
            return max(1, round(loops * seconds / max(elapsed, 1e-9)))
        loops *= 10


def run(timers: dict[tuple[str, str, str], timeit.Timer], settings: Settings) -> Results:
    """Repeat every measurement; within a repeat, the measurements of one case run back
    to back in a fresh random order, so drift hits every candidate alike."""
    if settings.fixed_loops is not None:
        loops = dict.fromkeys(timers, settings.fixed_loops)
    else:
        loops = {
            key: calibrate(timer, settings.seconds_per_measurement) for key, timer in timers.items()
        }
    by_case: dict[str, list[tuple[str, str, str]]] = {}
    for key in timers:
        by_case.setdefault(key[0], []).append(key)
    rng = random.Random(settings.seed)
    results = Results()
    for _ in range(settings.repeats):
        case_order = list(by_case)
        rng.shuffle(case_order)
        for case in case_order:
            keys = by_case[case][:]
            rng.shuffle(keys)
            for key in keys:
                results.add(key, timers[key].timeit(loops[key]) / loops[key])
    return results


# --- report ------------------------------------------------------------------------


def report(
    results: Results,
    cands: Sequence[Candidate],
    cases: dict[str, Any],
    stamp_names: Sequence[str],
    ours_available: bool,
) -> list[str]:
    """Print the tables; return the targets missed."""
    missed: list[str] = []
    summary: list[str] = []

    def vs_floor(case: str, name: str) -> float:
        return results.median_ratio((case, name, "roundtrip"), (case, FLOOR.name, "roundtrip"))

    for case, data in cases.items():
        print(f"\n### {case} ({len(data)} B)\n")
        print("| codec | decode µs | encode µs | decode+encode µs | decode+encode vs floor |")
        print("|---|---:|---:|---:|---:|")
        for cand in cands:
            decode_us, encode_us, roundtrip_us = (
                results.median_us((case, cand.name, op)) for op in OPS
            )
            print(
                f"| {cand.name} | {decode_us:.2f} | {encode_us:.2f} | {roundtrip_us:.2f} "
                f"| {vs_floor(case, cand.name):.2f}x |"
            )
        others = [cand for cand in cands if cand.name != FLOOR.name]
        floor_us = results.median_us((case, FLOOR.name, "roundtrip"))
        row = [case, str(len(data)), f"{floor_us:.2f}"]
        row.extend(f"{vs_floor(case, cand.name):.2f}x" for cand in others)
        if ours_available:
            ratio = vs_floor(case, OURS_NAME)
            met = ratio <= ROUNDTRIP_TARGET
            row.append("yes" if met else "**no**")
            if not met:
                missed.append(
                    f"{case}: decode+encode {ratio:.2f}x the floor (target {ROUNDTRIP_TARGET}x)"
                )
        summary.append("| " + " | ".join(row) + " |")

    print("\n### Summary: decode+encode vs the floor (median of per-repeat ratios)\n")
    others = [cand for cand in cands if cand.name != FLOOR.name]
    header = ["type", "bytes", "floor µs", *(cand.name for cand in others)]
    if ours_available:
        header.append(f"ours <= {ROUNDTRIP_TARGET}x")
    print("| " + " | ".join(header) + " |")
    print("|---|---:|---:|" + "---:|" * len(others) + ("---|" if ours_available else ""))
    print("\n".join(summary))

    if stamp_names:
        print("\n### Stamping a new frame's id and ts\n")
        print("| way | µs |")
        print("|---|---:|")
        for name in stamp_names:
            print(f"| {name} | {results.median_us((STAMP_CASE, name, 'stamp')):.2f} |")
    if ours_available:
        ours_stamp = [name for name in stamp_names if name.startswith("svantic_proto")]
        if not ours_stamp:
            missed.append("no public way to stamp a frame's id and ts was found")
        for name in ours_stamp:
            stamp_us = results.median_us((STAMP_CASE, name, "stamp"))
            if stamp_us > STAMP_TARGET_US:
                missed.append(f"stamp: {stamp_us:.2f} µs (target {STAMP_TARGET_US} µs)")
    return missed


JSON_DATA: dict[str, Any] = {}
"""Raw figures for `--json PATH` (see `_jsonout.py`)."""


def json_data(results: Results, cands: Sequence[Candidate], cases: dict[str, Any],
              settings: Settings) -> dict[str, Any]:
    """Per frame type: decode+encode vs the floor, per candidate, median and per repeat."""
    types: dict[str, Any] = {}
    for case, data in cases.items():
        base = (case, FLOOR.name, "roundtrip")
        per_repeat = {
            cand.name: [value / ref for value, ref in zip(
                results.per_call[(case, cand.name, "roundtrip")], results.per_call[base],
                strict=True)]
            for cand in cands
        }
        types[case] = {
            "bytes": len(data),
            "floor_us": results.median_us(base),
            "ratio_vs_floor": {name: statistics.median(v) for name, v in per_repeat.items()},
            "ratio_vs_floor_per_repeat": per_repeat,
        }
    return {"repeats": settings.repeats, "input": settings.input_kind, "ours": OURS_NAME,
            "floor": FLOOR.name, "types": types}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny loop counts (smoke test)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--repeats", type=int, default=None, help="repeats (default 15; quick 3)")
    parser.add_argument(
        "--ms", type=float, default=5.0, help="milliseconds per measurement (default 5)"
    )
    parser.add_argument(
        "--input",
        choices=("bytes", "str"),
        default="bytes",
        help="feed decoders the message as bytes (default) or as str, as wsproto delivers it",
    )
    parser.add_argument("--types", default=None, help="comma-separated frame types to run")
    parser.add_argument("--seed", type=int, default=1, help="seed of the interleaving order")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="also write the figures to PATH as JSON")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings(
        repeats=args.repeats if args.repeats is not None else (3 if args.quick else 15),
        seconds_per_measurement=args.ms / 1000,
        fixed_loops=20 if args.quick else None,
        input_kind=args.input,
        only_types=frozenset(args.types.split(",")) if args.types else None,
        seed=args.seed,
    )
    if settings.repeats < 1:
        raise SystemExit("--repeats must be at least 1")

    ours, ours_source = load_ours()
    cases: dict[str, Any] = load_cases(settings.only_types)
    if settings.input_kind == "str":
        cases = {name: data.decode() for name, data in cases.items()}
    cands = candidates(ours)
    problems = check_decodes(cands, cases)
    failing = {name for name, _ in problems}
    if ours is not None and ours.name in failing:
        ours, ours_source = None, "it failed the round-trip check below; timing the baselines only"
    cands = [cand for cand in cands if cand.name not in failing]

    stamps: list[tuple[str, Callable[[], Any]]] = []
    stamp, stamp_source = load_stamp()
    if stamp is not None:
        stamps.append((f"svantic_proto: {stamp_source}", stamp))
    stamps.append(("stdlib: str(uuid.uuid4()), datetime.now(UTC).isoformat()", stdlib_stamp))

    print("## Codec benchmark\n")
    print(
        f"Python {platform.python_version()}, msgspec {msgspec.__version__}, "
        f"pydantic {pydantic.VERSION}; input as {settings.input_kind}; {settings.repeats} "
        + (
            "repeats of 20 loops (quick: not meaningful figures)."
            if settings.fixed_loops
            else f"repeats of about {args.ms:g} ms per measurement; medians."
        )
    )
    print(f"Codec under test: {ours_source if ours is not None else 'NONE'}")
    if ours is None:
        print(f"\n**The codec is not measured**: {ours_source}.")
    for name, problem in problems:
        print(f"\n**Not timed**: {name} {problem}")

    timers = make_timers(cands, cases, stamps)
    results = run(timers, settings)
    missed = report(results, cands, cases, [name for name, _ in stamps], ours is not None)
    JSON_DATA.update(json_data(results, cands, cases, settings))

    if ours is None:
        missed.append("the codec was not measured")
    if missed:
        print("\nTargets missed:\n" + "\n".join(f"* {line}" for line in missed))
    elif ours is not None:
        print(
            f"\nAll targets met: decode+encode <= {ROUNDTRIP_TARGET}x the floor for every type, "
            f"stamp <= {STAMP_TARGET_US} µs."
        )
    return 1 if (args.check and missed) else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _jsonout import run_main  # --json PATH: the same figures as JSON

    sys.exit(run_main(main))
