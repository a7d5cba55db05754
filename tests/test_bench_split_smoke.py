"""The two-process loopback benchmark runs, pins what it says, and compares like with like.

A quick run is not a measurement: these tests check the harness. Each contender is two real
processes on 127.0.0.1 (real TLS); the figures are only required to exist and be sane.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_split  # noqa: E402


def test_every_contender_pair_runs_both_sides_of_one_event_loop() -> None:
    for contender in bench_split.CONTENDERS:
        listener, connector = contender.roles()
        assert {listener, connector} == {contender.driver, contender.answerer}
    keys = {c.key for c in bench_split.CONTENDERS}
    for ours, echo in bench_split.COMPARISONS:
        assert ours in keys and echo in keys
        assert bench_split.BY_KEY[ours].label.startswith("ours")
        assert not bench_split.BY_KEY[echo].label.startswith("ours")


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="split needs two CPUs")
def test_quick_run_times_ours_and_the_echo_in_both_placements(tmp_path: Path) -> None:
    lines: list[str] = []
    code = bench_split.main(["--quick", "--contenders", "asyncio,websockets", "--repeats", "1"],
                            out=lines.append)
    out = "\n".join(lines)
    assert code == 0, out
    data = bench_split.JSON_DATA
    assert data["sizes"][0] > 600  # the dispatch frame carries its auth token
    rows = {(r["ours"], r["echo"], r["placement"]): r for r in data["comparisons"]}
    for placement in ("one-cpu", "split"):
        row = rows[("asyncio", "websockets", placement)]
        for mode in ("sequential", "pipelined"):
            assert row[mode]["min"] <= row[mode]["median"] <= row[mode]["max"]
            assert row[mode]["median"] > 0
        rate = data["contenders"]["asyncio"][placement]["sequential"]["rt_per_s"]["median"]
        assert rate > 10  # round trips really ran
    assert "| ours, asyncio | websockets echo (asyncio) | split |" in out
    json.dumps(data)  # what --json writes


def test_pin_moves_every_thread_of_a_process() -> None:
    import subprocess

    child = subprocess.Popen(
        [sys.executable, "-c",
         "import threading, sys; e = threading.Event(); "
         "threading.Thread(target=e.wait, daemon=True).start(); "
         "print('up', flush=True); sys.stdin.readline()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "up"
        cpu = sorted(os.sched_getaffinity(0))[-1]
        bench_split.pin(child.pid, {cpu})
        tids = os.listdir(f"/proc/{child.pid}/task")
        assert len(tids) == 2
        assert all(os.sched_getaffinity(int(tid)) == {cpu} for tid in tids)
    finally:
        child.communicate("\n", timeout=10)
