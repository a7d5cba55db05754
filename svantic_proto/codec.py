"""Encode and decode svantic.v1 frames (spec section 2), and stamp new ones.

The hot path is one msgspec call each way: validation happens inside the
parse. Only when a message fails does the slow path run again over it, to work
out the outcome the spec prescribes (close 1007, BAD_FRAME and keep, or
BAD_FRAME then 1002) and the frame id to reply to.

Duplicate keys: the last occurrence of a key wins, in every reader in this
module (as in ECMAScript `JSON.parse`, Python's `json` and msgspec), so the
frame we act on and the id we reply to are read from the same value. A
duplicated `type` whose values differ is rejected outright.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import msgspec

from .errors import FrameError, LocalProtocolError
from .frames import (
    FRAME_TYPES,
    SPAN_ID_PATTERN,
    TIMESTAMP_PATTERN,
    TRACE_ID_PATTERN,
    UUID_PATTERN,
    Cancel,
    Dispatch,
    DispatchPayload,
    Frame,
    Welcome,
)
from .ids import IdFactory, is_canonical_uuid

__all__ = ["decode_frame", "encode_frame", "FrameFactory"]

_decode = msgspec.json.Decoder(Frame).decode
_encode = msgspec.json.Encoder().encode
_any_decoder = msgspec.json.Decoder()

# The fallback when `_speedups` is not built: one compiled regex over the concatenated envelope
# strings, the cheapest strict check in pure Python (see frames.py for why msgspec patterns
# are not used). The regexes are also the reference the C checks are tested against.
def _bare(pattern: str) -> str:
    return pattern.removeprefix("^").removesuffix("\\Z")


_U, _T = _bare(UUID_PATTERN), _bare(TIMESTAMP_PATTERN)
_X32, _X16 = _bare(TRACE_ID_PATTERN), _bare(SPAN_ID_PATTERN)
_valid_id_ts = re.compile(f"{_U}{_T}", re.ASCII).fullmatch
_valid_id_ts_reply = re.compile(f"{_U}{_T}{_U}", re.ASCII).fullmatch
_valid_envelope = re.compile(f"{_U}{_T}(?:{_U})?/(?:{_X32})?/(?:{_X16})?", re.ASCII).fullmatch

_PATTERN_NAMES = {
    UUID_PATTERN: "a canonical lowercase UUID",
    TIMESTAMP_PATTERN: "an RFC 3339 timestamp with a `T` and an offset",
    TRACE_ID_PATTERN: "32 lowercase hex characters",
    SPAN_ID_PATTERN: "16 lowercase hex characters",
}


class _Envelope(msgspec.Struct):
    """The type-independent part of a frame, to tell 'unknown type' from 'invalid'."""

    v: Any
    type: Any
    id: Any
    ts: Any
    payload: Any
    trace_id: Any = None
    parent_span_id: Any = None


_envelope_decoder = msgspec.json.Decoder(_Envelope)


def decode_frame(data: bytes | str) -> Frame:
    """Parse and validate one text message into a frame.

    Raises `FrameError` and nothing else for bad input: `.close_code` is
    1007 (not UTF-8), 1002 (invalid: answer BAD_FRAME then close) or `None`
    (a valid envelope of unknown type: answer BAD_FRAME and keep the socket).
    """
    try:
        frame: Frame = _decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError, UnicodeError) as exc:
        raise _explain(data, exc) from None
    except TypeError as exc:
        raise FrameError(f"a frame is text or bytes, not {type(data).__name__}") from exc
    # `data` goes along for its UTF-8 (msgspec skips unknown fields without checking it):
    # one call settles both, and `_explain` tells a bad encoding (1007) from a bad frame.
    if not _frame_ok(frame, data):
        raise _explain(data, None)
    return frame


def _frame_ok_re(frame: Frame, data: bytes | str | None = None) -> bool:
    """Spec section 2 formats of the envelope strings (one regex over their concatenation),
    then the payload rules the types cannot express, then, when `data` (the message the
    frame was read from) is bytes, that it is valid UTF-8."""
    if not _fields_ok_re(frame):
        return False
    if type(data) is bytes and not data.isascii():
        try:
            data.decode()
        except UnicodeDecodeError:
            return False
    return True


def _fields_ok_re(frame: Frame) -> bool:
    """The envelope and payload rules of `_frame_ok_re` (the ones C `frame_ok` also checks),
    apart from the UTF-8 check because they end in several early returns."""
    reply_to: str | None = frame.in_reply_to  # type: ignore[union-attr]  # None where unused
    if frame.trace_id is not None or frame.parent_span_id is not None:
        if "" in (frame.trace_id, frame.parent_span_id, reply_to):
            return False  # the regex takes an empty part as an absent one
        trace, span = frame.trace_id or "", frame.parent_span_id or ""
        text = f"{frame.id}{frame.ts}{reply_to or ''}/{trace}/{span}"
        valid = _valid_envelope(text)
    elif reply_to is None:
        valid = _valid_id_ts(frame.id + frame.ts)
    else:
        valid = _valid_id_ts_reply(frame.id + frame.ts + reply_to)
    if valid is None:
        return False
    payload_check = _PAYLOAD_CHECKS.get(type(frame))
    return payload_check is None or payload_check(frame)


# Payload rules checked after the parse, with the envelope's (see frames.py for why).
_PAYLOAD_CHECKS: dict[type, Callable[[Any], bool]] = {
    Dispatch: lambda f: f.payload.dispatch_id == f.id,
    Cancel: lambda f: is_canonical_uuid(f.payload.dispatch_id),
    Welcome: lambda f: all(is_canonical_uuid(i) for i in f.payload.replayed_dispatches),
}

_frame_ok: Callable[[Frame, bytes | str | None], bool]
try:  # the same checks in C, several times faster; built when a compiler is there
    from . import _speedups
except ImportError:  # pragma: no cover - tests/core/test_speedups.py runs both
    _frame_ok = _frame_ok_re
else:
    _speedups.configure(Dispatch, Cancel, Welcome)
    _frame_ok = _speedups.frame_ok


def encode_frame(frame: Frame) -> bytes:
    """Serialize a frame to the bytes of one text message.

    The frame is trusted (build it with `FrameFactory`); a value msgspec cannot
    serialize, such as an object in `result`, raises `LocalProtocolError`.
    """
    try:
        return _encode(frame)
    except (TypeError, ValueError, msgspec.EncodeError, RecursionError) as exc:
        raise LocalProtocolError(f"cannot encode {type(frame).__name__}: {exc}") from None


def _friendly(message: str) -> str:
    for pattern, name in _PATTERN_NAMES.items():
        message = message.replace(f"`str` matching regex {pattern!r}", name)
    return message


def _explain(data: bytes | str, exc: BaseException | None) -> FrameError:
    """Work out the spec's outcome for a message the fast path refused."""
    if isinstance(data, bytes):
        try:
            text = data.decode()
        except UnicodeDecodeError as err:
            return FrameError(f"text is not valid UTF-8 at byte {err.start}", close_code=1007)
    else:
        text = data
        try:
            text.encode()
        except UnicodeEncodeError:
            return FrameError("text contains a lone surrogate (not valid UTF-8)", close_code=1007)
    if isinstance(exc, RecursionError):
        return FrameError("JSON nested too deeply (the limit is about 1000 levels)")
    try:
        envelope = _envelope_decoder.decode(text)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError) as err:
        try:
            value = _any_decoder.decode(text)
        except (msgspec.DecodeError, RecursionError):
            return FrameError(f"not JSON: {err}")
        if not isinstance(value, dict):
            return FrameError(f"a frame is a JSON object, not {type(value).__name__}")
        frame_id = value.get("id")
        return FrameError(
            f"envelope invalid: {_friendly(str(err))}",
            frame_id=frame_id if is_canonical_uuid(frame_id) else None,
        )
    frame_id = envelope.id if is_canonical_uuid(envelope.id) else None
    problem = _envelope_problem(envelope)
    if problem is not None:
        return FrameError(problem, frame_id=frame_id)
    if envelope.type not in FRAME_TYPES:
        message = f"unknown frame type {envelope.type!r}"
        return FrameError(message, close_code=None, frame_id=frame_id)
    if exc is None:  # parsed, but failed a check done after the parse
        value = _any_decoder.decode(text)
        payload = value["payload"]
        uuid_name = _PATTERN_NAMES[UUID_PATTERN]
        if envelope.type == "dispatch" and payload.get("dispatch_id") != envelope.id:
            message = "`payload.dispatch_id` must equal the envelope `id`"
            return FrameError(message, frame_id=frame_id)
        if envelope.type == "cancel" and not is_canonical_uuid(payload.get("dispatch_id")):
            message = f"`payload.dispatch_id` must be {uuid_name}"
            return FrameError(message, frame_id=frame_id)
        replayed = payload.get("replayed_dispatches") or []
        if envelope.type == "welcome" and not all(is_canonical_uuid(i) for i in replayed):
            message = f"`payload.replayed_dispatches` must hold only {uuid_name} values"
            return FrameError(message, frame_id=frame_id)
        got = value.get("in_reply_to")
        message = f"`in_reply_to` must be {_PATTERN_NAMES[UUID_PATTERN]}, got {got!r}"
        return FrameError(message, frame_id=frame_id)
    return FrameError(f"invalid {envelope.type} frame: {_friendly(str(exc))}", frame_id=frame_id)


