"""SDK dispatch overhead: what `svantic.Agent` adds per dispatch over calling the handler directly.

    python benchmarks/bench_sdk.py            # about 6 s; markdown tables on stdout
    python benchmarks/bench_sdk.py --quick    # a smoke run: figures not meaningful

What is timed, per dispatch, in one process, without sockets. The handler is the same
function in every row: `get_ticket(args, ctx)` returning a small dict, defined on a
`svantic.Agent` with a typical tool schema (4 properties: a string with a pattern, an enum,
an array of bounded strings, an integer with minimum and maximum; two required, no others),
and an `async def` twin of it on the same agent.

* **direct call**: `handler(arguments, None)` (`await handler(arguments, None)` in a running
  asyncio loop for the async one), with the decoded arguments dict of a real dispatch;
* **core only**: what an embedder of the bare core does on `DispatchReceived`: the handler,
  then `AgentConnection.send_result` (the dispatch_result frame built, encoded, queued);
* **SDK**: the real `AgentRuntime` that the adapters drive, holding the agent's
  `CapabilityRegistry`: `events_received()` turns each `DispatchReceived` into a
  `StartHandler` (`CapabilityRegistry.resolve`: lookup and jsonschema-rs validation; the
  core's `DispatchContext`), the driver calls `start.handler` (the SDK's wrapper builds the
  `svantic.Context` and calls the user's function), then `handler_returned` turns the result
  into the dispatch_result frame (`send_result`, as above).

The runtime runs on the mesh side of a core `svantic_proto.testing.Pair` (fake clock, dispatch
auth on): the runtime's own `AgentConnection` stands in for the Pair's agent, which is left
unconnected, and the bytes are pumped by hand. Dispatches arrive in batches of 100: the mesh
sends them and the agent's connection parses and verifies them outside the timing, so the
`DispatchReceived` events are waiting; the timing covers what happens from there to the
result frames in the connection's output; the mesh then reads every result (outside the
timing) and each must be the handler's. The fake clock stands still, so no timer fires.

Also timed alone: validation (`argument_error`, and jsonschema-rs `is_valid` inside it),
`CapabilityRegistry.resolve`, building the `DispatchContext` as the runtime does, and the
`svantic.Context` around it. For scale, not in the ratios: a plain (non-async) SDK handler is
marked `blocking`, so the asyncio and anyio adapters run it in a worker thread; the cost of
that hop alone (`await loop.run_in_executor(None, handler, ...)`) is printed too.

The garbage collector stays on (a real agent runs with it): what the SDK leaves to it is part
of its cost, and the number of objects each dispatch leaves to the cycle collector is printed.
The machine's speed drifts, so each repeat times every candidate back to back in a shuffled
order, ratios are taken within a repeat, and medians over the repeats are reported.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.metadata
import os
import platform
import random
import statistics
import sys
import time
import timeit
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import svantic  # noqa: E402

from svantic_proto import COMPILED  # noqa: E402
from svantic_proto.agent_runtime import AgentRuntime, Dial, StartHandler  # noqa: E402
from svantic_proto.capabilities import DispatchContext, argument_error  # noqa: E402
from svantic_proto.config import Config  # noqa: E402
from svantic_proto.events import (  # noqa: E402
    DispatchCompleted,
    DispatchFailed,
    DispatchReceived,
    Event,
    UpgradeRequest,
)
from svantic_proto.frames import SessionContext  # noqa: E402
from svantic_proto.testing import Pair  # noqa: E402

SYNC, ASYNC = "get_ticket", "get_ticket_async"
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "ticket_id": {"type": "string", "pattern": "^[A-Z]{2,5}-[0-9]{1,6}$"},
        "priority": {"type": "string", "enum": ["low", "normal", "high", "urgent"]},
        "labels": {"type": "array", "items": {"type": "string", "maxLength": 32},
                   "maxItems": 10},
        "max_comments": {"type": "integer", "minimum": 0, "maximum": 100},
    },
    "required": ["ticket_id", "priority"],
    "additionalProperties": False,
}
ARGUMENTS: dict[str, Any] = {
    "ticket_id": "SUP-4821", "priority": "high", "labels": ["billing", "eu"], "max_comments": 20,
}
RESULT: dict[str, Any] = {"ticket_id": "SUP-4821", "status": "open", "priority": "high"}
TASK_ID = "t-9"
SESSION_CONTEXT = SessionContext(
    session_id="s-1",
    tenant_id="tenant_abc",
    propagation_headers={
        "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "baggage": "k=v",
    },
)
DEADLINE_MS = 30_000
BATCH = 100
"""Dispatches waiting as `DispatchReceived` events when a timed section starts."""
URL = "wss://mesh.test/agents/connect"


def get_ticket(args: Mapping[str, Any], ctx: Any) -> dict[str, Any]:
    return {"ticket_id": args["ticket_id"], "status": "open", "priority": args["priority"]}


async def get_ticket_async(args: Mapping[str, Any], ctx: Any) -> dict[str, Any]:
    return {"ticket_id": args["ticket_id"], "status": "open", "priority": args["priority"]}


def make_agent() -> svantic.Agent:
    agent = svantic.Agent("tickets", "Ticket system (benchmark)")
    agent.capability(SYNC, parameters=SCHEMA)(get_ticket)
    agent.capability(ASYNC, parameters=SCHEMA)(get_ticket_async)
    return agent


def bench_config() -> Config:
    """Defaults, except the inbound rate limit, which a benchmark exceeds by design."""
    return Config(max_frames_per_second=1e9, frame_burst=10**9)


def build_name() -> str:
    from svantic_proto import codec
    from svantic_proto._compiled import PURE_PYTHON_ENV

    speedups = "with" if hasattr(codec, "_speedups") else "without"
    if COMPILED:
        return f"compiled core (mypyc), {speedups} _speedups"
    forced = os.environ.get(PURE_PYTHON_ENV, "") not in ("", "0")
    return (f"pure Python (the sources{f', {PURE_PYTHON_ENV}=1' if forced else ''}), "
            f"{speedups} _speedups")


class Rig:
    """The real `AgentRuntime` with the agent's registry, connected to a `Pair`'s mesh."""

    def __init__(self, agent: svantic.Agent) -> None:
        self.agent = agent
        pair = self.pair = Pair(bench_config(), dispatch_auth=True)
        self.mesh, self.clock = pair.mesh, pair.clock
        runtime = self.runtime = AgentRuntime(
            URL, token="transport-token", instance_id=pair.instance_id,
            dispatch_auth=pair.verifier, agent_type=pair.agent_type, config=pair.config,
            session=pair.session, capabilities=agent.registry, wall_clock=pair.clock.wall,
        )
        runtime.start(self.clock.now)
        dials = [a for a in runtime.events_received() if type(a) is Dial]
        if not runtime.transport_open(dials[0].attempt, self.clock.now):
            raise RuntimeError("the runtime did not take its transport")
        self.mesh_events: list[Event] = []
        self.pump()
        runtime.events_received()  # SessionStarted
        conn = runtime.conn
        if conn is None or not conn.ready or not self.mesh.accepting_dispatches:
            raise RuntimeError("the runtime and the mesh did not connect")
        self.conn = conn
        self.mesh_events.clear()  # the mesh's SessionStarted and first heartbeat

    def pump(self) -> None:
        """Move bytes both ways until neither side has any; the runtime's events stay queued."""
        runtime, mesh, now = self.runtime, self.mesh, self.clock.now
        for _ in range(1000):
            moved = False
            for chunk in runtime.data_to_send():
                moved = True
                if chunk:
                    mesh.receive_data(chunk, now)
                else:
                    mesh.receive_eof(now)
            for chunk in mesh.data_to_send():
                moved = True
                if chunk:
                    runtime.receive_data(chunk, now)
                else:
                    runtime.receive_eof(now)
            for event in mesh.events_received():
                if isinstance(event, UpgradeRequest):
                    mesh.accept(instance_id=event.request.instance_id,
                                tenant_id=self.pair.tenant_id, agent_type=self.pair.agent_type,
                                now=now)
                else:
                    self.mesh_events.append(event)
            if not moved:
                return
        raise RuntimeError("pump did not settle")

    def send(self, capability: str, n: int, arguments: dict[str, Any] = ARGUMENTS) -> None:
        """`n` dispatches, parsed and verified by the agent's connection: events waiting."""
        mesh, runtime, now = self.mesh, self.runtime, self.clock.now
        for _ in range(n):
            mesh.send_dispatch(capability, arguments, deadline_ms=DEADLINE_MS, now=now,
                               task_id=TASK_ID, session_context=SESSION_CONTEXT)
        for chunk in mesh.data_to_send():
            runtime.receive_data(chunk, now)

    def finish(self, n: int, expected: Any = RESULT) -> list[Event]:
        """Deliver the answers; each of the `n` must be a `DispatchCompleted` with `expected`
        (pass None to get the mesh's dispatch outcomes unchecked)."""
        self.runtime.next_deadline()
        self.pump()
        self.mesh.next_deadline()
        events, self.mesh_events = self.mesh_events, []
        outcomes = [e for e in events if hasattr(e, "dispatch_id")]  # not heartbeats
        if expected is not None:
            done = [e for e in outcomes if type(e) is DispatchCompleted and e.result == expected]
            if len(done) != n or len(outcomes) != n:
                raise RuntimeError(f"{n} dispatches, {len(done)} completed as expected: "
                                   f"{outcomes[:3]}")
        return outcomes

    def one_event(self) -> DispatchReceived:
        """A real `DispatchReceived` (answered at once, so nothing is left running)."""
        self.send(SYNC, 1)
        received = self.conn.events_received()
        event = received[0]
        if len(received) != 1 or type(event) is not DispatchReceived:
            raise RuntimeError(f"expected one DispatchReceived, got {received}")
        self.conn.send_result(event.dispatch_id, RESULT)
        self.finish(1)
        return event


