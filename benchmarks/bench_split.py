"""Loopback round trips with each side in its own process: one CPU for both, and split.

    python benchmarks/bench_split.py                 # about 2 min; markdown tables on stdout
    python benchmarks/bench_split.py --quick         # a smoke run: figures not meaningful
    python benchmarks/bench_split.py --contenders asyncio,websockets  # a subset (see --help)
    python benchmarks/bench_split.py --placements split

Why a second loopback script: `bench_loopback.py` runs both ends of a round trip in one
process (one event loop), so it can only show client and server sharing one CPU. Here every
contender is two processes: the *driver*, which sends dispatches and times them, and the
*answerer*, which answers them. For ours the driver is the adapter's `MeshServer` (it calls
`dispatch`) and the answerer the adapter's `Agent` with an `async def` echo handler (gevent:
a plain function, gevent's way); for an echo the driver is a WebSocket client sending the
text of our dispatch frame and the answerer a WebSocket server answering the text of our
result frame, so both move the same bytes through the same TLS (a throwaway trustme CA, HS256
dispatch auth on, about 1 KB per round trip).

Contenders (each a pair of processes, all started once and kept): ours on asyncio, anyio on
asyncio, asyncio and anyio on uvloop, anyio on trio, gevent; python-websockets' asyncio echo on
the stock loop and on uvloop, trio-websocket's echo on trio, and websockets' threaded (sync)
echo in gevent-patched processes (its threads are greenlets there). Each side of a pair runs
the same event loop.

Placements: *one-cpu* pins both processes (every thread) to the first allowed CPU; *split*
pins the driver to the first and the answerer to the second. The pins are set with
`os.sched_setaffinity` before each batch, so one set of processes serves both placements.

Each repeat runs every (contender, placement, mode) once: per (placement, mode) a block of
every contender back to back in a shuffled order, the blocks in a shuffled order, so the
figures a ratio compares are taken seconds apart. Ratios are taken within a repeat, and the
tables give medians (min-max) over the repeats. *Sequential* is one round trip at a time;
*pipelined* 100 callers at once. Each side's CPU time per round trip (from /proc) is reported
too: in split, the side with more CPU per round trip sets the pace.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

IN_FLIGHT = 100
MODES = ("sequential", "pipelined")
PLACEMENTS = ("one-cpu", "split")
PATCH_FIRST = (
    "import runpy, sys; from gevent import monkey; monkey.patch_all(); "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)
"""How gevent processes start: monkey-patched before anything imports ssl or socket."""


@dataclass(frozen=True)
class Contender:
    """Two processes: `listener` starts first and prints its port; `connector` dials it."""

    key: str
    label: str
    driver_listens: bool  # ours: the mesh (driver) listens; an echo: the server (answerer)
    driver: str  # role names, see ROLES
    answerer: str
    runtime: str  # asyncio, uvloop, trio, gevent

    def roles(self) -> tuple[str, str]:
        """(listener role, connector role)."""
        return ((self.driver, self.answerer) if self.driver_listens
                else (self.answerer, self.driver))


CONTENDERS = (
    Contender("asyncio", "ours, asyncio", True, "ours-mesh:asyncio", "ours-agent:asyncio",
              "asyncio"),
    Contender("anyio", "ours, anyio on asyncio", True, "ours-mesh:anyio", "ours-agent:anyio",
              "asyncio"),
    Contender("asyncio-uvloop", "ours, asyncio on uvloop", True, "ours-mesh:asyncio",
              "ours-agent:asyncio", "uvloop"),
    Contender("anyio-uvloop", "ours, anyio on uvloop", True, "ours-mesh:anyio",
              "ours-agent:anyio", "uvloop"),
    Contender("anyio-trio", "ours, anyio on trio", True, "ours-mesh:anyio", "ours-agent:anyio",
              "trio"),
    Contender("gevent", "ours, gevent", True, "ours-mesh:gevent", "ours-agent:gevent", "gevent"),
    Contender("websockets", "websockets echo (asyncio)", False, "ws-client", "ws-server",
              "asyncio"),
    Contender("websockets-uvloop", "websockets echo (uvloop)", False, "ws-client", "ws-server",
              "uvloop"),
    Contender("trio-websocket", "trio-websocket echo (trio)", False, "trio-ws-client",
              "trio-ws-server", "trio"),
    Contender("websockets-gevent", "websockets sync echo (gevent)", False, "ws-sync-client",
              "ws-sync-server", "gevent"),
)
BY_KEY = {c.key: c for c in CONTENDERS}

COMPARISONS = (
    ("asyncio", "websockets"),
    ("anyio", "websockets"),
    ("asyncio-uvloop", "websockets-uvloop"),
    ("anyio-uvloop", "websockets-uvloop"),
    ("anyio-trio", "trio-websocket"),
    ("anyio-trio", "websockets"),
    ("gevent", "websockets-gevent"),
    ("gevent", "websockets"),
)
"""(ours, echo): the rows of the main table."""
UVLOOP_GAINS = (("asyncio-uvloop", "asyncio"), ("anyio-uvloop", "anyio"),
                ("websockets-uvloop", "websockets"))


# === the child processes ===================================================================


def emit(document: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(document) + "\n")
    sys.stdout.flush()


class Timer:
    """Times batches for the driver: `one` is one round trip; `spawn_all` runs callers."""

    @staticmethod
    def split(count: int) -> list[int]:
        share, extra = divmod(count, IN_FLIGHT)
        return [share + (i < extra) for i in range(IN_FLIGHT)]


def child_main(args: argparse.Namespace) -> None:
    """A driver or an answerer: `--role NAME --runtime R [--port P --ca-pem PEM]`."""
    role, _, adapter = args.role.partition(":")
    runtime = args.runtime
    if runtime == "gevent":
        gevent_child(role, adapter, args)
    elif role in ("trio-ws-client", "trio-ws-server"):
        import trio

        trio.run(trio_ws_child, role, args)
    elif runtime == "trio":
        import anyio

        anyio.run(async_child, role, adapter, args, backend="trio")
    else:
        import asyncio

        if runtime == "uvloop":
            import uvloop

            uvloop.run(async_child(role, adapter, args))
        else:
            asyncio.run(async_child(role, adapter, args))


async def read_line_async() -> str:
    """One line of stdin from a worker thread, so the loop keeps serving meanwhile."""
    import anyio.to_thread

    return await anyio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)


async def gather_async(one: Callable[[], Any], count: int) -> None:
    import sniffio

    async def caller(n: int) -> None:
        for _ in range(n):
            await one()

    if sniffio.current_async_library() == "asyncio":
        import asyncio

        await asyncio.gather(*(caller(n) for n in Timer.split(count)))
    else:
        import anyio

        async with anyio.create_task_group() as group:
            for n in Timer.split(count):
                group.start_soon(caller, n)


async def command_loop_async(one: Callable[[], Any]) -> None:
    """Answer the orchestrator: `MODE COUNT` -> seconds; an empty line (EOF) ends."""
    while line := (await read_line_async()).strip():
        mode, count = line.split()
        gc.collect()
        started = time.perf_counter()
        if mode == "sequential":
            for _ in range(int(count)):
                await one()
        else:
            await gather_async(one, int(count))
        emit({"seconds": time.perf_counter() - started})


async def async_child(role: str, adapter: str, args: argparse.Namespace) -> None:
    import importlib

    from bench_loopback import ARGUMENTS, INSTANCE, Tls, agent_options, mesh_options

    if role == "ours-mesh":
        module = importlib.import_module(f"svantic_adapters.{adapter}")
        tls = Tls.make(True)
        server = module.MeshServer(**mesh_options(tls))
        _, port = await server.start("127.0.0.1", 0)
        emit({"port": port, "ca_pem": tls.ca_pem})
        await server.wait_for_agent(INSTANCE, timeout=60)

        async def one() -> Any:
            return await server.dispatch(INSTANCE, "echo", ARGUMENTS)

        await one()
        emit({"ready": True})
        try:
            await command_loop_async(one)
        finally:
            await server.close(0)
    elif role == "ours-agent":
        module = importlib.import_module(f"svantic_adapters.{adapter}")
        tls = Tls.client_only(args.ca_pem)
        agent = module.connect(f"wss://127.0.0.1:{args.port}/agents/connect",
                               **agent_options(tls, INSTANCE))

        async def echo(arguments: Any, context: Any) -> Any:
            return arguments

        agent.add("echo", (lambda arguments, context: arguments) if args.plain_handler
                  else echo)
        async with agent:
            emit({"ready": True})
            await read_line_async()
    elif role == "ws-server":
        from bench_loopback import recorded_texts
        from websockets.asyncio.server import serve

        result_text = recorded_texts()[1]

        async def handler(websocket: Any) -> None:
            async for _message in websocket:
                await websocket.send(result_text)

        tls = Tls.make(True)
        async with serve(handler, "127.0.0.1", 0, ssl=tls.server, compression=None,
                         ping_interval=None) as server:
            emit({"port": server.sockets[0].getsockname()[1], "ca_pem": tls.ca_pem})
            await read_line_async()
    elif role == "ws-client":
        import asyncio
        import collections

        from bench_loopback import recorded_texts
        from websockets.asyncio.client import connect

        dispatch_text = recorded_texts()[0]
        tls = Tls.client_only(args.ca_pem)
        answers: collections.deque[asyncio.Future[Any]] = collections.deque()
        async with connect(f"wss://127.0.0.1:{args.port}", ssl=tls.client, compression=None,
                           ping_interval=None, proxy=None) as client:

            async def read() -> None:
                async for message in client:
                    answers.popleft().set_result(message)

            reader = asyncio.create_task(read())

            async def one_ws() -> Any:
                future = asyncio.get_running_loop().create_future()
                answers.append(future)
                await client.send(dispatch_text)
                return await future

            await one_ws()
            emit({"ready": True})
            await command_loop_async(one_ws)
            reader.cancel()
    else:
        raise SystemExit(f"unknown role {role}")


async def trio_ws_child(role: str, args: argparse.Namespace) -> None:
    """trio-websocket's server and client (its own nursery-based API, no anyio)."""
    import collections

    import trio
    from bench_loopback import Tls, recorded_texts
    from trio_websocket import (
        ConnectionClosed,
        connect_websocket,
        serve_websocket,
    )

    dispatch_text, result_text = recorded_texts()
    async with trio.open_nursery() as nursery:
        if role == "trio-ws-server":
            tls = Tls.make(True)

            async def handler(request: Any) -> None:
                websocket = await request.accept()
                with contextlib.suppress(ConnectionClosed):
                    while True:
                        await websocket.get_message()
                        await websocket.send_message(result_text)

            server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, tls.server)
            emit({"port": server.port, "ca_pem": tls.ca_pem})
            await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
        else:
            context = Tls.client_only(args.ca_pem).client
            if context is None:
                raise SystemExit("trio-websocket's echo runs with TLS only")
            websocket = await connect_websocket(nursery, "127.0.0.1", args.port, "/",
                                                use_ssl=context)
            answers: collections.deque[Any] = collections.deque()

            async def read() -> None:
                with contextlib.suppress(ConnectionClosed):
                    while True:
                        message = await websocket.get_message()
                        waiter = answers.popleft()
                        waiter[1] = message
                        waiter[0].set()

            nursery.start_soon(read)

            async def one() -> Any:
                done = trio.Event()
                waiter: list[Any] = [done, None]
                answers.append(waiter)
                await websocket.send_message(dispatch_text)
                await done.wait()
                return waiter[1]

            await one()
            emit({"ready": True})
            await command_loop_async(one)
            await websocket.aclose()
        nursery.cancel_scope.cancel()


