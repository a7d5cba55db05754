"""svantic-proto: a sans-IO implementation of the svantic.v1 agent-mesh protocol.

The core parses, validates and emits frames and runs the protocol's state
machines without doing any I/O or reading any clock; see `svantic_adapters`
for runnable clients and servers.
"""

from __future__ import annotations

from .backoff import (
    Backoff,
    RetryDecision,
    backoff_delays,
    classify_close,
    classify_handshake_status,
)
from .codec import FrameFactory, decode_frame, encode_frame
from .errors import FrameError, InvalidState, LocalProtocolError, RemoteProtocolError, SvanticError
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
from .ids import IdFactory, TimestampError, format_rfc3339, parse_rfc3339
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
    "FRAME_TYPES",
    "Backoff",
    "Baggage",
    "RetryDecision",
    "SessionTraceContext",
    "TraceContextError",
    "TraceParent",
    "backoff_delays",
    "classify_close",
    "classify_handshake_status",
    "format_baggage",
    "format_traceparent",
    "parse_baggage",
    "parse_traceparent",
    "trace_context_from_headers",
    "Cancel",
    "CloseRequest",
    "Dispatch",
    "DispatchAck",
    "DispatchChunk",
    "DispatchResult",
    "Error",
    "Frame",
    "FrameError",
    "FrameFactory",
    "Heartbeat",
    "Hello",
    "IdFactory",
    "InvalidState",
    "LocalProtocolError",
    "Ping",
    "Pong",
    "RemoteProtocolError",
    "SvanticError",
    "TimestampError",
    "TokenRefresh",
    "ToolCall",
    "ToolResult",
    "Welcome",
    "decode_frame",
    "encode_frame",
    "format_rfc3339",
    "parse_rfc3339",
]
