"""Plain HTTP/1.1 on the mesh's port, sans-IO: the control plane (spec 6) shares the port
of `GET /agents/connect`.

A mesh built with `serve_http` hands a transport whose first request is not a WebSocket
upgrade of the connect path to an `HttpServerConnection` (the bytes read so far go with
it), which reads requests one at a time over keep-alive, bounded in header and body bytes,
and writes the application's answers: whole (`respond`) or streamed (`start_stream`,
`send_data`, `end_stream`, for Server-Sent Events). h11 does the HTTP; this module adds
the bounds, the timers and the spec 1 error body. Like the rest of the core it never
touches a socket and never reads a clock.

The fast path. A control-plane call is one small request at a time, and h11's generality
(an event object per step, its state machine, header normalization both ways) was a third
of the mesh's work per dispatch. So a request whose whole head is in the buffer and
that is as plain as requests get (HTTP/1.1, `Content-Length` or no body, exactly one
`Host`, no `Transfer-Encoding`, `Expect`, `Upgrade` or `CONNECT`, a `Connection` header
only of `close` or `keep-alive`, every line matching h11's own grammar) is read here
(`_parse_head`), and its whole answer written here (`_answer_head`): exactly the bytes h11
writes for it, from headers checked by h11's rules. Anything else, however slightly off, is
handed to h11, which decides as it always did: a request the fast path takes is one h11
reads the same way, and tests/core/test_http_fastpath.py holds the two to it. A streamed
answer, or an answer with anything unusual (a status h11 frames differently, a header h11
rewrites), is written by h11 on a connection put in the state that request left it.

Same five-step surface as the core's connections: `receive_data(data, now)` /
`receive_eof(now)`, then `events_received()` (`HttpRequest` for each complete request,
`HttpClosed` once), `data_to_send()` (an empty `bytes` last: close the transport), and
`next_deadline()` / `handle_timer(now)`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote

import h11

from .errors import InvalidState, LocalProtocolError
from .handshake import _error_response, _http_reason

__all__ = ["HttpClosed", "HttpRequest", "HttpServerConnection"]

_CLOSE = b""

_READING, _ANSWERING, _STREAMING, _CLOSED = range(4)


def _reason(status: int) -> bytes:
    return _http_reason(status).encode("ascii")


# h11's grammar (h11/_abnf.py), so that the fast path accepts nothing h11 reads otherwise;
# tests/core/test_http_fastpath.py fails if h11's own patterns ever move away from these.
_TOKEN: Final = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
_FIELD_CONTENT: Final = rb"[^\x00\s]+(?:[ \t]+[^\x00\s]+)*"
_HEADER_LINE: Final = (
    rb"(" + _TOKEN + rb"):[ \t]*((?:" + _FIELD_CONTENT + rb")?)[ \t]*\r\n")
_HEAD: Final = re.compile(
    rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/1\.1\r\n((?:" + _HEADER_LINE + rb")*)\r\n")
"""A whole request head as the fast path takes it: h11's request line for HTTP/1.1, then
h11's header lines, each ended by CRLF (so neither a bare CR or LF nor an obs-fold line
matches), then the empty line."""
_HEADER_LINES: Final = re.compile(_HEADER_LINE)
_FIELD_NAME: Final = re.compile(_TOKEN)
_FIELD_VALUE: Final = re.compile(rb"(?:" + _FIELD_CONTENT + rb")?")
_LENGTH: Final = re.compile(rb"[0-9]{1,18}")
"""A `Content-Length` the fast path takes: plain digits, short enough to be an int at once
(h11 takes up to 20; longer and odder ones are its to judge)."""
_H11_HEADERS: Final = frozenset({b"transfer-encoding", b"expect", b"upgrade"})
"""Request headers that change how h11 reads or answers a request: left to h11."""
_OWN_ANSWER_HEADERS: Final = frozenset({b"host", b"connection", b"transfer-encoding"})
"""Answer headers h11 reorders or rewrites: an answer with one is written by h11."""


class _Head:
    """A request head the fast path read: what `HttpRequest` needs, its body's framing,
    and whether the client keeps the connection."""

    __slots__ = ("body_start", "headers", "keep_alive", "length", "method", "target")

    def __init__(self, *, method: bytes, target: bytes, headers: tuple[tuple[str, str], ...],
                 length: int, keep_alive: bool, body_start: int) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.length = length
        self.keep_alive = keep_alive
        self.body_start = body_start


def _parse_head(buf: bytearray, max_header: int) -> _Head | None:
    """The head at the start of `buf` if it is whole and plain (see the module doc), else
    None: h11 then reads it, whatever it is (incomplete, unusual, too large or wrong).

    Every line is checked against h11's patterns (`_HEAD`); CR and LF only ever end lines (a
    bare one fails the patterns), and a line starting with white space (obs-fold) fails them
    too. A head longer than `max_header` as sent is not looked for (so the work here stays
    bounded per request whatever arrives): h11 reads it, and bounds it as it always did.
    """
    head = _HEAD.match(buf, 0, max_header)
    if head is None:
        return None
    method, target, lines = head.group(1, 2, 3)
    if method == b"CONNECT":
        return None
    size = len(method) + len(target) + 12  # as `_started` measures a head h11 read
    headers: list[tuple[str, str]] = []
    hosts = 0
    length = -1
    keep_alive: bool | None = None
    for raw_name, value in _HEADER_LINES.findall(lines):  # the lines `_HEAD` matched
        name = raw_name.lower()
        size += len(name) + len(value) + 4
        if name == b"host":
            hosts += 1
        elif name == b"content-length":
            if length >= 0 or _LENGTH.fullmatch(value) is None:
                return None
            length = int(value)
        elif name == b"connection":
            option = value.lower()
            if keep_alive is not None or option not in (b"close", b"keep-alive"):
                return None
            keep_alive = option == b"keep-alive"
        elif name in _H11_HEADERS:
            return None
        headers.append((name.decode("ascii"), value.decode("latin-1")))
    if hosts != 1 or size > max_header:
        return None
    return _Head(method=method, target=target, headers=tuple(headers), length=max(length, 0),
                 keep_alive=keep_alive is not False, body_start=head.end())


_STATUS_LINES: dict[int, bytes] = {}
"""`HTTP/1.1 200 OK\r\n` by status, as h11 writes it (200 to 999: bounded)."""
_ANSWER_LINES: dict[tuple[str, str], bytes | None] = {}
"""A checked answer header's line by (name, value); b"" for a `Content-Length` (ours
replaces it), None for one h11 must write. Answers repeat a few constant headers, so this
stays small; it is emptied past `_MAX_ANSWER_LINES` (values that vary cannot grow it)."""
_MAX_ANSWER_LINES: Final = 512
_JOIN_BODY: Final = 65536
"""A body up to this size goes out joined to its head (one chunk for the transport)."""


def _status_line(status: object) -> bytes | None:
    """The status line h11 writes, or None for a status it frames its own way (1xx and
    out of range: its error; 204 and 304: never a body) or refuses (not an int)."""
    if type(status) is not int:
        return None
    line = _STATUS_LINES.get(status)
    if line is None:
        if not 200 <= status < 1000 or status in (204, 304):
            return None
        line = _STATUS_LINES[status] = b"HTTP/1.1 %d %s\r\n" % (status, _reason(status))
    return line


def _answer_line(name: object, value: object) -> bytes | None:
    """`name: value\r\n` for an answer header as h11 would write it, b"" for a
    `Content-Length` (dropped, as `respond` always did), or None when h11 must judge it
    (not text, not ASCII, not its grammar (CR, LF and NUL included), or one it rewrites)."""
    if type(name) is not str or type(value) is not str:
        return None
    key = (name, value)
    try:
        return _ANSWER_LINES[key]
    except KeyError:
        pass
    line: bytes | None
    if name.lower() == "content-length":
        line = b""
    else:
        try:
            raw_name, raw_value = name.encode("ascii"), value.encode("ascii")
        except UnicodeEncodeError:
            return None
        if (_FIELD_NAME.fullmatch(raw_name) is None or _FIELD_VALUE.fullmatch(raw_value) is None
                or raw_name.lower() in _OWN_ANSWER_HEADERS):
            line = None
        else:
            line = b"%s: %s\r\n" % (raw_name, raw_value)
    if len(_ANSWER_LINES) >= _MAX_ANSWER_LINES:
        _ANSWER_LINES.clear()
    _ANSWER_LINES[key] = line
    return line


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """One complete request: its head and its whole body (bounded by the server).

    Header names are lowercase; values are latin-1 text, as HTTP/1.1 carries them.
    `path` is the percent-decoded path without the query; `query` is the raw query.
    """

    method: str
    target: str
    path: str
    query: str
    headers: tuple[tuple[str, str], ...]
    body: bytes = b""

    def header(self, name: str) -> str | None:
        """The first value of header `name` (lowercase), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None


