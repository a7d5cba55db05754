"""UUID v7 (RFC 9562) and RFC 3339 helpers."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from svantic_proto.errors import TimestampError
from svantic_proto.ids import (
    IdFactory,
    format_rfc3339,
    is_canonical_uuid,
    parse_rfc3339,
    uuid7_timestamp_ms,
)


class SteppingClock:
    def __init__(self, *times: float) -> None:
        self.times = list(times)

    def __call__(self) -> float:
        return self.times.pop(0) if len(self.times) > 1 else self.times[0]


def test_uuid7_layout() -> None:
    factory = IdFactory(lambda: 1_795_000_000.123)
    value = factory.new_id()
    parsed = uuid.UUID(value)
    assert parsed.version == 7
    assert parsed.variant == uuid.RFC_4122
    assert str(parsed) == value and is_canonical_uuid(value)
    assert uuid7_timestamp_ms(value) == 1_795_000_000_123


def test_ids_are_monotonic_within_one_millisecond() -> None:
    factory = IdFactory(lambda: 1_795_000_000.0)
    ids = [factory.new_id() for _ in range(20_000)]  # forces borrowing from later milliseconds
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(uuid.UUID(i).version == 7 for i in ids[::997])


def test_ids_stay_monotonic_when_the_clock_steps_back() -> None:
    factory = IdFactory(SteppingClock(1000.0, 999.0, 998.0, 1000.5))
    ids = [factory.new_id() for _ in range(4)]
    assert ids == sorted(ids)
    assert uuid7_timestamp_ms(ids[1]) == 1_000_000  # held at the last millisecond used


def test_injected_randomness_makes_ids_deterministic() -> None:
    def zeros(n: int) -> bytes:
        return bytes(n)

    first = IdFactory(lambda: 1.0, zeros).stamp()
    second = IdFactory(lambda: 1.0, zeros).stamp()
    assert first == second == ("00000000-03e8-7000-8000-000000000000", "1970-01-01T00:00:01.000Z")


def test_short_random_source_is_reported() -> None:
    with pytest.raises(ValueError, match="returned"):
        IdFactory(lambda: 1.0, lambda n: b"x").stamp()


def test_stamp_uses_one_clock_read() -> None:
    reads: list[int] = []

    def clock() -> float:
        reads.append(1)
        return 1_795_000_000.5

    identifier, ts = IdFactory(clock).stamp()
    assert len(reads) == 1
    assert ts == "2026-11-18T11:06:40.500Z"
    assert uuid7_timestamp_ms(identifier) == 1_795_000_000_500


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("2026-11-21T10:00:00.123Z", 1_795_255_200.123),
        ("2026-11-21T11:00:00+01:00", 1_795_255_200.0),
        ("2026-11-21T05:30:00-04:30", 1_795_255_200.0),
        ("2016-12-31T23:59:60Z", 1_483_228_800.0),
    ],
)
def test_parse_rfc3339(text: str, seconds: float) -> None:
    assert parse_rfc3339(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    ["yesterday", "2026-11-21T10:00:00", "2026-02-30T10:00:00Z", "2026-11-21 10:00:00Z",
     "2026-11-21T10:00:00+24:00", "2026-11-21T25:00:00Z"],
)
def test_parse_rfc3339_rejects(text: str) -> None:
    with pytest.raises(TimestampError):
        parse_rfc3339(text)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 253_402_300_799_000))
def test_format_then_parse_round_trips(ms: int) -> None:
    assert round(parse_rfc3339(format_rfc3339(ms / 1000)) * 1000) == ms
