"""Harnesses for the connection tests, and tests of the public test kit itself.

The connection tests drive one real state machine against a hand-driven peer that
speaks exact bytes through its own `Framing`, so what each side puts *on the wire*
can be read back frame by frame (`Wire`). End-to-end flows use `testing.Pair`.

`MeshHarness`: a real `MeshConnection`, and a raw agent (client framing, masked).
`AgentHarness`: a real `AgentConnection`, and a raw mesh (`ServerHandshake` + server
framing). Both run on a `FakeClock`; time only moves when a test moves it.
"""

from __future__ import annotations

import json
import random
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest

from svantic_proto.agent import AgentConnection, AgentSession
from svantic_proto.auth import DispatchAuthMinter, DispatchAuthVerifier
from svantic_proto.codec import FrameFactory, decode_frame, encode_frame
from svantic_proto.config import Config
from svantic_proto.events import (
    ConnectionClosed,
    DispatchCompleted,
    Event,
    SessionStarted,
    UpgradeRequest,
)
from svantic_proto.frames import (
    Dispatch,
    DispatchPayload,
    Error,
    Frame,
    Hello,
    HelloPayload,
    Ping,
    PingPayload,
    SvanticJwtAuth,
    Welcome,
    WelcomePayload,
)
from svantic_proto.framing import (
    CloseReceived,
    Framing,
    FramingFailed,
    PingReceived,
    PongReceived,
    TextReceived,
)
from svantic_proto.handshake import ServerHandshake, build_upgrade_request
from svantic_proto.mesh import MeshConnection, MintDispatchAuth, jwt_dispatch_auth
from svantic_proto.resume import ResumeStore
from svantic_proto.testing import TEST_SIGNING_SECRET, FakeClock, Pair

INSTANCE = "agent-1"
TENANT = "tenant-1"
URL = "wss://mesh.test/agents/connect"
CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_MASK = b"\x11\x22\x33\x44"
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")

E = TypeVar("E", bound=Event)


def ws_frame(opcode: int, payload: bytes = b"", *, masked: bool, fin: bool = True) -> bytes:
    """One raw WebSocket frame; a client's frames are masked, a server's are not."""
    first = (0x80 if fin else 0) | opcode
    length = len(payload)
    mask_bit = 0x80 if masked else 0
    if length <= 125:
        header = bytes([first, mask_bit | length])
    elif length <= 0xFFFF:
        header = bytes([first, mask_bit | 126]) + struct.pack("!H", length)
    else:
        header = bytes([first, mask_bit | 127]) + struct.pack("!Q", length)
    if not masked:
        return header + payload
    return header + _MASK + bytes(b ^ _MASK[i % 4] for i, b in enumerate(payload))


def readable_id(text: str) -> str | None:
    """The frame id a receiver can read for `in_reply_to` (spec 2), computed independently."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    frame_id = value.get("id") if isinstance(value, dict) else None
    return frame_id if isinstance(frame_id, str) and _UUID.match(frame_id) else None


@dataclass
class Wire:
    """What one side wrote, parsed back: frames, WebSocket pings, its close, the TCP end."""

    frames: list[Frame] = field(default_factory=list)
    pings: list[bytes] = field(default_factory=list)
    pongs: list[bytes] = field(default_factory=list)
    close_code: int | None = None
    close_seen: bool = False
    transport_closed: bool = False
    raw: list[bytes] = field(default_factory=list)

    def of(self, kind: type[Any]) -> list[Any]:
        return [f for f in self.frames if isinstance(f, kind)]

    @property
    def types(self) -> list[str]:
        return [f.type for f in self.frames]

    @property
    def empty(self) -> bool:
        return not (self.raw or self.transport_closed)


class Tap:
    """Reads one side's output as its peer would, from a frame boundary on."""

    def __init__(self, reading_as_client: bool) -> None:
        self._framing = Framing(reading_as_client, max_message_bytes=1 << 24)

    def read(self, chunks: list[bytes]) -> Wire:
        wire = Wire(raw=[c for c in chunks if c])
        for chunk in chunks:
            if chunk == b"":
                wire.transport_closed = True
                continue
            for event in self._framing.receive_data(chunk):
                if isinstance(event, TextReceived):
                    wire.frames.append(decode_frame(event.text))
                elif isinstance(event, CloseReceived):
                    wire.close_seen, wire.close_code = True, event.code
                elif isinstance(event, PingReceived):
                    wire.pings.append(event.payload)
                elif isinstance(event, PongReceived):
                    wire.pongs.append(event.payload)
                elif isinstance(event, FramingFailed):  # our own output must always parse
                    raise AssertionError(f"invalid WebSocket output: {event}")
        return wire


