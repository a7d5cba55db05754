"""Message mode (`svantic_proto.messages`) behaves as byte mode: one suite, both modes.

Every scenario runs on two in-memory pairs with the same seed and clock:

* `BytePair`: the test kit's `Pair` (an `AgentConnection` and a `MeshConnection` that
  exchange bytes), reading what each side wrote back into frames and close codes;
* `MessagePair`: an `AgentMessages` and a `MeshMessages` between two emulated host stacks
  that carry whole messages and do the closing handshake as python-websockets does (the
  stack that receives a close reports it and answers it itself).

Each scenario asserts the spec's outcome in its mode, and `test_both_modes_agree` runs it
in both and compares everything the two sides reported and sent: the events (ids
included: the seeded ids are the same), the frames' exact text and the close codes.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

import msgspec
import pytest
from test_conn_kit import BINARY, TEXT, ws_frame
from test_handshake_flow import TABLE_ROWS, Callbacks, mesh_answer, raw_request

from svantic_proto.agent import AgentConnection
from svantic_proto.backoff import RetryDecision
from svantic_proto.codec import decode_frame
from svantic_proto.config import Config
from svantic_proto.errors import (
    DeploymentModeMismatch,
    HandshakeFailed,
    HandshakeRejected,
    InstanceNotFound,
    InvalidState,
    LocalProtocolError,
    MissingInstanceId,
    RemoteProtocolError,
    TenantMismatch,
    Unauthorized,
    UnsupportedSubprotocol,
    UpgradeRequired,
)
from svantic_proto.events import (
    ChunkReceived,
    CloseRequested,
    ConnectionClosed,
    DispatchCompleted,
    DispatchReceived,
    ErrorReceived,
    Event,
    HeartbeatReceived,
    SessionStarted,
    UpgradeRequest,
)
from svantic_proto.frames import Error, Heartbeat, Ping, Pong
from svantic_proto.framing import CloseReceived, Framing, TextReceived
from svantic_proto.handshake import Reject, check_upgrade
from svantic_proto.mesh import MeshConnection
from svantic_proto.messages import (
    AgentMessages,
    Close,
    MeshMessages,
    Message,
    UpgradeAccepted,
    UpgradeRefused,
    WebSocketPing,
)
from svantic_proto.states import AgentState, MeshState
from svantic_proto.testing import FakeClock, Pair

Side = Literal["agent", "mesh"]
WireItem = tuple[str, Any]  # ("text", the frame's text) or ("close", its code)
HOST_KEY = "x3JJHMbDL1EzLkh9GBhXDw=="  # the key an emulated client stack sends


def _peer(side: Side) -> Side:
    return "mesh" if side == "agent" else "agent"


# -- byte mode: the test kit's Pair, with what each side wrote read back -------------------------


class _WireReader:
    """One side's output as its peer reads it: the HTTP head skipped, then frames."""

    def __init__(self, reads_masked: bool) -> None:
        self._http = b""
        self._in_http = True
        self._framing = Framing(not reads_masked, max_message_bytes=1 << 24)

    def read(self, data: bytes) -> list[tuple[str, Any]]:
        if self._in_http:
            self._http += data
            if b"\r\n\r\n" not in self._http:
                return []
            self._in_http = False
            data = self._http.partition(b"\r\n\r\n")[2]
        found: list[tuple[str, Any]] = []
        for event in self._framing.receive_data(data) if data else []:
            if isinstance(event, TextReceived):
                found.append(("text", event.text))
            elif isinstance(event, CloseReceived):
                found.append(("close", event.code))
        return found


