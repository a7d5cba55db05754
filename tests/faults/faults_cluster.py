"""Several `svantic mesh --redis` processes, and agents whose sockets go through fault proxies,
for the fault tests across processes (issue 17).

As a module: `start_cluster` starts mesh processes as users run them (`svantic mesh` on one
Redis and one database, sharing secrets through the environment and their CA through one
`--home` folder), and `start_agents` starts one process of agents. As a script: that agents'
process. Each agent registers with a mesh directly but dials the WebSocket URL it is given
(a fault proxy in front of a mesh), on the path the registration answered: the proxy is
what a load balancer is to a real deployment, so a test can cut the agents' sockets or, once
a mesh died, send their reconnects to another mesh.

Every agent serves `work` as `faults_agents.py` does: it counts runs per dispatch id (a
second run of one id is the bug looked for) and returns `{"k": k, "v": 3 * k + 1}`. Lines on
stdout: `up INSTANCE fresh`, `up INSTANCE resumed REPLAYED`, `down INSTANCE`, `ready COUNT`,
and on stdin's end `runs {JSON}`.

  python faults_cluster.py '{"register_url": ..., "ca": ..., "client_id": ...,
      "client_secret": ..., "agents": [[INSTANCE, AGENT_TYPE, DIAL_URL], ...], "config": {}}'
  (SVANTIC_SIGNING_SECRET in the environment: the meshes' dispatch-auth secret)
"""

from __future__ import annotations

import json
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

HERE = Path(__file__).parent
SIGNING = "faults-cluster-dispatch-auth-0123456789abcdef"
TOKEN_SECRET = "faults-cluster-token-secret-0123456789abcd"
ENCRYPTION_KEY = "22" * 32
CLIENT = ("faults-cluster", "faults-cluster-secret-0123", "tenant-faults-cluster")
START_TIMEOUT = 60.0
READY = re.compile(r"svantic mesh listening on (https://\S+) \(dashboard")
CA_LINE = re.compile(r"local CA \(trust it in clients\): (\S+)")


def env() -> dict[str, str]:
    values = dict(os.environ)
    values.update({
        "SVANTIC_SIGNING_SECRET": SIGNING, "SVANTIC_TOKEN_SECRET": TOKEN_SECRET,
        "SVANTIC_ENCRYPTION_KEY": ENCRYPTION_KEY, "PYTHONUNBUFFERED": "1",
    })
    return values


class Stream:
    """A child's text stream read by a thread of its own: every line with the
    `time.monotonic()` it arrived at; `wait` wakes on each new line, bounded."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self.times: list[float] = []
        self.ended = False
        self._changed = threading.Condition()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self.times.append(time.monotonic())
                self._changed.notify_all()
        with self._changed:
            self.ended = True
            self._changed.notify_all()

    def wait(self, predicate: Callable[[list[str]], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = predicate(self.lines)
                if found:
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or self.ended:
                    tail = "\n".join(self.lines[-20:])
                    raise AssertionError(f"no {what} within {timeout} s (ended: {self.ended});"
                                         f" last lines:\n{tail}")
                self._changed.wait(left)

    def search(self, pattern: str, timeout: float, after: float = 0.0) -> tuple[float, str]:
        """The first line matching `pattern` that arrived after `after`: (time, line)."""
        regex = re.compile(pattern)

        def found(lines: list[str]) -> tuple[float, str] | None:
            return next(((at, line) for line, at in zip(lines, self.times, strict=False)
                         if at > after and regex.search(line)), None)
        at, line = self.wait(found, timeout, repr(pattern))
        return float(at), str(line)

    def text(self) -> str:
        with self._changed:
            return "\n".join(self.lines)


@dataclass
class ClusterMesh:
    """One `svantic mesh --redis` process."""

    proc: subprocess.Popen[str]
    url: str
    port: int
    ca: str
    out: Stream
    err: Stream
    killed: bool = False
    """The test killed it (`kill`): its exit is expected."""
    died: int | None = None
    """Its exit status when it was found already gone at `stop` (a crash the test did not
    cause, unless `killed`)."""

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca)

    def token(self) -> str:
        import httpx

        with httpx.Client(base_url=self.url, verify=self.context(), trust_env=False,
                          timeout=20) as http:
            answer = http.post("/auth/token", json={"client_id": CLIENT[0],
                                                    "client_secret": CLIENT[1]})
            return str(answer.raise_for_status().json()["access_token"])

    def kill(self) -> None:
        """SIGKILL: a crash, nothing drained, its Redis entries left to expire."""
        self.killed = True
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> str:
        """SIGTERM (drain, leave the cluster), SIGKILL after 30 s; returns its log."""
        self.died = self.proc.poll()
        if self.died is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.err.text()


@dataclass
class Cluster:
    folder: Path
    redis_url: str
    prefix: str
    database: str
    meshes: list[ClusterMesh] = field(default_factory=list)
    adapters: list[str] = field(default_factory=list)
    """Each mesh's adapter, in the order they started."""

    @property
    def engine(self) -> str:
        return "PostgreSQL" if self.database.startswith("postgresql") else "SQLite"

    def start_mesh(self, adapter: str = "asyncio") -> ClusterMesh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "svantic_mesh.cli", "mesh", "--database", self.database,
             "--home", str(self.folder), "--port", "0", "--client", ":".join(CLIENT),
             "--grace", "2", "--redis", self.redis_url, "--cluster-prefix", self.prefix,
             "--adapter", adapter],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            text=True, env=env())
        assert proc.stdout is not None and proc.stderr is not None
        out, err = Stream(proc.stdout), Stream(proc.stderr)
        try:
            url = READY.search(out.search(READY.pattern, START_TIMEOUT)[1])
            ca = CA_LINE.search(out.search(CA_LINE.pattern, START_TIMEOUT)[1])
            err.search(r"cluster: .* agents on other processes", START_TIMEOUT)
        except AssertionError:
            proc.kill()
            proc.wait(10)
            raise
        assert url is not None and ca is not None
        mesh = ClusterMesh(proc, url.group(1), int(url.group(1).rsplit(":", 1)[1]),
                           ca.group(1), out, err)
        self.meshes.append(mesh)
        self.adapters.append(adapter)
        return mesh

    def close(self) -> list[str]:
        return [mesh.stop() for mesh in self.meshes]


