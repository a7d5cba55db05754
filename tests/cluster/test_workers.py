"""`svantic mesh --workers 2 --redis URL --port P`: two mesh processes behind one port
(SO_REUSEPORT), run as a user runs it, a real subprocess on 127.0.0.1 with a real Redis and
agents in processes of their own.

Which worker took a connection is the kernel's choice (a hash of the connection's
addresses), so the tests connect until both were reached, bounded, and read where each
agent's socket landed from the cluster's location hash (each process's node id carries its
pid). Linux only: elsewhere SO_REUSEPORT does not spread connections among the listeners.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import CLIENT, HERE, READY, Lines, env
from servers import free_port
from svantic_mesh import cli

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="SO_REUSEPORT spreads connections on Linux only")

MAX_AGENTS = 12
"""Agents started before giving up on seeing both workers hold one (each lands on either
with even odds: missing one 12 times running is 1 in 2048)."""
STOP_BOUND = 20.0
"""Seconds the parent and every worker get to be gone once the parent is told to stop
(the grace is 2 s; the rest is interpreter and Redis goodbye time on a busy machine)."""
NODE_PID = re.compile(r"-(\d+)-[0-9a-f]{6}$")


def alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie waiting for its reaper has stopped running)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pids: list[int], bound: float) -> list[int]:
    """The pids still running after `bound` seconds (empty once every one stopped)."""
    deadline = time.monotonic() + bound
    while (left := [pid for pid in pids if alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@dataclass
class Workers:
    proc: subprocess.Popen[str]
    port: int
    url: str
    ca: str
    out: Lines
    err: Lines
    redis: Any
    prefix: str

    def client(self) -> httpx.Client:
        """A client whose every request opens a new connection (a new draw of the worker)."""
        return httpx.Client(base_url=self.url, trust_env=False, timeout=20,
                            verify=ssl.create_default_context(cafile=self.ca),
                            limits=httpx.Limits(max_keepalive_connections=0))

    def token(self) -> str:
        with self.client() as client:
            answer = client.post("/auth/token", json={"client_id": CLIENT[0],
                                                      "client_secret": CLIENT[1]})
            return str(answer.raise_for_status().json()["access_token"])

    def worker_pids(self) -> list[int]:
        """The parent's pid, then each started worker's, from the parent's log."""
        started = re.findall(r"\[worker 1\]: worker (\d+) started \(pid (\d+)\)",
                             self.err.text())
        return [self.proc.pid] + [int(pid) for _, pid in started]

    def node_pid(self, instance: str) -> int | None:
        """The pid of the process holding `instance`'s socket, per the location hash."""
        node = self.redis.hget(f"{self.prefix}:loc", instance)
        if node is None:
            return None
        match = NODE_PID.search(node.decode())
        return int(match.group(1)) if match else None


@pytest.fixture(params=["asyncio", "gevent"])
def workers(request: pytest.FixtureRequest, redis_server: Any,
            tmp_path: Path) -> Iterator[Workers]:
    """`svantic mesh --workers 2` on the asyncio adapter (anyio on asyncio listens the same
    way) and on gevent, each with a prefix of its own on the shared Redis."""
    import redis

    port = free_port()
    prefix = f"w{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "svantic_mesh.cli", "mesh", "--workers", "2",
         "--db", str(tmp_path / "mesh.db"), "--port", str(port), "--client", ":".join(CLIENT),
         "--grace", "2", "--redis", redis_server.url, "--cluster-prefix", prefix,
         "--adapter", request.param],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        text=True, env=env())
    out, err = Lines(proc.stdout), Lines(proc.stderr)
    client = redis.Redis.from_url(redis_server.url)
    pids: list[int] = []
    try:
        url = out.wait_for(READY, timeout=60).group(1)
        ca = out.wait_for(r"local CA \(trust it in clients\): (\S+)").group(1)
        for index in (1, 2):  # each has loaded the others' agents (as tests/cluster waits)
            err.wait_for(rf"\[worker {index}\]: cluster: .* agents on other processes")
        running = Workers(proc, port, url, ca, out, err, client, prefix)
        pids = running.worker_pids()
        yield running
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(STOP_BOUND)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        for pid in wait_gone(pids, 5.0):  # never leave a worker behind, even on failure
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        client.close()


@pytest.fixture
def agents() -> Iterator[list[tuple[subprocess.Popen[str], Lines]]]:
    started: list[tuple[subprocess.Popen[str], Lines]] = []
    try:
        yield started
    finally:
        for proc, _ in started:
            if proc.poll() is None:
                assert proc.stdin is not None
                with contextlib.suppress(OSError):
                    proc.stdin.close()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)


def start_agent(mesh: Workers, instance: str,
                agents: list[tuple[subprocess.Popen[str], Lines]]) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "agent_worker.py"), mesh.url, mesh.ca, CLIENT[0],
         CLIENT[1], instance, "worker", "0"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env())
    out = Lines(proc.stdout)
    Lines(proc.stderr)  # drained, so the agent never blocks on a full pipe
    agents.append((proc, out))
    out.wait_for(r"^ready")


