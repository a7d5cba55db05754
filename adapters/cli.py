"""The `svantic` command: `svantic demo` runs a mesh and an agent over real TLS on 127.0.0.1."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from svantic_proto import (
    Config,
    DispatchAuthMinter,
    DispatchAuthVerifier,
    InstanceRecord,
    __version__,
    jwt_dispatch_auth,
)

INSTANCE = "demo-agent-1"
TENANT = "tenant-demo"
SIGNING_SECRET = "demo-signing-secret-change-me-0123456789"


@dataclass(frozen=True)
class DemoClaims:
    """What the demo's transport-token check yields (a real mesh verifies a JWT)."""

    tenant_id: str
    sub: str
    exp: float


@dataclass
class Report:
    lines: list[tuple[str, str, float]] = field(default_factory=list)

    def add(self, what: str, outcome: str, started: float) -> None:
        self.lines.append((what, outcome, (time.perf_counter() - started) * 1000))

    def print(self, out: Callable[[str], None]) -> None:
        width = max(len(w) for w, _, _ in self.lines)
        for what, outcome, ms in self.lines:
            out(f"  {what:<{width}}  {ms:8.1f} ms  {outcome}")


def _tls() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A throwaway CA and a certificate for 127.0.0.1, made on the fly."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


def _verify_token(token: str) -> DemoClaims | None:
    return DemoClaims(TENANT, "demo-client", time.time() + 3600) if token == "demo-token" else None


def _lookup(instance_id: str) -> InstanceRecord | None:
    if instance_id == INSTANCE:
        return InstanceRecord(INSTANCE, TENANT, "connected", "ticket-agent")
    return None


async def _demo_async(module: Any, out: Callable[[str], None]) -> int:
    server_tls, client_tls = _tls()
    config = Config(heartbeat_interval=5, ws_ping_interval=5, app_ping_interval=5)
    server = module.MeshServer(
        ssl_context=server_tls, verify_token=_verify_token, lookup_instance=_lookup,
        dispatch_auth=jwt_dispatch_auth(DispatchAuthMinter(SIGNING_SECRET)), config=config,
    )
    host, port = await server.start("127.0.0.1", 0)
    url = f"wss://{host}:{port}/agents/connect"
    out(f"mesh listening on {url} (TLS, throwaway CA)")
    agent = module.connect(
        url, token="demo-token", instance_id=INSTANCE, agent_type="ticket-agent",
        dispatch_auth=DispatchAuthVerifier(INSTANCE, hs256_keys=[SIGNING_SECRET]),
        ssl_context=client_tls, config=config,
    )
    release = asyncio.Event()
    slow_runs: list[int] = []

    @agent.capability("get_ticket", parameters={
        "type": "object", "required": ["ticket_id"],
        "properties": {"ticket_id": {"type": "string"}}})
    async def get_ticket(args: Any, ctx: Any) -> Any:
        return {"id": args["ticket_id"], "status": "open", "attempt": ctx.attempt}

    @agent.capability("summarize")
    async def summarize(args: Any, ctx: Any) -> Any:
        words = str(args.get("text", "")).split()
        for word in words:
            ctx.chunk(word)
        return {"words": len(words)}

    @agent.capability("explode")
    async def explode(args: Any, ctx: Any) -> Any:
        raise RuntimeError("the ticket system is down")

    @agent.capability("slow_report")
    async def slow_report(args: Any, ctx: Any) -> Any:
        slow_runs.append(ctx.attempt)
        await release.wait()
        return {"report": "ready"}

    report = Report()
    started = time.perf_counter()
    async with agent:
        report.add("agent connected (TLS + upgrade + hello/welcome)", "ready", started)
        for ticket in ("T-1", "T-2", "T-3"):
            t = time.perf_counter()
            result = await server.dispatch(INSTANCE, "get_ticket", {"ticket_id": ticket})
            report.add(f"dispatch get_ticket {ticket}", f"result {result}", t)
        t = time.perf_counter()
        chunks: list[Any] = []
        result = await server.dispatch(INSTANCE, "summarize", {"text": "sans io all the way down"},
                                       on_chunk=chunks.append)
        report.add("dispatch summarize (streamed)", f"chunks {chunks} then {result}", t)
        for capability, args in (("explode", {}), ("get_ticket", {"ticket_id": 7})):
            t = time.perf_counter()
            try:
                await server.dispatch(INSTANCE, capability, args)
                outcome = "unexpected success"
            except Exception as exc:
                outcome = f"error {exc}"
            report.add(f"dispatch {capability} (fails)", outcome, t)
        t = time.perf_counter()
        pending = asyncio.ensure_future(
            server.dispatch(INSTANCE, "slow_report", {}, deadline_ms=20_000))
        while not slow_runs:
            await asyncio.sleep(0.01)
        agent.link.abort()  # the agent's TCP connection breaks mid-dispatch
        out("cut the agent's TCP connection while slow_report runs...")
        release.set()
        result = await asyncio.wait_for(pending, 20)
        report.add("dispatch slow_report across a TCP cut", f"result {result} (resumed)", t)
        runs = len(slow_runs)
    await server.close(grace=1)
    out("")
    report.print(out)
    out("")
    out(f"slow_report handler ran {runs} time(s); result delivered once: "
        f"{'yes' if runs == 1 else 'NO'}")
    return 0 if runs == 1 else 1


