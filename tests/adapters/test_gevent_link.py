"""The gevent adapter's transport: writes never block the greenlet that makes them, keep
their order, and a peer that stops reading is dropped once the write buffer limit is
passed; the mesh's TLS port times out, closes with close_notify and refuses plaintext; a
peer that floods does not stall the other connections. Real TCP sockets on 127.0.0.1, real
TLS (trustme), no monkey-patching; every wait is bounded."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("gevent")
import gevent
import gevent.socket
from harness import Certs
from svantic_adapters._tls import TlsSession
from svantic_adapters.gevent import WRITE_BUFFER_LIMIT, Agent, MeshServer, _Link

from svantic_proto import (
    Config,
    DispatchAuthMinter,
    DispatchAuthVerifier,
    InstanceRecord,
    jwt_dispatch_auth,
)

pytestmark = pytest.mark.timeout(30)
CHUNK = 64 * 1024


@pytest.fixture
def pair() -> Iterator[tuple[Any, Any]]:
    """A connected TCP pair on 127.0.0.1 (gevent sockets), with small kernel buffers so
    that a few hundred KiB fill them."""
    listener = gevent.socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # the accepted one's
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    ours = gevent.socket.socket()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    ours.connect(listener.getsockname())
    theirs, _ = listener.accept()
    listener.close()
    yield ours, theirs
    ours.close()
    theirs.close()


def make_link(sock: Any) -> Any:
    return _Link(sock, None, b"", close_timeout=1.0)


def read_exactly(sock: Any, size: int) -> bytes:
    received = bytearray()
    with gevent.Timeout(10):
        while len(received) < size:
            data = sock.recv(1 << 20)
            assert data, "the connection ended early"
            received += data
    return bytes(received)


def test_writes_past_what_the_socket_takes_are_queued_in_order(pair: tuple[Any, Any]) -> None:
    ours, theirs = pair
    link = make_link(ours)
    chunks = [bytes([n]) * CHUNK for n in range(40)]  # 2.5 MiB: more than the kernel takes
    for chunk in chunks:
        link.write([chunk])  # returns at once: nothing here may wait for the peer
    assert link.queued > 0  # the peer has read nothing: the rest waits for the writer
    assert link._writer is not None
    assert read_exactly(theirs, len(chunks) * CHUNK) == b"".join(chunks)
    link.wait_flushed(10)
    assert link.queued == 0
    assert link._writer is None


def test_a_peer_that_stops_reading_is_dropped_past_the_write_buffer_limit(
    pair: tuple[Any, Any],
) -> None:
    ours, theirs = pair
    link = make_link(ours)
    for _ in range(WRITE_BUFFER_LIMIT // CHUNK + 64):
        link.write([b"x" * CHUNK])
    assert link._pending == []  # what was queued is dropped, not kept
    assert ours.closed
    with gevent.Timeout(10):  # the peer sees the connection end
        while theirs.recv(1 << 20):
            pass


# -- TLS on the mesh's port, as the asyncio adapter's tests check it (test_tls_layer.py) --


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    certs = Certs(tmp_path_factory.mktemp("certs"))
    return certs.server_context(), certs.client_context()


@pytest.fixture
def mesh(tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> Iterator[tuple[MeshServer, int]]:
    """A gevent mesh in this thread's hub that knows no token and no instance."""

    def refuse(token: str) -> object:
        raise ValueError("no tokens in this test")

    server = MeshServer(ssl_context=tls[0], verify_token=refuse,
                        lookup_instance=lambda instance_id: None, dispatch_auth=None,
                        config=Config(hello_timeout=0.3, close_timeout=0.3))
    _, port = server.start("127.0.0.1", 0)
    yield server, port
    server.close(grace=0)


def read_until_eof(sock: Any) -> bytes:
    received = bytearray()
    with gevent.Timeout(10):
        try:
            while data := sock.recv(65536):
                received += data
        except ConnectionError:
            pass
    return bytes(received)


