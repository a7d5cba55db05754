"""The control plane (spec 6, seed 004): every path's answer and every refusal, driven
with plain requests against the real registry, router, fleet, events and metrics."""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from svantic_mesh.control import (
    DASHBOARD_CSP,
    ControlPlane,
    Dispatch,
    ProbeCard,
    Response,
    Subscribe,
    error_response,
    sse_chunk,
    sse_result,
)
from svantic_mesh.events import EventBus
from svantic_mesh.fleet import Fleet
from svantic_mesh.metrics import MeshMetrics
from svantic_mesh.registry import RegistryError, SqliteRegistry
from svantic_mesh.routing import Router
from svantic_mesh.tokens import TokenIssuer

from svantic_proto.http import HttpRequest

WALL = 1_700_000_000.0
NOW = 100.0
SHARED = "very-secret-shared-value-0123456789"
PUBLIC = "https://127.0.0.1:8443"


@dataclass
class Mesh:
    cp: ControlPlane
    registry: SqliteRegistry
    fleet: Fleet
    events: EventBus
    tokens: TokenIssuer
    token: str
    other_token: str

    def call(
        self,
        path: str,
        body: Any = None,
        *,
        method: str = "POST",
        token: str | None = "default",
        headers: tuple[tuple[str, str], ...] = (),
        raw: bytes | None = None,
        wall: float = WALL,
        now: float = NOW,
    ) -> Any:
        hdrs = list(headers)
        if token == "default":
            token = self.token
        if token is not None:
            hdrs.append(("authorization", f"Bearer {token}"))
        data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
        req = HttpRequest(method, path, path, "", tuple(hdrs), data)
        return self.cp.handle(req, now=now, wall=wall)

    def ok(self, path: str, body: Any = None, **kw: Any) -> Any:
        res = self.call(path, body, **kw)
        assert isinstance(res, Response), res
        assert res.status == 200, (res.status, res.body)
        return json.loads(res.body)

    def register(self, body: dict[str, Any], **kw: Any) -> Any:
        return self.call("/agents/register", body, **kw)


def error_of(res: Any) -> tuple[int, str]:
    assert isinstance(res, Response), res
    assert res.header("content-type") == "application/json"
    assert res.header("cache-control") == "no-store"
    payload = json.loads(res.body)
    assert set(payload) == {"error"}
    assert set(payload["error"]) == {"code", "message"}
    return res.status, payload["error"]["code"]


def message_of(res: Response) -> str:
    return str(json.loads(res.body)["error"]["message"])


@pytest.fixture
def mesh() -> Iterator[Mesh]:
    registry = SqliteRegistry(":memory:", secret_key=b"k" * 32, scrypt_n=2)
    registry.add_client("client-a", "secret-a", "tenant-a")
    registry.add_client("client-b", "secret-b", "tenant-b")
    events = EventBus()
    metrics = MeshMetrics()
    fleet = Fleet(registry=registry, router=Router(), events=events, metrics=metrics)
    tokens = TokenIssuer(b"t" * 32, ttl=3600.0)
    ids = (f"id-{n}" for n in itertools.count(1))
    cp = ControlPlane(
        registry=registry,
        fleet=fleet,
        tokens=tokens,
        events=events,
        metrics=metrics,
        public_url=PUBLIC,
        jwks={"keys": [{"kty": "OKP", "kid": "k1"}]},
        max_body_bytes=16384,
        new_id=lambda: next(ids),
        dashboard_html=b"<!doctype html><title>mesh</title>",
    )
    token, _ = tokens.issue("client-a", "tenant-a", WALL)
    other, _ = tokens.issue("client-b", "tenant-b", WALL)
    yield Mesh(cp, registry, fleet, events, tokens, token, other)
    registry.close()


def connected(instance_id: str = "nav-1", **extra: Any) -> dict[str, Any]:
    return {
        "agent_type": "navigator",
        "instance_id": instance_id,
        "tools": [{"name": "get_ticket"}],
        **extra,
    }


# -- plumbing -------------------------------------------------------------------------------


def test_response_helpers() -> None:
    res = error_response(400, "INVALID_REQUEST", "x", (("x-a", "b"),))
    assert res.header("x-a") == "b"
    assert error_of(res) == (400, "INVALID_REQUEST")
    assert Response.json(201, {"a": 1}).body == b'{"a":1}'


def test_unknown_path_and_wrong_method(mesh: Mesh) -> None:
    assert error_of(mesh.call("/nope", {})) == (404, "NOT_FOUND")
    res = mesh.call("/agents/register", method="GET")
    assert error_of(res) == (405, "METHOD_NOT_ALLOWED")
    assert res.header("allow") == "POST"
    res = mesh.call("/metrics", {}, method="POST")
    assert error_of(res) == (405, "METHOD_NOT_ALLOWED")
    assert res.header("allow") == "GET"


