"""Hosted mode (spec 8): the agent serves `POST /send` and `GET /.well-known/agent-card.json`
over HTTPS, and the mesh calls it, instead of the agent holding a socket to the mesh.

`HostedApp` makes every decision and does no I/O: it reads one `HttpRequest` and gives either
a whole answer (`HostedResponse`) or a dispatch to run (`HostedCall`), whose end it then
turns into the answer. So the same rules hold whatever serves it, and its tests need no
socket. The glue below runs a `HostedCall` in each stack's concurrency and writes the answer:

* `serve(agent, ...)`: on an adapter's own server (`svantic_adapters.<adapter>.MeshServer`
  with `http_app`, which answers plain HTTP on its port): asyncio, anyio (asyncio or trio),
  gevent. No agent ever connects to a hosted agent, so its WebSocket endpoint refuses all.
* `asgi_app(agent, ...)`: an ASGI 3 application (`svantic_adapters.asgi.AsgiMesh` with
  `http_app`) to mount in Starlette, FastAPI or any ASGI server on asyncio.

Async handlers run on the event loop; plain ones in a worker thread on the async stacks (a
slow plain handler must not stall every other request), in their greenlet on gevent. The
deadline (`deadline_ms` from receipt) cancels the handler: a worker thread cannot be
interrupted, so it is abandoned with its context's `cancelled` set, and the answer goes out
at the deadline all the same. The rules are listed under "Hosted agents (svantic.hosted)"
in docs/protocol-decisions.md.
"""

from __future__ import annotations

import inspect
import logging
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, Literal, overload

import msgspec

from svantic_proto.auth import DispatchAuthVerifier
from svantic_proto.capabilities import Capability, DispatchContext, handler_outcome
from svantic_proto.errors import DispatchAuthError, LocalProtocolError
from svantic_proto.events import DispatchReceived
from svantic_proto.frames import DispatchPayload
from svantic_proto.http import HttpRequest

from .card import agent_card

__all__ = [
    "CARD_PATH",
    "SEND_PATH",
    "AsyncHostedServer",
    "GeventHostedServer",
    "HostedApp",
    "HostedCall",
    "HostedResponse",
    "answer_async",
    "answer_gevent",
    "asgi_app",
    "run_call_async",
    "run_call_gevent",
    "serve",
]

log = logging.getLogger("svantic.hosted")

SEND_PATH = "/send"
CARD_PATH = "/.well-known/agent-card.json"

Headers = tuple[tuple[str, str], ...]
_JSON: Headers = (("content-type", "application/json"), ("cache-control", "no-store"))
_SSE: Headers = (("content-type", "text/event-stream"), ("cache-control", "no-store"),
                 ("x-accel-buffering", "no"))
_CARD: Headers = (("content-type", "application/json"), ("cache-control", "max-age=60"))

_STATUS = {
    "INVALID_REQUEST": 400,
    "DISPATCH_AUTH_FAILED": 401,
    "NOT_FOUND": 404,
    "METHOD_NOT_ALLOWED": 405,
    "DISPATCH_IN_PROGRESS": 409,
    "DUPLICATE_DISPATCH": 409,
    "RATE_LIMITED": 429,
    "CANCELLED": 503,
    "DEADLINE_EXCEEDED": 504,
}
"""HTTP status of each code `/send` answers; every other code (the agent's own: the handler's,
CAPABILITY_NOT_FOUND, INVALID_ARGUMENTS, DISPATCH_FAILED) is 422, as the mesh answers them."""

_encode = msgspec.json.encode
_decode_payload = msgspec.json.Decoder(DispatchPayload).decode


def _status(code: str) -> int:
    return _STATUS.get(code, 422)


def _error_body(code: str, message: str, detail: Mapping[str, Any] | None = None) -> bytes:
    error: dict[str, Any] = {"code": code, "message": message}
    if detail:
        try:
            _encode(detail)
        except (TypeError, ValueError, OverflowError):  # a HandlerError detail that is not JSON
            detail = None
        else:
            error["detail"] = detail
    return _encode({"error": error})


