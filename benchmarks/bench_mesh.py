"""Mesh benchmark: `POST /agents/dispatch` through `svantic mesh` against a uvicorn echo.

    python benchmarks/bench_mesh.py                  # about 2 min; markdown tables on stdout
    python benchmarks/bench_mesh.py --quick          # a smoke run (seconds): figures not meaningful
    python benchmarks/bench_mesh.py --check          # exit 1 if a target is missed
    python benchmarks/bench_mesh.py --adapter trio   # the mesh on another adapter
    python benchmarks/bench_mesh.py --profile        # also cProfile the mesh process

Ours: `svantic mesh` (the reference mesh, `python -m svantic_mesh.cli mesh`) runs in a
process of its own on 127.0.0.1, on the adapter `--adapter` names, with HS256 dispatch auth
on (the default) and its usual INFO log written to a file. One agent, in another process
(this file with `--agent`; the asyncio adapter unless `--agent-adapter` says otherwise),
gets a token, registers instance `bench-1` and connects; its one capability `echo` answers
`{"echo": arguments, "instance": id}` from a plain function. One request is
`POST /agents/dispatch` with `{"capability": "echo", "arguments": {"n": i}, "instance_id":
"bench-1"}` and a bearer token from `POST /auth/token`: the mesh checks the token, routes,
sends the dispatch over the agent's WebSocket, waits for the result, answers 200 JSON.

The baseline, in the same run on the same machine: uvicorn with its defaults (its HTTP
implementation and event loop are named in the report), `log_level="warning"` and
`access_log=False`, in a process of its own, serving a minimal ASGI app that reads the body
and answers it as JSON (the same bytes back). It is sent exactly the same request bytes,
headers included. Both servers use the same certificate (a throwaway trustme CA's, for
127.0.0.1).

The client is the same for both, in this process: keep-alive HTTP/1.1 over TLS, an
`asyncio.Protocol` on asyncio's TLS transport with a minimal writer and parser (Content-
Length bodies only). Sequential: one connection, one request after the other; latency per
request gives p50 and p99, requests over wall time the throughput. Concurrent: 64 callers,
each with its own keep-alive connection, one request at a time each. The connections are
opened and warmed with one request each before every timed batch (uvicorn closes idle
keep-alive connections after 5 s by default). Every answer is
checked (status 200 and the echoed body); any other answer is a failure and the exit
code is 1. The client's CPU time per request and the servers' (from /proc) are reported
too, to show the client does not dominate.

Targets (the issue's): the mesh's p50 at most 1.5x the echo's, its throughput at least
0.7x, in both modes. Each round runs echo then mesh, sequential then concurrent, after a
warm-up; each ratio is taken within a round and the tables give medians over the rounds
(`--repeats`). The routing-decision cost at 10, 1,000 and 10,000 instances comes last, from
`bench_routing.py` in the same run.

The build: `svantic_proto` compiled with mypyc or its sources (`SVANTIC_PURE_PYTHON=1`); the
children inherit this process's environment, so the report's build is theirs. `svantic_mesh`
is never compiled.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import platform
import pstats
import re
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (ROOT, HERE):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

CALLERS = 64
P50_TARGET = 1.5
"""The mesh's p50 latency over the echo's, at most."""
THROUGHPUT_TARGET = 0.7
"""The mesh's requests per second over the echo's, at least."""
CLIENT = ("bench-client", "bench-secret-0123456789abcdef", "tenant-bench")
SIGNING_SECRET = "bench-dispatch-signing-secret-0123456789abcdef"
INSTANCE = "bench-1"
AGENT_TYPE = "bench-echo"
ADAPTERS = ("asyncio", "anyio", "trio", "gevent")
MODES = ("sequential", "concurrent")
ECHO, MESH = "uvicorn echo", "mesh -> agent"
READY = re.compile(r"svantic mesh listening on (https://\S+)")
PATCH_FIRST = (
    "import runpy, sys; from gevent import monkey; monkey.patch_all(); "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)
"""How a gevent agent starts: monkey-patch before anything imports ssl or socket."""


class Failure(Exception):
    """A request that did not get the expected answer, or a process that did not start."""


def build_name() -> str:
    from svantic_proto import COMPILED
    from svantic_proto._compiled import PURE_PYTHON_ENV

    if COMPILED:
        return "compiled core (mypyc)"
    forced = os.environ.get(PURE_PYTHON_ENV, "") not in ("", "0")
    return f"pure Python (the sources{f', {PURE_PYTHON_ENV}=1' if forced else ''})"


def body_of(n: int) -> bytes:
    return (b'{"capability": "echo", "arguments": {"n": %d}, "instance_id": "%s"}'
            % (n, INSTANCE.encode()))


# --- the client: keep-alive HTTP/1.1 over asyncio's TLS transport ----------------------------


class HttpClient(asyncio.Protocol):
    """One keep-alive connection, one request at a time; answers need a Content-Length."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.length = -1
        self.status = 0
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.lost = ""

    @classmethod
    async def open(cls, port: int, context: ssl.SSLContext, path: str,
                   token: str) -> HttpClient:
        loop = asyncio.get_running_loop()
        _, client = await loop.create_connection(cls, "127.0.0.1", port, ssl=context,
                                                 server_hostname="127.0.0.1")
        client.head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                       f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
                       "Content-Length: ").encode()
        return client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = f"connection lost: {exc!r}"
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(Failure(f"connection lost: {exc!r}"))

    def tls(self) -> str:
        assert self.transport is not None
        obj = self.transport.get_extra_info("ssl_object")
        return f"{obj.version()} {obj.cipher()[0]}" if obj is not None else "no TLS"

    def request(self, body: bytes, head: bytes | None = None) -> asyncio.Future[tuple[int, bytes]]:
        assert self.transport is not None
        self.waiter = waiter = asyncio.get_running_loop().create_future()
        if self.lost or self.transport.is_closing():
            waiter.set_exception(Failure(self.lost or "the connection is closed"))
            return waiter
        self.transport.write(b"%s%d\r\n\r\n%s" % (head or self.head, len(body), body))
        return waiter

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        if self.length < 0:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buffer[:end]).lower()
            del buffer[:end + 4]
            self.status = int(head[9:12])
            start = head.find(b"\r\ncontent-length:")
            if start < 0 or b"\r\ntransfer-encoding:" in head:
                self._fail(f"no Content-Length in {head[:200]!r}")
                return
            stop = head.find(b"\r\n", start + 2)
            self.length = int(head[start + 17:stop if stop > 0 else len(head)])
        if len(buffer) >= self.length:
            body = bytes(buffer[:self.length])
            del buffer[:self.length]
            self.length = -1
            waiter, self.waiter = self.waiter, None
            if waiter is not None and not waiter.done():
                waiter.set_result((self.status, body))

    def _fail(self, why: str) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(Failure(why))
        if self.transport is not None:
            self.transport.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def percentile(sorted_values: Sequence[float], share: float) -> float:
    """Nearest rank."""
    index = min(len(sorted_values) - 1, max(0, round(share * len(sorted_values)) - 1))
    return sorted_values[index]


