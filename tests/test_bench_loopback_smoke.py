"""The loopback benchmark runs, compares like with like, and reports what the issue asks.

A quick run is not a measurement; these tests check the harness: that the echo moves
exactly our frames' bytes, that every available adapter gets both modes, that idle
memory is measured in a separate server process, and that `--check` fails on a miss.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_loopback  # noqa: E402


def available(adapter: str) -> bool:
    return bench_loopback.adapter_status(adapter)[0] is not None


def run_main(args: list[str]) -> tuple[int, str]:
    lines: list[str] = []
    code = bench_loopback.main(args, out=lines.append)
    return code, "\n".join(lines)


def test_the_echo_sends_our_dispatch_bytes_and_answers_our_result_bytes() -> None:
    from svantic_adapters import asyncio as adapter

    async def scenario() -> tuple[tuple[str, str], Any, Any]:
        tls = bench_loopback.Tls.make(True)
        ours = bench_loopback.Ours("asyncio", adapter, tls)
        await ours.setup()
        try:
            echo = bench_loopback.WebsocketsEcho(tls, ours.texts)
            await echo.setup()
            try:
                answer = await asyncio.wait_for(echo.one(), 10)
                result = await asyncio.wait_for(ours.one(), 10)
            finally:
                await echo.close()
        finally:
            await ours.close()
        return ours.texts, answer, result

    (dispatch_text, result_text), answer, result = asyncio.run(scenario())
    dispatch = json.loads(dispatch_text)
    assert dispatch["type"] == "dispatch"
    assert dispatch["payload"]["dispatch_auth"]["type"] == "svantic_jwt"  # auth is on
    assert dispatch["payload"]["arguments"] == bench_loopback.ARGUMENTS
    assert json.loads(result_text)["type"] == "dispatch_result"
    assert answer == result_text  # the echo answers with exactly our result frame
    assert result == bench_loopback.ARGUMENTS  # our round trip really ran the capability


def test_quick_run_times_both_modes_for_every_available_adapter() -> None:
    code, out = run_main(["--quick", "--idle", "0", "--repeats", "1",
                          "--adapters", "asyncio,anyio,gevent,no_such_adapter"])
    assert code == 0
    assert "adapter no_such_adapter: not available" in out
    for adapter in ("asyncio", "anyio", "gevent"):
        if not available(adapter):
            assert f"adapter {adapter}: not available" in out
            continue
        for mode in ("sequential", "pipelined"):
            assert f"| {adapter} | {mode} |" in out
    assert "| the same round trip in memory, no I/O |" in out
    assert "bare wsproto" in out
    assert "failed" not in out


def test_quick_run_measures_idle_memory_in_a_server_process() -> None:
    code, out = run_main(["--quick", "--skip-round-trips", "--adapters", "asyncio",
                          "--idle", "20"])
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith("| asyncio | 20 |"))
    rss_kib, traced_kib = (float(cell) for cell in row.split("|")[3:5])
    assert traced_kib > 0  # each idle connection costs the server something
    assert rss_kib >= 0
    assert "Traced growth per idle connection by file, asyncio" in out
    assert "svantic_proto/" in out  # the core's own share is attributed by file


@pytest.mark.skipif(not bench_loopback.has_trio(), reason="trio is not installed")
def test_the_anyio_adapter_memory_is_measured_on_trio_too() -> None:
    code, out = run_main(["--quick", "--skip-round-trips", "--adapters", "anyio",
                          "--idle", "20"])
    assert code == 0, out
    row = next(line for line in out.splitlines() if line.startswith("| anyio-trio | 20 |"))
    assert float(row.split("|")[4]) > 0  # traced Python memory per connection
    assert "Traced growth per idle connection by file, anyio-trio" in out
    assert "trio/" in out  # trio's own objects are attributed by file


def synthetic(ours_seconds: float, echo_seconds: float) -> bench_loopback.Outcome:
    results = bench_loopback.RoundTrips(counts={"sequential": 100, "pipelined": 100})
    for mode in bench_loopback.MODES:
        for repeat in range(3):
            drift = 1.0 + repeat  # the machine slows down; ratios within a repeat hold
            results.add("asyncio", mode, ours_seconds * drift)
            results.add(bench_loopback.ASYNC_ECHO, mode, echo_seconds * drift)
    outcome = bench_loopback.Outcome()
    outcome.round_trips["asyncio"] = (results, bench_loopback.ASYNC_ECHO)
    return outcome


@pytest.mark.parametrize(("ours_seconds", "expected_code"), [(1.0, 0), (2.0, 1)])
def test_check_exits_1_only_when_a_target_is_missed(
    monkeypatch: pytest.MonkeyPatch, ours_seconds: float, expected_code: int
) -> None:
    def fake_run(args: Any, modules: Any, outcome: bench_loopback.Outcome) -> None:
        outcome.round_trips.update(synthetic(ours_seconds, 1.0).round_trips)

    monkeypatch.setattr(bench_loopback, "run", fake_run)
    code, out = run_main(["--quick", "--check", "--adapters", "asyncio"])
    assert code == expected_code
    ratio = 1.0 / ours_seconds
    assert f"{ratio:.2f}x" in out
    assert ("Targets missed" in out) is (expected_code == 1)
    assert run_main(["--quick", "--adapters", "asyncio"])[0] == 0  # no --check: always 0


def test_ratio_is_taken_within_each_repeat() -> None:
    results = bench_loopback.RoundTrips(counts={"sequential": 10})
    for ours, echo in ((2.0, 1.0), (6.0, 2.0), (4.0, 2.0)):  # echo drifts between repeats
        results.add("ours", "sequential", ours)
        results.add("echo", "sequential", echo)
    assert results.ratio("ours", "echo", "sequential") == pytest.approx(0.5)
    assert results.rate("ours", "sequential") == pytest.approx(10 / 4.0)