def _refusal(code: str, message: str, *, headers: Headers = (),
             detail: Mapping[str, Any] | None = None) -> HostedResponse:
    return HostedResponse(_status(code), _JSON + headers, _error_body(code, message, detail))


def _event(name: str, data: bytes) -> bytes:
    """One SSE event; `data` is compact JSON, so it holds no newline."""
    return b"event: " + name.encode("ascii") + b"\ndata: " + data + b"\n\n"


@dataclass(frozen=True, slots=True)
class HostedResponse:
    """A whole answer: status, headers (`content-length` is the server's), body."""

    status: int
    headers: Headers
    body: bytes


@dataclass(frozen=True, slots=True)
class _Finished:
    """A finished dispatch's answer, kept to answer the same `dispatch_id` again."""

    status: int
    body: bytes  # `{"result": ...}` or `{"error": {...}}`: also the data of the SSE event
    expires: float

    def response(self, stream: bool) -> HostedResponse:
        """A result as asked (a stream of its one `result` event, or JSON); an error as
        the JSON error body with its status, as every refusal without a handler is."""
        if stream and self.status == 200:
            return HostedResponse(200, _SSE, _event("result", self.body))
        return HostedResponse(self.status, _JSON, self.body)


class HostedCall:
    """One accepted dispatch, for the glue to run: `handler(arguments, context)` for at most
    `timeout` seconds (`blocking`: a plain function that may block, for a worker thread on
    the async stacks, with `context.portal` set; else on the loop, awaiting what it returns),
    then exactly one of `returned` / `raised` / `timed_out` / `abandoned`, which give the
    answer (for a stream, its last event as `body`). All in the writer's thread.

    With `stream`, the glue first calls `open_stream(send)` and starts the answer with the
    status and headers it returns; each `context.chunk(data)` is then one SSE `chunk` event
    handed to `send` (from a worker thread, through `context.portal`, in order).
    """

    __slots__ = ("_app", "_finished", "_send", "_seq", "arguments", "blocking", "capability",
                 "context", "dispatch_id", "handler", "stream", "timeout")

    def __init__(self, app: HostedApp, payload: DispatchPayload, capability: Capability,
                 stream: bool) -> None:
        self._app = app
        self.dispatch_id = payload.dispatch_id
        self.capability = payload.capability
        self.handler: Callable[..., Any] = capability.handler
        self.blocking = bool(getattr(capability, "blocking", False))
        self.arguments: dict[str, Any] = payload.arguments
        self.stream = stream
        self.timeout = payload.deadline_ms / 1000
        self.context = app._context(payload, self._chunk)
        self._finished = False
        self._seq = 0
        self._send: Callable[[bytes], object] | None = None

    @property
    def finished(self) -> bool:
        return self._finished

    def open_stream(self, send: Callable[[bytes], object]) -> tuple[int, Headers]:
        """Chunk events go to `send(event)`. Returns the stream's status and headers."""
        self._send = send
        return 200, _SSE

    def _chunk(self, data: Any) -> None:
        """`context.chunk(data)` (in the writer's thread): data that is not JSON, or a chunk
        after the end (a handler past its deadline), raises in the handler, as on the
        socket; without a stream the chunk goes nowhere."""
        if self._finished:
            raise LocalProtocolError(f"dispatch {self.dispatch_id} has ended")
        seq = self._seq
        try:
            event = _event("chunk", _encode({"seq": seq, "data": data}))
        except (TypeError, ValueError, OverflowError) as exc:
            raise LocalProtocolError(f"chunk data is not JSON: {exc}") from None
        self._seq = seq + 1
        if self._send is not None:
            self._send(event)

    # -- the end ---------------------------------------------------------------------------

    def returned(self, result: Any) -> HostedResponse:
        """The handler returned `result`."""
        try:
            body = _encode({"result": result})
        except (TypeError, ValueError, OverflowError) as exc:
            log.warning("%s: the result of %s is not JSON: %s", self.dispatch_id,
                        self.capability, exc)
            return self._fail("DISPATCH_FAILED", "the handler's result is not JSON")
        return self._end(200, body)

    def raised(self, exc: BaseException) -> HostedResponse:
        """The handler raised: its code for a `HandlerError`, else DISPATCH_FAILED naming
        only the exception's type (its text stays in this log, with the traceback)."""
        code, message, detail = handler_outcome(exc)
        if code == "DISPATCH_FAILED":
            log.warning("%s: the handler of %s raised", self.dispatch_id, self.capability,
                        exc_info=exc)
        return self._fail(code, message, detail)

    def timed_out(self) -> HostedResponse:
        """`deadline_ms` passed: the handler was cancelled (a worker thread, abandoned)."""
        self.context.cancel()
        return self._fail("DEADLINE_EXCEEDED",
                          f"the handler did not answer within {round(self.timeout * 1000)} ms")

    def abandoned(self) -> None:
        """The handler was stopped from outside (the server is closing): no answer goes out,
        but the dispatch counts as finished, so its id never runs again."""
        self.context.cancel()
        if not self._finished:
            self._fail("CANCELLED", "the agent stopped while the handler ran")

    def _fail(self, code: str, message: str,
              detail: Mapping[str, Any] | None = None) -> HostedResponse:
        return self._end(_status(code), _error_body(code, message, detail))

    def _end(self, status: int, body: bytes) -> HostedResponse:
        self._finished = True
        self._app._finish(self, status, body)
        if self.stream:  # the stream is open: its last event, whatever the outcome
            return HostedResponse(200, _SSE, _event("result" if status == 200 else "error",
                                                    body))
        return HostedResponse(status, _JSON, body)


