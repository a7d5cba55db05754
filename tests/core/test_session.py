"""hello / welcome and the states around them (spec sections 1, 3 and 4).

hello comes first and names the query's instance; no hello within the hello timeout
closes 1002 at exactly that time; welcome answers the hello; nothing is dispatched
before the session is ready; an agent refuses frames before welcome.
"""

from __future__ import annotations

import pytest
from test_conn_kit import INSTANCE, AgentHarness, MeshHarness, Wire

from svantic_proto.backoff import RetryDecision
from svantic_proto.config import Config
from svantic_proto.errors import InvalidState, LocalProtocolError, RemoteProtocolError
from svantic_proto.events import (
    ConnectionClosed,
    DispatchReceived,
    ErrorReceived,
    HeartbeatReceived,
    SessionStarted,
    UpgradeRequest,
)
from svantic_proto.frames import (
    Cancel,
    CancelPayload,
    Dispatch,
    DispatchResult,
    DispatchResultPayload,
    Error,
    ErrorPayload,
    Frame,
    Heartbeat,
    HeartbeatPayload,
    Hello,
    HelloPayload,
    Ping,
    PingPayload,
    Pong,
    Sdk,
    ToolCall,
    ToolCallPayload,
    Welcome,
    WelcomePayload,
)
from svantic_proto.states import (
    AGENT_TRANSITIONS,
    MESH_TRANSITIONS,
    AgentState,
    MeshState,
    mermaid_diagram,
    transition,
)
from svantic_proto.testing import Pair

NIL = "00000000-0000-4000-8000-000000000000"


def assert_bad_frame_then_1002(wire: Wire, in_reply_to: str | None) -> None:
    """Spec 2: `error`/BAD_FRAME naming the frame, then close 1002, then the transport ends."""
    assert wire.types == ["error"]
    error = wire.frames[0]
    assert isinstance(error, Error)
    assert error.payload.code == "BAD_FRAME" and error.in_reply_to == in_reply_to
    assert wire.close_code == 1002
    assert wire.transport_closed and wire.raw[-1] != b""


# -- hello first ---------------------------------------------------------------------------------


def _first_frames(h: MeshHarness) -> list[Frame]:
    f = h.factory
    return [
        f.new(Ping, PingPayload()),
        f.new(Heartbeat, HeartbeatPayload(active_sessions=0)),
        f.new(DispatchResult, DispatchResultPayload(result=1), in_reply_to=NIL),
        f.new(ToolCall, ToolCallPayload(tool="x")),
        f.new(Error, ErrorPayload(code="INTERNAL")),
    ]


@pytest.mark.parametrize("index", range(5), ids=["ping", "heartbeat", "result", "tool", "error"])
def test_any_first_frame_but_hello_is_bad_frame_then_1002(index: int) -> None:
    h = MeshHarness()
    frame = _first_frames(h)[index]
    h.send(frame)
    assert_bad_frame_then_1002(h.read(), frame.id)
    closed = h.closed_event()
    assert closed.code == 1002 and not closed.by_peer
    assert isinstance(closed.error, RemoteProtocolError) and closed.error.close_code == 1002
    assert h.mesh.state is MeshState.CLOSED
    assert not h.events_of(SessionStarted)


def test_hello_naming_another_instance_is_bad_frame_then_1002() -> None:
    h = MeshHarness()
    hello = h.factory.new(Hello, HelloPayload(instance_id="agent-2"))
    h.send(hello)
    assert_bad_frame_then_1002(h.read(), hello.id)
    assert "instance_id" in str(h.closed_event().error)


def test_hello_timeout_closes_1002_at_exactly_ten_seconds() -> None:
    h = MeshHarness()
    accepted_at = h.clock.now
    assert h.next_deadline() == accepted_at + 10.0
    h.at(accepted_at + 9.999)
    assert h.read().empty and h.mesh.state is MeshState.AWAITING_HELLO
    h.at(accepted_at + 10.0)
    wire = h.read()
    assert wire.frames == [] and wire.close_code == 1002 and wire.transport_closed
    assert h.closed_event().code == 1002


def test_hello_timeout_follows_the_config() -> None:
    h = MeshHarness(Config(hello_timeout=2.5))
    assert h.next_deadline() == h.clock.now + 2.5


