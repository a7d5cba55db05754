"""`MeshRuntime` while the mesh shuts down: a dispatch whose agent connection ends during
the drain fails `AGENT_DISCONNECTED` at once, while its caller's connection is still there to
carry the answer (issue 17), on a fake clock.

A mesh shutting down admits no upgrade, so a dispatch held for a resume (spec 5) could only
wait for the close timeout and then find its caller's link dropped with the mesh. A resume
store that hands held dispatches to another mesh process (scale-out) keeps them instead: the
agent may resume there and the outcome come back here (`settle`).
"""

from __future__ import annotations

import json
import logging
import random
from typing import Any

import pytest
from test_mesh_runtime import CONFIG, LOGGER, FakeWaiter, Link
from test_mesh_runtime_http import HttpDriver, plain, statuses

from svantic_proto.auth import DispatchAuthMinter
from svantic_proto.errors import DispatchError
from svantic_proto.events import CloseRequested
from svantic_proto.mesh import jwt_dispatch_auth
from svantic_proto.mesh_runtime import MeshPhase, MeshRuntime
from svantic_proto.resume import ResumeStore
from svantic_proto.testing import TEST_SIGNING_SECRET

GRACE = 1.0


class SharedStore(ResumeStore):
    """Stands for the scale-out's store: a subclass, which may resume tokens elsewhere."""


class DrainDriver(HttpDriver):
    """`HttpDriver` whose runtime's resume store (and `resume_elsewhere`) the test picks."""

    def __init__(self, *, store_class: type[ResumeStore] = ResumeStore,
                 resume_elsewhere: bool | None = None) -> None:
        super().__init__()
        self.store = store_class(window=CONFIG.resume_window,
                                 token_factory=lambda: random.Random(5).randbytes(12).hex())
        self.runtime = MeshRuntime(
            dispatch_auth=jwt_dispatch_auth(DispatchAuthMinter(TEST_SIGNING_SECRET)),
            wall_clock=self.clock.wall, config=CONFIG, resume_store=self.store,
            random_bytes=self._random, serve_http=True, resume_elsewhere=resume_elsewhere,
        )

    def call(self, instance_id: str = "agent-1") -> tuple[Link, str, FakeWaiter]:
        """A caller's HTTP request, which the application turns into a dispatch."""
        caller = self.get(plain("/v1/dispatch", method="POST", body=b"{}"))
        dispatch_id, waiter = self.dispatch(instance_id, deadline_ms=60_000)
        return caller, dispatch_id, waiter

    def reply(self, caller: Link, waiter: FakeWaiter) -> None:
        """What the application does with the outcome: the caller's answer."""
        assert waiter.done
        if waiter.error is None:
            status, body = 200, json.dumps({"result": waiter.value}).encode()
        else:
            assert isinstance(waiter.error, DispatchError)
            status, body = 502, json.dumps({"error": {"code": waiter.error.code}}).encode()
        self.http[caller].respond(status, [("content-type", "application/json")], body,
                                  now=self.now)
        self.service(caller)
        self.pump()


def error_code(waiter: FakeWaiter) -> str:
    assert isinstance(waiter.error, DispatchError)
    return waiter.error.code


def answered(caller: Link) -> list[tuple[int, Any]]:
    client: Any = caller.agent
    return [(status, json.loads(client.received.partition(b"\r\n\r\n")[2]))
            for status in statuses(client)]


# -- a process-local resume store --------------------------------------------------------------


def test_a_dispatch_outlasting_the_grace_fails_at_the_1001_and_its_caller_gets_the_answer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    driver = DrainDriver()
    agent = driver.dial("agent-1")
    caller, dispatch_id, waiter = driver.call()
    start = driver.now
    driver.runtime.begin_shutdown(start, grace=GRACE)
    driver.pump()
    assert agent.agent_events_of(CloseRequested)
    driver.advance_to(start + GRACE - 0.001)
    assert not waiter.done  # the agent may still finish within the grace
    driver.advance_to(start + GRACE)
    # The 1001 ended the session: nothing can resume the dispatch on this mesh any more.
    assert (waiter.calls, error_code(waiter)) == (1, "AGENT_DISCONNECTED")
    assert isinstance(waiter.error, DispatchError) and waiter.error.dispatch_id == dispatch_id
    assert caller.open and driver.drops == []
    driver.reply(caller, waiter)
    assert answered(caller) == [(502, {"error": {"code": "AGENT_DISCONNECTED"}})]
    # The answer written, the caller's link closes; with the agent gone the mesh is done,
    # without waiting for the close timeout.
    assert not caller.open
    assert driver.runtime.phase is MeshPhase.CLOSED and driver.completed == 1
    assert driver.now == start + GRACE
    assert driver.runtime.waiting() == 0 and len(driver.store) == 0
    assert ("mesh shutdown: 1 held dispatches failed AGENT_DISCONNECTED (no agent can "
            "resume them on a mesh shutting down)") in caplog.messages


