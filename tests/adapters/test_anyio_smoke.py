"""The anyio adapter end to end on loopback with real TLS, on the asyncio and trio backends.

A `MeshServer` and an `Agent` talk `wss://127.0.0.1`: a dispatch returns its
result, streamed chunks arrive in order, handler failures carry their codes, a
deadline cancels the handler, a refused handshake raises the typed error, a TCP
connection cut mid-dispatch resumes with the handler run exactly once, and a mesh
shutdown lets in-flight work finish first.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import anyio
import pytest
import trustme
from svantic_adapters.anyio import (
    Agent,
    AgentLink,
    DispatchContext,
    DispatchError,
    HandlerError,
    MeshServer,
    connect,
)

from svantic_proto import (
    AgentSession,
    Config,
    DispatchAuthMinter,
    DispatchAuthVerifier,
    HandshakeRejected,
    InstanceRecord,
    TokenRefreshed,
    jwt_dispatch_auth,
)
from svantic_proto.backoff import Backoff

pytestmark = pytest.mark.anyio

SIGNING_SECRET = "anyio-smoke-dispatch-auth-secret"
TRANSPORT_TOKEN = "transport-token-for-tests"
FRESH_TOKEN = "fresh-transport-token-for-tests"
INSTANCE = "agent-1"
SECOND = "agent-2"
TENANT = "tenant-1"
TIME_LIMIT = 10.0
"""Seconds any one test may take before it fails (every wait is bounded by it)."""

INSTANCES = {iid: InstanceRecord(iid, TENANT, "connected", "smoke-agent")
             for iid in (INSTANCE, SECOND)}
TlsPair = tuple[ssl.SSLContext, ssl.SSLContext]


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def tls() -> TlsPair:
    """(server context, client context): a private CA that signed a cert for 127.0.0.1."""
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    return server_context, client_context


def verify_token(token: str) -> SimpleNamespace:
    if token == TRANSPORT_TOKEN:
        return SimpleNamespace(tenant_id=TENANT, sub="client-1", exp=None)
    if token == FRESH_TOKEN:
        return SimpleNamespace(tenant_id=TENANT, sub="client-1", exp=time.time() + 3600)
    raise ValueError("unknown token")


@dataclass
class Gate:
    """Lets a test hold a handler mid-dispatch and see what happened to it."""

    started: anyio.Event = field(default_factory=anyio.Event)
    release: anyio.Event = field(default_factory=anyio.Event)
    cancelled: anyio.Event = field(default_factory=anyio.Event)
    dispatch_ids: list[str] = field(default_factory=list)


def register_capabilities(agent: Agent, gate: Gate) -> None:
    @agent.capability(parameters={"type": "object", "required": ["text"],
                                  "properties": {"text": {"type": "string"}}})
    def echo(arguments: Mapping[str, Any], context: DispatchContext) -> Any:
        return {"text": arguments["text"]}

    @agent.capability()
    async def count(arguments: Mapping[str, Any], context: DispatchContext) -> Any:
        for i in range(arguments["n"]):
            context.chunk({"i": i})
            await anyio.sleep(0)
        return {"sent": arguments["n"]}

    @agent.capability()
    def explode(arguments: Mapping[str, Any], context: DispatchContext) -> Any:
        raise ValueError("boom")

    @agent.capability()
    async def refuse(arguments: Mapping[str, Any], context: DispatchContext) -> Any:
        raise HandlerError("OUT_OF_STOCK", "no more widgets", {"sku": "w-1"})

    @agent.capability()
    async def held(arguments: Mapping[str, Any], context: DispatchContext) -> Any:
        gate.dispatch_ids.append(context.dispatch_id)
        gate.started.set()
        await gate.release.wait()
        return {"attempt_seen": context.attempt}

    @agent.capability()
    async def forever(arguments: Mapping[str, Any], context: DispatchContext) -> Any:
        gate.started.set()
        try:
            await anyio.sleep_forever()
        finally:
            gate.cancelled.set()


def make_agent(port: int, client_context: ssl.SSLContext, config: Config, gate: Gate,
               instance_id: str = INSTANCE) -> Agent:
    session = AgentSession(config)
    session.backoff = Backoff(lambda: 0.5, base=0.05, cap=0.2)  # reconnect fast in tests
    agent = connect(
        f"wss://127.0.0.1:{port}/agents/connect?instance_id={instance_id}",
        token=TRANSPORT_TOKEN, instance_id=instance_id, agent_type="smoke-agent",
        dispatch_auth=DispatchAuthVerifier(instance_id, hs256_keys=[SIGNING_SECRET]),
        ssl_context=client_context, config=config, session=session,
    )
    register_capabilities(agent, gate)
    return agent


@contextlib.asynccontextmanager
async def mesh(tls: TlsPair, max_connections: int = 10_000
               ) -> AsyncIterator[tuple[MeshServer, int, Config]]:
    config = Config(close_grace=1.0, close_timeout=1.0)
    server = MeshServer(
        ssl_context=tls[0], verify_token=verify_token, lookup_instance=INSTANCES.get,
        dispatch_auth=jwt_dispatch_auth(DispatchAuthMinter(SIGNING_SECRET)), config=config,
        max_connections=max_connections,
    )
    async with server:  # the server's task group: close() may run at any depth inside
        host, port = await server.start("127.0.0.1", 0)
        assert host == "127.0.0.1"
        try:
            yield server, port, config
        finally:
            await server.close(grace=0.5)


@contextlib.asynccontextmanager
async def mesh_and_agent(
    tls: TlsPair, gate: Gate
) -> AsyncIterator[tuple[MeshServer, Agent, AgentLink]]:
    async with mesh(tls) as (server, port, config), make_agent(port, tls[1], config, gate) as agent:
        yield server, agent, await server.wait_for_agent(INSTANCE, timeout=TIME_LIMIT)


async def test_dispatch_result_and_argument_checks(tls: TlsPair) -> None:
    with anyio.fail_after(TIME_LIMIT):
        async with mesh_and_agent(tls, Gate()) as (server, agent, link):
            assert agent.ready.is_set()
            assert await server.dispatch(INSTANCE, "echo", {"text": "hi"}) == {"text": "hi"}
            assert await link.dispatch("echo", {"text": "again"}) == {"text": "again"}
            with pytest.raises(DispatchError) as invalid:
                await link.dispatch("echo", {"text": 3})
            assert invalid.value.code == "INVALID_ARGUMENTS"
            with pytest.raises(DispatchError) as missing:
                await link.dispatch("no_such_capability", {})
            assert missing.value.code == "CAPABILITY_NOT_FOUND"
            assert agent.handler_runs == 2  # refused dispatches never reach a handler


async def test_streamed_chunks_arrive_in_order_before_the_result(tls: TlsPair) -> None:
    chunks: list[Any] = []
    with anyio.fail_after(TIME_LIMIT):
        async with mesh_and_agent(tls, Gate()) as (server, _agent, _link):
            result = await server.dispatch(INSTANCE, "count", {"n": 20}, on_chunk=chunks.append)
    assert result == {"sent": 20}
    assert chunks == [{"i": i} for i in range(20)]


async def test_handler_failures_carry_their_codes(tls: TlsPair) -> None:
    with anyio.fail_after(TIME_LIMIT):
        async with mesh_and_agent(tls, Gate()) as (_server, agent, link):
            with pytest.raises(DispatchError) as failed:
                await link.dispatch("explode", {})
            assert failed.value.code == "DISPATCH_FAILED"
            assert failed.value.message == "the handler raised ValueError"
            assert "boom" not in (failed.value.message or "")
            with pytest.raises(DispatchError) as refused:
                await link.dispatch("refuse", {})
            assert (refused.value.code, refused.value.message) == ("OUT_OF_STOCK",
                                                                   "no more widgets")
            assert refused.value.detail == {"sku": "w-1"}
            # The connection survives handler failures.
            assert await link.dispatch("echo", {"text": "still here"}) == {"text": "still here"}
            assert agent.session.connections == 1


async def test_deadline_fails_the_dispatch_and_cancels_the_handler(tls: TlsPair) -> None:
    gate = Gate()
    with anyio.fail_after(TIME_LIMIT):
        async with mesh_and_agent(tls, gate) as (_server, _agent, link):
            with pytest.raises(DispatchError) as timed_out:
                await link.dispatch("forever", {}, deadline_ms=200)
            assert timed_out.value.code == "DEADLINE_EXCEEDED"
            await gate.cancelled.wait()  # the agent's own deadline timer, or the mesh's cancel


async def test_refused_handshake_raises_the_typed_error(tls: TlsPair) -> None:
    with anyio.fail_after(TIME_LIMIT):
        async with mesh(tls) as (_server, port, config):
            agent = make_agent(port, tls[1], config, Gate(), instance_id="ghost")
            with pytest.raises(HandshakeRejected) as refused:
                async with agent:
                    pytest.fail("a refused agent must not get a session")
    assert (refused.value.status, refused.value.code) == (404, "INSTANCE_NOT_FOUND")
    assert agent.session.connections == 1  # 404 is final: no retry (spec 5)


async def test_the_agent_reconnects_by_itself_until_stopped(tls: TlsPair) -> None:
    seen: list[str | None] = []
    with anyio.fail_after(TIME_LIMIT):
        async with mesh(tls) as (_server, port, config), make_agent(port, tls[1], config,
                                                                     Gate()) as agent:
            for _ in range(2):
                assert agent.ready.is_set() and agent.last_started is not None
                seen.append(agent.last_started.connection_id)
                if len(seen) == 1:
                    cut = agent.link
                    assert cut is not None
                    cut.abort()  # the agent reconnects by itself
                    await cut.done.wait()
                    await agent.ready.wait()
            await agent.stop()
            assert not agent.ready.is_set()
            await anyio.sleep(0.3)  # longer than the backoff: no reconnect after stop()
    assert len(seen) == 2
    assert seen[0] != seen[1]
    assert agent.session.connections == 2


@pytest.mark.parametrize("finish_while_down", [False, True], ids=["after-resume", "while-down"])
async def test_tcp_cut_mid_dispatch_resumes_and_runs_the_handler_once(
    tls: TlsPair, finish_while_down: bool
) -> None:
    gate = Gate()
    outcome: list[Any] = []
    with anyio.fail_after(TIME_LIMIT):
        async with mesh_and_agent(tls, gate) as (server, agent, link):

            async def call() -> None:
                outcome.append(await server.dispatch(INSTANCE, "held", {}, deadline_ms=8000))

            async with anyio.create_task_group() as group:
                group.start_soon(call)
                await gate.started.wait()
                cut = agent.link
                assert cut is not None
                cut.abort()
                await cut.done.wait()
                await link.link.done.wait()  # the mesh saw the cut too and holds the dispatch
                if finish_while_down:
                    gate.release.set()  # the result waits in the agent's outbox
                await agent.ready.wait()  # the next session
                gate.release.set()
            new_link = server.agents[INSTANCE]
    assert outcome == [{"attempt_seen": 1}]
    assert agent.handler_runs == 1
    started = agent.last_started
    assert started is not None and started.resumed
    assert started.replayed_dispatches == tuple(gate.dispatch_ids)
    assert agent.session.connections == 2
    assert new_link is not link
    assert new_link.conn.stats.late_terminal_frames == 0  # one terminal frame, not two


async def test_mesh_close_lets_in_flight_work_finish_first(tls: TlsPair) -> None:
    gate = Gate()
    outcome: list[Any] = []
    with anyio.fail_after(TIME_LIMIT):
        async with mesh_and_agent(tls, gate) as (server, agent, link):

            async def call() -> None:
                outcome.append(await link.dispatch("held", {}))

            async with anyio.create_task_group() as group:
                group.start_soon(call)
                await gate.started.wait()
                group.start_soon(server.close, 5.0)
                await anyio.wait_all_tasks_blocked()  # close_request sent, the mesh is draining
                assert not outcome
                gate.release.set()
            assert outcome == [{"attempt_seen": 1}]
            closed = agent.last_closed
            assert closed is not None and (closed.code, closed.by_peer) == (1000, True)


async def test_refresh_token_reaches_the_mesh_without_a_reconnect(tls: TlsPair) -> None:
    refreshed: list[TokenRefreshed] = []
    seen = anyio.Event()

    def on_event(_link: AgentLink, event: Any) -> None:
        if isinstance(event, TokenRefreshed):
            refreshed.append(event)
            seen.set()

    with anyio.fail_after(TIME_LIMIT):
        async with mesh_and_agent(tls, Gate()) as (server, agent, _link):
            server.on_event = on_event
            assert agent.refresh_token(FRESH_TOKEN)
            await seen.wait()
            assert agent.runtime.token == FRESH_TOKEN  # and for any later reconnect
            assert agent.session.connections == 1
    assert refreshed[0].expires_at > time.time()


async def test_a_peer_failing_the_tls_handshake_is_no_warning(
    tls: TlsPair, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with anyio.fail_after(TIME_LIMIT):
        async with mesh(tls) as (server, port, config):
            for _ in range(3):  # plain TCP, then bytes that are no TLS record
                async with await anyio.connect_tcp("127.0.0.1", port) as peer:
                    await peer.send(b"GET /agents/connect HTTP/1.1\r\n\r\n" * 4)
                    with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                        while await peer.receive():
                            pass  # the mesh's TLS alert, until it hangs up
            async with make_agent(port, tls[1], config, Gate()):  # the port still serves
                assert await server.dispatch(INSTANCE, "echo", {"text": "hi"}) == {"text": "hi"}
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not loud, [f"{r.name}: {r.getMessage()}" for r in loud]


async def test_silent_sockets_do_not_take_the_connection_slots(tls: TlsPair) -> None:
    """Handshakes have their own bound: `max_connections` counts sessions only."""
    with anyio.fail_after(TIME_LIMIT):
        async with mesh(tls, max_connections=2) as (server, port, config), \
                contextlib.AsyncExitStack() as stack:
            for _ in range(5):  # connected, never sending: each a handshake until hello_timeout
                await stack.enter_async_context(await anyio.connect_tcp("127.0.0.1", port))
            while len(server.links) < 5:
                await anyio.sleep(0.01)
            for instance_id in (INSTANCE, SECOND):
                await stack.enter_async_context(
                    make_agent(port, tls[1], config, Gate(), instance_id=instance_id))
                assert await server.dispatch(instance_id, "echo", {"text": instance_id}) == {
                    "text": instance_id}
            assert sorted(server.agents) == [INSTANCE, SECOND]
            assert server.runtime.handshakes() == 5  # the silent ones, still open
