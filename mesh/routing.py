"""Routing and health (spec 6, seed 001): which instance gets the next dispatch, and what
state each instance is in.

Pure: no sockets, no event loop, no clock. `now` (monotonic seconds) and `wall` (epoch
seconds, for timestamps users see) are arguments; the caller runs the missed-heartbeat
timer with `next_deadline()` / `handle_timer(now)` like the rest of the sans-IO code, and
logs or publishes what `take_changes()` returns.

Two signals per instance, kept apart as the seed does:

* routing status (`model.ROUTING_STATUSES`): may the mesh send work there? `unknown` and
  `available` are routable; `busy`, `unhealthy` and `offline` are not. A connected-mode
  instance without an open socket is not routable whatever its routing status.
* connection status (`model.CONNECTION_STATUSES`): what the transport looks like, for the
  dashboard: `unknown`, `online`, `healthy`, `degraded`, `offline`.

Why indexes and load buckets: a routing decision must cost the same at 10 and at 10,000
instances. Every (tenant, capability) and (tenant, capability, agent_type) has an index
that keeps its routable members in buckets by the number of leases they hold, plus the
lowest non-empty load. A bucket is an insertion-ordered set (an `OrderedDict`: a plain
dict used as a queue slows down as deleted slots pile up at its front), and an instance
enters at the end of a bucket whenever it moves there, so the front of the lowest bucket
is the least-loaded instance that has waited longest at that load: ties are served first
in, first out, which is round robin over equals. A lease taken or given back moves the
instance one bucket up or down, and the lowest load moves at most one step, so acquire and
release are O(1), whatever the number of instances. Only when the last instance at the
lowest load leaves the buckets (blocked, removed) is the next load looked for a few steps
up, then over the distinct loads held: fewer than the largest cap, or with no cap the
spread of loads, which least-loaded routing keeps narrow. The buckets are only built once
a decision asks the index (members ordered by when each last changed load, so they are
exactly what keeping them all along would have given), so the capabilities and agent types
nobody routes by cost nothing per dispatch. Each index also counts its members by why they
are blocked, so the error for "nothing routable" is chosen in O(1) too.

Decided (where the spec leaves it open):

* Decided: `unknown` lasts until the instance's first status change of any kind (a
  heartbeat, a dispatch outcome, reaching its cap); it never comes back.
* Decided: precedence when several reasons hold: `offline` (the agent said so) over
  `unhealthy` over `busy` over `available`.
* Decided: a heartbeat lifts failure-unhealthy (the agent says it is alive), but keeps the
  count of consecutive failures, so the next failure makes it unhealthy again at once and
  deregistration still comes after `deregister_after_failures` failures in a row; only a
  successful dispatch resets the count. Without this an instance made unhealthy by
  failures would never be routed again, so could never recover.
* Decided: a heartbeat without `status` makes no claim: it clears an earlier busy/offline.
* Decided: the heartbeat's `max_concurrent_sessions` replaces the registered cap; its
  `active_sessions` and `load` are kept for display only: the leases the mesh holds are
  what capacity is counted on (the agent's own count lags behind in-flight dispatches).
* Decided: a successful dispatch after the heartbeat clock ran out lifts the
  missed-heartbeat state and restarts the clock at that moment; a new socket does too.
* Decided: a dispatch outcome sets connection `healthy` / `degraded` only while the link
  is up (a hosted instance, or a connected one with its socket); otherwise it stays
  `offline`. `neutral` outcomes change nothing but the lease count.
* Decided: `last_dispatch_error` keeps the last failure after later successes; a failure
  without a code is recorded as `DISPATCH_FAILED` (the spec's code for a handler error).
* Decided: with both `instance_id` and `agent_type`, an instance of another agent type
  is `INSTANCE_NOT_FOUND`, like one of another tenant.
* Decided: `acquire` first applies heartbeat deadlines already due at its `now`, so a
  decision never rests on an instance the caller's timer has not yet caught up with.
* Decided: changes are queued in the order they happen; when one event changes both
  signals, the connection change comes first (the transport fact, then what it means for
  routing), then the routing change, then any `DeregisterDue`.
* Decided: `disconnected()` for an unknown id is a no-op (the record may be deregistered
  before its socket closes); `connected()` of a hosted instance is a `ValueError` (the
  control plane answers 409 `DEPLOYMENT_MODE_MISMATCH` before it gets here).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeAlias

from .model import Lease, RouteError

__all__ = [
    "Change",
    "ConnectionChanged",
    "DeregisterDue",
    "InstanceState",
    "RouterConfig",
    "Router",
    "RoutingChanged",
]

_DEPLOYMENT_MODES = ("connected", "hosted")
_HEARTBEAT_STATUSES = (None, "available", "busy", "offline")
_OUTCOMES = ("ok", "failed", "neutral")

# Why an instance is or is not routable (per-index counts choose the error in O(1)).
_ROUTABLE = "routable"
_DISCONNECTED = "disconnected"  # connected mode without a socket, whatever its status

_Bucket: TypeAlias = "OrderedDict[_Instance, None]"
"""The routable members of an index at one load, oldest arrival first: an insertion-ordered
set, keyed by the record itself (hashed by identity: no string hashing or comparing)."""

_NO_LOAD = 1 << 62
"""An index's lowest load when no member is routable (above any lease count)."""
_LOWEST_STEPS = 4
"""How many loads up `_lowest` looks one by one before taking the minimum of all."""

