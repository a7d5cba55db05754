"""Fuzz target: the WebSocket upgrade parser (`ServerHandshake`, spec 1).

Inputs are upgrade requests built from the grammar of a real one, then bent: headers dropped,
repeated, re-cased, padded, given control characters or huge values, the request line or the
query broken, and arbitrary bytes. The oracle: the parser never raises on peer input, decides
the same whatever the chunking, and its decision is one the spec documents: an
`UpgradeRequested` only for a request that carries everything an upgrade needs, otherwise a
complete HTTP answer with the spec 1 JSON error body and a status from the documented set.
"""

from __future__ import annotations

import base64
import itertools
import json
from typing import Any

import h11
from fuzz_settings import FUZZ
from hypothesis import given
from hypothesis import strategies as st

from svantic_proto.handshake import (
    HandshakeRefused,
    PlainHttpRequest,
    ServerHandshake,
    UpgradeRequested,
)

KEY = base64.b64encode(b"0123456789abcdef").decode()
MAX_HEADER = 4096
REFUSAL_STATUSES = {400, 404, 405, 426, 431}

BASE_HEADERS = [
    ("Host", "127.0.0.1:8443"),
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Key", KEY),
    ("Sec-WebSocket-Version", "13"),
    ("Sec-WebSocket-Protocol", "svantic.v1"),
    ("Authorization", "Bearer abc.def.ghi"),
]
header_names = st.sampled_from([name for name, _ in BASE_HEADERS] + [
    "Content-Length", "Transfer-Encoding", "Cookie", "X-Pad", "sec-websocket-key", "HOST",
    "Expect", "Origin", "", " Host", "Host ", "Bad Name", "Na\x00me"])
header_values = st.sampled_from([
    "websocket", "Upgrade", "13", "8", KEY, "short", "svantic.v1", "chunked", "0", "5",
    "Bearer", "Bearer  x", "Basic abc", "", " ", "a\x00b", "a\rb", "é", "x" * 5000,
]) | st.text(max_size=30)


@st.composite
def upgrade_request(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from(["GET", "GET", "GET", "POST", "get", "CONNECT", "G ET"]))
    path = draw(st.sampled_from(["/agents/connect", "/agents/connect", "/other", "",
                                 "/agents/connect/", "*", "/agents/connect#x"]))
    query = draw(st.sampled_from(["?instance_id=a-1", "?instance_id=", "", "?instance_id=%ff",
                                  "?instance_id=a&instance_id=b", "?%zz", "?instance_id=é"]))
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2", "HTTP/1.1 "]))
    headers = list(BASE_HEADERS)
    for _ in range(draw(st.integers(0, 5))):
        op = draw(st.sampled_from(["drop", "dup", "set", "add", "case", "pad"]))
        if op == "drop" and headers:
            headers.pop(draw(st.integers(0, len(headers) - 1)))
        elif op == "dup" and headers:
            headers.append(draw(st.sampled_from(headers)))
        elif op == "set" and headers:
            at = draw(st.integers(0, len(headers) - 1))
            headers[at] = (headers[at][0], draw(header_values))
        elif op == "add":
            headers.append((draw(header_names), draw(header_values)))
        elif op == "case" and headers:
            at = draw(st.integers(0, len(headers) - 1))
            headers[at] = (headers[at][0].swapcase(), headers[at][1])
        elif op == "pad":
            headers += [("X-Pad", "p" * 64)] * draw(st.integers(1, 100))
    head = f"{method} {path}{query} {version}\r\n" + "".join(
        f"{name}: {value}\r\n" for name, value in headers) + "\r\n"
    raw = head.encode("utf-8", "surrogatepass")
    tail = draw(st.sampled_from([b"", b"", b"\x81\x80abcd", b"junk"]))
    return raw + tail


def _decide(data: bytes, cuts: list[int], *, serve_http: bool) -> Any:
    parser = ServerHandshake(max_header_bytes=MAX_HEADER, serve_http=serve_http)
    decision = None
    for begin, end in itertools.pairwise([0, *cuts, len(data)]):
        decision = parser.receive_data(data[begin:end])
        if decision is not None:
            break
    if decision is None:
        decision = parser.receive_data(b"")  # EOF: it must decide now
    return decision


def _check_refusal(refusal: HandshakeRefused) -> None:
    assert refusal.status in REFUSAL_STATUSES, refusal
    body = json.loads(refusal.body_bytes)
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == refusal.code
    # The answer is one complete HTTP response a client parses.
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    client.send(h11.EndOfMessage())
    client.receive_data(refusal.response_bytes)
    response = client.next_event()
    assert isinstance(response, h11.Response) and response.status_code == refusal.status
    assert (b"content-type", b"application/json") in response.headers
    for text in (refusal.message, body["error"]["message"]):
        assert "Traceback" not in text and "Error(" not in text


def _comparable(decision: Any) -> Any:
    if isinstance(decision, HandshakeRefused):
        return ("refused", decision.status, decision.code)
    if isinstance(decision, UpgradeRequested):
        return ("upgrade", decision.instance_id, decision.bearer_token, decision.subprotocols,
                decision.key)
    if isinstance(decision, PlainHttpRequest):
        return ("plain",)
    return decision


@FUZZ
@given(data=upgrade_request() | st.binary(max_size=400), serve_http=st.booleans(),
       cut_seed=st.lists(st.integers(1, 10_000), max_size=6))
def test_the_upgrade_parser_decides_the_same_whatever_the_chunking(
    data: bytes, serve_http: bool, cut_seed: list[int]
) -> None:
    whole = _decide(data, [], serve_http=serve_http)
    cuts = sorted({c % len(data) for c in cut_seed if len(data) > 1 and c % len(data)})
    assert _comparable(_decide(data, cuts, serve_http=serve_http)) == _comparable(whole)
    assert isinstance(whole, UpgradeRequested | HandshakeRefused | PlainHttpRequest), whole
    if isinstance(whole, HandshakeRefused):
        _check_refusal(whole)
    elif isinstance(whole, PlainHttpRequest):
        assert serve_http and data.startswith(whole.data[:1])
    else:
        head = data.split(b"\r\n\r\n", 1)[0].lower()
        # Nothing is an upgrade unless it asked for one, with a valid key and version 13.
        assert b"upgrade: websocket" in head.replace(b"upgrade:websocket", b"upgrade: websocket")
        assert b"sec-websocket-version: 13" in head
        assert whole.key == KEY or len(base64.b64decode(whole.key)) == 16
        assert len(data) - len(data.split(b"\r\n\r\n", 1)[-1]) <= MAX_HEADER + 4


@FUZZ
@given(size=st.integers(MAX_HEADER - 200, MAX_HEADER * 4), cut=st.integers(1, 512))
def test_a_head_over_the_bound_is_refused_431_without_reading_it_all(size: int,
                                                                      cut: int) -> None:
    head = (f"GET /agents/connect?instance_id=a HTTP/1.1\r\nHost: h\r\nX-Pad: {'p' * size}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()
    parser = ServerHandshake(max_header_bytes=MAX_HEADER)
    decision = None
    fed = 0
    for begin in range(0, len(head), cut):
        decision = parser.receive_data(head[begin:begin + cut])
        fed = begin + cut
        if decision is not None:
            break
    if len(head) > MAX_HEADER + 64:
        assert isinstance(decision, HandshakeRefused) and decision.status == 431
        assert fed <= MAX_HEADER + 2 * cut + 64  # refused as soon as the bound is crossed
    elif isinstance(decision, HandshakeRefused):
        assert decision.status == 431
