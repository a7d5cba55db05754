"""Message mode: the core behind a WebSocket stack that does its own framing (spec 1-5).

`AgentConnection` and `MeshConnection` read and write bytes, from the HTTP upgrade on.
A host that already speaks WebSocket (python-websockets, aiohttp, an ASGI server) hands
over whole text messages instead, and does the upgrade, the framing and the closing
handshake itself. `MeshMessages` and `AgentMessages` let such a host use the core:

* the mesh is built from the upgrade's facts (path, query, headers, the subprotocols
  offered), reports `UpgradeRequest` and is answered with `accept()` / `reject()` as a
  `MeshConnection` is; `outcome` then says what the host answers: `UpgradeAccepted` (the
  subprotocol to echo) or `UpgradeRefused` (the status, headers and JSON body of spec 1);
* the agent gives the host what to send (`upgrade_request()`) and is told the answer
  (`accepted(subprotocol)` or `refused(status, body)`, which reports the same typed
  `HandshakeRejected` and retry decision as byte mode);
* then text comes in through `receive_message()`, the peer's close through
  `receive_close()`, a lost transport through `receive_eof()`, and `messages_to_send()`
  gives texts (`str`) and, last, a `Close` for the host to close the WebSocket with.

Each wraps a real byte-mode connection (`.connection`) and synthesises the HTTP upgrade
and the WebSocket frames at its edge, so every rule of spec 2-5 (events, error frames,
close codes, timers, the state tables) is the byte-mode code's, unchanged.

WebSocket pings are the host's by default (`host_pings=True`, as python-websockets and
most ASGI servers do them): the core's are dropped. With `host_pings=False` they come out
of `messages_to_send()` as `WebSocketPing` for the host to send, and the host may report
pongs with `receive_pong()`. App pings, heartbeats and the dead-peer timer stay the core's;
in message mode the timer counts the messages (and pongs) it is given.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias
from urllib.parse import quote, urlsplit

from .agent import AgentConnection, AgentSession
from .auth import DispatchAuthVerifier
from .codec import FrameFactory
from .config import Config
from .connection import ConnectionStats, _Connection
from .errors import InvalidState, LocalProtocolError
from .events import Event
from .frames import SessionContext
from .handshake import Accept, Reject, UpgradeRequested, websocket_accept_key
from .mesh import MeshConnection, MintDispatchAuth, TokenVerifier
from .resume import ResumeStore
from .states import AgentState, MeshState

__all__ = [
    "AgentMessages",
    "AgentUpgrade",
    "Close",
    "MeshMessages",
    "Message",
    "UpgradeAccepted",
    "UpgradeRefused",
    "WebSocketPing",
]


@dataclass(frozen=True, slots=True)
class Close:
    """Close the WebSocket: the last item `messages_to_send()` gives.

    `code` and `reason` go into the host's close (`await ws.close(code, reason)`); the
    host's stack then finishes the closing handshake within its own close timeout. `code`
    None means drop the transport now, without a close frame (spec 4: a client drops a
    dead peer; a failed handshake). Nothing is to be sent after a `Close`.
    """

    code: int | None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class WebSocketPing:
    """Send a WebSocket ping with `payload` (only with `host_pings=False`)."""

    payload: bytes = b""


Message: TypeAlias = str | Close | WebSocketPing
"""What `messages_to_send()` gives: a text message to send, a ping, or the close."""


@dataclass(frozen=True, slots=True)
class UpgradeAccepted:
    """The mesh accepted the upgrade: answer 101 and echo `subprotocol` (spec 1)."""

    subprotocol: str | None


@dataclass(frozen=True, slots=True)
class UpgradeRefused:
    """The mesh refused the upgrade: answer `status` with `headers` and `body`, then close.

    `body` is the spec 1 JSON, `{"error": {"code": ..., "message": ...}}`; `code` and
    `message` are read from it. `headers` holds `Content-Type` and any header the refusal
    needs (`Upgrade` on a 426, `Allow` on a 405); the host adds `Content-Length`.
    """

    status: int
    code: str
    message: str
    body: bytes = field(repr=False)
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class AgentUpgrade:
    """What the agent's host sends to open the WebSocket (spec 1).

    `url` (`wss://host[:port]/agents/connect?instance_id=...`) is what a client library
    dials; `path` is its request target. Offer `subprotocols` and send `headers` (the
    bearer token: kept out of repr). The WebSocket's own headers are the host's to add.
    """

    url: str
    path: str
    subprotocols: tuple[str, ...]
    headers: tuple[tuple[str, str], ...] = field(repr=False)


# -- the synthesised WebSocket edge (RFC 6455 5.2) ---------------------------------------------

_FIN = 0x80
_TEXT, _BINARY, _CLOSE, _PING, _PONG = 0x1, 0x2, 0x8, 0x9, 0xA
_MASK_BIT = 0x80
_ZERO_KEY = b"\x00\x00\x00\x00"  # a valid masking key that leaves the payload as it is
_HEADER_16 = struct.Struct("!BBH")
_HEADER_64 = struct.Struct("!BBQ")
_NO_STATUS = 1005  # RFC 6455 7.4.1: "no code", never sent on the wire
_ABNORMAL = 1006  # RFC 6455 7.4.1: no close frame at all
_MAX_CLOSE_REASON_BYTES = 123  # a control frame carries 125 bytes, 2 of them the code


def _frame(opcode: int, payload: bytes, masked: bool) -> bytes:
    """One whole frame; a masked one (what a server reads) uses the all-zero key."""
    length = len(payload)
    mask = _MASK_BIT if masked else 0
    if length < 126:
        header = bytes((_FIN | opcode, mask | length))
    elif length <= 0xFFFF:
        header = _HEADER_16.pack(_FIN | opcode, mask | 126, length)
    else:
        header = _HEADER_64.pack(_FIN | opcode, mask | 127, length)
    return header + _ZERO_KEY + payload if masked else header + payload


def _unmask_py(data: bytes, start: int, stop: int, key: bytes) -> bytes:
    length = stop - start
    repeated = (key * ((length + 3) >> 2))[:length]
    value = int.from_bytes(data[start:stop], "little") ^ int.from_bytes(repeated, "little")
    return value.to_bytes(length, "little")


_unmask: Callable[[bytes, int, int, bytes], bytes]
try:  # the same C loop the framing module uses, when the optional extension is built
    from ._speedups import xor_mask as _unmask
except ImportError:  # pragma: no cover - pure-Python installs
    _unmask = _unmask_py


def _encode_text(text: str) -> bytes:
    """UTF-8; a lone surrogate (text decoded with `surrogateescape`, or built by hand) gives
    bytes that are not UTF-8, which the core closes 1007 as it would on the wire."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        try:
            return text.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            return text.encode("utf-8", "surrogatepass")


