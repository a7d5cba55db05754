"""The gevent adapter end to end: real TLS (trustme) on 127.0.0.1, no monkey-patching.

The mesh serves from one thread and the agent runs in another, each with its own
gevent hub; the test thread drives both through the adapter's blocking API, which
hands each call to the hub that owns the object. Every wait is bounded.
"""

from __future__ import annotations

import random
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

pytest.importorskip("gevent")
import gevent
import gevent.event
import gevent.ssl
import trustme
from svantic_adapters.gevent import Agent, MeshServer

from svantic_proto import (
    AgentSession,
    Config,
    DispatchAuthMinter,
    DispatchAuthVerifier,
    InstanceRecord,
    jwt_dispatch_auth,
)
from svantic_proto.backoff import Backoff
from svantic_proto.errors import DispatchError, HandlerError
from svantic_proto.handshake import HandshakeRejected

WAIT = 10.0
SECRET = "gevent-smoke-signing-secret"
TENANT = "tenant-1"
TOKEN = "transport-token"
CONFIG = Config(hello_timeout=5.0, close_timeout=2.0)
INSTANCES = {"agent-1": InstanceRecord("agent-1", TENANT, "connected", "smoke-agent")}

pytestmark = pytest.mark.timeout(60)


@dataclass(frozen=True)
class Claims:
    tenant_id: str
    sub: str = "client-1"


def verify_token(token: str) -> Claims:
    if token != TOKEN:
        raise ValueError("unknown token")
    return Claims(TENANT)


class HubThread(threading.Thread):
    """Runs `body` in a fresh thread, hence a fresh gevent hub, and keeps its outcome."""

    def __init__(self, body: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.body = body
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.body()
        except BaseException as exc:
            self.error = exc
        finally:
            gevent.get_hub().destroy(destroy_loop=True)

    def outcome(self) -> Any:
        self.join(WAIT)
        assert not self.is_alive(), "the gevent thread did not finish in time"
        if self.error is not None:
            raise self.error
        return self.result


@dataclass
class Tls:
    server: ssl.SSLContext
    client: ssl.SSLContext


@pytest.fixture(scope="module")
def tls() -> Tls:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)  # the standard library's
    ca.issue_cert("127.0.0.1").configure_cert(server)
    client = gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # gevent's own
    ca.configure_trust(client)
    return Tls(server, client)


@pytest.fixture
def mesh(tls: Tls) -> Iterator[tuple[MeshServer, int]]:
    server = MeshServer(ssl_context=tls.server, verify_token=verify_token,
                        lookup_instance=INSTANCES.get,
                        dispatch_auth=jwt_dispatch_auth(DispatchAuthMinter(SECRET)),
                        config=CONFIG)
    listening = threading.Event()
    address: list[tuple[str, int]] = []

    def serve() -> None:
        address.append(server.start("127.0.0.1", 0))
        listening.set()
        server.serve_forever()

    thread = HubThread(serve)
    thread.start()
    assert listening.wait(WAIT)
    yield server, address[0][1]
    server.close(grace=1)
    thread.outcome()


class Probe:
    """What the handlers report to the test thread."""

    def __init__(self) -> None:
        self.slow_started = threading.Event()
        self.release = gevent.event.Event()  # set from the test thread, waited in the agent's
        self.sleeper_killed = threading.Event()


def make_agent(port: int, tls: Tls, probe: Probe, instance_id: str = "agent-1") -> Agent:
    session = AgentSession(CONFIG)
    session.backoff = Backoff(random.Random(7).random, base=0.05, cap=0.2)  # fast reconnects
    agent = Agent(f"wss://127.0.0.1:{port}/agents/connect", token=TOKEN,
                  instance_id=instance_id, agent_type="smoke-agent",
                  dispatch_auth=DispatchAuthVerifier(instance_id, hs256_keys=[SECRET]),
                  ssl_context=tls.client, config=CONFIG, session=session)

    @agent.capability()
    def echo(arguments: Any, context: Any) -> Any:
        return {"echo": dict(arguments), "attempt": context.attempt}

    @agent.capability()
    def stream(arguments: Any, context: Any) -> str:
        for seq in range(arguments["count"]):
            context.chunk({"part": seq})
        return "streamed"

    @agent.capability()
    def boom(arguments: Any, context: Any) -> None:
        raise ValueError("the handler broke")

    @agent.capability()
    def locked(arguments: Any, context: Any) -> None:
        raise HandlerError("TICKET_LOCKED", "ticket is locked", {"ticket": "T-1"})

    @agent.capability()
    def slow(arguments: Any, context: Any) -> Any:
        probe.slow_started.set()
        return {"released": probe.release.wait(WAIT), "attempt": context.attempt}

    @agent.capability()
    def timed(arguments: Any, context: Any) -> Any:
        with gevent.Timeout(0.05, False):  # its first line: needs a greenlet that may wait
            gevent.sleep(WAIT)
            return "slept"
        return "timed out"

    @agent.capability()
    def sleeper(arguments: Any, context: Any) -> None:
        try:
            gevent.sleep(WAIT)
        except gevent.GreenletExit:
            probe.sleeper_killed.set()
            raise

    return agent


