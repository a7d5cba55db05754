"""The serving code's own decisions, without sockets: dispatch auth per instance (and failing
closed), what a hosted agent's answer means, and the fleet kept in step with agent events."""

from __future__ import annotations

import os
from typing import Any

import jwt
import pytest
from svantic_mesh.app import (
    CardProbe,
    HostedAnswer,
    MeshParts,
    MeshSettings,
    SseReader,
    _Serving,
)
from svantic_mesh.control import Dispatch
from svantic_mesh.model import InstanceRow, Lease
from svantic_mesh.registry import SqliteRegistry
from svantic_mesh.tokens import InvalidToken

from svantic_proto.events import ConnectionClosed, HeartbeatReceived, SessionStarted
from svantic_proto.frames import SharedSecretAuth, SvanticJwtAuth
from svantic_proto.mesh import DispatchRoute

SIGNING = b"test-dispatch-auth-secret-0123456789abcdef"


@pytest.fixture
def parts() -> MeshParts:
    registry = SqliteRegistry(":memory:", secret_key=os.urandom(32), scrypt_n=2**4)
    return MeshParts(registry, MeshSettings(
        public_url="https://127.0.0.1:8443", token_secret=os.urandom(32),
        signing_secret=SIGNING))


def _register(parts: MeshParts, instance_id: str, *, secret: str | None = None,
              mode: str = "connected", url: str | None = None) -> None:
    row = InstanceRow(instance_id=instance_id, tenant_id="t", agent_type="echo",
                      deployment_mode=mode, url=url,
                      dispatch_auth_type="shared_secret" if secret else "svantic_jwt",
                      tools=[{"name": "echo"}])
    parts.fleet.registered(row, secret=secret, created=True, flagged=False, now=0.0, wall=0.0)


def _route(instance_id: str) -> DispatchRoute:
    return DispatchRoute(instance_id=instance_id, agent_type="echo", tenant_id="t",
                         dispatch_id="01936f3e-5c4b-7a21-9f3e-2b1c0d4e5f60", capability="echo",
                         now=1_800_000_000.0)


def test_each_instance_gets_the_envelope_it_registered(parts: MeshParts) -> None:
    _register(parts, "jwt-1")
    _register(parts, "secret-1", secret="s3cret-value")
    envelope = parts.mint(_route("jwt-1"))
    assert isinstance(envelope, SvanticJwtAuth)
    claims = jwt.decode(envelope.token, SIGNING, algorithms=["HS256"], audience="jwt-1",
                        options={"verify_exp": False, "verify_iat": False})
    assert claims["jti"] == "01936f3e-5c4b-7a21-9f3e-2b1c0d4e5f60" and claims["cap"] == "echo"
    assert parts.mint(_route("secret-1")) == SharedSecretAuth(secret="s3cret-value")


def test_an_envelope_that_cannot_be_minted_fails_closed(parts: MeshParts) -> None:
    with pytest.raises(LookupError):
        parts.mint(_route("never-registered"))
    _register(parts, "hosted-1", mode="hosted", url="https://127.0.0.1:9")
    lease = Lease(1, "hosted-1", "t", "echo", "hosted")
    dispatch = Dispatch(lease=lease, capability="echo", arguments={}, deadline_ms=1000,
                        session_context=None, stream=False, transport="callback",
                        url="https://127.0.0.1:9", started=0.0)
    parts.registry.delete_instance("hosted-1")  # gone between routing and sending
    outcome = _Serving(parts)._body_or_failure(dispatch, "d-1")
    assert not isinstance(outcome, bytes)
    assert outcome.code == "AGENT_UNHEALTHY"


def test_a_hosted_answer_streamed_as_sse_passes_chunks_then_ends() -> None:
    chunks: list[Any] = []
    answer = HostedAnswer("d-1", 200, "text/event-stream", chunks.append)
    assert answer.feed(b'event: chunk\ndata: {"data": 1}\n\n: keepalive\n\nevent: ch') is None
    assert chunks == [1]
    outcome = answer.feed(b'unk\ndata: {"data": 2}\n\nevent: result\ndata: {"result": "ok"}\n\n')
    assert chunks == [1, 2]
    assert outcome is not None and outcome.result == "ok" and outcome.code is None


