"""WebSocket framing after the handshake (spec sections 2 and 4), sans-IO.

This is the only module that imports wsproto, so the framing backend can be
swapped without touching the connection state machines above it. wsproto parses
and serialises frames; `Framing` adds what wsproto leaves to its caller and the
spec requires: message reassembly with a size cap (1 MiB) and a fragment cap
(1024) checked *while* bytes arrive, automatic pongs, the close echo, and one
failure path that queues the right close code (1002, 1007, 1009) and reports it.
permessage-deflate is never used (section 4: it inflates without bound).

Usage: feed `receive_data(bytes)` (or `None` at EOF), act on the returned
events, then write `data_to_send()` to the transport.

Fast path. wsproto's pure-Python frame parser and serialiser cost ~8 us per frame,
most of a dispatch round trip. Nearly every frame of section 2 is a whole,
unfragmented text message, so `Framing` parses and serialises exactly those itself
and hands everything else to wsproto, with the same events and the same queued
bytes for every input stream (a differential test checks this):

* receive: only while wsproto holds no buffered bytes, no half-parsed frame and no
  message in progress, whole text frames (FIN set, RSV clear, masked iff we are
  the server, minimal length, at most `max_message_bytes`, strict UTF-8) are
  decoded from the front of the input. At the first frame that is anything else
  (control, fragment, binary, invalid, oversized, incomplete) *all* remaining
  bytes go to wsproto, which then reports or fails exactly as it would have.
* send: text frames are serialised here (wsproto keeps no send state for a whole
  data frame); ping, pong and close still go through wsproto, which owns the
  closing state.

The receive side reads wsproto internals, all set up by `FrameProtocol.__init__`
(checked on wsproto 1.3.2): `Connection._proto._frame_decoder` with `.buffer.buffer`
(the unparsed bytes) and `.header` (a frame whose payload is still arriving), and
`Connection._proto._message_decoder.opcode` (a fragmented message in progress).
If a wsproto lays them out otherwise, the fast path turns itself off. It also relies
on `Framing` itself: a close received, a failure or EOF sets `_done`, so wsproto's
parser is never consulted again once it has stopped.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from os import urandom
from typing import Any, TypeAlias, cast

from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Event, Ping, Pong, TextMessage
from wsproto.frame_protocol import Buffer, FrameDecoder, MessageDecoder
from wsproto.utilities import LocalProtocolError as _WsprotoLocalProtocolError

from .errors import LocalProtocolError

__all__ = [
    "DEFAULT_MAX_FRAGMENTS",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "BinaryReceived",
    "CloseReceived",
    "Framing",
    "FramingEvent",
    "FramingFailed",
    "FramingState",
    "PingReceived",
    "PongReceived",
    "TextReceived",
    "TransportClosed",
]

DEFAULT_MAX_MESSAGE_BYTES = 1 << 20
"""Section 4: a message is at most 1 MiB, else close 1009."""

DEFAULT_MAX_FRAGMENTS = 1024
"""Section 4: a message is at most 1024 frames, else close 1009 (each frame costs ~8 us)."""

# Larger inputs are handed to wsproto in slices of this size, so a failure (1009,
# 1007, 1002) stops the work after at most one slice instead of decoding
# everything a careless adapter passed in one call.
_FEED_SLICE_BYTES = 1 << 16

# RFC 6455 section 7.4.1: "no status code was present" is reported as 1005.
_NO_STATUS_RECEIVED = 1005
_PROTOCOL_ERROR = 1002
_MESSAGE_TOO_BIG = 1009
# RFC 6455 7.4: codes a peer accepts on the wire below 3000 (1004-1006 and 1015
# are reserved or local-only; wsproto peers also refuse the unregistered 1014).
_SENDABLE_CLOSE_CODES = frozenset(
    (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013)
)

# -- fast path constants (RFC 6455 section 5.2) --------------------------------------

_FAST_PATH_DEFAULT = True
"""Whether a new `Framing` parses and serialises whole text frames itself."""

_FIN_TEXT = 0x81  # FIN set, RSV1-3 clear, opcode TEXT: the only first byte we take
_MASK_BIT = 0x80
_LENGTH_16 = 126  # the 7-bit length field's markers for a 16- and a 64-bit length
_LENGTH_64 = 127
_HEADER_16 = struct.Struct("!BBH")
_HEADER_64 = struct.Struct("!BBQ")

# (Un)masking: one big-int XOR is fastest for small payloads (JSON frames of a few
# hundred bytes); above this size four strided `bytes.translate` calls win. Measured
# int/translate time: 0.64x at 256 bytes, 0.75x at 300, 1.0x at 1 KiB, 1.3x at 64 KiB.
_INT_XOR_MAX_BYTES = 1024
_XOR_TABLES = tuple(
    (
        int.from_bytes(bytes(range(256)), "little") ^ int.from_bytes(bytes((key,)) * 256, "little")
    ).to_bytes(256, "little")
    for key in range(256)
)

# Client masking keys (RFC 6455 5.3: unpredictable, fresh per frame) are cut from
# an os.urandom pool, refilled when spent: one system call per 64 frames instead
# of one per frame. Allocated on the first send, so servers never hold one.
_MASK_POOL_BYTES = 256


@dataclass(frozen=True, slots=True)
class TextReceived:
    """A whole text message, reassembled from its fragments and valid UTF-8."""

    text: str


@dataclass(frozen=True, slots=True)
class BinaryReceived:
    """A whole binary message arrived; only its size is kept.

    svantic.v1 frames are text only (section 2): the caller answers with
    `send_close(1003)`. The payload is never buffered.
    """

    size: int


@dataclass(frozen=True, slots=True)
class PingReceived:
    """A WebSocket ping; the pong is already queued (unless we had sent a close)."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class PongReceived:
    """A WebSocket pong: proof of life for the dead-peer timer (section 4)."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class CloseReceived:
    """The peer's close frame; `code` is None when the frame carried no code (1005).

    If we had not sent a close, the echo is already queued; if we had, this
    completes the closing handshake. Either way the caller then closes the transport
    once `data_to_send()` is flushed.
    """

    code: int | None
    reason: str


@dataclass(frozen=True, slots=True)
class FramingFailed:
    """The peer broke the WebSocket rules; a close with `close_code` is already queued.

    1002 protocol error (bad frame, unmasked client frame, ...), 1007 invalid
    UTF-8, 1009 message over the size or fragment limit (sections 2 and 4).
    """

    close_code: int
    reason: str


@dataclass(frozen=True, slots=True)
class TransportClosed:
    """The transport reached EOF (`receive_data(None)`): an abnormal end (1006)
    unless a close was exchanged first."""


ReadBuffer: TypeAlias = bytes | bytearray | memoryview
"""What a transport may hand over as read bytes (`recv`, `recv_into` views); copied once to
`bytes` where it comes in, so the core never keeps a view of the caller's buffer."""

