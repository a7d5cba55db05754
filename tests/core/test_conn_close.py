"""Every way a connection ends, and what `ConnectionClosed` says about it (spec 4 and 5).

One table: for each close path, the agent's close code, who started it, and whether to
reconnect (after a close it did not ask for itself, whatever the code, it retries;
after 1008 it refreshes its token first; after its own close it stops). The mesh
side always reports FINAL: it never reconnects.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from test_conn_kit import BINARY, TEXT, ws_frame

from svantic_proto.backoff import RetryDecision
from svantic_proto.config import Config
from svantic_proto.events import ConnectionClosed, UpgradeRequest
from svantic_proto.testing import Pair

CONFIG = Config(
    ws_ping_interval=1000.0, app_ping_interval=1000.0, app_ping_offset=500.0,
    heartbeat_interval=1000.0, dead_peer_timeout=20.0, hello_timeout=5.0,
    max_message_bytes=4096,
)


def agent_sends_raw(pair: Pair, data: bytes) -> None:
    """Bytes from the agent that its API would never produce (a broken or hostile agent)."""
    pair.mesh.receive_data(data, pair.clock.now)
    pair.pump()


def agent_silent(pair: Pair) -> None:
    pair.go_silent("agent")  # half-open TCP
    pair.advance(10.0)
    pair.mesh.send_ping()  # the agent still hears the mesh, so only the mesh times out
    pair.pump()
    pair.advance(10.0)


def mesh_silent(pair: Pair) -> None:
    pair.go_silent("mesh")
    pair.advance(20.0)


def mesh_sends_text(pair: Pair, text: str) -> None:
    framing = pair.mesh._framing
    assert framing is not None
    framing.send_text(text)
    pair.pump()


def auth_expired(pair: Pair) -> None:
    pair.mesh._arm_token_expiry(pair.clock.wall() + 3.0, pair.clock.now)
    pair.advance(3.0)


def no_welcome(pair: Pair) -> None:
    pair.go_silent("mesh")
    pair.advance(5.0)


PATHS: list[tuple[str, Callable[[Pair], Any], int | None, bool, RetryDecision]] = [
    ("agent close()", lambda p: p.agent.close(now=p.clock.now), 1000, False, RetryDecision.FINAL),
    ("agent close_request, drained", lambda p: p.agent.close_request(now=p.clock.now), 1000,
     False, RetryDecision.FINAL),
    ("mesh close_request, drained", lambda p: p.mesh.close_request(now=p.clock.now), 1000, True,
     RetryDecision.RETRY),
    ("mesh shutdown 1001", lambda p: p.mesh.close(1001, "shutdown", now=p.clock.now), 1001, True,
     RetryDecision.RETRY),
    ("mesh: dead peer 1001", agent_silent, 1001, True, RetryDecision.RETRY),
    ("mesh: agent sent a bad frame, 1002", lambda p: agent_sends_raw(
        p, ws_frame(TEXT, b"not json", masked=True)), 1002, True, RetryDecision.RETRY),
    ("mesh: agent sent binary, 1003", lambda p: agent_sends_raw(
        p, ws_frame(BINARY, b"\x00", masked=True)), 1003, True, RetryDecision.RETRY),
    ("mesh: agent sent bad UTF-8, 1007", lambda p: agent_sends_raw(
        p, ws_frame(TEXT, b"\xff\xfe", masked=True)), 1007, True, RetryDecision.RETRY),
    ("mesh: agent message too big, 1009", lambda p: agent_sends_raw(
        p, ws_frame(TEXT, b" " * 5000, masked=True)), 1009, True, RetryDecision.RETRY),
    ("mesh: AUTH_EXPIRED 1008", auth_expired, 1008, True, RetryDecision.REFRESH_TOKEN_THEN_RETRY),
    ("mesh internal error 1011", lambda p: p.mesh.close(1011, "bug", now=p.clock.now), 1011,
     True, RetryDecision.RETRY),
    ("agent: mesh sent a bad frame, 1002", lambda p: mesh_sends_text(p, "[]"), 1002, False,
     RetryDecision.RETRY),
    ("agent: dead peer", mesh_silent, None, True, RetryDecision.RETRY),
    ("abnormal end (TCP cut)", lambda p: p.cut(), None, True, RetryDecision.RETRY),
]


@pytest.mark.parametrize(
    ("path", "code", "by_peer", "retry"), [row[1:] for row in PATHS], ids=[row[0] for row in PATHS]
)
def test_every_close_path_reports_its_code_and_retry_decision(
    path: Callable[[Pair], Any], code: int | None, by_peer: bool, retry: RetryDecision
) -> None:
    pair = Pair(CONFIG)
    pair.connect()
    path(pair)
    pair.pump()
    (closed,) = pair.agent_events_of(ConnectionClosed)
    assert (closed.code, closed.by_peer, closed.retry) == (code, by_peer, retry)
    assert pair.agent.closed
    assert all(e.retry is RetryDecision.FINAL for e in pair.mesh_events_of(ConnectionClosed))


def test_no_welcome_in_time_is_retried() -> None:
    pair = Pair(CONFIG, auto_accept=False)
    pair.connect()
    (request,) = pair.mesh_events_of(UpgradeRequest)
    pair.mesh.accept(instance_id=request.request.instance_id, tenant_id="tenant-1",
                     now=pair.clock.now)
    no_welcome(pair)
    (closed,) = pair.agent_events_of(ConnectionClosed)
    assert (closed.code, closed.by_peer, closed.retry) == (None, True, RetryDecision.RETRY)


def test_connection_closed_is_the_last_event_and_comes_once() -> None:
    pair = Pair(CONFIG)
    pair.connect()
    pair.agent.close(now=pair.clock.now)
    pair.agent.close(now=pair.clock.now)  # a second close does nothing
    pair.pump()
    pair.advance(100.0)
    assert isinstance(pair.agent_events[-1], ConnectionClosed)
    assert len(pair.agent_events_of(ConnectionClosed)) == 1
    assert len(pair.mesh_events_of(ConnectionClosed)) == 1
    assert pair.agent.data_to_send() == [] and pair.agent.next_deadline() is None
    pair.agent.handle_timer(pair.clock.now + 1000.0)  # a closed connection ignores timers
    assert pair.agent.events_received() == []
