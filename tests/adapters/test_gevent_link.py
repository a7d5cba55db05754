"""The gevent adapter's transport: writes never block the greenlet that makes them, keep
their order, and a peer that stops reading is dropped once the write buffer limit is
passed; the mesh's TLS port times out, closes with close_notify and refuses plaintext.
Real TCP sockets on 127.0.0.1, real TLS (trustme), no monkey-patching; every wait is
bounded."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("gevent")
import gevent
import gevent.socket
from harness import Certs
from svantic_adapters._tls import TlsSession
from svantic_adapters.gevent import WRITE_BUFFER_LIMIT, MeshServer, _Link

from svantic_proto import Config

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
    return _Link(object(), sock, None, b"", on_event=lambda event: None)


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
        link._write([chunk])  # returns at once: nothing here may wait for the peer
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
        link._write([b"x" * CHUNK])
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
