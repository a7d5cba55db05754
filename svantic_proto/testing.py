"""A test kit for code that embeds svantic-proto: a fake clock and an agent/mesh
pair that pumps bytes in memory, deterministically, with no sockets.

    pair = Pair()
    pair.connect()                       # handshake, hello, welcome
    dispatch_id = pair.mesh.send_dispatch("echo", {"x": 1}, deadline_ms=5000, now=pair.clock.now)
    pair.pump()
    pair.agent.send_result(dispatch_id, {"x": 1})
    pair.pump()
    assert pair.mesh_events_of(DispatchCompleted)
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from .agent import AgentConnection, AgentSession
from .auth import DispatchAuthMinter, DispatchAuthVerifier
from .config import Config
from .events import Event, UpgradeRequest
from .mesh import MeshConnection, held_failures, jwt_dispatch_auth
from .resume import ResumeStore

__all__ = ["FakeClock", "Pair", "TEST_SIGNING_SECRET"]

TEST_SIGNING_SECRET = "svantic-proto-test-signing-secret"
E = TypeVar("E", bound=Event)


class FakeClock:
    """Monotonic time you move by hand, and a wall clock that moves with it."""

    def __init__(self, now: float = 1000.0, wall: float = 1_795_000_000.0) -> None:
        self.now = now
        self._wall_offset = wall - now

    def wall(self) -> float:
        return self.now + self._wall_offset

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a monotonic clock does not go back")
        self.now += seconds


def _seeded_bytes(seed: int) -> Callable[[int], bytes]:
    rng = random.Random(seed)
    return rng.randbytes


@dataclass
class _Link:
    agent: AgentConnection
    mesh: MeshConnection
    silent: set[str] = field(default_factory=set)  # "agent" and/or "mesh": output lost


class Pair:
    """An `AgentConnection` and a `MeshConnection` wired back to back in memory.

    The upgrade is accepted automatically (instance `agent-1`, tenant `tenant-1`)
    unless `auto_accept=False`; dispatch auth is on, HS256 with a test secret.
    `reconnect()` opens a new connection with the same `AgentSession` and the
    same `ResumeStore`, as a real agent and mesh process would.
    """

    def __init__(
        self,
        config: Config | None = None,
        *,
        clock: FakeClock | None = None,
        instance_id: str = "agent-1",
        tenant_id: str = "tenant-1",
        agent_type: str = "test-agent",
        dispatch_auth: bool = True,
        auto_accept: bool = True,
        seed: int = 0,
        store: ResumeStore | None = None,
        verify_token: Callable[[str], Any] | None = None,
    ) -> None:
        self.config = config or Config()
        self.clock = clock or FakeClock()
        self.instance_id = instance_id
        self.tenant_id = tenant_id
        self.agent_type = agent_type
        self.auto_accept = auto_accept
        self._random = _seeded_bytes(seed)
        self.store = store if store is not None else ResumeStore(
            window=self.config.resume_window,
            token_factory=lambda: self._random(12).hex(),
        )
        self.session = AgentSession(self.config, rand=random.Random(seed).random)
        self.verifier = DispatchAuthVerifier(
            instance_id, hs256_keys=[TEST_SIGNING_SECRET], enabled=dispatch_auth
        )
        minter = DispatchAuthMinter(TEST_SIGNING_SECRET)
        self.mint = jwt_dispatch_auth(minter) if dispatch_auth else None
        self.verify_token = verify_token
        self.agent_events: list[Event] = []
        self.mesh_events: list[Event] = []
        self.cut_bytes = 0
        self._link = self._new_link()

    @property
    def agent(self) -> AgentConnection:
        return self._link.agent

    @property
    def mesh(self) -> MeshConnection:
        return self._link.mesh

    def _new_link(self) -> _Link:
        clock = self.clock
        agent = AgentConnection(
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
        )
        mesh = MeshConnection(
            dispatch_auth=self.mint,
            resume_store=self.store,
            verify_token=self.verify_token,
            config=self.config,
            now=clock.now,
            wall_clock=clock.wall,
            random_bytes=self._random,
        )
        return _Link(agent, mesh)

    # -- moving bytes --------------------------------------------------------------------------

    def pump(self, *, max_rounds: int = 1000) -> None:
        """Move bytes both ways until neither side has anything to send."""
        now = self.clock.now
        for _ in range(max_rounds):
            moved = self._deliver(self.agent, self.mesh, now) | self._deliver(
                self.mesh, self.agent, now
            )
            self._collect()
            if not moved:
                return
        raise RuntimeError("pump did not settle")

    def go_silent(self, side: Literal["agent", "mesh"]) -> None:
        """From now on, what `side` writes is lost (half-open TCP), on this connection only:
        it still hears its peer, and `reconnect()` gives a connection that is heard."""
        self._link.silent.add(side)

    def _deliver(self, sender: Any, receiver: Any, now: float) -> bool:
        chunks = sender.data_to_send()
        if self._link.silent and ("agent" if sender is self.agent else "mesh") in self._link.silent:
            return False
        for chunk in chunks:
            if chunk == b"":
                receiver.receive_eof(now)
            else:
                receiver.receive_data(chunk, now)
        return bool(chunks)

    def _collect(self) -> None:
        for event in self.mesh.events_received():
            self.mesh_events.append(event)
            if isinstance(event, UpgradeRequest) and self.auto_accept:
                self.mesh.accept(
                    instance_id=event.request.instance_id,
                    tenant_id=self.tenant_id,
                    agent_type=self.agent_type,
                    now=self.clock.now,
                )
        self.agent_events.extend(self.agent.events_received())

    def connect(self) -> None:
        self.pump()

    def advance(self, seconds: float) -> None:
        """Move the clock, firing every timer at its exact deadline, in order."""
        target = self.clock.now + seconds
        while True:
            due = [
                d
                for d in (
                    self.agent.next_deadline(),
                    self.mesh.next_deadline(),
                    self.store.next_deadline(),
                )
                if d is not None and d <= target
            ]
            if not due:
                break
            self.clock.now = max(self.clock.now, min(due))
            now = self.clock.now
            self.agent.handle_timer(now)
            self.mesh.handle_timer(now)
            self.mesh_events.extend(held_failures(self.store.expire(now)))
            self.pump()
        self.clock.now = target
        self.pump()

    def cut(self) -> None:
        """The TCP connection breaks: bytes in transit are lost, both sides see EOF."""
        now = self.clock.now
        self.cut_bytes += sum(len(c) for c in self.agent.data_to_send())
        self.cut_bytes += sum(len(c) for c in self.mesh.data_to_send())
        self.agent.receive_eof(now)
        self.mesh.receive_eof(now)
        self._collect()
        self.agent.data_to_send()
        self.mesh.data_to_send()

    def reconnect(self) -> None:
        """A new connection for the same agent session and mesh resume store."""
        self._link = self._new_link()
        self.pump()

    # -- reading events ------------------------------------------------------------------------

    def agent_events_of(self, kind: type[E]) -> list[E]:
        return [e for e in self.agent_events if isinstance(e, kind)]

    def mesh_events_of(self, kind: type[E]) -> list[E]:
        return [e for e in self.mesh_events if isinstance(e, kind)]
