"""`svantic mesh`, `svantic agent examples.demo_agent:agent` and `svantic call`, as separate
processes on 127.0.0.1 over TLS: what an agent author types in three terminals.

The agent's log is part of what is tested: a line per connection state change and one per
dispatch (capability, outcome, milliseconds). So is `--reload`, which restarts the agent's
process when its module's file changes, and the usage errors, which are one line and exit 2.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest
import trustme

ROOT = Path(__file__).resolve().parents[2]
SIGNING = "cli-agent-dispatch-auth-secret-0123456789abcdef"
CLIENT = ("cli-client", "cli-client-secret-0123456789", "tenant-cli")
READY = re.compile(r"svantic mesh listening on (https://\S+) ")
CONNECTED = re.compile(r"svantic\.sdk: (\S+): connected")
DISCONNECTED = re.compile(r"svantic\.sdk: (\S+): disconnected$")
WAIT = 30.0
SVANTIC = [sys.executable, "-m", "svantic_mesh.cli"]


def _env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("SVANTIC_")}
    env.update(SVANTIC_SIGNING_SECRET=SIGNING, SVANTIC_PURE_PYTHON="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


class Lines:
    """Every line a process writes to one of its pipes, read by a thread (so the pipe never
    fills and stalls the process), with bounded waits for a line that matches."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.ended = False
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            with self.changed:
                self.lines.append(line.rstrip("\n"))
                self.changed.notify_all()
        with self.changed:
            self.ended = True
            self.changed.notify_all()

    def wait_for(self, pattern: re.Pattern[str] | str, *, after: int = 0,
                 timeout: float = WAIT) -> re.Match[str]:
        """The first line from index `after` on that matches, waiting at most `timeout`."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for line in self.lines[after:]:
                    match = regex.search(line)
                    if match:
                        return match
                left = deadline - time.monotonic()
                if left <= 0 or self.ended:
                    text = "\n".join(self.lines)
                    raise AssertionError(f"no line matching {regex.pattern!r} in:\n{text}")
                self.changed.wait(left)

    def text(self) -> str:
        with self.changed:
            return "\n".join(self.lines)


@dataclass
class MeshProcess:
    proc: subprocess.Popen[str]
    url: str
    ca: str
    log: Lines
    hosted_ca: trustme.CA
    folder: Path

    def issue_cert(self) -> tuple[str, str]:
        """`(certfile, keyfile)` for 127.0.0.1 that the mesh trusts (`--trust-ca`)."""
        leaf = self.hosted_ca.issue_cert("127.0.0.1")
        cert, key = self.folder / "hosted.cert.pem", self.folder / "hosted.key.pem"
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        key.write_bytes(leaf.private_key_pem.bytes())
        return str(cert), str(key)

    def call(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`svantic call ARGS...` against this mesh, as the test client."""
        return subprocess.run(
            [*SVANTIC, "call", *args, "--url", self.url, "--ca", self.ca,
             "--client-id", CLIENT[0], "--client-secret", CLIENT[1]],
            capture_output=True, text=True, timeout=WAIT, env=_env(), check=False)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshProcess]:
    """`svantic mesh` on a free port; Ctrl-C after the module's tests."""
    folder = tmp_path_factory.mktemp("cli-mesh")
    hosted_ca = trustme.CA()
    hosted_ca.cert_pem.write_to_path(str(folder / "hosted-ca.pem"))
    proc = subprocess.Popen(
        [*SVANTIC, "mesh", "--db", str(folder / "m.db"), "--port", "0", "--host", "127.0.0.1",
         "--client", ":".join(CLIENT), "--grace", "2",
         "--trust-ca", str(folder / "hosted-ca.pem")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    assert proc.stdout is not None and proc.stderr is not None
    out, log = Lines(proc.stdout), Lines(proc.stderr)
    try:
        url = out.wait_for(READY).group(1)
        ca = out.wait_for(r"local CA \(trust it in clients\): (\S+)").group(1)
        yield MeshProcess(proc, url, ca, log, hosted_ca, folder)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert "Traceback" not in log.text(), log.text()


def start_agent(mesh: MeshProcess, target: str, *options: str, cwd: Path = ROOT) -> (
        tuple[subprocess.Popen[str], Lines]):
    """`svantic agent TARGET --url ... OPTIONS` in `cwd`; its log (stderr) is read as it comes."""
    proc = subprocess.Popen(
        [*SVANTIC, "agent", target, "--url", mesh.url, "--cafile", mesh.ca,
         "--client-id", CLIENT[0], "--client-secret", CLIENT[1], *options],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(), cwd=cwd)
    assert proc.stderr is not None
    return proc, Lines(proc.stderr)


def stop(proc: subprocess.Popen[str], how: signal.Signals = signal.SIGTERM) -> int:
    """Signal the process and wait (bounded) for it to exit; returns its status."""
    if proc.poll() is None:
        proc.send_signal(how)
    try:
        return proc.wait(WAIT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


@pytest.mark.parametrize("adapter", ["asyncio", "trio", "gevent"])
def test_the_demo_agent_is_called_through_the_mesh(mesh: MeshProcess, adapter: str) -> None:
    instance = f"demo-{adapter}"
    agent, log = start_agent(mesh, "examples.demo_agent:agent", "--adapter", adapter,
                             "--instance-id", instance)
    try:
        assert log.wait_for(CONNECTED).group(1) == instance

        done = mesh.call("echo", '{"hello": "world"}', "--instance", instance)
        assert done.returncode == 0, done.stderr + log.text()
        assert json.loads(done.stdout) == {"hello": "world"}

        done = mesh.call("count", '{"n": 3}', "--stream", "--instance", instance)
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == [
            'chunk 0: {"i": 0}', 'chunk 1: {"i": 1}', 'chunk 2: {"i": 2}', '{"count": 3}']

        done = mesh.call("fail", '{"message": "boom"}', "--instance", instance)
        assert done.returncode == 1
        assert "HTTP 422 DISPATCH_FAILED" in done.stderr, done.stderr

        done = mesh.call("count", '{"n": "three"}', "--instance", instance)
        assert done.returncode == 1
        assert "INVALID_ARGUMENTS" in done.stderr, done.stderr

        done = mesh.call("ask", '{"agent_type": "demo", "message": "hi"}',
                         "--instance", instance)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {"asked": "demo", "answer": {"message": "hi"}}

        # One line per dispatch: capability, outcome, milliseconds.
        log.wait_for(r"dispatch echo ok \d+\.\d ms")
        log.wait_for(r"dispatch count ok \d+\.\d ms")
        log.wait_for(r"dispatch fail DISPATCH_FAILED \d+\.\d ms")
        log.wait_for(r"dispatch ask ok \d+\.\d ms")
    finally:
        status = stop(agent, signal.SIGINT)
    assert status == 0, log.text()
    log.wait_for(DISCONNECTED)
    text = log.text()
    assert "deregister failed" not in text and "Traceback" in text
    assert "RuntimeError: boom" in text  # the handler's traceback, in the agent's log only
    # Deregistered: the mesh no longer knows the instance.
    done = mesh.call("echo", "{}", "--instance", instance)
    assert done.returncode == 1
    assert re.search(r"HTTP (404|503) (INSTANCE_NOT_FOUND|AGENT_UNAVAILABLE)", done.stderr), (
        done.stderr)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize("adapter", ["asyncio", "gevent"])
def test_the_demo_agent_hosted(mesh: MeshProcess, adapter: str) -> None:
    """`--hosted`: the agent serves `POST /send` over HTTPS, the mesh calls it there."""
    cert, key = mesh.issue_cert()
    port = _free_port()
    instance = f"demo-hosted-{adapter}"
    agent, log = start_agent(
        mesh, "examples.demo_agent:agent", "--hosted", "--adapter", adapter,
        "--public-url", f"https://127.0.0.1:{port}", "--listen", f"127.0.0.1:{port}",
        "--certfile", cert, "--keyfile", key, "--instance-id", instance)
    try:
        assert log.wait_for(CONNECTED).group(1) == instance
        done = mesh.call("echo", '{"where": "hosted"}', "--instance", instance)
        assert json.loads(done.stdout or "null") == {"where": "hosted"}, (
            done.stderr + log.text())
        done = mesh.call("count", '{"n": 2}', "--stream", "--instance", instance)
        assert done.stdout.splitlines() == [
            'chunk 0: {"i": 0}', 'chunk 1: {"i": 1}', '{"count": 2}'], done.stderr
        log.wait_for(r"dispatch echo ok \d+\.\d ms")
        log.wait_for(r"dispatch count ok \d+\.\d ms")
    finally:
        status = stop(agent, signal.SIGINT)
    assert status == 0, log.text()
    log.wait_for(DISCONNECTED)


AGENT_MODULE = '''\
import svantic

agent = svantic.Agent(agent_type="reloading", description="reloads")


@agent.capability()
async def version(args, ctx):
    """Which version of this file runs."""
    return {VERSION}
'''


def test_reload_restarts_the_agent_when_its_module_changes(mesh: MeshProcess,
                                                          tmp_path: Path) -> None:
    module = tmp_path / "reloading_agent.py"
    module.write_text(AGENT_MODULE.replace("{VERSION}", "1"))
    agent, log = start_agent(mesh, "reloading_agent:agent", "--reload",
                             "--instance-id", "reload-1", cwd=tmp_path)
    try:
        log.wait_for(r"reloading on changes to .*reloading_agent\.py")
        log.wait_for(CONNECTED)
        done = mesh.call("version", "{}", "--instance", "reload-1")
        assert (done.returncode, done.stdout.strip()) == (0, "1"), done.stderr

        seen = len(log.lines)
        module.write_text(AGENT_MODULE.replace("{VERSION}", "2"))
        stamp = time.time() + 2  # a different mtime, whatever the file system's resolution
        os.utime(module, (stamp, stamp))
        log.wait_for(r"reloading_agent\.py changed: restarting", after=seen)
        log.wait_for(DISCONNECTED, after=seen)
        log.wait_for(CONNECTED, after=seen)
        done = mesh.call("version", "{}", "--instance", "reload-1")
        assert (done.returncode, done.stdout.strip()) == (0, "2"), done.stderr

        # A broken module: the child fails, the supervisor waits for the next change.
        seen = len(log.lines)
        module.write_text("this is not python\n")
        os.utime(module, (stamp + 2, stamp + 2))
        log.wait_for(r"exited with status 1: waiting for a change", after=seen)
        module.write_text(AGENT_MODULE.replace("{VERSION}", "3"))
        os.utime(module, (stamp + 4, stamp + 4))
        log.wait_for(CONNECTED, after=seen)
        done = mesh.call("version", "{}", "--instance", "reload-1")
        assert (done.returncode, done.stdout.strip()) == (0, "3"), done.stderr
    finally:
        status = stop(agent)  # SIGTERM to the supervisor: it stops its child first
    assert status == 0, log.text()
    assert sum(1 for line in log.lines if DISCONNECTED.search(line)) >= 3
    assert "deregister failed" not in log.text()


@pytest.mark.parametrize(("arguments", "message"), [
    (["nonsense"], r"'nonsense' is not MODULE:ATTR"),
    (["examples.demo_agent:agent"], r"no credentials: give --client-id"),
    (["examples.demo_agent:agent", "--client-id", "a"], r"no credentials"),
    (["examples.demo_agent:agent", "--token", "t", "--client-id", "a"], r"not both"),
    (["examples.no_such_module:agent", "--token", "t"], r"no module 'examples.no_such_module'"),
    (["no_such_package.agents:agent", "--token", "t"], r"no module 'no_such_package'"),
    (["examples.demo_agent:nothing", "--token", "t"], r"has no attribute 'nothing'"),
    (["examples.demo_agent:echo", "--token", "t"], r"is a function, not a svantic.Agent"),
    (["examples.demo_agent:agent", "--token", "t", "--hosted"], r"--hosted needs --public-url"),
    (["examples.demo_agent:agent", "--token", "t", "--listen", "x:1"], r"only apply with"),
    (["examples.demo_agent:agent", "--token", "t", "--hosted", "--public-url", "https://a",
      "--listen", "nowhere"], r"is not HOST:PORT"),
    (["examples.demo_agent:agent", "--token", "t", "--cafile", "/nonexistent/ca.pem"],
     r"no CA file"),
    (["examples.demo_agent:agent", "--token", "t", "--adapter", "tornado"], r"invalid choice"),
])
def test_a_usage_error_is_one_line_and_status_2(arguments: list[str], message: str) -> None:
    done = subprocess.run([*SVANTIC, "agent", *arguments], capture_output=True, text=True,
                          timeout=WAIT, env=_env(), cwd=ROOT, check=False)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("svantic agent: "), done.stderr
    assert re.search(message, lines[0]), lines[0]


def test_without_the_signing_secret_dispatch_auth_cannot_work() -> None:
    env = _env()
    del env["SVANTIC_SIGNING_SECRET"]
    done = subprocess.run([*SVANTIC, "agent", "examples.demo_agent:agent", "--token", "t"],
                          capture_output=True, text=True, timeout=WAIT, env=env, cwd=ROOT,
                          check=False)
    assert done.returncode == 2, done.stderr
    assert "SVANTIC_SIGNING_SECRET" in done.stderr and "Traceback" not in done.stderr


def test_a_refused_connection_is_one_line_and_status_1(mesh: MeshProcess) -> None:
    done = subprocess.run(
        [*SVANTIC, "agent", "examples.demo_agent:agent", "--url", mesh.url, "--cafile",
         mesh.ca, "--client-id", CLIENT[0], "--client-secret", "not-the-secret"],
        capture_output=True, text=True, timeout=WAIT, env=_env(), cwd=ROOT, check=False)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert re.search(r"ERROR svantic\.cli: cannot connect: UnauthorizedError", done.stderr), (
        done.stderr)


def test_credentials_and_the_mesh_come_from_the_environment(mesh: MeshProcess) -> None:
    env = _env(SVANTIC_URL=mesh.url, SVANTIC_CLIENT_ID=CLIENT[0],
               SVANTIC_CLIENT_SECRET=CLIENT[1], SVANTIC_CA_FILE=mesh.ca,
               SVANTIC_INSTANCE_ID="demo-env")
    proc = subprocess.Popen([*SVANTIC, "agent", "examples.demo_agent:agent"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT)
    assert proc.stderr is not None
    log = Lines(proc.stderr)
    try:
        assert log.wait_for(CONNECTED).group(1) == "demo-env"
        done = mesh.call("echo", '{"via": "env"}', "--instance", "demo-env")
        assert json.loads(done.stdout) == {"via": "env"}, done.stderr
    finally:
        assert stop(proc) == 0, log.text()
    log.wait_for(DISCONNECTED)


def test_help_says_how_reload_works() -> None:
    done = subprocess.run([*SVANTIC, "agent", "--help"], capture_output=True, text=True,
                          timeout=WAIT, env=_env(), check=False)
    assert done.returncode == 0
    assert "--reload" in done.stdout and "once a second" in done.stdout
    assert "supervis" in done.stdout and "SVANTIC_SIGNING_SECRET" in done.stdout
    done = subprocess.run([*SVANTIC, "--help"], capture_output=True, text=True, timeout=WAIT,
                          env=_env(), check=False)
    assert "svantic agent" in done.stdout
