"""W3C Trace Context and W3C Baggage for a dispatch's `session_context`.

A dispatch (spec section 3) and a hosted `/send` call (spec section 8) carry the
caller's trace context in `payload.session_context.propagation_headers`
(`traceparent`, `tracestate`, `baggage`). This module parses those headers into a
`SessionTraceContext` for the handler, and builds the headers a handler sends on
for a child span. Trace context is telemetry, not protocol: a malformed header
never fails a dispatch, it only restarts the trace (W3C Trace Context,
"Versioning of traceparent").

Pure: no clock, no I/O. Ids for a new trace or span come from an injectable
random source.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import quote, unquote

from .errors import LocalProtocolError, TraceContextError  # the latter re-exported here

__all__ = [
    "BAGGAGE_MAX_BYTES",
    "BAGGAGE_MAX_MEMBERS",
    "Baggage",
    "BaggageMember",
    "BaggageProperty",
    "SessionTraceContext",
    "TraceContextError",
    "TraceParent",
    "child_propagation_headers",
    "format_baggage",
    "format_traceparent",
    "new_span_id",
    "new_trace_id",
    "parse_baggage",
    "parse_traceparent",
    "trace_context_from_headers",
]


# --------------------------------------------------------------------------- traceparent

_LOWER_HEX: Final = re.compile("[0-9a-f]*")
_OWS: Final = " \t"
_V00_LENGTH: Final = 55
_FLAG_SAMPLED: Final = 0x01
# Trace Context level 1 defines only the sampled bit; other bits of a *higher*
# version mean something we cannot know, so they are not re-emitted as version 00.
_KNOWN_FLAGS: Final = _FLAG_SAMPLED


def _is_lower_hex(text: str) -> bool:
    return _LOWER_HEX.fullmatch(text) is not None


def _check_id(name: str, text: str, length: int) -> str | None:
    """Return what is wrong with a trace-id / parent-id, or None when it is valid."""
    if not isinstance(text, str) or len(text) != length or not _is_lower_hex(text):
        return f"{name} must be {length} lowercase hex digits, got {text!r}"
    if text == "0" * length:
        return f"{name} must not be all zeros"
    return None


def _check_flags(flags: object) -> None:
    if isinstance(flags, bool) or not isinstance(flags, int) or not 0 <= flags <= 0xFF:
        raise LocalProtocolError(f"trace_flags must be an int in 0..255, got {flags!r}")


@dataclass(frozen=True, slots=True)
class TraceParent:
    """One parsed `traceparent` value (W3C Trace Context level 1).

    `version` is kept as received so a caller can see a future version;
    `format_traceparent` always emits version `00`, the highest this library knows.
    """

    version: str
    trace_id: str
    parent_id: str
    trace_flags: int

    def __post_init__(self) -> None:
        version = self.version
        if not isinstance(version, str) or len(version) != 2 or not _is_lower_hex(version):
            raise LocalProtocolError(f"version must be 2 lowercase hex digits, got {version!r}")
        if version == "ff":
            raise LocalProtocolError("version 'ff' is forbidden by W3C Trace Context")
        for problem in (
            _check_id("trace_id", self.trace_id, 32),
            _check_id("parent_id", self.parent_id, 16),
        ):
            if problem is not None:
                raise LocalProtocolError(problem)
        _check_flags(self.trace_flags)

    @property
    def sampled(self) -> bool:
        """The caller may have recorded this request (the only level-1 flag)."""
        return bool(self.trace_flags & _FLAG_SAMPLED)


def parse_traceparent(value: str) -> TraceParent:
    """Parse a `traceparent` header value strictly by W3C Trace Context level 1.

    Leading and trailing spaces/tabs are ignored. Version `00` must be exactly
    55 characters. A higher version (`01`..`fe`) is read with the version-00
    layout from its first 55 characters; anything after them must start with
    `-` and is ignored. Raises `TraceContextError` saying what is wrong.
    """
    text = value.strip(_OWS)
    version = text[:2]
    if len(version) != 2 or not _is_lower_hex(version) or text[2:3] != "-":
        raise TraceContextError(
            f"traceparent must start with a 2-digit lowercase hex version and '-', got {text!r}"
        )
    if version == "ff":
        raise TraceContextError("traceparent version 'ff' is forbidden")
    if version == "00":
        if len(text) != _V00_LENGTH:
            raise TraceContextError(
                f"a version-00 traceparent is exactly {_V00_LENGTH} characters, got {len(text)}"
            )
    else:
        if len(text) < _V00_LENGTH:
            raise TraceContextError(
                f"a version-{version} traceparent needs at least {_V00_LENGTH} characters, "
                f"got {len(text)}"
            )
        if len(text) > _V00_LENGTH and text[_V00_LENGTH] != "-":
            raise TraceContextError(
                f"the fields after a version-{version} traceparent's flags must start with '-'"
            )
    if text[35] != "-" or text[52] != "-":
        raise TraceContextError(
            "traceparent must be version-trace_id-parent_id-flags with 32 and 16 hex digit ids"
        )
    trace_id, parent_id, flags = text[3:35], text[36:52], text[53:55]
    for problem in (_check_id("trace-id", trace_id, 32), _check_id("parent-id", parent_id, 16)):
        if problem is not None:
            raise TraceContextError(problem)
    if not _is_lower_hex(flags):
        raise TraceContextError(f"trace-flags must be 2 lowercase hex digits, got {flags!r}")
    return TraceParent(version, trace_id, parent_id, int(flags, 16))


def _reemitted_flags(traceparent: TraceParent) -> int:
    if traceparent.version == "00":
        return traceparent.trace_flags
    return traceparent.trace_flags & _KNOWN_FLAGS


def format_traceparent(traceparent: TraceParent) -> str:
    """Emit `traceparent` as version `00`, the highest version this library knows.

    W3C requires re-emitting in the highest known version. Flags of a version-00
    value are kept whole (a newer level-1 peer may use more bits); flags of a
    higher version keep only the bits level 1 defines (sampled).
    """
    flags = _reemitted_flags(traceparent)
    return f"00-{traceparent.trace_id}-{traceparent.parent_id}-{flags:02x}"


def _random_hex_id(random_bytes: Callable[[int], bytes], size: int) -> str:
    # W3C forbids the all-zero id; with a real random source this loops once.
    for _ in range(16):
        chunk = random_bytes(size)
        if not isinstance(chunk, bytes) or len(chunk) != size:
            raise LocalProtocolError(f"random_bytes({size}) must return {size} bytes")
        if any(chunk):
            return chunk.hex()
    raise LocalProtocolError("random_bytes keeps returning zeros: it is not a random source")


def new_trace_id(random_bytes: Callable[[int], bytes] = secrets.token_bytes) -> str:
    """A fresh random 32-hex-digit trace-id, for starting a trace (W3C: random, not zero)."""
    return _random_hex_id(random_bytes, 16)


def new_span_id(random_bytes: Callable[[int], bytes] = secrets.token_bytes) -> str:
    """A fresh random 16-hex-digit span id, to become the child's `parent-id`."""
    return _random_hex_id(random_bytes, 8)


