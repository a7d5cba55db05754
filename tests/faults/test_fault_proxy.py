"""The fault proxy itself: it forwards, and each fault does what the fault tests rely on."""

from __future__ import annotations

import contextlib
import random
import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest
from proxy import Fault, FaultProxy


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.settimeout(10)
        with contextlib.suppress(OSError):
            while data := self.request.recv(65536):
                self.request.sendall(data)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture
def echo() -> Iterator[tuple[str, int]]:
    server = _Server(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield str(server.server_address[0]), int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def proxy(echo: tuple[str, int]) -> Iterator[FaultProxy]:
    with FaultProxy(echo) as running:
        yield running


def _client(proxy: FaultProxy) -> socket.socket:
    sock = socket.create_connection(proxy.address, timeout=5)
    sock.settimeout(5)
    return sock


def _read(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = sock.recv(n - len(data))
        if not more:
            break
        data += more
    return data


def test_forwards_both_ways(proxy: FaultProxy) -> None:
    with _client(proxy) as sock:
        sock.sendall(b"x" * 200_000)
        assert _read(sock, 200_000) == b"x" * 200_000
    link = proxy.links[0]
    assert link.sent == {"up": 200_000, "down": 200_000}


def test_reset_sends_an_rst(proxy: FaultProxy) -> None:
    with _client(proxy) as sock:
        sock.sendall(b"hi")
        assert _read(sock, 2) == b"hi"
        proxy.wait_links(1)[0].reset()
        with pytest.raises(ConnectionResetError):
            sock.recv(10)  # an RST, not a clean EOF (which would return b"")
    assert proxy.resets == 1


def test_blackhole_forwards_nothing_and_closes_nothing(proxy: FaultProxy) -> None:
    with _client(proxy) as sock:
        link = proxy.wait_links(1)[0]
        link.blackhole()
        sock.sendall(b"lost")
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(10)  # neither data nor an EOF: the path is silent
        assert link.live and link.sent["up"] == 0


def test_cut_after_a_byte_offset(proxy: FaultProxy) -> None:
    with _client(proxy) as sock:
        proxy.wait_links(1)[0].cut_after(1000, "down")
        sock.sendall(b"y" * 5000)
        data = b""
        with pytest.raises(ConnectionResetError):
            while more := sock.recv(65536):
                data += more
        assert data == b"y" * 1000  # exactly the offset, then the reset


def test_trickle_and_delay_slow_the_bytes_down(echo: tuple[str, int]) -> None:
    with FaultProxy(echo, default=Fault(trickle=(100, 0.02))) as proxy, _client(proxy) as sock:
        started = time.monotonic()
        sock.sendall(b"z" * 1000)
        assert _read(sock, 1000) == b"z" * 1000
        assert time.monotonic() - started >= 0.18  # 10 steps of 100 bytes, each way
    with FaultProxy(echo, default=Fault(delay=0.2)) as proxy, _client(proxy) as sock:
        started = time.monotonic()
        sock.sendall(b"d")
        assert _read(sock, 1) == b"d"
        assert time.monotonic() - started >= 0.4  # delayed up and down


def test_reset_random_picks_a_live_link(proxy: FaultProxy) -> None:
    socks = [_client(proxy) for _ in range(5)]
    try:
        proxy.wait_links(5)
        rng = random.Random(7)
        cut = {proxy.reset_random(rng) for _ in range(5)}
        assert len(cut) == 5 and proxy.live_links() == []
        assert proxy.reset_random(rng) is None
    finally:
        for sock in socks:
            sock.close()


def test_no_upstream_closes_the_client() -> None:
    with FaultProxy(None) as proxy, _client(proxy) as sock:
        assert sock.recv(10) == b""
        assert proxy.refused == 1
