"""What the fault and load tests share: a mesh process, agent processes, and a caller.

The mesh (`faults_mesh.py`) and the agents (`faults_agents.py`) are processes of their own,
as users run them, so a test can kill the mesh with SIGKILL and its CPU time is its own. Every
wait here is bounded and wakes on a line the process prints, not on a poll of fixed sleeps.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).parent
SIGNING = "faults-dispatch-auth-secret-0123456789abcdef"
CLIENT = ("faults-client", "faults-secret-0123456789", "tenant-faults")
START_TIMEOUT = 60.0


def env() -> dict[str, str]:
    environ = dict(os.environ)
    environ["SVANTIC_SIGNING_SECRET"] = SIGNING
    environ["PYTHONUNBUFFERED"] = "1"
    return environ


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process `pid` so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Lines:
    """A process's stdout, read by a thread of its own; `wait(predicate)` wakes on each line."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self.times: list[float] = []
        """`time.monotonic()` at which each line arrived."""
        self._changed = threading.Condition()
        self._proc = proc
        self.ended = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            with self._changed:
                self.times.append(time.monotonic())
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self.ended = True
            self._changed.notify_all()

    def wait(self, predicate: Callable[[list[str]], Any], timeout: float,
             what: str = "") -> Any:
        """Wait until `predicate(lines)` is truthy (returned); AssertionError at `timeout`."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = predicate(self.lines)
                if found:
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or self.ended:
                    tail = "\n".join(self.lines[-5:])
                    raise AssertionError(f"no {what or predicate} within {timeout} s "
                                         f"(ended: {self.ended}); last lines:\n{tail}")
                self._changed.wait(left)

    def when(self, line: str, timeout: float, after: float = 0.0) -> float:
        """The arrival time of the first line equal to `line` that arrived after `after`."""
        def found(lines: list[str]) -> float | None:
            return next((at for text, at in zip(lines, self.times, strict=False)
                         if text == line and at > after), None)
        return float(self.wait(found, timeout, repr(line)))

    def first(self, prefix: str, timeout: float) -> str:
        return str(self.wait(lambda lines: next(
            (line for line in lines if line.startswith(prefix)), None), timeout, prefix))


@dataclass
class MeshProcess:
    proc: subprocess.Popen[str]
    port: int
    folder: Path
    lines: Lines

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca(self) -> str:
        return str(self.folder / "m.ca.pem")

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca)

    def cpu_seconds(self) -> float:
        """User plus system CPU time of the mesh process so far."""
        return cpu_seconds(self.proc.pid)

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def log(self) -> str:
        """What the mesh logged (stderr, every run of this folder's mesh)."""
        return (self.folder / "mesh.log").read_text()

    def kill(self) -> None:
        """SIGKILL: a crash, nothing drained."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def token(self) -> str:
        with httpx.Client(base_url=self.url, verify=self.context(), trust_env=False,
                          timeout=20) as http:
            answer = http.post("/auth/token", json={"client_id": CLIENT[0],
                                                    "client_secret": CLIENT[1]})
            return str(answer.raise_for_status().json()["access_token"])


def start_mesh(folder: Path, *, adapter: str = "asyncio", port: int = 0,
               public_url: str | None = None, config: dict[str, Any] | None = None,
               log_level: str = "WARNING") -> MeshProcess:
    """A mesh process with its SQLite database `folder/m.db`; returns once it listens."""
    command = [sys.executable, str(HERE / "faults_mesh.py"), "--db", str(folder / "m.db"),
               "--port", str(port), "--adapter", adapter, "--client", ":".join(CLIENT),
               "--config", json.dumps(config or {}), "--log-level", log_level]
    if public_url is not None:
        command += ["--public-url", public_url]
    with open(folder / "mesh.log", "a") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True,
                                env=env())
    lines = Lines(proc)
    try:
        ready = lines.first("ready ", START_TIMEOUT)
    except AssertionError:
        proc.kill()
        proc.wait(5)
        raise
    return MeshProcess(proc, int(ready.split()[1]), folder, lines)


class Events:
    """The mesh's `GET /events` stream (SSE), read by a thread of its own: each event with
    the `time.monotonic()` it arrived at."""

    def __init__(self, mesh: MeshProcess) -> None:
        self.seen: list[tuple[float, str, dict[str, Any]]] = []
        self._changed = threading.Condition()
        self._open = threading.Event()
        self._token = mesh.token()
        self._mesh = mesh
        threading.Thread(target=self._read, daemon=True).start()
        assert self._open.wait(20), "the event stream did not open"

    def _read(self) -> None:
        with httpx.Client(base_url=self._mesh.url, verify=self._mesh.context(),
                          trust_env=False, timeout=httpx.Timeout(20, read=None)) as http, \
                http.stream("GET", "/events", headers={
                    "authorization": f"Bearer {self._token}"}) as stream:
            self._open.set()
            kind = ""
            try:
                for line in stream.iter_lines():
                    if line.startswith("event: "):
                        kind = line[len("event: "):]
                    elif line.startswith("data: "):
                        with self._changed:
                            self.seen.append((time.monotonic(), kind,
                                              json.loads(line[len("data: "):])))
                            self._changed.notify_all()
            except httpx.HTTPError:
                return  # the mesh went away: the stream ends with it

    def when(self, kind: str, instance: str, timeout: float, after: float = 0.0) -> float:
        """When the first `kind` event about `instance` after `after` arrived."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for at, name, data in self.seen:
                    if name == kind and at > after and instance in json.dumps(data):
                        return at
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {kind} for {instance} within {timeout} s: "
                                         f"{self.seen[-5:]}")
                self._changed.wait(left)


