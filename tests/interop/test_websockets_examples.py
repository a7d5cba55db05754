"""The message-mode examples run: examples/websockets_mesh.py and examples/websockets_agent.py
on python-websockets, together and against the independent peers, over real TLS on 127.0.0.1.

* the example agent and the example mesh: a dispatch round trip, an unknown capability,
  a drain on stop, and the spec 1 refusals as typed errors on the agent;
* a plain HTTPS GET to the example mesh gets the spec's JSON 426;
* the independent agent (python-websockets, from the spec alone) against the example mesh,
  and our byte-mode asyncio agent against it;
* the example agent against the independent mesh (aiohttp, from the spec alone).
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from _independent import (
    TLS,
    WAIT,
    Frame,
    IndependentAgent,
    IndependentMesh,
    Registration,
    decode_transport_token,
    loopback_tls,
    transport_token,
)

from svantic_proto import (
    Config,
    DeploymentModeMismatch,
    DispatchAuthMinter,
    DispatchAuthVerifier,
    DispatchContext,
    DispatchError,
    HeartbeatReceived,
    InstanceNotFound,
    InstanceRecord,
    TenantMismatch,
    jwt_dispatch_auth,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import websockets_agent
import websockets_mesh

TRANSPORT_SECRET = "interop-transport-secret-0123456789abcdef"
SIGNING_SECRET = "interop-signing-secret-0123456789abcdef"
TENANT = "tenant-interop"
INSTANCE = "echo-ws-1"
INSTANCES = {
    INSTANCE: InstanceRecord(INSTANCE, TENANT, "connected", "echo-agent"),
    "echo-hosted": InstanceRecord("echo-hosted", TENANT, "hosted", "echo-agent"),
    "echo-other-tenant": InstanceRecord("echo-other-tenant", "tenant-other", "connected", "x"),
}


@pytest.fixture(scope="module")
def tls() -> TLS:
    return loopback_tls()


def run(scenario: Awaitable[None]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(20):
            await scenario
    asyncio.run(bounded())


def token() -> str:
    return transport_token(TRANSPORT_SECRET, tenant_id=TENANT)


class WatchedMesh(websockets_mesh.Mesh):
    """The example mesh, keeping the heartbeats it saw."""

    heartbeats: int = 0

    def on_event(self, link: websockets_mesh.Link, event: Any) -> None:
        self.heartbeats += isinstance(event, HeartbeatReceived)
        super().on_event(link, event)


@asynccontextmanager
async def example_mesh(tls: TLS, config: Config | None = None) -> AsyncIterator[
        tuple[WatchedMesh, str]]:
    mesh = WatchedMesh(
        lambda t: decode_transport_token(t, TRANSPORT_SECRET), INSTANCES.get,
        jwt_dispatch_auth(DispatchAuthMinter(SIGNING_SECRET)), config or Config())
    async with mesh.serve("127.0.0.1", 0, tls.server) as server:
        port = server.sockets[0].getsockname()[1]
        yield mesh, f"wss://127.0.0.1:{port}/agents/connect"


@asynccontextmanager
async def example_agent(url: str, tls: TLS, *, instance_id: str = INSTANCE,
                        config: Config | None = None) -> AsyncIterator[asyncio.Task[None]]:
    """The example agent, running; on exit it is stopped (close_request, drain, 1000)."""
    stop = asyncio.Event()
    task = asyncio.create_task(websockets_agent.run_agent(
        url, token=token(), instance_id=instance_id, ssl_context=tls.client, stop=stop,
        dispatch_auth=DispatchAuthVerifier(instance_id, hs256_keys=[SIGNING_SECRET]),
        config=config))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, WAIT)


def test_the_examples_run_a_dispatch_round_trip(tls: TLS) -> None:
    async def scenario() -> None:
        config = Config(heartbeat_interval=0.2)
        async with example_mesh(tls, config) as (mesh, url):
            async with example_agent(url, tls) as agent:
                await asyncio.wait_for(mesh.wait_for_agent(INSTANCE), WAIT)
                link = mesh.agents[INSTANCE]
                assert link.ws.subprotocol == "svantic.v1"
                assert await mesh.dispatch(INSTANCE, "echo", {"x": [1, "two"]}) == {"x": [1, "two"]}
                with pytest.raises(DispatchError) as failed:
                    await mesh.dispatch(INSTANCE, "shout", {})
                assert failed.value.code == "CAPABILITY_NOT_FOUND"
                while mesh.heartbeats < 3:  # at welcome, then every 0.2 s (the welcome's value)
                    await asyncio.sleep(0.05)
                assert not agent.done()
            assert agent.result() is None  # stopped: close_request, drained, closed 1000
            await asyncio.wait_for(link.ws.wait_closed(), WAIT)
            assert link.ws.close_code == 1000
            assert INSTANCE not in mesh.agents
            with pytest.raises(DispatchError) as unavailable:
                await mesh.dispatch(INSTANCE, "echo", {})
            assert unavailable.value.code == "AGENT_UNAVAILABLE"
    run(scenario())


@pytest.mark.parametrize(("instance_id", "error"), [
    ("nobody", InstanceNotFound),
    ("echo-hosted", DeploymentModeMismatch),
    ("echo-other-tenant", TenantMismatch),
])
def test_a_refused_upgrade_is_the_typed_error_on_the_example_agent(
        tls: TLS, instance_id: str, error: type[Exception]) -> None:
    async def scenario() -> None:
        async with example_mesh(tls) as (_, url):
            with pytest.raises(error):
                async with example_agent(url, tls, instance_id=instance_id) as agent:
                    await asyncio.wait_for(asyncio.shield(agent), WAIT)
    run(scenario())


def test_a_plain_https_get_gets_the_spec_s_json_426(tls: TLS) -> None:
    async def scenario() -> None:
        async with example_mesh(tls) as (_, url):
            port = int(url.split(":")[2].split("/")[0])
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls.client)
            writer.write(b"GET /agents/connect?instance_id=x HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Connection: close\r\n\r\n")
            response = await asyncio.wait_for(reader.read(), WAIT)
            writer.close()
            head, _, body = response.partition(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            assert lines[0].startswith("HTTP/1.1 426 ")
            headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
            assert headers["content-type"] == "application/json"
            assert headers["upgrade"] == "websocket"
            assert json.loads(body)["error"]["code"] == "UPGRADE_REQUIRED"
    run(scenario())


def test_the_independent_agent_works_with_the_example_mesh(tls: TLS) -> None:
    async def scenario() -> None:
        async def echo(frame: Frame) -> Any:
            return frame["payload"]["arguments"]

        async with example_mesh(tls) as (mesh, url):
            agent = IndependentAgent(url, token=token(), instance_id=INSTANCE,
                                     agent_type="echo-agent", signing_secret=SIGNING_SECRET,
                                     ssl_context=tls.client, handlers={"echo": echo})
            welcome = await agent.connect()
            assert welcome["payload"]["resumed"] is False
            await asyncio.wait_for(mesh.wait_for_agent(INSTANCE), WAIT)
            assert await mesh.dispatch(INSTANCE, "echo", {"n": 7}) == {"n": 7}
            assert agent.auth_failures == []  # the PyJWT check of our dispatch_auth passed
            (dispatch,) = agent.received("dispatch")
            assert dispatch["payload"]["dispatch_auth"]["type"] == "svantic_jwt"
            await agent.close()
            assert agent.close_codes == [1000]
            while INSTANCE in mesh.agents:
                await asyncio.sleep(0.01)
    run(scenario())


def test_our_byte_mode_agent_works_with_the_example_mesh(tls: TLS) -> None:
    from svantic_adapters.asyncio import connect

    async def scenario() -> None:
        async with example_mesh(tls) as (mesh, url):
            agent = connect(url, token=token(), instance_id=INSTANCE, agent_type="echo-agent",
                            ssl_context=tls.client,
                            dispatch_auth=DispatchAuthVerifier(INSTANCE,
                                                               hs256_keys=[SIGNING_SECRET]))

            @agent.capability("echo")
            def echo(arguments: Any, context: DispatchContext) -> Any:
                return dict(arguments)

            async with agent:
                await asyncio.wait_for(mesh.wait_for_agent(INSTANCE), WAIT)
                assert await mesh.dispatch(INSTANCE, "echo", {"k": "v"}) == {"k": "v"}
    run(scenario())


def test_the_example_agent_works_with_the_independent_mesh(tls: TLS) -> None:
    async def scenario() -> None:
        mesh = IndependentMesh(transport_secret=TRANSPORT_SECRET, signing_secret=SIGNING_SECRET,
                               registrations={INSTANCE: Registration(TENANT, "echo-agent")})
        url = await mesh.start(tls.server)
        try:
            async with example_agent(url, tls):
                session = await mesh.wait_session(INSTANCE)
                assert session.hello is not None
                assert session.hello["payload"]["capabilities"] == ["echo"]
                dispatch_id = await mesh.dispatch(INSTANCE, "echo", {"a": 1})
                answer = await mesh.outcome(dispatch_id)
                assert (answer["type"], answer["payload"]["result"]) == ("dispatch_result",
                                                                        {"a": 1})
            await asyncio.wait_for(session.closed.wait(), WAIT)
            assert session.close_code == 1000 and session.frames("close_request")
            with pytest.raises(InstanceNotFound):
                async with example_agent(url, tls, instance_id="nobody") as agent:
                    await asyncio.wait_for(asyncio.shield(agent), WAIT)
            assert mesh.rejections == [(404, "INSTANCE_NOT_FOUND")]  # final: not retried
        finally:
            await mesh.close()
    run(scenario())


def test_the_excerpts_in_the_docs_are_the_example_s_code() -> None:
    """docs/embedding.md shows parts of examples/websockets_mesh.py, which the tests above run."""
    root = Path(__file__).resolve().parents[2]
    page = (root / "docs" / "embedding.md").read_text(encoding="utf-8")
    source = (root / "examples" / "websockets_mesh.py").read_text(encoding="utf-8")
    excerpts = re.findall(r"^```py\n(.*?)^```", page.split("## Message mode")[1], re.S | re.M)
    assert len(excerpts) == 2
    for excerpt in excerpts:
        assert excerpt in source
