"""`svantic demo`: the whole story of svantic in one process, over real TLS on 127.0.0.1.

The reference mesh (a `:memory:` registry, a throwaway CA made with trustme, one API client)
starts on the chosen adapter; a connected agent (`svantic.Agent` + `MeshConnector`, a
WebSocket to the mesh) and a hosted agent (the same kind of agent, `deployment_mode="hosted"`:
the mesh POSTs to its `/send`) register through the control plane. Then, as any caller would,
over HTTPS: `POST /agents/dispatch` for an echo, a streamed count (SSE), a failure and invalid
arguments; a tool call from the connected agent to the hosted one; the connected agent's
socket cut mid-dispatch, with the resume and the result delivered once (the handler runs
exactly once); and the fleet's status from `/agents/get_connection_stats`. A report with
timings follows, then the three commands to try next.

Every adapter tells the same story: the mesh, both agents and their transports run on it
(`--adapter asyncio|anyio|gevent`). The caller's side is one blocking function
(`_Story.calls`, httpx's blocking client): on the async adapters it runs in a worker
thread next to the event loop, on gevent in the hub (monkey-patched), so the story is one
text, not three.

It lives here, not in `svantic_adapters`, because it uses the mesh and the SDK (applications
above the drivers). At load time this module imports nothing that imports `ssl` or
`socket` (only light standard-library modules): gevent has to patch those before anything
imports them, and `main()` does that first.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ADAPTERS",
    "LocalMesh",
    "MissingExtra",
    "Report",
    "demo",
    "load_adapter",
    "local_mesh",
    "local_mesh_gevent",
    "main",
]

HOST = "127.0.0.1"
WAIT = 20.0
"""Seconds any one step may take before the demo gives up on it (every wait is bounded)."""
CLIENT_ID = "demo-client"
TENANT = "demo"
CONNECTED = "demo-connected-1"
HOSTED = "demo-hosted-1"

ADAPTERS = ("asyncio", "anyio", "gevent")
EXTRAS = {"anyio": ("anyio", {"anyio", "sniffio", "trio"}),
          "gevent": ("gevent", {"gevent", "greenlet", "zope"})}
"""Per adapter, the extra it needs and the top-level modules that extra installs."""

NEXT = """\
try next, from a checkout's root, each in a terminal of its own:
  svantic mesh
  svantic agent examples.demo_agent:agent
  svantic call echo '{"hello": "world"}'
with, for the agent and the call, the files and the client `svantic mesh` made and printed:
  export SVANTIC_CA_FILE=svantic-mesh.ca.pem SVANTIC_CLIENT_ID=dev-client \\
         SVANTIC_CLIENT_SECRET=<the secret svantic mesh printed>
  export SVANTIC_SIGNING_SECRET=$(python3 -c \\
    'import json; print(json.load(open("svantic-mesh.secrets.json"))["signing_secret"])')"""
"""What to run after the demo: the same pieces as separate processes."""


class MissingExtra(Exception):
    """An adapter's third-party dependency is not installed: the message says what to install."""


def load_adapter(adapter: str) -> Any:
    """Import `svantic_adapters.<adapter>`, or say which extra to install when it cannot be
    (a usage error, reported in one line, rather than an ImportError's traceback)."""
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


@dataclass
class Report:
    """One line per step: what, how long, what came of it; `failed` counts the surprises."""

    lines: list[tuple[str, str, float]] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def add(self, what: str, outcome: str, started: float, ok: bool = True) -> None:
        self.lines.append((what, outcome if ok else f"UNEXPECTED: {outcome}",
                           (time.perf_counter() - started) * 1000))
        if not ok:
            self.failed.append(what)

    def print(self, out: Callable[[str], None]) -> None:
        width = max(len(w) for w, _, _ in self.lines)
        for what, outcome, ms in self.lines:
            out(f"  {what:<{width}}  {ms:8.1f} ms  {outcome}")


# -- the mesh, in this process ------------------------------------------------------------------