class HostedApp:
    """`POST /send` and the card for one agent, as pure request -> answer decisions.

    `agent` is an `svantic.Agent` (its `registry`, `agent_type`, `description`, `version`),
    or a bare `svantic_proto` `CapabilityRegistry`. `verifier` checks each dispatch's
    `dispatch_auth` (spec 7); None means dispatch auth is off here, and then a dispatch that
    carries an envelope is refused as the socket refuses it (`disabled_mismatch`: both sides
    must agree). `public_url` is the base URL the card names (default: `https://` and the
    request's `Host`). `tool_caller` serves `context.call_tool` when the connector provides
    one (a hosted agent has no socket to send `tool_call` on).

    `/send` checks, in order: the payload (400 INVALID_REQUEST), the envelope (401
    DISPATCH_AUTH_FAILED; nothing else is looked at or kept for a request that fails it),
    the dispatch id (a finished one gets its kept answer, a running one 409
    DISPATCH_IN_PROGRESS), the in-flight bound (429 RATE_LIMITED), the capability and the
    arguments (422 CAPABILITY_NOT_FOUND / INVALID_ARGUMENTS); then the handler runs.
    Finished answers are kept for `remember_seconds`, at most `max_finished` of them and
    `max_finished_bytes` in all (the oldest go first), so memory stays bounded.
    """

    def __init__(self, agent: Any, *, verifier: DispatchAuthVerifier | None,
                 public_url: str | None = None,
                 tool_caller: Callable[..., Any] | None = None,
                 max_in_flight: int = 1024, max_finished: int = 4096,
                 max_finished_bytes: int = 32 << 20, remember_seconds: float = 600.0,
                 wall_clock: Callable[[], float] = time.time,
                 clock: Callable[[], float] = time.monotonic) -> None:
        registry = getattr(agent, "registry", agent)
        if not isinstance(getattr(registry, "capabilities", None), Mapping):
            raise TypeError("HostedApp needs an svantic Agent or a CapabilityRegistry")
        if max_in_flight < 1 or max_finished < 0 or max_finished_bytes < 0:
            raise ValueError("max_in_flight must be >= 1, the finished bounds >= 0")
        self.agent = agent
        self.registry = registry
        self.verifier = verifier if verifier is not None else DispatchAuthVerifier(
            "hosted", enabled=False)
        self.public_url = public_url.rstrip("/") if public_url else None
        self.tool_caller = tool_caller
        self.max_in_flight = max_in_flight
        self.max_finished = max_finished
        self.max_finished_bytes = max_finished_bytes
        self.remember_seconds = remember_seconds
        self._wall_clock, self._clock = wall_clock, clock
        self.running: dict[str, HostedCall] = {}
        """Dispatch id -> the call whose handler runs now."""
        self._finished: OrderedDict[str, _Finished] = OrderedDict()
        self._finished_bytes = 0

    # -- requests --------------------------------------------------------------------------

    def handle(self, request: HttpRequest) -> HostedResponse | HostedCall:
        """The answer to `request`, or the dispatch to run (see the class doc)."""
        path, method = request.path, request.method
        if path == SEND_PATH:
            if method != "POST":
                return _refusal("METHOD_NOT_ALLOWED", f"{SEND_PATH} takes POST",
                                headers=(("allow", "POST"),))
            return self.send(request)
        if path == CARD_PATH:
            if method not in ("GET", "HEAD"):
                return _refusal("METHOD_NOT_ALLOWED", f"{CARD_PATH} takes GET",
                                headers=(("allow", "GET, HEAD"),))
            return HostedResponse(200, _CARD, _encode(self.card(request.header("host"))))
        return _refusal("NOT_FOUND", f"no endpoint at {path!r}")

    def card(self, host: str | None = None) -> dict[str, Any]:
        """The agent card (`svantic.card.agent_card`) naming `public_url`, else the host
        the request was sent to."""
        url = self.public_url or f"https://{host or 'localhost'}"
        return agent_card(self.agent, url)

    def send(self, request: HttpRequest) -> HostedResponse | HostedCall:
        """`POST /send`: the spec 3 dispatch payload with its `dispatch_auth`."""
        try:
            payload = _decode_payload(request.body)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
            return _refusal("INVALID_REQUEST", f"the body is not a dispatch payload: {exc}")
        dispatch_id = payload.dispatch_id
        if not dispatch_id or len(dispatch_id) > 128:
            return _refusal("INVALID_REQUEST", "dispatch_id must be 1 to 128 characters")
        try:
            self.verifier.verify(payload.dispatch_auth, dispatch_id=dispatch_id,
                                 capability=payload.capability, now=self._wall_clock())
        except DispatchAuthError as exc:
            log.info("%s: dispatch auth failed (%s)", dispatch_id, exc.reason)
            return _refusal("DISPATCH_AUTH_FAILED", exc.message,
                            detail={"reason": str(exc.reason)})
        stream = "text/event-stream" in (request.header("accept") or "").lower()
        self._expire()
        finished = self._finished.get(dispatch_id)
        if finished is not None:  # answered before: the same answer, the handler never again
            return finished.response(stream)
        if dispatch_id in self.running:
            return _refusal("DISPATCH_IN_PROGRESS",
                            f"dispatch {dispatch_id} is running: its answer goes to the "
                            "request that started it")
        if len(self.running) >= self.max_in_flight:
            return _refusal("RATE_LIMITED",
                            f"the agent runs {self.max_in_flight} dispatches at most",
                            detail={"retry_after_ms": 1000})
        capability, refused = self.registry.resolve(DispatchReceived(
            dispatch_id=dispatch_id, capability=payload.capability,
            arguments=payload.arguments, deadline_ms=payload.deadline_ms,
            attempt=payload.attempt, task_id=payload.task_id,
            session_context=payload.session_context))
        if capability is None:
            code, message = refused or ("CAPABILITY_NOT_FOUND", "no such capability")
            return self._remember(dispatch_id, _status(code), _error_body(code, message)
                                  ).response(stream)
        call = HostedCall(self, payload, capability, stream)
        self.running[dispatch_id] = call
        return call

    # -- inside ----------------------------------------------------------------------------

    def _context(self, payload: DispatchPayload,
                 send_chunk: Callable[[Any], None]) -> DispatchContext:
        """What the registry's handler gets: the same `DispatchContext` the socket's
        driver builds, so `svantic.Context` reads it alike in both modes."""
        return DispatchContext(
            dispatch_id=payload.dispatch_id, capability=payload.capability,
            attempt=payload.attempt, deadline_ms=payload.deadline_ms,
            task_id=payload.task_id, session_context=payload.session_context,
            send_chunk=send_chunk, tool_caller=self.tool_caller)

    def _finish(self, call: HostedCall, status: int, body: bytes) -> _Finished:
        if self.running.get(call.dispatch_id) is call:
            del self.running[call.dispatch_id]
        return self._remember(call.dispatch_id, status, body)

    def _remember(self, dispatch_id: str, status: int, body: bytes) -> _Finished:
        finished = _Finished(status, body, self._clock() + self.remember_seconds)
        if len(body) > self.max_finished_bytes:  # too large to keep: its id is kept, with
            kept = _Finished(409, _error_body(  # an answer that says so
                "DUPLICATE_DISPATCH",
                f"dispatch {dispatch_id} already finished; its answer is not kept"),
                finished.expires)
        else:
            kept = finished
        old = self._finished.pop(dispatch_id, None)
        if old is not None:
            self._finished_bytes -= len(old.body)
        self._finished[dispatch_id] = kept
        self._finished_bytes += len(kept.body)
        while self._finished and (len(self._finished) > self.max_finished
                                  or self._finished_bytes > self.max_finished_bytes):
            _, dropped = self._finished.popitem(last=False)
            self._finished_bytes -= len(dropped.body)
        return finished

    def _expire(self) -> None:
        now = self._clock()
        finished = self._finished
        while finished:
            dispatch_id, oldest = next(iter(finished.items()))
            if oldest.expires > now:
                return
            del finished[dispatch_id]
            self._finished_bytes -= len(oldest.body)


