"""Property tests of the connection receive path (spec sections 2 and 4).

TCP delivers a byte stream, not messages: a read may end anywhere, inside the
upgrade response, a WebSocket header or a UTF-8 sequence. So the events a peer
reports must not depend on how its input was cut. We record every byte one side
received in a realistic session (and every call its application and timer loop
made), feed the same bytes to a fresh peer cut at arbitrary points, and require
exactly the events the original peer reported.

And whatever arrives after the upgrade, `receive_data()` never raises: the
connection stays open (answering `BAD_FRAME` where the spec says so) or ends
with one of the documented outcomes (close 1002 / 1003 / 1007 / 1009, or the
peer's own close).
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from operator import methodcaller
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from svantic_proto import events as ev
from svantic_proto.agent import AgentConnection, AgentSession
from svantic_proto.auth import DispatchAuthMinter, DispatchAuthVerifier
from svantic_proto.config import Config
from svantic_proto.connection import CLOSE_TRANSPORT
from svantic_proto.frames import FRAME_TYPES, SessionContext
from svantic_proto.mesh import MeshConnection, jwt_dispatch_auth
from svantic_proto.resume import ResumeStore
from svantic_proto.testing import TEST_SIGNING_SECRET, Pair

INSTANCE_ID = "agent-1"
TENANT_ID = "tenant-1"
AGENT_TYPE = "test-agent"
START = 1000.0
# Wall time stands still during a recording and its replays: ids minted by the receiver
# (the hello's id, which the recorded welcome answers) must not depend on when, in the
# chunking, the bytes that trigger them complete. Monotonic time still moves.
WALL = 1_795_000_000.0
AGENT_SEED = 11
MESH_SEED = 22
CONFIG = Config(
    heartbeat_interval=2.0,
    app_ping_interval=3.0,
    app_ping_offset=1.5,
    ws_ping_interval=3.0,
    dead_peer_timeout=20.0,
    close_grace=5.0,
    resume_window=5.0,
)
TRACEPARENT = "00-" + "4bf92f3577b34da6a3ce929d0e0e4736" + "-" + "00f067aa0ba902b7" + "-01"

Peer = AgentConnection | MeshConnection


# -- recording a session ------------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    """Bytes the original peer read at `now`."""

    data: bytes
    now: float


@dataclass(frozen=True)
class Eof:
    now: float


@dataclass(frozen=True)
class Call:
    """Something the application (or its timer loop) did to the peer between reads."""

    act: Callable[[Any], Any]


Step = Received | Eof | Call


def _wall() -> float:
    return WALL


def new_agent(now: float) -> AgentConnection:
    return AgentConnection(
        "wss://mesh.test/agents/connect",
        token="transport-token",
        instance_id=INSTANCE_ID,
        agent_type=AGENT_TYPE,
        capabilities=("echo", "fail", "slow"),
        dispatch_auth=DispatchAuthVerifier(INSTANCE_ID, hs256_keys=[TEST_SIGNING_SECRET]),
        session=AgentSession(CONFIG, rand=random.Random(0).random),
        config=CONFIG,
        now=now,
        wall_clock=_wall,
        random_bytes=random.Random(AGENT_SEED).randbytes,
    )


def new_mesh(now: float) -> MeshConnection:
    tokens = itertools.count()
    return MeshConnection(
        dispatch_auth=jwt_dispatch_auth(DispatchAuthMinter(TEST_SIGNING_SECRET)),
        resume_store=ResumeStore(
            window=CONFIG.resume_window, token_factory=lambda: f"resume-{next(tokens)}"
        ),
        config=CONFIG,
        now=now,
        wall_clock=_wall,
        random_bytes=random.Random(MESH_SEED).randbytes,
    )


class Recorder:
    """An agent and a mesh back to back, logging what each one receives and is told to do."""

    def __init__(self) -> None:
        self.now = START
        self.agent = new_agent(self.now)
        self.mesh = new_mesh(self.now)
        self.agent_steps: list[Step] = []
        self.mesh_steps: list[Step] = []
        self.agent_events: list[ev.Event] = []
        self.mesh_events: list[ev.Event] = []

    def on_agent(self, act: Callable[[Any], Any]) -> Any:
        self.agent_steps.append(Call(act))
        result = act(self.agent)
        self._collect()
        return result

    def on_mesh(self, act: Callable[[Any], Any]) -> Any:
        self.mesh_steps.append(Call(act))
        result = act(self.mesh)
        self._collect()
        return result

    def _collect(self) -> None:
        mesh_events = self.mesh.events_received()
        self.mesh_events += mesh_events
        self.agent_events += self.agent.events_received()
        for event in mesh_events:
            if isinstance(event, ev.UpgradeRequest):
                self.on_mesh(
                    methodcaller(
                        "accept", instance_id=INSTANCE_ID, tenant_id=TENANT_ID,
                        agent_type=AGENT_TYPE, now=self.now,
                    )
                )

    def pump(self) -> None:
        moved = True
        while moved:
            moved = False
            for sender, receiver, steps in (
                (self.agent, self.mesh, self.mesh_steps),
                (self.mesh, self.agent, self.agent_steps),
            ):
                for chunk in sender.data_to_send():
                    moved = True
                    if chunk == CLOSE_TRANSPORT:
                        steps.append(Eof(self.now))
                        receiver.receive_eof(self.now)
                    else:
                        steps.append(Received(chunk, self.now))
                        receiver.receive_data(chunk, self.now)
                self._collect()

    def advance(self, seconds: float) -> None:
        """Fire every timer at its exact deadline, as an adapter's timer loop would."""
        target = self.now + seconds
        while True:
            due = [
                d
                for d in (self.agent.next_deadline(), self.mesh.next_deadline())
                if d is not None and d <= target
            ]
            if not due:
                break
            self.now = now = max(self.now, min(due))
            self.on_agent(methodcaller("handle_timer", now))
            self.on_mesh(methodcaller("handle_timer", now))
            self.pump()
        self.now = target
        self.pump()


