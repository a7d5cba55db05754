"""The mesh's resume store (spec section 5): dispatches held for a disconnected agent.

One store per mesh process, shared by its `MeshConnection`s. On its own, resume is
process-local (a reconnect that lands elsewhere starts clean); the reference mesh's
scale-out subclasses it to honour tokens issued by other processes (`owns`, `tokens`
and `revoke` are what it needs). It is plain data with monotonic deadlines, so the
adapter drives it like a connection: `next_deadline()`, then `expire(now)` to collect
what failed.
"""

from __future__ import annotations

import heapq
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .frames import DispatchPayload

__all__ = ["HeldDispatch", "ResumeClaim", "ResumeStore"]


@dataclass(frozen=True, slots=True)
class HeldDispatch:
    """An in-flight dispatch parked at disconnect, to replay with `attempt` + 1."""

    payload: DispatchPayload
    """As last sent, without its `dispatch_auth` (a fresh one is minted on replay)."""
    deadline_at: float
    """Monotonic; the dispatch fails when it passes, held or not."""

    @property
    def dispatch_id(self) -> str:
        return self.payload.dispatch_id


@dataclass(frozen=True, slots=True)
class ResumeClaim:
    """What a hello's `resume_token` got: `resumed`, what to replay, what failed now."""

    resumed: bool
    replay: tuple[HeldDispatch, ...] = ()
    failed: tuple[HeldDispatch, ...] = ()


@dataclass(slots=True)
class _Entry:
    instance_id: str
    tenant_id: str
    expires_at: float | None = None  # None while the connection that got the token is up
    held: dict[str, HeldDispatch] = field(default_factory=dict)
    handed: bool = False  # claimed on another mesh process: kept only for its deadlines


