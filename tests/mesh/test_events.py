"""Lifecycle events: SSE encoding, per-tenant fan-out in order, and bounded subscribers."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from svantic_mesh.events import (
    EVENT_KINDS,
    KEEPALIVE,
    EventBus,
    Subscription,
    TooManySubscribers,
    rfc3339,
    sse,
)

WALL = 1_700_000_000.25


def parse_sse(raw: bytes) -> list[dict[str, Any]]:
    """A minimal SSE reader as the HTML spec describes it: fields per line, data lines
    joined with newlines, an event ends at a blank line, comments skipped."""
    events: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    data: list[str] = []
    for line in raw.decode("utf-8").split("\n"):
        if line == "":
            if data or current:
                if data:
                    current["data"] = json.loads("\n".join(data))
                events.append(current)
            current, data = {}, []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        else:
            current[name] = value
    return events


def test_sse_round_trip() -> None:
    payload = {"a": 1, "text": "two\nlines\r\nand\u2028more", "nested": [None, True, 1.5]}
    raw = sse("agent.registered", payload, id="7")
    assert raw.endswith(b"\n\n")
    assert raw.count(b"\n\n") == 1  # exactly one event
    (event,) = parse_sse(raw)
    assert event == {"id": "7", "event": "agent.registered", "data": payload}


def test_sse_without_id_or_event_and_compact() -> None:
    raw = sse(None, {"x": [1, 2]})
    assert raw == b'data: {"x":[1,2]}\n\n'


def test_sse_refuses_line_breaks_in_fields() -> None:
    with pytest.raises(ValueError):
        sse("bad\nevent", {})
    with pytest.raises(ValueError):
        sse("ok", {}, id="1\r2")


def test_keepalive_is_a_comment() -> None:
    assert KEEPALIVE.startswith(b":") and KEEPALIVE.endswith(b"\n\n")
    assert parse_sse(KEEPALIVE) == []


def test_rfc3339() -> None:
    assert rfc3339(0) == "1970-01-01T00:00:00.000Z"
    assert rfc3339(WALL) == "2023-11-14T22:13:20.250Z"


def test_publish_order_and_shape_per_tenant() -> None:
    bus = EventBus()
    a = bus.subscribe("tenant-a")
    b = bus.subscribe("tenant-b")
    for i, kind in enumerate(EVENT_KINDS):
        bus.publish(kind, "tenant-a", {"instance_id": f"i-{i}"}, WALL + i)
    bus.publish("agent.registered", "tenant-b", {"instance_id": "other"}, WALL)
    got = [e for raw in a.drain() for e in parse_sse(raw)]
    assert [e["event"] for e in got] == list(EVENT_KINDS)
    ids = [int(e["id"]) for e in got]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert got[0]["data"] == {
        "type": "agent.registered",
        "tenant_id": "tenant-a",
        "at": "2023-11-14T22:13:20.250Z",
        "instance_id": "i-0",
    }
    assert all(e["data"]["tenant_id"] == "tenant-a" for e in got)
    assert a.drain() == [] and a.pending_bytes == 0
    other = [e for raw in b.drain() for e in parse_sse(raw)]
    assert [e["data"]["instance_id"] for e in other] == ["other"]


def test_data_cannot_relabel_tenant() -> None:
    bus = EventBus()
    with pytest.raises(ValueError):
        bus.publish("agent.registered", "tenant-a", {"tenant_id": "tenant-b"}, WALL)


def test_one_encoding_shared_by_subscribers() -> None:
    bus = EventBus()
    s1, s2 = bus.subscribe("t"), bus.subscribe("t")
    bus.publish("agent.connected", "t", {"instance_id": "i"}, WALL)
    (r1,), (r2,) = s1.drain(), s2.drain()
    assert r1 is r2


def test_notify_called_per_event_and_failures_isolated(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = EventBus()
    calls: list[int] = []

    def broken() -> None:
        raise RuntimeError("writer gone")

    bus.subscribe("t", notify=broken)
    good = bus.subscribe("t", notify=lambda: calls.append(1))
    with caplog.at_level(logging.ERROR, logger="svantic.mesh.events"):
        bus.publish("agent.connected", "t", {"instance_id": "i"}, WALL)
        bus.publish("agent.disconnected", "t", {"instance_id": "i"}, WALL)
    assert calls == [1, 1]
    assert len(good.drain()) == 2
    assert "notify failed" in caplog.text


def test_slow_subscriber_is_cut() -> None:
    bus = EventBus()
    woken: list[int] = []
    slow = bus.subscribe("t", max_bytes=600, notify=lambda: woken.append(1))
    fast = bus.subscribe("t")
    for i in range(20):
        bus.publish("agent.health_changed", "t", {"instance_id": f"i-{i}"}, WALL)
    assert slow.overflowed
    assert slow.pending_bytes <= 600
    kept = slow.drain()
    assert 0 < len(kept) < 20
    assert len(woken) == len(kept) + 1  # one last wake so the writer ends the stream
    assert bus.subscriber_count == 1  # cut subscribers leave the bus at once
    bus.publish("agent.connected", "t", {"instance_id": "x"}, WALL)
    assert slow.drain() == [] and slow.pending_bytes == 0
    assert len(fast.drain()) == 21
    slow.close()
    assert slow.closed and bus.subscriber_count == 1


def test_close_unsubscribes_and_limit() -> None:
    bus = EventBus(max_subscribers=2)
    s1 = bus.subscribe("t")
    bus.subscribe("u")
    with pytest.raises(TooManySubscribers):
        bus.subscribe("t")
    s1.close()
    s1.close()  # idempotent
    assert s1.closed and bus.subscriber_count == 1
    bus.publish("agent.connected", "t", {"instance_id": "i"}, WALL)
    assert s1.drain() == []
    bus.subscribe("t")  # the slot is free again


def test_notify_may_close_during_publish() -> None:
    bus = EventBus()
    subs: list[Subscription] = []

    def close_all() -> None:
        for s in subs:
            s.close()

    subs.append(bus.subscribe("t", notify=close_all))
    subs.append(bus.subscribe("t"))
    bus.publish("agent.connected", "t", {"instance_id": "i"}, WALL)
    assert bus.subscriber_count == 0
