"""Baseline 3: pydantic v2 models, a discriminated union on `type`.

The way most Python services would write this protocol: one model per frame
type, `Annotated[Union[...], Field(discriminator="type")]`, and a `TypeAdapter`
doing `validate_json` / `dump_json` in pydantic-core. Models are strict (spec
section 2: `v` is the integer 1, integers reject `1.0` and `"1"`; strict floats
still accept JSON integers, as the spec asks). Optional fields default to the
`MISSING` sentinel so that an absent field stays absent on re-encode (and
`tool_result` can tell an absent `result` from a `null` one).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Self

from pydantic import (
    MISSING,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from svantic_proto.errors import FrameError

from ._rules import SPAN_ID_PATTERN, TIMESTAMP_PATTERN, TRACE_ID_PATTERN, UUID_PATTERN

__all__ = ["Frame", "decode", "encode"]

Uuid = Annotated[str, StringConstraints(pattern=UUID_PATTERN)]
Timestamp = Annotated[str, StringConstraints(pattern=TIMESTAMP_PATTERN)]
TraceId = Annotated[str, StringConstraints(pattern=TRACE_ID_PATTERN)]
SpanId = Annotated[str, StringConstraints(pattern=SPAN_ID_PATTERN)]
NonEmptyStr = Annotated[str, StringConstraints(min_length=1)]
# Strict int: `Literal[1]` would let `true` and `1.0` through.
Version = Annotated[int, Field(ge=1, le=1)]
Count = Annotated[int, Field(ge=0)]
PositiveInt = Annotated[int, Field(gt=0)]
Object = dict[str, Any]


class _Model(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


# --- section 3 payloads -----------------------------------------------------------
# `X | MISSING | None = MISSING`: optional, `null` read as absent (as the codec does).
# `X | MISSING = MISSING`: optional with a non-null default, so `null` is refused.


class Sdk(_Model):
    name: str
    version: str


class HelloPayload(_Model):
    instance_id: NonEmptyStr
    agent_type: str | MISSING | None = MISSING
    resume_token: str | MISSING | None = MISSING
    sdk: Sdk | MISSING | None = MISSING
    capabilities: list[str] | MISSING | None = MISSING


class WelcomePayload(_Model):
    connection_id: str
    resumed: bool
    replayed_dispatches: list[Uuid]
    resume_token: str
    heartbeat_interval_ms: PositiveInt
    max_message_bytes: PositiveInt | MISSING | None = MISSING


class SessionContext(_Model):
    session_id: str | MISSING | None = MISSING
    tenant_id: str | MISSING | None = MISSING
    propagation_headers: dict[str, str] | MISSING | None = MISSING


class SvanticJwtAuth(_Model):
    type: Literal["svantic_jwt"]
    token: str


class SharedSecretAuth(_Model):
    type: Literal["shared_secret"]
    secret: str


class MtlsAuth(_Model):
    """Reserved (section 7), so it parses: the agent answers DISPATCH_AUTH_FAILED."""

    type: Literal["mtls"]


DispatchAuth = Annotated[SvanticJwtAuth | SharedSecretAuth | MtlsAuth, Field(discriminator="type")]


class DispatchPayload(_Model):
    dispatch_id: Uuid
    capability: NonEmptyStr
    arguments: Object | MISSING = MISSING
    deadline_ms: PositiveInt
    task_id: str | MISSING | None = MISSING
    attempt: PositiveInt | MISSING = MISSING
    session_context: SessionContext | MISSING | None = MISSING
    dispatch_auth: DispatchAuth | MISSING | None = MISSING


class EmptyPayload(_Model):
    """ping, pong, dispatch_ack: `{}`; unknown fields are ignored (section 2)."""


class DispatchChunkPayload(_Model):
    seq: Count
    data: Any


class DispatchResultPayload(_Model):
    result: Any


class ToolCallPayload(_Model):
    tool: NonEmptyStr
    arguments: Object | MISSING = MISSING
    deadline_ms: PositiveInt | MISSING | None = MISSING
    agent_type: str | MISSING | None = MISSING
    instance_id: str | MISSING | None = MISSING
    session_id: str | MISSING | None = MISSING


class ToolError(_Model):
    code: str
    message: str


class ToolResultPayload(_Model):
    result: Any | MISSING = MISSING
    error: ToolError | MISSING = MISSING

    @model_validator(mode="after")
    def _exactly_one_outcome(self) -> Self:
        # Section 3 (decided): exactly one of result / error.
        if (self.result is MISSING) == (self.error is MISSING):
            raise ValueError("exactly one of result and error")
        return self


class HeartbeatPayload(_Model):
    status: Literal["available", "busy", "offline"] | MISSING | None = MISSING
    active_sessions: Count
    max_concurrent_sessions: Count | MISSING | None = MISSING
    in_flight: Count | MISSING | None = MISSING
    load: Annotated[float, Field(ge=0, le=1)] | MISSING | None = MISSING
    health: Object | MISSING | None = MISSING


class ErrorPayload(_Model):
    code: NonEmptyStr
    message: str | MISSING | None = MISSING
    detail: Object | MISSING | None = MISSING


class CloseRequestPayload(_Model):
    grace_seconds: Count | MISSING = MISSING
    reason: str | MISSING | None = MISSING


class CancelPayload(_Model):
    dispatch_id: Uuid
    reason: str


class TokenRefreshPayload(_Model):
    token: NonEmptyStr


# --- section 2 envelopes ----------------------------------------------------------


class _Envelope(_Model):
    """`in_reply_to` is declared only where section 2 uses it; elsewhere it is ignored."""

    v: Version
    id: Uuid
    ts: Timestamp
    trace_id: TraceId | MISSING | None = MISSING
    parent_span_id: SpanId | MISSING | None = MISSING


class _Reply(_Envelope):
    """Types on which section 2 requires `in_reply_to`."""

    in_reply_to: Uuid


class HelloFrame(_Envelope):
    type: Literal["hello"]
    payload: HelloPayload


class WelcomeFrame(_Envelope):
    type: Literal["welcome"]
    in_reply_to: Uuid | MISSING | None = MISSING
    payload: WelcomePayload


class DispatchFrame(_Envelope):
    type: Literal["dispatch"]
    payload: DispatchPayload

    @model_validator(mode="after")
    def _dispatch_id_is_frame_id(self) -> Self:
        if self.payload.dispatch_id != self.id:
            raise ValueError("payload.dispatch_id differs from the envelope id")
        return self


class DispatchAckFrame(_Reply):
    type: Literal["dispatch_ack"]
    payload: EmptyPayload


class DispatchChunkFrame(_Reply):
    type: Literal["dispatch_chunk"]
    payload: DispatchChunkPayload


class DispatchResultFrame(_Reply):
    type: Literal["dispatch_result"]
    payload: DispatchResultPayload


class ToolCallFrame(_Envelope):
    type: Literal["tool_call"]
    payload: ToolCallPayload


class ToolResultFrame(_Reply):
    type: Literal["tool_result"]
    payload: ToolResultPayload


class HeartbeatFrame(_Envelope):
    type: Literal["heartbeat"]
    payload: HeartbeatPayload


class PingFrame(_Envelope):
    type: Literal["ping"]
    payload: EmptyPayload


class PongFrame(_Reply):
    type: Literal["pong"]
    payload: EmptyPayload


class ErrorFrame(_Envelope):
    type: Literal["error"]
    in_reply_to: Uuid | MISSING | None = MISSING
    payload: ErrorPayload


class CloseRequestFrame(_Envelope):
    type: Literal["close_request"]
    payload: CloseRequestPayload


class CancelFrame(_Envelope):
    type: Literal["cancel"]
    payload: CancelPayload


class TokenRefreshFrame(_Envelope):
    type: Literal["token_refresh"]
    payload: TokenRefreshPayload


class UnknownFrame(_Envelope):
    """A valid envelope of a type we do not know: the "keep the socket" failure."""

    type: NonEmptyStr
    payload: Object


Frame = Annotated[
    HelloFrame
    | WelcomeFrame
    | DispatchFrame
    | DispatchAckFrame
    | DispatchChunkFrame
    | DispatchResultFrame
    | ToolCallFrame
    | ToolResultFrame
    | HeartbeatFrame
    | PingFrame
    | PongFrame
    | ErrorFrame
    | CloseRequestFrame
    | CancelFrame
    | TokenRefreshFrame,
    Field(discriminator="type"),
]

_FRAME_ADAPTER: TypeAdapter[Frame] = TypeAdapter(Frame)
_validate_json = _FRAME_ADAPTER.validate_json
_dump_json = _FRAME_ADAPTER.dump_json
_UUID_ADAPTER: TypeAdapter[str] = TypeAdapter(Uuid, config=ConfigDict(strict=True))


def _readable_id(data: bytes | str) -> str | None:
    """The frame's id for `in_reply_to`, read again on the (rare) failure path."""
    try:
        return _UUID_ADAPTER.validate_python(json.loads(data)["id"])
    except (ValueError, TypeError, KeyError, IndexError, RecursionError):
        return None


def _frame_error(data: bytes | str, exc: ValidationError) -> FrameError:
    if isinstance(data, bytes):
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            return FrameError("message is not valid UTF-8", close_code=1007)
    first = exc.errors(include_url=False, include_context=False)[0]
    if first["type"] == "union_tag_invalid" and not first["loc"]:
        try:
            unknown = UnknownFrame.model_validate(first["input"])
        except ValidationError:
            pass
        else:
            return FrameError(
                f"unknown frame type {unknown.type!r}", close_code=None, frame_id=unknown.id
            )
    return FrameError(f"invalid frame: {first['msg']}", frame_id=_readable_id(data))


def decode(data: bytes | str) -> Frame:
    """Validate one text message into its frame model, or raise `FrameError`."""
    try:
        return _validate_json(data)
    except ValidationError as exc:
        raise _frame_error(data, exc) from None


def encode(frame: Frame) -> bytes:
    """Compact JSON; `MISSING` optional fields are left out."""
    return _dump_json(frame)
