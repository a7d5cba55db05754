"""Loopback benchmark of the adapters: dispatch round trips and memory per idle connection.

    python benchmarks/bench_loopback.py              # about 6 min; markdown tables on stdout
    python benchmarks/bench_loopback.py --quick      # a smoke run: figures not meaningful
    python benchmarks/bench_loopback.py --no-tls     # ws:// on both sides: framing costs alone
    python benchmarks/bench_loopback.py --check      # exit 1 if a target is missed
    python benchmarks/bench_loopback.py --profile    # also cProfile ours and the echo, by layer

Round trips. Ours: a `MeshServer` and an `Agent` of one adapter on 127.0.0.1, with TLS
(throwaway trustme CA), HS256 dispatch auth on, one capability `echo` that returns its
arguments; one round trip is `server.dispatch(instance, "echo", arguments)`. The baseline,
in the same run and on the same event loop: a python-websockets server (compression off)
and client. The client sends exactly the text of our dispatch frame (recorded from a live
round trip, token included) and the server answers with exactly the text of our result
frame, so both move the same bytes through the same TLS. asyncio and anyio (on asyncio)
share this process's loop with websockets' asyncio implementation; gevent runs in a child
process (monkey-patched, as a gevent application would be) against websockets' threaded
implementation, whose threads and sockets then run as greenlets on the same gevent hub.
Sequential: one round trip at a time. Pipelined: 100 callers at once, each awaiting its own
answer (for the echo, a reader hands the answers to the callers in order).

Where the time goes. The same round trip, in memory with no I/O, is timed in the same
repeats: our two sans-IO connections (`svantic_proto.testing.Pair`), websockets' sans-IO
core, and bare wsproto, on the same texts. Loopback minus in-memory is what I/O costs each
side (TLS, syscalls, the event loop, adapter glue). `--profile` adds cProfile by layer.

Memory. A `MeshServer` runs in a child process (so the clients' memory is not counted),
pinned to its own CPU. The parent opens at least 2,000 agent connections to it (the asyncio
adapter's `Agent`: TLS, upgrade, hello, welcome) and leaves them idle; the child reports the
growth of its RSS (plain runs) and of traced Python memory (a `tracemalloc` run, which also
says which files allocated it), divided by the number of connections, after a warm-up batch.

Targets (the issue's acceptance): ours at least 0.9x the echo's round trips per second,
in both modes, for every adapter; at most 16 KiB per idle server-side connection.

The machine's speed drifts, so each repeat times every candidate back to back in a
shuffled order, each ratio is taken within a repeat, and tables give medians over the
repeats. The inbound frame-rate limit (`Config.max_frames_per_second`, 1,000/s by default)
is raised for the run: otherwise the agent answers RATE_LIMITED past 1,000 dispatches/s.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import cProfile
import gc
import importlib
import importlib.util
import io
import json
import os
import platform
import pstats
import random
import resource
import ssl
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from svantic_proto import (  # noqa: E402
    Config,
    DispatchAuthMinter,
    DispatchAuthVerifier,
    DispatchCompleted,
    InstanceRecord,
    jwt_dispatch_auth,
)
from svantic_proto.framing import Framing  # noqa: E402

ADAPTERS = ("asyncio", "anyio", "gevent")
ROUND_TRIP_TARGET = 0.9
"""Ours / the websockets echo, round trips per second, in both modes."""
IDLE_BYTES_TARGET = 16 * 1024
"""Server memory per idle connection."""
IN_FLIGHT = 100
MODES = ("sequential", "pipelined")
INSTANCE = "bench-agent-1"
TENANT = "tenant-bench"
TOKEN = "bench-transport-token"
SIGNING_SECRET = "bench-dispatch-signing-secret-0123456789"
ARGUMENTS = {"ticket_id": "T-1042", "text": "sans-io round trip " * 4}
"""The echo capability's arguments: a small, typical dispatch (about 100 bytes)."""
BENCH_CONFIG = Config(max_frames_per_second=1e9, frame_burst=1_000_000_000)
IDLE_BATCH = 50
"""Idle connections opened at once (and the warm-up batch before the baseline)."""
ASYNC_ECHO = "websockets echo (asyncio)"
SYNC_ECHO = "websockets echo (threads on gevent)"
PATCH_FIRST = (
    "import runpy, sys; from gevent import monkey; monkey.patch_all(); "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)
"""How the gevent children start: monkey-patch before anything imports ssl or socket."""


@dataclass(frozen=True)
class Claims:
    """What the benchmark's transport-token check yields (a real mesh verifies a JWT)."""

    tenant_id: str
    sub: str
    exp: float


def verify_token(token: str) -> Claims | None:
    return Claims(TENANT, "bench-client", time.time() + 3600) if token == TOKEN else None


def lookup_instance(instance_id: str) -> InstanceRecord | None:
    return InstanceRecord(instance_id, TENANT, "connected", "bench-agent")


def mesh_options(tls: Tls) -> dict[str, Any]:
    return {
        "ssl_context": tls.server, "verify_token": verify_token,
        "lookup_instance": lookup_instance, "config": BENCH_CONFIG,
        "dispatch_auth": jwt_dispatch_auth(DispatchAuthMinter(SIGNING_SECRET)),
    }


def agent_options(tls: Tls, instance: str) -> dict[str, Any]:
    return {
        "token": TOKEN, "instance_id": instance, "agent_type": "bench-agent",
        "ssl_context": tls.client, "config": BENCH_CONFIG,
        "allow_insecure_loopback": tls.client is None,
        "dispatch_auth": DispatchAuthVerifier(instance, hs256_keys=[SIGNING_SECRET]),
    }


