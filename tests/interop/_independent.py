"""Independent svantic.v1 peers for interop tests, written from the wire contract alone.

Nothing here imports `svantic_proto` or `svantic_adapters`: frames are plain
`json` dicts, ids come from `uuid`, JWTs from PyJWT, the WebSocket layers are
python-websockets (the agent) and aiohttp (the mesh). If our implementation
and these peers disagree, one of them misreads the spec, and the test says
which frame it was.

Both peers are deliberately minimal: they know the base frames of spec
section 3 and none of the extensions (`cancel`, `token_refresh`), so they
answer those with `error`/`BAD_FRAME` and keep the socket, as a peer that does
not know an extension must (spec section 3, "Extensions").
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import ssl
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import quote

import jwt
import trustme
import websockets
from aiohttp import WSMsgType, web
from websockets.asyncio.client import ClientConnection
from websockets.typing import Subprotocol
from websockets.version import version as websockets_version

SUBPROTOCOL = "svantic.v1"
CONNECT_PATH = "/agents/connect"
MAX_MESSAGE_BYTES = 1 << 20
WAIT = 5.0
"""Upper bound of every wait in these peers: a hang fails the test instead of stalling it."""
TERMINAL_TYPES = frozenset({"dispatch_result", "error"})

T = TypeVar("T")
Frame = dict[str, Any]

# -- the envelope of spec section 2, checked independently -----------------------------------------

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
_TS = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2})\Z"
)
_HEX32 = re.compile(r"[0-9a-f]{32}\Z")
_HEX16 = re.compile(r"[0-9a-f]{16}\Z")
_REPLY_REQUIRED = frozenset(
    {"dispatch_result", "dispatch_chunk", "dispatch_ack", "tool_result", "pong"}
)
_REPLY_OPTIONAL = frozenset({"welcome", "error"})


def uuid7() -> str:
    """A UUID v7 (spec 2: senders always mint v7): 48-bit Unix ms, version, variant, random."""
    millis = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (millis & (1 << 48) - 1) << 80 | 0x7 << 76 | (rand & 0xFFF) << 64
    value |= 0b10 << 62 | (rand >> 12) & ((1 << 62) - 1)
    return str(uuid.UUID(int=value))


def is_uuid(value: object) -> bool:
    return isinstance(value, str) and _UUID.match(value) is not None


def timestamp() -> str:
    """RFC 3339 with a `T` and `Z` (spec 2)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def make_frame(kind: str, payload: dict[str, Any] | None = None, *,
               in_reply_to: str | None = None, frame_id: str | None = None) -> Frame:
    return {"v": 1, "type": kind, "id": frame_id or uuid7(), "ts": timestamp(),
            "in_reply_to": in_reply_to, "trace_id": None, "parent_span_id": None,
            "payload": payload if payload is not None else {}}


def encode(frame: Frame) -> str:
    return json.dumps(frame, separators=(",", ":"))


class BadFrame(Exception):
    """A received text message the spec answers with `error`/`BAD_FRAME` (spec 2)."""

    def __init__(self, message: str, frame_id: str | None, *, keep_socket: bool,
                 frame: Frame | None = None) -> None:
        super().__init__(message)
        self.frame_id = frame_id
        self.keep_socket = keep_socket
        self.frame = frame
        """The decoded frame when only its type is unknown (the envelope was valid)."""


def _is_int(value: object, minimum: int = 0) -> bool:
    return type(value) is int and value >= minimum  # bool, 1.0, "1" are not integers (spec 2)


def _optional(payload: Frame, name: str, check: Callable[[object], bool]) -> bool:
    return payload.get(name) is None or check(payload[name])


def _is_str(value: object) -> bool:
    return isinstance(value, str)


def _dispatch_auth_ok(auth: object) -> bool:
    if auth is None:
        return True
    if not isinstance(auth, dict):
        return False
    if auth.get("type") == "svantic_jwt":
        return isinstance(auth.get("token"), str)
    if auth.get("type") == "shared_secret":
        return isinstance(auth.get("secret"), str)
    return False