Timed = Callable[[int], float]
"""Runs `n` operations (dispatches, or calls); returns the seconds spent in the timed part."""


def rig_candidates(rig: Rig, loop: asyncio.AbstractEventLoop) -> dict[str, Timed]:
    runtime, conn = rig.runtime, rig.conn
    args = dict(rig.one_event().arguments)  # what a handler gets: the decoded arguments

    def batches(n: int, capability: str, section: Callable[[], float]) -> float:
        elapsed = 0.0
        while n > 0:
            size = min(n, BATCH)
            rig.send(capability, size)
            elapsed += section()
            rig.finish(size)
            n -= size
        return elapsed

    def direct(n: int) -> float:
        handler, perf = get_ticket, time.perf_counter
        start = perf()
        for _ in range(n):
            handler(args, None)
        return perf() - start

    def core_section() -> float:
        handler, send_result, perf = get_ticket, conn.send_result, time.perf_counter
        start = perf()
        for event in conn.events_received():
            if type(event) is DispatchReceived:  # as the SDK path tells its actions apart
                send_result(event.dispatch_id, handler(event.arguments, None))
        return perf() - start

    def sdk_section() -> float:
        returned, perf = runtime.handler_returned, time.perf_counter
        start = perf()
        for action in runtime.events_received():
            if type(action) is StartHandler:  # as a driver's `_act` tells its actions apart
                returned(action.dispatch_id, action.handler(action.arguments, action.context))
        return perf() - start

    def run(coroutine: Coroutine[Any, Any, float]) -> float:
        return loop.run_until_complete(coroutine)

    async def direct_async(n: int) -> float:
        handler, perf = get_ticket_async, time.perf_counter
        start = perf()
        for _ in range(n):
            await handler(args, None)
        return perf() - start

    async def core_async_section() -> float:
        handler, send_result, perf = get_ticket_async, conn.send_result, time.perf_counter
        start = perf()
        for event in conn.events_received():
            if type(event) is DispatchReceived:
                send_result(event.dispatch_id, await handler(event.arguments, None))
        return perf() - start

    async def sdk_async_section() -> float:
        returned, perf = runtime.handler_returned, time.perf_counter
        start = perf()
        for action in runtime.events_received():
            if type(action) is StartHandler:
                returned(action.dispatch_id,
                         await action.handler(action.arguments, action.context))
        return perf() - start

    async def thread_hop(n: int) -> float:
        handler, perf, executor = get_ticket, time.perf_counter, loop.run_in_executor
        start = perf()
        for _ in range(n):
            await executor(None, handler, args, None)
        return perf() - start

    return {
        "direct sync": direct,
        "core sync": lambda n: batches(n, SYNC, core_section),
        "sdk sync": lambda n: batches(n, SYNC, sdk_section),
        "direct async": lambda n: run(direct_async(n)),
        "core async": lambda n: batches(n, ASYNC, lambda: run(core_async_section())),
        "sdk async": lambda n: batches(n, ASYNC, lambda: run(sdk_async_section())),
        "thread hop": lambda n: run(thread_hop(n)),
    }


