"""The mesh (server) end of a svantic.v1 connection (spec sections 1-5, 7).

`MeshConnection` reads the upgrade request, lets the application accept or
reject it (see `handshake.check_upgrade` for the spec's checks in order),
runs hello/welcome with resume, sends dispatches with a freshly minted
dispatch-auth envelope, tracks each one to its first terminal frame or its
deadline, and keeps the agent alive-checked with pings.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from msgspec.json import encode as json_encode
from msgspec.structs import replace

from .auth import AsymmetricDispatchAuthMinter, DispatchAuthMinter
from .backoff import RetryDecision
from .codec import FrameFactory
from .config import Config
from .connection import _Connection
from .errors import InvalidState, LocalProtocolError, RemoteProtocolError
from .events import (
    ChunkReceived,
    CloseRequested,
    DispatchAcked,
    DispatchCompleted,
    DispatchFailed,
    DispatchTimedOut,
    HeartbeatReceived,
    HttpRequested,
    SessionStarted,
    TokenRefreshed,
    ToolCallReceived,
    UpgradeRequest,
)
from .frames import (
    Cancel,
    CancelPayload,
    CloseRequest,
    CloseRequestPayload,
    Dispatch,
    DispatchAck,
    DispatchAuth,
    DispatchChunk,
    DispatchPayload,
    DispatchResult,
    Error,
    Frame,
    Heartbeat,
    Hello,
    Ping,
    PingPayload,
    Pong,
    PongPayload,
    SessionContext,
    SharedSecretAuth,
    SvanticJwtAuth,
    TokenRefresh,
    ToolCall,
    ToolError,
    ToolResult,
    ToolResultPayload,
    Welcome,
    WelcomePayload,
)
from .handshake import (
    Accept,
    HandshakeRefused,
    PlainHttpRequest,
    Reject,
    ServerHandshake,
    UpgradeRequested,
)
from .resume import HeldDispatch, ResumeStore
from .states import MESH_TRANSITIONS, MeshState

__all__ = [
    "DispatchRoute",
    "MeshConnection",
    "MintDispatchAuth",
    "TokenVerifier",
    "jwt_dispatch_auth",
    "shared_secret_dispatch_auth",
    "held_failures",
]

_MAX_FRAME_HEAD = 14
"""Bytes of the largest WebSocket frame header (RFC 6455 5.2): with a whole message, the
most a client may pipeline before the 101."""


@dataclass(frozen=True, slots=True)
class DispatchRoute:
    """What a dispatch-auth envelope is minted for (spec 7 claims)."""

    instance_id: str
    agent_type: str
    tenant_id: str
    dispatch_id: str
    capability: str
    now: float
    """Wall time, Unix seconds."""


MintDispatchAuth = Callable[[DispatchRoute], DispatchAuth]
"""Mints the envelope for one dispatch; raising fails the dispatch AGENT_UNHEALTHY (spec 7)."""


class _JwtDispatchAuth:
    """What `jwt_dispatch_auth` returns: a `MintDispatchAuth`, which the mesh also knows.

    Called with a `DispatchRoute` it mints as any minter does. `MeshConnection` instead
    asks the minter directly, without building the route object per dispatch (spec 7
    mints once per dispatch, so this is on every round trip).
    """

    __slots__ = ("minter",)

    def __init__(self, minter: DispatchAuthMinter | AsymmetricDispatchAuthMinter) -> None:
        self.minter = minter

    def __call__(self, route: DispatchRoute) -> DispatchAuth:
        return SvanticJwtAuth(
            token=self.minter.mint_token(
                instance_id=route.instance_id,
                agent_type=route.agent_type,
                tenant_id=route.tenant_id,
                dispatch_id=route.dispatch_id,
                capability=route.capability,
                now=route.now,
            )
        )


def jwt_dispatch_auth(
    minter: DispatchAuthMinter | AsymmetricDispatchAuthMinter,
) -> MintDispatchAuth:
    """`svantic_jwt` envelopes from an `auth.DispatchAuthMinter` (HS256) or the asymmetric one."""
    return _JwtDispatchAuth(minter)


def shared_secret_dispatch_auth(resolve: Callable[[str], str]) -> MintDispatchAuth:
    """`shared_secret` envelopes; `resolve(instance_id)` returns the registered secret."""

    def mint(route: DispatchRoute) -> DispatchAuth:
        return SharedSecretAuth(secret=resolve(route.instance_id))

    return mint


class TokenVerifier(Protocol):
    """Verifies a transport JWT (spec 1) for `token_refresh`: returns claims or raises."""

    def __call__(self, token: str, /) -> Any: ...


# States tested per frame, read once: an enum member read through its class costs ~0.1 µs.
_HANDSHAKE = MeshState.HANDSHAKE
_UPGRADE_PENDING = MeshState.UPGRADE_PENDING
_AWAITING_HELLO = MeshState.AWAITING_HELLO
_READY = MeshState.READY
_DRAINING = MeshState.DRAINING

_ENDED_MEMORY = 1024
"""How many ended dispatch ids a connection remembers to recognise late `error` frames."""


def held_failures(held: list[HeldDispatch]) -> list[DispatchFailed]:
    """`DispatchFailed(AGENT_DISCONNECTED)` for dispatches the resume store gave up on."""
    return [
        DispatchFailed(h.dispatch_id, "AGENT_DISCONNECTED", "the agent did not resume in time")
        for h in held
    ]


@dataclass(slots=True)
class _Outbound:
    payload: DispatchPayload  # as sent; held for resume without dispatch_auth
    deadline_at: float
    next_seq: int = 0
    pending: dict[int, Any] = field(default_factory=dict)
    """Out-of-order chunks by `seq`: `(data, size)`, size being the data's JSON length."""
    pending_bytes: int = 0
    """The sum of the sizes in `pending`, held to `Config.max_pending_chunk_bytes`."""


