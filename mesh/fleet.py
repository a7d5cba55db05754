"""The fleet: the lifecycle decisions that keep the registry (durable records), the router
(live routing and health state) and the events (what `/events` subscribers see) in step.

Pure like the router: no sockets, no event loop, no clock. `now` (monotonic seconds) and
`wall` (epoch seconds, for timestamps users see) are arguments. The serving code calls one
method per thing that happened (a registration, a socket up or down, a heartbeat, a dispatch
outcome, a timer) and gets the records written, the routing updated and the events published
without having to know how the three relate. After every call the router's queued changes
are applied: a routing change is persisted and published as `agent.health_changed`, a
connection change is persisted, and a `DeregisterDue` deregisters the instance.

Decided (where the spec and seeds leave it open):

* Decided: tool-call depth. An agent that calls a tool routed back to itself (directly or
  round a ring of agents) would loop for ever, so each tool call has a depth and one deeper
  than `max_tool_depth` fails with `TOOL_DEPTH_EXCEEDED` (508) before any lease is taken.
  Every dispatch the mesh sends for a tool call carries `session_context.session_id` = a
  chain id: the caller's own `session_id` when it sent one, else an id derived from the
  call id. The fleet keeps, per (tenant, chain id), the depths of that chain's tool-routed
  dispatches in flight: a tool call whose `session_id` names such a chain is one deeper than
  the chain's deepest. A tool call without `session_id` (or with one that names no chain
  in flight) cannot be placed in a chain, so it is taken conservatively as one deeper than
  the deepest tool-routed dispatch in flight at the calling instance; a caller that is not
  handling any tool-routed dispatch starts at depth 1. Chains are per tenant, so one
  tenant's ids never deepen another's.
* Decided: a tool call's `deadline_ms` is its requested value (default 30000), cut to the
  caller's remaining time when that is known: the latest deadline among the named chain's
  dispatches in flight, and `caller_remaining_ms` when the serving code passes one. No time
  left is `DEADLINE_EXCEEDED` (504).
* Decided: everything kept for tool calls is keyed by lease and removed by
  `end_tool_call`, so memory follows the dispatches in flight and nothing else.
* Decided: dispatch outcomes for health: success is `ok`; the caller's own doing
  (`INVALID_ARGUMENTS`, `CANCELLED`, a refused request, a tool loop) is `neutral`; anything
  else, unknown codes included, is the agent's `failed`.
* Decided: `last_dispatch_error` is stored as `{code, message, at}` with `at` in RFC 3339
  (the `/agents/get_connection` shape) and the message cut to 1024 characters, since it
  is the agent's text and is written to the database.
* Decided: the `svantic_open_websockets` gauge counts instances with a socket, per the
  fleet's own set, so a missed or repeated connect/disconnect cannot push it off by one.
* Decided: at start-up (`load`) the router starts afresh from the records: connected-mode
  instances are offline until their socket comes back; the recorded routing status is
  replaced by the router's (a restart forgets failure counts and heartbeat clocks).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from .events import (
    AGENT_CONNECTED,
    AGENT_DEREGISTERED,
    AGENT_DISCONNECTED,
    AGENT_HEALTH_CHANGED,
    AGENT_REGISTERED,
    REGISTRATION_FLAGGED,
    EventBus,
    rfc3339,
)
from .model import InstanceRow, Lease, RegistryError, RouteError
from .routing import ConnectionChanged, DeregisterDue, Router, RoutingChanged

if TYPE_CHECKING:
    # Types only: the fleet stays importable without the database, crypto or Prometheus
    # modules (and the threads they import) that the implementations bring.
    from .metrics import MeshMetrics
    from .registry import Registry

__all__ = [
    "DEFAULT_TOOL_DEADLINE_MS",
    "NEUTRAL_CODES",
    "REPEATED_FAILURES",
    "Fleet",
    "ToolRoute",
    "health_outcome",
    "transport_of",
]

log = logging.getLogger("svantic.mesh.fleet")

DEFAULT_TOOL_DEADLINE_MS: Final = 30_000
REPEATED_FAILURES: Final = "repeated dispatch failures"
"""The `reason` of an automatic deregistration (seed 001: "after repeated failures")."""
NEUTRAL_CODES: Final = frozenset({
    "INVALID_ARGUMENTS",
    "CANCELLED",
    "INVALID_REQUEST",
    "UNAUTHORIZED",
    "AGENT_TYPE_NOT_ALLOWED",
    "INSTANCE_NOT_FOUND",
    "TOOL_DEPTH_EXCEEDED",
})
"""Codes that say the caller's request was at fault, not the agent: they must not make a
healthy agent unhealthy (a caller sending bad arguments could otherwise evict it)."""
_MAX_ERROR_MESSAGE: Final = 1024
_PAGE: Final = 100


def health_outcome(code: str | None) -> str:
    """The router's outcome for a dispatch that ended with `code` (None: success)."""
    if code is None:
        return "ok"
    return "neutral" if code.upper() in NEUTRAL_CODES else "failed"


