"""`MeshRuntime`: admission, handshake bounds, the instance table (newest wins), dispatch
waiters across a resume, the one timer and the shutdown steps, on a fake clock.

A small in-test driver plays the adapter: it moves bytes between real `AgentConnection`s
and the runtime's `MeshConnection`s, runs each link's pump, performs the runtime's actions
(servicing links, dropping them, answering `AdmissionNeeded` with counted lookups) and
fires every timer at its exact deadline.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from svantic_proto.agent import AgentConnection, AgentSession
from svantic_proto.auth import DispatchAuthMinter, DispatchAuthVerifier
from svantic_proto.config import Config
from svantic_proto.errors import DispatchError, HandshakeRejected
from svantic_proto.events import (
    CloseRequested,
    ConnectionClosed,
    DispatchReceived,
    Event,
    SessionStarted,
)
from svantic_proto.handshake import InstanceRecord
from svantic_proto.mesh import MeshConnection, jwt_dispatch_auth
from svantic_proto.mesh_runtime import (
    AdmissionNeeded,
    AgentArrived,
    DropLink,
    MeshPhase,
    MeshRuntime,
    ServiceLink,
    ShutdownComplete,
)
from svantic_proto.resume import ResumeStore
from svantic_proto.states import AgentState, MeshState
from svantic_proto.testing import TEST_SIGNING_SECRET, FakeClock

TENANT = "tenant-1"
CONFIG = Config(
    hello_timeout=5.0,
    close_grace=10.0,
    close_timeout=2.0,
    resume_window=8.0,
    heartbeat_interval=1000.0,
    dead_peer_timeout=1000.0,
    ws_ping_interval=1000.0,
    app_ping_interval=1000.0,
    app_ping_offset=500.0,
)
LOGGER = "svantic.mesh"


@dataclass(frozen=True)
class Claims:
    tenant_id: str
    sub: str


class RawClient:
    """A peer that writes fixed bytes (or nothing) and records what it gets back."""

    def __init__(self, request: bytes = b"") -> None:
        self._out = [request] if request else []
        self.received = b""
        self.eof = False
        self.state = None

    def data_to_send(self) -> list[bytes]:
        out, self._out = self._out, []
        return out

    def receive_data(self, data: bytes, now: float) -> None:
        self.received += data

    def receive_eof(self, now: float) -> None:
        self.eof = True

    def events_received(self) -> list[Event]:
        return []

    def next_deadline(self) -> float | None:
        return None

    def handle_timer(self, now: float) -> None:
        pass

    def status(self) -> tuple[int, str, str]:
        head, _, body = self.received.partition(b"\r\n\r\n")
        error = json.loads(body)["error"]
        return int(head.split()[1]), error["code"], error["message"]


def raw_request(*, target: str = "/agents/connect?instance_id=agent-1", upgrade: bool = True,
                protocol: str | None = "svantic.v1", auth: str | None = "Bearer good") -> bytes:
    lines = [f"GET {target} HTTP/1.1", "Host: mesh.test"]
    if upgrade:
        lines += ["Upgrade: websocket", "Connection: Upgrade",
                  "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13"]
    if protocol is not None:
        lines.append(f"Sec-WebSocket-Protocol: {protocol}")
    if auth is not None:
        lines.append(f"Authorization: {auth}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


class Link:
    """The driver's connection wrapper: what the runtime knows a transport by."""

    def __init__(self, name: str, agent: Any) -> None:
        self.name = name
        self.agent = agent
        self.conn: MeshConnection | None = None
        self.open = True
        self.paused = False  # the agent's bytes stay in its buffer (a stalled peer)
        self.agent_events: list[Event] = []
        self.mesh_events: list[Event] = []

    def __repr__(self) -> str:
        return f"Link({self.name})"

    def agent_events_of(self, kind: type[Any]) -> list[Any]:
        return [e for e in self.agent_events if isinstance(e, kind)]

    @property
    def closed_event(self) -> ConnectionClosed:
        (closed,) = [e for e in self.agent_events if isinstance(e, ConnectionClosed)]
        return closed


class FakeWaiter:
    def __init__(self) -> None:
        self.calls = 0
        self.value: Any = None
        self.error: BaseException | None = None

    def set_result(self, value: Any) -> None:
        self.calls += 1
        self.value = value

    def set_exception(self, exc: BaseException) -> None:
        self.calls += 1
        self.error = exc

    @property
    def done(self) -> bool:
        return self.calls > 0


