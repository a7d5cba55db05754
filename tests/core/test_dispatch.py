"""The dispatch lifecycle (spec sections 3 and 7).

Result, streamed chunks in `seq` order, first terminal wins, the deadline at exactly
`deadline_ms` with its `cancel`, tool calls both ways, dispatch auth failing closed on
both sides, and the agent's in-flight limit.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from test_conn_kit import INSTANCE, TENANT, AgentHarness, MeshHarness

from svantic_proto.auth import DispatchAuthMinter, DispatchAuthVerifier
from svantic_proto.config import Config
from svantic_proto.errors import LocalProtocolError
from svantic_proto.events import (
    ChunkReceived,
    ConnectionClosed,
    DispatchAcked,
    DispatchCancelled,
    DispatchCompleted,
    DispatchFailed,
    DispatchReceived,
    DispatchTimedOut,
    ErrorReceived,
    ExtensionUnsupported,
    ToolCallReceived,
    ToolResultReceived,
)
from svantic_proto.frames import (
    Cancel,
    CancelPayload,
    Dispatch,
    DispatchAck,
    DispatchAckPayload,
    DispatchChunk,
    DispatchChunkPayload,
    DispatchResult,
    DispatchResultPayload,
    Error,
    ErrorPayload,
    SessionContext,
    SharedSecretAuth,
    SvanticJwtAuth,
    ToolResult,
    ToolResultPayload,
)
from svantic_proto.mesh import DispatchRoute, shared_secret_dispatch_auth
from svantic_proto.testing import TEST_SIGNING_SECRET, Pair

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def advance_to(pair: Pair, when: float) -> None:
    """Move the pair's clock to exactly `when` (b - a is exact for nearby floats)."""
    pair.advance(when - pair.clock.now)


def connected(config: Config | None = None, **kwargs: Any) -> Pair:
    pair = Pair(config, **kwargs)
    pair.connect()
    return pair


# -- result, ack, error --------------------------------------------------------------------------


def test_a_dispatch_reaches_the_agent_with_every_field_and_its_result_comes_back() -> None:
    pair = connected()
    context = SessionContext(
        session_id="s-1",
        tenant_id=TENANT,
        propagation_headers={"traceparent": TRACEPARENT, "baggage": "k=v"},
    )
    dispatch_id = pair.mesh.send_dispatch(
        "get_ticket", {"ticket_id": "T-1"}, deadline_ms=30_000, now=pair.clock.now,
        task_id="t-9", session_context=context,
    )
    pair.pump()
    (received,) = pair.agent_events_of(DispatchReceived)
    assert received.dispatch_id == dispatch_id
    assert (received.capability, dict(received.arguments)) == ("get_ticket", {"ticket_id": "T-1"})
    assert (received.deadline_ms, received.attempt, received.task_id) == (30_000, 1, "t-9")
    assert received.session_context == context
    assert received.trace.parent_trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert received.trace.parent_span_id == "00f067aa0ba902b7"
    assert dict(received.trace.baggage) == {"k": "v"}
    assert dispatch_id in pair.mesh.in_flight
    pair.agent.send_ack(dispatch_id)
    pair.agent.send_result(dispatch_id, {"status": "open"})
    pair.pump()
    assert pair.mesh_events_of(DispatchAcked) == [DispatchAcked(dispatch_id)]
    assert pair.mesh_events_of(DispatchCompleted) == [
        DispatchCompleted(dispatch_id, {"status": "open"})
    ]
    assert pair.mesh.in_flight == {} and pair.session.running == {}


def test_a_null_result_is_a_result() -> None:
    pair = connected()
    dispatch_id = pair.mesh.send_dispatch("noop", deadline_ms=1000, now=pair.clock.now)
    pair.pump()
    pair.agent.send_result(dispatch_id, None)
    pair.pump()
    assert pair.mesh_events_of(DispatchCompleted) == [DispatchCompleted(dispatch_id, None)]