class MeshConnection(_Connection):
    """One agent's WebSocket on the mesh, sans-IO.

    Feed the bytes of a fresh (TLS) connection to `receive_data()`; an
    `UpgradeRequest` event asks you to `accept()` or `reject()`.
    """

    _table: Any = MESH_TRANSITIONS  # typed as in the base class, which compiled classes require
    _client = False

    def __init__(
        self,
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
        serve_http: bool = False,
    ) -> None:
        super().__init__(
            config, now=now, wall_clock=wall_clock, random_bytes=random_bytes, frames=frames
        )
        self.state = MeshState.HANDSHAKE
        self._handshake: ServerHandshake | None = ServerHandshake(
            max_header_bytes=self.config.max_handshake_bytes, serve_http=serve_http
        )
        self._request: UpgradeRequested | None = None
        self._pending_input = bytearray()
        self._pending_overflow = False
        self._mint = dispatch_auth
        # `jwt_dispatch_auth`'s minter bound to this agent's claims, and the claims it was
        # bound for (instance, agent type, tenant): spec 7 `aud`, `sub`, `tenant_id`.
        self._agent_tokens: Callable[[str, str, float], str] | None = None
        self._agent_tokens_for: tuple[str | None, str, str | None] = (None, "", None)
        self._store = resume_store
        self._verify_token = verify_token
        self.connection_id = connection_id or self.frames.ids.new_id()
        self.instance_id: str | None = None
        self.tenant_id: str | None = None
        self.agent_type: str = ""
        self.subject: str | None = None
        self._resume_token: str | None = None
        self.in_flight: dict[str, _Outbound] = {}
        self._tool_calls: set[str] = set()
        self._ended: OrderedDict[str, None] = OrderedDict()  # recent ended ids, oldest first
        self.peer_draining = False
        self._timers["handshake"] = now + self.config.hello_timeout

    # -- handshake ---------------------------------------------------------------------------------

    def _feed(self, data: bytes, now: float) -> None:
        state = self.state
        if state is _HANDSHAKE and self._handshake is not None:
            result = self._handshake.receive_data(data)
            if result is None:
                return
            if isinstance(result, PlainHttpRequest):
                self._handshake = None
                self._move("http_request")
                self._timers.clear()
                self._deadlines.clear()
                self._closed_reported = True  # handed over: this connection reports no close
                self._events.append(HttpRequested(result.data))
                return
            if isinstance(result, HandshakeRefused):
                self._out.append(result.response_bytes)
                self._move("handshake_refused")
                self._close_error = RemoteProtocolError(result.message, code=result.code)
                self._finish(None, result.message, by_peer=True, now=now)
                self._drop_transport()
                return
            self._move("upgrade_requested")
            self._request = result
            self._events.append(UpgradeRequest(result))
        elif state is _UPGRADE_PENDING:
            # The decision is the application's (its lookups may take a while); keep the
            # bytes, up to one message's worth: a client must wait for the 101 (RFC 6455
            # 4.1), so a pipelined hello is tolerated, a stream is not buffered without end.
            if self._pending_overflow:
                return
            if len(self._pending_input) + len(data) > (
                    self.config.max_message_bytes + _MAX_FRAME_HEAD):
                self._pending_overflow = True
                self._pending_input = bytearray()
            else:
                self._pending_input += data
        else:
            self._feed_framing(data, now)

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
        """Upgrade (101) after the spec 1 checks passed; then call `data_to_send()`.

        `token_expires_at` (wall time) arms `AUTH_EXPIRED` + 1008 when the transport
        JWT runs out (spec 4); `agent_type` goes into dispatch-auth claims. From a
        `decision`, the defaults are its claims' `exp` and `sub` (attributes, or keys of
        a mapping such as `jwt.decode` returns) and its record's `agent_type`.
        """
        self._require(MeshState.UPGRADE_PENDING, action="accept")
        if decision is not None:
            instance_id = instance_id or decision.instance_id
            tenant_id = tenant_id or decision.tenant_id
            claims = decision.claims
            if isinstance(claims, Mapping):
                exp, sub = claims.get("exp"), claims.get("sub")
            else:
                exp, sub = getattr(claims, "exp", None), getattr(claims, "sub", None)
            token_expires_at = token_expires_at or exp
            subject = subject or sub
            agent_type = agent_type or decision.record.agent_type
        if not instance_id or tenant_id is None:
            raise LocalProtocolError("accept needs the instance id and the tenant id")
        self.instance_id, self.tenant_id, self.subject = instance_id, tenant_id, subject
        self.agent_type = agent_type or ""
        handshake = self._upgrading()
        self._out.append(handshake.accept())
        self._move("accept")
        del self._timers["handshake"]
        self._timers["hello"] = now + self.config.hello_timeout
        if token_expires_at is not None:
            self._arm_token_expiry(token_expires_at, now)
        extra = handshake.extra + bytes(self._pending_input)
        self._pending_input = bytearray()
        self._handshake = self._request = None  # HTTP is over: keep idle connections small
        if self._pending_overflow:  # what it sent early was not kept: it cannot be read
            self._start_framing(b"", now)
            message = "more than a message was sent before the upgrade was answered"
            self._close_error = RemoteProtocolError(message, code="BAD_FRAME", close_code=1009)
            self._fail(1009, message, now)
            return
        self._start_framing(extra, now)

    def reject(self, decision: Reject | None = None, *, status: int = 0, code: str = "",
               message: str = "", now: float) -> None:
        """Refuse the upgrade with the spec 1 status, code and message; closes the transport."""
        self._require(MeshState.UPGRADE_PENDING, action="reject")
        if decision is not None:
            status, code, message = decision.status, decision.code, decision.message
        self._out.append(self._upgrading().reject(status, code, message))
        self._handshake = self._request = None
        self._move("reject")
        self._close_error = RemoteProtocolError(message, code=code)
        self._finish(None, f"rejected {status} {code}", by_peer=False, now=now)
        self._drop_transport()

    @property
    def request(self) -> UpgradeRequested | None:
        """The upgrade request while it awaits `accept()` or `reject()`, else None.

        Not kept after the answer: about 1.5 KiB per idle connection on a busy mesh.
        """
        return self._request

    def _upgrading(self) -> ServerHandshake:
        if self._handshake is None:
            raise InvalidState("the upgrade was answered already")
        return self._handshake

    # -- frames from the agent ---------------------------------------------------------------------

    def _on_frame(self, frame: Frame, now: float) -> None:
        kind = type(frame)
        if self.state is _AWAITING_HELLO:
            if isinstance(frame, Hello):
                self._on_hello(frame, now)
            else:
                self._violation(f"the first frame must be hello, not {frame.type}", frame.id, now)
            return
        handler = _HANDLERS.get(kind)
        if handler is None:
            self._violation(f"a mesh does not accept {frame.type}", frame.id, now)
        else:
            handler(self, frame, now)

    def _violation(self, message: str, frame_id: str | None, now: float) -> None:
        self.stats.bad_frames += 1
        self._send_error("BAD_FRAME", message, in_reply_to=frame_id)
        self._close_error = RemoteProtocolError(message, close_code=1002)
        self._fail(1002, message, now)

    def _on_hello(self, frame: Hello, now: float) -> None:
        payload = frame.payload
        if payload.instance_id != self.instance_id:
            self._violation("hello.instance_id differs from the instance_id query", frame.id, now)
            return
        instance_id, tenant_id = self._identity()
        self.agent_type = self.agent_type or payload.agent_type or ""
        replay: tuple[HeldDispatch, ...] = ()
        resumed = False
        store = self._store
        if store is not None:
            claim = store.claim(payload.resume_token, instance_id, tenant_id, now)
            resumed, replay = claim.resumed, claim.replay
            self._events.extend(held_failures(list(claim.failed)))
            self._resume_token = store.issue(instance_id, tenant_id)
        else:
            self._resume_token = self.frames.ids.new_id()  # opaque; never matches: no resume
        self._move("hello")
        del self._timers["hello"]
        replay_ids = [h.dispatch_id for h in replay]
        self._send(
            self.frames.new(
                Welcome,
                WelcomePayload(
                    connection_id=self.connection_id,
                    resumed=resumed,
                    replayed_dispatches=replay_ids,
                    resume_token=self._resume_token,
                    heartbeat_interval_ms=round(self.config.heartbeat_interval * 1000),
                    max_message_bytes=self.config.max_message_bytes,
                ),
                in_reply_to=frame.id,
            )
        )
        self._events.append(
            SessionStarted(
                instance_id=instance_id,
                connection_id=self.connection_id,
                resumed=resumed,
                replayed_dispatches=tuple(replay_ids),
                heartbeat_interval=self.config.heartbeat_interval,
                agent_type=payload.agent_type,
                capabilities=tuple(payload.capabilities or ()),
            )
        )
        self._timers["ws_ping"] = now + self.config.ws_ping_interval
        self._timers["app_ping"] = now + self.config.app_ping_offset
        for held in replay:
            previous = held.payload
            auth = None
            if self._mint is not None:  # spec 5: a replay carries a freshly minted envelope
                auth = self._mint_auth(self._mint, previous.dispatch_id, previous.capability)
                if auth is None:
                    continue
            again = replace(previous, attempt=previous.attempt + 1, dispatch_auth=auth)
            self._dispatch(again, held.deadline_at, None)

    def _identity(self) -> tuple[str, str]:
        if self.instance_id is None or self.tenant_id is None:
            raise InvalidState("not accepted yet")
        return self.instance_id, self.tenant_id

    def _on_ack(self, frame: DispatchAck, now: float) -> None:
        if frame.in_reply_to in self.in_flight:
            self._events.append(DispatchAcked(frame.in_reply_to))

    def _on_chunk(self, frame: DispatchChunk, now: float) -> None:
        outbound = self.in_flight.get(frame.in_reply_to)
        if outbound is None:
            self.stats.late_terminal_frames += 1
            return
        seq = frame.payload.seq
        if seq < outbound.next_seq or seq in outbound.pending:
            self.stats.duplicate_chunks += 1  # resent after resume (spec 3)
            return
        if seq > outbound.next_seq:  # off the hot path: in-order chunks never come here
            if len(outbound.pending) >= self.config.max_pending_chunks:
                self._violation("too many chunks out of order", frame.id, now)
                return
            data = frame.payload.data
            size = len(json_encode(data))  # decoded from JSON, so it always encodes
            if outbound.pending_bytes + size > self.config.max_pending_chunk_bytes:
                self._violation("too many bytes in chunks out of order", frame.id, now)
                return
            outbound.pending[seq] = (data, size)
            outbound.pending_bytes += size
            return
        self._events.append(ChunkReceived(frame.in_reply_to, seq, frame.payload.data))
        outbound.next_seq = seq + 1
        self._drain_chunks(frame.in_reply_to, outbound)

    def _drain_chunks(
        self, dispatch_id: str, outbound: _Outbound, *, all_of_them: bool = False
    ) -> None:
        pending = outbound.pending
        while pending:
            seq = outbound.next_seq if outbound.next_seq in pending else None
            if seq is None:
                if not all_of_them:
                    return
                seq = min(pending)  # the terminal frame came: deliver what we have, in order
            data, size = pending.pop(seq)
            outbound.pending_bytes -= size
            self._events.append(ChunkReceived(dispatch_id, seq, data))
            outbound.next_seq = seq + 1

    def _end(self, dispatch_id: str) -> _Outbound | None:
        outbound = self.in_flight.pop(dispatch_id, None)
        if outbound is None:
            self.stats.late_terminal_frames += 1  # first terminal frame won (spec 3)
            return None
        self._remember_ended(dispatch_id)
        self._drain_chunks(dispatch_id, outbound, all_of_them=True)
        return outbound

    def _remember_ended(self, dispatch_id: str) -> None:
        """So a later `error` for it counts as a late terminal frame, not a new error (spec 3)."""
        ended = self._ended
        ended[dispatch_id] = None
        if len(ended) > _ENDED_MEMORY:
            ended.popitem(last=False)  # O(1); a dict's first key is found by a scan

    def _on_result(self, frame: DispatchResult, now: float) -> None:
        if self._end(frame.in_reply_to) is not None:
            self._events.append(DispatchCompleted(frame.in_reply_to, frame.payload.result))
            self._drained(now)

    def _on_error(self, frame: Error, now: float) -> None:
        reply_to = frame.in_reply_to
        payload = frame.payload
        if reply_to is not None and reply_to in self.in_flight:
            self._end(reply_to)
            self._events.append(
                DispatchFailed(reply_to, payload.code, payload.message, payload.detail)
            )
            self._drained(now)
        elif reply_to is not None and reply_to in self._ended:
            self.stats.late_terminal_frames += 1  # the first terminal frame won (spec 3)
        else:
            self._on_error_frame(payload, reply_to)

    def _on_tool_call(self, frame: ToolCall, now: float) -> None:
        if len(self._tool_calls) >= self.config.max_in_flight:
            self.stats.rate_limited += 1
            self._send_rate_limited(frame.id, self.config.rate_limit_retry_after)
            return
        self._tool_calls.add(frame.id)
        p = frame.payload
        self._events.append(
            ToolCallReceived(
                frame.id, p.tool, p.arguments, p.deadline_ms, p.agent_type, p.instance_id,
                p.session_id,
            )
        )

    def _on_heartbeat(self, frame: Heartbeat, now: float) -> None:
        p = frame.payload
        self._events.append(
            HeartbeatReceived(
                p.status, p.active_sessions, p.max_concurrent_sessions, p.in_flight, p.load,
                p.health,
            )
        )

    def _on_ping(self, frame: Ping, now: float) -> None:
        self._send(self.frames.new(Pong, PongPayload(), in_reply_to=frame.id))

    def _on_pong(self, frame: Pong, now: float) -> None:
        pass

    def _on_close_request(self, frame: CloseRequest, now: float) -> None:
        self.peer_draining = True  # stop routing to this agent; it closes when drained
        self._events.append(CloseRequested(frame.payload.grace_seconds, frame.payload.reason))

    def _on_token_refresh(self, frame: TokenRefresh, now: float) -> None:
        if self._verify_token is None:  # as a peer without the extension answers (spec 3)
            self._send_error("BAD_FRAME", "token_refresh is not supported", in_reply_to=frame.id)
            return
        try:
            claims = self._verify_token(frame.payload.token)
            if isinstance(claims, Mapping):  # as `accept` reads them: jwt.decode's dict too
                tenant, subject = claims.get("tenant_id"), claims.get("sub")
                expires = claims.get("exp")
            else:
                tenant = getattr(claims, "tenant_id", None)
                subject = getattr(claims, "sub", None)
                expires = getattr(claims, "exp", None)
        except Exception as exc:  # any verifier failure is a refusal
            self._send_error("UNAUTHORIZED", f"token refused: {exc}", in_reply_to=frame.id)
            return
        if tenant != self.tenant_id or (self.subject is not None and subject != self.subject):
            self._send_error(
                "UNAUTHORIZED", "token is for another tenant or client", in_reply_to=frame.id
            )
            return
        if isinstance(expires, int | float):
            self._arm_token_expiry(float(expires), now)
            self._events.append(TokenRefreshed(float(expires)))

    def _arm_token_expiry(self, expires_at_wall: float, now: float) -> None:
        self._timers["auth_expiry"] = now + max(0.0, expires_at_wall - self._wall_clock())

    # -- sending -----------------------------------------------------------------------------------

    @property
    def accepting_dispatches(self) -> bool:
        return self.state is _READY and not self.peer_draining

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
        """Send one dispatch and track it to its terminal frame or deadline; returns its id.

        `deadline_ms` is checked here (a positive int, not a bool or float): typed wider
        than `int` so that a compiled build does not coerce a bool before the check.

        If no dispatch-auth envelope can be minted, no frame is sent and a
        `DispatchFailed(AGENT_UNHEALTHY)` event reports it (spec 7, fail closed).
        """
        if self.state is not _READY or self.peer_draining:  # `accepting_dispatches`, inline
            if self.peer_draining:
                raise LocalProtocolError("the agent asked to close: route the dispatch elsewhere")
            self._require(MeshState.READY, action="send a dispatch")
        if type(deadline_ms) is not int or deadline_ms <= 0:
            raise LocalProtocolError(f"deadline_ms must be a positive int, got {deadline_ms!r}")
        if not capability:
            raise LocalProtocolError("capability must be a non-empty string")
        if dispatch_id is not None and (dispatch_id in self.in_flight):
            raise LocalProtocolError(f"dispatch {dispatch_id} is already in flight")
        new_id, ts = self.frames.ids.stamp()  # one stamp for the id and the envelope ts
        dispatch_id = dispatch_id or new_id
        auth = None
        if self._mint is not None:
            auth = self._mint_auth(self._mint, dispatch_id, capability)
            if auth is None:
                return dispatch_id  # failed, and reported (fail closed)
        payload = DispatchPayload(
            dispatch_id=dispatch_id,
            capability=capability,
            deadline_ms=deadline_ms,
            arguments=arguments if arguments is not None else {},
            task_id=task_id,
            session_context=session_context,
            dispatch_auth=auth,
        )
        self._dispatch(payload, now + deadline_ms / 1000, ts)
        return dispatch_id

    def _mint_auth(
        self, mint: MintDispatchAuth, dispatch_id: str, capability: str
    ) -> DispatchAuth | None:
        """The dispatch's fresh envelope, or None after reporting why it has none (spec 7).

        Fail closed: whatever goes wrong, the dispatch fails `AGENT_UNHEALTHY`, and the
        caller sends no frame and tracks nothing.
        """
        try:
            if type(mint) is _JwtDispatchAuth:  # our own minter: no route object per dispatch
                tokens = self._agent_tokens
                claimed = (self.instance_id, self.agent_type, self.tenant_id)
                if tokens is None or claimed != self._agent_tokens_for:
                    instance_id, tenant_id = self._identity()  # bound once, on first use
                    tokens = self._agent_tokens = mint.minter.token_minter(
                        instance_id=instance_id, agent_type=self.agent_type, tenant_id=tenant_id
                    )
                    self._agent_tokens_for = claimed
                return SvanticJwtAuth(token=tokens(dispatch_id, capability, self._wall_clock()))
            instance_id, tenant_id = self._identity()
            route = DispatchRoute(
                instance_id, self.agent_type, tenant_id, dispatch_id, capability,
                self._wall_clock(),
            )
            return mint(route)
        except Exception as exc:  # fail closed, whatever went wrong
            self._events.append(
                DispatchFailed(dispatch_id, "AGENT_UNHEALTHY", f"cannot mint dispatch_auth: {exc}")
            )
            return None

    def _dispatch(self, payload: DispatchPayload, deadline_at: float, ts: str | None) -> None:
        """Send a dispatch (its envelope included) and track it to its end or deadline."""
        if ts is None:
            _, ts = self.frames.ids.stamp()
        self._send(Dispatch(v=1, id=payload.dispatch_id, ts=ts, payload=payload))
        self.in_flight[payload.dispatch_id] = _Outbound(payload, deadline_at)
        heapq.heappush(self._deadlines, (deadline_at, payload.dispatch_id))

    def send_tool_result(
        self, call_id: str, result: Any = None, *, error: tuple[str, str] | None = None
    ) -> None:
        """Answer an agent's tool call with a result, or with `error=(code, message)`."""
        if call_id not in self._tool_calls:
            raise LocalProtocolError(f"no tool call {call_id} is waiting for a result")
        self._tool_calls.discard(call_id)
        payload = (
            ToolResultPayload(result=result)
            if error is None
            else ToolResultPayload(error=ToolError(code=error[0], message=error[1]))
        )
        if self.state in (MeshState.READY, MeshState.DRAINING):
            self._send(self.frames.new(ToolResult, payload, in_reply_to=call_id))

    def send_ping(self) -> str:
        self._require(MeshState.READY, MeshState.DRAINING, action="ping")
        frame = self.frames.new(Ping, PingPayload())
        self._send(frame)
        return frame.id

    def close_request(
        self, grace_seconds: int | None = None, reason: str | None = None, *, now: float
    ) -> None:
        """Promise no new dispatch; close 1000 when nothing is in flight or the grace ends."""
        self._require(MeshState.READY, action="request a close")
        grace = self.config.close_grace if grace_seconds is None else grace_seconds
        self._send(
            self.frames.new(
                CloseRequest, CloseRequestPayload(grace_seconds=int(grace), reason=reason)
            )
        )
        self._move("send_close_request")
        self._timers["grace"] = now + grace
        self._drained(now)

    def _drained(self, now: float) -> None:
        if self.state is _DRAINING and not self.in_flight:
            self.close(1000, "drained", now=now)

    # -- timers ------------------------------------------------------------------------------------

    def _on_timer(self, name: str, now: float) -> None:
        config = self.config
        if name == "ws_ping":
            if self._framing is not None:
                self._framing.send_ping(b"svantic")
            self._timers["ws_ping"] = now + config.ws_ping_interval
        elif name == "app_ping":
            self._send(self.frames.new(Ping, PingPayload()))
            self._timers["app_ping"] = now + config.app_ping_interval
        elif name == "dead_peer":
            # Spec 4: close 1001 and drop the transport without waiting for a reply.
            self._close_error = RemoteProtocolError("dead peer: nothing received", close_code=1001)
            self._fail(1001, f"nothing received for {config.dead_peer_timeout} s", now)
        elif name == "hello":
            self._close_error = RemoteProtocolError("no hello in time", close_code=1002)
            self._fail(1002, "no hello within the hello timeout", now)
        elif name == "handshake":
            self._close_error = RemoteProtocolError("no upgrade request in time")
            self._lost("no upgrade request within the handshake timeout", now)
        elif name == "auth_expiry":
            self._send_error("AUTH_EXPIRED", "transport token expired: reconnect with a fresh one")
            self.close(1008, "AUTH_EXPIRED", now=now)
        elif name == "grace":
            self.close(1000, "close_request grace ended", now=now)
        elif name == "close":
            self._drop_transport()

    def _dispatch_deadline_live(self, dispatch_id: str, deadline: float) -> bool:
        outbound = self.in_flight.get(dispatch_id)
        return outbound is not None and outbound.deadline_at == deadline

    def _on_dispatch_deadline(self, dispatch_id: str, now: float) -> None:
        self.in_flight.pop(dispatch_id)
        self._remember_ended(dispatch_id)
        self._events.append(DispatchTimedOut(dispatch_id))
        cancel = self.frames.new(
            Cancel, CancelPayload(dispatch_id=dispatch_id, reason="DEADLINE_EXCEEDED")
        )
        self._send_extension(cancel)  # a peer without `cancel` just lets the deadline pass
        self._drained(now)

    def _in_flight_ids(self) -> tuple[str, ...]:
        return tuple(self.in_flight)

    def _hello_expected(self) -> bool:
        return self.state is MeshState.AWAITING_HELLO

    def _retry_after_close(self, code: int | None, by_peer: bool) -> RetryDecision:
        return RetryDecision.FINAL

    def _on_closed(self, now: float) -> None:
        """Park in-flight dispatches for resume, or fail them AGENT_DISCONNECTED (spec 5)."""
        # Held without its envelope: a replay carries a freshly minted one (spec 5).
        held = [
            HeldDispatch(replace(o.payload, dispatch_auth=None), o.deadline_at)
            if o.payload.dispatch_auth is not None
            else HeldDispatch(o.payload, o.deadline_at)
            for o in self.in_flight.values()
        ]
        self.in_flight.clear()
        # Even with nothing held, the token's window starts now: a matching hello within it
        # resumes (spec 5), so the agent's outbox and finished cache keep their meaning.
        if self._store is not None and self._resume_token is not None:
            failed = self._store.hold(self._resume_token, held, now)
        else:
            failed = held
        self._events.extend(held_failures(failed))


_HANDLERS: dict[type, Callable[[MeshConnection, Any, float], None]] = {
    DispatchAck: MeshConnection._on_ack,
    DispatchChunk: MeshConnection._on_chunk,
    DispatchResult: MeshConnection._on_result,
    Error: MeshConnection._on_error,
    ToolCall: MeshConnection._on_tool_call,
    Heartbeat: MeshConnection._on_heartbeat,
    Ping: MeshConnection._on_ping,
    Pong: MeshConnection._on_pong,
    CloseRequest: MeshConnection._on_close_request,
    TokenRefresh: MeshConnection._on_token_refresh,
}
