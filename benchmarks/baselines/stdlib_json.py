"""Baseline 2: stdlib `json` plus the spec's rules hand-written in plain Python.

This is what a careful implementer writes with no schema library: parse to
dicts, then walk the envelope (spec section 2) and the payload of the frame's
type (section 3). The decoded frame is the validated dict itself, so encoding is
one `json.dumps`. Failures raise `FrameError` with the close code the spec
assigns: 1007 for bytes that are not UTF-8, `None` ("keep the socket") for a
valid envelope of an unknown type, 1002 for everything else.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any, TypeGuard

from svantic_proto.errors import FrameError

from ._rules import (
    DISPATCH_AUTH_TYPES,
    HEARTBEAT_STATUSES,
    REPLY_OPTIONAL_TYPES,
    REPLY_REQUIRED_TYPES,
    SPAN_ID_PATTERN,
    TIMESTAMP_PATTERN,
    TRACE_ID_PATTERN,
    UUID_PATTERN,
)

__all__ = ["decode", "encode"]

_is_uuid = re.compile(UUID_PATTERN).fullmatch
_is_timestamp = re.compile(TIMESTAMP_PATTERN).fullmatch
_is_trace_id = re.compile(TRACE_ID_PATTERN).fullmatch
_is_span_id = re.compile(SPAN_ID_PATTERN).fullmatch

_MISSING: Any = object()
_USES_IN_REPLY_TO = REPLY_REQUIRED_TYPES | REPLY_OPTIONAL_TYPES


class _Invalid(Exception):
    """A rule failed; `decode` turns it into a `FrameError` carrying the frame id."""


def _reject_constant(name: str) -> float:
    # json.loads accepts NaN / Infinity, which are not JSON (RFC 8259).
    raise ValueError(f"{name} is not JSON")


def _is_integer(value: object) -> TypeGuard[int]:
    # Section 2: integers reject 1.0 / 1e3 (parsed as float), strings and booleans.
    return type(value) is int


def _is_number(value: object) -> bool:
    # Section 2: a float field accepts a JSON integer; booleans are not numbers.
    return type(value) is float or type(value) is int


def _check_uuid(value: object, field: str) -> None:
    if type(value) is not str or _is_uuid(value) is None:
        raise _Invalid(f"{field} is not a canonical lowercase UUID")


# Optional fields (spec section 3 `?`) may also be `null`, read as absent, unless they
# have a non-null default (`arguments`, `attempt`, `grace_seconds`): then `null` is
# refused, as it is by the codec.


def _require_str(payload: dict[str, Any], field: str, *, non_empty: bool = False) -> None:
    value = payload.get(field)
    if type(value) is not str or (non_empty and not value):
        raise _Invalid(f"payload.{field} is required and must be a non-empty string")


def _optional_str(payload: dict[str, Any], field: str) -> None:
    value = payload.get(field)
    if value is not None and type(value) is not str:
        raise _Invalid(f"payload.{field} must be a string")


def _require_count(payload: dict[str, Any], field: str, minimum: int = 0) -> None:
    value = payload.get(field)
    if not _is_integer(value) or value < minimum:
        raise _Invalid(f"payload.{field} is required and must be an integer >= {minimum}")


def _optional_count(
    payload: dict[str, Any], field: str, minimum: int = 0, *, nullable: bool = True
) -> None:
    value = payload.get(field, _MISSING)
    if value is _MISSING or (value is None and nullable):
        return
    if not _is_integer(value) or value < minimum:
        raise _Invalid(f"payload.{field} must be an integer >= {minimum}")


def _optional_object(payload: dict[str, Any], field: str, *, nullable: bool = True) -> None:
    value = payload.get(field, _MISSING)
    if value is _MISSING or (value is None and nullable):
        return
    if type(value) is not dict:
        raise _Invalid(f"payload.{field} must be an object")


def _require_present(payload: dict[str, Any], field: str) -> None:
    # "any" fields may be null, but must be there.
    if field not in payload:
        raise _Invalid(f"payload.{field} is required")


# --- section 3 payload rules, one function per frame type -------------------------


def _hello(frame: dict[str, Any], payload: dict[str, Any]) -> None:
    _require_str(payload, "instance_id", non_empty=True)
    _optional_str(payload, "agent_type")
    _optional_str(payload, "resume_token")
    sdk = payload.get("sdk")
    if sdk is not None:
        if type(sdk) is not dict:
            raise _Invalid("payload.sdk must be an object")
        _require_str(sdk, "name")
        _require_str(sdk, "version")
    capabilities = payload.get("capabilities")
    if capabilities is not None and (
        type(capabilities) is not list or any(type(item) is not str for item in capabilities)
    ):
        raise _Invalid("payload.capabilities must be a list of strings")


def _welcome(frame: dict[str, Any], payload: dict[str, Any]) -> None:
    _require_str(payload, "connection_id")
    if type(payload.get("resumed")) is not bool:
        raise _Invalid("payload.resumed is required and must be a boolean")
    replayed = payload.get("replayed_dispatches")
    if type(replayed) is not list:
        raise _Invalid("payload.replayed_dispatches is required and must be a list")
    for dispatch_id in replayed:
        _check_uuid(dispatch_id, "payload.replayed_dispatches[]")
    _require_str(payload, "resume_token")
    _require_count(payload, "heartbeat_interval_ms", minimum=1)
    _optional_count(payload, "max_message_bytes", minimum=1)


def _dispatch_auth(auth: object) -> None:
    # Section 3: a wrong *shape* is a malformed frame (1002); whether it verifies is
    # the connection's business, not the codec's.
    if type(auth) is not dict:
        raise _Invalid("payload.dispatch_auth must be an object")
    auth_type = auth.get("type")
    if type(auth_type) is not str or auth_type not in DISPATCH_AUTH_TYPES:
        raise _Invalid("payload.dispatch_auth.type is unknown")
    if auth_type == "svantic_jwt":
        _require_str(auth, "token")
    elif auth_type == "shared_secret":
        _require_str(auth, "secret")


def _session_context(context: object) -> None:
    if type(context) is not dict:
        raise _Invalid("payload.session_context must be an object")
    _optional_str(context, "session_id")
    _optional_str(context, "tenant_id")
    headers = context.get("propagation_headers")
    if headers is not None and (
        type(headers) is not dict or any(type(value) is not str for value in headers.values())
    ):
        raise _Invalid("payload.session_context.propagation_headers must map to strings")


def _dispatch(frame: dict[str, Any], payload: dict[str, Any]) -> None:
    dispatch_id = payload.get("dispatch_id")
    _check_uuid(dispatch_id, "payload.dispatch_id")
    if dispatch_id != frame["id"]:
        raise _Invalid("payload.dispatch_id differs from the envelope id")
    _require_str(payload, "capability", non_empty=True)
    _optional_object(payload, "arguments", nullable=False)
    _require_count(payload, "deadline_ms", minimum=1)
    _optional_str(payload, "task_id")
    _optional_count(payload, "attempt", minimum=1, nullable=False)
    context = payload.get("session_context")
    if context is not None:
        _session_context(context)
    auth = payload.get("dispatch_auth")
    if auth is not None:
        _dispatch_auth(auth)


def _dispatch_chunk(frame: dict[str, Any], payload: dict[str, Any]) -> None:
    _require_count(payload, "seq")
    _require_present(payload, "data")


def _dispatch_result(frame: dict[str, Any], payload: dict[str, Any]) -> None:
    _require_present(payload, "result")


def _tool_call(frame: dict[str, Any], payload: dict[str, Any]) -> None:
    _require_str(payload, "tool", non_empty=True)
    _optional_object(payload, "arguments", nullable=False)
    _optional_count(payload, "deadline_ms", minimum=1)
    _optional_str(payload, "agent_type")
    _optional_str(payload, "instance_id")
    _optional_str(payload, "session_id")


def _tool_result(frame: dict[str, Any], payload: dict[str, Any]) -> None:
    has_error = "error" in payload
    if ("result" in payload) == has_error:
        raise _Invalid("payload needs exactly one of result and error")
    if has_error:
        error = payload["error"]
        if type(error) is not dict:
            raise _Invalid("payload.error must be an object")
        _require_str(error, "code")
        _require_str(error, "message")


def _heartbeat(frame: dict[str, Any], payload: dict[str, Any]) -> None:
    status = payload.get("status")
    if status is not None and (type(status) is not str or status not in HEARTBEAT_STATUSES):
        raise _Invalid("payload.status is not available, busy or offline")
    _require_count(payload, "active_sessions")
    _optional_count(payload, "max_concurrent_sessions")
    _optional_count(payload, "in_flight")
    load = payload.get("load")
    if load is not None and (not _is_number(load) or not 0 <= load <= 1):
        raise _Invalid("payload.load must be a number in [0, 1]")
    _optional_object(payload, "health")


def _any_payload(frame: dict[str, Any], payload: dict[str, Any]) -> None:
    # ping, pong, dispatch_ack: `{}`, and unknown fields are ignored.
    return


def _error(frame: dict[str, Any], payload: dict[str, Any]) -> None:
    _require_str(payload, "code", non_empty=True)
    _optional_str(payload, "message")
    _optional_object(payload, "detail")


def _close_request(frame: dict[str, Any], payload: dict[str, Any]) -> None:
    _optional_count(payload, "grace_seconds", nullable=False)
    _optional_str(payload, "reason")


def _cancel(frame: dict[str, Any], payload: dict[str, Any]) -> None:
    _check_uuid(payload.get("dispatch_id"), "payload.dispatch_id")
    _require_str(payload, "reason")


def _token_refresh(frame: dict[str, Any], payload: dict[str, Any]) -> None:
    _require_str(payload, "token", non_empty=True)


_PAYLOAD_RULES: dict[str, Callable[[dict[str, Any], dict[str, Any]], None]] = {
    "hello": _hello,
    "welcome": _welcome,
    "dispatch": _dispatch,
    "dispatch_ack": _any_payload,
    "dispatch_chunk": _dispatch_chunk,
    "dispatch_result": _dispatch_result,
    "tool_call": _tool_call,
    "tool_result": _tool_result,
    "heartbeat": _heartbeat,
    "ping": _any_payload,
    "pong": _any_payload,
    "error": _error,
    "close_request": _close_request,
    "cancel": _cancel,
    "token_refresh": _token_refresh,
}


def _check_envelope(frame: dict[str, Any]) -> str:
    """Section 2 rules; returns the frame type."""
    version = frame.get("v")
    if type(version) is not int or version != 1:
        raise _Invalid("v must be the integer 1")
    frame_type = frame.get("type")
    if type(frame_type) is not str or not frame_type:
        raise _Invalid("type must be a non-empty string")
    _check_uuid(frame.get("id"), "id")
    timestamp = frame.get("ts")
    if type(timestamp) is not str or _is_timestamp(timestamp) is None:
        raise _Invalid("ts must be an RFC 3339 timestamp")
    if frame_type in _USES_IN_REPLY_TO:
        in_reply_to = frame.get("in_reply_to")
        if in_reply_to is not None:
            _check_uuid(in_reply_to, "in_reply_to")
        elif frame_type in REPLY_REQUIRED_TYPES:
            raise _Invalid(f"in_reply_to is required on {frame_type}")
    trace_id = frame.get("trace_id")
    if trace_id is not None and (type(trace_id) is not str or _is_trace_id(trace_id) is None):
        raise _Invalid("trace_id must be 32 lowercase hex characters")
    span_id = frame.get("parent_span_id")
    if span_id is not None and (type(span_id) is not str or _is_span_id(span_id) is None):
        raise _Invalid("parent_span_id must be 16 lowercase hex characters")
    if type(frame.get("payload")) is not dict:
        raise _Invalid("payload must be an object")
    return frame_type


def _readable_id(frame: dict[str, Any]) -> str | None:
    frame_id = frame.get("id")
    if type(frame_id) is str and _is_uuid(frame_id) is not None:
        return frame_id
    return None


def decode(data: bytes | str) -> dict[str, Any]:
    """Parse and validate one text message; the frame is the validated dict."""
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FrameError("message is not valid UTF-8", close_code=1007) from exc
    else:
        text = data
    try:
        frame = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise FrameError(f"message is not JSON: {exc}") from exc
    if type(frame) is not dict:
        raise FrameError("message is not a JSON object")
    try:
        frame_type = _check_envelope(frame)
        payload_rules = _PAYLOAD_RULES.get(frame_type)
        if payload_rules is None:
            raise FrameError(
                f"unknown frame type {frame_type!r}", close_code=None, frame_id=frame["id"]
            )
        payload_rules(frame, frame["payload"])
    except _Invalid as exc:
        raise FrameError(str(exc), frame_id=_readable_id(frame)) from None
    return frame


def encode(frame: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON, like the codec's output."""
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
