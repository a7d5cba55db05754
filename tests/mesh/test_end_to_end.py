"""`svantic mesh` and agents built on the adapters, as separate processes on 127.0.0.1.

What a user does: start the mesh, start agents that register and connect, then call them
with `svantic call` and with plain HTTPS (JSON and SSE); one agent calls another through a
tool call; a hosted agent is called by the mesh over HTTPS.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import trustme

HERE = Path(__file__).parent
SIGNING = "e2e-dispatch-auth-secret-0123456789abcdef"
CLIENT = ("e2e-client", "e2e-secret-0123456789", "tenant-e2e")
READY = re.compile(r"svantic mesh listening on (https://\S+) \(dashboard: (\S+)\)")
ADAPTERS = ["asyncio", "trio", "gevent"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["SVANTIC_SIGNING_SECRET"] = SIGNING
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _read_until(proc: subprocess.Popen[str], pattern: re.Pattern[str], seen: list[str],
                timeout: float = 30.0) -> re.Match[str]:
    """Lines of `proc`'s stdout until one matches (a reader thread bounds the wait)."""
    found: list[re.Match[str]] = []
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
    assert done.wait(timeout) and found, f"no {pattern.pattern!r} in {seen}"
    return found[0]


@dataclass
class Mesh:
    proc: subprocess.Popen[str]
    url: str
    ca: str
    folder: Path
    agents: list[subprocess.Popen[str]] = field(default_factory=list)

    def client(self) -> httpx.Client:
        import ssl

        return httpx.Client(base_url=self.url, trust_env=False, timeout=20,
                            verify=ssl.create_default_context(cafile=self.ca))

    def token(self) -> str:
        with self.client() as client:
            answer = client.post("/auth/token", json={"client_id": CLIENT[0],
                                                      "client_secret": CLIENT[1]})
            return str(answer.raise_for_status().json()["access_token"])

    def agent(self, instance: str, agent_type: str, adapter: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "agent_process.py"), self.url, self.ca, CLIENT[0],
             CLIENT[1], instance, agent_type, adapter],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env())
        self.agents.append(proc)
        _read_until(proc, re.compile(r"^ready"), [])
        return proc


