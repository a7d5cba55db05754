"""The agent's lifecycle, one behavioural suite run unchanged over every adapter's agent.

Against the asyncio (reference) mesh, or a fault injector from harness.py, over real TLS
on 127.0.0.1: `stop()` ends the agent within `Config.close_timeout` whatever it is doing
(dialling, backing off, connected); a handler killed by something other than the mesh's
`cancel` is still answered; a refused agent logs every attempt under `svantic.agent`; the
final handshake refusals (spec 5) raise their own `HandshakeRejected` subclass after one
attempt. An adapter whose module does not exist yet is skipped, as in test_scenarios.py.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
from harness import (
    BASE,
    CALL_TIMEOUT,
    DRIVERS,
    HOST,
    AgentSide,
    AnyioDriver,
    Certs,
    GeventDriver,
    HandlerLog,
    MeshSide,
    Scenario,
    closed_port,
    wait_until,
)

from svantic_proto import (
    Config,
    DeploymentModeMismatch,
    HandshakeRejected,
    InstanceNotFound,
    MissingInstanceId,
    TenantMismatch,
    UpgradeRequired,
)
from svantic_proto.errors import DispatchError

MESH = "asyncio"
"""The reference mesh: what is tested here is the agent."""
FIRST_BACKOFF_MAX = BASE.reconnect_base_delay * 1.25
"""Spec 5: the first reconnect waits base x [0.75, 1.25]; proving "no retry" needs that long."""
FAST_RETRY = replace(BASE, reconnect_base_delay=0.05, reconnect_max_delay=0.2)
"""Refused again and again: several attempts in well under a second."""
STOP_MARGIN = 0.5
"""Scheduling slack on top of `close_timeout` for a busy 2-core machine."""
AGENT_LOG = "svantic.agent"


def _marks(*kinds: str) -> list[pytest.MarkDecorator]:
    reasons = [r for r in (DRIVERS[k].skip_reason() for k in kinds) if r is not None]
    return [pytest.mark.skip(reason="; ".join(reasons))] if reasons else []


KIND_PARAMS = [pytest.param(kind, id=kind, marks=_marks(kind, MESH)) for kind in DRIVERS]


def stays(predicate: Callable[[], bool], duration: float) -> bool:
    """True when `predicate` holds for the whole `duration` (an absence is only shown by
    watching for as long as the thing could take to happen)."""
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        if not predicate():
            return False
        time.sleep(0.02)
    return predicate()


# -- each adapter's own way to run, stop and kill ----------------------------------------------


def _is_gevent(side: AgentSide) -> bool:
    return isinstance(side.driver, GeventDriver)


def run_agent(side: AgentSide) -> concurrent.futures.Future[float]:
    """`run()` in the side's loop, without waiting for a welcome. The Future's result is
    when run() returned (`time.monotonic()`); its exception is what run() raised."""
    agent = side.agent
    if _is_gevent(side):
        def hold() -> float:
            agent.run()
            return time.monotonic()
    else:
        async def hold() -> float:  # type: ignore[misc]
            await agent.run()
            return time.monotonic()
    return side.runner.submit(hold)


def stop_agent(side: AgentSide, timeout: float = CALL_TIMEOUT) -> tuple[float, float]:
    """`stop()` in the side's loop; returns when it was called and when it returned."""
    agent = side.agent
    if _is_gevent(side):
        def stop() -> tuple[float, float]:
            began = time.monotonic()
            agent.stop()
            return began, time.monotonic()
    else:
        async def stop() -> tuple[float, float]:  # type: ignore[misc]
            began = time.monotonic()
            await agent.stop()
            return began, time.monotonic()
    result: tuple[float, float] = side.runner.call(stop, timeout, f"{side.kind} agent: stop()")
    return result