def _envelope_problem(env: _Envelope) -> str | None:
    """Spec section 2 rules that hold whatever the frame type, or None when all hold."""
    if type(env.v) is not int or env.v != 1:
        return f"`v` must be the integer 1, got {env.v!r}"
    if type(env.type) is not str or not env.type:
        return "`type` must be a non-empty string"
    if not is_canonical_uuid(env.id):
        return "`id` must be a canonical lowercase UUID"
    checks: tuple[tuple[str, Any, str], ...] = (
        ("ts", env.ts, TIMESTAMP_PATTERN),
        ("trace_id", env.trace_id, TRACE_ID_PATTERN),
        ("parent_span_id", env.parent_span_id, SPAN_ID_PATTERN),
    )
    for name, value, pattern in checks:
        if value is None and name != "ts":
            continue
        try:
            msgspec.convert(value, _PATTERN_TYPES[pattern])
        except msgspec.ValidationError:
            return f"`{name}` must be {_PATTERN_NAMES[pattern]}, got {value!r}"
    if not isinstance(env.payload, dict):
        return "`payload` must be a JSON object"
    return None


_PATTERN_TYPES: dict[str, Any] = {
    pattern: Annotated[str, msgspec.Meta(pattern=pattern)] for pattern in _PATTERN_NAMES
}

