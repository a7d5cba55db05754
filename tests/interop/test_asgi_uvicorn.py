"""Interop: `svantic_adapters.asgi.AsgiMesh` under a real uvicorn server, over real TLS
(trustme CA) on 127.0.0.1, with uvicorn's two maintained WebSocket stacks (websockets'
sans-IO one and wsproto).

* our asyncio agent: dispatches (a result, chunks in order, an unknown capability), the
  mesh's `close(grace)` draining it (close_request, the in-flight result, 1000), new upgrades
  refused 503 `SHUTTING_DOWN` after; a refusal (404) through the Denial Response extension is
  `InstanceNotFound` on the agent, and final (one attempt); uvicorn's lifespan shutdown ends
  the mesh and fails a waiting dispatch instead of leaving it hanging;
* the independent peers of `_independent.py` that act as agents (python-websockets, from the
  spec alone) and the message-mode example agent: round trip, BAD_FRAME, 1002, 1003, resume
  exactly once, the spec 1 refusals as plain JSON;
* the mesh runtime's rules: the stranded-instance case (a second connection of the instance
  says hello and leaves; the live agent reconnects and is reachable), a silent handshake
  dropped after `hello_timeout`, message limits (the mesh's and the server's: 1009);
* plain HTTP (426 / 404 JSON), a server without the Denial Response extension (403), and the
  Starlette mount of docs/embedding.md, run as written.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import uvicorn
import websockets
from _independent import (
    WAIT,
    Frame,
    IndependentAgent,
    decode_transport_token,
    encode,
    make_frame,
    transport_token,
)
from _uvicorn import Certs, _Server, run
from svantic_adapters.asgi import AsgiMesh
from svantic_adapters.asyncio import Agent, connect
from websockets.typing import Subprotocol

from svantic_proto import (
    CloseRequested,
    Config,
    ConnectionClosed,
    DispatchAuthMinter,
    DispatchAuthVerifier,
    DispatchContext,
    DispatchError,
    Event,
    HandshakeRejected,
    InstanceNotFound,
    InstanceRecord,
    MeshState,
    UpgradeRequest,
    jwt_dispatch_auth,
)
from svantic_proto.mesh_runtime import MeshPhase
from svantic_proto.messages import MeshMessages

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import websockets_agent

ROOT = Path(__file__).resolve().parents[2]

HOST = "127.0.0.1"
TRANSPORT_SECRET = "interop-transport-secret-0123456789abcdef"
SIGNING_SECRET = "interop-signing-secret-0123456789abcdef"
TENANT = "tenant-interop"
INSTANCE = "agent-asgi-1"
AGENT_TYPE = "echo-agent"
INSTANCES = {
    INSTANCE: InstanceRecord(INSTANCE, TENANT, "connected", AGENT_TYPE),
    "agent-hosted": InstanceRecord("agent-hosted", TENANT, "hosted", AGENT_TYPE),
}
STACKS = ["websockets-sansio", "wsproto"]
"""uvicorn's WebSocket implementations (its legacy `websockets` one is deprecated)."""
AGENT_CONFIG = Config(reconnect_base_delay=0.1, reconnect_max_delay=0.5)


@asynccontextmanager
async def serving(app: Any, certs: Certs, ws: str = STACKS[0], *,
                  ws_max_size: int = Config().max_message_bytes,
                  server: list[_Server] | None = None) -> AsyncIterator[str]:
    """Run `app` under uvicorn in this loop, configured as docs/adapters.md says (the
    message limit, no compression; lifespan on); yields `wss://host:port`. On exit the
    server stops as on a signal: its shutdown, then the lifespan's."""
    config = uvicorn.Config(app, host=HOST, port=0, ssl_certfile=certs.certfile, ws=ws,
                            ws_max_size=ws_max_size, ws_per_message_deflate=False,
                            lifespan="on", log_config=None,
                            log_level="warning")
    running = _Server(config)
    if server is not None:
        server.append(running)
    task = asyncio.create_task(running.serve())
    try:
        async with asyncio.timeout(WAIT):
            while not running.started:  # uvicorn has no event for it
                if task.done():
                    task.result()
                    raise AssertionError("uvicorn stopped before it started")
                await asyncio.sleep(0.01)
        port = running.servers[0].sockets[0].getsockname()[1]
        yield f"wss://{HOST}:{port}"
    finally:
        running.should_exit = True
        await asyncio.wait_for(task, WAIT)