class _MessageEdge:
    """What both sides share: messages in as frames, frames out as messages."""

    __slots__ = (
        "_conn",
        "_ended",
        "_host_pings",
        "_masked_in",
        "_pending",
        "_ws_open",
    )

    def __init__(self, conn: _Connection, *, masked_in: bool, host_pings: bool) -> None:
        self._conn = conn
        self._masked_in = masked_in  # what the wrapped core reads: a server reads masked frames
        self._host_pings = bool(host_pings)
        self._pending: list[Message] = []
        self._ws_open = False  # the host has a WebSocket (after the 101)
        self._ended = False  # a Close was given, or the host reported the end: nothing more

    # -- in ----------------------------------------------------------------------------------------

    def receive_message(self, message: str | bytes | bytearray | memoryview, now: float) -> None:
        """A whole message from the host: text as `str`; bytes are a binary message (closed
        1003, spec 2). Then call `events_received()`, `messages_to_send()`, `next_deadline()`.
        Never raises on what the peer sent."""
        if isinstance(message, str):
            self._feed(_TEXT, _encode_text(message), now)
        elif isinstance(message, bytes | bytearray | memoryview):
            self._feed(_BINARY, bytes(message), now)
        else:
            raise LocalProtocolError(f"a message is str or bytes, not {type(message).__name__}")

    def receive_close(self, code: int | None, reason: str = "", *, now: float) -> None:
        """The host saw the peer's close frame (`code` None or 1005: it carried no code);
        its stack answered it. 1006 (no close frame at all) is `receive_eof()`."""
        if code == _ABNORMAL:
            self.receive_eof(now)
            return
        if code is None or code == _NO_STATUS:
            payload = b""
        else:
            if isinstance(code, bool) or not isinstance(code, int) or not 0 <= code <= 0xFFFF:
                raise LocalProtocolError(f"a close code is an int of 16 bits, got {code!r}")
            text = reason.encode("utf-8", "replace")[:_MAX_CLOSE_REASON_BYTES]
            payload = code.to_bytes(2, "big") + text.decode("utf-8", "ignore").encode("utf-8")
        self._feed(_CLOSE, payload, now, end=True)

    def receive_pong(self, payload: bytes = b"", *, now: float) -> None:
        """The host saw a WebSocket pong: traffic, for the dead-peer timer (spec 4)."""
        self._feed(_PONG, bytes(payload[:125]), now)

    def receive_ping(self, payload: bytes = b"", *, now: float) -> None:
        """The host saw a WebSocket ping, which its stack answered: traffic, as a pong is.

        Optional, as `receive_pong()`: for stacks that tell their application."""
        self._feed(_PING, bytes(payload[:125]), now)

    def receive_eof(self, now: float) -> None:
        """The transport is gone without a close (the host's stack lost it, or gave up)."""
        self._ended = self._ended or self._ws_open  # nothing can be sent any more
        self._conn.receive_eof(now)

    def _feed(self, opcode: int, payload: bytes, now: float, *, end: bool = False) -> None:
        if not self._ws_open:
            raise InvalidState("no WebSocket yet: answer or report the upgrade first")
        if end:  # the host's stack answered the peer's close: the core's echo is moot
            self._ended = True
        self._conn.receive_data(_frame(opcode, payload, self._masked_in), now)

    # -- out ---------------------------------------------------------------------------------------

    def messages_to_send(self) -> list[Message]:
        """What to send, in order: text messages (`str`), `WebSocketPing` (only with
        `host_pings=False`), and last a `Close` when the WebSocket is to be closed."""
        self._pull()
        pending, self._pending = self._pending, []
        return pending

    def _pull(self) -> None:
        for written in self._conn.data_to_send():
            if not written:  # the core drops the transport
                if self._ws_open and not self._ended:
                    self._pending.append(Close(None))
                self._ended = True
                continue
            frames = written if self._ws_open else self._http(written)
            if frames and not self._ended:
                self._frames(frames)

    def _http(self, chunk: bytes) -> bytes:
        """An HTTP answer in the core's output (the mesh's); returns the bytes after it."""
        raise InvalidState("unexpected output before the WebSocket")

    def _frames(self, data: bytes) -> None:
        """Whole frames the core wrote (it never writes part of one) back into messages."""
        pending = self._pending
        end = len(data)
        if data[0] == _FIN | _TEXT:  # nearly always: one text message, below 64 KiB
            second = data[1]
            length = second & 0x7F
            start = 2
            if length == 126:
                length = (data[2] << 8) | data[3]
                start = 4
            if second & _MASK_BIT:
                if start + 4 + length == end:
                    pending.append(_unmask(data, start + 4, end, data[start : start + 4]).decode())
                    return
            elif start + length == end:
                pending.append(data[start:].decode())
                return
        position = 0
        while position < end:
            if end - position < 2:
                raise InvalidState("the core wrote part of a frame")  # pragma: no cover
            first, second = data[position], data[position + 1]
            length = second & 0x7F
            start = position + 2
            if length == 126:
                length = int.from_bytes(data[start : start + 2], "big")
                start += 2
            elif length == 127:
                length = int.from_bytes(data[start : start + 8], "big")
                start += 8
            if second & _MASK_BIT:
                stop = start + 4 + length
                payload = _unmask(data, start + 4, stop, data[start : start + 4])
            else:
                stop = start + length
                payload = data[start:stop]
            position = stop
            opcode = first & 0x0F
            if opcode == _TEXT:
                pending.append(payload.decode("utf-8"))
            elif opcode == _CLOSE:
                self._ended = True
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
                pending.append(Close(code, payload[2:].decode("utf-8", "replace")))
                return  # nothing follows a close frame
            elif opcode == _PING and not self._host_pings:
                pending.append(WebSocketPing(payload))
            # pongs answer pings the host's stack already answered; no binary is ever sent

    # -- the core's clock and events ---------------------------------------------------------------

    def events_received(self) -> list[Event]:
        """Events since the last call, oldest first: the byte-mode connection's events."""
        return self._conn.events_received()

    def next_deadline(self) -> float | None:
        """When `handle_timer()` must next be called (monotonic seconds), or None."""
        return self._conn.next_deadline()

    def handle_timer(self, now: float) -> None:
        """Run the timers due at `now`; then call `events_received()` and `messages_to_send()`."""
        self._conn.handle_timer(now)

    @property
    def closed(self) -> bool:
        """True once the connection ended (its `ConnectionClosed` was reported)."""
        return self._conn.closed

    @property
    def stats(self) -> ConnectionStats:
        return self._conn.stats

    @property
    def host_pings(self) -> bool:
        """True when the host's stack sends the WebSocket pings (the core's are dropped)."""
        return self._host_pings