def killed_handler(side: AgentSide, log: HandlerLog) -> Callable[..., Any]:
    """A handler that ends by a cancellation nobody at the mesh asked for (not a `cancel`,
    not its deadline): the adapter's own kind of kill, raised from inside the handler."""
    driver = side.driver
    if isinstance(driver, GeventDriver):
        import gevent

        def killed_greenlet(arguments: Any, context: Any) -> Any:
            log.started(context.dispatch_id)
            raise gevent.GreenletExit

        return killed_greenlet
    if isinstance(driver, AnyioDriver):
        on_trio = driver.backend == "trio"

        async def killed_anyio(arguments: Any, context: Any) -> Any:
            import anyio

            log.started(context.dispatch_id)
            cancelled = anyio.get_cancelled_exc_class()
            if not on_trio:
                raise cancelled()
            # trio.Cancelled has no public constructor: take a real one from a scope
            # cancelled here and let it out of that scope, as a foreign cancellation leaves.
            escaped: BaseException | None = None
            with anyio.CancelScope() as scope:
                scope.cancel()
                try:
                    await anyio.sleep(CALL_TIMEOUT)
                except cancelled as exc:
                    escaped = exc
            assert escaped is not None
            raise escaped

        return killed_anyio

    async def killed_task(arguments: Any, context: Any) -> Any:
        log.started(context.dispatch_id)
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        await asyncio.sleep(CALL_TIMEOUT)

    return killed_task


# -- sides and fault injectors, torn down whatever happened ------------------------------------


class Lifecycle(Scenario):
    """`Scenario`, plus agents run in the background (`run()`) and stopped at teardown."""

    def __init__(self, certs: Certs) -> None:
        super().__init__(certs)
        self._running: list[tuple[AgentSide, concurrent.futures.Future[float]]] = []

    def mesh(self, kind: str = MESH, config: Config = BASE, registry: Any = None,
             **server_options: Any) -> MeshSide:
        return super().mesh(kind, config, registry, **server_options)

    def agent(self, kind: str, url: str, *, start: bool = False, config: Config = BASE,
              certs: Certs | None = None, **options: Any) -> AgentSide:
        """An agent, built but not started."""
        return super().agent(kind, url, start=start, config=config, certs=certs, **options)

    def run(self, agent: AgentSide) -> concurrent.futures.Future[float]:
        running = run_agent(agent)
        self._running.append((agent, running))
        return running

    def teardown(self) -> None:
        for agent, running in self._running:
            if not running.done():
                with contextlib.suppress(BaseException):
                    stop_agent(agent, timeout=5.0)
        super().teardown()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def stranger_certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """Another private CA: it did not sign the certificate `certs`' servers present."""
    return Certs(tmp_path_factory.mktemp("stranger-certs"))


@pytest.fixture
def lifecycle(certs: Certs) -> Iterator[Lifecycle]:
    built = Lifecycle(certs)
    try:
        yield built
    finally:
        built.teardown()


def agent_lines(caplog: pytest.LogCaptureFixture, agent: AgentSide, *needles: str) -> list[str]:
    """This agent's `svantic.agent` log lines that contain every one of `needles`.
    (Agents log from their own threads; caplog's handler sees every thread's records.)"""
    lines = []
    for record in list(caplog.records):
        if record.name != AGENT_LOG:
            continue
        message = record.getMessage()
        if agent.instance_id in message and all(needle in message for needle in needles):
            lines.append(message)
    return lines


# -- stop() is prompt in every state ---------------------------------------------------------


