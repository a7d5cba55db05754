"""Our framing parser against wsproto, the differential reference (spec sections 2 and 4).

`svantic_proto.framing` parses and writes every frame itself. wsproto, used here through
its public API only (`WsprotoFraming` below), must agree with it on every input stream
and every split into reads, on both sides of the connection: the same events (with the
same reasons), the same queued frames and the same states. The one deliberate
difference, a data frame judged by its header, is documented in
docs/protocol-decisions.md ("Framing") and in `Differential`.
"""

from __future__ import annotations

import ast
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.frames import Frame as WebsocketsFrame
from websockets.frames import Opcode as WebsocketsOpcode
from websockets.protocol import Protocol, Side, State
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage

import svantic_proto
from svantic_proto.errors import LocalProtocolError
from svantic_proto.framing import (
    _INT_XOR_MAX_BYTES,
    DEFAULT_MAX_FRAGMENTS,
    DEFAULT_MAX_MESSAGE_BYTES,
    BinaryReceived,
    CloseReceived,
    Framing,
    FramingEvent,
    FramingFailed,
    FramingState,
    PingReceived,
    PongReceived,
    TextReceived,
    TransportClosed,
)

MIB = 1 << 20
CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
RSV1, RSV2, RSV3 = 0x40, 0x20, 0x10
KEY = b"\x37\xfa\x21\x3d"