def test_mesh_drops_a_peer_that_never_finishes_the_tls_handshake(
    mesh: tuple[MeshServer, int],
) -> None:
    sock = gevent.socket.create_connection(("127.0.0.1", mesh[1]))  # TCP, then nothing
    started = time.monotonic()
    read_until_eof(sock)
    sock.close()
    assert time.monotonic() - started < 5  # hello_timeout (0.3 s), not never


def test_mesh_closes_with_close_notify_a_peer_that_sends_no_upgrade(
    mesh: tuple[MeshServer, int], tls: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    sock = gevent.socket.create_connection(("127.0.0.1", mesh[1]))
    client = TlsSession(tls[1], server_side=False, server_hostname="127.0.0.1")
    client.start()
    with gevent.Timeout(10):
        while not client.handshake_complete:
            sock.sendall(client.data_to_send())
            client.receive_data(sock.recv(65536))
        sock.sendall(client.data_to_send())
        while not client.peer_closed:  # the mesh gives up after hello_timeout
            data = sock.recv(65536)
            assert data, "TCP ended without close_notify"
            client.receive_data(data)
    read_until_eof(sock)  # and closes TCP without waiting for ours
    sock.close()
    assert not client.close_sent


def test_mesh_closes_on_a_plain_http_request_to_its_tls_port(
    mesh: tuple[MeshServer, int],
) -> None:
    server, port = mesh
    sock = gevent.socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"GET /agents/connect?instance_id=a1 HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = read_until_eof(sock)
    sock.close()
    assert not answer.startswith(b"HTTP/")  # a TLS alert, not an HTTP answer
    assert not server.links  # nothing reached the core


# -- fairness: a peer that floods must not stall the other connections ---------------------

FLOOD_SECONDS = 2.0
FLOOD_FRAME = 1 << 20  # the largest message the mesh takes (spec 4)
SECRET = "gevent-fairness-signing-secret"
RECORDS = {name: InstanceRecord(name, "tenant-1", "connected", "fair-agent")
           for name in ("steady", "flooder")}
FLOODER = """
import socket, sys, time, uuid
from svantic_proto import AgentConnection, Config, DispatchAuthVerifier, SessionStarted

url, port, secret, seconds, size = sys.argv[1:]
sock = socket.create_connection(("127.0.0.1", int(port)), timeout=10)
conn = AgentConnection(url, token=secret, instance_id="flooder", config=Config(),
                       dispatch_auth=DispatchAuthVerifier("flooder", hs256_keys=[secret]),
                       now=time.monotonic(), wall_clock=time.time, allow_insecure_loopback=True)
while not any(isinstance(event, SessionStarted) for event in conn.events_received()):
    for chunk in conn.data_to_send():
        sock.sendall(chunk)
    data = sock.recv(65536)
    if not data:
        sys.exit("the mesh closed the connection during the handshake")
    conn.receive_data(data, time.monotonic())
sock.settimeout(None)
# Valid frames of an unknown type: the mesh answers each BAD_FRAME and keeps the connection
# (spec 2), so it reads and parses every one. Masked with key 0: the masked bytes are the text.
# Built once, sent back to back, so that the mesh's socket never runs dry.
head = b'{"v":1,"type":"x-flood","id":"'
tail = b'","ts":"2026-01-01T00:00:00Z","payload":{"pad":"'
pad = b"x" * (int(size) - len(head) - len(tail) - 36 - 3)
frames = b"".join(
    b"\\x81\\xff" + int(size).to_bytes(8, "big") + bytes(4)
    + head + str(uuid.uuid4()).encode() + tail + pad + b'"}}' for _ in range(16))
sent, until = 0, time.monotonic() + float(seconds)
while time.monotonic() < until:
    sock.sendall(frames)
    sent += len(frames)
    try:
        while sock.recv(1 << 20, socket.MSG_DONTWAIT):  # the mesh's answers
            pass
    except BlockingIOError:
        pass
print(sent)
"""
"""An agent in a process of its own that sends 1 MiB frames as fast as the mesh takes them,
for `FLOOD_SECONDS`: argv is the URL, the port, the token (also the signing secret), the
seconds and the frame size. Prints the bytes it sent."""


def test_a_peer_flooding_large_frames_does_not_stall_the_other_connections() -> None:
    """Round trips on one connection keep completing, promptly, while another connection
    floods 1 MiB frames: the reader of a busy connection gives the hub a turn."""
    config = Config(hello_timeout=5.0, close_timeout=1.0)
    server = MeshServer(ssl_context=None, verify_token=lambda token: {"tenant_id": "tenant-1"},
                        lookup_instance=RECORDS.get, config=config,
                        dispatch_auth=jwt_dispatch_auth(DispatchAuthMinter(SECRET)))
    _, port = server.start("127.0.0.1", 0)
    url = f"ws://127.0.0.1:{port}/agents/connect"
    agent = Agent(url, token=SECRET, instance_id="steady", config=config,
                  dispatch_auth=DispatchAuthVerifier("steady", hs256_keys=[SECRET]),
                  allow_insecure_loopback=True)
    agent.add("echo", lambda arguments, context: arguments)
    flooder = subprocess.Popen(
        [sys.executable, "-c", FLOODER, url, str(port), SECRET, str(FLOOD_SECONDS),
         str(FLOOD_FRAME)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert agent.start().wait_ready(10)
        server.wait_for_agent("steady", timeout=10)
        server.wait_for_agent("flooder", timeout=20)  # the flood starts right after
        delays: list[float] = []
        while flooder.poll() is None:  # the flood ends on its own, after FLOOD_SECONDS
            started = time.monotonic()
            assert server.dispatch("steady", "echo", {"n": len(delays)},
                                   deadline_ms=20_000) == {"n": len(delays)}
            delays.append(time.monotonic() - started)
        out, err = flooder.communicate(timeout=10)
        assert flooder.returncode == 0, err.decode()
        assert int(out) >= 64 * FLOOD_FRAME  # a flood, not a trickle
        assert len(delays) >= 20
        assert max(delays) < 0.5, f"worst round trip {max(delays):.3f} s during the flood"
    finally:
        flooder.kill()
        flooder.wait(10)
        agent.stop(grace=0)
        server.close(grace=0)


# -- handshakes do not count toward max_connections ----------------------------------------


def test_silent_sockets_do_not_lock_agents_out_of_max_connections() -> None:
    """TCP connections that never send a byte are handshakes, bounded by `max_handshakes`
    and `hello_timeout`, not sessions: with `max_connections=2` and five of them open, two
    agents still connect at once (not only once the silent ones time out)."""
    config = Config(hello_timeout=20.0, close_timeout=1.0)
    records = {name: InstanceRecord(name, "tenant-1", "connected", "capped-agent")
               for name in ("first", "second")}
    server = MeshServer(ssl_context=None, verify_token=lambda token: {"tenant_id": "tenant-1"},
                        lookup_instance=records.get, config=config, max_connections=2,
                        dispatch_auth=jwt_dispatch_auth(DispatchAuthMinter(SECRET)))
    _, port = server.start("127.0.0.1", 0)
    url = f"ws://127.0.0.1:{port}/agents/connect"
    silent = [gevent.socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
    agents = [Agent(url, token=SECRET, instance_id=name, config=config,
                    dispatch_auth=DispatchAuthVerifier(name, hs256_keys=[SECRET]),
                    allow_insecure_loopback=True) for name in records]
    try:
        for agent in agents:
            agent.add("echo", lambda arguments, context: arguments)
            assert agent.start().wait_ready(5)
        for name in records:
            server.wait_for_agent(name, timeout=5)
            assert server.dispatch(name, "echo", {"n": name}, deadline_ms=5000) == {"n": name}
        assert server.runtime.connections() == 2
        assert server.runtime.handshakes() == 5  # still open: nothing dropped them
    finally:
        for agent in agents:
            agent.stop(grace=0)
        for sock in silent:
            sock.close()
        server.close(grace=0)