_COMPACT_SLACK = 32
"""The timer heap is rebuilt once it holds more than twice the armed deadlines plus
`_COMPACT_SLACK` entries: rarely enough that rebuilding costs O(1) per push amortised."""


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """Health thresholds.

    `heartbeat_timeout`: seconds without a heartbeat (or connect) while online before the
    instance is unhealthy and its connection offline (three missed 30 s heartbeats).
    `unhealthy_after_failures`: consecutive failed dispatches that make it unhealthy.
    `deregister_after_failures`: consecutive failed dispatches after which the caller
    should deregister it (at least the unhealthy threshold, so it is unhealthy first).
    """

    heartbeat_timeout: float = 90.0
    unhealthy_after_failures: int = 3
    deregister_after_failures: int = 10

    def __post_init__(self) -> None:
        if not self.heartbeat_timeout > 0:
            raise ValueError("heartbeat_timeout must be > 0")
        if self.unhealthy_after_failures <= 0:
            raise ValueError("unhealthy_after_failures must be > 0")
        if self.deregister_after_failures <= 0:
            raise ValueError("deregister_after_failures must be > 0")
        if self.deregister_after_failures < self.unhealthy_after_failures:
            raise ValueError("deregister_after_failures must be >= unhealthy_after_failures")


@dataclass(frozen=True, slots=True)
class RoutingChanged:
    """An instance's routing status changed (the `agent.health_changed` event)."""

    instance_id: str
    tenant_id: str
    old: str
    new: str


@dataclass(frozen=True, slots=True)
class ConnectionChanged:
    """An instance's connection status changed (dashboard indicators)."""

    instance_id: str
    tenant_id: str
    old: str
    new: str


@dataclass(frozen=True, slots=True)
class DeregisterDue:
    """Too many consecutive failures: the caller deletes the record, then calls remove().
    Emitted once per run of failures."""

    instance_id: str
    tenant_id: str
    reason: str


Change: TypeAlias = RoutingChanged | ConnectionChanged | DeregisterDue


@dataclass(frozen=True, slots=True)
class InstanceState:
    """A snapshot of one instance, detached from the router (what `get_connection` shows).

    `active_sessions` is the number of leases the mesh holds on it; `reported_active_sessions`
    and `load` are what its last heartbeat said (display only).
    """

    instance_id: str
    tenant_id: str
    agent_type: str
    deployment_mode: str
    routing_status: str
    connection_status: str
    active_sessions: int
    max_concurrent_sessions: int
    last_heartbeat_at: float | None
    last_dispatch_error: dict[str, Any] | None
    consecutive_failures: int
    connected: bool
    capabilities: tuple[str, ...]
    reported_active_sessions: int | None = None
    load: float | None = None