def xor(payload: bytes, key: bytes) -> bytes:
    repeated = (key * (len(payload) // 4 + 1))[: len(payload)]
    value = int.from_bytes(payload, "little") ^ int.from_bytes(repeated, "little")
    return value.to_bytes(len(payload), "little")


def raw_frame(
    opcode: int,
    payload: bytes = b"",
    *,
    masked: bool,
    fin: bool = True,
    rsv: int = 0,
    length_form: str = "minimal",
    key: bytes = KEY,
) -> bytes:
    """One frame exactly as given, including what RFC 6455 forbids (non-minimal
    lengths, a 64-bit length with its top bit set, RSV bits, wrong masking)."""
    first = (0x80 if fin else 0) | rsv | opcode
    mask_bit = 0x80 if masked else 0
    length = len(payload)
    if length_form == "minimal":
        length_form = "7" if length <= 125 else "16" if length <= 0xFFFF else "64"
    if length_form == "7":
        header = bytes([first, mask_bit | length])
    elif length_form == "16":
        header = bytes([first, mask_bit | 126]) + struct.pack("!H", length)
    elif length_form == "64":
        header = bytes([first, mask_bit | 127]) + struct.pack("!Q", length)
    else:  # "64msb": the top bit of a 64-bit length must be 0
        header = bytes([first, mask_bit | 127]) + struct.pack("!Q", length | 1 << 63)
    return header + key + xor(payload, key) if masked else header + payload


def parse_frames(wire: bytes) -> list[tuple[bytes, bytes]]:
    """Well-formed frames as (header without the masking key, unmasked payload), so
    output that differs only in the client's random masking keys compares equal."""
    frames = []
    position = 0
    while position < len(wire):
        start = position
        masked, length = bool(wire[position + 1] & 0x80), wire[position + 1] & 0x7F
        position += 2
        if length == 126:
            (length,) = struct.unpack_from("!H", wire, position)
            position += 2
        elif length == 127:
            (length,) = struct.unpack_from("!Q", wire, position)
            position += 8
        key = b""
        if masked:
            key, position = wire[position : position + 4], position + 4
        payload = wire[position : position + length]
        assert len(payload) == length, "output ends inside a frame"
        position += length
        header = wire[start : position - length - len(key)]
        frames.append((header, xor(payload, key) if masked else payload))
    return frames


def assert_same_output(
    ours: Framing | WsprotoFraming, reference: WsprotoFraming, *, client: bool
) -> None:
    ours_out, reference_out = ours.data_to_send(), reference.data_to_send()
    if client:  # a client masks with fresh random keys: compare everything else
        assert parse_frames(ours_out) == parse_frames(reference_out)
    else:
        assert ours_out == reference_out


# -- the reference: Framing's duties on top of wsproto's public API ----------------------


class WsprotoFraming:
    """What `Framing` did before it owned its parser, and what it must still do: wsproto
    parses and serialises (through its public `Connection`, its events and its `state`
    only), and this adds reassembly, the size and fragment caps (checked as bytes
    arrive, since wsproto does not expose frame headers), pongs, the close echo and one
    failure path."""

    def __init__(
        self,
        client: bool,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_fragments: int = DEFAULT_MAX_FRAGMENTS,
    ) -> None:
        self._connection = Connection(
            ConnectionType.CLIENT if client else ConnectionType.SERVER, extensions=[]
        )
        self._max_message_bytes = max_message_bytes
        self._max_fragments = max_fragments
        self._outgoing: list[bytes] = []
        self._text_parts: list[str] = []
        self._fragments = 0
        self._fragment_open = False
        self._message_bytes = 0
        self.closed_sent = False
        self.close_received = False
        self._done = False

    @property
    def state(self) -> FramingState:
        if self._done:
            return FramingState.CLOSED
        return FramingState.CLOSING if self.closed_sent else FramingState.OPEN

    def send_text(self, text: str) -> None:
        if self.closed_sent or self._done:
            raise LocalProtocolError("cannot send a message after the WebSocket close")
        try:
            self._outgoing.append(self._connection.send(TextMessage(data=text)))
        except UnicodeError as exc:
            raise LocalProtocolError(f"text is not encodable as UTF-8: {exc}") from exc

    def send_ping(self, payload: bytes = b"") -> None:
        if self.closed_sent or self._done:
            raise LocalProtocolError("cannot send a ping after the WebSocket close")
        self._outgoing.append(self._connection.send(Ping(payload=payload)))

    def send_close(self, code: int, reason: str = "") -> None:
        if not (self.closed_sent or self._done):
            self._queue_close(code, reason)

    def _queue_close(self, code: int, reason: str) -> None:
        self._outgoing.append(self._connection.send(CloseConnection(code=code, reason=reason)))
        self.closed_sent = True

    def data_to_send(self) -> bytes:
        data = b"".join(self._outgoing)
        self._outgoing.clear()
        return data

    def receive_data(self, data: bytes | None) -> list[FramingEvent]:
        if self._done:
            return []
        if data is None:
            self._done = True
            return [TransportClosed()]
        events: list[FramingEvent] = []
        self._connection.receive_data(data)
        for event in self._connection.events():
            if isinstance(event, TextMessage | BytesMessage):
                self._on_data(event, events)
            elif isinstance(event, Ping):
                if not self.closed_sent:
                    self._outgoing.append(self._connection.send(Pong(payload=event.payload)))
                events.append(PingReceived(bytes(event.payload)))
            elif isinstance(event, Pong):
                events.append(PongReceived(bytes(event.payload)))
            else:
                assert isinstance(event, CloseConnection)
                self._on_close(event, events)
            if self._done:
                break
        return events

    def _on_data(self, event: TextMessage | BytesMessage, events: list[FramingEvent]) -> None:
        text = event.data if isinstance(event, TextMessage) else None
        size = len(event.data) if text is None else len(text.encode())
        if not self._fragment_open:
            if self._fragments == self._max_fragments:
                message = f"message has more than {self._max_fragments} fragments"
                self._fail(events, 1009, message)
                return
            self._fragments += 1
        total = self._message_bytes + size
        if total > self._max_message_bytes:
            self._fail(events, 1009, f"message exceeds {self._max_message_bytes} bytes")
            return
        if text:
            self._text_parts.append(text)
        if event.message_finished:
            if text is None:
                events.append(BinaryReceived(total))
            else:
                events.append(TextReceived("".join(self._text_parts)))
            self._text_parts = []
            self._message_bytes = self._fragments = 0
            self._fragment_open = False
        else:
            self._message_bytes = total
            self._fragment_open = not event.frame_finished

    def _on_close(self, event: CloseConnection, events: list[FramingEvent]) -> None:
        state = self._connection.state
        if state in (ConnectionState.OPEN, ConnectionState.LOCAL_CLOSING):
            # wsproto reports its parse failures as a CloseConnection without changing
            # state; a real close frame moves it to REMOTE_CLOSING or CLOSED.
            self._fail(events, int(event.code), event.reason or "")
            return
        self.close_received = True
        self._done = True
        if state is ConnectionState.REMOTE_CLOSING:
            # Passing wsproto's own code object back: it writes an empty close for its
            # NO_STATUS_RCVD member.
            self.closed_sent = True
            self._outgoing.append(self._connection.send(CloseConnection(code=event.code)))
        code = int(event.code)
        events.append(CloseReceived(None if code == 1005 else code, event.reason or ""))

    def _fail(self, events: list[FramingEvent], code: int, reason: str) -> None:
        if not self.closed_sent:
            self._queue_close(code, reason)
        self._done = True
        events.append(FramingFailed(code, reason))


def pair(
    client: bool, max_message_bytes: int = MIB, max_fragments: int = DEFAULT_MAX_FRAGMENTS
) -> tuple[Framing, WsprotoFraming]:
    """Our Framing and the wsproto reference, with the same limits."""
    ours = Framing(client, max_message_bytes=max_message_bytes, max_fragments=max_fragments)
    reference = WsprotoFraming(
        client, max_message_bytes=max_message_bytes, max_fragments=max_fragments
    )
    return ours, reference


# -- comparing the two, with the deliberate differences ------------------------------------

# Deliberate difference (docs/protocol-decisions.md, "Framing"): a data frame is judged by
# its header. A header that takes the message over `max_message_bytes` or `max_fragments`
# fails 1009, and one that breaks the order of fragments (a continuation with no message,
# a new message inside one) fails 1002, in the read that completes the header. wsproto's
# path sees the order only with the frame's first payload byte and the size only once the
# bytes past the cap are here: later, or never if the stream ends first; and for an
# oversized text frame whose first bytes are not UTF-8, with 1007 instead of 1009.
_JUDGED_BY_HEADER = frozenset(
    (
        "unexpected CONTINUATION",
        "expected CONTINUATION, got <Opcode.TEXT: 1>",
        "expected CONTINUATION, got <Opcode.BINARY: 2>",
    )
)


def _earlier_failure_allowed(ours: FramingFailed, theirs: FramingEvent) -> bool:
    """What wsproto's path may report later for the frame ours failed by its header."""
    if not isinstance(theirs, FramingFailed):
        return False
    if ours.close_code == 1009:
        return theirs == ours or theirs.close_code == 1007
    return theirs == ours


class Differential:
    """Feeds our Framing and the reference the same reads and our same calls, and checks
    that they agree read by read: the same events, the same queued frames (apart from
    a client's random masking keys), the same states; or, from a deliberate difference
    on, that ours failed early as documented and the reference fails alike or not at
    all."""

    def __init__(
        self,
        client: bool,
        max_message_bytes: int = MIB,
        max_fragments: int = DEFAULT_MAX_FRAGMENTS,
    ) -> None:
        self.client = client
        self.ours, self.reference = pair(client, max_message_bytes, max_fragments)
        self.events: list[FramingEvent] = []
        self.early: FramingFailed | None = None  # our failure from a header, if any
        self.reference_failure: FramingEvent | None = None
        self._ours_frames: list[tuple[bytes, bytes]] = []
        self._reference_frames: list[tuple[bytes, bytes]] = []
        self._closed_before = False

    def act(self, action: tuple[str, str]) -> None:
        if self.early is not None:  # ours is closed; the reference need not be
            return
        assert _act(self.ours, action) == _act(self.reference, action)
        assert_same_output(self.ours, self.reference, client=self.client)

    def feed(self, chunk: bytes | None) -> None:
        closed_before = self.ours.closed_sent
        ours = self.ours.receive_data(chunk)
        theirs = self.reference.receive_data(chunk)
        if self.early is not None:
            assert ours == []
            self._collect()
            if self.reference_failure is None and theirs:
                [event] = theirs
                assert _earlier_failure_allowed(self.early, event) or (
                    chunk is None and event == TransportClosed()
                ), (self.early, event)
                self.reference_failure = event
            else:
                assert theirs == []
            return
        self.events += ours
        if ours == theirs:
            assert_same_output(self.ours, self.reference, client=self.client)
            assert self.ours.state is self.reference.state
            assert self.ours.closed_sent is self.reference.closed_sent
            assert self.ours.close_received is self.reference.close_received
            return
        # The only way to differ: ours failed by a frame's header, the reference not yet.
        *before, failed = ours
        assert isinstance(failed, FramingFailed), (ours, theirs)
        assert failed.close_code == 1009 or failed.reason in _JUDGED_BY_HEADER, failed
        assert theirs[: len(before)] == before, (ours, theirs)
        rest = theirs[len(before) :]
        assert len(rest) <= 1, rest
        if rest:
            assert _earlier_failure_allowed(failed, rest[0]), (failed, rest[0])
            self.reference_failure = rest[0]
        self.early = failed
        self._closed_before = closed_before
        self._collect()

    def _collect(self) -> None:
        self._ours_frames += parse_frames(self.ours.data_to_send())
        self._reference_frames += parse_frames(self.reference.data_to_send())

    def finish(self) -> list[FramingEvent]:
        """Check the output since a deliberate difference; return our events."""
        if self.early is None:
            return self.events
        assert self.ours.state is FramingState.CLOSED
        ours, theirs = self._ours_frames, self._reference_frames
        if self._closed_before:  # no failure's close on either side
            assert ours == theirs
            return self.events
        # Ours ends with its failure's close; the reference with the same frames before
        # it, then its own failure's close if it failed.
        assert ours[-1][0][0] == 0x88 and ours[-1][1][:2] == self.early.close_code.to_bytes(2)
        assert theirs[: len(ours) - 1] == ours[:-1]
        tail = theirs[len(ours) - 1 :]
        if isinstance(self.reference_failure, FramingFailed):
            assert len(tail) == 1 and tail[0][0][0] == 0x88
            if self.reference_failure == self.early:
                assert tail == ours[-1:]
        else:
            assert tail == []
        return self.events


def feed_both(
    client: bool,
    chunks: list[bytes],
    max_message_bytes: int = MIB,
    max_fragments: int = DEFAULT_MAX_FRAGMENTS,
) -> list[FramingEvent]:
    """Feed ours and the reference read by read, check they agree (see `Differential`),
    and return our events."""
    differential = Differential(client, max_message_bytes, max_fragments)
    for chunk in chunks:
        differential.feed(chunk)
    return differential.finish()


# -- hand-picked streams: each boundary between the hot path and the general parser -------


def _split_inside_header_key_and_payload(m: bool) -> list[bytes]:
    wire = raw_frame(TEXT, b"x" * 300, masked=m)
    return [
        wire[:1],
        wire[1:3],
        wire[3:6],
        wire[6:100],
        wire[100:] + raw_frame(TEXT, b"n", masked=m),
    ]


# Each takes the correct masking for the receiver (True: we are the server).
_EDGE_STREAMS: dict[str, Callable[[bool], list[bytes]]] = {
    "plain texts": lambda m: [raw_frame(TEXT, b"one", masked=m) + raw_frame(TEXT, b"", masked=m)],
    "sizes at the length-form limits": lambda m: [
        b"".join(raw_frame(TEXT, b"x" * n, masked=m) for n in (125, 126, 65535, 65536))
    ],
    "multi-byte UTF-8": lambda m: [raw_frame(TEXT, "héllo ✓ 🚀".encode() * 40, masked=m)],
    "text, ping, text in one read": lambda m: [
        raw_frame(TEXT, b"a", masked=m)
        + raw_frame(PING, b"p", masked=m)
        + raw_frame(TEXT, b"b", masked=m)
    ],
    "text then fragments": lambda m: [
        raw_frame(TEXT, b"a", masked=m)
        + raw_frame(TEXT, b"b", masked=m, fin=False)
        + raw_frame(CONTINUATION, b"c", masked=m)
    ],
    "16-bit length for 125 bytes": lambda m: [
        raw_frame(TEXT, b"ok", masked=m) + raw_frame(TEXT, b"x" * 125, masked=m, length_form="16")
    ],
    "64-bit length for 65535 bytes": lambda m: [
        raw_frame(TEXT, b"x" * 65535, masked=m, length_form="64")
    ],
    "64-bit length with the top bit set": lambda m: [
        raw_frame(TEXT, b"ok", masked=m) + raw_frame(TEXT, b"x", masked=m, length_form="64msb")
    ],
    "RSV1": lambda m: [
        raw_frame(TEXT, b"ok", masked=m) + raw_frame(TEXT, b"x", masked=m, rsv=RSV1)
    ],
    "RSV3": lambda m: [raw_frame(TEXT, b"x", masked=m, rsv=RSV3)],
    "RSV2 on a 16-bit length": lambda m: [raw_frame(BINARY, b"x" * 300, masked=m, rsv=RSV2)],
    "invalid UTF-8 after a good frame": lambda m: [
        raw_frame(TEXT, b"ok", masked=m) + raw_frame(TEXT, b"ab\xc3\x28", masked=m)
    ],
    "truncated UTF-8 at the end of a frame": lambda m: [raw_frame(TEXT, b"abc\xe2\x82", masked=m)],
    "encoded surrogate": lambda m: [raw_frame(TEXT, b"\xed\xa0\x80", masked=m)],
    "over the limit by one": lambda m: [
        raw_frame(TEXT, b"x" * 100, masked=m) + raw_frame(TEXT, b"x" * 101, masked=m)
    ],
    "over the limit and invalid UTF-8": lambda m: [raw_frame(TEXT, b"\xff" + b"x" * 200, masked=m)],
    "frame split inside its header, key and payload": _split_inside_header_key_and_payload,
    "close echoed": lambda m: [
        raw_frame(TEXT, b"a", masked=m) + raw_frame(CLOSE, b"\x03\xe8bye", masked=m)
    ],
    "text after close is ignored": lambda m: [
        raw_frame(CLOSE, b"", masked=m) + raw_frame(TEXT, b"late", masked=m)
    ],
    "binary": lambda m: [
        raw_frame(BINARY, b"\x00\x01", masked=m) + raw_frame(TEXT, b"a", masked=m)
    ],
    "wrong masking after a good frame": lambda m: [
        raw_frame(TEXT, b"ok", masked=m) + raw_frame(TEXT, b"wrong", masked=not m)
    ],
    # Read with the wrong masking, these bytes would still be a whole valid text frame.
    "wrong masking that parses either way": lambda m: [
        raw_frame(TEXT, b"\0\0\0\0wxyz", masked=not m, key=b"abcd") + b"abcd"
    ],
    "a large input of small frames": lambda m: [
        raw_frame(TEXT, b"y" * 100, masked=m) * 700 + raw_frame(PING, b"p", masked=m)
    ],
    "a large input starting with a control frame": lambda m: [
        raw_frame(PING, b"p", masked=m) + raw_frame(TEXT, b"y" * 100, masked=m) * 700
    ],
    "fragments split inside a character": lambda m: [
        (raw_frame(TEXT, "a€".encode()[:2], masked=m, fin=False)
         + raw_frame(CONTINUATION, "a€b".encode()[2:], masked=m))[:5],
        (raw_frame(TEXT, "a€".encode()[:2], masked=m, fin=False)
         + raw_frame(CONTINUATION, "a€b".encode()[2:], masked=m))[5:],
    ],
    "a continuation with no message, its header alone": lambda m: [
        raw_frame(CONTINUATION, b"c", masked=m)[:-1],
        raw_frame(CONTINUATION, b"c", masked=m)[-1:],
    ],
    "a close split inside its reason": lambda m: [
        raw_frame(CLOSE, b"\x03\xe8" + "bye ✓".encode(), masked=m)[:9],
        raw_frame(CLOSE, b"\x03\xe8" + "bye ✓".encode(), masked=m)[9:],
    ],
}


@pytest.mark.parametrize("name", list(_EDGE_STREAMS))
@pytest.mark.parametrize("client", [False, True], ids=["server", "client"])
def test_edge_streams_match_the_wsproto_path(name: str, client: bool) -> None:
    chunks = _EDGE_STREAMS[name](not client)
    feed_both(client, chunks, max_message_bytes=MIB)
    feed_both(client, chunks, max_message_bytes=100)
    feed_both(client, chunks, max_fragments=1)
    # And byte by byte: every split inside every header.
    if sum(map(len, chunks)) < 2000:
        wire = b"".join(chunks)
        feed_both(client, [wire[i : i + 1] for i in range(len(wire))], max_message_bytes=100)


def _binary_frame_raw(wire_payload: bytes, *, masked: bool, key: bytes = KEY) -> bytes:
    """A binary frame whose bytes *on the wire* after the header are `wire_payload`."""
    mask_bit = 0x80 if masked else 0
    length = len(wire_payload)
    if length <= 125:
        header = bytes([0x82, mask_bit | length])
    else:
        header = bytes([0x82, mask_bit | 126]) + struct.pack("!H", length)
    return header + (key if masked else b"") + wire_payload


@pytest.mark.parametrize("client", [False, True], ids=["server", "client"])
def test_bytes_inside_a_frame_in_progress_never_reach_the_hot_path(client: bool) -> None:
    # Each case's second read starts with what looks like a whole text frame; it is
    # really the rest of a frame or message wsproto is in the middle of.
    masked = not client
    looks_like_text = raw_frame(TEXT, b"hi", masked=masked)
    # 1. wsproto parsed a header and waits for the payload (its buffer is empty).
    header_then_payload = _binary_frame_raw(looks_like_text, masked=masked)
    header_length = len(header_then_payload) - len(looks_like_text)
    # 2. wsproto holds an incomplete header: the 16-bit length's bytes are 0x81 0x82
    #    (or 0x81 0x02 unmasked), and the next bytes could parse as a text frame.
    second = 0x82 if masked else 0x02
    length = 0x8100 | second
    binary = _binary_frame_raw(b"\x00" * length, masked=masked, key=b"\x00\x00\x00\x00")
    binary = binary[:4] + (b"\x00\x00\x00\x00" if masked else b"") + b"hi" + binary[-(length - 2) :]
    assert binary[2:4] == bytes([0x81, second])
    # 3. a text message is in progress: a whole text frame now is a protocol error.
    unfinished = raw_frame(TEXT, b"start", masked=masked, fin=False)
    for chunks in (
        [header_then_payload[:header_length], looks_like_text],
        [binary[:2], binary[2:]],
        [unfinished, looks_like_text],
    ):
        assert TextReceived("hi") not in feed_both(client, chunks)


def test_over_the_limit_fails_1009_like_the_wsproto_path() -> None:
    wire = raw_frame(TEXT, b"x" * 100, masked=True) + raw_frame(TEXT, b"x" * 101, masked=True)
    assert feed_both(False, [wire], max_message_bytes=100) == [
        TextReceived("x" * 100),
        FramingFailed(1009, "message exceeds 100 bytes"),
    ]


def test_an_oversized_frame_fails_1009_from_its_header_where_wsproto_sees_bad_utf8() -> None:
    """Deliberate difference: the header says the frame is over the cap, so 1009 at once,
    before any payload byte is looked at. wsproto's path reads the payload first and
    fails 1007 on its bad UTF-8 (found by hypothesis, with an empty frame first)."""
    payload = bytearray(b"V" * 65538)
    payload[65514:65517] = b"\xed\x9b@"  # a 3-byte lead, then a byte that cannot follow it
    wire = raw_frame(TEXT, b"", masked=True) + raw_frame(TEXT, bytes(payload), masked=True)
    expected = [TextReceived(""), FramingFailed(1009, "message exceeds 64 bytes")]
    assert feed_both(False, [wire], max_message_bytes=64) == expected
    reference = WsprotoFraming(False, max_message_bytes=64)
    assert [type(e) for e in reference.receive_data(wire)] == [TextReceived, FramingFailed]
    # Which check fails does not depend on the split: the header alone is enough.
    ours = Framing(False, max_message_bytes=64)
    assert ours.receive_data(wire[:20]) == expected  # 6 + 14 header bytes
    reference = WsprotoFraming(False, max_message_bytes=64)
    assert reference.receive_data(wire[:20]) == [TextReceived("")]


@pytest.mark.parametrize("client", [False, True], ids=["server", "client"])
def test_limits_and_fragment_order_fail_when_the_header_is_complete(client: bool) -> None:
    masked = not client
    over = raw_frame(TEXT, b"x" * 200, masked=masked)
    header = over[: 8 if masked else 4]
    ours = Framing(client, max_message_bytes=100)
    assert ours.receive_data(header[:-1]) == []
    assert ours.receive_data(header[-1:]) == [FramingFailed(1009, "message exceeds 100 bytes")]
    # The 1025th frame's header: 1009, before its payload.
    ours = Framing(client, max_fragments=2)
    two = raw_frame(TEXT, b"a", masked=masked, fin=False) + raw_frame(
        CONTINUATION, b"b", masked=masked, fin=False
    )
    third = raw_frame(CONTINUATION, b"c", masked=masked)
    assert ours.receive_data(two + third[:-1]) == [
        FramingFailed(1009, "message has more than 2 fragments")
    ]
    # A new message inside one: 1002 from the header (wsproto: with its first payload byte).
    inside = raw_frame(TEXT, b"a", masked=masked, fin=False) + raw_frame(TEXT, b"b", masked=masked)
    ours, reference = pair(client)
    failure = FramingFailed(1002, "expected CONTINUATION, got <Opcode.TEXT: 1>")
    assert ours.receive_data(inside[:-1]) == [failure]
    assert reference.receive_data(inside[:-1]) == []
    assert reference.receive_data(inside[-1:]) == [failure]


def test_a_frame_over_the_cap_is_never_buffered() -> None:
    server = Framing(client=False)
    header = bytes([0x81, 0x80 | 127]) + struct.pack("!Q", 1 << 40) + b"\x00\x00\x00\x00"
    assert server.receive_data(header) == [FramingFailed(1009, f"message exceeds {MIB} bytes")]
    assert server.receive_data(b"a" * MIB) == []


# -- the module owns its parser --------------------------------------------------------------


def test_framing_imports_no_websocket_library_and_reads_no_private_state() -> None:
    # The source beside the module (a compiled build keeps it: SVANTIC_PURE_PYTHON=1).
    tree = ast.parse((Path(svantic_proto.__file__ or "").parent / "framing.py").read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        (node.module or "").split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.level == 0
    }
    assert not imported & {"wsproto", "websockets", "h11", "aiohttp"}, imported
    # Private attributes are read on `self` only, never on another object.
    foreign = [
        ast.unparse(node)
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
        and not (isinstance(node.value, ast.Name) and node.value.id == "self")
    ]
    assert foreign == []


def test_an_incomplete_header_waits_and_a_payload_streams() -> None:
    server = Framing(client=False)
    wire = raw_frame(TEXT, "é".encode() * 200, masked=True)
    assert server.receive_data(wire[:5]) == []  # header incomplete: kept
    assert server.receive_data(wire[5:50]) == []  # payload streams: decoded as it comes
    assert server.receive_data(wire[50:]) == [TextReceived("é" * 200)]
    assert server.receive_data(raw_frame(TEXT, b"next", masked=True)) == [TextReceived("next")]


# -- differential property test -------------------------------------------------------

_SIZES = st.one_of(
    st.integers(0, 200),
    # The length-form limits, and either side of the switch between two unmasking ways.
    st.sampled_from([0, 125, 126, 127, 65535, 65536, _INT_XOR_MAX_BYTES, _INT_XOR_MAX_BYTES + 1]),
)
_INVALID_UTF8 = st.sampled_from(
    [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xe2\x82", b"\xf4\x90\x80\x80", b"\xc0\xaf"]
)


@st.composite
def utf8_payloads(draw: st.DrawFn) -> bytes:
    """Valid UTF-8 of an exact byte size, often multi-byte."""
    size = draw(_SIZES)
    encoded = draw(st.text(max_size=40)).encode()
    if len(encoded) > size:
        encoded = encoded[:size].decode("utf-8", "ignore").encode()
    return encoded + b"a" * (size - len(encoded))


_texts = utf8_payloads().map(bytes.decode)


@st.composite
def frames(draw: st.DrawFn, masked: bool) -> bytes:
    """One piece of a stream a peer might send; `masked` is the correct masking."""
    # XOR with a fixed key: hypothesis favours zero bytes, and a zero key masks nothing.
    key = xor(draw(st.binary(min_size=4, max_size=4)), KEY)

    def one(opcode: int, payload: bytes, **options: object) -> bytes:
        return raw_frame(opcode, payload, masked=masked, key=key, **options)  # type: ignore[arg-type]

    kind = draw(
        st.sampled_from(
            ["text"] * 20
            + ["invalid utf-8"] * 3
            + ["fragments", "control", "binary", "close", "bad masking"]
            + ["rsv", "non-minimal", "reserved opcode", "stray continuation", "garbage"]
        )
    )
    if kind == "text":
        return one(TEXT, draw(utf8_payloads()))
    if kind == "invalid utf-8":
        payload = draw(utf8_payloads())
        at = draw(st.integers(0, len(payload)))
        return one(TEXT, payload[:at] + draw(_INVALID_UTF8) + payload[at:])
    if kind == "fragments":
        payload = draw(utf8_payloads())
        cuts = sorted(draw(st.lists(st.integers(0, len(payload)), min_size=1, max_size=3)))
        parts = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)], strict=True)]
        finish = draw(st.booleans())  # an unfinished message ends the stream mid-message
        out = b""
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            out += one(TEXT if index == 0 else CONTINUATION, part, fin=last and finish)
            if not last and draw(st.booleans()):
                out += one(PING, b"interleaved")
        return out
    if kind == "control":
        opcode = draw(st.sampled_from([PING, PONG]))
        return one(opcode, draw(st.binary(max_size=126)))  # 126: too long for control
    if kind == "binary":
        payload = draw(st.binary(max_size=200))
        if draw(st.booleans()):
            return one(BINARY, payload)
        return one(BINARY, payload[:5], fin=False) + one(CONTINUATION, payload[5:])
    if kind == "close":
        payload = draw(
            st.sampled_from(
                [
                    b"",
                    b"\x03\xe8",
                    b"\x03\xe8bye",
                    b"\x03",
                    b"\x03\xe7",
                    b"\x03\xed",
                    b"\x03\xf1reason",
                    b"\x0f\xa0app",
                    b"\x03\xe8\xff",
                    b"\x03\xe7",  # 999
                    b"\x03\xec",  # 1004, reserved
                    b"\x03\xee",  # 1006, local only
                    b"\x03\xf6",  # 1014, unregistered
                    b"\x03\xf7",  # 1015, local only
                    b"\x0b\xb7",  # 2999
                    b"\x0b\xb8",  # 3000
                    b"\x13\x87",  # 4999
                    b"\x13\x88",  # 5000
                    b"\x03\xe8" + "✓".encode()[:2],  # a reason cut inside a character
                ]
            )
        )
        return one(CLOSE, payload)
    if kind == "bad masking":
        return raw_frame(TEXT, draw(utf8_payloads()), masked=not masked, key=key)
    if kind == "rsv":
        opcode = draw(st.sampled_from([TEXT, BINARY, PING]))
        payload = b"rsv" * draw(st.sampled_from([1, 50, 22000]))  # each length form
        return one(opcode, payload, rsv=draw(st.sampled_from([RSV1, RSV2, RSV3, RSV1 | RSV3])))
    if kind == "non-minimal":
        form = draw(st.sampled_from(["16", "64", "64msb"]))
        size = draw(st.integers(0, 125 if form == "16" else 300))
        return one(TEXT, b"n" * size, length_form=form)
    if kind == "reserved opcode":
        return one(draw(st.sampled_from([0x3, 0x7, 0xB, 0xF])), b"r")
    if kind == "stray continuation":
        return one(CONTINUATION, b"c", fin=draw(st.booleans()))
    return draw(st.binary(min_size=1, max_size=20))