def test_welcome_answers_the_hello() -> None:
    h = MeshHarness(Config(heartbeat_interval=12.5, max_message_bytes=4096))
    welcome = h.hello()
    assert welcome.in_reply_to == h.hello_id
    payload = welcome.payload
    assert payload.resumed is False and payload.replayed_dispatches == []
    assert payload.connection_id == h.mesh.connection_id
    assert payload.resume_token  # opaque, never empty, even without a resume store
    assert payload.heartbeat_interval_ms == 12_500
    assert payload.max_message_bytes == 4096
    (started,) = h.events_of(SessionStarted)
    assert started.instance_id == INSTANCE and started.heartbeat_interval == 12.5
    assert h.mesh.state is MeshState.READY


def test_hello_fields_reach_the_mesh_application() -> None:
    h = MeshHarness(agent_type=None)
    hello = h.factory.new(
        Hello,
        HelloPayload(
            instance_id=INSTANCE,
            agent_type="navigator",
            sdk=Sdk(name="other-sdk", version="9"),
            capabilities=["get_ticket", "close_ticket"],
        ),
    )
    h.send(hello)
    (started,) = h.events_of(SessionStarted)
    assert started.agent_type == "navigator"
    assert started.capabilities == ("get_ticket", "close_ticket")
    assert h.mesh.agent_type == "navigator"  # used in dispatch-auth `sub` when accept gave none


def test_a_second_hello_is_refused() -> None:
    h = MeshHarness()
    h.hello()
    again = h.factory.new(Hello, HelloPayload(instance_id=INSTANCE))
    h.send(again)
    assert_bad_frame_then_1002(h.read(), again.id)


@pytest.mark.parametrize("frame_type", [Welcome, Dispatch, Cancel])
def test_a_mesh_refuses_frames_only_a_mesh_sends(frame_type: type[Frame]) -> None:
    h = MeshHarness()
    h.hello()
    f = h.factory
    frame: Frame
    if frame_type is Welcome:
        frame = f.new(Welcome, WelcomePayload(
            connection_id="c", resumed=False, replayed_dispatches=[], resume_token="r",
            heartbeat_interval_ms=1))
    elif frame_type is Dispatch:
        frame = f.dispatch(capability="echo", deadline_ms=100)
    else:
        frame = f.new(Cancel, CancelPayload(dispatch_id=NIL, reason="no"))
    h.send(frame)
    assert_bad_frame_then_1002(h.read(), frame.id)


# -- nothing dispatched before ready -------------------------------------------------------------


def test_send_dispatch_raises_before_ready_and_after_close() -> None:
    h = MeshHarness(accept=False)
    with pytest.raises(LocalProtocolError):
        h.mesh.send_dispatch("echo", deadline_ms=1000, now=h.clock.now)  # handshake
    h2 = MeshHarness()
    with pytest.raises(LocalProtocolError, match="AWAITING_HELLO"):
        h2.mesh.send_dispatch("echo", deadline_ms=1000, now=h2.clock.now)
    assert h2.read().frames == []
    h2.hello()
    h2.mesh.send_dispatch("echo", deadline_ms=1000, now=h2.clock.now)
    assert h2.read().types == ["dispatch"]
    h2.mesh.close(1001, "bye", now=h2.clock.now)
    with pytest.raises(LocalProtocolError, match="CLOSING"):
        h2.mesh.send_dispatch("echo", deadline_ms=1000, now=h2.clock.now)
    h2.mesh.receive_eof(h2.clock.now)
    with pytest.raises(InvalidState):
        h2.mesh.send_dispatch("echo", deadline_ms=1000, now=h2.clock.now)
    with pytest.raises(InvalidState):
        h2.mesh.send_ping()


# -- the agent side of hello / welcome -----------------------------------------------------------


def test_agent_sends_hello_first_with_its_identity() -> None:
    h = AgentHarness(welcome=False)
    wire = h.upgrade()
    hello = wire.frames[0]
    assert isinstance(hello, Hello) and wire.types == ["hello"]
    assert hello.payload.instance_id == INSTANCE
    assert hello.payload.agent_type == "test-agent"
    assert hello.payload.resume_token is None
    assert hello.payload.sdk is not None and hello.payload.sdk.name == "svantic-proto"
    assert h.agent.state is AgentState.HELLO_SENT


