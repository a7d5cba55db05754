"""The scale benchmark connects every agent, restarts the mesh and sees every agent back.

A quick run (60 agents) is not a measurement: it checks that the figures the issue asks for
are produced from real processes on 127.0.0.1 with real TLS.
"""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_scale  # noqa: E402


def test_quick_run_connects_every_agent_and_all_come_back_after_a_restart() -> None:
    lines: list[str] = []
    code = bench_scale.main(["--quick"], out=lines.append)
    out = "\n".join(lines)
    assert code == 0, out
    data = bench_scale.JSON_DATA
    connect, storm = data["connect"], data["storm"]
    assert connect["connected"] == connect["agents"] == 60
    assert connect["rss_kib_per_agent"] > 0 and connect["seconds"] > 0
    assert 0 <= connect["idle_cpu_share"] < 1
    assert storm["back"] == 60
    assert storm["seconds_from_kill"] >= storm["seconds_from_listening"] > 0
    assert storm["agents_log"]["dialling"] >= 60  # each agent dialled the new mesh
    assert "### Reconnect storm after a mesh restart" in out


def test_the_dropped_handshake_count_reads_the_number_the_mesh_logged() -> None:
    import logging

    counter = bench_scale.Counter(bench_scale.MESH_MARKS)
    record = logging.LogRecord("svantic.mesh", logging.INFO, __file__, 1,
                               "handshake limit (%d) reached: dropping the %d oldest", (1024, 3),
                               None)
    counter.emit(record)
    refused = logging.LogRecord("svantic.mesh", logging.INFO, __file__, 1,
                                "upgrade refused: %d %s (instance %s)", (401, "AUTH", "x"), None)
    counter.emit(refused)
    assert counter.counts == {"upgrade refused": 1, "handshake limit": 3, "answered 503": 0}
