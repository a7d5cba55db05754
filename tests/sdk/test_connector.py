"""`svantic.MeshConnector` against the reference mesh (in-process, real TLS on 127.0.0.1),
over asyncio, anyio on asyncio and anyio on trio, and gevent: argument validation, handler
failures, unknown capabilities, streaming, tool calls between two SDK agents, cancellation
at the deadline, a re-delivered dispatch run once, the concurrency limit, dispatch auth
(missing, forged, expired envelopes never reach a handler), token renewal and refresh
without a reconnect, re-registration, the environment variables, and the typed errors.

Every wait is bounded; nothing sleeps a fixed time to let something happen.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import jwt
import pytest
import svantic
from conftest import TENANT, Mesh, parse_sse

from svantic_proto import Config
from svantic_proto.auth import DispatchAuthMinter
from svantic_proto.errors import DispatchError
from svantic_proto.frames import SvanticJwtAuth
from svantic_proto.mesh import DispatchRoute

BACKENDS = ["asyncio", "anyio-asyncio", "anyio-trio"]
LIMIT = 30.0
FAST = Config(reconnect_base_delay=0.05, reconnect_max_delay=0.2, close_timeout=1.0,
              close_grace=2.0)
SECRET_TEXT = "a secret detail that must not leak"
_ids = itertools.count()


def instance(prefix: str) -> str:
    return f"{prefix}-{next(_ids)}-{time.monotonic_ns() % 10**8}"


def run(backend: str, scenario: Callable[[], Awaitable[None]]) -> None:
    """Run `scenario` on one backend, bounded."""
    if backend == "asyncio":
        async def bounded() -> None:
            async with asyncio.timeout(LIMIT):
                await scenario()
        asyncio.run(bounded())
        return

    async def bounded_anyio() -> None:
        with anyio.fail_after(LIMIT):
            await scenario()
    anyio.run(bounded_anyio, backend=backend.removeprefix("anyio-"))


def adapter(backend: str) -> str:
    return "asyncio" if backend == "asyncio" else "anyio"


def options(mesh: Mesh, backend: str, instance_id: str, **extra: Any) -> dict[str, Any]:
    return {"svantic_url": mesh.url, "client_id": mesh.client_id,
            "client_secret": mesh.client_secret, "signing_secret": mesh.signing_secret,
            "cafile": mesh.ca_file, "instance_id": instance_id, "adapter": adapter(backend),
            "config": FAST, **extra}


async def until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll `predicate` (bounded): for state another thread changes."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await anyio.sleep(0.01)


class Gate:
    """Set from any thread, awaited on asyncio or trio (bounded polling)."""

    def __init__(self) -> None:
        self.flag = threading.Event()

    def set(self) -> None:
        self.flag.set()

    async def wait(self, what: str = "the gate") -> None:
        await until(self.flag.is_set, what)


def tickets_agent(calls: list[str]) -> svantic.Agent:
    agent = svantic.Agent(agent_type="tickets", description="Ticket system")

    @agent.capability("get_ticket", description="Fetch a ticket", parameters={
        "type": "object", "properties": {"ticket_id": {"type": "integer", "minimum": 1}},
        "required": ["ticket_id"], "additionalProperties": False})
    async def get_ticket(args: Any, ctx: svantic.Context) -> Any:
        calls.append(ctx.dispatch_id)
        return {"id": args["ticket_id"], "tenant": ctx.tenant_id,
                "capability": ctx.capability, "attempt": ctx.attempt}

    @agent.capability
    async def explode(args: Any, ctx: svantic.Context) -> Any:
        """Always fails."""
        raise RuntimeError(SECRET_TEXT)

    @agent.capability("count")
    async def count(args: Any, ctx: svantic.Context) -> Any:
        for n in range(args["to"]):
            ctx.chunk(n)
        return {"counted": args["to"]}

    @agent.capability("count_in_thread")
    def count_in_thread(args: Any, ctx: svantic.Context) -> Any:
        for n in range(args["to"]):
            ctx.chunk({"n": n})
        return {"thread": threading.current_thread() is not threading.main_thread()}

    @agent.capability("gone")
    async def gone(args: Any, ctx: svantic.Context) -> Any:
        return "never"

    return agent


@pytest.mark.parametrize("backend", BACKENDS)
def test_dispatch_outcomes(mesh: Mesh, backend: str) -> None:
    calls: list[str] = []
    agent = tickets_agent(calls)
    instance_id = instance("tickets")

    async def scenario() -> None:
        connector = await agent.start(**options(mesh, backend, instance_id))
        try:
            assert connector.connected and connector.deployment_mode == "connected"
            assert connector.ws_transport is not None and connector.token
            answer = await mesh.call("get_ticket", {"ticket_id": 7}, instance_id=instance_id)
            assert answer.status_code == 200, answer.text
            assert answer.json()["result"] == {"id": 7, "tenant": TENANT,
                                               "capability": "get_ticket", "attempt": 1}

            answer = await mesh.call("get_ticket", {"ticket_id": "seven"},
                                     instance_id=instance_id)
            assert answer.status_code == 422, answer.text
            error = answer.json()["error"]
            assert error["code"] == "INVALID_ARGUMENTS"
            assert error["message"].startswith("ticket_id: ") and "integer" in error["message"]
            answer = await mesh.call("get_ticket", {}, instance_id=instance_id)
            assert answer.json()["error"]["code"] == "INVALID_ARGUMENTS"
            assert "ticket_id" in answer.json()["error"]["message"]
            assert len(calls) == 1  # the handler never ran for bad arguments

            answer = await mesh.call("explode", {}, instance_id=instance_id)
            assert answer.status_code == 422
            assert answer.json()["error"]["code"] == "DISPATCH_FAILED"
            assert SECRET_TEXT not in answer.text and "RuntimeError" in answer.text

            agent.remove_capability("gone")  # the mesh still routes it: the agent refuses
            answer = await mesh.call("gone", {}, instance_id=instance_id)
            assert answer.json()["error"]["code"] == "CAPABILITY_NOT_FOUND"

            for capability, expected in (("count", [0, 1, 2]),
                                         ("count_in_thread", [{"n": 0}, {"n": 1}, {"n": 2}])):
                answer = await mesh.call(capability, {"to": 3}, instance_id=instance_id,
                                         stream=True)
                events = parse_sse(answer.text)
                assert [name for name, _ in events] == ["chunk"] * 3 + ["result"], events
                assert [data["data"] for _, data in events[:3]] == expected
            assert events[-1][1]["result"] == {"thread": True}  # a plain handler: a thread
        finally:
            await connector.disconnect()
        assert not connector.connected and connector.token is None
        await connector.disconnect()  # safe twice
        assert mesh.parts.registry.get_instance(instance_id) is None  # deregistered

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_tool_call_between_two_sdk_agents(mesh: Mesh, backend: str) -> None:
    calls: list[str] = []
    tickets = tickets_agent(calls)
    front = svantic.Agent(agent_type="front-desk")

    @front.capability("summarise")
    async def summarise(args: Any, ctx: svantic.Context) -> Any:
        ticket = await ctx.tool_call("get_ticket", {"ticket_id": args["id"]},
                                     agent_type="tickets")
        return {"summary": f"ticket {ticket['id']}"}

    @front.capability("summarise_blocking")
    def summarise_blocking(args: Any, ctx: svantic.Context) -> Any:
        ticket = ctx.call_tool("get_ticket", {"ticket_id": args["id"]}, agent_type="tickets")
        return {"summary": f"ticket {ticket['id']}", "thread": True}

    @front.capability("bad_call")
    async def bad_call(args: Any, ctx: svantic.Context) -> Any:
        try:
            await ctx.tool_call("get_ticket", {"ticket_id": -1}, agent_type="tickets")
        except DispatchError as exc:
            return {"code": exc.code}
        return {"code": None}

    tickets_id, front_id = instance("tickets"), instance("front")

    async def scenario() -> None:
        one = await tickets.start(**options(mesh, backend, tickets_id))
        two = await front.start(**options(mesh, backend, front_id))
        try:
            answer = await mesh.call("summarise", {"id": 5}, instance_id=front_id)
            assert answer.json()["result"] == {"summary": "ticket 5"}, answer.text
            answer = await mesh.call("summarise_blocking", {"id": 6}, instance_id=front_id)
            assert answer.json()["result"] == {"summary": "ticket 6", "thread": True}
            answer = await mesh.call("bad_call", {}, instance_id=front_id)
            assert answer.json()["result"] == {"code": "INVALID_ARGUMENTS"}
        finally:
            await two.disconnect()
            await one.disconnect()

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_deadline_cancels_the_handler(mesh: Mesh, backend: str) -> None:
    agent = svantic.Agent(agent_type="slow")
    seen: dict[str, Any] = {}
    ended, polled = Gate(), Gate()

    @agent.capability("wait")
    async def wait(args: Any, ctx: svantic.Context) -> Any:
        seen["time_left"] = ctx.time_left()
        try:
            await ctx.wait_cancelled()
            seen["returned"] = True
        except anyio.get_cancelled_exc_class():
            seen["interrupted"] = ctx.cancelled
            raise
        finally:
            ended.set()

    @agent.capability("poll")
    def poll(args: Any, ctx: svantic.Context) -> Any:  # a thread: polls, is not interrupted
        limit = time.monotonic() + 10
        while not ctx.cancelled and time.monotonic() < limit:
            time.sleep(0.005)
        seen["polled"] = ctx.cancelled
        polled.set()
        return "too late"

    instance_id = instance("slow")

    async def scenario() -> None:
        connector = await agent.start(**options(mesh, backend, instance_id))
        try:
            for capability in ("wait", "poll"):
                answer = await mesh.call(capability, {}, instance_id=instance_id,
                                         deadline_ms=300)
                assert answer.status_code == 504, answer.text
                assert answer.json()["error"]["code"] == "DEADLINE_EXCEEDED"
            await ended.wait("the handler to be cancelled")
            await polled.wait("the thread to see the cancel")
            assert 0 < seen["time_left"] <= 0.3
            # Either ended it: its own deadline timer (from the handler's start) or the
            # mesh's cancel (whose deadline started first, but must travel back).
            assert seen.get("returned") or seen.get("interrupted") is True, seen
            assert seen["polled"] is True
        finally:
            await connector.disconnect()

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_concurrency_limit(mesh: Mesh, backend: str) -> None:
    agent = svantic.Agent(agent_type="single", max_concurrent_sessions=1)
    entered, release = Gate(), Gate()

    @agent.capability("hold")
    async def hold(args: Any, ctx: svantic.Context) -> Any:
        entered.set()
        await release.wait("the release")
        return "released"

    instance_id = instance("single")

    def routing_status() -> Any:
        return (mesh.parts.fleet.status(instance_id) or {}).get("routing_status")

    async def scenario() -> None:
        connector = await agent.start(**options(mesh, backend, instance_id))
        assert connector.settings.max_concurrent_sessions == 1
        results: list[Any] = []

        async def first() -> None:
            results.append(await mesh.call("hold", {}, instance_id=instance_id))

        try:
            async with anyio.create_task_group() as group:
                group.start_soon(first)
                await entered.wait("the first dispatch to start")
                await until(lambda: routing_status() == "busy", "a busy heartbeat")
                answer = await mesh.call("hold", {}, instance_id=instance_id)
                assert answer.status_code == 503, answer.text  # the mesh counts its leases
                assert answer.json()["error"]["code"] == "AGENT_UNAVAILABLE"

                # Past the mesh's router (its own dispatch): the agent refuses, busy.
                with pytest.raises(DispatchError) as refused:
                    await anyio.to_thread.run_sync(lambda: mesh.in_loop(
                        lambda: mesh.server.dispatch(instance_id, "hold", {})))
                assert refused.value.code == "AGENT_UNAVAILABLE"
                assert "busy" in (refused.value.message or "")
                release.set()
            assert results[0].json()["result"] == "released"
            await until(lambda: routing_status() == "available", "an available heartbeat")
        finally:
            await connector.disconnect()

    run(backend, scenario)


def test_a_redelivered_dispatch_runs_once(mesh: Mesh) -> None:
    agent = svantic.Agent(agent_type="once")
    runs: list[str] = []
    entered, release = Gate(), Gate()

    @agent.capability("hold")
    async def hold(args: Any, ctx: svantic.Context) -> Any:
        runs.append(ctx.dispatch_id)
        entered.set()
        await release.wait("the release")
        return {"runs": len(runs)}

    instance_id = instance("once")

    async def scenario() -> None:
        connector = await agent.start(**options(mesh, "asyncio", instance_id))
        transport = connector.ws_transport
        try:
            call = asyncio.create_task(mesh.call("hold", {}, instance_id=instance_id))
            await entered.wait("the dispatch to start")
            first = transport.conn
            transport.link.abort()  # the socket breaks mid-dispatch
            await until(lambda: transport.conn is not first and transport.ready.is_set(),
                        "the agent to reconnect")
            assert transport.last_started.resumed  # the mesh replays the dispatch
            release.set()
            answer = await call
            assert answer.json()["result"] == {"runs": 1}, answer.text
            assert len(runs) == 1 and transport.session.running == {}
        finally:
            await connector.disconnect()

    run("asyncio", scenario)


def _forged(route: DispatchRoute) -> Any:
    minter = DispatchAuthMinter(b"not-the-mesh-signing-secret-0123456789abcdef")
    return SvanticJwtAuth(token=minter.mint_token(
        instance_id=route.instance_id, agent_type=route.agent_type, tenant_id=route.tenant_id,
        dispatch_id=route.dispatch_id, capability=route.capability, now=route.now))


def _expired(mesh: Mesh) -> Callable[[DispatchRoute], Any]:
    minter = DispatchAuthMinter(mesh.signing_secret.encode())

    def mint(route: DispatchRoute) -> Any:
        return SvanticJwtAuth(token=minter.mint_token(
            instance_id=route.instance_id, agent_type=route.agent_type,
            tenant_id=route.tenant_id, dispatch_id=route.dispatch_id,
            capability=route.capability, now=route.now - 3600))
    return mint


def _other_capability(mesh: Mesh) -> Callable[[DispatchRoute], Any]:
    minter = DispatchAuthMinter(mesh.signing_secret.encode())

    def mint(route: DispatchRoute) -> Any:
        return SvanticJwtAuth(token=minter.mint_token(
            instance_id=route.instance_id, agent_type=route.agent_type,
            tenant_id=route.tenant_id, dispatch_id=route.dispatch_id,
            capability="something_else", now=route.now))
    return mint


def guarded_agent(ran: list[str]) -> svantic.Agent:
    agent = svantic.Agent(agent_type="guarded")

    @agent.capability("secret")
    async def secret(args: Any, ctx: svantic.Context) -> Any:
        ran.append(ctx.dispatch_id)
        return "the secret"

    return agent


def test_dispatch_auth_refuses_forged_and_expired_envelopes(mesh: Mesh) -> None:
    ran: list[str] = []
    agent = guarded_agent(ran)
    instance_id = instance("guarded")

    async def scenario() -> None:
        connector = await agent.start(**options(mesh, "asyncio", instance_id))
        try:
            answer = await mesh.call("secret", {}, instance_id=instance_id)
            assert answer.json()["result"] == "the secret"
            for mint in (_forged, _expired(mesh), _other_capability(mesh)):
                mesh.mint_override = mint
                try:
                    answer = await mesh.call("secret", {}, instance_id=instance_id)
                finally:
                    mesh.mint_override = None
                assert answer.json()["error"]["code"] == "DISPATCH_AUTH_FAILED", answer.text
            assert len(ran) == 1  # only the genuine envelope reached the handler
        finally:
            await connector.disconnect()

    run("asyncio", scenario)


def test_a_missing_envelope_never_reaches_the_handler(make_mesh: Callable[..., Mesh]) -> None:
    mesh = make_mesh(dispatch_auth_enabled=False)  # the mesh sends no envelope at all
    ran: list[str] = []
    agent = guarded_agent(ran)
    instance_id = instance("guarded")

    async def scenario() -> None:
        connector = await agent.start(**options(mesh, "asyncio", instance_id))
        try:
            answer = await mesh.call("secret", {}, instance_id=instance_id)
            assert answer.json()["error"]["code"] == "DISPATCH_AUTH_FAILED", answer.text
            assert "carries no dispatch_auth" in answer.text
            assert ran == []
        finally:
            await connector.disconnect()

    run("asyncio", scenario)


@pytest.mark.parametrize("backend", ["asyncio", "anyio-trio"])
def test_the_token_is_renewed_and_refreshed_without_a_reconnect(
        make_mesh: Callable[..., Mesh], backend: str,
        caplog: pytest.LogCaptureFixture) -> None:
    mesh = make_mesh(token_ttl=3.0)  # renewed at 80% of what is left of it
    calls: list[str] = []
    agent = tickets_agent(calls)
    instance_id = instance("renewed")
    caplog.set_level(logging.INFO, logger="svantic")

    async def scenario() -> None:
        connector = await agent.start(**options(mesh, backend, instance_id))
        transport = connector.ws_transport
        conn, first = transport.conn, connector.token
        try:
            await until(lambda: connector.token != first, "a renewed token")
            assert transport.runtime.token == connector.token
            await until(lambda: time.time() > jwt.decode(
                first, options={"verify_signature": False})["exp"] + 1,
                "the first token to expire", timeout=5)
            answer = await mesh.call("get_ticket", {"ticket_id": 1}, instance_id=instance_id)
            assert answer.status_code == 200, answer.text
            assert transport.conn is conn  # the same connection throughout

            fresh = svantic.connector._control.token_grant(mesh.post(
                "/auth/token", {"client_id": mesh.client_id,
                                "client_secret": mesh.client_secret}).json()).access_token
            await connector.refresh_token(fresh)
            assert connector.token == fresh == transport.runtime.token
            answer = await mesh.call("get_ticket", {"ticket_id": 2}, instance_id=instance_id)
            assert answer.status_code == 200 and transport.conn is conn
        finally:
            await connector.disconnect()
        messages = [r.getMessage() for r in caplog.records if r.name == "svantic.sdk"]
        assert any("token renewed" in m for m in messages)
        assert not any("reconnecting" in m for m in messages)

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_re_register_makes_a_new_capability_routable(mesh: Mesh, backend: str) -> None:
    agent = svantic.Agent(agent_type="growing")

    @agent.capability("first")
    async def first(args: Any, ctx: svantic.Context) -> Any:
        return 1

    instance_id = instance("growing")

    async def scenario() -> None:
        connector = await agent.start(**options(mesh, backend, instance_id))
        transport = connector.ws_transport
        conn = transport.conn
        try:
            async def late(args: Any, ctx: svantic.Context) -> Any:
                return "late"

            agent.define_capability("late", "Added at run time", None, late)
            answer = await mesh.call("late", {}, agent_type="growing")
            assert answer.status_code >= 400  # the mesh does not know it yet
            await connector.re_register()
            answer = await mesh.call("late", {}, agent_type="growing")
            assert answer.json()["result"] == "late", answer.text
            assert transport.conn is conn  # no reconnect
            tools = {t["name"]: t for t in mesh.parts.registry.get_instance(instance_id).tools}
            assert tools["late"] == {"name": "late", "description": "Added at run time",
                                     "parameters": {"type": "object"}}
        finally:
            await connector.disconnect()

    run(backend, scenario)


def test_sessions_and_the_environment(mesh: Mesh, monkeypatch: pytest.MonkeyPatch) -> None:
    instance_id = instance("from-env")
    monkeypatch.setenv("SVANTIC_URL", mesh.url)
    monkeypatch.setenv("SVANTIC_CLIENT_ID", mesh.client_id)
    monkeypatch.setenv("SVANTIC_CLIENT_SECRET", mesh.client_secret)
    monkeypatch.setenv("SVANTIC_SIGNING_SECRET", mesh.signing_secret)
    monkeypatch.setenv("SVANTIC_CA_FILE", mesh.ca_file)
    monkeypatch.setenv("SVANTIC_INSTANCE_ID", instance_id)
    agent = svantic.Agent(agent_type="env-agent")

    @agent.capability("where")
    async def where(args: Any, ctx: svantic.Context) -> Any:
        return {"session_id": ctx.session_id}

    async def scenario() -> None:
        connector = await agent.start(config=FAST)
        try:
            assert connector.svantic_url == mesh.url and connector.instance_id == instance_id
            session_id = await connector.create_session(metadata={"purpose": "test"})
            answer = await mesh.call("where", {}, instance_id=instance_id,
                                     session_id=session_id)
            assert answer.json()["result"] == {"session_id": session_id}, answer.text
            await connector.close_session(session_id)
            answer = await mesh.call("where", {}, instance_id=instance_id,
                                     session_id=session_id)
            assert answer.json()["error"]["code"] == "SESSION_NOT_FOUND"
            with pytest.raises(svantic.SvanticApiError) as missing:
                await connector.close_session(session_id)
            assert missing.value.status == 404 and missing.value.code == "SESSION_NOT_FOUND"
        finally:
            await connector.disconnect()
        with pytest.raises(svantic.NotConnectedError):
            await connector.create_session()

    run("asyncio", scenario)


def test_dispatch_auth_off_by_the_environment(make_mesh: Callable[..., Mesh],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    mesh = make_mesh(dispatch_auth_enabled=False)
    monkeypatch.setenv("SVANTIC_DISPATCH_AUTH_ENABLED", "false")
    monkeypatch.delenv("SVANTIC_SIGNING_SECRET", raising=False)
    ran: list[str] = []
    agent = guarded_agent(ran)
    instance_id = instance("open")

    async def scenario() -> None:
        opts = options(mesh, "asyncio", instance_id)
        del opts["signing_secret"]
        connector = await agent.start(**opts)
        try:
            answer = await mesh.call("secret", {}, instance_id=instance_id)
            assert answer.json()["result"] == "the secret", answer.text
        finally:
            await connector.disconnect()

    run("asyncio", scenario)


def test_control_plane_errors_are_typed(mesh: Mesh, make_mesh: Callable[..., Mesh]) -> None:
    agent = svantic.Agent(agent_type="refused")

    async def scenario() -> None:
        bad = options(mesh, "asyncio", instance("refused"), client_secret="wrong-secret")
        with pytest.raises(svantic.UnauthorizedError) as refused:
            await agent.start(**bad)
        assert refused.value.status == 401
        assert refused.value.message == "invalid client credentials"

        strict = make_mesh()
        assert strict.post("/agents/set_policy", {"policy_mode": "allow-list"}).is_success
        with pytest.raises(svantic.AgentTypeNotAllowedError) as blocked:
            await agent.start(**options(strict, "asyncio", instance("refused")))
        assert blocked.value.code == "AGENT_TYPE_NOT_ALLOWED" and "allow-list" in str(
            blocked.value)

    run("asyncio", scenario)


def test_the_gevent_connector(mesh: Mesh) -> None:
    pytest.importorskip("gevent")
    with pytest.raises(ValueError, match="coroutine function"):  # gevent runs plain ones
        svantic.MeshConnector(tickets_agent([]), **options(
            mesh, "asyncio", instance("gevent"), adapter="gevent")).connect()
    agent = svantic.Agent(agent_type="gevent-tickets")

    @agent.capability("get_ticket", parameters={
        "type": "object", "properties": {"ticket_id": {"type": "integer", "minimum": 1}}})
    def get_ticket(args: Any, ctx: svantic.Context) -> Any:
        return {"id": args["ticket_id"], "session_id": ctx.session_id}

    @agent.capability("count_in_thread")
    def count_in_thread(args: Any, ctx: svantic.Context) -> Any:
        for n in range(args["to"]):
            ctx.chunk({"n": n})
        return "counted"

    instance_id = instance("gevent")
    ready, finished = threading.Event(), threading.Event()
    outcome: dict[str, Any] = {}

    def in_hub() -> None:  # a gevent hub in a thread of its own (no monkey-patching)
        import gevent

        try:
            connector = svantic.MeshConnector(agent, **options(mesh, "asyncio", instance_id,
                                                               adapter="gevent"))
            assert isinstance(connector, svantic.GeventMeshConnector)
            connector.connect()
            outcome["transport"] = type(connector.ws_transport).__module__
            ready.set()
            while not finished.is_set():  # keep the hub serving the agent, bounded
                gevent.sleep(0.01)
            connector.disconnect()
            outcome["connected"] = connector.connected
        except BaseException as exc:
            outcome["error"] = exc
            ready.set()

    thread = threading.Thread(target=in_hub, daemon=True)
    thread.start()
    try:
        assert ready.wait(LIMIT) and "error" not in outcome, outcome
        assert outcome["transport"] == "svantic_adapters.gevent"
        answer = mesh.call_sync("get_ticket", {"ticket_id": 3}, instance_id=instance_id)
        assert answer.status_code == 200, answer.text
        assert answer.json()["result"]["id"] == 3
        answer = mesh.call_sync("count_in_thread", {"to": 2}, instance_id=instance_id,
                                stream=True)
        assert [name for name, _ in parse_sse(answer.text)] == ["chunk", "chunk", "result"]
        answer = mesh.call_sync("get_ticket", {"ticket_id": 0}, instance_id=instance_id)
        assert answer.json()["error"]["code"] == "INVALID_ARGUMENTS"
    finally:
        finished.set()
        thread.join(LIMIT)
    assert outcome.get("connected") is False, outcome


@pytest.mark.parametrize("backend", BACKENDS)
def test_hosted_mode_serves_send_and_registers_its_url(mesh: Mesh, backend: str) -> None:
    certfile, keyfile = mesh.issue_cert()  # signed by the CA the mesh trusts
    calls: list[str] = []
    agent = tickets_agent(calls)
    instance_id = instance("hosted")

    async def scenario() -> None:
        connector = await agent.start(**options(
            mesh, backend, instance_id, deployment_mode="hosted", certfile=certfile,
            keyfile=keyfile, listen=("127.0.0.1", 0)))
        try:
            assert connector.deployment_mode == "hosted" and connector.ws_transport is None
            url = connector.hosted_server.url
            assert mesh.parts.registry.get_instance(instance_id).url == url
            answer = await mesh.call("get_ticket", {"ticket_id": 4}, instance_id=instance_id)
            assert answer.json()["result"]["id"] == 4, answer.text
            answer = await mesh.call("get_ticket", {"ticket_id": "x"}, instance_id=instance_id)
            assert answer.json()["error"]["code"] == "INVALID_ARGUMENTS"
            await connector.re_register()
        finally:
            await connector.disconnect()
        assert connector.hosted_server is None
        assert mesh.parts.registry.get_instance(instance_id) is None

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_hosted_agent_calls_another_agent_with_ctx_tool_call(mesh: Mesh, backend: str) -> None:
    """The same handler code in both modes: a hosted agent has no socket for a spec 3
    `tool_call`, so its `ctx.tool_call` goes through `/agents/dispatch`, and a failure is
    the same `DispatchError` a connected agent's handler would see."""
    certfile, keyfile = mesh.issue_cert()
    worker = tickets_agent([])
    relay = svantic.Agent(agent_type="relay")

    @relay.capability("relay")
    async def relay_handler(args: Any, ctx: svantic.Context) -> Any:
        try:
            return await ctx.tool_call("get_ticket", {"ticket_id": args["n"]},
                                       instance_id=args["to"])
        except DispatchError as exc:
            return {"failed": exc.code}

    async def scenario() -> None:
        worker_connector = await worker.start(**options(mesh, backend, instance("worker")))
        relay_connector = await relay.start(**options(
            mesh, backend, instance("relay"), deployment_mode="hosted", certfile=certfile,
            keyfile=keyfile, listen=("127.0.0.1", 0)))
        try:
            to = worker_connector.instance_id
            answer = await mesh.call("relay", {"n": 5, "to": to},
                                     instance_id=relay_connector.instance_id)
            assert answer.json()["result"]["id"] == 5, answer.text
            answer = await mesh.call("relay", {"n": 0, "to": to},
                                     instance_id=relay_connector.instance_id)
            assert answer.json()["result"] == {"failed": "INVALID_ARGUMENTS"}, answer.text
        finally:
            await relay_connector.disconnect()
            await worker_connector.disconnect()

    run(backend, scenario)