@dataclass
class Tls:
    """Server and client contexts for 127.0.0.1 from a throwaway CA, or none (`--no-tls`)."""

    server: ssl.SSLContext | None
    client: ssl.SSLContext | None
    ca_pem: str = ""

    @classmethod
    def make(cls, enabled: bool) -> Tls:
        if not enabled:
            return cls(None, None)
        import trustme

        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1")
        server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(server)
        client = ssl.create_default_context()
        ca.configure_trust(client)
        return cls(server, client, ca.cert_pem.bytes().decode("ascii"))

    @classmethod
    def client_only(cls, ca_pem: str) -> Tls:
        """The client side of a CA made in another process ("" for no TLS)."""
        return cls(None, ssl.create_default_context(cadata=ca_pem) if ca_pem else None, ca_pem)

    @property
    def scheme(self) -> str:
        return "wss" if self.client is not None else "ws"


def adapter_status(name: str) -> tuple[Any | None, str]:
    """The adapter module, or None and why it cannot run here."""
    try:
        return importlib.import_module(f"svantic_adapters.{name}"), ""
    except ImportError as exc:
        return None, f"not available ({exc})"


def recorded_texts() -> tuple[str, str]:
    """The texts of one dispatch (its token included) and of its result, as our connections
    write them: one round trip in memory with the benchmark's identities, arguments and
    auth. The same bytes as live but for the id, timestamps and signature (the core may be
    compiled, so its methods cannot be wrapped to record a live run)."""
    from svantic_proto.testing import Pair

    pair = Pair(BENCH_CONFIG, instance_id=INSTANCE, tenant_id=TENANT, agent_type="bench-agent")
    pair.connect()
    now = pair.clock.now
    pair.mesh.send_dispatch("echo", ARGUMENTS, deadline_ms=30_000, now=now)
    sent = pair.mesh.data_to_send()
    (dispatch,) = _texts(sent, client=True)
    for chunk in sent:
        pair.agent.receive_data(chunk, now)
    (received,) = pair.agent.events_received()
    pair.agent.send_result(received.dispatch_id, received.arguments)  # type: ignore[attr-defined]
    (result,) = _texts(pair.agent.data_to_send(), client=False)
    return dispatch, result


def _texts(chunks: list[bytes], client: bool) -> list[str]:
    """The text messages in `chunks`, as the other side's framing reads them."""
    from svantic_proto.framing import TextReceived

    reader = Framing(client=client)
    return [e.text for c in chunks for e in reader.receive_data(c) if type(e) is TextReceived]


# --- round trips on asyncio --------------------------------------------------------------


class Candidate:
    """Does dispatch round trips: `setup()`, timed batches, then `close()`."""

    name = ""

    async def setup(self) -> None: ...

    async def one(self) -> Any:
        raise NotImplementedError

    async def close(self) -> None: ...

    async def run(self, mode: str, count: int) -> float:
        """Seconds for `count` round trips, one at a time or IN_FLIGHT callers at once."""
        one = self.one

        async def caller(n: int) -> None:
            for _ in range(n):
                await one()

        started = time.perf_counter()
        if mode == "sequential":
            await caller(count)
        else:
            share, extra = divmod(count, IN_FLIGHT)
            await asyncio.gather(*(caller(share + (i < extra)) for i in range(IN_FLIGHT)))
        return time.perf_counter() - started


class Ours(Candidate):
    """`MeshServer` + `Agent` of one asyncio-compatible adapter, dispatch auth on."""

    def __init__(self, adapter: str, module: Any, tls: Tls, plain_handler: bool = False) -> None:
        self.name, self.module, self.tls = adapter, module, tls
        self.plain_handler = plain_handler
        self.texts = ("", "")

    async def setup(self) -> None:
        """Server, then agent, in this task (anyio's task groups need that), LIFO on close."""
        module = self.module
        self.stack = contextlib.AsyncExitStack()
        self.server = module.MeshServer(**mesh_options(self.tls))
        host, port = await self.server.start("127.0.0.1", 0)
        self.stack.push_async_callback(self.server.close, 0)
        self.agent = module.connect(f"{self.tls.scheme}://{host}:{port}/agents/connect",
                                    **agent_options(self.tls, INSTANCE))

        async def echo(arguments: Any, context: Any) -> Any:
            return arguments

        self.agent.add("echo", (lambda arguments, context: arguments) if self.plain_handler
                       else echo)
        await self.stack.enter_async_context(self.agent)
        await self.server.wait_for_agent(INSTANCE)
        await self.one()
        self.texts = recorded_texts()

    async def one(self) -> Any:
        return await self.server.dispatch(INSTANCE, "echo", ARGUMENTS)

    async def close(self) -> None:
        await self.stack.aclose()


class WebsocketsEcho(Candidate):
    """python-websockets (asyncio), compression off: our dispatch out, our result back."""

    name = ASYNC_ECHO

    def __init__(self, tls: Tls, texts: tuple[str, str]) -> None:
        self.tls, (self.dispatch_text, self.result_text) = tls, texts
        self._answers: collections.deque[asyncio.Future[Any]] = collections.deque()

    async def setup(self) -> None:
        from websockets.asyncio.client import connect
        from websockets.asyncio.server import serve

        result_text = self.result_text

        async def handler(websocket: Any) -> None:
            async for _message in websocket:
                await websocket.send(result_text)

        self.server = await serve(handler, "127.0.0.1", 0, ssl=self.tls.server,
                                  compression=None, ping_interval=None)
        port = self.server.sockets[0].getsockname()[1]
        self.client = await connect(f"{self.tls.scheme}://127.0.0.1:{port}", ssl=self.tls.client,
                                    compression=None, ping_interval=None, proxy=None)
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        answers = self._answers
        async for message in self.client:
            answers.popleft().set_result(message)

    async def one(self) -> Any:
        future = asyncio.get_running_loop().create_future()
        self._answers.append(future)
        await self.client.send(self.dispatch_text)
        return await future

    async def close(self) -> None:
        await self.client.close()
        self.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.reader
        self.server.close()
        await self.server.wait_closed()


# --- round trips on gevent (run in a monkey-patched child process) -----------------------