# -- the mesh ------------------------------------------------------------------------------------

_PLACEHOLDER_KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 1.3's sample: the host did the real one
_TARGET_SAFE = "/?&=%:@!$'()*+,;-._~"  # what stays as it is in the request target
_HEADER_UNSAFE = frozenset(b"\r\n\x00")


def _as_bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("latin-1", "replace")


def _upgrade_request(
    path: str,
    query: str | bytes,
    headers: Iterable[tuple[str | bytes, str | bytes]] | Mapping[str, str],
    subprotocols: Iterable[str] | None,
) -> bytes:
    """The HTTP/1.1 request a byte-mode mesh would have read, from the host's facts."""
    path, _, inline_query = path.partition("?")
    raw_query = query or inline_query  # bytes (as ASGI gives it) are kept byte for byte
    target = quote(path or "/", safe=_TARGET_SAFE)
    if raw_query:
        target += "?" + quote(raw_query, safe=_TARGET_SAFE)
    lines = [b"GET " + target.encode("ascii") + b" HTTP/1.1"]
    items = headers.items() if isinstance(headers, Mapping) else headers
    has_host = False
    for raw_name, raw_value in items:
        name, value = _as_bytes(raw_name), _as_bytes(raw_value)
        if _HEADER_UNSAFE.intersection(name) or _HEADER_UNSAFE.intersection(value):
            continue  # a stack never hands these over; they would forge header lines
        lowered = name.lower()
        if lowered == b"sec-websocket-protocol" and subprotocols is not None:
            continue
        has_host = has_host or lowered == b"host"
        lines.append(name + b": " + value)
    if not has_host:  # HTTP/2 and some stacks give the authority apart: HTTP/1.1 needs one
        lines.insert(1, b"Host: localhost")
    if subprotocols is not None:
        offered = ", ".join(subprotocols)
        if offered:
            lines.append(b"Sec-WebSocket-Protocol: " + _as_bytes(offered))
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _parse_response(head: bytes) -> tuple[int, list[tuple[str, str]]]:
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split(" ", 2)[1])
    headers = []
    for line in header_lines:
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    return status, headers