class BytePair(Pair):
    mode = "bytes"

    def __init__(self, config: Config | None = None, **kwargs: Any) -> None:
        self.wire: dict[Side, list[WireItem]] = {"agent": [], "mesh": []}
        super().__init__(config, **kwargs)

    def _new_link(self) -> Any:
        self._readers = {"agent": _WireReader(True), "mesh": _WireReader(False)}
        self._close_heard: set[Side] = set()  # who received its peer's close (or EOF)
        self._close_sent: set[Side] = set()
        self._upgraded = False
        return super()._new_link()

    def _deliver(self, sender: Any, receiver: Any, now: float) -> bool:
        side: Side = "agent" if sender is self.agent else "mesh"
        chunks = sender.data_to_send()
        for chunk in chunks:
            if not chunk:  # a drop: message mode gives Close(None) unless a close came first
                if self._upgraded and not {side} & (self._close_heard | self._close_sent):
                    self.wire[side].append(("close", None))
                self._close_sent.add(side)
                continue
            self._upgraded = self._upgraded or chunk.startswith(b"HTTP/1.1 101 ")
            for kind, value in self._readers[side].read(chunk):
                if kind == "close":
                    if side in self._close_heard:
                        continue  # the echo: in message mode the host's stack sends it
                    self._close_sent.add(side)
                    self._close_heard.add(_peer(side))
                self.wire[side].append((kind, value))
        if side in self._link.silent:
            return False
        for chunk in chunks:
            if chunk == b"":
                self._close_heard.add(_peer(side))
                receiver.receive_eof(now)
            else:
                receiver.receive_data(chunk, now)
        return bool(chunks)

    # what a peer's raw input looks like on the wire
    def inject(self, to: Side, kind: str, payload: Any) -> None:
        masked = to == "mesh"  # an agent's frames are masked
        if kind == "text":
            data = ws_frame(TEXT, payload.encode(), masked=masked)
        elif kind == "bad_utf8":
            data = ws_frame(TEXT, payload, masked=masked)
        else:
            data = ws_frame(BINARY, payload, masked=masked)
        (self.mesh if to == "mesh" else self.agent).receive_data(data, self.clock.now)
        self.pump()


# -- message mode: two emulated host stacks between AgentMessages and MeshMessages ---------------


@dataclass
class _MessageLink:
    agent: AgentMessages
    mesh: MeshMessages
    silent: set[str] = field(default_factory=set)
    answered: bool = False


class MessagePair(Pair):
    """`Pair`'s API over message mode; `upgrade_headers` are what the client stack sends."""

    mode = "messages"

    def __init__(
        self, config: Config | None = None, *, host_pings: bool = True, **kwargs: Any
    ) -> None:
        self.wire: dict[Side, list[WireItem]] = {"agent": [], "mesh": []}
        self.pings: list[tuple[float, bytes]] = []
        self.host_pings = host_pings
        super().__init__(config, **kwargs)

    def _new_link(self) -> Any:
        clock = self.clock
        agent = AgentMessages(
            "wss://mesh.test/agents/connect",
            token="transport-token",
            instance_id=self.instance_id,
            agent_type=self.agent_type,
            dispatch_auth=self.verifier,
            session=self.session,
            config=self.config,
            now=clock.now,
            wall_clock=clock.wall,
            random_bytes=self._random,
            host_pings=self.host_pings,
        )
        upgrade = agent.upgrade_request()
        url = urlsplit(upgrade.url)
        headers = [
            ("Host", url.netloc),
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", HOST_KEY),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Protocol", ", ".join(upgrade.subprotocols)),
            *upgrade.headers,
        ]
        mesh = MeshMessages(
            upgrade.path,
            headers=headers,
            dispatch_auth=self.mint,
            resume_store=self.store,
            verify_token=self.verify_token,
            config=self.config,
            now=clock.now,
            wall_clock=clock.wall,
            random_bytes=self._random,
            host_pings=self.host_pings,
        )
        return _MessageLink(agent, mesh)

    def pump(self, *, max_rounds: int = 1000) -> None:
        now = self.clock.now
        for _ in range(max_rounds):
            moved = self._deliver(self.agent, self.mesh, now) | self._deliver(
                self.mesh, self.agent, now
            )
            self._collect()
            link: Any = self._link
            if not moved and (link.answered or link.mesh.outcome is None):
                return
        raise RuntimeError("pump did not settle")

    def _deliver(self, sender: Any, receiver: Any, now: float) -> bool:
        side: Side = "agent" if sender is self.agent else "mesh"
        link: Any = self._link
        moved = False
        if side == "mesh" and not link.answered and sender.outcome is not None:
            link.answered = moved = True  # the client stack hears the upgrade's answer
            outcome = sender.outcome
            if isinstance(outcome, UpgradeAccepted):
                receiver.accepted(outcome.subprotocol, now=now)
            else:
                receiver.refused(outcome.status, outcome.body, now=now)
        items: list[Message] = sender.messages_to_send()
        for item in items:
            if isinstance(item, str):
                self.wire[side].append(("text", item))
            elif isinstance(item, Close):
                self.wire[side].append(("close", item.code))
            else:
                self.pings.append((now, item.payload))
        if side in link.silent:
            return moved
        for item in items:
            if isinstance(item, str):
                receiver.receive_message(item, now)
            elif isinstance(item, WebSocketPing):  # the peer's stack answers it and says so
                receiver.receive_ping(item.payload, now=now)
                sender.receive_pong(item.payload, now=now)
            elif item.code is None:
                receiver.receive_eof(now)  # the sender's host aborted the transport
            else:
                receiver.receive_close(item.code, item.reason, now=now)  # its stack echoes:
                sender.receive_close(item.code, "", now=now)
        return moved or bool(items)

    def cut(self) -> None:
        now = self.clock.now
        self.agent.messages_to_send()  # type: ignore[attr-defined]
        self.mesh.messages_to_send()  # type: ignore[attr-defined]
        self.agent.receive_eof(now)
        self.mesh.receive_eof(now)
        self._collect()
        self.agent.messages_to_send()  # type: ignore[attr-defined]
        self.mesh.messages_to_send()  # type: ignore[attr-defined]

    def inject(self, to: Side, kind: str, payload: Any) -> None:
        receiver: Any = self.mesh if to == "mesh" else self.agent
        if kind == "text":
            receiver.receive_message(payload, self.clock.now)
        elif kind == "bad_utf8":  # as a host that decodes with surrogateescape hands it over
            receiver.receive_message(payload.decode("utf-8", "surrogateescape"), self.clock.now)
        else:
            receiver.receive_message(payload, self.clock.now)
        self.pump()