# --------------------------------------------------------------------------- baggage

BAGGAGE_MAX_MEMBERS: Final = 64
"""W3C Baggage: a platform must propagate at least 64 list-members; we keep exactly that many."""
BAGGAGE_MAX_BYTES: Final = 8192
"""W3C Baggage: a platform must propagate at least 8192 bytes; we keep exactly that much."""

# RFC 7230 section 3.2.6: token = 1*tchar.
_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# W3C Baggage baggage-octet: %x21 / %x23-2B / %x2D-3A / %x3C-5B / %x5D-7E.
_BAGGAGE_OCTETS: Final = re.compile(r"[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*")
# Characters a formatted value may carry unescaped: baggage-octets except "%",
# which must be escaped so decoding gives back exactly the original text.
_VALUE_SAFE: Final = "".join(chr(code) for code in range(0x21, 0x7F) if chr(code) not in '",;\\%')
_UNESCAPED_VALUE: Final = re.compile(r"[\x21\x23\x24\x26-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*")
# A "%" not followed by two hex digits.
_MALFORMED_ESCAPE: Final = re.compile("%(?![0-9A-Fa-f]{2})")


def _is_token(text: str) -> bool:
    return _TOKEN.fullmatch(text) is not None


def _is_baggage_octets(text: str) -> bool:
    return _BAGGAGE_OCTETS.fullmatch(text) is not None


