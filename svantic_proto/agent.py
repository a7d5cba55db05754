"""The agent (client) end of a svantic.v1 connection, and the session that outlives it.

`AgentConnection` is one WebSocket: handshake, hello/welcome, dispatches in,
results out, heartbeats, liveness. `AgentSession` survives reconnects (spec
section 5): it holds the resume token, the outbox of frames produced while the
socket was down, the cache of finished dispatches (so a re-delivered dispatch
is answered from the cache and no handler ever runs twice), and the backoff.
"""

from __future__ import annotations

import base64
import heapq
import random
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import msgspec

from .auth import DispatchAuthError, DispatchAuthVerifier
from .backoff import Backoff, RetryDecision, classify_close, classify_handshake_status
from .codec import FrameFactory, encode_frame
from .config import Config
from .connection import _Connection
from .errors import LocalProtocolError, RemoteError, RemoteProtocolError
from .events import (
    CloseRequested,
    DispatchCancelled,
    DispatchReceived,
    SessionStarted,
    ToolResultReceived,
)
from .frames import (
    Cancel,
    CloseRequest,
    CloseRequestPayload,
    Dispatch,
    DispatchAck,
    DispatchAckPayload,
    DispatchChunk,
    DispatchChunkPayload,
    DispatchResult,
    DispatchResultPayload,
    Error,
    ErrorPayload,
    Frame,
    Heartbeat,
    HeartbeatPayload,
    Hello,
    HelloPayload,
    Ping,
    PingPayload,
    Pong,
    PongPayload,
    Sdk,
    TokenRefresh,
    TokenRefreshPayload,
    ToolCall,
    ToolCallPayload,
    ToolError,
    ToolResult,
    Welcome,
)
from .handshake import ClientHandshake, HandshakeFailed, HandshakeRejected, build_upgrade_request
from .states import AGENT_TRANSITIONS, AgentState

__all__ = ["AgentConnection", "AgentSession"]

SDK = Sdk(name="svantic-proto", version="0.1.0")
_TERMINAL = (DispatchResult, Error)
_BEFORE_WELCOME = (Welcome, Ping, Error)  # what may arrive while the hello is unanswered
# States tested per frame, read once: an enum member read through its class costs ~0.1 µs.
_HELLO_SENT = AgentState.HELLO_SENT
_DRAINING = AgentState.DRAINING
_SENDING = (AgentState.READY, AgentState.DRAINING)


@dataclass(slots=True)
class _Running:
    deadline_at: float
    next_seq: int = 0
    cancel_reason: str | None = None
    """Set when DispatchCancelled was reported: the mesh's `cancel` and our own deadline
    report once, and `send_cancelled()` answers with the matching code."""


class AgentSession:
    """State that outlives one connection (spec section 5); pass it to each new
    `AgentConnection` of the same agent instance.

    The outbox is bounded (`Config.outbox_limit`): when full, the oldest chunk
    is dropped first; a terminal frame is only dropped when nothing else is
    left, and even then it is not lost, because the finished cache answers the
    dispatch again when the mesh re-delivers it.
    """

    def __init__(self, config: Config | None = None, *, rand: Callable[[], float] | None = None):
        self.config = config if config is not None else Config()
        self.resume_token: str | None = None
        self.running: dict[str, _Running] = {}
        self.finished: OrderedDict[str, Frame] = OrderedDict()
        self.outbox: deque[Frame] = deque()
        self.backoff = Backoff(
            rand if rand is not None else random.random,
            base=self.config.reconnect_base_delay,
            cap=self.config.reconnect_max_delay,
        )
        self.token_refreshed = False
        """Set by whoever fetched a fresh token for the next attempt (spec 5: refresh once)."""
        self.dropped_from_outbox = 0
        self.connections = 0

    def next_delay(self) -> float:
        """Seconds to wait before the next reconnect attempt (spec 5 backoff)."""
        return self.backoff.next_delay()

    def _finish(self, dispatch_id: str, terminal: Frame) -> None:
        self.running.pop(dispatch_id, None)
        self.finished[dispatch_id] = terminal
        while len(self.finished) > self.config.finished_cache_size:
            self.finished.popitem(last=False)

    def _queue(self, frame: Frame) -> None:
        outbox = self.outbox
        if len(outbox) >= self.config.outbox_limit:
            victim = next((f for f in outbox if isinstance(f, DispatchChunk)), outbox[0])
            outbox.remove(victim)
            self.dropped_from_outbox += 1
        outbox.append(frame)