class _Harness:
    clock: FakeClock
    factory: FrameFactory
    _events: list[Event]
    _peer: Framing
    last_sent: Frame

    def _conn(self) -> Any:
        raise NotImplementedError

    def events(self) -> list[Event]:
        """Every event the connection reported so far."""
        self._events.extend(self._conn().events_received())
        return self._events

    def events_of(self, kind: type[E]) -> list[E]:
        return [e for e in self.events() if isinstance(e, kind)]

    def closed_event(self) -> ConnectionClosed:
        (closed,) = self.events_of(ConnectionClosed)
        return closed

    def send_raw(self, data: bytes) -> None:
        self._conn().receive_data(data, self.clock.now)

    def send_text(self, text: str) -> None:
        self._peer.send_text(text)
        self.send_raw(self._peer.data_to_send())

    def send(self, frame: Frame) -> None:
        self.last_sent = frame
        self.send_text(encode_frame(frame).decode())

    def ping(self) -> str:
        frame = self.factory.new(Ping, PingPayload())
        self.send(frame)
        return frame.id

    def at(self, when: float) -> None:
        """Move the clock to `when` and run the connection's timers due by then."""
        self.clock.now = when
        self._conn().handle_timer(when)

    def next_deadline(self) -> float | None:
        deadline: float | None = self._conn().next_deadline()
        return deadline

    def run_until(self, when: float) -> list[tuple[float, Wire]]:
        """Fire every timer due by `when` at its exact deadline; what was written, and when."""
        fired: list[tuple[float, Wire]] = []
        while (deadline := self.next_deadline()) is not None and deadline <= when:
            self.at(deadline)
            fired.append((deadline, self.read()))  # type: ignore[attr-defined]
        self.clock.now = when
        return fired


class MeshHarness(_Harness):
    """A real `MeshConnection`; the test plays the agent with exact bytes."""

    def __init__(
        self,
        config: Config | None = None,
        *,
        mint: MintDispatchAuth | bool | None = True,
        store: ResumeStore | None = None,
        verify_token: Callable[[str], Any] | None = None,
        clock: FakeClock | None = None,
        token_expires_at: float | None = None,
        subject: str | None = None,
        agent_type: str | None = "test-agent",
        accept: bool = True,
    ) -> None:
        self.clock = clock or FakeClock()
        self.config = config or Config()
        self.factory = FrameFactory(self.clock.wall, random.Random(7).randbytes)
        if mint is True:
            mint = jwt_dispatch_auth(DispatchAuthMinter(TEST_SIGNING_SECRET))
        self.mesh = MeshConnection(
            dispatch_auth=mint or None,
            now=self.clock.now,
            wall_clock=self.clock.wall,
            config=self.config,
            resume_store=store,
            verify_token=verify_token,
            random_bytes=random.Random(3).randbytes,
        )
        self._events = []
        self._peer = Framing(True)
        self._tap = Tap(reading_as_client=True)
        self.response = b""
        if accept:
            self.send_raw(build_upgrade_request(URL, token="t", instance_id=INSTANCE).request_bytes)
            (request,) = self.events_of(UpgradeRequest)
            assert request.request.instance_id == INSTANCE
            self.mesh.accept(
                instance_id=INSTANCE,
                tenant_id=TENANT,
                agent_type=agent_type,
                subject=subject,
                token_expires_at=token_expires_at,
                now=self.clock.now,
            )
            self.response = self.mesh.data_to_send()[0]
            assert self.response.startswith(b"HTTP/1.1 101 ")

    def _conn(self) -> MeshConnection:
        return self.mesh

    def read(self) -> Wire:
        return self._tap.read(self.mesh.data_to_send())

    def hello(self, *, instance_id: str = INSTANCE, resume_token: str | None = None) -> Welcome:
        """Send hello; return the welcome the mesh answered."""
        hello = self.factory.new(
            Hello, HelloPayload(instance_id=instance_id, resume_token=resume_token)
        )
        self.hello_id = hello.id
        self.send(hello)
        wire = self.read()
        (welcome,) = wire.of(Welcome)
        return welcome  # type: ignore[no-any-return]