MODES = ["bytes", "messages"]
AnyPair = BytePair | MessagePair


def make_pair(mode: str, **kwargs: Any) -> AnyPair:
    return BytePair(**kwargs) if mode == "bytes" else MessagePair(**kwargs)


# -- the transcript both modes must share ---------------------------------------------------------


def normal(event: Event) -> tuple[str, Any]:
    if isinstance(event, UpgradeRequest):
        request = event.request
        headers = [h for h in request.headers if h[0] != "sec-websocket-key"]
        return "UpgradeRequest", (request.instance_id, request.subprotocols, request.path, headers)
    values = msgspec.structs.asdict(event)
    error = values.get("error")
    if isinstance(error, Exception):
        values["error"] = (type(error).__name__, str(error), getattr(error, "close_code", None))
    return type(event).__name__, values


def transcript(pair: AnyPair) -> dict[str, Any]:
    return {
        "agent_events": [normal(e) for e in pair.agent_events],
        "mesh_events": [normal(e) for e in pair.mesh_events],
        "agent_wire": pair.wire["agent"],
        "mesh_wire": pair.wire["mesh"],
        "agent_state": pair.agent.state,
        "mesh_state": pair.mesh.state,
    }


def sent(pair: AnyPair, side: Side) -> list[Any]:
    """The frames (decoded) and close codes `side` sent, in order."""
    return [decode_frame(v) if k == "text" else ("close", v) for k, v in pair.wire[side]]


def types_sent(pair: AnyPair, side: Side) -> list[str]:
    return [f.type if not isinstance(f, tuple) else f"close {f[1]}" for f in sent(pair, side)]


def closed(events: list[Event]) -> ConnectionClosed:
    (event,) = [e for e in events if isinstance(e, ConnectionClosed)]
    return event


# -- scenarios: each runs in both modes -----------------------------------------------------------

Scenario = Callable[[str], AnyPair]
SCENARIOS: dict[str, Scenario] = {}


def scenario(function: Scenario) -> Scenario:
    SCENARIOS[function.__name__] = function
    return function


@scenario
def handshake_hello_welcome(mode: str) -> AnyPair:
    pair = make_pair(mode)
    pair.connect()
    (request,) = pair.mesh_events_of(UpgradeRequest)
    assert request.request.instance_id == "agent-1"
    assert request.request.subprotocols == ("svantic.v1",)
    assert request.request.bearer_token == "transport-token"
    (mesh_started,) = pair.mesh_events_of(SessionStarted)
    (agent_started,) = pair.agent_events_of(SessionStarted)
    assert mesh_started.connection_id == agent_started.connection_id
    assert not agent_started.resumed
    assert types_sent(pair, "agent") == ["hello", "heartbeat"]
    assert types_sent(pair, "mesh") == ["welcome"]
    assert sent(pair, "mesh")[0].in_reply_to == sent(pair, "agent")[0].id
    assert (pair.agent.state, pair.mesh.state) == (AgentState.READY, MeshState.READY)
    return pair