def test_an_agent_error_is_the_dispatch_terminal_failure() -> None:
    pair = connected()
    dispatch_id = pair.mesh.send_dispatch("echo", deadline_ms=1000, now=pair.clock.now)
    pair.pump()
    pair.agent.send_error(dispatch_id, "INVALID_ARGUMENTS", "x is required", {"field": "x"})
    pair.pump()
    assert pair.mesh_events_of(DispatchFailed) == [
        DispatchFailed(dispatch_id, "INVALID_ARGUMENTS", "x is required", {"field": "x"})
    ]
    assert pair.mesh.in_flight == {}


def test_the_agent_api_refuses_answers_for_unknown_or_finished_dispatches() -> None:
    pair = connected()
    with pytest.raises(LocalProtocolError, match="no dispatch"):
        pair.agent.send_result("0192aaaa-0000-7000-8000-000000000000", 1)
    dispatch_id = pair.mesh.send_dispatch("echo", deadline_ms=1000, now=pair.clock.now)
    pair.pump()
    pair.agent.send_result(dispatch_id, 1)
    for answer in (
        lambda: pair.agent.send_result(dispatch_id, 2),
        lambda: pair.agent.send_error(dispatch_id, "DISPATCH_FAILED"),
        lambda: pair.agent.send_chunk(dispatch_id, "late"),
        lambda: pair.agent.send_ack(dispatch_id),
    ):
        with pytest.raises(LocalProtocolError, match="already ended"):
            answer()
    pair.pump()
    assert len(pair.mesh_events_of(DispatchCompleted)) == 1


def test_an_ack_for_a_dispatch_the_mesh_does_not_hold_is_ignored() -> None:
    h = MeshHarness()
    h.hello()
    h.send(h.factory.new(DispatchAck, DispatchAckPayload(),
                         in_reply_to="0192aaaa-0000-7000-8000-000000000000"))
    assert h.events_of(DispatchAcked) == [] and h.read().empty


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"deadline_ms": 0}, "deadline_ms"),
        ({"deadline_ms": 1.5}, "deadline_ms"),
        ({"deadline_ms": True}, "deadline_ms"),
        ({"deadline_ms": 10, "capability": ""}, "capability"),
    ],
)
def test_send_dispatch_refuses_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    pair = connected()
    arguments = {"capability": "echo", **kwargs}
    capability = arguments.pop("capability")
    with pytest.raises(LocalProtocolError, match=match):
        pair.mesh.send_dispatch(capability, now=pair.clock.now, **arguments)
    assert pair.mesh.in_flight == {}


def test_send_dispatch_uses_a_given_id_once() -> None:
    pair = connected()
    given = "0192aaaa-0000-7000-8000-000000000001"
    assert pair.mesh.send_dispatch("echo", deadline_ms=10, now=pair.clock.now,
                                   dispatch_id=given) == given
    with pytest.raises(LocalProtocolError, match="already in flight"):
        pair.mesh.send_dispatch("echo", deadline_ms=10, now=pair.clock.now, dispatch_id=given)
    pair.pump()
    assert pair.agent_events_of(DispatchReceived)[0].dispatch_id == given


# -- chunks: in seq order, duplicates dropped ----------------------------------------------------


def _chunk(h: MeshHarness, dispatch_id: str, seq: int) -> DispatchChunk:
    return h.factory.new(
        DispatchChunk, DispatchChunkPayload(seq=seq, data=f"c{seq}"), in_reply_to=dispatch_id
    )


def _ready_mesh_with_dispatch(config: Config | None = None) -> tuple[MeshHarness, str]:
    h = MeshHarness(config)
    h.hello()
    dispatch_id = h.mesh.send_dispatch("stream", deadline_ms=10_000, now=h.clock.now)
    h.read()
    return h, dispatch_id


def test_chunks_are_delivered_in_seq_order_and_duplicates_dropped() -> None:
    h, dispatch_id = _ready_mesh_with_dispatch()
    for seq in (2, 0, 0, 2, 1, 3):
        h.send(_chunk(h, dispatch_id, seq))
        if seq == 0:
            assert [c.seq for c in h.events_of(ChunkReceived)] == [0]  # 2 waits for 1
    chunks = h.events_of(ChunkReceived)
    assert [(c.seq, c.data) for c in chunks] == [(0, "c0"), (1, "c1"), (2, "c2"), (3, "c3")]
    assert h.mesh.stats.duplicate_chunks == 2
    h.send(h.factory.new(DispatchResult, DispatchResultPayload(result="done"),
                         in_reply_to=dispatch_id))
    assert h.events_of(DispatchCompleted) == [DispatchCompleted(dispatch_id, "done")]