def start_cluster(folder: Path, redis_url: str, database: str, prefix: str,
                  adapters: tuple[str, ...] = ("asyncio",) * 3) -> Cluster:
    """One mesh per adapter named; the first alone, so that it makes the CA and the
    schema."""
    cluster = Cluster(folder, redis_url, prefix, database)
    try:
        for adapter in adapters:
            cluster.start_mesh(adapter)
    except BaseException:
        cluster.close()
        raise
    return cluster


@dataclass
class Agents:
    """One process of agents (this file run as a script)."""

    proc: subprocess.Popen[str]
    out: Stream

    def count(self, prefix: str) -> int:
        return sum(1 for line in self.out.lines if line.startswith(prefix))

    def finish(self, timeout: float = 30.0) -> dict[str, int]:
        """Close stdin: the process prints its runs per dispatch id and exits."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        _, line = self.out.search(r"^runs ", timeout)
        self.proc.wait(timeout)
        return dict(json.loads(line[len("runs "):]))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def start_agents(mesh: ClusterMesh, agents: list[tuple[str, str, str]],
                 config: dict[str, Any] | None = None) -> Agents:
    """Agents `(instance, agent_type, dial_url)`, registered with `mesh`; returns once all
    are connected."""
    spec = {"register_url": mesh.url, "ca": mesh.ca, "client_id": CLIENT[0],
            "client_secret": CLIENT[1], "agents": agents, "config": config or {}}
    proc = subprocess.Popen([sys.executable, str(Path(__file__)), json.dumps(spec)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env())
    assert proc.stdout is not None
    process = Agents(proc, Stream(proc.stdout))
    try:
        process.out.search(r"^ready ", START_TIMEOUT)
    except AssertionError:
        process.kill()
        raise
    return process


# -- the agents' process -------------------------------------------------------------------

RUNS: Counter[str] = Counter()


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def _serve(spec: dict[str, Any]) -> None:
    import asyncio

    import httpx
    from svantic_adapters.asyncio import Agent

    from svantic_proto import Config, DispatchAuthVerifier
    from svantic_proto.events import ConnectionClosed, SessionStarted

    context = ssl.create_default_context(cafile=spec["ca"])
    async with httpx.AsyncClient(base_url=spec["register_url"], verify=context,
                                 trust_env=False, timeout=30) as http:
        grant = (await http.post("/auth/token", json={
            "client_id": spec["client_id"], "client_secret": spec["client_secret"]})).json()
        token = grant["access_token"]
        paths = []
        for instance, agent_type, _ in spec["agents"]:
            answer = await http.post("/agents/register", headers={
                "authorization": f"Bearer {token}"}, json={
                "agent_type": agent_type, "instance_id": instance,
                "tools": [{"name": "work"}]})
            connect_url = str(answer.raise_for_status().json()["connect_url"])
            paths.append(connect_url.split("://", 1)[1].split("/", 1)[1])

    def told(instance: str) -> Callable[[Any], None]:
        def on_event(event: Any) -> None:
            if isinstance(event, SessionStarted):
                if event.resumed:
                    _say(f"up {instance} resumed {len(event.replayed_dispatches)}")
                else:
                    _say(f"up {instance} fresh")
            elif isinstance(event, ConnectionClosed):
                _say(f"down {instance}")
        return on_event

    async def work(args: Any, ctx: Any) -> Any:
        RUNS[ctx.dispatch_id] += 1
        if args.get("sleep"):
            await asyncio.sleep(float(args["sleep"]))
        k = int(args["k"])
        return {"k": k, "v": 3 * k + 1}

    agents = []
    for (instance, agent_type, dial), path in zip(spec["agents"], paths, strict=True):
        url = f"{dial.replace('https://', 'wss://', 1)}/{path}"
        agent = Agent(url, token=token, instance_id=instance, agent_type=agent_type,
                      dispatch_auth=DispatchAuthVerifier(instance, hs256_keys=[
                          os.environ["SVANTIC_SIGNING_SECRET"]]),
                      ssl_context=context, config=Config(**spec["config"]))
        agent.add("work", work)
        agent.on_event = told(instance)
        agents.append(agent)
    tasks = [asyncio.ensure_future(agent.run()) for agent in agents]
    await asyncio.wait_for(asyncio.gather(*(agent.ready.wait() for agent in agents)), 60)
    _say(f"ready {len(agents)}")
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    _say("runs " + json.dumps(dict(RUNS)))
    del tasks
    os._exit(0)  # the sockets die with the process; no drain wanted here


if __name__ == "__main__":
    import asyncio

    asyncio.run(_serve(json.loads(sys.argv[1])))
