"""The HTTP/1.1 upgrade that opens a connected-mode socket (spec section 1), sans-IO.

This is the only module that imports h11. Client side: `build_upgrade_request()`
makes the request bytes, `ClientHandshake` reads the answer and either hands over
the bytes that follow a 101 (they belong to `Framing`) or raises a typed error
carrying the spec's code. Server side: `ServerHandshake` parses the request and
refuses by itself what is not a WebSocket upgrade for this endpoint;
`check_upgrade()` runs the section 1 table in its order against the caller's token
verifier and instance registry; `accept()` / `reject()` produce the answer bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import http
import ipaddress
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeAlias, TypeVar
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import h11

from .errors import (
    DeploymentModeMismatch,
    HandshakeFailed,
    HandshakeRejected,
    InsecureTransportError,
    InstanceNotFound,
    InvalidState,
    LocalProtocolError,
    MissingInstanceId,
    TenantMismatch,
    Unauthorized,
    UnsupportedSubprotocol,
    UpgradeRequired,
)

__all__ = [
    "CONNECT_PATH",
    "DEPLOYMENT_MODES",
    "MAX_REJECTION_BODY_BYTES",
    "SUBPROTOCOL",
    "Accept",
    "ClientHandshake",
    "ClientUpgrade",
    "DeploymentModeMismatch",
    "HandshakeAccepted",
    "HandshakeFailed",
    "HandshakeRefused",
    "HandshakeRejected",
    "HandshakeResult",
    "InsecureTransportError",
    "InstanceNotFound",
    "InstanceRecord",
    "MissingInstanceId",
    "PlainHttpRequest",
    "Reject",
    "ServerHandshake",
    "ServerHandshakeEvent",
    "TenantClaims",
    "TenantMismatch",
    "Unauthorized",
    "UnsupportedSubprotocol",
    "UpgradeDecision",
    "UpgradeRequested",
    "UpgradeRequired",
    "build_upgrade_request",
    "check_upgrade",
    "websocket_accept_key",
]

SUBPROTOCOL = "svantic.v1"
"""Section 1: the subprotocol a client offers and the server echoes in its 101."""

CONNECT_PATH = "/agents/connect"
"""Section 1: where connected-mode agents open their socket."""

MAX_REJECTION_BODY_BYTES = 64 * 1024
"""A refusal's body is read up to this size; an error body is small JSON."""

_WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3
_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token
_BEARER_RE = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] +([!-~]+) *")
# Never handed to the application: cookies are never read (section 1), and the
# bearer token is exposed once, as `bearer_token`, so header dumps cannot leak it.
_WITHHELD_HEADERS = frozenset((b"cookie", b"authorization"))


def websocket_accept_key(key: str | bytes) -> str:
    """The Sec-WebSocket-Accept value that proves the server read `key` (RFC 6455 4.2.2)."""
    raw = key.encode("ascii") if isinstance(key, str) else key
    return base64.b64encode(hashlib.sha1(raw + _WEBSOCKET_GUID).digest()).decode("ascii")


# -- errors (defined in errors.py, re-exported here) ---------------------------------


_REJECTION_CLASSES: dict[str, type[HandshakeRejected]] = {
    "MISSING_INSTANCE_ID": MissingInstanceId,
    "UNSUPPORTED_SUBPROTOCOL": UnsupportedSubprotocol,
    "UNAUTHORIZED": Unauthorized,
    "TENANT_MISMATCH": TenantMismatch,
    "INSTANCE_NOT_FOUND": InstanceNotFound,
    "DEPLOYMENT_MODE_MISMATCH": DeploymentModeMismatch,
    "UPGRADE_REQUIRED": UpgradeRequired,
}


# -- client ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientUpgrade:
    """What to write to a fresh connection to `host`:`port` (TLS when `tls`).

    `request_bytes` and `headers` carry the bearer token, so they stay out of repr.
    """

    request_bytes: bytes = field(repr=False)
    key: bytes
    host: str
    port: int
    path: str
    tls: bool
    target: str
    instance_id: str
    subprotocols: tuple[str, ...]
    headers: tuple[tuple[str, str], ...] = field(repr=False)