class AgentConnection(_Connection):
    """One agent WebSocket to the mesh, sans-IO (spec sections 1-5).

    Construct it, write `data_to_send()` (the upgrade request) to a fresh TLS
    connection, and feed what you read to `receive_data()`. Events tell you when
    the session is ready and what to run; `send_result()` and friends answer.
    """

    _table: Any = AGENT_TRANSITIONS  # typed as in the base class, which compiled classes require
    _client = True

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
    ) -> None:
        config = config if config is not None else (session.config if session else None)
        super().__init__(
            config, now=now, wall_clock=wall_clock, random_bytes=random_bytes, frames=frames
        )
        self.state = AgentState.CONNECTING
        self.session = session if session is not None else AgentSession(self.config)
        self.session.connections += 1
        # Dispatches still running from an earlier connection keep their deadlines here:
        # the handler is told to stop when one passes, whether or not the mesh resumed.
        for dispatch_id, running in self.session.running.items():
            heapq.heappush(self._deadlines, (running.deadline_at, dispatch_id))
        self.instance_id = instance_id
        self.agent_type = agent_type
        self.capabilities = tuple(capabilities)
        self._verifier = dispatch_auth
        upgrade = build_upgrade_request(
            url,
            token=token,
            instance_id=instance_id,
            allow_insecure_loopback=allow_insecure_loopback,
            # From the injected source too, so a seeded connection sends the same bytes.
            key=None if random_bytes is None else base64.b64encode(random_bytes(16)),
        )
        self._handshake: ClientHandshake | None = ClientHandshake(upgrade)
        self._out.append(upgrade.request_bytes)
        self._timers["welcome"] = now + self.config.hello_timeout
        self._hello_id: str | None = None
        self._sent_terminal: set[str] = set()  # dispatch ids answered on this connection
        self._tool_calls: dict[str, int | None] = {}  # call id -> deadline_ms
        self._heartbeat_interval = self.config.heartbeat_interval
        self._status: str | None = "available"
        self._heartbeat_extra: dict[str, Any] = {}
        self._last_error_code: str | None = None
        self._we_closed = False
        self.connection_id: str | None = None
        self.peer_max_message_bytes: int | None = None

    # -- receiving -------------------------------------------------------------------------------

    def _feed(self, data: bytes, now: float) -> None:
        if self._handshake is None:
            self._feed_framing(data, now)
            return
        try:
            accepted = self._handshake.receive_data(data)
        except (HandshakeRejected, HandshakeFailed) as exc:
            self._handshake_failed(exc, now)
            return
        if accepted is None:
            return
        self._handshake = None
        self._move("upgrade_accepted")
        self._start_framing(b"", now)
        hello = self.frames.new(
            Hello,
            HelloPayload(
                instance_id=self.instance_id,
                agent_type=self.agent_type,
                resume_token=self.session.resume_token,
                sdk=SDK,
                capabilities=list(self.capabilities) or None,
            ),
        )
        self._hello_id = hello.id
        self._send(hello)
        if accepted.extra:
            self._feed_framing(accepted.extra, now)

    def receive_eof(self, now: float) -> None:
        if self._handshake is not None and not self._transport_closed:
            try:
                self._handshake.receive_data(None)
            except (HandshakeRejected, HandshakeFailed) as exc:
                self._handshake_failed(exc, now)
                return
        super().receive_eof(now)

    def _handshake_failed(self, exc: RemoteError, now: float) -> None:
        self._handshake = None
        self._close_error = exc
        self._move("upgrade_rejected")
        self._finish(None, str(exc), by_peer=True, now=now)
        self._drop_transport()

    def _retry_after_close(self, code: int | None, by_peer: bool) -> RetryDecision:
        error = self._close_error
        if isinstance(error, HandshakeRejected):
            return classify_handshake_status(
                error.status, token_already_refreshed=self.session.token_refreshed
            )
        return classify_close(
            code, requested_by_us=self._we_closed, error_code=self._last_error_code
        )

    def _on_frame(self, frame: Frame, now: float) -> None:
        kind = type(frame)
        if self.state is _HELLO_SENT and kind not in _BEFORE_WELCOME:
            self._protocol_violation(f"{frame.type} before welcome", frame.id, now)
            return
        handler = _HANDLERS.get(kind)
        if handler is None:  # hello, heartbeat, results...: frames an agent never receives
            self._protocol_violation(f"an agent does not accept {frame.type}", frame.id, now)
        else:
            handler(self, frame, now)

    def _on_ping(self, frame: Ping, now: float) -> None:
        self._send(self.frames.new(Pong, PongPayload(), in_reply_to=frame.id))

    def _on_pong(self, frame: Pong, now: float) -> None:
        pass

    def _on_cancel(self, frame: Cancel, now: float) -> None:
        running = self.session.running.get(frame.payload.dispatch_id)
        if running is not None and running.cancel_reason is None:
            running.cancel_reason = frame.payload.reason
            self._events.append(DispatchCancelled(frame.payload.dispatch_id, frame.payload.reason))

    def _on_tool_result(self, frame: ToolResult, now: float) -> None:
        if frame.in_reply_to not in self._tool_calls:
            return  # late, or never ours: nothing waits for it
        del self._tool_calls[frame.in_reply_to]
        payload = frame.payload
        if isinstance(payload.error, ToolError):
            error = {"code": payload.error.code, "message": payload.error.message}
            self._events.append(ToolResultReceived(frame.in_reply_to, error=error))
        else:
            self._events.append(ToolResultReceived(frame.in_reply_to, result=payload.result))

    def _on_close_request(self, frame: CloseRequest, now: float) -> None:
        payload = frame.payload
        self._events.append(CloseRequested(payload.grace_seconds, payload.reason))

    def _protocol_violation(self, message: str, frame_id: str | None, now: float) -> None:
        self.stats.bad_frames += 1
        self._send_error("BAD_FRAME", message, in_reply_to=frame_id)
        self._close_error = RemoteProtocolError(message, close_code=1002)
        self._fail(1002, message, now)

    def _on_welcome(self, frame: Welcome, now: float) -> None:
        if self.state is not AgentState.HELLO_SENT:
            self._protocol_violation("welcome after the session started", frame.id, now)
            return
        if frame.in_reply_to is not None and frame.in_reply_to != self._hello_id:
            self._protocol_violation("welcome answers another hello", frame.id, now)
            return
        payload = frame.payload
        self._move("welcome")
        self.connection_id = payload.connection_id
        self.peer_max_message_bytes = payload.max_message_bytes
        session = self.session
        session.resume_token = payload.resume_token
        session.backoff.reset()
        session.token_refreshed = False
        self._heartbeat_interval = payload.heartbeat_interval_ms / 1000
        self._timers.pop("welcome", None)
        while session.outbox:
            queued = session.outbox.popleft()
            self._send(queued)
            if isinstance(queued, _TERMINAL):
                self._mark_answered(queued.in_reply_to)  # type: ignore[arg-type]
        self._events.append(
            SessionStarted(
                instance_id=self.instance_id,
                connection_id=payload.connection_id,
                resumed=payload.resumed,
                replayed_dispatches=tuple(payload.replayed_dispatches),
                heartbeat_interval=self._heartbeat_interval,
                agent_type=self.agent_type,
                capabilities=self.capabilities,
            )
        )
        self._send_heartbeat(now)

    def _on_dispatch(self, frame: Dispatch, now: float) -> None:
        session = self.session
        dispatch_id = frame.id
        if dispatch_id in session.finished:
            session_stored = session.finished[dispatch_id]
            self.stats.redelivered_dispatches += 1
            if dispatch_id not in self._sent_terminal:  # at most one terminal per connection
                self._send(session_stored)
                self._mark_answered(dispatch_id)
            return
        if dispatch_id in session.running:
            self.stats.redelivered_dispatches += 1  # still running: it answers when done
            return
        payload = frame.payload
        auth = payload.dispatch_auth
        verifier = self._verifier
        try:
            if auth is not None or verifier.enabled:  # else auth is off on both sides (spec 7)
                verifier.verify(
                    auth, dispatch_id=dispatch_id, capability=payload.capability,
                    now=self._wall_clock(),
                )
        except DispatchAuthError as exc:
            self._terminal(
                dispatch_id,
                self.frames.new(
                    Error,
                    ErrorPayload(
                        code="DISPATCH_AUTH_FAILED",
                        message=str(exc),
                        detail={"reason": str(exc.reason)},
                    ),
                    in_reply_to=dispatch_id,
                ),
            )
            return
        if len(session.running) >= self.config.max_in_flight:
            self.stats.rate_limited += 1
            retry_ms = round(self.config.rate_limit_retry_after * 1000)
            self._terminal(
                dispatch_id,
                self.frames.new(
                    Error,
                    ErrorPayload(
                        code="RATE_LIMITED",
                        message=f"agent runs {self.config.max_in_flight} dispatches at most",
                        detail={"retry_after_ms": retry_ms},
                    ),
                    in_reply_to=dispatch_id,
                ),
            )
            return
        deadline_at = now + payload.deadline_ms / 1000 + self.config.agent_deadline_margin
        session.running[dispatch_id] = _Running(deadline_at)
        heapq.heappush(self._deadlines, (deadline_at, dispatch_id))
        self._events.append(
            DispatchReceived(  # positional, in field order: the cheapest way to build one
                dispatch_id,
                payload.capability,
                payload.arguments,
                payload.deadline_ms,
                payload.attempt,
                payload.task_id,
                payload.session_context,
            )
        )

    def _on_error(self, frame: Error, now: float) -> None:
        payload = frame.payload
        self._last_error_code = payload.code
        reply_to = frame.in_reply_to
        if reply_to is not None and reply_to in self._tool_calls:
            del self._tool_calls[reply_to]
            self._events.append(
                ToolResultReceived(
                    reply_to, error={"code": payload.code, "message": payload.message or ""}
                )
            )
            return
        self._on_error_frame(payload, reply_to)

    # -- timers ----------------------------------------------------------------------------------

    def _on_timer(self, name: str, now: float) -> None:
        if name == "heartbeat":
            self._send_heartbeat(now)
        elif name == "welcome":
            self._close_error = RemoteProtocolError("no welcome within the hello timeout")
            self._lost("no welcome within the hello timeout", now)
        elif name == "dead_peer":
            # Spec 4: the client reports the loss and drops the socket without a close reply.
            self._close_error = RemoteProtocolError("dead peer: nothing received", close_code=None)
            self._lost(f"nothing received for {self.config.dead_peer_timeout} s", now)
        elif name == "grace":
            self._close_now(now)
        elif name == "close":
            self._drop_transport()

    def _dispatch_deadline_live(self, dispatch_id: str, deadline: float) -> bool:
        running = self.session.running.get(dispatch_id)
        return running is not None and running.deadline_at == deadline

    def _on_dispatch_deadline(self, dispatch_id: str, now: float) -> None:
        # The mesh has given up by now (it sends `cancel` too); tell the handler to stop, once.
        running = self.session.running[dispatch_id]
        if running.cancel_reason is None:
            running.cancel_reason = "DEADLINE_EXCEEDED"
            self._events.append(DispatchCancelled(dispatch_id, "DEADLINE_EXCEEDED"))

    def _in_flight_ids(self) -> tuple[str, ...]:
        return tuple(self.session.running)

    # -- sending ---------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Whether frames go out now (else results and chunks wait in the session's outbox)."""
        return self.state in _SENDING

    def _running(self, dispatch_id: str, action: str) -> _Running:
        running = self.session.running.get(dispatch_id)
        if running is None:
            if dispatch_id in self.session.finished:
                raise LocalProtocolError(f"cannot {action}: dispatch {dispatch_id} already ended")
            raise LocalProtocolError(f"cannot {action}: no dispatch {dispatch_id} is running")
        return running

    def _emit(self, frame: Frame) -> None:
        if self.ready:
            self._send(frame)
        else:
            self.session._queue(frame)

    def _terminal(self, dispatch_id: str, frame: Frame, encoded: bytes | None = None) -> None:
        self.session._finish(dispatch_id, frame)
        if self.ready:
            self._send(frame, encoded)
            self._mark_answered(dispatch_id)
        else:
            self.session._queue(frame)
        if self.state is _DRAINING and not self.session.running:
            self._close_now(None)

    def _mark_answered(self, dispatch_id: str) -> None:
        """Remember a terminal frame went out on this connection (spec 5: at most one).

        Only ids still in the session's finished cache are ever looked up again, so the
        set is pruned to those whenever it outgrows twice the cache: bounded memory on a
        connection that lives for millions of dispatches, at amortised O(1).
        """
        answered = self._sent_terminal
        answered.add(dispatch_id)
        if len(answered) > 2 * self.config.finished_cache_size:
            finished = self.session.finished
            self._sent_terminal = {done for done in answered if done in finished}

    def send_ack(self, dispatch_id: str) -> None:
        """Optional 'received, working' (spec 3); does not extend the deadline."""
        self._running(dispatch_id, "ack")
        if self.ready:
            self._send(self.frames.new(DispatchAck, DispatchAckPayload(), in_reply_to=dispatch_id))

    def send_chunk(self, dispatch_id: str, data: Any) -> int:
        """Stream one chunk; returns its `seq`. Queued in the outbox while disconnected."""
        running = self._running(dispatch_id, "send a chunk")
        seq = running.next_seq
        running.next_seq += 1
        self._emit(
            self.frames.new(
                DispatchChunk, DispatchChunkPayload(seq=seq, data=data), in_reply_to=dispatch_id
            )
        )
        return seq

    def send_result(self, dispatch_id: str, result: Any) -> None:
        """The dispatch's terminal success; then call `data_to_send()`.

        A result that cannot be encoded as JSON is answered `DISPATCH_FAILED` instead
        (the caller must hear something, spec 3), then `LocalProtocolError` says why.
        """
        self._running(dispatch_id, "send a result")
        frame = self.frames.new(
            DispatchResult, DispatchResultPayload(result=result), in_reply_to=dispatch_id
        )
        try:
            encoded = encode_frame(frame)
        except LocalProtocolError as exc:
            self.send_error(dispatch_id, "DISPATCH_FAILED", f"result is not JSON: {exc}")
            raise
        self._terminal(dispatch_id, frame, encoded)

    def send_cancelled(self, dispatch_id: str) -> None:
        """Answer a dispatch whose handler stopped after `DispatchCancelled` (spec 3 codes).

        Stopped by the deadline it answers DEADLINE_EXCEEDED, so the caller learns why even
        if this frame beats the mesh's own timer; otherwise CANCELLED with the mesh's reason.
        """
        reason = self._running(dispatch_id, "answer a cancel").cancel_reason or "cancelled"
        if reason == "DEADLINE_EXCEEDED":
            self.send_error(dispatch_id, "DEADLINE_EXCEEDED", "the dispatch deadline passed")
        else:
            self.send_error(dispatch_id, "CANCELLED", f"the mesh cancelled it: {reason}")

    def send_error(
        self,
        dispatch_id: str,
        code: str,
        message: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """The dispatch's terminal failure, e.g. `DISPATCH_FAILED` when the handler raised."""
        self._running(dispatch_id, "send an error")
        frame = self.frames.new(
            Error, ErrorPayload(code=code, message=message, detail=detail), in_reply_to=dispatch_id
        )
        self._terminal(dispatch_id, frame)

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
        """Ask the mesh to run another agent's capability; returns the call id."""
        self._require(AgentState.READY, AgentState.DRAINING, action="call a tool")
        frame = self.frames.new(
            ToolCall,
            ToolCallPayload(
                tool=tool,
                arguments=arguments or {},
                deadline_ms=deadline_ms,
                agent_type=agent_type,
                instance_id=instance_id,
                session_id=session_id,
            ),
        )
        self._send(frame)
        self._tool_calls[frame.id] = deadline_ms
        return frame.id

    def set_status(
        self, status: str | None = None, now: float | None = None, **fields: Any
    ) -> None:
        """Update what heartbeats report; a change of `status` is sent at once (spec 3).

        A field or value the heartbeat schema refuses raises `LocalProtocolError` here,
        not later from a timer, and never reaches the mesh (which would close 1002).
        """
        changed = status is not None and status != self._status
        extra = {**self._heartbeat_extra, **fields}
        _check_heartbeat(self._status if status is None else status, extra)
        if status is not None:
            self._status = status
        self._heartbeat_extra = extra
        if changed and self.ready and now is not None:
            self._send_heartbeat(now)

    def _send_heartbeat(self, now: float) -> None:
        running = len(self.session.running)
        extra = {"active_sessions": running, "in_flight": running, **self._heartbeat_extra}
        # set_status() checked every field against the schema, so this cannot fail.
        payload = HeartbeatPayload(status=self._status, **extra)  # type: ignore[arg-type]
        self._send(self.frames.new(Heartbeat, payload))
        self._timers["heartbeat"] = now + self._heartbeat_interval

    def send_ping(self) -> str:
        """An app-level ping; the mesh answers pong (spec 3)."""
        self._require(AgentState.READY, AgentState.DRAINING, action="ping")
        frame = self.frames.new(Ping, PingPayload())
        self._send(frame)
        return frame.id

    def refresh_token(self, token: str) -> bool:
        """Send a fresh transport JWT (extension `token_refresh`).

        Returns False when the mesh does not know the extension: then reconnect
        with the new token before the old one expires.
        """
        if not self.ready:
            return False
        frame = self.frames.new(TokenRefresh, TokenRefreshPayload(token=token))
        return self._send_extension(frame)

    def close_request(
        self, grace_seconds: int | None = None, reason: str | None = None, *, now: float
    ) -> None:
        """Take no new dispatches; close with 1000 when in-flight work is done or the grace ends."""
        self._require(AgentState.READY, action="request a close")
        grace = self.config.close_grace if grace_seconds is None else grace_seconds
        payload = CloseRequestPayload(grace_seconds=int(grace), reason=reason)
        self._send(self.frames.new(CloseRequest, payload))
        self._move("send_close_request")
        self._we_closed = True
        if not self.session.running:
            self._close_now(now)
        else:
            self._timers["grace"] = now + grace

    def close(self, code: int = 1000, reason: str = "", *, now: float) -> None:
        """Close now (no drain). The session keeps running dispatches for the next connection."""
        self._we_closed = True
        super().close(code, reason, now=now)

    def _close_now(self, now: float | None) -> None:
        self._we_closed = True
        super().close(1000, "drained", now=self._now if now is None else now)


def _check_heartbeat(status: str | None, fields: dict[str, Any]) -> None:
    unknown = sorted(set(fields) - set(HeartbeatPayload.__struct_fields__))
    if unknown:
        raise LocalProtocolError(f"bad heartbeat field: unknown {', '.join(unknown)}")
    try:
        msgspec.convert({"active_sessions": 0, **fields, "status": status}, HeartbeatPayload)
    except msgspec.ValidationError as exc:
        raise LocalProtocolError(f"bad heartbeat field: {exc}") from None


_HANDLERS: dict[type, Callable[[AgentConnection, Any, float], None]] = {
    Dispatch: AgentConnection._on_dispatch,
    Ping: AgentConnection._on_ping,
    Pong: AgentConnection._on_pong,
    Cancel: AgentConnection._on_cancel,
    ToolResult: AgentConnection._on_tool_result,
    Error: AgentConnection._on_error,
    CloseRequest: AgentConnection._on_close_request,
    Welcome: AgentConnection._on_welcome,
}
