"""Three `svantic mesh --redis` processes on one real Redis and one database: what a user
relies on when the mesh runs as several processes (issue 16's acceptance)."""

from __future__ import annotations

import concurrent.futures
import json
import time
from typing import Any

from conftest import Cluster, Forwarder


def _sse(lines: Any) -> list[tuple[str, Any]]:
    events: list[tuple[str, Any]] = []
    name, data = "message", []
    for line in lines:
        if line.startswith(":"):
            continue
        if line:
            key, _, value = line.partition(":")
            if key == "event":
                name = value.strip()
            elif key == "data":
                data.append(value.strip())
            continue
        if data:
            events.append((name, json.loads("\n".join(data))))
        name, data = "message", []
    return events


def test_callers_on_every_process_reach_agents_on_every_other(cluster: Cluster) -> None:
    meshes = cluster.meshes
    for index, mesh in enumerate(meshes):
        cluster.agent(mesh.url, f"agent-{index}")
    for index in range(3):
        cluster.wait_connected(f"agent-{index}")
    for caller_index, caller in enumerate(meshes):
        token = caller.token()
        for index in range(3):
            answer = caller.dispatch({"capability": "echo", "arguments": {"n": index},
                                      "instance_id": f"agent-{index}"}, token)
            assert answer.status_code == 200, (caller_index, index, answer.text)
            assert answer.json()["result"] == {"echo": {"n": index}, "instance": f"agent-{index}"}
            assert answer.json()["instance_id"] == f"agent-{index}"

    # Chunks come back from another process in order, then the result.
    caller = meshes[0]
    with caller.client() as client, client.stream(
            "POST", "/agents/dispatch",
            json={"capability": "count", "arguments": {"to": 5}, "instance_id": "agent-2"},
            headers={"authorization": f"Bearer {caller.token()}",
                     "accept": "text/event-stream"}) as stream:
        events = _sse(stream.iter_lines())
    assert [name for name, _ in events] == ["chunk"] * 5 + ["result"]
    assert [data["data"] for _, data in events[:5]] == [0, 1, 2, 3, 4]
    assert events[-1][1]["result"] == {"counted": 5, "instance": "agent-2"}

    # A tool call from an agent on one process to an agent on another.
    answer = meshes[1].dispatch({"capability": "ask", "arguments": {"instance_id": "agent-2"},
                                 "instance_id": "agent-0"}, meshes[1].token())
    assert answer.status_code == 200, answer.text
    assert answer.json()["result"] == {"asked": {"echo": {"from": "agent-0"},
                                                 "instance": "agent-2"}}

    # The hop is a metric on the caller's process.
    with meshes[0].client() as client:
        metrics = client.get("/metrics", headers={
            "authorization": f"Bearer {meshes[0].token()}"}).text
    assert "svantic_interprocess_routing_seconds_count" in metrics
    count = next(line for line in metrics.splitlines()
                 if line.startswith("svantic_interprocess_routing_seconds_count"))
    assert float(count.split()[-1]) >= 2


def test_concurrent_dispatches_never_exceed_capacity(cluster: Cluster) -> None:
    cluster.agent(cluster.meshes[2].url, "capped", cap=2)
    cluster.wait_connected("capped")
    tokens = [mesh.token() for mesh in cluster.meshes]

    def call(n: int) -> int:
        mesh = cluster.meshes[n % 3]
        answer = mesh.dispatch({"capability": "slow", "arguments": {"ms": 150},
                                "instance_id": "capped"}, tokens[n % 3])
        return answer.status_code

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(call, range(24)))
    assert codes.count(200) >= 2, codes
    assert set(codes) <= {200, 503}, codes  # refused: at capacity, never over it
    answer = cluster.meshes[0].dispatch({"capability": "peak", "instance_id": "capped"},
                                        tokens[0])
    assert answer.status_code == 200, answer.text
    assert answer.json()["result"]["peak"] <= 2
    assert answer.json()["result"]["peak"] >= 1


def test_events_on_every_process_see_every_event(cluster: Cluster) -> None:
    streams: list[list[tuple[str, Any]]] = [[] for _ in cluster.meshes]
    opened: list[concurrent.futures.Future[None]] = []
    done = concurrent.futures.ThreadPoolExecutor(3)

    def watch(index: int, started: concurrent.futures.Future[None]) -> None:
        mesh = cluster.meshes[index]
        with mesh.client(timeout=30) as client, client.stream(
                "GET", "/events", headers={"authorization": f"Bearer {mesh.token()}"}) as stream:
            started.set_result(None)
            name = "message"
            for line in stream.iter_lines():
                if line.startswith("event:"):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("data:"):
                    body = json.loads(line.split(":", 1)[1])
                    streams[index].append((name, body))
                    if name == "agent.connected" and body.get("instance_id") == "watched":
                        return

    for index in range(3):
        started: concurrent.futures.Future[None] = concurrent.futures.Future()
        opened.append(started)
        done.submit(watch, index, started)
    for started in opened:
        started.result(15)
    cluster.agent(cluster.meshes[1].url, "watched")
    done.shutdown(wait=True, cancel_futures=False)
    for index, events in enumerate(streams):
        kinds = [name for name, body in events if body.get("instance_id") == "watched"]
        assert kinds == ["agent.registered", "agent.connected"], (index, events)


