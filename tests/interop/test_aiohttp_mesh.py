"""Interop: our `Agent` (asyncio adapter) against a minimal mesh written on aiohttp's
WebSocket server from the spec alone, over real TLS on 127.0.0.1.

Covers the issue's acceptance: the dispatch round trip (with a PyJWT-minted
`svantic_jwt`), BAD_FRAME handling (an unknown type keeps the socket, an invalid
frame closes it 1002), our `token_refresh` extension meeting a mesh that does not
know it, and a resume after a cut TCP connection that delivers the result once.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import pytest
from _independent import (
    TLS,
    WAIT,
    IndependentMesh,
    MeshSession,
    Registration,
    loopback_tls,
    make_frame,
    transport_token,
    uuid7,
)
from svantic_adapters.asyncio import Agent, connect

from svantic_proto import (
    AgentSession,
    DispatchAuthVerifier,
    DispatchContext,
    HandlerError,
    HandshakeRejected,
)

TRANSPORT_SECRET = "interop-transport-secret-0123456789abcdef"
SIGNING_SECRET = "interop-signing-secret-0123456789abcdef"
TENANT = "tenant-interop"
INSTANCE = "agent-py-1"
AGENT_TYPE = "ticket-agent"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN_ID = "00f067aa0ba902b7"


@pytest.fixture(scope="module")
def tls() -> TLS:
    return loopback_tls()


def run(scenario: Awaitable[None]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(20):
            await scenario
    asyncio.run(bounded())


@asynccontextmanager
async def independent_mesh(tls: TLS) -> AsyncIterator[tuple[IndependentMesh, str]]:
    mesh = IndependentMesh(
        transport_secret=TRANSPORT_SECRET, signing_secret=SIGNING_SECRET,
        registrations={INSTANCE: Registration(TENANT, AGENT_TYPE),
                       "agent-other-tenant": Registration("tenant-other", AGENT_TYPE)})
    url = await mesh.start(tls.server)
    try:
        yield mesh, url
    finally:
        await mesh.close()


def our_agent(url: str, tls: TLS, *, instance_id: str = INSTANCE,
              contexts: list[DispatchContext] | None = None) -> Agent:
    """Reconnect backoff pinned to its low end (0.75 s first), so resume tests stay short."""
    agent = connect(
        url, token=transport_token(TRANSPORT_SECRET, tenant_id=TENANT), instance_id=instance_id,
        agent_type=AGENT_TYPE, ssl_context=tls.client,
        dispatch_auth=DispatchAuthVerifier(instance_id, hs256_keys=[SIGNING_SECRET]),
        session=AgentSession(rand=lambda: 0.0))
    seen = contexts if contexts is not None else []

    @agent.capability("get_ticket", parameters={
        "type": "object", "properties": {"ticket_id": {"type": "string"}},
        "required": ["ticket_id"]})
    def get_ticket(arguments: Mapping[str, Any], context: DispatchContext) -> Any:
        seen.append(context)
        if arguments["ticket_id"] == "forbidden":
            raise HandlerError("TICKET_FORBIDDEN", "not your ticket")
        return {"ticket_id": arguments["ticket_id"], "status": "open"}

    return agent


async def ping_barrier(mesh: IndependentMesh, session: MeshSession) -> None:
    """Everything the mesh sent before this ping has been processed by our agent."""
    ping = make_frame("ping")
    await session.send(ping)
    await mesh.wait_received(
        session, lambda f: f["type"] == "pong" and f.get("in_reply_to") == ping["id"])


# -- dispatch round trip ---------------------------------------------------------------------------


def test_dispatch_round_trip(tls: TLS) -> None:
    async def scenario() -> None:
        async with independent_mesh(tls) as (mesh, url):
            contexts: list[DispatchContext] = []
            agent = our_agent(url, tls, contexts=contexts)
            async with agent:
                session = await mesh.wait_session(INSTANCE)
                assert session.ws.ws_protocol == "svantic.v1"
                assert session.request.headers["Authorization"].startswith("Bearer ")
                assert session.hello is not None
                hello = session.hello["payload"]
                assert hello["instance_id"] == INSTANCE and hello.get("resume_token") is None
                assert "get_ticket" in hello.get("capabilities", [])
                heartbeat = await mesh.wait_received(session, lambda f: f["type"] == "heartbeat")
                assert heartbeat["payload"]["active_sessions"] == 0

                context = {"session_id": "s-1", "tenant_id": TENANT, "propagation_headers": {
                    "traceparent": f"00-{TRACE_ID}-{SPAN_ID}-01", "baggage": "k=v"}}
                dispatch_id = await mesh.dispatch(INSTANCE, "get_ticket", {"ticket_id": "T-1"},
                                                  deadline_ms=5000, session_context=context)
                answer = await mesh.outcome(dispatch_id)
                assert answer["type"] == "dispatch_result"
                assert answer["payload"]["result"] == {"ticket_id": "T-1", "status": "open"}
                handled = contexts[0]
                assert handled.dispatch_id == dispatch_id and handled.attempt == 1
                assert handled.trace.parent_trace_id == TRACE_ID
                assert handled.trace.parent_span_id == SPAN_ID
                assert dict(handled.trace.baggage) == {"k": "v"}

                failures: dict[str, tuple[str, dict[str, Any], str]] = {
                    "TICKET_FORBIDDEN": ("get_ticket", {"ticket_id": "forbidden"}, "valid"),
                    "INVALID_ARGUMENTS": ("get_ticket", {"ticket_id": 7}, "valid"),
                    "CAPABILITY_NOT_FOUND": ("no_such_thing", {}, "valid"),
                    "DISPATCH_AUTH_FAILED": ("get_ticket", {"ticket_id": "T-9"}, "bad_signature"),
                }
                for code, (capability, arguments, auth) in failures.items():
                    failed_id = await mesh.dispatch(INSTANCE, capability, arguments,
                                                    deadline_ms=5000, auth=auth)
                    failure = await mesh.outcome(failed_id)
                    assert failure["type"] == "error", code
                    assert failure["payload"]["code"] == code
                assert len(contexts) == 2
                assert agent.handler_runs == 2  # never for a dispatch that failed auth
                assert mesh.live(INSTANCE) is session
            await asyncio.wait_for(session.closed.wait(), WAIT)
            assert session.close_code == 1000  # stop(): close_request, then 1000
            assert session.frames("close_request")
    run(scenario())


@pytest.mark.parametrize(("instance_id", "status", "code"), [
    ("agent-unknown", 404, "INSTANCE_NOT_FOUND"),
    ("agent-other-tenant", 403, "TENANT_MISMATCH"),
])
def test_refused_upgrade_raises_the_typed_rejection(tls: TLS, instance_id: str, status: int,
                                                    code: str) -> None:
    async def scenario() -> None:
        async with independent_mesh(tls) as (mesh, url):
            with pytest.raises(HandshakeRejected) as refused:
                async with our_agent(url, tls, instance_id=instance_id):
                    pass
            assert (refused.value.status, refused.value.code) == (status, code)
            assert mesh.rejections == [(status, code)]  # final: not retried (spec 5)
    run(scenario())


# -- BAD_FRAME -------------------------------------------------------------------------------------


def test_unknown_frame_type_is_answered_and_the_socket_kept(tls: TLS) -> None:
    async def scenario() -> None:
        async with independent_mesh(tls) as (mesh, url), our_agent(url, tls) as agent:
            session = await mesh.wait_session(INSTANCE)
            gossip = make_frame("mesh_gossip", {"rumour": "x"})
            await session.send(gossip)
            error = await mesh.wait_received(session, lambda f: f["type"] == "error")
            assert error["payload"]["code"] == "BAD_FRAME"
            assert error.get("in_reply_to") == gossip["id"]
            dispatch_id = await mesh.dispatch(INSTANCE, "get_ticket", {"ticket_id": "T-2"})
            assert (await mesh.outcome(dispatch_id))["type"] == "dispatch_result"
            assert mesh.live(INSTANCE) is session and session.close_code is None
            assert agent.session.connections == 1
    run(scenario())


def _invalid(kind: str) -> tuple[str, str | None]:
    frame_id = uuid7()
    if kind == "not_json":
        return "[1, 2", None
    if kind == "not_an_object":
        return json.dumps(["ping"]), None
    if kind == "v_is_a_string":
        frame = make_frame("ping", frame_id=frame_id)
        frame["v"] = "1"
    elif kind == "ts_without_offset":
        frame = make_frame("ping", frame_id=frame_id)
        frame["ts"] = "2026-11-21T10:00:00"
    elif kind == "dispatch_id_differs":
        frame = make_frame("dispatch", {"dispatch_id": uuid7(), "capability": "get_ticket",
                                        "deadline_ms": 1000}, frame_id=frame_id)
    elif kind == "dispatch_auth_shape":
        frame = make_frame("dispatch", {"dispatch_id": frame_id, "capability": "get_ticket",
                                        "deadline_ms": 1000,
                                        "dispatch_auth": {"type": "magic", "token": "x"}},
                           frame_id=frame_id)
    else:
        raise ValueError(kind)
    return json.dumps(frame), frame_id


@pytest.mark.parametrize("kind", ["not_json", "not_an_object", "v_is_a_string",
                                  "ts_without_offset", "dispatch_id_differs",
                                  "dispatch_auth_shape"])
def test_invalid_frame_is_answered_then_closed_1002(tls: TLS, kind: str) -> None:
    async def scenario() -> None:
        async with independent_mesh(tls) as (mesh, url), our_agent(url, tls) as agent:
            session = await mesh.wait_session(INSTANCE)
            text, frame_id = _invalid(kind)
            await session.send(text)
            error = await mesh.wait_received(session, lambda f: f["type"] == "error")
            assert error["payload"]["code"] == "BAD_FRAME"
            assert error.get("in_reply_to") == frame_id
            await asyncio.wait_for(session.closed.wait(), WAIT)
            assert session.close_code == 1002
            assert agent.handler_runs == 0
    run(scenario())


def test_binary_message_is_closed_1003(tls: TLS) -> None:
    async def scenario() -> None:
        async with independent_mesh(tls) as (mesh, url), our_agent(url, tls):
            session = await mesh.wait_session(INSTANCE)
            await session.ws.send_bytes(b"\x00binary")
            await asyncio.wait_for(session.closed.wait(), WAIT)
            assert session.close_code == 1003
    run(scenario())


def test_reconnects_and_resumes_after_a_1002(tls: TLS) -> None:
    async def scenario() -> None:
        async with independent_mesh(tls) as (mesh, url), our_agent(url, tls):
            first = await mesh.wait_session(INSTANCE)
            await first.send("not json")
            await asyncio.wait_for(first.closed.wait(), WAIT)
            second = await mesh.wait_session(INSTANCE, count=2)  # spec 5: retry after 1002
            assert second.hello is not None and second.welcome is not None
            assert second.hello["payload"]["resume_token"] == first.resume_token
            assert second.welcome["payload"]["resumed"] is True
    run(scenario())


# -- our extension meets a peer that does not know it ----------------------------------------------


def test_token_refresh_extension_downgrades(tls: TLS) -> None:
    async def scenario() -> None:
        async with independent_mesh(tls) as (mesh, url), our_agent(url, tls) as agent:
            session = await mesh.wait_session(INSTANCE)
            conn = agent.conn
            assert conn is not None and agent.link is not None
            fresh = transport_token(TRANSPORT_SECRET, tenant_id=TENANT, lifetime=900)
            assert agent.refresh_token(fresh) is True
            refresh = await mesh.wait_received(session, lambda f: f["type"] == "token_refresh")
            await ping_barrier(mesh, session)  # the mesh answered it, and our agent read that
            answer = next(f for f in session.sent if f.get("in_reply_to") == refresh["id"])
            assert answer["type"] == "error" and answer["payload"]["code"] == "BAD_FRAME"
            assert agent.refresh_token(fresh) is False  # downgraded: reconnect with it instead
            await ping_barrier(mesh, session)
            assert len(session.frames("token_refresh")) == 1
            assert mesh.live(INSTANCE) is session and not conn.closed
    run(scenario())


# -- resume ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("finish_while_down", [True, False],
                         ids=["result-queued-while-down", "result-after-resume"])
def test_resume_delivers_the_result_exactly_once(tls: TLS, finish_while_down: bool) -> None:
    async def scenario() -> None:
        async with independent_mesh(tls) as (mesh, url):
            agent = our_agent(url, tls)
            gate, started, returning = asyncio.Event(), asyncio.Event(), asyncio.Event()

            @agent.capability("slow_echo")
            async def slow_echo(arguments: Mapping[str, Any], context: DispatchContext) -> Any:
                started.set()
                await gate.wait()
                returning.set()  # waiters run after this step, when the result is queued
                return {"echo": dict(arguments), "attempt": context.attempt}

            async with agent:
                first = await mesh.wait_session(INSTANCE)
                dispatch_id = await mesh.dispatch(INSTANCE, "slow_echo", {"n": 7},
                                                  deadline_ms=10_000)
                await asyncio.wait_for(started.wait(), WAIT)
                first_link = agent.link
                assert first_link is not None

                await mesh.cut(first)  # TCP gone mid-dispatch, no close frame
                await asyncio.wait_for(first_link.done.wait(), WAIT)
                if finish_while_down:
                    gate.set()
                    await asyncio.wait_for(returning.wait(), WAIT)
                    assert len(agent.session.outbox) == 1  # the socket is down: queued

                second = await mesh.wait_session(INSTANCE, count=2)
                assert second.hello is not None and second.welcome is not None
                assert second.hello["payload"]["resume_token"] == first.resume_token
                assert second.welcome["payload"]["resumed"] is True
                assert second.welcome["payload"]["replayed_dispatches"] == [dispatch_id]
                replay = await mesh.changes.until(
                    lambda: next((f for f in second.sent if f["type"] == "dispatch"), None))
                assert replay["id"] == dispatch_id and replay["payload"]["attempt"] == 2
                await ping_barrier(mesh, second)  # our agent has seen the replay by now
                gate.set()

                answer = await mesh.outcome(dispatch_id)
                assert answer["payload"]["result"] == {"echo": {"n": 7}, "attempt": 1}
                await ping_barrier(mesh, second)
                assert mesh.terminal_frames[dispatch_id] == 1  # exactly once on the wire
                assert mesh.late_terminal_frames == 0
                assert agent.handler_runs == 1  # the replay did not run the handler again
                assert first.frames("dispatch_result") == []
    run(scenario())