def record_session() -> Recorder:
    """Handshake, welcome, dispatches (acked, streamed, failed, timed out and cancelled), a
    tool call, an unknown extension, pings both ways, heartbeats, close_request, close."""
    s = Recorder()
    s.pump()
    context = SessionContext(
        session_id="s-1",
        tenant_id=TENANT_ID,
        propagation_headers={"traceparent": TRACEPARENT, "baggage": "k=v"},
    )
    # Calls are replayed later: what they use must not change after they are made.
    start = s.now
    echo = s.on_mesh(
        lambda mesh: mesh.send_dispatch(
            "echo", {"text": "h\u00e9llo \u2713"}, deadline_ms=10_000, now=start, task_id="t-1",
            session_context=context,
        )
    )
    fail = s.on_mesh(lambda mesh: mesh.send_dispatch("fail", deadline_ms=10_000, now=start))
    slow = s.on_mesh(
        lambda mesh: mesh.send_dispatch("slow", {"n": 1}, deadline_ms=3_000, now=start)
    )
    s.pump()
    s.on_agent(lambda agent: agent.send_ack(echo))
    s.on_agent(lambda agent: agent.send_chunk(echo, {"part": 0}))
    s.on_agent(lambda agent: agent.send_chunk(echo, "\u00e9" * 400))  # 16-bit length header
    s.pump()
    s.on_agent(lambda agent: agent.send_result(echo, {"echo": "h\u00e9llo \u2713"}))
    s.on_agent(lambda agent: agent.send_error(fail, "DISPATCH_FAILED", "handler raised"))
    call = s.on_agent(lambda agent: agent.send_tool_call("lookup", {"q": 1}, deadline_ms=900))
    s.pump()
    s.on_mesh(lambda mesh: mesh.send_tool_result(call, {"answer": 42}))
    s.on_agent(lambda agent: agent.refresh_token("fresh-token"))  # the mesh lacks the extension
    s.on_agent(lambda agent: agent.send_ping())
    s.on_mesh(lambda mesh: mesh.send_ping())
    s.pump()
    s.advance(4.0)  # heartbeats, both pings; `slow` times out: DispatchTimedOut + cancel
    s.on_agent(lambda agent: agent.send_error(slow, "CANCELLED", "cancelled"))  # late: ignored
    s.pump()
    s.on_mesh(methodcaller("close_request", grace_seconds=5, reason="deploy", now=s.now))
    s.pump()
    return s


