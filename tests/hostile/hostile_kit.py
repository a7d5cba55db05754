"""What the hostile-input tests share: a mesh process on 127.0.0.1 with TLS, a canary agent
that keeps being called while a test attacks, and a raw WebSocket peer that sends exactly
the bytes a test wants (no library between the test and the wire).

Every wait is bounded: sockets have timeouts, loops have counts and deadlines.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).parent
AGENT_PROCESS = HERE.parent / "mesh" / "agent_process.py"
SIGNING = "hostile-dispatch-auth-secret-0123456789abcdef"
CLIENT_A = ("client-a", "secret-a-0123456789abcdef", "tenant-a")
CLIENT_B = ("client-b", "secret-b-0123456789abcdef", "tenant-b")
TOKEN_SECRET = b"hostile-token-secret-0123456789abcdef0123"
WAIT = 30.0
LEAK = re.compile(r"Traceback|File \"|\b[A-Z][A-Za-z]*(Error|Exception)\b|sqlite|psycopg|"
                  r"msgspec|PyJWT|jwt\.")
"""What an answer to a peer must never contain: exception names, tracebacks, library names."""


def env() -> dict[str, str]:
    out = dict(os.environ)
    out["SVANTIC_SIGNING_SECRET"] = SIGNING
    out["PYTHONUNBUFFERED"] = "1"
    return out


def read_line(proc: subprocess.Popen[str], pattern: re.Pattern[str],
              timeout: float = WAIT) -> re.Match[str]:
    """The first stdout line of `proc` matching `pattern` (a reader thread bounds the wait)."""
    found: list[re.Match[str]] = []
    seen: list[str] = []
    done = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            match = pattern.search(line)
            if match:
                found.append(match)
                break
        done.set()

    threading.Thread(target=read, daemon=True).start()
    if not done.wait(timeout) or not found:
        raise AssertionError(f"no {pattern.pattern!r} from the process: {seen}")
    return found[0]


@dataclass
class MeshProcess:
    """A running mesh process (see mesh_process.py)."""

    proc: subprocess.Popen[str]
    url: str
    port: int
    ca_file: str
    adapter: str
    agents: list[subprocess.Popen[str]] = field(default_factory=list)
    _tokens: dict[str, str] = field(default_factory=dict)

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca_file)

    def client(self, timeout: float = WAIT) -> httpx.Client:
        return httpx.Client(base_url=self.url, verify=self.context(), trust_env=False,
                            timeout=timeout)

    def token(self, who: tuple[str, str, str] = CLIENT_A) -> str:
        if who[0] not in self._tokens:
            with self.client() as client:
                answer = client.post("/auth/token", json={"client_id": who[0],
                                                          "client_secret": who[1]})
                self._tokens[who[0]] = str(answer.raise_for_status().json()["access_token"])
        return self._tokens[who[0]]

    def post(self, path: str, body: Any, *, who: tuple[str, str, str] = CLIENT_A,
             token: str | None = None) -> httpx.Response:
        with self.client() as client:
            return client.post(path, json=body, headers={
                "authorization": f"Bearer {token if token is not None else self.token(who)}"})

    def register(self, instance: str, *, who: tuple[str, str, str] = CLIENT_A,
                 capabilities: tuple[str, ...] = ("echo",)) -> dict[str, Any]:
        answer = self.post("/agents/register", {
            "agent_type": "hostile", "instance_id": instance,
            "tools": [{"name": name} for name in capabilities]}, who=who)
        assert answer.status_code == 200, answer.text
        return dict(answer.json())

    def start_agent(self, instance: str, adapter: str = "asyncio") -> subprocess.Popen[str]:
        """A real agent (tests/mesh/agent_process.py) serving `echo`, in its own process."""
        proc = subprocess.Popen(
            [sys.executable, str(AGENT_PROCESS), self.url, self.ca_file, CLIENT_A[0],
             CLIENT_A[1], instance, "canary", adapter],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env())
        self.agents.append(proc)
        read_line(proc, re.compile(r"^ready"))
        return proc

    def tls_socket(self, timeout: float = 10.0) -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        return self.context().wrap_socket(raw, server_hostname="127.0.0.1")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_so_far(self) -> str:
        """stderr is read at stop; this is only for messages in assertions."""
        return "" if self.alive() else (self.proc.stderr.read() if self.proc.stderr else "")


def start_mesh(folder: Path, adapter: str = "asyncio",
               options: dict[str, Any] | None = None) -> MeshProcess:
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "mesh_process.py"), str(folder), adapter,
         json.dumps(options or {})],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env())
    match = read_line(proc, re.compile(r"listening (https://127\.0\.0\.1:(\d+))"))
    return MeshProcess(proc, match.group(1), int(match.group(2)), str(folder / "ca.pem"),
                       adapter)


def stop_mesh(mesh: MeshProcess) -> str:
    """Stop the agents, then the mesh; returns the mesh's log (asserted free of tracebacks
    by the callers that care)."""
    for agent in mesh.agents:
        if agent.poll() is None and agent.stdin is not None:
            agent.stdin.close()
    for agent in mesh.agents:
        try:
            agent.wait(10)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait(5)
    if mesh.proc.poll() is None and mesh.proc.stdin is not None:
        mesh.proc.stdin.close()
    try:
        mesh.proc.wait(15)
    except subprocess.TimeoutExpired:
        mesh.proc.kill()
        mesh.proc.wait(5)
    assert mesh.proc.stderr is not None
    return mesh.proc.stderr.read()


# -- the canary --------------------------------------------------------------------------------


class Canary:
    """Calls `echo` on a canary agent through `/agents/dispatch` every `period` seconds over
    one kept-alive HTTPS connection, in a thread, and records every round trip.

    The worst delay is what an attack costs an innocent caller; a failure is recorded too.
    """

    def __init__(self, mesh: MeshProcess, instance: str, period: float = 0.05) -> None:
        self.mesh = mesh
        self.instance = instance
        self.period = period
        self.delays: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="canary", daemon=True)
        self._token = mesh.token()

    def _run(self) -> None:
        with self.mesh.client(timeout=10.0) as client:
            for n in range(100_000):  # bounded; stop() ends it long before
                if self._stop.is_set():
                    return
                started = time.perf_counter()
                try:
                    answer = client.post("/agents/dispatch", headers={
                        "authorization": f"Bearer {self._token}"}, json={
                        "capability": "echo", "arguments": {"n": n},
                        "instance_id": self.instance, "deadline_ms": 10_000})
                    elapsed = time.perf_counter() - started
                    if answer.status_code != 200 or answer.json()["result"]["echo"] != {"n": n}:
                        self.failures.append(f"{answer.status_code} {answer.text[:200]}")
                    else:
                        self.delays.append(elapsed)
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                self._stop.wait(self.period)

    def __enter__(self) -> Canary:
        self._thread.start()
        deadline = time.monotonic() + WAIT
        while not self.delays and not self.failures and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.delays, f"the canary never answered: {self.failures}"
        self.delays.clear()  # the first call paid for TLS and the token check
        return self

    def __exit__(self, *exc: object) -> None:
        # A few calls at least, so an attack shorter than the period is still measured
        # right after it (the mesh may still be digesting it).
        deadline = time.monotonic() + 10.0
        while len(self.delays) + len(self.failures) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        self._stop.set()
        self._thread.join(15)

    @property
    def worst(self) -> float:
        return max(self.delays) if self.delays else float("inf")

    def report(self, what: str) -> str:
        delays = sorted(self.delays)
        median = delays[len(delays) // 2] if delays else float("nan")
        line = (f"canary during {what} ({self.mesh.adapter}): {len(delays)} calls, "
                f"median {median * 1000:.1f} ms, worst {self.worst * 1000:.1f} ms, "
                f"{len(self.failures)} failures")
        print(line)
        return line


# -- a raw WebSocket peer ----------------------------------------------------------------------


def upgrade_request(instance: str, token: str | None, *, protocol: str = "svantic.v1",
                    extra: str = "") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    auth = f"Authorization: Bearer {token}\r\n" if token is not None else ""
    return (f"GET /agents/connect?instance_id={instance} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {protocol}\r\n{auth}{extra}"
            "\r\n").encode()


def read_http_answer(sock: ssl.SSLSocket, limit: int = 1 << 20) -> tuple[int, bytes, bytes]:
    """`(status, head, rest)`: the answer's head, then whatever was read after it (the body,
    or the first WebSocket frames). Bounded by `limit` bytes and the socket's timeout."""
    data = b""
    while b"\r\n\r\n" not in data and len(data) < limit:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    match = re.match(rb"HTTP/1\.1 (\d{3})", head)
    assert match, f"not an HTTP answer: {data[:200]!r}"
    return int(match.group(1)), head, rest