def build_upgrade_request(
    url: str,
    *,
    token: str,
    instance_id: str,
    subprotocols: Sequence[str] = (SUBPROTOCOL,),
    allow_insecure_loopback: bool = False,
    key: bytes | None = None,
) -> ClientUpgrade:
    """Build the section 1 upgrade request for `url` (`wss://host[:port][/path]`).

    The path defaults to `/agents/connect`; the `instance_id` query parameter is
    added or replaced. `ws://` raises `InsecureTransportError` unless
    `allow_insecure_loopback` is set *and* the host is loopback. `key` is the
    Sec-WebSocket-Key (base64 of 16 bytes); by default a random one.
    permessage-deflate is never offered (section 4).
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise LocalProtocolError(f"invalid URL {url!r}: {exc}") from exc
    scheme = parts.scheme.lower()
    if scheme not in ("wss", "ws"):
        raise LocalProtocolError(f"the connect URL must use wss:// (got {parts.scheme!r}://)")
    if parts.username is not None or parts.password is not None:
        raise LocalProtocolError("the connect URL must not carry credentials: pass `token`")
    host = parts.hostname
    if not host:
        raise LocalProtocolError(f"the connect URL has no host: {url!r}")
    try:
        host = host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError as exc:
        raise LocalProtocolError(f"invalid host name {host!r}") from exc
    tls = scheme == "wss"
    if not tls:
        if not allow_insecure_loopback:
            raise InsecureTransportError(
                "ws:// is refused: use wss://, or pass allow_insecure_loopback=True "
                "for a loopback host in development and tests"
            )
        if not _is_loopback(host):
            raise InsecureTransportError(
                f"ws:// is only allowed for a loopback host, not {host!r}: use wss://"
            )
    if port is None:
        port = 443 if tls else 80
    if not isinstance(instance_id, str) or not instance_id:
        raise LocalProtocolError("instance_id must be a non-empty string")
    if not isinstance(token, str) or not re.fullmatch(r"[!-~]+", token):
        raise LocalProtocolError("token must be a non-empty string of visible ASCII")
    offered = tuple(subprotocols)
    if SUBPROTOCOL not in offered:
        raise LocalProtocolError(f"subprotocols must include {SUBPROTOCOL!r}")
    for protocol in offered:
        if not _TOKEN_RE.fullmatch(protocol):
            raise LocalProtocolError(f"invalid subprotocol name {protocol!r}")
    if key is None:
        key = base64.b64encode(os.urandom(16))
    elif not _is_valid_key(key):
        raise LocalProtocolError("key must be the base64 encoding of 16 bytes")

    path = parts.path if parts.path not in ("", "/") else CONNECT_PATH
    query = [(name, value) for name, value in parse_qsl(parts.query, keep_blank_values=True)]
    query = [(name, value) for name, value in query if name != "instance_id"]
    query.append(("instance_id", instance_id))
    target = f"{path}?{urlencode(query, quote_via=quote, safe='')}"

    default_port = 443 if tls else 80
    host_header = f"[{host}]" if ":" in host else host
    if port != default_port:
        host_header = f"{host_header}:{port}"
    headers = (
        ("Host", host_header),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", key.decode("ascii")),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Protocol", ", ".join(offered)),
        ("Authorization", f"Bearer {token}"),
    )
    try:
        request_bytes = _client_connection(target, headers)[1]
    except h11.LocalProtocolError as exc:
        raise LocalProtocolError(f"cannot build the upgrade request: {exc}") from exc
    return ClientUpgrade(
        request_bytes=request_bytes,
        key=key,
        host=host,
        port=port,
        path=path,
        tls=tls,
        target=target,
        instance_id=instance_id,
        subprotocols=offered,
        headers=headers,
    )


@dataclass(frozen=True, slots=True)
class HandshakeAccepted:
    """The server switched to WebSocket with `subprotocol`.

    `extra` is what arrived after the 101: the first WebSocket bytes, to feed to
    `Framing.receive_data()` before anything read later.
    """

    subprotocol: str
    extra: bytes


HandshakeResult: TypeAlias = HandshakeAccepted
"""What `ClientHandshake.receive_data()` returns once done; failures are raised."""


class ClientHandshake:
    """Reads the server's answer to a `ClientUpgrade` (section 1).

    `receive_data()` returns None until the answer is complete, then
    `HandshakeAccepted`, or raises `HandshakeRejected` (a subclass per spec code)
    for an HTTP error answer or `HandshakeFailed` for anything malformed. After
    that the object is finished: further calls raise `InvalidState`.
    """

    __slots__ = ("_body", "_connection", "_done", "_response", "_upgrade")

    def __init__(self, upgrade: ClientUpgrade) -> None:
        self._upgrade = upgrade
        self._connection = _client_connection(upgrade.target, upgrade.headers)[0]
        self._response: h11.Response | None = None
        self._body = bytearray()
        self._done = False

    def receive_data(self, data: bytes | None) -> HandshakeResult | None:
        """Feed bytes read from the server; `b""` or None means EOF."""
        if self._done:
            raise InvalidState("the handshake is finished: feed later bytes to Framing")
        connection = self._connection
        try:
            connection.receive_data(data or b"")
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    return None
                if isinstance(event, h11.InformationalResponse):
                    if event.status_code == 101:
                        return self._finish_accept(event)
                    continue  # 100 Continue and friends: the real answer follows
                if isinstance(event, h11.Response):
                    self._response = event
                elif isinstance(event, h11.Data) and self._response is not None:
                    room = MAX_REJECTION_BODY_BYTES - len(self._body)
                    self._body += event.data[:room]
                    if len(event.data) > room:  # bounded: stop reading, judge what we have
                        raise self._finish_reject(self._response)
                elif isinstance(event, h11.EndOfMessage) and self._response is not None:
                    raise self._finish_reject(self._response)
                else:  # ConnectionClosed or PAUSED: the answer will never be complete
                    raise self._fail("the server closed the connection before answering")
        except h11.RemoteProtocolError as exc:
            raise self._fail(f"invalid or incomplete HTTP response: {exc}") from exc

    def _finish_accept(self, response: h11.InformationalResponse) -> HandshakeAccepted:
        self._done = True
        headers = response.headers
        if "websocket" not in _header_tokens(headers, b"upgrade"):
            raise HandshakeFailed("101 without `Upgrade: websocket`")
        if "upgrade" not in _header_tokens(headers, b"connection"):
            raise HandshakeFailed("101 without `Connection: Upgrade`")
        accept_values = _header_values(headers, b"sec-websocket-accept")
        expected = websocket_accept_key(self._upgrade.key)
        if accept_values != [expected]:
            raise HandshakeFailed("Sec-WebSocket-Accept does not match our key")
        if _header_tokens(headers, b"sec-websocket-extensions"):
            raise HandshakeFailed("the server selected an extension we never offered")
        selected = _header_tokens(headers, b"sec-websocket-protocol", lower=False)
        if selected != [SUBPROTOCOL]:
            raise HandshakeFailed(
                f"the server selected subprotocol {', '.join(selected) or 'none'}, "
                f"not {SUBPROTOCOL}"
            )
        return HandshakeAccepted(subprotocol=SUBPROTOCOL, extra=self._connection.trailing_data[0])

    def _finish_reject(self, response: h11.Response) -> HandshakeRejected:
        self._done = True
        status = response.status_code
        code, message = _parse_error_body(bytes(self._body))
        if code is None:
            code = f"HTTP_{status}"
            if not message:
                message = response.reason.decode("latin-1") or _http_reason(status)
        cls = _REJECTION_CLASSES.get(code, HandshakeRejected)
        return cls(status, code, message)

    def _fail(self, message: str) -> HandshakeFailed:
        self._done = True
        return HandshakeFailed(message)


def _client_connection(
    target: str, headers: Sequence[tuple[str, str]]
) -> tuple[h11.Connection, bytes]:
    """An h11 client that has sent our request, so it expects the 101 (or an error)."""
    connection = h11.Connection(h11.CLIENT)
    request = h11.Request(method="GET", target=target, headers=list(headers))
    data = connection.send(request) + connection.send(h11.EndOfMessage())
    return connection, data


def _parse_error_body(body: bytes) -> tuple[str | None, str]:
    """`(code, message)` from `{"error": {"code", "message"}}`, code None otherwise."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None, ""
    if not isinstance(document, dict):
        return None, ""
    error = document.get("error")
    if not isinstance(error, dict):
        return None, ""
    code = error.get("code")
    message = error.get("message")
    message = message if isinstance(message, str) else ""
    if not isinstance(code, str) or not code or len(code) > 64:
        return None, message
    return code, message


