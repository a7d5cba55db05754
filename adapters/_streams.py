"""The anyio byte-stream transport: the anyio adapter's connections on trio (and on any
backend without an asyncio loop).

A reader task feeds the pump, whichever one `pump` is at that moment (an agent's, which
outlives its connections, or the one the mesh made for its connection); a writer task
sends what queued in one `send()`. A link has no timer of its own: its pump arms the one
timer of its agent or mesh (`TaskTimer`: a task asleep in a cancel scope whose deadline is
the runtime's next deadline, no polling). Every protocol decision is the core's.
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
from anyio.abc import ByteStream, SocketAttribute

from ._pump import DETACHED

__all__ = ["WRITE_BUFFER_LIMIT", "StreamLink", "TaskTimer"]

log = logging.getLogger("svantic_adapters.anyio")
READ_SIZE = 65536
WRITE_BUFFER_LIMIT = 4 * 1024 * 1024
"""Bytes queued for a peer that does not read before we give up on it (slow reader)."""


class TaskTimer:
    """The one timer of an agent or a mesh: `_run_timer()`, a task in its task group, sleeps
    in a cancel scope whose deadline `_arm` moves, and calls `_fire` (the driver base's) when
    it passes; `_stop_timer()` ends the task."""

    _fire: Callable[[], None]
    _timer_at = math.inf
    _timer_scope: anyio.CancelScope | None = None  # while the task runs
    _timer_stopped = False

    def _arm(self, deadline: float | None) -> None:
        self._timer_at = math.inf if deadline is None else deadline
        if self._timer_scope is not None:
            self._timer_scope.deadline = self._timer_at

    def _stop_timer(self) -> None:
        self._timer_stopped = True
        if self._timer_scope is not None:
            self._timer_scope.cancel()

    async def _run_timer(self) -> None:
        while not self._timer_stopped:
            with anyio.CancelScope(deadline=self._timer_at) as self._timer_scope:
                await anyio.sleep_forever()
            if not self._timer_stopped and anyio.current_time() >= self._timer_at:
                self._timer_at = math.inf
                self._fire()


class StreamLink:
    """One byte stream, fed to `pump`: `DETACHED` until its agent or mesh sets one.

    A reader task feeds the pump; a writer task sends everything queued since its last
    send in one `send()`, in order, then closes the stream. `stream` may be replaced before
    `run()` (by its TLS stream, once the handshake is done). The backend's clock and event
    factory are looked up once here: `anyio.current_time()` and `anyio.Event()` ask sniffio
    on every call.
    """

    def __init__(self, stream: ByteStream, close_timeout: float) -> None:
        backend = anyio.lowlevel.current_token().backend_class
        self.now, self.new_event = backend.current_time, backend.create_event
        self.stream, self._close_timeout = stream, close_timeout
        self.pump, self.done = DETACHED, self.new_event()
        self._pending: list[bytes] = []
        self._wake, self._progress = self.new_event(), self.new_event()
        self.queued, self._closing = 0, False
        self._send_scope = backend.create_cancel_scope()
        self._read_scope = backend.create_cancel_scope()  # bounded once we close

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
            self._send_scope.deadline = self._read_scope.deadline = (
                self.now() + self._close_timeout)
            self._wake.set()

    def abort(self) -> None:
        """Drop TCP at once, without a close frame, as a network fault would."""
        with contextlib.suppress(OSError, LookupError):  # LookupError: no socket
            self.stream.extra(SocketAttribute.raw_socket).shutdown(socket.SHUT_RDWR)
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
                    data, self._pending = b"".join(self._pending), []  # all queued: one send
                    await self.stream.send(data)
                    self.queued -= len(data)
                    self._progress.set()
                    self._progress = self.new_event()
        except Exception as exc:  # the transport broke: the reader sees the end as well
            log.debug("write failed, closing the stream: %r", exc)
            self.abort()
        finally:  # all is out: our FIN, while the reader drains the peer's rest (`run`)
            self._closing = True
            self._progress.set()
            with contextlib.suppress(OSError, LookupError):  # LookupError: no socket
                self.stream.extra(SocketAttribute.raw_socket).shutdown(socket.SHUT_WR)

    async def run(self) -> None:
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(self._write_loop)
                # After our close the reader goes on, dropping what the peer still sends,
                # until its end or `close_timeout` (the read scope's deadline): closing a
                # socket with unread bytes sends a reset, which can destroy our close frame.
                with self._read_scope:
                    while True:
                        try:
                            data = await self.stream.receive(READ_SIZE)
                        except Exception:  # EOF, reset, TLS failure, aborted: the end
                            break
                        if not self.pump.closed:
                            self._drive(self.pump.feed, data, self.now())
                if not self.pump.closed:
                    self._drive(self.pump.eof, self.now())
                self.close()
        finally:
            await anyio.aclose_forcefully(self.stream)
            self.done.set()