def test_welcome_makes_the_agent_ready_and_it_reports_health_at_once() -> None:
    h = AgentHarness(welcome=False)
    h.upgrade()
    wire = h.welcome(heartbeat_interval_ms=2000)
    assert wire.types == ["heartbeat"]
    (started,) = h.events_of(SessionStarted)
    assert (started.connection_id, started.resumed, started.heartbeat_interval) == (
        "conn-1", False, 2.0,
    )
    assert h.agent.ready and h.agent.connection_id == "conn-1"
    assert h.agent.session.resume_token == "rt-1"


def test_agent_refuses_a_welcome_answering_another_hello() -> None:
    h = AgentHarness(welcome=False)
    h.upgrade()
    wire = h.welcome(in_reply_to=NIL)
    assert_bad_frame_then_1002(wire, h.last_sent.id)
    closed = h.closed_event()
    assert closed.code == 1002 and closed.retry is RetryDecision.RETRY
    assert not h.events_of(SessionStarted)
    assert wire.transport_closed


def test_agent_refuses_a_second_welcome() -> None:
    h = AgentHarness()
    wire = h.welcome()
    assert_bad_frame_then_1002(wire, h.last_sent.id)
    assert h.closed_event().code == 1002


@pytest.mark.parametrize("kind", ["dispatch", "heartbeat", "pong"])
def test_agent_refuses_frames_before_welcome_with_bad_frame_then_1002(kind: str) -> None:
    h = AgentHarness(welcome=False)
    h.upgrade()
    f = h.factory
    frame: Frame
    if kind == "dispatch":
        frame = h.dispatch_frame()
    elif kind == "heartbeat":
        frame = f.new(Heartbeat, HeartbeatPayload(active_sessions=0))
    else:
        frame = f.new(Pong, PingPayload(), in_reply_to=NIL)
    h.send(frame)
    assert_bad_frame_then_1002(h.read(), frame.id)
    assert not h.events_of(DispatchReceived)
    closed = h.closed_event()
    assert closed.code == 1002 and isinstance(closed.error, RemoteProtocolError)


def test_agent_answers_ping_and_reports_errors_before_welcome() -> None:
    h = AgentHarness(welcome=False)
    h.upgrade()
    ping_id = h.ping()
    wire = h.read()
    assert wire.types == ["pong"] and wire.frames[0].in_reply_to == ping_id
    h.send(h.factory.new(Error, ErrorPayload(code="INTERNAL", message="slow start")))
    (error,) = h.events_of(ErrorReceived)
    assert error.code == "INTERNAL"
    h.welcome()
    assert h.agent.ready


def test_agent_gives_up_when_no_welcome_comes_within_the_hello_timeout() -> None:
    h = AgentHarness(Config(hello_timeout=4.0), welcome=False)
    created = h.clock.now
    h.upgrade()
    assert h.next_deadline() == created + 4.0
    h.at(created + 3.999)
    assert h.events_of(ConnectionClosed) == []
    h.at(created + 4.0)
    closed = h.closed_event()
    assert closed.code is None and closed.retry is RetryDecision.RETRY
    assert h.agent.data_to_send()[-1:] == [b""]


@pytest.mark.parametrize("kind", ["hello", "heartbeat", "result", "tool_call"])
def test_agent_refuses_frames_only_an_agent_sends(kind: str) -> None:
    h = AgentHarness()
    f = h.factory
    frame: Frame
    if kind == "hello":
        frame = f.new(Hello, HelloPayload(instance_id=INSTANCE))
    elif kind == "heartbeat":
        frame = f.new(Heartbeat, HeartbeatPayload(active_sessions=0))
    elif kind == "result":
        frame = f.new(DispatchResult, DispatchResultPayload(result=None), in_reply_to=NIL)
    else:
        frame = f.new(ToolCall, ToolCallPayload(tool="x"))
    h.send(frame)
    assert_bad_frame_then_1002(h.read(), frame.id)


def test_both_sides_agree_on_the_session_through_the_pair() -> None:
    pair = Pair(Config(heartbeat_interval=7.0), agent_type="navigator")
    pair.connect()
    (agent_started,) = pair.agent_events_of(SessionStarted)
    (mesh_started,) = pair.mesh_events_of(SessionStarted)
    assert agent_started.connection_id == mesh_started.connection_id == pair.mesh.connection_id
    assert agent_started.heartbeat_interval == mesh_started.heartbeat_interval == 7.0
    assert mesh_started.agent_type == "navigator"
    assert [type(e) for e in pair.mesh_events][:2] == [UpgradeRequest, SessionStarted]
    assert pair.mesh_events_of(HeartbeatReceived)  # the agent's first heartbeat


