"""Wire rules shared by the validating baselines (spec sections 2 and 3).

Kept in one place so the stdlib and pydantic baselines check exactly the same
things; the patterns are written for both Python's `re` and pydantic-core's Rust
regex engine, so they spell digits `[0-9]` (`\\d` matches every Unicode digit in
both engines) and are always matched against the whole string.
"""

from __future__ import annotations

__all__ = [
    "DISPATCH_AUTH_TYPES",
    "HEARTBEAT_STATUSES",
    "KNOWN_TYPES",
    "REPLY_OPTIONAL_TYPES",
    "REPLY_REQUIRED_TYPES",
    "SPAN_ID_PATTERN",
    "TIMESTAMP_PATTERN",
    "TRACE_ID_PATTERN",
    "UUID_PATTERN",
]

# Section 3: every frame type this protocol version (with our extensions) knows.
# Any other non-empty `type` on a valid envelope is the "keep the socket" failure.
KNOWN_TYPES: tuple[str, ...] = (
    "hello",
    "welcome",
    "dispatch",
    "dispatch_ack",
    "dispatch_chunk",
    "dispatch_result",
    "tool_call",
    "tool_result",
    "heartbeat",
    "ping",
    "pong",
    "error",
    "close_request",
    "cancel",
    "token_refresh",
)

# Section 2: `in_reply_to` is required on these, optional (a UUID or null) on
# welcome and error, and ignored, whatever its value, on every other type.
REPLY_REQUIRED_TYPES: frozenset[str] = frozenset(
    {"dispatch_result", "dispatch_chunk", "dispatch_ack", "tool_result", "pong"}
)
REPLY_OPTIONAL_TYPES: frozenset[str] = frozenset({"welcome", "error"})

# Section 3 heartbeat `status` enum, and the section 7 dispatch_auth `type`s. A
# `mtls` envelope parses (it is reserved, not unknown) so that the agent can answer
# DISPATCH_AUTH_FAILED rather than drop the connection, as the codec does.
HEARTBEAT_STATUSES: frozenset[str] = frozenset({"available", "busy", "offline"})
DISPATCH_AUTH_TYPES: frozenset[str] = frozenset({"svantic_jwt", "shared_secret", "mtls"})

# Section 2: canonical lowercase 8-4-4-4-12 UUID text, any version.
UUID_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"

# Section 2: RFC 3339 date-time with an upper-case `T`, optional fraction, and
# `Z` or a `+hh:mm` / `-hh:mm` offset. Field ranges are checked (second 60 is an
# RFC 3339 leap second); day-of-month against the month is not.
TIMESTAMP_PATTERN = (
    r"^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
    r"T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?"
    r"(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$"
)

# Section 2: W3C trace context ids, lowercase hex.
TRACE_ID_PATTERN = r"^[0-9a-f]{32}$"
SPAN_ID_PATTERN = r"^[0-9a-f]{16}$"
