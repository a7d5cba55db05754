"""The clustered event bus: this process's events go to its subscribers and to the others;
theirs come to its subscribers only; a mirrored change publishes nothing."""

from __future__ import annotations

from typing import Any

from svantic_mesh.cluster import ClusterBus


def _kinds(sub: Any) -> list[str]:
    return [line.removeprefix("event: ") for raw in sub.drain()
            for line in raw.decode().split("\n") if line.startswith("event: ")]


def test_publish_forward_deliver_mute_and_local() -> None:
    bus = ClusterBus()
    forwarded: list[tuple[str, str, dict[str, Any]]] = []
    bus.forward = lambda kind, tenant, data, wall: forwarded.append((kind, tenant, data))
    sub = bus.subscribe("t1")
    bus.publish("agent.connected", "t1", {"instance_id": "a"}, 1.0)
    assert _kinds(sub) == ["agent.connected"]
    assert forwarded == [("agent.connected", "t1", {"instance_id": "a"})]
    bus.deliver("agent.registered", "t1", {"instance_id": "b"}, 2.0)  # from another process
    assert _kinds(sub) == ["agent.registered"] and len(forwarded) == 1
    with bus.muted():
        bus.publish("agent.connected", "t1", {"instance_id": "c"}, 3.0)
    assert _kinds(sub) == [] and len(forwarded) == 1
    with bus.local_only():
        bus.publish("agent.disconnected", "t1", {"instance_id": "d"}, 4.0)
    assert _kinds(sub) == ["agent.disconnected"] and len(forwarded) == 1