def step_candidates(rig: Rig) -> dict[str, Timed]:
    """The SDK path's steps, each alone, on a real `DispatchReceived` of the sync capability."""
    event = rig.one_event()
    agent, registry = rig.agent, rig.agent.registry
    validator = registry.capabilities[SYNC].validator
    arguments = event.arguments
    copied = dict(arguments)
    resolve = registry.resolve
    tool_caller = rig.runtime.tool_caller

    def dispatch_context() -> DispatchContext:
        dispatch_id = event.dispatch_id
        return DispatchContext(  # as AgentRuntime._start_handler builds it
            dispatch_id=dispatch_id, capability=event.capability, attempt=event.attempt,
            deadline_ms=event.deadline_ms, task_id=event.task_id,
            session_context=event.session_context,
            send_chunk=lambda data: (dispatch_id, data), tool_caller=tool_caller,
        )

    core_context = dispatch_context()
    steps: dict[str, Callable[[], object]] = {
        "argument_error": lambda: argument_error(validator, arguments),
        "is_valid": lambda: validator.is_valid(copied),
        "resolve": lambda: resolve(event),
        "DispatchContext": dispatch_context,
        "Context": lambda: svantic.Context(core_context, agent),
        "both contexts": lambda: svantic.Context(dispatch_context(), agent),
    }

    def timed(function: Callable[[], object]) -> Timed:
        return lambda n: timeit.Timer(function).timeit(number=n)

    return {name: timed(function) for name, function in steps.items()}


