"""The fleet keeps the registry, the router and the events in step; tool-call depth is
bounded and its bookkeeping does not outlive the calls."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import pytest
from svantic_mesh.events import EventBus, Subscription
from svantic_mesh.fleet import Fleet, ToolRoute, health_outcome
from svantic_mesh.metrics import MeshMetrics
from svantic_mesh.model import InstanceRow, RouteError
from svantic_mesh.registry import SqliteRegistry
from svantic_mesh.routing import Router, RouterConfig

WALL = 1_700_000_000.0
KEY = bytes(range(32))


@dataclass
class Mesh:
    registry: SqliteRegistry
    router: Router
    bus: EventBus
    metrics: MeshMetrics
    fleet: Fleet
    subs: dict[str, Subscription] = field(default_factory=dict)

    def events(self, tenant: str = "t1") -> list[dict[str, Any]]:
        """The tenant's events since the last call, decoded from their SSE bytes."""
        out = []
        for raw in self.subs[tenant].drain():
            lines = raw.decode().split("\n")
            data = "\n".join(x[6:] for x in lines if x.startswith("data: "))
            out.append(json.loads(data))
        return out

    def kinds(self, tenant: str = "t1") -> list[str]:
        return [e["type"] for e in self.events(tenant)]


def make(
    config: RouterConfig | None = None,
    registry: SqliteRegistry | None = None,
    max_tool_depth: int = 8,
) -> Mesh:
    reg = registry if registry is not None else SqliteRegistry(":memory:", secret_key=KEY)
    router = Router(config or RouterConfig())
    bus = EventBus()
    metrics = MeshMetrics()
    fleet = Fleet(
        registry=reg, router=router, events=bus, metrics=metrics, max_tool_depth=max_tool_depth
    )
    mesh = Mesh(reg, router, bus, metrics, fleet)
    mesh.subs = {t: bus.subscribe(t) for t in ("t1", "t2")}
    return mesh


def row(
    instance_id: str,
    *,
    tenant: str = "t1",
    mode: str = "connected",
    tools: tuple[str, ...] = ("get_ticket",),
    agent_type: str = "navigator",
) -> InstanceRow:
    return InstanceRow(
        instance_id=instance_id,
        tenant_id=tenant,
        agent_type=agent_type,
        deployment_mode=mode,
        url="https://agent.example" if mode == "hosted" else None,
        tools=[{"name": t} for t in tools],
        registered_at=WALL,
    )


def register(m: Mesh, r: InstanceRow, *, flagged: bool = False, now: float = 0.0) -> None:
    m.fleet.registered(r, secret=None, created=True, flagged=flagged, now=now, wall=WALL)


def metric(m: Mesh, name: str, **labels: str) -> float:
    value = m.metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


def active(m: Mesh, instance_id: str) -> int:
    state = m.router.get(instance_id)
    assert state is not None
    return state.active_sessions


# --- registration ----------------------------------------------------------------------------


def test_register_records_routes_and_publishes(caplog: pytest.LogCaptureFixture) -> None:
    m = make()
    with caplog.at_level(logging.INFO, logger="svantic.mesh"):
        register(m, row("nav-1"), flagged=True)
    stored = m.registry.get_instance("nav-1")
    assert stored is not None and stored.tenant_id == "t1"
    state = m.router.get("nav-1")
    assert state is not None and state.capabilities == ("get_ticket",)
    events = m.events()
    assert [e["type"] for e in events] == ["agent.registered", "registration_flagged"]
    assert events[0]["instance_id"] == "nav-1"
    assert events[0]["agent_type"] == "navigator"
    assert events[0]["deployment_mode"] == "connected"
    assert events[1]["instance_id"] == "nav-1"
    assert m.events("t2") == []  # another tenant sees nothing
    assert "registered instance nav-1" in caplog.text


def test_reregister_keeps_live_state() -> None:
    m = make()
    register(m, row("nav-1"))
    m.fleet.agent_connected("nav-1", capabilities=[], now=1, wall=WALL)
    m.fleet.heartbeat(
        "nav-1", status=None, active_sessions=0, max_concurrent_sessions=None, load=None,
        now=2, wall=WALL + 2,
    )
    m.fleet.registered(
        row("nav-1", tools=("get_ticket", "close_ticket")), secret=None, created=False,
        flagged=False, now=3, wall=WALL + 3,
    )
    stored = m.registry.get_instance("nav-1")
    assert stored is not None
    assert stored.connection_status == "online"
    assert stored.routing_status == "available"
    assert stored.last_heartbeat_at == WALL + 2
    state = m.router.get("nav-1")
    assert state is not None and state.connected
    assert "close_ticket" in state.capabilities