def read_body(sock: ssl.SSLSocket, head: bytes, rest: bytes) -> bytes:
    match = re.search(rb"(?i)content-length: (\d+)", head)
    length = int(match.group(1)) if match else 0
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return rest[:length]


def raw_request(mesh: MeshProcess, method: str, path: str, body: bytes = b"",
                headers: tuple[tuple[str, str], ...] = ()) -> tuple[int, bytes]:
    """One request written by hand (any header bytes, even ones clients refuse to send) on
    a fresh TLS connection; returns the status and body of the answer."""
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers)
    head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            f"Content-Length: {len(body)}\r\n{lines}\r\n")
    sock = mesh.tls_socket()
    try:
        sock.sendall(head.encode("utf-8") + body)
        status, answer_head, rest = read_http_answer(sock)
        return status, read_body(sock, answer_head, rest)
    finally:
        sock.close()


def ws_frame(opcode: int, payload: bytes, *, fin: bool = True, declared: int | None = None,
             mask: bytes = b"\x01\x02\x03\x04") -> bytes:
    """One masked client frame; `declared` lies about the length (the payload is not sent
    beyond what is given)."""
    size = len(payload) if declared is None else declared
    first = (0x80 if fin else 0) | opcode
    if size < 126:
        header = bytes([first, 0x80 | size])
    elif size < 1 << 16:
        header = bytes([first, 0x80 | 126]) + size.to_bytes(2, "big")
    else:
        header = bytes([first, 0x80 | 127]) + size.to_bytes(8, "big")
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def frame_text(frame_type: str, payload: dict[str, Any], *, in_reply_to: str | None = None,
               frame_id: str | None = None) -> bytes:
    frame: dict[str, Any] = {"v": 1, "type": frame_type, "id": frame_id or str(uuid.uuid4()),
                             "ts": "2026-11-21T10:00:00.123Z", "payload": payload}
    if in_reply_to is not None:
        frame["in_reply_to"] = in_reply_to
    return json.dumps(frame).encode()