class AgentHarness(_Harness):
    """A real `AgentConnection`; the test plays the mesh with exact bytes."""

    def __init__(
        self,
        config: Config | None = None,
        *,
        session: AgentSession | None = None,
        verifier: DispatchAuthVerifier | None = None,
        clock: FakeClock | None = None,
        welcome: bool = True,
        heartbeat_interval_ms: int = 30_000,
    ) -> None:
        self.clock = clock or FakeClock()
        self.config = config or Config()
        self.factory = FrameFactory(self.clock.wall, random.Random(11).randbytes)
        self.minter = DispatchAuthMinter(TEST_SIGNING_SECRET)
        self.agent = AgentConnection(
            URL,
            token="transport-token",
            instance_id=INSTANCE,
            agent_type="test-agent",
            dispatch_auth=verifier
            or DispatchAuthVerifier(INSTANCE, hs256_keys=[TEST_SIGNING_SECRET]),
            session=session,
            config=self.config,
            now=self.clock.now,
            wall_clock=self.clock.wall,
            random_bytes=random.Random(5).randbytes,
        )
        self._events = []
        self._peer = Framing(False)
        self._tap = Tap(reading_as_client=False)
        self.server = ServerHandshake()
        (request_bytes,) = self.agent.data_to_send()
        self.request = self.server.receive_data(request_bytes)
        self.hello: Hello | None = None
        if welcome:
            self.upgrade()
            self.welcome(heartbeat_interval_ms=heartbeat_interval_ms)

    def _conn(self) -> AgentConnection:
        return self.agent

    def read(self) -> Wire:
        return self._tap.read(self.agent.data_to_send())

    def upgrade(self, extra: bytes = b"") -> Wire:
        """Answer 101 (plus `extra` bytes in the same read); return what the agent sent."""
        self.send_raw(self.server.accept() + extra)
        wire = self.read()
        self.hello = wire.of(Hello)[0]
        return wire

    def welcome(
        self,
        *,
        in_reply_to: str | bool | None = True,
        resumed: bool = False,
        replayed: tuple[str, ...] = (),
        resume_token: str = "rt-1",
        heartbeat_interval_ms: int = 30_000,
    ) -> Wire:
        """Send welcome; return what the agent wrote in reply (its first heartbeat...)."""
        assert self.hello is not None
        reply = self.hello.id if in_reply_to is True else in_reply_to or None
        self.send(
            self.factory.new(
                Welcome,
                WelcomePayload(
                    connection_id="conn-1",
                    resumed=resumed,
                    replayed_dispatches=list(replayed),
                    resume_token=resume_token,
                    heartbeat_interval_ms=heartbeat_interval_ms,
                ),
                in_reply_to=reply,
            )
        )
        return self.read()

    def dispatch_frame(
        self,
        capability: str = "echo",
        arguments: dict[str, Any] | None = None,
        *,
        deadline_ms: int = 5000,
        auth: Any = True,
        dispatch_id: str | None = None,
        attempt: int = 1,
        **fields: Any,
    ) -> Dispatch:
        """A dispatch with a valid envelope (`auth=True`), none, or the one given."""
        frame = self.factory.dispatch(
            capability=capability,
            deadline_ms=deadline_ms,
            arguments=arguments,
            dispatch_id=dispatch_id,
            attempt=attempt,
            **fields,
        )
        if auth is True:
            auth = SvanticJwtAuth(
                token=self.minter.mint_token(
                    instance_id=INSTANCE,
                    agent_type="test-agent",
                    tenant_id=TENANT,
                    dispatch_id=frame.id,
                    capability=capability,
                    now=self.clock.wall(),
                )
            )
        payload = frame.payload
        return Dispatch(
            v=1,
            id=frame.id,
            ts=frame.ts,
            payload=DispatchPayload(
                dispatch_id=payload.dispatch_id,
                capability=payload.capability,
                deadline_ms=payload.deadline_ms,
                arguments=payload.arguments,
                task_id=payload.task_id,
                attempt=payload.attempt,
                session_context=payload.session_context,
                dispatch_auth=auth or None,
            ),
        )


def errors_on(wire: Wire) -> list[Error]:
    return wire.of(Error)


# -- tests of the public test kit (svantic_proto.testing) ---------------------------------------


def test_fake_clock_moves_only_forward_and_wall_time_follows() -> None:
    clock = FakeClock(now=5.0, wall=1_000.0)
    clock.advance(2.5)
    assert (clock.now, clock.wall()) == (7.5, 1_002.5)
    with pytest.raises(ValueError):
        clock.advance(-0.1)


def test_pair_connects_and_completes_a_dispatch_as_documented() -> None:
    pair = Pair()
    pair.connect()
    dispatch_id = pair.mesh.send_dispatch("echo", {"x": 1}, deadline_ms=5000, now=pair.clock.now)
    pair.pump()
    pair.agent.send_result(dispatch_id, {"x": 1})
    pair.pump()
    assert pair.mesh_events_of(DispatchCompleted) == [DispatchCompleted(dispatch_id, {"x": 1})]
    assert len(pair.agent_events_of(SessionStarted)) == 1
    assert pair.session.connections == 1


def test_pair_pump_reports_traffic_that_does_not_settle() -> None:
    pair = Pair()
    with pytest.raises(RuntimeError, match="did not settle"):
        pair.pump(max_rounds=1)


def test_pair_accepts_a_given_clock_and_store() -> None:
    clock = FakeClock(now=50.0)
    store = ResumeStore(window=3.0)
    pair = Pair(clock=clock, store=store)
    pair.connect()
    assert pair.clock is clock and pair.store is store
    assert pair.session.resume_token is not None
