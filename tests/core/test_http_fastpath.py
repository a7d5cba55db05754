"""The fast path of `HttpServerConnection` against h11: whatever the bytes, the requests
handed out, the answers written, the timers and the closes are the same with it as with h11
reading and writing everything.

The fast path reads a plain request head itself and writes a plain answer itself; anything
else goes to h11. Each case here runs twice, once as served and once with the fast path off
(`_parse_head` always declining, so h11 reads every request and writes every answer), and
the two runs must agree byte for byte. Requests come from a grammar, then are mutated with
the bytes that matter to HTTP/1.1 framing (CR, LF, NUL, SP, HT, `:`, `,`, obs-text), and
are cut into random reads; answers mix ordinary headers with ones h11 rewrites or refuses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from itertools import pairwise
from typing import Any
from unittest import mock

import h11
import pytest
from h11 import _abnf
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from svantic_proto import http
from svantic_proto.errors import SvanticError
from svantic_proto.http import HttpClosed, HttpRequest, HttpServerConnection

Answer = tuple[Any, list[tuple[Any, Any]], bytes, bool]
"""(status, headers, body, streamed) for one request."""


@contextmanager
def fast_path_off() -> Iterator[None]:
    with mock.patch.object(http, "_parse_head", lambda buf, max_header: None):
        yield


def serve(chunks: Sequence[bytes], answers: Sequence[Answer], *, eof: bool = False,
          **options: Any) -> list[Any]:
    """Everything observable of one connection fed `chunks` (one read each, a second
    apart), answering each request in turn from `answers`."""
    conn = HttpServerConnection(now=0.0, **options)
    log: list[Any] = []
    pending = list(answers)

    def drain(now: float) -> None:
        while True:
            events = conn.events_received()
            out = conn.data_to_send()
            if not events and not out:
                break
            for event in events:
                if isinstance(event, HttpRequest):
                    log.append(("request", event))
                    answer(now)
                else:
                    assert isinstance(event, HttpClosed)
                    log.append(("closed", event.reason))
            log.append(("out", written(out)))
        log.append(("state", conn.next_deadline(), conn.closed, conn.answering, conn.requests))

    def answer(now: float) -> None:
        if not pending:
            return
        status, headers, body, streamed = pending.pop(0)
        try:
            if streamed:
                conn.start_stream(status, headers)
                conn.send_data(body)
                conn.end_stream(now)
            else:
                conn.respond(status, headers, body, now=now)
        except (SvanticError, h11.LocalProtocolError, ValueError, TypeError) as exc:
            log.append(("raised", type(exc).__name__, str(exc)))
            conn.abort("the answer failed")

    now = 0.0
    for chunk in chunks:
        now += 1.0
        conn.receive_data(chunk, now)
        drain(now)
        conn.handle_timer(now + 5.0)  # before the 10 s request timeout: nothing happens
        drain(now)
    if eof:
        conn.receive_eof(now + 1.0)
        drain(now + 1.0)
    conn.handle_timer(now + 100.0)  # every timer due: 408, or the quiet idle close
    drain(now + 100.0)
    return log


def written(out: list[bytes]) -> tuple[bytes, bool]:
    """The bytes written, and whether the close marker came after them (how they are cut
    into chunks is the pump's business: it writes each pass's chunks joined)."""
    assert b"" not in out[:-1], "bytes written after the close marker"
    return b"".join(out), bool(out) and out[-1] == b""


def both(chunks: Sequence[bytes], answers: Sequence[Answer], **options: Any) -> list[Any]:
    fast = serve(chunks, answers, **options)
    with fast_path_off():
        slow = serve(chunks, answers, **options)
    assert fast == slow
    return fast


def cut(data: bytes, points: Sequence[int]) -> list[bytes]:
    edges = sorted({min(max(p, 0), len(data)) for p in points} | {0, len(data)})
    return [data[a:b] for a, b in pairwise(edges) if b > a]


# -- the grammar is h11's -----------------------------------------------------------------------


def test_the_patterns_are_h11s() -> None:
    """The fast path copies h11's grammar; a new h11 that changes it fails here first."""
    assert _abnf.token.encode() == http._TOKEN
    assert _abnf.field_content.encode() == http._FIELD_CONTENT
    assert _abnf.OWS == r"[ \t]*"
    assert _abnf.request_target == r"[\x21-\x7e]+"
    assert _abnf.header_field == (
        f"(?P<field_name>{_abnf.token}):{_abnf.OWS}"
        f"(?P<field_value>({_abnf.field_content})?){_abnf.OWS}")
    assert _abnf.request_line == (
        rf"(?P<method>{_abnf.token}) (?P<target>{_abnf.request_target}) "
        r"HTTP/(?P<http_version>[0-9]\.[0-9])")