@dataclass(frozen=True, slots=True)
class BaggageProperty:
    """A `;key` or `;key=value` property of a baggage list-member.

    W3C leaves property semantics opaque, so `value` is kept as sent (not
    percent-decoded) and must consist of baggage-octets; `None` means `;key`.
    """

    key: str
    value: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not _is_token(self.key):
            raise LocalProtocolError(
                f"baggage property key must be an RFC 7230 token: {self.key!r}"
            )
        if self.value is not None and (
            not isinstance(self.value, str) or not _is_baggage_octets(self.value)
        ):
            raise LocalProtocolError(
                "baggage property value must be printable ASCII without space, '\"', ',', ';' "
                f"or '\\': {self.value!r}"
            )


@dataclass(frozen=True, slots=True)
class BaggageMember:
    """One baggage list-member: `key`, its decoded `value` and its properties."""

    key: str
    value: str
    properties: tuple[BaggageProperty, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not _is_token(self.key):
            raise LocalProtocolError(f"baggage key must be an RFC 7230 token: {self.key!r}")
        if not isinstance(self.value, str):
            raise LocalProtocolError(
                f"baggage value must be a str, got {type(self.value).__name__}"
            )
        try:
            self.value.encode("utf-8")
        except UnicodeEncodeError:
            raise LocalProtocolError(
                f"baggage value for {self.key!r} is not encodable as UTF-8"
            ) from None
        if not isinstance(self.properties, tuple) or not all(
            isinstance(item, BaggageProperty) for item in self.properties
        ):
            raise LocalProtocolError("baggage member properties must be a tuple of BaggageProperty")

    def encoded(self) -> str:
        """The member as it appears in a header: value percent-encoded as UTF-8."""
        value = self.value
        if _UNESCAPED_VALUE.fullmatch(value) is None:  # the common case needs no quote()
            value = quote(value, safe=_VALUE_SAFE)
        parts = [f"{self.key}={value}"]
        parts.extend(
            prop.key if prop.value is None else f"{prop.key}={prop.value}"
            for prop in self.properties
        )
        return ";".join(parts)


class Baggage(Mapping[str, str]):
    """Immutable W3C baggage: a mapping key -> decoded value, in header order.

    `members` and `properties(key)` give each member's properties. Duplicate keys
    follow dict assignment: the later member wins (value and properties) and keeps
    the earlier member's position. Build one from a mapping of values or from
    `BaggageMember`s; `with_member` / `without` return changed copies.
    """

    __slots__ = ("_members",)

    _members: dict[str, BaggageMember]

    def __init__(self, entries: Mapping[str, str] | Iterable[BaggageMember] = ()) -> None:
        members: dict[str, BaggageMember] = {}
        if isinstance(entries, Baggage):
            members.update(entries._members)
        elif isinstance(entries, Mapping):
            for key, value in entries.items():
                members[key] = BaggageMember(key, value)
        else:
            for member in entries:
                if not isinstance(member, BaggageMember):
                    raise LocalProtocolError(
                        f"Baggage takes a mapping or BaggageMembers, got {type(member).__name__}"
                    )
                members[member.key] = member
        object.__setattr__(self, "_members", members)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Baggage is immutable: use with_member() or without()")

    def __getitem__(self, key: str) -> str:
        return self._members[key].value

    def __iter__(self) -> Iterator[str]:
        return iter(self._members)

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, key: object) -> bool:
        return key in self._members

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Baggage):
            return self.members == other.members
        if isinstance(other, Mapping):
            return dict(self.items()) == dict(other.items())
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.members)

    def __repr__(self) -> str:
        return f"Baggage({list(self._members.values())!r})"

    @property
    def members(self) -> tuple[BaggageMember, ...]:
        """Every member in order, with its properties."""
        return tuple(self._members.values())

    def member(self, key: str) -> BaggageMember:
        """The whole member for `key` (raises KeyError when absent)."""
        return self._members[key]

    def properties(self, key: str) -> tuple[BaggageProperty, ...]:
        """The properties of the member `key` (raises KeyError when absent)."""
        return self._members[key].properties

    def with_member(
        self, key: str, value: str, properties: Iterable[BaggageProperty] = ()
    ) -> Baggage:
        """A copy with `key` set (replaced in place when present, else appended)."""
        return Baggage([*self._members.values(), BaggageMember(key, value, tuple(properties))])

    def without(self, key: str) -> Baggage:
        """A copy without `key` (unchanged when absent)."""
        return Baggage(member for name, member in self._members.items() if name != key)