def verify_transport(token: str) -> SimpleNamespace:
    return SimpleNamespace(**decode_transport_token(token, TRANSPORT_SECRET))


def make_mesh(config: Config | None = None, **options: Any) -> AsgiMesh:
    return AsgiMesh(verify_token=verify_transport, lookup_instance=INSTANCES.get,
                    dispatch_auth=jwt_dispatch_auth(DispatchAuthMinter(SIGNING_SECRET)),
                    config=config or Config(close_timeout=1.0), **options)


def token(tenant_id: str = TENANT) -> str:
    return transport_token(TRANSPORT_SECRET, tenant_id=tenant_id)


class Watched:
    """The core events an agent or the mesh reported, to wait on."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.changed = asyncio.Event()

    def record(self, *args: Any) -> None:
        self.events.append(args[-1])
        self.changed.set()

    def of(self, kind: type[Event]) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    async def wait(self, kind: type[Event]) -> Any:
        async with asyncio.timeout(WAIT):
            while not self.of(kind):
                self.changed.clear()
                await self.changed.wait()
        return self.of(kind)[0]


def our_agent(base: str, certs: Certs, *, instance_id: str = INSTANCE,
              gate: asyncio.Event | None = None, started: asyncio.Event | None = None,
              config: Config = AGENT_CONFIG) -> Agent:
    agent = connect(f"{base}/agents/connect", token=token(), instance_id=instance_id,
                    agent_type=AGENT_TYPE, ssl_context=certs.client, config=config,
                    dispatch_auth=DispatchAuthVerifier(instance_id, hs256_keys=[SIGNING_SECRET]))

    @agent.capability("echo")
    def echo(arguments: Any, context: DispatchContext) -> Any:
        return dict(arguments)

    @agent.capability("count")
    async def count(arguments: Any, context: DispatchContext) -> Any:
        for n in range(arguments["n"]):
            context.chunk({"n": n})
        return {"counted": arguments["n"]}

    @agent.capability("slow")
    async def slow(arguments: Any, context: DispatchContext) -> Any:
        if started is not None:
            started.set()
        if gate is not None:
            await gate.wait()
        return {"slow": arguments}

    return agent


@asynccontextmanager
async def raw_socket(base: str, certs: Certs, *, instance_id: str = INSTANCE,
                     auth: str | None = None) -> AsyncIterator[Any]:
    """A bare python-websockets client on the endpoint (says nothing by itself)."""
    async with websockets.connect(
            f"{base}/agents/connect?instance_id={instance_id}", ssl=certs.client,
            subprotocols=[Subprotocol("svantic.v1")], compression=None, proxy=None,
            additional_headers={"Authorization": auth or f"Bearer {token()}"},
            open_timeout=WAIT, close_timeout=WAIT) as ws:
        yield ws


async def hello(ws: Any, instance_id: str = INSTANCE) -> Frame:
    await ws.send(encode(make_frame("hello", {"instance_id": instance_id})))
    welcome: Frame = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
    assert welcome["type"] == "welcome"
    return welcome


async def until(condition: Callable[[], object], what: str) -> None:
    """Poll a condition that no event announces (bounded)."""
    try:
        async with asyncio.timeout(WAIT):
            while not condition():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


# -- our agent -----------------------------------------------------------------------------------


@pytest.mark.parametrize("ws", STACKS)
def test_our_agent_gets_dispatches_and_the_mesh_s_close_drains_it(certs: Certs, ws: str) -> None:
    async def scenario() -> None:
        mesh, seen, agent_seen = make_mesh(), Watched(), Watched()
        mesh.on_event = seen.record
        gate, started = asyncio.Event(), asyncio.Event()
        async with serving(mesh, certs, ws) as base:
            agent = our_agent(base, certs, gate=gate, started=started)
            agent.on_event = agent_seen.record
            async with agent:
                link = await mesh.wait_for_agent(INSTANCE, WAIT)
                assert link.instance_id == INSTANCE and link.conn.state is MeshState.READY
                assert await mesh.dispatch(INSTANCE, "echo", {"x": [1, "two"]},
                                           deadline_ms=5000) == {"x": [1, "two"]}
                chunks: list[Any] = []
                assert await mesh.dispatch(INSTANCE, "count", {"n": 25}, on_chunk=chunks.append,
                                           deadline_ms=5000) == {"counted": 25}
                assert chunks == [{"n": n} for n in range(25)]  # in order, once each
                with pytest.raises(DispatchError) as missing:
                    await mesh.dispatch(INSTANCE, "nope", deadline_ms=5000)
                assert missing.value.code == "CAPABILITY_NOT_FOUND"

                # The drain: work in flight, then the mesh closes with a grace.
                slow = asyncio.create_task(
                    mesh.dispatch(INSTANCE, "slow", {"n": 1}, deadline_ms=10_000))
                await asyncio.wait_for(started.wait(), WAIT)
                closing = asyncio.create_task(mesh.close(grace=10))
                asked = await agent_seen.wait(CloseRequested)
                assert asked.grace_seconds == 10
                assert mesh.runtime.phase is MeshPhase.DRAINING and not closing.done()
                gate.set()
                assert await asyncio.wait_for(slow, WAIT) == {"slow": {"n": 1}}
                await asyncio.wait_for(closing, WAIT)
                assert mesh.runtime.phase is MeshPhase.CLOSED
                (closed,) = seen.of(ConnectionClosed)
                assert closed.code == 1000 and not link.conn.in_flight
                await asyncio.wait_for(link.wait_closed(), WAIT)
                assert mesh.agents == {}

                # Closed: a new upgrade is refused 503 (which agents retry), as JSON.
                with pytest.raises(websockets.InvalidStatus) as refused:
                    async with raw_socket(base, certs):
                        pass
                response = refused.value.response
                assert response.status_code == 503
                assert response.headers["Content-Type"] == "application/json"
                assert json.loads(response.body)["error"]["code"] == "SHUTTING_DOWN"
    run(scenario())


@pytest.mark.parametrize("ws", STACKS)
def test_a_refusal_is_the_typed_error_on_our_agent_and_final(certs: Certs, ws: str) -> None:
    async def scenario() -> None:
        mesh, seen = make_mesh(), Watched()
        mesh.on_event = seen.record
        async with serving(mesh, certs, ws) as base:
            agent = our_agent(base, certs, instance_id="agent-nobody")
            with pytest.raises(InstanceNotFound) as refused:
                await asyncio.wait_for(agent.run(), WAIT)
            assert refused.value.code == "INSTANCE_NOT_FOUND"
            assert len(seen.of(UpgradeRequest)) == 1  # final: not retried
            assert mesh.runtime.handshakes() == 0 and not mesh.links
    run(scenario())


@pytest.mark.parametrize("ws", STACKS)
def test_uvicorn_s_shutdown_ends_the_mesh_and_fails_a_waiting_dispatch(certs: Certs,
                                                                        ws: str) -> None:
    """uvicorn closes every WebSocket (1012) before it sends `lifespan.shutdown`: the agent's
    in-flight dispatch is held for a resume that cannot come, and the lifespan's `close()`
    ends the mesh, failing it `AGENT_DISCONNECTED` instead of leaving its caller waiting."""

    async def scenario() -> None:
        mesh = make_mesh()
        gate, started = asyncio.Event(), asyncio.Event()
        agent = None
        try:
            async with serving(mesh, certs, ws) as base:
                agent = our_agent(base, certs, gate=gate, started=started)
                await agent.__aenter__()
                await mesh.wait_for_agent(INSTANCE, WAIT)
                waiting = asyncio.create_task(
                    mesh.dispatch(INSTANCE, "slow", {}, deadline_ms=20_000))
                await asyncio.wait_for(started.wait(), WAIT)
            assert mesh.runtime.phase is MeshPhase.CLOSED
            with pytest.raises(DispatchError) as failed:
                await asyncio.wait_for(waiting, WAIT)
            assert failed.value.code == "AGENT_DISCONNECTED"
        finally:
            if agent is not None:
                await asyncio.wait_for(agent.stop(0), WAIT)
    run(scenario())


# -- the independent agents ------------------------------------------------------------------


def independent_agent(base: str, certs: Certs, handlers: dict[str, Any], *,
                      instance_id: str = INSTANCE, auth_token: str | None = None
                      ) -> IndependentAgent:
    return IndependentAgent(f"{base}/agents/connect", token=auth_token or token(),
                            instance_id=instance_id, agent_type=AGENT_TYPE,
                            signing_secret=SIGNING_SECRET, ssl_context=certs.client,
                            handlers=handlers)


async def echo_frame(frame: Frame) -> Any:
    return frame["payload"]["arguments"]


async def ping_barrier(agent: IndependentAgent) -> None:
    """Everything the agent sent before this ping has been processed by the mesh."""
    ping = make_frame("ping")
    await agent.send(ping)
    await agent.wait_received(lambda f: f["type"] == "pong" and f["in_reply_to"] == ping["id"])


@pytest.mark.parametrize("ws", STACKS)
def test_the_independent_agent_round_trip_and_bad_frames(certs: Certs, ws: str) -> None:
    async def scenario() -> None:
        mesh = make_mesh()
        async with serving(mesh, certs, ws) as base:
            agent = independent_agent(base, certs, {"echo": echo_frame})
            welcome = await agent.connect()
            assert welcome["payload"]["resumed"] is False
            assert agent.ws is not None and agent.ws.subprotocol == "svantic.v1"
            assert agent.ws.response is not None
            assert "Sec-WebSocket-Extensions" not in agent.ws.response.headers
            link = await mesh.wait_for_agent(INSTANCE, WAIT)
            assert await mesh.dispatch(INSTANCE, "echo", {"n": 7}, deadline_ms=5000) == {"n": 7}
            assert agent.auth_failures == []  # PyJWT verified our dispatch_auth
            (dispatch,) = agent.received("dispatch")
            assert dispatch["payload"]["dispatch_auth"]["type"] == "svantic_jwt"

            gossip = make_frame("agent_gossip", {"rumour": "x"})  # unknown type: socket kept
            await agent.send(gossip)
            error = await agent.wait_received(lambda f: f["type"] == "error")
            assert (error["payload"]["code"], error["in_reply_to"]) == ("BAD_FRAME", gossip["id"])
            await ping_barrier(agent)
            assert mesh.agents[INSTANCE] is link and not link.conn.closed

            await agent.send("{this is not json")  # invalid: answered, then closed 1002
            assert await agent.wait_disconnected() == 1002
            await asyncio.wait_for(link.wait_closed(), WAIT)

            await agent.connect()
            assert agent.ws is not None
            await agent.ws.send(b"\x00binary")
            assert await agent.wait_disconnected() == 1003

            await agent.connect()
            await agent.close()
            assert agent.close_codes[-1] == 1000
            await until(lambda: INSTANCE not in mesh.agents, "the agent to leave the table")
    run(scenario())


@pytest.mark.parametrize("ws", STACKS)
def test_the_independent_agent_resumes_and_the_result_arrives_once(certs: Certs,
                                                                   ws: str) -> None:
    async def scenario() -> None:
        mesh = make_mesh()
        gate = asyncio.Event()

        async def slow_echo(frame: Frame) -> Any:
            await gate.wait()
            return {"echo": frame["payload"]["arguments"]}

        async with serving(mesh, certs, ws) as base:
            agent = independent_agent(base, certs, {"slow_echo": slow_echo})
            first = await agent.connect()
            link = await mesh.wait_for_agent(INSTANCE, WAIT)
            call = asyncio.create_task(
                mesh.dispatch(INSTANCE, "slow_echo", {"n": 7}, deadline_ms=10_000))
            await agent.changes.until(lambda: agent.handler_calls)
            dispatch_id = agent.handler_calls[0][0]

            await agent.cut()  # TCP gone mid-dispatch, no close frame
            await asyncio.wait_for(link.wait_closed(), WAIT)
            assert not call.done()
            second = await agent.connect()
            assert agent.sent("hello")[-1]["payload"]["resume_token"] == (
                first["payload"]["resume_token"])
            assert second["payload"]["resumed"] is True
            assert second["payload"]["replayed_dispatches"] == [dispatch_id]
            replay = await agent.wait_received(
                lambda f: f["type"] == "dispatch" and f["payload"].get("attempt", 1) == 2)
            assert replay["id"] == dispatch_id
            gate.set()
            assert await asyncio.wait_for(call, WAIT) == {"echo": {"n": 7}}
            await ping_barrier(agent)
            assert agent.handler_calls == [(dispatch_id, 1)]  # the handler ran once
            assert len([f for f in agent.sent("dispatch_result")
                        if f["in_reply_to"] == dispatch_id]) == 1
            assert mesh.agents[INSTANCE].conn.stats.late_terminal_frames == 0
            await agent.close()
    run(scenario())


@pytest.mark.parametrize(
    ("change", "status", "code"),
    [
        ({"token": "not-a-jwt"}, 401, "UNAUTHORIZED"),
        ({"instance_id": "agent-unknown"}, 404, "INSTANCE_NOT_FOUND"),
        ({"instance_id": "agent-hosted"}, 409, "DEPLOYMENT_MODE_MISMATCH"),
        ({"tenant": "tenant-other"}, 403, "TENANT_MISMATCH"),
    ],
)
def test_the_spec_1_refusals_are_plain_json(certs: Certs, change: dict[str, str], status: int,
                                            code: str) -> None:
    async def scenario() -> None:
        async with serving(make_mesh(), certs) as base:
            agent = independent_agent(
                base, certs, {}, instance_id=change.get("instance_id", INSTANCE),
                auth_token=change.get("token") or token(change.get("tenant", TENANT)))
            with pytest.raises(websockets.InvalidStatus) as refused:
                await agent.connect()
            response = refused.value.response
            assert response.status_code == status
            assert response.headers["Content-Type"] == "application/json"
            assert json.loads(response.body)["error"]["code"] == code
    run(scenario())


@pytest.mark.parametrize("ws", STACKS)
def test_the_example_agent_works_with_the_asgi_mesh(certs: Certs, ws: str) -> None:
    async def scenario() -> None:
        mesh = make_mesh()
        async with serving(mesh, certs, ws) as base:
            url = f"{base}/agents/connect"
            stop = asyncio.Event()
            task = asyncio.create_task(websockets_agent.run_agent(
                url, token=token(), instance_id=INSTANCE, ssl_context=certs.client, stop=stop,
                dispatch_auth=DispatchAuthVerifier(INSTANCE, hs256_keys=[SIGNING_SECRET])))
            link = await mesh.wait_for_agent(INSTANCE, WAIT)
            assert await mesh.dispatch(INSTANCE, "echo", {"a": [1]}, deadline_ms=5000) == {
                "a": [1]}
            stop.set()  # close_request, drained, 1000
            await asyncio.wait_for(task, WAIT)
            await asyncio.wait_for(link.wait_closed(), WAIT)
            assert mesh.agents == {}

            with pytest.raises(InstanceNotFound):
                await asyncio.wait_for(websockets_agent.run_agent(
                    url, token=token(), instance_id="agent-unknown", ssl_context=certs.client,
                    stop=asyncio.Event(), dispatch_auth=DispatchAuthVerifier(
                        "agent-unknown", hs256_keys=[SIGNING_SECRET])), WAIT)
    run(scenario())


# -- the mesh runtime's rules ----------------------------------------------------------------


@pytest.mark.parametrize("ws", STACKS)
def test_a_second_connection_that_leaves_never_strands_the_live_agent(certs: Certs,
                                                                       ws: str) -> None:
    """Newest wins: the live agent is replaced with 1001 and reconnects; when the newer
    connection leaves, the table keeps no dead entry and dispatches reach the agent again."""

    async def scenario() -> None:
        mesh = make_mesh()
        slower = Config(reconnect_base_delay=0.5, reconnect_max_delay=0.5)  # no race below
        async with (serving(mesh, certs, ws) as base,
                    our_agent(base, certs, config=slower)):
            live = await mesh.wait_for_agent(INSTANCE, WAIT)
            assert await mesh.dispatch(INSTANCE, "echo", {"n": 1}, deadline_ms=5000) == {
                "n": 1}
            async with raw_socket(base, certs) as ws_:  # the same instance elsewhere
                welcome = await hello(ws_)
                newer = welcome["payload"]["connection_id"]
                assert mesh.agents[INSTANCE].conn.connection_id == newer
                await asyncio.wait_for(live.wait_closed(), WAIT)  # replaced, 1001
            # It left: the agent is back in the table, not a dead entry.
            await until(lambda: INSTANCE in mesh.agents
                        and mesh.agents[INSTANCE].conn.connection_id != newer
                        and mesh.runtime.available(INSTANCE), "the agent to reconnect")
            assert await mesh.dispatch(INSTANCE, "echo", {"n": 2}, deadline_ms=5000) == {
                "n": 2}
    run(scenario())


@pytest.mark.parametrize("ws", STACKS)
def test_a_silent_handshake_is_dropped_after_hello_timeout(certs: Certs, ws: str) -> None:
    async def scenario() -> None:
        mesh = make_mesh(Config(hello_timeout=0.5, close_timeout=1.0))
        async with serving(mesh, certs, ws) as base, raw_socket(base, certs) as silent:
            assert mesh.runtime.handshakes() == 1
            await asyncio.wait_for(silent.wait_closed(), WAIT)
            assert silent.close_code == 1006  # dropped: no close frame, as byte mode does
            await until(lambda: not mesh.links, "the mesh to forget the link")
            assert mesh.runtime.handshakes() == 0
    run(scenario())


def test_an_admission_that_hangs_is_answered_503_after_hello_timeout(certs: Certs) -> None:
    """A coroutine lookup that never returns: the runtime drops the handshake at
    `hello_timeout`, which before the upgrade is a 503 refusal (agents retry it)."""

    async def scenario() -> None:
        async def hanging_lookup(instance_id: str) -> InstanceRecord | None:
            await asyncio.Event().wait()
            return None

        mesh = AsgiMesh(verify_token=verify_transport, lookup_instance=hanging_lookup,
                        dispatch_auth=jwt_dispatch_auth(DispatchAuthMinter(SIGNING_SECRET)),
                        config=Config(hello_timeout=0.5))
        async with serving(mesh, certs) as base:
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with raw_socket(base, certs):
                    pass
            response = refused.value.response
            assert response.status_code == 503
            assert json.loads(response.body)["error"]["code"] == "INTERNAL"
            await until(lambda: not mesh.links, "the mesh to forget the link")
    run(scenario())


@pytest.mark.parametrize("limit", ["mesh", "server"])
def test_an_oversized_message_closes_1009(certs: Certs, limit: str) -> None:
    """The mesh's `Config.max_message_bytes` holds behind a server that allows more; the
    server's `ws_max_size`, when it is the smaller, closes first and the mesh hears it."""

    async def scenario() -> None:
        small, large = 4096, 1 << 20
        config = Config(max_message_bytes=small if limit == "mesh" else large)
        mesh, seen = make_mesh(config), Watched()
        mesh.on_event = seen.record
        server_limit = large if limit == "mesh" else small
        async with serving(mesh, certs, ws_max_size=server_limit) as base:
            async with raw_socket(base, certs) as ws:
                await hello(ws)
                await ws.send("x" * (small + 1))
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    while True:
                        await asyncio.wait_for(ws.recv(), WAIT)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
            end = await seen.wait(ConnectionClosed)
            assert end.code == 1009
    run(scenario())


