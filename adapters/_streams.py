"""The anyio byte-stream transport: the anyio adapter's connections on trio (and on any
backend without an asyncio loop).

A reader task feeds the pump, whichever one `pump` is at that moment (an agent's, which
outlives its connections, or the one `attach()` made for a mesh connection); a writer
task sends what queued in one `send()`; a timer task sleeps in a cancel scope whose
deadline is the core's `next_deadline()` (no polling). Every protocol decision is the
core's.
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
from anyio.abc import AnyByteStream, ByteStream, SocketAttribute
from anyio.streams.tls import TLSListener

from svantic_proto.events import Event

from ._pump import DETACHED, Pump

__all__ = ["WRITE_BUFFER_LIMIT", "QuietTLSListener", "StreamLink", "Timer"]

log = logging.getLogger("svantic_adapters.anyio")
READ_SIZE = 65536
WRITE_BUFFER_LIMIT = 4 * 1024 * 1024
"""Bytes queued for a peer that does not read before we give up on it (slow reader)."""


class QuietTLSListener(TLSListener):
    """A TLS listener that logs a failed handshake at DEBUG: scanners, health checks and
    plain-TCP peers are routine on a public port, not an error with a traceback."""

    @staticmethod
    async def handle_handshake_error(exc: BaseException, stream: AnyByteStream) -> None:
        await anyio.aclose_forcefully(stream)
        if not isinstance(exc, Exception) or isinstance(exc, anyio.get_cancelled_exc_class()):
            raise exc
        log.debug("TLS handshake failed: %r", exc)


class Timer:
    """One re-armable timer: a task asleep in a cancel scope whose deadline `arm()` moves."""

    def __init__(self, fire: Callable[[float], None]) -> None:
        self._fire = fire
        self.deadline: float | None = None
        self._scope = anyio.CancelScope()
        self._closed = False

    def arm(self, deadline: float | None) -> None:
        self.deadline = deadline
        self._scope.deadline = math.inf if deadline is None else deadline

    def close(self) -> None:
        self._closed = True
        self._scope.cancel()

    def fire_if_due(self, now: float) -> None:
        """Run a deadline that has passed; the reader calls it first, as it came first."""
        if not self._closed and self.deadline is not None and now >= self.deadline:
            self.deadline = None
            self._fire(now)  # which re-arms through arm()

    async def run(self) -> None:
        while not self._closed:
            self._scope = anyio.CancelScope(
                deadline=math.inf if self.deadline is None else self.deadline)
            with self._scope:
                await anyio.sleep_forever()
            self.fire_if_due(anyio.current_time())


class StreamLink:
    """One byte stream, fed to `pump`: `DETACHED` until an agent hands it its own pump, or
    `attach()` gives it a core connection of its own (a mesh connection).

    A reader task feeds the pump; a writer task sends everything queued since its last
    send in one `send()`, in order, then closes the stream; a timer task serves an attached
    connection's `next_deadline()`. The backend's clock and event factory are looked up
    once here: `anyio.current_time()` and `anyio.Event()` ask sniffio on every call.
    """

    def __init__(self, stream: ByteStream, close_timeout: float) -> None:
        backend = anyio.lowlevel.current_token().backend_class
        self.now, self.new_event = backend.current_time, backend.create_event
        self.stream, self._close_timeout = stream, close_timeout
        self.pump = DETACHED
        self._timer = Timer(lambda now: self._drive(self.pump.timer, now))
        self.done = self.new_event()
        self.queued = 0
        self._pending: list[bytes] = []
        self._wake, self._progress = self.new_event(), self.new_event()
        self._closing = False
        self._send_scope = backend.create_cancel_scope()

    def attach(self, conn: Any, on_event: Callable[[Event], None]) -> StreamLink:
        """Drive `conn` from this stream (call `pump.service()` next)."""
        self.pump = Pump(conn, on_event=on_event, write=self.write, close=self.close,
                         arm_timer=self._timer.arm)
        return self

    def write(self, chunks: list[bytes]) -> None:
        if not self._closing:  # after the core's close (or an abort) nothing more goes out
            self._pending += chunks
            self.queued += sum(map(len, chunks))
            self._wake.set()
            if self.queued > WRITE_BUFFER_LIMIT:
                self.abort()  # the peer stopped reading: do not grow memory without limit

    def close(self) -> None:
        """The core said close: flush what is queued (for at most close_timeout), then close."""
        if not self._closing:
            self._closing = True
            self._send_scope.deadline = self.now() + self._close_timeout
            self._wake.set()
        self._timer.close()

    def abort(self) -> None:
        """Drop TCP at once, without a close frame, as a network fault would."""
        raw = self.stream.extra(SocketAttribute.raw_socket, None)
        with contextlib.suppress(OSError):
            if raw is not None:
                raw.shutdown(socket.SHUT_RDWR)
        self.close()
        self._send_scope.cancel()

    def _drive(self, step: Callable[..., None], *args: Any) -> None:
        try:
            step(*args)
        except Exception:  # a failing callback drops this connection, not its neighbours
            log.exception("dropping the connection")
            self.abort()

    async def drain(self, limit: int) -> None:
        """Wait while more than `limit` bytes are queued: backpressure instead of memory."""
        while self.queued > limit and not self._closing:
            await self._progress.wait()

    async def _write_loop(self) -> None:
        try:
            with self._send_scope:
                while self._pending or not self._closing:
                    if not self._pending:  # a fresh event, so a set from before is not seen
                        self._wake = self.new_event()
                        await self._wake.wait()
                        continue
                    data = b"".join(self._pending)  # all that queued while we sent: one send
                    self._pending.clear()
                    await self.stream.send(data)
                    self.queued -= len(data)
                    self._progress.set()
                    self._progress = self.new_event()
        except Exception as exc:  # the transport broke: the reader sees the end as well
            log.debug("write failed, closing the stream: %r", exc)
        finally:
            self._closing = True
            self._progress.set()
            await anyio.aclose_forcefully(self.stream)

    async def run(self) -> None:
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(self._timer.run)
                group.start_soon(self._write_loop)
                while not self.pump.closed:
                    try:
                        data = await self.stream.receive(READ_SIZE)
                    except Exception:  # EOF, reset, TLS failure, closed by the writer: the end
                        break
                    now = self.now()
                    self._timer.fire_if_due(now)  # a deadline that passed came before this input
                    self._drive(self.pump.feed, data, now)
                if not self.pump.closed:
                    self._drive(self.pump.eof, self.now())
                self.close()
        finally:
            self.done.set()