FramingEvent: TypeAlias = (
    TextReceived
    | BinaryReceived
    | PingReceived
    | PongReceived
    | CloseReceived
    | FramingFailed
    | TransportClosed
)


class FramingState(enum.Enum):
    """Where the WebSocket closing handshake is (RFC 6455 section 7)."""

    OPEN = "open"
    """Messages flow both ways."""
    CLOSING = "closing"
    """We sent a close and wait for the peer's; received messages are still reported."""
    CLOSED = "closed"
    """Closes exchanged, a failure queued its close, or EOF: flush and drop the transport."""


_TRANSPORT_CLOSED = TransportClosed()


def _xor_mask_py(data: bytes | bytearray, start: int, stop: int, key: bytes) -> bytes | bytearray:
    """`data[start:stop]` XOR the repeated 4-byte `key` (RFC 6455 5.3), both ways."""
    length = stop - start
    if length <= _INT_XOR_MAX_BYTES:
        from_bytes = int.from_bytes
        repeated_key = (key * ((length + 3) >> 2))[:length]
        return (
            from_bytes(data[start:stop], "little") ^ from_bytes(repeated_key, "little")
        ).to_bytes(length, "little")
    tables = _XOR_TABLES
    out = bytearray(length)
    out[0::4] = data[start:stop:4].translate(tables[key[0]])
    out[1::4] = data[start + 1 : stop : 4].translate(tables[key[1]])
    out[2::4] = data[start + 2 : stop : 4].translate(tables[key[2]])
    out[3::4] = data[start + 3 : stop : 4].translate(tables[key[3]])
    return out


_xor_mask: Callable[[bytes | bytearray, int, int, bytes], bytes | bytearray]
try:  # the same in C (a byte loop), when the optional extension is built
    from ._speedups import xor_mask as _xor_mask
except ImportError:  # pragma: no cover - tests/core/test_speedups.py runs both
    _xor_mask = _xor_mask_py