def test_a_hosted_answer_that_fails_or_breaks_is_a_failure_with_our_words() -> None:
    answer = HostedAnswer("d-1", 404, "application/json", None)
    assert answer.feed(b'{"error": {"code": "NOPE", "message": "no"}}') is None
    assert (answer.end().code, answer.end().message) == ("NOPE", "no")
    answer = HostedAnswer("d-1", 500, "text/html", None)
    answer.feed(b"<html>stack trace here</html>")
    outcome = answer.end()
    assert outcome.code == "DISPATCH_FAILED" and "stack" not in (outcome.message or "")
    stream = HostedAnswer("d-1", 200, "text/event-stream", None)
    stream.feed(b"event: chunk\ndata: {}\n\n")
    assert stream.end().code == "DISPATCH_FAILED"  # ended without a result
    whole = HostedAnswer("d-1", 200, "application/json", None)
    outcome = whole.feed(b"x" * (5 << 20))
    assert outcome is not None and outcome.code == "DISPATCH_FAILED"  # bounded in bytes


def test_an_sse_line_longer_than_the_bound_is_refused() -> None:
    with pytest.raises(ValueError):
        SseReader().feed(b"data: " + b"x" * (5 << 20))


def test_a_card_probe_is_bounded_and_says_why_it_failed() -> None:
    assert CardProbe(404).result() == (None, "HTTP 404")
    probe = CardProbe(200)
    assert probe.feed(b'{"name": "x"}')
    assert probe.result() == ({"name": "x"}, None)
    probe = CardProbe(200)
    assert not probe.feed(b"x" * (300 << 10))
    assert probe.result() == (None, "the card is too large")
    probe = CardProbe(200)
    probe.feed(b"not json")
    assert probe.result() == (None, "the card is not JSON")


class _Handle:
    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id


def test_agent_events_keep_the_fleet_in_step(parts: MeshParts) -> None:
    _register(parts, "a-1")
    handle = _Handle("a-1")
    started = SessionStarted(instance_id="a-1", connection_id="c", resumed=False,
                             replayed_dispatches=(), heartbeat_interval=30.0)
    assert parts.agent_event(handle, started, {"a-1": handle}) is False
    assert parts.fleet.status("a-1")["connection_status"] == "online"  # type: ignore[index]
    beat = HeartbeatReceived(status="busy", active_sessions=1, max_concurrent_sessions=None,
                             in_flight=None, load=None, health=None)
    parts.agent_event(handle, beat, {"a-1": handle})
    assert parts.fleet.status("a-1")["routing_status"] == "busy"  # type: ignore[index]
    closed = ConnectionClosed(code=1000, reason="", by_peer=True, retry=None)  # type: ignore[arg-type]
    parts.agent_event(handle, closed, {"a-1": handle})  # a newer connection holds it: kept
    assert parts.fleet.status("a-1")["connection_status"] == "online"  # type: ignore[index]
    parts.agent_event(handle, closed, {})
    assert parts.fleet.status("a-1")["connection_status"] == "offline"  # type: ignore[index]


def test_verified_tokens_are_remembered_but_still_expire(parts: MeshParts) -> None:
    token, _ = parts.tokens.issue("client", "t", 1_000.0)
    assert parts.tokens.verify(token, 1_000.0)["tenant_id"] == "t"
    assert parts.tokens.verify(token, 1_000.0) == parts.tokens.verify(token, 1_100.0)
    with pytest.raises(InvalidToken):
        parts.tokens.verify(token, 1_000.0 + 3_600 + 10)  # the remembered one expires too
    with pytest.raises(InvalidToken):
        parts.tokens.verify(token[:-2] + "xx", 1_000.0)