REFUSALS = [
    (400, "MISSING_INSTANCE_ID", MissingInstanceId, RetryDecision.FINAL),
    (400, "UNSUPPORTED_SUBPROTOCOL", UnsupportedSubprotocol, RetryDecision.FINAL),
    (401, "UNAUTHORIZED", Unauthorized, RetryDecision.REFRESH_TOKEN_THEN_RETRY),
    (403, "TENANT_MISMATCH", TenantMismatch, RetryDecision.FINAL),
    (404, "INSTANCE_NOT_FOUND", InstanceNotFound, RetryDecision.FINAL),
    (409, "DEPLOYMENT_MODE_MISMATCH", DeploymentModeMismatch, RetryDecision.FINAL),
    (426, "UPGRADE_REQUIRED", UpgradeRequired, RetryDecision.FINAL),
    (503, "AT_CAPACITY", HandshakeRejected, RetryDecision.RETRY),
]


def _refusal(row: tuple[int, str, type[HandshakeRejected], RetryDecision]) -> Scenario:
    status, code, error_class, retry = row

    def refused(mode: str) -> AnyPair:
        pair = make_pair(mode, auto_accept=False)
        pair.pump()
        assert len(pair.mesh_events_of(UpgradeRequest)) == 1
        pair.mesh.reject(Reject(status, code, f"refused: {code}"), now=pair.clock.now)
        pair.pump()
        event = closed(pair.agent_events)
        assert type(event.error) is error_class
        assert (event.error.status, event.error.code) == (status, code)
        assert event.error.message == f"refused: {code}"
        assert event.retry is retry and event.code is None
        assert closed(pair.mesh_events).error.code == code  # type: ignore[union-attr]
        assert (pair.agent.state, pair.mesh.state) == (AgentState.CLOSED, MeshState.CLOSED)
        assert pair.wire == {"agent": [], "mesh": []}
        return pair

    refused.__name__ = f"refused_{status}_{code}"
    return refused


for _row in REFUSALS:
    scenario(_refusal(_row))


@scenario
def dispatch_chunks_result(mode: str) -> AnyPair:
    pair = make_pair(mode)
    pair.connect()
    dispatch_id = pair.mesh.send_dispatch("echo", {"x": 1}, deadline_ms=5000, now=pair.clock.now)
    pair.pump()
    (received,) = pair.agent_events_of(DispatchReceived)
    assert (received.dispatch_id, received.capability, dict(received.arguments)) == (
        dispatch_id, "echo", {"x": 1})
    assert pair.agent.send_chunk(dispatch_id, "a") == 0
    assert pair.agent.send_chunk(dispatch_id, {"b": 2}) == 1
    pair.agent.send_result(dispatch_id, {"x": 1})
    pair.pump()
    chunks = pair.mesh_events_of(ChunkReceived)
    assert [(c.seq, c.data) for c in chunks] == [(0, "a"), (1, {"b": 2})]
    (completed,) = pair.mesh_events_of(DispatchCompleted)
    assert (completed.dispatch_id, completed.result) == (dispatch_id, {"x": 1})
    assert types_sent(pair, "agent")[-3:] == ["dispatch_chunk", "dispatch_chunk", "dispatch_result"]
    return pair


def _bad_input(to: Side, kind: str, payload: Any, code: int, error_frame: bool) -> Scenario:
    def bad(mode: str) -> AnyPair:
        pair = make_pair(mode, config=Config(max_message_bytes=4096))
        pair.connect()
        pair.inject(to, kind, payload)
        receiver, sender = (to, _peer(to))
        events = pair.mesh_events if receiver == "mesh" else pair.agent_events
        event = closed(events)
        assert (event.code, event.by_peer) == (code, False)
        assert isinstance(event.error, RemoteProtocolError)
        assert event.error.close_code == code
        errors = [f for f in sent(pair, receiver) if isinstance(f, Error)]
        if error_frame:
            assert [e.payload.code for e in errors] == ["BAD_FRAME"]
        else:
            assert errors == []
        assert sent(pair, receiver)[-1] == ("close", code)
        peer_closed = closed(pair.agent_events if sender == "agent" else pair.mesh_events)
        assert (peer_closed.code, peer_closed.by_peer) == (code, True)
        return pair

    bad.__name__ = f"{kind}_to_{to}_closes_{code}"
    return bad


