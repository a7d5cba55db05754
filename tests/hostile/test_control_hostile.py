"""Hostile control-plane bodies, tenant isolation and error texts, on a real mesh process
(spec 6): every path, every string field.

* Wrong types, SQL metacharacters, unicode and unknown fields in every field of every path:
  a documented status (never 500), the spec 1 error body, and the registry intact after it.
* A body over the bound: 413 from its `Content-Length`, before the body is read.
* Tenant isolation: tenant B, with A's instance ids in hand, learns nothing of tenant A on
  any path: the answers are the ones an id that does not exist gets.
* Error texts: no answer names a Python exception, a traceback, or the database.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from hostile_kit import CLIENT_A, CLIENT_B, LEAK, MeshProcess, raw_request

SQL = ["' OR '1'='1", "x'; DROP TABLE instances; --", "\"); DELETE FROM clients; --", "%",
       "_", "\\", "a\u0000b", "' UNION SELECT secret FROM instances --"]
UNICODE = ["é", "\u202etxet", "🙂", "\ud7ff", "Ω" * 300]
WRONG_TYPES: list[Any] = [7, -1, 1.5, True, None, [], ["x"], {}, {"$ne": 1}, 2**70]
DOCUMENTED = {200, 400, 401, 403, 404, 409, 413, 422, 502, 503, 504}

# Every JSON path with a valid body of tenant A (`INSTANCE` is registered by the fixture).
INSTANCE = "ctl-a-1"
BODIES: dict[str, dict[str, Any]] = {
    "/auth/token": {"client_id": CLIENT_A[0], "client_secret": CLIENT_A[1]},
    "/agents/register": {"agent_type": "hostile", "instance_id": "ctl-a-2",
                         "tools": [{"name": "echo"}], "max_concurrent_sessions": 2},
    "/agents/heartbeat": {"instance_id": INSTANCE, "active_sessions": 0, "status": "available",
                          "load": 0.5},
    "/agents/get_connection": {"instance_id": INSTANCE},
    "/agents/get_connection_stats": {"agent_type": "hostile"},
    "/agents/list_connections": {"limit": 10},
    "/agents/allow_type": {"agent_type": "hostile"},
    "/sessions/init": {"agent_type": "hostile", "metadata": {"k": "v"}},
    "/sessions/close": {"session_id": "s-none"},
    "/agents/dispatch": {"capability": "echo", "arguments": {}, "instance_id": INSTANCE,
                         "deadline_ms": 500},
    "/agents/set_policy": {"policy_mode": "open"},
    "/agents/deregister": {"instance_id": "ctl-a-gone"},
}


def _check(answer: httpx.Response, where: str) -> None:
    assert answer.status_code in DOCUMENTED, (where, answer.status_code, answer.text[:300])
    assert LEAK.search(answer.text) is None, (where, answer.text[:300])
    if answer.status_code >= 400:
        body = answer.json()
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, where


def _registry_intact(mesh: MeshProcess) -> None:
    with mesh.client() as client:
        token = client.post("/auth/token", json={"client_id": CLIENT_A[0],
                                                 "client_secret": CLIENT_A[1]})
        assert token.status_code == 200
        seen = client.post("/agents/get_connection", json={"instance_id": INSTANCE},
                           headers={"authorization": f"Bearer {token.json()['access_token']}"})
        assert seen.status_code == 200 and seen.json()["instance_id"] == INSTANCE


@pytest.fixture(scope="module")
def ctl_mesh(mesh: MeshProcess) -> MeshProcess:
    mesh.register(INSTANCE)
    mesh.register("ctl-a-gone")
    return mesh


def _variants(body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = [("unknown fields", {**body, "zzz": 1,
                                                                 "__proto__": {"x": 1}})]
    for name, value in body.items():
        for bad in WRONG_TYPES:
            out.append((f"{name}={bad!r}", {**body, name: bad}))
        if isinstance(value, str) or name in ("metadata", "arguments"):
            for text in SQL + UNICODE:
                out.append((f"{name}={text[:20]!r}", {**body, name: text}))
        out.append((f"without {name}", {k: v for k, v in body.items() if k != name}))
    return out


@pytest.mark.parametrize("path", list(BODIES))
def test_every_field_of_every_path_takes_hostile_values(ctl_mesh: MeshProcess,
                                                        path: str) -> None:
    token = ctl_mesh.token()
    with ctl_mesh.client() as client:
        for label, body in _variants(BODIES[path]):
            if path == "/agents/set_policy" and body.get("policy_mode") == "allow-list":
                continue  # would lock the canary's type out for the other tests
            answer = client.post(path, json=body, headers={"authorization": f"Bearer {token}"})
            _check(answer, f"{path} {label}")
            if path == "/agents/register" and answer.status_code == 200:
                client.post("/agents/deregister", json={"instance_id": body["instance_id"]},
                            headers={"authorization": f"Bearer {token}"})
        client.post("/agents/set_policy", json={"policy_mode": "open"},
                    headers={"authorization": f"Bearer {token}"})
    _registry_intact(ctl_mesh)


@pytest.mark.parametrize("raw", [b"", b"null", b"[]", b"\"text\"", b"{", b"{\"a\":1,}",
                                 b"\xff\xfe{}", b"[" * 50_000 + b"]" * 50_000,
                                 json.dumps({"a": "é" * 1000}).encode("utf-16")])
def test_bodies_that_are_not_json_objects_are_400(ctl_mesh: MeshProcess, raw: bytes) -> None:
    status, body = raw_request(ctl_mesh, "POST", "/agents/get_connection", raw, (
        ("Authorization", f"Bearer {ctl_mesh.token()}"),
        ("Content-Type", "application/json")))
    assert status == 400, body[:200]
    assert json.loads(body)["error"]["code"] == "INVALID_REQUEST"
    assert LEAK.search(body.decode()) is None


def test_a_body_over_the_bound_is_413_from_its_length(ctl_mesh: MeshProcess) -> None:
    sock = ctl_mesh.tls_socket()
    try:
        sock.sendall(b"POST /agents/register HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 50000000\r\n"
                     + f"Authorization: Bearer {ctl_mesh.token()}\r\n\r\n".encode()
                     + b"{\"agent_type\": \"")
        started = time.monotonic()
        from hostile_kit import read_body, read_http_answer
        status, head, rest = read_http_answer(sock)
        assert time.monotonic() - started < 2.0
        assert status == 413
        assert json.loads(read_body(sock, head, rest))["error"]["code"] == "PAYLOAD_TOO_LARGE"
    finally:
        sock.close()


# -- tenant isolation --------------------------------------------------------------------------


def test_another_tenant_learns_nothing_on_any_path(ctl_mesh: MeshProcess) -> None:
    b_token = ctl_mesh.token(CLIENT_B)
    a_session = ctl_mesh.post("/sessions/init", {"agent_type": "hostile"}).json()["session_id"]
    missing = "ctl-never-registered"

    def as_b(path: str, body: dict[str, Any]) -> httpx.Response:
        return ctl_mesh.post(path, body, token=b_token)

    for path, field in (("/agents/get_connection", "instance_id"),
                        ("/agents/deregister", "instance_id")):
        theirs, nobody = as_b(path, {field: INSTANCE}), as_b(path, {field: missing})
        assert theirs.status_code == nobody.status_code == 404, (path, theirs.text)
        assert theirs.json()["error"] == nobody.json()["error"]
    beat = {"active_sessions": 0}
    theirs = as_b("/agents/heartbeat", {"instance_id": INSTANCE, **beat})
    nobody = as_b("/agents/heartbeat", {"instance_id": missing, **beat})
    assert theirs.status_code == nobody.status_code == 404
    assert theirs.json()["error"] == nobody.json()["error"]
    # Registering A's instance id from B is refused without saying whose it is.
    taken = as_b("/agents/register", {"agent_type": "hostile", "instance_id": INSTANCE,
                                      "tools": [{"name": "echo"}]})
    assert taken.status_code in (403, 404, 409), taken.text
    assert "tenant-a" not in taken.text and CLIENT_A[0] not in taken.text
    # Dispatch to A's instance or A's capability: as if it did not exist.
    theirs = as_b("/agents/dispatch", {"capability": "echo", "instance_id": "canary-1",
                                       "deadline_ms": 500})
    nobody = as_b("/agents/dispatch", {"capability": "echo", "instance_id": missing,
                                       "deadline_ms": 500})
    assert theirs.status_code == nobody.status_code and theirs.json() == nobody.json()
    for body in ({"capability": "echo", "deadline_ms": 500},
                 {"capability": "echo", "agent_type": "canary", "deadline_ms": 500}):
        answer = as_b("/agents/dispatch", body)
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == "AGENT_UNAVAILABLE"
    # Sessions of A cannot be closed by B.
    closed = as_b("/sessions/close", {"session_id": a_session})
    assert closed.status_code in (404, 200)
    if closed.status_code == 200:  # then it must not have closed A's session
        again = ctl_mesh.post("/sessions/close", {"session_id": a_session})
        assert again.status_code == 200, again.text
    # Counts and lists: B sees none of A's instances.
    stats = as_b("/agents/get_connection_stats", {}).json()
    assert stats["total"] == 0, stats
    listed = as_b("/agents/list_connections", {"limit": 500})
    assert listed.status_code == 200
    assert INSTANCE not in listed.text and "canary-1" not in listed.text
    # Metrics carry no instance ids at all.
    with ctl_mesh.client() as client:
        metrics = client.get("/metrics", headers={"authorization": f"Bearer {b_token}"})
    assert metrics.status_code == 200
    assert INSTANCE not in metrics.text and "canary-1" not in metrics.text


def test_another_tenants_event_stream_carries_nothing_of_this_tenant(
        ctl_mesh: MeshProcess) -> None:
    b_token = ctl_mesh.token(CLIENT_B)
    seen = b""
    with ctl_mesh.client(timeout=5.0) as client, client.stream(
            "GET", "/events", headers={"authorization": f"Bearer {b_token}",
                                       "accept": "text/event-stream"}) as stream:
        assert stream.status_code == 200
        # Tenant A's lifecycle while B listens: a registration and a deregistration.
        ctl_mesh.register("ctl-a-events")
        ctl_mesh.post("/agents/deregister", {"instance_id": "ctl-a-events"})
        ctl_mesh.register("ctl-b-marker", who=CLIENT_B)  # B's own event ends the wait
        deadline = time.monotonic() + 10
        for chunk in stream.iter_bytes():
            seen += chunk
            if b"ctl-b-marker" in seen or time.monotonic() > deadline or len(seen) > 1 << 20:
                break
    assert b"ctl-b-marker" in seen, seen[:500]
    assert b"ctl-a-events" not in seen and b"tenant-a" not in seen, seen[:500]


# -- error texts -------------------------------------------------------------------------------


def test_a_handler_exception_never_reaches_the_caller(ctl_mesh: MeshProcess) -> None:
    """The canary's `fail` capability raises RuntimeError("internal detail that must not
    leak"): the caller gets the agent's `DISPATCH_FAILED` with the type's name only, as
    docs/errors.md decides, never the exception's text or a traceback."""
    answer = ctl_mesh.post("/agents/dispatch", {"capability": "fail", "instance_id": "canary-1",
                                                "deadline_ms": 5000})
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["code"] == "DISPATCH_FAILED"
    assert answer.json()["error"]["message"] == "the handler raised RuntimeError"
    assert "internal detail" not in answer.text and "Traceback" not in answer.text