def wait_routable(mesh: Workers, token: str, instance: str, timeout: float = 15.0) -> None:
    """Until several fresh connections in a row (whichever worker took each) see the agent
    connected: every worker's mirror has heard of it."""
    deadline = time.monotonic() + timeout
    in_a_row = 0
    with mesh.client() as client:
        while in_a_row < 6:
            answer = client.post("/agents/get_connection", json={"instance_id": instance},
                                 headers={"authorization": f"Bearer {token}"})
            connected = answer.status_code == 200 and (
                answer.json()["connection_status"] != "offline")
            in_a_row = in_a_row + 1 if connected else 0
            assert time.monotonic() < deadline, answer.text
            if not connected:
                time.sleep(0.05)


def test_agents_land_on_both_workers_and_dispatches_reach_them_from_either(
        workers: Workers, agents: list[tuple[subprocess.Popen[str], Lines]]) -> None:
    pids = workers.worker_pids()
    assert len(pids) == 2 and len(set(pids)) == 2
    assert workers.out.text().count("svantic mesh listening on") == 1  # one ready line
    for index in (1, 2):  # one log line per worker, tagged
        assert re.search(rf"\[worker {index}\]: cluster: process \S+ joined",
                         workers.err.text())
    landed: dict[int, str] = {}
    for index in range(MAX_AGENTS):
        instance = f"agent-{index}"
        start_agent(workers, instance, agents)
        deadline = time.monotonic() + 10
        while (pid := workers.node_pid(instance)) is None:
            assert time.monotonic() < deadline, f"{instance} is in no location hash"
            time.sleep(0.05)
        assert pid in pids
        landed.setdefault(pid, instance)
        if len(landed) == 2:
            break
    assert set(landed) == set(pids), "every agent landed on one worker"

    token = workers.token()
    for instance in landed.values():
        wait_routable(workers, token, instance)
    with workers.client() as client:  # a new connection per dispatch: either worker answers
        for round_ in range(6):
            for instance in landed.values():
                answer = client.post(
                    "/agents/dispatch", headers={"authorization": f"Bearer {token}"},
                    json={"capability": "echo", "instance_id": instance,
                          "arguments": {"round": round_}})
                assert answer.status_code == 200, answer.text
                assert answer.json()["result"] == {"echo": {"round": round_},
                                                   "instance": instance}
    nodes = workers.redis.smembers(f"{workers.prefix}:nodes")
    assert len(nodes) == 2  # two processes alive in the cluster, each its own node id


def test_stopping_the_parent_stops_every_worker(workers: Workers) -> None:
    pids = workers.worker_pids()
    assert all(alive(pid) for pid in pids)
    started = time.monotonic()
    workers.proc.send_signal(signal.SIGTERM)
    assert workers.proc.wait(STOP_BOUND) == 0
    assert wait_gone(pids, STOP_BOUND - (time.monotonic() - started)) == []
    log = workers.err.text()
    assert "[worker 1]: worker 2 stopped (exit code 0)" in log, log[-6000:]
    assert "Traceback" not in log
    assert not workers.redis.smembers(f"{workers.prefix}:nodes")  # both left the cluster


def test_a_killed_parent_leaves_no_orphaned_worker(workers: Workers) -> None:
    pids = workers.worker_pids()
    workers.proc.kill()  # no chance to stop anything: the workers see their pipe close
    workers.proc.wait(10)
    assert wait_gone(pids[1:], STOP_BOUND) == []
    assert "[worker 2]" in workers.err.text()
    workers.err.wait_for(r"\[worker 2\]: parent process gone: draining", timeout=5)


@pytest.mark.parametrize(("flags", "reason"), [
    (["--workers", "2"], "--workers N needs --redis URL"),
    (["--workers", "2", "--redis", "redis://127.0.0.1:1/0", "--port", "0"],
     "--workers needs a known --port (not 0)"),
    (["--workers", "2", "--redis", "redis://127.0.0.1:1/0", "--db", ":memory:"],
     "--workers needs a database file or URL (not :memory:)"),
    (["--workers", "0"], "--workers must be 1 or more"),
])
def test_workers_refused_before_anything_is_made(
        flags: list[str], reason: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["mesh", "--db", str(tmp_path / "m.db"), *flags]
    if "--db" in flags:
        argv = ["mesh", *flags]
    assert cli.mesh(cli._parser().parse_args(argv)) == 2
    assert reason in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no database, secrets or CA were made


def test_a_port_held_by_another_program_fails_the_start_and_leaves_no_worker(
        redis_server: Any, tmp_path: Path) -> None:
    import socket

    with socket.socket() as holder:  # no SO_REUSEPORT: the port is not to be shared
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "svantic_mesh.cli", "mesh", "--workers", "2",
             "--db", str(tmp_path / "mesh.db"), "--port", str(port), "--grace", "1",
             "--redis", redis_server.url, "--cluster-prefix", f"w{uuid.uuid4().hex[:8]}"],
            capture_output=True, text=True, timeout=60, env=env(), stdin=subprocess.DEVNULL,
            check=False)
    assert done.returncode == 1
    assert f"svantic mesh: cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "svantic mesh listening on" not in done.stdout
    started = re.findall(r"worker 2 started \(pid (\d+)\)", done.stderr)
    assert started and "worker 2 stopped" in done.stderr
    assert wait_gone([int(pid) for pid in started], 5.0) == []
