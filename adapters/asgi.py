"""svantic.v1 as an ASGI application: a mesh endpoint inside any ASGI 3 server on asyncio.

`AsgiMesh` is an ASGI 3 application (no framework: only the ASGI interface) serving
`GET /agents/connect` (spec 1-5) on the same mesh runtime as the other adapters' mesh
servers, so admission, handshake bounds, the instance table (the newest connection wins),
dispatch waiters across a resume, and shutdown are decided there, as on every adapter.

The server (uvicorn, hypercorn's asyncio worker, ...) does the TLS, the HTTP upgrade, the
WebSocket framing, its pings and the closing handshake; each connection is one
`MeshMessages` in message mode wrapped around the runtime's own `MeshConnection`
(`MeshMessages.around`). One task reads the connection's messages into it, one writes what
it gives: `websocket.accept` with `svantic.v1`, texts, and `websocket.close` with the core's
code and reason. A refusal (spec 1) is the WebSocket Denial Response extension's
`websocket.http.response.start` / `.body`, with the status and JSON body of byte mode; a
server without that extension gets `websocket.close` (it answers a plain 403).

A plain HTTP request for the endpoint is answered 426 with the spec's JSON, as byte mode
does. Any other request goes to `http_app(request, responder)` when there is one, as on the
other drivers' ports (the reference mesh's control plane: `svantic_mesh.asgi`), with its body
read whole and bounded first; without one it is answered 404 with the same JSON shape.
`lifespan.startup` enters the `lifespan` context given; `lifespan.shutdown` runs `close()`,
then leaves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping, Sequence
from typing import Any, Protocol, cast
from urllib.parse import quote

from svantic_proto import Config, ResumeStore
from svantic_proto.capabilities import DispatchContext
from svantic_proto.errors import DispatchError, HandlerError, InvalidState
from svantic_proto.events import Event
from svantic_proto.handshake import CONNECT_PATH
from svantic_proto.http import HttpRequest
from svantic_proto.mesh import MintDispatchAuth
from svantic_proto.mesh_runtime import SHUTTING_DOWN, AdmissionNeeded, MeshPhase
from svantic_proto.messages import Close, MeshMessages, UpgradeAccepted, UpgradeRefused

from ._mesh import _INTERNAL, _INTERNAL_BODY, AsyncAgentHandle, HttpResponder, MeshDriver
from ._protocol import WRITE_BUFFER_LIMIT, AsyncioMeshApi, LoopTimer
from ._pump import DETACHED

__all__ = [
    "WRITE_BUFFER_LIMIT",
    "AgentLink",
    "AsgiMesh",
    "DispatchContext",
    "DispatchError",
    "HandlerError",
]

log = logging.getLogger("svantic.mesh")

Scope = MutableMapping[str, Any]
ASGIMessage = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[ASGIMessage]]
Send = Callable[[ASGIMessage], Awaitable[None]]


class _AsyncContext(Protocol):
    """An async context manager (`contextlib.AbstractAsyncContextManager`, which the API
    reference cannot link)."""

    async def __aenter__(self) -> Any: ...
    async def __aexit__(self, *exc: Any) -> Any: ...


DENIAL = "websocket.http.response"
"""The ASGI WebSocket Denial Response extension: an HTTP answer instead of the upgrade."""
HIGH_WATER = 64 * 1024
"""Characters queued for one agent above which a dispatch waits for them to go out."""

# The server validated the upgrade already: the core reads these as a canonical one.
_UPGRADE_HEADERS = frozenset((b"upgrade", b"connection", b"sec-websocket-version",
                              b"sec-websocket-protocol", b"sec-websocket-extensions"))
_CANONICAL_UPGRADE = ((b"upgrade", b"websocket"), (b"connection", b"Upgrade"),
                      (b"sec-websocket-version", b"13"))


def _error_body(code: str, message: str) -> bytes:
    """The spec 1 JSON body, as byte mode writes it."""
    return json.dumps({"error": {"code": code, "message": message}},
                      separators=(",", ":")).encode("utf-8")


def _refusal(status: int, code: str, message: str,
             headers: tuple[tuple[str, str], ...] = ()) -> UpgradeRefused:
    return UpgradeRefused(status, code, message, _error_body(code, message),
                          (("Content-Type", "application/json"), *headers))


def _asgi_headers(refusal: UpgradeRefused) -> list[tuple[bytes, bytes]]:
    headers = [(name.lower().encode("latin-1"), value.encode("latin-1"))
               for name, value in refusal.headers if name.lower() != "content-length"]
    headers.append((b"content-length", str(len(refusal.body)).encode("ascii")))
    return headers


async def _deny(send: Send, refusal: UpgradeRefused, denial: bool) -> None:
    """Refuse a WebSocket before its upgrade: the refusal's status, headers and JSON body
    through the Denial Response extension, or `websocket.close` (a plain 403) without it."""
    with contextlib.suppress(OSError):  # the client went away meanwhile
        if denial:
            await send({"type": "websocket.http.response.start", "status": refusal.status,
                        "headers": _asgi_headers(refusal)})
            await send({"type": "websocket.http.response.body", "body": refusal.body})
        else:
            await send({"type": "websocket.close", "code": 1008, "reason": refusal.code})


async def _send_refusal(send: Send, refusal: UpgradeRefused) -> None:
    """A plain HTTP answer of the spec 1 JSON shape."""
    await send({"type": "http.response.start", "status": refusal.status,
                "headers": _asgi_headers(refusal)})
    await send({"type": "http.response.body", "body": refusal.body})


async def _watch_disconnect(receive: Receive, responder: AsgiResponder) -> None:
    """After the body: the next message the server has is `http.disconnect` (ASGI), which
    tells a long answer (an event stream) that nobody reads it any more."""
    try:
        while (await receive())["type"] != "http.disconnect":
            pass
    except OSError:  # a server that raises instead
        pass
    responder._disconnected()


class AsgiLink:
    """One agent's WebSocket through the ASGI server: what the mesh runtime knows it by.

    The pump's synchronous calls queue what to send; `_write` sends it in order (the
    answer to the upgrade first). `done` is set once the ASGI call for it returned.
    """

    __slots__ = ("_answer", "_close_timeout", "_denial", "_done", "_drained", "_dropped",
                 "_ended", "_gone", "_outbox", "_queued", "_timer", "_wake", "accepted", "over",
                 "pump", "scope")

    def __init__(self, scope: Scope, denial: bool, close_timeout: float) -> None:
        self.scope = scope
        self.pump: Any = DETACHED
        self.accepted = False
        """`websocket.accept` is queued: the WebSocket is (or is about to be) open."""
        self.over = asyncio.Event()
        """Set when nothing more will be sent: the ASGI call then ends."""
        self._denial = denial
        self._answer: UpgradeRefused | None = None
        self._outbox: deque[ASGIMessage] = deque()
        self._queued = 0  # characters of text in the outbox
        self._wake = asyncio.Event()
        self._drained: asyncio.Future[None] | None = None
        self._done: asyncio.Event | None = None
        self._ended = False  # the core connection ended: finish once the outbox is out
        self._dropped = False  # the runtime dropped it: send nothing more
        self._gone = False  # the server reported the end of the WebSocket
        self._close_timeout = close_timeout
        self._timer: asyncio.TimerHandle | None = None

    # -- what the pump and the mesh driver call --------------------------------------------

    def answer(self, outcome: UpgradeAccepted | UpgradeRefused) -> None:
        if isinstance(outcome, UpgradeAccepted):
            self.accepted = True
            self._outbox.append({"type": "websocket.accept", "subprotocol": outcome.subprotocol})
        else:
            self._answer = outcome
        self._wake.set()

    def put(self, items: list[Any]) -> None:
        if self._dropped or self._gone:
            return
        outbox = self._outbox
        for item in items:
            if type(item) is str:
                outbox.append({"type": "websocket.send", "text": item})
                self._queued += len(item)
            elif isinstance(item, Close):  # always the last item
                if item.code is None:  # the core drops the transport
                    self.abort()
                    return
                outbox.append({"type": "websocket.close", "code": item.code,
                               "reason": item.reason})
            # `WebSocketPing` never comes: the server sends the WebSocket pings
        if self._queued > WRITE_BUFFER_LIMIT:  # the peer stopped reading: give up on it
            log.info("dropping a connection whose agent does not read (%d characters queued)",
                     self._queued)
            self.abort()
            return
        self._wake.set()

    def end(self) -> None:
        """The core connection ended: send what is queued, then the ASGI call ends; a
        server that does not take it within `Config.close_timeout` is given up on."""
        self._ended = True
        self._wake.set()
        if self.accepted and self._timer is None and not self.over.is_set():
            self._timer = asyncio.get_running_loop().call_later(self._close_timeout, self.abort)

    def abort(self) -> None:
        """Drop it now: nothing more is sent. After the upgrade, the ASGI call returns
        without `websocket.close` (the server then closes the transport); before it, the
        upgrade is refused 503, which agents retry."""
        if self._dropped:
            return
        self._dropped = True
        if self.accepted:
            self._finish()
        else:
            self._wake.set()

    close = abort  # `DropLink` for a link with a connection: nothing gentler exists here

    def gone(self) -> None:
        """The server reported the end of the WebSocket (`websocket.disconnect`)."""
        self._gone = True
        self._finish()

    @property
    def done(self) -> asyncio.Event:
        """Set once the link has ended."""
        if self._done is None:
            self._done = asyncio.Event()
        return self._done

    @property
    def paused(self) -> bool:
        return self._queued > HIGH_WATER

    async def drain(self, limit: int) -> None:
        """Over `limit` characters queued, wait until the writer sent half of them."""
        if self._queued > limit and not self.over.is_set():
            if self._drained is None:
                self._drained = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._drained)  # shared by every caller: not cancelled by one

    # -- inside ----------------------------------------------------------------------------

    def _finish(self) -> None:
        self.over.set()
        self._wake.set()
        self._release()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _release(self) -> None:
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    async def _write(self, send: Send, refuse: Callable[[], UpgradeRefused]) -> None:
        """Send what the pump queued, in order, until nothing more will be."""
        outbox = self._outbox
        try:
            while not self._gone:
                if self._dropped:
                    if not self.accepted:
                        await _deny(send, refuse(), self._denial)
                    return
                if outbox:
                    message = outbox.popleft()
                    if message["type"] == "websocket.send":
                        self._queued -= len(message["text"])
                        if self._drained is not None and self._queued <= HIGH_WATER // 2:
                            self._release()
                    await send(message)
                    continue
                if self._answer is not None:
                    await _deny(send, self._answer, self._denial)
                    return
                if self._ended:
                    return
                self._wake.clear()
                await self._wake.wait()
        except OSError as exc:  # the server's "client disconnected" (ASGI 2.4: an IOError)
            log.debug("send to a disconnected client: %r", exc)
        finally:
            self._finish()


class _MessagePump:
    """`Pump` for a link that moves messages: after any call into the connection, its
    events to the runtime, the answer to the upgrade and its messages to the link, and
    its timer to the mesh's one timer."""

    __slots__ = ("_answered", "_arm_timer", "_busy", "_deadline", "_link", "_on_event",
                 "closed", "conn", "messages")

    def __init__(self, messages: MeshMessages, link: AsgiLink,
                 on_event: Callable[[Event], None],
                 arm_timer: Callable[[float | None], None]) -> None:
        self.messages = messages
        self.conn = messages.connection
        self.closed = False
        """The link takes nothing more (the connection ended, or the link was dropped)."""
        self._link = link
        self._on_event = on_event
        self._arm_timer = arm_timer
        self._deadline: float | None = None
        self._answered = False
        self._busy = False

    def service(self) -> None:
        """Drain events and messages; safe to call from inside an event callback."""
        if self._busy:
            return  # the outer call loops until nothing is left
        self._busy = True
        try:
            messages, link = self.messages, self._link
            while True:
                events = messages.events_received()
                for event in events:
                    self._on_event(event)
                outcome = None if self._answered else messages.outcome
                items = messages.messages_to_send()
                if outcome is not None:
                    self._answered = True
                    link.answer(outcome)
                if items:
                    link.put(items)
                if not events and not items:
                    break
            conn = self.conn
            if conn.closed and not self.closed:
                self.closed = True
                link.end()
            # The core's timers run until it closed: its close timeout bounds a close reply
            # the server never reports.
            deadline = None if conn.closed else conn.next_deadline()
            if deadline != self._deadline:
                self._deadline = deadline
                self._arm_timer(deadline)
        finally:
            self._busy = False