# --- connection --------------------------------------------------------------------------------


def test_connect_and_disconnect(caplog: pytest.LogCaptureFixture) -> None:
    m = make()
    register(m, row("nav-1"))
    m.events()
    with caplog.at_level(logging.INFO, logger="svantic.mesh"):
        assert m.fleet.agent_connected("nav-1", capabilities=["extra_tool"], now=1, wall=WALL)
    assert m.kinds() == ["agent.connected"]
    stored = m.registry.get_instance("nav-1")
    assert stored is not None and stored.connection_status == "online"
    state = m.router.get("nav-1")
    assert state is not None and state.connected
    assert state.capabilities == ("get_ticket", "extra_tool")  # hello merged with record
    assert metric(m, "svantic_open_websockets") == 1
    lease = m.fleet.acquire("t1", "extra_tool", now=2)
    assert lease.instance_id == "nav-1"

    with caplog.at_level(logging.INFO, logger="svantic.mesh"):
        m.fleet.agent_disconnected("nav-1", now=3, wall=WALL + 3)
    assert m.kinds() == ["agent.disconnected"]
    stored = m.registry.get_instance("nav-1")
    assert stored is not None and stored.connection_status == "offline"
    assert metric(m, "svantic_open_websockets") == 0
    with pytest.raises(RouteError) as err:
        m.fleet.acquire("t1", "get_ticket", now=4)
    assert err.value.code == "AGENT_DISCONNECTED"
    assert "instance nav-1 connected" in caplog.text
    assert "instance nav-1 disconnected" in caplog.text
    # A repeated disconnect does not push the gauge below zero.
    m.fleet.agent_disconnected("nav-1", now=5, wall=WALL + 5)
    assert metric(m, "svantic_open_websockets") == 0


def test_connect_of_unknown_instance() -> None:
    m = make()
    assert not m.fleet.agent_connected("ghost", capabilities=[], now=0, wall=WALL)
    m.fleet.agent_disconnected("ghost", now=0, wall=WALL)  # no-op
    assert m.events() == []


def test_heartbeat_persists_and_answers_status() -> None:
    m = make()
    register(m, row("web-1", mode="hosted"))
    status = m.fleet.heartbeat(
        "web-1", status="busy", active_sessions=2, max_concurrent_sessions=4, load=0.5,
        now=1, wall=WALL + 1,
    )
    assert status == "busy"
    stored = m.registry.get_instance("web-1")
    assert stored is not None
    assert stored.last_heartbeat_at == WALL + 1 and stored.routing_status == "busy"
    health = [e for e in m.events() if e["type"] == "agent.health_changed"]
    assert health[-1]["old"] == "unknown" and health[-1]["new"] == "busy"
    with pytest.raises(RouteError) as err:
        m.fleet.heartbeat(
            "ghost", status=None, active_sessions=0, max_concurrent_sessions=None, load=None,
            now=1, wall=WALL,
        )
    assert err.value.status == 404


def test_missed_heartbeats_via_tick() -> None:
    m = make(RouterConfig(heartbeat_timeout=10))
    register(m, row("nav-1"))
    m.fleet.agent_connected("nav-1", capabilities=[], now=0, wall=WALL)
    m.events()
    deadline = m.fleet.next_deadline()
    assert deadline == 10
    m.fleet.tick(deadline, WALL + 10)
    events = m.events()
    assert [e["type"] for e in events] == ["agent.health_changed"]
    assert events[0]["new"] == "unhealthy"
    stored = m.registry.get_instance("nav-1")
    assert stored is not None
    assert (stored.routing_status, stored.connection_status) == ("unhealthy", "offline")


# --- dispatch outcomes ------------------------------------------------------------------------


def test_health_outcomes() -> None:
    assert health_outcome(None) == "ok"
    assert health_outcome("INVALID_ARGUMENTS") == "neutral"
    assert health_outcome("CANCELLED") == "neutral"
    for code in ("DISPATCH_FAILED", "DEADLINE_EXCEEDED", "AGENT_DISCONNECTED", "INTERNAL",
                 "DISPATCH_AUTH_FAILED", "CAPABILITY_NOT_FOUND", "SOMETHING_NEW"):
        assert health_outcome(code) == "failed"


