"""Scale: many idle agents on one mesh process, then a reconnect storm after a mesh restart.

    python benchmarks/bench_scale.py --agents 10000   # about 2 min; markdown tables on stdout
    python benchmarks/bench_scale.py                  # 2,000 agents (what run_all.py runs)
    python benchmarks/bench_scale.py --quick          # a smoke run: figures not meaningful

The mesh is the asyncio adapter's `MeshServer` with TLS (a throwaway trustme CA), HS256
dispatch auth and the default `Config` (its heartbeat and hello timers as shipped), alone in
a process pinned to the first allowed CPU. The agents are the asyncio adapter's `Agent`,
spread over `--clients` processes pinned to the other CPU, so the mesh's figures are its own.

1. **Connect**: every client process dials its share, at most `--window` handshakes in
   flight per process (an agent counts as connected once welcomed). The time is from the
   start signal to the mesh counting every agent; memory per agent is the mesh process's RSS
   growth over that, divided by the agents.
2. **Idle**: the mesh process's CPU over `--idle-seconds` (30 s: one heartbeat interval, so
   every agent's heartbeat lands in it once) with every agent connected and nothing else
   happening: what the default timers (agents' heartbeats, the mesh's sweeps) cost.
3. **Reconnect storm**: the mesh process is killed (SIGKILL: a crash, no goodbye) and a new
   one started on the same port. The agents reconnect by themselves, with the backoff and
   jitter of spec section 5. Reported: the time from the kill and from the new mesh listening
   until every agent is back, the handshakes the mesh refused (503 or handshake-limit drops,
   from its log) and the refusals the agents saw, and the dials that found no listener yet.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import resource
import selectors
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for folder in (ROOT, HERE):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

TENANT = "tenant-bench"
TOKEN = "bench-transport-token"
SIGNING_SECRET = "bench-dispatch-signing-secret-0123456789"


def emit(document: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(document) + "\n")
    sys.stdout.flush()


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Counter(logging.Handler):
    """Counts log records whose message contains one of `marks`, by mark."""

    def __init__(self, marks: Sequence[str]) -> None:
        super().__init__(logging.INFO)
        self.counts = dict.fromkeys(marks, 0)

    def emit(self, record: logging.LogRecord) -> None:
        message = str(record.msg)
        for mark in self.counts:
            if mark in message:
                # "handshake limit (%d) reached: dropping the %d oldest" drops several at once
                dropped = record.args[1] if mark == "handshake limit" and isinstance(
                    record.args, tuple) and len(record.args) > 1 else 1
                self.counts[mark] += int(dropped)  # type: ignore[call-overload]


def counting(logger: str, marks: Sequence[str]) -> Counter:
    counter = Counter(marks)
    log = logging.getLogger(logger)
    log.setLevel(logging.INFO)
    log.addHandler(counter)
    log.propagate = False
    return counter


MESH_MARKS = ("upgrade refused", "handshake limit", "answered 503")
AGENT_MARKS = ("refused by the mesh", "retrying in", "connected (connection", "dialling")


async def read_line() -> str:
    return await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


# --- the mesh process --------------------------------------------------------------------------


async def serve_mesh(args: argparse.Namespace) -> None:
    """`--serve-mesh`: a MeshServer; answers `wait N SECONDS`, `idle SECONDS` and `stats`."""
    import ssl

    from bench_loopback import Claims
    from svantic_adapters.asyncio import MeshServer

    from svantic_proto import DispatchAuthMinter, InstanceRecord, jwt_dispatch_auth

    counter = counting("svantic", MESH_MARKS)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(args.cert)

    def verify_token(token: str) -> Claims | None:
        return Claims(TENANT, "bench-client", time.time() + 3600) if token == TOKEN else None

    def lookup_instance(instance_id: str) -> InstanceRecord | None:
        return InstanceRecord(instance_id, TENANT, "connected", "bench-agent")

    server = MeshServer(ssl_context=context, verify_token=verify_token,
                        lookup_instance=lookup_instance,
                        dispatch_auth=jwt_dispatch_auth(DispatchAuthMinter(SIGNING_SECRET)),
                        max_connections=max(10_000, args.agents + 100))
    await server.start("127.0.0.1", args.port)
    emit({"listening": time.monotonic(), "rss_kib": rss_kib(), "cpu_s": own_cpu()})
    while line := (await read_line()).split():
        if line[0] == "wait":
            target, deadline = int(line[1]), time.monotonic() + float(line[2])
            while len(server.agents) < target and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            at = time.monotonic()
            emit({"agents": len(server.agents), "at": at, "rss_kib": rss_kib(),
                  "cpu_s": own_cpu(), "links": len(server.links)})
        elif line[0] == "idle":
            cpu0, started = own_cpu(), time.monotonic()
            await asyncio.sleep(float(line[1]))
            emit({"cpu_share": (own_cpu() - cpu0) / (time.monotonic() - started),
                  "agents": len(server.agents)})
        elif line[0] == "stats":
            emit({"log": counter.counts, "agents": len(server.agents)})
    await server.close(0)


# --- a client process --------------------------------------------------------------------------


async def run_clients(args: argparse.Namespace) -> None:
    """`--serve-clients`: `--agents` agents of prefix `--prefix`, dialled on `go`."""
    from svantic_adapters.asyncio import connect

    from svantic_proto import DispatchAuthVerifier

    raise_fd_limit()
    counter = counting("svantic", AGENT_MARKS)
    url = f"wss://127.0.0.1:{args.port}/agents/connect"
    agents = []
    for index in range(args.agents):
        instance = f"{args.prefix}-{index}"
        agent = connect(url, token=TOKEN, instance_id=instance, agent_type="bench-agent",
                        cafile=args.cafile,
                        dispatch_auth=DispatchAuthVerifier(instance,
                                                           hs256_keys=[SIGNING_SECRET]))
        agent.add("echo", lambda arguments, context: arguments)
        agents.append(agent)
    emit({"created": len(agents)})
    await read_line()  # go
    window = asyncio.Semaphore(args.window)
    runners: list[asyncio.Task[None]] = []

    async def dial(agent: Any) -> None:
        async with window:
            runners.append(asyncio.create_task(agent.run()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(agent.ready.wait(), 120)

    await asyncio.gather(*(dial(agent) for agent in agents))
    emit({"ready": sum(a.ready.is_set() for a in agents)})
    while line := (await read_line()).strip():
        if line == "stats":
            emit({"ready": sum(a.ready.is_set() for a in agents), "log": counter.counts})
    for runner in runners:
        runner.cancel()
    await asyncio.gather(*runners, return_exceptions=True)


# --- the orchestrator --------------------------------------------------------------------------


class Child:
    """A child process spoken to in JSON lines."""

    def __init__(self, argv: list[str], cpus: set[int]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), *argv], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, bufsize=1)
        os.sched_setaffinity(self.process.pid, cpus)  # before it has imported anything

    def read(self, timeout: float) -> dict[str, Any]:
        stdout = self.process.stdout
        assert stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(stdout, selectors.EVENT_READ)
            if not selector.select(timeout):
                raise TimeoutError(f"child {self.process.pid}: no answer in {timeout} s")
        line = stdout.readline()
        if not line:
            raise RuntimeError(f"child {self.process.pid} ended ({self.process.wait(10)})")
        document: dict[str, Any] = json.loads(line)
        return document

    def send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def ask(self, line: str, timeout: float) -> dict[str, Any]:
        self.send(line)
        return self.read(timeout)

    def close(self, timeout: float = 30) -> None:
        with contextlib.suppress(OSError):
            if self.process.stdin is not None:
                self.process.stdin.close()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)


def measure(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    import trustme

    allowed = sorted(os.sched_getaffinity(0))
    mesh_cpu, client_cpu = {allowed[0]}, {allowed[-1]}
    shares = [args.agents // args.clients + (i < args.agents % args.clients)
              for i in range(args.clients)]
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as folder:
        ca = trustme.CA()
        cert, cafile = Path(folder) / "cert.pem", Path(folder) / "ca.pem"
        ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(cert))
        ca.cert_pem.write_to_path(str(cafile))
        import socket

        with socket.socket() as probe:  # a free port, kept for the restart
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        mesh_argv = ["--serve-mesh", "--port", str(port), "--cert", str(cert),
                     "--agents", str(args.agents)]
        mesh = Child(mesh_argv, mesh_cpu)
        clients: list[Child] = []
        try:
            first = mesh.read(60)
            for index, share in enumerate(shares):
                clients.append(Child(["--serve-clients", "--port", str(port), "--cafile",
                                      str(cafile), "--agents", str(share), "--prefix",
                                      f"agent{index}", "--window", str(args.window)],
                                     client_cpu))
            for client in clients:
                client.read(120)
            log(f"{args.agents} agents created in {len(clients)} processes; dialling")
            started = time.monotonic()
            for client in clients:
                client.send("go")
            connected = mesh.ask(f"wait {args.agents} {args.timeout}", args.timeout + 30)
            connect_s = connected["at"] - started
            for client in clients:
                client.read(args.timeout)
            log(f"{connected['agents']} connected in {connect_s:.1f} s")
            mesh_connect_stats = mesh.ask("stats", 30)
            idle = mesh.ask(f"idle {args.idle_seconds}", args.idle_seconds + 30)
            settled = mesh.ask("wait 0 0", 30)
            client_stats = [c.ask("stats", 30) for c in clients]
            connect = {
                "agents": args.agents, "connected": connected["agents"],
                "seconds": connect_s,
                "rss_kib_per_agent": (settled["rss_kib"] - first["rss_kib"]) / max(
                    settled["agents"], 1),
                "mesh_cpu_s_per_agent": (connected["cpu_s"] - first["cpu_s"]) / max(
                    connected["agents"], 1),
                "mesh_log": mesh_connect_stats["log"],
                "agents_log": sum_logs(client_stats),
                "idle_cpu_share": idle["cpu_share"], "idle_seconds": args.idle_seconds,
            }
            storm: dict[str, Any] = {}
            if not args.no_storm:
                killed = time.monotonic()
                mesh.kill()
                log("mesh killed; starting a new one on the same port")
                mesh = Child(mesh_argv, mesh_cpu)
                listening = mesh.read(60)["listening"]
                back = mesh.ask(f"wait {args.agents} {args.timeout}", args.timeout + 30)
                after = [c.ask("stats", 30) for c in clients]
                storm = {
                    "agents": args.agents, "back": back["agents"],
                    "seconds_from_kill": back["at"] - killed,
                    "seconds_from_listening": back["at"] - listening,
                    "restart_seconds": listening - killed,
                    "mesh_log": mesh.ask("stats", 30)["log"],
                    "agents_log": diff_logs(sum_logs(after), sum_logs(client_stats)),
                }
                log(f"{back['agents']} back {storm['seconds_from_kill']:.1f} s after the kill")
        finally:
            mesh.close()
            for client in clients:
                client.close(120)
    return {"connect": connect, "storm": storm, "clients": args.clients,
            "window": args.window, "port": "ephemeral"}


def sum_logs(stats: list[dict[str, Any]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for stat in stats:
        for key, value in stat["log"].items():
            total[key] = total.get(key, 0) + value
    return total


def diff_logs(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {key: value - before.get(key, 0) for key, value in after.items()}


def report(result: dict[str, Any], args: argparse.Namespace, out: Callable[[str], None]) -> None:
    connect, storm = result["connect"], result["storm"]
    out(f"One mesh process (asyncio adapter, TLS, default Config) on one CPU; "
        f"{args.agents:,} agents (asyncio adapter) from {args.clients} processes on the other, "
        f"at most {args.window} handshakes in flight per process"
        f"{' (quick: figures not meaningful)' if args.quick else ''}.")
    out("")
    out("### Idle agents on one mesh process")
    out("")
    out("| agents | connected | connect s | mesh RSS KiB / agent | mesh CPU ms / agent to "
        "connect | mesh idle CPU % | handshakes dropped or refused |")
    out("|---:|---:|---:|---:|---:|---:|---:|")
    refused = (connect["mesh_log"]["upgrade refused"] + connect["mesh_log"]["handshake limit"]
               + connect["mesh_log"]["answered 503"])
    out(f"| {connect['agents']:,} | {connect['connected']:,} | {connect['seconds']:.1f} s | "
        f"{connect['rss_kib_per_agent']:.1f} KiB | "
        f"{1000 * connect['mesh_cpu_s_per_agent']:.2f} ms | "
        f"{100 * connect['idle_cpu_share']:.1f}% | {refused} |")
    out("")
    if storm:
        out("### Reconnect storm after a mesh restart (SIGKILL, new process, same port)")
        out("")
        out("| agents | back | s from the kill | s from the new mesh listening | mesh restart s "
            "| handshakes dropped or refused (mesh log) | refusals seen by agents "
            "| dials per agent |")
        out("|---:|---:|---:|---:|---:|---:|---:|---:|")
        mesh_refused = sum(storm["mesh_log"].values())
        out(f"| {storm['agents']:,} | {storm['back']:,} | {storm['seconds_from_kill']:.1f} s | "
            f"{storm['seconds_from_listening']:.1f} s | {storm['restart_seconds']:.1f} s | "
            f"{mesh_refused} | {storm['agents_log']['refused by the mesh']} | "
            f"{storm['agents_log']['dialling'] / max(storm['agents'], 1):.2f} |")
        out("")
        out("Dials per agent: 1.00 means every agent got back at its first dial; each dial "
            "that found no listener yet (the new process still starting) or was refused adds "
            "one, after a backoff wait.")


JSON_DATA: dict[str, Any] = {}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=2_000)
    parser.add_argument("--clients", type=int, default=4, help="client processes")
    parser.add_argument("--window", type=int, default=100,
                        help="handshakes in flight per client process while connecting")
    parser.add_argument("--idle-seconds", type=float, default=30.0,
                        help="idle CPU sample; 30 s is one heartbeat interval (the default)")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--no-storm", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="also write the figures to PATH as JSON")
    parser.add_argument("--serve-mesh", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-clients", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cert", help=argparse.SUPPRESS)
    parser.add_argument("--cafile", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.agents, args.clients, args.idle_seconds = min(args.agents, 60), 2, 1.0
        args.timeout = min(args.timeout, 60.0)
    return args


def main(argv: Sequence[str] | None = None, out: Callable[[str], None] = print) -> int:
    args = parse_args(argv)
    if args.serve_mesh:
        asyncio.run(serve_mesh(args))
        return 0
    if args.serve_clients:
        asyncio.run(run_clients(args))
        return 0
    if len(os.sched_getaffinity(0)) < 2:
        out("Only one CPU is allowed: the mesh and its agents share it.")
    result = measure(args, lambda line: print(line, file=sys.stderr, flush=True))
    report(result, args, out)
    JSON_DATA.update(result)
    complete = result["connect"]["connected"] == args.agents and (
        args.no_storm or result["storm"]["back"] == args.agents)
    return 0 if complete else 1


if __name__ == "__main__":
    from _jsonout import run_main  # --json PATH: the same figures as JSON

    sys.exit(run_main(main))