@dataclass
class AgentsProcess:
    proc: subprocess.Popen[str]
    lines: Lines
    spec: dict[str, Any] = field(default_factory=dict)

    def count(self, prefix: str) -> int:
        return sum(1 for line in self.lines.lines if line.startswith(prefix))

    def finish(self, timeout: float = 30.0) -> dict[str, int]:
        """Close stdin: the process prints its runs per dispatch id and exits."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        line = self.lines.first("runs ", timeout)
        self.proc.wait(timeout)
        return dict(json.loads(line[len("runs "):]))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def start_agents(mesh: MeshProcess, *, prefix: str, count: int, adapter: str = "asyncio",
                 mode: str = "sdk", agent_type: str = "worker",
                 config: dict[str, Any] | None = None, timeout: float = START_TIMEOUT,
                 **extra: Any) -> AgentsProcess:
    """`count` agents in one process; returns once all are connected."""
    spec = {"mode": mode, "adapter": adapter, "url": mesh.url, "ca": mesh.ca,
            "client_id": CLIENT[0], "client_secret": CLIENT[1], "prefix": prefix,
            "count": count, "agent_type": agent_type, "config": config or {}, **extra}
    proc = subprocess.Popen([sys.executable, str(HERE / "faults_agents.py"), json.dumps(spec)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env())
    agents = AgentsProcess(proc, Lines(proc), spec)
    try:
        agents.lines.first("ready ", timeout)
    except AssertionError:
        agents.kill()
        raise
    return agents


@dataclass
class Outcome:
    """What one caller saw for one dispatch: the status and the body (or the exception)."""

    key: int
    status: int | None
    body: Any
    seconds: float

    @property
    def code(self) -> str | None:
        if self.status == 200:
            return None
        if isinstance(self.body, dict):
            return str(self.body.get("error", {}).get("code"))
        return f"{type(self.body).__name__}"


async def call(http: httpx.AsyncClient, token: str, key: int, *, agent_type: str = "worker",
               sleep: float = 0.0, deadline_ms: int = 20_000, tell: bool = False) -> Outcome:
    """One `/agents/dispatch` of `work`; a transport failure is an outcome too (its type)."""
    started = time.perf_counter()
    try:
        answer = await http.post("/agents/dispatch", headers={
            "authorization": f"Bearer {token}"}, json={
            "capability": "work", "arguments": {"k": key, "sleep": sleep, "tell": tell},
            "agent_type": agent_type, "deadline_ms": deadline_ms})
    except httpx.HTTPError as exc:
        return Outcome(key, None, exc, time.perf_counter() - started)
    try:
        body = answer.json()
    except ValueError:
        body = answer.text
    return Outcome(key, answer.status_code, body, time.perf_counter() - started)
