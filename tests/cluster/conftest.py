"""Several `svantic mesh --redis` processes on one real Redis and one database (PostgreSQL,
or SQLite), with agents in processes of their own: what a user runs to scale the mesh out,
on 127.0.0.1.

The meshes share secrets through the environment and their CA through one `--home` folder
(the first process makes it, the others start once it is there). A small TCP forwarder
stands in for the load balancer in front of them: a new connection goes to the first mesh
that accepts one, so an agent whose mesh dies reconnects to another.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

HERE = Path(__file__).parent
SIGNING = "cluster-dispatch-auth-secret-0123456789abcdef"
TOKEN_SECRET = "cluster-token-secret-0123456789abcdef0123"
ENCRYPTION_KEY = "11" * 32
CLIENT = ("cluster-client", "cluster-secret-0123456789", "tenant-cluster")
READY = re.compile(r"svantic mesh listening on (https://\S+) \(dashboard")


def env() -> dict[str, str]:
    values = dict(os.environ)
    values.update({
        "SVANTIC_SIGNING_SECRET": SIGNING, "SVANTIC_TOKEN_SECRET": TOKEN_SECRET,
        "SVANTIC_ENCRYPTION_KEY": ENCRYPTION_KEY, "PYTHONUNBUFFERED": "1",
    })
    return values


class Lines:
    """A process's output, read by a thread; `wait_for` blocks (bounded) for a pattern."""

    def __init__(self, stream: Any) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float = 30.0,
                 after: int = 0) -> re.Match[str]:
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines[after:]:
                    if match := regex.search(line):
                        return match
                left = deadline - time.monotonic()
                assert left > 0, f"no {regex.pattern!r} in {self.lines[-40:]}"
                self._changed.wait(left)

    def text(self) -> str:
        with self._changed:
            return "".join(self.lines)


@dataclass
class MeshProc:
    proc: subprocess.Popen[str]
    url: str
    port: int
    ca: str
    out: Lines
    err: Lines

    def client(self, timeout: float = 20) -> httpx.Client:
        return httpx.Client(base_url=self.url, trust_env=False, timeout=timeout,
                            verify=ssl.create_default_context(cafile=self.ca))

    def token(self) -> str:
        with self.client() as client:
            answer = client.post("/auth/token", json={"client_id": CLIENT[0],
                                                      "client_secret": CLIENT[1]})
            return str(answer.raise_for_status().json()["access_token"])

    def dispatch(self, body: dict[str, Any], token: str, timeout: float = 20) -> httpx.Response:
        with self.client(timeout) as client:
            return client.post("/agents/dispatch", json=body,
                               headers={"authorization": f"Bearer {token}"})

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> str:
        """Ctrl-C: it drains, leaves the cluster and exits 0. Returns its log."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise AssertionError("the mesh did not stop on SIGINT:\n"
                                     + self.err.text()[-3000:]) from None
        return self.err.text()


@dataclass
class AgentProc:
    proc: subprocess.Popen[str]
    out: Lines

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@dataclass
class Cluster:
    folder: Path
    redis_url: str
    prefix: str
    database: str
    adapters: tuple[str, ...] = ("asyncio",)
    meshes: list[MeshProc] = field(default_factory=list)
    agents: list[AgentProc] = field(default_factory=list)

    def start_mesh(self) -> MeshProc:
        adapter = self.adapters[len(self.meshes) % len(self.adapters)]
        proc = subprocess.Popen(
            [sys.executable, "-m", "svantic_mesh.cli", "mesh", "--database", self.database,
             "--home", str(self.folder), "--port", "0", "--client", ":".join(CLIENT),
             "--grace", "2", "--redis", self.redis_url, "--cluster-prefix", self.prefix,
             "--adapter", adapter],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            text=True, env=env())
        out, err = Lines(proc.stdout), Lines(proc.stderr)
        match = out.wait_for(READY)
        ca = out.wait_for(r"local CA \(trust it in clients\): (\S+)").group(1)
        url = match.group(1)
        mesh = MeshProc(proc, url, int(url.rsplit(":", 1)[1]), ca, out, err)
        mesh.err.wait_for(r"cluster: .* agents on other processes")
        self.meshes.append(mesh)
        return mesh

    def agent(self, url: str, instance: str, agent_type: str = "worker",
              cap: int = 0) -> AgentProc:
        ca = self.meshes[0].ca
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "agent_worker.py"), url, ca, CLIENT[0], CLIENT[1],
             instance, agent_type, str(cap)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=env())
        agent = AgentProc(proc, Lines(proc.stdout))
        Lines(proc.stderr)  # drained, so the agent never blocks on a full pipe
        self.agents.append(agent)
        agent.out.wait_for(r"^ready")
        return agent

    def wait_connected(self, instance: str, timeout: float = 15.0) -> None:
        """Until every mesh routes to the instance (the mirror has heard of it)."""
        deadline = time.monotonic() + timeout
        for mesh in self.meshes:
            if mesh.proc.poll() is not None:
                continue
            token = mesh.token()
            with mesh.client() as client:
                while True:
                    answer = client.post("/agents/get_connection", json={"instance_id": instance},
                                         headers={"authorization": f"Bearer {token}"})
                    if answer.status_code == 200 and answer.json()["connection_status"] != (
                            "offline"):
                        break
                    assert time.monotonic() < deadline, (mesh.url, answer.text)
                    time.sleep(0.05)

    def close(self) -> list[str]:
        for agent in self.agents:
            agent.stop()
        return [mesh.stop() for mesh in self.meshes]


@pytest.fixture(params=[("postgresql", ("asyncio",)), ("sqlite", ("gevent", "asyncio"))],
                ids=["postgresql-asyncio", "sqlite-gevent-asyncio-gevent"])
def cluster(request: pytest.FixtureRequest, redis_server: Any,
            tmp_path: Path) -> Iterator[Cluster]:
    """Three mesh processes on one Redis (a prefix of their own) and one database: a
    PostgreSQL database of their own (the documented choice) with three asyncio meshes, or
    one SQLite file with a gevent, an asyncio and a gevent mesh side by side."""
    engine, adapters = request.param
    if engine == "postgresql":
        database = request.getfixturevalue("postgres_url")
    else:
        database = str(tmp_path / "mesh.db")
    cluster = Cluster(tmp_path, redis_server.url, f"t{uuid.uuid4().hex[:8]}", database,
                      adapters)
    try:
        cluster.start_mesh()  # makes the CA and the database
        for _ in range(2):
            cluster.start_mesh()
        yield cluster
    finally:
        if not redis_server.running:
            redis_server.start()
        logs = cluster.close()
        for log in logs:
            assert "Traceback" not in log, log


class Forwarder:
    """A TCP forwarder on 127.0.0.1 (the load balancer): each connection goes to the first
    backend port that accepts it, bytes copied both ways until either side closes."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._closing = threading.Event()
        self._socks: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = self._connect()
            if upstream is None:
                client.close()
                continue
            self._socks += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _connect(self) -> socket.socket | None:
        for port in self.ports:
            try:
                return socket.create_connection(("127.0.0.1", port), timeout=2)
            except OSError:
                continue
        return None

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            source.settimeout(None)
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)

    def cut(self) -> None:
        """Cut every connection now (an agent's socket drops: its process lives on)."""
        socks, self._socks = self._socks, []
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()

    def close(self) -> None:
        self._closing.set()
        self._listener.close()
        for sock in self._socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the copying threads' recv
            with contextlib.suppress(OSError):
                sock.close()
        self._thread.join(5)