@dataclass
class ServerFrame:
    opcode: int
    payload: bytes

    @property
    def close_code(self) -> int | None:
        if self.opcode != 0x8 or len(self.payload) < 2:
            return None
        return int.from_bytes(self.payload[:2], "big")

    def json(self) -> Any:
        return json.loads(self.payload)


class RawAgent:
    """An agent written by hand on a TLS socket: upgrade, hello, then whatever bytes the test
    sends. Reads the mesh's (unmasked) frames with a bounded wait."""

    def __init__(self, mesh: MeshProcess, instance: str, *, token: str | None = None) -> None:
        self.mesh = mesh
        self.instance = instance
        self.sock = mesh.tls_socket()
        self.buffer = b""
        self.welcome: Any = None
        self._token = token if token is not None else mesh.token()

    def upgrade(self) -> int:
        self.sock.sendall(upgrade_request(self.instance, self._token))
        status, _, rest = read_http_answer(self.sock)
        self.buffer = rest
        return status

    def hello(self, resume_token: str | None = None) -> Any:
        assert self.upgrade() == 101
        payload: dict[str, Any] = {"instance_id": self.instance, "agent_type": "hostile",
                                   "capabilities": ["echo"]}
        if resume_token is not None:
            payload["resume_token"] = resume_token
        self.send(ws_frame(0x1, frame_text("hello", payload)))
        self.welcome = self.next_frame(10.0).json()
        assert self.welcome["type"] == "welcome", self.welcome
        return self.welcome

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def next_frame(self, timeout: float = 10.0) -> ServerFrame:
        """The next frame from the mesh; raises TimeoutError after `timeout` seconds and
        ConnectionError when the socket ends first."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self._parse()
            if frame is not None:
                return frame
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no frame from the mesh in time")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError as exc:
                raise TimeoutError("no frame from the mesh in time") from exc
            if not chunk:
                raise ConnectionError("the mesh closed the socket")
            self.buffer += chunk

    def _parse(self) -> ServerFrame | None:
        data = self.buffer
        if len(data) < 2:
            return None
        size = data[1] & 0x7F
        at = 2
        if size == 126:
            if len(data) < 4:
                return None
            size, at = int.from_bytes(data[2:4], "big"), 4
        elif size == 127:
            if len(data) < 10:
                return None
            size, at = int.from_bytes(data[2:10], "big"), 10
        if len(data) < at + size:
            return None
        self.buffer = data[at + size:]
        return ServerFrame(data[0] & 0x0F, data[at:at + size])

    def frames_until(self, predicate: Any, timeout: float = 10.0,
                     limit: int = 100_000) -> list[ServerFrame]:
        """Frames until one satisfies `predicate` (included); bounded in count and time."""
        deadline = time.monotonic() + timeout
        seen = []
        for _ in range(limit):
            frame = self.next_frame(max(0.01, deadline - time.monotonic()))
            seen.append(frame)
            if predicate(frame):
                return seen
        raise AssertionError(f"no matching frame in {limit} frames")

    def close_code(self, timeout: float = 10.0) -> int | None:
        """The close code the mesh sends next (skipping other frames)."""
        frames = self.frames_until(lambda f: f.opcode == 0x8, timeout)
        return frames[-1].close_code

    def eof_within(self, timeout: float) -> bool:
        """Whether the mesh ends the socket within `timeout` seconds (frames are skipped)."""
        deadline = time.monotonic() + timeout
        for _ in range(100_000):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.sock.settimeout(left)
            try:
                if not self.sock.recv(65536):
                    return True
            except TimeoutError:
                return False
            except (ConnectionError, ssl.SSLError):
                return True
        return False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


@contextmanager
def raw_agent(mesh: MeshProcess, instance: str, **kwargs: Any) -> Iterator[RawAgent]:
    agent = RawAgent(mesh, instance, **kwargs)
    try:
        yield agent
    finally:
        agent.close()
