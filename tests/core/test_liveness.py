"""Timers and liveness (spec sections 3 and 4), at their exact deadlines on a fake clock.

Mesh WebSocket and app pings, agent heartbeats, the dead-peer timeout on both sides,
close_request with its grace, AUTH_EXPIRED when the transport token runs out, and the
`token_refresh` extension accepted, refused, and unknown to the mesh.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from test_conn_kit import PING, AgentHarness, MeshHarness, ws_frame

from svantic_proto.backoff import RetryDecision
from svantic_proto.config import Config
from svantic_proto.errors import LocalProtocolError
from svantic_proto.events import (
    CloseRequested,
    ConnectionClosed,
    DispatchCompleted,
    DispatchReceived,
    ErrorReceived,
    ExtensionUnsupported,
    HeartbeatReceived,
    TokenRefreshed,
    UpgradeRequest,
)
from svantic_proto.frames import CloseRequest, Error, ErrorPayload, Heartbeat, Ping
from svantic_proto.states import AgentState, MeshState
from svantic_proto.testing import Pair

QUIET = {"ws_ping_interval": 1000.0, "app_ping_interval": 1000.0, "app_ping_offset": 500.0,
         "heartbeat_interval": 1000.0}


def quiet(**overrides: Any) -> Config:
    """A config whose periodic traffic stays out of the way of the timer under test."""
    return Config(**{**QUIET, "dead_peer_timeout": 5000.0, **overrides})


def advance_to(pair: Pair, when: float) -> None:
    pair.advance(when - pair.clock.now)


# -- mesh pings ----------------------------------------------------------------------------------


def test_mesh_sends_websocket_and_app_pings_at_their_exact_times() -> None:
    h = MeshHarness(Config(ws_ping_interval=4.0, app_ping_interval=6.0, app_ping_offset=1.5,
                           dead_peer_timeout=100.0))
    h.hello()
    ready_at = h.clock.now
    sent = []
    for when, wire in h.run_until(ready_at + 14.0):
        sent += [(when - ready_at, "ws") for _ in wire.pings]
        sent += [(when - ready_at, "app") for _ in wire.of(Ping)]
    assert sent == [
        (1.5, "app"), (4.0, "ws"), (7.5, "app"), (8.0, "ws"), (12.0, "ws"), (13.5, "app"),
    ]


def test_default_pings_are_thirty_seconds_apart_offset_by_fifteen() -> None:
    h = MeshHarness(Config(dead_peer_timeout=1000.0))
    h.hello()
    ready_at = h.clock.now
    times = [(when - ready_at, bool(w.pings), bool(w.of(Ping)))
             for when, w in h.run_until(ready_at + 60.0)]
    assert times == [(15.0, False, True), (30.0, True, False), (45.0, False, True),
                     (60.0, True, False)]


def test_the_agent_answers_app_pings_and_the_pair_stays_alive() -> None:
    config = Config(ws_ping_interval=4.0, app_ping_interval=4.0, app_ping_offset=2.0,
                    heartbeat_interval=5.0, dead_peer_timeout=12.0)
    pair = Pair(config)
    pair.connect()
    pair.advance(120.0)
    assert pair.agent_events_of(ConnectionClosed) == []
    assert pair.mesh_events_of(ConnectionClosed) == []
    assert len(pair.mesh_events_of(HeartbeatReceived)) == 1 + 24  # at welcome, then every 5 s


# -- agent heartbeats ----------------------------------------------------------------------------


def heartbeats(fired: list[tuple[float, Any]], since: float) -> list[tuple[float, Heartbeat]]:
    return [(when - since, hb) for when, wire in fired for hb in wire.of(Heartbeat)]


def test_agent_heartbeats_every_interval_from_welcome_and_at_once_on_a_status_change() -> None:
    h = AgentHarness(Config(dead_peer_timeout=1000.0), welcome=False)
    h.upgrade()
    ready_at = h.clock.now
    assert h.welcome(heartbeat_interval_ms=5000).types == ["heartbeat"]  # at once
    assert h.next_deadline() == ready_at + 5.0  # the welcome's interval, not the config's
    beats = heartbeats(h.run_until(ready_at + 10.0), ready_at)
    assert [t for t, _ in beats] == [5.0, 10.0]
    assert beats[0][1].payload.status == "available"
    h.run_until(ready_at + 12.0)
    h.agent.set_status("busy", now=h.clock.now)
    (changed,) = h.read().of(Heartbeat)
    assert changed.payload.status == "busy"
    assert h.next_deadline() == ready_at + 17.0  # the period restarts from the change
    h.agent.set_status("busy", now=h.clock.now)  # no change: nothing sent
    h.agent.set_status(load=0.25, max_concurrent_sessions=4, health={"db": "ok"})
    assert h.read().empty
    h.send(h.dispatch_frame())
    ((when, beat),) = heartbeats(h.run_until(ready_at + 17.0), ready_at)
    assert when == 17.0
    payload = beat.payload
    assert (payload.status, payload.load, payload.max_concurrent_sessions) == ("busy", 0.25, 4)
    assert (payload.active_sessions, payload.in_flight, payload.health) == (1, 1, {"db": "ok"})


def test_the_mesh_application_sees_the_heartbeats() -> None:
    pair = Pair(Config(heartbeat_interval=5.0, dead_peer_timeout=100.0))
    pair.connect()
    pair.agent.set_status("offline", now=pair.clock.now, load=1.0)
    pair.pump()
    last = pair.mesh_events_of(HeartbeatReceived)[-1]
    assert (last.status, last.load, last.active_sessions) == ("offline", 1.0, 0)


@pytest.mark.parametrize(
    ("status", "fields"),
    [("sleeping", {}), (None, {"load": 1.5}), (None, {"active_sessions": -1}),
     (None, {"colour": "blue"}), (None, {"health": "fine"})],
)
def test_set_status_refuses_what_the_heartbeat_schema_refuses_at_once(
    status: str | None, fields: dict[str, Any]
) -> None:
    h = AgentHarness()
    h.read()
    with pytest.raises(LocalProtocolError, match="heartbeat"):
        h.agent.set_status(status, now=h.clock.now, **fields)
    assert h.read().empty
    (_, wire), *_ = h.run_until(h.clock.now + 30.0)
    (beat,) = wire.of(Heartbeat)
    assert beat.payload.status == "available"  # nothing of the refused call was kept
    assert beat.payload.load is None


# -- dead peer -----------------------------------------------------------------------------------


def test_mesh_closes_1001_at_exactly_the_dead_peer_timeout_and_drops_without_waiting() -> None:
    h = MeshHarness(quiet(dead_peer_timeout=20.0))
    h.hello()
    hello_at = h.clock.now
    assert h.next_deadline() == hello_at + 20.0
    h.run_until(hello_at + 5.0)
    h.send_raw(ws_frame(PING, b"", masked=True))  # any traffic counts
    assert h.read().pongs == [b""]
    assert h.next_deadline() == hello_at + 25.0
    h.mesh.send_ping()  # what the mesh sends does not count
    h.read()
    assert h.run_until(hello_at + 24.999) == []
    ((when, wire),) = h.run_until(hello_at + 25.0)
    assert when == hello_at + 25.0
    assert wire.frames == [] and wire.close_code == 1001
    assert wire.transport_closed  # dropped at once, no wait for the close reply
    closed = h.closed_event()
    assert closed.code == 1001 and not closed.by_peer
    assert h.mesh.state is MeshState.CLOSED


def test_agent_reports_a_dead_peer_and_drops_the_socket() -> None:
    h = AgentHarness(Config(dead_peer_timeout=20.0), welcome=False, heartbeat_interval_ms=5000)
    h.upgrade()
    h.welcome(heartbeat_interval_ms=5000)
    ready_at = h.clock.now
    fired = h.run_until(ready_at + 19.999)
    assert len(heartbeats(fired, ready_at)) == 3  # its own heartbeats do not keep it alive
    assert h.events_of(ConnectionClosed) == []
    h.at(ready_at + 20.0)
    closed = h.closed_event()
    assert (closed.code, closed.by_peer, closed.retry) == (None, True, RetryDecision.RETRY)
    assert h.agent.data_to_send() == [b""]  # no close frame: the socket is just dropped
    assert h.agent.state is AgentState.CLOSED
    assert h.next_deadline() is None


def test_the_mesh_kills_a_silent_agent_and_the_agent_will_reconnect() -> None:
    config = Config(heartbeat_interval=100.0, dead_peer_timeout=10.0, ws_ping_interval=3.0,
                    app_ping_interval=3.0, app_ping_offset=1.0)
    pair = Pair(config)
    pair.connect()
    ready_at = pair.clock.now
    pair.go_silent("agent")  # half-open TCP
    advance_to(pair, ready_at + 9.999)
    assert pair.mesh_events_of(ConnectionClosed) == []
    advance_to(pair, ready_at + 10.0)
    (agent_closed,) = pair.agent_events_of(ConnectionClosed)
    assert (agent_closed.code, agent_closed.retry) == (1001, RetryDecision.RETRY)


# -- close_request ------------------------------------------------------------------------------


def pair_with_dispatch(config: Config) -> tuple[Pair, str]:
    pair = Pair(config)
    pair.connect()
    dispatch_id = pair.mesh.send_dispatch("job", deadline_ms=600_000, now=pair.clock.now)
    pair.pump()
    return pair, dispatch_id


def test_mesh_close_request_with_nothing_in_flight_closes_1000_at_once() -> None:
    pair = Pair(quiet())
    pair.connect()
    pair.mesh.close_request(grace_seconds=10, reason="deploy", now=pair.clock.now)
    pair.pump()
    assert pair.agent_events_of(CloseRequested) == [CloseRequested(10, "deploy")]
    (agent_closed,) = pair.agent_events_of(ConnectionClosed)
    assert (agent_closed.code, agent_closed.by_peer) == (1000, True)
    assert agent_closed.retry is RetryDecision.RETRY  # the mesh is draining: go elsewhere
    (mesh_closed,) = pair.mesh_events_of(ConnectionClosed)
    assert (mesh_closed.code, mesh_closed.by_peer) == (1000, False)


def test_mesh_close_request_drains_then_closes_as_soon_as_nothing_is_in_flight() -> None:
    pair, dispatch_id = pair_with_dispatch(quiet())
    start = pair.clock.now
    pair.mesh.close_request(grace_seconds=10, now=start)
    pair.pump()
    assert pair.mesh.state is MeshState.DRAINING
    with pytest.raises(LocalProtocolError):
        pair.mesh.send_dispatch("new", deadline_ms=1000, now=start)  # it promised none
    advance_to(pair, start + 3.0)
    assert pair.mesh_events_of(ConnectionClosed) == []
    pair.agent.send_result(dispatch_id, "ok")
    pair.pump()
    assert pair.mesh_events_of(DispatchCompleted) == [DispatchCompleted(dispatch_id, "ok")]
    (closed,) = pair.mesh_events_of(ConnectionClosed)
    assert closed.code == 1000 and closed.in_flight == ()
    assert pair.mesh.state is MeshState.CLOSED


def test_mesh_close_request_closes_at_exactly_the_grace_with_work_in_flight() -> None:
    pair, dispatch_id = pair_with_dispatch(quiet())
    start = pair.clock.now
    pair.mesh.close_request(grace_seconds=10, now=start)
    advance_to(pair, start + 9.999)
    assert pair.mesh_events_of(ConnectionClosed) == []
    advance_to(pair, start + 10.0)
    (closed,) = pair.mesh_events_of(ConnectionClosed)
    assert closed.code == 1000 and closed.in_flight == (dispatch_id,)
    assert pair.agent_events_of(ConnectionClosed)[0].code == 1000


def test_close_request_grace_defaults_to_the_config() -> None:
    pair, _ = pair_with_dispatch(quiet(close_grace=7.0))
    pair.mesh.close_request(now=pair.clock.now)
    pair.pump()
    assert pair.agent_events_of(CloseRequested) == [CloseRequested(7, None)]


def test_agent_close_request_stops_routing_and_closes_when_drained() -> None:
    pair, dispatch_id = pair_with_dispatch(quiet())
    pair.agent.close_request(grace_seconds=5, reason="upgrade", now=pair.clock.now)
    pair.pump()
    assert pair.mesh_events_of(CloseRequested) == [CloseRequested(5, "upgrade")]
    assert pair.mesh.peer_draining and not pair.mesh.accepting_dispatches
    with pytest.raises(LocalProtocolError, match="route the dispatch elsewhere"):
        pair.mesh.send_dispatch("job", deadline_ms=1000, now=pair.clock.now)
    with pytest.raises(LocalProtocolError):
        pair.agent.close_request(now=pair.clock.now)  # once
    assert pair.agent.state is AgentState.DRAINING
    pair.agent.send_result(dispatch_id, "ok")  # in-flight work continues...
    pair.pump()
    assert pair.mesh_events_of(DispatchCompleted) == [DispatchCompleted(dispatch_id, "ok")]
    (agent_closed,) = pair.agent_events_of(ConnectionClosed)  # ...then it closes 1000
    assert (agent_closed.code, agent_closed.by_peer) == (1000, False)
    assert agent_closed.retry is RetryDecision.FINAL  # it asked for this close
    (mesh_closed,) = pair.mesh_events_of(ConnectionClosed)
    assert (mesh_closed.code, mesh_closed.by_peer) == (1000, True)


def test_agent_close_request_closes_at_once_when_idle_and_at_the_grace_otherwise() -> None:
    idle = Pair(quiet())
    idle.connect()
    idle.agent.close_request(now=idle.clock.now)
    idle.pump()
    assert idle.agent_events_of(ConnectionClosed)[0].code == 1000
    pair, dispatch_id = pair_with_dispatch(quiet())
    start = pair.clock.now
    pair.agent.close_request(grace_seconds=5, now=start)
    advance_to(pair, start + 4.999)
    assert pair.agent_events_of(ConnectionClosed) == []
    advance_to(pair, start + 5.0)
    (closed,) = pair.agent_events_of(ConnectionClosed)
    assert closed.code == 1000 and closed.in_flight == (dispatch_id,)
    assert dispatch_id in pair.session.running  # the session keeps it for the next connection


def test_close_request_wire_shape() -> None:
    h = MeshHarness()
    h.hello()
    h.mesh.close_request(grace_seconds=0, reason="now", now=h.clock.now)
    wire = h.read()
    (request,) = wire.of(CloseRequest)
    assert (request.payload.grace_seconds, request.payload.reason) == (0, "now")
    assert wire.close_code == 1000


@pytest.mark.parametrize("side", ["mesh", "agent"])
def test_an_unanswered_close_drops_the_transport_after_the_close_timeout(side: str) -> None:
    h: MeshHarness | AgentHarness
    if side == "mesh":
        h = MeshHarness(quiet(close_timeout=2.0))
        h.hello()
    else:
        h = AgentHarness(quiet(close_timeout=2.0))
        h.read()
    start = h.clock.now
    h._conn().close(1001, "bye", now=start)
    wire = h.read()
    assert wire.close_code == 1001 and not wire.transport_closed
    assert h.run_until(start + 1.999) == []
    ((when, wire),) = h.run_until(start + 2.0)
    assert wire.transport_closed and when == start + 2.0
    assert h.closed_event().code == 1001


# -- AUTH_EXPIRED and token_refresh --------------------------------------------------------------


def test_mesh_sends_auth_expired_then_closes_1008_when_the_token_runs_out() -> None:
    clock_h = MeshHarness(quiet(), accept=False)
    h = MeshHarness(quiet(), clock=clock_h.clock, token_expires_at=clock_h.clock.wall() + 30.0)
    h.hello()
    accepted_at = h.clock.now
    assert h.run_until(accepted_at + 29.999) == []
    ((when, wire),) = h.run_until(accepted_at + 30.0)
    assert when == accepted_at + 30.0
    (error,) = wire.of(Error)
    assert error.payload.code == "AUTH_EXPIRED" and error.in_reply_to is None
    assert wire.close_code == 1008
    closed = h.closed_event()
    assert closed.code == 1008


def test_an_already_expired_token_closes_at_once() -> None:
    clock_h = MeshHarness(quiet(), accept=False)
    h = MeshHarness(quiet(), clock=clock_h.clock, token_expires_at=clock_h.clock.wall() - 5.0)
    assert h.next_deadline() == h.clock.now


@dataclass(frozen=True)
class Claims:
    tenant_id: str
    sub: str | None = "client-1"
    exp: float | None = None


def token_pair(verify_token: Any, expires_in: float = 30.0) -> Pair:
    pair = Pair(quiet(), auto_accept=False, verify_token=verify_token)
    pair.connect()
    (request,) = pair.mesh_events_of(UpgradeRequest)
    pair.mesh.accept(
        instance_id=request.request.instance_id, tenant_id="tenant-1", subject="client-1",
        token_expires_at=pair.clock.wall() + expires_in, now=pair.clock.now,
    )
    pair.pump()
    return pair


def test_agent_reconnects_with_a_fresh_token_after_auth_expired() -> None:
    pair = token_pair(None)
    advance_to(pair, pair.clock.now + 30.0)
    (error,) = pair.agent_events_of(ErrorReceived)
    assert error.code == "AUTH_EXPIRED"
    (closed,) = pair.agent_events_of(ConnectionClosed)
    assert closed.code == 1008 and closed.by_peer
    assert closed.retry is RetryDecision.REFRESH_TOKEN_THEN_RETRY


def test_an_accepted_token_refresh_moves_the_expiry() -> None:
    wall_box: list[float] = []

    def verify(token: str) -> Claims:
        assert token == "fresh-token"
        return Claims("tenant-1", exp=wall_box[0] + 120.0)

    pair = token_pair(verify)
    start = pair.clock.now
    wall_box.append(pair.clock.wall())
    assert pair.agent.refresh_token("fresh-token") is True
    pair.pump()
    assert pair.mesh_events_of(TokenRefreshed) == [TokenRefreshed(wall_box[0] + 120.0)]
    advance_to(pair, start + 119.999)
    assert pair.agent_events_of(ConnectionClosed) == []  # the old expiry passed quietly
    advance_to(pair, start + 120.0)
    assert pair.agent_events_of(ConnectionClosed)[0].code == 1008


@pytest.mark.parametrize(
    "verify",
    [
        lambda token: (_ for _ in ()).throw(ValueError("bad signature")),
        lambda token: Claims("tenant-2", exp=1e12),
        lambda token: Claims("tenant-1", sub="someone-else", exp=1e12),
    ],
    ids=["does not verify", "another tenant", "another client"],
)
def test_a_refused_token_refresh_is_unauthorized_and_keeps_the_old_expiry(verify: Any) -> None:
    pair = token_pair(verify)
    start = pair.clock.now
    assert pair.agent.refresh_token("fresh-token") is True
    pair.pump()
    (error,) = pair.agent_events_of(ErrorReceived)
    assert error.code == "UNAUTHORIZED" and error.in_reply_to is not None
    assert pair.mesh_events_of(TokenRefreshed) == []
    assert pair.agent_events_of(ConnectionClosed) == []  # the socket stays up until expiry
    advance_to(pair, start + 30.0)
    assert pair.agent_events_of(ConnectionClosed)[0].code == 1008


def test_a_token_refresh_whose_claims_carry_no_expiry_changes_nothing() -> None:
    pair = token_pair(lambda token: Claims("tenant-1", exp=None))
    start = pair.clock.now
    assert pair.agent.refresh_token("fresh-token") is True
    pair.pump()
    assert pair.mesh_events_of(TokenRefreshed) == [] and pair.agent_events_of(ErrorReceived) == []
    advance_to(pair, start + 30.0)
    assert pair.agent_events_of(ConnectionClosed)[0].code == 1008


def test_token_refresh_to_a_mesh_without_the_extension_downgrades() -> None:
    pair = token_pair(None)  # this mesh cannot verify tokens: it does not know the extension
    assert pair.agent.refresh_token("fresh-token") is True
    pair.pump()
    assert pair.agent_events_of(ExtensionUnsupported) == [ExtensionUnsupported("token_refresh")]
    assert pair.agent_events_of(ErrorReceived) == []  # the BAD_FRAME was understood, not surfaced
    assert pair.agent_events_of(ConnectionClosed) == []  # BAD_FRAME keeps the socket
    assert pair.agent.refresh_token("another-token") is False  # stops sending that type
    assert pair.agent.data_to_send() == []
    dispatch_id = pair.mesh.send_dispatch("echo", deadline_ms=1000, now=pair.clock.now)
    pair.pump()
    assert pair.agent_events_of(DispatchReceived)[0].dispatch_id == dispatch_id


def test_refresh_token_before_the_session_is_ready_returns_false() -> None:
    h = AgentHarness(welcome=False)
    assert h.agent.refresh_token("t") is False
    h.upgrade()
    assert h.agent.refresh_token("t") is False


def test_only_recent_extension_frames_can_be_downgraded() -> None:
    h = AgentHarness()
    h.read()
    for _ in range(257):
        assert h.agent.refresh_token("t") is True
    refreshes = h.read().frames
    oldest, newest = refreshes[0], refreshes[-1]
    h.send(h.factory.new(Error, ErrorPayload(code="BAD_FRAME"), in_reply_to=oldest.id))
    (error,) = h.events_of(ErrorReceived)  # too old to be matched: a plain error
    assert error.in_reply_to == oldest.id
    h.send(h.factory.new(Error, ErrorPayload(code="BAD_FRAME"), in_reply_to=newest.id))
    assert h.events_of(ExtensionUnsupported) == [ExtensionUnsupported("token_refresh")]