@dataclass
class Run:
    """One timed batch of one target in one mode."""

    latencies: list[float]
    wall: float
    client_cpu: float
    server_cpu: dict[str, float]

    @property
    def count(self) -> int:
        return len(self.latencies)

    @property
    def rate(self) -> float:
        return self.count / self.wall

    def p(self, share: float) -> float:
        return percentile(sorted(self.latencies), share)


# --- processes ------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU seconds of a running process (Linux /proc), else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["SVANTIC_SIGNING_SECRET"] = SIGNING_SECRET
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def read_line(proc: subprocess.Popen[str], pattern: re.Pattern[str], seen: list[str],
              timeout: float = 60.0) -> re.Match[str]:
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
    if not done.wait(timeout) or not found:
        raise Failure(f"no {pattern.pattern!r} from process {proc.pid} in {timeout:.0f} s; "
                      f"it printed {''.join(seen)[-2000:]!r}")
    return found[0]


def stop(proc: subprocess.Popen[str], how: int | None = signal.SIGINT,
         timeout: float = 30.0) -> None:
    """End a child this benchmark started: close its stdin or signal it, then wait."""
    if proc.poll() is not None:
        return
    if how is None:
        with contextlib.suppress(OSError):
            assert proc.stdin is not None
            proc.stdin.close()
    else:
        proc.send_signal(how)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class Processes:
    folder: Path
    ca_pem: bytes
    cert_file: Path
    key_file: Path
    mesh: subprocess.Popen[str] | None = None
    mesh_port: int = 0
    agent: subprocess.Popen[str] | None = None
    echo: subprocess.Popen[str] | None = None
    echo_port: int = 0
    echo_stack: str = ""
    mesh_profile: Path | None = None

    @classmethod
    def make(cls, folder: Path) -> Processes:
        import trustme

        ca = trustme.CA()
        leaf = ca.issue_cert("127.0.0.1")
        ca_file, cert_file, key_file = (folder / n for n in ("ca.pem", "cert.pem", "key.pem"))
        ca_file.write_bytes(ca.cert_pem.bytes())
        cert_file.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        key_file.write_bytes(leaf.private_key_pem.bytes())
        return cls(folder, ca.cert_pem.bytes(), cert_file, key_file)

    def start_mesh(self, adapter: str, profile: bool) -> None:
        command = [sys.executable]
        if profile:
            self.mesh_profile = self.folder / "mesh.prof"
            command += ["-m", "cProfile", "-o", str(self.mesh_profile)]
        command += ["-m", "svantic_mesh.cli", "mesh", "--db", str(self.folder / "m.db"),
                    "--port", "0", "--client", ":".join(CLIENT), "--adapter", adapter,
                    "--certfile", str(self.cert_file), "--keyfile", str(self.key_file),
                    "--grace", "1"]
        with open(self.folder / "mesh.log", "w") as log:
            self.mesh = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log,
                                         stdin=subprocess.DEVNULL, text=True, env=child_env(),
                                         cwd=self.folder)
        try:
            url = read_line(self.mesh, READY, [])
        except Failure as exc:
            raise Failure(f"{exc}; mesh log: {self.mesh_log()}") from None
        self.mesh_port = int(url.group(1).rsplit(":", 1)[1])

    def mesh_log(self, tail: int = 3000) -> str:
        path = self.folder / "mesh.log"
        return path.read_text(errors="replace")[-tail:] if path.exists() else ""

    def start_agent(self, adapter: str) -> None:
        script = [str(Path(__file__).resolve()), "--agent",
                  f"https://127.0.0.1:{self.mesh_port}", str(self.folder / "ca.pem"),
                  CLIENT[0], CLIENT[1], INSTANCE, AGENT_TYPE, adapter]
        command = [sys.executable, *(["-c", PATCH_FIRST] if adapter == "gevent" else []),
                   *script]
        with open(self.folder / "agent.log", "w") as log:
            self.agent = subprocess.Popen(command, stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=log, text=True,
                                          env=child_env())
        try:
            read_line(self.agent, re.compile(r"^ready"), [])
        except Failure as exc:
            agent_log = (self.folder / "agent.log").read_text(errors="replace")[-3000:]
            raise Failure(f"{exc}; agent log: {agent_log}") from None

    def start_echo(self) -> None:
        command = [sys.executable, str(Path(__file__).resolve()), "--echo-server",
                   str(self.cert_file), str(self.key_file)]
        with open(self.folder / "echo.log", "w") as log:
            self.echo = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log,
                                         stdin=subprocess.DEVNULL, text=True, env=child_env())
        match = read_line(self.echo, re.compile(r"^listening (\d+) (.*)$"), [])
        self.echo_port, self.echo_stack = int(match.group(1)), match.group(2).strip()

    def pids(self) -> dict[str, int]:
        return {name: proc.pid for name, proc in (("mesh", self.mesh), ("agent", self.agent),
                                                  ("uvicorn", self.echo)) if proc is not None}

    def close(self) -> None:
        if self.agent is not None:
            stop(self.agent, None)
        if self.mesh is not None:
            stop(self.mesh, signal.SIGINT)
        if self.echo is not None:
            stop(self.echo, signal.SIGINT)