# -- the fast path is taken, and only for plain requests ----------------------------------------

DISPATCH = (b"POST /agents/dispatch HTTP/1.1\r\nHost: 127.0.0.1:8443\r\n"
            b"Authorization: Bearer abc.def.ghi\r\nContent-Type: application/json\r\n"
            b"Content-Length: 2\r\n\r\n{}")


def test_a_plain_request_and_its_answer_never_touch_h11() -> None:
    conn = HttpServerConnection(now=0.0)
    conn.receive_data(DISPATCH, 1.0)
    (request,) = conn.events_received()
    assert isinstance(request, HttpRequest) and request.body == b"{}"
    assert conn._wire is None
    conn.respond(200, [("content-type", "application/json")], b"{}", now=2.0)
    assert conn._wire is None
    assert conn.data_to_send() == [b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                                   b"content-length: 2\r\n\r\n{}"]


@pytest.mark.parametrize(("request_bytes", "fast"), [
    (DISPATCH, True),
    (b"GET / HTTP/1.1\r\nhost: x\r\nconnection: Keep-Alive\r\n\r\n", True),
    (b"GET / HTTP/1.1\r\nhost: x\r\nConnection: close\r\n\r\n", True),
    (b"GET / HTTP/1.1\r\nhost:\r\nx-empty:\r\nx-obs: \xe9t\xe9 \x01 ok \r\n\r\n", True),
    (b"GET / HTTP/1.0\r\nhost: x\r\n\r\n", False),
    (b"GET / HTTP/1.1\r\n\r\n", False),  # no Host
    (b"GET / HTTP/1.1\r\nhost: x\r\nhost: y\r\n\r\n", False),
    (b"GET / HTTP/1.1\r\nhost: x\r\nx-fold: a\r\n b\r\n\r\n", False),
    (b"GET / HTTP/1.1\nhost: x\n\n", False),
    (b"GET / HTTP/1.1\r\nhost: x\nx: y\r\n\r\n", False),
    (b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\ncontent-length: 1\r\n\r\nab", False),
    (b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 1, 1\r\n\r\na", False),
    (b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: +1\r\n\r\na", False),
    (b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: " + b"9" * 19 + b"\r\n\r\n", False),
    (b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n", False),
    (b"POST / HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: 0\r\n\r\n", False),
    (b"GET / HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n", False),
    (b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close, te\r\n\r\n", False),
    (b"CONNECT x:443 HTTP/1.1\r\nhost: x\r\n\r\n", False),
    (b"GET / HTTP/1.1\r\nhost : x\r\n\r\n", False),
    (b"GET  / HTTP/1.1\r\nhost: x\r\n\r\n", False),
    (b"\r\nGET / HTTP/1.1\r\nhost: x\r\n\r\n", False),
    (b"GET / HTTP/1.1\r\nhost: x", False),  # not whole yet
])
def test_which_requests_the_fast_path_takes(request_bytes: bytes, fast: bool) -> None:
    assert (http._parse_head(bytearray(request_bytes), 16384) is not None) is fast
    both([request_bytes], [(200, [], b"ok", False)])


def test_the_header_bound_is_the_same_on_both_paths() -> None:
    outcomes = set()
    for pad in range(180, 260):
        request = b"GET / HTTP/1.1\r\nhost: x\r\nx-pad: " + b"p" * pad + b"\r\n\r\n"
        log = both([request], [(200, [], b"", False)], max_header_bytes=256)
        outcomes.add(log[1][1][0][:12] if log[0][0] == "closed" else log[0][0])
    assert outcomes == {"request", b"HTTP/1.1 431"}  # the bound falls inside the range


# -- answers: the same bytes h11 writes ---------------------------------------------------------

HEADERS: list[tuple[Any, Any]] = [
    ("content-type", "application/json"),
    ("Content-Type", "text/plain; charset=utf-8"),
    ("cache-control", "no-store"),
    ("X-Trace-Id", "a b\tc"),
    ("x-empty", ""),
    ("Content-Length", "999"),
    ("content-length", "nonsense"),
    ("connection", "close"),
    ("Connection", "keep-alive"),
    ("host", "mesh"),
    ("Transfer-Encoding", "chunked"),
    ("transfer-encoding", "gzip"),
    ("x-crlf", "a\r\nx-injected: 1"),
    ("x-lf", "a\nb"),
    ("x-nul", "a\x00b"),
    ("x-lead", " a"),
    ("x-trail", "a "),
    ("bad name", "v"),
    ("", "v"),
    ("x-\u00e9", "v"),
    ("x-latin", "caf\u00e9"),
    ("x-ctl", "a\x01b"),
    (b"x-bytes", b"v"),
    ("x-int", 5),
    ("www-authenticate", 'Bearer error="invalid_token"'),
]
STATUSES: list[Any] = [200, 201, 202, 204, 299, 304, 400, 404, 413, 418, 500, 503, 599, 999,
                       100, 101, 199, 1000, 0, -1, True, "200"]


def answers() -> st.SearchStrategy[Answer]:
    return st.tuples(
        st.sampled_from(STATUSES),
        st.lists(st.sampled_from(HEADERS), max_size=4),
        st.sampled_from([b"", b"x", b'{"ok":true}', b"\r\n\r\n", b"z" * 70000]),
        st.booleans(),
    )


@pytest.mark.parametrize("request_bytes", [
    DISPATCH,
    b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"HEAD / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET / HTTP/1.0\r\nHost: x\r\n\r\n",
])
@pytest.mark.parametrize("close_after", [False, True])
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(answer=answers())
def test_every_answer_is_written_as_h11_writes_it(request_bytes: bytes, close_after: bool,
                                                  answer: Answer) -> None:
    def run() -> list[Any]:
        conn = HttpServerConnection(now=0.0)
        conn.receive_data(request_bytes + request_bytes, 1.0)
        if close_after:
            conn.close_when_idle()
        log: list[Any] = [conn.events_received()]
        status, headers, body, streamed = answer
        try:
            if streamed:
                conn.start_stream(status, headers)
                conn.send_data(body)
                conn.end_stream(2.0)
            else:
                conn.respond(status, headers, body, now=2.0)
        except (SvanticError, h11.LocalProtocolError, ValueError, TypeError) as exc:
            log.append((type(exc).__name__, str(exc)))
        log += [written(conn.data_to_send()), conn.events_received(), conn.closed,
                conn.answering, conn.next_deadline()]
        return log

    fast = run()
    with fast_path_off():
        slow = run()
    assert fast == slow


# -- requests: random and hostile ---------------------------------------------------------------

METHODS = [b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"M-1!~",
           b"CONNECT", b"get", b"", b"G T", b"GET\x00"]
TARGETS = [b"/", b"/agents/dispatch", b"/a%20b?x=1&y=%zz", b"*", b"http://h/p?q", b"/~!$&'()",
           b"/\xe9", b"/a b", b"", b"/\x7f"]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"http/1.1", b"HTTP/1.1 ", b"HTTP/11"]
NAMES = [b"Content-Type", b"Authorization", b"X-Trace", b"accept", b"x_under!#$%&'*+.^`|~",
         b"Host", b"host", b"HOST", b"Content-Length", b"content-length", b"Connection",
         b"Transfer-Encoding", b"Expect", b"Upgrade", b"bad name", b"", b"x:y", b"X-\xe9",
         b" host", b"host "]
VALUES = [b"x", b"127.0.0.1:8443", b"application/json", b"Bearer a.b.c", b"", b"  padded  ",
          b"a\tb", b"a \t b", b"caf\xe9", b"a\x01b", b"a\x7fb", b"\x80\xff",
          b"0", b"2", b"5", b"007", b"-1", b"+2", b"2, 2", b"2,3", b"1" * 19, b"close",
          b"Keep-Alive", b"keep-alive, close", b"upgrade", b"chunked", b"gzip", b"100-continue",
          b"a\x00b", b"a\x0bb", b"a\x0cb", b"a\rb", b"a\nb"]
CONNECTIONS = [b"close", b"keep-alive", b"Keep-Alive", b"CLOSE"]
BENIGN_NAMES, BENIGN_VALUES = 5, 12
BYTES = [b"\r", b"\n", b"\r\n", b"\x00", b" ", b"\t", b":", b",", b"\x7f", b"\xe9", b"a",
         b"0", b"\r\n ", b"\r\n\r\n"]


@st.composite
def requests(draw: Callable[..., Any]) -> bytes:
    """A request from the grammar: plain (the fast path's), odd in what it says (h11's),
    or either of them with bytes inserted, deleted or replaced."""
    odd = draw(st.booleans())

    def pick(items: Sequence[Any], plain: int) -> Any:
        return draw(st.sampled_from(items if odd else items[:plain]))

    method, target = pick(METHODS, 7), pick(TARGETS, 6)
    version = pick(VERSIONS, 1)
    fields = [(b"Host", pick(VALUES, 2))] if not odd or draw(st.booleans()) else []
    fields += draw(st.lists(st.tuples(st.just(b""), st.just(b"")), max_size=4))
    fields = [(pick(NAMES, BENIGN_NAMES), pick(VALUES, BENIGN_VALUES)) if not name else
              (name, value) for name, value in fields]
    if draw(st.booleans()):
        fields.append((b"Connection", draw(st.sampled_from(CONNECTIONS))))
    body = draw(st.sampled_from([b"", b"ab", b"{}", b"x" * 40]))
    if body or draw(st.booleans()):
        fields.append((b"Content-Length", str(len(body)).encode()))
    fields = draw(st.permutations(fields))
    spacing = draw(st.sampled_from([b": ", b":", b":  ", b": \t"]))
    trailing = draw(st.sampled_from([b"", b"", b" ", b"\t "]))
    eol = b"\n" if odd and draw(st.integers(0, 5)) == 0 else b"\r\n"
    head = method + b" " + target + b" " + version + eol
    head += b"".join(name + spacing + value + trailing + eol for name, value in fields)
    data = head + eol + body
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2, 3]))):  # insert, delete, replace
        where = draw(st.integers(0, len(data)))
        kind = draw(st.integers(0, 2))
        piece = draw(st.sampled_from(BYTES))
        if kind == 0:
            data = data[:where] + piece + data[where:]
        elif kind == 1:
            data = data[:where] + data[where + 1:]
        else:
            data = data[:where] + piece + data[where + 1:]
    return data


@settings(max_examples=800, deadline=None)
@given(stream=st.lists(requests(), min_size=1, max_size=3),
       points=st.lists(st.integers(0, 400), max_size=4),
       replies=st.lists(answers(), min_size=3, max_size=3),
       eof=st.booleans())
@example(stream=[DISPATCH, DISPATCH], points=[], replies=[(200, [], b"x", False)] * 3,
         eof=False)
@example(stream=[DISPATCH], points=list(range(0, 200, 7)), replies=[(200, [], b"", False)] * 3,
         eof=True)
def test_random_and_hostile_requests_are_served_as_h11_serves_them(
        stream: list[bytes], points: list[int], replies: list[Answer], eof: bool) -> None:
    both(cut(b"".join(stream), points), replies, eof=eof, max_header_bytes=300,
         max_body_bytes=30, max_buffered_bytes=200)


@settings(max_examples=1500, deadline=None)
@given(data=requests())
def test_a_head_the_fast_path_takes_h11_reads_the_same(data: bytes) -> None:
    """Directly: what the fast path makes of a head is what h11 makes of it, and h11 then
    stands where the fast path assumes (keep-alive or not, no 100-continue, no switch)."""
    head = http._parse_head(bytearray(data), 16384)
    if head is None:
        return
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    request = conn.next_event()
    assert isinstance(request, h11.Request)
    assert (request.method, request.target, request.http_version) == (
        head.method, head.target, b"1.1")
    assert tuple((name.decode("ascii"), value.decode("latin-1"))
                 for name, value in request.headers) == head.headers
    assert not conn.client_is_waiting_for_100_continue
    events = []
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA or isinstance(event, h11.EndOfMessage):
            break
        assert isinstance(event, h11.Data)
        events.append(event.data)
    body = data[head.body_start:head.body_start + head.length]
    assert b"".join(events) == body
    if len(data) >= head.body_start + head.length:
        assert isinstance(event, h11.EndOfMessage)
        assert conn.their_state is (h11.DONE if head.keep_alive else h11.MUST_CLOSE)
        assert conn.trailing_data[0] == data[head.body_start + head.length:]


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200), points=st.lists(st.integers(0, 200), max_size=3))
def test_arbitrary_bytes_are_served_as_h11_serves_them(data: bytes, points: list[int]) -> None:
    both(cut(data, points), [(200, [], b"ok", False)] * 3, max_header_bytes=256)


def test_pipelined_plain_requests_one_at_a_time() -> None:
    log = both([DISPATCH * 3], [(200, [("content-type", "application/json")], b"{}", False)] * 3)
    assert sum(kind == "request" for kind, *_ in log) == 3


def test_h11_is_still_what_refuses() -> None:
    """A sanity check of the harness: h11 does refuse what the fast path leaves to it."""
    log = both([b"GET / HTTP/1.1\r\nhost: x\r\nhost: y\r\n\r\n"], [])
    assert any(entry[0] == "out" and entry[1][0].startswith(b"HTTP/1.1 400") for entry in log)
    assert h11.__version__  # the harness compares against the installed h11
