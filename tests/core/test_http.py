"""`HttpServerConnection` alone: plain HTTP/1.1 on the mesh's port, sans-IO, on plain
`now` numbers. Requests in, answers out, keep-alive and pipelining, the bounds (431, 413),
the timers (408, the quiet idle close), 100-continue, streamed answers and the spec 1
error body."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from svantic_proto.errors import InvalidState
from svantic_proto.http import HttpClosed, HttpRequest, HttpServerConnection

SECRET = "s3cr3t-request-bytes"


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    chunks: list[bytes] = field(default_factory=list)


def parse(data: bytes) -> tuple[list[Response], bytes]:
    """Every complete response in `data` (Content-Length or chunked), and what is left."""
    responses: list[Response] = []
    while b"\r\n\r\n" in data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if 100 <= status < 200:
            responses.append(Response(status, headers, b""))
            data = rest
            continue
        if headers.get("transfer-encoding") == "chunked":
            chunks: list[bytes] = []
            while True:
                size_line, sep, after = rest.partition(b"\r\n")
                if not sep:
                    return responses, data
                size = int(size_line, 16)
                if len(after) < size + 2:
                    return responses, data
                rest = after[size + 2:]
                if size == 0:
                    break
                chunks.append(after[:size])
            responses.append(Response(status, headers, b"".join(chunks), chunks))
        else:
            length = int(headers.get("content-length", "0"))
            if len(rest) < length:
                return responses, data
            responses.append(Response(status, headers, rest[:length]))
            rest = rest[length:]
        data = rest
    return responses, data


class Peer:
    """The client side: writes bytes into the connection and collects what comes back."""

    def __init__(self, **options: float | int) -> None:
        self.conn = HttpServerConnection(now=0.0, **options)  # type: ignore[arg-type]
        self.received = b""
        self.closed = False
        self.requests: list[HttpRequest] = []
        self.closes: list[HttpClosed] = []

    def send(self, data: bytes, now: float = 0.0) -> list[HttpRequest]:
        self.conn.receive_data(data, now)
        return self.drain()

    def drain(self) -> list[HttpRequest]:
        new: list[HttpRequest] = []
        for event in self.conn.events_received():
            if isinstance(event, HttpRequest):
                new.append(event)
            else:
                self.closes.append(event)
        self.requests += new
        for chunk in self.conn.data_to_send():
            assert not self.closed, "bytes written after the close marker"
            if chunk == b"":
                self.closed = True
            else:
                self.received += chunk
        return new

    def responses(self) -> list[Response]:
        responses, _ = parse(self.received)
        return responses

    def timer(self, now: float) -> list[HttpRequest]:
        self.conn.handle_timer(now)
        return self.drain()


def get(target: str = "/", *headers: str, method: str = "GET", version: str = "1.1",
        body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/{version}", "Host: mesh.test", *headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def error_of(response: Response) -> dict[str, str]:
    assert response.headers["content-type"] == "application/json"
    document = json.loads(response.body)
    assert set(document) == {"error"}
    assert set(document["error"]) == {"code", "message"}
    return document["error"]  # type: ignore[no-any-return]


# -- requests and answers ----------------------------------------------------------------------


def test_a_request_gives_its_method_decoded_path_query_lowercase_headers_and_body() -> None:
    peer = Peer()
    (request,) = peer.send(
        b"POST /v1/agents/a%20b/run?x=1&y=%20 HTTP/1.1\r\nHost: mesh.test\r\n"
        b"X-Trace-ID: Abc\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n"
        b'{"a":1}')
    assert request.method == "POST"
    assert request.target == "/v1/agents/a%20b/run?x=1&y=%20"
    assert request.path == "/v1/agents/a b/run"
    assert request.query == "x=1&y=%20"
    assert request.body == b'{"a":1}'
    assert ("x-trace-id", "Abc") in request.headers
    assert request.header("content-type") == "application/json"
    assert request.header("missing") is None
    assert peer.conn.answering and peer.conn.requests == 1
    assert peer.conn.next_deadline() is None  # no timer while the application answers
    assert peer.received == b""


def test_respond_writes_status_headers_content_length_and_body() -> None:
    peer = Peer()
    peer.send(get("/health"))
    peer.conn.respond(200, [("Content-Type", "application/json"), ("Content-Length", "999")],
                      b'{"ok":true}', now=1.0)
    peer.drain()
    head = peer.received.split(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 200")
    assert head.count(b"content-length") == 1  # the application's own is replaced
    (response,) = peer.responses()
    assert response.status == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["content-length"] == str(len(b'{"ok":true}'))
    assert response.body == b'{"ok":true}'
    assert not peer.closed and not peer.conn.answering


def test_two_requests_in_a_row_on_one_kept_alive_connection() -> None:
    peer = Peer()
    (first,) = peer.send(get("/one"))
    peer.conn.respond(200, [], b"1", now=1.0)
    peer.drain()
    (second,) = peer.send(get("/two"), now=2.0)
    peer.conn.respond(201, [], b"22", now=3.0)
    peer.drain()
    assert (first.path, second.path) == ("/one", "/two")
    assert [(r.status, r.body) for r in peer.responses()] == [(200, b"1"), (201, b"22")]
    assert not peer.closed and peer.conn.requests == 2


def test_two_pipelined_requests_the_second_only_after_the_first_answer() -> None:
    peer = Peer()
    handed = peer.send(get("/one") + get("/two", body=b"xy"))
    assert [r.path for r in handed] == ["/one"]  # one at a time
    peer.conn.respond(200, [], b"first", now=1.0)
    handed = peer.drain()
    assert [(r.path, r.body) for r in handed] == [("/two", b"xy")]
    peer.conn.respond(200, [], b"second", now=2.0)
    peer.drain()
    assert [r.body for r in peer.responses()] == [b"first", b"second"]
    assert not peer.closed


def test_connection_close_closes_after_the_answer() -> None:
    peer = Peer()
    peer.send(get("/", "Connection: close"))
    assert not peer.closed
    peer.conn.respond(200, [], b"bye", now=1.0)
    peer.drain()
    (response,) = peer.responses()
    assert response.body == b"bye" and response.headers.get("connection") == "close"
    assert peer.closed and peer.conn.closed
    assert len(peer.closes) == 1


def test_http_1_0_closes_after_the_answer() -> None:
    peer = Peer()
    (request,) = peer.send(get("/", version="1.0"))
    assert request.path == "/"
    peer.conn.respond(200, [], b"old", now=1.0)
    peer.drain()
    assert peer.responses()[0].body == b"old"
    assert peer.closed


# -- bounds ------------------------------------------------------------------------------------


def test_huge_headers_are_431_with_the_error_body_and_close() -> None:
    peer = Peer(max_header_bytes=1024)
    handed = peer.send(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + SECRET.encode() * 200)
    assert handed == []
    (response,) = peer.responses()
    assert response.status == 431
    assert error_of(response)["code"] == "REQUEST_HEADERS_TOO_LARGE"
    assert SECRET.encode() not in peer.received
    assert peer.closed


def test_content_length_over_the_bound_is_413_before_any_body_byte() -> None:
    peer = Peer(max_body_bytes=100)
    handed = peer.send(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\n\r\n")
    assert handed == []
    (response,) = peer.responses()
    assert response.status == 413
    assert error_of(response)["code"] == "PAYLOAD_TOO_LARGE"
    assert peer.closed


def test_a_chunked_body_over_the_bound_is_413() -> None:
    peer = Peer(max_body_bytes=100)
    handed = peer.send(b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"40\r\n" + b"a" * 64 + b"\r\n")
    assert handed == [] and not peer.closed
    handed = peer.send(b"40\r\n" + b"b" * 64 + b"\r\n0\r\n\r\n")
    assert handed == []
    (response,) = peer.responses()
    assert response.status == 413 and error_of(response)["code"] == "PAYLOAD_TOO_LARGE"
    assert peer.closed


def test_a_chunked_body_within_the_bound_is_handed_whole() -> None:
    peer = Peer(max_body_bytes=100)
    (request,) = peer.send(b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                           b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    assert request.body == b"abcde"


def test_garbage_is_400_without_echoing_it() -> None:
    peer = Peer()
    peer.send(b"\x16\x03\x01 " + SECRET.encode() + b"\r\n\r\n")
    (response,) = peer.responses()
    assert response.status == 400
    assert error_of(response)["code"] == "BAD_REQUEST"
    assert SECRET.encode() not in peer.received
    assert peer.closed


def test_pipelining_beyond_the_buffer_bound_closes_after_the_answer() -> None:
    peer = Peer(max_buffered_bytes=1000)
    peer.send(get("/one"))
    for _ in range(50):  # the client keeps writing while the application answers
        peer.send(get("/more", "X-Pad: " + "p" * 200))
    assert len(peer.conn._h11.trailing_data[0]) <= 1000 + 300  # not kept without bound
    peer.conn.respond(200, [], b"ok", now=1.0)
    handed = peer.drain()
    assert handed == []
    (response,) = peer.responses()
    assert response.body == b"ok" and response.headers.get("connection") == "close"
    assert peer.closed


# -- timers ------------------------------------------------------------------------------------


def test_a_request_stalled_past_the_request_timeout_is_408() -> None:
    peer = Peer(request_timeout=10.0, idle_timeout=60.0)
    peer.send(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc", now=1.0)
    deadline = peer.conn.next_deadline()
    assert deadline == 10.0  # from the connection's start: its first bytes came with it
    peer.send(b"def", now=9.0)  # more body bytes do not move it
    assert peer.conn.next_deadline() == 10.0
    peer.timer(9.999)
    assert peer.received == b""
    peer.timer(deadline)
    (response,) = peer.responses()
    assert response.status == 408 and error_of(response)["code"] == "REQUEST_TIMEOUT"
    assert peer.closed


def test_a_complete_head_over_the_bound_in_one_read_is_431() -> None:
    peer = Peer(max_header_bytes=1024)
    peer.send(get("/"))
    peer.conn.respond(200, [], b"", now=1.0)
    handed = peer.send(get("/big", "X-Big: " + "b" * 2000), now=2.0)
    assert handed == []
    assert [r.status for r in peer.responses()] == [200, 431]
    assert peer.closed


def test_a_head_dribbled_byte_by_byte_still_times_out() -> None:
    """The request timeout bounds the whole request from its first byte (slowloris)."""
    peer = Peer(request_timeout=10.0, idle_timeout=60.0)
    peer.send(get("/one"))
    peer.conn.respond(200, [], b"", now=1.0)
    peer.drain()
    request = get("/two")
    for step, byte in enumerate(request[:-1]):
        now = 2.0 + step  # one byte a second, each before the last deadline
        peer.send(bytes([byte]), now=now)
        peer.timer(now)
        if peer.closed:
            break
    assert peer.closed
    assert [r.status for r in peer.responses()] == [200, 408]
    assert peer.requests[-1].path == "/one"


def test_an_idle_kept_alive_connection_closes_quietly_after_the_idle_timeout() -> None:
    peer = Peer(request_timeout=10.0, idle_timeout=60.0)
    peer.send(get("/"))
    peer.conn.respond(204, [], b"", now=5.0)
    peer.drain()
    assert peer.conn.next_deadline() == 65.0
    received = peer.received
    peer.timer(64.0)
    assert not peer.closed
    peer.timer(65.0)
    assert peer.closed and peer.received == received  # nothing written: a quiet close
    assert len(peer.closes) == 1


def test_a_fresh_connection_that_sends_nothing_closes_quietly() -> None:
    peer = Peer(request_timeout=10.0)
    assert peer.conn.next_deadline() == 10.0
    peer.timer(10.0)
    assert peer.closed and peer.received == b""


# -- 100-continue and streaming ----------------------------------------------------------------


def test_expect_100_continue_gets_100_before_the_body() -> None:
    peer = Peer()
    handed = peer.send(b"PUT /x HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                       b"Content-Length: 5\r\n\r\n")
    assert handed == []
    assert peer.received.startswith(b"HTTP/1.1 100")
    (request,) = peer.send(b"hello")
    assert request.body == b"hello"
    peer.conn.respond(200, [], b"done", now=1.0)
    peer.drain()
    assert [r.status for r in peer.responses()] == [100, 200]


def test_expect_100_continue_over_the_bound_is_413_without_100() -> None:
    peer = Peer(max_body_bytes=4)
    peer.send(b"PUT /x HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
    assert [r.status for r in peer.responses()] == [413]
    assert peer.closed


def test_a_streamed_answer_is_chunked_then_the_next_request_comes() -> None:
    peer = Peer()
    peer.send(get("/events") + get("/after"))
    assert [r.path for r in peer.requests] == ["/events"]
    peer.conn.start_stream(200, [("Content-Type", "text/event-stream")])
    peer.conn.send_data(b"data: 1\n\n")
    peer.drain()
    assert peer.responses() == []  # incomplete, but its first chunk is out already
    assert b"data: 1\n\n" in peer.received
    assert b"transfer-encoding: chunked" in peer.received.lower()
    peer.conn.send_data(b"")  # nothing to send: no terminal chunk by mistake
    peer.conn.send_data(b"data: 2\n\n")
    assert peer.requests[-1].path == "/events"
    peer.conn.end_stream(now=1.0)
    handed = peer.drain()
    assert [r.path for r in handed] == ["/after"]
    (streamed,) = peer.responses()
    assert streamed.chunks == [b"data: 1\n\n", b"data: 2\n\n"]
    assert streamed.headers["content-type"] == "text/event-stream"
    peer.conn.respond(200, [], b"x", now=2.0)
    peer.drain()
    assert [r.status for r in peer.responses()] == [200, 200] and not peer.closed


def test_an_answer_to_head_declares_the_length_but_sends_no_body() -> None:
    peer = Peer()
    peer.send(get("/", method="HEAD") + get("/next"))
    peer.conn.respond(200, [], b"hello", now=1.0)
    handed = peer.drain()
    assert peer.received.endswith(b"\r\n\r\n") and b"hello" not in peer.received
    assert b"content-length: 5" in peer.received.lower()
    assert [r.path for r in handed] == ["/next"]


# -- answering rules ---------------------------------------------------------------------------


def test_respond_after_the_client_went_away_does_nothing() -> None:
    peer = Peer()
    peer.send(get("/slow"))
    peer.conn.receive_eof(1.0)
    peer.drain()
    assert peer.closed and peer.conn.closed
    assert [c.reason for c in peer.closes] == ["the client closed the connection"]
    peer.conn.respond(200, [], b"late", now=2.0)
    peer.conn.start_stream(200, [])
    peer.conn.send_data(b"late")
    peer.conn.end_stream(now=2.0)
    peer.drain()
    assert peer.received == b"" and len(peer.closes) == 1


def test_a_stream_stops_when_the_client_goes_away() -> None:
    peer = Peer()
    peer.send(get("/events"))
    peer.conn.start_stream(200, [])
    peer.conn.send_data(b"one")
    peer.drain()
    written = peer.received
    peer.conn.receive_data(b"", 1.0)  # b"" is the EOF
    peer.drain()
    assert peer.closed and len(peer.closes) == 1
    peer.conn.send_data(b"two")
    peer.conn.end_stream(now=2.0)
    peer.drain()
    assert peer.received == written


def test_respond_twice_and_send_data_without_start_are_invalid() -> None:
    peer = Peer()
    with pytest.raises(InvalidState):
        peer.conn.respond(200, [], b"", now=0.0)  # nothing was asked yet
    peer.send(get("/"))
    with pytest.raises(InvalidState):
        peer.conn.send_data(b"x")
    with pytest.raises(InvalidState):
        peer.conn.end_stream(now=0.0)
    peer.conn.respond(200, [], b"", now=1.0)
    with pytest.raises(InvalidState):
        peer.conn.respond(200, [], b"", now=1.0)
    peer.send(get("/stream"))
    peer.conn.start_stream(200, [])
    with pytest.raises(InvalidState):
        peer.conn.respond(200, [], b"", now=1.0)
    with pytest.raises(InvalidState):
        peer.conn.start_stream(200, [])


def test_close_when_idle_while_idle_closes_now() -> None:
    peer = Peer()
    peer.send(get("/"))
    peer.conn.respond(200, [], b"", now=1.0)
    peer.drain()
    received = peer.received
    peer.conn.close_when_idle()
    peer.drain()
    assert peer.closed and peer.received == received
    assert peer.conn.next_deadline() is None


def test_close_when_idle_while_answering_closes_after_the_answer() -> None:
    peer = Peer()
    peer.send(get("/") + get("/pipelined"))
    peer.conn.close_when_idle()
    peer.drain()
    assert not peer.closed and peer.conn.answering
    peer.conn.respond(200, [], b"last", now=1.0)
    handed = peer.drain()
    assert handed == []  # the pipelined request is not taken any more
    (response,) = peer.responses()
    assert response.body == b"last" and response.headers.get("connection") == "close"
    assert peer.closed


def test_close_when_idle_while_streaming_closes_after_the_stream() -> None:
    peer = Peer()
    peer.send(get("/events"))
    peer.conn.start_stream(200, [])
    peer.conn.close_when_idle()
    peer.conn.send_data(b"still")
    peer.conn.end_stream(now=1.0)
    peer.drain()
    (response,) = peer.responses()
    assert response.body == b"still" and peer.closed


def test_refuse_503_answers_the_error_body_and_closes() -> None:
    peer = Peer()
    peer.conn.refuse(503, "AT_CAPACITY", "too many HTTP connections: try again later")
    peer.drain()
    (response,) = peer.responses()
    assert response.status == 503
    assert error_of(response) == {"code": "AT_CAPACITY",
                                  "message": "too many HTTP connections: try again later"}
    assert response.headers.get("connection") == "close"
    assert peer.closed
    peer.send(get("/"))
    assert peer.requests == []


def test_refuse_after_a_stream_started_writes_nothing_more() -> None:
    peer = Peer()
    peer.send(get("/events"))
    peer.conn.start_stream(200, [])
    peer.drain()
    written = peer.received
    peer.conn.refuse(503, "SHUTTING_DOWN", "no")
    peer.drain()
    assert peer.received == written and peer.closed


def test_abort_closes_at_once() -> None:
    peer = Peer()
    peer.send(get("/events"))
    peer.conn.abort("stopped")
    peer.drain()
    assert peer.closed and [c.reason for c in peer.closes] == ["stopped"]
    assert peer.received == b""


@pytest.mark.parametrize("request_bytes", [
    b"GET /" + SECRET.encode() + b" HTTP/1.1\r\nHost: x\r\nX: " + b"y" * 2000 + b"\r\n\r\n",
    b"GET /" + SECRET.encode() + b"\r\n\r\n",
    b"POST /" + SECRET.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n",
])
def test_error_bodies_never_echo_the_request(request_bytes: bytes) -> None:
    peer = Peer(max_header_bytes=1024, max_body_bytes=100)
    peer.send(request_bytes)
    (response,) = peer.responses()
    assert response.status in (400, 413, 431)
    error_of(response)
    assert SECRET.encode() not in peer.received
    assert peer.closed