class Driver:
    """What an adapter does around the runtime, in memory and on a fake clock."""

    def __init__(self, config: Config = CONFIG, *, max_connections: int = 100,
                 max_handshakes: int = 100, auto_admit: bool = True) -> None:
        self.config = config
        self.clock = FakeClock()
        self._random = random.Random(7).randbytes
        self.store = ResumeStore(window=config.resume_window,
                                 token_factory=lambda: self._random(12).hex())
        self.runtime: MeshRuntime[Link] = MeshRuntime(
            dispatch_auth=jwt_dispatch_auth(DispatchAuthMinter(TEST_SIGNING_SECRET)),
            wall_clock=self.clock.wall, config=config, resume_store=self.store,
            max_connections=max_connections, max_handshakes=max_handshakes,
            random_bytes=self._random,
        )
        self.auto_admit = auto_admit
        self.registry = {
            f"agent-{n}": InstanceRecord(f"agent-{n}", TENANT, "connected", "worker")
            for n in range(1, 6)
        }
        self.registry["hosted-1"] = InstanceRecord("hosted-1", TENANT, "hosted", "worker")
        self.registry["theirs-1"] = InstanceRecord("theirs-1", "tenant-2", "connected", "worker")
        self.tokens = {"good": Claims(TENANT, "client-1")}
        self.verify_calls: list[str] = []
        self.lookup_calls: list[str] = []
        self.verify_error: BaseException | None = None
        self.lookup_error: BaseException | None = None
        self.admissions: list[AdmissionNeeded[Link]] = []
        self.held: list[AdmissionNeeded[Link]] = []
        self.links: list[Link] = []
        self.arrived: list[str] = []
        self.drops: list[tuple[Link, str]] = []
        self.completed = 0
        self.sessions: dict[str, AgentSession] = {}
        self._names = itertools.count()

    @property
    def now(self) -> float:
        return self.clock.now

    # -- the application's lookups ---------------------------------------------------------------

    def verify(self, token: str) -> Claims:
        self.verify_calls.append(token)
        if self.verify_error is not None:
            raise self.verify_error
        claims = self.tokens.get(token)
        if claims is None:
            raise ValueError("bad signature")
        return claims

    def lookup(self, instance_id: str) -> InstanceRecord | None:
        self.lookup_calls.append(instance_id)
        if self.lookup_error is not None:
            raise self.lookup_error
        return self.registry.get(instance_id)

    def answer(self, need: AdmissionNeeded[Link]) -> None:
        """As a driver answers `AdmissionNeeded`: each lookup once, its exception passed on."""
        claims: Any = None
        record: InstanceRecord | BaseException | None = None
        if need.token is not None:
            try:
                claims = self.verify(need.token)
            except Exception as exc:
                claims = exc
        if need.instance_id is not None:
            try:
                record = self.lookup(need.instance_id)
            except Exception as exc:
                record = exc
        self.runtime.admit(need.link, claims=claims, record=record, now=self.now)

    # -- transports ------------------------------------------------------------------------------

    def dial(self, instance_id: str = "agent-1", *, token: str = "good", tls: bool = True,
             session: AgentSession | None = None, pump: bool = True) -> Link:
        """An agent connects: TCP accepted, TLS done (`tls`), then bytes flow."""
        if session is None:
            session = self.sessions.setdefault(
                instance_id, AgentSession(self.config, rand=random.Random(1).random))
        agent = AgentConnection(
            "wss://mesh.test/agents/connect", token=token, instance_id=instance_id,
            agent_type="worker",
            dispatch_auth=DispatchAuthVerifier(instance_id, hs256_keys=[TEST_SIGNING_SECRET]),
            session=session, config=self.config, now=self.now, wall_clock=self.clock.wall,
            random_bytes=self._random,
        )
        return self.attach(agent, f"{instance_id}#{next(self._names)}", tls=tls, pump=pump)

    def dial_without_hello(self, instance_id: str = "agent-1") -> Link:
        """An agent whose upgrade is read, and whose hello then stalls in its buffer."""
        link = self.dial(instance_id, pump=False)
        self.from_agent(link)  # the upgrade request
        link.paused = True
        self.pump()
        return link

    def raw(self, request: bytes = b"", *, tls: bool = True) -> Link:
        return self.attach(RawClient(request), f"raw#{next(self._names)}", tls=tls)

    def attach(self, peer: Any, name: str, *, tls: bool = True, pump: bool = True) -> Link:
        link = Link(name, peer)
        self.links.append(link)
        for dropped in self.runtime.transport_accepted(link, self.now):
            self.abort(dropped, "refused at accept")
        if tls and link.open:
            self.tls_done(link)
        if pump:
            self.pump()
        return link

    def tls_done(self, link: Link) -> None:
        link.conn = self.runtime.open_connection(link, self.now)
        self.runtime.schedule(link, link.conn.next_deadline())

    def abort(self, link: Link, reason: str) -> None:
        self.drops.append((link, reason))  # even when its transport just ended by itself
        if link.open:
            self.closed(link)

    def closed(self, link: Link) -> None:
        link.open = False
        link.agent.receive_eof(self.now)
        link.agent_events.extend(link.agent.events_received())
        self.runtime.transport_closed(link, self.now)

    def cut(self, link: Link) -> None:
        """The TCP connection breaks: both sides see EOF, bytes in transit are lost."""
        if not link.open:
            return
        link.agent.data_to_send()
        if link.conn is not None:
            link.conn.receive_eof(self.now)
            self.service(link)
        self.closed(link)
        self.pump()

    # -- moving bytes ----------------------------------------------------------------------------

    def pump(self) -> None:
        for _ in range(1000):
            moved = False
            for link in list(self.links):
                if link.open and link.conn is not None:
                    moved |= self.from_agent(link)
                    moved |= self.service(link)
            moved |= self.perform()
            if not moved:
                return
        raise RuntimeError("the driver did not settle")

    def from_agent(self, link: Link) -> bool:
        if link.paused or link.conn is None:
            return False
        chunks = link.agent.data_to_send()
        link.agent_events.extend(link.agent.events_received())
        for chunk in chunks:
            if chunk == b"":  # the agent closed its transport
                link.conn.receive_eof(self.now)
                self.service(link)
                if link.open:
                    self.closed(link)
                return True
            link.conn.receive_data(chunk, self.now)
        return bool(chunks)

    def service(self, link: Link) -> bool:
        """The link's pump: events to the runtime, output to the agent, the timer."""
        conn = link.conn
        if not link.open or conn is None:
            return False
        events = conn.events_received()
        link.mesh_events.extend(events)
        self.runtime.connection_events(link, events, self.now)
        chunks = conn.data_to_send()
        for chunk in chunks:
            if chunk == b"":
                self.closed(link)
                break
            link.agent.receive_data(chunk, self.now)
        link.agent_events.extend(link.agent.events_received())
        if link.open:
            self.runtime.schedule(link, conn.next_deadline())
        return bool(events or chunks)

    def perform(self) -> bool:
        actions = self.runtime.take_actions()
        for action in actions:
            if isinstance(action, ServiceLink):
                self.service(action.link)
            elif isinstance(action, DropLink):
                self.abort(action.link, action.reason)
            elif isinstance(action, AdmissionNeeded):
                self.admissions.append(action)
                if self.auto_admit:
                    self.answer(action)
                else:
                    self.held.append(action)
            elif isinstance(action, AgentArrived):
                self.arrived.append(action.instance_id)
            elif isinstance(action, ShutdownComplete):
                self.completed += 1
        return bool(actions)

    def release_admissions(self) -> None:
        held, self.held = self.held, []
        for need in held:
            self.answer(need)
        self.pump()

    def advance(self, seconds: float) -> None:
        """Move the clock, firing every timer at its exact deadline, in order."""
        target = self.now + seconds
        for _ in range(10_000):
            deadlines = [self.runtime.next_deadline()]
            deadlines += [link.agent.next_deadline() for link in self.links if link.open]
            due = [d for d in deadlines if d is not None and d <= target]
            if not due:
                break
            self.clock.now = max(self.now, min(due))
            # The mesh's timers first: at the same instant as an agent's, the mesh's rule shows.
            self.runtime.handle_timer(self.now)
            self.pump()
            for link in self.links:
                if link.open:
                    link.agent.handle_timer(self.now)
            self.pump()
        else:
            raise RuntimeError("timers did not settle")
        self.clock.now = target
        self.pump()

    def advance_to(self, when: float) -> None:
        self.advance(when - self.now)

    # -- dispatches ------------------------------------------------------------------------------

    def dispatch(self, instance_id: str = "agent-1", capability: str = "work", *,
                 deadline_ms: int = 60_000, on_chunk: Callable[[Any], object] | None = None
                 ) -> tuple[str, FakeWaiter]:
        waiter = FakeWaiter()
        dispatch_id, _ = self.runtime.dispatch(
            instance_id, capability, {"n": 1}, deadline_ms=deadline_ms, now=self.now,
            waiter=waiter, on_chunk=on_chunk,
        )
        self.pump()
        return dispatch_id, waiter

    def check_table(self) -> None:
        """The rule's invariant: the table lists exactly the running sessions, one per
        instance, and no running session is outside it."""
        table = dict(self.runtime.agents)
        for instance_id, link in table.items():
            assert link.open and link.conn is not None
            assert link.conn.instance_id == instance_id
            assert link.conn.state in (MeshState.READY, MeshState.DRAINING)
        for link in self.links:
            conn = link.conn
            if link.open and conn is not None and conn.state is MeshState.READY:
                assert conn.instance_id is not None and table.get(conn.instance_id) is link
        assert self.runtime.connections() == len(table)