SESSION = record_session()


def _received_bytes(steps: Sequence[Step]) -> int:
    return sum(len(step.data) for step in steps if isinstance(step, Received))


def replay(
    steps: Sequence[Step], new_peer: Callable[[float], Peer], cuts: Iterable[int]
) -> list[ev.Event]:
    """Feed the recorded input to a fresh peer, also cut at the given stream offsets.

    Bytes read at different times, or with an application call in between, stay in
    separate reads (the call must see what came before it); everything else may be
    merged or split anywhere.
    """
    peer = new_peer(START)
    events: list[ev.Event] = []
    cut_points = sorted(set(cuts))
    offset = 0
    run: list[bytes] = []
    run_start = 0
    run_now = START

    def flush() -> None:
        data = b"".join(run)
        run.clear()
        inner = [c - run_start for c in cut_points if run_start < c < run_start + len(data)]
        for begin, end in itertools.pairwise([0, *inner, len(data)]):
            peer.receive_data(data[begin:end], run_now)
            events.extend(peer.events_received())
        peer.data_to_send()

    for step in steps:
        if isinstance(step, Received):
            if run and step.now != run_now:
                flush()
            if not run:
                run_start, run_now = offset, step.now
            run.append(step.data)
            offset += len(step.data)
            continue
        if run:
            flush()
        if isinstance(step, Eof):
            peer.receive_eof(step.now)
        else:
            step.act(peer)
        peer.data_to_send()
        events.extend(peer.events_received())
    if run:
        flush()
    return events


def comparable(events: Iterable[ev.Event]) -> list[tuple[Any, ...]]:
    """Events as plain values (exceptions compare by identity, so by type and text here)."""
    out = []
    for event in events:
        values: list[Any] = [type(event).__name__]
        for field in msgspec.structs.fields(event):
            value = getattr(event, field.name)
            if isinstance(value, BaseException):
                value = (type(value).__name__, str(value), getattr(value, "close_code", None))
            values.append(value)
        out.append(tuple(values))
    return out


SIDES: dict[str, tuple[list[Step], Callable[[float], Peer], list[ev.Event]]] = {
    "agent receives the mesh's bytes": (SESSION.agent_steps, new_agent, SESSION.agent_events),
    "mesh receives the agent's bytes": (SESSION.mesh_steps, new_mesh, SESSION.mesh_events),
}


def _kinds(events: Iterable[ev.Event]) -> set[str]:
    return {type(e).__name__ for e in events}


def test_recorded_session_exercises_the_whole_protocol() -> None:
    """The recording is worth replaying: every kind of frame flowed and the session ended."""
    assert {
        "SessionStarted", "DispatchReceived", "DispatchCancelled", "ToolResultReceived",
        "ExtensionUnsupported", "CloseRequested", "ConnectionClosed",
    } <= _kinds(SESSION.agent_events)
    assert {
        "UpgradeRequest", "SessionStarted", "HeartbeatReceived", "DispatchAcked",
        "ChunkReceived", "DispatchCompleted", "DispatchFailed", "DispatchTimedOut",
        "ToolCallReceived", "ConnectionClosed",
    } <= _kinds(SESSION.mesh_events)
    closed = [e for e in SESSION.agent_events if isinstance(e, ev.ConnectionClosed)]
    assert [(c.code, c.by_peer) for c in closed] == [(1000, True)]


@pytest.mark.parametrize("side", list(SIDES))
@pytest.mark.parametrize("chunking", ["as recorded", "one byte at a time"])
def test_fixed_chunkings_give_the_original_events(side: str, chunking: str) -> None:
    steps, new_peer, original = SIDES[side]
    cuts = range(_received_bytes(steps) + 1) if chunking == "one byte at a time" else ()
    assert comparable(replay(steps, new_peer, cuts)) == comparable(original)