@pytest.mark.parametrize("state", ["dialling", "backoff", "ready"])
@pytest.mark.parametrize("kind", KIND_PARAMS)
def test_stop_returns_within_close_timeout(lifecycle: Lifecycle, caplog: pytest.LogCaptureFixture,
                                           kind: str, state: str) -> None:
    caplog.set_level(logging.INFO, logger=AGENT_LOG)
    mesh: MeshSide | None = None
    if state == "dialling":
        # TCP is accepted, TLS never answered; hello_timeout is far off: still dialling.
        silent = lifecycle.silent()
        agent = lifecycle.agent(kind, silent.url, config=replace(BASE, hello_timeout=60.0))
        running = lifecycle.run(agent)
        wait_until(lambda: silent.accepted_at, 5.0, "the agent's TCP connection")
    elif state == "backoff":
        # Refused at once, then a 6-10 s backoff (base 8 s): stop() must not wait it out.
        url = f"wss://{HOST}:{closed_port()}/agents/connect"
        agent = lifecycle.agent(kind, url, config=replace(BASE, reconnect_base_delay=8.0))
        running = lifecycle.run(agent)
        wait_until(lambda: agent_lines(caplog, agent, "retrying in"), 5.0,
                   "the agent to back off after a refused dial")
    else:
        mesh = lifecycle.mesh()
        agent = lifecycle.agent(kind, mesh.url)
        running = lifecycle.run(agent)
        link = mesh.wait_for_agent(agent.instance_id)
        # Answered a dispatch: its session is up, and nothing is in flight any more.
        assert mesh.dispatch(agent.instance_id, "echo", {"ready": 1}) == {"ready": 1}
    limit = BASE.close_timeout + STOP_MARGIN
    began, returned = stop_agent(agent, timeout=limit + 5.0)
    assert returned - began < limit, f"stop() took {returned - began:.2f} s while {state}"
    # run() ended too, no later than stop() allows, and without an error.
    run_ended = running.result(timeout=limit + 2.0)
    assert run_ended - began < limit, f"run() returned {run_ended - began:.2f} s after stop()"
    if mesh is not None:
        wait_until(lambda: mesh.link_closed(link), 2.0, "the mesh to see the agent go")


@pytest.mark.parametrize("kind", KIND_PARAMS)
def test_stop_while_dialling_drops_the_unfinished_connection(lifecycle: Lifecycle,
                                                            kind: str) -> None:
    silent = lifecycle.silent()
    agent = lifecycle.agent(kind, silent.url, config=replace(BASE, hello_timeout=60.0))
    lifecycle.run(agent)
    wait_until(lambda: silent.accepted_at, 5.0, "the agent's TCP connection")
    began, _ = stop_agent(agent)
    # Not left half-open until hello_timeout (60 s here), with the loop still running.
    wait_until(lambda: silent.eof_at, BASE.close_timeout + STOP_MARGIN,
               "the abandoned dial's socket to close")
    assert silent.eof_at[0] - began < BASE.close_timeout + STOP_MARGIN
    assert len(silent.accepted_at) == 1  # and no dial after stop()


# -- a handler killed by something else is still answered ------------------------------------


@pytest.mark.parametrize("kind", KIND_PARAMS)
def test_killed_handler_is_answered_dispatch_failed_at_once(lifecycle: Lifecycle,
                                                            kind: str) -> None:
    mesh = lifecycle.mesh()
    agent = lifecycle.agent(kind, mesh.url)
    handler = killed_handler(agent, agent.log)
    agent.runner.call(lambda: agent.agent.add("killed", handler), what="add the handler")
    agent.start()
    mesh.wait_for_agent(agent.instance_id)
    began = time.monotonic()
    with pytest.raises(DispatchError) as raised:
        mesh.dispatch(agent.instance_id, "killed", deadline_ms=20_000, timeout=CALL_TIMEOUT)
    elapsed = time.monotonic() - began
    assert raised.value.code == "DISPATCH_FAILED", raised.value
    assert "gave no answer" in str(raised.value.message), raised.value
    assert elapsed < 3.0, f"answered after {elapsed:.2f} s: a deadline, not the kill"
    assert agent.log.runs[raised.value.dispatch_id] == 1
    # The kill ended that handler only: the agent and its connection carry on.
    assert mesh.dispatch(agent.instance_id, "echo", {"still": "up"}) == {"still": "up"}


# -- a refused agent says so, attempt after attempt ------------------------------------------