def gevent_child(role: str, adapter: str, args: argparse.Namespace) -> None:
    """The gevent roles, in a monkey-patched process (see PATCH_FIRST)."""
    import collections

    import gevent
    import gevent.event
    from bench_loopback import ARGUMENTS, INSTANCE, Tls, agent_options, mesh_options
    from gevent.fileobject import FileObjectPosix

    commands = FileObjectPosix(sys.stdin.fileno(), "rb", close=False)

    def read_line() -> str:
        return str(commands.readline().decode())

    def command_loop(one: Callable[[], Any]) -> None:
        def caller(n: int) -> None:
            for _ in range(n):
                one()

        while line := read_line().strip():
            mode, count = line.split()
            gc.collect()
            started = time.perf_counter()
            if mode == "sequential":
                caller(int(count))
            else:
                gevent.joinall([gevent.spawn(caller, n) for n in Timer.split(int(count))],
                               raise_error=True)
            emit({"seconds": time.perf_counter() - started})

    if role == "ours-mesh":
        import svantic_adapters.gevent as module

        tls = Tls.make(True)
        server = module.MeshServer(**mesh_options(tls))
        _, port = server.start("127.0.0.1", 0)
        emit({"port": port, "ca_pem": tls.ca_pem})
        server.wait_for_agent(INSTANCE, timeout=60)

        def one() -> Any:
            return server.dispatch(INSTANCE, "echo", ARGUMENTS)

        one()
        emit({"ready": True})
        try:
            command_loop(one)
        finally:
            server.close(grace=0)
    elif role == "ours-agent":
        import svantic_adapters.gevent as module

        tls = Tls.client_only(args.ca_pem)
        agent = module.connect(f"wss://127.0.0.1:{args.port}/agents/connect",
                               **agent_options(tls, INSTANCE))
        agent.add("echo", lambda arguments, context: arguments)
        agent.start().wait_ready(60)
        emit({"ready": True})
        read_line()
        agent.stop(grace=0)
    elif role == "ws-sync-server":
        from bench_loopback import recorded_texts
        from websockets.sync.server import serve

        result_text = recorded_texts()[1]

        def handler(websocket: Any) -> None:
            for _message in websocket:
                websocket.send(result_text)

        tls = Tls.make(True)
        server = serve(handler, "127.0.0.1", 0, ssl=tls.server, compression=None,
                       ping_interval=None)
        gevent.spawn(server.serve_forever)
        emit({"port": server.socket.getsockname()[1], "ca_pem": tls.ca_pem})
        read_line()
        server.shutdown()
    elif role == "ws-sync-client":
        from bench_loopback import recorded_texts
        from websockets.sync.client import connect

        dispatch_text = recorded_texts()[0]
        tls = Tls.client_only(args.ca_pem)
        answers: collections.deque[Any] = collections.deque()
        with connect(f"wss://127.0.0.1:{args.port}", ssl=tls.client, compression=None,
                     ping_interval=None, proxy=None) as client:

            def read() -> None:
                for message in client:
                    answers.popleft().set(message)

            reader = gevent.spawn(read)

            def one_ws() -> Any:
                answer = gevent.event.AsyncResult()
                answers.append(answer)
                client.send(dispatch_text)
                return answer.get()

            one_ws()
            emit({"ready": True})
            command_loop(one_ws)
        reader.kill()
    else:
        raise SystemExit(f"unknown role {role}")