def test_finished_records_last_dispatch_error_and_status() -> None:
    m = make()
    register(m, row("web-1", mode="hosted"))
    lease = m.fleet.acquire("t1", "get_ticket", now=1)
    assert (m.fleet.status("web-1") or {})["active_sessions"] == 1
    m.fleet.finished(
        lease, code="DISPATCH_FAILED", message="boom", transport="callback", seconds=0.5,
        now=2, wall=WALL + 2,
    )
    stored = m.registry.get_instance("web-1")
    assert stored is not None
    assert stored.last_dispatch_error == {
        "code": "DISPATCH_FAILED", "message": "boom", "at": "2023-11-14T22:13:22.000Z",
    }
    assert stored.connection_status == "degraded"
    assert m.fleet.status("web-1") == {
        "instance_id": "web-1",
        "agent_type": "navigator",
        "deployment_mode": "hosted",
        "transport": "callback",
        "connection_status": "degraded",
        "routing_status": "unknown",
        "active_sessions": 0,
        "last_heartbeat_at": None,
        "last_dispatch_error": {
            "code": "DISPATCH_FAILED", "message": "boom", "at": "2023-11-14T22:13:22.000Z",
        },
    }
    assert m.fleet.status("ghost") is None
    outcome = {"transport": "callback", "outcome": "dispatch_failed"}
    assert metric(m, "svantic_dispatches_total", **outcome) == 1
    # A neutral outcome leaves the record alone.
    lease = m.fleet.acquire("t1", "get_ticket", now=3)
    m.fleet.finished(
        lease, code="INVALID_ARGUMENTS", message="bad", transport="callback", seconds=0.1,
        now=4, wall=WALL + 4,
    )
    stored = m.registry.get_instance("web-1")
    assert stored is not None and stored.last_dispatch_error is not None
    assert stored.last_dispatch_error["code"] == "DISPATCH_FAILED"


def test_repeated_failures_unhealthy_then_deregistered(caplog: pytest.LogCaptureFixture) -> None:
    m = make(RouterConfig(unhealthy_after_failures=2, deregister_after_failures=3))
    register(m, row("web-1", mode="hosted"))
    register(m, row("web-2", mode="hosted", tools=("other",)))
    m.events()
    leases = [m.fleet.acquire("t1", "get_ticket", now=1) for _ in range(3)]
    with caplog.at_level(logging.INFO, logger="svantic.mesh"):
        for i, lease in enumerate(leases):
            m.fleet.finished(
                lease, code="DEADLINE_EXCEEDED", message="late", transport="callback",
                seconds=30, now=2 + i, wall=WALL + i,
            )
    events = m.events()
    health = [e for e in events if e["type"] == "agent.health_changed"]
    assert health and health[-1]["new"] == "unhealthy"
    gone = [e for e in events if e["type"] == "agent.deregistered"]
    assert len(gone) == 1
    assert gone[0]["instance_id"] == "web-1"
    assert gone[0]["reason"] == "repeated dispatch failures"
    assert events[-1]["type"] == "agent.deregistered"
    assert m.registry.get_instance("web-1") is None
    assert m.router.get("web-1") is None
    assert m.registry.get_instance("web-2") is not None
    assert "deregistered instance web-1" in caplog.text
    with pytest.raises(RouteError):
        m.fleet.acquire("t1", "get_ticket", now=10)


def test_manual_deregister() -> None:
    m = make()
    register(m, row("nav-1"))
    m.fleet.agent_connected("nav-1", capabilities=[], now=0, wall=WALL)
    m.events()
    assert m.fleet.deregister("nav-1", reason="requested", now=1, wall=WALL)
    assert m.events() == [{
        "type": "agent.deregistered", "tenant_id": "t1", "at": "2023-11-14T22:13:20.000Z",
        "instance_id": "nav-1", "agent_type": "navigator", "reason": "requested",
    }]
    assert metric(m, "svantic_open_websockets") == 0
    assert not m.fleet.deregister("nav-1", reason="again", now=2, wall=WALL)
    m.fleet.agent_disconnected("nav-1", now=3, wall=WALL)  # its socket closes afterwards
    assert m.events() == []
    assert metric(m, "svantic_open_websockets") == 0


# --- restart ---------------------------------------------------------------------------------


