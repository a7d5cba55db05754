"""What the agent and mesh connections share: the receive path, bad-input outcomes,
timers, closing, and inbound rate limits (spec sections 2 and 4).

The shape follows websockets' and aioquic's sans-IO cores: bytes come in through
`receive_data(data, now)` / `receive_eof(now)`, and the application collects
`events_received()`, `data_to_send()` (an empty `bytes` means "close the
transport") and `next_deadline()`, calling `handle_timer(now)` when that passes.
The receive path never raises on bad peer input: it answers as the spec says
(BAD_FRAME, a close code) and reports the cause in `ConnectionClosed.error`.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .backoff import RetryDecision
from .codec import FrameFactory, decode_frame, encode_frame
from .config import Config
from .errors import FrameError, InvalidState, LocalProtocolError, RemoteError, RemoteProtocolError
from .events import ConnectionClosed, ErrorReceived, Event, ExtensionUnsupported
from .frames import Error, ErrorPayload, Frame
from .framing import (
    BinaryReceived,
    CloseReceived,
    Framing,
    FramingEvent,
    FramingFailed,
    ReadBuffer,
    TextReceived,
    TransportClosed,
)
from .states import AgentState, MeshState, transition

__all__ = ["ConnectionStats", "CLOSE_TRANSPORT"]

CLOSE_TRANSPORT = b""
"""The marker in `data_to_send()`: write nothing more, close the transport."""

# The end states of both machines, for `in` tests: an enum member read through its class
# costs ~0.1 µs (EnumType's attribute lookup), and `.name` more; these run per frame.
_ENDING = (AgentState.CLOSING, AgentState.CLOSED, MeshState.CLOSING, MeshState.CLOSED)
_CLOSED = (AgentState.CLOSED, MeshState.CLOSED)

# Frame types a peer asks us to do work for: the only ones an inbound rate limit refuses.
# Replies (results, chunks, pongs, errors...) are always processed, or data would be lost.
_REQUEST_TYPES = frozenset({"dispatch", "tool_call", "ping", "heartbeat", "token_refresh"})


@dataclass(slots=True)
class ConnectionStats:
    """Counters for metrics; nothing here changes behaviour."""

    frames_received: int = 0
    frames_sent: int = 0
    bad_frames: int = 0
    late_terminal_frames: int = 0
    """Terminal frames for a dispatch that already ended (first terminal wins, spec 3)."""
    duplicate_chunks: int = 0
    rate_limited: int = 0
    redelivered_dispatches: int = 0


class _TokenBucket:
    """Inbound frame rate: `rate` per second with bursts of `burst` (spec 3, RATE_LIMITED)."""

    __slots__ = ("_burst", "_last", "_rate", "_tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._last = now

    def take(self, now: float) -> float:
        """0.0 when a frame may pass, else the seconds until one may."""
        if now > self._last:
            self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
            self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self._rate if self._rate > 0 else float("inf")


class _Connection:
    """Base of `AgentConnection` and `MeshConnection`; not used directly."""

    _table: Any
    _client: bool
    state: Any

    def __init__(
        self,
        config: Config | None,
        *,
        now: float,
        wall_clock: Callable[[], float],
        random_bytes: Callable[[int], bytes] | None,
        frames: FrameFactory | None = None,
    ) -> None:
        self.config = config if config is not None else Config()
        # Ids must be unique and increasing per process, not per connection: a server passes
        # one factory to all its connections, which keeps each idle connection small.
        self.frames = frames if frames is not None else FrameFactory(wall_clock, random_bytes)
        self.stats = ConnectionStats()
        self._wall_clock = wall_clock
        self._out: list[bytes] = []
        self._events: list[Event] = []
        self._framing: Framing | None = None
        self._timers: dict[str, float] = {}
        self._deadlines: list[tuple[float, str]] = []  # heap of (deadline, dispatch id)
        self._last_received = now
        self._now = now  # the latest time any call told us, for methods that take no `now`
        self._bucket = _TokenBucket(
            self.config.max_frames_per_second, self.config.frame_burst, now
        )
        self._extensions_sent: dict[str, str] = {}  # frame id -> type, for downgrade (spec 3)
        self._extensions_off: set[str] = set()
        self._close_error: RemoteError | None = None
        self._closed_reported = False
        self._transport_closed = False

    # -- public API common to both sides -------------------------------------------------------

    def events_received(self) -> list[Event]:
        """Events since the last call, oldest first."""
        events, self._events = self._events, []
        return events

    def data_to_send(self) -> list[bytes]:
        """Bytes to write, in order; an empty `bytes` means close the transport after them."""
        if self._framing is not None:
            pending = self._framing.data_to_send()
            if pending:
                self._out.append(pending)
        out, self._out = self._out, []
        return out

    def next_deadline(self) -> float | None:
        """When `handle_timer()` must next be called (monotonic seconds), or None."""
        deadline = min(self._timers.values(), default=None)
        heap = self._deadlines
        while heap and not self._dispatch_deadline_live(heap[0][1], heap[0][0]):
            heapq.heappop(heap)
        if heap and (deadline is None or heap[0][0] < deadline):
            deadline = heap[0][0]
        return deadline

    def handle_timer(self, now: float) -> None:
        """Run every timer due at `now`; then call `data_to_send()` and `next_deadline()`."""
        if self._closed_reported and self._transport_closed:
            return
        self._now = max(self._now, now)
        for name, deadline in sorted(self._timers.items(), key=lambda item: item[1]):
            if deadline <= now and self._timers.get(name) == deadline:
                del self._timers[name]
                self._on_timer(name, now)
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            deadline, dispatch_id = heapq.heappop(heap)
            if self._dispatch_deadline_live(dispatch_id, deadline):
                self._on_dispatch_deadline(dispatch_id, now)

    def receive_data(self, data: ReadBuffer, now: float) -> None:
        """Feed bytes read from the transport (bytes, or a bytearray or memoryview, copied);
        then call `events_received()`, `data_to_send()` and `next_deadline()`. Never raises
        on bad input from the peer."""
        if self._transport_closed or not data:
            return
        if type(data) is not bytes:
            data = bytes(data)
        heap, timers = self._deadlines, self._timers
        if (heap and heap[0][0] <= now) or (timers and min(timers.values()) <= now):
            # Time order: a deadline that passed before these bytes were read fires first,
            # so a result read after its dispatch's deadline loses to the timeout. (A due
            # heap entry may be one that already ended: `handle_timer` skips it.)
            self.handle_timer(now)
            if self._transport_closed:
                return
        self._last_received = now
        self._now = max(self._now, now)
        self._feed(data, now)

    def receive_eof(self, now: float) -> None:
        """The transport ended (the peer closed TCP, or it broke)."""
        if self._transport_closed:
            return
        if self._framing is not None:
            for event in self._framing.receive_data(None):
                self._on_framing_event(event, now)
        self._lost("transport ended without a close frame", now)

    @property
    def closed(self) -> bool:
        return self.state in _CLOSED

    # -- hooks for the two sides ---------------------------------------------------------------

    def _feed(self, data: bytes, now: float) -> None:
        raise NotImplementedError

    def _on_frame(self, frame: Frame, now: float) -> None:
        raise NotImplementedError

    def _on_timer(self, name: str, now: float) -> None:
        raise NotImplementedError

    def _on_dispatch_deadline(self, dispatch_id: str, now: float) -> None:
        raise NotImplementedError

    def _dispatch_deadline_live(self, dispatch_id: str, deadline: float) -> bool:
        return False

    def _in_flight_ids(self) -> tuple[str, ...]:
        return ()

    def _hello_expected(self) -> bool:
        return False

    def _retry_after_close(self, code: int | None, by_peer: bool) -> RetryDecision:
        return RetryDecision.FINAL

    def _on_closed(self, now: float) -> None:
        """Called once when the connection ends, before ConnectionClosed is reported."""

    # -- the WebSocket phase -------------------------------------------------------------------

    def _start_framing(self, extra: bytes, now: float) -> None:
        self._framing = Framing(
            self._client,
            max_message_bytes=self.config.max_message_bytes,
            max_fragments=self.config.max_fragments,
        )
        self._timers["dead_peer"] = now + self.config.dead_peer_timeout
        if extra:
            self._feed_framing(extra, now)

    def _feed_framing(self, data: bytes, now: float) -> None:
        framing = self._framing
        if framing is None:  # only called after the upgrade
            raise InvalidState("no WebSocket yet")
        self._timers["dead_peer"] = now + self.config.dead_peer_timeout
        for event in framing.receive_data(data):
            if type(event) is TextReceived and self.state not in _ENDING:
                self._on_text(event.text, now)  # every frame: skip the dispatch below
            else:
                self._on_framing_event(event, now)

    def _on_framing_event(self, event: FramingEvent, now: float) -> None:
        if isinstance(event, TextReceived):
            if self.state in _ENDING:
                return  # after our close frame the peer's frames are moot
            self._on_text(event.text, now)
        elif isinstance(event, BinaryReceived):
            binary = "binary messages are not used by svantic.v1"
            self._close_error = RemoteProtocolError(binary, close_code=1003)  # keep the cause
            self._fail(1003, binary, now)
        elif isinstance(event, CloseReceived):
            self._peer_closed(event.code, event.reason, now)
        elif isinstance(event, FramingFailed):
            self._close_error = RemoteProtocolError(
                event.reason, code="BAD_FRAME", close_code=event.close_code
            )
            # Framing queued the close frame itself: report, then drop the transport.
            self._finish(event.close_code, event.reason, by_peer=False, now=now)
            self._drop_transport()
        elif isinstance(event, TransportClosed):
            self._lost("transport ended without a close frame", now)
        # PingReceived / PongReceived: Framing queued the pong; any traffic is liveness.

    def _on_text(self, text: str, now: float) -> None:
        try:
            frame = decode_frame(text)
        except FrameError as exc:
            self.stats.bad_frames += 1
            self._send_error("BAD_FRAME", exc.message, in_reply_to=exc.frame_id)
            close_code = exc.close_code
            if close_code is None and self._hello_expected():
                close_code = 1002  # spec 3: any first frame but hello, known type or not
            if close_code is not None:
                self._close_error = exc
                self._fail(close_code, exc.message, now)
            return
        self.stats.frames_received += 1
        if frame.type in _REQUEST_TYPES:
            wait = self._bucket.take(now)
            if wait:
                self.stats.rate_limited += 1
                self._send_rate_limited(frame.id, max(wait, self.config.rate_limit_retry_after))
                return
        self._on_frame(frame, now)

    def _on_error_frame(self, payload: ErrorPayload, in_reply_to: str | None) -> None:
        """An error that is not a dispatch's terminal failure (the subclass checked that)."""
        if in_reply_to is not None and payload.code == "BAD_FRAME":
            extension = self._extensions_sent.pop(in_reply_to, None)
            if extension is not None:
                self._extensions_off.add(extension)
                self._events.append(ExtensionUnsupported(extension))
                return
        self._events.append(
            ErrorReceived(payload.code, payload.message, payload.detail, in_reply_to)
        )

    # -- sending ---------------------------------------------------------------------------------

    def _send(self, frame: Frame, encoded: bytes | None = None) -> None:
        """Send one frame; `encoded` is its bytes when the caller had to encode it already."""
        if self._framing is None or self.state in _ENDING:
            raise InvalidState(f"cannot send {frame.type} in state {self.state.name}")
        if self._framing.closed_sent:
            # A reply to a message read in the same batch as the peer's close or a framing
            # failure: that close is queued already and nothing may follow it (RFC 6455 5.5.1).
            return
        self._framing.send_text(encoded or encode_frame(frame))
        self.stats.frames_sent += 1

    def _send_error(
        self,
        code: str,
        message: str | None = None,
        *,
        in_reply_to: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> Error:
        frame = self.frames.new(
            Error, ErrorPayload(code=code, message=message, detail=detail), in_reply_to=in_reply_to
        )
        if self._framing is not None and self.state not in _ENDING:
            self._send(frame)
        return frame

    def _send_rate_limited(self, frame_id: str, wait: float) -> None:
        retry_after_ms = max(1, round(wait * 1000))
        self._send_error(
            "RATE_LIMITED",
            "too many frames: retry later",
            in_reply_to=frame_id,
            detail={"retry_after_ms": retry_after_ms},
        )

    def _send_extension(self, frame: Frame) -> bool:
        """Send an extension frame unless the peer showed it does not know the type."""
        if frame.type in self._extensions_off:
            return False
        self._extensions_sent[frame.id] = frame.type
        if len(self._extensions_sent) > 256:  # only recent ones can still be answered
            self._extensions_sent.pop(next(iter(self._extensions_sent)))
        self._send(frame)
        return True

    # -- closing ---------------------------------------------------------------------------------

    def close(self, code: int = 1000, reason: str = "", *, now: float) -> None:
        """Start the WebSocket closing handshake; then call `data_to_send()`."""
        if self.state in _ENDING:
            return
        if self._framing is None:
            self._finish(code, reason, by_peer=False, now=now)
            self._drop_transport()
            return
        self._framing.send_close(code, reason)
        self._move("send_close")
        self._timers = {"close": now + self.config.close_timeout}
        self._finish(code, reason, by_peer=False, now=now, keep_state=True)

    def _fail(self, code: int, reason: str, now: float) -> None:
        """We end the connection because of the peer: close frame, then drop the transport."""
        if self._framing is not None and self.state not in _ENDING:
            self._framing.send_close(code, reason)
        self._finish(code, reason, by_peer=False, now=now)
        self._drop_transport()

    def _peer_closed(self, code: int | None, reason: str, now: float) -> None:
        # Framing has queued the echo when the peer started it; either way we are done.
        self._finish(code, reason, by_peer=not self._closed_reported, now=now)
        if self.state not in _CLOSED:
            self._move("peer_close")  # the move the state tables (and the diagram) name
        self._drop_transport()

    def _lost(self, reason: str, now: float) -> None:
        self._finish(None, reason, by_peer=True, now=now)
        self._drop_transport()

    def _drop_transport(self) -> None:
        if not self._transport_closed:
            if self._framing is not None:
                pending = self._framing.data_to_send()
                if pending:
                    self._out.append(pending)
            self._out.append(CLOSE_TRANSPORT)
            self._transport_closed = True
            self._timers.clear()
            self._deadlines.clear()
        if self.state not in _CLOSED:
            self._move("transport_lost")

    def _finish(
        self,
        code: int | None,
        reason: str,
        *,
        by_peer: bool,
        now: float,
        keep_state: bool = False,
    ) -> None:
        """Report ConnectionClosed once; in-flight work is handed to `_on_closed`."""
        if self._closed_reported:
            return
        self._closed_reported = True
        in_flight = self._in_flight_ids()
        self._on_closed(now)
        self._events.append(
            ConnectionClosed(
                code=code,
                reason=reason,
                by_peer=by_peer,
                retry=self._retry_after_close(code, by_peer),
                error=self._close_error,
                in_flight=in_flight,
            )
        )
        if not keep_state:
            self._timers.clear()

    def _move(self, what: str) -> None:
        self.state = transition(self._table, self.state, what)

    def _require(self, *states: AgentState | MeshState, action: str) -> None:
        if self.state not in states:
            if self.state in _CLOSED:
                raise InvalidState(f"cannot {action}: the connection is closed")
            raise LocalProtocolError(f"cannot {action} in state {self.state.name}")