class _Index:
    """The instances of one tenant offering one capability (optionally of one agent type):
    all members, the routable ones in buckets by lease count, and members counted by block
    reason."""

    __slots__ = ("buckets", "counts", "low", "members", "spare")

    def __init__(self) -> None:
        self.members: dict[str, _Instance] = {}
        # None until the first routing decision asks this index: an index nobody routes
        # by (a capability never called, an agent type never named) costs no work per
        # dispatch. Then {leases: routable members at that load, in order of arrival},
        # non-empty buckets only.
        self.buckets: dict[int, _Bucket] | None = None
        self.low = _NO_LOAD  # the lowest key of `buckets` (`_NO_LOAD` when none)
        # A bucket emptied, kept for the next load that needs one: an instance alone at
        # the lowest load goes up and down every dispatch, without allocating.
        self.spare: _Bucket | None = None
        self.counts: dict[str, int] = {}

    def add(self, inst: _Instance) -> None:
        """A new member; it enters the buckets when `Router._refresh` places it."""
        self.members[inst.instance_id] = inst
        self.counts[inst.reason] = self.counts.get(inst.reason, 0) + 1

    def discard(self, inst: _Instance) -> None:
        if self.members.pop(inst.instance_id, None) is not None:
            self.counts[inst.reason] -= 1
            if self.buckets is not None and inst.level >= 0:
                self.move(inst, inst.level, -1)

    def activate(self) -> dict[int, _Bucket]:
        """Build the buckets (once, O(members log members)): the routable members, each
        bucket ordered by when its members last changed load, as `move` would have."""
        buckets: dict[int, _Bucket] = {}
        self.buckets = buckets
        for m in sorted(self.members.values(), key=_moved):
            if m.level >= 0:
                bucket = buckets.get(m.level)
                if bucket is None:
                    buckets[m.level] = bucket = OrderedDict()
                bucket[m] = None
        self.low = min(buckets, default=_NO_LOAD)
        return buckets

    def move(self, inst: _Instance, old: int, new: int) -> None:
        """Move `inst` from bucket `old` to the end of bucket `new` (-1: none). O(1) when
        the loads are adjacent, as for a lease taken or given back. Active index only."""
        buckets = self.buckets
        assert buckets is not None
        if new >= 0:
            bucket = buckets.get(new)
            if bucket is None:
                bucket = self.spare
                if bucket is None:
                    bucket = OrderedDict()
                else:
                    self.spare = None
                buckets[new] = bucket
            bucket[inst] = None
            self.low = min(self.low, new)
        if old >= 0:
            bucket = buckets[old]
            del bucket[inst]
            if not bucket:
                del buckets[old]
                self.spare = bucket
                if old == self.low:
                    self.low = _lowest(buckets, old + 1)

    def top(self) -> _Instance | None:
        """The least-loaded routable member that has waited longest at its load. O(1);
        the first call activates the index."""
        buckets = self.buckets if self.buckets is not None else self.activate()
        if not buckets:
            return None
        for inst in buckets[self.low]:
            return inst
        raise AssertionError("empty bucket")  # pragma: no cover - buckets are non-empty


def _moved(inst: _Instance) -> int:
    return inst.moved


def _lowest(buckets: dict[int, _Bucket], start: int) -> int:
    """The lowest load held in `buckets`, all of which are >= `start`: a few steps up from
    `start` (a lease taken moves the lowest load one step), else over the loads held."""
    for level in range(start, start + _LOWEST_STEPS):
        if level in buckets:
            return level
    return min(buckets, default=_NO_LOAD)


