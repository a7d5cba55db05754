"""The gevent adapter's transport: writes never block the greenlet that makes them, keep
their order, and a peer that stops reading is dropped once the write buffer limit is
passed. Real TCP sockets on 127.0.0.1, no monkey-patching; every wait is bounded."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("gevent")
import gevent
import gevent.socket
from svantic_adapters.gevent import WRITE_BUFFER_LIMIT, _Link

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
