"""The mesh benchmark runs end to end and reports what the issue asks.

A quick run is not a measurement: it checks the harness. `svantic mesh`, an agent and the
uvicorn echo start as processes of their own, every request is answered as expected (the
benchmark exits 1 otherwise), and the report has both targets in both modes and the
routing table. The client's parser is checked on answers cut at every byte.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_mesh  # noqa: E402


@pytest.mark.timeout(90)
def test_quick_run_succeeds_and_prints_every_table() -> None:
    done = subprocess.run([sys.executable, str(BENCHMARKS / "bench_mesh.py"), "--quick"],
                          check=False, capture_output=True, text=True,
                          timeout=75)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "## Mesh: POST /agents/dispatch" in out
    assert "build: " in out and "uvicorn " in out and "(http " in out
    assert "| mode | target | p50 ms | p99 ms | req/s |" in out
    for mode in ("sequential", "concurrent"):
        for target in (bench_mesh.ECHO, bench_mesh.MESH):
            assert f"| {mode} | {target} |" in out
    assert "| mode | p50 mesh / echo | <= 1.5x |" in out
    assert "| throughput mesh / echo | >= 0.7x |" in out
    assert "CPU time per request" in out
    assert "## Routing: acquire + release" in out
    for size in ("10", "1,000", "10,000"):
        assert f"| {size} |" in out
    assert "failed" not in out


ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n"
          b'{"ok":true}')


def feed(pieces: list[bytes]) -> asyncio.Future[tuple[int, bytes]]:
    client = bench_mesh.HttpClient()
    loop = asyncio.new_event_loop()
    try:
        client.waiter = waiter = loop.create_future()
        for piece in pieces:
            client.data_received(piece)
        return waiter
    finally:
        loop.close()


@pytest.mark.parametrize("cut", range(1, len(ANSWER)))
def test_the_client_parses_an_answer_cut_anywhere(cut: int) -> None:
    waiter = feed([ANSWER[:cut], ANSWER[cut:]])
    assert waiter.done() and waiter.result() == (200, b'{"ok":true}')


def test_the_client_refuses_an_answer_without_content_length() -> None:
    waiter = feed([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nb\r\n"])
    assert isinstance(waiter.exception(), bench_mesh.Failure)


def test_every_request_body_names_the_echo_and_the_instance() -> None:
    import json

    assert json.loads(bench_mesh.body_of(7)) == {
        "capability": "echo", "arguments": {"n": 7}, "instance_id": bench_mesh.INSTANCE}