def test_a_terminal_frame_delivers_what_waits_behind_a_gap_first_in_order() -> None:
    h, dispatch_id = _ready_mesh_with_dispatch()
    for seq in (0, 3, 2):
        h.send(_chunk(h, dispatch_id, seq))
    assert [c.seq for c in h.events_of(ChunkReceived)] == [0]
    h.send(h.factory.new(DispatchResult, DispatchResultPayload(result=None),
                         in_reply_to=dispatch_id))
    events = [e for e in h.events() if isinstance(e, ChunkReceived | DispatchCompleted)]
    assert [getattr(e, "seq", "end") for e in events] == [0, 2, 3, "end"]


def test_a_chunk_after_the_terminal_frame_is_counted_and_dropped() -> None:
    h, dispatch_id = _ready_mesh_with_dispatch()
    h.send(h.factory.new(DispatchResult, DispatchResultPayload(result=1), in_reply_to=dispatch_id))
    h.send(_chunk(h, dispatch_id, 0))
    assert h.events_of(ChunkReceived) == []
    assert h.mesh.stats.late_terminal_frames == 1


def test_too_many_chunks_out_of_order_is_a_protocol_error() -> None:
    h, dispatch_id = _ready_mesh_with_dispatch(Config(max_pending_chunks=2))
    h.send(_chunk(h, dispatch_id, 1))
    h.send(_chunk(h, dispatch_id, 2))
    h.send(_chunk(h, dispatch_id, 3))
    wire = h.read()
    assert wire.types == ["error"] and wire.frames[0].payload.code == "BAD_FRAME"
    assert wire.close_code == 1002
    assert h.closed_event().in_flight == (dispatch_id,)


def test_agent_numbers_its_chunks_from_zero_through_the_pair() -> None:
    pair = connected()
    dispatch_id = pair.mesh.send_dispatch("stream", deadline_ms=1000, now=pair.clock.now)
    pair.pump()
    assert [pair.agent.send_chunk(dispatch_id, d) for d in ("a", "b", "c")] == [0, 1, 2]
    pair.agent.send_result(dispatch_id, "end")
    pair.pump()
    assert [(c.seq, c.data) for c in pair.mesh_events_of(ChunkReceived)] == [
        (0, "a"), (1, "b"), (2, "c"),
    ]


# -- first terminal wins -------------------------------------------------------------------------


def test_the_first_terminal_frame_wins_and_later_ones_are_counted() -> None:
    h, dispatch_id = _ready_mesh_with_dispatch()
    f = h.factory
    h.send(f.new(DispatchResult, DispatchResultPayload(result="first"), in_reply_to=dispatch_id))
    h.send(f.new(Error, ErrorPayload(code="DISPATCH_FAILED"), in_reply_to=dispatch_id))
    h.send(f.new(DispatchResult, DispatchResultPayload(result="third"), in_reply_to=dispatch_id))
    assert h.events_of(DispatchCompleted) == [DispatchCompleted(dispatch_id, "first")]
    assert h.events_of(DispatchFailed) == []
    assert h.mesh.stats.late_terminal_frames == 2
    assert h.read().empty  # no complaint on the wire: duplicates are tolerated (spec 5)


def test_an_error_first_wins_over_a_later_result() -> None:
    h, dispatch_id = _ready_mesh_with_dispatch()
    f = h.factory
    h.send(f.new(Error, ErrorPayload(code="CANCELLED", message="stopped"), in_reply_to=dispatch_id))
    h.send(f.new(DispatchResult, DispatchResultPayload(result=1), in_reply_to=dispatch_id))
    assert h.events_of(DispatchFailed) == [DispatchFailed(dispatch_id, "CANCELLED", "stopped")]
    assert h.events_of(DispatchCompleted) == []
    assert h.mesh.stats.late_terminal_frames == 1