def test_a_database_failure_is_a_fixed_500_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    """The registry's database goes away under the control plane: every path answers 500
    `INTERNAL` with a fixed message (nothing of the database's error), and each failure is
    logged with its cause."""
    import itertools
    import logging

    from svantic_mesh.control import ControlPlane, Response
    from svantic_mesh.events import EventBus
    from svantic_mesh.fleet import Fleet
    from svantic_mesh.metrics import MeshMetrics
    from svantic_mesh.registry import SqliteRegistry
    from svantic_mesh.routing import Router
    from svantic_mesh.tokens import TokenIssuer

    from svantic_proto.http import HttpRequest

    registry = SqliteRegistry(":memory:", secret_key=b"k" * 32, scrypt_n=2)
    registry.add_client("client-a", "secret-a", "tenant-a")
    events, metrics = EventBus(), MeshMetrics()
    fleet = Fleet(registry=registry, router=Router(), events=events, metrics=metrics)
    tokens = TokenIssuer(b"t" * 32)
    ids = (f"id-{n}" for n in itertools.count())
    plane = ControlPlane(registry=registry, fleet=fleet, tokens=tokens, events=events,
                         metrics=metrics, public_url="https://127.0.0.1:1",
                         new_id=lambda: next(ids))
    wall = time.time()
    token, _ = tokens.issue("client-a", "tenant-a", wall)
    registry.close()  # the database is gone
    caplog.set_level(logging.ERROR, logger="svantic.mesh")
    answered = 0
    for path, body in BODIES.items():
        request = HttpRequest("POST", path, path, "", (("authorization", f"Bearer {token}"),),
                              json.dumps({**body, "instance_id": f"db-{answered}"}
                                         if "instance_id" in body else body).encode())
        answer = plane.handle(request, now=1.0, wall=wall)
        if not isinstance(answer, Response):
            continue  # an effect that touches no database here (a dispatch to route)
        text = answer.body.decode()
        assert LEAK.search(text) is None and "database" not in text.lower(), (path, text)
        if answer.status >= 500:
            assert answer.status == 500 and json.loads(text)["error"] == {
                "code": "INTERNAL", "message": "internal error"}, (path, text)
            answered += 1
    assert answered >= 5, answered
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) >= answered