def test_oversized_body(mesh: Mesh) -> None:
    res = mesh.call("/agents/register", raw=b"{" + b" " * 20000 + b"}")
    assert error_of(res) == (413, "PAYLOAD_TOO_LARGE")


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b"", "JSON object"),
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'"text"', "JSON object"),
        (b"\xff\xfe", "not valid JSON"),
    ],
)
def test_bad_bodies(mesh: Mesh, raw: bytes, needle: str) -> None:
    res = mesh.call("/agents/register", raw=raw)
    assert error_of(res) == (400, "INVALID_REQUEST")
    assert needle in message_of(res)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"instance_id": "x"}, "agent_type"),
        ({"agent_type": "nav"}, "instance_id"),
        ({"agent_type": 5, "instance_id": "x"}, "agent_type"),
        ({"agent_type": "a" * 129, "instance_id": "x"}, "agent_type"),
        ({"agent_type": "nav", "instance_id": "has space"}, "instance_id"),
        ({"agent_type": "nav", "instance_id": "x" * 257}, "instance_id"),
        ({"agent_type": "nav", "instance_id": "x", "max_concurrent_sessions": True},
         "max_concurrent_sessions"),
        ({"agent_type": "nav", "instance_id": "x", "max_concurrent_sessions": 1.0},
         "max_concurrent_sessions"),
        ({"agent_type": "nav", "instance_id": "x", "max_concurrent_sessions": -1},
         "max_concurrent_sessions"),
        ({"agent_type": "nav", "instance_id": "x", "deployment_mode": "cloud"},
         "deployment_mode"),
        ({"agent_type": "nav", "instance_id": "x", "tools": [1]}, "tools"),
        ({"agent_type": "nav", "instance_id": "x", "tools": {}}, "tools"),
        ({"agent_type": "nav", "instance_id": "x", "agent_card": []}, "agent_card"),
        ({"agent_type": "nav", "instance_id": "x", "mcp_servers": "x"}, "mcp_servers"),
        ({"agent_type": "nav", "instance_id": "x", "dispatch_auth": {"type": "basic"}},
         "dispatch_auth.type"),
        ({"agent_type": "nav", "instance_id": "x", "dispatch_auth": "svantic_jwt"},
         "dispatch_auth"),
        ({"agent_type": "nav", "instance_id": "x", "url": "ftp://a"}, "url"),
    ],
)
def test_register_field_errors_name_the_field(
    mesh: Mesh, body: dict[str, Any], field: str
) -> None:
    res = mesh.register(body)
    assert error_of(res) == (400, "INVALID_REQUEST")
    assert field in message_of(res)


@pytest.mark.parametrize("path", ["/agents/register", "/agents/heartbeat", "/sessions/init"])
def test_missing_token(mesh: Mesh, path: str) -> None:
    res = mesh.call(path, connected(), token=None)
    assert error_of(res) == (401, "UNAUTHORIZED")
    assert (res.header("www-authenticate") or "").startswith("Bearer")


def test_bad_and_expired_tokens(mesh: Mesh) -> None:
    for token in ("garbage", TokenIssuer(b"z" * 32).issue("client-a", "tenant-a", WALL)[0]):
        res = mesh.call("/agents/register", connected(), token=token)
        assert error_of(res) == (401, "UNAUTHORIZED")
        assert (res.header("www-authenticate") or "").startswith("Bearer")
    res = mesh.call("/agents/register", connected(), wall=WALL + 7200)
    assert error_of(res) == (401, "UNAUTHORIZED")
    res = mesh.call("/agents/register", connected(), token=None,
                    headers=(("authorization", f"Basic {mesh.token}"),))
    assert error_of(res) == (401, "UNAUTHORIZED")


def test_auth_checked_before_body(mesh: Mesh) -> None:
    res = mesh.call("/agents/register", raw=b"{bad", token=None)
    assert error_of(res) == (401, "UNAUTHORIZED")


def test_internal_failure_is_opaque(mesh: Mesh, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_a: Any, **_k: Any) -> None:
        raise RuntimeError("database path /secret/thing exploded")

    monkeypatch.setattr(mesh.registry, "policy_mode", boom)
    res = mesh.register(connected())
    assert error_of(res) == (500, "INTERNAL")
    assert b"secret" not in res.body and b"exploded" not in res.body


