"""WebSocket framing (spec sections 2 and 4): reassembly, limits, replies, failures."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from svantic_proto.errors import LocalProtocolError
from svantic_proto.framing import (
    BinaryReceived,
    CloseReceived,
    Framing,
    FramingFailed,
    FramingState,
    PingReceived,
    PongReceived,
    TextReceived,
    TransportClosed,
)

MIB = 1 << 20
CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
MASK_KEY = b"\x37\xfa\x21\x3d"


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    masked: bool = True,
    rsv: int = 0,
) -> bytes:
    """One raw WebSocket frame, masked as a client sends it unless `masked=False`."""
    first = (0x80 if fin else 0) | rsv | opcode
    length = len(payload)
    mask_bit = 0x80 if masked else 0
    if length <= 125:
        header = bytes([first, mask_bit | length])
    elif length <= 0xFFFF:
        header = bytes([first, mask_bit | 126]) + struct.pack("!H", length)
    else:
        header = bytes([first, mask_bit | 127]) + struct.pack("!Q", length)
    if not masked:
        return header + payload
    body = bytes(b ^ MASK_KEY[i % 4] for i, b in enumerate(payload))
    return header + MASK_KEY + body


def fragments(opcode: int, parts: list[bytes], *, masked: bool = True) -> bytes:
    """A message split into frames: first carries `opcode`, the rest CONTINUATION."""
    out = b""
    for index, part in enumerate(parts):
        out += frame(
            opcode if index == 0 else CONTINUATION,
            part,
            fin=index == len(parts) - 1,
            masked=masked,
        )
    return out


def close_code_sent(sender: Framing, *, sender_is_client: bool = False) -> int | None:
    """Decode what `sender` queued, as its peer would, and return the close code."""
    peer = Framing(client=not sender_is_client)
    events = peer.receive_data(sender.data_to_send())
    closes = [event for event in events if isinstance(event, CloseReceived)]
    assert len(closes) == 1, events
    return closes[0].code


# -- round trips -----------------------------------------------------------------


@pytest.mark.parametrize("text", ["hello", "", "x" * 300, "héllo wörld ✓ 🚀", "a" * 70000])
def test_text_round_trip_both_ways(text: str) -> None:
    client, server = Framing(client=True), Framing(client=False)
    client.send_text(text)
    assert server.receive_data(client.data_to_send()) == [TextReceived(text)]
    server.send_text(text)
    assert client.receive_data(server.data_to_send()) == [TextReceived(text)]


def test_several_messages_in_one_read_keep_their_order() -> None:
    client, server = Framing(client=True), Framing(client=False)
    for text in ("one", "two", "three"):
        client.send_text(text)
    wire = client.data_to_send()
    assert client.data_to_send() == b""
    assert server.receive_data(wire) == [
        TextReceived("one"),
        TextReceived("two"),
        TextReceived("three"),
    ]


def test_fragmented_message_is_reassembled_with_interleaved_ping() -> None:
    server = Framing(client=False)
    wire = (
        frame(TEXT, b"hel", fin=False)
        + frame(PING, b"p")
        + frame(CONTINUATION, b"lo ", fin=False)
        + frame(CONTINUATION, "wörld".encode(), fin=True)
    )
    assert server.receive_data(wire) == [PingReceived(b"p"), TextReceived("hello wörld")]


def test_message_fed_one_byte_at_a_time() -> None:
    server = Framing(client=False)
    wire = fragments(TEXT, ["é".encode() * 10, "€".encode() * 50, b"end"])
    events = []
    for index in range(len(wire)):
        events += server.receive_data(wire[index : index + 1])
    assert events == [TextReceived("é" * 10 + "€" * 50 + "end")]


# -- size and fragment limits (section 4) ------------------------------------------


def test_exactly_one_mib_in_one_frame_is_accepted() -> None:
    server = Framing(client=False)
    assert server.receive_data(frame(TEXT, b"a" * MIB)) == [TextReceived("a" * MIB)]


def test_exactly_one_mib_across_fragments_is_accepted() -> None:
    server = Framing(client=False)
    parts = [b"a" * (MIB // 4)] * 4
    assert server.receive_data(fragments(TEXT, parts)) == [TextReceived("a" * MIB)]


def test_one_mib_of_two_byte_characters_is_accepted() -> None:
    server = Framing(client=False)
    text = "é" * (MIB // 2)
    assert server.receive_data(frame(TEXT, text.encode())) == [TextReceived(text)]


def test_one_mib_plus_one_in_one_frame_fails_1009() -> None:
    server = Framing(client=False)
    events = server.receive_data(frame(TEXT, b"a" * (MIB + 1)))
    assert len(events) == 1
    assert isinstance(events[0], FramingFailed)
    assert events[0].close_code == 1009
    assert close_code_sent(server) == 1009
    assert server.closed_sent
    assert server.state is FramingState.CLOSED


def test_one_mib_plus_one_across_fragments_fails_1009() -> None:
    server = Framing(client=False)
    parts = [b"a" * (MIB // 2), b"a" * (MIB // 2), b"a"]
    events = server.receive_data(fragments(TEXT, parts))
    assert [type(event) for event in events] == [FramingFailed]
    assert isinstance(events[0], FramingFailed) and events[0].close_code == 1009
    assert close_code_sent(server) == 1009


def test_oversized_frame_fails_as_soon_as_its_header_is_complete() -> None:
    # The header announces 4 MiB: 1009 at once, without waiting for (or buffering) the
    # payload, and whatever that payload would have held (docs/protocol-decisions.md).
    server = Framing(client=False)
    header = bytes([0x81, 0x80 | 127]) + struct.pack("!Q", 4 * MIB) + b"\x00\x00\x00\x00"
    assert server.receive_data(header[:-1]) == []
    events = server.receive_data(header[-1:] + b"\xff")
    assert events == [FramingFailed(1009, f"message exceeds {MIB} bytes")]
    assert close_code_sent(server) == 1009
    assert server.receive_data(b"a" * MIB) == []


def test_smaller_configured_limit_is_enforced() -> None:
    server = Framing(client=False, max_message_bytes=10)
    assert server.receive_data(frame(TEXT, b"0123456789")) == [TextReceived("0123456789")]
    events = server.receive_data(frame(TEXT, "0123456789é".encode()))
    assert [event.close_code for event in events if isinstance(event, FramingFailed)] == [1009]


def test_1024_fragments_accepted_1025_fail_1009() -> None:
    server = Framing(client=False)
    assert server.receive_data(fragments(TEXT, [b"x"] * 1024)) == [TextReceived("x" * 1024)]
    events = server.receive_data(fragments(TEXT, [b"x"] * 1025))
    assert events == [FramingFailed(1009, "message has more than 1024 fragments")]
    assert close_code_sent(server) == 1009


def test_empty_fragments_count_towards_the_limit() -> None:
    server = Framing(client=False, max_fragments=3)
    events = server.receive_data(fragments(TEXT, [b"", b"", b"", b""]))
    assert [event.close_code for event in events if isinstance(event, FramingFailed)] == [1009]


# -- UTF-8 (section 2: close 1007) ---------------------------------------------------


@pytest.mark.parametrize(
    "parts",
    [
        [b"\xff"],
        [b"ok \xc3\x28"],
        [b"\xed\xa0\x80"],  # a UTF-16 surrogate encoded in UTF-8
        [b"ab\xc3", b"\x28cd"],  # invalid sequence split across fragments
        [b"abc\xe2\x82"],  # truncated at the end of the message
        [b"abc\xe2", b"\x82"],  # truncated, split across fragments
    ],
)
def test_invalid_utf8_fails_1007(parts: list[bytes]) -> None:
    server = Framing(client=False)
    events = server.receive_data(fragments(TEXT, parts))
    assert [type(event) for event in events] == [FramingFailed]
    assert isinstance(events[0], FramingFailed) and events[0].close_code == 1007
    assert close_code_sent(server) == 1007


def test_valid_character_split_across_fragments_is_accepted() -> None:
    server = Framing(client=False)
    encoded = "€".encode()
    wire = fragments(TEXT, [b"a" + encoded[:1], encoded[1:2], encoded[2:] + b"b"])
    assert server.receive_data(wire) == [TextReceived("a€b")]


def test_invalid_utf8_in_close_reason_fails_1007() -> None:
    server = Framing(client=False)
    events = server.receive_data(frame(CLOSE, struct.pack("!H", 1000) + b"\xff"))
    assert [type(event) for event in events] == [FramingFailed]
    assert isinstance(events[0], FramingFailed) and events[0].close_code == 1007


# -- binary (section 2: the caller closes 1003) ----------------------------------------


def test_binary_message_reports_its_size_only() -> None:
    server = Framing(client=False)
    assert server.receive_data(frame(BINARY, b"\x00" * 300)) == [BinaryReceived(300)]
    assert server.data_to_send() == b""  # the caller decides to close 1003
    server.send_close(1003)
    assert close_code_sent(server) == 1003


def test_fragmented_binary_message_reports_total_size() -> None:
    server = Framing(client=False)
    assert server.receive_data(fragments(BINARY, [b"ab", b"", b"cde"])) == [BinaryReceived(5)]


def test_oversized_binary_message_fails_1009() -> None:
    server = Framing(client=False, max_message_bytes=100)
    events = server.receive_data(frame(BINARY, b"\x00" * 101))
    assert [event.close_code for event in events if isinstance(event, FramingFailed)] == [1009]


# -- ping / pong / close -------------------------------------------------------------


def test_ping_is_answered_with_a_pong_automatically() -> None:
    client, server = Framing(client=True), Framing(client=False)
    client.send_ping(b"are you there")
    assert server.receive_data(client.data_to_send()) == [PingReceived(b"are you there")]
    assert client.receive_data(server.data_to_send()) == [PongReceived(b"are you there")]


def test_ping_payload_over_125_bytes_is_refused() -> None:
    with pytest.raises(LocalProtocolError):
        Framing(client=True).send_ping(b"x" * 126)


def test_close_is_echoed_and_completes_the_handshake() -> None:
    client, server = Framing(client=True), Framing(client=False)
    client.send_close(1000, "bye")
    assert client.state is FramingState.CLOSING
    assert server.receive_data(client.data_to_send()) == [CloseReceived(1000, "bye")]
    assert server.close_received and server.closed_sent
    assert server.state is FramingState.CLOSED
    assert client.receive_data(server.data_to_send()) == [CloseReceived(1000, "")]
    assert client.state is FramingState.CLOSED
    assert client.data_to_send() == b""  # no echo of the echo


def test_close_without_code_is_reported_as_none_and_echoed_empty() -> None:
    server = Framing(client=False)
    assert server.receive_data(frame(CLOSE)) == [CloseReceived(None, "")]
    assert server.data_to_send() == b"\x88\x00"


def test_messages_arriving_while_closing_are_still_reported() -> None:
    client, server = Framing(client=True), Framing(client=False)
    server.send_close(1001)
    client.send_text("late result")
    client_wire = client.data_to_send()
    assert server.receive_data(client_wire) == [TextReceived("late result")]
    # No pong once our close is out (RFC 6455 5.5.1): the ping is reported only.
    assert server.receive_data(frame(PING, b"p")) == [PingReceived(b"p")]
    server.data_to_send()
    assert server.receive_data(frame(CLOSE, struct.pack("!H", 1001))) == [CloseReceived(1001, "")]
    assert server.data_to_send() == b""


def test_send_after_close_is_local_protocol_error_and_close_is_idempotent() -> None:
    client = Framing(client=True)
    client.send_close(1000)
    with pytest.raises(LocalProtocolError):
        client.send_text("too late")
    with pytest.raises(LocalProtocolError):
        client.send_ping()
    client.data_to_send()
    client.send_close(1001)  # already closed: nothing more is queued
    assert client.data_to_send() == b""


def test_text_that_cannot_be_utf8_is_refused() -> None:
    client = Framing(client=True)
    with pytest.raises(LocalProtocolError):
        client.send_text("lone \ud800 surrogate")
    client.send_text("still usable")
    assert Framing(client=False).receive_data(client.data_to_send()) == [
        TextReceived("still usable")
    ]


@pytest.mark.parametrize("code", [999, 1004, 1005, 1006, 1015, 2000, 5000])
def test_unsendable_close_codes_are_refused(code: int) -> None:
    with pytest.raises(LocalProtocolError):
        Framing(client=True).send_close(code)


def test_invalid_limits_are_refused() -> None:
    with pytest.raises(LocalProtocolError):
        Framing(client=True, max_message_bytes=0)
    with pytest.raises(LocalProtocolError):
        Framing(client=True, max_fragments=0)


# -- protocol errors (1002) and what follows -------------------------------------------


def test_server_receiving_unmasked_frame_fails_1002() -> None:
    server = Framing(client=False)
    events = server.receive_data(frame(TEXT, b"hi", masked=False))
    assert [type(event) for event in events] == [FramingFailed]
    assert isinstance(events[0], FramingFailed) and events[0].close_code == 1002
    assert close_code_sent(server) == 1002


def test_client_receiving_masked_frame_fails_1002() -> None:
    client = Framing(client=True)
    events = client.receive_data(frame(TEXT, b"hi", masked=True))
    assert [type(event) for event in events] == [FramingFailed]
    assert isinstance(events[0], FramingFailed) and events[0].close_code == 1002
    assert close_code_sent(client, sender_is_client=True) == 1002


@pytest.mark.parametrize(
    "wire",
    [
        frame(TEXT, b"x", rsv=0x40),  # RSV1: permessage-deflate was never negotiated
        frame(0x3, b"x"),  # reserved opcode
        frame(CONTINUATION, b"x"),  # continuation with no message started
        frame(TEXT, b"a", fin=False) + frame(TEXT, b"b"),  # new message inside one
        frame(PING, b"p", fin=False),  # fragmented control frame
        frame(CLOSE, b"\x03"),  # one-byte close payload
        frame(CLOSE, struct.pack("!H", 1005)),  # local-only close code on the wire
    ],
)
def test_protocol_violations_fail_1002(wire: bytes) -> None:
    server = Framing(client=False)
    events = server.receive_data(wire)
    assert [type(event) for event in events] == [FramingFailed]
    assert isinstance(events[0], FramingFailed) and events[0].close_code == 1002


def test_data_after_failure_or_close_is_ignored() -> None:
    server = Framing(client=False)
    server.receive_data(frame(TEXT, b"x", masked=False))
    server.data_to_send()
    assert server.receive_data(frame(TEXT, b"ignored")) == []
    assert server.receive_data(None) == []
    assert server.data_to_send() == b""

    server = Framing(client=False)
    server.receive_data(frame(CLOSE, struct.pack("!H", 1000)))
    server.data_to_send()
    assert server.receive_data(frame(TEXT, b"ignored") + frame(PING)) == []
    assert server.data_to_send() == b""


def test_events_before_a_failure_in_the_same_read_are_kept() -> None:
    server = Framing(client=False)
    wire = frame(TEXT, b"first") + frame(TEXT, b"\xff") + frame(TEXT, b"never")
    events = server.receive_data(wire)
    assert events[0] == TextReceived("first")
    assert isinstance(events[1], FramingFailed) and events[1].close_code == 1007
    assert len(events) == 2


def test_eof_reports_transport_closed_once() -> None:
    server = Framing(client=False)
    server.receive_data(frame(TEXT, b"partial", fin=False))
    assert server.receive_data(None) == [TransportClosed()]
    assert server.state is FramingState.CLOSED
    assert server.receive_data(None) == []
    with pytest.raises(LocalProtocolError):
        server.send_text("after eof")
    server.send_close(1000)  # nothing to close any more: a no-op
    assert server.data_to_send() == b""


# -- properties ---------------------------------------------------------------------

# Messages a well-behaved client may send, as raw frames.
_texts = st.text(max_size=40)
_text_message = st.lists(_texts, min_size=1, max_size=4).map(
    lambda parts: fragments(TEXT, [part.encode() for part in parts])
)
_control = st.sampled_from([frame(PING, b"p"), frame(PONG, b"q"), frame(PING)])
_binary = st.binary(max_size=30).map(lambda payload: frame(BINARY, payload))
_oversized = st.just(fragments(TEXT, [b"z" * 60, b"z" * 60]))
_stream = st.tuples(
    st.lists(st.one_of(_text_message, _text_message, _control, _binary), max_size=8),
    st.sampled_from([b"", frame(CLOSE, struct.pack("!H", 1000) + b"bye"), frame(CLOSE)]),
    st.booleans(),
).map(lambda t: b"".join(t[0]) + t[1] if not t[2] else b"".join(t[0]))


def _feed(wire: bytes, cuts: list[int], max_message_bytes: int) -> tuple[list[object], bytes]:
    server = Framing(client=False, max_message_bytes=max_message_bytes)
    events: list[object] = []
    start = 0
    for cut in [*sorted(set(cuts)), len(wire)]:
        events += server.receive_data(wire[start:cut])
        start = cut
    return events, server.data_to_send()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    wire=st.one_of(_stream, st.tuples(_stream, _oversized).map(b"".join)),
    data=st.data(),
)
def test_any_chunking_yields_the_same_events(wire: bytes, data: st.DataObject) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=20))
    whole = _feed(wire, [], max_message_bytes=100)
    chunked = _feed(wire, cuts, max_message_bytes=100)
    assert chunked == whole


_DOCUMENTED = (
    TextReceived,
    BinaryReceived,
    PingReceived,
    PongReceived,
    CloseReceived,
    FramingFailed,
    TransportClosed,
)


@settings(max_examples=300, deadline=None)
@given(
    client=st.booleans(),
    chunks=st.lists(
        st.one_of(
            st.binary(max_size=64),
            # Plausible headers make the parser go deeper than pure noise does.
            st.tuples(
                st.sampled_from([0x01, 0x81, 0x02, 0x88, 0x89, 0x8A, 0x00, 0x80]),
                st.binary(max_size=40),
            ).map(lambda t: bytes([t[0]]) + t[1]),
        ),
        max_size=10,
    ),
)
def test_random_bytes_give_only_documented_events(client: bool, chunks: list[bytes]) -> None:
    framing = Framing(client=client, max_message_bytes=64, max_fragments=4)
    events = []
    for chunk in chunks:
        events += framing.receive_data(chunk)
        framing.data_to_send()
    events += framing.receive_data(None)
    assert all(isinstance(event, _DOCUMENTED) for event in events)
    for event in events:
        if isinstance(event, FramingFailed):
            assert event.close_code in (1002, 1007, 1009)
    assert framing.state is FramingState.CLOSED