def start_mesh(folder: Path, adapter: str) -> Mesh:
    """`svantic mesh` on a free port with a database in `folder`, once it says it listens."""
    hosted_ca = trustme.CA()
    (folder / "hosted-ca.pem").write_bytes(hosted_ca.cert_pem.bytes())
    proc = subprocess.Popen(
        [sys.executable, "-m", "svantic_mesh.cli", "mesh", "--db", str(folder / "m.db"),
         "--port", "0", "--client", ":".join(CLIENT), "--adapter", adapter,
         "--trust-ca", str(folder / "hosted-ca.pem"), "--grace", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    seen: list[str] = []
    match = _read_until(proc, READY, seen)
    ca = next(line.split(": ", 1)[1].strip() for line in seen if "local CA" in line)
    mesh = Mesh(proc, match.group(1), ca, folder)
    mesh.hosted_ca = hosted_ca  # type: ignore[attr-defined]
    return mesh


def stop_mesh(mesh: Mesh) -> str:
    """Stop the agents, then Ctrl-C the mesh: it drains and exits 0. Returns its log."""
    for agent in mesh.agents:
        if agent.poll() is None:
            assert agent.stdin is not None
            agent.stdin.close()
    for agent in mesh.agents:
        try:
            agent.wait(15)
        except subprocess.TimeoutExpired:
            agent.kill()
    mesh.proc.send_signal(signal.SIGINT)
    try:
        code = mesh.proc.wait(20)
    except subprocess.TimeoutExpired:
        mesh.proc.kill()
        mesh.proc.wait()
        raise
    assert mesh.proc.stderr is not None
    log = mesh.proc.stderr.read()
    assert "Traceback" not in log, log
    assert code == 0 and "svantic mesh stopped" in log, log
    return log


@pytest.fixture(params=ADAPTERS)
def mesh(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Mesh]:
    mesh = start_mesh(tmp_path, request.param)
    try:
        yield mesh
    finally:
        stop_mesh(mesh)


def test_registrations_survive_a_restart(tmp_path: Path) -> None:
    mesh = start_mesh(tmp_path, "asyncio")
    try:
        mesh.agent("kept-1", "kept", "asyncio")
    finally:
        log = stop_mesh(mesh)
    assert "kept-1" in log  # its registration and connection were logged
    mesh = start_mesh(tmp_path, "asyncio")
    try:
        with mesh.client() as client:
            answer = client.post("/agents/get_connection", json={"instance_id": "kept-1"},
                                 headers={"authorization": f"Bearer {mesh.token()}"})
        assert answer.status_code == 200, answer.text
        assert answer.json()["agent_type"] == "kept"
        assert answer.json()["connection_status"] == "offline"  # its socket died with the mesh
    finally:
        stop_mesh(mesh)


def test_agents_are_called_through_the_mesh(mesh: Mesh) -> None:
    mesh.agent("echo-1", "echo-agent", "asyncio")
    mesh.agent("caller-1", "caller", "gevent")
    token = mesh.token()
    auth = {"authorization": f"Bearer {token}"}
    with mesh.client() as client:
        # Plain HTTP, JSON answer.
        answer = client.post("/agents/dispatch", headers=auth, json={
            "capability": "echo", "arguments": {"x": 1}, "agent_type": "echo-agent"})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["instance_id"] == "echo-1"
        assert body["result"] == {"echo": {"x": 1}, "instance": "echo-1"}
        assert re.fullmatch(r"[0-9a-f-]{36}", body["dispatch_id"])

        # SSE: chunks in order, then the result.
        with client.stream("POST", "/agents/dispatch", json={
                "capability": "count", "arguments": {"to": 4}, "instance_id": "echo-1"},
                headers={**auth, "accept": "text/event-stream"}) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            events = _sse(stream.iter_lines())
        assert [name for name, _ in events] == ["chunk"] * 4 + ["result"]
        assert [data["seq"] for _, data in events[:4]] == [0, 1, 2, 3]
        assert [data["data"] for _, data in events[:4]] == [0, 1, 2, 3]
        assert events[-1][1]["result"] == {"counted": 4}

        # A handler's failure: the agent's code, never its exception text.
        answer = client.post("/agents/dispatch", headers=auth, json={
            "capability": "fail", "instance_id": "echo-1"})
        assert answer.status_code == 422
        assert answer.json()["error"]["code"] == "DISPATCH_FAILED"

        # A tool call from one agent (gevent) to another (asyncio) through the mesh.
        answer = client.post("/agents/dispatch", headers=auth, json={
            "capability": "ask", "arguments": {"agent_type": "echo-agent"},
            "instance_id": "caller-1"})
        assert answer.status_code == 200, answer.text
        asked = answer.json()["result"]["asked"]
        assert asked == {"echo": {"from": "caller-1"}, "instance": "echo-1"}

        # An agent calling itself without end is stopped by the mesh's depth limit.
        answer = client.post("/agents/dispatch", headers=auth, json={
            "capability": "loop", "instance_id": "caller-1", "deadline_ms": 20_000})
        assert answer.status_code == 422, answer.text
        assert answer.json()["error"]["code"] == "TOOL_DEPTH_EXCEEDED"

        status = client.post("/agents/get_connection", headers=auth,
                             json={"instance_id": "echo-1"}).json()
        assert status["connection_status"] in ("online", "healthy", "degraded")
        assert status["transport"] == "ws"

    # `svantic call`, as a user tries an agent without writing a client.
    done = subprocess.run(
        [sys.executable, "-m", "svantic_mesh.cli", "call", "echo", '{"hello": "world"}',
         "--agent-type", "echo-agent", "--url", mesh.url, "--ca", mesh.ca,
         "--client-id", CLIENT[0], "--client-secret", CLIENT[1]],
        capture_output=True, text=True, timeout=60, env=_env(), check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"echo": {"hello": "world"}, "instance": "echo-1"}
    done = subprocess.run(
        [sys.executable, "-m", "svantic_mesh.cli", "call", "count", '{"to": 2}',
         "--stream", "--url", mesh.url, "--ca", mesh.ca,
         "--client-id", CLIENT[0], "--client-secret", CLIENT[1]],
        capture_output=True, text=True, timeout=60, env=_env(), check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["chunk 0: 0", "chunk 1: 1", '{"counted": 2}']

    # The agent goes away: its capability is no longer routable.
    echo = mesh.agents[0]
    assert echo.stdin is not None
    echo.stdin.close()
    echo.wait(15)
    with mesh.client() as client:
        answer = client.post("/agents/dispatch", headers=auth, json={
            "capability": "echo", "agent_type": "echo-agent"})
        assert answer.status_code in (502, 503)
        assert answer.json()["error"]["code"] in ("AGENT_DISCONNECTED", "AGENT_UNAVAILABLE")


def test_a_hosted_agent_is_called_by_the_mesh(mesh: Mesh) -> None:
    received: list[dict[str, Any]] = []
    hosted = _HostedAgent(mesh.hosted_ca, received)  # type: ignore[attr-defined]
    try:
        token = mesh.token()
        auth = {"authorization": f"Bearer {token}"}
        with mesh.client() as client:
            answer = client.post("/agents/register", headers=auth, json={
                "agent_type": "hosted-echo", "instance_id": "hosted-1", "url": hosted.url})
            assert answer.status_code == 200, answer.text
            assert answer.json()["deployment_mode"] == "hosted"
            assert answer.json()["connect_url"] is None
            answer = client.post("/agents/dispatch", headers=auth, json={
                "capability": "shout", "arguments": {"text": "hi"}})
            assert answer.status_code == 200, answer.text
            assert answer.json()["result"] == {"text": "HI"}
            with client.stream("POST", "/agents/dispatch", json={
                    "capability": "shout", "arguments": {"text": "ab"}},
                    headers={**auth, "accept": "text/event-stream"}) as stream:
                events = _sse(stream.iter_lines())
            assert [name for name, _ in events] == ["chunk", "chunk", "result"]
            assert events[-1][1]["result"] == {"text": "AB"}
            # A hosted agent heartbeats over HTTP.
            answer = client.post("/agents/heartbeat", headers=auth, json={
                "instance_id": "hosted-1", "active_sessions": 0, "status": "available"})
            assert answer.status_code == 200, answer.text
            assert answer.json()["routing_status"] == "available"
        # The payload is the spec 3 dispatch, with a dispatch-auth JWT for this instance.
        payload = received[0]
        assert payload["capability"] == "shout" and payload["arguments"] == {"text": "hi"}
        claims = jwt.decode(payload["dispatch_auth"]["token"], SIGNING, algorithms=["HS256"],
                            audience="hosted-1")
        assert claims["jti"] == payload["dispatch_id"] and claims["cap"] == "shout"
        # A probe that fails is 502.
        with mesh.client() as client:
            answer = client.post("/agents/register", headers=auth, json={
                "agent_type": "hosted-echo", "instance_id": "hosted-2",
                "url": "https://127.0.0.1:9/nothing"})
            assert answer.status_code == 502
            assert answer.json()["error"]["code"] == "AGENT_CARD_PROBE_FAILED"
    finally:
        hosted.close()


def _sse(lines: Iterator[str]) -> list[tuple[str, Any]]:
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
                data.append(value.removeprefix(" "))
            continue
        if data:
            events.append((name, json.loads("\n".join(data))))
            if name in ("result", "error"):
                break
        name, data = "message", []
    return events


class _HostedAgent:
    """A hosted agent (spec 8) on 127.0.0.1 over TLS: a card and `POST /send`."""

    def __init__(self, ca: trustme.CA, received: list[dict[str, Any]]) -> None:
        import ssl

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1").configure_cert(context)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if self.path != "/.well-known/agent-card.json":
                    self.send_error(404)
                    return
                body = json.dumps({"name": "hosted-echo",
                                   "skills": [{"id": "shout"}]}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                length = int(self.headers["content-length"])
                payload = json.loads(self.rfile.read(length))
                received.append(payload)
                text = str(payload["arguments"]["text"]).upper()
                if "text/event-stream" in self.headers.get("accept", ""):
                    self.send_response(200)
                    self.send_header("content-type", "text/event-stream")
                    self.send_header("connection", "close")
                    self.end_headers()
                    for letter in text:
                        self.wfile.write(f"event: chunk\ndata: {json.dumps({'data': letter})}"
                                         "\n\n".encode())
                        self.wfile.flush()
                    result = json.dumps({"result": {"text": text}})
                    self.wfile.write(f"event: result\ndata: {result}\n\n".encode())
                    self.close_connection = True
                    return
                body = json.dumps({"result": {"text": text}}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_events_stream_the_lifecycle_in_order(mesh: Mesh) -> None:
    """`GET /events`: a keepalive comment first, then the seed's lifecycle events, in order."""
    token = mesh.token()
    lines: list[str] = []
    events: list[tuple[str, dict[str, Any]]] = []
    arrived = threading.Condition()

    def read() -> None:
        with mesh.client() as client, client.stream(
                "GET", "/events", headers={"authorization": f"Bearer {token}"}) as stream:
            assert stream.status_code == 200
            name = ""
            for line in stream.iter_lines():
                with arrived:
                    lines.append(line)
                    arrived.notify_all()
                if line.startswith("event:"):
                    name = line.partition(":")[2].strip()
                elif line.startswith("data:"):
                    with arrived:
                        events.append((name, json.loads(line.partition(":")[2])))
                        arrived.notify_all()
                    if name == "agent.disconnected":
                        return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def wait_for(kind: str) -> None:
        with arrived:
            assert arrived.wait_for(lambda: any(name == kind for name, _ in events),
                                    timeout=20), events

    with arrived:  # the stream is open once its first comment arrived
        assert arrived.wait_for(lambda: bool(lines), timeout=20)
    assert lines[0].startswith(":")
    agent = mesh.agent("watched-1", "watched", "asyncio")
    wait_for("agent.connected")
    assert agent.stdin is not None
    agent.stdin.close()
    agent.wait(15)
    wait_for("agent.disconnected")
    reader.join(10)
    # Health changes (its first heartbeat makes it `available`) may come in between.
    kinds = [name for name, _ in events if name != "agent.health_changed"]
    assert kinds == ["agent.registered", "agent.connected", "agent.disconnected"]
    assert all(data["instance_id"] == "watched-1" for _, data in events)
    assert all(data["tenant_id"] == CLIENT[2] for _, data in events)