def _wsproto_receive_state(
    connection: Connection,
) -> tuple[FrameDecoder, Buffer, MessageDecoder] | None:
    """The wsproto objects whose state says "idle" (see the module docstring), or None
    if this wsproto lays them out differently: then the fast path stays off."""
    protocol = getattr(connection, "_proto", None)
    frame_decoder = getattr(protocol, "_frame_decoder", None)
    message_decoder = getattr(protocol, "_message_decoder", None)
    if not isinstance(frame_decoder, FrameDecoder) or not isinstance(
        message_decoder, MessageDecoder
    ):
        return None
    buffer = getattr(frame_decoder, "buffer", None)
    if (
        not isinstance(buffer, Buffer)
        or not isinstance(getattr(buffer, "buffer", None), bytearray)
        or getattr(frame_decoder, "header", False) is not None
        or getattr(message_decoder, "opcode", False) is not None
    ):
        return None
    return frame_decoder, buffer, message_decoder


class Framing:
    """One side of a WebSocket connection after the HTTP upgrade (sections 2 and 4).

    `receive_data()` never raises on peer input: a violation becomes a
    `FramingFailed` event and a queued close. After a failure, a completed close
    or EOF, further input is ignored. Whatever a method queues (messages, pongs,
    close frames) is collected by `data_to_send()`.
    """

    __slots__ = (
        "_client",
        "_close_received",
        "_closed_sent",
        "_connection",
        "_done",
        "_fast_send",
        "_fragment_open",
        "_fragments",
        "_handlers",
        "_mask_offset",
        "_mask_pool",
        "_max_fragments",
        "_max_message_bytes",
        "_message_bytes",
        "_outgoing",
        "_text_parts",
        "_ws_buffer",
        "_ws_frame_decoder",
        "_ws_message_decoder",
    )

    def __init__(
        self,
        client: bool,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_fragments: int = DEFAULT_MAX_FRAGMENTS,
        _fast_path: bool = _FAST_PATH_DEFAULT,
    ) -> None:
        """`_fast_path=False` (private, for tests and benchmarks) sends every frame
        through wsproto, the reference the fast path must match."""
        if isinstance(max_message_bytes, bool) or not isinstance(max_message_bytes, int):
            raise LocalProtocolError("max_message_bytes must be an int")
        if isinstance(max_fragments, bool) or not isinstance(max_fragments, int):
            raise LocalProtocolError("max_fragments must be an int")
        if max_message_bytes < 1 or max_fragments < 1:
            raise LocalProtocolError("max_message_bytes and max_fragments must be >= 1")
        self._connection = Connection(
            ConnectionType.CLIENT if client else ConnectionType.SERVER, extensions=[]
        )
        self._max_message_bytes = max_message_bytes
        self._max_fragments = max_fragments
        self._client = bool(client)
        receive_state = _wsproto_receive_state(self._connection) if _fast_path else None
        if receive_state is None:
            self._ws_frame_decoder: FrameDecoder | None = None
            self._ws_buffer: Buffer | None = None
            self._ws_message_decoder: MessageDecoder | None = None
        else:
            self._ws_frame_decoder, self._ws_buffer, self._ws_message_decoder = receive_state
        self._fast_send = bool(_fast_path)
        self._mask_pool = b""
        self._mask_offset = 0
        self._outgoing: list[bytes] = []
        # Reassembly of the message in progress: `_fragments` counts frames started,
        # `_fragment_open` says the last event ended inside a frame (wsproto streams
        # partial frames), `_message_bytes` is the running size in bytes.
        self._text_parts: list[str] = []
        self._fragments = 0
        self._fragment_open = False
        self._message_bytes = 0
        self._closed_sent = False
        self._close_received = False
        self._done = False
        # Type dispatch for the rarer events; text has an inlined fast path.
        self._handlers: dict[type[Event], Callable[[Any, list[FramingEvent]], None]] = {
            BytesMessage: self._on_binary,
            Ping: self._on_ping,
            Pong: self._on_pong,
            CloseConnection: self._on_close,
        }

    # -- state -------------------------------------------------------------

    @property
    def closed_sent(self) -> bool:
        """True once a close frame is queued by us (echo and failures included)."""
        return self._closed_sent

    @property
    def close_received(self) -> bool:
        """True once the peer's close frame arrived."""
        return self._close_received

    @property
    def state(self) -> FramingState:
        """OPEN, CLOSING (our close sent, theirs awaited) or CLOSED."""
        if self._done:
            return FramingState.CLOSED
        if self._closed_sent:
            return FramingState.CLOSING
        return FramingState.OPEN

    # -- sending -----------------------------------------------------------

    def send_text(self, text: str | bytes) -> None:
        """Queue one text message (section 2: every frame is one text message).

        `text` may also be bytes already encoded as UTF-8 (the codec's output), so a
        frame is not decoded to `str` only to be encoded again. Raises
        `LocalProtocolError` once a close was sent or the transport ended.
        Then call `data_to_send()`.
        """
        if self._closed_sent or self._done:
            raise LocalProtocolError("cannot send a message after the WebSocket close")
        try:
            # wsproto is OPEN whenever the flags above allow a send; the state check
            # is a safety net, so that a send it would refuse is still refused.
            if not self._fast_send or self._connection.state is not ConnectionState.OPEN:
                data = text if isinstance(text, str) else text.decode("utf-8")
                self._outgoing.append(self._connection.send(TextMessage(data=data)))
                return
            payload = text if isinstance(text, bytes) else text.encode("utf-8")
        except UnicodeError as exc:  # a lone surrogate, or bytes that are not UTF-8
            raise LocalProtocolError(f"text is not encodable as UTF-8: {exc}") from exc
        # The fast path: the same bytes wsproto writes for a whole text message (RFC
        # 6455 5.2: FIN, minimal length; a client masks with a fresh key), which
        # leaves its send state untouched: it keeps none between whole messages.
        length = len(payload)
        if not self._client:
            if length < _LENGTH_16:
                self._outgoing.append(bytes((_FIN_TEXT, length)) + payload)
            elif length <= 0xFFFF:
                self._outgoing.append(_HEADER_16.pack(_FIN_TEXT, _LENGTH_16, length) + payload)
            else:
                self._outgoing.append(_HEADER_64.pack(_FIN_TEXT, _LENGTH_64, length) + payload)
            return
        if length < _LENGTH_16:
            header = bytes((_FIN_TEXT, _MASK_BIT | length))
        elif length <= 0xFFFF:
            header = _HEADER_16.pack(_FIN_TEXT, _MASK_BIT | _LENGTH_16, length)
        else:
            header = _HEADER_64.pack(_FIN_TEXT, _MASK_BIT | _LENGTH_64, length)
        key = self._next_mask_key()
        self._outgoing.append(header + key + _xor_mask(payload, 0, length, key))

    def _next_mask_key(self) -> bytes:
        """4 fresh bytes from the pool (RFC 6455 5.3), refilled from os.urandom."""
        offset = self._mask_offset
        pool = self._mask_pool
        if offset >= len(pool):
            pool = self._mask_pool = urandom(_MASK_POOL_BYTES)
            offset = 0
        self._mask_offset = offset + 4
        return pool[offset : offset + 4]

    def send_ping(self, payload: bytes = b"") -> None:
        """Queue a WebSocket ping (section 4 liveness); at most 125 bytes.

        Raises `LocalProtocolError` once a close was sent or the transport ended.
        Then call `data_to_send()`.
        """
        if self._closed_sent or self._done:
            raise LocalProtocolError("cannot send a ping after the WebSocket close")
        if len(payload) > 125:
            raise LocalProtocolError("a ping payload is at most 125 bytes (RFC 6455 5.5)")
        self._outgoing.append(self._connection.send(Ping(payload=payload)))

    def send_close(self, code: int, reason: str = "") -> None:
        """Queue our close frame with `code` (section 4 lists the codes we use).

        Idempotent: once a close was queued (ours, an echo, or a failure's) or the
        transport ended, this does nothing, so shutdown paths need not race the
        receive path. The reason is cut to fit the 125-byte control frame. Then
        call `data_to_send()` and, once the peer's close arrives (`CloseReceived`)
        or a timeout passes, close the transport.
        """
        if isinstance(code, bool) or not isinstance(code, int):
            raise LocalProtocolError("close code must be an int")
        if code not in _SENDABLE_CLOSE_CODES and not 3000 <= code <= 4999:
            raise LocalProtocolError(f"close code {code} cannot be sent (RFC 6455 7.4)")
        if self._closed_sent or self._done:
            return
        self._queue_close(code, reason)

    def data_to_send(self) -> bytes:
        """Return and clear the bytes queued for the transport (b"" when none)."""
        outgoing = self._outgoing
        if not outgoing:
            return b""
        data = outgoing[0] if len(outgoing) == 1 else b"".join(outgoing)
        outgoing.clear()
        return data

    # -- receiving ---------------------------------------------------------

    def receive_data(self, data: ReadBuffer | None) -> list[FramingEvent]:
        """Feed bytes from the transport (`None` at EOF) and return what they meant.

        Never raises on peer input. Replies the protocol obliges (pong, close echo,
        the failure's close) are already queued: then call `data_to_send()`.
        """
        if self._done:
            return []
        if data is None:
            self._done = True
            self._text_parts = []
            return [_TRANSPORT_CLOSED]
        if type(data) is not bytes:
            data = bytes(data)
        events: list[FramingEvent] = []
        frame_decoder = self._ws_frame_decoder
        consumed = 0
        if (
            frame_decoder is not None
            and frame_decoder.header is None
            and not self._ws_buffer.buffer  # type: ignore[union-attr]
            and self._ws_message_decoder.opcode is None  # type: ignore[union-attr]
        ):
            consumed = self._receive_whole_text_frames(data, events)
            if consumed == len(data):
                return events
        total = len(data)
        if total > _FEED_SLICE_BYTES:
            # Slices end where they would without the fast path (at multiples of the slice
            # size from the start of this read): which failure a slice shows first (1007
            # or 1009 for an oversized frame with bad UTF-8) must not depend on it.
            view = memoryview(data)
            start = consumed
            while start < total and not self._done:
                stop = min(total, (start // _FEED_SLICE_BYTES + 1) * _FEED_SLICE_BYTES)
                self._receive_through_wsproto(bytes(view[start:stop]), events)
                start = stop
        else:
            self._receive_through_wsproto(data[consumed:] if consumed else data, events)
        return events

    def _receive_whole_text_frames(self, data: bytes, events: list[FramingEvent]) -> int:
        """The receive fast path: decode whole text frames from the front of `data`
        and return how many bytes they took.

        Stops, consuming nothing more, at the first frame wsproto must see: one that
        is not FIN+TEXT with RSV clear, is masked wrongly for our side, encodes its
        length non-minimally (RFC 6455 5.2 requires the minimal form; wsproto fails
        it 1002), is over `max_message_bytes` (1009 as the limit is crossed, section
        4), is not strict UTF-8 (1007, section 2), or is incomplete. wsproto then
        gives the exact events and close of today, so nothing here can fail.
        """
        end = len(data)  # `receive_data` made it bytes
        position = 0
        masked = not self._client  # RFC 6455 5.1: clients mask, servers never do
        mask_bit = _MASK_BIT if masked else 0
        max_bytes = self._max_message_bytes
        while end - position >= 2:
            if data[position] != _FIN_TEXT:
                break
            second = data[position + 1]
            if (second & _MASK_BIT) != mask_bit:
                break
            length = second & 0x7F
            start = position + 2
            if length == _LENGTH_16:
                if end - start < 2:
                    break
                length = (data[start] << 8) | data[start + 1]
                if length < _LENGTH_16:
                    break
                start += 2
            elif length == _LENGTH_64:
                if end - start < 8:
                    break
                length = int.from_bytes(data[start : start + 8], "big")
                if length <= 0xFFFF or length >> 63:
                    break
                start += 8
            if length > max_bytes:
                break
            payload: bytes | bytearray
            if masked:
                stop = start + 4 + length
                if stop > end:
                    break
                payload = _xor_mask(data, start + 4, stop, data[start : start + 4])
            else:
                stop = start + length
                if stop > end:
                    break
                payload = data[start:stop]
            try:
                text = payload.decode("utf-8")
            except UnicodeDecodeError:
                break
            events.append(TextReceived(text))
            position = stop
        return position

    def _receive_through_wsproto(self, data: bytes, events: list[FramingEvent]) -> None:
        connection = self._connection
        connection.receive_data(data)
        max_bytes = self._max_message_bytes
        for event in connection.events():
            if type(event) is TextMessage:
                text = event.data
                # Size in bytes; ASCII (the common case, JSON) needs no encode.
                size = len(text) if text.isascii() else len(text.encode("utf-8"))
                if event.message_finished and not self._fragments:
                    # Fast path: a whole message in one frame and one read.
                    if size > max_bytes:
                        self._fail(events, _MESSAGE_TOO_BIG, _too_big(max_bytes))
                        break
                    events.append(TextReceived(text))
                    continue
                if not self._fragment_open:
                    if self._fragments == self._max_fragments:
                        self._fail(events, _MESSAGE_TOO_BIG, self._too_many_fragments())
                        break
                    self._fragments += 1
                total = self._message_bytes + size
                if total > max_bytes:
                    self._fail(events, _MESSAGE_TOO_BIG, _too_big(max_bytes))
                    break
                if event.message_finished:
                    parts = self._text_parts
                    parts.append(text)
                    events.append(TextReceived("".join(parts)))
                    parts.clear()
                    self._message_bytes = 0
                    self._fragments = 0
                    self._fragment_open = False
                else:
                    if text:
                        self._text_parts.append(text)
                    self._message_bytes = total
                    self._fragment_open = not event.frame_finished
            else:
                self._handlers[type(event)](event, events)
                if self._done:
                    break

    # -- rarer events (dispatched on type) -----------------------------------

    def _on_binary(self, event: BytesMessage, events: list[FramingEvent]) -> None:
        # Count, cap and drop: the caller closes 1003 (section 2), so the payload
        # is never needed, but the caps still apply while it streams in.
        if not self._fragment_open:
            if self._fragments == self._max_fragments:
                self._fail(events, _MESSAGE_TOO_BIG, self._too_many_fragments())
                return
            self._fragments += 1
        total = self._message_bytes + len(event.data)
        if total > self._max_message_bytes:
            self._fail(events, _MESSAGE_TOO_BIG, _too_big(self._max_message_bytes))
            return
        if event.message_finished:
            events.append(BinaryReceived(total))
            self._message_bytes = 0
            self._fragments = 0
            self._fragment_open = False
        else:
            self._message_bytes = total
            self._fragment_open = not event.frame_finished

    def _on_ping(self, event: Ping, events: list[FramingEvent]) -> None:
        payload = bytes(event.payload)
        # RFC 6455 5.5.3: answer with the same payload; after our close, send nothing.
        if not self._closed_sent:
            self._outgoing.append(self._connection.send(Pong(payload=payload)))
        events.append(PingReceived(payload))

    def _on_pong(self, event: Pong, events: list[FramingEvent]) -> None:
        events.append(PongReceived(bytes(event.payload)))

    def _on_close(self, event: CloseConnection, events: list[FramingEvent]) -> None:
        connection_state = self._connection.state
        if connection_state is ConnectionState.OPEN or (
            connection_state is ConnectionState.LOCAL_CLOSING
        ):
            # wsproto reports its own parse failures as a CloseConnection without
            # changing state; a real close frame moves it to REMOTE_CLOSING/CLOSED.
            self._fail(events, int(event.code), event.reason or "invalid frame")
            return
        self._close_received = True
        self._done = True
        self._text_parts = []
        code = int(event.code)
        received_code = None if code == _NO_STATUS_RECEIVED else code
        if connection_state is ConnectionState.REMOTE_CLOSING:
            # RFC 6455 5.5.1: echo the close (with its code) if we had not sent one.
            self._closed_sent = True
            # Pass wsproto's own code object: it writes an empty close only for its
            # NO_STATUS_RCVD member, and would turn a plain 1005 into 1000.
            # Read as an object: a compiled build would otherwise unbox it to a plain int.
            code_object: Any = cast(Any, event).code
            self._outgoing.append(self._connection.send(CloseConnection(code=code_object)))
        events.append(CloseReceived(received_code, event.reason or ""))

    # -- failure -------------------------------------------------------------

    def _fail(self, events: list[FramingEvent], close_code: int, reason: str) -> None:
        """Queue our close with `close_code` (unless one was sent) and stop reading."""
        if not self._closed_sent:
            self._queue_close(close_code, reason)
        self._done = True
        self._text_parts = []
        events.append(FramingFailed(close_code, reason))

    def _too_many_fragments(self) -> str:
        return f"message has more than {self._max_fragments} fragments"

    def _queue_close(self, code: int, reason: str) -> None:
        try:
            data = self._connection.send(CloseConnection(code=code, reason=reason))
        except _WsprotoLocalProtocolError as exc:  # pragma: no cover - guarded by flags
            raise LocalProtocolError(str(exc)) from exc
        self._closed_sent = True
        self._outgoing.append(data)

    def __repr__(self) -> str:
        return (
            f"<Framing state={self.state.value} closed_sent={self._closed_sent} "
            f"close_received={self._close_received}>"
        )


def _too_big(max_bytes: int) -> str:
    return f"message exceeds {max_bytes} bytes"