@pytest.mark.parametrize("refusal", ["401", "tls"])
@pytest.mark.parametrize("kind", KIND_PARAMS)
def test_refused_agent_logs_every_attempt(lifecycle: Lifecycle, caplog: pytest.LogCaptureFixture,
                                          stranger_certs: Certs, kind: str, refusal: str
                                          ) -> None:
    caplog.set_level(logging.INFO, logger=AGENT_LOG)
    server = lifecycle.canned(401, "UNAUTHORIZED")
    if refusal == "401":  # no token provider: retried with the same token, with backoff
        agent = lifecycle.agent(kind, server.url, config=FAST_RETRY)
        needles: tuple[str, ...] = ("401", "UNAUTHORIZED")
    else:  # the agent trusts a CA that did not sign the server's certificate
        agent = lifecycle.agent(kind, server.url, config=FAST_RETRY, certs=stranger_certs)
        needles = ("TLS",)
    lifecycle.run(agent)
    wait_until(lambda: len(agent_lines(caplog, agent, *needles)) >= 3, 10.0,
               f"three refusals logged ({' '.join(needles)})")
    stop_agent(agent)
    refused = agent_lines(caplog, agent, *needles)
    dials = agent_lines(caplog, agent, "dialling")
    retries = agent_lines(caplog, agent, "retrying in")
    assert len(refused) >= 3, refused
    # Every attempt says why it failed: at most the one in progress at stop() has no line.
    assert len(dials) - 1 <= len(refused) <= len(dials), (dials, refused)
    assert len(retries) >= 2, retries
    if refusal == "401":
        assert len(server.requests) - 1 <= len(refused) <= len(server.requests)
    else:
        assert not server.requests  # never past TLS
        assert all("certificate" in line.lower() for line in refused), refused


# -- final refusals: typed, and not retried --------------------------------------------------


FINAL_REFUSALS: list[tuple[int, str, type[HandshakeRejected]]] = [
    (400, "MISSING_INSTANCE_ID", MissingInstanceId),
    (403, "TENANT_MISMATCH", TenantMismatch),
    (404, "INSTANCE_NOT_FOUND", InstanceNotFound),
    (409, "DEPLOYMENT_MODE_MISMATCH", DeploymentModeMismatch),
    (426, "UPGRADE_REQUIRED", UpgradeRequired),
]
"""Spec 5: final statuses. test_scenarios.py covers entering the agent for 400 (canned)
and 403/404/409 (a real mesh); 426 and `run()` are covered here."""


@pytest.mark.parametrize("kind", KIND_PARAMS)
def test_426_raises_upgrade_required_on_entering_and_is_not_retried(lifecycle: Lifecycle,
                                                                    kind: str) -> None:
    server = lifecycle.canned(426, "UPGRADE_REQUIRED")
    agent = lifecycle.agent(kind, server.url)
    with pytest.raises(UpgradeRequired) as raised:
        agent.start()  # `async with agent` / `agent.__enter__()`
    assert isinstance(raised.value, HandshakeRejected)
    assert (raised.value.status, raised.value.code) == (426, "UPGRADE_REQUIRED")
    assert stays(lambda: len(server.requests) == 1, FIRST_BACKOFF_MAX + 0.1)


@pytest.mark.parametrize("kind", KIND_PARAMS)
def test_run_raises_each_final_refusal_typed_after_one_attempt(lifecycle: Lifecycle,
                                                               kind: str) -> None:
    servers = []
    for status, code, error_type in FINAL_REFUSALS:
        assert issubclass(error_type, HandshakeRejected)
        server = lifecycle.canned(status, code)
        servers.append(server)
        agent = lifecycle.agent(kind, server.url)
        with pytest.raises(error_type) as raised:
            lifecycle.run(agent).result(CALL_TIMEOUT)
        assert type(raised.value) is error_type, raised.value
        assert (raised.value.status, raised.value.code) == (status, code)
    assert stays(lambda: [len(s.requests) for s in servers] == [1] * len(servers),
                 FIRST_BACKOFF_MAX + 0.1)