def _demo_gevent(module: Any, out: Callable[[str], None]) -> int:
    """The same story with the blocking gevent API: plain functions, one greenlet each."""
    import gevent
    import gevent.event

    server_tls, client_tls = _tls()
    server = module.MeshServer(
        ssl_context=server_tls, verify_token=_verify_token, lookup_instance=_lookup,
        dispatch_auth=jwt_dispatch_auth(DispatchAuthMinter(SIGNING_SECRET)),
    )
    host, port = server.start("127.0.0.1", 0)
    out(f"mesh listening on wss://{host}:{port}/agents/connect (TLS, throwaway CA)")
    agent = module.connect(
        f"wss://{host}:{port}/agents/connect", token="demo-token", instance_id=INSTANCE,
        agent_type="ticket-agent", ssl_context=client_tls,
        dispatch_auth=DispatchAuthVerifier(INSTANCE, hs256_keys=[SIGNING_SECRET]),
    )
    release = gevent.event.Event()
    slow_runs: list[int] = []
    agent.add("get_ticket", lambda args, ctx: {"id": args["ticket_id"], "status": "open"})

    def summarize(args: Any, ctx: Any) -> Any:
        for word in str(args["text"]).split():
            ctx.chunk(word)
        return {"words": len(str(args["text"]).split())}

    def slow_report(args: Any, ctx: Any) -> Any:
        slow_runs.append(ctx.attempt)
        release.wait()
        return {"report": "ready"}

    def explode(args: Any, ctx: Any) -> Any:
        raise RuntimeError("the ticket system is down")

    agent.add("summarize", summarize)
    agent.add("slow_report", slow_report)
    agent.add("explode", explode)
    report = Report()
    started = time.perf_counter()
    agent.start()
    agent.wait_ready(10)
    report.add("agent connected (TLS + upgrade + hello/welcome)", "ready", started)
    t = time.perf_counter()
    result = server.dispatch(INSTANCE, "get_ticket", {"ticket_id": "T-1"})
    report.add("dispatch get_ticket T-1", f"result {result}", t)
    t, chunks = time.perf_counter(), []
    result = server.dispatch(INSTANCE, "summarize", {"text": "sans io all the way down"},
                             on_chunk=chunks.append)
    report.add("dispatch summarize (streamed)", f"chunks {chunks} then {result}", t)
    t = time.perf_counter()
    try:
        server.dispatch(INSTANCE, "explode", {})
    except Exception as exc:
        report.add("dispatch explode (fails)", f"error {exc}", t)
    t = time.perf_counter()
    pending = gevent.spawn(server.dispatch, INSTANCE, "slow_report", {}, deadline_ms=20_000)
    while not slow_runs:
        gevent.sleep(0.01)
    agent.link.abort()
    out("cut the agent's TCP connection while slow_report runs...")
    release.set()
    report.add("dispatch slow_report across a TCP cut", f"result {pending.get(timeout=20)}", t)
    agent.stop(grace=1)
    server.close(grace=1)
    out("")
    report.print(out)
    out(f"\nslow_report handler ran {len(slow_runs)} time(s)")
    return 0 if len(slow_runs) == 1 else 1


ADAPTERS = ("asyncio", "anyio", "gevent")
EXTRAS = {"anyio": ("anyio", {"anyio", "sniffio", "trio"}),
          "gevent": ("gevent", {"gevent", "greenlet", "zope"})}
"""Per adapter, the extra it needs and the top-level modules that extra installs."""


class MissingExtra(Exception):
    """An adapter's third-party dependency is not installed: the message says what to install."""


def load_adapter(adapter: str) -> Any:
    """Import `svantic_adapters.<adapter>`, or say which extra to install when it cannot be."""
    try:
        return importlib.import_module(f"svantic_adapters.{adapter}")
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").partition(".")[0]
        extra, modules = EXTRAS.get(adapter, ("", set()))
        if missing not in modules:
            raise
        raise MissingExtra(
            f"the {adapter} adapter needs {missing!r}, which is not installed: "
            f"pip install 'svantic-proto[{extra}]'"
        ) from exc


def demo(adapter: str, out: Callable[[str], None] = print) -> int:
    """Run one mesh and one agent over TLS on 127.0.0.1 with `adapter`; 0 when all went well."""
    module = load_adapter(adapter)
    out(f"svantic demo: one mesh and one agent in this process, adapter {adapter}")
    if adapter == "gevent":
        return _demo_gevent(module, out)
    return asyncio.run(_demo_async(module, out))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="svantic", description=__doc__)
    parser.add_argument("--version", action="version", version=f"svantic-proto {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("demo", help="mesh + agent + dispatches over TLS on 127.0.0.1")
    run.add_argument("--adapter", choices=ADAPTERS, default="asyncio")
    args = parser.parse_args(argv)
    if args.command == "demo":
        try:
            return demo(args.adapter)
        except MissingExtra as exc:  # a usage error, not a crash: no traceback
            print(f"svantic demo: {exc}", file=sys.stderr)
            return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
