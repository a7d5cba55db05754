"""The clustered event bus: this process's events go to its subscribers and to the others;
theirs come to its subscribers only; a mirrored change publishes nothing. And the writer
that carries them (and every message between processes) to a real Redis across its
restarts."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import redis
import svantic_mesh.cluster as cluster_module
from svantic_mesh.cluster import (
    _WRITER_IDLE,
    ClusterBus,
    ClusterResumeStore,
    ClusterSettings,
    MeshCluster,
    _decode,
)


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


# -- the writer: what carries this process's messages to Redis --------------------------------
#
# One connection of its own (no pool), so a Redis restart leaves it holding a dead socket
# that nothing notices while the process is idle.


def _cluster(url: str) -> MeshCluster:
    return MeshCluster(ClusterSettings(url, prefix=f"t{uuid.uuid4().hex[:8]}"),
                       ClusterResumeStore())


async def _until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not within the bound"
        await asyncio.sleep(0.02)


def test_the_first_write_after_an_idle_redis_restart_arrives(redis_server: Any) -> None:
    async def main() -> None:
        cluster = _cluster(redis_server.url)
        inbox = cluster._k_inbox + "peer"
        check = redis.Redis.from_url(redis_server.url)
        try:
            await cluster.io.run(cluster._write([("rpush", inbox, b"before")]))
            redis_server.stop()
            redis_server.start()
            # Idle for longer than the writer trusts its connection unchecked.
            await _until(lambda: time.monotonic() - cluster._written_at > _WRITER_IDLE)
            await cluster.io.run(cluster._write([("rpush", inbox, b"after")]))
            assert check.lrange(inbox, 0, -1) == [b"after"]  # the restart emptied Redis
        finally:
            check.close()
            await cluster.io.close()

    asyncio.run(main())


def test_a_failed_write_sends_outcomes_again_once_and_never_a_dispatch(
        redis_server: Any, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Outcomes and chunks are taken once each by their receiver, so a second copy is
    harmless and the caller waiting for them must get them; a dispatch sent twice could
    run twice."""
    monkeypatch.setattr(cluster_module, "_WRITER_IDLE", 1e9)  # no PING: the write fails

    async def main() -> None:
        cluster = _cluster(redis_server.url)
        inbox = cluster._k_inbox + "peer"
        check = redis.Redis.from_url(redis_server.url)

        def ids() -> list[tuple[str, str]]:
            return [(m["t"], m["id"]) for m in map(_decode, check.lrange(inbox, 0, -1))]

        cluster._wake = cluster.io.event()
        cluster.io.spawn(cluster._writer())
        try:
            cluster._send("peer", {"t": "d", "id": "x0"})
            await _until(lambda: ids() == [("d", "x0")])
            redis_server.stop()
            redis_server.start()
            cluster._send("peer", {"t": "c", "id": "x0", "q": 0, "d": 1})
            cluster._send("peer", {"t": "o", "id": "x0", "res": 1})
            await _until(lambda: ids() == [("c", "x0"), ("o", "x0")])
            redis_server.stop()
            redis_server.start()
            await asyncio.sleep(0)
            cluster._writer_suspect = False  # as if the outage went unseen
            cluster._send("peer", {"t": "d", "id": "x1"})
            await _until(lambda: "dropped" in caplog.text)
            cluster._send("peer", {"t": "o", "id": "x2"})
            await _until(lambda: ids() == [("o", "x2")])
        finally:
            await cluster.io.stop()
            check.close()
            await cluster.io.close()
        assert "outcomes and chunks for Redis to send again" in caplog.text
        assert "1 messages for Redis dropped" in caplog.text

    caplog.set_level(logging.INFO, logger="svantic.mesh.cluster")
    asyncio.run(main())