F = TypeVar("F", bound=Frame)


class FrameFactory:
    """Builds outgoing frames with `v`, a fresh UUID v7 `id` and `ts` filled in.

    Give it the wall clock (Unix seconds) and, for tests, a random source; the
    core never reads the clock itself.
    """

    __slots__ = ("_stamp", "ids")

    def __init__(
        self,
        wall_clock: Callable[[], float],
        random_bytes: Callable[[int], bytes] | None = None,
    ) -> None:
        self.ids = IdFactory(wall_clock) if random_bytes is None else IdFactory(
            wall_clock, random_bytes
        )
        self._stamp = self.ids.stamp

    def new(
        self,
        frame_type: type[F],
        payload: Any,
        *,
        in_reply_to: str | None = None,
        trace_id: str | None = None,
        parent_span_id: str | None = None,
    ) -> F:
        """A new frame of `frame_type` around `payload` (a payload Struct)."""
        frame_id, ts = self._stamp()
        extra: dict[str, Any] = {}
        if in_reply_to is not None:
            extra["in_reply_to"] = in_reply_to
        if trace_id is not None:
            extra["trace_id"] = trace_id
        if parent_span_id is not None:
            extra["parent_span_id"] = parent_span_id
        try:
            return frame_type(v=1, id=frame_id, ts=ts, payload=payload, **extra)
        except TypeError as exc:
            raise LocalProtocolError(f"cannot build {frame_type.__name__}: {exc}") from None

    def dispatch(
        self,
        *,
        capability: str,
        deadline_ms: int,
        arguments: dict[str, Any] | None = None,
        dispatch_id: str | None = None,
        **fields: Any,
    ) -> Dispatch:
        """A new dispatch whose envelope `id` and `payload.dispatch_id` agree (spec section 3).

        `dispatch_id` is given to re-deliver an existing dispatch after resume.
        """
        if type(deadline_ms) is not int or deadline_ms <= 0:
            raise LocalProtocolError(f"deadline_ms must be a positive int, got {deadline_ms!r}")
        if not capability:
            raise LocalProtocolError("capability must be a non-empty string")
        frame_id, ts = self._stamp()
        if dispatch_id is not None:
            frame_id = dispatch_id
        payload = DispatchPayload(
            dispatch_id=frame_id,
            capability=capability,
            deadline_ms=deadline_ms,
            arguments={} if arguments is None else arguments,
            **fields,
        )
        return Dispatch(v=1, id=frame_id, ts=ts, payload=payload)