def test_around_needs_a_fresh_connection() -> None:
    """The seam the ASGI mesh uses: message mode over the runtime's own MeshConnection."""
    from svantic_proto import FakeClock, MeshConnection
    from svantic_proto.errors import InvalidState

    clock = FakeClock()
    conn = MeshConnection(dispatch_auth=None, now=clock.now, wall_clock=clock.wall)
    messages = MeshMessages.around(
        conn, "/agents/connect", b"instance_id=a-1",
        [(b"host", b"mesh"), (b"upgrade", b"websocket"), (b"connection", b"Upgrade"),
         (b"sec-websocket-version", b"13"), (b"authorization", b"Bearer t")],
        ["svantic.v1"], now=clock.now)
    assert messages.connection is conn and conn.state is MeshState.UPGRADE_PENDING
    (request,) = messages.events_received()
    assert isinstance(request, UpgradeRequest) and request.request.instance_id == "a-1"
    with pytest.raises(InvalidState):
        MeshMessages.around(conn, "/agents/connect", now=clock.now)


# -- HTTP, servers without the extension, and a Starlette mount --------------------------------


async def https_get(base: str, certs: Certs, target: str) -> tuple[int, dict[str, str], bytes]:
    port = int(base.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection(HOST, port, ssl=certs.client)
    writer.write(f"GET {target} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
    response = await asyncio.wait_for(reader.read(), WAIT)
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split(" ")[1]), headers, body


def test_plain_http_gets_426_on_the_endpoint_and_404_elsewhere(certs: Certs) -> None:
    async def scenario() -> None:
        async with serving(make_mesh(), certs) as base:
            status, headers, body = await https_get(base, certs, "/agents/connect?instance_id=x")
            assert (status, headers["content-type"], headers["upgrade"]) == (
                426, "application/json", "websocket")
            assert json.loads(body)["error"]["code"] == "UPGRADE_REQUIRED"
            status, headers, body = await https_get(base, certs, "/elsewhere")
            assert (status, headers["content-type"]) == (404, "application/json")
            assert json.loads(body)["error"]["code"] == "NOT_FOUND"
    run(scenario())


def without_denial_extension(app: Any) -> Any:
    """The app as a server without the WebSocket Denial Response extension sees it."""

    async def stripped(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            scope = {**scope, "extensions": {}}
        await app(scope, receive, send)
    return stripped


def test_without_the_denial_extension_a_refusal_is_a_plain_403(certs: Certs) -> None:
    async def scenario() -> None:
        mesh = make_mesh()
        async with serving(without_denial_extension(mesh), certs) as base:
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with raw_socket(base, certs, instance_id="agent-unknown"):
                    pass
            assert refused.value.response.status_code == 403
            agent = our_agent(base, certs, instance_id="agent-unknown")
            with pytest.raises(HandshakeRejected) as final:  # 403 is final for agents
                await asyncio.wait_for(agent.run(), WAIT)
            assert final.value.status == 403
            async with our_agent(base, certs):  # an accepted upgrade is unchanged
                await mesh.wait_for_agent(INSTANCE, WAIT)
                assert await mesh.dispatch(INSTANCE, "echo", {"k": 1}, deadline_ms=5000) == {
                    "k": 1}
    run(scenario())


def test_the_starlette_mount_of_the_docs_runs(certs: Certs) -> None:
    """docs/embedding.md's Starlette snippet, as written (only its placeholders given): the
    mounted mesh serves `/agents/connect`, the app's other routes stay its own, and its
    lifespan closes the mesh. Fenced `python3` there: it needs Starlette, which the page's
    in-memory example (run by tests/test_docs.py) does not."""
    pytest.importorskip("starlette")
    page = (ROOT / "docs" / "embedding.md").read_text(encoding="utf-8")
    (snippet,) = re.findall(r"^```python3\n(.*?)^```", page, re.S | re.M)
    namespace: dict[str, Any] = {
        "verify_transport_jwt": verify_transport, "registry": INSTANCES,
        "SIGNING_SECRET": SIGNING_SECRET, "__name__": "docs_starlette_mount",
    }
    exec(compile(snippet, "docs/embedding.md", "exec"), namespace)
    app, mesh = namespace["app"], namespace["mesh"]
    assert isinstance(mesh, AsgiMesh)

    async def scenario() -> None:
        async with serving(app, certs) as base:
            async with our_agent(base, certs):
                await mesh.wait_for_agent(INSTANCE, WAIT)
                assert await mesh.dispatch(INSTANCE, "echo", {"m": 1}, deadline_ms=5000) == {
                    "m": 1}
            status, _, body = await https_get(base, certs, "/agents/connect")
            assert status == 426 and json.loads(body)["error"]["code"] == "UPGRADE_REQUIRED"
            status, _, _ = await https_get(base, certs, "/")
            assert status == 404  # Starlette's own answer: the mesh only has /agents
        assert mesh.runtime.phase is MeshPhase.CLOSED  # the app's lifespan closed it
    run(scenario())