def test_records_unavailable_is_503_retry_after_one_warning(
        mesh: Mesh, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The registry's database away is an outage the caller retries, not a bug: 503 with
    `Retry-After` in our own words, one WARNING line for the outage, no traceback."""
    def away(*_a: Any, **_k: Any) -> None:
        raise RegistryError("connection to server at 127.0.0.1 failed: Connection refused")

    monkeypatch.setattr(mesh.registry, "verify_client", away)
    caplog.set_level(logging.DEBUG, logger="svantic.mesh.control")
    credentials = {"client_id": "client-a", "client_secret": "secret-a"}
    answers = [mesh.call("/auth/token", credentials, token=None, now=NOW + n)
               for n in range(3)]
    for res in answers:
        assert error_of(res) == (503, "UNAVAILABLE")
        assert res.header("retry-after") == "1"
        assert message_of(res) == "the mesh's records are unavailable: try again"
        assert b"refused" not in res.body and b"127.0.0.1" not in res.body
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings  # one line per outage, not one per request
    assert warnings[0].exc_info is None and "/auth/token" in warnings[0].getMessage()
    # Still down ten seconds on: the outage is said again, once.
    mesh.call("/auth/token", credentials, token=None, now=NOW + 12)
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 2
    # A token checked against the records (the authenticated paths) gets the same answer.
    monkeypatch.setattr(mesh.registry, "policy_mode", away)
    assert error_of(mesh.register(connected())) == (503, "UNAVAILABLE")


# -- /auth/token ----------------------------------------------------------------------------


def test_auth_token(mesh: Mesh) -> None:
    body = mesh.ok("/auth/token", {"client_id": "client-a", "client_secret": "secret-a"},
                   token=None)
    assert body["token_type"] == "Bearer"
    assert body["tenant_id"] == "tenant-a"
    assert body["expires_in"] == 3600
    claims = mesh.tokens.verify(body["access_token"], WALL)
    assert claims["sub"] == "client-a"
    assert claims["tenant_id"] == "tenant-a"
    # The issued token works on the other paths.
    mesh.ok("/agents/register", connected(), token=body["access_token"])


def test_auth_token_refusals(mesh: Mesh) -> None:
    res = mesh.call("/auth/token", {"client_id": "client-a", "client_secret": "nope"},
                    token=None)
    assert error_of(res) == (401, "UNAUTHORIZED")
    res = mesh.call("/auth/token", {"client_id": "who", "client_secret": "secret-a"},
                    token=None)
    assert error_of(res) == (401, "UNAUTHORIZED")
    res = mesh.call("/auth/token", {"client_id": "client-a"}, token=None)
    assert error_of(res) == (400, "INVALID_REQUEST")
    assert "client_secret" in message_of(res)
    res = mesh.call("/auth/token", {"client_id": 1, "client_secret": "x"}, token=None)
    assert error_of(res) == (400, "INVALID_REQUEST")
    assert "client_id" in message_of(res)


# -- /agents/register -----------------------------------------------------------------------


def test_register_connected(mesh: Mesh) -> None:
    sub = mesh.events.subscribe("tenant-a")
    body = mesh.ok("/agents/register", connected("nav/1&x=é?"))
    assert body["ok"] is True
    assert body["tenant_id"] == "tenant-a"
    assert body["instance_id"] == "nav/1&x=é?"
    assert body["deployment_mode"] == "connected"
    assert body["svantic_jwks_url"] == f"{PUBLIC}/.well-known/jwks.json"
    assert body["dispatch_auth"] == {"type": "svantic_jwt"}
    parts = urlsplit(body["connect_url"])
    assert (parts.scheme, parts.netloc, parts.path) == ("wss", "127.0.0.1:8443",
                                                        "/agents/connect")
    assert parse_qs(parts.query) == {"instance_id": ["nav/1&x=é?"]}
    kinds = [chunk for chunk in sub.drain() if b"agent.registered" in chunk]
    assert kinds
    row = mesh.registry.get_instance("nav/1&x=é?")
    assert row is not None and row.tenant_id == "tenant-a"


def test_register_instance_id_rules(mesh: Mesh) -> None:
    res = mesh.register(connected("tab\there"))
    assert error_of(res) == (400, "INVALID_REQUEST")
    res = mesh.register(connected("bell\x07"))
    assert error_of(res) == (400, "INVALID_REQUEST")


def test_register_upsert(mesh: Mesh) -> None:
    first = mesh.ok("/agents/register", connected(max_concurrent_sessions=2))
    again = mesh.ok("/agents/register", connected(max_concurrent_sessions=5))
    assert first == again
    row = mesh.registry.get_instance("nav-1")
    assert row is not None and row.max_concurrent_sessions == 5
    assert len(mesh.registry.list_instances("tenant-a")) == 1


def test_register_mode_switch_is_409(mesh: Mesh) -> None:
    mesh.ok("/agents/register", connected())
    res = mesh.register(connected(url="https://agent.example"))
    assert error_of(res) == (409, "DEPLOYMENT_MODE_MISMATCH")


def test_register_other_tenants_instance_is_403(mesh: Mesh) -> None:
    mesh.ok("/agents/register", connected())
    res = mesh.register(connected(), token=mesh.other_token)
    assert error_of(res) == (403, "TENANT_MISMATCH")


def test_register_url_rules(mesh: Mesh) -> None:
    res = mesh.register(connected(url="http://agent.example"))
    assert error_of(res) == (400, "INVALID_REQUEST")
    assert "http urls are refused" in message_of(res)
    res = mesh.register(connected(deployment_mode="hosted"))
    assert error_of(res) == (400, "INVALID_REQUEST")
    assert "url" in message_of(res)
    res = mesh.register(connected(url="https://agent.example", deployment_mode="connected"))
    assert error_of(res) == (400, "INVALID_REQUEST")
    assert "url" in message_of(res)
    for bad in ("https://", "https://u:p@host", "https://host/?q=1", "https://a b"):
        res = mesh.register(connected(url=bad))
        assert error_of(res) == (400, "INVALID_REQUEST"), bad
        assert "url" in message_of(res)
    # null url means omitted: a connected registration.
    assert mesh.ok("/agents/register", connected(url=None))["deployment_mode"] == "connected"


def test_register_dispatch_auth_rules(mesh: Mesh) -> None:
    res = mesh.register(connected(dispatch_auth={"type": "mtls"}))
    assert error_of(res) == (400, "INVALID_REQUEST")
    assert "mtls is reserved" in message_of(res)
    res = mesh.register(connected(dispatch_auth={"type": "shared_secret"}))
    assert error_of(res) == (400, "INVALID_REQUEST")
    assert "secret" in message_of(res)
    res = mesh.register(connected(secret=SHARED))
    assert error_of(res) == (400, "INVALID_REQUEST")
    assert "secret" in message_of(res)
    res = mesh.register(connected(dispatch_auth={"type": "shared_secret"}, secret="x" * 4097))
    assert error_of(res) == (400, "INVALID_REQUEST")
    res = mesh.register(connected(dispatch_auth={"type": "shared_secret"}, secret=""))
    assert error_of(res) == (400, "INVALID_REQUEST")
    res = mesh.register(connected(dispatch_auth={"type": "shared_secret"}, secret=5))
    assert error_of(res) == (400, "INVALID_REQUEST")


def test_register_shared_secret_never_echoed(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="svantic")
    body = connected(dispatch_auth={"type": "shared_secret", "credentials_ref": "ref-1"},
                     secret=SHARED)
    res = mesh.register(body)
    assert isinstance(res, Response) and res.status == 200
    assert SHARED.encode() not in res.body
    answer = json.loads(res.body)
    assert answer["dispatch_auth"] == {"type": "shared_secret", "credentials_ref": "ref-1"}
    assert answer["svantic_jwks_url"] is None
    assert mesh.registry.instance_secret("nav-1") == SHARED
    # No other answer shows it either.
    for path, payload in (
        ("/agents/get_connection", {"instance_id": "nav-1"}),
        ("/agents/list_connections", {}),
        ("/agents/get_connection_stats", {}),
    ):
        again = mesh.call(path, payload)
        assert isinstance(again, Response) and SHARED.encode() not in again.body
    # A hosted registration's effect keeps it out of its repr.
    hosted = mesh.register({**body, "instance_id": "h-1", "url": "https://h.example"})
    assert isinstance(hosted, ProbeCard)
    assert SHARED not in repr(hosted)
    res = mesh.cp.probe_finished(hosted, card={"name": "h"}, error=None, now=NOW, wall=WALL)
    assert res.status == 200 and SHARED.encode() not in res.body
    # Nor does any log line, and no token is logged.
    assert any(r.name == "svantic.mesh.control" for r in caplog.records)
    assert SHARED not in caplog.text and mesh.token not in caplog.text


def test_policy_open_admits_and_allows_type(mesh: Mesh) -> None:
    assert mesh.registry.policy_mode("tenant-a") == "open"
    mesh.ok("/agents/register", connected())
    assert "navigator" in mesh.registry.allowed_types("tenant-a")


def test_policy_allow_list(mesh: Mesh) -> None:
    mesh.ok("/agents/set_policy", {"policy_mode": "allow-list"})
    res = mesh.register(connected())
    assert error_of(res) == (403, "AGENT_TYPE_NOT_ALLOWED")
    assert mesh.registry.get_instance("nav-1") is None
    mesh.ok("/agents/allow_type", {"agent_type": "navigator"})
    mesh.ok("/agents/register", connected())


def test_policy_audit_flags(mesh: Mesh) -> None:
    mesh.ok("/agents/set_policy", {"policy_mode": "audit"})
    mesh.ok("/agents/allow_type", {"agent_type": "known"})
    sub = mesh.events.subscribe("tenant-a")
    mesh.ok("/agents/register", connected())
    assert any(b"registration_flagged" in c for c in sub.drain())
    mesh.ok("/agents/register", {"agent_type": "known", "instance_id": "k-1"})
    assert not any(b"registration_flagged" in c for c in sub.drain())
    # Audit does not add the type to the allow-list.
    assert "navigator" not in mesh.registry.allowed_types("tenant-a")


def test_set_policy_and_allow_type_validation(mesh: Mesh) -> None:
    res = mesh.call("/agents/set_policy", {"policy_mode": "closed"})
    assert error_of(res) == (400, "INVALID_REQUEST")
    assert "policy_mode" in message_of(res)
    res = mesh.call("/agents/set_policy", {})
    assert error_of(res) == (400, "INVALID_REQUEST")
    res = mesh.call("/agents/allow_type", {"agent_type": ""})
    assert error_of(res) == (400, "INVALID_REQUEST")
    assert "agent_type" in message_of(res)
    # Policy is per tenant.
    mesh.ok("/agents/set_policy", {"policy_mode": "allow-list"})
    assert mesh.registry.policy_mode("tenant-b") == "open"


def test_hosted_probe_failure_is_502(mesh: Mesh) -> None:
    effect = mesh.register(connected("h-1", url="https://agent.example/base/"))
    assert isinstance(effect, ProbeCard)
    assert effect.url == "https://agent.example/base"
    assert effect.card_url == "https://agent.example/base/.well-known/agent-card.json"
    res = mesh.cp.probe_finished(effect, card=None, error="connect timeout\nx", now=NOW,
                                 wall=WALL)
    assert error_of(res) == (502, "AGENT_CARD_PROBE_FAILED")
    assert "probe failed" in message_of(res) and "connect timeout" in message_of(res)
    assert "\n" not in message_of(res)
    res = mesh.cp.probe_finished(effect, card=["not", "object"], error=None, now=NOW,
                                 wall=WALL)
    assert error_of(res) == (502, "AGENT_CARD_PROBE_FAILED")
    assert mesh.registry.get_instance("h-1") is None


def test_hosted_probe_success(mesh: Mesh) -> None:
    effect = mesh.register({"agent_type": "navigator", "instance_id": "h-1",
                            "url": "https://agent.example"})
    assert isinstance(effect, ProbeCard)
    card = {"name": "nav", "skills": [{"id": "get_ticket"}]}
    res = mesh.cp.probe_finished(effect, card=card, error=None, now=NOW, wall=WALL)
    assert res.status == 200
    body = json.loads(res.body)
    assert body["deployment_mode"] == "hosted"
    assert body["connect_url"] is None
    assert body["svantic_jwks_url"] == f"{PUBLIC}/.well-known/jwks.json"
    row = mesh.registry.get_instance("h-1")
    assert row is not None and row.agent_card == card and row.url == "https://agent.example"
    # A card given in the request is kept over the probed one.
    effect = mesh.register({"agent_type": "navigator", "instance_id": "h-1",
                            "url": "https://agent.example", "agent_card": {"own": 1}})
    assert isinstance(effect, ProbeCard)
    res = mesh.cp.probe_finished(effect, card=card, error=None, now=NOW, wall=WALL)
    assert res.status == 200
    row = mesh.registry.get_instance("h-1")
    assert row is not None and row.agent_card == {"own": 1}


def test_hosted_probe_rechecks_mode(mesh: Mesh) -> None:
    effect = mesh.register(connected("x-1", url="https://agent.example"))
    assert isinstance(effect, ProbeCard)
    mesh.ok("/agents/register", connected("x-1"))  # registered connected meanwhile
    res = mesh.cp.probe_finished(effect, card={}, error=None, now=NOW, wall=WALL)
    assert error_of(res) == (409, "DEPLOYMENT_MODE_MISMATCH")


def test_dispatch_auth_disabled_has_no_jwks_url(mesh: Mesh) -> None:
    cp = ControlPlane(
        registry=mesh.registry, fleet=mesh.fleet, tokens=mesh.tokens, events=mesh.events,
        metrics=MeshMetrics(), public_url="https://mesh.example/", new_id=lambda: "s",
        dispatch_auth_enabled=False, connect_path="/ws",
    )
    req = HttpRequest("POST", "/agents/register", "/agents/register", "",
                      (("authorization", f"Bearer {mesh.token}"),),
                      json.dumps(connected("z-1")).encode())
    res = cp.handle(req, now=NOW, wall=WALL)
    assert isinstance(res, Response)
    body = json.loads(res.body)
    assert body["svantic_jwks_url"] is None
    assert body["connect_url"] == "wss://mesh.example/ws?instance_id=z-1"


# -- instances ------------------------------------------------------------------------------


def test_deregister(mesh: Mesh) -> None:
    mesh.ok("/agents/register", connected())
    res = mesh.call("/agents/deregister", {"instance_id": "nav-1"}, token=mesh.other_token)
    assert error_of(res) == (404, "INSTANCE_NOT_FOUND")
    sub = mesh.events.subscribe("tenant-a")
    assert mesh.ok("/agents/deregister", {"instance_id": "nav-1"}) == {"ok": True}
    assert any(b"agent.deregistered" in c for c in sub.drain())
    res = mesh.call("/agents/deregister", {"instance_id": "nav-1"})
    assert error_of(res) == (404, "INSTANCE_NOT_FOUND")
    res = mesh.call("/agents/deregister", {})
    assert error_of(res) == (400, "INVALID_REQUEST")


def test_heartbeat(mesh: Mesh) -> None:
    mesh.ok("/agents/register", connected("h-1", url=None, max_concurrent_sessions=2))
    body = mesh.ok("/agents/heartbeat", {"instance_id": "h-1", "active_sessions": 0,
                                         "status": "available", "load": 0.5,
                                         "in_flight": 0, "health": {"db": "ok"}})
    assert body["ok"] is True
    assert body["routing_status"] in ("available", "unknown", "offline")
    for bad, field in (
        ({"instance_id": "h-1"}, "active_sessions"),
        ({"instance_id": "h-1", "active_sessions": -1}, "active_sessions"),
        ({"instance_id": "h-1", "active_sessions": False}, "active_sessions"),
        ({"instance_id": "h-1", "active_sessions": 0, "status": "sleepy"}, "status"),
        ({"instance_id": "h-1", "active_sessions": 0, "load": 1.5}, "load"),
        ({"instance_id": "h-1", "active_sessions": 0, "load": True}, "load"),
        ({"instance_id": "h-1", "active_sessions": 0, "in_flight": 0.5}, "in_flight"),
        ({"instance_id": "h-1", "active_sessions": 0, "health": 3}, "health"),
    ):
        res = mesh.call("/agents/heartbeat", bad)
        assert error_of(res) == (400, "INVALID_REQUEST"), bad
        assert field in message_of(res)
    res = mesh.call("/agents/heartbeat", {"instance_id": "h-1", "active_sessions": 0},
                    token=mesh.other_token)
    assert error_of(res) == (404, "INSTANCE_NOT_FOUND")
    res = mesh.call("/agents/heartbeat", {"instance_id": "ghost", "active_sessions": 0})
    assert error_of(res) == (404, "INSTANCE_NOT_FOUND")


def test_get_connection(mesh: Mesh) -> None:
    mesh.ok("/agents/register", connected())
    body = mesh.ok("/agents/get_connection", {"instance_id": "nav-1"})
    assert body["instance_id"] == "nav-1"
    assert body["transport"] == "ws"
    assert set(body) >= {"agent_type", "deployment_mode", "connection_status",
                         "routing_status", "active_sessions", "last_heartbeat_at",
                         "last_dispatch_error"}
    res = mesh.call("/agents/get_connection", {"instance_id": "nav-1"},
                    token=mesh.other_token)
    assert error_of(res) == (404, "INSTANCE_NOT_FOUND")
    assert b"nav-1" not in res.body
    res = mesh.call("/agents/get_connection", {"instance_id": "ghost"})
    assert error_of(res) == (404, "INSTANCE_NOT_FOUND")


def _probe_ok(mesh: Mesh, body: dict[str, Any]) -> None:
    effect = mesh.register(body)
    assert isinstance(effect, ProbeCard)
    res = mesh.cp.probe_finished(effect, card={}, error=None, now=NOW, wall=WALL)
    assert res.status == 200


def test_get_connection_stats(mesh: Mesh) -> None:
    mesh.ok("/agents/register", connected("c-1"))
    mesh.ok("/agents/register", connected("c-2"))
    _probe_ok(mesh, {"agent_type": "billing", "instance_id": "h-1",
                     "url": "https://b.example"})
    mesh.ok("/agents/register", connected("other"), token=mesh.other_token)
    body = mesh.ok("/agents/get_connection_stats", {})
    assert body["total"] == 3
    assert body["by_deployment_mode"] == {"connected": 2, "hosted": 1}
    assert body["by_transport"] == {"ws": 2, "callback": 1}
    assert set(body["by_connection_status"]) == {"unknown", "online", "healthy", "degraded",
                                                 "offline"}
    assert sum(body["by_connection_status"].values()) == 3
    body = mesh.ok("/agents/get_connection_stats", {"agent_type": "billing"})
    assert body["total"] == 1 and body["by_deployment_mode"]["hosted"] == 1
    res = mesh.call("/agents/get_connection_stats", {"agent_type": 1})
    assert error_of(res) == (400, "INVALID_REQUEST")


def test_list_connections_paging_and_filters(mesh: Mesh) -> None:
    for n in range(7):
        mesh.ok("/agents/register", connected(f"c-{n}"))
    _probe_ok(mesh, {"agent_type": "billing", "instance_id": "h-1",
                     "url": "https://b.example"})
    mesh.ok("/agents/register", connected("zz-other"), token=mesh.other_token)
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        body = mesh.ok("/agents/list_connections", {"limit": 3, "cursor": cursor})
        seen.extend(item["instance_id"] for item in body["items"])
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
        assert len(body["items"]) == 3
    assert pages == 3
    assert seen == [*sorted(f"c-{n}" for n in range(7)), "h-1"]
    body = mesh.ok("/agents/list_connections", {"agent_type": "billing"})
    assert [i["instance_id"] for i in body["items"]] == ["h-1"]
    assert body["next_cursor"] is None
    # Hosted with no heartbeat yet, connected without a socket: filter by their statuses.
    hosted = mesh.ok("/agents/get_connection", {"instance_id": "h-1"})
    body = mesh.ok("/agents/list_connections", {"status": hosted["routing_status"]})
    assert "h-1" in [i["instance_id"] for i in body["items"]]
    body = mesh.ok("/agents/list_connections", {"status": "busy"})
    assert body == {"items": [], "next_cursor": None}
    other = mesh.ok("/agents/list_connections", {}, token=mesh.other_token)
    assert [i["instance_id"] for i in other["items"]] == ["zz-other"]
    for bad, field in (
        ({"limit": 0}, "limit"),
        ({"limit": 501}, "limit"),
        ({"limit": "3"}, "limit"),
        ({"status": "sleepy"}, "status"),
        ({"cursor": "!!!"}, "cursor"),
    ):
        res = mesh.call("/agents/list_connections", bad)
        assert error_of(res) == (400, "INVALID_REQUEST"), bad
        assert field in message_of(res)


# -- sessions -------------------------------------------------------------------------------


def test_sessions(mesh: Mesh) -> None:
    body = mesh.ok("/sessions/init", {"agent_type": "navigator", "metadata": {"k": "v"}})
    sid = body["session_id"]
    assert sid == "id-1"
    session = mesh.registry.get_session(sid)
    assert session is not None and session["tenant_id"] == "tenant-a"
    assert session["metadata"] == {"k": "v"}
    res = mesh.call("/sessions/close", {"session_id": sid}, token=mesh.other_token)
    assert error_of(res) == (404, "SESSION_NOT_FOUND")
    assert mesh.ok("/sessions/close", {"session_id": sid}) == {"ok": True}
    res = mesh.call("/sessions/close", {"session_id": sid})
    assert error_of(res) == (404, "SESSION_NOT_FOUND")
    res = mesh.call("/sessions/init", {"metadata": []})
    assert error_of(res) == (400, "INVALID_REQUEST")
    assert "metadata" in message_of(res)
    res = mesh.call("/sessions/close", {})
    assert error_of(res) == (400, "INVALID_REQUEST")
    assert mesh.ok("/sessions/init", {})["session_id"] == "id-2"


# -- dispatch -------------------------------------------------------------------------------


def _routable_hosted(mesh: Mesh, instance_id: str = "h-1") -> None:
    _probe_ok(mesh, {"agent_type": "navigator", "instance_id": instance_id,
                     "url": "https://agent.example", "tools": [{"name": "get_ticket"}]})
    mesh.ok("/agents/heartbeat", {"instance_id": instance_id, "active_sessions": 0,
                                  "status": "available"})


def test_dispatch_effect(mesh: Mesh) -> None:
    _routable_hosted(mesh)
    sid = mesh.ok("/sessions/init", {})["session_id"]
    effect = mesh.call("/agents/dispatch", {"capability": "get_ticket",
                                            "arguments": {"id": 7}, "session_id": sid})
    assert isinstance(effect, Dispatch)
    assert effect.lease.instance_id == "h-1" and effect.lease.tenant_id == "tenant-a"
    assert effect.capability == "get_ticket"
    assert effect.arguments == {"id": 7}
    assert effect.deadline_ms == 30_000
    assert effect.session_context == {"tenant_id": "tenant-a", "session_id": sid}
    assert effect.stream is False
    assert effect.transport == "callback"
    assert effect.url == "https://agent.example"
    assert effect.started == NOW
    res = mesh.cp.dispatch_finished(effect, dispatch_id="d-1", result={"t": 1}, seconds=0.1,
                                    now=NOW, wall=WALL)
    assert res.status == 200
    assert json.loads(res.body) == {"dispatch_id": "d-1", "instance_id": "h-1",
                                    "result": {"t": 1}}


def test_dispatch_stream_and_deadline(mesh: Mesh) -> None:
    _routable_hosted(mesh)
    effect = mesh.call("/agents/dispatch", {"capability": "get_ticket", "deadline_ms": 500},
                       headers=(("accept", "text/event-stream"),))
    assert isinstance(effect, Dispatch)
    assert effect.stream is True and effect.deadline_ms == 500
    assert effect.session_context == {"tenant_id": "tenant-a"}
    chunk = sse_chunk({"part": 1}, 0)
    assert chunk.startswith(b"event: chunk\n") and b'{"seq":0,"data":{"part":1}}' in chunk
    final = sse_result(effect, dispatch_id="d-9", result=[1])
    assert b"event: result\n" in final
    assert b'"dispatch_id":"d-9"' in final and b'"instance_id":"h-1"' in final
    err = mesh.cp.sse_result(effect, dispatch_id="d-9", code="DEADLINE_EXCEEDED",
                             message="too slow")
    assert b"event: error\n" in err
    assert b'{"error":{"code":"DEADLINE_EXCEEDED","message":"too slow"}}' in err
    mesh.cp.dispatch_finished(effect, dispatch_id="d-9", code="DEADLINE_EXCEEDED",
                              message="too slow", seconds=0.5, now=NOW, wall=WALL)


def test_dispatch_validation(mesh: Mesh) -> None:
    for bad, field in (
        ({}, "capability"),
        ({"capability": 3}, "capability"),
        ({"capability": "c", "arguments": [1]}, "arguments"),
        ({"capability": "c", "deadline_ms": 0}, "deadline_ms"),
        ({"capability": "c", "deadline_ms": 300_001}, "deadline_ms"),
        ({"capability": "c", "deadline_ms": 10.5}, "deadline_ms"),
        ({"capability": "c", "session_id": 4}, "session_id"),
    ):
        res = mesh.call("/agents/dispatch", bad)
        assert error_of(res) == (400, "INVALID_REQUEST"), bad
        assert field in message_of(res)
    res = mesh.call("/agents/dispatch", {"capability": "c", "session_id": "nope"})
    assert error_of(res) == (404, "SESSION_NOT_FOUND")


def test_dispatch_route_errors(mesh: Mesh) -> None:
    res = mesh.call("/agents/dispatch", {"capability": "get_ticket"})
    assert error_of(res) == (503, "AGENT_UNAVAILABLE")
    _routable_hosted(mesh)
    res = mesh.call("/agents/dispatch", {"capability": "get_ticket"}, token=mesh.other_token)
    assert error_of(res) == (503, "AGENT_UNAVAILABLE")
    res = mesh.call("/agents/dispatch", {"capability": "get_ticket", "instance_id": "h-1"},
                    token=mesh.other_token)
    assert error_of(res) == (404, "INSTANCE_NOT_FOUND")
    # A connected instance without a socket is not routable.
    mesh.ok("/agents/register", connected("c-1"))
    res = mesh.call("/agents/dispatch", {"capability": "get_ticket", "instance_id": "c-1"})
    assert error_of(res) == (502, "AGENT_DISCONNECTED")


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("AGENT_UNAVAILABLE", 503),
        ("AGENT_DISCONNECTED", 502),
        ("AGENT_UNHEALTHY", 502),
        ("DEADLINE_EXCEEDED", 504),
        ("DISPATCH_FAILED", 422),
        ("INVALID_ARGUMENTS", 422),
        ("CAPABILITY_NOT_FOUND", 422),
        ("CANCELLED", 422),
        ("DISPATCH_AUTH_FAILED", 422),
        ("SOMETHING_NEW", 422),
    ],
)
def test_dispatch_finished_status_mapping(mesh: Mesh, code: str, status: int) -> None:
    _routable_hosted(mesh)
    effect = mesh.call("/agents/dispatch", {"capability": "get_ticket"})
    assert isinstance(effect, Dispatch)
    calls: list[dict[str, Any]] = []
    real = mesh.fleet.finished

    def spy(lease: Any, **kw: Any) -> None:
        calls.append(kw)
        real(lease, **kw)

    mesh.fleet.finished = spy  # type: ignore[method-assign]
    res = mesh.cp.dispatch_finished(effect, dispatch_id="d-1", code=code,
                                    message="agent said no", seconds=0.2, now=NOW, wall=WALL)
    assert error_of(res) == (status, code)
    assert message_of(res) == "agent said no"
    assert len(calls) == 1
    assert calls[0]["code"] == code and calls[0]["transport"] == "callback"


def test_dispatch_finished_bad_agent_code(mesh: Mesh) -> None:
    _routable_hosted(mesh)
    effect = mesh.call("/agents/dispatch", {"capability": "get_ticket"})
    assert isinstance(effect, Dispatch)
    res = mesh.cp.dispatch_finished(effect, dispatch_id="d", code="bad code\n", message=None,
                                    seconds=0.0, now=NOW, wall=WALL)
    assert error_of(res) == (422, "DISPATCH_FAILED")


def test_dispatch_lease_released(mesh: Mesh) -> None:
    _probe_ok(mesh, {"agent_type": "navigator", "instance_id": "h-1",
                     "url": "https://agent.example", "tools": [{"name": "get_ticket"}],
                     "max_concurrent_sessions": 1})
    mesh.ok("/agents/heartbeat", {"instance_id": "h-1", "active_sessions": 0,
                                  "status": "available"})
    first = mesh.call("/agents/dispatch", {"capability": "get_ticket"})
    assert isinstance(first, Dispatch)
    res = mesh.call("/agents/dispatch", {"capability": "get_ticket"})
    assert isinstance(res, Response) and res.status >= 400  # capacity taken
    mesh.cp.dispatch_finished(first, dispatch_id="d", result=None, seconds=0.0, now=NOW,
                              wall=WALL)
    assert isinstance(mesh.call("/agents/dispatch", {"capability": "get_ticket"}), Dispatch)


# -- GET paths ------------------------------------------------------------------------------


def test_events(mesh: Mesh) -> None:
    assert mesh.call("/events", method="GET") == Subscribe("tenant-a")
    res = mesh.call("/events", method="GET", token=None)
    assert error_of(res) == (401, "UNAUTHORIZED")


def test_metrics_requires_token(mesh: Mesh) -> None:
    res = mesh.call("/metrics", method="GET", token=None)
    assert error_of(res) == (401, "UNAUTHORIZED")
    res = mesh.call("/metrics", method="GET")
    assert isinstance(res, Response) and res.status == 200
    assert (res.header("content-type") or "").startswith("text/plain")
    assert res.header("cache-control") == "no-store"
    assert b"svantic_" in res.body


def test_jwks_without_token(mesh: Mesh) -> None:
    body = mesh.ok("/.well-known/jwks.json", method="GET", token=None)
    assert body == {"keys": [{"kty": "OKP", "kid": "k1"}]}
    cp = ControlPlane(
        registry=mesh.registry, fleet=mesh.fleet, tokens=mesh.tokens, events=mesh.events,
        metrics=MeshMetrics(), public_url=PUBLIC, new_id=lambda: "s",
    )
    req = HttpRequest("GET", "/.well-known/jwks.json", "/.well-known/jwks.json", "", ())
    res = cp.handle(req, now=NOW, wall=WALL)
    assert isinstance(res, Response) and json.loads(res.body) == {"keys": []}


def test_dashboard_and_healthz(mesh: Mesh) -> None:
    res = mesh.call("/dashboard", method="GET", token=None)
    assert isinstance(res, Response) and res.status == 200
    assert (res.header("content-type") or "").startswith("text/html")
    assert res.header("content-security-policy") == DASHBOARD_CSP
    assert res.header("cache-control") == "no-store"
    assert mesh.ok("/healthz", method="GET", token=None) == {"ok": True}
    cp = ControlPlane(
        registry=mesh.registry, fleet=mesh.fleet, tokens=mesh.tokens, events=mesh.events,
        metrics=MeshMetrics(), public_url=PUBLIC, new_id=lambda: "s",
    )
    req = HttpRequest("GET", "/dashboard", "/dashboard", "", ())
    assert error_of(cp.handle(req, now=NOW, wall=WALL)) == (404, "NOT_FOUND")


def test_every_answer_is_no_store(mesh: Mesh) -> None:
    for res in (
        mesh.call("/healthz", method="GET", token=None),
        mesh.call("/nope", {}),
        mesh.call("/auth/token", {"client_id": "client-a", "client_secret": "secret-a"},
                  token=None),
        mesh.call("/agents/register", connected()),
    ):
        assert isinstance(res, Response)
        assert res.header("cache-control") == "no-store"