# --- the children: the agent and the uvicorn echo --------------------------------------------


def run_agent(argv: Sequence[str]) -> int:
    """Register and connect one agent with capability `echo`; serve until stdin closes."""
    url, ca, client_id, secret, instance, agent_type, adapter = argv
    from svantic_proto import DispatchAuthVerifier

    context = ssl.create_default_context(cafile=ca)
    port = int(url.rsplit(":", 1)[1])
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=20)

    def post(path: str, document: dict[str, Any], token: str | None = None) -> Any:
        headers = {"content-type": "application/json"}
        if token:
            headers["authorization"] = f"Bearer {token}"
        connection.request("POST", path, json.dumps(document), headers)
        answer = connection.getresponse()
        body = answer.read()
        if answer.status != 200:
            raise Failure(f"{path}: HTTP {answer.status} {body[:500]!r}")
        return json.loads(body)

    token = post("/auth/token", {"client_id": client_id, "client_secret": secret})
    token = token["access_token"]
    connect_url = post("/agents/register", {"agent_type": agent_type, "instance_id": instance,
                                            "tools": [{"name": "echo"}]}, token)["connect_url"]
    connection.close()
    options: dict[str, Any] = {
        "token": token, "instance_id": instance, "agent_type": agent_type,
        "dispatch_auth": DispatchAuthVerifier(
            instance, hs256_keys=[os.environ["SVANTIC_SIGNING_SECRET"]]),
        "ssl_context": context}

    def echo(arguments: Any, context: Any) -> Any:
        return {"echo": arguments, "instance": instance}

    if adapter == "gevent":
        import gevent  # type: ignore[import-untyped]
        from svantic_adapters import gevent as module

        agent = module.Agent(connect_url, **options)
        agent.capability("echo")(echo)
        agent.start().wait_ready(20)
        print("ready", flush=True)
        gevent.get_hub().threadpool.spawn(sys.stdin.read).get()
        agent.stop()
        return 0
    import anyio
    import anyio.to_thread

    name = "asyncio" if adapter == "asyncio" else "anyio"
    module = __import__(f"svantic_adapters.{name}", fromlist=["Agent"])

    async def serve() -> None:
        agent = module.Agent(connect_url, **options)
        agent.capability("echo")(echo)
        async with agent:
            print("ready", flush=True)
            await anyio.to_thread.run_sync(sys.stdin.read)

    anyio.run(serve, backend="trio" if adapter == "trio" else "asyncio")
    return 0