def ready(link: Link) -> bool:
    return bool(link.open and link.agent.state is AgentState.READY)


def received(link: Link) -> list[DispatchReceived]:
    return link.agent_events_of(DispatchReceived)


# -- admission (spec 1) ------------------------------------------------------------------------


def test_an_admitted_agent_arrives_in_the_table_after_one_verify_and_one_lookup() -> None:
    driver = Driver()
    link = driver.dial("agent-1")
    assert ready(link)
    assert driver.admissions == [AdmissionNeeded(link, "good", "agent-1")]
    assert driver.verify_calls == ["good"]
    assert driver.lookup_calls == ["agent-1"]
    assert driver.arrived == ["agent-1"]
    assert dict(driver.runtime.agents) == {"agent-1": link}
    assert driver.runtime.available("agent-1")
    assert driver.runtime.connections() == 1
    assert driver.runtime.handshakes() == 0
    assert link.conn is not None and link.conn.agent_type == "worker"  # from the record


def test_every_upgrade_costs_exactly_one_lookup() -> None:
    driver = Driver()
    for n in range(1, 4):
        driver.dial(f"agent-{n}")
    driver.dial("agent-1")  # a reconnect is an upgrade like any other
    driver.dial("nobody")
    assert driver.lookup_calls == ["agent-1", "agent-2", "agent-3", "agent-1", "nobody"]
    assert len(driver.verify_calls) == len(driver.admissions) == 5