def _is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def _is_valid_key(key: bytes | str) -> bool:
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        return False


# -- server ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UpgradeRequested:
    """A well-formed WebSocket upgrade for our path: run `check_upgrade()` on it.

    `headers` are lowercase names without Cookie (never read) and Authorization
    (its token is `bearer_token`, kept out of repr).
    """

    instance_id: str | None
    bearer_token: str | None = field(repr=False)
    subprotocols: tuple[str, ...]
    path: str
    headers: tuple[tuple[str, str], ...]
    key: str


@dataclass(frozen=True, slots=True)
class HandshakeRefused:
    """The request was answered by the handshake itself; write `response_bytes`, close.

    Not an upgrade (426), another path (404) or method (405), or bytes that are
    not a valid HTTP request or WebSocket handshake (400, 431 for huge headers).
    """

    status: int
    code: str
    message: str
    body_bytes: bytes = field(repr=False)
    response_bytes: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class PlainHttpRequest:
    """Not a WebSocket upgrade of our path, on a server that also serves plain HTTP
    (`serve_http`): hand `data` (every byte read so far) to an HTTP server connection."""

    data: bytes = field(repr=False)


ServerHandshakeEvent: TypeAlias = UpgradeRequested | HandshakeRefused | PlainHttpRequest


class ServerHandshake:
    """Parses one upgrade request for `path` (section 1).

    `receive_data()` returns None until a decision is possible, then
    `UpgradeRequested` (answer it with `accept()` or `reject()`) or
    `HandshakeRefused` (answer already built). It never raises on peer input.
    Bytes received after the request are kept in `extra` for `Framing`.
    """

    __slots__ = (
        "_connection",
        "_extra",
        "_max_header_bytes",
        "_path",
        "_raw",
        "_received",
        "_request",
        "_state",
    )

    _READING, _DECIDING, _DONE = range(3)

    def __init__(self, *, max_header_bytes: int = 16384, path: str = CONNECT_PATH,
                 serve_http: bool = False) -> None:
        if max_header_bytes < 256:
            raise LocalProtocolError("max_header_bytes must be at least 256")
        if not path.startswith("/"):
            raise LocalProtocolError("path must start with '/'")
        self._connection = h11.Connection(h11.SERVER, max_incomplete_event_size=max_header_bytes)
        self._max_header_bytes = max_header_bytes
        self._path = path
        self._received = 0
        self._request: UpgradeRequested | None = None
        self._extra = bytearray()
        self._state = self._READING
        # With `serve_http`, the bytes read until the request line is screened, for the
        # HTTP server a plain request goes to (at most a head and one read's worth).
        self._raw: bytearray | None = bytearray() if serve_http else None

    @property
    def extra(self) -> bytes:
        """Bytes that followed the request: the client's first WebSocket frames."""
        return bytes(self._extra)

    @property
    def request(self) -> UpgradeRequested | None:
        """The upgrade request once parsed."""
        return self._request

    def receive_data(self, data: bytes | None) -> ServerHandshakeEvent | None:
        """Feed bytes read from the client; `b""` or None means EOF."""
        if self._state == self._DECIDING:
            if data:
                self._extra += data
            return None
        if self._state == self._DONE:
            raise InvalidState("the handshake is finished: feed later bytes to Framing")
        connection = self._connection
        if self._raw is not None and data:
            self._raw += data
        try:
            if data:
                self._received += len(data)
            connection.receive_data(data or b"")
            request: h11.Request | None = None
            while True:
                event = connection.next_event()
                if isinstance(event, h11.Request):
                    request = event
                    # The bound first: a head over it is 431 however it arrived (h11 reads
                    # a complete head of any size, and would otherwise let the screen
                    # below answer 426 for it when it came in one read, 431 in pieces).
                    if self._received - len(connection.trailing_data[0]) > (
                            self._max_header_bytes):
                        return self._refuse(431, "REQUEST_HEADERS_TOO_LARGE",
                                            self._too_large())
                    refusal = self._screen(event)
                    if refusal is not None:
                        return refusal
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif event is h11.NEED_DATA:
                    return None
                elif isinstance(event, h11.Data):
                    return self._refuse(400, "BAD_HANDSHAKE", "an upgrade request has no body")
                else:  # ConnectionClosed (PAUSED cannot come before EndOfMessage)
                    return self._refuse(
                        400, "BAD_REQUEST", "connection closed before a full request"
                    )
        except h11.RemoteProtocolError as exc:
            # The peer's bytes are not echoed back: the message is ours, fixed. A head over
            # the bound is 431 even when it is also malformed (h11 takes the whole head out
            # of its buffer before it checks it): the same answer however it arrived.
            if exc.error_status_hint == 431 or (
                    self._received - len(connection.trailing_data[0]) > self._max_header_bytes):
                return self._refuse(431, "REQUEST_HEADERS_TOO_LARGE", self._too_large())
            return self._refuse(400, "BAD_REQUEST", "malformed HTTP/1.1 request")
        if request is None:  # pragma: no cover - EndOfMessage follows a Request
            return self._refuse(400, "BAD_REQUEST", "no request")
        trailing = connection.trailing_data[0]
        if self._received - len(trailing) > self._max_header_bytes:
            return self._refuse(431, "REQUEST_HEADERS_TOO_LARGE", self._too_large())
        return self._upgrade_requested(request, trailing)

    def _too_large(self) -> str:
        return f"request headers exceed {self._max_header_bytes} bytes"

    def _screen(self, request: h11.Request) -> HandshakeRefused | PlainHttpRequest | None:
        """Refusals decided from the request line and headers, in this order."""
        headers = request.headers
        if self._raw is not None and (
            "websocket" not in _header_tokens(headers, b"upgrade")
            or request.target.decode("ascii", "replace").partition("?")[0] != self._path
        ):
            raw, self._raw = bytes(self._raw), None
            self._state = self._DONE
            return PlainHttpRequest(raw)
        self._raw = None
        # Section 1: a request that is not a WebSocket upgrade at all gets 426 first.
        if "websocket" not in _header_tokens(headers, b"upgrade"):
            return self._refuse(
                426,
                "UPGRADE_REQUIRED",
                f"{self._path} only accepts WebSocket upgrades",
                extra_headers=(("Upgrade", "websocket"), ("Connection", "Upgrade, close")),
            )
        target = request.target.decode("ascii", "replace")
        if target.partition("?")[0] != self._path:
            return self._refuse(404, "NOT_FOUND", f"no WebSocket endpoint at {target!r}")
        if request.method != b"GET":
            return self._refuse(
                405,
                "METHOD_NOT_ALLOWED",
                "a WebSocket upgrade uses GET",
                extra_headers=(("Allow", "GET"),),
            )
        if request.http_version != b"1.1":
            return self._refuse(400, "BAD_HANDSHAKE", "a WebSocket upgrade needs HTTP/1.1")
        if "upgrade" not in _header_tokens(headers, b"connection"):
            return self._refuse(400, "BAD_HANDSHAKE", "missing `Connection: Upgrade`")
        if _header_values(headers, b"sec-websocket-version") != ["13"]:
            return self._refuse(
                400,
                "UNSUPPORTED_WEBSOCKET_VERSION",
                "Sec-WebSocket-Version must be 13",
                extra_headers=(("Sec-WebSocket-Version", "13"),),
            )
        keys = _header_values(headers, b"sec-websocket-key")
        if len(keys) != 1 or not _is_valid_key(keys[0]):
            return self._refuse(
                400, "BAD_HANDSHAKE", "Sec-WebSocket-Key must be one base64 16-byte nonce"
            )
        for name, value in headers:
            if name in (b"content-length", b"transfer-encoding") and value not in (b"0",):
                return self._refuse(400, "BAD_HANDSHAKE", "an upgrade request has no body")
        return None

    def _upgrade_requested(self, request: h11.Request, trailing: bytes) -> ServerHandshakeEvent:
        headers = request.headers
        _, _, query = request.target.decode("ascii", "replace").partition("?")
        try:
            params = parse_qsl(query, keep_blank_values=True, errors="strict")
        except (UnicodeDecodeError, ValueError):
            return self._refuse(400, "BAD_REQUEST", "the query string is not valid UTF-8")
        instance_id = next((value for name, value in params if name == "instance_id"), None)
        authorizations = _header_values(headers, b"authorization")
        bearer_token = None
        if len(authorizations) == 1:
            match = _BEARER_RE.fullmatch(authorizations[0])
            bearer_token = match.group(1) if match else None
        self._request = UpgradeRequested(
            instance_id=instance_id,
            bearer_token=bearer_token,
            subprotocols=tuple(_header_tokens(headers, b"sec-websocket-protocol", lower=False)),
            path=self._path,
            headers=tuple(
                (name.decode("ascii"), value.decode("latin-1"))
                for name, value in headers
                if name not in _WITHHELD_HEADERS
            ),
            key=_header_values(headers, b"sec-websocket-key")[0],
        )
        self._extra += trailing
        self._state = self._DECIDING
        return self._request

    def accept(self, subprotocol: str | None = SUBPROTOCOL) -> bytes:
        """The 101 answer: write it, then hand `extra` and later bytes to `Framing`.

        Selects `subprotocol` (section 1: `svantic.v1`), which the client must have
        offered; never an extension (section 4).
        """
        request = self._decided_request()
        if subprotocol is not None and subprotocol not in request.subprotocols:
            raise LocalProtocolError(f"the client did not offer {subprotocol!r}")
        lines = [
            "HTTP/1.1 101 Switching Protocols",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Accept: {websocket_accept_key(request.key)}",
        ]
        if subprotocol is not None:
            lines.append(f"Sec-WebSocket-Protocol: {subprotocol}")
        self._state = self._DONE
        return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")

    def reject(self, status: int, code: str, message: str) -> bytes:
        """An HTTP error answer with the section 1 JSON body: write it, then close."""
        self._decided_request()
        if isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599:
            raise LocalProtocolError("a rejection status is 4xx or 5xx")
        if not isinstance(code, str) or not code:
            raise LocalProtocolError("a rejection needs a non-empty code")
        self._state = self._DONE
        return _error_response(status, code, message)[1]

    def _decided_request(self) -> UpgradeRequested:
        if self._state != self._DECIDING or self._request is None:
            raise LocalProtocolError("accept() and reject() answer an UpgradeRequested once")
        return self._request

    def _refuse(
        self,
        status: int,
        code: str,
        message: str,
        *,
        extra_headers: Sequence[tuple[str, str]] = (),
    ) -> HandshakeRefused:
        self._state = self._DONE
        body, response = _error_response(status, code, message, extra_headers)
        return HandshakeRefused(status, code, message, body, response)


