"""UUID v7 ids and RFC 3339 timestamps for frame envelopes (spec section 2).

Nothing here reads the clock: `IdFactory` is given a wall clock (a callable
returning Unix seconds) and a source of random bytes, so tests can make both
deterministic and the core stays free of hidden time reads.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from datetime import UTC, datetime

from .errors import TimestampError  # defined there, re-exported here

__all__ = [
    "IdFactory",
    "TimestampError",
    "format_rfc3339",
    "parse_rfc3339",
    "is_canonical_uuid",
    "uuid7_timestamp_ms",
]

_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_RFC3339_RE = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]+)?"
    r"(Z|[+-][0-9]{2}:[0-9]{2})"
)
# 128 records of 8 bytes (variant 2 bits + rand_b 62 bits): cheap refills, small per connection.
_POOL_BYTES = 1024
_HEX3 = tuple(f"{i:03x}" for i in range(4096))  # the 12-bit counter as text, precomputed
_VARIANT_CLEAR = int.from_bytes(b"\x3f" + b"\xff" * 7, "big")
_VARIANT_SET = int.from_bytes(b"\x80" + b"\x00" * 7, "big")
_VARIANT_CLEAR = sum(_VARIANT_CLEAR << (64 * i) for i in range(_POOL_BYTES // 8))
_VARIANT_SET = sum(_VARIANT_SET << (64 * i) for i in range(_POOL_BYTES // 8))


def is_canonical_uuid(value: object) -> bool:
    """Whether `value` is UUID text in canonical lowercase 8-4-4-4-12 form (any version)."""
    return type(value) is str and len(value) == 36 and _UUID_RE.fullmatch(value) is not None


def uuid7_timestamp_ms(value: str) -> int:
    """The 48-bit Unix millisecond time embedded in a UUID v7."""
    return int(value[:8] + value[9:13], 16)


def format_rfc3339(unix_seconds: float) -> str:
    """Format as `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC, millisecond precision)."""
    ms = round(unix_seconds * 1000)
    second, millis = divmod(ms, 1000)
    prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{prefix}.{millis:03d}Z"


def parse_rfc3339(text: str) -> float:
    """Parse an RFC 3339 timestamp into Unix seconds.

    Stricter than `datetime.fromisoformat`: the `T` separator and an offset
    (`Z` or `+hh:mm`) are required, as spec section 2 demands. A leap second
    (`:60`) is accepted and read as the first instant of the next minute.
    """
    match = _RFC3339_RE.fullmatch(text) if type(text) is str else None
    if match is None:
        raise TimestampError(f"not an RFC 3339 timestamp with offset: {text!r}")
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    fraction, offset = match.group(7), match.group(8)
    leap = second == 60
    try:
        moment = datetime(year, month, day, hour, minute, 59 if leap else second, tzinfo=UTC)
    except ValueError as exc:
        raise TimestampError(f"not a valid date or time: {text!r} ({exc})") from None
    if hour > 23 or minute > 59:
        raise TimestampError(f"not a valid time: {text!r}")
    value = moment.timestamp() + (1 if leap else 0)
    if fraction:
        value += float(fraction)
    if offset != "Z":
        off_h, off_m = int(offset[1:3]), int(offset[4:6])
        if off_h > 23 or off_m > 59:
            raise TimestampError(f"offset out of range: {text!r}")
        delta = off_h * 3600 + off_m * 60
        value -= delta if offset[0] == "+" else -delta
    return value


class IdFactory:
    """Mints envelope `id`s (UUID v7, RFC 9562) and `ts` values from one clock read.

    Ids are strictly increasing within one factory: the 12-bit `rand_a` field is
    a counter seeded at random each millisecond (RFC 9562 section 6.2, method 1);
    when it runs out, or when the wall clock steps back, the time part keeps
    going from the last millisecond used instead of going back. `rand_b` (62
    bits) comes from `random_bytes` (default `os.urandom`), drawn in batches and
    hex-encoded in C and cut per id, and the id prefix and `ts` are cached per millisecond: that
    keeps a stamp well under a microsecond.
    """

    __slots__ = ("_clock", "_counter", "_hex", "_ms", "_pos", "_prefix", "_random_bytes", "_ts")

    def __init__(
        self,
        wall_clock: Callable[[], float],
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self._clock = wall_clock
        self._random_bytes = random_bytes
        self._hex = ""  # the pool of random records as hex; used from the end
        self._pos = 0  # records left in the pool, times 16 hex digits: 0 = refill first
        self._ms = -1
        self._counter = 0
        self._prefix = ""
        self._ts = ""

    def _refill(self) -> None:
        raw = self._random_bytes(_POOL_BYTES)
        if len(raw) != _POOL_BYTES:
            raise ValueError(f"random_bytes({_POOL_BYTES}) returned {len(raw)} bytes")
        # Force the RFC 9562 variant (0b10) into the top bits of every 8-byte record; each
        # record's 16 hex digits become one id's `-vxxx-xxxxxxxxxxxx` tail, cut when used.
        value = int.from_bytes(raw, "big") & _VARIANT_CLEAR | _VARIANT_SET
        self._hex = value.to_bytes(_POOL_BYTES, "big").hex()
        self._pos = len(self._hex)

    def _enter_millisecond(self, ms: int) -> None:
        """Start a new millisecond: reseed the counter, rebuild the cached prefix and ts."""
        self._ms = ms
        # Start in the lower half so a burst has at least 2048 ids before borrowing.
        self._counter = self._random_bytes(2)[0] << 3
        h = f"{ms:012x}"
        self._prefix = f"{h[:8]}-{h[8:]}-7"
        second, millis = divmod(ms, 1000)
        when = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        self._ts = f"{when}.{millis:03d}Z"

    def stamp(self) -> tuple[str, str]:
        """A fresh `(id, ts)` pair from a single clock read."""
        ms = int(self._clock() * 1000)
        if ms > self._ms:
            self._enter_millisecond(ms)
        else:
            counter = self._counter + 1
            if counter > 0xFFF:
                self._enter_millisecond(self._ms + 1)
            else:
                self._counter = counter
        if not self._pos:
            self._refill()
        pos = self._pos = self._pos - 16
        h = self._hex
        uid = f"{self._prefix}{_HEX3[self._counter]}-{h[pos : pos + 4]}-{h[pos + 4 : pos + 16]}"
        return uid, self._ts

    def new_id(self) -> str:
        """A fresh UUID v7 for an envelope `id`."""
        return self.stamp()[0]