class ResumeStore:
    """Single-use resume tokens bound to an instance and a tenant, and held dispatches.

    A token is issued with every welcome and replaces the instance's previous
    one. When that connection ends, its in-flight dispatches are held under the
    token for `window` seconds (never past their own deadline). A hello that
    presents the token for the same instance and tenant within the window
    claims them, once; anything else (no token, a stale one, another instance's)
    fails whatever that instance had held with `AGENT_DISCONNECTED`.
    """

    def __init__(
        self, *, window: float = 30.0, token_factory: Callable[[], str] | None = None
    ) -> None:
        self.window = window
        self._new_token = token_factory or (lambda: secrets.token_urlsafe(24))
        self._entries: dict[str, _Entry] = {}
        self._by_instance: dict[tuple[str, str], str] = {}
        self._heap: list[tuple[float, str, str]] = []  # (when, token, dispatch id or "")

    def __len__(self) -> int:
        return sum(len(entry.held) for entry in self._entries.values())

    def issue(self, instance_id: str, tenant_id: str) -> str:
        """A fresh token for a welcome; the instance's older token stops working."""
        key = (instance_id, tenant_id)
        old = self._by_instance.pop(key, None)
        if old is not None:
            self._entries.pop(old, None)
        token = self._new_token()
        self._entries[token] = _Entry(instance_id, tenant_id)
        self._by_instance[key] = token
        return token

    def hold(
        self, token: str, dispatches: Iterable[HeldDispatch], now: float
    ) -> list[HeldDispatch]:
        """The connection that got `token` ended: park its in-flight dispatches.

        Returns those that cannot be held (deadline passed, unknown token, zero
        window): they fail with `AGENT_DISCONNECTED` at once.
        """
        entry = self._entries.get(token)
        failed: list[HeldDispatch] = []
        if entry is None or self.window <= 0:
            return list(dispatches)
        entry.expires_at = now + self.window
        heapq.heappush(self._heap, (entry.expires_at, token, ""))
        for held in dispatches:
            if held.deadline_at <= now:
                failed.append(held)
                continue
            entry.held[held.dispatch_id] = held
            if held.deadline_at < entry.expires_at:
                heapq.heappush(self._heap, (held.deadline_at, token, held.dispatch_id))
        return failed

    def claim(self, token: str | None, instance_id: str, tenant_id: str, now: float) -> ResumeClaim:
        """Answer a hello: resume (the token matches, in time) or fail what was held."""
        key = (instance_id, tenant_id)
        entry = self._entries.get(token) if token is not None else None
        if (
            entry is not None
            and entry.instance_id == instance_id
            and entry.tenant_id == tenant_id
            and entry.expires_at is not None
            and now < entry.expires_at
            and not entry.handed
        ):
            del self._entries[token]  # type: ignore[arg-type]  # single use
            self._by_instance.pop(key, None)
            live = tuple(h for h in entry.held.values() if h.deadline_at > now)
            dead = tuple(h for h in entry.held.values() if h.deadline_at <= now)
            return ResumeClaim(True, live, dead)
        # Not resumed: the instance starts clean and whatever it had held has failed. A token
        # presented by another instance or tenant is left alone for its owner.
        own_token = self._by_instance.pop(key, None)
        own = self._entries.pop(own_token, None) if own_token is not None else None
        return ResumeClaim(False, (), tuple(own.held.values()) if own is not None else ())

    def owns(self, token: str) -> bool:
        """Whether `token` was issued by this store and is still live here."""
        return token in self._entries

    def tokens(self) -> list[tuple[str, str, str]]:
        """`(token, instance_id, tenant_id)` of every live token, for a store shared
        between mesh processes to announce again (scale-out)."""
        return [(token, e.instance_id, e.tenant_id) for token, e in self._entries.items()]

    def revoke(self, token: str, now: float) -> None:
        """The token was claimed elsewhere (another mesh process): what it holds fails at
        the next `expire(now)`, and it resumes nothing here. No-op for an unknown token."""
        entry = self._entries.get(token)
        if entry is None:
            return
        if entry.expires_at is None:  # its connection is up: `hold` will fail what it had
            del self._entries[token]
            if self._by_instance.get((entry.instance_id, entry.tenant_id)) == token:
                del self._by_instance[(entry.instance_id, entry.tenant_id)]
            return
        entry.expires_at = now
        heapq.heappush(self._heap, (now, token, ""))

    def hand_over(self, token: str, kept: Iterable[str], now: float) -> None:
        """The token was claimed on another mesh process, which re-sent the held dispatches
        named in `kept`: their outcomes will come from there (`settle`), so they stay here
        only until their own deadlines, when they fail as usual; the rest fail at the next
        `expire(now)`. The token resumes nothing here any more. A token whose connection is
        still up is revoked (`revoke`): that process had nothing held to re-send."""
        entry = self._entries.get(token)
        if entry is None or entry.handed:
            return
        if entry.expires_at is None:
            self.revoke(token, now)
            return
        entry.handed = True
        if self._by_instance.get((entry.instance_id, entry.tenant_id)) == token:
            del self._by_instance[(entry.instance_id, entry.tenant_id)]
        keep = set(kept)
        latest = now
        for dispatch_id, held in list(entry.held.items()):
            deadline = held.deadline_at
            if dispatch_id not in keep:
                deadline = now
                entry.held[dispatch_id] = HeldDispatch(held.payload, now)
            latest = max(latest, deadline)
            heapq.heappush(self._heap, (deadline, token, dispatch_id))
        entry.expires_at = latest
        heapq.heappush(self._heap, (latest, token, ""))

    def settle(self, token: str, dispatch_id: str) -> HeldDispatch | None:
        """A held dispatch ended on the process it was handed over to: forget it (it fails
        no more). Returns it, or None when it is not held here (it failed already)."""
        entry = self._entries.get(token)
        if entry is None:
            return None
        held = entry.held.pop(dispatch_id, None)
        if held is not None and entry.handed and not entry.held:
            del self._entries[token]
        return held

    def next_deadline(self) -> float | None:
        while self._heap and not self._live(self._heap[0]):
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def expire(self, now: float) -> list[HeldDispatch]:
        """Drop what passed its window or deadline; those dispatches fail AGENT_DISCONNECTED."""
        failed: list[HeldDispatch] = []
        while self._heap and self._heap[0][0] <= now:
            item = heapq.heappop(self._heap)
            if not self._live(item):
                continue
            _, token, dispatch_id = item
            entry = self._entries[token]
            if dispatch_id:
                failed.append(entry.held.pop(dispatch_id))
            else:  # the window closed: the token and everything under it are gone
                del self._entries[token]
                key = (entry.instance_id, entry.tenant_id)
                if self._by_instance.get(key) == token:
                    del self._by_instance[key]
                failed.extend(entry.held.values())
        return failed

    def _live(self, item: tuple[float, str, str]) -> bool:
        when, token, dispatch_id = item
        entry = self._entries.get(token)
        if entry is None:
            return False
        if dispatch_id:
            held = entry.held.get(dispatch_id)
            return held is not None and held.deadline_at == when
        return entry.expires_at == when
