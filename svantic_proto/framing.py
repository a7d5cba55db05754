"""WebSocket framing after the handshake (spec sections 2 and 4), sans-IO.

This module owns the whole of RFC 6455 framing that svantic.v1 uses; it imports no
WebSocket library. Receiving: frame headers (opcodes, RSV bits, the minimal length
forms, masking by role), control frames (at most 125 bytes, never fragmented),
fragmentation and continuation, strict UTF-8 for text (checked incrementally, so a
bad byte fails 1007 in the read it arrives in), close frame payloads (a valid code,
a UTF-8 reason), the automatic pong and the close echo. Sending: text messages,
pings, pongs and closes, masked with a fresh key by a client. On top of RFC 6455,
the limits of section 4: a message is at most `max_message_bytes` (1 MiB) and at
most `max_fragments` (1024) frames, else 1009. permessage-deflate is never used
(section 4: it inflates without bound).

Usage: feed `receive_data(bytes)` (or `None` at EOF), act on the returned
events, then write `data_to_send()` to the transport.

Every rule is checked as soon as the bytes that break it are here, and a frame is
judged by its header: a header that makes the message too big (1009) or breaks the
order of fragments (1002) fails the connection when the header is complete,
whatever the payload and however TCP splits the reads. wsproto is the differential
reference (tests/core/test_framing_fastpath.py): the same events, the same reasons
and the same queued bytes on any stream and any split, except for those checks at
the header, which wsproto makes when payload bytes arrive (docs/protocol-decisions.md).

The hot path is a whole, unfragmented text message in one read, which is nearly
every frame of section 2: `receive_data` decodes such frames inline and hands any
other frame (control, fragment, binary, invalid, oversized, incomplete) to the
general parser, which reports or fails as the rules say. A frame whose payload is
still arriving is consumed as it comes (its payload is never buffered whole); only
an incomplete header or control frame (at most 14 + 125 bytes) waits in a buffer.
"""

from __future__ import annotations

import enum
import struct
from codecs import IncrementalDecoder, getincrementaldecoder
from collections.abc import Callable
from dataclasses import dataclass
from os import urandom
from typing import TypeAlias

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
"""Section 4: a message is at most 1024 frames, else close 1009."""

# -- RFC 6455 section 5.2 ---------------------------------------------------------------

_CONTINUATION = 0x0
_TEXT = 0x1
_BINARY = 0x2
_CLOSE = 0x8
_PING = 0x9
_PONG = 0xA
_FIN = 0x80
_RSV_BITS = 0x70
_OPCODE_BITS = 0x0F
_CONTROL_BIT = 0x08  # opcodes 0x8-0xF are control frames
_VALID_OPCODES = frozenset((_CONTINUATION, _TEXT, _BINARY, _CLOSE, _PING, _PONG))
_MAX_CONTROL_PAYLOAD = 125
_FIN_TEXT = _FIN | _TEXT  # FIN set, RSV1-3 clear, opcode TEXT: the hot path's first byte
_MASK_BIT = 0x80
_LENGTH_BITS = 0x7F
_LENGTH_16 = 126  # the 7-bit length field's markers for a 16- and a 64-bit length
_LENGTH_64 = 127
_HEADER_16 = struct.Struct("!BBH")
_HEADER_64 = struct.Struct("!BBQ")
_CLOSE_CODE = struct.Struct("!H")

# -- close codes (RFC 6455 section 7.4) -------------------------------------------------

# "No status code was present" is reported as 1005 and never sent.
_NO_STATUS_RECEIVED = 1005
_PROTOCOL_ERROR = 1002
_INVALID_PAYLOAD = 1007
_MESSAGE_TOO_BIG = 1009
# Codes a peer accepts on the wire below 3000 (1004-1006 and 1015 are reserved or
# local-only; wsproto peers also refuse the unregistered 1014).
_SENDABLE_CLOSE_CODES = frozenset(
    (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013)
)
# Codes we accept in a received close below 3000: the registered ones that may be
# sent (RFC 6455 7.4.1 and the IANA registry as wsproto knows it). 3000-4999 are
# for libraries and applications; anything else fails 1002.
_RECEIVABLE_CLOSE_CODES = _SENDABLE_CLOSE_CODES
_LOCAL_ONLY_CLOSE_CODES = frozenset((1005, 1006, 1015))
_MAX_CLOSE_REASON_BYTES = _MAX_CONTROL_PAYLOAD - 2

