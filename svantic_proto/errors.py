"""Every exception the library raises on purpose, in one tree.

The split follows h11: a `LocalProtocolError` is *you* misusing the API (raised at
once, never sent on the wire); a `RemoteError` is a fault of the *peer* or of the
network (the core answers a protocol breach with an error frame and/or a close code
and reports the cause). `HandlerError` is neither: it is how your capability handler
answers a dispatch with its own code. Every error carries a stable `code`, from the
spec where the spec names one. Other modules re-export their old names from here.

    SvanticError                        base of them all; `code`
    ├── LocalProtocolError              the caller misused the API (a bug in the caller)
    │   ├── InvalidState                an object used after it failed, closed or finished
    │   └── InsecureTransportError      ws:// without the loopback opt-in (spec 1)
    ├── RemoteError                     a fault of the peer or of the network
    │   ├── RemoteProtocolError         the peer broke the protocol; `close_code`
    │   │   ├── FrameError              a received message is not a valid frame (spec 2)
    │   │   ├── HandshakeFailed         the upgrade answer is not a valid 101 (spec 1)
    │   │   └── HandshakeRejected       the server refused the upgrade; `status` (spec 1)
    │   │       ├── MissingInstanceId       400
    │   │       ├── UnsupportedSubprotocol  400
    │   │       ├── Unauthorized            401
    │   │       ├── TenantMismatch          403
    │   │       ├── InstanceNotFound        404
    │   │       ├── DeploymentModeMismatch  409
    │   │       └── UpgradeRequired         426
    │   ├── DispatchError               a dispatch ended without a result (spec 3)
    │   ├── DispatchAuthError           a dispatch's auth envelope does not verify (spec 7)
    │   ├── TimestampError              a received timestamp is not RFC 3339 (also ValueError)
    │   ├── TraceContextError           a received trace header breaks the W3C grammar
    │   └── TlsError                    the TLS session failed (also ConnectionError, OSError)
    └── HandlerError                    raised by your handler to answer with your own code

`ConnectionClosed.error` is always a `RemoteError` (or None): the core records there
only the peer's or the network's fault that ended the connection, never your misuse,
which is raised at the call instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .auth import DispatchAuthFailure

__all__ = [
    "DeploymentModeMismatch",
    "DispatchAuthError",
    "DispatchError",
    "FrameError",
    "HandlerError",
    "HandshakeFailed",
    "HandshakeRejected",
    "InsecureTransportError",
    "InstanceNotFound",
    "InvalidState",
    "LocalProtocolError",
    "MissingInstanceId",
    "RemoteError",
    "RemoteProtocolError",
    "SvanticError",
    "TenantMismatch",
    "TimestampError",
    "TlsError",
    "TraceContextError",
    "Unauthorized",
    "UnsupportedSubprotocol",
    "UpgradeRequired",
]


class SvanticError(Exception):
    """Base of every exception the library raises on purpose."""

    code: str = "INTERNAL"


# -- local: the caller misused the API ---------------------------------------------------------


class LocalProtocolError(SvanticError):
    """The caller used the API in a way the protocol forbids (a bug in the caller)."""

    code = "LOCAL_PROTOCOL_ERROR"


class InvalidState(LocalProtocolError):
    """The object was used after it failed or closed."""

    code = "INVALID_STATE"


class InsecureTransportError(LocalProtocolError):
    """A `ws://` URL without the loopback opt-in (section 1: clients use `wss://`)."""

    code = "INSECURE_TRANSPORT"


# -- remote: a fault of the peer or of the network ---------------------------------------------


class RemoteError(SvanticError):
    """A fault of the peer or of the network: the one type to catch for "the other side failed".

    What `ConnectionClosed.error` holds, and the base of every error raised because of
    bytes, frames or answers that came from elsewhere.
    """

    code = "REMOTE_ERROR"


class RemoteProtocolError(RemoteError):
    """The peer broke the protocol; `close_code` is how the connection was ended."""

    def __init__(self, message: str, *, code: str = "BAD_FRAME", close_code: int | None = None):
        super().__init__(message)
        self.code = code
        self.close_code = close_code


class FrameError(RemoteProtocolError):
    """A received message is not a valid svantic.v1 frame (spec section 2).

    `close_code` says how the connection must end: 1002 for an invalid frame,
    1007 for text that is not UTF-8, and `None` when the envelope is valid but its
    `type` is unknown: then the receiver answers `BAD_FRAME` and keeps the socket.
    `frame_id` is the frame's `id` when one could be read, for `in_reply_to`.
    """

    code = "BAD_FRAME"

    def __init__(
        self, message: str, *, close_code: int | None = 1002, frame_id: str | None = None
    ) -> None:
        super().__init__(message, code="BAD_FRAME", close_code=close_code)
        self.message = message
        self.frame_id = frame_id

    def __repr__(self) -> str:
        return (
            f"FrameError({self.message!r}, close_code={self.close_code!r}, "
            f"frame_id={self.frame_id!r})"
        )


class HandshakeFailed(RemoteProtocolError):
    """The server's answer is not a valid HTTP response or not a valid 101 for us.

    A broken or hostile peer (or a proxy in the way): retry with backoff (section 5).
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, code="HANDSHAKE_FAILED", close_code=None)