async def echo_app(scope: dict[str, Any], receive: Callable[[], Any],
                   send: Callable[[dict[str, Any]], Any]) -> None:
    """The baseline: read the body, answer it as JSON."""
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def run_echo_server(cert_file: str, key_file: str) -> int:
    """uvicorn with its defaults, binding 127.0.0.1 port 0 itself (its usual path: asyncio
    then sets TCP_NODELAY on each connection); prints `listening PORT STACK` once started."""
    import uvicorn

    config = uvicorn.Config(echo_app, host="127.0.0.1", port=0, ssl_certfile=cert_file,
                            ssl_keyfile=key_file, log_level="warning", access_log=False)
    config.load()
    http_name = getattr(config.http_protocol_class, "__name__", str(config.http))
    http_name = {"H11Protocol": "h11", "HttpToolsProtocol": "httptools"}.get(http_name,
                                                                            http_name)
    server = uvicorn.Server(config)

    def announce() -> None:
        while not server.started:
            if server.should_exit:
                return
            time.sleep(0.01)
        loop = "uvloop" if "uvloop" in sys.modules else "asyncio"
        port = server.servers[0].sockets[0].getsockname()[1]
        print(f"listening {port} uvicorn {uvicorn.__version__} (http {http_name}, "
              f"loop {loop})", flush=True)

    threading.Thread(target=announce, daemon=True).start()
    server.run()
    return 0


# --- measuring --------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    port: int
    context: ssl.SSLContext
    token: str
    check: Callable[[int, bytes, bytes], bool]
    tls: str = ""

    async def connect(self, count: int, failures: Failures) -> list[HttpClient]:
        """`count` new keep-alive connections, each warmed with one untimed request."""
        clients = [await HttpClient.open(self.port, self.context, "/agents/dispatch",
                                         self.token) for _ in range(count)]
        self.tls = clients[0].tls()
        for client in clients:
            await call(client, self, 0, [], failures)
        return clients


def check_mesh(n: int, sent: bytes, body: bytes) -> bool:
    result = json.loads(body).get("result")
    return bool(result == {"echo": {"n": n}, "instance": INSTANCE})