_PAYLOAD_CHECKS: dict[str, Callable[[Frame, Frame], bool]] = {
    "hello": lambda f, p: isinstance(p.get("instance_id"), str)
    and _optional(p, "resume_token", _is_str) and _optional(p, "agent_type", _is_str),
    "welcome": lambda f, p: isinstance(p.get("connection_id"), str)
    and type(p.get("resumed")) is bool and isinstance(p.get("resume_token"), str)
    and isinstance(p.get("replayed_dispatches"), list)
    and all(is_uuid(i) for i in p["replayed_dispatches"])
    and _is_int(p.get("heartbeat_interval_ms"), 1),
    "dispatch": lambda f, p: p.get("dispatch_id") == f["id"]
    and isinstance(p.get("capability"), str) and p["capability"] != ""
    and _is_int(p.get("deadline_ms"), 1) and _optional(p, "attempt", lambda a: _is_int(a, 1))
    and _optional(p, "arguments", lambda a: isinstance(a, dict))
    and _dispatch_auth_ok(p.get("dispatch_auth")),
    "dispatch_ack": lambda f, p: True,
    "dispatch_chunk": lambda f, p: _is_int(p.get("seq")) and "data" in p,
    "dispatch_result": lambda f, p: "result" in p,
    "error": lambda f, p: isinstance(p.get("code"), str) and _optional(p, "message", _is_str)
    and _optional(p, "detail", lambda d: isinstance(d, dict)),
    "heartbeat": lambda f, p: _is_int(p.get("active_sessions"))
    and p.get("status") in (None, "available", "busy", "offline")
    and _optional(p, "in_flight", _is_int),
    "ping": lambda f, p: True,
    "pong": lambda f, p: True,
    "close_request": lambda f, p: _optional(p, "grace_seconds", _is_int)
    and _optional(p, "reason", _is_str),
    "tool_call": lambda f, p: isinstance(p.get("tool"), str)
    and _optional(p, "arguments", lambda a: isinstance(a, dict)),
    "tool_result": lambda f, p: ("result" in p) != ("error" in p),
}


def parse_frame(text: str, known: frozenset[str]) -> Frame:
    """Decode and check one message; raises `BadFrame` saying whether to keep the socket."""
    try:
        value = json.loads(text)
    except ValueError:
        raise BadFrame("not JSON", None, keep_socket=False) from None
    if not isinstance(value, dict):
        raise BadFrame("not a JSON object", None, keep_socket=False)
    frame_id = value.get("id") if is_uuid(value.get("id")) else None
    kind = value.get("type")
    problem = None
    if type(value.get("v")) is not int or value["v"] != 1:
        problem = "`v` must be the integer 1"
    elif not isinstance(kind, str) or not kind:
        problem = "`type` must be a non-empty string"
    elif frame_id is None:
        problem = "`id` must be a canonical UUID"
    elif not isinstance(value.get("ts"), str) or not _TS.match(value["ts"]):
        problem = "`ts` must be an RFC 3339 timestamp"
    elif not isinstance(value.get("payload"), dict):
        problem = "`payload` must be an object"
    elif kind in _REPLY_REQUIRED and not is_uuid(value.get("in_reply_to")):
        problem = f"{kind} needs `in_reply_to`"
    elif kind in _REPLY_OPTIONAL and not (value.get("in_reply_to") is None
                                          or is_uuid(value["in_reply_to"])):
        problem = "`in_reply_to` must be a UUID"
    elif value.get("trace_id") is not None and not _HEX32.match(str(value["trace_id"])):
        problem = "`trace_id` must be 32 lowercase hex"
    elif value.get("parent_span_id") is not None and not _HEX16.match(
            str(value["parent_span_id"])):
        problem = "`parent_span_id` must be 16 lowercase hex"
    if problem is not None:
        raise BadFrame(problem, frame_id, keep_socket=False)
    frame_type: str = value["type"]
    if frame_type not in known:
        raise BadFrame(f"unknown frame type {frame_type!r}", frame_id, keep_socket=True,
                       frame=value)
    if not _PAYLOAD_CHECKS[frame_type](value, value["payload"]):
        raise BadFrame(f"invalid {frame_type} payload", frame_id, keep_socket=False)
    return value


def bad_frame_error(exc: BadFrame) -> Frame:
    return make_frame("error", {"code": "BAD_FRAME", "message": str(exc)},
                      in_reply_to=exc.frame_id)


