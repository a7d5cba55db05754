"""Interop: an agent written on the python-websockets client, from the spec alone, against
our `MeshServer` (asyncio adapter) over real TLS on 127.0.0.1.

Covers the issue's acceptance: the dispatch round trip, BAD_FRAME handling (an unknown
type keeps the socket, an invalid frame closes it 1002), our `cancel` extension meeting
a peer that does not know it, and a resume that delivers the result exactly once.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any

import pytest
import websockets
from _independent import (
    TLS,
    WAIT,
    Frame,
    Handler,
    IndependentAgent,
    decode_transport_token,
    loopback_tls,
    make_frame,
    transport_token,
    uuid7,
)
from svantic_adapters.asyncio import AgentLink, MeshServer

from svantic_proto import (
    Config,
    DispatchAuthMinter,
    Event,
    ExtensionUnsupported,
    HeartbeatReceived,
    InstanceRecord,
    jwt_dispatch_auth,
)
from svantic_proto.errors import DispatchError

TRANSPORT_SECRET = "interop-transport-secret-0123456789abcdef"
SIGNING_SECRET = "interop-signing-secret-0123456789abcdef"
TENANT = "tenant-interop"
INSTANCE = "agent-ws-1"
AGENT_TYPE = "ticket-agent"
INSTANCES = {
    INSTANCE: InstanceRecord(INSTANCE, TENANT, "connected", AGENT_TYPE),
    "agent-hosted": InstanceRecord("agent-hosted", TENANT, "hosted", AGENT_TYPE),
}


@pytest.fixture(scope="module")
def tls() -> TLS:
    return loopback_tls()


def run(scenario: Awaitable[None]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(20):
            await scenario
    asyncio.run(bounded())


def verify_transport(token: str) -> SimpleNamespace:
    return SimpleNamespace(**decode_transport_token(token, TRANSPORT_SECRET))


class Mesh:
    """Our MeshServer plus what the tests watch: the events it does not consume itself."""

    def __init__(self, server: MeshServer, url: str) -> None:
        self.server, self.url = server, url
        self.events: list[Event] = []
        self.changed = asyncio.Event()
        server.on_event = self._record

    def _record(self, agent: AgentLink, event: Event) -> None:
        self.events.append(event)
        self.changed.set()

    async def wait_event(self, kind: type[Event]) -> Event:
        async with asyncio.timeout(WAIT):
            while True:
                found = next((e for e in self.events if isinstance(e, kind)), None)
                if found is not None:
                    return found
                self.changed.clear()
                await self.changed.wait()


@asynccontextmanager
async def our_mesh(tls: TLS) -> AsyncIterator[Mesh]:
    server = MeshServer(
        ssl_context=tls.server, verify_token=verify_transport, lookup_instance=INSTANCES.get,
        dispatch_auth=jwt_dispatch_auth(DispatchAuthMinter(SIGNING_SECRET)),
        config=Config(close_timeout=1.0))
    _, port = await server.start("127.0.0.1", 0)
    try:
        yield Mesh(server, f"wss://127.0.0.1:{port}/agents/connect")
    finally:
        await server.close(grace=0)


def independent_agent(mesh: Mesh, tls: TLS, handlers: dict[str, Handler], *,
                      instance_id: str = INSTANCE, token: str | None = None) -> IndependentAgent:
    return IndependentAgent(
        mesh.url, token=token or transport_token(TRANSPORT_SECRET, tenant_id=TENANT),
        instance_id=instance_id, agent_type=AGENT_TYPE, signing_secret=SIGNING_SECRET,
        ssl_context=tls.client, handlers=handlers)


async def get_ticket(frame: Frame) -> Any:
    arguments = frame["payload"]["arguments"]
    if arguments.get("ticket_id") == "boom":
        raise RuntimeError("ticket store is down")
    return {"ticket_id": arguments["ticket_id"], "status": "open"}


def gated() -> tuple[asyncio.Event, Callable[[Frame], Awaitable[Any]]]:
    """A handler that waits for the test to release it (no sleeps)."""
    gate = asyncio.Event()

    async def slow_echo(frame: Frame) -> Any:
        await gate.wait()
        return {"echo": frame["payload"]["arguments"]}
    return gate, slow_echo


async def ping_barrier(agent: IndependentAgent) -> None:
    """Everything the agent sent before this ping has been processed by the mesh."""
    ping = make_frame("ping")
    await agent.send(ping)
    await agent.wait_received(lambda f: f["type"] == "pong" and f["in_reply_to"] == ping["id"])


# -- dispatch round trip ---------------------------------------------------------------------------


def test_dispatch_round_trip(tls: TLS) -> None:
    async def scenario() -> None:
        async with our_mesh(tls) as mesh:
            agent = independent_agent(mesh, tls, {"get_ticket": get_ticket})
            welcome = await agent.connect()
            payload = welcome["payload"]
            assert payload["resumed"] is False and payload["replayed_dispatches"] == []
            assert isinstance(payload["resume_token"], str) and payload["resume_token"]
            assert type(payload["heartbeat_interval_ms"]) is int
            assert agent.ws is not None and agent.ws.subprotocol == "svantic.v1"
            assert agent.ws.response is not None
            assert "Sec-WebSocket-Extensions" not in agent.ws.response.headers  # no deflate
            link = await mesh.server.wait_for_agent(INSTANCE, timeout=WAIT)
            heartbeat = await mesh.wait_event(HeartbeatReceived)
            assert isinstance(heartbeat, HeartbeatReceived) and heartbeat.active_sessions == 0

            result = await mesh.server.dispatch(INSTANCE, "get_ticket", {"ticket_id": "T-1"},
                                                deadline_ms=5000)
            assert result == {"ticket_id": "T-1", "status": "open"}
            dispatch = agent.received("dispatch")[0]
            assert dispatch["payload"].get("attempt", 1) == 1  # spec 3: default 1
            assert dispatch["payload"]["dispatch_auth"]["type"] == "svantic_jwt"
            assert agent.auth_failures == []  # PyJWT accepted our HS256 envelope

            with pytest.raises(DispatchError) as failed:
                await mesh.server.dispatch(INSTANCE, "get_ticket", {"ticket_id": "boom"},
                                           deadline_ms=5000)
            assert failed.value.code == "DISPATCH_FAILED"
            assert "ticket store is down" in (failed.value.message or "")
            with pytest.raises(DispatchError) as missing:
                await mesh.server.dispatch(INSTANCE, "no_such_thing", deadline_ms=5000)
            assert missing.value.code == "CAPABILITY_NOT_FOUND"
            assert not link.conn.closed and link.conn.stats.bad_frames == 0
            await agent.close()
    run(scenario())


@pytest.mark.parametrize(
    ("change", "status", "code"),
    [
        ({"token": "not-a-jwt"}, 401, "UNAUTHORIZED"),
        ({"instance_id": "agent-unknown"}, 404, "INSTANCE_NOT_FOUND"),
        ({"instance_id": "agent-hosted"}, 409, "DEPLOYMENT_MODE_MISMATCH"),
        ({"token_tenant": "tenant-other"}, 403, "TENANT_MISMATCH"),
    ],
)
def test_refused_upgrade_is_plain_json(tls: TLS, change: dict[str, str], status: int,
                                       code: str) -> None:
    async def scenario() -> None:
        async with our_mesh(tls) as mesh:
            token = change.get("token") or transport_token(
                TRANSPORT_SECRET, tenant_id=change.get("token_tenant", TENANT))
            agent = independent_agent(mesh, tls, {}, token=token,
                                      instance_id=change.get("instance_id", INSTANCE))
            with pytest.raises(websockets.InvalidStatus) as refused:
                await agent.connect()
            response = refused.value.response
            assert response.status_code == status
            assert response.headers["Content-Type"].startswith("application/json")
            assert json.loads(response.body)["error"]["code"] == code
    run(scenario())


# -- BAD_FRAME -------------------------------------------------------------------------------------


def test_unknown_frame_type_is_answered_and_the_socket_kept(tls: TLS) -> None:
    async def scenario() -> None:
        async with our_mesh(tls) as mesh:
            agent = independent_agent(mesh, tls, {"get_ticket": get_ticket})
            await agent.connect()
            link = await mesh.server.wait_for_agent(INSTANCE, timeout=WAIT)
            gossip = make_frame("agent_gossip", {"rumour": "x"})
            await agent.send(gossip)
            error = await agent.wait_received(lambda f: f["type"] == "error")
            assert error["payload"]["code"] == "BAD_FRAME"
            assert error["in_reply_to"] == gossip["id"]
            await ping_barrier(agent)
            result = await mesh.server.dispatch(INSTANCE, "get_ticket", {"ticket_id": "T-2"},
                                                deadline_ms=5000)
            assert result["ticket_id"] == "T-2"
            assert mesh.server.agents[INSTANCE] is link and not link.conn.closed
            assert agent.close_codes == []
            await agent.close()
    run(scenario())


def _invalid(kind: str) -> tuple[str, str | None]:
    frame_id = uuid7()
    if kind == "not_json":
        return "{this is not json", None
    if kind == "v_is_a_string":
        frame = make_frame("heartbeat", {"active_sessions": 0}, frame_id=frame_id)
        frame["v"] = "1"
    elif kind == "v_is_true":
        frame = make_frame("heartbeat", {"active_sessions": 0}, frame_id=frame_id)
        frame["v"] = True
    elif kind == "known_type_bad_payload":
        frame = make_frame("heartbeat", {"active_sessions": 1.5}, frame_id=frame_id)
    elif kind == "result_without_in_reply_to":
        frame = make_frame("dispatch_result", {"result": 1}, frame_id=frame_id)
    else:
        raise ValueError(kind)
    return json.dumps(frame), frame_id


@pytest.mark.parametrize("kind", ["not_json", "v_is_a_string", "v_is_true",
                                  "known_type_bad_payload", "result_without_in_reply_to"])
def test_invalid_frame_is_answered_then_closed_1002(tls: TLS, kind: str) -> None:
    async def scenario() -> None:
        async with our_mesh(tls) as mesh:
            agent = independent_agent(mesh, tls, {})
            await agent.connect()
            text, frame_id = _invalid(kind)
            await agent.send(text)
            error = await agent.wait_received(lambda f: f["type"] == "error")
            assert error["payload"]["code"] == "BAD_FRAME"
            assert error.get("in_reply_to") == frame_id  # absent when no id could be read
            assert await agent.wait_disconnected() == 1002
    run(scenario())


def test_binary_message_is_closed_1003(tls: TLS) -> None:
    async def scenario() -> None:
        async with our_mesh(tls) as mesh:
            agent = independent_agent(mesh, tls, {})
            await agent.connect()
            assert agent.ws is not None
            await agent.ws.send(b"\x00binary")
            assert await agent.wait_disconnected() == 1003
    run(scenario())


# -- our extension meets a peer that does not know it ----------------------------------------------


def test_cancel_extension_downgrades_and_a_late_result_is_ignored(tls: TLS) -> None:
    async def scenario() -> None:
        async with our_mesh(tls) as mesh:
            gate, slow_echo = gated()
            agent = independent_agent(mesh, tls, {"slow_echo": slow_echo,
                                                  "get_ticket": get_ticket})
            await agent.connect()
            link = await mesh.server.wait_for_agent(INSTANCE, timeout=WAIT)
            with pytest.raises(DispatchError) as late:
                await mesh.server.dispatch(INSTANCE, "slow_echo", {"n": 1}, deadline_ms=200)
            assert late.value.code == "DEADLINE_EXCEEDED"
            cancel = await agent.wait_received(lambda f: f["type"] == "cancel")
            answer = await mesh.wait_event(ExtensionUnsupported)
            assert isinstance(answer, ExtensionUnsupported) and answer.frame_type == "cancel"
            await agent.changes.until(lambda: [
                f for f in agent.sent("error") if f.get("in_reply_to") == cancel["id"]])

            gate.set()  # the handler ends after the mesh gave up: its result is ignored
            await agent.changes.until(lambda: agent.sent("dispatch_result"))
            await ping_barrier(agent)
            assert link.conn.stats.late_terminal_frames == 1
            result = await mesh.server.dispatch(INSTANCE, "get_ticket", {"ticket_id": "T-3"},
                                                deadline_ms=5000)
            assert result["ticket_id"] == "T-3" and not link.conn.closed
            await agent.close()
    run(scenario())


# -- resume ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("finish_while_down", [True, False],
                         ids=["result-queued-while-down", "result-after-resume"])
def test_resume_delivers_the_result_exactly_once(tls: TLS, finish_while_down: bool) -> None:
    async def scenario() -> None:
        async with our_mesh(tls) as mesh:
            gate, slow_echo = gated()
            agent = independent_agent(mesh, tls, {"slow_echo": slow_echo})
            first = await agent.connect()
            link = await mesh.server.wait_for_agent(INSTANCE, timeout=WAIT)
            call = asyncio.create_task(
                mesh.server.dispatch(INSTANCE, "slow_echo", {"n": 7}, deadline_ms=10_000))
            await agent.changes.until(lambda: agent.handler_calls)
            dispatch_id = agent.handler_calls[0][0]

            await agent.cut()  # TCP gone mid-dispatch, no close frame
            await asyncio.wait_for(link.link.done.wait(), WAIT)
            assert not call.done()
            if finish_while_down:
                gate.set()
                await agent.changes.until(lambda: agent.outbox)

            second = await agent.connect()
            assert agent.sent("hello")[-1]["payload"]["resume_token"] == (
                first["payload"]["resume_token"])
            assert second["payload"]["resumed"] is True
            assert second["payload"]["replayed_dispatches"] == [dispatch_id]
            replay = await agent.wait_received(
                lambda f: f["type"] == "dispatch" and f["payload"].get("attempt", 1) == 2)
            assert replay["id"] == dispatch_id
            assert replay["payload"]["dispatch_auth"]["type"] == "svantic_jwt"
            gate.set()

            assert await asyncio.wait_for(call, WAIT) == {"echo": {"n": 7}}
            await ping_barrier(agent)
            assert agent.handler_calls == [(dispatch_id, 1)]  # the handler ran once
            results = [f for f in agent.sent("dispatch_result") if f["in_reply_to"] == dispatch_id]
            assert len(results) == 1
            resumed_link = mesh.server.agents[INSTANCE]
            assert resumed_link is not link
            assert resumed_link.conn.stats.late_terminal_frames == 0
            assert agent.auth_failures == []  # the replay's envelope verified too
            await agent.close()
    run(scenario())


def test_duplicate_terminal_frames_first_wins(tls: TLS) -> None:
    async def scenario() -> None:
        async with our_mesh(tls) as mesh:
            agent = independent_agent(mesh, tls, {"get_ticket": get_ticket})
            await agent.connect()
            link = await mesh.server.wait_for_agent(INSTANCE, timeout=WAIT)
            result = await mesh.server.dispatch(INSTANCE, "get_ticket", {"ticket_id": "T-4"},
                                                deadline_ms=5000)
            dispatch_id = agent.received("dispatch")[0]["id"]
            await agent.send(make_frame("dispatch_result", {"result": "again"},
                                        in_reply_to=dispatch_id))
            await agent.send(make_frame("error", {"code": "DISPATCH_FAILED"},
                                        in_reply_to=dispatch_id))
            await ping_barrier(agent)
            assert result["ticket_id"] == "T-4"
            assert link.conn.stats.late_terminal_frames == 2
            assert not link.conn.closed
            await agent.close()
    run(scenario())


def test_resume_with_a_stale_token_fails_the_held_dispatch(tls: TLS) -> None:
    async def scenario() -> None:
        async with our_mesh(tls) as mesh:
            _, slow_echo = gated()
            agent = independent_agent(mesh, tls, {"slow_echo": slow_echo})
            await agent.connect()
            link = await mesh.server.wait_for_agent(INSTANCE, timeout=WAIT)
            call = asyncio.create_task(
                mesh.server.dispatch(INSTANCE, "slow_echo", {"n": 8}, deadline_ms=10_000))
            await agent.changes.until(lambda: agent.handler_calls)
            await agent.cut()
            await asyncio.wait_for(link.link.done.wait(), WAIT)

            agent.resume_token = "a-token-this-mesh-never-issued"
            welcome = await agent.connect()
            assert welcome["payload"]["resumed"] is False
            assert welcome["payload"]["replayed_dispatches"] == []
            with pytest.raises(DispatchError) as lost:
                await asyncio.wait_for(call, WAIT)
            assert lost.value.code == "AGENT_DISCONNECTED"
            await ping_barrier(agent)
            assert agent.received("dispatch", connection=2) == []  # nothing replayed
            await agent.close()
    run(scenario())