@dataclass
class LocalMesh:
    """A reference mesh running in this process: where it is, whom it trusts, and what an
    agent or a caller needs to reach it (the files live in `folder`, removed at the end)."""

    url: str
    ca_file: str
    client_id: str
    client_secret: str
    signing_secret: str
    tenant_id: str
    folder: Path
    ca: Any
    """The trustme CA that signed the mesh's certificate; it also signs hosted agents'."""
    server: Any = None
    """The adapter's `MeshServer` (its `agents` are the live sockets)."""
    registry: Any = None
    """The mesh's `SqliteRegistry` (in memory)."""

    def registered(self, instance_id: str) -> bool:
        """Whether the registry still holds `instance_id` (deregistering removes it)."""
        return self.registry is not None and self.registry.get_instance(instance_id) is not None

    def issue_cert(self) -> tuple[str, str]:
        """`(certfile, keyfile)` for 127.0.0.1 signed by the mesh's CA: a hosted agent's,
        which the mesh trusts when it POSTs to the agent's `/send`."""
        leaf = self.ca.issue_cert(HOST)
        stem = f"hosted-{os.urandom(4).hex()}"
        cert, key = self.folder / f"{stem}.cert.pem", self.folder / f"{stem}.key.pem"
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        key.write_bytes(leaf.private_key_pem.bytes())
        return str(cert), str(key)

    def environ(self) -> dict[str, str]:
        """The `SVANTIC_*` variables an agent (`MeshConnector`) or `svantic call` reads."""
        return {"SVANTIC_URL": self.url, "SVANTIC_CA_FILE": self.ca_file,
                "SVANTIC_CLIENT_ID": self.client_id,
                "SVANTIC_CLIENT_SECRET": self.client_secret,
                "SVANTIC_SIGNING_SECRET": self.signing_secret}


class _Late:
    """The server needs its callbacks before it listens, the mesh's parts need the port it
    got: the callbacks reach the parts (and the app) once they exist."""

    def __init__(self) -> None:
        self.parts: Any = None
        self.app: Any = None

    def verify_token(self, token: str) -> Any:
        return self.parts.verify_token(token)

    def lookup_instance(self, instance_id: str) -> Any:
        return self.parts.lookup_instance(instance_id)

    def mint(self, route: Any) -> Any:
        return self.parts.mint(route)

    async def http_app_async(self, request: Any, responder: Any) -> None:
        await self.app(request, responder)

    def http_app(self, request: Any, responder: Any) -> Any:
        return self.app(request, responder)


@dataclass
class _Setup:
    """What every adapter's mesh starts from: a registry with one client, secrets, TLS."""

    registry: Any
    secrets: dict[str, bytes]
    server_tls: Any
    hosted_verify: Any
    mesh: LocalMesh

    def parts(self, url: str) -> Any:
        from .serve import make_parts

        self.mesh.url = url
        return make_parts(self.registry, url, self.secrets, hosted_verify=self.hosted_verify)


@contextlib.contextmanager
def _setup() -> Iterator[_Setup]:
    """A throwaway CA (trustme) and a certificate for 127.0.0.1, a `:memory:` registry with
    one client, fresh secrets; the folder of the PEM files is removed on the way out."""
    import secrets
    import ssl

    import trustme

    from .registry import SqliteRegistry

    with tempfile.TemporaryDirectory(prefix="svantic-demo-") as folder_name:
        folder = Path(folder_name)
        ca = trustme.CA(organization_name="svantic demo CA")
        ca_file = folder / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(HOST, "localhost").configure_cert(server_tls)
        client_secret = secrets.token_urlsafe(24)
        signing_secret = secrets.token_hex(32)
        registry = SqliteRegistry(":memory:", secret_key=os.urandom(32))
        registry.add_client(CLIENT_ID, client_secret, TENANT)
        mesh = LocalMesh(url="", ca_file=str(ca_file), client_id=CLIENT_ID,
                         client_secret=client_secret, signing_secret=signing_secret,
                         tenant_id=TENANT, folder=folder, ca=ca, registry=registry)
        try:
            yield _Setup(registry, {"token_secret": secrets.token_bytes(32),
                                    "signing_secret": signing_secret.encode()},
                         server_tls, ssl.create_default_context(cafile=str(ca_file)), mesh)
        finally:
            registry.close()