class HandshakeRejected(RemoteProtocolError):
    """The server answered the upgrade with an HTTP error (section 1 table).

    `code` comes from the JSON body `{"error": {"code", "message"}}`, or is
    `HTTP_<status>` when the body is not that shape. Section 5 says which
    statuses are retried: 400, 403, 404 and 409 are not; 401 gets a fresh token once.
    `close_code` is None: no WebSocket was opened.
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}", code=code, close_code=None)
        self.status = status
        self.message = message

    def __reduce__(self) -> tuple[type[HandshakeRejected], tuple[int, str, str]]:
        return (type(self), (self.status, self.code, self.message))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status}, code={self.code!r})"


class MissingInstanceId(HandshakeRejected):
    """400: the URL has no `instance_id` query parameter (or it is empty)."""


class UnsupportedSubprotocol(HandshakeRejected):
    """400: the request did not offer `svantic.v1`."""


class Unauthorized(HandshakeRejected):
    """401: the JWT is missing, malformed, badly signed or expired: get a fresh token."""


class TenantMismatch(HandshakeRejected):
    """403: the instance exists but belongs to another tenant than the JWT's."""


class InstanceNotFound(HandshakeRejected):
    """404: no instance is registered with this id: register it first (section 6)."""


class DeploymentModeMismatch(HandshakeRejected):
    """409: the instance is registered as `hosted`, so it cannot connect a socket."""


class UpgradeRequired(HandshakeRejected):
    """426: the server saw no WebSocket upgrade (often a proxy dropping the headers)."""


class DispatchError(RemoteError):
    """A dispatch ended without a result: `code` is the agent's or the mesh's (spec 3)."""

    def __init__(self, dispatch_id: str, code: str, message: str | None = None,
                 detail: Mapping[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.dispatch_id = dispatch_id
        self.code = code
        self.message = message
        self.detail = detail


class DispatchAuthError(RemoteError):
    """A dispatch's auth envelope is missing or does not verify (spec section 7).

    Answer the dispatch with `error`/`DISPATCH_AUTH_FAILED`, keep the socket open, and do
    not run the handler. `reason` is a `DispatchAuthFailure`; the message says what was
    wrong and never contains the secret or the token.
    """

    code = "DISPATCH_AUTH_FAILED"

    def __init__(self, reason: DispatchAuthFailure, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __reduce__(self) -> tuple[type[DispatchAuthError], tuple[DispatchAuthFailure, str]]:
        return (type(self), (self.reason, self.message))

    def __repr__(self) -> str:
        return f"DispatchAuthError({self.reason.value!r}, {self.message!r})"


class TimestampError(RemoteError, ValueError):
    """A timestamp is not RFC 3339 as svantic.v1 restricts it (spec section 2).

    Raised by `parse_rfc3339`, which reads the `ts` of frames a peer sent; also a
    `ValueError`, as a parser's refusal.
    """

    code = "BAD_TIMESTAMP"


class TraceContextError(RemoteError):
    """A `traceparent` or `baggage` value breaks the W3C grammar.

    Raised only by the strict parsers, which read headers that came with a dispatch;
    `trace_context_from_headers` swallows it, because a bad trace header must not fail
    a dispatch (spec sections 3 and 8).
    """

    code = "INVALID_TRACE_CONTEXT"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class TlsError(RemoteError, ConnectionError):
    """The TLS session failed: the handshake was refused (a certificate that does not verify,
    no common protocol), the peer sent bytes that are not TLS, or it hung up mid-handshake.

    A `ConnectionError` (so an `OSError`), so code that retries on a failed connection
    (spec 5) retries on it. `reason` is OpenSSL's reason (e.g. `CERTIFICATE_VERIFY_FAILED`)
    when there is one, and the `ssl.SSLError` is the `__cause__`.
    """

    code = "TLS_FAILED"

    def __init__(self, message: str, *, reason: str | None = None,
                 during_handshake: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.during_handshake = during_handshake


# -- neither: the application's own answer -----------------------------------------------------


class HandlerError(SvanticError):
    """Raise from a capability handler to answer with your own error code (spec 3).

    Not a fault of either side of the connection: the dispatch is answered with an
    `error` frame carrying `code`, `message` and `detail`.
    """

    def __init__(self, code: str, message: str, detail: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.detail = detail