def check(rig: Rig, loop: asyncio.AbstractEventLoop) -> dict[str, float]:
    """Fail loudly unless the SDK path really validates, builds a `svantic.Context` and
    answers; returns the objects each path leaves to the cycle collector, per dispatch."""
    seen: list[Any] = []
    original = rig.agent.handler(SYNC)

    def probe(args: Mapping[str, Any], ctx: Any) -> Any:
        seen.append(ctx)
        return original(args, ctx)

    rig.agent.define_capability(SYNC, None, SCHEMA, probe)
    try:
        rig.send(SYNC, 1)
        for action in rig.runtime.events_received():
            assert type(action) is StartHandler
            rig.runtime.handler_returned(action.dispatch_id,
                                         action.handler(action.arguments, action.context))
        rig.finish(1)
    finally:
        rig.agent.define_capability(SYNC, None, SCHEMA, original)
    if len(seen) != 1 or type(seen[0]) is not svantic.Context or seen[0].task_id != TASK_ID:
        raise RuntimeError(f"the handler did not get a svantic.Context: {seen}")
    rig.send(SYNC, 1, {**ARGUMENTS, "priority": "whenever"})
    if rig.runtime.events_received():
        raise RuntimeError("invalid arguments started a handler")
    failed = rig.finish(1, expected=None)
    if [(type(e), getattr(e, "code", None)) for e in failed] != [
            (DispatchFailed, "INVALID_ARGUMENTS")]:
        raise RuntimeError(f"invalid arguments were not refused: {failed}")
    garbage: dict[str, float] = {}
    candidates = rig_candidates(rig, loop)
    for name in ("core sync", "sdk sync", "core async", "sdk async"):
        candidates[name](BATCH)  # warm
        gc.collect()
        gc.disable()
        try:
            candidates[name](BATCH)
            garbage[name] = gc.collect() / BATCH
        finally:
            gc.enable()
    return garbage