BAD_INPUTS = [
    ("mesh", "text", "not json", 1002, True),
    ("agent", "text", '{"v": 1, "type": "dispatch"}', 1002, True),
    ("mesh", "bad_utf8", b'{"v": 1, "x": "\xff"}', 1007, False),
    ("agent", "bad_utf8", b"\xc3\x28", 1007, False),
    ("mesh", "binary", b"\x00\x01", 1003, False),
    ("agent", "binary", b"binary", 1003, False),
    ("mesh", "text", "x" * 4097, 1009, False),
    ("agent", "text", "y" * 5000, 1009, False),
]
for _bad in BAD_INPUTS:
    scenario(_bad_input(*_bad))  # type: ignore[arg-type]


@scenario
def unknown_type_keeps_the_socket(mode: str) -> AnyPair:
    pair = make_pair(mode)
    pair.connect()
    frame_id = "01936f3e-5c4b-7a21-9f3e-2b1c0d4e5f60"
    pair.inject("mesh", "text", f'{{"v":1,"type":"future_thing","id":"{frame_id}",'
                '"ts":"2026-01-01T00:00:00Z","payload":{}}')
    (error,) = [f for f in sent(pair, "mesh") if isinstance(f, Error)]
    assert (error.payload.code, error.in_reply_to) == ("BAD_FRAME", frame_id)
    assert pair.mesh.state is MeshState.READY
    (reported,) = pair.agent_events_of(ErrorReceived)
    assert reported.code == "BAD_FRAME"
    return pair


@scenario
def app_ping_pong(mode: str) -> AnyPair:
    pair = make_pair(mode)
    pair.connect()
    mesh_ping = pair.mesh.send_ping()
    agent_ping = pair.agent.send_ping()
    pair.pump()
    pongs = {side: [f for f in sent(pair, side) if isinstance(f, Pong)]
             for side in ("agent", "mesh")}
    assert [p.in_reply_to for p in pongs["agent"]] == [mesh_ping]
    assert [p.in_reply_to for p in pongs["mesh"]] == [agent_ping]
    return pair


@scenario
def heartbeats_and_pings_on_the_clock(mode: str) -> AnyPair:
    config = Config(heartbeat_interval=10.0, app_ping_interval=20.0, app_ping_offset=5.0,
                    ws_ping_interval=7.0)
    pair = make_pair(mode, config=config)
    pair.connect()
    pair.advance(45)
    heartbeats = pair.mesh_events_of(HeartbeatReceived)
    assert len(heartbeats) == 5  # at welcome, then every 10 s
    assert len([f for f in sent(pair, "mesh") if isinstance(f, Ping)]) == 3  # 5, 25, 45
    assert len([f for f in sent(pair, "agent") if isinstance(f, Pong)]) == 3
    assert len([f for f in sent(pair, "agent") if isinstance(f, Heartbeat)]) == 5
    assert not pair.mesh.closed and not pair.agent.closed
    return pair


@scenario
def dead_agent_closed_1001(mode: str) -> AnyPair:
    config = Config(dead_peer_timeout=20.0, heartbeat_interval=30.0, app_ping_offset=40.0)
    pair = make_pair(mode, config=config)
    pair.connect()
    start = pair.clock.now
    pair.go_silent("agent")
    pair.advance(19.9)
    assert not pair.mesh.closed
    pair.advance(0.1)
    event = closed(pair.mesh_events)
    assert (event.code, event.by_peer) == (1001, False)
    assert pair.clock.now == start + 20
    assert sent(pair, "mesh")[-1] == ("close", 1001)
    return pair


@scenario
def dead_mesh_dropped_by_the_agent(mode: str) -> AnyPair:
    config = Config(dead_peer_timeout=20.0, app_ping_offset=40.0, ws_ping_interval=40.0)
    pair = make_pair(mode, config=config)
    pair.connect()
    pair.go_silent("mesh")
    pair.advance(20)
    event = closed(pair.agent_events)
    assert (event.code, event.by_peer, event.retry) == (None, True, RetryDecision.RETRY)
    assert pair.agent.state is AgentState.CLOSED
    assert ("close", 1001) not in sent(pair, "agent")  # dropped without a close frame
    return pair


