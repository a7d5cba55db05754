"""The svantic.v1 wire schema: one msgspec Struct per frame type (spec sections 2 and 3).

Validation lives in the types so that msgspec checks a frame while it parses
it, in C: constrained strings for ids and timestamps, `Meta` bounds for
numbers, tagged unions on `type` (frames) and on `dispatch_auth.type`. Frame
types that carry `in_reply_to` by rule declare it required; types that do not
use it do not declare it at all, so it is ignored as spec section 2 decides.

Every Struct is frozen: a decoded frame is a value. Fields absent on the wire
use `None` (or the spec's default) and are omitted again when encoding.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, get_args

from msgspec import UNSET, Meta, Struct, UnsetType

__all__ = [
    # envelope field types
    "Uuid",
    "Timestamp",
    "TraceId",
    "SpanId",
    # payloads
    "Sdk",
    "HelloPayload",
    "WelcomePayload",
    "SessionContext",
    "SvanticJwtAuth",
    "SharedSecretAuth",
    "MtlsAuth",
    "DispatchAuth",
    "DispatchPayload",
    "DispatchAckPayload",
    "DispatchChunkPayload",
    "DispatchResultPayload",
    "ToolCallPayload",
    "ToolError",
    "ToolResultPayload",
    "HeartbeatPayload",
    "PingPayload",
    "PongPayload",
    "ErrorPayload",
    "CloseRequestPayload",
    "CancelPayload",
    "TokenRefreshPayload",
    # frames
    "Hello",
    "Welcome",
    "Dispatch",
    "DispatchAck",
    "DispatchChunk",
    "DispatchResult",
    "ToolCall",
    "ToolResult",
    "Heartbeat",
    "Ping",
    "Pong",
    "Error",
    "CloseRequest",
    "Cancel",
    "TokenRefresh",
    "Frame",
    "FRAME_TYPES",
    "REPLY_TYPES",
]

# `\Z`, not `$`: msgspec uses `re.search`, where `$` also matches before a final newline.
# `[0-9]`, not `\d`: `\d` matches every Unicode digit.
UUID_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z"
TIMESTAMP_PATTERN = (
    r"^[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])T(?:[01][0-9]|2[0-3]):[0-5][0-9]:"
    r"(?:[0-5][0-9]|60)(?:\.[0-9]+)?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])\Z"
)
TRACE_ID_PATTERN = r"^[0-9a-f]{32}\Z"
SPAN_ID_PATTERN = r"^[0-9a-f]{16}\Z"

# Regex checks inside msgspec cost ~0.3 µs each, more than a whole small frame's parse, so
# the envelope's own strings (id, ts, in_reply_to, trace ids) carry only length bounds here
# and are checked together after the parse by `codec.decode_frame` (in C when the optional
# `_speedups` module is built, else by one compiled regex). Payload UUIDs keep the pattern
# (they are rarer), except `dispatch_id`, which must equal the checked `id`.
Uuid = Annotated[str, Meta(pattern=UUID_PATTERN, description="canonical lowercase UUID")]
EnvelopeUuid = Annotated[str, Meta(min_length=36, max_length=36)]
Timestamp = Annotated[str, Meta(min_length=20, max_length=64)]
TraceId = Annotated[str, Meta(min_length=32, max_length=32)]
SpanId = Annotated[str, Meta(min_length=16, max_length=16)]
NonEmptyStr = Annotated[str, Meta(min_length=1)]
Count = Annotated[int, Meta(ge=0)]
PositiveInt = Annotated[int, Meta(gt=0)]
Load = Annotated[float, Meta(ge=0.0, le=1.0)]



class _Payload(Struct, frozen=True, kw_only=True, omit_defaults=True, gc=False):
    """Base of every payload: frozen values; absent optional fields are omitted again on encode.

    `gc=False`: decoded JSON cannot form reference cycles, and untracked Structs
    parse faster and keep the collector out of the hot path.
    """


# --- payloads ---------------------------------------------------------------------------------


class Sdk(_Payload, frozen=True):
    name: str
    version: str


class HelloPayload(_Payload, frozen=True):
    instance_id: NonEmptyStr
    agent_type: str | None = None
    resume_token: str | None = None
    sdk: Sdk | None = None
    capabilities: list[str] | None = None


class WelcomePayload(_Payload, frozen=True):
    connection_id: str
    resumed: bool
    replayed_dispatches: list[EnvelopeUuid]  # format checked by the codec with the envelope
    resume_token: str
    heartbeat_interval_ms: PositiveInt
    max_message_bytes: PositiveInt | None = None


class SessionContext(_Payload, frozen=True):
    session_id: str | None = None
    tenant_id: str | None = None
    propagation_headers: dict[str, str] | None = None


class SvanticJwtAuth(_Payload, tag_field="type", tag="svantic_jwt", frozen=True):
    type: ClassVar[str] = "svantic_jwt"
    token: str


class SharedSecretAuth(_Payload, tag_field="type", tag="shared_secret", frozen=True):
    type: ClassVar[str] = "shared_secret"
    secret: str

    def __repr__(self) -> str:  # never print a secret into a log
        return "SharedSecretAuth(secret=<redacted>)"


class MtlsAuth(_Payload, tag_field="type", tag="mtls", frozen=True):
    """Reserved (spec section 7): parses, so the agent can answer DISPATCH_AUTH_FAILED."""

    type: ClassVar[str] = "mtls"


DispatchAuth = SvanticJwtAuth | SharedSecretAuth | MtlsAuth


class DispatchPayload(_Payload, frozen=True):
    dispatch_id: str  # must equal the envelope id, which is checked
    capability: NonEmptyStr
    deadline_ms: PositiveInt
    arguments: dict[str, Any] = {}
    task_id: str | None = None
    attempt: Annotated[int, Meta(ge=1)] = 1
    session_context: SessionContext | None = None
    dispatch_auth: DispatchAuth | None = None


class DispatchAckPayload(_Payload, frozen=True):
    pass


class DispatchChunkPayload(_Payload, frozen=True):
    seq: Count
    data: Any


class DispatchResultPayload(_Payload, frozen=True):
    result: Any


class ToolCallPayload(_Payload, frozen=True):
    tool: NonEmptyStr
    arguments: dict[str, Any] = {}
    deadline_ms: PositiveInt | None = None
    agent_type: str | None = None
    instance_id: str | None = None
    session_id: str | None = None


class ToolError(_Payload, frozen=True):
    code: str
    message: str


class ToolResultPayload(_Payload, frozen=True):
    """Exactly one of `result` or `error` (spec section 3): absent is `UNSET`, not `None`."""

    result: Any | UnsetType = UNSET
    error: ToolError | UnsetType = UNSET

    def __post_init__(self) -> None:
        if (self.result is UNSET) == (self.error is UNSET):
            raise ValueError("tool_result needs exactly one of `result` or `error`")


class HeartbeatPayload(_Payload, frozen=True):
    active_sessions: Count
    status: Literal["available", "busy", "offline"] | None = None
    max_concurrent_sessions: Count | None = None
    in_flight: Count | None = None
    load: Load | None = None
    health: dict[str, Any] | None = None


class PingPayload(_Payload, frozen=True):
    pass


class PongPayload(_Payload, frozen=True):
    pass


class ErrorPayload(_Payload, frozen=True):
    code: NonEmptyStr
    message: str | None = None
    detail: dict[str, Any] | None = None


class CloseRequestPayload(_Payload, frozen=True):
    grace_seconds: Count = 30
    reason: str | None = None


class CancelPayload(_Payload, frozen=True):
    dispatch_id: EnvelopeUuid  # format checked by the codec with the envelope
    reason: str


class TokenRefreshPayload(_Payload, frozen=True):
    token: NonEmptyStr


# --- frames -------------------------------------------------------------------------------------
# Field order is wire order: v, type (the tag, emitted first), id, ts, trace fields, in_reply_to,
# payload. `in_reply_to` is declared required on reply types and optional on welcome and error.


class _Frame(Struct, tag_field="type", frozen=True, kw_only=True, omit_defaults=True, gc=False):
    """Envelope fields shared by every frame. `v` and `payload` have no default so they are
    always on the wire; build frames with `FrameFactory` rather than by hand."""

    v: Literal[1]
    id: EnvelopeUuid
    ts: Timestamp
    trace_id: TraceId | None = None
    parent_span_id: SpanId | None = None

    type: ClassVar[str]


class Hello(_Frame, tag="hello", kw_only=True, frozen=True):
    payload: HelloPayload


class Welcome(_Frame, tag="welcome", kw_only=True, frozen=True):
    in_reply_to: EnvelopeUuid | None = None
    payload: WelcomePayload


class Dispatch(_Frame, tag="dispatch", kw_only=True, frozen=True):
    """Envelope `id` is the dispatch id; `payload.dispatch_id` repeats it (the codec checks)."""

    payload: DispatchPayload


class DispatchAck(_Frame, tag="dispatch_ack", kw_only=True, frozen=True):
    in_reply_to: EnvelopeUuid
    payload: DispatchAckPayload


class DispatchChunk(_Frame, tag="dispatch_chunk", kw_only=True, frozen=True):
    in_reply_to: EnvelopeUuid
    payload: DispatchChunkPayload


class DispatchResult(_Frame, tag="dispatch_result", kw_only=True, frozen=True):
    in_reply_to: EnvelopeUuid
    payload: DispatchResultPayload


class ToolCall(_Frame, tag="tool_call", kw_only=True, frozen=True):
    payload: ToolCallPayload


class ToolResult(_Frame, tag="tool_result", kw_only=True, frozen=True):
    in_reply_to: EnvelopeUuid
    payload: ToolResultPayload


class Heartbeat(_Frame, tag="heartbeat", kw_only=True, frozen=True):
    payload: HeartbeatPayload


class Ping(_Frame, tag="ping", kw_only=True, frozen=True):
    payload: PingPayload


class Pong(_Frame, tag="pong", kw_only=True, frozen=True):
    in_reply_to: EnvelopeUuid
    payload: PongPayload


class Error(_Frame, tag="error", kw_only=True, frozen=True):
    in_reply_to: EnvelopeUuid | None = None
    payload: ErrorPayload


class CloseRequest(_Frame, tag="close_request", kw_only=True, frozen=True):
    payload: CloseRequestPayload


class Cancel(_Frame, tag="cancel", kw_only=True, frozen=True):
    """Extension (spec section 3): the mesh gave up on a dispatch."""

    payload: CancelPayload


class TokenRefresh(_Frame, tag="token_refresh", kw_only=True, frozen=True):
    """Extension (spec section 3): a fresh transport JWT without reconnecting."""

    payload: TokenRefreshPayload


Frame = (
    Hello
    | Welcome
    | Dispatch
    | DispatchAck
    | DispatchChunk
    | DispatchResult
    | ToolCall
    | ToolResult
    | Heartbeat
    | Ping
    | Pong
    | Error
    | CloseRequest
    | Cancel
    | TokenRefresh
)

FRAME_TYPES: dict[str, type[Frame]] = {
    cls.__struct_config__.tag: cls for cls in get_args(Frame)  # the union is the one list
}
"""Every frame type this implementation knows, by its `type` string."""

REPLY_TYPES = frozenset(
    {"dispatch_result", "dispatch_chunk", "dispatch_ack", "tool_result", "pong"}
)
"""Types whose `in_reply_to` is required (spec section 2)."""

for _cls in FRAME_TYPES.values():
    _cls.type = _cls.__struct_config__.tag  # type: ignore[assignment]
    if "in_reply_to" not in _cls.__struct_fields__:
        # Types that do not use `in_reply_to` ignore it on the wire (spec section 2) and read
        # as None, so code can ask any frame for it without isinstance chains.
        _cls.in_reply_to = None  # type: ignore[union-attr]
del _cls
