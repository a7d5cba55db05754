"""Resume tokens valid on every mesh process (spec 5 with scale-out): the core's store as
the cluster extends it, driven with explicit times like the rest of the sans-IO code."""

from __future__ import annotations

from typing import Any

from svantic_mesh.cluster import ClusterResumeStore

from svantic_proto.frames import DispatchPayload
from svantic_proto.resume import HeldDispatch, ResumeStore


def _held(dispatch_id: str, deadline_at: float) -> HeldDispatch:
    payload = DispatchPayload(dispatch_id=dispatch_id, capability="slow", arguments={},
                              deadline_ms=1000, attempt=1)
    return HeldDispatch(payload=payload, deadline_at=deadline_at)


def _pair() -> tuple[ClusterResumeStore, ClusterResumeStore, list[dict[str, Any]]]:
    """Two processes' stores, wired as the bus would: what one announces, the other hears."""
    said: list[dict[str, Any]] = []
    first, second = ClusterResumeStore(window=30), ClusterResumeStore(window=30)

    def tell(origin: str, other: ClusterResumeStore) -> Any:
        def announce(message: dict[str, Any]) -> None:
            said.append({**message, "o": origin})
            now = 100.0
            if message["t"] == "tok":
                other.remote_issued(message["k"], message["i"], message["n"], origin)
            elif message["t"] == "held":
                other.remote_held(message["k"], message["w"], now, message["d"])
            elif message["t"] == "claimed":
                other.remote_claimed(message["k"], message["ids"], now)
        return announce

    first.announce = tell("first", second)
    second.announce = tell("second", first)
    return first, second, said


def test_a_token_issued_on_one_process_resumes_on_another() -> None:
    first, second, said = _pair()
    token = first.issue("agent-1", "tenant")
    assert said[-1]["t"] == "tok" and not second.owns(token)
    claim = second.claim(token, "agent-1", "tenant", now=100.0)
    assert claim.resumed and claim.replay == () and claim.failed == ()
    assert said[-1] == {"t": "claimed", "k": token, "ids": [], "o": "second"}
    # Single use, everywhere: neither process resumes it again.
    assert not second.claim(token, "agent-1", "tenant", now=100.5).resumed
    assert not first.claim(token, "agent-1", "tenant", now=100.5).resumed


def test_another_instance_or_tenant_or_a_late_claim_does_not_resume() -> None:
    first, second, _ = _pair()
    token = first.issue("agent-1", "tenant")
    assert not second.claim(token, "agent-2", "tenant", now=100.0).resumed
    assert not second.claim(token, "agent-1", "other", now=100.0).resumed
    first.hold(token, [], now=100.0)  # its connection ended: 30 s from now
    assert not second.claim(token, "agent-1", "tenant", now=130.5).resumed
    assert second.claim(token, "agent-1", "tenant", now=129.0).resumed


def test_a_dead_process_tokens_get_the_window_from_its_death() -> None:
    first, second, _ = _pair()
    token = first.issue("agent-1", "tenant")
    second.node_died("first", now=200.0)
    assert not second.claim(token, "agent-1", "tenant", now=231.0).resumed
    token = first.issue("agent-1", "tenant")
    second.node_died("first", now=200.0)
    assert second.claim(token, "agent-1", "tenant", now=229.0).resumed


def test_a_claim_elsewhere_re_sends_what_this_process_held() -> None:
    first, second, _ = _pair()
    adopted: list[tuple[str, str, tuple[str, ...]]] = []
    second.adopt = lambda holder, token, replay: adopted.append(
        (holder, token, tuple(h.dispatch_id for h in replay)))
    token = first.issue("agent-1", "tenant")
    assert first.hold(token, [_held("d-1", 150.0), _held("d-2", 100.5)], now=100.0) == []
    claim = second.claim(token, "agent-1", "tenant", now=101.0)
    # d-2's deadline passed on the way: only d-1 is re-sent (the core adds 1 to `attempt`).
    assert claim.resumed and [h.dispatch_id for h in claim.replay] == ["d-1"]
    assert claim.replay[0].payload.capability == "slow"
    assert 149.0 < claim.replay[0].deadline_at <= 150.0
    assert adopted == [("first", token, ("d-1",))]
    # The holder hears the claim: d-2 (not re-sent) fails at once; d-1 waits for its
    # outcome from the other process until its own deadline, and then fails, once.
    assert [h.dispatch_id for h in first.expire(101.0)] == ["d-2"]
    assert first.expire(149.0) == []
    assert first.settle(token, "d-1") is not None
    assert first.expire(200.0) == [] and len(first) == 0
    assert first.settle(token, "d-1") is None  # ended once


def test_a_handed_over_dispatch_fails_at_its_deadline_without_an_outcome() -> None:
    first, second, _ = _pair()
    token = first.issue("agent-1", "tenant")
    first.hold(token, [_held("d-1", 150.0)], now=100.0)
    assert second.claim(token, "agent-1", "tenant", now=101.0).resumed
    assert first.next_deadline() == 150.0
    assert [h.dispatch_id for h in first.expire(150.0)] == ["d-1"]
    assert first.settle(token, "d-1") is None  # a late outcome finds nothing: ended once
    # The token resumes nothing on its old process any more.
    assert not first.claim(token, "agent-1", "tenant", now=151.0).resumed


def test_a_claim_elsewhere_while_the_socket_here_is_up_fails_it_later() -> None:
    first, second, _ = _pair()
    token = first.issue("agent-1", "tenant")
    assert second.claim(token, "agent-1", "tenant", now=100.0).resumed
    # This process sees its (older) socket end only now: what it had fails at once.
    failed = first.hold(token, [_held("d-1", 150.0)], now=101.0)
    assert [h.dispatch_id for h in failed] == ["d-1"]


def test_a_newer_token_replaces_the_older_in_every_mirror() -> None:
    first, second, _ = _pair()
    old = first.issue("agent-1", "tenant")
    new = first.issue("agent-1", "tenant")
    assert second.remote_count() == 1
    assert not second.claim(old, "agent-1", "tenant", now=100.0).resumed
    assert second.claim(new, "agent-1", "tenant", now=100.0).resumed


def test_revoke_a_live_token_fails_its_later_hold() -> None:
    store = ResumeStore(window=30)
    token = store.issue("agent-1", "tenant")
    assert store.owns(token) and store.tokens() == [(token, "agent-1", "tenant")]
    store.revoke(token, now=10.0)
    assert not store.owns(token) and store.tokens() == []
    failed = store.hold(token, [_held("d-1", 50.0)], now=11.0)
    assert [h.dispatch_id for h in failed] == ["d-1"]
    store.revoke("unknown", now=12.0)  # no-op