# -- deadline -> DispatchTimedOut + cancel -------------------------------------------------------


def test_the_deadline_fires_at_exactly_deadline_ms_and_cancels_on_the_agent() -> None:
    pair = connected(Config(heartbeat_interval=100.0, dead_peer_timeout=500.0))
    sent_at = pair.clock.now
    dispatch_id = pair.mesh.send_dispatch("slow", deadline_ms=2500, now=sent_at)
    pair.pump()
    assert pair.mesh.next_deadline() == sent_at + 2.5
    advance_to(pair, sent_at + 2.499)
    assert pair.mesh_events_of(DispatchTimedOut) == []
    assert pair.agent_events_of(DispatchCancelled) == []
    advance_to(pair, sent_at + 2.5)
    assert pair.mesh_events_of(DispatchTimedOut) == [DispatchTimedOut(dispatch_id)]
    # the agent hears it once, though both its own deadline and the mesh's cancel say so
    assert pair.agent_events_of(DispatchCancelled) == [
        DispatchCancelled(dispatch_id, "DEADLINE_EXCEEDED")
    ]
    assert dispatch_id not in pair.mesh.in_flight
    pair.agent.send_error(dispatch_id, "CANCELLED")  # an answer after the cancel is allowed
    pair.pump()
    assert pair.mesh_events_of(DispatchFailed) == []
    assert pair.mesh.stats.late_terminal_frames == 1


def test_the_cancel_frame_on_the_wire_and_at_the_agent() -> None:
    h, dispatch_id = _ready_mesh_with_dispatch()
    sent_at = h.clock.now
    h.at(sent_at + 10.0)
    wire = h.read()
    cancels = wire.of(Cancel)
    assert len(cancels) == 1
    assert cancels[0].payload.dispatch_id == dispatch_id
    assert cancels[0].payload.reason == "DEADLINE_EXCEEDED"
    assert h.events_of(DispatchTimedOut) == [DispatchTimedOut(dispatch_id)]
    agent = AgentHarness()
    dispatch = agent.dispatch_frame(deadline_ms=60_000)
    agent.send(dispatch)
    agent.send(agent.factory.new(Cancel, CancelPayload(dispatch_id=dispatch.id,
                                                       reason="caller went away")))
    agent.send(agent.factory.new(Cancel, CancelPayload(dispatch_id=dispatch.id, reason="again")))
    assert agent.events_of(DispatchCancelled) == [
        DispatchCancelled(dispatch.id, "caller went away")
    ]
    # a cancel for something not running is ignored
    agent.send(agent.factory.new(Cancel, CancelPayload(
        dispatch_id="0192aaaa-0000-7000-8000-000000000009", reason="x")))
    assert len(agent.events_of(DispatchCancelled)) == 1
    # and the agent's own deadline, passing later, does not tell the handler again
    agent.run_until(agent.clock.now + 60.0)
    assert len(agent.events_of(DispatchCancelled)) == 1


def test_a_result_before_the_deadline_disarms_it() -> None:
    pair = connected(Config(heartbeat_interval=100.0, dead_peer_timeout=500.0))
    dispatch_id = pair.mesh.send_dispatch("fast", deadline_ms=1000, now=pair.clock.now)
    pair.pump()
    pair.agent.send_result(dispatch_id, 1)
    pair.pump()
    pair.advance(5)
    assert pair.mesh_events_of(DispatchTimedOut) == []
    assert pair.agent_events_of(DispatchCancelled) == []


def test_a_finished_dispatch_leaves_no_live_deadline_on_either_side() -> None:
    h, dispatch_id = _ready_mesh_with_dispatch()
    h.send(h.factory.new(DispatchResult, DispatchResultPayload(result=1), in_reply_to=dispatch_id))
    h.read()
    h.at(h.clock.now + 10.0)  # the old heap entry comes due and is skipped
    assert h.events_of(DispatchTimedOut) == [] and h.read().of(Cancel) == []
    agent = AgentHarness()
    dispatch = agent.dispatch_frame(deadline_ms=1000)
    agent.send(dispatch)
    agent.agent.send_result(dispatch.id, 1)
    agent.at(agent.clock.now + 1.0)
    assert agent.events_of(DispatchCancelled) == []


