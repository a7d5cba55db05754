"""svantic-proto: a sans-IO implementation of the svantic.v1 agent-mesh protocol.

The core parses, validates and emits frames and runs the protocol's state
machines without doing any I/O or reading any clock; the runtimes above it make
every decision across connections (reconnecting, admission, the instance table,
shutdown). See `svantic_adapters` for runnable clients and servers.

The top level holds what an embedder needs: connections, runtimes, config,
events, errors, admission, dispatch-auth entry points and the test kit. Frames,
the codec, ids, trace context and backoff stay importable from their own modules
(`svantic_proto.frames`, `.codec`, `.ids`, `.trace`, `.backoff`).
"""

from __future__ import annotations

from . import _compiled  # first: it may switch the compiled modules back to their sources
from . import connection as _connection
from .agent import AgentConnection, AgentSession
from .agent_runtime import AgentRuntime
from .auth import AsymmetricDispatchAuthMinter, DispatchAuthMinter, DispatchAuthVerifier
from .backoff import RetryDecision
from .capabilities import CapabilityRegistry, DispatchContext
from .config import Config
from .connection import CLOSE_TRANSPORT
from .errors import (
    DeploymentModeMismatch,
    DispatchAuthError,
    DispatchError,
    FrameError,
    HandlerError,
    HandshakeFailed,
    HandshakeRejected,
    InsecureTransportError,
    InstanceNotFound,
    InvalidState,
    LocalProtocolError,
    MissingInstanceId,
    RemoteError,
    RemoteProtocolError,
    SvanticError,
    TenantMismatch,
    TlsError,
    Unauthorized,
    UnsupportedSubprotocol,
    UpgradeRequired,
)
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
from .handshake import InstanceRecord, check_upgrade
from .mesh import DispatchRoute, MeshConnection, jwt_dispatch_auth, shared_secret_dispatch_auth
from .mesh_runtime import MeshRuntime
from .resume import ResumeStore
from .states import AgentState, MeshState
from .testing import FakeClock, Pair

__version__ = "0.1.0"

__all__ = [
    # connections, runtimes, configuration
    "AgentConnection",
    "AgentRuntime",
    "AgentSession",
    "AgentState",
    "C_EXTENSION",
    "CapabilityRegistry",
    "CLOSE_TRANSPORT",
    "COMPILED",
    "Config",
    "DispatchContext",
    "MeshConnection",
    "MeshRuntime",
    "MeshState",
    "ResumeStore",
    "RetryDecision",

    # events
    "ChunkReceived",
    "CloseRequested",
    "ConnectionClosed",
    "DispatchAcked",
    "DispatchCancelled",
    "DispatchCompleted",
    "DispatchFailed",
    "DispatchReceived",
    "DispatchTimedOut",
    "ErrorReceived",
    "Event",
    "ExtensionUnsupported",
    "HeartbeatReceived",
    "SessionStarted",
    "TokenRefreshed",
    "ToolCallReceived",
    "ToolResultReceived",
    "UpgradeRequest",

    # errors (the tree is in svantic_proto.errors)
    "DeploymentModeMismatch",
    "DispatchAuthError",
    "DispatchError",
    "FrameError",
    "HandlerError",
    "HandshakeFailed",
    "HandshakeRejected",
    "InsecureTransportError",
    "InstanceNotFound",
    "InvalidState",
    "LocalProtocolError",
    "MissingInstanceId",
    "RemoteError",
    "RemoteProtocolError",
    "SvanticError",
    "TenantMismatch",
    "TlsError",
    "Unauthorized",
    "UnsupportedSubprotocol",
    "UpgradeRequired",

    # admission and dispatch auth
    "AsymmetricDispatchAuthMinter",
    "check_upgrade",
    "DispatchAuthMinter",
    "DispatchAuthVerifier",
    "DispatchRoute",
    "InstanceRecord",
    "jwt_dispatch_auth",
    "shared_secret_dispatch_auth",

    # the test kit (svantic_proto.testing)
    "FakeClock",
    "Pair",
]

COMPILED: bool = _compiled.is_compiled(_connection)
"""Whether the core's per-frame path runs compiled (mypyc) rather than from its sources."""

C_EXTENSION: bool = _compiled.c_extension_loaded()
"""Whether the C extension `_speedups` is loaded (the codec's checks and the XOR mask in C);
`False` on an install built without a C compiler, or with `SVANTIC_NO_C_EXTENSION=1`."""