class Changes:
    """Wakes every waiter when a peer's state changes, so tests wait on conditions, not sleeps."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def until(self, condition: Callable[[], T | None], timeout: float = WAIT) -> T:
        async with asyncio.timeout(timeout):
            while True:
                value = condition()
                if value:
                    return value
                await self._event.wait()


# -- test infrastructure both sides need -----------------------------------------------------------


@dataclass(frozen=True)
class TLS:
    server: ssl.SSLContext
    client: ssl.SSLContext


def loopback_tls() -> TLS:
    """A private CA and a certificate for 127.0.0.1 (real TLS, no network)."""
    authority = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(server)
    client = ssl.create_default_context()
    authority.configure_trust(client)
    return TLS(server, client)


def transport_token(secret: str, *, tenant_id: str, client_id: str = "client-1",
                    lifetime: int = 600, issuer: str = "svantic") -> str:
    """What `POST /auth/token` would hand out (spec 1 claims: sub, tenant_id, iat, exp, iss)."""
    now = int(time.time())
    claims = {"sub": client_id, "tenant_id": tenant_id, "iat": now, "exp": now + lifetime,
              "iss": issuer}
    return jwt.encode(claims, secret, algorithm="HS256")


def decode_transport_token(token: str, secret: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(
        token, secret, algorithms=["HS256"],
        options={"require": ["sub", "tenant_id", "iat", "exp", "iss"]})
    if not isinstance(claims.get("tenant_id"), str):
        raise jwt.InvalidTokenError("tenant_id is not a string")
    return claims


def mint_dispatch_token(secret: str, *, instance_id: str, agent_type: str, tenant_id: str,
                        dispatch_id: str, capability: str, lifetime: int = 60) -> str:
    """A `svantic_jwt` per spec 7: HS256, iss/aud/sub/tenant_id/jti/cap/iat/exp."""
    now = int(time.time())
    claims = {"iss": "svantic", "aud": instance_id, "sub": agent_type, "tenant_id": tenant_id,
              "jti": dispatch_id, "cap": capability, "iat": now, "exp": now + lifetime}
    return jwt.encode(claims, secret, algorithm="HS256")


def verify_dispatch_auth(auth: object, secret: str, *, instance_id: str, dispatch_id: str,
                         capability: str) -> str | None:
    """Spec 7 on the agent: HS256 only, signature, exp/iat with 5 s leeway, aud, jti, cap.

    Returns the reason it failed, or None when it verifies.
    """
    if not isinstance(auth, dict) or auth.get("type") != "svantic_jwt":
        return "no svantic_jwt dispatch_auth"
    try:
        claims = jwt.decode(
            auth["token"], secret, algorithms=["HS256"], audience=instance_id, issuer="svantic",
            leeway=5, options={"require": ["iss", "aud", "sub", "tenant_id", "jti", "cap",
                                           "iat", "exp"]})
    except jwt.PyJWTError as exc:
        return f"{type(exc).__name__}: {exc}"
    if type(claims["exp"]) is not int or type(claims["iat"]) is not int:
        return "exp/iat must be integers"
    if claims["iat"] > time.time() + 5:
        return "issued in the future"
    if claims["jti"] != dispatch_id:
        return "jti is another dispatch"
    if claims["cap"] != capability:
        return "cap is another capability"
    return None


# -- an agent on python-websockets -----------------------------------------------------------------

AGENT_KNOWN = frozenset({"welcome", "dispatch", "ping", "pong", "error", "close_request",
                         "tool_result", "hello", "heartbeat", "dispatch_result",
                         "dispatch_chunk", "dispatch_ack", "tool_call"})
_AGENT_ACCEPTS = frozenset({"dispatch", "ping", "pong", "error", "close_request", "tool_result"})

Handler = Callable[[Frame], Awaitable[Any]]
"""Gets the whole dispatch frame; returns the result or raises (DISPATCH_FAILED)."""


class IndependentAgent:
    """A connected-mode agent (spec 1-5, 7) on the python-websockets asyncio client.

    `connect()` runs hello/welcome (with the stored resume token), flushes the
    outbox, sends a heartbeat and starts reading. Dispatches are verified with
    PyJWT before a handler runs; a handler runs once per dispatch id, results
    made while the socket is down wait in the outbox, and a replayed dispatch
    gets its stored terminal frame unless that frame already went out on this
    connection (spec 5). `cut()` drops TCP as a network fault would.
    """

    def __init__(self, url: str, *, token: str, instance_id: str, agent_type: str,
                 signing_secret: str, ssl_context: ssl.SSLContext,
                 handlers: dict[str, Handler]) -> None:
        self.url = f"{url}?instance_id={quote(instance_id, safe='')}"
        self.token, self.instance_id, self.agent_type = token, instance_id, agent_type
        self._secret, self._ssl, self.handlers = signing_secret, ssl_context, handlers
        self.resume_token: str | None = None
        self.connection = 0
        self.inbound: list[tuple[int, Frame]] = []
        self.outbound: list[tuple[int, Frame | str]] = []
        self.welcomes: list[Frame] = []
        self.close_codes: list[int | None] = []
        self.finished: dict[str, Frame] = {}
        self.running: dict[str, asyncio.Task[None]] = {}
        self.outbox: list[Frame] = []
        self.handler_calls: list[tuple[str, int]] = []
        self.auth_failures: list[str] = []
        self.changes = Changes()
        self.ws: ClientConnection | None = None
        self._ready = False
        self._sent_terminal: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []

    async def connect(self) -> Frame:
        """Open a socket, say hello, wait for welcome; returns the welcome frame."""
        ws = await websockets.connect(
            self.url, ssl=self._ssl, subprotocols=[Subprotocol(SUBPROTOCOL)], proxy=None,
            additional_headers={"Authorization": f"Bearer {self.token}"},
            open_timeout=WAIT, close_timeout=WAIT, max_size=MAX_MESSAGE_BYTES)
        if ws.subprotocol != SUBPROTOCOL:
            await ws.close(1002)
            raise AssertionError(f"server selected subprotocol {ws.subprotocol!r}")
        self.connection += 1
        self.ws, self._sent_terminal = ws, set()
        hello = make_frame("hello", {
            "instance_id": self.instance_id, "agent_type": self.agent_type,
            "resume_token": self.resume_token, "capabilities": sorted(self.handlers),
            "sdk": {"name": "independent-websockets", "version": websockets_version}})
        await self._send(hello)
        async with asyncio.timeout(WAIT):
            welcome = parse_frame(str(await ws.recv()), AGENT_KNOWN)
        self.inbound.append((self.connection, welcome))
        if welcome["type"] != "welcome" or welcome.get("in_reply_to") not in (None, hello["id"]):
            raise AssertionError(f"expected welcome to {hello['id']}, got {welcome}")
        self.welcomes.append(welcome)
        self.resume_token = welcome["payload"]["resume_token"]
        self._ready = True
        queued, self.outbox = self.outbox, []
        for frame in queued:
            await self._emit(frame)
        await self._send(make_frame("heartbeat", {"status": "available",
                                                  "active_sessions": len(self.running),
                                                  "in_flight": len(self.running)}))
        interval = welcome["payload"]["heartbeat_interval_ms"] / 1000
        self._tasks = [asyncio.create_task(self._read(ws)),
                       asyncio.create_task(self._heartbeats(ws, interval))]
        self.changes.notify()
        return welcome

    async def _heartbeats(self, ws: ClientConnection, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)  # the protocol's period, not a synchronisation
            await self._send(make_frame("heartbeat", {"active_sessions": len(self.running)}),
                             ws)

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for message in ws:
                if isinstance(message, bytes):
                    await ws.close(1003, "binary messages are not svantic.v1")
                    break
                await self._on_text(ws, message)
        except websockets.ConnectionClosed:
            pass
        finally:
            self._ready = False
            self.close_codes.append(ws.close_code)
            for task in self._tasks:
                if task is not asyncio.current_task():
                    task.cancel()
            self.changes.notify()

    async def _on_text(self, ws: ClientConnection, text: str) -> None:
        try:
            frame = parse_frame(text, AGENT_KNOWN)
        except BadFrame as exc:
            if exc.frame is not None:
                self.inbound.append((self.connection, exc.frame))
                self.changes.notify()
            await self._send(bad_frame_error(exc), ws)
            if not exc.keep_socket:
                await ws.close(1002, "bad frame")
            return
        self.inbound.append((self.connection, frame))
        self.changes.notify()
        kind = frame["type"]
        if kind not in _AGENT_ACCEPTS:
            await self._send(bad_frame_error(BadFrame(f"an agent does not accept {kind}",
                                                      frame["id"], keep_socket=False)), ws)
            await ws.close(1002, "bad frame")
        elif kind == "ping":
            await self._send(make_frame("pong", in_reply_to=frame["id"]), ws)
        elif kind == "dispatch":
            await self._on_dispatch(frame)

    async def _on_dispatch(self, frame: Frame) -> None:
        dispatch_id, payload = frame["id"], frame["payload"]
        if dispatch_id in self.finished:  # re-delivered: answer from the store, once per socket
            if dispatch_id not in self._sent_terminal:
                await self._emit(self.finished[dispatch_id])
            return
        if dispatch_id in self.running:
            return  # still running: it answers when done
        failure = verify_dispatch_auth(payload.get("dispatch_auth"), self._secret,
                                       instance_id=self.instance_id, dispatch_id=dispatch_id,
                                       capability=payload["capability"])
        if failure is not None:
            self.auth_failures.append(failure)
            await self._finish(dispatch_id, "DISPATCH_AUTH_FAILED", failure)
            return
        handler = self.handlers.get(payload["capability"])
        if handler is None:
            await self._finish(dispatch_id, "CAPABILITY_NOT_FOUND", payload["capability"])
            return
        self.running[dispatch_id] = asyncio.create_task(self._run(handler, frame))

    async def _run(self, handler: Handler, frame: Frame) -> None:
        dispatch_id = frame["id"]
        self.handler_calls.append((dispatch_id, frame["payload"].get("attempt", 1)))
        self.changes.notify()
        try:
            result = await handler(frame)
        except Exception as exc:
            del self.running[dispatch_id]
            await self._finish(dispatch_id, "DISPATCH_FAILED", f"{type(exc).__name__}: {exc}")
        else:
            del self.running[dispatch_id]
            await self._finish(dispatch_id, None, result)

    async def _finish(self, dispatch_id: str, code: str | None, value: Any) -> None:
        if code is None:
            frame = make_frame("dispatch_result", {"result": value}, in_reply_to=dispatch_id)
        else:
            frame = make_frame("error", {"code": code, "message": str(value)},
                               in_reply_to=dispatch_id)
        self.finished[dispatch_id] = frame
        await self._emit(frame)
        self.changes.notify()

    async def _emit(self, frame: Frame) -> None:
        """Send a terminal or chunk frame now, or keep it for after the next welcome."""
        if not self._ready or not await self._send(frame):
            self.outbox.append(frame)
        elif frame["type"] in TERMINAL_TYPES:
            self._sent_terminal.add(frame["in_reply_to"])

    async def _send(self, frame: Frame | str, ws: ClientConnection | None = None) -> bool:
        ws = ws or self.ws
        if ws is None:
            return False
        try:
            await ws.send(frame if isinstance(frame, str) else encode(frame))
        except websockets.ConnectionClosed:
            return False
        self.outbound.append((self.connection, frame))
        self.changes.notify()
        return True

    # -- what tests use ----------------------------------------------------------------------------

    async def send(self, frame: Frame | str) -> None:
        """Send any frame or raw text on the current socket (for malformed-input tests)."""
        if not await self._send(frame):
            raise AssertionError("not connected")

    def received(self, kind: str | None = None, *, connection: int | None = None) -> list[Frame]:
        return [f for n, f in self.inbound
                if (kind is None or f["type"] == kind) and connection in (None, n)]

    def sent(self, kind: str | None = None) -> list[Frame]:
        return [f for _, f in self.outbound if isinstance(f, dict)
                and (kind is None or f["type"] == kind)]

    async def wait_received(self, predicate: Callable[[Frame], bool]) -> Frame:
        def match() -> Frame | None:
            return next((f for _, f in self.inbound if predicate(f)), None)
        return await self.changes.until(match)

    async def wait_disconnected(self) -> int | None:
        await self.changes.until(lambda: not self._ready)
        await asyncio.wait_for(asyncio.gather(*self._tasks, return_exceptions=True), WAIT)
        return self.close_codes[-1]

    async def cut(self) -> None:
        """Drop TCP without a close frame, as a network fault would."""
        if self.ws is not None and self.ws.transport is not None:
            self.ws.transport.abort()
        await self.wait_disconnected()

    async def close(self) -> None:
        for task in self.running.values():
            task.cancel()
        if self.ws is not None:
            await self.ws.close(1000)
            await asyncio.wait_for(asyncio.gather(*self._tasks, return_exceptions=True), WAIT)


# -- a mesh on aiohttp's WebSocket server ----------------------------------------------------------

MESH_KNOWN = AGENT_KNOWN
_MESH_ACCEPTS = frozenset({"heartbeat", "dispatch_ack", "dispatch_chunk", "dispatch_result",
                           "error", "ping", "pong", "close_request", "tool_call"})


@dataclass(frozen=True)
class Registration:
    tenant_id: str
    agent_type: str
    deployment_mode: str = "connected"


@dataclass
class _Held:
    instance_id: str
    tenant_id: str
    expires_at: float
    dispatches: list[Frame]


@dataclass
class MeshSession:
    """One accepted agent socket on the independent mesh."""

    request: web.Request
    ws: web.WebSocketResponse
    instance_id: str
    tenant_id: str
    agent_type: str
    received: list[Frame] = field(default_factory=list)
    sent: list[Frame] = field(default_factory=list)
    hello: Frame | None = None
    welcome: Frame | None = None
    resume_token: str | None = None
    in_flight: dict[str, Frame] = field(default_factory=dict)  # dispatch payloads without auth
    close_code: int | None = None
    """The close code the agent sent, None when the socket just dropped."""
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    async def send(self, frame: Frame | str) -> None:
        await self.ws.send_str(frame if isinstance(frame, str) else encode(frame))
        if isinstance(frame, dict):
            self.sent.append(frame)

    def frames(self, kind: str) -> list[Frame]:
        return [f for f in self.received if f["type"] == kind]


class IndependentMesh:
    """A minimal mesh: `GET /agents/connect` (spec 1), hello/welcome with resume (spec 5),
    dispatches with a PyJWT-minted `svantic_jwt` (spec 7), first terminal frame wins (spec 3).

    Held dispatches wait for a matching `resume_token` within `resume_window`
    and are replayed with `attempt` + 1 and a fresh `dispatch_auth`.
    """

    def __init__(self, *, transport_secret: str, signing_secret: str,
                 registrations: dict[str, Registration], heartbeat_interval_ms: int = 30_000,
                 resume_window: float = 30.0) -> None:
        self._transport_secret, self._signing_secret = transport_secret, signing_secret
        self.registrations = registrations
        self.heartbeat_interval_ms, self.resume_window = heartbeat_interval_ms, resume_window
        self.sessions: list[MeshSession] = []
        self.rejections: list[tuple[int, str]] = []
        self.outcomes: dict[str, asyncio.Future[Frame]] = {}
        self.terminal_frames: Counter[str] = Counter()
        self.late_terminal_frames = 0
        self._held: dict[str, _Held] = {}
        self.changes = Changes()
        self._runner: web.AppRunner | None = None

    async def start(self, ssl_context: ssl.SSLContext) -> str:
        app = web.Application()
        app.router.add_get(CONNECT_PATH, self._connect)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=WAIT)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        port = self._runner.addresses[0][1]
        return f"wss://127.0.0.1:{port}{CONNECT_PATH}"

    async def close(self) -> None:
        for session in self.sessions:
            if not session.ws.closed:
                await session.ws.close(code=1001, message=b"mesh shutting down")
        if self._runner is not None:
            await self._runner.cleanup()

    # -- spec 1: checks before the upgrade, in order -----------------------------------------------

    def _refuse(self, status: int, code: str, message: str) -> web.Response:
        self.rejections.append((status, code))
        return web.json_response({"error": {"code": code, "message": message}}, status=status)

    async def _connect(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return self._refuse(426, "UPGRADE_REQUIRED", "open a WebSocket")
        instance_id = request.query.get("instance_id", "")
        if not instance_id:
            return self._refuse(400, "MISSING_INSTANCE_ID", "add ?instance_id=")
        offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")]
        if SUBPROTOCOL not in offered:
            return self._refuse(400, "UNSUPPORTED_SUBPROTOCOL", f"offer {SUBPROTOCOL}")
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        try:
            if scheme.lower() != "bearer":
                raise jwt.InvalidTokenError("no bearer token")
            claims = decode_transport_token(token.strip(), self._transport_secret)
        except jwt.PyJWTError:
            return self._refuse(401, "UNAUTHORIZED", "bad or expired token")
        registration = self.registrations.get(instance_id)
        if registration is None:
            return self._refuse(404, "INSTANCE_NOT_FOUND", f"no instance {instance_id}")
        if registration.tenant_id != claims["tenant_id"]:
            return self._refuse(403, "TENANT_MISMATCH", "another tenant's instance")
        if registration.deployment_mode == "hosted":
            return self._refuse(409, "DEPLOYMENT_MODE_MISMATCH", "registered as hosted")
        ws = web.WebSocketResponse(protocols=(SUBPROTOCOL,), compress=False,
                                   max_msg_size=MAX_MESSAGE_BYTES, autoping=True)
        await ws.prepare(request)
        session = MeshSession(request, ws, instance_id, registration.tenant_id,
                              registration.agent_type)
        self.sessions.append(session)
        try:
            await self._serve(session)
        finally:
            self._ended(session)
        return ws

    # -- the socket --------------------------------------------------------------------------------

    async def _serve(self, session: MeshSession) -> None:
        ws = session.ws
        while True:
            try:
                message = await ws.receive(timeout=None if session.hello else 10.0)
            except TimeoutError:
                await ws.close(code=1002, message=b"no hello in time")
                return
            if message.type == WSMsgType.CLOSE:
                session.close_code = message.data
                return
            if message.type == WSMsgType.BINARY:
                await ws.close(code=1003, message=b"binary")
                return
            if message.type != WSMsgType.TEXT:
                return  # CLOSED / ERROR: the transport is gone
            try:
                frame = parse_frame(message.data, MESH_KNOWN)
            except BadFrame as exc:
                if exc.frame is not None:
                    session.received.append(exc.frame)
                    self.changes.notify()
                await session.send(bad_frame_error(exc))
                if not exc.keep_socket:
                    await ws.close(code=1002, message=b"bad frame")
                    return
                continue
            session.received.append(frame)
            self.changes.notify()
            if not await self._on_frame(session, frame):
                await ws.close(code=1002, message=b"protocol error")
                return

    async def _on_frame(self, session: MeshSession, frame: Frame) -> bool:
        kind, payload = frame["type"], frame["payload"]
        if session.hello is None:
            if kind != "hello" or payload["instance_id"] != session.instance_id:
                await session.send(bad_frame_error(BadFrame("the first frame must be hello",
                                                             frame["id"], keep_socket=False)))
                return False
            await self._welcome(session, frame)
            return True
        if kind not in _MESH_ACCEPTS:
            await session.send(bad_frame_error(BadFrame(f"a mesh does not accept {kind}",
                                                        frame["id"], keep_socket=False)))
            return False
        if kind == "ping":
            await session.send(make_frame("pong", in_reply_to=frame["id"]))
        elif kind == "tool_call":
            await session.send(make_frame("tool_result", {"error": {
                "code": "CAPABILITY_NOT_FOUND", "message": "no agent has it"}},
                in_reply_to=frame["id"]))
        elif kind in TERMINAL_TYPES and frame.get("in_reply_to") in self.outcomes:
            self._terminal(session, frame)
        return True

    def _terminal(self, session: MeshSession, frame: Frame) -> None:
        dispatch_id = frame["in_reply_to"]
        self.terminal_frames[dispatch_id] += 1
        if session.in_flight.pop(dispatch_id, None) is None:
            self.late_terminal_frames += 1  # not held here (anymore): ignored (spec 5)
            return
        outcome = self.outcomes[dispatch_id]
        if not outcome.done():
            outcome.set_result(frame)

    async def _welcome(self, session: MeshSession, hello: Frame) -> None:
        session.hello = hello
        now = asyncio.get_running_loop().time()
        presented = hello["payload"].get("resume_token")
        held = self._held.get(presented) if presented else None
        if held is not None and (held.instance_id, held.tenant_id) != (
                session.instance_id, session.tenant_id):
            held = None  # bound to another instance or tenant: not ours to claim
        resumed = held is not None and now <= held.expires_at
        replay = held.dispatches if resumed and held is not None else []
        for token, other in list(self._held.items()):
            if other.instance_id == session.instance_id and other.tenant_id == session.tenant_id:
                del self._held[token]  # single use; whatever was not resumed has failed
                if other is not held or not resumed:
                    self._fail_held(other)
        session.resume_token = secrets.token_urlsafe(24)
        session.welcome = make_frame("welcome", {
            "connection_id": uuid7(), "resumed": resumed,
            "replayed_dispatches": [d["dispatch_id"] for d in replay],
            "resume_token": session.resume_token,
            "heartbeat_interval_ms": self.heartbeat_interval_ms,
            "max_message_bytes": MAX_MESSAGE_BYTES}, in_reply_to=hello["id"])
        await session.send(session.welcome)
        for payload in replay:
            await self._send_dispatch(session, {**payload, "attempt": payload["attempt"] + 1})
        self.changes.notify()

    def _fail_held(self, held: _Held) -> None:
        for payload in held.dispatches:
            outcome = self.outcomes[payload["dispatch_id"]]
            if not outcome.done():
                outcome.set_result(make_frame("error", {"code": "AGENT_DISCONNECTED"},
                                              in_reply_to=payload["dispatch_id"]))

    def _ended(self, session: MeshSession) -> None:
        if session.resume_token is not None:
            self._held[session.resume_token] = _Held(
                session.instance_id, session.tenant_id,
                asyncio.get_running_loop().time() + self.resume_window,
                list(session.in_flight.values()))
            session.in_flight.clear()
        session.closed.set()
        self.changes.notify()

    async def _send_dispatch(self, session: MeshSession, payload: Frame,
                             auth: str = "valid") -> None:
        dispatch_id = payload["dispatch_id"]
        session.in_flight[dispatch_id] = payload
        token = mint_dispatch_token(
            self._signing_secret if auth == "valid" else "not-the-signing-secret-but-just-as-long",
            instance_id=session.instance_id, agent_type=session.agent_type,
            tenant_id=session.tenant_id, dispatch_id=dispatch_id,
            capability=payload["capability"])
        envelope = {} if auth == "none" else {
            "dispatch_auth": {"type": "svantic_jwt", "token": token}}
        await session.send(make_frame("dispatch", {**payload, **envelope},
                                      frame_id=dispatch_id))

    # -- what tests use ----------------------------------------------------------------------------

    def live(self, instance_id: str) -> MeshSession | None:
        return next((s for s in reversed(self.sessions) if s.instance_id == instance_id
                     and s.welcome is not None and not s.closed.is_set()), None)

    async def wait_session(self, instance_id: str, count: int = 1) -> MeshSession:
        """The `count`-th welcomed session of an instance, once it exists."""
        def nth() -> MeshSession | None:
            welcomed = [s for s in self.sessions
                        if s.instance_id == instance_id and s.welcome is not None]
            return welcomed[count - 1] if len(welcomed) >= count else None
        return await self.changes.until(nth)

    async def wait_received(self, session: MeshSession,
                            predicate: Callable[[Frame], bool]) -> Frame:
        return await self.changes.until(
            lambda: next((f for f in session.received if predicate(f)), None))

    async def dispatch(self, instance_id: str, capability: str,
                       arguments: dict[str, Any] | None = None, *, deadline_ms: int = 30_000,
                       session_context: dict[str, Any] | None = None,
                       auth: str = "valid") -> str:
        """Send a dispatch to the instance's live socket; returns its id.

        `auth` is "valid", "bad_signature" (signed with another secret) or "none".
        """
        session = self.live(instance_id)
        if session is None:
            raise AssertionError(f"{instance_id} is not connected")
        dispatch_id = uuid7()
        payload: Frame = {"dispatch_id": dispatch_id, "capability": capability,
                          "arguments": arguments or {}, "deadline_ms": deadline_ms,
                          "task_id": None, "attempt": 1}
        if session_context is not None:
            payload["session_context"] = session_context
        self.outcomes[dispatch_id] = asyncio.get_running_loop().create_future()
        await self._send_dispatch(session, payload, auth)
        return dispatch_id

    async def outcome(self, dispatch_id: str) -> Frame:
        """The first terminal frame of a dispatch (or a synthetic AGENT_DISCONNECTED)."""
        return await asyncio.wait_for(asyncio.shield(self.outcomes[dispatch_id]), WAIT)

    async def cut(self, session: MeshSession) -> None:
        """Drop the agent's TCP connection without a close frame."""
        transport = session.request.transport
        if transport is not None:
            transport.abort()
        await asyncio.wait_for(session.closed.wait(), WAIT)