class _Instance:
    """The router's live, mutable record of one instance."""

    __slots__ = (
        "agent_type",
        "capabilities",
        "capability_set",
        "confirmed",
        "connection_status",
        "consecutive_failures",
        "deployment_mode",
        "deregister_emitted",
        "failure_tripped",
        "has_socket",
        "hb_status",
        "indexes",
        "instance_id",
        "last_dispatch_error",
        "last_heartbeat_at",
        "lease_ids",
        "leases",
        "level",
        "load",
        "max_sessions",
        "moved",
        "reason",
        "reported_active",
        "routing_status",
        "stale",
        "tenant_id",
        "timer_token",
    )

    def __init__(self, instance_id: str, tenant_id: str) -> None:
        self.instance_id = instance_id
        self.tenant_id = tenant_id
        self.agent_type = ""
        self.deployment_mode = "connected"
        self.capabilities: tuple[str, ...] = ()
        self.capability_set: frozenset[str] = frozenset()
        self.max_sessions = 0
        self.routing_status = "unknown"
        self.connection_status = "unknown"
        self.confirmed = False  # left `unknown` once: never goes back
        self.hb_status: str | None = None
        self.failure_tripped = False  # unhealthy because of consecutive failures
        self.stale = False  # unhealthy because heartbeats were missed
        self.has_socket = False
        self.consecutive_failures = 0
        self.deregister_emitted = False
        self.leases = 0
        self.lease_ids: set[int] = set()
        self.last_heartbeat_at: float | None = None
        self.last_dispatch_error: dict[str, Any] | None = None
        self.reported_active: int | None = None
        self.load: float | None = None
        self.reason = _ROUTABLE
        # The load bucket it is in, in every active index it belongs to: its leases while
        # routable, -1 while not (then in no bucket); `moved` orders arrivals in a bucket.
        self.level = -1
        self.moved = 0
        self.timer_token = 0  # 0: no heartbeat deadline armed
        self.indexes: list[_Index] = []

    def link_up(self) -> bool:
        """Hosted instances are reached per request; connected ones need their socket."""
        return self.deployment_mode == "hosted" or self.has_socket