class GeventOurs:
    """The gevent adapter's `MeshServer` + `Agent`; blocking calls, greenlets for callers."""

    name = "gevent"

    def __init__(self, module: Any, tls: Tls) -> None:
        self.module, self.tls = module, tls
        self.texts = ("", "")

    def setup(self) -> None:
        self.server = self.module.MeshServer(**mesh_options(self.tls))
        host, port = self.server.start("127.0.0.1", 0)
        self.agent = self.module.connect(f"{self.tls.scheme}://{host}:{port}/agents/connect",
                                         **agent_options(self.tls, INSTANCE))
        self.agent.add("echo", lambda arguments, context: arguments)
        self.agent.start().wait_ready(10)
        self.server.wait_for_agent(INSTANCE)
        self.one()
        self.texts = recorded_texts()

    def one(self) -> Any:
        return self.server.dispatch(INSTANCE, "echo", ARGUMENTS)

    def close(self) -> None:
        self.agent.stop(grace=0)
        self.server.close(grace=0)


class WebsocketsSyncEcho:
    """python-websockets' threaded implementation; under gevent its threads are greenlets."""

    name = SYNC_ECHO

    def __init__(self, tls: Tls, texts: tuple[str, str]) -> None:
        self.tls, (self.dispatch_text, self.result_text) = tls, texts
        self._answers: collections.deque[Any] = collections.deque()

    def setup(self) -> None:
        import gevent  # type: ignore[import-untyped]
        from websockets.sync.client import connect
        from websockets.sync.server import serve

        result_text = self.result_text

        def handler(websocket: Any) -> None:
            for _message in websocket:
                websocket.send(result_text)

        self.stack = contextlib.ExitStack()
        self.server = serve(handler, "127.0.0.1", 0, ssl=self.tls.server, compression=None,
                            ping_interval=None)
        self.stack.callback(self.server.shutdown)
        port = self.server.socket.getsockname()[1]
        gevent.spawn(self.server.serve_forever)
        self.client = self.stack.enter_context(connect(
            f"{self.tls.scheme}://127.0.0.1:{port}", ssl=self.tls.client, compression=None,
            ping_interval=None, proxy=None))
        self.reader = gevent.spawn(self._read)

    def _read(self) -> None:
        answers = self._answers
        for message in self.client:
            answers.popleft().set(message)

    def one(self) -> Any:
        import gevent.event  # type: ignore[import-untyped]

        answer = gevent.event.AsyncResult()
        self._answers.append(answer)
        self.client.send(self.dispatch_text)
        return answer.get()

    def close(self) -> None:
        self.stack.close()
        self.reader.kill()


def run_blocking(candidate: Any, mode: str, count: int) -> float:
    import gevent

    one = candidate.one

    def caller(n: int) -> None:
        for _ in range(n):
            one()

    started = time.perf_counter()
    if mode == "sequential":
        caller(count)
    else:
        share, extra = divmod(count, IN_FLIGHT)
        callers = [gevent.spawn(caller, share + (i < extra)) for i in range(IN_FLIGHT)]
        gevent.joinall(callers, raise_error=True)
    return time.perf_counter() - started


def gevent_child(args: argparse.Namespace) -> None:
    """In a patched child: time gevent ours and the threaded echo, print seconds as JSON."""
    module = importlib.import_module("svantic_adapters.gevent")
    tls = Tls.make(not args.no_tls)
    ours = GeventOurs(module, tls)
    ours.setup()
    echo = WebsocketsSyncEcho(tls, ours.texts)
    echo.setup()
    counts = {"sequential": args.sequential, "pipelined": args.pipelined}
    try:
        results = shuffled_repeats(
            [ours, echo], counts, args.repeats, args.seed,
            run_blocking)
    finally:
        echo.close()
        ours.close()
    print(json.dumps({"seconds": [[k[0], k[1], v] for k, v in results.seconds.items()],
                      "sizes": [len(t.encode()) for t in ours.texts]}), flush=True)