def _error_response(
    status: int, code: str, message: str, extra_headers: Sequence[tuple[str, str]] = ()
) -> tuple[bytes, bytes]:
    """`(body, response)` for a section 1 error: JSON body, then the connection closes."""
    body = json.dumps({"error": {"code": code, "message": message}}, separators=(",", ":")).encode(
        "utf-8"
    )
    lines = [
        f"HTTP/1.1 {status} {_http_reason(status)}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
    ]
    lines += [f"{name}: {value}" for name, value in extra_headers]
    if not any(name.lower() == "connection" for name, _ in extra_headers):
        lines.append("Connection: close")
    return body, ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body


def _http_reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _header_values(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> list[str]:
    """Every value of header `name` (h11 lowercases names), as text."""
    return [value.decode("latin-1") for key, value in headers if key == name]


def _header_tokens(
    headers: Sequence[tuple[bytes, bytes]], name: bytes, *, lower: bool = True
) -> list[str]:
    """The comma-separated items of every `name` header, stripped (and lowercased)."""
    tokens = []
    for key, value in headers:
        if key == name:
            for raw_item in value.decode("latin-1").split(","):
                item = raw_item.strip()
                if item:
                    tokens.append(item.lower() if lower else item)
    return tokens


# -- the section 1 checks ----------------------------------------------------------


class TenantClaims(Protocol):
    """What `check_upgrade()` needs from verified transport JWT claims (section 1).

    A `Mapping` with a `"tenant_id"` key (what PyJWT's `jwt.decode` returns) works too.
    """

    @property
    def tenant_id(self) -> str: ...


DEPLOYMENT_MODES = ("connected", "hosted")
"""Section 6: how an instance is registered; only `connected` instances open a socket."""


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """A registered instance as the upgrade checks see it (section 6 registration).

    `deployment_mode` is `"connected"` or `"hosted"`; anything else raises
    `LocalProtocolError` here, so a typo cannot pass the 409 check unnoticed.
    """

    instance_id: str
    tenant_id: str
    deployment_mode: str
    agent_type: str

    def __post_init__(self) -> None:
        if self.deployment_mode not in DEPLOYMENT_MODES:
            raise LocalProtocolError(
                f"InstanceRecord.deployment_mode must be 'connected' or 'hosted', "
                f"not {self.deployment_mode!r}"
            )


ClaimsT = TypeVar("ClaimsT", bound="TenantClaims | Mapping[str, Any]")


@dataclass(frozen=True, slots=True)
class Accept(Generic[ClaimsT]):
    """Every section 1 check passed: call `ServerHandshake.accept()`.

    `claims` is what `verify_token` returned (an object or a mapping); `record` is the
    `InstanceRecord` the checks looked up, so the caller need not look it up again.
    """

    instance_id: str
    tenant_id: str
    claims: ClaimsT
    record: InstanceRecord


@dataclass(frozen=True, slots=True)
class Reject:
    """A section 1 table row: pass it to `ServerHandshake.reject(status, code, message)`."""

    status: int
    code: str
    message: str


UpgradeDecision: TypeAlias = "Accept[Any] | Reject"


def check_upgrade(
    request: UpgradeRequested,
    *,
    verify_token: Callable[[str], ClaimsT | None],
    lookup_instance: Callable[[str], InstanceRecord | None],
) -> Accept[ClaimsT] | Reject:
    """Run the section 1 checks in the spec's order; the first failing one answers.

    `verify_token` returns the claims, or None / raises (any exception) for a
    token that is malformed, badly signed or expired: all 401, failing closed.
    The claims are an object with a `tenant_id` attribute or a `Mapping` with a
    `"tenant_id"` key (as `jwt.decode` returns); claims without a non-empty string
    tenant are 401, and a return value that is neither shape is a bug in the verifier:
    `LocalProtocolError`, so it cannot pass for an invalid token on every upgrade.
    `lookup_instance` runs only for an authenticated request; its own errors
    propagate (an outage is not a rejection). 403 needs an existing instance, so
    an unknown id is 404 even though the table lists 403 first.
    """
    instance_id = request.instance_id
    if not instance_id:
        return Reject(400, "MISSING_INSTANCE_ID", "add ?instance_id=<your instance id>")
    if SUBPROTOCOL not in request.subprotocols:
        return Reject(
            400,
            "UNSUPPORTED_SUBPROTOCOL",
            f"offer `Sec-WebSocket-Protocol: {SUBPROTOCOL}`",
        )
    token = request.bearer_token
    if token is None:
        return Reject(401, "UNAUTHORIZED", "send `Authorization: Bearer <JWT>`")
    try:
        claims = verify_token(token)
    except Exception:  # fail closed: whatever the verifier raised, the token is refused
        claims = None
    tenant_id = _claimed_tenant(claims) if claims is not None else None
    if claims is None or not isinstance(tenant_id, str) or not tenant_id:
        return Reject(
            401, "UNAUTHORIZED", "the token is invalid or expired: get a fresh one (section 6)"
        )
    record = lookup_instance(instance_id)
    if record is None:
        return Reject(
            404, "INSTANCE_NOT_FOUND", f"no instance {instance_id!r} is registered: register it"
        )
    if record.tenant_id != tenant_id:
        return Reject(403, "TENANT_MISMATCH", "the instance belongs to another tenant")
    if record.deployment_mode == "hosted":
        return Reject(
            409,
            "DEPLOYMENT_MODE_MISMATCH",
            "the instance is registered as hosted: register it as connected to use a socket",
        )
    return Accept(instance_id=instance_id, tenant_id=tenant_id, claims=claims, record=record)


def _claimed_tenant(claims: object) -> object:
    """The `tenant_id` of verified claims: a mapping's key or an object's attribute."""
    if isinstance(claims, Mapping):
        return claims.get("tenant_id")
    tenant_id = getattr(claims, "tenant_id", _NO_TENANT)
    if tenant_id is _NO_TENANT:
        raise LocalProtocolError(
            f"verify_token returned a {type(claims).__name__}: return claims with a "
            "tenant_id attribute or a Mapping with a 'tenant_id' key, or None to refuse"
        )
    return tenant_id


_NO_TENANT = object()