# client?, max_message_bytes, max_fragments, reads, our calls before read i, then EOF?
Scenario = tuple[bool, int, int, list[bytes], dict[int, tuple[str, str]], bool]


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    client = draw(st.booleans())
    max_message_bytes = draw(st.sampled_from([64, 130, 400, 70000, MIB]))
    max_fragments = draw(st.sampled_from([3, 1024]))
    pieces = draw(st.lists(frames(masked=not client), min_size=1, max_size=8))
    wire = b"".join(pieces)
    # Reads end at frame boundaries (where the fast path starts again) and anywhere.
    boundaries = [sum(map(len, pieces[:index])) for index in range(1, len(pieces))]
    at_boundary = draw(st.lists(st.booleans(), min_size=len(boundaries), max_size=len(boundaries)))
    frame_cuts = {offset for offset, cut in zip(boundaries, at_boundary, strict=True) if cut}
    cuts = sorted({*frame_cuts, *draw(st.lists(st.integers(0, len(wire)), max_size=4))})
    chunks = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)]
    # Our own calls between reads: a message, a ping, or our close (LOCAL_CLOSING).
    actions = draw(
        st.dictionaries(
            st.integers(0, len(chunks)),
            st.one_of(
                _texts.map(lambda text: ("text", text)),
                st.sampled_from([("ping", ""), ("close", "")]),
            ),
            max_size=2,
        )
    )
    return client, max_message_bytes, max_fragments, chunks, actions, draw(st.booleans())