def test_load_after_restart_restores_routing() -> None:
    first = make()
    register(first, row("nav-1"))
    register(first, row("web-1", mode="hosted", tools=("lookup",)))
    register(first, row("other-1", tenant="t2", mode="hosted", tools=("lookup",)))
    first.fleet.agent_connected("nav-1", capabilities=[], now=0, wall=WALL)

    second = make(registry=first.registry)  # new router, same records
    assert second.fleet.load(now=100) == 3
    assert second.events() == []
    stored = second.registry.get_instance("nav-1")
    assert stored is not None and stored.connection_status == "offline"
    assert second.fleet.acquire("t1", "lookup", now=101).instance_id == "web-1"
    assert second.fleet.acquire("t2", "lookup", now=101).instance_id == "other-1"
    with pytest.raises(RouteError) as err:
        second.fleet.acquire("t1", "get_ticket", now=101)
    assert err.value.code == "AGENT_DISCONNECTED"
    second.fleet.agent_connected("nav-1", capabilities=[], now=102, wall=WALL)
    assert second.fleet.acquire("t1", "get_ticket", now=103).instance_id == "nav-1"


def test_load_pages_through_every_instance() -> None:
    first = make()
    for i in range(230):
        first.registry.put_instance(row(f"i-{i:03d}", tenant=f"t{i % 3}", mode="hosted"))
    second = make(registry=first.registry)
    assert second.fleet.load(now=0) == 230
    assert len(second.router) == 230


# --- tool calls -------------------------------------------------------------------------------


def tool_mesh(max_tool_depth: int = 3) -> Mesh:
    m = make(max_tool_depth=max_tool_depth)
    register(m, row("loop-1", tools=("recurse",), agent_type="looper"))
    m.fleet.agent_connected("loop-1", capabilities=[], now=0, wall=WALL)
    return m


def test_tool_chain_stops_at_max_depth_and_cleans_up() -> None:
    m = tool_mesh(max_tool_depth=3)
    routes: list[ToolRoute] = []
    session: str | None = None
    with pytest.raises(RouteError) as err:
        for hop in range(10):
            route = m.fleet.begin_tool_call(
                "loop-1", f"call-{hop}", tool="recurse", agent_type=None, instance_id=None,
                session_id=session, deadline_ms=None, now=hop,
            )
            routes.append(route)
            session = route.chain_id  # the callee sees it as its session and passes it on
    assert err.value.code == "TOOL_DEPTH_EXCEEDED" and err.value.status == 508
    assert [r.depth for r in routes] == [1, 2, 3]
    assert len({r.chain_id for r in routes}) == 1
    assert m.fleet.tool_calls_in_flight == 3 and m.fleet.tool_chains == 1
    assert active(m, "loop-1") == 3
    assert metric(m, "svantic_tool_calls_total", outcome="tool_depth_exceeded") == 1

    for i, route in enumerate(reversed(routes)):
        m.fleet.end_tool_call(route, code=None, message=None, seconds=0.1, now=20 + i,
                              wall=WALL)
        m.fleet.end_tool_call(route, code=None, message=None, seconds=0.1, now=20 + i,
                              wall=WALL)  # a second end is a no-op
    assert m.fleet.tool_calls_in_flight == 0 and m.fleet.tool_chains == 0
    assert m.fleet._at_instance == {}
    assert active(m, "loop-1") == 0
    assert metric(m, "svantic_tool_calls_total", outcome="ok") == 3
    assert metric(m, "svantic_dispatches_total", transport="ws", outcome="ok") == 3
    # Once the chain is gone a new one starts at depth 1 again.
    fresh = m.fleet.begin_tool_call(
        "loop-1", "call-new", tool="recurse", agent_type=None, instance_id=None,
        session_id=session, deadline_ms=None, now=30,
    )
    assert fresh.depth == 1


def test_tool_call_without_session_inherits_depth_at_caller() -> None:
    m = tool_mesh(max_tool_depth=2)
    first = m.fleet.begin_tool_call(
        "loop-1", "a", tool="recurse", agent_type=None, instance_id=None,
        session_id=None, deadline_ms=None, now=0,
    )
    assert first.depth == 1 and first.chain_id.startswith("chain-")
    # The callee (loop-1 again) forgets to pass the session on: still counted.
    second = m.fleet.begin_tool_call(
        "loop-1", "b", tool="recurse", agent_type=None, instance_id=None,
        session_id="made-up-session", deadline_ms=None, now=0,
    )
    assert second.depth == 2 and second.chain_id == "made-up-session"
    with pytest.raises(RouteError) as err:
        m.fleet.begin_tool_call(
            "loop-1", "c", tool="recurse", agent_type=None, instance_id=None,
            session_id=None, deadline_ms=None, now=0,
        )
    assert err.value.code == "TOOL_DEPTH_EXCEEDED"
    for route in (second, first):
        m.fleet.end_tool_call(route, code="DISPATCH_FAILED", message="x", seconds=1, now=1,
                              wall=WALL)
    assert m.fleet.tool_calls_in_flight == 0 and m.fleet.tool_chains == 0