def _cut_points(total: int) -> st.SearchStrategy[list[int]]:
    anywhere = st.lists(st.integers(1, total - 1), max_size=60)
    every_n = st.integers(1, 97).map(lambda n: list(range(0, total, n)))
    return st.one_of(anywhere, every_n)


@pytest.mark.parametrize("side", list(SIDES))
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_chunking_gives_the_same_events(side: str, data: st.DataObject) -> None:
    steps, new_peer, original = SIDES[side]
    cuts = data.draw(_cut_points(_received_bytes(steps)), label="cuts")
    assert comparable(replay(steps, new_peer, cuts)) == comparable(original)


# -- arbitrary input after the upgrade ----------------------------------------------------------

UUID_TEXT = "01936f3e-5c4b-7a21-9f3e-2b1c0d4e5f60"
PAYLOAD_FIELDS = [
    "instance_id", "resume_token", "connection_id", "resumed", "replayed_dispatches",
    "heartbeat_interval_ms", "dispatch_id", "capability", "arguments", "deadline_ms",
    "attempt", "dispatch_auth", "seq", "data", "result", "code", "message", "detail",
    "grace_seconds", "reason", "token", "tool", "status", "active_sessions", "load", "error",
]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 70_000) | st.floats(allow_nan=False)
    | st.text(max_size=12) | st.just(UUID_TEXT),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                               max_size=3),
    max_leaves=8,
)
envelopes = st.fixed_dictionaries(
    {
        "v": st.sampled_from([1, 1, 1, True, "1", 2]),
        "type": st.sampled_from([*sorted(FRAME_TYPES), "x_unknown", ""]),
        "id": st.sampled_from([UUID_TEXT, "01936F3E-5C4B-7A21-9F3E-2B1C0D4E5F60", "nope"])
        | st.uuids().map(str),
        "ts": st.sampled_from(["2026-11-21T10:00:00.123Z", "2026-11-21 10:00", "yesterday"]),
        "payload": st.dictionaries(st.sampled_from(PAYLOAD_FIELDS), json_values, max_size=5)
        | json_values,
    },
    optional={"in_reply_to": st.none() | st.just(UUID_TEXT) | st.text(max_size=5)},
)
message_payloads = st.one_of(
    envelopes.map(lambda e: json.dumps(e).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.text(max_size=40).map(str.encode),
    st.binary(max_size=40),  # mostly invalid UTF-8 when sent as text
)
close_payloads = st.builds(
    lambda code, reason: code.to_bytes(2, "big") + reason.encode(),
    st.sampled_from([1000, 1001, 1002, 1005, 1011, 999, 3000, 4999, 5000]),
    st.text(max_size=10),
)


def ws_frame(
    opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, mask: bytes | None = None
) -> bytes:
    """One RFC 6455 frame, built by hand so that it may break any rule."""
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    mask_bit = 0x80 if mask is not None else 0
    size = len(payload)
    if size < 126:
        header = bytes([first, mask_bit | size])
    elif size < 1 << 16:
        header = bytes([first, mask_bit | 126]) + size.to_bytes(2, "big")
    else:
        header = bytes([first, mask_bit | 127]) + size.to_bytes(8, "big")
    if mask is None:
        return header + payload
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


@st.composite
def ws_frames(draw: st.DrawFn, *, from_client: bool) -> bytes:
    kind = draw(st.sampled_from(["message", "message", "message", "control", "close", "raw"]))
    if kind == "raw":
        return draw(st.binary(min_size=1, max_size=24))
    # The peer masks when it is the client (RFC 6455 5.1); now and then it gets that wrong.
    masked = draw(st.booleans()) if draw(st.integers(0, 9)) == 0 else from_client
    mask = draw(st.binary(min_size=4, max_size=4)) if masked else None
    if kind == "close":
        return ws_frame(0x8, draw(close_payloads | st.binary(max_size=3)), mask=mask)
    if kind == "control":
        opcode = draw(st.sampled_from([0x9, 0xA, 0xB, 0x3]))
        return ws_frame(opcode, draw(st.binary(max_size=130)), mask=mask)
    payload = draw(message_payloads)
    opcode = draw(st.sampled_from([0x1, 0x1, 0x1, 0x1, 0x2, 0x0]))
    fin = draw(st.integers(0, 5)) != 0
    rsv = 0 if draw(st.integers(0, 9)) else draw(st.integers(1, 7))
    return ws_frame(opcode, payload, fin=fin, rsv=rsv, mask=mask)


FAILURE_CODES = {1002, 1003, 1007, 1009}


def check_documented_outcome(
    events: list[ev.Event], output: list[bytes], *, closed: bool
) -> None:
    """Open, or ended once: by us with a documented code and its cause, or by the peer."""
    assert all(isinstance(e, ev.Event) for e in events)
    ends = [e for e in events if isinstance(e, ev.ConnectionClosed)]
    assert len(ends) <= 1
    if not ends:
        assert not closed
        assert CLOSE_TRANSPORT not in output
        return
    end = ends[0]
    assert events[-1] is end, "nothing is reported after ConnectionClosed"
    assert closed
    assert output and output[-1] == CLOSE_TRANSPORT
    assert output.count(CLOSE_TRANSPORT) == 1
    if end.by_peer:  # the peer's close frame (echoed), or the transport ended
        assert end.code is None or 1000 <= end.code <= 4999
    else:
        assert end.code in FAILURE_CODES
        assert end.error is not None and end.error.code == "BAD_FRAME"
        assert getattr(end.error, "close_code", end.code) == end.code


def _connected_pair() -> Pair:
    pair = Pair(CONFIG)
    pair.connect()
    pair.agent_events.clear()
    pair.mesh_events.clear()
    return pair


@pytest.mark.parametrize("receiver", ["agent", "mesh"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_arbitrary_input_after_the_upgrade_ends_in_a_documented_outcome(
    receiver: str, data: st.DataObject
) -> None:
    pair = _connected_pair()
    peer: Peer = pair.agent if receiver == "agent" else pair.mesh
    other: Peer = pair.mesh if receiver == "agent" else pair.agent
    stream = b"".join(
        data.draw(st.lists(ws_frames(from_client=receiver == "mesh"), min_size=1, max_size=8))
    )
    cuts = sorted(set(data.draw(st.lists(st.integers(1, max(1, len(stream) - 1)), max_size=6))))
    events: list[ev.Event] = []
    output: list[bytes] = []
    now = pair.clock.now
    for begin, end in itertools.pairwise([0, *cuts, len(stream)]):
        peer.receive_data(stream[begin:end], now)
        events += peer.events_received()
        output += peer.data_to_send()
    check_documented_outcome(events, output, closed=peer.closed)

    # What it answered is well-formed: the real counterpart never has to fail it.
    for chunk in output:
        if chunk == CLOSE_TRANSPORT:
            other.receive_eof(now)
        else:
            other.receive_data(chunk, now)
    for event in other.events_received():
        if isinstance(event, ev.ConnectionClosed):
            assert event.by_peer, event

    # After the end of the transport, it has ended exactly once and ignores more input.
    peer.receive_eof(now)
    events += peer.events_received()
    peer.receive_data(stream, now)
    assert peer.events_received() == []
    assert sum(isinstance(e, ev.ConnectionClosed) for e in events) == 1


@settings(max_examples=100, deadline=None)
@given(head=st.binary(max_size=200), tail=st.binary(max_size=40))
def test_arbitrary_bytes_as_the_upgrade_request_never_raise(head: bytes, tail: bytes) -> None:
    """Before the upgrade, garbage gets a plain HTTP refusal (or waits for more)."""
    mesh = new_mesh(START)
    mesh.receive_data(head, START)
    mesh.receive_data(tail, START)
    events = mesh.events_received()
    output = mesh.data_to_send()
    if mesh.closed:
        assert output[0].startswith(b"HTTP/1.1 4")
        assert output[-1] == CLOSE_TRANSPORT
        assert [type(e) for e in events] == [ev.ConnectionClosed]
    else:
        assert all(isinstance(e, ev.UpgradeRequest) for e in events)
