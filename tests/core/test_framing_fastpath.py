"""The Framing fast path (whole text frames parsed and written without wsproto) must be
invisible: the same events and the same queued bytes as the wsproto path, for every
input stream, on both sides of the connection (spec sections 2 and 4)."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.frames import Frame as WebsocketsFrame
from websockets.frames import Opcode as WebsocketsOpcode
from websockets.protocol import Protocol, Side, State

from svantic_proto.errors import LocalProtocolError
from svantic_proto.framing import (
    _INT_XOR_MAX_BYTES,
    DEFAULT_MAX_FRAGMENTS,
    Framing,
    FramingFailed,
    TextReceived,
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


def assert_same_output(fast: Framing, reference: Framing, *, client: bool) -> None:
    fast_out, reference_out = fast.data_to_send(), reference.data_to_send()
    if client:  # a client masks with fresh random keys: compare everything else
        assert parse_frames(fast_out) == parse_frames(reference_out)
    else:
        assert fast_out == reference_out


def pair(
    client: bool, max_message_bytes: int = MIB, max_fragments: int = DEFAULT_MAX_FRAGMENTS
) -> tuple[Framing, Framing]:
    """A Framing with the fast path and one forced through wsproto alone."""
    fast = Framing(client, max_message_bytes=max_message_bytes, max_fragments=max_fragments)
    reference = Framing(
        client, max_message_bytes=max_message_bytes, max_fragments=max_fragments, _fast_path=False
    )
    return fast, reference


def feed_both(client: bool, chunks: list[bytes], max_message_bytes: int = MIB) -> list[object]:
    """Feed both Framings read by read, check each read gives the same events and
    output, and return the events."""
    fast, reference = pair(client, max_message_bytes)
    events: list[object] = []
    for chunk in chunks:
        step = fast.receive_data(chunk)
        assert step == reference.receive_data(chunk)
        assert_same_output(fast, reference, client=client)
        events += step
    assert fast.state is reference.state
    assert (fast.closed_sent, fast.close_received) == (
        reference.closed_sent,
        reference.close_received,
    )
    return events


# -- hand-picked streams: each boundary the fast path must hand to wsproto --------------


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
    "a large input past the 64 KiB slices": lambda m: [
        raw_frame(TEXT, b"y" * 100, masked=m) * 700 + raw_frame(PING, b"p", masked=m)
    ],
    "a large input handed to wsproto in slices": lambda m: [
        raw_frame(PING, b"p", masked=m) + raw_frame(TEXT, b"y" * 100, masked=m) * 700
    ],
}


@pytest.mark.parametrize("name", list(_EDGE_STREAMS))
@pytest.mark.parametrize("client", [False, True], ids=["server", "client"])
def test_edge_streams_match_the_wsproto_path(name: str, client: bool) -> None:
    chunks = _EDGE_STREAMS[name](not client)
    feed_both(client, chunks, max_message_bytes=MIB)
    feed_both(client, chunks, max_message_bytes=100)


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
def test_bytes_inside_a_frame_wsproto_has_started_never_reach_the_fast_path(client: bool) -> None:
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


def test_an_oversized_frame_with_bad_utf8_fails_as_the_wsproto_path_does() -> None:
    """Found by hypothesis: an empty text frame, then a 64 KiB frame over the limit whose
    UTF-8 breaks near the end of the first 64 KiB slice. The fast path takes the empty
    frame; the rest must still be cut where the wsproto path alone cuts it, or the two
    see the bad UTF-8 (1007) and the size (1009) in a different order."""
    payload = bytearray(b"V" * 65538)
    payload[65514:65517] = b"\xed\x9b@"  # a 3-byte lead, then a byte that cannot follow it
    wire = raw_frame(TEXT, b"", masked=True) + raw_frame(TEXT, bytes(payload), masked=True)
    events = feed_both(False, [wire], max_message_bytes=64)
    assert events[0] == TextReceived("")
    assert type(events[1]) is FramingFailed and len(events) == 2


# -- the fast path is really taken, and handed over as documented -------------------------


def spy_on_wsproto(framing: Framing) -> list[bytes]:
    """Record the bytes `framing` hands to wsproto."""
    connection = framing._connection
    original: Callable[[bytes | None], None] = connection.receive_data
    seen: list[bytes] = []

    def receive_data(data: bytes | None) -> None:
        seen.append(bytes(data or b""))
        original(data)

    connection.receive_data = receive_data  # type: ignore[method-assign]
    return seen


def test_whole_text_frames_bypass_wsproto_until_another_frame_arrives() -> None:
    server = Framing(client=False)
    seen = spy_on_wsproto(server)
    texts = b"".join(raw_frame(TEXT, f"m{i}".encode(), masked=True) for i in range(3))
    assert server.receive_data(texts) == [TextReceived(f"m{i}") for i in range(3)]
    assert seen == []
    rest = raw_frame(PING, b"p", masked=True) + raw_frame(TEXT, b"after", masked=True)
    assert len(server.receive_data(raw_frame(TEXT, b"x", masked=True) + rest)) == 3
    assert seen == [rest]  # from the ping on, everything went to wsproto
    # A partial frame leaves bytes in wsproto: the next read goes there too.
    partial = raw_frame(TEXT, b"split", masked=True)
    server.receive_data(partial[:4])
    server.receive_data(partial[4:])
    assert seen[-2:] == [partial[:4], partial[4:]]
    # Once wsproto is idle again, the fast path resumes.
    server.receive_data(raw_frame(TEXT, b"fast again", masked=True))
    assert len(seen) == 3


def test_the_private_flag_sends_everything_through_wsproto() -> None:
    server = Framing(client=False, _fast_path=False)
    seen = spy_on_wsproto(server)
    wire = raw_frame(TEXT, b"hi", masked=True)
    assert server.receive_data(wire) == [TextReceived("hi")]
    assert seen == [wire]


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
                ]
            )
        )
        return one(CLOSE, payload)
    if kind == "bad masking":
        return raw_frame(TEXT, draw(utf8_payloads()), masked=not masked, key=key)
    if kind == "rsv":
        opcode = draw(st.sampled_from([TEXT, BINARY, PING]))
        return one(opcode, b"rsv", rsv=draw(st.sampled_from([RSV1, RSV2, RSV3, RSV1 | RSV3])))
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


def _act(framing: Framing, action: tuple[str, str]) -> str | None:
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
def test_fast_path_matches_wsproto_path_on_any_stream(
    scenario: Scenario,
) -> None:
    client, max_message_bytes, max_fragments, chunks, actions, eof = scenario
    fast, reference = pair(client, max_message_bytes=max_message_bytes, max_fragments=max_fragments)
    for index, chunk in enumerate([*chunks, None] if eof else chunks):
        if index in actions:
            assert _act(fast, actions[index]) == _act(reference, actions[index])
            assert_same_output(fast, reference, client=client)
        assert fast.receive_data(chunk) == reference.receive_data(chunk)
        assert_same_output(fast, reference, client=client)
        assert fast.state is reference.state
        assert fast.closed_sent is reference.closed_sent
        assert fast.close_received is reference.close_received
    if len(chunks) in actions and not eof:
        assert _act(fast, actions[len(chunks)]) == _act(reference, actions[len(chunks)])
        assert_same_output(fast, reference, client=client)


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
    receiver = Framing(client=not sender_is_client, _fast_path=False)
    sender.send_text(text)
    sender.send_text(text)
    assert receiver.receive_data(sender.data_to_send()) == [TextReceived(text)] * 2
    # And the other way: wsproto's bytes into the fast path.
    reference_sender = Framing(client=not sender_is_client, _fast_path=False)
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
    fast, reference = pair(client)
    for text in texts:
        fast.send_text(text)
        reference.send_text(text)
    assert_same_output(fast, reference, client=client)


def test_server_frames_are_byte_identical_to_wsproto() -> None:
    fast, reference = pair(False)
    for text in _SEND_TEXTS:
        fast.send_text(text)
        reference.send_text(text)
        assert fast.data_to_send() == reference.data_to_send()


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
    for fast_path in (True, False):
        client = Framing(client=True, _fast_path=fast_path)
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