class Router:
    """Routing decisions and health state for every registered instance of every tenant.

    Not thread-safe and needs no lock: it is driven from one event loop, and `acquire`
    takes its lease synchronously, so two dispatches can never over-fill an instance.
    """

    def __init__(self, config: RouterConfig | None = None) -> None:
        self.config = config if config is not None else RouterConfig()
        self._instances: dict[str, _Instance] = {}
        self._by_cap: dict[tuple[str, str], _Index] = {}
        self._by_type: dict[tuple[str, str, str], _Index] = {}
        # Outstanding lease -> its live instance (`remove` drops its leases from here).
        self._lease_owner: dict[int, _Instance] = {}
        self._timers: list[tuple[float, int, str]] = []
        self._changes: list[Change] = []
        self._next_lease = 0
        self._next_move = 0
        self._next_timer = 0
        self._armed = 0

    # --- registration -----------------------------------------------------------------

    def upsert(
        self,
        instance_id: str,
        *,
        tenant_id: str,
        agent_type: str,
        deployment_mode: str,
        capabilities: Iterable[str],
        max_concurrent_sessions: int,
        now: float,
    ) -> None:
        """Register an instance, or update one that registers again.

        A new instance starts `unknown` / `unknown` and starts no heartbeat clock (that
        starts at connect, or at a hosted instance's first heartbeat). Registering again
        keeps its leases, counters and statuses, since dispatches may be in flight; only
        the declared shape (tenant, type, mode, capabilities, cap) is replaced. With the
        same tenant, type and capabilities it also keeps its place among equally loaded
        instances; otherwise it joins its indexes as the newest arrival at its load. `now`
        is taken for symmetry with the other calls; registration itself reads no time.
        """
        if deployment_mode not in _DEPLOYMENT_MODES:
            raise ValueError("deployment_mode must be 'connected' or 'hosted'")
        if max_concurrent_sessions < 0:
            raise ValueError("max_concurrent_sessions must be >= 0")
        caps = tuple(dict.fromkeys(capabilities))
        cap_set = frozenset(caps)
        inst = self._instances.get(instance_id)
        reindex = True
        if inst is None:
            inst = _Instance(instance_id, tenant_id)
            self._instances[instance_id] = inst
        elif (inst.tenant_id, inst.agent_type, inst.capability_set) == (
            tenant_id,
            agent_type,
            cap_set,
        ):
            reindex = False  # the same indexes: `_refresh` moves it only if its load does
        else:
            self._unindex(inst)
        inst.tenant_id = tenant_id
        inst.agent_type = agent_type
        inst.deployment_mode = deployment_mode
        inst.capabilities = caps
        inst.capability_set = cap_set
        inst.max_sessions = max_concurrent_sessions
        if reindex:
            inst.reason = self._reason(inst)
            self._index(inst)
        self._refresh(inst)

    def remove(self, instance_id: str) -> None:
        """Forget an instance (deregistered). Its outstanding leases become unknown to the
        router, so their later release is a no-op, even if the id registers again."""
        inst = self._instances.pop(instance_id, None)
        if inst is None:
            return
        self._unindex(inst)
        for lease_id in inst.lease_ids:
            self._lease_owner.pop(lease_id, None)
        self._disarm(inst)

    # --- transport ----------------------------------------------------------------------

    def connected(self, instance_id: str, now: float) -> None:
        """A connected-mode instance's socket is up: connection `online`, the heartbeat
        clock (re)starts now, and earlier missed heartbeats are forgiven."""
        inst = self._instances[instance_id]
        if inst.deployment_mode != "connected":
            raise ValueError("only a connected-mode instance has a socket")
        inst.has_socket = True
        inst.stale = False
        self._arm(inst, now)
        self._set_connection(inst, "online")
        self._refresh(inst)

    def disconnected(self, instance_id: str, now: float) -> None:
        """The socket is down: connection `offline`, no heartbeat clock, not routable until
        it connects again (its routing status is kept: it describes the agent, not the
        link). A no-op for an unknown id."""
        inst = self._instances.get(instance_id)
        if inst is None:
            return
        inst.has_socket = False
        if inst.deployment_mode == "connected":
            self._disarm(inst)
            self._set_connection(inst, "offline")
        self._refresh(inst)

    def heartbeat(
        self,
        instance_id: str,
        *,
        status: str | None,
        active_sessions: int,
        max_concurrent_sessions: int | None,
        load: float | None,
        now: float,
        wall: float,
    ) -> str:
        """Record a heartbeat (over the socket or HTTP) and return the routing status.

        The agent is alive: missed heartbeats and failure-unhealthy are lifted (the failure
        count is kept, see the module notes), `status` busy/offline is applied, and the
        clock restarts if the instance is online (hosted, or connected with its socket).
        Raises KeyError for an unknown id and ValueError for values out of range.
        """
        inst = self._instances[instance_id]
        if status not in _HEARTBEAT_STATUSES:
            raise ValueError("status must be 'available', 'busy' or 'offline'")
        if active_sessions < 0:
            raise ValueError("active_sessions must be >= 0")
        if max_concurrent_sessions is not None and max_concurrent_sessions < 0:
            raise ValueError("max_concurrent_sessions must be >= 0")
        if load is not None and not 0.0 <= load <= 1.0:
            raise ValueError("load must be in [0, 1]")
        inst.hb_status = status
        inst.reported_active = active_sessions
        inst.load = load
        if max_concurrent_sessions is not None:
            inst.max_sessions = max_concurrent_sessions
        inst.last_heartbeat_at = wall
        inst.failure_tripped = False
        inst.stale = False
        inst.confirmed = True
        if inst.link_up():
            self._arm(inst, now)
            if inst.connection_status in ("unknown", "offline"):
                self._set_connection(inst, "online")
        self._refresh(inst)
        return inst.routing_status

    # --- dispatch -----------------------------------------------------------------------

    def acquire(
        self,
        tenant_id: str,
        capability: str,
        *,
        agent_type: str | None = None,
        instance_id: str | None = None,
        now: float,
    ) -> Lease:
        """Take one unit of capacity on the best instance for a dispatch, or raise.

        Restricted to the caller's tenant, the capability, and `agent_type` /
        `instance_id` when given; among routable instances the one with the fewest leases
        wins, ties going to the one at that load longest (round robin over equals). O(1).
        Raises RouteError: explicit instance unknown / other tenant / other type -> 404
        INSTANCE_NOT_FOUND, lacking the capability -> 503 AGENT_UNAVAILABLE, without its
        socket -> 502 AGENT_DISCONNECTED, unhealthy -> 502 AGENT_UNHEALTHY, busy / offline
        -> 503 AGENT_UNAVAILABLE. Otherwise: nobody offers the capability -> 503; all
        candidates unhealthy -> 502 AGENT_UNHEALTHY; all disconnected -> 502
        AGENT_DISCONNECTED; any other mix -> 503 AGENT_UNAVAILABLE.
        """
        if self._timers and self._timers[0][0] <= now:
            self.handle_timer(now)
        if instance_id is not None:
            inst = self._instances.get(instance_id)
            if (
                inst is None
                or inst.tenant_id != tenant_id
                or (agent_type is not None and inst.agent_type != agent_type)
            ):
                raise RouteError(
                    404, "INSTANCE_NOT_FOUND", f"no such instance for capability {capability!r}"
                )
            if capability not in inst.capability_set:
                raise RouteError(
                    503, "AGENT_UNAVAILABLE", f"instance does not offer capability {capability!r}"
                )
            if inst.reason != _ROUTABLE:
                raise _blocked_error(inst.reason, capability)
            return self._take(inst)
        index = (
            self._by_cap.get((tenant_id, capability))
            if agent_type is None
            else self._by_type.get((tenant_id, capability, agent_type))
        )
        if index is None or not index.members:
            raise RouteError(
                503, "AGENT_UNAVAILABLE", f"no instance offers capability {capability!r}"
            )
        chosen = index.top()
        if chosen is None:
            total = len(index.members)
            if index.counts.get("unhealthy", 0) == total:
                raise _blocked_error("unhealthy", capability)
            if index.counts.get(_DISCONNECTED, 0) == total:
                raise _blocked_error(_DISCONNECTED, capability)
            raise _blocked_error("busy", capability)
        return self._take(chosen)

    def release(
        self,
        lease: Lease,
        *,
        outcome: str,
        code: str | None = None,
        message: str | None = None,
        now: float,
        wall: float,
    ) -> None:
        """Give a lease back with the dispatch's outcome, exactly once.

        `ok`: failures reset, unhealthy from failures (or from missed heartbeats) lifted,
        connection `healthy`. `failed` (the agent's fault: its error, a deadline, the link
        dropping): the failure count grows, `last_dispatch_error` is set at `wall`,
        connection `degraded`, unhealthy at `unhealthy_after_failures` in a row, one
        DeregisterDue at `deregister_after_failures`. `neutral` (the caller gave up or
        cancelled): only the lease is returned. A lease already released, or of an
        instance removed since, is ignored.
        """
        if outcome not in _OUTCOMES:
            raise ValueError("outcome must be 'ok', 'failed' or 'neutral'")
        inst = self._lease_owner.get(lease.lease_id)
        if inst is None or inst.instance_id != lease.instance_id:
            return
        del self._lease_owner[lease.lease_id]
        inst.lease_ids.discard(lease.lease_id)
        inst.leases -= 1
        deregister = False
        if outcome == "ok":
            inst.consecutive_failures = 0
            inst.failure_tripped = False
            inst.deregister_emitted = False
            inst.confirmed = True
            if inst.stale:
                inst.stale = False
                if inst.link_up():
                    self._arm(inst, now)
            if inst.link_up():
                self._set_connection(inst, "healthy")
        elif outcome == "failed":
            inst.consecutive_failures += 1
            inst.last_dispatch_error = {
                "code": code or "DISPATCH_FAILED",
                "message": message or "",
                "at": wall,
            }
            if inst.consecutive_failures >= self.config.unhealthy_after_failures:
                inst.failure_tripped = True
            if (
                inst.consecutive_failures >= self.config.deregister_after_failures
                and not inst.deregister_emitted
            ):
                inst.deregister_emitted = deregister = True
            if inst.link_up():
                self._set_connection(inst, "degraded")
        self._refresh(inst)
        if deregister:
            self._changes.append(
                DeregisterDue(
                    inst.instance_id,
                    inst.tenant_id,
                    f"{inst.consecutive_failures} consecutive failed dispatches",
                )
            )

    # --- timers -------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When `handle_timer` next has something to do (monotonic seconds), or None."""
        timers = self._timers
        while timers:
            _, token, iid = timers[0]
            inst = self._instances.get(iid)
            if inst is not None and inst.timer_token == token:
                return timers[0][0]
            heapq.heappop(timers)
        return None

    def handle_timer(self, now: float) -> None:
        """Apply every missed-heartbeat deadline due at `now`: routing `unhealthy`,
        connection `offline`. The clock stays stopped until a heartbeat or connect."""
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, token, iid = heapq.heappop(timers)
            inst = self._instances.get(iid)
            if inst is None or inst.timer_token != token:
                continue
            inst.timer_token = 0
            self._armed -= 1
            inst.stale = True
            self._set_connection(inst, "offline")
            self._refresh(inst)

    # --- reading ------------------------------------------------------------------------

    def take_changes(self) -> list[Change]:
        """The changes since the last call, oldest first; the queue is emptied."""
        changes, self._changes = self._changes, []
        return changes

    def get(self, instance_id: str) -> InstanceState | None:
        """A frozen snapshot of one instance, or None if unknown."""
        inst = self._instances.get(instance_id)
        if inst is None:
            return None
        error = inst.last_dispatch_error
        return InstanceState(
            instance_id=inst.instance_id,
            tenant_id=inst.tenant_id,
            agent_type=inst.agent_type,
            deployment_mode=inst.deployment_mode,
            routing_status=inst.routing_status,
            connection_status=inst.connection_status,
            active_sessions=inst.leases,
            max_concurrent_sessions=inst.max_sessions,
            last_heartbeat_at=inst.last_heartbeat_at,
            last_dispatch_error=dict(error) if error is not None else None,
            consecutive_failures=inst.consecutive_failures,
            connected=inst.has_socket,
            capabilities=inst.capabilities,
            reported_active_sessions=inst.reported_active,
            load=inst.load,
        )

    def __len__(self) -> int:
        return len(self._instances)

    def __contains__(self, instance_id: object) -> bool:
        return instance_id in self._instances

    # --- internals ----------------------------------------------------------------------

    def _take(self, inst: _Instance) -> Lease:
        self._next_lease += 1
        lease_id = self._next_lease
        inst.leases += 1
        inst.lease_ids.add(lease_id)
        self._lease_owner[lease_id] = inst
        self._refresh(inst)
        return Lease(
            lease_id=lease_id,
            instance_id=inst.instance_id,
            tenant_id=inst.tenant_id,
            agent_type=inst.agent_type,
            deployment_mode=inst.deployment_mode,
        )

    def _status(self, inst: _Instance) -> str:
        if inst.hb_status == "offline":
            return "offline"
        if inst.failure_tripped or inst.stale:
            return "unhealthy"
        if inst.hb_status == "busy" or 0 < inst.max_sessions <= inst.leases:
            return "busy"
        return "available" if inst.confirmed else "unknown"

    def _reason(self, inst: _Instance) -> str:
        if inst.deployment_mode == "connected" and not inst.has_socket:
            return _DISCONNECTED
        status = inst.routing_status
        return _ROUTABLE if status in ("unknown", "available") else status

    def _refresh(self, inst: _Instance) -> None:
        """Recompute the routing status after any change, queue the change, and keep
        the indexes' counts and load buckets in step."""
        status = self._status(inst)
        if status != "unknown":
            inst.confirmed = True
        if status != inst.routing_status:
            self._changes.append(
                RoutingChanged(inst.instance_id, inst.tenant_id, inst.routing_status, status)
            )
            inst.routing_status = status
        reason = self._reason(inst)
        if reason != inst.reason:
            old = inst.reason
            for index in inst.indexes:
                counts = index.counts
                counts[old] -= 1
                counts[reason] = counts.get(reason, 0) + 1
            inst.reason = reason
        level = inst.leases if reason == _ROUTABLE else -1
        old_level = inst.level
        if level == old_level:
            return
        inst.level = level
        self._next_move += 1
        inst.moved = self._next_move
        for index in inst.indexes:
            if index.buckets is not None:
                index.move(inst, old_level, level)

    def _set_connection(self, inst: _Instance, status: str) -> None:
        if status != inst.connection_status:
            self._changes.append(
                ConnectionChanged(inst.instance_id, inst.tenant_id, inst.connection_status, status)
            )
            inst.connection_status = status

    def _index(self, inst: _Instance) -> None:
        indexes: list[_Index] = []
        for cap in inst.capabilities:
            indexes.append(self._by_cap.setdefault((inst.tenant_id, cap), _Index()))
            indexes.append(
                self._by_type.setdefault((inst.tenant_id, cap, inst.agent_type), _Index())
            )
        for index in indexes:
            index.add(inst)
        inst.indexes = indexes

    def _unindex(self, inst: _Instance) -> None:
        for cap in inst.capabilities:
            key = (inst.tenant_id, cap)
            index = self._by_cap.get(key)
            if index is not None:
                index.discard(inst)
                if not index.members:
                    del self._by_cap[key]
            type_key = (inst.tenant_id, cap, inst.agent_type)
            type_index = self._by_type.get(type_key)
            if type_index is not None:
                type_index.discard(inst)
                if not type_index.members:
                    del self._by_type[type_key]
        inst.indexes = []
        inst.level = -1  # in no bucket now; `_refresh` places it again

    def _arm(self, inst: _Instance, now: float) -> None:
        """(Re)start the missed-heartbeat clock; earlier heap entries go stale."""
        if inst.timer_token == 0:
            self._armed += 1
        self._next_timer += 1
        inst.timer_token = self._next_timer
        heapq.heappush(
            self._timers, (now + self.config.heartbeat_timeout, inst.timer_token, inst.instance_id)
        )
        if len(self._timers) > 2 * self._armed + _COMPACT_SLACK:
            self._timers = [
                entry
                for entry in self._timers
                if (live := self._instances.get(entry[2])) is not None
                and live.timer_token == entry[1]
            ]
            heapq.heapify(self._timers)

    def _disarm(self, inst: _Instance) -> None:
        if inst.timer_token != 0:
            inst.timer_token = 0
            self._armed -= 1


def _blocked_error(reason: str, capability: str) -> RouteError:
    """The fixed-text error for an instance (or all candidates) blocked for `reason`."""
    if reason == _DISCONNECTED:
        return RouteError(
            502, "AGENT_DISCONNECTED", f"agent for capability {capability!r} is disconnected"
        )
    if reason == "unhealthy":
        return RouteError(
            502, "AGENT_UNHEALTHY", f"agent for capability {capability!r} is unhealthy"
        )
    return RouteError(503, "AGENT_UNAVAILABLE", f"no agent available for capability {capability!r}")