@contextlib.asynccontextmanager
async def local_mesh(adapter: str = "asyncio") -> AsyncIterator[LocalMesh]:
    """Run a reference mesh in this event loop (`adapter`: asyncio, or anyio on asyncio or
    trio) on 127.0.0.1 over TLS, until the block ends; then drain it (1 s grace).

    Run it under `anyio.run` (`backend="asyncio"` for asyncio), as `svantic mesh` does: the
    mesh's tasks are anyio's, and the adapter's socket callbacks, which run outside any
    task, find the backend through the context `anyio.run` sets (under a bare `asyncio.run`
    a tool call from an agent would fail to start its task)."""
    from .app import AsyncMesh

    module = load_adapter(adapter)
    with _setup() as setup:
        late = _Late()
        server = module.MeshServer(ssl_context=setup.server_tls, verify_token=late.verify_token,
                                   lookup_instance=late.lookup_instance, dispatch_auth=late.mint,
                                   http_app=late.http_app_async)
        async with server:
            host, port = await server.start(HOST, 0)
            mesh = AsyncMesh(setup.parts(f"https://{host}:{port}"))
            mesh.attach(server)
            late.parts, late.app = mesh.parts, mesh.http_app
            setup.mesh.server = server
            async with mesh:
                try:
                    yield setup.mesh
                finally:
                    mesh.end_streams()
                    await server.close(1.0)


@contextlib.contextmanager
def local_mesh_gevent() -> Iterator[LocalMesh]:
    """`local_mesh` on gevent, in this thread's hub (the process monkey-patched first)."""
    from svantic_adapters import gevent as adapter

    from .app import GeventMesh

    with _setup() as setup:
        late = _Late()
        server = adapter.MeshServer(ssl_context=setup.server_tls, verify_token=late.verify_token,
                                    lookup_instance=late.lookup_instance,
                                    dispatch_auth=late.mint, http_app=late.http_app)
        host, port = server.start(HOST, 0)
        mesh = GeventMesh(setup.parts(f"https://{host}:{port}"))
        late.parts, late.app = mesh.parts, mesh.http_app
        mesh.attach(server)
        mesh.start()
        setup.mesh.server = server
        try:
            yield setup.mesh
        finally:
            mesh.end_streams()
            server.close(1.0)
            mesh.stop()


# -- the agents -----------------------------------------------------------------------------------


@dataclass
class _Hold:
    """The `hold` capability's state: how often its handler ran, and its gates. Handlers are
    plain functions (every adapter runs those), so these are `threading.Event`s: gevent's
    under monkey-patching, real ones beside an event loop (the handler is in a worker)."""

    runs: int = 0
    entered: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)


def _agent(agent_type: str, held: _Hold) -> Any:
    """The demo's agent (as examples/demo_agent.py, which is not installed with the package):
    the same capabilities serve connected and hosted mode unchanged."""
    import svantic

    agent = svantic.Agent(agent_type=agent_type, description=f"svantic demo ({agent_type})")

    @agent.capability(parameters={"type": "object"})
    def echo(args: Mapping[str, Any], ctx: svantic.Context) -> Any:
        """Return the arguments as they came."""
        return dict(args)

    @agent.capability(parameters={
        "type": "object", "required": ["n"], "additionalProperties": False,
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 100}}})
    def count(args: Mapping[str, Any], ctx: svantic.Context) -> Any:
        """Stream {"i": k} for k in 0..n-1, then return {"count": n}."""
        for k in range(args["n"]):
            ctx.chunk({"i": k})
        return {"count": args["n"]}

    @agent.capability(parameters={"type": "object", "required": ["message"],
                                  "properties": {"message": {"type": "string"}}})
    def fail(args: Mapping[str, Any], ctx: svantic.Context) -> Any:
        """Raise with `message`: the caller gets DISPATCH_FAILED."""
        raise RuntimeError(args["message"])

    @agent.capability(parameters={"type": "object", "required": ["agent_type"],
                                  "properties": {"agent_type": {"type": "string"}}})
    def ask(args: Mapping[str, Any], ctx: svantic.Context) -> Any:
        """Call `echo` on an agent of `agent_type` through the mesh (a tool call)."""
        answer = ctx.tool_call("echo", {"from": agent_type}, agent_type=args["agent_type"])
        return {"asked": args["agent_type"], "answer": answer}

    @agent.capability(parameters={"type": "object"})
    def hold(args: Mapping[str, Any], ctx: svantic.Context) -> Any:
        """Wait for the demo's release (bounded), counting the runs: run once, answer once."""
        held.runs += 1
        held.entered.set()
        held.release.wait(WAIT)
        return {"released": held.release.is_set(), "attempt": ctx.attempt}

    return agent