# -- the state tables ----------------------------------------------------------------------------


def test_every_state_is_in_its_table_and_closed_is_final() -> None:
    assert set(AGENT_TRANSITIONS) == set(AgentState)
    assert set(MESH_TRANSITIONS) == set(MeshState)
    assert AGENT_TRANSITIONS[AgentState.CLOSED] == {}
    assert MESH_TRANSITIONS[MeshState.CLOSED] == {}
    for table in (AGENT_TRANSITIONS, MESH_TRANSITIONS):
        for state, moves in table.items():
            if state.name != "CLOSED":
                assert moves["transport_lost"].name == "CLOSED"  # TCP can break in any state


def test_an_illegal_move_raises_local_protocol_error() -> None:
    assert transition(MESH_TRANSITIONS, MeshState.AWAITING_HELLO, "hello") is MeshState.READY
    with pytest.raises(LocalProtocolError, match="cannot welcome in state CONNECTING"):
        transition(AGENT_TRANSITIONS, AgentState.CONNECTING, "welcome")
    with pytest.raises(LocalProtocolError):
        transition(MESH_TRANSITIONS, MeshState.CLOSED, "hello")


@pytest.mark.parametrize("table", [AGENT_TRANSITIONS, MESH_TRANSITIONS], ids=["agent", "mesh"])
def test_the_mermaid_diagram_draws_every_transition(table: dict) -> None:  # type: ignore[type-arg]
    diagram = mermaid_diagram(table)
    lines = diagram.splitlines()
    assert lines[0] == "stateDiagram-v2"
    states = list(table)
    first, last = states[0], states[-1]
    assert lines[1] == f"    [*] --> {first.name}"
    assert lines[-1] == f"    {last.name} --> [*]"
    moves = sum(len(m) for m in table.values())
    assert len(lines) == moves + 3
    for state, targets in table.items():
        for what, target in targets.items():
            assert f"    {state.name} --> {target.name}: {what}" in lines


# -- configuration limits ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {"hello_timeout": -1.0},
        {"hello_timeout": "10"},
        {"max_fragments": 0},
        {"max_message_bytes": 0},
        {"ws_ping_interval": 0.0},  # would fire forever at one instant
        {"app_ping_interval": 0},
        {"max_frames_per_second": 0.0},  # an infinite RATE_LIMITED hint
        {"heartbeat_interval": 0.0004},  # welcome carries whole milliseconds, at least 1
    ],
    ids=lambda o: next(iter(o)),
)
def test_config_refuses_values_that_would_break_a_connection(overrides: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(LocalProtocolError, match="Config"):
        Config(**overrides)


def test_the_smallest_accepted_heartbeat_interval_still_makes_a_valid_welcome() -> None:
    pair = Pair(Config(heartbeat_interval=0.001, dead_peer_timeout=10.0))
    pair.connect()
    assert pair.agent.state is AgentState.READY


def test_unknown_frame_type_before_hello_closes_1002() -> None:
    """Spec 3: hello must be first; an unknown type there is not tolerated as it is later."""
    from svantic_proto import ConnectionClosed, MeshConnection
    from svantic_proto.framing import Framing
    from svantic_proto.testing import FakeClock

    clock = FakeClock()
    mesh = MeshConnection(dispatch_auth=None, now=clock.now, wall_clock=clock.wall)
    mesh.receive_data(
        b"GET /agents/connect?instance_id=a HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: svantic.v1\r\n"
        b"Authorization: Bearer t\r\n\r\n",
        clock.now,
    )
    mesh.events_received()
    mesh.accept(instance_id="a", tenant_id="t", now=clock.now)
    mesh.data_to_send()
    client = Framing(True)
    client.send_text(
        '{"v":1,"type":"subscribe","id":"01936f3e-5c4b-7a21-9f3e-2b1c0d4e5f60",'
        '"ts":"2026-11-21T10:00:00Z","payload":{}}'
    )
    mesh.receive_data(client.data_to_send(), clock.now)
    closed = [e for e in mesh.events_received() if isinstance(e, ConnectionClosed)]
    assert [e.code for e in closed] == [1002]
    assert mesh.data_to_send()[-1] == b""