def _act(framing: Framing | WsprotoFraming, action: tuple[str, str]) -> str | None:
    kind, text = action
    try:
        if kind == "text":
            framing.send_text(text)
        elif kind == "ping":
            framing.send_ping(b"ours")
        else:
            framing.send_close(1000, "done")
    except LocalProtocolError as exc:
        return str(exc)
    return None


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(scenario=scenarios())
def test_our_parser_matches_wsproto_on_any_stream(
    scenario: Scenario,
) -> None:
    client, max_message_bytes, max_fragments, chunks, actions, eof = scenario
    differential = Differential(client, max_message_bytes, max_fragments)
    for index, chunk in enumerate([*chunks, None] if eof else chunks):
        if index in actions:
            differential.act(actions[index])
        differential.feed(chunk)
    if len(chunks) in actions and not eof:
        differential.act(actions[len(chunks)])
    differential.finish()


# -- the send path --------------------------------------------------------------------

_SEND_TEXTS = [
    "",
    "a",
    "x" * 125,
    "x" * 126,
    "é" * 63,
    "y" * _INT_XOR_MAX_BYTES,
    "y" * (_INT_XOR_MAX_BYTES + 1),
    "x" * 65535,
    "x" * 65536,
    "✓🚀" * 300,
]


@pytest.mark.parametrize("text", _SEND_TEXTS, ids=lambda text: f"{len(text.encode())}B")
@pytest.mark.parametrize("sender_is_client", [True, False], ids=["client", "server"])
def test_sent_text_round_trips_through_the_wsproto_path(text: str, sender_is_client: bool) -> None:
    sender = Framing(client=sender_is_client)
    receiver = WsprotoFraming(client=not sender_is_client)
    sender.send_text(text)
    sender.send_text(text)
    assert receiver.receive_data(sender.data_to_send()) == [TextReceived(text)] * 2
    # And the other way: wsproto's bytes into ours.
    reference_sender = WsprotoFraming(client=not sender_is_client)
    fast_receiver = Framing(client=sender_is_client)
    reference_sender.send_text(text)
    assert fast_receiver.receive_data(reference_sender.data_to_send()) == [TextReceived(text)]