def check_echo(n: int, sent: bytes, body: bytes) -> bool:
    return body == sent


class Failures:
    def __init__(self) -> None:
        self.count = 0
        self.examples: list[str] = []

    def add(self, target: str, status: int, body: bytes) -> None:
        self.count += 1
        if len(self.examples) < 5:
            self.examples.append(f"{target}: HTTP {status} {body[:300]!r}")


async def call(client: HttpClient, target: Target, n: int, latencies: list[float],
               failures: Failures) -> None:
    body = body_of(n)
    started = time.perf_counter()
    status, answer = await client.request(body)
    latencies.append(time.perf_counter() - started)
    if status != 200 or not target.check(n, body, answer):
        failures.add(target.name, status, answer)


async def measure(target: Target, mode: str, count: int, failures: Failures, *,
                  pids: dict[str, int], timeout: float) -> Run:
    """One timed batch on fresh keep-alive connections (servers close idle ones: uvicorn
    after 5 s by default), opened and warmed before the clock starts."""
    clients = await target.connect(1 if mode == "sequential" else CALLERS, failures)
    latencies: list[float] = []
    try:
        cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        client_before = time.process_time()
        started = time.perf_counter()
        if mode == "sequential":
            async def batch() -> None:
                client = clients[0]
                for n in range(count):
                    await call(client, target, n, latencies, failures)
        else:
            share, extra = divmod(count, CALLERS)

            async def caller(index: int, client: HttpClient) -> None:
                for n in range(index, CALLERS * (share + (index < extra)), CALLERS):
                    await call(client, target, n, latencies, failures)

            async def batch() -> None:
                await asyncio.gather(*(caller(i, c) for i, c in enumerate(clients)))
        try:
            await asyncio.wait_for(batch(), timeout)
        except TimeoutError:
            raise Failure(f"{target.name}, {mode}: {len(latencies):,} of {count:,} requests "
                          f"answered in {timeout:.0f} s") from None
        wall = time.perf_counter() - started
        client_cpu = time.process_time() - client_before
    finally:
        for client in clients:
            client.close()
    server_cpu: dict[str, float] = {}
    for name, pid in pids.items():
        after, before = cpu_seconds(pid), cpu_before[name]
        if after is not None and before is not None:
            server_cpu[name] = after - before
    return Run(latencies, wall, client_cpu, server_cpu)