@pytest.mark.parametrize(
    ("instance_id", "token", "answer"),
    [
        ("agent-1", "forged", (401, "UNAUTHORIZED")),
        ("theirs-1", "good", (403, "TENANT_MISMATCH")),
        ("nobody", "good", (404, "INSTANCE_NOT_FOUND")),
        ("hosted-1", "good", (409, "DEPLOYMENT_MODE_MISMATCH")),
    ],
)
def test_a_refused_upgrade_gets_the_spec_status_and_is_logged(
    caplog: pytest.LogCaptureFixture, instance_id: str, token: str, answer: tuple[int, str]
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    status, code = answer
    driver = Driver()
    link = driver.dial(instance_id, token=token)
    error = link.closed_event.error
    assert isinstance(error, HandshakeRejected)
    assert (error.status, error.code) == (status, code)
    assert not link.open
    assert driver.lookup_calls == [instance_id] and driver.verify_calls == [token]
    assert driver.runtime.agents == {} and driver.arrived == []
    assert driver.runtime.handshakes() == 0
    assert f"upgrade refused: {status} {code} (instance {instance_id})" in caplog.messages


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        (raw_request(target="/agents/connect"), 400, "MISSING_INSTANCE_ID"),
        (raw_request(target="/agents/connect?instance_id="), 400, "MISSING_INSTANCE_ID"),
        (raw_request(protocol="other.v2"), 400, "UNSUPPORTED_SUBPROTOCOL"),
        (raw_request(auth=None), 401, "UNAUTHORIZED"),
        (raw_request(auth="Basic Zm9vOmJhcg=="), 401, "UNAUTHORIZED"),
    ],
)
def test_a_request_decided_without_lookups_asks_for_none(
    request_bytes: bytes, status: int, code: str
) -> None:
    driver = Driver()
    link = driver.raw(request_bytes)
    assert driver.admissions == [AdmissionNeeded(link, None, None)]
    assert driver.verify_calls == [] and driver.lookup_calls == []
    assert link.agent.status()[:2] == (status, code)
    assert not link.open


def test_a_plain_http_request_is_426_before_any_admission() -> None:
    driver = Driver()
    link = driver.raw(raw_request(upgrade=False))
    assert link.agent.status()[:2] == (426, "UPGRADE_REQUIRED")
    assert driver.admissions == []
    assert not link.open and driver.runtime.handshakes() == 0