# The reasons of the failures, worded as wsproto words them (the differential tests
# compare them, and they travel in the close frame).
_BAD_CONTROL_LENGTH = "Control frame with payload len > 125"
_FRAGMENTED_CONTROL = "Invalid attempt to fragment control frame"
_NON_MINIMAL_16 = "Payload length used 2 bytes when 1 would have sufficed"
_NON_MINIMAL_64 = "Payload length used 8 bytes when 2 would have sufficed"
_LENGTH_64_MSB = "8-byte payload length with non-zero MSB"
_RSV_SET = "Reserved bit set unexpectedly"
_MASKED_TO_CLIENT = "client received unexpected masked frame"
_UNMASKED_TO_SERVER = "server received unexpected unmasked frame"
_STRAY_CONTINUATION = "unexpected CONTINUATION"
_EXPECTED_CONTINUATION = {
    _TEXT: "expected CONTINUATION, got <Opcode.TEXT: 1>",
    _BINARY: "expected CONTINUATION, got <Opcode.BINARY: 2>",
}
_ONE_BYTE_CLOSE = "CLOSE with 1 byte payload"
_CLOSE_CODE_OUT_OF_RANGE = "CLOSE with invalid code"
_CLOSE_CODE_LOCAL_ONLY = "remote CLOSE with local-only reason"
_CLOSE_CODE_RESERVED = "CLOSE with unknown reserved code"
_CLOSE_REASON_NOT_UTF8 = "Error decoding CLOSE reason: "

_Utf8Decoder = getincrementaldecoder("utf-8")
"""Strict and incremental: a byte that cannot start or continue a character fails at
once, and a character cut at the end of a message fails when the message ends."""

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


