"""Bounds of the sans-IO core that a hostile client reaches before it is admitted: the bytes
a mesh connection keeps while the application decides on an upgrade (its lookups may take
a while), measured with tracemalloc."""

from __future__ import annotations

import base64
import os
import tracemalloc

from hostile_kit import frame_text, ws_frame

from svantic_proto import events as ev
from svantic_proto.config import Config
from svantic_proto.mesh import MeshConnection

NOW = 100.0
WALL = 1_795_000_000.0


def _upgrade() -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (f"GET /agents/connect?instance_id=early-1 HTTP/1.1\r\nHost: h\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Protocol: svantic.v1\r\nAuthorization: Bearer t\r\n\r\n").encode()


def _pending(config: Config) -> MeshConnection:
    conn = MeshConnection(dispatch_auth=None, now=NOW, wall_clock=lambda: WALL, config=config)
    conn.receive_data(_upgrade(), NOW)
    assert any(isinstance(e, ev.UpgradeRequest) for e in conn.events_received())
    return conn


def test_a_pipelined_hello_is_kept_while_the_upgrade_is_decided() -> None:
    conn = _pending(Config())
    conn.receive_data(ws_frame(0x1, frame_text("hello", {"instance_id": "early-1"})), NOW)
    conn.accept(instance_id="early-1", tenant_id="t", now=NOW)
    assert not conn.closed
    assert not any(isinstance(e, ev.ConnectionClosed) for e in conn.events_received())


def test_bytes_streamed_before_the_answer_are_bounded_then_closed_1009() -> None:
    config = Config(max_message_bytes=64 * 1024)
    conn = _pending(config)
    chunk = b"x" * 65536
    tracemalloc.start()
    try:
        for _ in range(800):  # 50 MiB while the application looks the instance up
            conn.receive_data(chunk, NOW)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * config.max_message_bytes, peak
    conn.accept(instance_id="early-1", tenant_id="t", now=NOW)
    closed = [e for e in conn.events_received() if isinstance(e, ev.ConnectionClosed)]
    assert closed and closed[0].code == 1009 and not closed[0].by_peer
    out = b"".join(conn.data_to_send())
    assert out.startswith(b"HTTP/1.1 101")
    assert (1009).to_bytes(2, "big") in out