def test_an_agent_leaving_during_the_drain_fails_its_dispatch_at_that_instant() -> None:
    driver = DrainDriver()
    agent = driver.dial("agent-1")
    driver.dial("agent-2")  # keeps the mesh draining after agent-1 left
    _, busy = driver.dispatch("agent-2")
    caller, _, waiter = driver.call("agent-1")
    start = driver.now
    driver.runtime.begin_shutdown(start, grace=10.0)
    driver.pump()
    driver.advance(2.0)
    driver.cut(agent)  # its network drops: it would resume, but not on this mesh
    assert driver.runtime.phase is MeshPhase.DRAINING
    assert error_code(waiter) == "AGENT_DISCONNECTED" and waiter.calls == 1
    assert caller.open
    driver.reply(caller, waiter)
    assert [status for status, _ in answered(caller)] == [502]
    assert not busy.done  # the other agent's work goes on within the grace


def test_a_dispatch_held_before_the_shutdown_fails_when_it_begins() -> None:
    driver = DrainDriver()
    agent = driver.dial("agent-1")
    caller, _, waiter = driver.call()
    driver.cut(agent)  # held: the agent has resume_window seconds to come back
    assert not waiter.done and len(driver.store) == 1
    driver.advance(1.0)
    driver.runtime.begin_shutdown(driver.now, grace=GRACE)
    driver.pump()  # no upgrade is admitted now: it cannot come back here
    assert (waiter.calls, error_code(waiter)) == (1, "AGENT_DISCONNECTED")
    assert len(driver.store) == 0
    driver.reply(caller, waiter)
    assert [status for status, _ in answered(caller)] == [502]
    assert driver.runtime.phase is MeshPhase.CLOSED


def test_a_result_within_the_grace_still_wins() -> None:
    driver = DrainDriver()
    agent = driver.dial("agent-1")
    caller, dispatch_id, waiter = driver.call()
    driver.runtime.begin_shutdown(driver.now, grace=GRACE)
    driver.pump()
    driver.advance(GRACE / 2)
    agent.agent.send_result(dispatch_id, {"v": 1})
    driver.pump()
    assert (waiter.calls, waiter.value) == (1, {"v": 1})
    driver.reply(caller, waiter)
    assert answered(caller) == [(200, {"result": {"v": 1}})]
    driver.advance(CONFIG.close_timeout + GRACE)
    assert waiter.calls == 1


# -- a store that hands held dispatches to another mesh process (scale-out) --------------------


@pytest.mark.parametrize("options", [{"resume_elsewhere": True}, {"store_class": SharedStore}],
                         ids=["explicit", "store-subclass"])
def test_a_store_that_hands_over_keeps_what_it_holds_for_the_other_process(
        options: dict[str, Any]) -> None:
    driver = DrainDriver(**options)
    agent = driver.dial("agent-1")
    caller, dispatch_id, waiter = driver.call()
    start = driver.now
    driver.runtime.begin_shutdown(start, grace=GRACE)
    driver.pump()
    driver.advance_to(start + GRACE)
    assert not agent.open and not waiter.done and len(driver.store) == 1
    # The agent resumed on another process, which ran the dispatch and sent its outcome here.
    driver.advance(CONFIG.close_timeout / 2)
    assert driver.runtime.settle(dispatch_id, result={"v": 2})
    assert (waiter.calls, waiter.value) == (1, {"v": 2})
    assert caller.open
    driver.reply(caller, waiter)
    assert answered(caller) == [(200, {"result": {"v": 2}})]
    assert driver.runtime.phase is MeshPhase.CLOSED


def test_a_handed_over_dispatch_with_no_outcome_fails_once_at_the_close_timeout() -> None:
    driver = DrainDriver(resume_elsewhere=True)
    driver.dial("agent-1")
    _, _, waiter = driver.call()
    start = driver.now
    driver.runtime.begin_shutdown(start, grace=GRACE)
    driver.pump()
    driver.advance_to(start + GRACE + CONFIG.close_timeout - 0.001)
    assert not waiter.done
    driver.advance_to(start + GRACE + CONFIG.close_timeout)
    assert driver.runtime.phase is MeshPhase.CLOSED
    assert (waiter.calls, error_code(waiter)) == (1, "AGENT_DISCONNECTED")
    driver.advance(CONFIG.resume_window)  # the store's window ends later: nothing again
    assert waiter.calls == 1


def test_resume_elsewhere_false_overrides_a_store_subclass() -> None:
    driver = DrainDriver(store_class=SharedStore, resume_elsewhere=False)
    driver.dial("agent-1")
    _, _, waiter = driver.call()
    start = driver.now
    driver.runtime.begin_shutdown(start, grace=GRACE)
    driver.pump()
    driver.advance_to(start + GRACE)
    assert error_code(waiter) == "AGENT_DISCONNECTED"