def _split_key_value(text: str) -> tuple[str, str | None]:
    """Split `key OWS "=" OWS value` at the first "=" (values may contain "=")."""
    key, sep, value = text.partition("=")
    return key.strip(_OWS), (value.strip(_OWS) if sep else None)


def _decode_value(raw: str) -> str | None:
    """Percent-decode a value; None when an escape is malformed.

    Escapes that decode to invalid UTF-8 become U+FFFD, as W3C Baggage requires.
    """
    if "%" not in raw:
        return raw
    if _MALFORMED_ESCAPE.search(raw) is not None:
        return None
    return unquote(raw, encoding="utf-8", errors="replace")


def _parse_member(text: str) -> BaggageMember | str:
    """Parse one list-member; return it, or a message saying why it is malformed."""
    head, *property_texts = text.split(";")
    key, raw_value = _split_key_value(head)
    if not _is_token(key):
        return f"baggage key must be an RFC 7230 token, got {key!r}"
    if raw_value is None:
        return f"baggage member {key!r} has no '='"
    if not _is_baggage_octets(raw_value):
        return f"baggage value for {key!r} has a character that must be percent-encoded"
    value = _decode_value(raw_value)
    if value is None:
        return f"baggage value for {key!r} has a malformed percent-escape"
    properties: list[BaggageProperty] = []
    for property_text in property_texts:
        prop_key, prop_value = _split_key_value(property_text)
        if not _is_token(prop_key):
            return f"baggage property key of {key!r} must be an RFC 7230 token, got {prop_key!r}"
        if prop_value is not None and not _is_baggage_octets(prop_value):
            return f"baggage property {prop_key!r} of {key!r} has an invalid character"
        properties.append(BaggageProperty(prop_key, prop_value))
    return BaggageMember(key, value, tuple(properties))


def _within_limits(members: Iterable[BaggageMember]) -> tuple[list[BaggageMember], int]:
    """Keep members in order while the header stays within the W3C limits.

    A member that would push the header past 64 members or 8192 bytes is dropped
    whole (W3C forbids propagating part of a member); later, smaller members may
    still fit. Returns the kept members and how many were dropped.
    """
    kept: list[BaggageMember] = []
    size = 0
    dropped = 0
    for member in members:
        member_size = len(member.encoded().encode("ascii")) + (1 if kept else 0)
        if len(kept) < BAGGAGE_MAX_MEMBERS and size + member_size <= BAGGAGE_MAX_BYTES:
            kept.append(member)
            size += member_size
        else:
            dropped += 1
    return kept, dropped