async def get_token(port: int, context: ssl.SSLContext) -> str:
    client = await HttpClient.open(port, context, "/auth/token", "")
    try:
        body = json.dumps({"client_id": CLIENT[0], "client_secret": CLIENT[1]}).encode()
        head = (f"POST /auth/token HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                "Content-Type: application/json\r\nContent-Length: ").encode()
        status, answer = await asyncio.wait_for(client.request(body, head), 20)
        if status != 200:
            raise Failure(f"/auth/token: HTTP {status} {answer[:300]!r}")
        return str(json.loads(answer)["access_token"])
    finally:
        client.close()


@dataclass
class Outcome:
    runs: dict[tuple[str, str], list[Run]] = field(default_factory=dict)
    failures: Failures = field(default_factory=Failures)
    tls: dict[str, str] = field(default_factory=dict)
    echo_stack: str = ""
    errors: list[str] = field(default_factory=list)
    mesh_profile: Path | None = None
    dispatches: int = 0


async def run_rounds(processes: Processes, args: argparse.Namespace, outcome: Outcome) -> None:
    context = ssl.create_default_context(cadata=processes.ca_pem.decode("ascii"))
    token = await get_token(processes.mesh_port, context)
    echo = Target(ECHO, processes.echo_port, context, token, check_echo)
    mesh = Target(MESH, processes.mesh_port, context, token, check_mesh)
    pids = processes.pids()
    counts = {"sequential": args.sequential, "concurrent": args.concurrent}
    for target in (echo, mesh):  # warm up: both modes
        for mode in MODES:
            warmup = max(args.warmup, CALLERS)
            await measure(target, mode, warmup, outcome.failures, pids={},
                          timeout=args.timeout)
            if target is mesh:
                outcome.dispatches += warmup + (1 if mode == "sequential" else CALLERS)
        outcome.tls[target.name] = target.tls
    for _ in range(args.repeats):
        for mode in MODES:
            for target in (echo, mesh):
                run = await measure(target, mode, counts[mode], outcome.failures,
                                    pids=pids, timeout=args.timeout)
                outcome.runs.setdefault((target.name, mode), []).append(run)
            outcome.dispatches += counts[mode] + (1 if mode == "sequential" else CALLERS)


# --- reporting --------------------------------------------------------------------------------


def median_of(runs: list[Run], value: Callable[[Run], float]) -> float:
    return statistics.median(value(run) for run in runs)


def paired(outcome: Outcome, mode: str, value: Callable[[Run], float]) -> float:
    """Median over the rounds of mesh / echo, each ratio taken within a round."""
    pairs = zip(outcome.runs[(MESH, mode)], outcome.runs[(ECHO, mode)], strict=True)
    return statistics.median(value(m) / value(e) for m, e in pairs)


def verdict(ok: bool) -> str:
    return "yes" if ok else "**no**"


def report(outcome: Outcome, args: argparse.Namespace, out: Callable[[str], None]) -> bool:
    """The tables; True when every target is met."""
    import uvicorn

    out("## Mesh: POST /agents/dispatch through `svantic mesh`, against a uvicorn echo")
    out("")
    tls = sorted(set(outcome.tls.values()))
    out(f"Python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs; "
        f"build: {build_name()}; mesh adapter {args.adapter}, agent adapter "
        f"{args.agent_adapter}, dispatch auth HS256; baseline "
        f"{outcome.echo_stack or f'uvicorn {uvicorn.__version__}'}; "
        f"{' / '.join(tls) if tls else 'TLS'}; keep-alive HTTP/1.1; {args.repeats} rounds of "
        f"{args.sequential:,} sequential and {args.concurrent:,} concurrent requests "
        f"({CALLERS} callers), targets alternating; medians over the rounds, ratios taken "
        f"within a round{' (quick: figures not meaningful)' if args.quick else ''}"
        f"{' (mesh under cProfile: figures not meaningful)' if args.profile else ''}.")
    out("")
    for error in outcome.errors:
        out(f"- failed: {error}")
    if outcome.failures.count:
        out(f"- failed: {outcome.failures.count} requests did not get the expected answer, "
            f"e.g. {'; '.join(outcome.failures.examples)}")
    if not outcome.runs:
        out("")
        return False
    out("| mode | target | p50 ms | p99 ms | req/s |")
    out("|---|---|---:|---:|---:|")
    for mode in MODES:
        for name in (ECHO, MESH):
            runs = outcome.runs[(name, mode)]
            out(f"| {mode} | {name} | {median_of(runs, lambda r: r.p(0.5)) * 1e3:.3f} "
                f"| {median_of(runs, lambda r: r.p(0.99)) * 1e3:.3f} "
                f"| {median_of(runs, lambda r: r.rate):,.0f} |")
    out("")
    met = True
    out(f"| mode | p50 mesh / echo | <= {P50_TARGET}x | p99 mesh / echo "
        f"| throughput mesh / echo | >= {THROUGHPUT_TARGET}x |")
    out("|---|---:|---|---:|---:|---|")
    for mode in MODES:
        p50 = paired(outcome, mode, lambda r: r.p(0.5))
        p99 = paired(outcome, mode, lambda r: r.p(0.99))
        rate = paired(outcome, mode, lambda r: r.rate)
        met &= p50 <= P50_TARGET and rate >= THROUGHPUT_TARGET
        out(f"| {mode} | {p50:.2f}x | {verdict(p50 <= P50_TARGET)} | {p99:.2f}x | {rate:.2f}x "
            f"| {verdict(rate >= THROUGHPUT_TARGET)} |")
    out("")
    report_cpu(outcome, out)
    return met


def report_cpu(outcome: Outcome, out: Callable[[str], None]) -> None:
    """CPU µs per request of the client and of each server process (medians)."""
    out("CPU time per request, µs (medians over the rounds; the servers' from /proc, "
        "in clock ticks, so coarse for short runs):")
    out("")
    out("| mode | target | client | uvicorn | mesh | agent | wall latency p50 |")
    out("|---|---|---:|---:|---:|---:|---:|")
    for mode in MODES:
        for name in (ECHO, MESH):
            runs = outcome.runs[(name, mode)]
            cells = [f"{median_of(runs, lambda r: r.client_cpu / r.count) * 1e6:.0f}"]
            for process in ("uvicorn", "mesh", "agent"):
                if all(process in r.server_cpu for r in runs):
                    per = statistics.median(r.server_cpu[process] / r.count for r in runs)
                    cells.append(f"{per * 1e6:.0f}")
                else:
                    cells.append("-")
            cells.append(f"{median_of(runs, lambda r: r.p(0.5)) * 1e6:.0f}")
            out(f"| {mode} | {name} | " + " | ".join(cells) + " |")
    out("")


LAYERS = (
    ("h11", "h11 (the mesh's HTTP/1.1 parser and writer)"),
    ("svantic_proto/", "svantic_proto (sans-IO core: WebSocket, frames, HTTP wrapper)"),
    ("adapters/", "svantic_adapters (transport, pumps, TLS over memory)"),
    ("mesh/", "svantic_mesh (control plane, fleet, routing, registry code)"),
    ("sqlite3", "sqlite3 (registry reads and writes)"),
    ("logging/", "logging"),
    ("jwt/", "PyJWT"),
    ("json", "json"),
    ("prometheus_client/", "prometheus_client"),
    ("_ssl.", "OpenSSL (read, write, handshakes)"),
    ("_socket.", "socket syscalls"),
    ("asyncio/", "asyncio event loop"),
    ("anyio/", "anyio"),
    ("msgspec", "msgspec"),
    ("_hashlib", "hashlib (scrypt of client secrets at /auth/token, HMAC)"),
    ("hmac", "hashlib (scrypt of client secrets at /auth/token, HMAC)"),
    ("re/", "re"),
    ("'re.Pattern'", "re"),
    ("importlib", "imports (start-up)"),
    ("marshal", "imports (start-up)"),
    ("builtins.compile", "imports (start-up)"),
    ("builtins.exec", "imports (start-up)"),
)


def layer_of(filename: str, name: str) -> str:
    where = f"{short_path(filename)} {name}"
    for needle, label in LAYERS:
        if needle in where:
            return label
    return "other (stdlib, builtins)"


def report_profile(path: Path, dispatches: int, out: Callable[[str], None],
                   top: int = 30) -> None:
    """The mesh process's cProfile: own time by layer and the top functions, µs per
    dispatch and shares of the time the mesh was busy (waits in epoll left out)."""
    stats = pstats.Stats(str(path))
    entries = stats.stats  # type: ignore[attr-defined]
    idle_keys = {key for key in entries if key[2].startswith(
        ("<method 'poll' of 'select.", "<method 'select' of 'select."))}
    idle = sum(entries[key][2] for key in idle_keys)
    busy = sum(entry[2] for entry in entries.values()) - idle
    out(f"### cProfile of the mesh process ({dispatches:,} dispatches; {busy:.2f} s busy, "
        f"{busy / dispatches * 1e6:.0f} µs per dispatch under the profiler; {idle:.2f} s "
        "waiting in epoll, left out of the shares)")
    out("")
    layers: Counter[str] = Counter()
    for key, entry in entries.items():
        if key not in idle_keys:
            layers[layer_of(key[0], key[2])] += entry[2]
    out("Own time by layer:")
    out("")
    out("| layer | own µs / dispatch | share |")
    out("|---|---:|---:|")
    for label, seconds in layers.most_common():
        out(f"| {label} | {seconds / dispatches * 1e6:.1f} | {seconds / busy:.1%} |")
    out("")
    for index, label in ((2, "own time"), (3, "cumulative time")):
        out(f"Top {top} by {label}:")
        out("")
        out("| function | calls / dispatch | own µs / dispatch | cumulative µs / dispatch "
            "| own share | cumulative share |")
        out("|---|---:|---:|---:|---:|---:|")
        rows = sorted(((k, v) for k, v in entries.items() if k not in idle_keys),
                      key=lambda item: -item[1][index])[:top]
        for (filename, line, name), (_, calls, own, cumulative, _) in rows:
            out(f"| {short_path(filename)}:{line}({name}) | {calls / dispatches:.2f} "
                f"| {own / dispatches * 1e6:.1f} | {cumulative / dispatches * 1e6:.1f} "
                f"| {own / busy:.1%} | {cumulative / busy:.1%} |")
        out("")


def short_path(filename: str) -> str:
    """A file name without the machine's directories."""
    parts = Path(filename).parts
    if filename == "~":
        return "~"
    for anchor in ("site-packages", "svantic_proto", "adapters", "mesh", "benchmarks"):
        if anchor in parts:
            index = parts.index(anchor)
            return "/".join(parts[index + (anchor == "site-packages"):])
    for package in ("asyncio", "anyio", "logging", "json", "sqlite3"):
        if package in parts:
            return f"{package}/{parts[-1]}"
    return parts[-1] if parts else filename


def run_routing(args: argparse.Namespace) -> int:
    """`bench_routing.py` in this run: its own table on stdout."""
    import bench_routing

    print(flush=True)
    code = bench_routing.main([*(["--quick"] if args.quick else []),
                               *(["--check"] if args.check else [])])
    sys.stdout.flush()
    return code


# --- main -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: small counts")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument("--adapter", choices=ADAPTERS, default="asyncio",
                        help="the mesh's adapter (`svantic mesh --adapter`)")
    parser.add_argument("--agent-adapter", choices=ADAPTERS, default="asyncio",
                        help="the agent's adapter")
    parser.add_argument("--repeats", type=int, default=7, help="rounds")
    parser.add_argument("--sequential", type=int, default=5_000, help="requests per round")
    parser.add_argument("--concurrent", type=int, default=25_600,
                        help=f"requests per round, over {CALLERS} callers")
    parser.add_argument("--warmup", type=int, default=1_000,
                        help="requests per target and mode")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds one timed batch may take before it counts as failed")
    parser.add_argument("--profile", action="store_true",
                        help="run the mesh under cProfile and list its top functions")
    parser.add_argument("--profile-out", metavar="FILE",
                        help="with --profile: keep the mesh's cProfile data in FILE")
    parser.add_argument("--no-routing", action="store_true", help="skip the routing table")
    parser.add_argument("--agent", nargs=7, help=argparse.SUPPRESS,
                        metavar=("URL", "CA", "ID", "SECRET", "INSTANCE", "TYPE", "ADAPTER"))
    parser.add_argument("--echo-server", nargs=2, help=argparse.SUPPRESS,
                        metavar=("CERT", "KEY"))
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="also write the figures to PATH as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = min(args.repeats, 1)
        args.sequential = min(args.sequential, 100)
        args.concurrent = min(args.concurrent, 4 * CALLERS)
        args.warmup = min(args.warmup, 20)
    return args


