"""`svantic.Agent`, `Context`, the connector's option resolution and the control plane's
pure request/answer logic, without a mesh."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import anyio
import pytest
import svantic
from svantic import _control
from svantic.connector import DEFAULT_SVANTIC_URL, build_verifier, resolve
from svantic.errors import error_for

from svantic_proto.capabilities import CapabilityRegistry, DispatchContext
from svantic_proto.errors import LocalProtocolError
from svantic_proto.events import DispatchReceived
from svantic_proto.frames import SessionContext

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


def dispatch_context(deadline_ms: int = 30_000, **options: Any) -> DispatchContext:
    return DispatchContext(dispatch_id="d-1", capability="cap", attempt=2,
                           deadline_ms=deadline_ms, task_id="t-1",
                           session_context=SessionContext(
                               session_id="s-1", tenant_id="tenant-1",
                               propagation_headers={
                                   "traceparent": "00-0af7651916cd43dd8448eb211c80319c-"
                                                  "b7ad6b7169203331-01",
                                   "baggage": "k=v"}), **options)


def test_capabilities_are_defined_with_names_descriptions_and_schemas() -> None:
    agent = svantic.Agent(agent_type="tickets", description="Ticket system", version="1.2.3")

    @agent.capability("get_ticket", description="Fetch a ticket", parameters=SCHEMA)
    async def get_ticket(args: Any, ctx: svantic.Context) -> Any:
        return args

    @agent.capability
    def plain(args: Any, ctx: svantic.Context) -> Any:
        """Its doc is its description."""
        return 1

    async def other(args: Any, ctx: svantic.Context) -> Any:
        return 2

    spec = agent.define_capability("other", None, None, other)
    assert list(agent.capabilities) == ["get_ticket", "plain", "other"]
    assert agent.capabilities["get_ticket"] == svantic.CapabilitySpec(
        "get_ticket", "Fetch a ticket", SCHEMA)
    assert agent.capabilities["plain"].description == "Its doc is its description."
    assert spec.parameters is None and agent.handler("other") is other
    assert set(agent.registry.capabilities) == {"get_ticket", "plain", "other"}
    assert agent.registry.capabilities["plain"].blocking  # a worker thread on asyncio
    assert not agent.registry.capabilities["get_ticket"].blocking
    assert agent.tools()[0] == {"name": "get_ticket", "description": "Fetch a ticket",
                                "parameters": SCHEMA}
    assert agent.tools()[2]["parameters"] == {"type": "object"}
    card = agent.agent_card()
    assert card["name"] == "tickets" and card["version"] == "1.2.3"
    assert [skill["id"] for skill in card["skills"]] == ["get_ticket", "plain", "other"]
    with pytest.raises(TypeError):
        agent.capabilities["x"] = spec  # type: ignore[index]
    assert agent.remove_capability("plain") and "plain" not in agent.registry.capabilities


def test_bad_definitions_fail_at_definition() -> None:
    agent = svantic.Agent(agent_type="t")
    with pytest.raises(ValueError, match="not a valid JSON Schema"):
        agent.define_capability("bad", "", {"type": "no-such-type"}, lambda a, c: None)
    with pytest.raises(ValueError, match="not a valid JSON Schema"):  # never fetched
        agent.define_capability("remote", "", {"$ref": "https://example.invalid/s.json"},
                                lambda a, c: None)
    with pytest.raises(ValueError, match="not callable"):
        agent.define_capability("x", "", None, "nope")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        agent.define_capability("", "", None, lambda a, c: None)
    with pytest.raises(ValueError):
        svantic.Agent(agent_type="")
    with pytest.raises(ValueError):
        svantic.Agent(agent_type="t", max_concurrent_sessions=-1)


def _resolve(registry: CapabilityRegistry, capability: str, arguments: dict[str, Any]) -> Any:
    event = DispatchReceived("d", capability, arguments, 1000, 1, None, None)
    return registry.resolve(event)


def test_arguments_are_checked_by_draft_2020_12() -> None:
    registry = CapabilityRegistry()
    registry.add("tuple", lambda a, c: None, parameters={
        "type": "object",
        "properties": {"pair": {"prefixItems": [{"type": "integer"}], "items": False},
                       "n": {"$ref": "#/$defs/small"}},
        "$defs": {"small": {"type": "integer", "maximum": 3}},
        "unevaluatedProperties": False})
    assert _resolve(registry, "tuple", {"pair": [1], "n": 2})[1] is None
    assert _resolve(registry, "tuple", {"pair": [1, 2]})[1][0] == "INVALID_ARGUMENTS"
    code, message = _resolve(registry, "tuple", {"n": 9})[1]
    assert (code, message) == ("INVALID_ARGUMENTS", "n: 9 is greater than the maximum of 3")
    assert _resolve(registry, "tuple", {"extra": 1})[1][0] == "INVALID_ARGUMENTS"
    assert _resolve(registry, "tuple", {"n": True})[1][0] == "INVALID_ARGUMENTS"
    assert _resolve(registry, "nope", {})[1][0] == "CAPABILITY_NOT_FOUND"
    with pytest.raises(LocalProtocolError):
        registry.add("bad", lambda a, c: None, parameters={"minimum": "three"})


def test_the_context_wraps_the_dispatch() -> None:
    ctx = svantic.Context(dispatch_context(deadline_ms=10_000))
    assert (ctx.dispatch_id, ctx.task_id, ctx.capability, ctx.attempt) == (
        "d-1", "t-1", "cap", 2)
    assert (ctx.session_id, ctx.tenant_id, ctx.deadline_ms) == ("s-1", "tenant-1", 10_000)
    assert ctx.parent_trace_id == "0af7651916cd43dd8448eb211c80319c"
    assert ctx.parent_span_id == "b7ad6b7169203331" and dict(ctx.baggage) == {"k": "v"}
    assert 9.0 < ctx.time_left() <= 10.0 and not ctx.cancelled
    sent: list[Any] = []
    ctx = svantic.Context(dispatch_context(send_chunk=sent.append,
                                           tool_caller=lambda *a, **k: (a, k)))
    ctx.chunk({"part": 1})
    assert sent == [{"part": 1}]
    assert ctx.tool_call("t", {"a": 1}, agent_type="x") == (("t", {"a": 1}), {
        "deadline_ms": None, "agent_type": "x", "instance_id": None, "session_id": "s-1"})
    assert ctx.call_tool("t")[0] == ("t", None)
    past = svantic.Context(dispatch_context(deadline_ms=1000), started=time.monotonic() - 2)
    assert past.time_left() == 0 and past.cancelled


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_wait_cancelled_wakes_on_cancel_and_at_the_deadline(backend: str) -> None:
    async def scenario() -> None:
        dispatch = dispatch_context()
        ctx = svantic.Context(dispatch)
        async with anyio.create_task_group() as group:
            group.start_soon(ctx.wait_cancelled)
            await anyio.wait_all_tasks_blocked()
            dispatch.cancel()  # what the runtime calls on `cancel`
        assert ctx.cancelled and dispatch.cancelled
        await ctx.wait_cancelled()  # already: at once
        short = svantic.Context(dispatch_context(deadline_ms=50))
        with anyio.fail_after(5):
            await short.wait_cancelled()
        assert short.cancelled and not short.dispatch.cancelled

    anyio.run(scenario, backend=backend)


def test_start_and_stop_need_credentials_and_resolve_the_environment() -> None:
    agent = svantic.Agent(agent_type="t", max_concurrent_sessions=4)
    env = {"SVANTIC_URL": "https://mesh.test:9443/", "SVANTIC_CLIENT_ID": "id",
           "SVANTIC_CLIENT_SECRET": "secret", "SVANTIC_SIGNING_SECRET": "signing",
           "SVANTIC_CA_FILE": "/ca.pem"}
    settings = resolve(agent, {}, env, hostname="host", pid=42)
    assert (settings.svantic_url, settings.client_id, settings.client_secret) == (
        "https://mesh.test:9443", "id", "secret")
    assert settings.instance_id == "host-42" and settings.max_concurrent_sessions == 4
    assert settings.deployment_mode == "connected" and settings.cafile == "/ca.pem"
    assert build_verifier(settings).enabled
    hosted = resolve(agent, {"public_url": "https://me.test/", "listen": ("0.0.0.0", 8080),
                             "token": "jwt", "max_concurrent_sessions": 0},
                     {"SVANTIC_DISPATCH_AUTH_ENABLED": "false"}, hostname="h", pid=1)
    assert (hosted.deployment_mode, hosted.instance_id, hosted.svantic_url) == (
        "hosted", "h-8080", DEFAULT_SVANTIC_URL)
    assert hosted.max_concurrent_sessions == 0 and not build_verifier(hosted).enabled
    shared = resolve(agent, {"token": "jwt", "dispatch_auth": {
        "type": "shared_secret", "secret": "s3cret-value"}}, {}, hostname="h", pid=1)
    assert build_verifier(shared).enabled
    with pytest.raises(ValueError, match="client_id"):
        resolve(agent, {}, {}, hostname="h", pid=1)
    with pytest.raises(ValueError, match="signing_secret"):
        resolve(agent, {"token": "jwt"}, {}, hostname="h", pid=1)
    with pytest.raises(ValueError, match="adapter"):
        resolve(agent, {"token": "jwt", "adapter": "tornado"}, env, hostname="h", pid=1)
    with pytest.raises(ValueError, match="hosted mode"):
        resolve(agent, {"token": "jwt", "deployment_mode": "hosted"}, env, hostname="h",
                pid=1)
    with pytest.raises(TypeError, match="unknown"):
        svantic.MeshConnector(agent, token="jwt", signing_secret="s", nonsense=1)


def test_disconnect_is_safe_when_never_connected() -> None:
    agent = svantic.Agent(agent_type="t")
    connector = svantic.MeshConnector(agent, token="jwt", signing_secret="s")
    asyncio.run(connector.disconnect())
    assert not connector.connected and connector.token is None
    assert connector.deployment_mode is None and connector.ws_transport is None
    gevent_connector = svantic.MeshConnector(agent, token="jwt", signing_secret="s",
                                             adapter="gevent")
    assert isinstance(gevent_connector, svantic.GeventMeshConnector)
    gevent_connector.disconnect()


def _jwt(claims: dict[str, Any]) -> str:
    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")
    return f"{part({'alg': 'HS256'})}.{part(claims)}.sig"


def test_the_control_plane_calls_and_answers() -> None:
    call = _control.token_call("id", "secret")
    assert (call.path, call.authenticated) == ("/auth/token", False)
    assert call.loggable()["client_secret"] == "<redacted>"
    token = _jwt({"exp": 1_000_100})
    grant = _control.token_grant({"access_token": token, "expires_in": 100,
                                  "tenant_id": "t"})
    assert (grant.expires_in, grant.expires_at, grant.tenant_id) == (100, 1_000_100, "t")
    assert _control.renew_after(grant) == 80
    assert _control.renew_after(grant, 1_000_050) == 40  # what is left of it counts
    assert _control.renew_after(grant, 1_000_200) == _control.MIN_RENEW
    assert "access_token" not in repr(grant)
    registration = _control.Registration(
        agent_type="a", instance_id="i", tools=[{"name": "x"}], agent_card=None,
        dispatch_auth={"type": "shared_secret", "secret": "s3cret"},
        max_concurrent_sessions=2)
    body = _control.register_call(registration).body
    assert body["dispatch_auth"] == {"type": "shared_secret"} and body["secret"] == "s3cret"
    assert body["deployment_mode"] == "connected" and "url" not in body
    beat = _control.heartbeat_call("i", active_sessions=2, max_concurrent_sessions=2).body
    assert beat["status"] == "busy"
    assert _control.answer(200, b'{"ok": true}') == {"ok": True}
    with pytest.raises(svantic.DeploymentModeMismatchError) as mismatch:
        _control.answer(409, b'{"error": {"code": "DEPLOYMENT_MODE_MISMATCH", '
                             b'"message": "registered as hosted"}}')
    assert (mismatch.value.status, mismatch.value.message) == (409, "registered as hosted")
    with pytest.raises(svantic.SvanticApiError) as plain:
        _control.answer(500, b"<html>")
    assert plain.value.code == "INTERNAL"


@pytest.mark.parametrize(("status", "code", "cls"), [
    (400, "INVALID_REQUEST", svantic.InvalidRequestError),
    (401, "UNAUTHORIZED", svantic.UnauthorizedError),
    (403, "AGENT_TYPE_NOT_ALLOWED", svantic.AgentTypeNotAllowedError),
    (403, "TENANT_MISMATCH", svantic.TenantMismatchError),
    (404, "INSTANCE_NOT_FOUND", svantic.InstanceNotFoundError),
    (409, "DEPLOYMENT_MODE_MISMATCH", svantic.DeploymentModeMismatchError),
    (502, "AGENT_CARD_PROBE_FAILED", svantic.AgentCardProbeFailedError),
    (503, "AGENT_UNAVAILABLE", svantic.AgentUnavailableError),
    (502, "AGENT_DISCONNECTED", svantic.AgentDisconnectedError),
    (502, "AGENT_UNHEALTHY", svantic.AgentUnhealthyError),
    (504, "DEADLINE_EXCEEDED", svantic.DeadlineExceededError),
    (404, "SESSION_NOT_FOUND", svantic.SvanticApiError),
])
def test_error_classes_by_code(status: int, code: str, cls: type[Exception]) -> None:
    error = error_for(status, {"error": {"code": code, "message": "the server's words"}})
    assert type(error) is cls and error.message == "the server's words"
    assert (error.status, error.code) == (status, code)