def test_a_late_error_is_told_apart_from_a_new_one_for_recent_dispatches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import svantic_proto.mesh as mesh_module

    monkeypatch.setattr(mesh_module, "_ENDED_MEMORY", 2)
    h = MeshHarness()
    h.hello()
    ids = [h.mesh.send_dispatch("a", deadline_ms=1000, now=h.clock.now) for _ in range(3)]
    for dispatch_id in ids:
        h.send(h.factory.new(DispatchResult, DispatchResultPayload(result=1),
                             in_reply_to=dispatch_id))
    for dispatch_id in ids:
        h.send(h.factory.new(Error, ErrorPayload(code="CANCELLED"), in_reply_to=dispatch_id))
    assert h.mesh.stats.late_terminal_frames == 2  # the two it still remembers
    assert [e.in_reply_to for e in h.events_of(ErrorReceived)] == [ids[0]]  # forgotten: reported


def test_a_mesh_that_learns_the_agent_lacks_cancel_stops_sending_it() -> None:
    h = MeshHarness()
    h.hello()
    first = h.mesh.send_dispatch("a", deadline_ms=1000, now=h.clock.now)
    h.read()
    h.at(h.clock.now + 1.0)
    (cancel,) = h.read().of(Cancel)
    h.send(h.factory.new(Error, ErrorPayload(code="BAD_FRAME", message="unknown type"),
                         in_reply_to=cancel.id))
    assert h.events_of(ExtensionUnsupported) == [ExtensionUnsupported("cancel")]
    h.mesh.send_dispatch("b", deadline_ms=1000, now=h.clock.now)
    h.read()
    h.at(h.clock.now + 1.0)
    assert h.read().of(Cancel) == []  # the deadline does its work alone (spec 3)
    assert len(h.events_of(DispatchTimedOut)) == 2
    assert first != cancel.id


# -- tool_call / tool_result, both ways ----------------------------------------------------------


def test_a_tool_call_and_its_result_are_correlated() -> None:
    pair = connected()
    call_id = pair.agent.send_tool_call(
        "lookup", {"q": 1}, deadline_ms=500, agent_type="search", instance_id="s-1",
        session_id="sess",
    )
    pair.pump()
    assert pair.mesh_events_of(ToolCallReceived) == [
        ToolCallReceived(call_id, "lookup", {"q": 1}, 500, "search", "s-1", "sess")
    ]
    pair.mesh.send_tool_result(call_id, {"hits": 3})
    pair.pump()
    assert pair.agent_events_of(ToolResultReceived) == [ToolResultReceived(call_id, {"hits": 3})]
    with pytest.raises(LocalProtocolError):
        pair.mesh.send_tool_result(call_id, "twice")


def test_a_tool_error_reaches_the_agent_as_an_error() -> None:
    pair = connected()
    call_id = pair.agent.send_tool_call("missing")
    pair.pump()
    pair.mesh.send_tool_result(call_id, error=("CAPABILITY_NOT_FOUND", "no agent has it"))
    pair.pump()
    (result,) = pair.agent_events_of(ToolResultReceived)
    assert result.call_id == call_id and result.result is None
    assert result.error == {"code": "CAPABILITY_NOT_FOUND", "message": "no agent has it"}


def test_tool_calls_beyond_the_mesh_limit_are_answered_rate_limited() -> None:
    pair = connected(Config(max_in_flight=1))
    first = pair.agent.send_tool_call("a")
    second = pair.agent.send_tool_call("b")
    pair.pump()
    assert [c.call_id for c in pair.mesh_events_of(ToolCallReceived)] == [first]
    (refused,) = pair.agent_events_of(ToolResultReceived)
    assert refused.call_id == second and refused.error is not None
    assert refused.error["code"] == "RATE_LIMITED"
    assert pair.mesh.stats.rate_limited == 1


