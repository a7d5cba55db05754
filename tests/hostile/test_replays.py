"""Replays (spec 5 and 7): a dispatch envelope presented again, and resume tokens presented
by someone they were not issued to.

* A dispatch frame replayed byte for byte runs its handler once: the agent answers the copy
  with the stored terminal frame (spec 5). Its envelope moved onto another dispatch id is
  `DISPATCH_AUTH_FAILED` (`jti`, spec 7).
* A resume token is single-use and bound to the instance and tenant that received it: on a
  real mesh process, presenting it for another instance, from another tenant, or a second
  time gives `resumed: false` and replays nothing.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from hostile_kit import CLIENT_B, MeshProcess, frame_text, raw_agent, ws_frame
from test_bad_tokens import HS256, _client_texts, _unmasked_text, dispatch_claims, sign

from svantic_proto import events as ev
from svantic_proto.testing import TEST_SIGNING_SECRET, Pair


def _dispatch_frame(dispatch_id: str, token: str) -> bytes:
    return _unmasked_text(json.dumps({
        "v": 1, "type": "dispatch", "id": dispatch_id, "ts": "2026-11-21T10:00:00.123Z",
        "payload": {"dispatch_id": dispatch_id, "capability": "echo", "arguments": {},
                    "deadline_ms": 5000,
                    "dispatch_auth": {"type": "svantic_jwt", "token": token}}}).encode())


def test_a_replayed_dispatch_runs_its_handler_once() -> None:
    pair = Pair()
    pair.connect()
    agent = pair.agent
    dispatch_id = str(uuid.uuid4())
    token = sign(HS256, dispatch_claims(dispatch_id, pair.clock.wall()),
                 TEST_SIGNING_SECRET.encode())
    frame = _dispatch_frame(dispatch_id, token)
    agent.receive_data(frame, pair.clock.now)
    started = [e for e in agent.events_received() if isinstance(e, ev.DispatchReceived)]
    assert [e.dispatch_id for e in started] == [dispatch_id]
    agent.send_result(dispatch_id, {"ok": 1})
    first = _client_texts(b"".join(agent.data_to_send()))
    assert [f["type"] for f in first] == ["dispatch_result"]
    for _ in range(3):  # the very same bytes again: no second run, and no second answer
        agent.receive_data(frame, pair.clock.now)
        assert not [e for e in agent.events_received() if isinstance(e, ev.DispatchReceived)]
        again = _client_texts(b"".join(agent.data_to_send()))
        assert [f["type"] for f in again if f["type"] != "dispatch_result"] == []
        assert len(again) <= 1
    assert not agent.closed


def test_an_envelope_moved_onto_another_dispatch_fails_on_its_jti() -> None:
    pair = Pair()
    pair.connect()
    agent = pair.agent
    original = str(uuid.uuid4())
    token = sign(HS256, dispatch_claims(original, pair.clock.wall()),
                 TEST_SIGNING_SECRET.encode())
    stolen_onto = str(uuid.uuid4())
    agent.receive_data(_dispatch_frame(stolen_onto, token), pair.clock.now)
    assert not [e for e in agent.events_received() if isinstance(e, ev.DispatchReceived)]
    answers = _client_texts(b"".join(agent.data_to_send()))
    assert answers[0]["in_reply_to"] == stolen_onto
    assert answers[0]["payload"]["code"] == "DISPATCH_AUTH_FAILED"
    assert answers[0]["payload"]["detail"]["reason"] == "wrong_jti"


def _resume_token(mesh: MeshProcess, instance: str) -> str:
    with raw_agent(mesh, instance) as agent:
        welcome = agent.hello()
        assert welcome["payload"]["resumed"] is False
        token = str(welcome["payload"]["resume_token"])
        agent.send(ws_frame(0x8, (1000).to_bytes(2, "big")))
        agent.eof_within(5.0)
    return token


def _hello_with(mesh: MeshProcess, instance: str, resume_token: str,
                **kwargs: str) -> dict[str, Any]:
    with raw_agent(mesh, instance, **kwargs) as agent:
        welcome = agent.hello(resume_token=resume_token)
        agent.send(ws_frame(0x1, frame_text("ping", {})))
        agent.frames_until(lambda f: f.opcode == 0x1 and f.json()["type"] == "pong")
        return dict(welcome["payload"])


def test_a_resume_token_only_resumes_its_own_instance_once(mesh: MeshProcess) -> None:
    for instance in ("resume-a", "resume-b"):
        mesh.register(instance)
    mesh.register("resume-c", who=CLIENT_B)
    token = _resume_token(mesh, "resume-a")

    # Another instance of the same tenant.
    other = _hello_with(mesh, "resume-b", token)
    assert other["resumed"] is False and other["replayed_dispatches"] == []
    # Another tenant's instance.
    foreign = _hello_with(mesh, "resume-c", token, token=mesh.token(CLIENT_B))
    assert foreign["resumed"] is False and foreign["replayed_dispatches"] == []
    # Garbage and a near miss.
    for bad in ("", "x" * 5000, token[:-1] + ("A" if token[-1] != "A" else "B")):
        assert _hello_with(mesh, "resume-a", bad)["resumed"] is False


def test_a_resume_token_is_single_use(mesh: MeshProcess) -> None:
    mesh.register("resume-once")
    token = _resume_token(mesh, "resume-once")
    first = _hello_with(mesh, "resume-once", token)
    assert first["resumed"] is True
    second = _hello_with(mesh, "resume-once", token)
    assert second["resumed"] is False
