"""Run any adapter's agent or mesh in its own thread, driven from a plain pytest body.

Each side (one `MeshSide`, one or more `AgentSide`s) owns a thread with its own
event loop or hub: `asyncio.run`, `anyio.run` on asyncio or on trio, or a gevent
hub. The synchronous test body talks to a side only through thread-safe calls
that carry a timeout, so a stuck adapter fails one test instead of hanging the
run. Adding an adapter means adding one `Driver` subclass to `DRIVERS`.

Fault injection lives here too, outside every adapter: `TcpProxy` (stall or cut
a loopback TCP connection), `CannedHttpsServer` (answer every upgrade with a
fixed HTTP error) and `raw_upgrade` (send a hand-written upgrade request).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib
import importlib.util
import inspect
import json
import select
import socket
import ssl
import struct
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Generator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme

from svantic_proto import (
    Config,
    DispatchAuthMinter,
    DispatchAuthVerifier,
    InstanceRecord,
    jwt_dispatch_auth,
)
from svantic_proto.events import Event
from svantic_proto.testing import TEST_SIGNING_SECRET

if importlib.util.find_spec("gevent") is not None:
    # gevent gives the libev default loop to the thread that imported it first, by thread
    # ident; import it here, in pytest's main thread, so that no side thread gets (and then,
    # once its ident is reused, shares) that loop.
    import gevent  # noqa: F401

HOST = "127.0.0.1"
TENANT = "tenant-1"
GOOD_TOKEN = "transport-token-tenant-1"
FRESH_TOKEN = "transport-token-tenant-1-fresh"
EXPIRED_TOKEN = "transport-token-expired"
CALL_TIMEOUT = 10.0
"""Upper bound for any single call into a side; every wait in the suite is bounded."""

# -- bounded waiting ---------------------------------------------------------------------------


def wait_until(predicate: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.01) -> Any:
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


# -- the mesh's registry: transport tokens and registered instances (spec 1) -----------------


@dataclass(frozen=True, slots=True)
class TransportClaims:
    tenant_id: str
    sub: str = "client-1"
    exp: float | None = None


class Registry:
    """Tokens and instances the mesh checks upgrades against, recording what it was asked.

    Instance ids encode their registration so each test can pick a fresh one:
    `ghost-*` is not registered (404), `foreign-*` belongs to another tenant (403),
    `hosted-*` is registered as hosted (409); anything else is a connected
    instance of `TENANT`.
    """

    def __init__(self) -> None:
        self.tokens: dict[str, TransportClaims] = {
            GOOD_TOKEN: TransportClaims(TENANT),
            FRESH_TOKEN: TransportClaims(TENANT),
        }
        self._lock = threading.Lock()
        self.tokens_seen: list[str] = []

    def verify_token(self, token: str) -> TransportClaims:
        with self._lock:
            self.tokens_seen.append(token)
        return self.tokens[token]  # KeyError: refused (401)

    def lookup_instance(self, instance_id: str) -> InstanceRecord | None:
        if instance_id.startswith("ghost-"):
            return None
        tenant = "tenant-2" if instance_id.startswith("foreign-") else TENANT
        mode = "hosted" if instance_id.startswith("hosted-") else "connected"
        return InstanceRecord(instance_id, tenant, mode, "scenario-agent")


# -- TLS ---------------------------------------------------------------------------------------


class Certs:
    """A private CA and a certificate for 127.0.0.1, from trustme."""

    def __init__(self, directory: Path) -> None:
        self.ca = trustme.CA()
        self.server_cert = self.ca.issue_cert(HOST)
        self.cafile = directory / "scenario-ca.pem"
        self.ca.cert_pem.write_to_path(str(self.cafile))

    def server_context(self, factory: type[ssl.SSLContext] = ssl.SSLContext) -> ssl.SSLContext:
        context = factory(ssl.PROTOCOL_TLS_SERVER)
        self.server_cert.configure_cert(context)
        return context

    def client_context(self, factory: type[ssl.SSLContext] = ssl.SSLContext) -> ssl.SSLContext:
        context = factory(ssl.PROTOCOL_TLS_CLIENT)
        self.ca.configure_trust(context)
        return context


# -- one thread, one event loop (or hub) ------------------------------------------------------


class Runner:
    """A thread running one event loop; `submit` runs `fn()` there and returns a Future.

    `fn()` may return an awaitable (async adapters) or a value (gevent): either way
    it runs inside the loop's thread, so the test never touches adapter objects
    from its own thread.
    """

    name = "runner"
    _thread: threading.Thread

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        raise NotImplementedError

    def submit(self, fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        raise NotImplementedError

    def stop(self, timeout: float = 5.0) -> None:
        raise NotImplementedError

    def call(self, fn: Callable[[], Any], timeout: float = CALL_TIMEOUT, what: str = "") -> Any:
        future = self.submit(fn)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise TimeoutError(f"{self.name}: {what or 'call'} did not finish in {timeout} s") \
                from None


async def _invoke_async(fn: Callable[[], Any]) -> Any:
    result = fn()
    if inspect.isawaitable(result):
        result = await result
    return result


class AsyncioRunner(Runner):
    name = "asyncio"

    def __init__(self) -> None:
        self._started = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, daemon=True, name="side-asyncio")

    def start(self) -> None:
        self._thread.start()
        if not self._started.wait(5):
            raise TimeoutError("the asyncio loop thread did not start")

    def _main(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self._started.set()
            await self._stop.wait()

        asyncio.run(main())  # cancels whatever tasks are left when it returns

    def submit(self, fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(_invoke_async(fn), self._loop)

    def stop(self, timeout: float = 5.0) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)


class AnyioRunner(Runner):
    """`anyio.run(backend=...)` in a thread, reached through a blocking portal."""

    def __init__(self, backend: str) -> None:
        self.name = f"anyio-{backend}"
        self._backend = backend
        self._started = threading.Event()
        self._portal: Any = None
        self._thread = threading.Thread(target=self._main, daemon=True, name=f"side-{self.name}")

    def start(self) -> None:
        self._thread.start()
        if not self._started.wait(5):
            raise TimeoutError(f"the {self.name} loop thread did not start")

    def _main(self) -> None:
        import anyio
        from anyio.from_thread import BlockingPortal

        async def main() -> None:
            async with BlockingPortal() as portal:
                self._portal = portal
                self._started.set()
                await portal.sleep_until_stopped()

        anyio.run(main, backend=self._backend)

    def submit(self, fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        return self._portal.start_task_soon(_invoke_async, fn)  # type: ignore[no-any-return]

    def stop(self, timeout: float = 5.0) -> None:
        if self._portal is not None and self._thread.is_alive():
            with contextlib.suppress(RuntimeError, TimeoutError,
                                     concurrent.futures.CancelledError):
                self._portal.start_task_soon(self._portal.stop, True).result(timeout)
        self._thread.join(timeout)


class GeventRunner(Runner):
    """A gevent hub in its own thread (no monkey-patching: the adapter uses gevent's I/O)."""

    name = "gevent"

    def __init__(self) -> None:
        self._started = threading.Event()
        self._hub: Any = None
        self._stop: Any = None
        self._greenlets: set[Any] = set()
        self._thread = threading.Thread(target=self._main, daemon=True, name="side-gevent")

    def start(self) -> None:
        self._thread.start()
        if not self._started.wait(5):
            raise TimeoutError("the gevent hub thread did not start")

    def _main(self) -> None:
        import gevent
        import gevent.event

        self._hub = gevent.get_hub()
        self._stop = gevent.event.Event()
        self._started.set()
        while not self._stop.wait(1.0):
            pass  # the timeout's timer keeps the hub alive while nothing else is scheduled
        gevent.killall(list(self._greenlets), timeout=2)
        self._hub.destroy(destroy_loop=True)  # a later thread may reuse this thread's ident

    def _run(self, future: concurrent.futures.Future[Any], fn: Callable[[], Any]) -> None:
        if future.cancelled():
            return
        try:
            result = fn()
        except BaseException as exc:  # GreenletExit included: the caller gave up
            if future.set_running_or_notify_cancel():
                future.set_exception(exc)
        else:
            if future.set_running_or_notify_cancel():
                future.set_result(result)

    def submit(self, fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        """Run `fn` in a new greenlet; cancelling the Future kills it (as asyncio does)."""
        import gevent

        future: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def spawn() -> None:
            greenlet = gevent.spawn(self._run, future, fn)
            self._greenlets.add(greenlet)
            greenlet.link(self._greenlets.discard)

            def on_done(done: concurrent.futures.Future[Any]) -> None:
                if done.cancelled():
                    self._hub.loop.run_callback_threadsafe(greenlet.kill, block=False)

            future.add_done_callback(on_done)

        self._hub.loop.run_callback_threadsafe(spawn)
        return future

    def stop(self, timeout: float = 5.0) -> None:
        if self._hub is not None and self._thread.is_alive():
            self._hub.loop.run_callback_threadsafe(self._stop.set)
        self._thread.join(timeout)


# -- capability handlers, written once ---------------------------------------------------------


class HandlerLog:
    """What the agent's handlers did, readable from the test thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.runs: Counter[str] = Counter()
        self.cancelled: dict[str, tuple[str, float]] = {}
        """Dispatch id -> (the cancellation's exception type, when it arrived)."""
        self.gates: dict[str, threading.Event] = {}

    def gate(self, name: str) -> threading.Event:
        with self._lock:
            return self.gates.setdefault(name, threading.Event())

    def started(self, dispatch_id: str) -> None:
        with self._lock:
            self.runs[dispatch_id] += 1

    def was_cancelled(self, dispatch_id: str, exc: BaseException) -> None:
        with self._lock:
            self.cancelled[dispatch_id] = (type(exc).__name__, time.monotonic())

    def total_runs(self) -> int:
        with self._lock:
            return sum(self.runs.values())


Behaviour = Callable[[Mapping[str, Any], Any, HandlerLog], Generator[float, None, Any]]
"""A handler body that yields the seconds it wants to pause, so each driver can run it
with its own sleep (await asyncio/anyio sleep, or gevent.sleep)."""


def _echo(arguments: Mapping[str, Any], context: Any, log: HandlerLog
          ) -> Generator[float, None, Any]:
    log.started(context.dispatch_id)
    yield 0.0
    return dict(arguments)


def _stream(arguments: Mapping[str, Any], context: Any, log: HandlerLog
            ) -> Generator[float, None, Any]:
    log.started(context.dispatch_id)
    count = int(arguments["count"])
    for index in range(count):
        context.chunk({"index": index})
        if index % 5 == 4:
            yield 0.0  # let the loop write between chunks
    return {"chunks": count}


def _fail(arguments: Mapping[str, Any], context: Any, log: HandlerLog
          ) -> Generator[float, None, Any]:
    log.started(context.dispatch_id)
    yield 0.0
    raise RuntimeError(arguments.get("message", "handler exploded"))


def _block(arguments: Mapping[str, Any], context: Any, log: HandlerLog
           ) -> Generator[float, None, Any]:
    """Wait until the test opens the named gate, or until cancelled."""
    log.started(context.dispatch_id)
    gate = log.gate(str(arguments["gate"]))
    try:
        while not gate.is_set():
            yield 0.01
    except BaseException as exc:  # the adapter's cancellation, whatever its type
        log.was_cancelled(context.dispatch_id, exc)
        raise
    return {"released": arguments["gate"]}


BEHAVIOURS: dict[str, Behaviour] = {
    "echo": _echo, "stream": _stream, "fail": _fail, "block": _block,
}


def async_handler(behaviour: Behaviour, log: HandlerLog,
                  sleep: Callable[[float], Any]) -> Callable[..., Any]:
    async def handler(arguments: Mapping[str, Any], context: Any) -> Any:
        steps = behaviour(arguments, context, log)
        try:
            delay = next(steps)
            while True:
                try:
                    await sleep(delay)
                except BaseException as exc:
                    delay = steps.throw(exc)
                else:
                    delay = steps.send(None)
        except StopIteration as stop:
            return stop.value

    return handler


def sync_handler(behaviour: Behaviour, log: HandlerLog,
                 sleep: Callable[[float], Any]) -> Callable[..., Any]:
    def handler(arguments: Mapping[str, Any], context: Any) -> Any:
        steps = behaviour(arguments, context, log)
        try:
            delay = next(steps)
            while True:
                try:
                    sleep(delay)
                except BaseException as exc:
                    delay = steps.throw(exc)
                else:
                    delay = steps.send(None)
        except StopIteration as stop:
            return stop.value

    return handler


# -- drivers: how each adapter is built, started, called and stopped --------------------------


@dataclass
class _Stop:
    """A stop request handed to a side's holder task: an event of its loop, and the grace."""

    event: Any
    grace: float = 0.0


class Driver:
    """One adapter. Subclasses say how to run it; the scenarios never see the difference."""

    name = ""
    module = ""
    requires: tuple[str, ...] = ()
    """Third-party packages the adapter imports."""

    def skip_reason(self) -> str | None:
        """Why this adapter cannot run here yet, or None (its params are skipped meanwhile)."""
        missing = [name for name in self.requires if importlib.util.find_spec(name) is None]
        if missing:
            return f"{', '.join(missing)} not installed"
        if importlib.util.find_spec(self.module) is None:
            return f"{self.module} is not written yet"
        return None

    def adapter(self) -> Any:
        return importlib.import_module(self.module)

    def runner(self) -> Runner:
        raise NotImplementedError

    def server_ssl(self, certs: Certs) -> ssl.SSLContext:
        return certs.server_context()

    def client_ssl(self, certs: Certs) -> ssl.SSLContext:
        return certs.client_context()

    def handlers(self, behaviours: Mapping[str, Behaviour], log: HandlerLog
                 ) -> dict[str, Callable[..., Any]]:
        raise NotImplementedError

    def token_provider(self, fetch: Callable[[], str]) -> Callable[[], Any]:
        raise NotImplementedError

    def new_event(self) -> Any:
        raise NotImplementedError

    # Each of these returns what `Runner.submit` runs: a coroutine function's result
    # (async drivers) or the value itself (gevent).
    def hold_mesh(self, server: Any, started: concurrent.futures.Future[int],
                  stop: _Stop) -> Any:
        raise NotImplementedError

    def hold_agent(self, agent: Any, started: concurrent.futures.Future[None],
                   stop: _Stop) -> Any:
        raise NotImplementedError

    def dispatch_many(self, server: Any, instance_id: str, capability: str,
                      arguments: list[dict[str, Any]], deadline_ms: int) -> Any:
        raise NotImplementedError


class AsyncioDriver(Driver):
    name = "asyncio"
    module = "svantic_adapters.asyncio"

    def runner(self) -> Runner:
        return AsyncioRunner()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def handlers(self, behaviours: Mapping[str, Behaviour], log: HandlerLog
                 ) -> dict[str, Callable[..., Any]]:
        return {name: async_handler(b, log, self.sleep) for name, b in behaviours.items()}

    def token_provider(self, fetch: Callable[[], str]) -> Callable[[], Any]:
        async def provide() -> str:
            return fetch()

        return provide

    def new_event(self) -> Any:
        return asyncio.Event()

    async def hold_mesh(self, server: Any, started: concurrent.futures.Future[int],
                        stop: _Stop) -> None:
        # start() and close() in one task: anyio's server holds a task group between them.
        try:
            _, port = await server.start(HOST, 0)
        except BaseException as exc:
            started.set_exception(exc)
            raise
        started.set_result(port)
        await stop.event.wait()
        await server.close(stop.grace)

    async def hold_agent(self, agent: Any, started: concurrent.futures.Future[None],
                         stop: _Stop) -> None:
        # One task enters and leaves the agent: anyio's task groups require it.
        try:
            async with agent:
                started.set_result(None)
                await stop.event.wait()
                await agent.stop(stop.grace)
        except BaseException as exc:
            if started.done():
                raise
            started.set_exception(exc)
            with contextlib.suppress(BaseException):
                await agent.stop(0)  # interrupted before its welcome: do not leave it retrying

    async def gather(self, calls: list[Callable[[], Any]]) -> list[Any]:
        return list(await asyncio.gather(*(call() for call in calls), return_exceptions=True))

    async def dispatch_many(self, server: Any, instance_id: str, capability: str,
                            arguments: list[dict[str, Any]], deadline_ms: int) -> list[Any]:
        def one(args: dict[str, Any]) -> Callable[[], Any]:
            return lambda: server.dispatch(instance_id, capability, args, deadline_ms=deadline_ms)

        return await self.gather([one(args) for args in arguments])


class AnyioDriver(AsyncioDriver):
    """The anyio adapter: async, the same public names as the asyncio one, one task group."""

    module = "svantic_adapters.anyio"

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.name = f"anyio-{backend}"
        self.requires = ("anyio", backend) if backend != "asyncio" else ("anyio",)

    def runner(self) -> Runner:
        return AnyioRunner(self.backend)

    async def sleep(self, seconds: float) -> None:
        import anyio

        await anyio.sleep(seconds)

    def new_event(self) -> Any:
        import anyio

        return anyio.Event()

    async def gather(self, calls: list[Callable[[], Any]]) -> list[Any]:
        import anyio

        results: list[Any] = [None] * len(calls)

        async def run(index: int, call: Callable[[], Any]) -> None:
            try:
                results[index] = await call()
            except Exception as exc:
                results[index] = exc

        async with anyio.create_task_group() as group:
            for index, call in enumerate(calls):
                group.start_soon(run, index, call)
        return results


class GeventDriver(Driver):
    """The gevent adapter: blocking calls and sync handlers, run in greenlets of one hub."""

    name = "gevent"
    module = "svantic_adapters.gevent"
    requires = ("gevent",)

    def runner(self) -> Runner:
        return GeventRunner()

    def server_ssl(self, certs: Certs) -> ssl.SSLContext:
        import gevent.ssl

        return certs.server_context(gevent.ssl.SSLContext)

    def client_ssl(self, certs: Certs) -> ssl.SSLContext:
        import gevent.ssl

        return certs.client_context(gevent.ssl.SSLContext)

    def handlers(self, behaviours: Mapping[str, Behaviour], log: HandlerLog
                 ) -> dict[str, Callable[..., Any]]:
        import gevent

        return {name: sync_handler(b, log, gevent.sleep) for name, b in behaviours.items()}

    def token_provider(self, fetch: Callable[[], str]) -> Callable[[], Any]:
        return fetch

    def new_event(self) -> Any:
        import gevent.event

        return gevent.event.Event()

    def hold_mesh(self, server: Any, started: concurrent.futures.Future[int],
                  stop: _Stop) -> None:
        try:
            _, port = server.start(HOST, 0)
        except BaseException as exc:
            started.set_exception(exc)
            raise
        started.set_result(port)
        stop.event.wait()
        server.close(stop.grace)

    def hold_agent(self, agent: Any, started: concurrent.futures.Future[None],
                   stop: _Stop) -> None:
        try:
            agent.__enter__()
        except BaseException as exc:
            if not started.done():
                started.set_exception(exc)
            with contextlib.suppress(BaseException):
                agent.stop(0)
            return
        started.set_result(None)
        stop.event.wait()
        agent.stop(stop.grace)

    def dispatch_many(self, server: Any, instance_id: str, capability: str,
                      arguments: list[dict[str, Any]], deadline_ms: int) -> list[Any]:
        import gevent

        def one(args: dict[str, Any]) -> Any:
            try:
                return server.dispatch(instance_id, capability, args, deadline_ms=deadline_ms)
            except Exception as exc:
                return exc

        greenlets = [gevent.spawn(one, args) for args in arguments]
        gevent.joinall(greenlets)
        return [g.value for g in greenlets]


DRIVERS: dict[str, Driver] = {
    driver.name: driver
    for driver in (
        AsyncioDriver(), AnyioDriver("asyncio"), AnyioDriver("trio"), GeventDriver(),
    )
}


# -- the two sides, as the test body sees them -------------------------------------------------


class MeshSide:
    """A mesh server of adapter `kind` on 127.0.0.1, in its own thread."""

    def __init__(self, kind: str, certs: Certs, config: Config | None = None,
                 registry: Registry | None = None, **server_options: Any) -> None:
        self.kind = kind
        self.driver = DRIVERS[kind]
        self.config = config or Config()
        self.registry = registry or Registry()
        self._events: list[tuple[float, Event]] = []
        self._events_lock = threading.Lock()
        self.runner = self.driver.runner()
        self.runner.start()
        module = self.driver.adapter()
        mint = jwt_dispatch_auth(DispatchAuthMinter(TEST_SIGNING_SECRET))
        ssl_context = self.driver.server_ssl(certs)

        def build() -> Any:
            server = module.MeshServer(
                ssl_context=ssl_context, verify_token=self.registry.verify_token,
                lookup_instance=self.registry.lookup_instance, dispatch_auth=mint,
                config=self.config, **server_options)
            server.on_event = self._record
            return server

        self.server = self.runner.call(build, what="build the mesh")
        started: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._stop = _Stop(None)

        def hold() -> Any:
            self._stop.event = self.driver.new_event()
            return self.driver.hold_mesh(self.server, started, self._stop)

        self._holder = self.runner.submit(hold)
        try:
            self.port = started.result(CALL_TIMEOUT)
        except BaseException:
            self.runner.stop()
            raise
        self.url = f"wss://{HOST}:{self.port}/agents/connect"
        self.closed = False

    def _record(self, link: Any, event: Event) -> None:
        with self._events_lock:
            self._events.append((time.monotonic(), event))

    def events(self, kind: type[Event] | None = None,
               since: float = 0.0) -> list[tuple[float, Event]]:
        with self._events_lock:
            return [(t, e) for t, e in self._events
                    if t >= since and (kind is None or isinstance(e, kind))]

    def call(self, fn: Callable[[], Any], timeout: float = CALL_TIMEOUT, what: str = "") -> Any:
        return self.runner.call(fn, timeout, f"{self.kind} mesh: {what}")

    def link(self, instance_id: str) -> Any:
        """The server's current handle on this agent, or None."""
        return self.call(lambda: self.server.agents.get(instance_id), what="read agents")

    def wait_for_agent(self, instance_id: str, timeout: float = CALL_TIMEOUT,
                       other_than: Any = None) -> Any:
        """Wait until `instance_id` has a session (a new one when `other_than` is given)."""
        def ready() -> Any:
            link = self.link(instance_id)
            return link if link is not None and link is not other_than else None

        return wait_until(ready, timeout, f"{instance_id} to connect to the {self.kind} mesh")

    def link_closed(self, link: Any) -> bool:
        return bool(self.call(lambda: link.conn.closed, what="read link state"))

    def link_stats(self, link: Any) -> Any:
        return self.call(lambda: link.conn.stats, what="read link stats")

    def submit_dispatch(self, instance_id: str, capability: str,
                        arguments: Mapping[str, Any] | None = None, *, deadline_ms: int = 5000,
                        on_chunk: Callable[[Any], object] | None = None,
                        ) -> concurrent.futures.Future[Any]:
        options: dict[str, Any] = {"deadline_ms": deadline_ms}
        if on_chunk is not None:
            options["on_chunk"] = on_chunk
        return self.runner.submit(
            lambda: self.server.dispatch(instance_id, capability, dict(arguments or {}),
                                         **options))

    def dispatch(self, instance_id: str, capability: str,
                 arguments: Mapping[str, Any] | None = None, *, deadline_ms: int = 5000,
                 on_chunk: Callable[[Any], object] | None = None,
                 timeout: float = CALL_TIMEOUT) -> Any:
        """The dispatch's result, or its `DispatchError`, raised here."""
        future = self.submit_dispatch(instance_id, capability, arguments,
                                      deadline_ms=deadline_ms, on_chunk=on_chunk)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise TimeoutError(f"{self.kind} mesh: dispatch {capability} got no outcome "
                               f"in {timeout} s") from None

    def dispatch_many(self, instance_id: str, capability: str,
                      arguments: list[dict[str, Any]], *, deadline_ms: int = 20_000,
                      timeout: float = 30.0) -> list[Any]:
        return list(self.call(
            lambda: self.driver.dispatch_many(self.server, instance_id, capability, arguments,
                                              deadline_ms),
            timeout, f"{len(arguments)} dispatches"))

    def close_soon(self, grace: float = 0.0) -> concurrent.futures.Future[Any]:
        """Start the graceful shutdown (close_request, drain, 1001); returns its Future."""
        self.closed = True
        self._stop.grace = grace
        self.call(self._stop.event.set, what="start closing")
        return self._holder

    def close(self, grace: float = 0.0, timeout: float = CALL_TIMEOUT) -> None:
        holder = self._holder if self.closed else self.close_soon(grace)
        try:
            holder.result(timeout)
        finally:
            self.runner.stop()

    def shutdown(self) -> None:
        """Teardown: close if still open, never raise."""
        with contextlib.suppress(BaseException):
            if not self.closed:
                self.close(0.0, timeout=5.0)
        self.runner.stop()


class AgentSide:
    """An agent of adapter `kind` in its own thread.

    `capabilities` maps names to behaviours (see `BEHAVIOURS`, the default: echo,
    stream, fail, block), which the driver turns into handlers of its own kind.
    """

    def __init__(self, kind: str, url: str, certs: Certs, *, instance_id: str,
                 token: str = GOOD_TOKEN, config: Config | None = None,
                 token_provider: Callable[[], str] | None = None,
                 capabilities: Mapping[str, Behaviour] = BEHAVIOURS,
                 trust_cafile: bool = False, log: HandlerLog | None = None) -> None:
        self.kind = kind
        self.driver = DRIVERS[kind]
        self.instance_id = instance_id
        self.log = log or HandlerLog()
        self.runner = self.driver.runner()
        self.runner.start()
        module = self.driver.adapter()
        verifier = DispatchAuthVerifier(instance_id, hs256_keys=[TEST_SIGNING_SECRET])
        options: dict[str, Any] = {
            "token": token, "instance_id": instance_id, "dispatch_auth": verifier,
            "agent_type": "scenario-agent", "config": config or Config(),
        }
        if trust_cafile:  # the adapter builds its own context from a CA file
            options["cafile"] = str(certs.cafile)
        else:
            options["ssl_context"] = self.driver.client_ssl(certs)
        if token_provider is not None:
            options["token_provider"] = self.driver.token_provider(token_provider)
        handlers = self.driver.handlers(capabilities, self.log)

        def build() -> Any:
            agent = module.Agent(url, **options)
            for name, handler in handlers.items():
                agent.add(name, handler)
            return agent

        self.agent = self.runner.call(build, what=f"{kind} agent: build")
        self._stop = _Stop(None)
        self._holder: concurrent.futures.Future[Any] | None = None

    def start(self, timeout: float = CALL_TIMEOUT) -> None:
        """Connect; returns after the first welcome, raises the final refusal (spec 5)."""
        started: concurrent.futures.Future[None] = concurrent.futures.Future()

        def hold() -> Any:
            self._stop.event = self.driver.new_event()
            return self.driver.hold_agent(self.agent, started, self._stop)

        self._holder = self.runner.submit(hold)
        try:
            started.result(timeout)
        except TimeoutError:
            raise TimeoutError(f"{self.kind} agent: no welcome within {timeout} s") from None

    def stop_soon(self, grace: float = 0.0) -> concurrent.futures.Future[Any]:
        """Start stopping (close_request with `grace`, then 1000); returns its Future."""
        assert self._holder is not None, "start() first"
        self._stop.grace = grace
        self.runner.call(self._stop.event.set, what=f"{self.kind} agent: stop")
        return self._holder

    def stop(self, grace: float = 0.0, timeout: float = CALL_TIMEOUT) -> None:
        if self._holder is not None and not self._holder.done():
            self.stop_soon(grace).result(timeout)

    def stats(self) -> Any:
        """The current connection's counters, or None when the adapter does not expose them."""
        def read() -> Any:
            conn = getattr(self.agent, "conn", None)
            return None if conn is None else conn.stats

        return self.runner.call(read, what=f"{self.kind} agent: read stats")

    def shutdown(self) -> None:
        with contextlib.suppress(BaseException):
            self.stop(0.0, timeout=5.0)
        self.runner.stop()


# -- fault injection ---------------------------------------------------------------------------


@dataclass
class _ProxiedConnection:
    client: socket.socket
    upstream: socket.socket
    stalled: bool = False
    cut: bool = False
    eof_at: dict[str, float] = field(default_factory=dict)
    threads: list[threading.Thread] = field(default_factory=list)


class _LoopbackListener:
    """A listener on 127.0.0.1 whose thread hands each accepted socket to `_accepted`.
    Subclasses set their own state before calling `__init__`, which starts the thread."""

    def __init__(self, name: str) -> None:
        self._listener = socket.create_server((HOST, 0))
        self._listener.settimeout(0.05)
        self.port: int = self._listener.getsockname()[1]
        self._closing = False
        self._thread = threading.Thread(target=self._accept_loop, daemon=True, name=name)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"wss://{HOST}:{self.port}/agents/connect"

    def _accept_loop(self) -> None:
        while not self._closing:
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._accepted(sock)

    def _accepted(self, sock: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._closing = True
        self._thread.join(1.0)
        self._listener.close()


class TcpProxy(_LoopbackListener):
    """A loopback TCP proxy in front of a mesh that can fail like a network does.

    `stall()` makes the current connections go silent both ways (bytes are read
    and dropped, closes are not passed on), as a peer that vanished without a
    FIN. `cut()` resets them at once. `eof_at` records when each end hung up, so
    a test can measure when each side gave up. New connections go to `target_port`.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.accepted_at: list[float] = []
        self.upstream_failures = 0
        self.connections: list[_ProxiedConnection] = []
        self._lock = threading.Lock()
        super().__init__("tcp-proxy")

    def _accepted(self, client: socket.socket) -> None:
        with self._lock:
            self.accepted_at.append(time.monotonic())
        try:
            upstream = socket.create_connection((HOST, self.target_port), timeout=2)
        except OSError:
            with self._lock:
                self.upstream_failures += 1
            _reset(client)
            return
        client.settimeout(None)
        upstream.settimeout(None)
        connection = _ProxiedConnection(client, upstream)
        for source, sink, end in ((client, upstream, "client"),
                                  (upstream, client, "upstream")):
            thread = threading.Thread(target=self._pump, daemon=True,
                                      args=(connection, source, sink, end))
            connection.threads.append(thread)
        with self._lock:
            self.connections.append(connection)
        for thread in connection.threads:
            thread.start()

    def _pump(self, connection: _ProxiedConnection, source: socket.socket,
              sink: socket.socket, end: str) -> None:
        while not connection.cut:
            try:
                readable, _, _ = select.select([source], [], [], 0.05)
                if not readable:
                    continue
                data = source.recv(65536)
            except (OSError, ValueError):
                data = b""
            if not data:
                connection.eof_at.setdefault(end, time.monotonic())
                if not connection.stalled:
                    with contextlib.suppress(OSError):
                        sink.shutdown(socket.SHUT_WR)
                return
            if connection.stalled:
                continue  # the network ate it
            try:
                sink.sendall(data)
            except OSError:
                return

    def live(self) -> list[_ProxiedConnection]:
        with self._lock:
            return [c for c in self.connections if not c.cut and len(c.eof_at) < 2]

    def stall(self) -> list[_ProxiedConnection]:
        stalled = self.live()
        for connection in stalled:
            connection.stalled = True
        return stalled

    def cut(self) -> list[_ProxiedConnection]:
        return _cut(self.live())

    def close(self) -> None:
        super().close()
        with self._lock:
            connections = list(self.connections)
        _cut(connections)


def _cut(connections: list[_ProxiedConnection]) -> list[_ProxiedConnection]:
    """Stop the connections' pumps, then reset both ends of each."""
    for connection in connections:
        connection.cut = True
    for connection in connections:
        for thread in connection.threads:
            thread.join(1.0)
        _reset(connection.client)
        _reset(connection.upstream)
    return connections


def _reset(sock: socket.socket) -> None:
    """Close with RST, as a broken network path does."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class CannedHttpsServer(_LoopbackListener):
    """Answers every TLS connection's request with one fixed HTTP error (spec 1 body)."""

    def __init__(self, certs: Certs, status: int, code: str, message: str = "canned") -> None:
        body = json.dumps({"error": {"code": code, "message": message}}).encode()
        self.response = (
            f"HTTP/1.1 {status} Canned\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode() + body
        self._context = certs.server_context()
        self.requests: list[bytes] = []
        super().__init__("canned-https")

    def _accepted(self, raw: socket.socket) -> None:
        raw.settimeout(5)
        with contextlib.suppress(OSError), self._context.wrap_socket(
                raw, server_side=True) as conn:
            request = b""
            while b"\r\n\r\n" not in request:
                data = conn.recv(4096)
                if not data:
                    break
                request += data
            self.requests.append(request)
            conn.sendall(self.response)


def raw_upgrade(port: int, certs: Certs, target: str, headers: Iterable[tuple[str, str]]
                ) -> tuple[int, dict[str, str], dict[str, Any]]:
    """Send a hand-written upgrade request; return the status, headers and JSON body."""
    lines = [f"GET {target} HTTP/1.1", f"Host: {HOST}:{port}"]
    lines += [f"{name}: {value}" for name, value in headers]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode()
    context = certs.client_context()
    with socket.create_connection((HOST, port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname=HOST) as conn:
        conn.sendall(request)
        response = b""
        while True:
            try:
                data = conn.recv(65536)
            except (ssl.SSLError, OSError):
                break
            if not data:
                break
            response += data
            head, _, body = response.partition(b"\r\n\r\n")
            length = _content_length(head)
            if length is not None and len(body) >= length:
                break
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    fields = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    return int(status_line.split(" ", 2)[1]), fields, json.loads(body) if body else {}


def _content_length(head: bytes) -> int | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return None


def upgrade_headers(*, subprotocol: str = "svantic.v1", token: str | None = GOOD_TOKEN,
                    upgrade: bool = True) -> list[tuple[str, str]]:
    headers = [
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Protocol", subprotocol),
    ]
    if upgrade:
        headers += [("Upgrade", "websocket"), ("Connection", "Upgrade")]
    if token is not None:
        headers.append(("Authorization", f"Bearer {token}"))
    return headers


class SilentListener(_LoopbackListener):
    """Accepts TCP and never answers: a TLS handshake to it never completes.

    What a client sends (its ClientHello) is read and dropped; `accepted_at` records each
    connection, `eof_at` when its client hung up, so a test can see a dial abandoned.
    """

    def __init__(self) -> None:
        self.accepted_at: list[float] = []
        self.eof_at: list[float] = []
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        super().__init__("silent-listener")

    def _accepted(self, sock: socket.socket) -> None:
        with self._lock:
            self.accepted_at.append(time.monotonic())
            self._sockets.append(sock)
        threading.Thread(target=self._drain, args=(sock,), daemon=True,
                         name="silent-listener-conn").start()

    def _drain(self, sock: socket.socket) -> None:
        while not self._closing:
            try:
                readable, _, _ = select.select([sock], [], [], 0.05)
                if not readable:
                    continue
                data = sock.recv(65536)
            except (OSError, ValueError):
                data = b""
            if not data:
                with self._lock:
                    self.eof_at.append(time.monotonic())
                return

    def close(self) -> None:
        super().close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.close()


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released): a dial to it is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
    return port


# -- one test's sides, torn down together ------------------------------------------------------

BASE = Config(hello_timeout=5.0, close_timeout=1.0, reconnect_base_delay=0.25)
"""Spec 4-5: every time is configurable and tests use small ones; backoff starts at 0.25 s."""


class Scenario:
    """Builds sides and fault injectors for one test and tears all of them down."""

    def __init__(self, certs: Certs) -> None:
        self.certs = certs
        self._agents: list[AgentSide] = []
        self._meshes: list[MeshSide] = []
        self._closers: list[Callable[[], None]] = []

    def mesh(self, kind: str, config: Config = BASE, registry: Registry | None = None,
             **server_options: Any) -> MeshSide:
        mesh = MeshSide(kind, self.certs, config, registry, **server_options)
        self._meshes.append(mesh)
        return mesh

    def agent(self, kind: str, url: str, *, start: bool = True, config: Config = BASE,
              certs: Certs | None = None, **options: Any) -> AgentSide:
        """An agent, started unless `start=False`; `certs` gives it another CA to trust."""
        options.setdefault("instance_id", new_instance_id())
        agent = AgentSide(kind, url, certs or self.certs, config=config, **options)
        self._agents.append(agent)
        if start:
            agent.start()
        return agent

    def proxy(self, target_port: int) -> TcpProxy:
        proxy = TcpProxy(target_port)
        self._closers.append(proxy.close)
        return proxy

    def canned(self, status: int, code: str) -> CannedHttpsServer:
        server = CannedHttpsServer(self.certs, status, code)
        self._closers.append(server.close)
        return server

    def silent(self) -> SilentListener:
        listener = SilentListener()
        self._closers.append(listener.close)
        return listener

    def teardown(self) -> None:
        for agent in self._agents:
            agent.shutdown()
        for mesh in self._meshes:
            mesh.shutdown()
        for close in self._closers:
            close()
        sides: list[AgentSide | MeshSide] = [*self._agents, *self._meshes]
        stuck = [f"{side.kind} {type(side).__name__}" for side in sides if side.runner.alive]
        assert not stuck, f"these loops did not stop after shutdown: {stuck}"


def new_instance_id(prefix: str = "agent") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"