def _local_path(scope: Mapping[str, Any]) -> str:
    """The request's path below the mount point (`root_path`): what the app routes on."""
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):  # ASGI: `path` holds the mount point too
        return path[len(root):] or "/"
    return path  # no mount point, or a framework that strips it from `path`


def _http_request(scope: Mapping[str, Any], body: bytes) -> HttpRequest:
    """The request as the mesh's own HTTP server hands it over (`svantic_proto.http`)."""
    path = _local_path(scope)
    query = bytes(scope.get("query_string", b"")).decode("latin-1")
    target = quote(path, safe="/:@!$&'()*+,;=~") + (f"?{query}" if query else "")
    headers = tuple((bytes(name).decode("ascii", "replace").lower(),
                     bytes(value).decode("latin-1"))
                    for name, value in scope.get("headers", ()))
    return HttpRequest(method=scope.get("method", "GET"), target=target, path=path,
                       query=query, headers=headers, body=body)


def _response_headers(headers: Sequence[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(name.lower().encode("latin-1"), value.encode("latin-1"))
            for name, value in headers if name.lower() != "content-length"]


_ANSWERING, _STREAMING, _ANSWERED = range(3)


class AsgiResponder(HttpResponder):
    """How `http_app` answers one ASGI request: `HttpResponder`'s calls, which stay
    synchronous (an application writes SSE from a chunk callback) by queueing ASGI
    messages that `_write` sends in order. `closed` once the client disconnected (or the
    answer was cut): the calls then do nothing, so an application never fails for writing
    to a gone peer."""

    __slots__ = ("_cut", "_gone", "_head_out", "_outbox", "_state", "_wake")

    def __init__(self) -> None:  # no super().__init__: there is no h11 connection here
        self.started = False
        self._state = _ANSWERING
        self._outbox: deque[ASGIMessage] = deque()
        self._wake = asyncio.Event()
        self._gone = False  # the client disconnected
        self._cut = False  # an answer that started is abandoned: nothing more goes out
        self._head_out = False  # `http.response.start` is handed to the server

    @property
    def closed(self) -> bool:
        return self._gone or self._cut

    def respond(self, status: int, headers: Sequence[tuple[str, str]], body: bytes) -> None:
        self._require(_ANSWERING, "respond")
        self.started = True
        self._state = _ANSWERED
        head = _response_headers(headers)
        head.append((b"content-length", str(len(body)).encode("ascii")))
        self._queue({"type": "http.response.start", "status": status, "headers": head},
                    {"type": "http.response.body", "body": body})

    def start(self, status: int, headers: Sequence[tuple[str, str]]) -> None:
        self._require(_ANSWERING, "start")
        self.started = True
        self._state = _STREAMING
        self._queue({"type": "http.response.start", "status": status,
                     "headers": _response_headers(headers)})

    def send(self, data: bytes) -> None:
        self._require(_STREAMING, "send")
        if data:
            self._queue({"type": "http.response.body", "body": data, "more_body": True})

    def end(self) -> None:
        self._require(_STREAMING, "end")
        self._state = _ANSWERED
        self._queue({"type": "http.response.body", "body": b""})

    # -- inside ----------------------------------------------------------------------------

    def _require(self, state: int, action: str) -> None:
        if self._state != state and not self.closed:
            raise InvalidState(f"{action}: no request is waiting for this kind of answer")

    def _queue(self, *messages: ASGIMessage) -> None:
        if not self.closed:
            self._outbox.extend(messages)
            self._wake.set()

    def _abort(self, reason: str) -> None:
        """Cut a started answer (`MeshDriver._http_failed`): the ASGI call then returns with
        the answer incomplete, which the server turns into a cut connection. One whose head
        is still queued reached nobody: it becomes the 500 a failure before any answer gets."""
        if self._state == _ANSWERED:
            return  # whole already (queued or sent): it goes out as it is
        if not self._head_out and not self.closed:
            self._outbox.clear()
            self._state = _ANSWERING
            self.respond(500, _INTERNAL, _INTERNAL_BODY)
            return
        log.debug("HTTP answer cut: %s", reason)
        self._cut = True
        self._outbox.clear()
        self._wake.set()

    def _disconnected(self) -> None:
        self._gone = True
        self._outbox.clear()
        self._wake.set()
        self._notify_closed()  # an event stream frees its slot now, not at the keepalive

    def _finish(self) -> None:
        """The application returned: a stream it left open is ended (returning mid-answer
        would make the server log an error and cut it)."""
        if self._state == _STREAMING:
            self.end()

    async def _write(self, send: Send) -> None:
        """Send what the application queued, in order, until the answer is out (or the
        client left, or it was cut)."""
        outbox = self._outbox
        try:
            while not self.closed:
                if outbox:
                    message = outbox.popleft()
                    if message["type"] == "http.response.start":
                        self._head_out = True
                    await send(message)
                    if message["type"] == "http.response.body" and not message.get("more_body"):
                        return
                    continue
                self._wake.clear()
                await self._wake.wait()
        except OSError as exc:  # the server's "client disconnected" (ASGI 2.4: an IOError)
            log.debug("send to a disconnected client: %r", exc)
            self._disconnected()


class AgentLink(AsyncAgentHandle[AsgiLink]):
    """The mesh's handle on one connected agent: `await dispatch(...)`, `await wait_closed()`."""

    __slots__ = ()


class AsgiMesh(LoopTimer, AsyncioMeshApi, MeshDriver[AsgiLink]):
    """A mesh endpoint as an ASGI 3 application: `await app(scope, receive, send)`.

    `verify_token(token)` returns claims with `tenant_id` (an object or a mapping) or
    raises; `lookup_instance(id)` returns an `InstanceRecord` or None; either may be a
    coroutine function. `path` is where agents connect: matched against the request's full
    path and against its path below the mount point (`root_path`), so mounting the app at
    `/agents` serves `/agents/connect`. `shutdown_grace` is the grace `lifespan.shutdown`
    gives running agents (None: `Config.close_grace`).

    `http_app(request, responder)`, a coroutine function, answers every other HTTP request
    as on the other drivers (an `HttpRequest` with the path below the mount point, and a
    responder with `HttpResponder`'s calls); a body over `max_http_body_bytes` is answered
    413 without calling it. Without it those requests get 404. `lifespan`, an async context
    manager, runs for the server's lifetime: entered at `lifespan.startup` (mounted: by the
    framework's lifespan through `lifespan_context`), left after `close()`.

    Configure the server as spec 4 says, which an ASGI application cannot do itself: the same
    message limit (uvicorn `ws_max_size=config.max_message_bytes`, hypercorn
    `websocket_max_message_size`) and no permessage-deflate (uvicorn
    `ws_per_message_deflate=False`).

    One instance serves one server's event loop at a time.
    """

    def __init__(self, *, verify_token: Callable[[str], Any],
                 lookup_instance: Callable[[str], Any],
                 dispatch_auth: MintDispatchAuth | None, config: Config | None = None,
                 resume_store: ResumeStore | None = None, max_connections: int = 10_000,
                 max_handshakes: int = 1024, path: str = CONNECT_PATH,
                 shutdown_grace: float | None = None,
                 http_app: Callable[[HttpRequest, HttpResponder], Awaitable[Any]] | None = None,
                 max_http_body_bytes: int = 1 << 20,
                 lifespan: _AsyncContext | None = None) -> None:
        if max_http_body_bytes < 0:
            raise ValueError("max_http_body_bytes must be >= 0")
        self.path = path
        self.shutdown_grace = shutdown_grace
        self.max_http_body_bytes = max_http_body_bytes
        self.lifespan = lifespan
        super().__init__(ssl_context=None, verify_token=verify_token,
                         lookup_instance=lookup_instance, dispatch_auth=dispatch_auth,
                         config=config, resume_store=resume_store,
                         max_connections=max_connections, max_handshakes=max_handshakes)
        # Not given to the runtime: the server splits HTTP from WebSockets here, so no link
        # of the runtime ever carries plain HTTP (its `serve_http` stays off).
        self._http_app = http_app

    def _setup(self) -> None:
        self._arrived = asyncio.Event()
        self._shut: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._clock: Callable[[], float] = lambda: asyncio.get_running_loop().time()

    # -- the driver's hooks ----------------------------------------------------------------

    def _now(self) -> float:
        return self._clock()

    def _new_handle(self, link: AsgiLink) -> AgentLink:
        return AgentLink(self, link)

    def _new_pump(self, link: AsgiLink, conn: Any, on_event: Callable[[Event], None],
                  arm_timer: Callable[[float | None], None]) -> _MessagePump:
        scope = link.scope
        headers: list[tuple[bytes, bytes]] = [
            (name, value) for name, value in scope.get("headers", ())
            if name.lower() not in _UPGRADE_HEADERS]
        headers += _CANONICAL_UPGRADE
        messages = MeshMessages.around(
            conn, CONNECT_PATH, scope.get("query_string", b""), headers,
            scope.get("subprotocols") or (), now=self._now())
        return _MessagePump(messages, link, on_event, arm_timer)

    def _admit_async(self, action: AdmissionNeeded[Any], claims: Any, record: Any) -> None:
        task = asyncio.get_running_loop().create_task(self._admission(action, claims, record))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _shutdown_complete(self) -> None:
        if self._shut is not None:
            self._shut.set()

    # -- ASGI --------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "http":
            if self._http_app is None or self.serves(scope):
                await self._refuse_http(scope, send)
            else:
                await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    def serves(self, scope: Mapping[str, Any]) -> bool:
        """Whether the request is for the agents' endpoint (`path`)."""
        path: str = scope.get("path", "")
        if path == self.path:
            return True
        root: str = scope.get("root_path", "")
        if not root:
            return False
        if path.startswith(root):  # ASGI: `path` holds the mount point too
            return path[len(root):] == self.path
        return root + path == self.path  # a framework that strips the mount point from `path`

    async def _refuse_http(self, scope: Scope, send: Send) -> None:
        """Not a WebSocket: 426 on the endpoint (spec 1, as byte mode), 404 elsewhere."""
        if self.serves(scope):
            refusal = _refusal(426, "UPGRADE_REQUIRED",
                               f"{CONNECT_PATH} only accepts WebSocket upgrades",
                               (("Upgrade", "websocket"),))
        else:
            refusal = _refusal(404, "NOT_FOUND", "no such endpoint")
        await _send_refusal(send, refusal)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        """One request for `http_app`: its body, then the app beside a task that sends its
        answer and one that watches for the client's disconnect (`responder.closed`).
        Failures are answered as on the other drivers (`MeshDriver._http_async`)."""
        body = await self._read_body(scope, receive, send)
        if body is None:
            return
        responder = AsgiResponder()
        loop = asyncio.get_running_loop()
        writer = loop.create_task(responder._write(send))
        watcher = loop.create_task(_watch_disconnect(receive, responder))
        try:
            await self._http_async(_http_request(scope, body), responder)
            responder._finish()
            await writer
        finally:
            for task in (writer, watcher):
                task.cancel()
            await asyncio.gather(writer, watcher, return_exceptions=True)

    async def _read_body(self, scope: Scope, receive: Receive, send: Send) -> bytes | None:
        """The whole body, or None: the client left, or it is over `max_http_body_bytes`
        (answered 413 then, by its `Content-Length` before any of it is read)."""
        limit = self.max_http_body_bytes
        too_large = _refusal(413, "PAYLOAD_TOO_LARGE", f"the body exceeds {limit} bytes")
        for name, value in scope.get("headers", ()):
            if name.lower() == b"content-length" and not (
                    value.strip().isdigit() and int(value) <= limit):
                await _send_refusal(send, too_large)
                return None
        pieces: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # http.disconnect
                return None
            piece: bytes = message.get("body", b"")
            size += len(piece)
            if size > limit:
                await _send_refusal(send, too_large)
                return None
            pieces.append(piece)
            if not message.get("more_body", False):
                return b"".join(pieces)

    @contextlib.asynccontextmanager
    async def lifespan_context(self, app: Any = None) -> AsyncIterator[None]:
        """The server's lifetime as `lifespan.startup` / `.shutdown` run it, for the
        framework's lifespan when the mesh is mounted (a mounted app gets no lifespan events
        of its own): `Starlette(routes=..., lifespan=mesh.lifespan_context)`."""
        await self._startup()
        try:
            yield
        finally:
            await self._shutdown()

    async def _startup(self) -> None:
        if self.lifespan is not None:
            await self.lifespan.__aenter__()

    async def _shutdown(self) -> None:
        """`close(shutdown_grace)`, then leave `lifespan` (whose tasks may use the mesh)."""
        try:
            await self.close(self.shutdown_grace)
        finally:
            if self.lifespan is not None:
                await self.lifespan.__aexit__(None, None, None)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self._startup()
                except Exception as exc:
                    log.exception("lifespan startup failed")
                    await send({"type": "lifespan.startup.failed", "message": repr(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                try:
                    await self._shutdown()
                except Exception as exc:
                    await send({"type": "lifespan.shutdown.failed", "message": repr(exc)})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                return

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (await receive())["type"] != "websocket.connect":
            return  # the client left before the server handed the upgrade over
        denial = DENIAL in (scope.get("extensions") or {})
        if not self.serves(scope):
            path = scope.get("path", "")
            await _deny(send, _refusal(404, "NOT_FOUND", f"no WebSocket endpoint at {path!r}"),
                        denial)
            return
        link = AsgiLink(scope, denial, self.config.close_timeout)
        if not self._accepted(link):  # shutting down, or over max_handshakes
            self._closed(link)
            await _deny(send, self._drop_refusal(), denial)
            return
        loop = asyncio.get_running_loop()
        tasks: list[asyncio.Task[None]] = []
        try:
            self._opened(link)  # the upgrade is read now; its answer may be queued already
            tasks.append(loop.create_task(self._read(link, receive)))
            tasks.append(loop.create_task(link._write(send, self._drop_refusal)))
            await link.over.wait()
        finally:
            link.over.set()
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            self._closed(link)
            link.done.set()

    def _drop_refusal(self) -> UpgradeRefused:
        """What a dropped upgrade is answered: 503, which agents retry (byte mode drops TCP)."""
        if self.runtime.phase is not MeshPhase.RUNNING:
            return _refusal(503, SHUTTING_DOWN, "the mesh is shutting down: try again later")
        return _refusal(503, "INTERNAL", "try again later")

    async def _read(self, link: AsgiLink, receive: Receive) -> None:
        """Feed the connection what the server hands over, until the WebSocket ends."""
        pump = cast(_MessagePump, link.pump)
        messages = pump.messages
        limit = self.config.max_message_bytes + 1
        try:
            while True:
                message = await receive()
                kind = message["type"]
                if kind == "websocket.receive":
                    if pump.closed:
                        continue  # after the core's end: nothing more is read
                    text = message.get("text")
                    data: str | bytes = (text if text is not None
                                         else message.get("bytes") or b"")
                    # Over the limit the core closes 1009 either way: it needs no more.
                    messages.receive_message(data[:limit], self._now())
                    pump.service()
                elif kind == "websocket.disconnect":
                    if not pump.conn.closed:
                        now = self._now()
                        if isinstance(messages.outcome, UpgradeAccepted):
                            messages.receive_close(message.get("code"),
                                                   message.get("reason") or "", now=now)
                        else:
                            messages.receive_eof(now)
                        pump.service()
                    return
        except OSError as exc:  # the server's "client disconnected" (ASGI 2.4: an IOError)
            log.debug("receive from a disconnected client: %r", exc)
        finally:
            link.gone()

    # -- the application's API -----------------------------------------------------------------

    async def close(self, grace: float | None = None) -> None:
        """Graceful shutdown: close_request to every agent, wait the grace, 1001 for the
        rest, `Config.close_timeout` for their close; new upgrades are refused 503."""
        if self._shut is None:
            self._shut = asyncio.Event()
            self._begin_close(grace)
        await self._shut.wait()
        self._arm(None)
        links = [link.done.wait() for link in list(self.links)]
        if links:  # dropped by now: their ASGI calls are returning
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.close_timeout):
                    await asyncio.gather(*links)