def measure_gevent(args: argparse.Namespace, cpu: int | None) -> tuple[RoundTrips, tuple[int, int]]:
    forwarded = ["--gevent-child", "--repeats", str(args.repeats), "--seed", str(args.seed),
                 "--sequential", str(args.sequential), "--pipelined", str(args.pipelined)]
    if args.no_tls:
        forwarded.append("--no-tls")
    done = subprocess.run(
        [sys.executable, "-c", PATCH_FIRST, __file__, *forwarded], capture_output=True,
        text=True, timeout=600, check=False,
        preexec_fn=(lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the gevent child failed:\n{done.stderr[-3000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    results = RoundTrips(counts={"sequential": args.sequential, "pipelined": args.pipelined})
    for name, mode, seconds in report["seconds"]:
        results.seconds[(name, mode)] = seconds
    return results, (report["sizes"][0], report["sizes"][1])


# --- the same round trip in memory (no I/O) ----------------------------------------------


def core_in_memory() -> Callable[[int], float]:
    """Our two sans-IO connections back to back: dispatch (with auth) in, result out."""
    from svantic_proto.testing import Pair

    pair = Pair(BENCH_CONFIG)
    pair.connect()
    mesh, agent, clock = pair.mesh, pair.agent, pair.clock

    def run(count: int) -> float:
        started = time.perf_counter()
        now = clock.now
        for _ in range(count):
            now += 0.0001  # about the live pace: ids and stamps enter new milliseconds
            clock.now = now
            mesh.send_dispatch("echo", ARGUMENTS, deadline_ms=30_000, now=now)
            for chunk in mesh.data_to_send():
                agent.receive_data(chunk, now)
            (received,) = agent.events_received()
            agent.next_deadline()
            agent.send_result(received.dispatch_id, received.arguments)  # type: ignore[attr-defined]
            for chunk in agent.data_to_send():
                mesh.receive_data(chunk, now)
            (completed,) = mesh.events_received()
            if type(completed) is not DispatchCompleted:
                raise RuntimeError(f"round trip did not complete: {completed}")
            agent.next_deadline()
            mesh.next_deadline()
        elapsed = time.perf_counter() - started
        pair.advance(0)
        return elapsed

    return run


def websockets_in_memory(texts: tuple[str, str]) -> Callable[[int], float]:
    """websockets' sans-IO core, client to server and back, decoding text as its I/O layer."""
    from websockets.protocol import Protocol, Side, State

    client = Protocol(Side.CLIENT, state=State.OPEN)
    server = Protocol(Side.SERVER, state=State.OPEN)
    dispatch_text, result_text = texts

    def run(count: int) -> float:
        started = time.perf_counter()
        for _ in range(count):
            client.send_text(dispatch_text.encode())
            server.receive_data(b"".join(client.data_to_send()))
            for frame in server.events_received():
                frame.data.decode()  # type: ignore[union-attr]
            server.send_text(result_text.encode())
            client.receive_data(b"".join(server.data_to_send()))
            for frame in client.events_received():
                frame.data.decode()  # type: ignore[union-attr]
        return time.perf_counter() - started

    return run


def wsproto_in_memory(texts: tuple[str, str]) -> Callable[[int], float]:
    """Bare wsproto, the framing backend behind our core, on the same texts."""
    from wsproto.connection import Connection, ConnectionType
    from wsproto.events import TextMessage

    mesh, agent = Connection(ConnectionType.SERVER), Connection(ConnectionType.CLIENT)
    dispatch_text, result_text = texts

    def run(count: int) -> float:
        started = time.perf_counter()
        for _ in range(count):
            agent.receive_data(mesh.send(TextMessage(data=dispatch_text)))
            for _event in agent.events():
                pass
            mesh.receive_data(agent.send(TextMessage(data=result_text)))
            for _event in mesh.events():
                pass
        return time.perf_counter() - started

    return run


IN_MEMORY = {
    "ours (svantic_proto core)": lambda texts: core_in_memory(),
    "websockets sans-IO core": websockets_in_memory,
    "bare wsproto": wsproto_in_memory,
}


# --- measuring ---------------------------------------------------------------------------


@dataclass
class RoundTrips:
    """Seconds per batch by (candidate, mode), one entry per repeat, in repeat order."""

    seconds: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, mode: str, seconds: float) -> None:
        self.seconds.setdefault((name, mode), []).append(seconds)

    def micros(self, name: str, mode: str) -> float:
        return 1e6 * statistics.median(self.seconds[(name, mode)]) / self.counts[mode]

    def rate(self, name: str, mode: str) -> float:
        return 1e6 / self.micros(name, mode)

    def ratio(self, name: str, baseline: str, mode: str) -> float:
        """Median over repeats of ours / baseline round trips per second."""
        ours, base = self.seconds[(name, mode)], self.seconds[(baseline, mode)]
        return statistics.median(b / o for o, b in zip(ours, base, strict=True))


def shuffled_repeats(candidates: Sequence[Any], counts: dict[str, int], repeats: int, seed: int,
                     timed: Callable[[Any, str, int], float]) -> RoundTrips:
    """Warm up, then every repeat runs each (candidate, mode) once in a shuffled order."""
    results = RoundTrips(counts=dict(counts))
    order = [(candidate, mode) for candidate in candidates for mode in counts]
    rng = random.Random(seed)
    for candidate, mode in order:
        timed(candidate, mode, max(IN_FLIGHT, counts[mode] // 10))
    for _ in range(repeats):
        rng.shuffle(order)
        for candidate, mode in order:
            gc.collect()
            results.add(candidate.name, mode, timed(candidate, mode, counts[mode]))
    return results


async def shuffled_repeats_async(candidates: Sequence[Candidate], in_memory: dict[str, Any],
                                 counts: dict[str, int], repeats: int, seed: int) -> RoundTrips:
    """`shuffled_repeats` on this loop; in-memory round trips join the sequential mode."""
    results = RoundTrips(counts=dict(counts))
    order: list[tuple[Any, str]] = [(c, mode) for c in candidates for mode in counts]
    order += [(name, "sequential") for name in in_memory]
    rng = random.Random(seed)

    async def timed(what: Any, mode: str, count: int) -> float:
        if isinstance(what, str):
            seconds: float = in_memory[what](count)
            return seconds
        return float(await what.run(mode, count))

    for what, mode in order:
        await timed(what, mode, max(IN_FLIGHT, counts[mode] // 10))
    for _ in range(repeats):
        rng.shuffle(order)
        for what, mode in order:
            gc.collect()
            name = what if isinstance(what, str) else what.name
            results.add(name, mode, await timed(what, mode, counts[mode]))
    return results


LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("wsproto framing", ("wsproto",)),
    ("websockets framing and I/O layer", ("websockets",)),
    ("TLS (ssl, sslproto)", ("ssl.py", "sslproto.py", "_ssl")),
    ("svantic_proto core", ("svantic_proto",)),
    ("adapter + runtime", ("svantic_adapters", "/adapters/")),
    ("asyncio loop, tasks, streams, sockets", ("asyncio", "selectors", "_asyncio",
                                               "select.epoll", "socket", "<method 'send",
                                               "<method 'recv", "sniffio")),
    ("anyio", ("anyio",)),
    ("msgspec", ("msgspec",)),
    ("hmac, hashlib, base64", ("hmac", "hashlib", "_hashlib", "base64", "binascii")),
)


def layer_of(filename: str, function: str) -> str:
    where = f"{filename} {function}"
    for layer, marks in LAYERS:
        if any(mark in where for mark in marks):
            return layer
    return "other (builtins, benchmark callers)"


async def profile_candidate(candidate: Candidate, count: int) -> tuple[dict[str, float], str]:
    """cProfile own time by layer (shares of the total), and the top functions."""
    profiler = cProfile.Profile()
    profiler.enable()
    await candidate.run("pipelined", count)
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(12)
    totals: dict[str, float] = collections.defaultdict(float)
    for (filename, _line, function), row in stats.stats.items():  # type: ignore[attr-defined]
        totals[layer_of(filename, function)] += row[2]
    whole = sum(totals.values()) or 1.0
    text = out.getvalue()
    text = text[text.find("ncalls"):] if "ncalls" in text else text
    return {layer: seconds / whole for layer, seconds in totals.items()}, text


# --- memory per idle connection ----------------------------------------------------------


def read_rss_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def memory_report(agents: int, previous: Any) -> tuple[dict[str, Any], Any]:
    """RSS, and with tracemalloc on, traced bytes and growth by file since `previous`."""
    import tracemalloc

    for _ in range(3):
        gc.collect()
    report: dict[str, Any] = {"agents": agents, "rss_kib": read_rss_kib()}
    snapshot = None
    if tracemalloc.is_tracing():
        snapshot = tracemalloc.take_snapshot()
        report["traced"] = tracemalloc.get_traced_memory()[0]
        if previous is not None:
            growth = snapshot.compare_to(previous, "filename")
            report["by_file"] = [(s.traceback[0].filename, s.size_diff) for s in growth[:10]]
    return report, snapshot


def start_tracing(traced: bool) -> None:
    """Trace from here on: every connection is opened later, and setup is not slowed."""
    if traced:
        import tracemalloc

        tracemalloc.start()


async def serve_idle(adapter: str, tls_enabled: bool, traced: bool) -> None:
    """Child process: a MeshServer that reports memory each time stdin names a count."""
    module = importlib.import_module(f"svantic_adapters.{adapter}")
    tls = Tls.make(tls_enabled)
    server = module.MeshServer(**mesh_options(tls), max_connections=100_000)
    _, port = await server.start("127.0.0.1", 0)
    loop = asyncio.get_running_loop()
    commands = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(commands), sys.stdin)
    start_tracing(traced)
    print(json.dumps({"port": port, "ca_pem": tls.ca_pem}), flush=True)
    previous = None
    while line := (await commands.readline()).decode().strip():
        deadline = loop.time() + 60
        while len(server.agents) < int(line) and loop.time() < deadline:
            await asyncio.sleep(0.01)  # normally already true: welcome follows registration
        report, previous = memory_report(len(server.agents), previous)
        print(json.dumps(report), flush=True)
    await server.close(grace=0)


async def serve_idle_trio(tls_enabled: bool, traced: bool) -> None:
    """`serve_idle` for the anyio adapter on trio (anyio's streams, a task per reader)."""
    import anyio
    import anyio.to_thread

    module = importlib.import_module("svantic_adapters.anyio")
    tls = Tls.make(tls_enabled)
    server = module.MeshServer(**mesh_options(tls), max_connections=100_000)
    _, port = await server.start("127.0.0.1", 0)
    start_tracing(traced)
    print(json.dumps({"port": port, "ca_pem": tls.ca_pem}), flush=True)
    previous = None
    while line := (await anyio.to_thread.run_sync(sys.stdin.readline)).strip():
        with anyio.move_on_after(60):
            while len(server.agents) < int(line):
                await anyio.sleep(0.01)
        report, previous = memory_report(len(server.agents), previous)
        print(json.dumps(report), flush=True)
    await server.close(grace=0)


def serve_idle_gevent(tls_enabled: bool, traced: bool) -> None:
    """`serve_idle` for the gevent adapter (in a patched child)."""
    import gevent
    from gevent.fileobject import FileObjectPosix  # type: ignore[import-untyped]

    module = importlib.import_module("svantic_adapters.gevent")
    tls = Tls.make(tls_enabled)
    server = module.MeshServer(**mesh_options(tls), max_connections=100_000)
    _, port = server.start("127.0.0.1", 0)
    commands = FileObjectPosix(sys.stdin.fileno(), "rb", close=False)
    start_tracing(traced)
    print(json.dumps({"port": port, "ca_pem": tls.ca_pem}), flush=True)
    previous = None
    while line := commands.readline().decode().strip():
        deadline = time.monotonic() + 60
        while len(server.agents) < int(line) and time.monotonic() < deadline:
            gevent.sleep(0.01)
        report, previous = memory_report(len(server.agents), previous)
        print(json.dumps(report), flush=True)
    server.close(grace=0)


@dataclass
class IdleRun:
    connections: int
    per_connection: float
    """RSS growth, or traced growth in a tracemalloc run, in bytes."""
    by_file: list[tuple[str, float]] = field(default_factory=list)


async def measure_idle(adapter: str, tls_enabled: bool, connections: int, traced: bool,
                       cpu: int | None) -> IdleRun:
    """Open `connections` idle agents against a MeshServer of `adapter` in a child process.

    The clients are the asyncio adapter's `Agent` in this process, whatever the server's
    adapter: only the child's memory counts, measured from after a warm-up batch.
    """
    from svantic_adapters import asyncio as client_adapter

    command = [sys.executable, *(["-c", PATCH_FIRST] if adapter == "gevent" else []),
               __file__, "--serve-idle", adapter, *([] if tls_enabled else ["--no-tls"]),
               *(["--traced"] if traced else [])]
    child = await asyncio.create_subprocess_exec(
        *command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        preexec_fn=(lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None,
    )
    stdin, stdout = child.stdin, child.stdout
    if stdin is None or stdout is None:
        raise RuntimeError("the server child has no pipes")

    async def answer() -> dict[str, Any]:
        line = await asyncio.wait_for(stdout.readline(), 180)
        if not line:
            raise RuntimeError(f"the {adapter} server child ended early")
        return json.loads(line)  # type: ignore[no-any-return]

    async def ask(wanted: int) -> dict[str, Any]:
        stdin.write(f"{wanted}\n".encode())
        return await answer()

    agents: list[Any] = []
    try:
        hello = await answer()
        tls = Tls.client_only(hello["ca_pem"])
        url = f"{tls.scheme}://127.0.0.1:{hello['port']}/agents/connect"

        async def open_agent(number: int) -> None:
            agent = client_adapter.connect(url, **agent_options(tls, f"idle-{number:05d}"))
            agents.append(agent)
            await asyncio.wait_for(agent.__aenter__(), 120)

        async def open_agents(total: int) -> None:
            while len(agents) < total:
                batch = range(len(agents), min(total, len(agents) + IDLE_BATCH))
                await asyncio.gather(*(open_agent(n) for n in batch))

        warm_up = min(IDLE_BATCH, connections)  # imports, caches, allocator arenas
        await open_agents(warm_up)
        before = await ask(warm_up)
        await open_agents(warm_up + connections)
        after = await ask(warm_up + connections)
    finally:
        stops = asyncio.gather(*(a.stop(grace=0) for a in agents), return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stops, 60)
        stdin.close()
        try:
            await asyncio.wait_for(child.wait(), 30)
        except TimeoutError:
            child.kill()
            await child.wait()
    key = "traced" if traced else "rss_kib"
    scale = 1 if traced else 1024
    return IdleRun(
        connections=connections,
        per_connection=(after[key] - before[key]) * scale / connections,
        by_file=[(name, size / connections) for name, size in after.get("by_file", [])],
    )


# --- the run -----------------------------------------------------------------------------


@dataclass
class Outcome:
    round_trips: dict[str, tuple[RoundTrips, str]] = field(default_factory=dict)
    """Per adapter: its measurements and the name of the echo it is compared with."""
    sizes: tuple[int, int] = (0, 0)
    in_memory: RoundTrips | None = None
    layers: dict[str, dict[str, float]] = field(default_factory=dict)
    profiles: dict[str, str] = field(default_factory=dict)
    rss: dict[str, list[IdleRun]] = field(default_factory=dict)
    traced: dict[str, IdleRun] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)


async def run_async_round_trips(modules: dict[str, Any], tls: Tls, args: argparse.Namespace,
                                outcome: Outcome) -> None:
    """Every asyncio-based adapter and the websockets echo, on this one event loop."""
    counts = {"sequential": args.sequential, "pipelined": args.pipelined}
    candidates: list[Candidate] = []
    try:
        for name, module in modules.items():
            ours = Ours(name, module, tls, args.plain_handler)
            candidates.append(ours)
            await ours.setup()
        texts = candidates[0].texts  # type: ignore[attr-defined]
        echo = WebsocketsEcho(tls, texts)
        candidates.append(echo)
        await echo.setup()
        outcome.sizes = (len(texts[0].encode()), len(texts[1].encode()))
        in_memory = {name: make(texts) for name, make in IN_MEMORY.items()}
        results = await shuffled_repeats_async(candidates, in_memory, counts, args.repeats,
                                               args.seed)
        for name in modules:
            outcome.round_trips[name] = (results, ASYNC_ECHO)
        outcome.in_memory = results
        if args.profile:
            for candidate in candidates:
                layers, text = await profile_candidate(candidate, args.pipelined)
                outcome.layers[candidate.name] = layers
                outcome.profiles[candidate.name] = text
    finally:
        while candidates:
            with contextlib.suppress(Exception):
                await candidates.pop().close()


def has_trio() -> bool:
    """The anyio adapter's memory is measured on trio too when trio is installed."""
    return importlib.util.find_spec("trio") is not None


def pick_cpus() -> tuple[int | None, int | None]:
    """One CPU for this process and another for a server child, when there are two."""
    if not hasattr(os, "sched_getaffinity"):
        return None, None
    cpus = sorted(os.sched_getaffinity(0))
    return cpus[0], (cpus[1] if len(cpus) > 1 else None)


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE,
                           (needed if hard == resource.RLIM_INFINITY else min(needed, hard), hard))


def fmt_rate(value: float) -> str:
    return f"{value:,.0f}"


def report_round_trips(outcome: Outcome, out: Callable[[str], None]) -> bool:
    met = True
    dispatch_bytes, result_bytes = outcome.sizes
    out(f"### Round trips ({dispatch_bytes}-byte dispatch frame, {result_bytes}-byte result)")
    out("")
    out(f"| adapter | mode | ours rt/s | echo rt/s | ours / echo | >= {ROUND_TRIP_TARGET}x "
        "| echo |")
    out("|---|---|---:|---:|---:|---|---|")
    for adapter, (results, echo) in outcome.round_trips.items():
        for mode in MODES:
            ratio = results.ratio(adapter, echo, mode)
            ok = ratio >= ROUND_TRIP_TARGET
            met &= ok
            out(f"| {adapter} | {mode} | {fmt_rate(results.rate(adapter, mode))} "
                f"| {fmt_rate(results.rate(echo, mode))} | {ratio:.2f}x "
                f"| {'yes' if ok else '**no**'} | {echo} |")
    out("")
    gevent = outcome.round_trips.get("gevent")
    asyncio_run = next((r for n, (r, _) in outcome.round_trips.items() if n != "gevent"), None)
    if gevent is not None and asyncio_run is not None:
        ratios = ", ".join(
            f"{mode} {gevent[0].rate('gevent', mode) / asyncio_run.rate(ASYNC_ECHO, mode):.2f}x"
            for mode in MODES)
        out(f"gevent against the asyncio echo of the same run (another process, not "
            f"interleaved, so indicative only): {ratios}.")
        out("")
    return met


def report_decomposition(outcome: Outcome, out: Callable[[str], None]) -> None:
    """Loopback minus the same round trip in memory: what I/O costs each side."""
    results = outcome.in_memory
    if results is None:
        return
    memory_name = {ASYNC_ECHO: "websockets sans-IO core"}
    names = [n for n, (r, _) in outcome.round_trips.items() if r is results] + [ASYNC_ECHO]
    core = results.micros("ours (svantic_proto core)", "sequential")

    def in_memory(name: str) -> float:
        return results.micros(memory_name.get(name, "ours (svantic_proto core)"), "sequential")

    out("### Where the time goes (µs per round trip, medians)")
    out("")
    out("| | " + " | ".join(names) + " |")
    out("|---|" + "---:|" * len(names))
    for mode in MODES:
        out(f"| loopback, {mode} | "
            + " | ".join(f"{results.micros(n, mode):.1f}" for n in names) + " |")
    out("| the same round trip in memory, no I/O | "
        + " | ".join(f"{in_memory(n):.1f}" for n in names) + " |")
    out("| loopback - in memory: TLS, syscalls, event loop, adapter (sequential) | "
        + " | ".join(f"{results.micros(n, 'sequential') - in_memory(n):.1f}" for n in names)
        + " |")
    out("")
    wsproto = results.micros("bare wsproto", "sequential")
    websockets = results.micros("websockets sans-IO core", "sequential")
    out(f"In memory, framing alone on the same texts: bare wsproto {wsproto:.1f} µs, "
        f"websockets' sans-IO core {websockets:.1f} µs per round trip.")
    out("")
    for mode in MODES:
        echo = results.micros(ASYNC_ECHO, mode)
        echo_io = max(echo - websockets, 0.0)
        budget = echo / ROUND_TRIP_TARGET
        out(f"- {mode}: {ROUND_TRIP_TARGET}x allows {budget:.0f} µs per round trip; our "
            f"in-memory round trip alone takes {core:.0f} µs. With I/O as cheap as the echo's "
            f"({echo_io:.0f} µs), ours would reach {echo / (core + echo_io):.2f}x; for "
            f"{ROUND_TRIP_TARGET}x the in-memory round trip would have to fit in "
            f"{max(budget - echo_io, 0.0):.0f} µs.")
    out("")
    out("Pipelined, the core takes many frames per read, so its share there is a bit less "
        "than the sequential in-memory figure.")
    out("")


def report_profile(outcome: Outcome, out: Callable[[str], None]) -> None:
    if not outcome.layers:
        return
    names = list(outcome.layers)
    out(f"### cProfile own time by layer (pipelined, {IN_FLIGHT} in flight)")
    out("")
    out("| layer | " + " | ".join(names) + " |")
    out("|---|" + "---:|" * len(names))
    layers = sorted({layer for shares in outcome.layers.values() for layer in shares},
                    key=lambda layer: -max(s.get(layer, 0.0) for s in outcome.layers.values()))
    for layer in layers:
        out(f"| {layer} | "
            + " | ".join(f"{outcome.layers[n].get(layer, 0.0):.0%}" for n in names) + " |")
    out("")
    for name, text in outcome.profiles.items():
        out(f"Top functions by own time, {name}:")
        out("")
        out("```")
        out("\n".join(shorten_paths(line).rstrip() for line in text.strip().splitlines()))
        out("```")
        out("")


def report_memory(outcome: Outcome, tls: str, out: Callable[[str], None]) -> bool:
    met = True
    if not outcome.rss and not outcome.traced:
        return met
    out(f"### Memory per idle server-side connection ({tls})")
    out("")
    out("| adapter | connections | RSS KiB / conn | traced Python KiB / conn "
        f"| <= {IDLE_BYTES_TARGET // 1024} KiB |")
    out("|---|---:|---:|---:|---|")
    for adapter in dict.fromkeys([*outcome.rss, *outcome.traced]):
        runs = outcome.rss.get(adapter, [])
        rss = statistics.median(r.per_connection for r in runs) if runs else None
        traced_run = outcome.traced.get(adapter)
        traced = traced_run.per_connection if traced_run else None
        worst = max(v for v in (rss, traced) if v is not None)
        ok = worst <= IDLE_BYTES_TARGET
        met &= ok
        connections = (runs[0] if runs else traced_run).connections  # type: ignore[union-attr]
        out(f"| {adapter} | {connections:,} "
            f"| {'-' if rss is None else f'{rss / 1024:.1f}'} "
            f"| {'-' if traced is None else f'{traced / 1024:.1f}'} "
            f"| {'yes' if ok else '**no**'} |")
    out("")
    for adapter, run in outcome.traced.items():
        out(f"Traced growth per idle connection by file, {adapter}:")
        out("")
        out("| file | bytes / conn |")
        out("|---|---:|")
        for filename, size in run.by_file:
            out(f"| {short_path(filename)} | {size:,.0f} |")
        out("")
    return met


def shorten_paths(line: str) -> str:
    """A profile line with each file path cut to its package (no machine directories)."""
    words = line.split(" ")
    for index, word in enumerate(words):
        path, colon, rest = word.partition(":")
        if path.startswith("/") and colon:
            words[index] = f"{short_path(path)}:{rest}"
    return " ".join(words)


def short_path(filename: str) -> str:
    """A file name without the machine's directories."""
    parts = Path(filename).parts
    for anchor in ("site-packages", "svantic_proto", "adapters", "benchmarks"):
        if anchor in parts:
            index = parts.index(anchor)
            return "/".join(parts[index + (anchor == "site-packages"):])
    for package in ("asyncio", "gevent", "anyio"):
        if package in parts:
            return f"{package}/{parts[-1]}"
    return parts[-1] if parts else filename


def report(outcome: Outcome, args: argparse.Namespace, statuses: dict[str, str],
           out: Callable[[str], None]) -> bool:
    """Markdown tables; True when every measured target is met."""
    tls = "no TLS (ws://)" if args.no_tls else "TLS"
    out(f"Python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{tls}, dispatch auth HS256 on; {args.repeats} repeats of {args.sequential:,} "
        f"sequential and {args.pipelined:,} pipelined round trips ({IN_FLIGHT} in flight); "
        f"medians{' (quick: figures not meaningful)' if args.quick else ''}")
    out("")
    for name, status in statuses.items():
        out(f"- adapter {name}: {status}")
    for name, failure in outcome.failures.items():
        out(f"- {name}: failed: {failure}")
    out("")
    met = True
    if outcome.round_trips:
        met &= report_round_trips(outcome, out)
        report_decomposition(outcome, out)
        report_profile(outcome, out)
    met &= report_memory(outcome, tls, out)
    return met


JSON_DATA: dict[str, Any] = {}
"""Raw figures for `--json PATH` (see `_jsonout.py`)."""


def json_data(outcome: Outcome, args: argparse.Namespace,
              statuses: dict[str, str]) -> dict[str, Any]:
    """Round trips per adapter and mode (ratios per repeat) and memory per idle connection."""
    round_trips: dict[str, Any] = {}
    for adapter, (results, echo) in outcome.round_trips.items():
        for mode in MODES:
            ours, base = results.seconds[(adapter, mode)], results.seconds[(echo, mode)]
            round_trips.setdefault(adapter, {})[mode] = {
                "echo": echo,
                "ours_rt_per_s": results.rate(adapter, mode),
                "echo_rt_per_s": results.rate(echo, mode),
                "ratio": results.ratio(adapter, echo, mode),
                "ratio_per_repeat": [b / o for o, b in zip(ours, base, strict=True)],
            }
    return {
        "tls": not args.no_tls, "repeats": args.repeats, "sequential": args.sequential,
        "pipelined": args.pipelined, "plain_handler": args.plain_handler,
        "sizes": list(outcome.sizes), "statuses": statuses, "failures": outcome.failures,
        "round_trips": round_trips,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: small counts")
    parser.add_argument("--no-tls", action="store_true", help="ws:// on both sides")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument("--profile", action="store_true", help="cProfile ours and the echo")
    parser.add_argument("--adapters", default=",".join(ADAPTERS), help="comma-separated")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sequential", type=int, default=2_000, help="round trips per repeat")
    parser.add_argument("--pipelined", type=int, default=10_000, help="round trips per repeat")
    parser.add_argument("--idle", type=int, default=2_000,
                        help="idle connections for the memory figures (0: skip them)")
    parser.add_argument("--idle-repeats", type=int, default=3, help="RSS runs per adapter")
    parser.add_argument("--skip-round-trips", action="store_true")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--plain-handler", action="store_true",
                        help="asyncio and anyio: a plain function handler, not `async def`")
    parser.add_argument("--serve-idle", metavar="ADAPTER", help=argparse.SUPPRESS)
    parser.add_argument("--gevent-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--traced", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="also write the figures to PATH as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = min(args.repeats, 2)
        args.sequential = min(args.sequential, 100)
        args.pipelined = min(args.pipelined, 500)
        args.idle = min(args.idle, 20)
        args.idle_repeats = 1
    return args


def run(args: argparse.Namespace, modules: dict[str, Any], outcome: Outcome) -> None:
    client_cpu, server_cpu = pick_cpus()
    async_modules = {name: m for name, m in modules.items() if name != "gevent"}
    if not args.skip_round_trips:
        if async_modules:
            asyncio.run(run_async_round_trips(async_modules, Tls.make(not args.no_tls), args,
                                              outcome))
        if "gevent" in modules:
            try:
                results, sizes = measure_gevent(args, client_cpu)
                outcome.round_trips["gevent"] = (results, SYNC_ECHO)
                outcome.sizes = outcome.sizes if async_modules else sizes
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                outcome.failures["gevent round trips"] = str(exc)
    if args.idle > 0:
        raise_fd_limit(2 * (args.idle + IDLE_BATCH) + 512)
        servers = [*modules, *(["anyio-trio"] if "anyio" in modules and has_trio() else [])]
        for name in servers:
            try:
                outcome.rss[name] = [
                    asyncio.run(measure_idle(name, not args.no_tls, args.idle, False, server_cpu))
                    for _ in range(args.idle_repeats)
                ]
                outcome.traced[name] = asyncio.run(
                    measure_idle(name, not args.no_tls, args.idle, True, server_cpu))
            except (RuntimeError, TimeoutError, OSError) as exc:
                outcome.failures[f"{name} memory"] = str(exc)


def main(argv: Sequence[str] | None = None, out: Callable[[str], None] = print) -> int:
    args = parse_args(argv)
    if args.serve_idle == "gevent":
        serve_idle_gevent(not args.no_tls, args.traced)
        return 0
    if args.serve_idle == "anyio-trio":
        import anyio

        anyio.run(serve_idle_trio, not args.no_tls, args.traced, backend="trio")
        return 0
    if args.serve_idle:
        asyncio.run(serve_idle(args.serve_idle, not args.no_tls, args.traced))
        return 0
    if args.gevent_child:
        gevent_child(args)
        return 0
    modules: dict[str, Any] = {}
    statuses: dict[str, str] = {}
    for name in (n.strip() for n in args.adapters.split(",")):
        if name:
            module, why = adapter_status(name)
            statuses[name] = why or "measured"
            if module is not None:
                modules[name] = module
    outcome = Outcome()
    client_cpu, _ = pick_cpus()
    saved = os.sched_getaffinity(0) if client_cpu is not None else None
    try:
        if client_cpu is not None:
            os.sched_setaffinity(0, {client_cpu})  # the event loop and both ends on one CPU
        run(args, modules, outcome)
    finally:
        if saved is not None:
            os.sched_setaffinity(0, saved)
    met = report(outcome, args, statuses, out)
    JSON_DATA.update(json_data(outcome, args, statuses))
    if not met:
        out("Targets missed: see the tables above.")
    return 1 if args.check and not met else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _jsonout import run_main  # --json PATH: the same figures as JSON

    sys.exit(run_main(main))