def _truncate_utf8(data: bytes, limit: int) -> bytes:
    """At most `limit` bytes of UTF-8 `data`, without a character cut in half."""
    if len(data) <= limit:
        return data
    return data[:limit].decode("utf-8", "ignore").encode("utf-8")


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
        "_decoder",
        "_done",
        "_fragments",
        "_frame_fin",
        "_frame_key",
        "_mask_offset",
        "_mask_pool",
        "_max_fragments",
        "_max_message_bytes",
        "_message_bytes",
        "_message_opcode",
        "_outgoing",
        "_pending",
        "_remaining",
        "_text_parts",
    )

    def __init__(
        self,
        client: bool,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_fragments: int = DEFAULT_MAX_FRAGMENTS,
    ) -> None:
        if isinstance(max_message_bytes, bool) or not isinstance(max_message_bytes, int):
            raise LocalProtocolError("max_message_bytes must be an int")
        if isinstance(max_fragments, bool) or not isinstance(max_fragments, int):
            raise LocalProtocolError("max_fragments must be an int")
        if max_message_bytes < 1 or max_fragments < 1:
            raise LocalProtocolError("max_message_bytes and max_fragments must be >= 1")
        self._max_message_bytes = max_message_bytes
        self._max_fragments = max_fragments
        self._client = bool(client)
        self._mask_pool = b""
        self._mask_offset = 0
        self._outgoing: list[bytes] = []
        # Received bytes not parsed yet: an incomplete header or control frame.
        self._pending = b""
        # The data frame whose payload is arriving: bytes still to come, its FIN bit,
        # and its masking key turned to where the next byte starts (b"" if unmasked).
        self._remaining = 0
        self._frame_fin = False
        self._frame_key = b""
        # The message in progress: its opcode (0: none), frames started, bytes
        # announced by their headers, and for text the UTF-8 decoder and the parts.
        self._message_opcode = 0
        self._fragments = 0
        self._message_bytes = 0
        self._decoder: IncrementalDecoder | None = None
        self._text_parts: list[str] = []
        self._closed_sent = False
        self._close_received = False
        self._done = False

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
            payload = text if isinstance(text, bytes) else text.encode("utf-8")
        except UnicodeError as exc:  # a lone surrogate
            raise LocalProtocolError(f"text is not encodable as UTF-8: {exc}") from exc
        # One whole frame (RFC 6455 5.2: FIN, the minimal length form; a client masks
        # with a fresh key).
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

    def _control_frame(self, opcode: int, payload: bytes) -> bytes:
        """One control frame (at most 125 bytes of payload), masked by a client."""
        length = len(payload)
        if not self._client:
            return bytes((_FIN | opcode, length)) + payload
        key = self._next_mask_key()
        return bytes((_FIN | opcode, _MASK_BIT | length)) + key + _xor_mask(payload, 0, length, key)

    def send_ping(self, payload: bytes = b"") -> None:
        """Queue a WebSocket ping (section 4 liveness); at most 125 bytes.

        Raises `LocalProtocolError` once a close was sent or the transport ended.
        Then call `data_to_send()`.
        """
        if self._closed_sent or self._done:
            raise LocalProtocolError("cannot send a ping after the WebSocket close")
        if len(payload) > _MAX_CONTROL_PAYLOAD:
            raise LocalProtocolError("a ping payload is at most 125 bytes (RFC 6455 5.5)")
        self._outgoing.append(self._control_frame(_PING, bytes(payload)))

    def send_close(self, code: int, reason: str = "") -> None:
        """Queue our close frame with `code` (section 4 lists the codes we use).

        Idempotent: once a close was queued (ours, an echo, or a failure's) or the
        transport ended, this does nothing, so shutdown paths need not race the
        receive path. The reason is cut to fit the 125-byte control frame (a lone
        surrogate in it is sent as "?"). Then call `data_to_send()` and, once the
        peer's close arrives (`CloseReceived`) or a timeout passes, close the
        transport.
        """
        if isinstance(code, bool) or not isinstance(code, int):
            raise LocalProtocolError("close code must be an int")
        if code not in _SENDABLE_CLOSE_CODES and not 3000 <= code <= 4999:
            raise LocalProtocolError(f"close code {code} cannot be sent (RFC 6455 7.4)")
        if self._closed_sent or self._done:
            return
        self._queue_close(code, reason)

    def _queue_close(self, code: int, reason: str) -> None:
        payload = _CLOSE_CODE.pack(code) + _truncate_utf8(
            reason.encode("utf-8", "replace"), _MAX_CLOSE_REASON_BYTES
        )
        self._closed_sent = True
        self._outgoing.append(self._control_frame(_CLOSE, payload))

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
            self._decoder = None
            return [_TRANSPORT_CLOSED]
        if type(data) is not bytes:
            data = bytes(data)
        events: list[FramingEvent] = []
        if self._pending:
            data = self._pending + data
            self._pending = b""
        position = 0
        if self._remaining:  # the rest of a data frame's payload comes first
            position = self._frame_payload(data, 0, events)
            if position < 0:
                return events
        end = len(data)
        masked = not self._client  # RFC 6455 5.1: clients mask, servers never do
        mask_bit = _MASK_BIT if masked else 0
        max_bytes = self._max_message_bytes
        idle = self._message_opcode == 0
        while end - position >= 2:
            # The hot path: a whole FIN text frame, RSV clear, masked as it must be, in
            # the minimal length form, within the limit, here in full and strict UTF-8,
            # while no message is in progress. Anything else: the general parser.
            if idle and data[position] == _FIN_TEXT:
                second = data[position + 1]
                if (second & _MASK_BIT) == mask_bit:
                    length = second & _LENGTH_BITS
                    start = position + 2
                    if length == _LENGTH_16:
                        if end - start >= 2:
                            length = (data[start] << 8) | data[start + 1]
                            if length < _LENGTH_16:
                                length = -1
                            start += 2
                        else:
                            length = -1
                    elif length == _LENGTH_64:
                        if end - start >= 8:
                            length = int.from_bytes(data[start : start + 8], "big")
                            if length <= 0xFFFF or length >> 63:
                                length = -1
                            start += 8
                        else:
                            length = -1
                    if 0 <= length <= max_bytes:
                        payload: bytes | bytearray | None = None
                        if masked:
                            stop = start + 4 + length
                            if stop <= end:
                                payload = _xor_mask(data, start + 4, stop, data[start : start + 4])
                        else:
                            stop = start + length
                            if stop <= end:
                                payload = data[start:stop]
                        if payload is not None:
                            try:
                                text: str | None = payload.decode("utf-8")
                            except UnicodeDecodeError:
                                text = None  # the general parser fails it 1007
                            if text is not None:
                                events.append(TextReceived(text))
                                position = stop
                                continue
            position = self._frame(data, position, events)
            if position < 0:
                return events
            idle = self._message_opcode == 0
        if position < end:
            self._pending = data[position:]
        return events

    def _frame(self, data: bytes, position: int, events: list[FramingEvent]) -> int:
        """Parse the frame at `position` (at least 2 bytes are there) and return where
        the next one starts; -1 to stop: failed, closed, or waiting for more bytes.

        The checks run in wsproto's order, each as soon as its bytes are here: opcode,
        fragmented control frame, control length, the minimal length form, RSV bits,
        masking; then, for a data frame, the order of fragments and the limits, as
        soon as the header is complete.
        """
        end = len(data)
        first = data[position]
        second = data[position + 1]
        opcode = first & _OPCODE_BITS
        if opcode not in _VALID_OPCODES:
            return self._fail(events, _PROTOCOL_ERROR, f"Invalid opcode {opcode:#x}")
        control = opcode & _CONTROL_BIT
        fin = first & _FIN
        if control and not fin:
            return self._fail(events, _PROTOCOL_ERROR, _FRAGMENTED_CONTROL)
        length = second & _LENGTH_BITS
        if control and length > _MAX_CONTROL_PAYLOAD:
            return self._fail(events, _PROTOCOL_ERROR, _BAD_CONTROL_LENGTH)
        start = position + 2
        if length == _LENGTH_16:
            if end - start < 2:
                return self._wait(data, position)
            length = (data[start] << 8) | data[start + 1]
            if length <= _MAX_CONTROL_PAYLOAD:
                return self._fail(events, _PROTOCOL_ERROR, _NON_MINIMAL_16)
            start += 2
        elif length == _LENGTH_64:
            if end - start < 8:
                return self._wait(data, position)
            length = int.from_bytes(data[start : start + 8], "big")
            if length <= 0xFFFF:
                return self._fail(events, _PROTOCOL_ERROR, _NON_MINIMAL_64)
            if length >> 63:
                return self._fail(events, _PROTOCOL_ERROR, _LENGTH_64_MSB)
            start += 8
        if first & _RSV_BITS:  # no extension is ever negotiated
            return self._fail(events, _PROTOCOL_ERROR, _RSV_SET)
        key = b""
        if second & _MASK_BIT:
            if self._client:
                return self._fail(events, _PROTOCOL_ERROR, _MASKED_TO_CLIENT)
            if end - start < 4:
                return self._wait(data, position)
            key = data[start : start + 4]
            start += 4
        elif not self._client:
            return self._fail(events, _PROTOCOL_ERROR, _UNMASKED_TO_SERVER)
        if control:
            stop = start + length
            if stop > end:  # a control frame is taken whole
                return self._wait(data, position)
            payload = bytes(_xor_mask(data, start, stop, key)) if key else data[start:stop]
            self._control(opcode, payload, events)
            return -1 if self._done else stop
        # A data frame, judged by its header: the order of fragments, then the limits.
        if self._message_opcode == 0:
            if opcode == _CONTINUATION:
                return self._fail(events, _PROTOCOL_ERROR, _STRAY_CONTINUATION)
        elif opcode != _CONTINUATION:
            return self._fail(events, _PROTOCOL_ERROR, _EXPECTED_CONTINUATION[opcode])
        if self._fragments == self._max_fragments:
            return self._fail(
                events, _MESSAGE_TOO_BIG, f"message has more than {self._max_fragments} fragments"
            )
        total = self._message_bytes + length
        if total > self._max_message_bytes:
            return self._fail(
                events, _MESSAGE_TOO_BIG, f"message exceeds {self._max_message_bytes} bytes"
            )
        self._fragments += 1
        self._message_bytes = total
        if self._message_opcode == 0:
            self._message_opcode = opcode
            if opcode == _TEXT:
                self._decoder = _Utf8Decoder()
        self._frame_fin = bool(fin)
        self._frame_key = key
        self._remaining = length
        return self._frame_payload(data, start, events)

    def _frame_payload(self, data: bytes, start: int, events: list[FramingEvent]) -> int:
        """Take what is here of the current data frame's payload, from `start`; return
        where the next frame starts (the end of `data` if the payload goes on), -1 on
        a failure. Text is decoded as it comes; binary is only counted."""
        remaining = self._remaining
        available = len(data) - start
        size = remaining if available >= remaining else available
        stop = start + size
        remaining -= size
        self._remaining = remaining
        finished = remaining == 0 and self._frame_fin
        decoder = self._decoder
        if decoder is not None:
            key = self._frame_key
            if size or finished:
                chunk = _xor_mask(data, start, stop, key) if key else data[start:stop]
                try:
                    text = decoder.decode(chunk, finished)
                except UnicodeDecodeError as exc:
                    return self._fail(events, _INVALID_PAYLOAD, str(exc))
                if text:
                    self._text_parts.append(text)
            if remaining and size & 3 and key:
                turn = size & 3
                self._frame_key = key[turn:] + key[:turn]
        if finished:
            if decoder is not None:
                parts = self._text_parts
                events.append(TextReceived(parts[0] if len(parts) == 1 else "".join(parts)))
                self._text_parts = []
                self._decoder = None
            else:
                events.append(BinaryReceived(self._message_bytes))
            self._message_opcode = 0
            self._fragments = 0
            self._message_bytes = 0
        return stop

    def _wait(self, data: bytes, position: int) -> int:
        """Keep the incomplete frame at `position` for the next read."""
        self._pending = data[position:]
        return -1

    def _control(self, opcode: int, payload: bytes, events: list[FramingEvent]) -> None:
        if opcode == _PING:
            # RFC 6455 5.5.3: answer with the same payload; after our close, send nothing.
            if not self._closed_sent:
                self._outgoing.append(self._control_frame(_PONG, payload))
            events.append(PingReceived(payload))
        elif opcode == _PONG:
            events.append(PongReceived(payload))
        else:
            self._close(payload, events)

    def _close(self, payload: bytes, events: list[FramingEvent]) -> None:
        """The peer's close (RFC 6455 5.5.1, 7.4): checked, reported, echoed if it opens
        the closing handshake."""
        code: int | None = None
        reason = ""
        if len(payload) == 1:
            self._fail(events, _PROTOCOL_ERROR, _ONE_BYTE_CLOSE)
            return
        if payload:
            code = (payload[0] << 8) | payload[1]
            if code < 1000 or code > 4999:
                self._fail(events, _PROTOCOL_ERROR, _CLOSE_CODE_OUT_OF_RANGE)
                return
            if code in _LOCAL_ONLY_CLOSE_CODES:
                self._fail(events, _PROTOCOL_ERROR, _CLOSE_CODE_LOCAL_ONLY)
                return
            if code < 3000 and code not in _RECEIVABLE_CLOSE_CODES:
                self._fail(events, _PROTOCOL_ERROR, _CLOSE_CODE_RESERVED)
                return
            try:
                reason = payload[2:].decode("utf-8")
            except UnicodeDecodeError as exc:
                self._fail(events, _INVALID_PAYLOAD, _CLOSE_REASON_NOT_UTF8 + str(exc))
                return
        self._close_received = True
        self._done = True
        self._text_parts = []
        self._decoder = None
        if not self._closed_sent:
            # Echo the close with its code (an empty close for an empty one).
            self._closed_sent = True
            echo = b"" if code is None else _CLOSE_CODE.pack(code)
            self._outgoing.append(self._control_frame(_CLOSE, echo))
        events.append(CloseReceived(code, reason))

    # -- failure -------------------------------------------------------------

    def _fail(self, events: list[FramingEvent], close_code: int, reason: str) -> int:
        """Queue our close with `close_code` (unless one was sent) and stop reading.
        Returns -1, the parser's "stop"."""
        if not self._closed_sent:
            self._queue_close(close_code, reason)
        self._done = True
        self._text_parts = []
        self._decoder = None
        self._pending = b""
        events.append(FramingFailed(close_code, reason))
        return -1

    def __repr__(self) -> str:
        return (
            f"<Framing state={self.state.value} closed_sent={self._closed_sent} "
            f"close_received={self._close_received}>"
        )