def transport_of(deployment_mode: str) -> str:
    """The metrics and `get_connection` transport of a deployment mode."""
    return "ws" if deployment_mode == "connected" else "callback"


def _at(value: Any) -> Any:
    """A stored timestamp as RFC 3339: the router keeps epoch seconds, records may hold
    either that or the string already."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return rfc3339(float(value))
    return value


@dataclass(frozen=True, slots=True)
class ToolRoute:
    """A tool call routed to an instance: the lease of its dispatch, the chain id to send
    as `session_context.session_id`, its depth, and the dispatch's `deadline_ms`."""

    lease: Lease
    chain_id: str
    depth: int
    deadline_ms: int
    caller_instance_id: str
    call_id: str


@dataclass(frozen=True, slots=True)
class _ToolEntry:
    tenant_id: str
    chain_id: str
    depth: int
    deadline_at: float
    target: str


class Fleet:
    """Registry + router + events, moved together. Not thread-safe: driven from the mesh's
    event loop, like the router it wraps."""

    def __init__(
        self,
        *,
        registry: Registry,
        router: Router,
        events: EventBus,
        metrics: MeshMetrics | None = None,
        max_tool_depth: int = 8,
    ) -> None:
        if max_tool_depth < 1:
            raise ValueError("max_tool_depth must be at least 1")
        self.registry = registry
        self.router = router
        self.events = events
        self.metrics = metrics
        self.max_tool_depth = max_tool_depth
        self._sockets: set[str] = set()
        self._applying = False
        # Changes queued by a call that had no wall time (acquire), for the next one that has.
        self._pending: list[RoutingChanged | ConnectionChanged | DeregisterDue] = []
        # Tool calls in flight, by lease id; their chains; their depths per target instance.
        self._tool_routes: dict[int, _ToolEntry] = {}
        self._chains: dict[tuple[str, str], dict[int, _ToolEntry]] = {}
        self._at_instance: dict[str, dict[int, int]] = {}
        # Every registered instance's tenant and dispatch-auth type, kept with the router's
        # entries (`_upsert`, `deregister`): a dispatch reads them here, never the database.
        self._known: dict[str, tuple[str, str]] = {}

    # --- start-up -------------------------------------------------------------------------

    def load(self, now: float) -> int:
        """Give a fresh router every recorded instance (all tenants, page by page) and
        return how many. Connected-mode instances start offline: their sockets died with
        the previous process and come back by reconnecting."""
        count = 0
        after: str | None = None
        while True:
            page = self.registry.list_instances(None, limit=_PAGE, after=after)
            for row in page:
                self._upsert(row, row.capabilities(), now)
                if row.deployment_mode == "connected":
                    self.router.disconnected(row.instance_id, now)
                self._sync_record(row)
                count += 1
            if len(page) < _PAGE:
                break
            after = page[-1].instance_id
        # The records were brought in line above; no events: nobody has subscribed yet, and
        # nothing changed for the agents, only the mesh's memory of them was rebuilt.
        self.router.take_changes()
        log.info("loaded %d registered instances", count)
        return count

    # --- registration ---------------------------------------------------------------------

    def registered(
        self,
        row: InstanceRow,
        *,
        secret: str | None,
        created: bool,
        flagged: bool,
        now: float,
        wall: float,
    ) -> None:
        """An admitted registration (policy, mode and probe already checked): record it,
        route to it, and tell the tenant's subscribers.

        A re-registration keeps what the mesh knows live (statuses, last heartbeat, last
        error): the request describes the agent, not its health.
        """
        state = self.router.get(row.instance_id)
        record = row
        if state is not None:
            record = dataclasses.replace(
                record,
                routing_status=state.routing_status,
                connection_status=state.connection_status,
            )
        # The merge with what is stored happens inside the upsert (`keep_observed`), so a
        # heartbeat another mesh process wrote meanwhile is not undone.
        self.registry.put_instance(record, secret=secret, keep_observed=not created)
        self._upsert(record, record.capabilities(), now)
        log.info(
            "%s instance %s (tenant %s, type %s, %s)",
            "registered" if created else "re-registered",
            row.instance_id, row.tenant_id, row.agent_type, row.deployment_mode,
        )
        self.events.publish(
            AGENT_REGISTERED,
            row.tenant_id,
            {
                "instance_id": row.instance_id,
                "agent_type": row.agent_type,
                "deployment_mode": row.deployment_mode,
                "created": created,
            },
            wall,
        )
        if flagged:
            log.info(
                "registration of instance %s flagged for review: type %s is not allowed-listed",
                row.instance_id, row.agent_type,
            )
            self.events.publish(
                REGISTRATION_FLAGGED,
                row.tenant_id,
                {"instance_id": row.instance_id, "agent_type": row.agent_type},
                wall,
            )
        self._apply(now, wall)

    def deregister(self, instance_id: str, *, reason: str, now: float, wall: float) -> bool:
        """Delete the record and stop routing to it; False when neither knew the id.

        The serving code closes the instance's socket, if it has one; its in-flight
        dispatches end through `finished` as usual (the router ignores their leases)."""
        row = self.registry.get_instance(instance_id)
        state = self.router.get(instance_id)
        deleted = self.registry.delete_instance(instance_id)
        self.router.remove(instance_id)
        self._known.pop(instance_id, None)
        if instance_id in self._sockets:
            self._sockets.discard(instance_id)
            if self.metrics is not None:
                self.metrics.websocket_closed()
        tenant_id = row.tenant_id if row is not None else state.tenant_id if state else None
        if tenant_id is None:
            return False
        agent_type = row.agent_type if row is not None else state.agent_type if state else ""
        log.info("deregistered instance %s (tenant %s): %s", instance_id, tenant_id, reason)
        self.events.publish(
            AGENT_DEREGISTERED,
            tenant_id,
            {"instance_id": instance_id, "agent_type": agent_type, "reason": reason},
            wall,
        )
        self._apply(now, wall)
        return deleted or state is not None

    # --- transport ------------------------------------------------------------------------

    def learn(self, instance_id: str, now: float) -> bool:
        """Route to an instance another mesh process registered (scale-out): its record is
        read back, nothing is written and nothing published (that process did both). A
        re-registration keeps what the router knows live. False when the record is gone."""
        row = self.registry.get_instance(instance_id)
        if row is None:
            return False
        known = instance_id in self.router
        self._upsert(row, row.capabilities(), now)
        if not known and row.deployment_mode == "connected":
            self.router.disconnected(instance_id, now)
        self.router.take_changes()
        return True

    def agent_connected(
        self, instance_id: str, *, capabilities: Sequence[str], now: float, wall: float,
        remote: bool = False,
    ) -> bool:
        """A connected-mode instance's socket is ready (after its `welcome`). The hello's
        capabilities are added to the registered ones. False for an unknown instance (the
        handshake should have refused it); ValueError for a hosted one.

        `remote`: the socket is held by another mesh process (scale-out): routed to, but
        not counted in this process's `svantic_open_websockets`."""
        row = self.registry.get_instance(instance_id)
        if row is None:
            return False
        if row.deployment_mode != "connected":
            raise ValueError("only a connected-mode instance has a socket")
        declared = row.capabilities()
        merged = declared + [c for c in dict.fromkeys(capabilities) if c not in declared]
        self._upsert(row, merged, now)
        self.router.connected(instance_id, now)
        if remote:
            self._sockets.discard(instance_id)
        elif instance_id not in self._sockets:
            self._sockets.add(instance_id)
            if self.metrics is not None:
                self.metrics.websocket_opened()
        log.info("instance %s connected (tenant %s)", instance_id, row.tenant_id)
        self.events.publish(
            AGENT_CONNECTED,
            row.tenant_id,
            {"instance_id": instance_id, "agent_type": row.agent_type},
            wall,
        )
        self._apply(now, wall)
        return True

    def agent_disconnected(self, instance_id: str, now: float, wall: float) -> None:
        """The instance's socket is gone. A no-op apart from the gauge for an instance
        already deregistered (its record went first, then its socket)."""
        if instance_id in self._sockets:
            self._sockets.discard(instance_id)
            if self.metrics is not None:
                self.metrics.websocket_closed()
        state = self.router.get(instance_id)
        if state is None:
            return
        self.router.disconnected(instance_id, now)
        log.info("instance %s disconnected (tenant %s)", instance_id, state.tenant_id)
        self.events.publish(
            AGENT_DISCONNECTED,
            state.tenant_id,
            {"instance_id": instance_id, "agent_type": state.agent_type},
            wall,
        )
        self._apply(now, wall)

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
        """Record a heartbeat (socket or HTTP) and return the routing status. RouteError
        404 `INSTANCE_NOT_FOUND` for an unknown instance; ValueError for values out of
        range (the router's checks)."""
        if instance_id not in self.router:
            raise RouteError(404, "INSTANCE_NOT_FOUND", "no such instance")
        routing_status = self.router.heartbeat(
            instance_id,
            status=status,
            active_sessions=active_sessions,
            max_concurrent_sessions=max_concurrent_sessions,
            load=load,
            now=now,
            wall=wall,
        )
        self._save_status(instance_id, last_heartbeat_at=wall)
        self._apply(now, wall)
        return routing_status

    # --- dispatch -------------------------------------------------------------------------

    def acquire(
        self,
        tenant_id: str,
        capability: str,
        *,
        agent_type: str | None = None,
        instance_id: str | None = None,
        now: float,
        wall: float | None = None,
    ) -> Lease:
        """A lease on the best instance (router.acquire; RouteError propagates).

        The router first applies heartbeat deadlines already due at `now`; the changes
        that makes are applied here when `wall` is given, else by the next call that has a
        wall time (`tick` at the latest), since an event needs a timestamp."""
        try:
            return self.router.acquire(
                tenant_id, capability, agent_type=agent_type, instance_id=instance_id, now=now
            )
        finally:
            if wall is not None:
                self._apply(now, wall)
            elif not self._applying:
                self._pending.extend(self.router.take_changes())

    def finished(
        self,
        lease: Lease,
        *,
        code: str | None,
        message: str | None,
        transport: str,
        seconds: float,
        now: float,
        wall: float,
        health: str | None = None,
    ) -> None:
        """A dispatch ended (code None: success). The lease goes back with its health
        outcome, a failure is recorded on the instance, and the metrics count it.

        `health` overrides the outcome the code implies (`neutral`: a refusal that says
        nothing about the agent, such as another mesh process holding its capacity)."""
        outcome = health_outcome(code) if health is None else health
        text = (message or "")[:_MAX_ERROR_MESSAGE]
        self.router.release(lease, outcome=outcome, code=code, message=text, now=now, wall=wall)
        if outcome == "failed":
            self._save_status(
                lease.instance_id,
                last_dispatch_error={
                    "code": code or "DISPATCH_FAILED", "message": text, "at": rfc3339(wall),
                },
            )
        if self.metrics is not None:
            self.metrics.dispatch_finished(transport, code, seconds)
        self._apply(now, wall)

    # --- timers ---------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When `tick` next has work (monotonic seconds), or None."""
        return self.router.next_deadline()

    def tick(self, now: float, wall: float) -> None:
        """Run the router's timers due at `now` (missed heartbeats)."""
        self.router.handle_timer(now)
        self._apply(now, wall)

    # --- reading --------------------------------------------------------------------------

    def tenant_of(self, instance_id: str) -> str | None:
        """The tenant a registered instance belongs to, from memory (None: not registered
        here). The control plane's ownership check on every dispatch reads this."""
        known = self._known.get(instance_id)
        return None if known is None else known[0]

    def dispatch_auth_type(self, instance_id: str) -> str | None:
        """The dispatch-auth type the instance registered (`svantic_jwt`, `shared_secret`),
        from memory (None: not registered here): every dispatch's envelope is minted by it,
        so it is kept with the routing state rather than read from the registry each time.
        The registry stays the record; this follows every write the fleet makes to it."""
        known = self._known.get(instance_id)
        return None if known is None else known[1]

    def status(self, instance_id: str) -> dict[str, Any] | None:
        """The `/agents/get_connection` answer for one instance (spec 6), or None: live
        values from the router, the rest from the record."""
        row = self.registry.get_instance(instance_id)
        if row is None:
            return None
        state = self.router.get(instance_id)
        heartbeat = row.last_heartbeat_at
        error = row.last_dispatch_error
        routing, connection, active = row.routing_status, row.connection_status, 0
        if state is not None:
            routing, connection = state.routing_status, state.connection_status
            active = state.active_sessions
            if state.last_heartbeat_at is not None:
                heartbeat = state.last_heartbeat_at
            if state.last_dispatch_error is not None:
                error = state.last_dispatch_error
        return {
            "instance_id": row.instance_id,
            "agent_type": row.agent_type,
            "deployment_mode": row.deployment_mode,
            "transport": transport_of(row.deployment_mode),
            "connection_status": connection,
            "routing_status": routing,
            "active_sessions": active,
            "last_heartbeat_at": None if heartbeat is None else rfc3339(heartbeat),
            "last_dispatch_error": None if error is None else {
                "code": error.get("code"),
                "message": error.get("message", ""),
                "at": _at(error.get("at")),
            },
        }

    # --- tool calls -----------------------------------------------------------------------

    def begin_tool_call(
        self,
        caller_instance_id: str,
        call_id: str,
        *,
        tool: str,
        agent_type: str | None,
        instance_id: str | None,
        session_id: str | None,
        deadline_ms: int | None,
        now: float,
        caller_remaining_ms: int | None = None,
    ) -> ToolRoute:
        """Route one `tool_call` of a connected instance, or raise RouteError (routing
        errors, 404 for an unknown caller, 508 `TOOL_DEPTH_EXCEEDED`, 504
        `DEADLINE_EXCEEDED`). The serving code sends the dispatch with `route.chain_id` as
        its session id and `route.deadline_ms`, then calls `end_tool_call` exactly once."""
        try:
            return self._begin_tool_call(
                caller_instance_id, call_id, tool=tool, agent_type=agent_type,
                instance_id=instance_id, session_id=session_id, deadline_ms=deadline_ms,
                now=now, caller_remaining_ms=caller_remaining_ms,
            )
        except RouteError as exc:
            if self.metrics is not None:
                self.metrics.tool_call(exc.code)
            raise

    def _begin_tool_call(
        self,
        caller_instance_id: str,
        call_id: str,
        *,
        tool: str,
        agent_type: str | None,
        instance_id: str | None,
        session_id: str | None,
        deadline_ms: int | None,
        now: float,
        caller_remaining_ms: int | None,
    ) -> ToolRoute:
        caller = self.router.get(caller_instance_id)
        if caller is None:
            raise RouteError(404, "INSTANCE_NOT_FOUND", "the calling instance is not registered")
        tenant_id = caller.tenant_id
        chain = self._chains.get((tenant_id, session_id)) if session_id else None
        if chain:
            chain_id = session_id or ""
            depth = max(e.depth for e in chain.values()) + 1
            remaining_s: float | None = max(e.deadline_at for e in chain.values()) - now
        else:
            chain_id = session_id or _derived_chain_id(caller_instance_id, call_id)
            inherited = self._at_instance.get(caller_instance_id)
            depth = (max(inherited.values()) if inherited else 0) + 1
            remaining_s = None
        if depth > self.max_tool_depth:
            log.warning(
                "tool call %s from instance %s refused: depth %d is over %d",
                call_id, caller_instance_id, depth, self.max_tool_depth,
            )
            raise RouteError(
                508, "TOOL_DEPTH_EXCEEDED",
                f"tool call depth {depth} exceeds the limit of {self.max_tool_depth}",
            )
        budget = deadline_ms if deadline_ms is not None and deadline_ms > 0 else (
            DEFAULT_TOOL_DEADLINE_MS
        )
        if remaining_s is not None:
            budget = min(budget, int(remaining_s * 1000))
        if caller_remaining_ms is not None:
            budget = min(budget, caller_remaining_ms)
        if budget <= 0:
            raise RouteError(504, "DEADLINE_EXCEEDED", "the caller has no time left")
        lease = self.acquire(
            tenant_id, tool, agent_type=agent_type, instance_id=instance_id, now=now
        )
        entry = _ToolEntry(tenant_id, chain_id, depth, now + budget / 1000.0, lease.instance_id)
        self._tool_routes[lease.lease_id] = entry
        self._chains.setdefault((tenant_id, chain_id), {})[lease.lease_id] = entry
        self._at_instance.setdefault(lease.instance_id, {})[lease.lease_id] = depth
        return ToolRoute(lease, chain_id, depth, budget, caller_instance_id, call_id)

    def end_tool_call(
        self,
        route: ToolRoute,
        *,
        code: str | None,
        message: str | None,
        seconds: float,
        now: float,
        wall: float,
    ) -> None:
        """The tool call's dispatch ended (code None: success): `finished` for its lease,
        the tool-call metric, and its depth bookkeeping dropped. Use it instead of
        `finished` for a tool-routed dispatch; a second call is a no-op."""
        entry = self._tool_routes.pop(route.lease.lease_id, None)
        if entry is None:
            return
        key = (entry.tenant_id, entry.chain_id)
        chain = self._chains.get(key)
        if chain is not None:
            chain.pop(route.lease.lease_id, None)
            if not chain:
                del self._chains[key]
        depths = self._at_instance.get(entry.target)
        if depths is not None:
            depths.pop(route.lease.lease_id, None)
            if not depths:
                del self._at_instance[entry.target]
        if self.metrics is not None:
            self.metrics.tool_call(code)
        self.finished(
            route.lease, code=code, message=message,
            transport=transport_of(route.lease.deployment_mode), seconds=seconds,
            now=now, wall=wall,
        )

    @property
    def tool_calls_in_flight(self) -> int:
        """Tool-routed dispatches not yet ended (what the bookkeeping holds)."""
        return len(self._tool_routes)

    @property
    def tool_chains(self) -> int:
        """Chains with a tool-routed dispatch in flight."""
        return len(self._chains)

    # --- internals ------------------------------------------------------------------------

    def _upsert(self, row: InstanceRow, capabilities: Sequence[str], now: float) -> None:
        self.router.upsert(
            row.instance_id,
            tenant_id=row.tenant_id,
            agent_type=row.agent_type,
            deployment_mode=row.deployment_mode,
            capabilities=capabilities,
            max_concurrent_sessions=row.max_concurrent_sessions,
            now=now,
        )
        self._known[row.instance_id] = (row.tenant_id, row.dispatch_auth_type)

    def _sync_record(self, row: InstanceRow) -> None:
        """Write the router's statuses to a record that says otherwise (start-up)."""
        state = self.router.get(row.instance_id)
        if state is None:
            return
        if (state.routing_status, state.connection_status) != (
            row.routing_status, row.connection_status,
        ):
            self.registry.update_status(
                row.instance_id,
                routing_status=state.routing_status,
                connection_status=state.connection_status,
            )

    def _persist(self, change: RoutingChanged | ConnectionChanged | DeregisterDue) -> None:
        """Save a status change. With the records out of reach it is not saved (the router
        keeps it, and the next change of that instance writes the latest): one WARNING, and
        the other changes and their events still go out."""
        if isinstance(change, RoutingChanged):
            self._save_status(change.instance_id, routing_status=change.new)
        elif isinstance(change, ConnectionChanged):
            self._save_status(change.instance_id, connection_status=change.new)

    def _save_status(self, instance_id: str, **fields: Any) -> None:
        """Write what the fleet observed (statuses, last heartbeat, last error) to the
        records. Out of reach, it is not saved: the fleet's memory keeps routing, the next
        write of that instance saves the latest, and one WARNING says so (no traceback, and
        the rest of the caller's work still happens)."""
        try:
            self.registry.update_status(instance_id, **fields)
        except RegistryError as exc:
            log.warning("instance %s status not saved: records unavailable (%s)",
                        instance_id, exc)

    def _apply(self, now: float, wall: float) -> None:
        """Persist and publish the router's queued changes; deregistrations it asks for
        may queue more, so loop until none are left. Re-entry (from the `deregister` called
        here) just returns: this loop picks its changes up."""
        if self._applying:
            return
        self._applying = True
        try:
            changes = self._pending + self.router.take_changes()
            self._pending = []
            while changes:
                for change in changes:
                    self._persist(change)
                    if isinstance(change, RoutingChanged):
                        log.info(
                            "instance %s routing status %s -> %s",
                            change.instance_id, change.old, change.new,
                        )
                        self.events.publish(
                            AGENT_HEALTH_CHANGED,
                            change.tenant_id,
                            {"instance_id": change.instance_id, "old": change.old,
                             "new": change.new},
                            wall,
                        )
                    elif isinstance(change, DeregisterDue):
                        log.info(
                            "instance %s is due for deregistration: %s",
                            change.instance_id, change.reason,
                        )
                        self.deregister(
                            change.instance_id, reason=REPEATED_FAILURES, now=now, wall=wall
                        )
                changes = self.router.take_changes()
        finally:
            self._applying = False


def _derived_chain_id(caller_instance_id: str, call_id: str) -> str:
    """A chain id for a tool call that named no session: stable for the call, opaque, and
    not shared with another instance's call of the same id."""
    digest = hashlib.sha256(f"{caller_instance_id}\0{call_id}".encode()).hexdigest()
    return f"chain-{digest[:32]}"