@pytest.mark.parametrize(
    "failure",
    ["lookup", "verify"],
)
def test_a_failing_lookup_is_503_internal_without_its_text_and_a_warning(
    caplog: pytest.LogCaptureFixture, failure: str
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    driver = Driver()
    if failure == "lookup":
        driver.lookup_error = RuntimeError("registry db unreachable")
    else:
        driver.verify_error = ConnectionError("jwks endpoint unreachable")
    link = driver.dial("agent-1")
    error = link.closed_event.error
    assert isinstance(error, HandshakeRejected)
    assert (error.status, error.code, error.message) == (503, "INTERNAL", "try again later")
    assert len(driver.lookup_calls) == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "unreachable" in warnings[0].getMessage()
    assert "agent-1" in warnings[0].getMessage()
    assert "upgrade refused: 503 INTERNAL (instance agent-1)" in caplog.messages


def test_a_verifier_refusal_is_401_even_when_the_lookup_failed() -> None:
    """Spec order: the token is checked before the instance, so the outage does not show."""
    driver = Driver()
    driver.lookup_error = RuntimeError("registry db unreachable")
    link = driver.dial("agent-1", token="forged")
    error = link.closed_event.error
    assert isinstance(error, HandshakeRejected) and error.status == 401


def test_over_max_connections_an_upgrade_is_503_but_a_reconnect_replaces() -> None:
    driver = Driver(max_connections=2)
    first, second = driver.dial("agent-1"), driver.dial("agent-2")
    third = driver.dial("agent-3")
    error = third.closed_event.error
    assert isinstance(error, HandshakeRejected)
    assert (error.status, error.code) == (503, "AT_CAPACITY")
    # The instance already holds a slot: its newer connection takes it over.
    again = driver.dial("agent-1")
    assert ready(again) and not first.open and ready(second)
    assert driver.runtime.connections() == 2
    driver.cut(second)
    assert ready(driver.dial("agent-3"))


def test_admitted_upgrades_waiting_for_their_hello_count_toward_the_cap() -> None:
    driver = Driver(max_connections=1)
    first = driver.dial_without_hello("agent-1")
    assert first.conn is not None and first.conn.state is MeshState.AWAITING_HELLO
    second = driver.dial("agent-2")
    error = second.closed_event.error
    assert isinstance(error, HandshakeRejected) and error.code == "AT_CAPACITY"


# -- handshakes --------------------------------------------------------------------------------


def test_over_max_handshakes_the_oldest_handshakes_are_dropped() -> None:
    driver = Driver(max_handshakes=2)
    silent = [driver.raw(tls=False), driver.raw(tls=True)]
    assert driver.runtime.handshakes() == 2 and driver.drops == []
    agent = driver.dial("agent-1")
    assert [link for link, _ in driver.drops] == [silent[0]]
    assert ready(agent)  # silent sockets cannot lock an authenticated agent out
    assert driver.runtime.handshakes() == 1  # the other silent one
    driver.raw(tls=False)
    driver.raw(tls=False)
    assert [link for link, _ in driver.drops] == [silent[0], silent[1]]
    assert ready(agent)  # a running session is no handshake


def test_a_handshake_is_dropped_at_exactly_the_hello_timeout() -> None:
    driver = Driver()
    start = driver.now
    tls_stuck = driver.raw(tls=False)
    driver.advance(1.0)
    http_silent = driver.raw(tls=True)
    assert driver.runtime.next_deadline() == start + CONFIG.hello_timeout
    driver.advance_to(start + CONFIG.hello_timeout - 0.001)
    assert driver.drops == []
    driver.advance_to(start + CONFIG.hello_timeout)
    assert driver.drops == [(tls_stuck, "handshake timeout")]
    driver.advance_to(start + 1.0 + CONFIG.hello_timeout)
    assert driver.drops[1] == (http_silent, "handshake timeout")
    assert driver.runtime.handshakes() == 0


def test_the_timeout_covers_the_whole_handshake_up_to_the_session() -> None:
    driver = Driver(auto_admit=False)
    start = driver.now
    waiting = driver.dial("agent-1")  # upgrade read, the lookups are slow
    assert len(driver.held) == 1
    driver.advance_to(start + CONFIG.hello_timeout)
    assert driver.drops == [(waiting, "handshake timeout")]
    driver.release_admissions()  # the answer comes too late: nothing happens
    assert driver.runtime.agents == {} and driver.runtime.handshakes() == 0
    # Admitted, but the hello never comes.
    driver.auto_admit = True
    start = driver.now
    mute = driver.dial_without_hello("agent-1")
    assert mute.conn is not None and mute.conn.state is MeshState.AWAITING_HELLO
    driver.advance_to(start + CONFIG.hello_timeout)
    assert driver.drops[-1] == (mute, "handshake timeout")


def test_a_shutting_down_mesh_refuses_new_transports() -> None:
    driver = Driver()
    driver.runtime.begin_shutdown(driver.now)
    link = driver.raw(raw_request())
    assert driver.drops == [(link, "refused at accept")]
    assert driver.runtime.handshakes() == 0


# -- the instance table: the newest connection wins ----------------------------------------------


def test_a_second_connection_replaces_the_first_with_1001() -> None:
    driver = Driver()
    old = driver.dial("agent-1")
    new = driver.dial("agent-1")
    assert ready(new) and not old.open
    closed = old.closed_event
    assert (closed.code, closed.reason) == (1001, "replaced by a newer connection")
    assert dict(driver.runtime.agents) == {"agent-1": new}
    assert driver.arrived == ["agent-1", "agent-1"]
    driver.check_table()


def test_the_newer_connection_leaving_leaves_no_stranded_agent() -> None:
    """The regression: old, new, new leaves. The old one was closed when the new one came,
    so the table is empty and no live connection of the instance is outside it."""
    driver = Driver()
    old = driver.dial("agent-1")
    new = driver.dial("agent-1")
    driver.cut(new)
    assert not old.open and not new.open
    assert driver.runtime.agents == {}
    assert not driver.runtime.available("agent-1")
    driver.check_table()
    with pytest.raises(DispatchError) as raised:
        driver.dispatch("agent-1")
    assert raised.value.code == "AGENT_UNAVAILABLE"
    # The agent reconnects (it saw 1001) and is reachable again.
    back = driver.dial("agent-1")
    dispatch_id, waiter = driver.dispatch("agent-1")
    back.agent.send_result(dispatch_id, "ok")
    driver.pump()
    assert waiter.value == "ok"


def test_the_older_connection_ending_late_does_not_remove_the_newer() -> None:
    driver = Driver()
    old = driver.dial("agent-1")
    old.paused = True  # it will not answer our close: its transport lingers
    new = driver.dial("agent-1")
    assert old.open and old.conn is not None and old.conn.state is MeshState.CLOSING
    assert dict(driver.runtime.agents) == {"agent-1": new}
    driver.check_table()
    driver.advance(CONFIG.close_timeout)  # the old transport is dropped now
    assert not old.open and ready(new)
    assert dict(driver.runtime.agents) == {"agent-1": new}
    driver.check_table()


def test_the_older_connection_closing_first_then_the_newer_arrives() -> None:
    driver = Driver(auto_admit=False)
    old = driver.dial("agent-1")
    driver.release_admissions()
    new = driver.dial("agent-1")  # upgrade read, answer pending
    driver.cut(old)
    assert driver.runtime.agents == {}
    driver.release_admissions()
    assert ready(new) and dict(driver.runtime.agents) == {"agent-1": new}
    driver.check_table()


def test_a_connection_replaced_before_its_hello_never_enters_the_table() -> None:
    driver = Driver()
    old = driver.dial("agent-1")
    slow = driver.dial_without_hello("agent-1")  # admitted: old is replaced already
    assert not old.open and driver.runtime.agents == {}
    third = driver.dial("agent-1")
    assert slow.conn is not None and slow.conn.state is MeshState.CLOSING
    slow.paused = False  # its hello arrives after our close: too late
    driver.pump()
    assert dict(driver.runtime.agents) == {"agent-1": third}
    assert driver.arrived == ["agent-1", "agent-1"]
    driver.check_table()


@pytest.mark.parametrize(
    "order", list(itertools.permutations(["cut old", "cut new", "third arrives"]))
)
def test_the_table_follows_the_rule_in_every_order(order: tuple[str, ...]) -> None:
    driver = Driver()
    old = driver.dial("agent-1")
    new = driver.dial("agent-1")
    third: Link | None = None
    for step in order:
        if step == "cut old":
            driver.cut(old)
        elif step == "cut new":
            driver.cut(new)
        else:
            third = driver.dial("agent-1")
        driver.check_table()
        expected = third if third is not None else (new if new.open else None)
        assert dict(driver.runtime.agents) == ({"agent-1": expected} if expected else {})
    assert third is not None and ready(third)
    assert not old.open and not new.open


# -- dispatches --------------------------------------------------------------------------------


def test_a_dispatch_resolves_its_waiter_with_the_result_and_chunks_in_order() -> None:
    driver = Driver()
    link = driver.dial("agent-1")
    chunks: list[Any] = []
    dispatch_id, waiter = driver.dispatch("agent-1", on_chunk=chunks.append)
    (event,) = received(link)
    assert (event.dispatch_id, event.capability, dict(event.arguments)) == (
        dispatch_id, "work", {"n": 1})
    for n in range(3):
        link.agent.send_chunk(dispatch_id, {"part": n})
    driver.pump()
    assert chunks == [{"part": 0}, {"part": 1}, {"part": 2}] and not waiter.done
    link.agent.send_result(dispatch_id, {"total": 3})
    driver.pump()
    assert (waiter.calls, waiter.value, waiter.error) == (1, {"total": 3}, None)
    assert driver.runtime.waiting() == 0


def test_a_failed_dispatch_raises_the_agents_code_message_and_detail() -> None:
    driver = Driver()
    link = driver.dial("agent-1")
    dispatch_id, waiter = driver.dispatch("agent-1")
    link.agent.send_error(dispatch_id, "INVALID_ARGUMENTS", "n must be even", {"field": "n"})
    driver.pump()
    error = waiter.error
    assert isinstance(error, DispatchError) and waiter.calls == 1
    assert (error.dispatch_id, error.code, error.message, error.detail) == (
        dispatch_id, "INVALID_ARGUMENTS", "n must be even", {"field": "n"})


def test_a_dispatch_times_out_at_its_deadline() -> None:
    driver = Driver()
    driver.dial("agent-1")
    sent = driver.now
    dispatch_id, waiter = driver.dispatch("agent-1", deadline_ms=2500)
    assert driver.runtime.next_deadline() == sent + 2.5
    driver.advance_to(sent + 2.499)
    assert not waiter.done
    driver.advance_to(sent + 2.5)
    assert isinstance(waiter.error, DispatchError)
    assert (waiter.error.dispatch_id, waiter.error.code) == (dispatch_id, "DEADLINE_EXCEEDED")


def test_a_discarded_dispatch_tells_its_waiter_nothing() -> None:
    driver = Driver()
    link = driver.dial("agent-1")
    dispatch_id, waiter = driver.dispatch("agent-1")
    driver.runtime.discard(dispatch_id)
    link.agent.send_result(dispatch_id, "late")
    driver.pump()
    assert not waiter.done and driver.runtime.waiting() == 0


def test_dispatch_to_an_unknown_or_draining_agent_is_agent_unavailable() -> None:
    driver = Driver()
    with pytest.raises(DispatchError) as raised:
        driver.dispatch("agent-1")
    assert raised.value.code == "AGENT_UNAVAILABLE"
    link = driver.dial("agent-1")
    link.agent.close_request(now=driver.now)  # the agent asks to stop taking dispatches
    driver.pump()
    assert not driver.runtime.available("agent-1")
    with pytest.raises(DispatchError) as raised:
        driver.dispatch("agent-1")
    assert raised.value.code == "AGENT_UNAVAILABLE"


def test_a_waiter_survives_a_resume_onto_a_newer_connection_and_resolves_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    driver = Driver()
    old = driver.dial("agent-1")
    chunks: list[Any] = []
    dispatch_id, waiter = driver.dispatch("agent-1", on_chunk=chunks.append)
    assert [e.dispatch_id for e in received(old)] == [dispatch_id]
    old.agent.send_chunk(dispatch_id, "a")
    driver.pump()
    # The agent's network stalls; it reconnects on a new connection (same session).
    old.paused = True
    new = driver.dial("agent-1")
    started = [e for e in new.mesh_events if isinstance(e, SessionStarted)]
    assert started[0].resumed and started[0].replayed_dispatches == (dispatch_id,)
    assert not waiter.done
    assert any(f"replayed dispatches: ['{dispatch_id}']" in m for m in caplog.messages)
    new.agent.send_chunk(dispatch_id, "b")
    new.agent.send_result(dispatch_id, "done")
    driver.pump()
    driver.advance(CONFIG.close_timeout)  # the old transport goes
    assert (waiter.calls, waiter.value) == (1, "done")
    assert chunks == ["a", "b"]
    driver.check_table()


def test_a_resume_window_ending_fails_the_waiter_at_exactly_its_end() -> None:
    driver = Driver()
    link = driver.dial("agent-1")
    dispatch_id, waiter = driver.dispatch("agent-1", deadline_ms=60_000)
    driver.advance(1.0)
    cut_at = driver.now
    driver.cut(link)
    assert not waiter.done
    assert driver.runtime.next_deadline() == cut_at + CONFIG.resume_window
    driver.advance_to(cut_at + CONFIG.resume_window - 0.001)
    assert not waiter.done
    driver.advance_to(cut_at + CONFIG.resume_window)
    assert isinstance(waiter.error, DispatchError)
    assert (waiter.error.dispatch_id, waiter.error.code) == (dispatch_id, "AGENT_DISCONNECTED")
    assert driver.runtime.waiting() == 0


def test_a_dispatch_deadline_inside_the_resume_window_fails_at_the_deadline() -> None:
    driver = Driver()
    link = driver.dial("agent-1")
    sent = driver.now
    _, waiter = driver.dispatch("agent-1", deadline_ms=3000)
    driver.cut(link)
    driver.advance_to(sent + 2.999)
    assert not waiter.done
    driver.advance_to(sent + 3.0)
    assert isinstance(waiter.error, DispatchError)
    assert waiter.error.code == "AGENT_DISCONNECTED"


# -- the one timer -----------------------------------------------------------------------------


def test_next_deadline_is_the_earliest_of_every_timer() -> None:
    config = Config(hello_timeout=5.0, close_grace=10.0, close_timeout=2.0, resume_window=8.0,
                    heartbeat_interval=1000.0, dead_peer_timeout=1000.0,
                    ws_ping_interval=40.0, app_ping_interval=40.0, app_ping_offset=20.0)
    driver = Driver(config)
    start = driver.now
    assert driver.runtime.next_deadline() is None
    agent = driver.dial("agent-1")  # its connection's first timer: the app ping
    assert agent.conn is not None
    assert driver.runtime.next_deadline() == agent.conn.next_deadline() == start + 20.0
    driver.advance(1.0)
    driver.raw()  # a handshake: earlier
    assert driver.runtime.next_deadline() == start + 1.0 + config.hello_timeout
    driver.dispatch("agent-1", deadline_ms=4000)  # a dispatch deadline: earlier still
    assert driver.runtime.next_deadline() == start + 1.0 + 4.0
    # A connection cut with a dispatch in flight: the store holds it until its deadline.
    other = driver.dial("agent-2")
    driver.dispatch("agent-2", deadline_ms=3500)
    driver.cut(other)
    assert driver.store.next_deadline() == start + 1.0 + 3.5
    assert driver.runtime.next_deadline() == start + 1.0 + 3.5
    driver.advance_to(start + 4.5)  # the held one failed; the agent-1 dispatch comes next
    assert driver.runtime.next_deadline() == start + 5.0
    driver.advance_to(start + 5.0)
    assert driver.runtime.next_deadline() == start + 1.0 + config.hello_timeout
    driver.advance_to(start + 6.0)  # the handshake was dropped; agent-2's window is open
    assert driver.runtime.next_deadline() == start + 1.0 + config.resume_window
    driver.advance_to(start + 9.0)
    assert driver.runtime.next_deadline() == agent.conn.next_deadline() == start + 20.0
    driver.runtime.begin_shutdown(driver.now, grace=3.0)  # agent-1 drains at once
    driver.pump()
    assert driver.runtime.phase is MeshPhase.CLOSED
    assert driver.runtime.next_deadline() is None


def test_rescheduling_keeps_the_timer_heap_small_and_right() -> None:
    driver = Driver()
    link = driver.dial("agent-1")
    assert link.conn is not None
    start = driver.now
    for n in range(2000):  # a busy connection moves its deadline on every pump
        driver.runtime.schedule(link, start + 100 + n)
    assert driver.runtime.next_deadline() == start + 100 + 1999
    assert len(driver.runtime._heap) < 100
    driver.runtime.schedule(link, None)
    assert driver.runtime.next_deadline() is None


def test_the_shutdown_step_is_in_next_deadline() -> None:
    driver = Driver()
    link = driver.dial("agent-1")
    driver.dispatch("agent-1", deadline_ms=60_000)
    start = driver.now
    driver.runtime.begin_shutdown(start, grace=3.5)
    driver.pump()
    assert link.conn is not None
    (request,) = link.agent_events_of(CloseRequested)
    assert request.grace_seconds == 4  # whole seconds on the wire, rounded up
    assert link.conn.next_deadline() == start + 4.0
    assert driver.runtime.next_deadline() == start + 3.5
    driver.advance_to(start + 3.5)
    assert driver.runtime.phase is MeshPhase.CLOSED
    assert link.closed_event.code == 1001


# -- shutdown ----------------------------------------------------------------------------------


def test_shutdown_drains_then_1001_at_the_grace_then_drops_at_the_close_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    driver = Driver()
    busy = driver.dial("agent-1")
    stuck = driver.dial("agent-2")
    handshake = driver.raw(tls=False)
    _, busy_waiter = driver.dispatch("agent-1")
    _, stuck_waiter = driver.dispatch("agent-2")
    start = driver.now
    driver.runtime.begin_shutdown(start)  # grace: Config.close_grace
    driver.pump()
    assert driver.runtime.phase is MeshPhase.DRAINING
    assert (handshake, "mesh shutting down") in driver.drops
    for link in (busy, stuck):
        (request,) = link.agent_events_of(CloseRequested)
        assert (request.grace_seconds, request.reason) == (10, "mesh shutting down")
    with pytest.raises(DispatchError):
        driver.dispatch("agent-1")
    stuck.paused = True  # agent-2 will not even answer a close frame
    driver.advance_to(start + CONFIG.close_grace - 0.001)
    assert driver.runtime.phase is MeshPhase.DRAINING
    driver.advance_to(start + CONFIG.close_grace)
    assert driver.runtime.phase is MeshPhase.CLOSING
    closed = busy.closed_event
    assert (closed.code, closed.reason) == (1001, "mesh shutting down")
    assert not busy.open and stuck.open
    assert driver.completed == 0
    # The 1001 ended both sessions: what they had in flight can never resume on a mesh
    # shutting down, so it fails now, while the callers' own connections are still up.
    for waiter in (busy_waiter, stuck_waiter):
        assert isinstance(waiter.error, DispatchError)
        assert (waiter.error.code, waiter.error.message) == (
            "AGENT_DISCONNECTED", "mesh shutting down")
    driver.advance_to(start + CONFIG.close_grace + CONFIG.close_timeout - 0.001)
    assert driver.runtime.phase is MeshPhase.CLOSING and stuck.open
    driver.advance_to(start + CONFIG.close_grace + CONFIG.close_timeout)
    assert driver.runtime.phase is MeshPhase.CLOSED
    assert driver.drops[-1] == (stuck, "mesh shut down")
    assert driver.completed == 1
    assert busy_waiter.calls == stuck_waiter.calls == 1  # once each
    assert driver.runtime.next_deadline() is None
    for step in ("mesh shutdown: close_request to 2 agents, grace 10.0 s",
                 "mesh shutdown: the grace ended", "mesh shutdown: 1001 to 2 connections, "
                 "2 transports left"):
        assert step in caplog.messages
    assert any(m.startswith("mesh shutdown complete") for m in caplog.messages)


def test_shutdown_completes_early_when_the_agents_finish() -> None:
    driver = Driver()
    busy = driver.dial("agent-1")
    idle = driver.dial("agent-2")
    dispatch_id, waiter = driver.dispatch("agent-1")
    start = driver.now
    driver.runtime.begin_shutdown(start)
    driver.pump()
    assert not idle.open and idle.closed_event.code == 1000  # nothing in flight: drained
    assert driver.runtime.phase is MeshPhase.DRAINING
    driver.advance(3.0)
    busy.agent.send_result(dispatch_id, "finished")
    driver.pump()
    assert waiter.value == "finished"
    assert busy.closed_event.code == 1000
    assert driver.runtime.phase is MeshPhase.CLOSED and driver.completed == 1
    assert driver.now == start + 3.0


def test_shutdown_closes_handshakes_and_answers_pending_upgrades_503() -> None:
    driver = Driver(auto_admit=False)
    pending = driver.dial("agent-1")
    driver.runtime.begin_shutdown(driver.now)
    driver.pump()
    error = pending.closed_event.error
    assert isinstance(error, HandshakeRejected)
    assert (error.status, error.code) == (503, "SHUTTING_DOWN")
    assert driver.runtime.phase is MeshPhase.CLOSED and driver.completed == 1
    driver.release_admissions()  # too late: nothing happens
    assert driver.completed == 1