def measure(repeats: int, dispatches: int, seconds: float, fixed_loops: int | None,
            seed: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """µs per operation for every candidate, `repeats` times, shuffled within each repeat."""
    loop = asyncio.new_event_loop()
    try:
        rig = Rig(make_agent())
        garbage = check(rig, loop)
        candidates = {**rig_candidates(rig, loop), **step_candidates(rig)}
        counts: dict[str, int] = {}
        for name, candidate in candidates.items():
            if name.startswith(("core", "sdk")):
                counts[name] = dispatches
                candidate(BATCH)  # warm
            elif fixed_loops is not None:
                counts[name] = fixed_loops
                candidate(fixed_loops)
            else:  # calibrate a loop count that takes about `seconds`
                number = 100
                while (elapsed := candidate(number)) < seconds / 10:
                    number *= 10
                counts[name] = max(1, int(number * seconds / elapsed))
        order = list(candidates)
        rng = random.Random(seed)
        samples: dict[str, list[float]] = {name: [] for name in candidates}
        for _ in range(repeats):
            rng.shuffle(order)
            for name in order:
                samples[name].append(candidates[name](counts[name]) / counts[name] * 1e6)
        return samples, garbage
    finally:
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


def paired(samples: dict[str, list[float]], function: Callable[..., float],
           *names: str) -> float:
    """The median over repeats of `function` applied to the named samples of one repeat."""
    return statistics.median(function(*values)
                             for values in zip(*(samples[n] for n in names), strict=True))


def report(samples: dict[str, list[float]], garbage: dict[str, float], repeats: int,
           dispatches: int, quick: bool) -> None:
    def med(name: str) -> float:
        return statistics.median(samples[name])

    def ratio(name: str, base: str) -> float:
        return paired(samples, lambda a, b: a / b, name, base)

    def minus(name: str, base: str) -> float:
        return paired(samples, lambda a, b: a - b, name, base)

    jsonschema_rs = importlib.metadata.version("jsonschema_rs")
    print("## SDK dispatch overhead\n")
    print(
        f"Python {platform.python_version()}, {build_name()}, jsonschema-rs {jsonschema_rs}; "
        f"{repeats} repeats of {dispatches} dispatches per path"
        f"{' (quick: figures not meaningful)' if quick else ''}; medians, ratios taken within "
        "a repeat. In process, no sockets: the real AgentRuntime on a Pair's mesh "
        "connection.\n"
    )
    print("| path | handler | µs per dispatch | x direct call |")
    print("|---|---|---:|---:|")
    labels = {
        "direct": "direct call: `{aw}handler(arguments, None)`",
        "core": "core only: {aw}handler + `AgentConnection.send_result`",
        "sdk": "SDK: `AgentRuntime` (resolve, validate, contexts, {aw}handler, "
               "`handler_returned`)",
    }
    for kind in ("sync", "async"):
        for prefix, label in labels.items():
            name = f"{prefix} {kind}"
            shown = label.format(aw="await " if kind == "async" else "")
            print(f"| {shown} | {kind} | {med(name):.2f} | "
                  f"{ratio(name, f'direct {kind}'):.1f}x |")

    sync_over = minus("sdk sync", "direct sync")
    async_over = minus("sdk async", "direct async")
    print(
        f"\nSDK / direct call: **{ratio('sdk sync', 'direct sync'):.1f}x** (sync handler), "
        f"**{ratio('sdk async', 'direct async'):.1f}x** (async handler); the SDK path costs "
        f"{sync_over:.2f} µs / {async_over:.2f} µs more per dispatch than the direct call, "
        f"{minus('sdk sync', 'core sync'):.2f} µs / {minus('sdk async', 'core async'):.2f} µs "
        "more than the core-only answer.\n"
    )

    print("Where the SDK path's time goes (sync handler; µs per dispatch, each step timed "
          "alone unless derived):\n")
    print("| step | µs | share of SDK - direct |")
    print("|---|---:|---:|")

    def share(value: float) -> str:
        return f"{value / sync_over:.0%}" if sync_over > 0 else "-"

    contexts = med("both contexts")
    resolve = med("resolve")
    frame = minus("core sync", "direct sync")
    rest = paired(samples, lambda s, c, r, b: s - c - r - b,
                  "sdk sync", "core sync", "resolve", "both contexts")
    steps = (
        ("validation alone: `argument_error` (dict copy + jsonschema-rs `is_valid`)",
         med("argument_error")),
        ("of which: jsonschema-rs `is_valid` alone", med("is_valid")),
        ("`CapabilityRegistry.resolve` (lookup + validation)", resolve),
        ("context construction alone: `DispatchContext` (as the runtime builds it)",
         med("DispatchContext")),
        ("context construction alone: `svantic.Context` around it", med("Context")),
        ("context construction alone: both", contexts),
        ("result frame: `send_result` (derived: core only - direct)", frame),
        ("the rest (derived: SDK - core only - resolve - contexts): runtime bookkeeping, "
         "`StartHandler`, the SDK's wrapper call, `handler_returned`", rest),
    )
    for label, value in steps:
        print(f"| {label} | {value:.2f} | {share(value)} |")
    print(f"| **SDK - direct call** | **{sync_over:.2f}** | 100% |")

    print("\nObjects left to the cycle collector per dispatch (garbage collector off for one "
          "batch, then `gc.collect()`): " + ", ".join(
              f"{name} {value:.1f}" for name, value in garbage.items()) + ".")
    print(
        f"\nFor scale, not in the ratios: a plain (non-async) SDK handler is `blocking`, so "
        f"the asyncio and anyio adapters run it in a worker thread; that hop alone "
        f"(`await loop.run_in_executor(None, handler, ...)`) costs {med('thread hop'):.1f} µs "
        f"per call, {ratio('thread hop', 'direct sync'):.0f}x the direct call. gevent runs "
        "it in a greenlet instead."
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny loop counts (smoke test)")
    parser.add_argument("--repeats", type=int, default=None, help="repeats (default 15; quick 2)")
    parser.add_argument("--dispatches", type=int, default=None,
                        help="dispatches per path per repeat (default 2000; quick 100)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the interleaving order")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="also write the figures to PATH as JSON")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 15)
    dispatches = args.dispatches or (BATCH if args.quick else 2000)
    samples, garbage = measure(repeats, dispatches, seconds=0.02,
                               fixed_loops=200 if args.quick else None, seed=args.seed)
    report(samples, garbage, repeats, dispatches, args.quick)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _jsonout import run_main  # --json PATH: the same figures as JSON

    sys.exit(run_main(main))
