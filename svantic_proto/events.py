"""Events the connection state machines report to the application.

These are separate from the wire schema on purpose: an event says what
happened (a dispatch completed, the peer went away), already correlated and
checked, so applications never look at raw frames or envelopes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from msgspec import Struct

from .backoff import RetryDecision
from .errors import RemoteError
from .frames import SessionContext
from .handshake import UpgradeRequested
from .trace import SessionTraceContext, trace_context_from_headers

__all__ = [
    "Event",
    "UpgradeRequest",
    "SessionStarted",
    "DispatchReceived",
    "DispatchCancelled",
    "DispatchAcked",
    "ChunkReceived",
    "DispatchCompleted",
    "DispatchFailed",
    "DispatchTimedOut",
    "ToolCallReceived",
    "ToolResultReceived",
    "HeartbeatReceived",
    "HttpRequested",
    "ErrorReceived",
    "CloseRequested",
    "TokenRefreshed",
    "ExtensionUnsupported",
    "ConnectionClosed",
]


class Event(Struct, frozen=True):
    """Base class of every event.

    A frozen msgspec Struct rather than a frozen dataclass: built in C, about ten times
    cheaper per event, and events are made on every frame's path. `msgspec.structs.fields`
    and `msgspec.structs.replace` do what `dataclasses.fields` and `replace` would.
    """


class UpgradeRequest(Event, frozen=True):
    """Mesh: an agent asks to connect; answer with `accept(...)` or `reject(...)` (spec 1).

    Run `handshake.check_upgrade(event.request, ...)` to apply the spec's checks in order.
    """

    request: UpgradeRequested


class HttpRequested(Event, frozen=True):
    """Mesh with `serve_http`: the first request is plain HTTP, not an upgrade of the
    connect path. The connection is over without a word; `data` (the bytes read so far)
    goes to an `http.HttpServerConnection` on the same transport."""

    data: bytes


class SessionStarted(Event, frozen=True):
    """Both sides: hello/welcome done, the connection is ready (spec 1, 5)."""

    instance_id: str
    connection_id: str
    resumed: bool
    replayed_dispatches: tuple[str, ...]
    heartbeat_interval: float
    agent_type: str | None = None
    capabilities: tuple[str, ...] = ()


class DispatchReceived(Event, frozen=True):
    """Agent: run this capability. Auth is already verified and re-deliveries filtered."""

    dispatch_id: str
    capability: str
    arguments: Mapping[str, Any]
    deadline_ms: int
    attempt: int
    task_id: str | None
    session_context: SessionContext | None

    @property
    def trace(self) -> SessionTraceContext:
        """W3C trace context from `session_context.propagation_headers` (spec 3, 8).

        Parsed when asked for: most handlers never read it, and parsing costs more
        than the rest of a dispatch's bookkeeping.
        """
        context = self.session_context
        return trace_context_from_headers(
            context.propagation_headers if context is not None else None
        )


class DispatchCancelled(Event, frozen=True):
    """Agent: stop the handler; the mesh gave up (cancel frame) or the deadline passed."""

    dispatch_id: str
    reason: str


class DispatchAcked(Event, frozen=True):
    dispatch_id: str


class ChunkReceived(Event, frozen=True):
    """Mesh: a streamed chunk, in `seq` order, duplicates already dropped (spec 3)."""

    dispatch_id: str
    seq: int
    data: Any


class DispatchCompleted(Event, frozen=True):
    """Mesh: the first terminal frame of a dispatch was a result."""

    dispatch_id: str
    result: Any


class DispatchFailed(Event, frozen=True):
    """Mesh: the dispatch failed: the agent's error, or the mesh's own code.

    Codes from the mesh itself: `AGENT_DISCONNECTED` (not resumed, spec 5) and
    `AGENT_UNHEALTHY` (no dispatch-auth envelope could be minted, spec 7).
    """

    dispatch_id: str
    code: str
    message: str | None = None
    detail: Mapping[str, Any] | None = None


class DispatchTimedOut(Event, frozen=True):
    """Mesh: no terminal frame by the deadline; a `cancel` was sent (spec 3)."""

    dispatch_id: str


class ToolCallReceived(Event, frozen=True):
    """Mesh: an agent calls another agent's capability; answer with `send_tool_result`."""

    call_id: str
    tool: str
    arguments: Mapping[str, Any]
    deadline_ms: int | None
    agent_type: str | None
    instance_id: str | None
    session_id: str | None


class ToolResultReceived(Event, frozen=True):
    """Agent: the answer to one of its tool calls: `error` is None on success."""

    call_id: str
    result: Any = None
    error: Mapping[str, str] | None = None


class HeartbeatReceived(Event, frozen=True):
    status: str | None
    active_sessions: int
    max_concurrent_sessions: int | None
    in_flight: int | None
    load: float | None
    health: Mapping[str, Any] | None


class ErrorReceived(Event, frozen=True):
    """An `error` frame that is not a dispatch's terminal failure (spec 3)."""

    code: str
    message: str | None
    detail: Mapping[str, Any] | None
    in_reply_to: str | None


class CloseRequested(Event, frozen=True):
    """The peer asked to close: no new dispatches; it closes with 1000 when drained."""

    grace_seconds: int
    reason: str | None


class TokenRefreshed(Event, frozen=True):
    """Mesh: a `token_refresh` verified; the transport token now expires later."""

    expires_at: float


class ExtensionUnsupported(Event, frozen=True):
    """The peer answered an extension frame with BAD_FRAME; we stopped sending it (spec 3)."""

    frame_type: str


class ConnectionClosed(Event, frozen=True):
    """The last event of a connection.

    `code` is the WebSocket close code (None: the transport ended without a
    close frame, or the handshake failed). `retry` is what the client should do
    next (spec 5); the mesh side always reports FINAL. `error` keeps the cause.

    `error` is a `RemoteError` (one `isinstance` handles every cause) or None for an
    orderly close: the core records there only what the peer or the network did (a
    bad frame, a refused or broken handshake, a silent peer), because your own misuse
    is raised at the call that made it and never ends a connection by itself.
    """

    code: int | None
    reason: str
    by_peer: bool
    retry: RetryDecision
    error: RemoteError | None = None
    in_flight: tuple[str, ...] = ()