@dataclass(frozen=True, slots=True)
class HttpClosed:
    """The transport is over (the client went away, or we closed it): a streamed answer
    should stop, and nothing written later reaches anyone."""

    reason: str


class _ReadAhead:
    """`trailing_data` of a connection: the bytes received and not yet read as a request
    (h11's while it reads one, else ours), and False (an EOF is never kept)."""

    __slots__ = ("_conn",)

    def __init__(self, conn: HttpServerConnection) -> None:
        self._conn = conn

    @property
    def trailing_data(self) -> tuple[bytes, bool]:
        conn = self._conn
        wire = conn._wire
        if conn._state == _READING and wire is not None:
            return wire.trailing_data[0], False
        return bytes(conn._buf), False


class HttpServerConnection:
    """HTTP/1.1 requests in, answers out, one request at a time (see the module doc).

    Bounds: `max_header_bytes` for a request head (431), `max_body_bytes` for its body
    (413, checked against `Content-Length` before any body byte is read), and
    `max_buffered_bytes` of input read ahead while an answer is pending (a client that
    pipelines more is closed after the answer). Timers: `request_timeout` for a request
    that started arriving (408), `idle_timeout` between requests on a kept-alive
    connection (closed quietly). No timer runs while the application answers: its own
    deadline (a dispatch's `deadline_ms`) bounds that.

    Between requests the input is ours (`_buf`). A request the fast path cannot take gets
    an h11 connection of its own (`_wire`), fed everything buffered; it reads that request
    and writes its answer, and is dropped after it, its unread bytes coming back to
    `_buf`. A request the fast path took has no h11 connection unless its answer needs
    one (`_h11_for_answer`).
    """

    __slots__ = (
        "_body",
        "_buf",
        "_close_after",
        "_deadline",
        "_events",
        "_fast",
        "_head",
        "_idle_timeout",
        "_keep_alive",
        "_max_body",
        "_max_buffered",
        "_max_header",
        "_method",
        "_out",
        "_request_timeout",
        "_state",
        "_timing",
        "_wire",
        "requests",
    )

    def __init__(
        self,
        *,
        now: float,
        max_header_bytes: int = 16384,
        max_body_bytes: int = 1 << 20,
        max_buffered_bytes: int = 1 << 20,
        request_timeout: float = 10.0,
        idle_timeout: float = 60.0,
    ) -> None:
        if max_header_bytes < 256 or max_body_bytes < 0 or max_buffered_bytes < 0:
            raise LocalProtocolError("HTTP bounds must be non-negative (headers at least 256)")
        self._wire: h11.Connection | None = None
        self._buf = bytearray()
        self._max_header = max_header_bytes
        self._max_body = max_body_bytes
        self._max_buffered = max_buffered_bytes
        self._request_timeout = request_timeout
        self._idle_timeout = idle_timeout
        self._events: list[HttpRequest | HttpClosed] = []
        self._out: list[bytes] = []
        self._state = _READING
        self._head: h11.Request | None = None  # read by h11, until answered
        self._fast: _Head | None = None  # read by the fast path, its body still coming
        self._method = b""  # of the request being answered
        self._keep_alive = True  # the fast-path request being answered lets us keep alive
        self._body = bytearray()
        self._close_after = False
        self._deadline: float | None = now + request_timeout
        self._timing = True  # the deadline is the request's (from its first byte), not idle
        self.requests = 0
        """Requests read so far on this connection."""

    # -- the five steps ------------------------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> None:
        if self._state == _CLOSED:
            return
        if not data:
            self.receive_eof(now)
            return
        if self._state == _READING:
            if self._wire is not None:
                self._wire.receive_data(data)
            else:
                self._buf += data
            self._read(now)
        elif len(self._buf) + len(data) > self._max_buffered:
            self._close_after = True  # pipelining beyond the bound: answer, then close
        else:  # kept for after the answer, within the bound (beyond it: not kept at all)
            self._buf += data

    def receive_eof(self, now: float) -> None:
        # Idle, mid-request or mid-answer: nobody is left to answer.
        self._close("the client closed the connection")

    def events_received(self) -> list[HttpRequest | HttpClosed]:
        events, self._events = self._events, []
        return events

    def data_to_send(self) -> list[bytes]:
        out, self._out = self._out, []
        return out

    def next_deadline(self) -> float | None:
        return self._deadline

    def handle_timer(self, now: float) -> None:
        deadline = self._deadline
        if deadline is None or now < deadline or self._state != _READING:
            return
        self._deadline = None
        if self._request_started():
            self._refuse(408, "REQUEST_TIMEOUT", "the request did not arrive in time")
        else:
            self._close("idle keep-alive connection closed")

    # -- answering -----------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._state == _CLOSED

    @property
    def answering(self) -> bool:
        """A request was handed out and its answer is not complete."""
        return self._state in (_ANSWERING, _STREAMING)

    def respond(self, status: int, headers: Sequence[tuple[str, str]], body: bytes, *,
                now: float) -> None:
        """The whole answer to the request last handed out; `Content-Length` is added."""
        self._require(_ANSWERING, "respond")
        if self._state == _CLOSED:
            return
        if self._wire is None:
            head = self._answer_head(status, headers, len(body))
            if head is not None:
                if not body or self._method == b"HEAD":  # HEAD: the length, not the body
                    self._out.append(head)
                elif len(body) <= _JOIN_BODY:  # one write, one TLS record
                    self._out.append(head + body)
                else:  # not copied only to be joined
                    self._out += (head, body)
                self._answered(now)
                return
            self._h11_for_answer()
        h11_headers = [*self._headers(headers), ("content-length", str(len(body)))]
        self._send(h11.Response(status_code=status, headers=h11_headers, reason=_reason(status)))
        if body and not self._head_request:  # HEAD: the length is declared, no body sent
            self._send(h11.Data(data=body))
        self._send(h11.EndOfMessage())
        self._answered(now)

    def start_stream(self, status: int, headers: Sequence[tuple[str, str]]) -> None:
        """Begin an answer of unknown length (chunked): then `send_data`, `end_stream`."""
        self._require(_ANSWERING, "start_stream")
        if self._state == _CLOSED:
            return
        if self._wire is None:
            self._h11_for_answer()
        self._send(h11.Response(status_code=status, headers=self._headers(headers),
                                reason=_reason(status)))
        self._state = _STREAMING

    def send_data(self, data: bytes) -> None:
        self._require(_STREAMING, "send_data")
        if self._state != _CLOSED and data and not self._head_request:
            self._send(h11.Data(data=data))

    def end_stream(self, now: float) -> None:
        self._require(_STREAMING, "end_stream")
        if self._state == _CLOSED:
            return
        self._send(h11.EndOfMessage())
        self._answered(now)

    def close_when_idle(self) -> None:
        """Close after the answer in progress, or now when none is: a mesh shutting down
        answers what it took and keeps no connection alive."""
        self._close_after = True
        if self._state == _READING:
            self._close("the server is shutting down")

    def refuse(self, status: int, code: str, message: str) -> None:
        """Answer the spec 1 error body by ourselves and close (the server's own refusal,
        such as 503 over a connection limit), unless an answer already started."""
        self._refuse(status, code, message)

    def abort(self, reason: str) -> None:
        """Close now, whatever is in progress (a streamed answer the server stops)."""
        self._close(reason)

    @property
    def _h11(self) -> _ReadAhead:
        """The input read ahead, shown the way h11's `trailing_data` shows it (what held
        it before the fast path; tests bound it this way)."""
        return _ReadAhead(self)

    # -- internals: answering ------------------------------------------------------------------

    @property
    def _head_request(self) -> bool:
        return self._method == b"HEAD"

    def _require(self, state: int, action: str) -> None:
        if self._state not in (state, _CLOSED):
            raise InvalidState(f"{action}: no request is waiting for this kind of answer")

    def _answer_head(self, status: int, headers: Sequence[tuple[str, str]],
                     length: int) -> bytes | None:
        """The head h11 would write for this whole answer to a fast-path request (the
        headers, then `Content-Length`, `Connection: close` where h11 puts it), or None
        when anything in it is for h11 to write or refuse."""
        status_line = _status_line(status)
        if status_line is None:
            return None
        parts = [status_line]
        for name, value in headers:
            line = _answer_line(name, value)
            if line is None:
                return None
            if line:
                parts.append(line)
        if not self._keep_alive:  # the client said close: h11 puts its own header last
            parts.append(b"content-length: %d\r\nConnection: close\r\n\r\n" % length)
        elif self._close_after:  # ours, before the length (as `_headers` adds it)
            parts.append(b"connection: close\r\ncontent-length: %d\r\n\r\n" % length)
        else:
            parts.append(b"content-length: %d\r\n\r\n" % length)
        return b"".join(parts)

    def _h11_for_answer(self) -> None:
        """h11 in the state the fast-path request being answered leaves an exchange (the
        same method, version and keep-alive; nothing else of a request it reads changes
        how it answers), to write an answer the fast path does not."""
        connection = h11.Connection(h11.SERVER, max_incomplete_event_size=self._max_header)
        close = b"" if self._keep_alive else b"connection: close\r\n"
        connection.receive_data(b"%s / HTTP/1.1\r\nhost: h\r\n%s\r\n" % (self._method, close))
        connection.next_event()  # the Request
        connection.next_event()  # its EndOfMessage
        self._wire = connection

    def _headers(self, headers: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        out = [(name, value) for name, value in headers if name.lower() != "content-length"]
        if self._close_after:
            out.append(("connection", "close"))
        return out

    def _send(self, event: h11.Event) -> None:
        assert self._wire is not None  # every answer h11 writes has its connection
        try:
            data = self._wire.send(event)
        except h11.LocalProtocolError as exc:
            raise LocalProtocolError(f"invalid HTTP answer: {exc}") from exc
        if data:
            self._out.append(data)

    def _answered(self, now: float) -> None:
        connection, self._wire = self._wire, None  # h11 answered this one; the next is ours
        if self._close_after or (
            not self._keep_alive if connection is None
            else connection.our_state is not h11.DONE or connection.their_state is not h11.DONE
        ):
            self._close(None)
            return
        self._state = _READING
        self._head = None
        self._deadline = now + self._idle_timeout
        self._timing = False
        self._read(now)

    # -- internals: reading --------------------------------------------------------------------

    def _request_started(self) -> bool:
        """Some of the next request arrived (its timer is the request's, not idle)."""
        connection = self._wire
        return bool(self._head is not None or self._fast is not None or self._buf
                    or (connection is not None and connection.trailing_data[0]))

    def _read(self, now: float) -> None:
        if self._wire is not None:
            self._read_h11(now)
            return
        head = self._fast
        if head is None:
            if not self._buf:
                return
            head = _parse_head(self._buf, self._max_header)
            if head is None:  # not whole yet, or not plain: h11 reads this one
                connection = h11.Connection(h11.SERVER,
                                            max_incomplete_event_size=self._max_header)
                connection.receive_data(bytes(self._buf))
                self._buf = bytearray()
                self._wire = connection
                self._read_h11(now)
                return
            if not self._fast_started(head, now):
                return
        end = head.body_start + head.length
        if len(self._buf) >= end:
            self._fast_complete(head, end)

    def _fast_started(self, head: _Head, now: float) -> bool:
        """`_started` for a head the fast path read (the same bound and timer)."""
        if head.length > self._max_body:
            self._too_large()
            return False
        self._fast = head
        if not self._timing:
            self._timing = True
            self._deadline = now + self._request_timeout
        return True

    def _fast_complete(self, head: _Head, end: int) -> None:
        buf = self._buf
        body = bytes(buf[head.body_start:end])
        del buf[:end]
        self._fast = None
        self._method = head.method
        self._keep_alive = head.keep_alive
        target = head.target.decode("ascii")
        raw_path, _, query = target.partition("?")
        self.requests += 1
        self._events.append(HttpRequest(
            method=head.method.decode("ascii"),
            target=target,
            path=unquote(raw_path, errors="replace"),
            query=query,
            headers=head.headers,
            body=body,
        ))
        self._state = _ANSWERING
        self._deadline = None

    def _read_h11(self, now: float) -> None:
        connection = self._wire
        assert connection is not None
        while self._state == _READING:
            try:
                event = connection.next_event()
            except h11.RemoteProtocolError as exc:
                if exc.error_status_hint == 431:
                    self._refuse(431, "REQUEST_HEADERS_TOO_LARGE",
                                 f"request headers exceed {self._max_header} bytes")
                else:
                    self._refuse(400, "BAD_REQUEST", "malformed HTTP/1.1 request")
                return
            if event is h11.NEED_DATA:
                # The request timeout runs from a request's first byte: more bytes of it
                # never move it (a head dribbled byte by byte still times out).
                started = self._head is not None or connection.trailing_data[0]
                if started and not self._timing:
                    self._timing = True
                    self._deadline = now + self._request_timeout
                return
            if isinstance(event, h11.Request):
                if not self._started(event, now):
                    return
            elif isinstance(event, h11.Data):
                if len(self._body) + len(event.data) > self._max_body:
                    self._too_large()
                    return
                self._body += event.data
            elif isinstance(event, h11.EndOfMessage):
                self._complete()
                return
            elif isinstance(event, h11.ConnectionClosed):
                self._close("the client closed the connection")
                return
            else:  # PAUSED cannot come while reading a request
                return

    def _started(self, request: h11.Request, now: float) -> bool:
        self._head = request
        # h11 bounds only a head still incomplete: one that came whole in a read is
        # measured here (its request line and header lines, as sent less the spacing).
        size = len(request.method) + len(request.target) + 12 + sum(
            len(name) + len(value) + 4 for name, value in request.headers)
        if size > self._max_header:
            self._refuse(431, "REQUEST_HEADERS_TOO_LARGE",
                         f"request headers exceed {self._max_header} bytes")
            return False
        if not self._timing:
            self._timing = True
            self._deadline = now + self._request_timeout
        for name, value in request.headers:
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:  # pragma: no cover - h11 refuses it first
                    length = self._max_body + 1
                if length > self._max_body:
                    self._too_large()
                    return False
        connection = self._wire
        if connection is not None and connection.client_is_waiting_for_100_continue:
            self._send(h11.InformationalResponse(status_code=100, headers=[]))
        return True

    def _complete(self) -> None:
        head, connection = self._head, self._wire
        if head is None or connection is None:  # pragma: no cover - after a Request
            return
        target = head.target.decode("ascii", "replace")
        raw_path, _, query = target.partition("?")
        self.requests += 1
        self._events.append(HttpRequest(
            method=head.method.decode("ascii", "replace"),
            target=target,
            path=unquote(raw_path, errors="replace"),
            query=query,
            headers=tuple((name.decode("ascii", "replace"), value.decode("latin-1"))
                          for name, value in head.headers),
            body=bytes(self._body),
        ))
        self._body = bytearray()
        self._method = head.method
        # What came after this request is ours again; h11 only writes this one's answer.
        self._buf = bytearray(connection.trailing_data[0])
        self._state = _ANSWERING
        self._deadline = None

    def _too_large(self) -> None:
        self._refuse(413, "PAYLOAD_TOO_LARGE", f"the body exceeds {self._max_body} bytes")

    def _refuse(self, status: int, code: str, message: str) -> None:
        """An answer the server gives by itself; the connection closes after it (the
        rest of a bad request cannot be told from the next one)."""
        connection = self._wire
        if self._state != _CLOSED and (
                connection is None or connection.our_state in (h11.IDLE, h11.SEND_RESPONSE)):
            self._out.append(_error_response(status, code, message)[1])
        self._close(message)

    def _close(self, reason: str | None) -> None:
        if self._state == _CLOSED:
            return
        self._state = _CLOSED
        self._deadline = None
        self._out.append(_CLOSE)
        self._events.append(HttpClosed(reason or "answered; connection closed"))