class MeshMessages(_MessageEdge):
    """One agent's WebSocket on the mesh, after a host stack's upgrade (message mode).

    Built from the upgrade's facts: `path` (with or without its query), `query`, `headers`
    (pairs of str or bytes, or a mapping; with `Authorization`) and, when the host gives
    them apart, the `subprotocols` offered; the rest as for `MeshConnection`. Then:

    1. `events_received()` gives `UpgradeRequest`: run `check_upgrade()` and call `accept()`
       or `reject()` as on a `MeshConnection` (a request the handshake itself refuses, such
       as one that is not an upgrade, gives `ConnectionClosed` instead);
    2. `outcome` says what the host answers: `UpgradeAccepted` or `UpgradeRefused`;
    3. after the 101: `receive_message()`, `receive_close()`, `receive_eof()`, timers, and
       `messages_to_send()` after each call, exactly as the five steps of byte mode.

    The sending API is `MeshConnection`'s: `send_dispatch()`, `send_tool_result()`,
    `send_ping()`, `close_request()`, `close()`. Everything else the core connection has
    (`instance_id`, `in_flight`, `accepting_dispatches`, ...) is on `.connection`; feed it
    nothing directly.

    `MeshMessages.around(connection, path, ...)` wraps a fresh `MeshConnection` made
    elsewhere instead: a `MeshRuntime`'s, which then decides admission, the instance table
    and shutdown for it as for a byte-mode link (`svantic_adapters.asgi` does this).
    """

    __slots__ = ("_outcome", "connection")

    def __init__(
        self,
        path: str,
        query: str | bytes = "",
        headers: Iterable[tuple[str | bytes, str | bytes]] | Mapping[str, str] = (),
        subprotocols: Iterable[str] | None = None,
        *,
        dispatch_auth: MintDispatchAuth | None,
        now: float,
        wall_clock: Callable[[], float],
        config: Config | None = None,
        resume_store: ResumeStore | None = None,
        verify_token: TokenVerifier | None = None,
        connection_id: str | None = None,
        random_bytes: Callable[[int], bytes] | None = None,
        frames: FrameFactory | None = None,
        host_pings: bool = True,
    ) -> None:
        connection = MeshConnection(
            dispatch_auth=dispatch_auth,
            now=now,
            wall_clock=wall_clock,
            config=config,
            resume_store=resume_store,
            verify_token=verify_token,
            connection_id=connection_id,
            random_bytes=random_bytes,
            frames=frames,
        )
        self._begin(connection, path, query, headers, subprotocols, now=now,
                    host_pings=host_pings)

    @classmethod
    def around(
        cls,
        connection: MeshConnection,
        path: str,
        query: str | bytes = "",
        headers: Iterable[tuple[str | bytes, str | bytes]] | Mapping[str, str] = (),
        subprotocols: Iterable[str] | None = None,
        *,
        now: float,
        host_pings: bool = True,
    ) -> MeshMessages:
        """Message mode over a `MeshConnection` made elsewhere, such as the one
        `MeshRuntime.open_connection()` returns, which must be fresh (nothing fed to it yet).

        The upgrade's facts are fed to it at once, as the constructor does. Whoever made
        `connection` may keep calling its own API (`accept()`, `reject()`, `send_dispatch()`,
        `close()`, ...) and reading its events here; the host feeds messages and reads
        `messages_to_send()` and `outcome` through this object only.
        """
        if connection.state is not MeshState.HANDSHAKE:
            raise InvalidState("around() needs a fresh MeshConnection, still in HANDSHAKE")
        messages = cls.__new__(cls)
        messages._begin(connection, path, query, headers, subprotocols, now=now,
                        host_pings=host_pings)
        return messages

    def _begin(
        self,
        connection: MeshConnection,
        path: str,
        query: str | bytes,
        headers: Iterable[tuple[str | bytes, str | bytes]] | Mapping[str, str],
        subprotocols: Iterable[str] | None,
        *,
        now: float,
        host_pings: bool,
    ) -> None:
        _MessageEdge.__init__(self, connection, masked_in=True, host_pings=host_pings)
        self.connection = connection
        """The byte-mode connection inside: read it; send through this object."""
        self._outcome: UpgradeAccepted | UpgradeRefused | None = None
        headers = list(headers.items() if isinstance(headers, Mapping) else headers)
        if not any(_as_bytes(name).lower() == b"sec-websocket-key" for name, _ in headers):
            headers.append(("Sec-WebSocket-Key", _PLACEHOLDER_KEY))
        connection.receive_data(_upgrade_request(path, query, headers, subprotocols), now)

    @property
    def outcome(self) -> UpgradeAccepted | UpgradeRefused | None:
        """The answer to the upgrade once there is one: what the host sends (spec 1)."""
        if self._outcome is None:
            self._pull()
        return self._outcome

    @property
    def state(self) -> MeshState:
        state: MeshState = self.connection.state
        return state

    @property
    def request(self) -> UpgradeRequested | None:
        """The upgrade request while it awaits `accept()` or `reject()`, else None."""
        return self.connection.request

    def _http(self, chunk: bytes) -> bytes:
        head, _, rest = chunk.partition(b"\r\n\r\n")
        status, headers = _parse_response(head)
        if status == 101:
            selected = next((v for k, v in headers if k.lower() == "sec-websocket-protocol"), None)
            self._outcome = UpgradeAccepted(selected)
            self._ws_open = True
            return rest
        try:
            error = json.loads(rest)["error"]
            code, message = str(error["code"]), str(error.get("message", ""))
        except (ValueError, KeyError, TypeError):  # pragma: no cover - the core's own JSON
            code, message = f"HTTP_{status}", ""
        kept = tuple(
            (k, v) for k, v in headers if k.lower() not in ("content-length", "connection")
        )
        self._outcome = UpgradeRefused(status, code, message, rest, kept)
        return b""

    # -- MeshConnection's API ----------------------------------------------------------------------

    def accept(
        self,
        decision: Accept[Any] | None = None,
        *,
        instance_id: str | None = None,
        tenant_id: str | None = None,
        agent_type: str | None = None,
        subject: str | None = None,
        token_expires_at: float | None = None,
        now: float,
    ) -> None:
        """`MeshConnection.accept()`; then `outcome` is `UpgradeAccepted`."""
        self.connection.accept(
            decision,
            instance_id=instance_id,
            tenant_id=tenant_id,
            agent_type=agent_type,
            subject=subject,
            token_expires_at=token_expires_at,
            now=now,
        )

    def reject(
        self,
        decision: Reject | None = None,
        *,
        status: int = 0,
        code: str = "",
        message: str = "",
        now: float,
    ) -> None:
        """`MeshConnection.reject()`; then `outcome` is `UpgradeRefused`."""
        self.connection.reject(decision, status=status, code=code, message=message, now=now)

    def send_dispatch(
        self,
        capability: str,
        arguments: dict[str, Any] | None = None,
        *,
        deadline_ms: int | object,
        now: float,
        task_id: str | None = None,
        session_context: SessionContext | None = None,
        dispatch_id: str | None = None,
    ) -> str:
        """`MeshConnection.send_dispatch()`: returns the dispatch id."""
        return self.connection.send_dispatch(
            capability,
            arguments,
            deadline_ms=deadline_ms,
            now=now,
            task_id=task_id,
            session_context=session_context,
            dispatch_id=dispatch_id,
        )

    def send_tool_result(
        self, call_id: str, result: Any = None, *, error: tuple[str, str] | None = None
    ) -> None:
        """`MeshConnection.send_tool_result()`."""
        self.connection.send_tool_result(call_id, result, error=error)

    def send_ping(self) -> str:
        """`MeshConnection.send_ping()`: an app-level ping; returns its id."""
        return self.connection.send_ping()

    def close_request(
        self, grace_seconds: int | None = None, reason: str | None = None, *, now: float
    ) -> None:
        """`MeshConnection.close_request()`: drain, then close 1000."""
        self.connection.close_request(grace_seconds, reason, now=now)

    def close(self, code: int = 1000, reason: str = "", *, now: float) -> None:
        """`MeshConnection.close()`: a `Close(code, reason)` follows."""
        self.connection.close(code, reason, now=now)

    def __repr__(self) -> str:
        return f"<MeshMessages state={self.state.name} outcome={self._outcome!r}>"