def parse_baggage(value: str, *, strict: bool = False) -> Baggage:
    """Parse a W3C `baggage` header value.

    Lenient by default, because baggage is best-effort telemetry that must not
    fail a dispatch (spec sections 3 and 8), and W3C lets a receiver drop entries:
    * a malformed list-member (bad key, no "=", a character that must be
      percent-encoded, a `%` not followed by two hex digits, a bad property) is
      dropped on its own; the other members are kept;
    * empty list-members (`a=1,,b=2`) are skipped;
    * members beyond 64 or beyond 8192 bytes (measured as re-emitted by
      `format_baggage`) are dropped whole; the rest are kept.
    Percent-escapes that are not valid UTF-8 decode to U+FFFD (W3C). OWS around
    `,`, `;` and `=` is trimmed. Order is kept; for a duplicate key the later
    member wins, at the earlier one's position.

    With `strict=True` any malformed member or exceeded limit raises
    `TraceContextError` instead.
    """
    parsed: list[BaggageMember] = []
    for member_text in value.split(","):
        if not member_text.strip(_OWS):
            continue
        member = _parse_member(member_text)
        if isinstance(member, str):
            if strict:
                raise TraceContextError(member)
            continue
        parsed.append(member)
    kept, dropped = _within_limits(Baggage(parsed).members)
    if dropped and strict:
        raise TraceContextError(
            f"baggage exceeds {BAGGAGE_MAX_MEMBERS} members or {BAGGAGE_MAX_BYTES} bytes"
        )
    return Baggage(kept)


def format_baggage(baggage: Mapping[str, str]) -> str:
    """Emit a `baggage` header value; values are percent-encoded as UTF-8.

    Accepts a `Baggage` (properties kept) or any mapping of key -> value. Members
    that do not fit the W3C limits (64 members, 8192 bytes) are dropped whole, in
    order, exactly as `parse_baggage` drops them, so the header is always
    propagatable. Raises `LocalProtocolError` for a key that is not a token.
    """
    members = baggage.members if isinstance(baggage, Baggage) else Baggage(baggage).members
    kept, _ = _within_limits(members)
    return ",".join(member.encoded() for member in kept)


# --------------------------------------------------------------------------- session context

_EMPTY_BAGGAGE: Final = Baggage()


@dataclass(frozen=True, slots=True)
class SessionTraceContext:
    """The trace context a handler receives with a dispatch (seed: CapabilitySessionContext).

    `parent_trace_id` / `parent_span_id` are None when the caller sent no valid
    `traceparent`: the handler then starts a new trace. `trace_flags` are the
    parent's flags as this library re-emits them (version 00); `tracestate` is
    the caller's vendor state, kept verbatim only alongside a valid parent.
    `baggage` is always a `Baggage` (a plain mapping passed in is converted).
    """

    parent_trace_id: str | None = None
    parent_span_id: str | None = None
    baggage: Mapping[str, str] = field(default=_EMPTY_BAGGAGE)
    trace_flags: int = 0
    tracestate: str | None = None

    def __post_init__(self) -> None:
        if (self.parent_trace_id is None) != (self.parent_span_id is None):
            raise LocalProtocolError("parent_trace_id and parent_span_id are set together or not")
        if self.parent_trace_id is not None and self.parent_span_id is not None:
            for problem in (
                _check_id("parent_trace_id", self.parent_trace_id, 32),
                _check_id("parent_span_id", self.parent_span_id, 16),
            ):
                if problem is not None:
                    raise LocalProtocolError(problem)
        _check_flags(self.trace_flags)
        if not isinstance(self.baggage, Baggage):
            object.__setattr__(self, "baggage", Baggage(self.baggage))

    @property
    def sampled(self) -> bool:
        """The caller may have recorded its span (W3C sampled flag)."""
        return bool(self.trace_flags & _FLAG_SAMPLED)

    @property
    def traceparent(self) -> TraceParent | None:
        """The parent as a `TraceParent`, or None when there is none."""
        if self.parent_trace_id is None or self.parent_span_id is None:
            return None
        return TraceParent("00", self.parent_trace_id, self.parent_span_id, self.trace_flags)