@pytest.fixture
def probe() -> Probe:
    return Probe()


def run_in_hub_thread(agent: Agent) -> HubThread:
    """`agent.run()` in a thread of its own hub, once `start()` has returned there."""
    started = threading.Event()

    def run() -> None:
        agent.start()
        started.set()
        agent.run()

    thread = HubThread(run)
    thread.start()
    assert started.wait(WAIT)
    return thread


@pytest.fixture
def agent(mesh: tuple[MeshServer, int], tls: Tls, probe: Probe) -> Iterator[Agent]:
    server, port = mesh
    agent = make_agent(port, tls, probe)
    thread = run_in_hub_thread(agent)
    assert agent.wait_ready(WAIT)
    server.wait_for_agent("agent-1", timeout=WAIT)
    yield agent
    agent.stop(grace=1)
    thread.outcome()


def test_dispatch_returns_the_handlers_result(mesh: Any, agent: Agent) -> None:
    server, _ = mesh
    result = server.dispatch("agent-1", "echo", {"ticket_id": "T-1"}, deadline_ms=5000)
    assert result == {"echo": {"ticket_id": "T-1"}, "attempt": 1}
    assert agent.handler_runs == 1


def test_streamed_chunks_arrive_in_order_before_the_result(mesh: Any, agent: Agent) -> None:
    server, _ = mesh
    chunks: list[Any] = []
    result = server.dispatch("agent-1", "stream", {"count": 5}, deadline_ms=5000,
                             on_chunk=chunks.append)
    assert result == "streamed"
    assert chunks == [{"part": seq} for seq in range(5)]


def test_handler_failures_become_dispatch_errors(mesh: Any, agent: Agent) -> None:
    server, _ = mesh
    with pytest.raises(DispatchError) as failed:
        server.dispatch("agent-1", "boom", {}, deadline_ms=5000)
    assert failed.value.code == "DISPATCH_FAILED"
    assert failed.value.message == "the handler raised ValueError"
    with pytest.raises(DispatchError) as refused:
        server.dispatch("agent-1", "locked", {}, deadline_ms=5000)
    assert refused.value.code == "TICKET_LOCKED"
    assert refused.value.detail == {"ticket": "T-1"}
    with pytest.raises(DispatchError) as missing:
        server.dispatch("agent-1", "no_such_capability", {}, deadline_ms=5000)
    assert missing.value.code == "CAPABILITY_NOT_FOUND"


def test_a_handler_that_waits_does_not_hold_up_the_connection(
    mesh: Any, agent: Agent, probe: Probe
) -> None:
    """Handlers start at once, in the reader's pass; one that waits hands the hub back."""
    server, _ = mesh
    caller = HubThread(lambda: server.dispatch("agent-1", "slow", {}, deadline_ms=20_000))
    caller.start()
    assert probe.slow_started.wait(WAIT)
    assert server.dispatch("agent-1", "echo", {"n": 1}, deadline_ms=5000)["echo"] == {"n": 1}
    assert server.dispatch("agent-1", "timed", {}, deadline_ms=5000) == "timed out"
    probe.release.set()
    assert caller.outcome() == {"released": True, "attempt": 1}
    assert agent.handler_runs == 3


def test_deadline_kills_the_handler_greenlet(mesh: Any, agent: Agent, probe: Probe) -> None:
    server, _ = mesh
    with pytest.raises(DispatchError) as timed_out:
        server.dispatch("agent-1", "sleeper", {}, deadline_ms=300)
    assert timed_out.value.code == "DEADLINE_EXCEEDED"  # whichever side gave up first
    assert probe.sleeper_killed.wait(WAIT)
    assert server.dispatch("agent-1", "echo", {}, deadline_ms=5000)["echo"] == {}


def test_tcp_cut_mid_dispatch_resumes_and_runs_the_handler_once(
    mesh: Any, agent: Agent, probe: Probe
) -> None:
    server, _ = mesh
    first_link = agent.link
    assert first_link is not None
    caller = HubThread(lambda: server.dispatch("agent-1", "slow", {}, deadline_ms=20_000))
    caller.start()
    assert probe.slow_started.wait(WAIT)
    first_link.abort()  # TCP gone, no close frame, while the handler is still running
    probe.release.set()
    assert caller.outcome() == {"released": True, "attempt": 1}
    assert agent.handler_runs == 1  # the replayed dispatch did not start a second run
    assert agent.link is not first_link
    session = agent.last_started
    assert session is not None and session.resumed
    assert len(session.replayed_dispatches) == 1
    assert agent.session.connections == 2


def test_final_refusal_raises_the_typed_handshake_error(
    mesh: Any, tls: Tls, probe: Probe
) -> None:
    _, port = mesh
    agent = make_agent(port, tls, probe, instance_id="ghost")
    thread = run_in_hub_thread(agent)
    with pytest.raises(HandshakeRejected) as refused:
        agent.wait_ready(WAIT)
    assert refused.value.status == 404
    with pytest.raises(HandshakeRejected):
        thread.outcome()