def test_a_killed_process_fails_its_waiters_and_its_agent_resumes_elsewhere(
        cluster: Cluster) -> None:
    a, b, c = cluster.meshes
    balancer = Forwarder([b.port, c.port])  # the agent dials B first, C once B is gone
    try:
        agent = cluster.agent(f"https://127.0.0.1:{balancer.port}", "mover")
        cluster.wait_connected("mover")
        assert agent.out.wait_for(r"session resumed=False")
        token = a.token()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(a.dispatch, {"capability": "slow", "arguments": {"ms": 20000},
                                               "instance_id": "mover"}, token, 30)
            agent.out.wait_for(r"slow \S+ attempt=1")  # the handler runs, reached through B
            started = time.monotonic()
            b.kill()
            answer = pending.result(20)
            waited = time.monotonic() - started
        assert answer.status_code == 502, answer.text
        assert answer.json()["error"]["code"] == "AGENT_DISCONNECTED"
        assert waited < 6.0  # the dead-process bound (3 s key + 1 s beat), not the deadline
        # The agent reconnects through the balancer to C, with its token from B: resumed.
        agent.out.wait_for(r"session resumed=True", timeout=20)
        cluster.meshes.remove(b)
        cluster.wait_connected("mover")
        answer = a.dispatch({"capability": "echo", "arguments": {"after": "kill"},
                             "instance_id": "mover"}, token)
        assert answer.status_code == 200, answer.text
        assert answer.json()["result"]["echo"] == {"after": "kill"}
    finally:
        balancer.close()


def test_an_agent_cut_off_resumes_on_another_process_and_its_held_dispatch_ends_once(
        cluster: Cluster) -> None:
    a, b, c = cluster.meshes
    balancer = Forwarder([b.port])
    try:
        agent = cluster.agent(f"https://127.0.0.1:{balancer.port}", "hopper")
        cluster.wait_connected("hopper")
        token = a.token()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(a.dispatch, {"capability": "slow", "arguments": {"ms": 1500},
                                               "instance_id": "hopper"}, token, 30)
            first = agent.out.wait_for(r"slow (\S+) attempt=1")
            balancer.ports = [c.port]  # B lives on, but the agent's next dial lands on C
            balancer.cut()
            agent.out.wait_for(r"session resumed=True", timeout=20)
            answer = pending.result(25)
        # B held the dispatch; C re-sent it (attempt 2: the agent, still running attempt 1,
        # answers it with that run's result) and carried the result back to B, whose
        # caller (on A) gets it, once.
        assert answer.status_code == 200, answer.text
        assert answer.json()["dispatch_id"] == first.group(1)
        assert answer.json()["result"]["slept"] == 1500
        assert f"replayed dispatches: ['{first.group(1)}']" in c.err.text()
        assert "1 held dispatches re-sent" in c.err.text()
    finally:
        balancer.close()


def test_redis_down_fails_carried_dispatches_and_recovers(cluster: Cluster,
                                                          redis_server: Any) -> None:
    a, b, _ = cluster.meshes
    far = cluster.agent(b.url, "far")
    cluster.agent(a.url, "near")
    cluster.wait_connected("far")
    cluster.wait_connected("near")
    token = a.token()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(a.dispatch, {"capability": "slow", "arguments": {"ms": 20000},
                                           "instance_id": "far"}, token, 30)
        far.out.wait_for(r"slow \S+ attempt=1")  # carried to B and running there
        redis_server.stop()
        answer = pending.result(20)
    assert answer.status_code == 502, answer.text
    assert answer.json()["error"]["code"] == "AGENT_DISCONNECTED"
    # Local dispatches keep working while Redis is away.
    answer = a.dispatch({"capability": "echo", "arguments": {}, "instance_id": "near"}, token)
    assert answer.status_code == 200, answer.text
    redis_server.start()
    a.err.wait_for("Redis reachable again", timeout=30)
    # Everything recovers: the carried path works again.
    deadline = time.monotonic() + 20
    while True:
        answer = a.dispatch({"capability": "echo", "arguments": {"back": True},
                             "instance_id": "far"}, token)
        if answer.status_code == 200:
            break
        assert time.monotonic() < deadline, answer.text
        time.sleep(0.2)
    assert answer.json()["result"]["echo"] == {"back": True}