def main(argv: Sequence[str] | None = None, out: Callable[[str], None] = print) -> int:
    args = parse_args(argv)
    if args.agent:
        return run_agent(args.agent)
    if args.echo_server:
        return run_echo_server(*args.echo_server)
    outcome = Outcome()
    with tempfile.TemporaryDirectory(prefix="bench-mesh-") as folder:
        processes = Processes.make(Path(folder))
        try:
            processes.start_echo()
            processes.start_mesh(args.adapter, args.profile)
            processes.start_agent(args.agent_adapter)
            outcome.echo_stack = processes.echo_stack
            asyncio.run(run_rounds(processes, args, outcome))
        except (Failure, OSError, TimeoutError) as exc:
            outcome.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            processes.close()
        if "Traceback" in processes.mesh_log():
            outcome.errors.append(f"the mesh logged a traceback: {processes.mesh_log()}")
        met = report(outcome, args, out)
        if args.profile and processes.mesh_profile and processes.mesh_profile.exists():
            report_profile(processes.mesh_profile, max(outcome.dispatches, 1), out)
            if args.profile_out:
                Path(args.profile_out).write_bytes(processes.mesh_profile.read_bytes())
    failed = bool(outcome.errors or outcome.failures.count)
    if not failed and not met:
        out("Targets missed: see the tables above.")
    routing = 0 if args.no_routing else run_routing(args)
    if failed:
        return 1
    return 1 if args.check and (not met or routing) else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _jsonout import run_main  # --json PATH: the same figures as JSON

    sys.exit(run_main(main))