@scenario
def close_request_drains(mode: str) -> AnyPair:
    pair = make_pair(mode)
    pair.connect()
    dispatch_id = pair.mesh.send_dispatch("echo", {}, deadline_ms=60_000, now=pair.clock.now)
    pair.pump()
    pair.mesh.close_request(10, "deploy", now=pair.clock.now)
    pair.pump()
    (requested,) = pair.agent_events_of(CloseRequested)
    assert (requested.grace_seconds, requested.reason) == (10, "deploy")
    assert pair.mesh.state is MeshState.DRAINING
    pair.advance(2)
    pair.agent.send_result(dispatch_id, "done")
    pair.pump()
    assert pair.mesh_events_of(DispatchCompleted)[0].result == "done"
    mesh_closed, agent_closed = closed(pair.mesh_events), closed(pair.agent_events)
    assert (mesh_closed.code, mesh_closed.by_peer) == (1000, False)
    assert (agent_closed.code, agent_closed.by_peer, agent_closed.retry) == (
        1000, True, RetryDecision.RETRY)
    assert sent(pair, "mesh")[-1] == ("close", 1000)
    assert (pair.agent.state, pair.mesh.state) == (AgentState.CLOSED, MeshState.CLOSED)
    return pair


@scenario
def agent_close_request_when_idle(mode: str) -> AnyPair:
    pair = make_pair(mode)
    pair.connect()
    pair.agent.close_request(now=pair.clock.now)
    pair.pump()
    assert pair.mesh_events_of(CloseRequested)
    agent_closed = closed(pair.agent_events)
    assert (agent_closed.code, agent_closed.by_peer, agent_closed.retry) == (
        1000, False, RetryDecision.FINAL)
    assert closed(pair.mesh_events).code == 1000
    return pair


@scenario
def resume_after_reconnect(mode: str) -> AnyPair:
    pair = make_pair(mode)
    pair.connect()
    dispatch_id = pair.mesh.send_dispatch("echo", {"n": 1}, deadline_ms=30_000, now=pair.clock.now)
    pair.pump()
    pair.cut()
    assert closed(pair.mesh_events).in_flight == (dispatch_id,)
    pair.advance(1)
    pair.reconnect()
    started = pair.mesh_events_of(SessionStarted)
    assert started[-1].resumed and started[-1].replayed_dispatches == (dispatch_id,)
    assert pair.agent_events_of(SessionStarted)[-1].resumed
    pair.agent.send_result(dispatch_id, {"n": 1})
    pair.pump()
    (completed,) = pair.mesh_events_of(DispatchCompleted)
    assert completed.dispatch_id == dispatch_id
    assert len(pair.agent_events_of(DispatchReceived)) == 1  # the handler ran once
    return pair


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario(name: str, mode: str) -> None:
    SCENARIOS[name](mode)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_both_modes_agree(name: str) -> None:
    in_bytes, in_messages = (transcript(SCENARIOS[name](mode)) for mode in MODES)
    assert in_messages == in_bytes


# -- the mesh's upgrade from a host's facts ------------------------------------------------------


def host_facts(request: bytes) -> tuple[str, list[tuple[bytes, bytes]]]:
    """What a host stack parsed from `request`: its target and its raw headers."""
    head = request.partition(b"\r\n\r\n")[0].split(b"\r\n")
    target = head[0].split(b" ")[1].decode()
    headers = [(n.strip(), v.strip()) for n, _, v in (line.partition(b":") for line in head[1:])]
    return target, headers


def message_answer(
    request: bytes,
) -> tuple[MeshMessages, UpgradeAccepted | UpgradeRefused, list[Event]]:
    """Build a MeshMessages from `request`'s facts, decide with check_upgrade: the answer."""
    clock = FakeClock()
    target, headers = host_facts(request)
    mesh = MeshMessages(target, headers=headers, dispatch_auth=None, now=clock.now,
                        wall_clock=clock.wall)
    callbacks = Callbacks()
    events = mesh.events_received()
    for event in events:
        if isinstance(event, UpgradeRequest):
            decision = check_upgrade(event.request, verify_token=callbacks.verify_token,
                                     lookup_instance=callbacks.lookup_instance)
            if isinstance(decision, Reject):
                mesh.reject(decision, now=clock.now)
            else:
                mesh.accept(decision, now=clock.now)
    outcome = mesh.outcome
    assert outcome is not None
    return mesh, outcome, events + mesh.events_received()


SCREENED = [
    ("not an upgrade", raw_request(upgrade=False), 426, "UPGRADE_REQUIRED"),
    ("another path", raw_request().replace(b"/agents/connect", b"/elsewhere"), 404, "NOT_FOUND"),
    ("a body", raw_request().replace(b"\r\n\r\n", b"\r\nContent-Length: 3\r\n\r\n"), 400,
     "BAD_HANDSHAKE"),
]