# -- the story ------------------------------------------------------------------------------------


def _short(value: Any, limit: int = 72) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _until(done: Callable[[], bool], what: str) -> None:
    """Poll `done` every 10 ms for up to `WAIT` seconds (time.sleep: gevent's when patched)."""
    deadline = time.monotonic() + WAIT
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {WAIT:g} s")
        time.sleep(0.01)


def _sse(text: str) -> list[tuple[str, Any]]:
    """`(event, data)` pairs of an SSE body (comment lines skipped)."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines()
                      if line and not line.startswith(":") and ": " in line)
        if "data" in fields:
            events.append((fields.get("event", "message"), json.loads(fields["data"])))
    return events


class _Background:
    """A call on a thread of its own (a greenlet under gevent's patching): the dispatch that
    stays open while the demo cuts the agent's socket."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self._call = call
        self._outcome: tuple[Any, BaseException | None] = (None, None)
        self._thread = threading.Thread(target=self._run, name="svantic-demo-call", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._outcome = (self._call(), None)
        except BaseException as exc:  # handed to result()
            self._outcome = (None, exc)

    def result(self, timeout: float) -> Any:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the call did not finish within {timeout:g} s")
        value, error = self._outcome
        if error is not None:
            raise error
        return value


@dataclass
class _Story:
    """The caller's side of the demo, and what the agents need to reach the mesh."""

    mesh: LocalMesh
    adapter: str
    report: Report
    held: _Hold
    in_loop: Callable[[Callable[[], Any]], Any]
    """Run a function where the transports live (the event loop's thread, or gevent's hub)."""
    transport: Any = None
    """The connected agent's WebSocket transport (`MeshConnector.ws_transport`)."""
    resumed: bool = False
    stats: dict[str, Any] = field(default_factory=dict)

    def options(self, instance_id: str) -> dict[str, Any]:
        """`MeshConnector` options: this mesh, its client and CA, and an empty environment,
        so `SVANTIC_*` variables of the shell running the demo cannot change its story."""
        mesh = self.mesh
        return {"svantic_url": mesh.url, "client_id": mesh.client_id,
                "client_secret": mesh.client_secret, "signing_secret": mesh.signing_secret,
                "cafile": mesh.ca_file, "instance_id": instance_id, "adapter": self.adapter,
                "connect_timeout": WAIT, "environ": {}}

    def calls(self) -> None:
        """Everything a caller does, over HTTPS with a bearer token (blocking: a worker
        thread beside the event loop, or gevent's hub)."""
        import ssl

        import httpx

        verify = ssl.create_default_context(cafile=self.mesh.ca_file)
        with httpx.Client(base_url=self.mesh.url, verify=verify, trust_env=False,
                          timeout=WAIT) as http:
            started = time.perf_counter()
            answer = http.post("/auth/token", json={"client_id": self.mesh.client_id,
                                                    "client_secret": self.mesh.client_secret})
            token = answer.raise_for_status().json()["access_token"]
            self.report.add("caller: POST /auth/token", "a transport JWT", started)
            headers = {"authorization": f"Bearer {token}"}

            def dispatch(capability: str, arguments: Any, agent_type: str) -> httpx.Response:
                body = {"capability": capability, "arguments": arguments,
                        "agent_type": agent_type, "deadline_ms": int(WAIT * 1000)}
                return http.post("/agents/dispatch", json=body, headers=headers)

            self._echo(dispatch, "demo-connected")
            self._echo(dispatch, "demo-hosted")
            self._count(http, headers)
            self._failure(dispatch, "fail on the hosted agent", capability="fail",
                          arguments={"message": "the ticket system is down"},
                          agent_type="demo-hosted", code="DISPATCH_FAILED")
            self._failure(dispatch, "count with invalid arguments", capability="count",
                          arguments={"n": "three"}, agent_type="demo-connected",
                          code="INVALID_ARGUMENTS")
            started = time.perf_counter()
            answer = dispatch("ask", {"agent_type": "demo-hosted"}, "demo-connected")
            result = answer.json().get("result") if answer.status_code == 200 else answer.text
            self.report.add("tool call: connected ask -> hosted echo", f"result {_short(result)}",
                            started, ok=isinstance(result, dict)
                            and result.get("answer") == {"from": "demo-connected"})
            self._cut(dispatch)
            started = time.perf_counter()
            answer = http.post("/agents/get_connection_stats", json={}, headers=headers)
            self.stats = answer.json() if answer.status_code == 200 else {}
            self.report.add("fleet: POST /agents/get_connection_stats", self.fleet(), started,
                            ok=self.stats.get("total") == 2)

    def _echo(self, dispatch: Callable[..., Any], agent_type: str) -> None:
        started = time.perf_counter()
        arguments = {"hello": agent_type}
        answer = dispatch("echo", arguments, agent_type)
        result = answer.json().get("result") if answer.status_code == 200 else answer.text
        self.report.add(f"echo on the {agent_type.removeprefix('demo-')} agent",
                        f"result {_short(result)}", started, ok=result == arguments)

    def _count(self, http: Any, headers: dict[str, str]) -> None:
        started = time.perf_counter()
        answer = http.post("/agents/dispatch", headers={**headers, "accept": "text/event-stream"},
                           json={"capability": "count", "arguments": {"n": 3},
                                 "agent_type": "demo-connected"})
        events = _sse(answer.text)
        chunks = [data.get("data") for name, data in events if name == "chunk"]
        results = [data.get("result") for name, data in events if name == "result"]
        expected = [{"i": 0}, {"i": 1}, {"i": 2}]
        self.report.add("count n=3, streamed (SSE)",
                        f"chunks {_short(chunks, 40)} then {_short(results)}", started,
                        ok=chunks == expected and results == [{"count": 3}])

    def _failure(self, dispatch: Callable[..., Any], what: str, *, capability: str,
                 arguments: Any, agent_type: str, code: str) -> None:
        started = time.perf_counter()
        answer = dispatch(capability, arguments, agent_type)
        error = answer.json().get("error", {}) if answer.status_code != 200 else {}
        self.report.add(what, _short(f"HTTP {answer.status_code} {error.get('code')}: "
                                     f"{error.get('message')}"), started,
                        ok=error.get("code") == code)

    def _cut(self, dispatch: Callable[..., Any]) -> None:
        """Cut the connected agent's TCP connection while `hold` runs; the agent reconnects
        and resumes its session, the mesh re-delivers the dispatch, the agent recognises it
        (the handler is not run again), and the one result reaches the caller."""
        started = time.perf_counter()
        pending = _Background(lambda: dispatch("hold", {}, "demo-connected"))
        _until(self.held.entered.is_set, "hold handler start")
        transport = self.transport
        first = self.in_loop(lambda: transport.conn)

        def cut_socket() -> None:  # the agent's TCP connection breaks mid-dispatch
            transport.link.abort()

        self.in_loop(cut_socket)
        cut = time.perf_counter()
        _until(lambda: self.in_loop(lambda: transport.conn is not first
                                    and transport.ready.is_set()), "reconnect")
        back = (time.perf_counter() - cut) * 1000
        self.resumed = bool(self.in_loop(lambda: transport.last_started.resumed))
        self.held.release.set()
        answer = pending.result(WAIT)
        result = answer.json().get("result") if answer.status_code == 200 else answer.text
        self.report.add(
            "hold, socket cut mid-dispatch",
            f"reconnected in {back:.0f} ms (backoff), "
            f"{'resumed' if self.resumed else 'NOT resumed'}, "
            f"result {_short(result)}", started,
            ok=self.resumed and self.held.runs == 1 and isinstance(result, dict)
            and result.get("released") is True)

    def fleet(self) -> str:
        """The stats in one line: the non-zero counts of each grouping."""
        if not self.stats:
            return "no answer"
        parts = [f"{self.stats.get('total')} instances"]
        for key in ("by_deployment_mode", "by_connection_status", "by_transport"):
            counts = self.stats.get(key) or {}
            parts.append(", ".join(f"{name} {n}" for name, n in counts.items() if n))
        return "; ".join(parts)


async def _run_async(adapter: str, report: Report, held: _Hold,
                     out: Callable[[str], None]) -> None:
    """The mesh and both agents in this event loop; the caller in a worker thread."""
    import anyio
    import anyio.from_thread
    import anyio.to_thread
    import svantic

    async with local_mesh(adapter) as mesh:
        out(f"mesh listening on {mesh.url} (TLS from a throwaway CA, a :memory: registry)")
        story = _Story(mesh, adapter, report, held, in_loop=anyio.from_thread.run_sync)
        started = time.perf_counter()
        connected = svantic.MeshConnector(_agent("demo-connected", held),
                                          **story.options(CONNECTED))
        await connected.connect()
        report.add("connected agent: token, register, wss", f"{CONNECTED} online", started)
        try:
            started = time.perf_counter()
            certfile, keyfile = mesh.issue_cert()
            hosted = svantic.MeshConnector(_agent("demo-hosted", _Hold()),
                                           deployment_mode="hosted", listen=(HOST, 0),
                                           certfile=certfile, keyfile=keyfile,
                                           **story.options(HOSTED))
            await hosted.connect()
            try:
                report.add("hosted agent: token, serve, register",
                           f"{HOSTED} at {hosted.hosted_server.url} (card read)", started)
                story.transport = connected.ws_transport
                await anyio.to_thread.run_sync(story.calls)
            finally:
                held.release.set()
                await hosted.disconnect()
        finally:
            held.release.set()
            started = time.perf_counter()
            await connected.disconnect()
        gone = not (mesh.registered(CONNECTED) or mesh.registered(HOSTED))
        report.add("both agents disconnect", "deregistered" if gone else "still registered",
                   started, ok=gone)


def _run_gevent(report: Report, held: _Hold, out: Callable[[str], None]) -> None:
    """The same story with gevent: everything in this hub, the caller included."""
    import svantic

    with local_mesh_gevent() as mesh:
        out(f"mesh listening on {mesh.url} (TLS from a throwaway CA, a :memory: registry)")
        story = _Story(mesh, "gevent", report, held, in_loop=lambda function: function())
        started = time.perf_counter()
        connected = svantic.MeshConnector(_agent("demo-connected", held),
                                          **story.options(CONNECTED))
        connected.connect()
        report.add("connected agent: token, register, wss", f"{CONNECTED} online", started)
        try:
            started = time.perf_counter()
            certfile, keyfile = mesh.issue_cert()
            hosted = svantic.MeshConnector(_agent("demo-hosted", _Hold()),
                                           deployment_mode="hosted", listen=(HOST, 0),
                                           certfile=certfile, keyfile=keyfile,
                                           **story.options(HOSTED))
            hosted.connect()
            try:
                report.add("hosted agent: token, serve, register",
                           f"{HOSTED} at {hosted.hosted_server.url} (card read)", started)
                story.transport = connected.ws_transport
                story.calls()
            finally:
                held.release.set()
                hosted.disconnect()
        finally:
            held.release.set()
            started = time.perf_counter()
            connected.disconnect()
        gone = not (mesh.registered(CONNECTED) or mesh.registered(HOSTED))
        report.add("both agents disconnect", "deregistered" if gone else "still registered",
                   started, ok=gone)


class _Logged(logging.Handler):
    """Keeps the warnings and errors logged during the demo instead of printing them as they
    come: the `fail` step's traceback is expected (a handler's exception is logged with it),
    and the report says in one line what was logged, in full only when a step failed."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def summary(self, *, full: bool) -> list[str]:
        if full:
            formatter = logging.Formatter("%(levelname)s %(name)s: %(message)s")
            return [formatter.format(record) for record in self.records]
        if not self.records:
            return []
        firsts = dict.fromkeys(f"{r.name}: {r.getMessage().splitlines()[0]}"
                               for r in self.records)
        return [f"logged meanwhile ({len(self.records)}): " + "; ".join(firsts)]


def demo(adapter: str, out: Callable[[str], None] = print) -> int:
    """Tell the story on `adapter`; 0 when every step went as it should, 1 otherwise.

    Raises `MissingExtra` (before anything starts) when the adapter's extra is missing. On
    gevent the process must be monkey-patched first (`main()` does it)."""
    load_adapter(adapter)
    out(f"svantic demo: the reference mesh, a connected and a hosted agent, in this process "
        f"(adapter {adapter})")
    report, held = Report(), _Hold()
    error: BaseException | None = None
    root, logged = logging.getLogger(), _Logged()
    level = root.level
    root.addHandler(logged)
    root.setLevel(min(level or logging.WARNING, logging.WARNING))
    try:
        if adapter == "gevent":
            _run_gevent(report, held, out)
        else:  # anyio's runner on asyncio, as `svantic mesh --adapter asyncio` runs
            import anyio

            anyio.run(_run_async, adapter, report, held, out, backend="asyncio")
    except Exception as exc:  # a step that could not finish: report it with what went before
        error = exc
    finally:
        root.removeHandler(logged)
        root.setLevel(level)
    out("")
    if report.lines:
        report.print(out)
        out("")
    if error is not None:
        out(f"the demo stopped: {type(error).__name__}: {error}")
        for line in logged.summary(full=True):
            out(line)
        return 1
    delivered = "yes" if held.runs == 1 and "hold, socket cut mid-dispatch" not in report.failed \
        else "NO"
    out(f"hold handler ran {held.runs} time(s) across the cut; result delivered once: "
        f"{delivered}")
    if report.failed:
        out(f"unexpected: {', '.join(report.failed)}")
    for line in logged.summary(full=bool(report.failed)):
        out(line)
    out("")
    out(NEXT)
    return 1 if report.failed else 0


def _patch_for_gevent() -> None:
    """gevent patches `ssl`, `socket` and `threading` before anything else imports them (the
    SDK, httpx): the caller's blocking HTTP then yields to the hub the mesh runs in."""
    try:
        from gevent import monkey
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] not in EXTRAS["gevent"][1]:
            raise
        raise MissingExtra("the gevent adapter needs 'gevent', which is not installed: "
                           "pip install 'svantic-proto[gevent]'") from exc
    monkey.patch_all()


def main(argv: list[str] | None = None) -> int:
    """`svantic demo [--adapter asyncio|anyio|gevent]`: 0 when all went well, 1 when a step
    did not, 2 for a missing extra (one line, no traceback: a usage error, not a crash)."""
    parser = argparse.ArgumentParser(
        prog="svantic demo", description="The reference mesh, a connected and a hosted agent, "
        "dispatches, a tool call and a cut socket, in one process over TLS on 127.0.0.1.")
    parser.add_argument("--adapter", choices=ADAPTERS, default="asyncio")
    args = parser.parse_args(argv)
    try:
        if args.adapter == "gevent":
            _patch_for_gevent()
        return demo(args.adapter)
    except MissingExtra as exc:
        print(f"svantic demo: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