def test_tool_results_the_agent_does_not_wait_for_are_ignored() -> None:
    h = AgentHarness()
    h.read()
    h.send(h.factory.new(ToolResult, ToolResultPayload(result=1),
                         in_reply_to="0192aaaa-0000-7000-8000-000000000002"))
    assert h.events_of(ToolResultReceived) == [] and h.read().empty


def test_tool_call_misuse_is_refused() -> None:
    h = AgentHarness(welcome=False)
    with pytest.raises(LocalProtocolError):
        h.agent.send_tool_call("x")
    pair = connected()
    with pytest.raises(LocalProtocolError):
        pair.mesh.send_tool_result("0192aaaa-0000-7000-8000-000000000003", 1)


def test_a_tool_result_for_a_closed_connection_is_dropped_quietly() -> None:
    pair = connected()
    call_id = pair.agent.send_tool_call("lookup")
    pair.pump()
    pair.cut()
    pair.mesh.send_tool_result(call_id, 1)  # nothing to send it on; no raise
    assert pair.mesh.data_to_send() == []


# -- dispatch auth -------------------------------------------------------------------------------


def _claims(token: str) -> dict[str, Any]:
    segment = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))


def test_the_mesh_mints_a_fresh_envelope_with_the_spec_claims() -> None:
    h = MeshHarness()
    h.hello()
    dispatch_id = h.mesh.send_dispatch("get_ticket", deadline_ms=1000, now=h.clock.now)
    (dispatch,) = h.read().of(Dispatch)
    auth = dispatch.payload.dispatch_auth
    assert isinstance(auth, SvanticJwtAuth)
    claims = _claims(auth.token)
    assert claims["aud"] == INSTANCE and claims["sub"] == "test-agent"
    assert claims["tenant_id"] == TENANT and claims["jti"] == dispatch_id
    assert claims["cap"] == "get_ticket" and claims["iss"] == "svantic"
    assert claims["iat"] == int(h.clock.wall())
    DispatchAuthVerifier(INSTANCE, hs256_keys=[TEST_SIGNING_SECRET]).verify(
        auth, dispatch_id=dispatch_id, capability="get_ticket", now=h.clock.wall()
    )


def _forged(h: AgentHarness, how: str) -> Dispatch:
    frame = h.dispatch_frame("get_ticket", auth=None)
    minter = DispatchAuthMinter("not-the-mesh-secret" if how == "bad signature" else
                                TEST_SIGNING_SECRET)
    claims = {
        "instance_id": INSTANCE, "agent_type": "test-agent", "tenant_id": TENANT,
        "dispatch_id": frame.id, "capability": "get_ticket", "now": h.clock.wall(),
    }
    if how == "wrong capability":
        claims["capability"] = "delete_everything"
    elif how == "another dispatch's token":
        claims["dispatch_id"] = "0192aaaa-0000-7000-8000-000000000004"
    elif how == "expired":
        claims["now"] = h.clock.wall() - 600
    elif how == "another instance":
        claims["instance_id"] = "agent-2"
    auth = None if how == "missing" else SvanticJwtAuth(token=minter.mint_token(**claims))
    return h.dispatch_frame("get_ticket", auth=auth or False, dispatch_id=frame.id)


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("missing", "missing"),
        ("bad signature", "bad_signature"),
        ("wrong capability", "wrong_capability"),
        ("another dispatch's token", "wrong_jti"),
        ("expired", "expired"),
        ("another instance", "wrong_audience"),
    ],
)
def test_a_dispatch_whose_auth_fails_is_refused_on_the_wire_and_never_runs(
    how: str, reason: str
) -> None:
    h = AgentHarness()
    h.read()
    dispatch = _forged(h, how)
    h.send(dispatch)
    wire = h.read()
    (error,) = wire.of(Error)
    assert error.payload.code == "DISPATCH_AUTH_FAILED" and error.in_reply_to == dispatch.id
    assert error.payload.detail == {"reason": reason}
    assert h.events_of(DispatchReceived) == []
    assert wire.close_code is None  # the socket stays open (spec 7)
    # the same dispatch again (a replay) still never runs, and is not answered twice
    h.send(dispatch)
    assert h.read().empty and h.events_of(DispatchReceived) == []
    h.send(h.dispatch_frame("get_ticket"))  # a good one still works
    assert len(h.events_of(DispatchReceived)) == 1


