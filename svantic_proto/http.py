"""Plain HTTP/1.1 on the mesh's port, sans-IO: the control plane (spec 6) shares the port
of `GET /agents/connect`.

A mesh built with `serve_http` hands a transport whose first request is not a WebSocket
upgrade of the connect path to an `HttpServerConnection` (the bytes read so far go with
it), which reads requests one at a time over keep-alive, bounded in header and body bytes,
and writes the application's answers: whole (`respond`) or streamed (`start_stream`,
`send_data`, `end_stream`, for Server-Sent Events). h11 does the HTTP; this module adds
the bounds, the timers and the spec 1 error body. Like the rest of the core it never
touches a socket and never reads a clock.

Same five-step surface as the core's connections: `receive_data(data, now)` /
`receive_eof(now)`, then `events_received()` (`HttpRequest` for each complete request,
`HttpClosed` once), `data_to_send()` (an empty `bytes` last: close the transport), and
`next_deadline()` / `handle_timer(now)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import unquote

import h11

from .errors import InvalidState, LocalProtocolError
from .handshake import _error_response, _http_reason

__all__ = ["HttpClosed", "HttpRequest", "HttpServerConnection"]

_CLOSE = b""

_READING, _ANSWERING, _STREAMING, _CLOSED = range(4)


def _reason(status: int) -> bytes:
    return _http_reason(status).encode("ascii")


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


class HttpServerConnection:
    """HTTP/1.1 requests in, answers out, one request at a time (see the module doc).

    Bounds: `max_header_bytes` for a request head (431), `max_body_bytes` for its body
    (413, checked against `Content-Length` before any body byte is read), and
    `max_buffered_bytes` of input read ahead while an answer is pending (a client that
    pipelines more is closed after the answer). Timers: `request_timeout` for a request
    that started arriving (408), `idle_timeout` between requests on a kept-alive
    connection (closed quietly). No timer runs while the application answers: its own
    deadline (a dispatch's `deadline_ms`) bounds that.
    """

    __slots__ = (
        "_body",
        "_close_after",
        "_deadline",
        "_events",
        "_h11",
        "_head",
        "_idle_timeout",
        "_max_body",
        "_max_buffered",
        "_max_header",
        "_out",
        "_request_timeout",
        "_state",
        "_timing",
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
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=max_header_bytes)
        self._max_header = max_header_bytes
        self._max_body = max_body_bytes
        self._max_buffered = max_buffered_bytes
        self._request_timeout = request_timeout
        self._idle_timeout = idle_timeout
        self._events: list[HttpRequest | HttpClosed] = []
        self._out: list[bytes] = []
        self._state = _READING
        self._head: h11.Request | None = None
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
            self._h11.receive_data(data)
            self._read(now)
        elif len(self._h11.trailing_data[0]) + len(data) > self._max_buffered:
            self._close_after = True  # pipelining beyond the bound: answer, then close
        else:  # kept for after the answer, within the bound (beyond it: not kept at all)
            self._h11.receive_data(data)

    def receive_eof(self, now: float) -> None:
        if self._state == _CLOSED:
            return
        if self._state == _READING and self._head is None and not self._h11.trailing_data[0]:
            self._close("the client closed the connection")
            return
        # Mid-request or mid-answer: nobody is left to answer.
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
        if self._head is not None or self._h11.trailing_data[0]:
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

    # -- internals -----------------------------------------------------------------------------

    @property
    def _head_request(self) -> bool:
        head = self._head
        return head is not None and head.method == b"HEAD"

    def _require(self, state: int, action: str) -> None:
        if self._state not in (state, _CLOSED):
            raise InvalidState(f"{action}: no request is waiting for this kind of answer")

    def _headers(self, headers: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        out = [(name, value) for name, value in headers if name.lower() != "content-length"]
        if self._close_after:
            out.append(("connection", "close"))
        return out

    def _send(self, event: h11.Event) -> None:
        try:
            data = self._h11.send(event)
        except h11.LocalProtocolError as exc:
            raise LocalProtocolError(f"invalid HTTP answer: {exc}") from exc
        if data:
            self._out.append(data)

    def _answered(self, now: float) -> None:
        connection = self._h11
        if (self._close_after or connection.our_state is not h11.DONE
                or connection.their_state is not h11.DONE):
            self._close(None)
            return
        connection.start_next_cycle()
        self._state = _READING
        self._head = None
        self._body = bytearray()
        self._deadline = now + self._idle_timeout
        self._timing = False
        self._read(now)

    def _read(self, now: float) -> None:
        connection = self._h11
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
        if self._h11.client_is_waiting_for_100_continue:
            self._send(h11.InformationalResponse(status_code=100, headers=[]))
        return True

    def _complete(self) -> None:
        head = self._head
        if head is None:  # pragma: no cover - EndOfMessage follows a Request
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
        self._state = _ANSWERING
        self._deadline = None

    def _too_large(self) -> None:
        self._refuse(413, "PAYLOAD_TOO_LARGE", f"the body exceeds {self._max_body} bytes")

    def _refuse(self, status: int, code: str, message: str) -> None:
        """An answer the server gives by itself; the connection closes after it (the
        rest of a bad request cannot be told from the next one)."""
        if self._h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            self._out.append(_error_response(status, code, message)[1])
        self._close(message)

    def _close(self, reason: str | None) -> None:
        if self._state == _CLOSED:
            return
        self._state = _CLOSED
        self._deadline = None
        self._out.append(_CLOSE)
        self._events.append(HttpClosed(reason or "answered; connection closed"))
