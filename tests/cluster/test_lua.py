"""The cluster's Lua scripts, run by a real `redis-server` (and by fakeredis as well): the
shared capacity never over-fills, leases of a crashed process expire, and a location is
only removed by the process that set it."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from svantic_mesh.cluster import (
    ACQUIRE_LUA,
    FORGET_LOCATION_LUA,
    FORGET_NODE_LUA,
    RELEASE_LUA,
)


@pytest.fixture(params=["redis-server", "fakeredis"])
def client(request: pytest.FixtureRequest) -> Iterator[Any]:
    if request.param == "fakeredis":
        import fakeredis

        yield fakeredis.FakeRedis()
        return
    server = request.getfixturevalue("redis_server")
    conn = redis.Redis.from_url(server.url)
    yield conn
    conn.close()


def _key() -> str:
    return f"test:lease:{uuid.uuid4().hex}"


def test_acquire_takes_up_to_the_cap_and_release_gives_back(client: Any) -> None:
    acquire = client.register_script(ACQUIRE_LUA)
    key = _key()
    assert [acquire(keys=[key], args=[f"l{n}", 2, 10_000]) for n in range(3)] == [1, 1, 0]
    assert client.eval(RELEASE_LUA, 1, key, "l0") == 1
    assert acquire(keys=[key], args=["l3", 2, 10_000]) == 1
    assert acquire(keys=[key], args=["l4", 2, 10_000]) == 0
    # No cap: always taken.
    other = _key()
    assert all(acquire(keys=[other], args=[f"x{n}", 0, 10_000]) == 1 for n in range(5))
    # Releasing a lease twice (or one never taken) changes nothing.
    assert client.eval(RELEASE_LUA, 1, key, "l0") == 2
    assert client.pttl(key) > 0  # the set goes away by itself once every lease could have


def test_a_crashed_process_leases_expire(client: Any) -> None:
    acquire = client.register_script(ACQUIRE_LUA)
    key = _key()
    assert acquire(keys=[key], args=["crashed-1", 1, 50]) == 1  # never released
    assert acquire(keys=[key], args=["other", 1, 10_000]) == 0
    deadline = time.monotonic() + 5
    while acquire(keys=[key], args=["other", 1, 10_000]) == 0:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert client.zrange(key, 0, -1) == [b"other"]


def test_concurrent_acquires_never_over_fill(redis_server: Any) -> None:
    key = _key()
    taken: list[str] = []
    held: list[int] = []  # leases in the set right after each acquire
    lock = threading.Lock()
    start = threading.Barrier(8)

    def worker(n: int) -> None:
        conn = redis.Redis.from_url(redis_server.url)
        acquire = conn.register_script(ACQUIRE_LUA)
        start.wait(5)
        for i in range(50):
            member = f"w{n}-{i}"
            if acquire(keys=[key], args=[member, 3, 10_000]):
                count = conn.zcard(key)
                with lock:
                    taken.append(member)
                    held.append(count)
                conn.eval(RELEASE_LUA, 1, key, member)
        conn.close()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert taken and max(held) <= 3
    conn = redis.Redis.from_url(redis_server.url)
    assert conn.zcard(key) == 0
    conn.close()


def test_a_location_is_removed_only_by_the_process_that_set_it(client: Any) -> None:
    loc, caps = f"test:loc:{uuid.uuid4().hex}", f"test:caps:{uuid.uuid4().hex}"
    client.hset(loc, "agent-1", "node-b")
    client.hset(caps, "agent-1", b"\x90")
    # A late disconnect from the process the agent left does not remove its new home.
    assert client.eval(FORGET_LOCATION_LUA, 2, loc, caps, "agent-1", "node-a") == 0
    assert client.hget(loc, "agent-1") == b"node-b"
    assert client.eval(FORGET_LOCATION_LUA, 2, loc, caps, "agent-1", "node-b") == 1
    assert client.hget(loc, "agent-1") is None and client.hget(caps, "agent-1") is None


def test_a_dead_process_locations_go_with_it(client: Any) -> None:
    loc, caps, nodes = (f"test:{name}:{uuid.uuid4().hex}" for name in ("loc", "caps", "nodes"))
    client.hset(loc, mapping={"a1": "dead", "a2": "alive", "a3": "dead"})
    client.sadd(nodes, "dead", "alive")
    removed = client.eval(FORGET_NODE_LUA, 3, loc, caps, nodes, "dead")
    assert sorted(removed) == [b"a1", b"a3"]
    assert client.hgetall(loc) == {b"a2": b"alive"}
    assert client.smembers(nodes) == {b"alive"}
