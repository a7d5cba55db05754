"""svantic-proto: a sans-IO implementation of the svantic.v1 agent-mesh protocol.

The core parses, validates and emits frames and runs the protocol's state
machines without doing any I/O or reading any clock; see `svantic_adapters`
for runnable clients and servers.
"""

from __future__ import annotations

from . import _compiled  # first: it may switch the compiled modules back to their sources
from . import connection as _connection
from .agent import AgentConnection, AgentSession
from .auth import (
    DISPATCH_AUTH_ENABLED_ENV,
    AsymmetricDispatchAuthMinter,
    DispatchAuthError,
    DispatchAuthFailure,
    DispatchAuthMinter,
    DispatchAuthVerifier,
    DispatchClaims,
    HS256Key,
    dispatch_auth_enabled,
    shared_secret_envelope,
    verify_shared_secret,
)
from .backoff import (
    Backoff,
    RetryDecision,
    backoff_delays,
    classify_close,
    classify_handshake_status,
)
from .codec import FrameFactory, decode_frame, encode_frame
from .config import Config
from .connection import CLOSE_TRANSPORT, ConnectionStats
from .errors import FrameError, InvalidState, LocalProtocolError, RemoteProtocolError, SvanticError
from .events import (
    ChunkReceived,
    CloseRequested,
    ConnectionClosed,
    DispatchAcked,
    DispatchCancelled,
    DispatchCompleted,
    DispatchFailed,
    DispatchReceived,
    DispatchTimedOut,
    ErrorReceived,
    Event,
    ExtensionUnsupported,
    HeartbeatReceived,
    SessionStarted,
    TokenRefreshed,
    ToolCallReceived,
    ToolResultReceived,
    UpgradeRequest,
)
from .frames import (
    FRAME_TYPES,
    Cancel,
    CloseRequest,
    Dispatch,
    DispatchAck,
    DispatchChunk,
    DispatchResult,
    Error,
    Frame,
    Heartbeat,
    Hello,
    Ping,
    Pong,
    TokenRefresh,
    ToolCall,
    ToolResult,
    Welcome,
)
from .handshake import (
    HandshakeFailed,
    HandshakeRejected,
    InstanceRecord,
    check_upgrade,
)
from .ids import IdFactory, TimestampError, format_rfc3339, parse_rfc3339
from .mesh import (
    DispatchRoute,
    MeshConnection,
    held_failures,
    jwt_dispatch_auth,
    shared_secret_dispatch_auth,
)
from .resume import ResumeStore
from .states import AgentState, MeshState
from .trace import (
    Baggage,
    SessionTraceContext,
    TraceContextError,
    TraceParent,
    format_baggage,
    format_traceparent,
    parse_baggage,
    parse_traceparent,
    trace_context_from_headers,
)

__version__ = "0.1.0"

__all__ = [
    "AgentConnection",
    "AgentSession",
    "AgentState",
    "AsymmetricDispatchAuthMinter",
    "Backoff",
    "backoff_delays",
    "Baggage",
    "Cancel",
    "check_upgrade",
    "ChunkReceived",
    "classify_close",
    "classify_handshake_status",
    "CLOSE_TRANSPORT",
    "CloseRequest",
    "CloseRequested",
    "COMPILED",
    "Config",
    "ConnectionClosed",
    "ConnectionStats",
    "decode_frame",
    "Dispatch",
    "dispatch_auth_enabled",
    "DISPATCH_AUTH_ENABLED_ENV",
    "DispatchAck",
    "DispatchAcked",
    "DispatchAuthError",
    "DispatchAuthFailure",
    "DispatchAuthMinter",
    "DispatchAuthVerifier",
    "DispatchCancelled",
    "DispatchChunk",
    "DispatchClaims",
    "DispatchCompleted",
    "DispatchFailed",
    "DispatchReceived",
    "DispatchResult",
    "DispatchRoute",
    "DispatchTimedOut",
    "encode_frame",
    "Error",
    "ErrorReceived",
    "Event",
    "ExtensionUnsupported",
    "format_baggage",
    "format_rfc3339",
    "format_traceparent",
    "Frame",
    "FRAME_TYPES",
    "FrameError",
    "FrameFactory",
    "HandshakeFailed",
    "HandshakeRejected",
    "Heartbeat",
    "HeartbeatReceived",
    "held_failures",
    "Hello",
    "HS256Key",
    "IdFactory",
    "InstanceRecord",
    "InvalidState",
    "jwt_dispatch_auth",
    "LocalProtocolError",
    "MeshConnection",
    "MeshState",
    "parse_baggage",
    "parse_rfc3339",
    "parse_traceparent",
    "Ping",
    "Pong",
    "RemoteProtocolError",
    "ResumeStore",
    "RetryDecision",
    "SessionStarted",
    "SessionTraceContext",
    "shared_secret_dispatch_auth",
    "shared_secret_envelope",
    "SvanticError",
    "TimestampError",
    "TokenRefresh",
    "TokenRefreshed",
    "ToolCall",
    "ToolCallReceived",
    "ToolResult",
    "ToolResultReceived",
    "trace_context_from_headers",
    "TraceContextError",
    "TraceParent",
    "UpgradeRequest",
    "verify_shared_secret",
    "Welcome",
]

COMPILED: bool = _compiled.is_compiled(_connection)
"""Whether the core's per-frame path runs compiled (mypyc) rather than from its sources."""
