"""The reference mesh on an adapter: the control plane, the fleet and the agents' sockets on
one port, with the I/O the pure parts ask for (dispatches, hosted calls, card probes, event
streams, tool calls, timers).

`MeshParts` wires the pure pieces (registry, router, fleet, control plane, events, metrics,
tokens, dispatch auth) and answers the adapter's callbacks (`verify_token`,
`lookup_instance`, `on_event`, dispatch-auth minting). `AsyncMesh` runs them on the asyncio
or anyio adapter (asyncio or trio), `GeventMesh` on the gevent adapter; the two differ only
in how they wait. Outbound HTTPS (hosted `POST {url}/send`, the card probe) goes through
httpx, whose one API covers asyncio, trio and blocking code.

Decided (see docs/protocol-decisions.md): the transport JWTs and the dispatch-auth envelopes
are signed with two different secrets, since agents hold the dispatch-auth one to verify
their envelopes and must not be able to mint transport tokens; a deregistered instance's
socket is closed `1001` "instance deregistered" (its reconnect then gets 404).
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, cast

import msgspec

from svantic_proto import Config, InstanceRecord
from svantic_proto.auth import DispatchAuthMinter
from svantic_proto.errors import DispatchError, LocalProtocolError, SvanticError
from svantic_proto.events import (
    ConnectionClosed,
    HeartbeatReceived,
    SessionStarted,
    ToolCallReceived,
)
from svantic_proto.frames import SessionContext, SharedSecretAuth, SvanticJwtAuth
from svantic_proto.http import HttpRequest
from svantic_proto.ids import IdFactory
from svantic_proto.mesh import DispatchRoute

from .control import (
    ControlPlane,
    Dispatch,
    ProbeCard,
    Response,
    Subscribe,
    error_response,
    sse_chunk,
    sse_result,
)
from .events import KEEPALIVE, EventBus, Subscription, TooManySubscribers
from .fleet import Fleet, ToolRoute, transport_of
from .metrics import MeshMetrics
from .model import RouteError
from .registry import Registry
from .routing import Router, RouterConfig
from .tokens import TokenIssuer

__all__ = ["AsyncMesh", "GeventMesh", "MeshParts", "MeshSettings", "socket_outcome"]

log = logging.getLogger("svantic.mesh")
dispatch_log = logging.getLogger("svantic.mesh.dispatch")

_SSE_HEADERS = (("content-type", "text/event-stream"), ("cache-control", "no-store"),
                ("x-accel-buffering", "no"))
_MAX_ANSWER_BYTES = 4 << 20
"""A hosted agent's answer (or card) read at most this far: the mesh's memory is bounded."""
_MAX_CARD_BYTES = 256 << 10


@dataclass(slots=True)
class MeshSettings:
    """What one mesh process is configured with (see `svantic mesh --help`)."""

    public_url: str
    token_secret: bytes
    """Signs the transport JWTs `/auth/token` issues (spec 1); never leaves the mesh."""
    signing_secret: bytes
    """`SIGNING_SECRET` of spec 7: signs dispatch-auth envelopes; agents hold it to verify."""
    dispatch_auth_enabled: bool = True
    token_ttl: float = 3600.0
    config: Config | None = None
    router: RouterConfig | None = None
    max_tool_depth: int = 8
    max_body_bytes: int = 1 << 20
    default_deadline_ms: int = 30_000
    hosted_verify: ssl.SSLContext | bool = True
    """How hosted agents' certificates are checked (True: the system's trust store)."""
    probe_timeout: float = 5.0
    keepalive_interval: float = 15.0
    """A comment line on an idle event stream this often, so proxies keep it open."""
    extra: dict[str, Any] = field(default_factory=dict)


class _Fleet(Fleet):
    """The fleet, plus what only the serving code can see: routing time, which instances
    were deregistered (their sockets must close), and, when the mesh runs as several
    processes, the cluster to tell of every change made here (`observer`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gone: list[str] = []
        self.observer: Any = None
        """The process's `MeshCluster` (scale-out), told what happened here."""
        self.neutral: set[int] = set()
        """Leases refused by the shared capacity: given back `neutral` (not the agent's
        fault), whatever the code the caller gets."""

    def _told(self) -> Any:
        observer = self.observer
        return None if observer is None or observer.mirroring else observer

    def registered(self, row: Any, **kwargs: Any) -> None:
        super().registered(row, **kwargs)
        if (observer := self._told()) is not None:
            observer.registered(row.instance_id)

    def agent_connected(self, instance_id: str, *, capabilities: Any, now: float, wall: float,
                        remote: bool = False) -> bool:
        connected = super().agent_connected(instance_id, capabilities=capabilities, now=now,
                                            wall=wall, remote=remote)
        if connected and not remote and (observer := self._told()) is not None:
            state = self.router.get(instance_id)
            observer.connected(instance_id, list(state.capabilities) if state else [])
        return connected

    def agent_disconnected(self, instance_id: str, now: float, wall: float) -> None:
        observer = self._told()
        if observer is not None and observer.owns_socket_elsewhere(instance_id):
            # A socket replaced by the agent's newer one on another process: the instance
            # is connected there, only this process's gauge changes.
            if instance_id in self._sockets:
                self._sockets.discard(instance_id)
                if self.metrics is not None:
                    self.metrics.websocket_closed()
            return
        super().agent_disconnected(instance_id, now, wall)
        if observer is not None:
            observer.disconnected(instance_id)

    def heartbeat(self, instance_id: str, *, status: str | None, active_sessions: int,
                  max_concurrent_sessions: int | None, load: float | None, now: float,
                  wall: float) -> str:
        routing = super().heartbeat(
            instance_id, status=status, active_sessions=active_sessions,
            max_concurrent_sessions=max_concurrent_sessions, load=load, now=now, wall=wall)
        if (observer := self._told()) is not None:
            observer.heartbeat(instance_id, {"st": status, "as": active_sessions,
                                             "mx": max_concurrent_sessions, "ld": load})
        return routing

    def finished(self, lease: Any, *, code: str | None, message: str | None, transport: str,
                 seconds: float, now: float, wall: float, health: str | None = None) -> None:
        if self.neutral and lease.lease_id in self.neutral:
            self.neutral.discard(lease.lease_id)
            health = "neutral"
        super().finished(lease, code=code, message=message, transport=transport,
                         seconds=seconds, now=now, wall=wall, health=health)

    def acquire(self, tenant_id: str, capability: str, *, agent_type: str | None = None,
                instance_id: str | None = None, now: float, wall: float | None = None) -> Any:
        started = time.perf_counter()
        try:
            return super().acquire(tenant_id, capability, agent_type=agent_type,
                                   instance_id=instance_id, now=now, wall=wall)
        finally:
            if self.metrics is not None:
                self.metrics.routing_decision(time.perf_counter() - started)

    def deregister(self, instance_id: str, *, reason: str, now: float, wall: float) -> bool:
        removed = super().deregister(instance_id, reason=reason, now=now, wall=wall)
        if removed:
            self.gone.append(instance_id)
            if (observer := self._told()) is not None:
                observer.deregistered(instance_id, reason)
        return removed


@dataclass(slots=True)
class Outcome:
    """How one dispatch ended, whatever carried it."""

    dispatch_id: str
    result: Any = None
    code: str | None = None
    message: str | None = None


class MeshParts:
    """The pure parts of one mesh, wired, and the adapter callbacks that read them."""

    def __init__(self, registry: Registry, settings: MeshSettings, *,
                 events: EventBus | None = None) -> None:
        self.registry = registry
        self.settings = settings
        self.events = events if events is not None else EventBus()
        self.cluster: Any = None
        """The process's `MeshCluster` when the mesh runs as several processes."""
        self.metrics = MeshMetrics()
        self.router = Router(settings.router)
        self.fleet = _Fleet(registry=registry, router=self.router, events=self.events,
                            metrics=self.metrics, max_tool_depth=settings.max_tool_depth)
        self.tokens = TokenIssuer(settings.token_secret, ttl=settings.token_ttl)
        self.ids = IdFactory(time.time)
        dashboard = resources.files(__package__).joinpath("dashboard.html").read_bytes()
        self.control = ControlPlane(
            registry=registry, fleet=self.fleet, tokens=self.tokens, events=self.events,
            metrics=self.metrics, public_url=settings.public_url,
            dispatch_auth_enabled=settings.dispatch_auth_enabled,
            max_body_bytes=settings.max_body_bytes,
            default_deadline_ms=settings.default_deadline_ms, new_id=self.ids.new_id,
            dashboard_html=dashboard)
        self._minter = DispatchAuthMinter(settings.signing_secret)
        loaded = self.fleet.load(time.monotonic())
        log.info("registry loaded: %d instances", loaded)

    # -- the adapter's callbacks ----------------------------------------------------------------

    def verify_token(self, token: str) -> dict[str, Any]:
        """Transport JWT claims (spec 1), for the upgrade checks."""
        return self.tokens.verify(token, time.time())

    def lookup_instance(self, instance_id: str) -> InstanceRecord | None:
        row = self.registry.get_instance(instance_id)
        if row is None:
            return None
        return InstanceRecord(instance_id=row.instance_id, tenant_id=row.tenant_id,
                              deployment_mode=row.deployment_mode, agent_type=row.agent_type)

    def mint(self, route: DispatchRoute) -> Any:
        """The spec 7 envelope for one dispatch, by what the instance registered; raising
        fails the dispatch `AGENT_UNHEALTHY` and sends nothing (fail closed).

        The type comes from the fleet's memory (kept with every registry write it makes),
        not the registry: this runs for every dispatch. A shared secret is read from the
        registry when one is minted, and decrypted there: it is never kept in the clear."""
        mode = self.fleet.dispatch_auth_type(route.instance_id)
        if mode is None:
            raise LookupError(f"instance {route.instance_id} is not registered")
        return self._envelope(route, mode)

    def _envelope(self, route: DispatchRoute, mode: str) -> Any:
        if mode == "shared_secret":
            secret = self.registry.instance_secret(route.instance_id)
            if not secret:
                raise LookupError(f"no shared secret stored for {route.instance_id}")
            return SharedSecretAuth(secret=secret)
        return SvanticJwtAuth(token=self._minter.mint_token(
            instance_id=route.instance_id, agent_type=route.agent_type,
            tenant_id=route.tenant_id, dispatch_id=route.dispatch_id,
            capability=route.capability, now=route.now))

    def dispatch_auth(self) -> Callable[[DispatchRoute], Any] | None:
        return self.mint if self.settings.dispatch_auth_enabled else None

    # -- agent events ---------------------------------------------------------------------------

    def agent_event(self, handle: Any, event: Any, agents: Mapping[str, Any]) -> bool:
        """Keep the fleet in step with one core event; True for a tool call (the caller
        routes it, which needs waiting)."""
        kind = type(event)
        if kind is HeartbeatReceived:
            instance_id = handle.instance_id
            if instance_id is not None:
                try:
                    self.fleet.heartbeat(
                        instance_id, status=event.status, active_sessions=event.active_sessions,
                        max_concurrent_sessions=event.max_concurrent_sessions, load=event.load,
                        now=time.monotonic(), wall=time.time())
                except (RouteError, KeyError, ValueError) as exc:
                    log.info("heartbeat from %s ignored: %s", instance_id, exc)
        elif kind is SessionStarted:
            self.fleet.agent_connected(event.instance_id, capabilities=event.capabilities,
                                       now=time.monotonic(), wall=time.time())
        elif kind is ConnectionClosed:
            instance_id = handle.instance_id
            if instance_id is not None and instance_id not in agents:  # not replaced
                self.fleet.agent_disconnected(instance_id, time.monotonic(), time.time())
        elif kind is ToolCallReceived:
            return True
        return False

    # -- payloads -------------------------------------------------------------------------------

    def session_context(self, context: Mapping[str, Any] | None) -> SessionContext | None:
        if not context:
            return None
        return SessionContext(session_id=context.get("session_id"),
                              tenant_id=context.get("tenant_id"),
                              propagation_headers=context.get("propagation_headers"))

    def hosted_body(self, dispatch: Dispatch, dispatch_id: str) -> bytes:
        """The spec 3 dispatch payload, byte for byte what the socket would carry (spec 8)."""
        lease = dispatch.lease
        body: dict[str, Any] = {
            "dispatch_id": dispatch_id, "capability": dispatch.capability,
            "arguments": dispatch.arguments, "deadline_ms": dispatch.deadline_ms,
            "attempt": 1,
        }
        if dispatch.session_context:
            body["session_context"] = dispatch.session_context
        if self.settings.dispatch_auth_enabled:
            # A hosted dispatch is an HTTPS request anyway: its envelope goes by the record
            # itself, so one gone from under the fleet fails closed here too.
            row = self.registry.get_instance(lease.instance_id)
            if row is None:
                raise LookupError(f"instance {lease.instance_id} is not registered")
            envelope = self._envelope(DispatchRoute(
                instance_id=lease.instance_id, agent_type=lease.agent_type,
                tenant_id=lease.tenant_id, dispatch_id=dispatch_id,
                capability=dispatch.capability, now=time.time()), row.dispatch_auth_type)
            body["dispatch_auth"] = msgspec.to_builtins(envelope)
        return msgspec.json.encode(body)

    def tool_dispatch(self, route: ToolRoute, event: ToolCallReceived) -> Dispatch:
        lease = route.lease
        url = None
        if lease.deployment_mode == "hosted":
            row = self.registry.get_instance(lease.instance_id)
            url = row.url if row is not None else None
        return Dispatch(
            lease=lease, capability=event.tool, arguments=dict(event.arguments),
            deadline_ms=route.deadline_ms,
            session_context={"session_id": route.chain_id, "tenant_id": lease.tenant_id},
            stream=False, transport=transport_of(lease.deployment_mode),  # type: ignore[arg-type]
            url=url, started=time.monotonic())

    def finish_http(self, dispatch: Dispatch, outcome: Outcome) -> Response:
        seconds = time.monotonic() - dispatch.started
        self.log_outcome(dispatch, outcome, seconds, "http")
        return self.control.dispatch_finished(
            dispatch, dispatch_id=outcome.dispatch_id, result=outcome.result,
            code=outcome.code, message=outcome.message,
            seconds=seconds, now=time.monotonic(), wall=time.time())

    @staticmethod
    def log_outcome(dispatch: Dispatch, outcome: Outcome, seconds: float, via: str) -> None:
        """One INFO line per dispatch outcome, what `svantic mesh` users watch (formatted
        lazily, by the handlers that write it; nothing at all with INFO off)."""
        if not dispatch_log.isEnabledFor(logging.INFO):
            return
        lease = dispatch.lease
        dispatch_log.info(
            "dispatch %s %s -> %s (%s, %s): %s in %.1f ms", outcome.dispatch_id,
            dispatch.capability, lease.instance_id, dispatch.transport, via,
            "ok" if outcome.code is None else outcome.code, seconds * 1000)

    def end_tool_call(self, route: ToolRoute, dispatch: Dispatch, outcome: Outcome) -> None:
        seconds = time.monotonic() - dispatch.started
        self.log_outcome(dispatch, outcome, seconds, "tool call")
        self.fleet.end_tool_call(route, code=outcome.code, message=outcome.message,
                                 seconds=seconds, now=time.monotonic(), wall=time.time())

    def probe_finished(self, probe: ProbeCard, card: Any, error: str | None) -> Response:
        return self.control.probe_finished(probe, card=card, error=error,
                                           now=time.monotonic(), wall=time.time())


# -- what hosted agents answer ------------------------------------------------------------------


class SseReader:
    """Server-Sent Events from a hosted agent's `/send` (spec 8), fed in pieces, bounded:
    a line longer than the answer bound ends the answer as malformed."""

    __slots__ = ("_buffer", "_data", "_event")

    def __init__(self) -> None:
        self._buffer = b""
        self._event = ""
        self._data: list[str] = []

    def feed(self, data: bytes) -> list[tuple[str, str]]:
        self._buffer += data
        if len(self._buffer) > _MAX_ANSWER_BYTES:
            raise ValueError("an event longer than the answer bound")
        events: list[tuple[str, str]] = []
        while True:
            line, sep, rest = self._buffer.partition(b"\n")
            if not sep:
                return events
            self._buffer = rest
            text = line.rstrip(b"\r").decode("utf-8", "replace")
            if not text:
                if self._data:
                    events.append((self._event or "message", "\n".join(self._data)))
                self._event, self._data = "", []
            elif text.startswith(":"):
                continue
            else:
                name, _, value = text.partition(":")
                value = value.removeprefix(" ")
                if name == "event":
                    self._event = value
                elif name == "data":
                    self._data.append(value)


class HostedAnswer:
    """A hosted agent's answer to `POST {url}/send`, fed as it arrives: SSE events are
    passed on as they come (chunks) or end it (result, error); a whole JSON body is read up
    to `_MAX_ANSWER_BYTES`. The same on every driver, whatever reads the bytes."""

    __slots__ = ("_body", "_dispatch_id", "_on_chunk", "_reader", "_status")

    def __init__(self, dispatch_id: str, status: int, content_type: str,
                 on_chunk: Callable[[Any], object] | None) -> None:
        self._dispatch_id, self._status, self._on_chunk = dispatch_id, status, on_chunk
        streamed = status == 200 and content_type.startswith("text/event-stream")
        self._reader = SseReader() if streamed else None
        self._body = b""

    def feed(self, piece: bytes) -> Outcome | None:
        """The outcome once this piece decides it, else None."""
        if self._reader is not None:
            for name, data in self._reader.feed(piece):
                outcome = event_outcome(self._dispatch_id, name, data, self._on_chunk)
                if outcome is not None:
                    return outcome
            return None
        self._body += piece
        if len(self._body) > _MAX_ANSWER_BYTES:
            return Outcome(self._dispatch_id, code="DISPATCH_FAILED",
                           message="the hosted agent's answer is too large")
        return None

    def end(self) -> Outcome:
        if self._reader is not None:
            return Outcome(self._dispatch_id, code="DISPATCH_FAILED",
                           message="the hosted agent's stream ended without a result")
        return answer_outcome(self._dispatch_id, self._status, self._body)


class CardProbe:
    """A hosted agent's card (`GET {url}/.well-known/agent-card.json`), fed as it arrives,
    bounded in bytes: `(card, None)` or `(None, our own short reason)`."""

    __slots__ = ("_body", "failure")

    def __init__(self, status: int) -> None:
        self._body = b""
        self.failure = None if status == 200 else f"HTTP {status}"

    def feed(self, piece: bytes) -> bool:
        """False once the card is over its bound (stop reading)."""
        self._body += piece
        if len(self._body) > _MAX_CARD_BYTES:
            self.failure = "the card is too large"
            return False
        return True

    def result(self) -> tuple[Any, str | None]:
        if self.failure is not None:
            return None, self.failure
        try:
            return msgspec.json.decode(self._body), None
        except msgspec.DecodeError:
            return None, "the card is not JSON"


def answer_outcome(dispatch_id: str, status: int, body: bytes) -> Outcome:
    """A hosted agent's whole (non-streamed) answer: `200 {"result": any}` or an error body."""
    try:
        document = msgspec.json.decode(body) if body else None
    except msgspec.DecodeError:
        document = None
    if status == 200 and isinstance(document, dict) and "result" in document:
        return Outcome(dispatch_id, result=document["result"])
    code = "DISPATCH_FAILED"
    message: str | None = f"the hosted agent answered HTTP {status}"
    if isinstance(document, dict) and isinstance(document.get("error"), dict):
        error = document["error"]
        if isinstance(error.get("code"), str) and error["code"]:
            code = error["code"]
            message = error.get("message") if isinstance(error.get("message"), str) else None
    return Outcome(dispatch_id, code=code, message=message)


def event_outcome(dispatch_id: str, name: str, data: str,
                  on_chunk: Callable[[Any], object] | None) -> Outcome | None:
    """One SSE event of a hosted answer: a chunk (passed on), or the terminal outcome."""
    try:
        document = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return Outcome(dispatch_id, code="DISPATCH_FAILED",
                       message="the hosted agent streamed an event that is not JSON")
    if name == "chunk":
        if on_chunk is not None:
            on_chunk(document.get("data") if isinstance(document, dict) else document)
        return None
    if name == "result" and isinstance(document, dict):
        return Outcome(dispatch_id, result=document.get("result"))
    if name == "error":
        return answer_outcome(dispatch_id, 0, data.encode())
    return None


def _unreachable(dispatch: Dispatch, dispatch_id: str, exc: BaseException) -> Outcome:
    """A hosted dispatch that got no answer: past its deadline, or the agent unreachable."""
    if isinstance(exc, TimeoutError):
        return Outcome(dispatch_id, code="DEADLINE_EXCEEDED",
                       message="the hosted agent did not answer in time")
    reason = probe_reason(exc)
    log.info("hosted dispatch to %s failed: %s", dispatch.lease.instance_id, reason)
    return Outcome(dispatch_id, code="AGENT_DISCONNECTED",
                   message=f"the hosted agent could not be reached ({reason})")


def probe_reason(exc: BaseException) -> str:
    """Our own short words for a failed probe (never the peer's text)."""
    import httpx

    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        return "timed out"
    if isinstance(exc, httpx.ConnectError):
        return "could not connect"
    if isinstance(exc, ssl.SSLError) or "SSL" in type(exc).__name__:
        return "TLS failed"
    if isinstance(exc, httpx.HTTPError):
        return "HTTP failure"
    return "failed"


# -- serving: the steps every driver takes, and the waits that differ ---------------------------


@dataclass(frozen=True, slots=True)
class Perform:
    """Wait: carry a routed dispatch to its agent; the value sent back is its `Outcome`."""

    dispatch: Dispatch
    on_chunk: Callable[[Any], object] | None


@dataclass(frozen=True, slots=True)
class Probe:
    """Wait: fetch a hosted agent's card; the value sent back is `(card, reason)`."""

    card_url: str


@dataclass(frozen=True, slots=True)
class Stream:
    """Wait: stream a subscription's events to `responder` until either side ends."""

    subscription: Subscription
    responder: Any


Step = Perform | Probe | Stream


class _Serving:
    """What the asyncio/anyio and gevent servings share: every decision and every answer,
    written once as generators of the `Step`s to wait for. Each serving only waits (awaits,
    or blocks a greenlet) and sends the value back in."""

    def __init__(self, parts: MeshParts) -> None:
        self.parts = parts
        self.server: Any = None
        self._streams: set[Any] = set()  # the wake-ups of the open event streams
        self._closing = False

    def attach(self, server: Any) -> None:
        """Serve `server`'s agents' events (it was made with this serving's `http_app`)."""
        self.server = server
        server.on_event = self._on_event

    def end_streams(self) -> None:
        """End every event stream (at once, cleanly): a mesh shutting down calls this
        before it drains, or the streams would hold the drain until `close_timeout`."""
        self._closing = True
        for wake in list(self._streams):
            wake()

    def _http_steps(self, request: HttpRequest, responder: Any) -> Generator[Step, Any, None]:
        parts = self.parts
        effect = parts.control.handle(request, now=time.monotonic(), wall=time.time())
        if isinstance(effect, Response):
            responder.respond(effect.status, effect.headers, effect.body)
            _close_gone(parts, self.server)
        elif isinstance(effect, Dispatch):
            if not effect.stream:
                outcome = yield Perform(effect, None)
                answer = parts.finish_http(effect, outcome)
                responder.respond(answer.status, answer.headers, answer.body)
                return
            responder.start(200, _SSE_HEADERS)
            seq = [0]

            def on_chunk(data: Any) -> None:
                responder.send(sse_chunk(data, seq[0]))
                seq[0] += 1

            outcome = yield Perform(effect, on_chunk)
            parts.finish_http(effect, outcome)
            responder.send(sse_result(effect, dispatch_id=outcome.dispatch_id,
                                      result=outcome.result, code=outcome.code,
                                      message=outcome.message))
            responder.end()
        elif isinstance(effect, ProbeCard):
            card, error = yield Probe(effect.card_url)
            answer = parts.probe_finished(effect, card, error)
            responder.respond(answer.status, answer.headers, answer.body)
        elif isinstance(effect, Subscribe):
            yield from self._events_steps(effect, responder)

    def _events_steps(self, effect: Subscribe, responder: Any) -> Generator[Step, Any, None]:
        try:
            subscription = self.parts.events.subscribe(effect.tenant_id)
        except TooManySubscribers:
            answer = error_response(503, "TOO_MANY_SUBSCRIBERS",
                                    "too many event streams: try again later")
            responder.respond(answer.status, answer.headers, answer.body)
            return
        responder.start(200, _SSE_HEADERS)
        responder.send(KEEPALIVE)
        try:
            yield Stream(subscription, responder)
        finally:
            subscription.close()
            if not responder.closed:
                responder.end()

    def _stream_round(self, subscription: Subscription, responder: Any) -> bool:
        """Write what the subscription holds; False once the stream should end."""
        for event in subscription.drain():
            responder.send(event)
        return not (subscription.overflowed or responder.closed or self._closing)

    def _tool_steps(self, handle: Any, event: ToolCallReceived) -> Generator[Step, Any, None]:
        parts = self.parts
        try:
            route = parts.fleet.begin_tool_call(
                handle.instance_id, event.call_id, tool=event.tool,
                agent_type=event.agent_type, instance_id=event.instance_id,
                session_id=event.session_id, deadline_ms=event.deadline_ms,
                now=time.monotonic())
        except RouteError as exc:
            _answer_tool(handle, event.call_id, None, exc.code, exc.message)
            return
        dispatch = parts.tool_dispatch(route, event)
        outcome = yield Perform(dispatch, None)
        parts.end_tool_call(route, dispatch, outcome)
        _answer_tool(handle, event.call_id, outcome.result, outcome.code, outcome.message)

    def _on_event(self, handle: Any, event: Any) -> None:
        if self.parts.agent_event(handle, event, self.server.agents):
            self._spawn(self._tool_steps(handle, event))
        elif type(event) is not HeartbeatReceived:
            _close_gone(self.parts, self.server)

    def _spawn(self, steps: Generator[Step, Any, None]) -> None:
        raise NotImplementedError

    def _ticked(self, slept_from: float, delay: float) -> float:
        """After the ticker slept: the loop's lag, the fleet's timers; the next sleep."""
        fleet = self.parts.fleet
        self.parts.metrics.loop_lag(max(0.0, time.monotonic() - slept_from - delay))
        events: Any = self.parts.events
        if self.parts.cluster is not None:
            # Every process runs the same timers on its mirror of every instance: each tells
            # its own subscribers what they decide, and nobody else (no duplicates).
            with events.local_only():  # a ClusterBus
                fleet.tick(time.monotonic(), time.time())
        else:
            fleet.tick(time.monotonic(), time.time())
        _close_gone(self.parts, self.server)
        return self._next_sleep()

    def _next_sleep(self) -> float:
        deadline = self.parts.fleet.next_deadline()
        if deadline is None:
            return 1.0
        return min(1.0, max(0.0, deadline - time.monotonic()))

    def _sent(self, dispatch_id: str, result: Any, error: BaseException | None) -> Outcome:
        return socket_outcome(dispatch_id, result, error)

    def _body_or_failure(self, dispatch: Dispatch, dispatch_id: str) -> bytes | Outcome:
        try:
            return self.parts.hosted_body(dispatch, dispatch_id)
        except Exception:  # spec 7: no envelope, no request
            log.warning("dispatch auth could not be minted for %s", dispatch.lease.instance_id)
            return Outcome(dispatch_id, code="AGENT_UNHEALTHY",
                           message="dispatch auth could not be minted")


def socket_outcome(dispatch_id: str, result: Any, error: BaseException | None) -> Outcome:
    """A socket dispatch's end, as an `Outcome` (also for one carried for another
    mesh process)."""
    if error is None:
        return Outcome(dispatch_id, result=result)
    if isinstance(error, DispatchError):
        # The runtime's own refusal (no dispatch id: the socket went after routing) is
        # AGENT_DISCONNECTED; an agent's AGENT_UNAVAILABLE (busy) keeps its code.
        gone = error.code == "AGENT_UNAVAILABLE" and not error.dispatch_id
        return Outcome(dispatch_id, code="AGENT_DISCONNECTED" if gone else error.code,
                       message=error.message)
    return Outcome(dispatch_id, code="AGENT_UNAVAILABLE",  # it asked to close meanwhile
                   message="the agent is closing: try again")


def _hosted_headers(on_chunk: Callable[[Any], object] | None) -> dict[str, str]:
    accept = "text/event-stream" if on_chunk is not None else "application/json"
    return {"content-type": "application/json", "accept": accept}


class AsyncMesh(_Serving):
    """The mesh on `svantic_adapters.asyncio`, `.anyio` (asyncio or trio) or `.asgi`.

    Make the adapter's `MeshServer` with `http_app=mesh.http_app` and the callbacks of
    `parts`, `attach()` it, and run the mesh inside `async with mesh:` (its ticker)."""

    def __init__(self, parts: MeshParts) -> None:
        import anyio
        import httpx

        super().__init__(parts)
        self._anyio = anyio
        self._client = httpx.AsyncClient(verify=parts.settings.hosted_verify,
                                         follow_redirects=False, trust_env=False)
        self._group: Any = None

    async def __aenter__(self) -> AsyncMesh:
        self._group = self._anyio.create_task_group()
        await self._group.__aenter__()
        self._group.start_soon(self._ticker)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.end_streams()
        self._group.cancel_scope.cancel()
        await self._group.__aexit__(None, None, None)
        await self._client.aclose()

    async def http_app(self, request: HttpRequest, responder: Any) -> None:
        await self._run(self._http_steps(request, responder))

    def _spawn(self, steps: Generator[Step, Any, None]) -> None:
        if self._group is not None:
            self._group.start_soon(self._run, steps)

    async def _run(self, steps: Generator[Step, Any, None]) -> None:
        value: Any = None
        while True:
            try:
                step = steps.send(value)
            except StopIteration:
                return
            if type(step) is Perform:
                value = await self.perform(step.dispatch, step.on_chunk)
            elif type(step) is Probe:
                value = await self._probe(step.card_url)
            else:
                stream = cast(Stream, step)
                await self._stream(stream.subscription, stream.responder)
                value = None

    async def _ticker(self) -> None:
        """The fleet's one timer (missed heartbeats), and the event-loop lag it observes."""
        delay = self._next_sleep()
        while True:
            slept_from = time.monotonic()
            await self._anyio.sleep(delay)
            delay = self._ticked(slept_from, delay)

    async def perform(self, dispatch: Dispatch,
                      on_chunk: Callable[[Any], object] | None) -> Outcome:
        """Carry one routed dispatch to its agent, over its socket or by HTTPS; with a
        cluster, over the socket of whichever mesh process holds it."""
        dispatch_id = self.parts.ids.new_id()
        if dispatch.transport == "callback":
            return await self._post(dispatch, dispatch_id, on_chunk)
        cluster = self.parts.cluster
        if cluster is not None:
            outcome: Outcome = await cluster.perform(
                dispatch, dispatch_id, on_chunk,
                lambda: self._send_here(dispatch, dispatch_id, on_chunk))
            return outcome
        return await self._send_here(dispatch, dispatch_id, on_chunk)

    async def _send_here(self, dispatch: Dispatch, dispatch_id: str,
                         on_chunk: Callable[[Any], object] | None) -> Outcome:
        try:
            result = await self.server.dispatch(
                dispatch.lease.instance_id, dispatch.capability, dispatch.arguments,
                deadline_ms=dispatch.deadline_ms, on_chunk=on_chunk,
                session_context=self.parts.session_context(dispatch.session_context),
                dispatch_id=dispatch_id)
        except (DispatchError, LocalProtocolError) as exc:
            return self._sent(dispatch_id, None, exc)
        return self._sent(dispatch_id, result, None)

    async def _post(self, dispatch: Dispatch, dispatch_id: str,
                    on_chunk: Callable[[Any], object] | None) -> Outcome:
        body = self._body_or_failure(dispatch, dispatch_id)
        if isinstance(body, Outcome):
            return body
        try:
            with self._anyio.fail_after(dispatch.deadline_ms / 1000):
                async with self._client.stream("POST", f"{dispatch.url}/send", content=body,
                                               headers=_hosted_headers(on_chunk)) as answer:
                    reader = HostedAnswer(dispatch_id, answer.status_code,
                                          answer.headers.get("content-type", ""), on_chunk)
                    async for piece in answer.aiter_bytes():
                        if (outcome := reader.feed(piece)) is not None:
                            return outcome
                    return reader.end()
        except Exception as exc:
            return _unreachable(dispatch, dispatch_id, exc)

    async def _probe(self, card_url: str) -> tuple[Any, str | None]:
        try:
            with self._anyio.fail_after(self.parts.settings.probe_timeout):
                async with self._client.stream("GET", card_url) as answer:
                    probe = CardProbe(answer.status_code)
                    if probe.failure is None:
                        async for piece in answer.aiter_bytes():
                            if not probe.feed(piece):
                                break
        except Exception as exc:
            return None, probe_reason(exc)
        return probe.result()

    async def _stream(self, subscription: Subscription, responder: Any) -> None:
        anyio = self._anyio
        wake = [anyio.Event()]

        def notify() -> None:
            wake[0].set()

        subscription.notify = notify
        responder.on_close = notify  # a client gone frees its slot now, not at the keepalive
        self._streams.add(notify)
        try:
            while self._stream_round(subscription, responder):
                with anyio.move_on_after(self.parts.settings.keepalive_interval) as scope:
                    await wake[0].wait()
                wake[0] = anyio.Event()
                if scope.cancelled_caught:
                    responder.send(KEEPALIVE)
        finally:
            self._streams.discard(notify)


def _answer_tool(handle: Any, call_id: str, result: Any, code: str | None,
                 message: str | None) -> None:
    conn = handle.conn
    try:
        if code is None:
            conn.send_tool_result(call_id, result)
        else:
            conn.send_tool_result(call_id, error=(code, message or code))
    except SvanticError as exc:  # the caller's connection went away meanwhile
        log.info("tool result for %s not sent: %s", call_id, exc)
        return
    handle.link.pump.service()


def _close_gone(parts: MeshParts, server: Any) -> None:
    """Close the socket of every instance deregistered since the last look."""
    gone = parts.fleet.gone
    if not gone or server is None:
        return
    parts.fleet.gone = []
    agents = server.agents
    for instance_id in gone:
        handle = agents.get(instance_id)
        if handle is None:
            continue
        try:
            handle.conn.close(1001, "instance deregistered", now=server._now())
        except SvanticError:
            continue
        handle.link.pump.service()
        log.info("agent %s: socket closed, the instance was deregistered", instance_id)


class GeventMesh(_Serving):
    """The mesh on `svantic_adapters.gevent`: the same steps as `AsyncMesh`, blocking in
    greenlets (httpx's blocking client on gevent's patched sockets)."""

    def __init__(self, parts: MeshParts) -> None:
        import gevent
        import httpx

        super().__init__(parts)
        self._gevent = gevent
        self._client = httpx.Client(verify=parts.settings.hosted_verify,
                                    follow_redirects=False, trust_env=False)
        self._ticker_greenlet: Any = None

    def start(self) -> None:
        self._ticker_greenlet = self._gevent.spawn(self._ticker)

    def stop(self) -> None:
        self.end_streams()
        if self._ticker_greenlet is not None:
            self._ticker_greenlet.kill()
        self._client.close()

    def http_app(self, request: HttpRequest, responder: Any) -> None:
        self._run(self._http_steps(request, responder))

    def _spawn(self, steps: Generator[Step, Any, None]) -> None:
        self._gevent.spawn(self._run, steps)

    def _run(self, steps: Generator[Step, Any, None]) -> None:
        value: Any = None
        while True:
            try:
                step = steps.send(value)
            except StopIteration:
                return
            if type(step) is Perform:
                value = self.perform(step.dispatch, step.on_chunk)
            elif type(step) is Probe:
                value = self._probe(step.card_url)
            else:
                stream = cast(Stream, step)
                self._stream(stream.subscription, stream.responder)
                value = None

    def _ticker(self) -> None:
        delay = self._next_sleep()
        while True:
            slept_from = time.monotonic()
            self._gevent.sleep(delay)
            delay = self._ticked(slept_from, delay)

    def perform(self, dispatch: Dispatch, on_chunk: Callable[[Any], object] | None) -> Outcome:
        dispatch_id = self.parts.ids.new_id()
        if dispatch.transport == "callback":
            return self._post(dispatch, dispatch_id, on_chunk)
        cluster = self.parts.cluster
        if cluster is not None:
            outcome: Outcome = cluster.perform(
                dispatch, dispatch_id, on_chunk,
                lambda: self._send_here(dispatch, dispatch_id, on_chunk))
            return outcome
        return self._send_here(dispatch, dispatch_id, on_chunk)

    def _send_here(self, dispatch: Dispatch, dispatch_id: str,
                   on_chunk: Callable[[Any], object] | None) -> Outcome:
        try:
            result = self.server.dispatch(
                dispatch.lease.instance_id, dispatch.capability, dispatch.arguments,
                deadline_ms=dispatch.deadline_ms, on_chunk=on_chunk,
                session_context=self.parts.session_context(dispatch.session_context),
                dispatch_id=dispatch_id)
        except (DispatchError, LocalProtocolError) as exc:
            return self._sent(dispatch_id, None, exc)
        return self._sent(dispatch_id, result, None)

    def _post(self, dispatch: Dispatch, dispatch_id: str,
              on_chunk: Callable[[Any], object] | None) -> Outcome:
        body = self._body_or_failure(dispatch, dispatch_id)
        if isinstance(body, Outcome):
            return body
        try:
            with self._gevent.Timeout(dispatch.deadline_ms / 1000, TimeoutError), \
                    self._client.stream("POST", f"{dispatch.url}/send", content=body,
                                        headers=_hosted_headers(on_chunk)) as answer:
                reader = HostedAnswer(dispatch_id, answer.status_code,
                                      answer.headers.get("content-type", ""), on_chunk)
                for piece in answer.iter_bytes():
                    if (outcome := reader.feed(piece)) is not None:
                        return outcome
                return reader.end()
        except Exception as exc:
            return _unreachable(dispatch, dispatch_id, exc)

    def _probe(self, card_url: str) -> tuple[Any, str | None]:
        try:
            with self._gevent.Timeout(self.parts.settings.probe_timeout, TimeoutError), \
                    self._client.stream("GET", card_url) as answer:
                probe = CardProbe(answer.status_code)
                if probe.failure is None:
                    for piece in answer.iter_bytes():
                        if not probe.feed(piece):
                            break
        except Exception as exc:
            return None, probe_reason(exc)
        return probe.result()

    def _stream(self, subscription: Subscription, responder: Any) -> None:
        import gevent.event

        wake = gevent.event.Event()
        subscription.notify = wake.set
        responder.on_close = wake.set  # a client gone frees its slot now, not at the keepalive
        self._streams.add(wake.set)
        try:
            while self._stream_round(subscription, responder):
                woke = wake.wait(self.parts.settings.keepalive_interval)
                wake.clear()
                if not woke:
                    responder.send(KEEPALIVE)
        finally:
            self._streams.discard(wake.set)
