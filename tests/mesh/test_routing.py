"""Routing and health (spec 6, seed 001): the pure router, driven with plain numbers."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from svantic_mesh.model import CONNECTION_STATUSES, ROUTING_STATUSES, Lease, RouteError
from svantic_mesh.routing import (
    ConnectionChanged,
    DeregisterDue,
    InstanceState,
    Router,
    RouterConfig,
    RoutingChanged,
)

T = "tenant_a"
CAP = "get_ticket"


def add(
    router: Router,
    instance_id: str,
    *,
    tenant: str = T,
    agent_type: str = "ticket",
    mode: str = "hosted",
    caps: Iterable[str] = (CAP,),
    cap_max: int = 0,
    now: float = 0.0,
) -> None:
    router.upsert(
        instance_id,
        tenant_id=tenant,
        agent_type=agent_type,
        deployment_mode=mode,
        capabilities=caps,
        max_concurrent_sessions=cap_max,
        now=now,
    )


def beat(router: Router, instance_id: str, now: float, status: str | None = None) -> str:
    return router.heartbeat(
        instance_id,
        status=status,
        active_sessions=0,
        max_concurrent_sessions=None,
        load=None,
        now=now,
        wall=1_700_000_000.0 + now,
    )


def take(router: Router, **kwargs: str) -> Lease:
    return router.acquire(T, CAP, now=0.0, **kwargs)


def done(router: Router, lease: Lease, outcome: str = "ok", now: float = 0.0) -> None:
    router.release(lease, outcome=outcome, code="DISPATCH_FAILED", message="boom", now=now, wall=5)


def snap(router: Router, instance_id: str) -> InstanceState:
    state = router.get(instance_id)
    assert state is not None
    return state


def routing(router: Router, instance_id: str) -> str:
    state = router.get(instance_id)
    assert state is not None
    return state.routing_status


def connection(router: Router, instance_id: str) -> str:
    state = router.get(instance_id)
    assert state is not None
    return state.connection_status


def raises(router: Router, status: int, code: str, **kwargs: str) -> RouteError:
    with pytest.raises(RouteError) as info:
        take(router, **kwargs)
    assert (info.value.status, info.value.code) == (status, code)
    assert CAP in info.value.message
    return info.value


# --- config and registration ----------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"heartbeat_timeout": 0.0},
        {"unhealthy_after_failures": 0},
        {"deregister_after_failures": 0},
        {"unhealthy_after_failures": 5, "deregister_after_failures": 4},
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RouterConfig(**kwargs)  # type: ignore[arg-type]


def test_new_instance_is_unknown_and_routable() -> None:
    router = Router()
    add(router, "h1")
    state = router.get("h1")
    assert state is not None
    assert (state.routing_status, state.connection_status) == ("unknown", "unknown")
    assert state.routing_status in ROUTING_STATUSES
    assert state.connection_status in CONNECTION_STATUSES
    assert state.capabilities == (CAP,) and not state.connected
    assert len(router) == 1 and "h1" in router and "nope" not in router
    assert take(router).instance_id == "h1"
    assert router.get("nope") is None


def test_reregister_keeps_leases_and_statuses() -> None:
    router = Router()
    add(router, "h1", cap_max=3)
    lease = take(router)
    beat(router, "h1", 1.0)
    add(router, "h1", cap_max=3, caps=(CAP, "other"))
    state = router.get("h1")
    assert state is not None
    assert state.active_sessions == 1 and state.routing_status == "available"
    assert state.capabilities == (CAP, "other")
    assert router.acquire(T, "other", now=1.0).instance_id == "h1"
    done(router, lease)
    assert snap(router, "h1").active_sessions == 1


def test_remove_then_release_is_a_noop() -> None:
    router = Router()
    add(router, "h1")
    lease = take(router)
    router.remove("h1")
    assert "h1" not in router and len(router) == 0
    add(router, "h1")  # the same id registers again: the old lease is not its
    done(router, lease)
    assert snap(router, "h1").active_sessions == 0
    router.remove("h1")
    router.remove("h1")  # twice: no-op
    raises(router, 503, "AGENT_UNAVAILABLE")


def test_release_twice_counts_once() -> None:
    router = Router()
    add(router, "h1")
    first, second = take(router), take(router)
    done(router, first)
    done(router, first)
    assert snap(router, "h1").active_sessions == 1
    done(router, second)
    assert snap(router, "h1").active_sessions == 0


# --- choosing an instance ---------------------------------------------------------------


def test_least_loaded_wins_under_load() -> None:
    router = Router()
    held = {"a": 4, "b": 2, "c": 3, "d": 5}
    for name, count in held.items():
        add(router, name)
        for _ in range(count):
            take(router, instance_id=name)
    assert take(router).instance_id == "b"  # the fewest leases: 2
    # b and c now both hold 3: c, picked longer ago than b, wins the tie
    assert take(router).instance_id == "c"
    assert take(router).instance_id == "b"
    leases = {name: snap(router, name).active_sessions for name in held}
    assert leases == {"a": 4, "b": 4, "c": 4, "d": 5}


def test_release_makes_an_instance_least_loaded_again() -> None:
    router = Router()
    add(router, "a")
    add(router, "b")
    a_leases = [take(router, instance_id="a") for _ in range(3)]
    for _ in range(2):
        take(router, instance_id="b")
    for lease in a_leases:
        done(router, lease)
    assert take(router).instance_id == "a"


def test_ties_are_round_robin() -> None:
    router = Router()
    names = [f"i{n}" for n in range(5)]
    for name in names:
        add(router, name)
    picks = []
    for _ in range(50):
        lease = take(router)
        picks.append(lease.instance_id)
        done(router, lease)
    assert Counter(picks) == dict.fromkeys(names, 10)
    for start in range(0, 50, 5):
        assert sorted(picks[start : start + 5]) == names  # each round uses every instance


def test_restrict_by_agent_type_and_instance_id() -> None:
    router = Router()
    add(router, "t1", agent_type="ticket")
    add(router, "b1", agent_type="billing")
    add(router, "b2", agent_type="billing")
    for _ in range(4):
        assert take(router, agent_type="billing").instance_id in ("b1", "b2")
        assert take(router, agent_type="ticket").instance_id == "t1"
    for _ in range(3):
        assert take(router, instance_id="b2").instance_id == "b2"
    with pytest.raises(RouteError) as info:
        take(router, agent_type="nobody")
    assert info.value.code == "AGENT_UNAVAILABLE"
    # an explicit instance of another type than asked for is not found
    raises(router, 404, "INSTANCE_NOT_FOUND", instance_id="t1", agent_type="billing")


def test_tenant_isolation() -> None:
    router = Router()
    add(router, "mine", tenant=T)
    add(router, "theirs", tenant="tenant_b")
    for _ in range(5):
        assert router.acquire(T, CAP, now=0).instance_id == "mine"
        assert router.acquire("tenant_b", CAP, now=0).instance_id == "theirs"
    raises(router, 404, "INSTANCE_NOT_FOUND", instance_id="theirs")
    with pytest.raises(RouteError) as info:
        router.acquire("tenant_c", CAP, now=0)
    assert info.value.code == "AGENT_UNAVAILABLE"


def test_capacity_is_atomic_busy_at_max_available_after_release() -> None:
    router = Router()
    add(router, "h1", cap_max=2)
    first, second = take(router), take(router)
    assert (first.instance_id, second.instance_id) == ("h1", "h1")
    assert routing(router, "h1") == "busy"
    raises(router, 503, "AGENT_UNAVAILABLE")
    raises(router, 503, "AGENT_UNAVAILABLE", instance_id="h1")
    assert snap(router, "h1").active_sessions == 2
    done(router, first, outcome="neutral")
    assert routing(router, "h1") == "available"
    assert take(router).instance_id == "h1"


# --- health -------------------------------------------------------------------------------


def test_unhealthy_after_failures_and_recovery_on_success() -> None:
    router = Router(RouterConfig(unhealthy_after_failures=3, deregister_after_failures=10))
    add(router, "h1")
    leases = [take(router) for _ in range(4)]
    for n, lease in enumerate(leases[:3], 1):
        done(router, lease, outcome="failed")
        assert snap(router, "h1").consecutive_failures == n
        assert routing(router, "h1") == ("unhealthy" if n == 3 else "unknown")
    state = router.get("h1")
    assert state is not None and state.last_dispatch_error == {
        "code": "DISPATCH_FAILED",
        "message": "boom",
        "at": 5,
    }
    raises(router, 502, "AGENT_UNHEALTHY")
    raises(router, 502, "AGENT_UNHEALTHY", instance_id="h1")
    done(router, leases[3], outcome="ok")
    assert routing(router, "h1") == "available"
    assert snap(router, "h1").consecutive_failures == 0
    assert take(router).instance_id == "h1"


def test_heartbeat_gives_a_failing_instance_one_more_try() -> None:
    router = Router(RouterConfig(unhealthy_after_failures=2, deregister_after_failures=4))
    add(router, "h1")
    for _ in range(2):
        done(router, take(router), outcome="failed")
    assert routing(router, "h1") == "unhealthy"
    assert beat(router, "h1", 1.0) == "available"
    done(router, take(router), outcome="failed")  # the count was kept: unhealthy again
    assert routing(router, "h1") == "unhealthy"
    assert snap(router, "h1").consecutive_failures == 3


def test_neutral_outcome_is_not_a_failure() -> None:
    router = Router(RouterConfig(unhealthy_after_failures=1, deregister_after_failures=1))
    add(router, "h1")
    for _ in range(5):
        done(router, take(router), outcome="neutral")
    assert routing(router, "h1") == "unknown"
    assert router.take_changes() == []


def test_release_rejects_unknown_outcome() -> None:
    router = Router()
    add(router, "h1")
    with pytest.raises(ValueError):
        done(router, take(router), outcome="maybe")


def test_missed_heartbeat_then_recovery_connected() -> None:
    router = Router(RouterConfig(heartbeat_timeout=90.0))
    add(router, "c1", mode="connected")
    assert router.next_deadline() is None
    router.connected("c1", now=100.0)
    assert router.next_deadline() == 190.0
    beat(router, "c1", 150.0)
    assert router.next_deadline() == 240.0
    router.handle_timer(239.9)
    assert routing(router, "c1") == "available"
    router.take_changes()
    router.handle_timer(240.0)
    assert (routing(router, "c1"), connection(router, "c1")) == ("unhealthy", "offline")
    assert router.take_changes() == [
        ConnectionChanged("c1", T, "online", "offline"),
        RoutingChanged("c1", T, "available", "unhealthy"),
    ]
    assert router.next_deadline() is None
    raises(router, 502, "AGENT_UNHEALTHY")
    assert beat(router, "c1", 300.0) == "available"
    assert connection(router, "c1") == "online"
    assert router.next_deadline() == 390.0
    assert take(router).instance_id == "c1"


def test_hosted_clock_starts_at_first_heartbeat() -> None:
    router = Router(RouterConfig(heartbeat_timeout=10.0))
    add(router, "h1")
    router.handle_timer(1_000.0)
    assert routing(router, "h1") == "unknown"
    assert beat(router, "h1", 1_000.0) == "available"
    assert connection(router, "h1") == "online"
    assert router.next_deadline() == 1_010.0
    router.handle_timer(1_010.0)
    assert (routing(router, "h1"), connection(router, "h1")) == ("unhealthy", "offline")
    state = router.get("h1")
    assert state is not None and state.last_heartbeat_at == 1_700_000_000.0 + 1_000.0


def test_acquire_applies_due_deadlines_itself() -> None:
    router = Router(RouterConfig(heartbeat_timeout=10.0))
    add(router, "h1")
    add(router, "h2")
    beat(router, "h1", 0.0)
    beat(router, "h2", 5.0)
    # the caller's timer has not fired, but at now=12 h1 is past its deadline
    assert router.acquire(T, CAP, now=12.0).instance_id == "h2"
    assert routing(router, "h1") == "unhealthy"


def test_success_after_missed_heartbeats_restarts_the_clock() -> None:
    router = Router(RouterConfig(heartbeat_timeout=10.0))
    add(router, "h1")
    beat(router, "h1", 0.0)
    lease = take(router)
    router.handle_timer(10.0)
    assert routing(router, "h1") == "unhealthy"
    done(router, lease, outcome="ok", now=11.0)
    assert (routing(router, "h1"), connection(router, "h1")) == ("available", "healthy")
    assert router.next_deadline() == 21.0


def test_heartbeat_status_busy_and_offline() -> None:
    router = Router()
    add(router, "h1")
    assert beat(router, "h1", 0.0, status="busy") == "busy"
    raises(router, 503, "AGENT_UNAVAILABLE")
    raises(router, 503, "AGENT_UNAVAILABLE", instance_id="h1")
    assert beat(router, "h1", 1.0, status="offline") == "offline"
    raises(router, 503, "AGENT_UNAVAILABLE")
    raises(router, 503, "AGENT_UNAVAILABLE", instance_id="h1")
    assert beat(router, "h1", 2.0, status="available") == "available"
    assert beat(router, "h1", 3.0, status="busy") == "busy"
    assert beat(router, "h1", 4.0) == "available"  # no status: no claim
    assert take(router).instance_id == "h1"


def test_heartbeat_cap_and_validation() -> None:
    router = Router()
    add(router, "h1", cap_max=0)
    take(router)
    status = router.heartbeat(
        "h1", status=None, active_sessions=3, max_concurrent_sessions=1, load=0.5, now=0, wall=9
    )
    assert status == "busy"
    state = router.get("h1")
    assert state is not None
    assert (state.max_concurrent_sessions, state.reported_active_sessions, state.load) == (
        1,
        3,
        0.5,
    )
    with pytest.raises(KeyError):
        beat(router, "nope", 0.0)
    bad: list[dict[str, object]] = [
        {"status": "sleeping"},
        {"active_sessions": -1},
        {"max_concurrent_sessions": -1},
        {"load": 1.5},
    ]
    for override in bad:
        kwargs: dict[str, object] = {
            "status": None,
            "active_sessions": 0,
            "max_concurrent_sessions": None,
            "load": None,
            "now": 0.0,
            "wall": 0.0,
        }
        kwargs.update(override)
        with pytest.raises(ValueError):
            router.heartbeat("h1", **kwargs)  # type: ignore[arg-type]


def test_auto_deregistration_exactly_once() -> None:
    router = Router(RouterConfig(unhealthy_after_failures=3, deregister_after_failures=5))
    add(router, "h1")
    leases = [take(router) for _ in range(8)]
    for lease in leases:
        done(router, lease, outcome="failed")
    due = [c for c in router.take_changes() if isinstance(c, DeregisterDue)]
    assert due == [DeregisterDue("h1", T, "5 consecutive failed dispatches")]
    router.remove("h1")
    assert "h1" not in router


def test_connection_status_sequence() -> None:
    router = Router()
    add(router, "c1", mode="connected")
    seen = [connection(router, "c1")]
    router.connected("c1", now=0.0)
    seen.append(connection(router, "c1"))
    done(router, take(router), outcome="ok")
    seen.append(connection(router, "c1"))
    done(router, take(router), outcome="failed")
    seen.append(connection(router, "c1"))
    router.disconnected("c1", now=1.0)
    seen.append(connection(router, "c1"))
    assert seen == ["unknown", "online", "healthy", "degraded", "offline"]
    conn = [c for c in router.take_changes() if isinstance(c, ConnectionChanged)]
    assert [(c.old, c.new) for c in conn] == [
        ("unknown", "online"),
        ("online", "healthy"),
        ("healthy", "degraded"),
        ("degraded", "offline"),
    ]
    router.disconnected("gone", now=2.0)  # unknown id: no-op


def test_disconnected_instances_are_skipped() -> None:
    router = Router()
    add(router, "c1", mode="connected")
    add(router, "c2", mode="connected")
    raises(router, 502, "AGENT_DISCONNECTED")  # registered, never connected
    router.connected("c1", now=0.0)
    router.connected("c2", now=0.0)
    router.disconnected("c1", now=1.0)
    for _ in range(4):
        lease = take(router)
        assert lease.instance_id == "c2"
        done(router, lease)
    assert routing(router, "c1") == "unknown"  # the routing status itself is kept
    raises(router, 502, "AGENT_DISCONNECTED", instance_id="c1")
    router.connected("c1", now=2.0)
    assert {take(router).instance_id for _ in range(2)} == {"c1", "c2"}


def test_connected_of_a_hosted_instance_is_refused() -> None:
    router = Router()
    add(router, "h1")
    with pytest.raises(ValueError):
        router.connected("h1", now=0.0)
    with pytest.raises(KeyError):
        router.connected("nope", now=0.0)


# --- every RouteError ---------------------------------------------------------------------


def test_explicit_instance_errors() -> None:
    router = Router(RouterConfig(unhealthy_after_failures=1, deregister_after_failures=9))
    add(router, "other_tenant", tenant="tenant_b")
    add(router, "no_cap", caps=("something_else",))
    add(router, "unplugged", mode="connected")
    add(router, "sick")
    add(router, "full", cap_max=1)
    add(router, "down")
    done(router, take(router, instance_id="sick"), outcome="failed")
    take(router, instance_id="full")
    beat(router, "down", 0.0, status="offline")
    raises(router, 404, "INSTANCE_NOT_FOUND", instance_id="missing")
    raises(router, 404, "INSTANCE_NOT_FOUND", instance_id="other_tenant")
    raises(router, 503, "AGENT_UNAVAILABLE", instance_id="no_cap")
    raises(router, 502, "AGENT_DISCONNECTED", instance_id="unplugged")
    raises(router, 502, "AGENT_UNHEALTHY", instance_id="sick")
    raises(router, 503, "AGENT_UNAVAILABLE", instance_id="full")
    raises(router, 503, "AGENT_UNAVAILABLE", instance_id="down")


def test_pool_errors() -> None:
    config = RouterConfig(unhealthy_after_failures=1, deregister_after_failures=9)
    router = Router(config)
    raises(router, 503, "AGENT_UNAVAILABLE")  # nobody offers it

    router = Router(config)
    for name in ("s1", "s2"):
        add(router, name)
        done(router, take(router, instance_id=name), outcome="failed")
    raises(router, 502, "AGENT_UNHEALTHY")

    router = Router(config)
    add(router, "c1", mode="connected")
    add(router, "c2", mode="connected")
    raises(router, 502, "AGENT_DISCONNECTED")

    router = Router(config)  # a mix: unhealthy + disconnected + busy
    add(router, "sick")
    done(router, take(router, instance_id="sick"), outcome="failed")
    add(router, "c1", mode="connected")
    add(router, "full", cap_max=1)
    take(router, instance_id="full")
    raises(router, 503, "AGENT_UNAVAILABLE")

    router = Router(config)
    add(router, "down")
    beat(router, "down", 0.0, status="offline")
    raises(router, 503, "AGENT_UNAVAILABLE")


def test_messages_are_fixed_text() -> None:
    router = Router()
    error = raises(router, 503, "AGENT_UNAVAILABLE")
    assert error.message == f"no instance offers capability {CAP!r}"


# --- changes ------------------------------------------------------------------------------


def test_take_changes_order_and_clearing() -> None:
    router = Router(RouterConfig(unhealthy_after_failures=1, deregister_after_failures=1))
    add(router, "c1", mode="connected", cap_max=1)
    assert router.take_changes() == []
    router.connected("c1", now=0.0)
    lease = take(router)
    done(router, lease, outcome="failed")
    assert router.take_changes() == [
        ConnectionChanged("c1", T, "unknown", "online"),
        RoutingChanged("c1", T, "unknown", "busy"),
        ConnectionChanged("c1", T, "online", "degraded"),
        RoutingChanged("c1", T, "busy", "unhealthy"),
        DeregisterDue("c1", T, "1 consecutive failed dispatches"),
    ]
    assert router.take_changes() == []


# --- scale and properties ---------------------------------------------------------------


def test_indexes_hold_each_routable_member_once_and_build_only_when_asked() -> None:
    router = Router()
    for n in range(10):
        add(router, f"i{n}", caps=(CAP, "rare"))
    done(router, router.acquire(T, "rare", now=0.0))  # both indexes are built now
    for _ in range(2_000):
        done(router, take(router))
    for key, index in router._by_cap.items():
        assert index.buckets is not None
        assert sum(len(bucket) for bucket in index.buckets.values()) == len(index.members), key
    assert all(index.buckets is None for index in router._by_type.values())  # never asked


OPS = st.lists(
    st.tuples(
        st.sampled_from(["acquire", "acquire_at", "release", "beat"]),
        st.integers(0, 3),
        st.sampled_from(["ok", "failed", "neutral"]),
    ),
    max_size=80,
)


@settings(max_examples=150, deadline=None)
@given(OPS)
def test_leases_never_exceed_cap_and_choice_is_least_loaded(
    ops: list[tuple[str, int, str]],
) -> None:
    router = Router(RouterConfig(unhealthy_after_failures=2, deregister_after_failures=50))
    caps = {"i0": 1, "i1": 2, "i2": 3, "i3": 0}
    for name, cap in caps.items():
        add(router, name, cap_max=cap)
    held: list[Lease] = []
    for op, n, outcome in ops:
        name = f"i{n}"
        if op in ("acquire", "acquire_at"):
            states = {k: router.get(k) for k in caps}
            routable = [
                (s.active_sessions, k)
                for k, s in states.items()
                if s is not None and s.routing_status in ("unknown", "available")
            ]
            try:
                lease = router.acquire(
                    T, CAP, instance_id=name if op == "acquire_at" else None, now=0.0
                )
            except RouteError:
                if op == "acquire":
                    assert not routable
                continue
            if op == "acquire":
                assert routable
                chosen = states[lease.instance_id]
                assert chosen is not None and chosen.active_sessions == min(routable)[0]
            held.append(lease)
        elif op == "release" and held:
            done(router, held.pop(n % len(held)), outcome=outcome)
        elif op == "beat":
            beat(router, name, 0.0)
        for key, cap in caps.items():
            state = router.get(key)
            assert state is not None
            live = sum(1 for lease in held if lease.instance_id == key)
            assert state.active_sessions == live
            if cap:
                assert live <= cap