def test_a_malformed_envelope_shape_is_a_bad_frame_not_an_auth_failure() -> None:
    h = AgentHarness()
    h.read()
    frame = h.dispatch_frame(auth=False)
    text = json.loads(json.dumps({
        "v": 1, "type": "dispatch", "id": frame.id, "ts": frame.ts,
        "payload": {"dispatch_id": frame.id, "capability": "echo", "deadline_ms": 10,
                    "dispatch_auth": {"type": "svantic_jwt", "token": 7}},
    }))
    h.send_text(json.dumps(text))
    wire = h.read()
    assert wire.frames[0].payload.code == "BAD_FRAME" and wire.close_code == 1002


def test_a_mesh_that_cannot_mint_fails_the_dispatch_and_sends_nothing() -> None:
    routes: list[DispatchRoute] = []

    def broken(route: DispatchRoute) -> SvanticJwtAuth:
        routes.append(route)
        raise RuntimeError("signing key unavailable")

    h = MeshHarness(mint=broken)
    h.hello()
    dispatch_id = h.mesh.send_dispatch("echo", deadline_ms=1000, now=h.clock.now)
    (failed,) = h.events_of(DispatchFailed)
    assert (failed.dispatch_id, failed.code) == (dispatch_id, "AGENT_UNHEALTHY")
    assert "signing key unavailable" in (failed.message or "")
    assert h.read().empty
    assert h.mesh.in_flight == {} and h.mesh.next_deadline() != h.clock.now + 1.0
    assert routes[0].dispatch_id == dispatch_id and routes[0].tenant_id == TENANT


def test_shared_secret_dispatch_auth_end_to_end() -> None:
    secrets = {INSTANCE: "s3cret-value"}
    h = MeshHarness(mint=shared_secret_dispatch_auth(secrets.__getitem__))
    h.hello()
    h.mesh.send_dispatch("echo", deadline_ms=1000, now=h.clock.now)
    (dispatch,) = h.read().of(Dispatch)
    assert dispatch.payload.dispatch_auth == SharedSecretAuth(secret="s3cret-value")
    good = AgentHarness(verifier=DispatchAuthVerifier(INSTANCE, shared_secret="s3cret-value"))
    good.send(dispatch)
    assert len(good.events_of(DispatchReceived)) == 1
    bad = AgentHarness(verifier=DispatchAuthVerifier(INSTANCE, shared_secret="other-value"))
    bad.read()
    bad.send(dispatch)
    (error,) = bad.read().of(Error)
    assert error.payload.code == "DISPATCH_AUTH_FAILED"
    assert bad.events_of(DispatchReceived) == []


def test_dispatch_auth_disabled_on_both_sides_carries_no_envelope() -> None:
    pair = connected(dispatch_auth=False)
    dispatch_id = pair.mesh.send_dispatch("echo", deadline_ms=1000, now=pair.clock.now)
    pair.pump()
    assert [e.dispatch_id for e in pair.agent_events_of(DispatchReceived)] == [dispatch_id]


def test_an_auth_failure_reaches_the_mesh_as_the_dispatch_failure() -> None:
    pair = connected()
    pair.agent._verifier = DispatchAuthVerifier(INSTANCE, hs256_keys=["rotated-away"])
    dispatch_id = pair.mesh.send_dispatch("echo", deadline_ms=1000, now=pair.clock.now)
    pair.pump()
    (failed,) = pair.mesh_events_of(DispatchFailed)
    assert (failed.dispatch_id, failed.code) == (dispatch_id, "DISPATCH_AUTH_FAILED")
    assert pair.agent_events_of(DispatchReceived) == []
    assert pair.agent_events_of(ConnectionClosed) == []


# -- the agent's in-flight limit -----------------------------------------------------------------