@pytest.mark.parametrize(("request_bytes", "status", "code"),
                         [r[1:] for r in TABLE_ROWS + SCREENED],
                         ids=[r[0] for r in TABLE_ROWS + SCREENED])
def test_the_mesh_refuses_as_byte_mode_with_status_headers_and_body(
        request_bytes: bytes, status: int, code: str) -> None:
    expected = mesh_answer(request_bytes)
    mesh, outcome, events = message_answer(request_bytes)
    assert isinstance(outcome, UpgradeRefused)
    assert (outcome.status, outcome.code) == (status, code) == (expected.status, code)
    assert msgspec.json.decode(outcome.body) == expected.body
    assert outcome.message == expected.body["error"]["message"]
    headers = {k.lower(): v for k, v in outcome.headers}
    assert headers["content-type"] == "application/json"
    assert {k: v for k, v in expected.headers.items()
            if k not in ("content-length", "connection")} == headers
    assert mesh.state is MeshState.CLOSED and mesh.messages_to_send() == []
    assert closed(events).error.code == code  # type: ignore[union-attr]
    assert [type(e) for e in events] == [type(e) for e in expected.events]


def test_the_mesh_accepts_and_echoes_the_subprotocol() -> None:
    mesh, outcome, _ = message_answer(raw_request(protocols="chat, svantic.v1"))
    assert outcome == UpgradeAccepted("svantic.v1")
    assert mesh.state is MeshState.AWAITING_HELLO
    assert mesh.connection.instance_id == "inst-a" and mesh.connection.tenant_id == "tenant-a"


def test_the_mesh_takes_the_query_and_subprotocols_apart_as_asgi_gives_them() -> None:
    clock = FakeClock()
    mesh = MeshMessages(
        "/agents/connect", b"instance_id=inst%2Da",
        [(b"host", b"mesh.test"), (b"upgrade", b"websocket"), (b"connection", b"Upgrade"),
         (b"sec-websocket-version", b"13"), (b"authorization", b"Bearer good"),
         (b"cookie", b"session=secret")],
        ["svantic.v1"], dispatch_auth=None, now=clock.now, wall_clock=clock.wall)
    (event,) = mesh.events_received()
    assert isinstance(event, UpgradeRequest)
    request = event.request
    assert (request.instance_id, request.subprotocols, request.bearer_token) == (
        "inst-a", ("svantic.v1",), "good")
    assert all(name != "cookie" for name, _ in request.headers)  # never read (spec 1)


def test_a_header_that_could_forge_lines_is_dropped() -> None:
    clock = FakeClock()
    target, headers = host_facts(raw_request())
    headers.append((b"x-evil", b"a\r\nAuthorization: Bearer forged"))
    mesh = MeshMessages(target, headers=headers, dispatch_auth=None, now=clock.now,
                        wall_clock=clock.wall)
    (event,) = mesh.events_received()
    assert isinstance(event, UpgradeRequest) and event.request.bearer_token == "good"


# -- the agent's upgrade from a host's client ----------------------------------------------------


def agent(**kwargs: Any) -> AgentMessages:
    clock = FakeClock()
    pair = Pair()
    return AgentMessages("wss://mesh.test:8443/base?x=1", token="tok", instance_id="a 1",
                         dispatch_auth=pair.verifier, now=clock.now, wall_clock=clock.wall,
                         **kwargs)


def test_upgrade_request_is_the_byte_mode_request_s_facts() -> None:
    upgrade = agent().upgrade_request()
    assert upgrade.url == "wss://mesh.test:8443/base?x=1&instance_id=a%201"
    assert upgrade.path == "/base?x=1&instance_id=a%201"
    assert upgrade.subprotocols == ("svantic.v1",)
    assert upgrade.headers == (("Authorization", "Bearer tok"),)
    assert "tok" not in repr(upgrade)


def test_a_101_without_svantic_v1_fails_the_handshake_and_drops_the_websocket() -> None:
    messages = agent()
    messages.accepted(None, now=0.0)
    event = closed(messages.events_received())
    assert isinstance(event.error, HandshakeFailed)
    assert messages.messages_to_send() == [Close(None)]
    assert messages.messages_to_send() == []