def test_tool_call_deadlines() -> None:
    m = tool_mesh()
    outer = m.fleet.begin_tool_call(
        "loop-1", "a", tool="recurse", agent_type=None, instance_id=None,
        session_id="s-1", deadline_ms=None, now=0,
    )
    assert outer.deadline_ms == 30_000 and outer.chain_id == "s-1"
    inner = m.fleet.begin_tool_call(
        "loop-1", "b", tool="recurse", agent_type=None, instance_id=None,
        session_id="s-1", deadline_ms=60_000, now=10,
    )
    assert inner.deadline_ms == 20_000  # the chain's remaining time
    capped = m.fleet.begin_tool_call(
        "loop-1", "c", tool="recurse", agent_type=None, instance_id=None,
        session_id=None, deadline_ms=5_000, now=10, caller_remaining_ms=1_500,
    )
    assert capped.deadline_ms == 1_500
    with pytest.raises(RouteError) as err:
        m.fleet.begin_tool_call(
            "loop-1", "d", tool="recurse", agent_type=None, instance_id=None,
            session_id="s-1", deadline_ms=None, now=31,
        )
    assert err.value.code == "DEADLINE_EXCEEDED"


def test_tool_call_routing_errors_and_tenants() -> None:
    m = tool_mesh()
    register(m, row("far-1", tenant="t2", tools=("recurse",), mode="hosted"))
    with pytest.raises(RouteError) as err:
        m.fleet.begin_tool_call(
            "loop-1", "a", tool="recurse", agent_type=None, instance_id="far-1",
            session_id=None, deadline_ms=None, now=0,
        )
    assert err.value.code == "INSTANCE_NOT_FOUND"
    with pytest.raises(RouteError) as err:
        m.fleet.begin_tool_call(
            "ghost", "a", tool="recurse", agent_type=None, instance_id=None,
            session_id=None, deadline_ms=None, now=0,
        )
    assert err.value.status == 404
    # The same session id in another tenant is another chain.
    a = m.fleet.begin_tool_call(
        "loop-1", "a", tool="recurse", agent_type=None, instance_id=None,
        session_id="shared", deadline_ms=None, now=0,
    )
    b = m.fleet.begin_tool_call(
        "far-1", "a", tool="recurse", agent_type=None, instance_id=None,
        session_id="shared", deadline_ms=None, now=0,
    )
    assert (a.depth, b.depth) == (1, 1)
    assert a.lease.instance_id == "loop-1" and b.lease.instance_id == "far-1"
    assert m.fleet.tool_chains == 2


# --- scale-out: what another mesh process did -------------------------------------------------


def test_learn_routes_to_an_instance_another_process_registered() -> None:
    other = make()
    register(other, row("nav-1"))
    m = make(registry=other.registry)  # the same database, another process's fleet
    m.events()
    assert m.fleet.learn("nav-1", now=1)
    state = m.router.get("nav-1")
    assert state is not None and not state.connected  # its socket is wherever it is
    assert m.events() == []  # the process that registered it told its subscribers
    assert not m.fleet.learn("gone", now=1)


def test_a_socket_held_elsewhere_routes_without_counting_here() -> None:
    m = make()
    register(m, row("nav-1"))
    m.events()
    assert m.fleet.agent_connected("nav-1", capabilities=[], now=1, wall=WALL, remote=True)
    assert metric(m, "svantic_open_websockets") == 0
    assert m.fleet.acquire("t1", "get_ticket", now=2).instance_id == "nav-1"
    m.fleet.agent_disconnected("nav-1", now=3, wall=WALL + 3)
    assert metric(m, "svantic_open_websockets") == 0


def test_a_refusal_given_back_neutral_leaves_health_alone() -> None:
    m = make(RouterConfig(unhealthy_after_failures=1, deregister_after_failures=5))
    register(m, row("nav-1"))
    m.fleet.agent_connected("nav-1", capabilities=[], now=1, wall=WALL)
    lease = m.fleet.acquire("t1", "get_ticket", now=2)
    m.fleet.finished(lease, code="AGENT_UNAVAILABLE", message="at capacity", transport="ws",
                     seconds=0.001, now=3, wall=WALL, health="neutral")
    state = m.router.get("nav-1")
    assert state is not None and state.routing_status != "unhealthy"
    assert state.consecutive_failures == 0 and active(m, "nav-1") == 0
    stored = m.registry.get_instance("nav-1")
    assert stored is not None and stored.last_dispatch_error is None