def test_a_one_mib_message_round_trips_both_ways() -> None:
    text = "é" * (MIB // 2)
    for sender_is_client in (True, False):
        sender = Framing(client=sender_is_client)
        receiver = Framing(client=not sender_is_client)
        sender.send_text(text)
        assert receiver.receive_data(sender.data_to_send()) == [TextReceived(text)]


@settings(max_examples=100, deadline=None)
@given(texts=st.lists(_texts, min_size=1, max_size=5), client=st.booleans())
def test_sent_bytes_match_wsproto_apart_from_the_mask_key(texts: list[str], client: bool) -> None:
    ours, reference = pair(client)
    for text in texts:
        ours.send_text(text)
        reference.send_text(text)
    assert_same_output(ours, reference, client=client)


def test_server_frames_are_byte_identical_to_wsproto() -> None:
    ours, reference = pair(False)
    for text in _SEND_TEXTS:
        ours.send_text(text)
        reference.send_text(text)
        assert ours.data_to_send() == reference.data_to_send()


def test_client_mask_keys_are_fresh_for_every_frame() -> None:
    client = Framing(client=True)
    keys = []
    for _ in range(200):  # more than one refill of the key pool
        client.send_text("same text")
        wire = client.data_to_send()
        assert wire[1] & 0x80
        keys.append(wire[2:6])
    assert len(set(keys)) >= 195  # 4-byte random keys: a few collisions at most
    assert keys[:64] != keys[64:128]


def test_unencodable_text_is_refused_and_the_framing_stays_usable() -> None:
    for client in (Framing(client=True), WsprotoFraming(client=True)):
        with pytest.raises(LocalProtocolError, match="not encodable as UTF-8"):
            client.send_text("lone \ud800")
        assert client.data_to_send() == b""
        client.send_text("ok")
        assert Framing(client=False).receive_data(client.data_to_send()) == [TextReceived("ok")]


@pytest.mark.parametrize("text", _SEND_TEXTS, ids=lambda text: f"{len(text.encode())}B")
def test_websockets_sans_io_core_decodes_our_frames(text: str) -> None:
    # Client side: masked, as websockets' server requires.
    client = Framing(client=True)
    client.send_text(text)
    client.send_text("second")
    server = Protocol(Side.SERVER, state=State.OPEN, max_size=None)
    server.receive_data(client.data_to_send())
    received = [frame for frame in server.events_received() if isinstance(frame, WebsocketsFrame)]
    assert [(frame.opcode, frame.fin) for frame in received] == [(WebsocketsOpcode.TEXT, True)] * 2
    assert [frame.data for frame in received] == [text.encode(), b"second"]
    assert server.state is State.OPEN and server.data_to_send() == []
    # Server side: unmasked, as websockets' client requires.
    ours = Framing(client=False)
    ours.send_text(text)
    websockets_client = Protocol(Side.CLIENT, state=State.OPEN, max_size=None)
    websockets_client.receive_data(ours.data_to_send())
    [frame] = websockets_client.events_received()
    assert isinstance(frame, WebsocketsFrame)
    assert frame.opcode is WebsocketsOpcode.TEXT and frame.fin and frame.data == text.encode()
    assert websockets_client.state is State.OPEN