def test_an_answer_without_a_json_body_is_still_typed_by_status() -> None:
    messages = agent()
    messages.refused(502, b"<html>bad gateway</html>", now=0.0, content_type="text/html")
    event = closed(messages.events_received())
    assert type(event.error) is HandshakeRejected
    assert (event.error.status, event.error.code, event.retry) == (
        502, "HTTP_502", RetryDecision.RETRY)


def test_no_answer_at_all_is_a_failed_handshake() -> None:
    messages = agent()
    messages.receive_eof(1.0)
    event = closed(messages.events_received())
    assert isinstance(event.error, HandshakeFailed) and event.retry is RetryDecision.RETRY
    assert messages.messages_to_send() == []


def test_misuse_is_refused() -> None:
    messages = agent()
    with pytest.raises(InvalidState):
        messages.receive_message("{}", 0.0)
    with pytest.raises(LocalProtocolError):
        messages.refused(101, b"", now=0.0)
    messages.accepted("svantic.v1", now=0.0)
    with pytest.raises(InvalidState):
        messages.refused(404, b"", now=0.0)
    with pytest.raises(LocalProtocolError):
        messages.receive_message(12, 0.0)  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        messages.receive_close(70_000, now=0.0)


# -- WebSocket pings: the host's, or given to it -------------------------------------------------


def test_host_pings_drop_the_core_s_websocket_pings() -> None:
    pair = MessagePair(Config(ws_ping_interval=7.0))
    pair.connect()
    pair.advance(30)
    assert pair.pings == []


def test_without_host_pings_the_core_s_pings_come_out_at_byte_mode_times() -> None:
    config = Config(ws_ping_interval=7.0, dead_peer_timeout=10.0, heartbeat_interval=60.0,
                    app_ping_offset=60.0)
    pair = MessagePair(config, host_pings=False)
    pair.connect()
    start = pair.clock.now
    pair.advance(30)
    assert [round(when - start, 6) for when, _ in pair.pings] == [7.0, 14.0, 21.0, 28.0]
    assert {payload for _, payload in pair.pings} == {b"svantic"}
    assert not pair.mesh.closed  # the pongs reported with receive_pong kept the agent alive


def test_the_close_a_host_reports_without_a_code_is_1005_and_1006_is_an_eof() -> None:
    for code, expected in ((None, None), (1005, None), (1006, None), (4000, 4000)):
        pair = MessagePair()
        pair.connect()
        pair.mesh.receive_close(code, "bye", now=pair.clock.now)  # type: ignore[attr-defined]
        event = closed(pair.mesh.events_received())
        assert event.code == expected and event.by_peer
        assert pair.mesh.messages_to_send() == []  # type: ignore[attr-defined]


# -- the API mirrors the core's ------------------------------------------------------------------


def _shape(method: Any) -> list[tuple[str, Any, Any]]:
    parameters = list(inspect.signature(method).parameters.values())
    return [(p.name, p.kind if p.name != "self" else None, p.default) for p in parameters]


@pytest.mark.parametrize(("wrapper", "core"), [
    (MeshMessages, MeshConnection),
    (AgentMessages, AgentConnection),
])
def test_the_sending_api_has_the_core_s_signatures(wrapper: type, core: type) -> None:
    names = [n for n in vars(wrapper) if not n.startswith("_") and callable(vars(wrapper)[n])]
    names = [n for n in names if hasattr(core, n)]
    assert len(names) >= 6
    for name in names:  # names, kinds and defaults: a compiled core shows no annotations
        assert _shape(getattr(wrapper, name)) == _shape(getattr(core, name)), name
    init = inspect.signature(wrapper).parameters
    for name, parameter in inspect.signature(core).parameters.items():
        if name == "serve_http":  # in message mode the host's stack serves plain HTTP
            continue
        assert init[name].kind == parameter.kind and init[name].default == parameter.default


def test_a_str_subclass_from_a_host_is_text() -> None:
    class Text(str):
        pass

    pair = MessagePair()
    pair.connect()
    frame_id = "01936f3e-5c4b-7a21-9f3e-2b1c0d4e5f61"
    ping = Text(f'{{"v":1,"type":"ping","id":"{frame_id}","ts":"2026-01-01T00:00:00Z",'
                '"payload":{}}')
    pair.mesh.receive_message(ping, pair.clock.now)  # type: ignore[attr-defined]
    (pong,) = pair.mesh.messages_to_send()  # type: ignore[attr-defined]
    assert decode_frame(pong).in_reply_to == frame_id