def _header_values(headers: Mapping[str, str], name: str) -> list[str]:
    """Values of `name` matched case-insensitively (W3C: names in any case)."""
    return [
        value
        for key, value in headers.items()
        if isinstance(key, str) and key.lower() == name and isinstance(value, str)
    ]


def _is_printable_ascii(text: str) -> bool:
    return all(" " <= char <= "~" or char == "\t" for char in text)


def trace_context_from_headers(headers: Mapping[str, str] | None) -> SessionTraceContext:
    """Build a handler's trace context from `session_context.propagation_headers`.

    Never raises for peer input (spec sections 3 and 8: trace context must not
    fail a dispatch). Header names match in any case. An absent, malformed or
    duplicated `traceparent` gives no parent (W3C: restart the trace) and drops
    `tracestate` with it. Several `baggage` or `tracestate` entries differing
    only in case are joined with "," (RFC 7230 list headers). Baggage is parsed
    leniently (see `parse_baggage`).
    """
    if not headers or not isinstance(headers, Mapping):
        return SessionTraceContext()
    parent: TraceParent | None = None
    traceparents = _header_values(headers, "traceparent")
    if len(traceparents) == 1:
        try:
            parent = parse_traceparent(traceparents[0])
        except TraceContextError:
            parent = None
    tracestate: str | None = None
    if parent is not None:
        states = _header_values(headers, "tracestate")
        joined = ",".join(state.strip(_OWS) for state in states)
        # Kept verbatim for propagation; a control character (header injection) drops it.
        if joined and _is_printable_ascii(joined):
            tracestate = joined
    baggage_values = _header_values(headers, "baggage")
    baggage = parse_baggage(",".join(baggage_values)) if baggage_values else _EMPTY_BAGGAGE
    if parent is None:
        return SessionTraceContext(baggage=baggage)
    return SessionTraceContext(
        parent_trace_id=parent.trace_id,
        parent_span_id=parent.parent_id,
        baggage=baggage,
        trace_flags=_reemitted_flags(parent),
        tracestate=tracestate,
    )


def child_propagation_headers(
    context: SessionTraceContext,
    span_id: str,
    *,
    new_trace_id: str | None = None,
    sampled: bool | None = None,
) -> dict[str, str]:
    """Outgoing `propagation_headers` for a child span `span_id` of `context`.

    Continues the parent's trace when there is one (its `tracestate` goes along);
    otherwise starts the trace `new_trace_id` (see `new_trace_id()`), and raises
    `LocalProtocolError` when none is given. `sampled` overrides the sampled bit;
    by default it is inherited, and a new trace starts unsampled (W3C's default
    for a trace initiated here). Baggage is re-emitted with `format_baggage`.
    """
    problem = _check_id("span_id", span_id, 16)
    if problem is not None:
        raise LocalProtocolError(problem)
    if context.parent_trace_id is not None:
        trace_id = context.parent_trace_id
        flags = context.trace_flags
        tracestate = context.tracestate
    elif new_trace_id is not None:
        problem = _check_id("new_trace_id", new_trace_id, 32)
        if problem is not None:
            raise LocalProtocolError(problem)
        trace_id, flags, tracestate = new_trace_id, 0, None
    else:
        raise LocalProtocolError(
            "the context has no parent trace: pass new_trace_id=new_trace_id() to start one"
        )
    if sampled is not None:
        flags = (flags | _FLAG_SAMPLED) if sampled else (flags & ~_FLAG_SAMPLED)
    headers = {"traceparent": format_traceparent(TraceParent("00", trace_id, span_id, flags))}
    if tracestate:
        headers["tracestate"] = tracestate
    baggage_text = format_baggage(context.baggage)
    if baggage_text:
        headers["baggage"] = baggage_text
    return headers