# -- the glue: async stacks (asyncio, trio through anyio, ASGI) ----------------------------------

_PENDING: Any = object()


def _portal(token: Any) -> Callable[..., Any]:
    """`DispatchContext.portal` for a handler in a worker thread: `portal(function, *args)`
    runs `function` in the loop's thread (where the responder and the tool caller live),
    awaits what it returns if that is awaitable, and blocks the worker for the result."""
    import anyio.from_thread

    def portal(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        async def call() -> Any:
            result = function(*args, **kwargs)
            if inspect.isawaitable(result):
                result = await result
            return result

        return anyio.from_thread.run(call, token=token)

    return portal


async def run_call_async(call: HostedCall) -> HostedResponse:
    """Run `call`'s handler on an anyio event loop (asyncio or trio) within its deadline:
    a blocking one in a worker thread (abandoned at the deadline), else on the loop."""
    import anyio
    import anyio.lowlevel
    import anyio.to_thread

    result = _PENDING
    try:
        with anyio.move_on_after(call.timeout) as scope:
            try:
                if call.blocking:
                    call.context.portal = _portal(anyio.lowlevel.current_token())
                    result = await anyio.to_thread.run_sync(
                        call.handler, call.arguments, call.context, abandon_on_cancel=True)
                else:
                    result = call.handler(call.arguments, call.context)
                if inspect.isawaitable(result):
                    result = await result
            except Exception as exc:  # the handler's failure is the dispatch's, not ours
                return call.raised(exc)
    except BaseException:  # cancelled from outside: the server is closing
        call.abandoned()
        raise
    if result is _PENDING or scope.cancel_called:
        return call.timed_out()
    return call.returned(result)


async def answer_async(app: HostedApp, request: HttpRequest, responder: Any) -> None:
    """`http_app(request, responder)` for the async drivers: `responder` has the calls of
    `svantic_adapters._mesh.HttpResponder` (respond, or start / send / end)."""
    answer = app.handle(request)
    if isinstance(answer, HostedResponse):
        responder.respond(answer.status, answer.headers, answer.body)
        return
    call = answer
    if call.stream:
        responder.start(*call.open_stream(responder.send))
    response = await run_call_async(call)
    if call.stream:
        responder.send(response.body)
        responder.end()
    else:
        responder.respond(response.status, response.headers, response.body)


# -- the glue: gevent ------------------------------------------------------------------------------


def run_call_gevent(call: HostedCall) -> HostedResponse:
    """Run `call`'s handler in this greenlet within its deadline (gevent: handlers block
    cooperatively; a coroutine function has no loop to run on here)."""
    import gevent

    timer = gevent.Timeout(call.timeout)
    timer.start()
    try:
        result = call.handler(call.arguments, call.context)
        if inspect.isawaitable(result):
            close = getattr(result, "close", None)
            if close is not None:
                close()
            raise TypeError("a coroutine handler needs an async adapter, not gevent")
    except gevent.Timeout as exc:
        if exc is not timer:
            call.abandoned()
            raise
        return call.timed_out()
    except Exception as exc:  # the handler's failure is the dispatch's, not ours
        return call.raised(exc)
    except BaseException:  # GreenletExit: the server is closing
        call.abandoned()
        raise
    finally:
        timer.close()
    return call.returned(result)


def answer_gevent(app: HostedApp, request: HttpRequest, responder: Any) -> None:
    """`http_app(request, responder)` for the gevent driver (run in a greenlet of its own)."""
    answer = app.handle(request)
    if isinstance(answer, HostedResponse):
        responder.respond(answer.status, answer.headers, answer.body)
        return
    call = answer
    if call.stream:
        responder.start(*call.open_stream(responder.send))
    response = run_call_gevent(call)
    if call.stream:
        responder.send(response.body)
        responder.end()
    else:
        responder.respond(response.status, response.headers, response.body)


# -- serving -----------------------------------------------------------------------------------


def _refuse_agents(token: str) -> Any:
    """No agent connects to a hosted agent: every upgrade of its WebSocket path is 401."""
    raise PermissionError("a hosted agent takes no agent connections")


def _no_instance(instance_id: str) -> None:
    return None


def _url(host: str, port: int, tls: bool) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"{'https' if tls else 'http'}://{shown}:{port}"


class AsyncHostedServer:
    """A hosted agent served on the asyncio or anyio adapter: `url`, `host`, `port`,
    `app` (its `HostedApp`), and `await close()`. On anyio, close it from the task that
    started it and outside any cancel scope entered since: the adapter's task group was
    opened in that task by `serve()`."""

    def __init__(self, app: HostedApp, server: Any, host: str, port: int, tls: bool) -> None:
        self.app, self._server = app, server
        self.host, self.port = host, port
        self.url = app.public_url or _url(host, port, tls)

    async def close(self) -> None:
        """Stop accepting and end the connections (running handlers are cancelled)."""
        await self._server.close(0)

    async def __aenter__(self) -> AsyncHostedServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class GeventHostedServer:
    """A hosted agent served on the gevent adapter, in the hub of the thread that started it:
    `url`, `host`, `port`, `app`, `close()` (blocking, from any thread) and
    `serve_forever()` (blocks that hub's thread until `close()`)."""

    def __init__(self, app: HostedApp, server: Any, host: str, port: int, tls: bool) -> None:
        self.app, self._server = app, server
        self.host, self.port = host, port
        self.url = app.public_url or _url(host, port, tls)

    def serve_forever(self) -> None:
        self._server.serve_forever()

    def close(self) -> None:
        self._server.close(0)


def _hosted_app(agent: Any, verifier: DispatchAuthVerifier | None, public_url: str | None,
                app: HostedApp | None) -> HostedApp:
    return app if app is not None else HostedApp(agent, verifier=verifier,
                                                 public_url=public_url)


async def _serve_async(app: HostedApp, adapter: str, host: str, port: int,
                       ssl_context: ssl.SSLContext | None) -> AsyncHostedServer:
    if adapter == "asyncio":
        from svantic_adapters.asyncio import MeshServer as AsyncioServer

        server_class: Any = AsyncioServer
    else:
        from svantic_adapters.anyio import MeshServer as AnyioServer

        server_class = AnyioServer

    async def http_app(request: HttpRequest, responder: Any) -> None:
        await answer_async(app, request, responder)

    server = server_class(ssl_context=ssl_context, verify_token=_refuse_agents,
                          lookup_instance=_no_instance, dispatch_auth=None, http_app=http_app)
    bound_host, bound_port = await server.start(host, port)
    return AsyncHostedServer(app, server, bound_host, bound_port, ssl_context is not None)


def _serve_gevent(app: HostedApp, host: str, port: int,
                  ssl_context: ssl.SSLContext | None) -> GeventHostedServer:
    from svantic_adapters.gevent import MeshServer as GeventServer

    server = GeventServer(ssl_context=ssl_context, verify_token=_refuse_agents,
                          lookup_instance=_no_instance, dispatch_auth=None,
                          http_app=lambda request, responder: answer_gevent(
                              app, request, responder))
    bound_host, bound_port = server.start(host, port)
    return GeventHostedServer(app, server, bound_host, bound_port, ssl_context is not None)


@overload
def serve(agent: Any, *, verifier: DispatchAuthVerifier | None, host: str = ...,
          port: int = ..., ssl_context: ssl.SSLContext | None = ...,
          adapter: Literal["gevent"], public_url: str | None = ...,
          app: HostedApp | None = ...) -> GeventHostedServer: ...


@overload
def serve(agent: Any, *, verifier: DispatchAuthVerifier | None, host: str = ...,
          port: int = ..., ssl_context: ssl.SSLContext | None = ...,
          adapter: Literal["asyncio", "anyio"] = ..., public_url: str | None = ...,
          app: HostedApp | None = ...) -> Coroutine[Any, Any, AsyncHostedServer]: ...


def serve(agent: Any, *, verifier: DispatchAuthVerifier | None, host: str = "127.0.0.1",
          port: int = 0, ssl_context: ssl.SSLContext | None = None,
          adapter: Literal["asyncio", "anyio", "gevent"] = "asyncio",
          public_url: str | None = None, app: HostedApp | None = None,
          ) -> GeventHostedServer | Coroutine[Any, Any, AsyncHostedServer]:
    """Serve `agent` in hosted mode on `host:port` (0: a free port) on an adapter's own
    server; `await` it on asyncio / anyio (asyncio or trio), call it in a greenlet of the
    serving thread's hub on gevent. Returns once it listens.

    `ssl_context` is the server side's TLS (the mesh calls `https://` only); None serves
    plain HTTP, for a TLS-terminating proxy in front. `public_url` is what the card names and
    the mesh is told (default: the address served). `app`: a `HostedApp` of your own
    (other bounds, a `tool_caller`) instead of one made from `agent` and `verifier`."""
    hosted = _hosted_app(agent, verifier, public_url, app)
    if adapter == "gevent":
        return _serve_gevent(hosted, host, port, ssl_context)
    if adapter not in ("asyncio", "anyio"):
        raise ValueError(f"adapter must be asyncio, anyio or gevent, not {adapter!r}")
    return _serve_async(hosted, adapter, host, port, ssl_context)


def asgi_app(agent: Any, *, verifier: DispatchAuthVerifier | None,
             public_url: str | None = None, app: HostedApp | None = None) -> Any:
    """An ASGI 3 application serving `agent` in hosted mode (asyncio servers: uvicorn,
    hypercorn's asyncio worker), to run alone or mount (Starlette `Mount("/", app)`): the
    card and `/send` are looked up below the mount point. The server does the TLS.

    It is `svantic_adapters.asgi.AsgiMesh` with this module's `http_app`, so request bodies
    are bounded (1 MiB) and disconnects are seen as on the adapters' own servers; its agents'
    WebSocket path refuses every upgrade (401), since no agent connects to a hosted one."""
    from svantic_adapters.asgi import AsgiMesh

    hosted = _hosted_app(agent, verifier, public_url, app)

    async def http_app(request: HttpRequest, responder: Any) -> None:
        await answer_async(hosted, request, responder)

    mesh = AsgiMesh(verify_token=_refuse_agents, lookup_instance=_no_instance,
                    dispatch_auth=None, http_app=http_app)
    mesh.hosted_app = hosted  # type: ignore[attr-defined]
    return mesh