# === the orchestrator ======================================================================


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of `pid` (a thread pool's too) onto `cpus`."""
    with contextlib.suppress(FileNotFoundError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(ProcessLookupError, OSError):
                os.sched_setaffinity(int(tid), cpus)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, every thread, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Child:
    """One process of a pair, spoken to in JSON lines over its stdin and stdout."""

    def __init__(self, contender: Contender, role: str, cpu: int,
                 extra: Sequence[str] = ()) -> None:
        command = [sys.executable, *(["-c", PATCH_FIRST] if contender.runtime == "gevent"
                                     else []),
                   str(Path(__file__).resolve()), "--role", role, "--runtime", contender.runtime,
                   *extra]
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        pin(self.process.pid, {cpu})  # before it has imported anything: pinned from the start

    @property
    def pid(self) -> int:
        return self.process.pid

    def read(self, timeout: float = 120.0) -> dict[str, Any]:
        """The next JSON line; fails when the child ends or stays silent."""
        import selectors

        stdout = self.process.stdout
        assert stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(stdout, selectors.EVENT_READ)
            if not selector.select(timeout):
                raise TimeoutError(f"no answer from child {self.pid} in {timeout} s")
        line = stdout.readline()
        if not line:
            raise RuntimeError(f"child {self.pid} ended (exit {self.process.wait(10)})")
        document: dict[str, Any] = json.loads(line)
        return document

    def send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self.process.stdin is not None:
                self.process.stdin.close()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


class Pair:
    """A contender's two processes, set up and ready to time batches."""

    def __init__(self, contender: Contender, cpus: list[int],
                 answer_args: Sequence[str] = ()) -> None:
        self.contender = contender
        listen_role, connect_role = contender.roles()
        listener = Child(contender, listen_role, cpus[0])
        self.children = [listener]
        try:
            hello = listener.read()
            connector = Child(contender, connect_role, cpus[0],
                              ["--port", str(hello["port"]), "--ca-pem", hello["ca_pem"],
                               *(answer_args if contender.driver_listens else ())])
            self.children.append(connector)
            self.driver, self.answerer = ((listener, connector) if contender.driver_listens
                                          else (connector, listener))
            if contender.driver_listens:
                self.answerer.read()  # the agent: ready once welcomed
            while "ready" not in self.driver.read():  # the mesh: once the agent is in
                pass
        except BaseException:
            self.close()
            raise

    def place(self, placement: str, cpus: list[int]) -> None:
        pin(self.driver.pid, {cpus[0]})
        pin(self.answerer.pid, {cpus[0] if placement == "one-cpu" else cpus[-1]})

    def time(self, mode: str, count: int) -> tuple[float, float, float]:
        """Seconds for `count` round trips, and each side's CPU seconds meanwhile."""
        driver0, answerer0 = cpu_seconds(self.driver.pid), cpu_seconds(self.answerer.pid)
        self.driver.send(f"{mode} {count}")
        seconds = float(self.driver.read(timeout=300)["seconds"])
        return (seconds, cpu_seconds(self.driver.pid) - driver0,
                cpu_seconds(self.answerer.pid) - answerer0)

    def close(self) -> None:
        for child in reversed(self.children):
            child.close()


@dataclass
class Batch:
    seconds: float
    driver_cpu: float
    answerer_cpu: float


def measure(contenders: Sequence[Contender], placements: Sequence[str], counts: dict[str, int],
            *, repeats: int, seed: int, log: Callable[[str], None],
            answer_args: Sequence[str] = ()) -> tuple[
                dict[tuple[str, str, str], list[Batch]], dict[str, str]]:
    """Every (contender, placement, mode) once per repeat, shuffled; failures by contender."""
    cpus = sorted(os.sched_getaffinity(0))
    pairs: dict[str, Pair] = {}
    failures: dict[str, str] = {}
    results: dict[tuple[str, str, str], list[Batch]] = {}
    try:
        for contender in contenders:
            try:
                pairs[contender.key] = Pair(contender, cpus, answer_args)
            except Exception as exc:
                failures[contender.key] = f"{type(exc).__name__}: {exc}"
                log(f"{contender.key}: setup failed: {failures[contender.key]}")
        order = [(key, placement, mode) for key in pairs for placement in placements
                 for mode in MODES]
        for key, placement, mode in order:  # warm-up, not recorded
            pairs[key].place(placement, cpus)
            pairs[key].time(mode, max(IN_FLIGHT, counts[mode] // 10))
        rng = random.Random(seed)
        blocks = [(placement, mode) for placement in placements for mode in MODES]
        for repeat in range(repeats):
            # Contenders compared run close together in time: each (placement, mode) is
            # a block running every contender in a shuffled order, the blocks shuffled too.
            rng.shuffle(blocks)
            order = []
            for placement, mode in blocks:
                keys = list(pairs)
                rng.shuffle(keys)
                order += [(key, placement, mode) for key in keys]
            for key, placement, mode in order:
                if key in failures:
                    continue
                pair = pairs[key]
                pair.place(placement, cpus)
                try:
                    batch = Batch(*pair.time(mode, counts[mode]))
                except (TimeoutError, RuntimeError) as exc:
                    failures[key] = f"{type(exc).__name__}: {exc}"
                    log(f"{key}: failed: {failures[key]}")
                    continue
                results.setdefault((key, placement, mode), []).append(batch)
            log(f"repeat {repeat + 1}/{repeats} done")
    finally:
        for pair in pairs.values():
            pair.close()
    return results, failures


def spread(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def ratio_spread(results: dict[tuple[str, str, str], list[Batch]], ours: str, base: str,
                 placement: str, mode: str) -> dict[str, float] | None:
    """ours / base round trips per second (base seconds / ours seconds), per repeat."""
    a, b = results.get((ours, placement, mode)), results.get((base, placement, mode))
    if not a or not b:
        return None
    return spread([y.seconds / x.seconds for x, y in zip(a, b, strict=False)])


def fmt(cell: dict[str, float] | None, digits: int = 2, suffix: str = "x") -> str:
    if not cell:
        return "-"
    return (f"{cell['median']:.{digits}f}{suffix} ({cell['min']:.{digits}f}-"
            f"{cell['max']:.{digits}f})")


def report(results: dict[tuple[str, str, str], list[Batch]], failures: dict[str, str], *,
           placements: Sequence[str], counts: dict[str, int], repeats: int, quick: bool,
           out: Callable[[str], None], plain_handler: bool = False) -> dict[str, Any]:
    """Markdown tables on `out`; the same figures as a document for --json."""
    from bench_loopback import recorded_texts

    sizes = [len(t.encode()) for t in recorded_texts()]
    handler = "plain functions" if plain_handler else "`async def` (gevent: a plain function)"
    out(f"Dispatch frame {sizes[0]} bytes, result {sizes[1]} bytes, TLS, HS256 dispatch auth, "
        f"our echo handlers {handler}; "
        f"{repeats} repeats of {counts['sequential']:,} sequential and "
        f"{counts['pipelined']:,} pipelined ({IN_FLIGHT} in flight) round trips; median "
        f"(min-max) over repeats{' (quick: figures not meaningful)' if quick else ''}.")
    out("")
    for key, why in failures.items():
        out(f"- {BY_KEY[key].label}: failed: {why}")
    if failures:
        out("")
    rate: dict[str, Any] = {}
    for (key, placement, mode), batches in results.items():
        rate.setdefault(key, {}).setdefault(placement, {})[mode] = {
            "rt_per_s": spread([counts[mode] / b.seconds for b in batches]),
            "driver_cpu_us": spread([1e6 * b.driver_cpu / counts[mode] for b in batches]),
            "answerer_cpu_us": spread([1e6 * b.answerer_cpu / counts[mode] for b in batches]),
        }
    out("### Ours / echo, round trips per second")
    out("")
    out("| ours | echo | placement | sequential | pipelined | >= 1.0x |")
    out("|---|---|---|---:|---:|---|")
    comparisons: list[dict[str, Any]] = []
    for ours, base in COMPARISONS:
        for placement in placements:
            cells = {mode: ratio_spread(results, ours, base, placement, mode) for mode in MODES}
            if not any(cells.values()):
                continue
            met = all(c is not None and c["median"] >= 1.0 for c in cells.values())
            comparisons.append({"ours": ours, "echo": base, "placement": placement, **cells})
            out(f"| {BY_KEY[ours].label} | {BY_KEY[base].label} | {placement} | "
                f"{fmt(cells['sequential'])} | {fmt(cells['pipelined'])} | "
                f"{'yes' if met else '**no**'} |")
    out("")
    gains: list[dict[str, Any]] = []
    rows = []
    for fast, stock in UVLOOP_GAINS:
        for placement in placements:
            cells = {mode: ratio_spread(results, fast, stock, placement, mode) for mode in MODES}
            if any(cells.values()):
                gains.append({"uvloop": fast, "stock": stock, "placement": placement, **cells})
                rows.append(f"| {BY_KEY[stock].label} | {placement} | "
                            f"{fmt(cells['sequential'])} | {fmt(cells['pipelined'])} |")
    if rows:
        out("### What uvloop gives (uvloop / stock loop, round trips per second)")
        out("")
        out("| candidate | placement | sequential | pipelined |")
        out("|---|---|---:|---:|")
        for row in rows:
            out(row)
        out("")
    out("### Every contender: round trips per second, CPU µs per round trip on each side")
    out("")
    out("| contender | placement | mode | rt/s | driver CPU µs | answerer CPU µs |")
    out("|---|---|---|---:|---:|---:|")
    for key, by_placement in rate.items():
        for placement in placements:
            for mode in MODES:
                cell = by_placement.get(placement, {}).get(mode)
                if cell:
                    out(f"| {BY_KEY[key].label} | {placement} | {mode} | "
                        f"{cell['rt_per_s']['median']:,.0f} | "
                        f"{cell['driver_cpu_us']['median']:.0f} | "
                        f"{cell['answerer_cpu_us']['median']:.0f} |")
    out("")
    out("Ours drives from the mesh (`MeshServer.dispatch`) and answers in the agent; an echo "
        "drives from its client and answers in its server. CPU µs come from /proc in clock "
        "ticks (10 ms), so small batches read coarsely.")
    return {"sizes": sizes, "counts": counts, "repeats": repeats, "placements": list(placements),
            "plain_handler": plain_handler,
            "comparisons": comparisons, "uvloop_gains": gains, "contenders": rate,
            "labels": {c.key: c.label for c in CONTENDERS}, "failures": failures}


JSON_DATA: dict[str, Any] = {}
"""Raw figures for `--json PATH` (see `_jsonout.py`)."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: small counts")
    parser.add_argument("--contenders", default=",".join(BY_KEY),
                        help=f"comma-separated, of: {', '.join(BY_KEY)}")
    parser.add_argument("--placements", default=",".join(PLACEMENTS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sequential", type=int, default=1_000, help="round trips per batch")
    parser.add_argument("--pipelined", type=int, default=5_000, help="round trips per batch")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--plain-handler", action="store_true",
                        help="our agents' echo handler as a plain function, not `async def`")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="also write the figures to PATH as JSON")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--runtime", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ca-pem", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = min(args.repeats, 2)
        args.sequential = min(args.sequential, 100)
        args.pipelined = min(args.pipelined, 400)
    return args


def main(argv: Sequence[str] | None = None, out: Callable[[str], None] = print) -> int:
    args = parse_args(argv)
    if args.role:
        child_main(args)
        return 0
    keys = [k.strip() for k in args.contenders.split(",") if k.strip()]
    unknown = [k for k in keys if k not in BY_KEY]
    if unknown:
        raise SystemExit(f"unknown contenders: {', '.join(unknown)}")
    placements = [p for p in args.placements.split(",") if p in PLACEMENTS]
    if len(os.sched_getaffinity(0)) < 2 and "split" in placements:
        placements.remove("split")
        out("Only one CPU is allowed: the split placement is not measured.")
    counts = {"sequential": args.sequential, "pipelined": args.pipelined}
    results, failures = measure([BY_KEY[k] for k in keys], placements, counts,
                                repeats=args.repeats, seed=args.seed,
                                log=lambda line: print(line, file=sys.stderr, flush=True),
                                answer_args=["--plain-handler"] if args.plain_handler else [])
    JSON_DATA.update(report(results, failures, placements=placements, counts=counts,
                            repeats=args.repeats, quick=args.quick, out=out,
                            plain_handler=args.plain_handler))
    return 1 if failures else 0


if __name__ == "__main__":
    from _jsonout import run_main  # --json PATH: the same figures as JSON

    sys.exit(run_main(main))