# -- the agent -----------------------------------------------------------------------------------

_WEBSOCKET_HEADERS = frozenset(
    ("host", "upgrade", "connection", "sec-websocket-key", "sec-websocket-version",
     "sec-websocket-protocol")
)
"""What a client library writes itself: not handed to the host."""


class AgentMessages(_MessageEdge):
    """One agent WebSocket to the mesh, over a host stack's client (message mode).

    Built with `AgentConnection`'s arguments. Then:

    1. open the WebSocket with what `upgrade_request()` says (URL, subprotocols, headers);
    2. report the answer: `accepted(subprotocol)`, or `refused(status, body)` for an HTTP
       answer (the `ConnectionClosed` event carries the typed `HandshakeRejected`, such as
       `InstanceNotFound`, and the retry decision, as in byte mode), or `receive_eof()` when
       no answer came;
    3. then `receive_message()`, `receive_close()`, `receive_eof()`, timers, and
       `messages_to_send()` after each call, exactly as the five steps of byte mode.

    The sending API is `AgentConnection`'s: `send_ack()`, `send_chunk()`, `send_result()`,
    `send_error()`, `send_cancelled()`, `send_tool_call()`, `set_status()`, `send_ping()`,
    `refresh_token()`, `close_request()`, `close()`. The rest is on `.connection`.
    """

    __slots__ = ("_answered", "_key", "_upgrade", "connection")

    def __init__(
        self,
        url: str,
        *,
        token: str,
        instance_id: str,
        dispatch_auth: DispatchAuthVerifier,
        session: AgentSession | None = None,
        agent_type: str | None = None,
        capabilities: Iterable[str] = (),
        config: Config | None = None,
        now: float,
        wall_clock: Callable[[], float],
        random_bytes: Callable[[int], bytes] | None = None,
        allow_insecure_loopback: bool = False,
        frames: FrameFactory | None = None,
        host_pings: bool = True,
    ) -> None:
        connection = AgentConnection(
            url,
            token=token,
            instance_id=instance_id,
            dispatch_auth=dispatch_auth,
            session=session,
            agent_type=agent_type,
            capabilities=capabilities,
            config=config,
            now=now,
            wall_clock=wall_clock,
            random_bytes=random_bytes,
            allow_insecure_loopback=allow_insecure_loopback,
            frames=frames,
        )
        super().__init__(connection, masked_in=False, host_pings=host_pings)
        self.connection = connection
        """The byte-mode connection inside: read it; send through this object."""
        self._answered = False
        # The request the byte-mode connection wrote (`handshake.build_upgrade_request`):
        # the host sends its facts, and its key proves our synthesised 101.
        request = b"".join(connection.data_to_send())
        head = request.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
        target = head[0].split(" ")[1]
        fields = [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in head[1:])]
        values = {k.lower(): v for k, v in fields}
        self._key = values["sec-websocket-key"]
        scheme = "wss" if urlsplit(url).scheme.lower() == "wss" else "ws"
        self._upgrade = AgentUpgrade(
            url=f"{scheme}://{values['host']}{target}",
            path=target,
            subprotocols=tuple(
                p.strip() for p in values["sec-websocket-protocol"].split(",") if p.strip()
            ),
            headers=tuple((k, v) for k, v in fields if k.lower() not in _WEBSOCKET_HEADERS),
        )

    def upgrade_request(self) -> AgentUpgrade:
        """What to dial: the URL, the subprotocols to offer and the headers to send."""
        return self._upgrade

    def accepted(self, subprotocol: str | None, *, now: float) -> None:
        """The mesh answered 101 selecting `subprotocol` (None: it selected none).

        The hello follows in `messages_to_send()`. A 101 without `svantic.v1` fails the
        handshake as in byte mode (`HandshakeFailed`, and a `Close(None)`: drop it).
        """
        if subprotocol is not None and (
            not subprotocol or any(c in subprotocol for c in "\r\n\x00,")
        ):
            raise LocalProtocolError(f"invalid subprotocol {subprotocol!r}")
        lines = [
            "HTTP/1.1 101 Switching Protocols",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Accept: {websocket_accept_key(self._key)}",
        ]
        if subprotocol is not None:
            lines.append(f"Sec-WebSocket-Protocol: {subprotocol}")
        self._answer(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"), now)
        self._ws_open = True

    def refused(
        self,
        status: int,
        body: bytes | str = b"",
        *,
        now: float,
        content_type: str = "application/json",
    ) -> None:
        """The mesh answered the upgrade with HTTP `status` and `body` (spec 1 JSON).

        `ConnectionClosed.error` is then the `HandshakeRejected` subclass for its code
        (`InstanceNotFound` for a 404, ...) and `.retry` what spec 5 says to do.
        """
        if isinstance(status, bool) or not isinstance(status, int) or not 200 <= status <= 599:
            raise LocalProtocolError(f"a refusal's status is 200-599, got {status!r}")
        payload = body.encode("utf-8") if isinstance(body, str) else bytes(body)
        head = [f"HTTP/1.1 {status} Refused"]
        if status in (204, 304):
            payload = b""  # HTTP: these answers carry no body
        else:
            if any(c in content_type for c in "\r\n"):
                raise LocalProtocolError("invalid content type")
            head += [f"Content-Type: {content_type}", f"Content-Length: {len(payload)}"]
        self._answer(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload, now)

    def _answer(self, response: bytes, now: float) -> None:
        if self._answered or self.connection.state is not AgentState.CONNECTING:
            raise InvalidState("the upgrade's answer was reported already")
        self._answered = True
        self.connection.receive_data(response, now)

    @property
    def state(self) -> AgentState:
        state: AgentState = self.connection.state
        return state

    @property
    def ready(self) -> bool:
        """Whether frames go out now (else results and chunks wait in the session's outbox)."""
        return self.connection.ready

    @property
    def session(self) -> AgentSession:
        return self.connection.session

    # -- AgentConnection's API ---------------------------------------------------------------------

    def send_ack(self, dispatch_id: str) -> None:
        """`AgentConnection.send_ack()`."""
        self.connection.send_ack(dispatch_id)

    def send_chunk(self, dispatch_id: str, data: Any) -> int:
        """`AgentConnection.send_chunk()`: returns the chunk's `seq`."""
        return self.connection.send_chunk(dispatch_id, data)

    def send_result(self, dispatch_id: str, result: Any) -> None:
        """`AgentConnection.send_result()`: the dispatch's terminal success."""
        self.connection.send_result(dispatch_id, result)

    def send_cancelled(self, dispatch_id: str) -> None:
        """`AgentConnection.send_cancelled()`."""
        self.connection.send_cancelled(dispatch_id)

    def send_error(
        self,
        dispatch_id: str,
        code: str,
        message: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """`AgentConnection.send_error()`: the dispatch's terminal failure."""
        self.connection.send_error(dispatch_id, code, message, detail)

    def send_tool_call(
        self,
        tool: str,
        arguments: dict[str, Any] | None = None,
        *,
        deadline_ms: int | None = None,
        agent_type: str | None = None,
        instance_id: str | None = None,
        session_id: str | None = None,
    ) -> str:
        """`AgentConnection.send_tool_call()`: returns the call id."""
        return self.connection.send_tool_call(
            tool,
            arguments,
            deadline_ms=deadline_ms,
            agent_type=agent_type,
            instance_id=instance_id,
            session_id=session_id,
        )

    def set_status(
        self, status: str | None = None, now: float | None = None, **fields: Any
    ) -> None:
        """`AgentConnection.set_status()`."""
        self.connection.set_status(status, now, **fields)

    def send_ping(self) -> str:
        """`AgentConnection.send_ping()`: an app-level ping; returns its id."""
        return self.connection.send_ping()

    def refresh_token(self, token: str) -> bool:
        """`AgentConnection.refresh_token()`."""
        return self.connection.refresh_token(token)

    def close_request(
        self, grace_seconds: int | None = None, reason: str | None = None, *, now: float
    ) -> None:
        """`AgentConnection.close_request()`: drain, then close 1000."""
        self.connection.close_request(grace_seconds, reason, now=now)

    def close(self, code: int = 1000, reason: str = "", *, now: float) -> None:
        """`AgentConnection.close()`: a `Close(code, reason)` follows."""
        self.connection.close(code, reason, now=now)

    def __repr__(self) -> str:
        return f"<AgentMessages state={self.state.name}>"