def test_dispatches_over_max_in_flight_are_refused_rate_limited_with_a_hint() -> None:
    h = AgentHarness(Config(max_in_flight=1, rate_limit_retry_after=2.5))
    h.read()
    first, second = h.dispatch_frame(), h.dispatch_frame()
    h.send(first)
    h.send(second)
    (error,) = h.read().of(Error)
    assert error.in_reply_to == second.id and error.payload.code == "RATE_LIMITED"
    assert error.payload.detail == {"retry_after_ms": 2500}
    assert [e.dispatch_id for e in h.events_of(DispatchReceived)] == [first.id]
    h.agent.send_result(first.id, 1)
    third = h.dispatch_frame()
    h.send(third)
    assert [e.dispatch_id for e in h.events_of(DispatchReceived)] == [first.id, third.id]


def test_the_mesh_sees_the_in_flight_refusal_as_the_dispatch_failure() -> None:
    pair = connected(Config(max_in_flight=1))
    first = pair.mesh.send_dispatch("a", deadline_ms=1000, now=pair.clock.now)
    second = pair.mesh.send_dispatch("b", deadline_ms=1000, now=pair.clock.now)
    pair.pump()
    (failed,) = pair.mesh_events_of(DispatchFailed)
    assert (failed.dispatch_id, failed.code) == (second, "RATE_LIMITED")
    assert failed.detail == {"retry_after_ms": 1000}
    assert first in pair.mesh.in_flight


def test_a_result_that_is_not_json_is_answered_dispatch_failed() -> None:
    """The caller always hears back; the programmer gets LocalProtocolError."""
    import pytest

    from svantic_proto import DispatchFailed, LocalProtocolError
    from svantic_proto.testing import Pair

    pair = Pair()
    pair.connect()
    dispatch_id = pair.mesh.send_dispatch("job", deadline_ms=5000, now=pair.clock.now)
    pair.pump()
    with pytest.raises(LocalProtocolError):
        pair.agent.send_result(dispatch_id, object())
    pair.pump()
    [failed] = pair.mesh_events_of(DispatchFailed)
    assert failed.dispatch_id == dispatch_id and failed.code == "DISPATCH_FAILED"


def test_send_cancelled_answers_with_the_reason_of_the_cancel() -> None:
    from svantic_proto import DispatchCancelled, DispatchFailed, DispatchTimedOut
    from svantic_proto.testing import Pair

    pair = Pair()
    pair.connect()
    first = pair.mesh.send_dispatch("job", deadline_ms=1000, now=pair.clock.now)
    pair.pump()
    pair.advance(1.0)  # the mesh times out and sends cancel
    assert [e.dispatch_id for e in pair.mesh_events_of(DispatchTimedOut)] == [first]
    assert pair.agent_events_of(DispatchCancelled)[0].reason == "DEADLINE_EXCEEDED"
    pair.agent.send_cancelled(first)
    pair.pump()
    assert pair.mesh.stats.late_terminal_frames == 1  # the mesh had already given up
    assert pair.session.finished[first].payload.code == "DEADLINE_EXCEEDED"
    assert pair.mesh_events_of(DispatchFailed) == []


def test_a_result_read_after_the_deadline_loses_to_the_timeout() -> None:
    """Overdue timers run before new input, whatever the adapter's scheduling did."""
    from svantic_proto import DispatchCompleted, DispatchTimedOut
    from svantic_proto.testing import Pair

    pair = Pair()
    pair.connect()
    dispatch_id = pair.mesh.send_dispatch("job", deadline_ms=1000, now=pair.clock.now)
    pair.pump()
    pair.agent.send_result(dispatch_id, "late")
    late = pair.agent.data_to_send()
    pair.clock.advance(1.5)  # the mesh's timer did not fire before the bytes were read
    for chunk in late:
        pair.mesh.receive_data(chunk, pair.clock.now)
    events = pair.mesh.events_received()
    assert [type(e) for e in events if isinstance(e, DispatchTimedOut | DispatchCompleted)] == [
        DispatchTimedOut
    ]
    assert pair.mesh.stats.late_terminal_frames == 1
