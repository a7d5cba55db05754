"""The connected-mode upgrade through the two connections (spec sections 1 and 5).

Mesh side: a `MeshConnection` reports `UpgradeRequest`, `check_upgrade` runs the
section 1 table in order with fake token and registry callbacks, and the answer on
the wire is the table's status with the JSON error body. Agent side: each answer
becomes the typed error in `ConnectionClosed.error` and the section 5 retry decision.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from test_conn_kit import INSTANCE, TENANT, URL, AgentHarness, MeshHarness

from svantic_proto.agent import AgentConnection
from svantic_proto.auth import DispatchAuthVerifier
from svantic_proto.backoff import RetryDecision
from svantic_proto.codec import FrameFactory, encode_frame
from svantic_proto.errors import InvalidState, LocalProtocolError, RemoteProtocolError
from svantic_proto.events import ConnectionClosed, Event, SessionStarted, UpgradeRequest
from svantic_proto.frames import (
    Heartbeat,
    HeartbeatPayload,
    Hello,
    HelloPayload,
    Welcome,
    WelcomePayload,
)
from svantic_proto.framing import Framing
from svantic_proto.handshake import (
    Accept,
    DeploymentModeMismatch,
    HandshakeFailed,
    HandshakeRejected,
    InsecureTransportError,
    InstanceNotFound,
    InstanceRecord,
    MissingInstanceId,
    Reject,
    TenantMismatch,
    Unauthorized,
    UnsupportedSubprotocol,
    UpgradeRequired,
    build_upgrade_request,
    check_upgrade,
)
from svantic_proto.mesh import MeshConnection
from svantic_proto.states import AgentState, MeshState
from svantic_proto.testing import FakeClock, Pair

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


@dataclass(frozen=True)
class Claims:
    tenant_id: str
    sub: str = "client-1"
    exp: float | None = None


REGISTRY = {
    "inst-a": InstanceRecord("inst-a", "tenant-a", "connected", "support"),
    "inst-a-hosted": InstanceRecord("inst-a-hosted", "tenant-a", "hosted", "support"),
    "inst-b": InstanceRecord("inst-b", "tenant-b", "connected", "support"),
    "inst-b-hosted": InstanceRecord("inst-b-hosted", "tenant-b", "hosted", "support"),
}


class Callbacks:
    """Fake token verifier and registry that record what they were asked."""

    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.lookups: list[str] = []

    def verify_token(self, token: str) -> Claims | None:
        self.tokens.append(token)
        if token == "good":
            return Claims("tenant-a")
        if token == "expired":
            raise ValueError("token expired")
        if token == "no-tenant":
            return Claims("")
        return None

    def lookup_instance(self, instance_id: str) -> InstanceRecord | None:
        self.lookups.append(instance_id)
        return REGISTRY.get(instance_id)


def raw_request(
    query: str = "?instance_id=inst-a",
    *,
    protocols: str | None = "svantic.v1",
    authorization: str | None = "Bearer good",
    upgrade: bool = True,
) -> bytes:
    lines = [f"GET /agents/connect{query} HTTP/1.1", "Host: mesh.test"]
    if upgrade:
        lines += [
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {KEY}",
            "Sec-WebSocket-Version: 13",
        ]
    if protocols is not None:
        lines.append(f"Sec-WebSocket-Protocol: {protocols}")
    if authorization is not None:
        lines.append(f"Authorization: {authorization}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: Any
    events: list[Event]
    transport_closed: bool
    mesh: MeshConnection


def mesh_answer(request: bytes, callbacks: Callbacks | None = None) -> Answer:
    """Feed `request` to a fresh MeshConnection, decide with check_upgrade, read the answer."""
    callbacks = callbacks or Callbacks()
    clock = FakeClock()
    mesh = MeshConnection(dispatch_auth=None, now=clock.now, wall_clock=clock.wall)
    mesh.receive_data(request, clock.now)
    events = mesh.events_received()
    if events and isinstance(events[0], UpgradeRequest):
        decision = check_upgrade(
            events[0].request,
            verify_token=callbacks.verify_token,
            lookup_instance=callbacks.lookup_instance,
        )
        if isinstance(decision, Reject):
            mesh.reject(decision, now=clock.now)
        else:
            mesh.accept(decision, now=clock.now)
        events += mesh.events_received()
    out = mesh.data_to_send()
    head, _, body = out[0].partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(
        status=int(status_line.split()[1]),
        headers=headers,
        body=json.loads(body) if body else None,
        events=events,
        transport_closed=out[-1] == b"",
        mesh=mesh,
    )


# -- mesh: the section 1 table, in order -----------------------------------------------------

TABLE_ROWS = [
    ("instance_id absent", raw_request(""), 400, "MISSING_INSTANCE_ID"),
    ("instance_id empty", raw_request("?instance_id="), 400, "MISSING_INSTANCE_ID"),
    ("no subprotocol offered", raw_request(protocols=None), 400, "UNSUPPORTED_SUBPROTOCOL"),
    ("other subprotocols only", raw_request(protocols="chat, v2"), 400, "UNSUPPORTED_SUBPROTOCOL"),
    ("no Authorization", raw_request(authorization=None), 401, "UNAUTHORIZED"),
    ("not a bearer token", raw_request(authorization="Basic Zm9vOmJhcg=="), 401, "UNAUTHORIZED"),
    ("token refused", raw_request(authorization="Bearer forged"), 401, "UNAUTHORIZED"),
    ("verifier raises", raw_request(authorization="Bearer expired"), 401, "UNAUTHORIZED"),
    ("claims without tenant", raw_request(authorization="Bearer no-tenant"), 401, "UNAUTHORIZED"),
    ("another tenant's instance", raw_request("?instance_id=inst-b"), 403, "TENANT_MISMATCH"),
    ("unknown instance", raw_request("?instance_id=nope"), 404, "INSTANCE_NOT_FOUND"),
    ("hosted instance", raw_request("?instance_id=inst-a-hosted"), 409, "DEPLOYMENT_MODE_MISMATCH"),
]


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [row[1:] for row in TABLE_ROWS],
    ids=[row[0] for row in TABLE_ROWS],
)
def test_each_row_of_the_table_answers_its_status_and_json_body(
    request_bytes: bytes, status: int, code: str
) -> None:
    answer = mesh_answer(request_bytes)
    assert answer.status == status
    assert answer.headers["content-type"] == "application/json"
    assert answer.body["error"]["code"] == code
    assert isinstance(answer.body["error"]["message"], str) and answer.body["error"]["message"]
    assert answer.transport_closed  # a refusal ends the connection
    assert answer.mesh.state is MeshState.CLOSED
    closed = [e for e in answer.events if isinstance(e, ConnectionClosed)]
    assert len(closed) == 1 and closed[0].retry is RetryDecision.FINAL
    assert closed[0].error is not None and closed[0].error.code == code


def test_a_request_passing_every_check_is_upgraded_with_svantic_v1() -> None:
    answer = mesh_answer(raw_request(protocols="chat, svantic.v1"))
    assert answer.status == 101
    assert answer.headers["sec-websocket-protocol"] == "svantic.v1"
    assert not answer.transport_closed
    assert answer.mesh.state is MeshState.AWAITING_HELLO
    assert (answer.mesh.instance_id, answer.mesh.tenant_id) == ("inst-a", "tenant-a")
    assert answer.mesh.subject == "client-1"  # taken from the claims of the Accept decision


@pytest.mark.parametrize(
    ("request_bytes", "code"),
    [
        (raw_request("", protocols=None, authorization=None), "MISSING_INSTANCE_ID"),
        (raw_request("?instance_id=nope", protocols="chat", authorization=None),
         "UNSUPPORTED_SUBPROTOCOL"),
        (raw_request("?instance_id=nope", authorization="Bearer forged"), "UNAUTHORIZED"),
        (raw_request("?instance_id=inst-b-hosted"), "TENANT_MISMATCH"),
    ],
    ids=["everything wrong", "subprotocol before token", "token before registry",
         "tenant before deployment mode"],
)
def test_a_request_failing_several_checks_gets_the_first(request_bytes: bytes, code: str) -> None:
    callbacks = Callbacks()
    answer = mesh_answer(request_bytes, callbacks)
    assert answer.body["error"]["code"] == code
    if code in ("MISSING_INSTANCE_ID", "UNSUPPORTED_SUBPROTOCOL"):
        assert callbacks.tokens == []  # later checks never ran
    if code == "UNAUTHORIZED":
        assert callbacks.lookups == []  # an unauthenticated caller learns nothing of the registry


def test_a_request_that_is_not_an_upgrade_gets_426_before_any_check() -> None:
    callbacks = Callbacks()
    answer = mesh_answer(
        raw_request("", protocols=None, authorization=None, upgrade=False), callbacks
    )
    assert answer.status == 426
    assert answer.body["error"]["code"] == "UPGRADE_REQUIRED"
    assert answer.headers["upgrade"] == "websocket"
    assert not any(isinstance(e, UpgradeRequest) for e in answer.events)
    assert callbacks.tokens == [] and answer.transport_closed


@pytest.mark.parametrize(
    "garbage",
    [b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40) + b"\r\n\r\n",
     b"HELLO THERE\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\r\nbad header line\r\n\r\n"],
    ids=["tls client hello", "not http", "malformed header"],
)
def test_garbage_gets_400_and_never_raises(garbage: bytes) -> None:
    answer = mesh_answer(garbage)
    assert answer.status == 400
    assert answer.transport_closed
    (closed,) = [e for e in answer.events if isinstance(e, ConnectionClosed)]
    assert isinstance(closed.error, RemoteProtocolError)
    assert closed.code is None


def test_mesh_drops_a_connection_that_sends_no_request_within_the_hello_timeout() -> None:
    clock = FakeClock()
    mesh = MeshConnection(dispatch_auth=None, now=clock.now, wall_clock=clock.wall)
    mesh.receive_data(b"GET /agents/conn", clock.now)  # a partial request does not reset it
    assert mesh.next_deadline() == clock.now + 10.0
    mesh.handle_timer(clock.now + 9.999)
    assert mesh.data_to_send() == [] and mesh.state is MeshState.HANDSHAKE
    mesh.handle_timer(clock.now + 10.0)
    assert mesh.data_to_send() == [b""]
    (closed,) = mesh.events_received()
    assert isinstance(closed, ConnectionClosed) and closed.code is None
    assert mesh.state is MeshState.CLOSED


def test_eof_in_the_middle_of_the_request_ends_the_connection_quietly() -> None:
    clock = FakeClock()
    mesh = MeshConnection(dispatch_auth=None, now=clock.now, wall_clock=clock.wall)
    mesh.receive_data(b"GET /agents/connect HTTP/1.1\r\n", clock.now)
    mesh.receive_eof(clock.now)
    assert mesh.data_to_send() == [b""]
    (closed,) = mesh.events_received()
    assert isinstance(closed, ConnectionClosed) and closed.by_peer
    mesh.receive_data(b"more", clock.now)  # after the end: ignored, never raises
    mesh.receive_eof(clock.now)
    assert mesh.events_received() == [] and mesh.data_to_send() == []


def test_bytes_sent_before_the_decision_are_kept_for_after_accept() -> None:
    clock = FakeClock()
    mesh = MeshConnection(dispatch_auth=None, now=clock.now, wall_clock=clock.wall)
    peer = Framing(True)
    frames = FrameFactory(clock.wall)
    peer.send_text(encode_frame(frames.new(Hello, HelloPayload(instance_id="inst-a"))).decode())
    request = build_upgrade_request(URL, token="good", instance_id="inst-a").request_bytes
    mesh.receive_data(request + peer.data_to_send(), clock.now)  # hello pipelined
    heartbeat = frames.new(Heartbeat, HeartbeatPayload(active_sessions=2))
    peer.send_text(encode_frame(heartbeat).decode())
    mesh.receive_data(peer.data_to_send(), clock.now)  # arrives while the app decides
    (request_event,) = mesh.events_received()
    assert isinstance(request_event, UpgradeRequest)
    assert mesh.request is request_event.request
    mesh.accept(instance_id="inst-a", tenant_id="tenant-a", now=clock.now)
    kinds = [type(e).__name__ for e in mesh.events_received()]
    assert kinds == ["SessionStarted", "HeartbeatReceived"]


def test_accept_and_reject_refuse_misuse() -> None:
    clock = FakeClock()
    mesh = MeshConnection(dispatch_auth=None, now=clock.now, wall_clock=clock.wall)
    with pytest.raises(LocalProtocolError):
        mesh.accept(instance_id="inst-a", tenant_id="tenant-a", now=clock.now)  # no request yet
    mesh.receive_data(raw_request(), clock.now)
    with pytest.raises(LocalProtocolError, match="instance id and the tenant id"):
        mesh.accept(instance_id="inst-a", now=clock.now)
    mesh.accept(instance_id="inst-a", tenant_id="tenant-a", now=clock.now)
    with pytest.raises(LocalProtocolError):
        mesh.accept(instance_id="inst-a", tenant_id="tenant-a", now=clock.now)
    with pytest.raises(LocalProtocolError):
        mesh.reject(status=403, code="NO", message="no", now=clock.now)
    mesh.close(1001, "shutdown", now=clock.now)
    mesh.handle_timer(clock.now + 100)
    with pytest.raises(InvalidState):
        mesh.reject(status=403, code="NO", message="no", now=clock.now)


def test_closing_before_the_upgrade_drops_the_transport() -> None:
    clock = FakeClock()
    mesh = MeshConnection(dispatch_auth=None, now=clock.now, wall_clock=clock.wall)
    mesh.receive_data(raw_request(), clock.now)
    mesh.events_received()
    mesh.close(1001, "shutting down", now=clock.now)
    assert mesh.data_to_send() == [b""]
    (closed,) = mesh.events_received()
    assert isinstance(closed, ConnectionClosed) and not closed.by_peer
    assert mesh.closed


# -- agent: each answer becomes a typed error and a retry decision ----------------------------

AGENT_ROWS: list[tuple[str, int, str, type[HandshakeRejected], RetryDecision]] = [
    ("missing instance", 400, "MISSING_INSTANCE_ID", MissingInstanceId, RetryDecision.FINAL),
    ("subprotocol", 400, "UNSUPPORTED_SUBPROTOCOL", UnsupportedSubprotocol, RetryDecision.FINAL),
    ("unauthorized", 401, "UNAUTHORIZED", Unauthorized, RetryDecision.REFRESH_TOKEN_THEN_RETRY),
    ("tenant", 403, "TENANT_MISMATCH", TenantMismatch, RetryDecision.FINAL),
    ("not found", 404, "INSTANCE_NOT_FOUND", InstanceNotFound, RetryDecision.FINAL),
    ("hosted", 409, "DEPLOYMENT_MODE_MISMATCH", DeploymentModeMismatch, RetryDecision.FINAL),
    ("upgrade required", 426, "UPGRADE_REQUIRED", UpgradeRequired, RetryDecision.FINAL),
    ("overloaded", 503, "OVERLOADED", HandshakeRejected, RetryDecision.RETRY),
    ("internal", 500, "INTERNAL", HandshakeRejected, RetryDecision.RETRY),
    ("rate limited", 429, "RATE_LIMITED", HandshakeRejected, RetryDecision.RETRY),
]


def agent_closed_after(reject: Callable[[Pair, UpgradeRequest], None]) -> tuple[Pair, list[Any]]:
    pair = Pair(auto_accept=False)
    pair.connect()
    (request,) = pair.mesh_events_of(UpgradeRequest)
    reject(pair, request)
    pair.pump()
    return pair, pair.agent_events_of(ConnectionClosed)


@pytest.mark.parametrize(
    ("status", "code", "error_type", "retry"),
    [row[1:] for row in AGENT_ROWS],
    ids=[row[0] for row in AGENT_ROWS],
)
def test_agent_turns_each_refusal_into_its_typed_error_and_retry(
    status: int, code: str, error_type: type[HandshakeRejected], retry: RetryDecision
) -> None:
    def reject(pair: Pair, _: UpgradeRequest) -> None:
        pair.mesh.reject(status=status, code=code, message="refused", now=pair.clock.now)

    pair, closed = agent_closed_after(reject)
    assert len(closed) == 1
    event = closed[0]
    assert type(event.error) is error_type
    assert (event.error.status, event.error.code) == (status, code)
    assert event.retry is retry
    assert event.code is None and event.by_peer
    assert pair.agent.state is AgentState.CLOSED
    assert not pair.agent_events_of(SessionStarted)


def test_401_asks_for_a_fresh_token_once_then_backs_off() -> None:
    pair = Pair(auto_accept=False)
    pair.session.token_refreshed = True  # the caller already fetched a fresh token
    pair.connect()
    pair.mesh.reject(status=401, code="UNAUTHORIZED", message="expired", now=pair.clock.now)
    pair.pump()
    (closed,) = pair.agent_events_of(ConnectionClosed)
    assert closed.retry is RetryDecision.RETRY


@pytest.mark.parametrize(
    ("token_tenant", "record", "status", "error_type"),
    [
        (None, REGISTRY["inst-a"], 401, Unauthorized),
        ("tenant-a", REGISTRY["inst-b"], 403, TenantMismatch),
        ("tenant-a", None, 404, InstanceNotFound),
        ("tenant-a", REGISTRY["inst-a-hosted"], 409, DeploymentModeMismatch),
    ],
    ids=["401", "403", "404", "409"],
)
def test_agent_and_mesh_end_to_end_through_check_upgrade(
    token_tenant: str | None,
    record: InstanceRecord | None,
    status: int,
    error_type: type[HandshakeRejected],
) -> None:
    def verify(token: str) -> Claims | None:
        assert token == "transport-token"  # the bearer token the agent sent
        return Claims(token_tenant) if token_tenant else None

    def reject(pair: Pair, request: UpgradeRequest) -> None:
        decision = check_upgrade(
            request.request, verify_token=verify, lookup_instance=lambda _: record
        )
        assert isinstance(decision, Reject)
        pair.mesh.reject(decision, now=pair.clock.now)

    _, closed = agent_closed_after(reject)
    assert isinstance(closed[0].error, error_type) and closed[0].error.status == status


def test_agent_and_mesh_end_to_end_accept_through_check_upgrade() -> None:
    pair = Pair(auto_accept=False)
    pair.connect()
    (request,) = pair.mesh_events_of(UpgradeRequest)
    decision = check_upgrade(
        request.request,
        verify_token=lambda _: Claims(TENANT, exp=pair.clock.wall() + 60),
        lookup_instance=lambda i: InstanceRecord(i, TENANT, "connected", "test-agent"),
    )
    assert isinstance(decision, Accept)
    pair.mesh.accept(decision, agent_type="test-agent", now=pair.clock.now)
    pair.pump()
    assert pair.agent.state is AgentState.READY and pair.mesh.state is MeshState.READY
    # the transport token's `exp` from the claims arms AUTH_EXPIRED (spec 4)
    assert pair.mesh.next_deadline() is not None
    pair.advance(60)
    (closed,) = pair.agent_events_of(ConnectionClosed)
    assert closed.code == 1008


def test_agent_reports_a_rejection_whose_body_is_not_the_spec_shape() -> None:
    harness = AgentHarness(welcome=False)
    harness.send_raw(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 5\r\n\r\noops!")
    closed = harness.closed_event()
    assert type(closed.error) is HandshakeRejected
    assert (closed.error.status, closed.error.code) == (502, "HTTP_502")
    assert closed.retry is RetryDecision.RETRY
    assert harness.agent.data_to_send() == [b""]


def test_agent_treats_an_invalid_101_as_a_failed_handshake_and_retries() -> None:
    harness = AgentHarness(welcome=False)
    harness.send_raw(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: bm90LXRoZS1yaWdodC1rZXk=\r\n"
        b"Sec-WebSocket-Protocol: svantic.v1\r\n\r\n"
    )
    closed = harness.closed_event()
    assert isinstance(closed.error, HandshakeFailed)
    assert closed.retry is RetryDecision.RETRY
    assert harness.agent.state is AgentState.CLOSED


def test_agent_retries_when_the_server_hangs_up_before_answering() -> None:
    harness = AgentHarness(welcome=False)
    harness.send_raw(b"HTTP/1.1 200 OK\r\n")  # a partial answer, then EOF
    harness.agent.receive_eof(harness.clock.now)
    closed = harness.closed_event()
    assert isinstance(closed.error, HandshakeFailed)
    assert closed.retry is RetryDecision.RETRY
    assert harness.agent.data_to_send() == [b""]


def test_agent_eof_before_any_answer_byte() -> None:
    harness = AgentHarness(welcome=False)
    harness.agent.receive_eof(harness.clock.now)
    assert isinstance(harness.closed_event().error, HandshakeFailed)


def test_agent_takes_the_welcome_that_arrives_with_the_101() -> None:
    harness = AgentHarness(welcome=False)
    # The welcome rides in the same read as the 101 (`HandshakeAccepted.extra`); it cannot
    # name the hello yet, and in_reply_to is optional on welcome (spec 2).
    welcome = harness.factory.new(
        Welcome,
        WelcomePayload(
            connection_id="c-9",
            resumed=False,
            replayed_dispatches=[],
            resume_token="rt-9",
            heartbeat_interval_ms=1000,
        ),
    )
    peer = Framing(False)
    peer.send_text(encode_frame(welcome).decode())
    wire = harness.upgrade(extra=peer.data_to_send())
    assert wire.types[:2] == ["hello", "heartbeat"]
    (started,) = harness.events_of(SessionStarted)
    assert started.connection_id == "c-9" and started.heartbeat_interval == 1.0
    assert harness.agent.session.resume_token == "rt-9"


# -- ws:// is refused unless opted in for loopback ---------------------------------------------


def _agent(url: str, **kwargs: Any) -> AgentConnection:
    clock = FakeClock()
    return AgentConnection(
        url,
        token="t",
        instance_id=INSTANCE,
        dispatch_auth=DispatchAuthVerifier(INSTANCE, enabled=False),
        now=clock.now,
        wall_clock=clock.wall,
        **kwargs,
    )


def test_agent_refuses_plain_ws_without_the_opt_in() -> None:
    with pytest.raises(InsecureTransportError):
        _agent("ws://127.0.0.1:8080/agents/connect")


def test_agent_refuses_plain_ws_to_a_remote_host_even_with_the_opt_in() -> None:
    with pytest.raises(InsecureTransportError):
        _agent("ws://mesh.example.com/agents/connect", allow_insecure_loopback=True)


@pytest.mark.parametrize("host", ["127.0.0.1:8080", "localhost:8080", "[::1]:8080"])
def test_agent_allows_plain_ws_to_loopback_when_opted_in(host: str) -> None:
    agent = _agent(f"ws://{host}/agents/connect", allow_insecure_loopback=True)
    (request,) = agent.data_to_send()
    assert request.startswith(b"GET /agents/connect?instance_id=agent-1 HTTP/1.1\r\n")
    assert f"host: {host}".encode() in request.lower()
    assert agent.state is AgentState.CONNECTING


def test_agent_request_offers_svantic_v1_and_a_bearer_token() -> None:
    agent = _agent("wss://mesh.test")
    (request,) = agent.data_to_send()
    assert b"Sec-WebSocket-Protocol: svantic.v1\r\n" in request
    assert b"Authorization: Bearer t\r\n" in request
    assert b"permessage-deflate" not in request


def test_mesh_harness_smoke() -> None:
    # the harnesses other test modules rely on reach READY through the real handshake
    mesh = MeshHarness()
    mesh.hello()
    assert mesh.mesh.state is MeshState.READY
    agent = AgentHarness()
    assert agent.agent.state is AgentState.READY
    assert mesh.mesh.tenant_id == TENANT
