"""The OpenSSL floor benchmark measures what it says: idle TLS 1.3 server connections."""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_tls_memory  # noqa: E402


def test_connections_finish_tls13_and_the_heap_per_connection_is_reported() -> None:
    server, _client = bench_tls_memory.connected(*bench_tls_memory.contexts())
    assert server[0].version() == "TLSv1.3" and server[0].server_side
    result = bench_tls_memory.measure(20)
    assert result["count"] == 20
    heap = result["heap_kib"]
    assert heap is None or 1 < heap < 200  # None off glibc; the figure itself is for the bench
