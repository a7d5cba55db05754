"""Hosted mode (spec 8): `svantic.hosted`.

`HostedApp` alone first: every answer of `POST /send` and the card, from fake requests, no
socket. Then served over real TLS (trustme) on 127.0.0.1 on each adapter (asyncio, anyio on
asyncio and trio, gevent) and as an ASGI app, with httpx; the card read by a2a-sdk; and end
to end: the in-process reference mesh (conftest.py) calls a hosted agent it registered.
Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import msgspec
import pytest
import svantic
import trustme
from conftest import Mesh, parse_sse
from svantic.card import CAPABILITY_SCHEMAS_EXTENSION, HOSTED_BINDING, agent_card
from svantic.hosted import (
    CARD_PATH,
    HostedApp,
    HostedCall,
    HostedResponse,
    asgi_app,
    run_call_async,
    serve,
)
from svantic_mesh.app import HostedAnswer

from svantic_proto.auth import DispatchAuthMinter, DispatchAuthVerifier
from svantic_proto.errors import HandlerError
from svantic_proto.http import HttpRequest

WAIT = 10.0
SECRET = "hosted-test-signing-secret-0123456789abcdef"
INSTANCE = "hosted-test-1"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

pytestmark = pytest.mark.timeout(60)


# -- the agent under test ---------------------------------------------------------------------


@dataclass
class Log:
    """What the handlers saw, readable from any thread."""

    runs: list[str] = field(default_factory=list)
    contexts: list[Any] = field(default_factory=list)
    threads: list[int] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)
    cancelled_seen: threading.Event = field(default_factory=threading.Event)


TICKET_SCHEMA = {"type": "object", "properties": {"ticket_id": {"type": "string"}},
                 "required": ["ticket_id"], "additionalProperties": False}


def make_agent(log: Log) -> Any:
    agent = svantic.Agent(agent_type="tickets", description="Ticket system", version="1.2.3")

    @agent.capability("get_ticket", description="Fetch a ticket", parameters=TICKET_SCHEMA)
    async def get_ticket(args: Any, ctx: Any) -> Any:
        log.runs.append("get_ticket")
        log.contexts.append(ctx)
        return {"ticket_id": args["ticket_id"], "status": "open"}

    @agent.capability(description="Stream the letters of a word, then the word upper-cased")
    def spell(args: Any, ctx: Any) -> Any:  # plain: a worker thread on the async stacks
        log.runs.append("spell")
        log.threads.append(threading.get_ident())
        for letter in args["word"]:
            ctx.chunk(letter)
        return {"word": args["word"].upper()}

    @agent.capability()
    async def async_spell(args: Any, ctx: Any) -> Any:
        log.runs.append("async_spell")
        for letter in args["word"]:
            ctx.chunk(letter)
            await anyio.sleep(0)
        return {"word": args["word"].upper()}

    @agent.capability()
    def fail(args: Any, ctx: Any) -> None:
        log.runs.append("fail")
        raise RuntimeError("secret internal detail")

    @agent.capability()
    def locked(args: Any, ctx: Any) -> None:
        raise HandlerError("TICKET_LOCKED", "ticket is locked", {"ticket": "T-1"})

    @agent.capability()
    async def sleepy(args: Any, ctx: Any) -> None:
        log.runs.append("sleepy")
        await anyio.sleep(WAIT)

    @agent.capability()
    def blocking(args: Any, ctx: Any) -> str:
        log.runs.append("blocking")
        log.started.set()
        log.release.wait(WAIT)
        if ctx.cancelled:
            log.cancelled_seen.set()
        return "released"

    @agent.capability()
    def not_json(args: Any, ctx: Any) -> Any:
        return {"value": object()}

    @agent.capability()
    def bad_chunk(args: Any, ctx: Any) -> Any:
        try:
            ctx.chunk(object())
        except Exception as exc:
            return {"refused": type(exc).__name__}
        return {"refused": None}

    return agent


# -- requests ---------------------------------------------------------------------------------

MINTER = DispatchAuthMinter(SECRET)


def envelope(dispatch_id: str, capability: str, *, secret: str = SECRET,
             now: float | None = None, instance_id: str = INSTANCE) -> dict[str, Any]:
    minter = MINTER if secret == SECRET else DispatchAuthMinter(secret)
    token = minter.mint(instance_id=instance_id, agent_type="tickets", tenant_id="tenant-1",
                        dispatch_id=dispatch_id, capability=capability,
                        now=time.time() if now is None else now)
    return msgspec.to_builtins(token)  # type: ignore[no-any-return]


def payload(capability: str, arguments: Any = None, *, dispatch_id: str | None = None,
            deadline_ms: int = 5000, auth: Any = "mint", **extra: Any) -> dict[str, Any]:
    dispatch_id = str(uuid.uuid4()) if dispatch_id is None else dispatch_id
    body: dict[str, Any] = {"dispatch_id": dispatch_id, "capability": capability,
                            "arguments": {} if arguments is None else arguments,
                            "deadline_ms": deadline_ms, **extra}
    if auth == "mint":
        body["dispatch_auth"] = envelope(dispatch_id, capability)
    elif auth is not None:
        body["dispatch_auth"] = auth
    return body


def request(body: Any = None, *, path: str = "/send", method: str = "POST",
            stream: bool = False, raw: bytes | None = None,
            host: str | None = None) -> HttpRequest:
    headers = [("content-type", "application/json"),
               ("accept", "text/event-stream" if stream else "application/json")]
    if host is not None:
        headers.append(("host", host))
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else b"")
    return HttpRequest(method=method, target=path, path=path, query="",
                       headers=tuple(headers), body=data)


def error_of(answer: HostedResponse | HostedCall) -> tuple[int, str, dict[str, Any]]:
    assert isinstance(answer, HostedResponse), answer
    assert dict(answer.headers)["content-type"] == "application/json"
    body = json.loads(answer.body)
    assert set(body) == {"error"} and isinstance(body["error"]["message"], str)
    return answer.status, body["error"]["code"], body["error"]


def run(call: HostedApp | HostedCall | HostedResponse) -> HostedResponse:
    """Finish a call as the asyncio glue does (no socket)."""
    assert isinstance(call, HostedCall), call
    return asyncio.run(run_call_async(call))


def result_of(answer: HostedResponse) -> Any:
    assert answer.status == 200, answer
    return json.loads(answer.body)["result"]


@pytest.fixture
def log() -> Log:
    return Log()


@pytest.fixture
def app(log: Log) -> HostedApp:
    return HostedApp(make_agent(log),
                     verifier=DispatchAuthVerifier(INSTANCE, hs256_keys=[SECRET]),
                     public_url="https://agent.example:8443/")


# -- HostedApp alone: the card and the routes ---------------------------------------------------


def _a2a_reads(card: dict[str, Any]) -> None:
    """a2a-sdk reads the card: as 1.0 (strictly, and through its own card resolver) and as
    0.3 (its compat pydantic model)."""
    pytest.importorskip("a2a")
    from a2a.client.card_resolver import parse_agent_card
    from a2a.compat.v0_3.types import AgentCard as AgentCardV03
    from a2a.types import AgentCard
    from google.protobuf.json_format import ParseDict

    strict = copy.deepcopy(card)
    for legacy in ("url", "preferredTransport"):
        strict.pop(legacy)
    parsed = ParseDict(strict, AgentCard())  # no unknown field allowed
    assert parsed.name == card["name"]
    assert [skill.id for skill in parsed.skills] == [s["id"] for s in card["skills"]]
    assert parsed.supported_interfaces[0].protocol_binding == HOSTED_BINDING
    assert parsed.capabilities.extensions[0].uri == CAPABILITY_SCHEMAS_EXTENSION
    resolved = parse_agent_card(copy.deepcopy(card))
    assert resolved.supported_interfaces[0].url == card["url"]
    old = AgentCardV03.model_validate(card)
    assert old.url == card["url"] and old.preferred_transport == HOSTED_BINDING
    assert [skill.id for skill in old.skills] == [s["id"] for s in card["skills"]]


def test_the_card_lists_every_capability_and_reads_as_a2a(app: HostedApp) -> None:
    answer = app.handle(request(path=CARD_PATH, method="GET"))
    assert isinstance(answer, HostedResponse) and answer.status == 200
    card = json.loads(answer.body)
    assert card["name"] == "tickets" and card["description"] == "Ticket system"
    assert card["version"] == "1.2.3"
    assert card["url"] == "https://agent.example:8443"
    assert card["supportedInterfaces"] == [{"url": "https://agent.example:8443",
                                            "protocolBinding": HOSTED_BINDING,
                                            "protocolVersion": "1.0"}]
    skills = {skill["id"]: skill for skill in card["skills"]}
    assert set(skills) >= {"get_ticket", "spell", "fail", "sleepy"}
    assert skills["get_ticket"]["description"] == "Fetch a ticket"
    assert all(skill["name"] and skill["description"] and skill["tags"]
               for skill in card["skills"])
    extension = card["capabilities"]["extensions"][0]
    assert extension["uri"] == CAPABILITY_SCHEMAS_EXTENSION
    assert extension["params"]["schemas"]["get_ticket"] == TICKET_SCHEMA
    assert extension["params"]["schemas"]["spell"] == {"type": "object"}
    assert card["capabilities"]["streaming"] is True
    _a2a_reads(card)
    # HEAD is answered too; other methods are not.
    assert app.handle(request(path=CARD_PATH, method="HEAD")).status == 200  # type: ignore[union-attr]
    status, code, _ = error_of(app.handle(request(path=CARD_PATH, method="POST")))
    assert (status, code) == (405, "METHOD_NOT_ALLOWED")


def test_without_a_public_url_the_card_names_the_host_asked(log: Log) -> None:
    app = HostedApp(make_agent(log), verifier=None)
    answer = app.handle(request(path=CARD_PATH, method="GET", host="127.0.0.1:9443"))
    assert json.loads(answer.body)["url"] == "https://127.0.0.1:9443"  # type: ignore[union-attr]
    assert agent_card(app.registry, "https://x/")["url"] == "https://x"


def test_other_paths_and_methods_get_the_spec_error_body(app: HostedApp) -> None:
    assert error_of(app.handle(request(path="/", method="GET")))[:2] == (404, "NOT_FOUND")
    assert error_of(app.handle(request(path="/send/", method="POST")))[:2] == (
        404, "NOT_FOUND")
    answer = app.handle(request(path="/send", method="GET"))
    assert error_of(answer)[:2] == (405, "METHOD_NOT_ALLOWED")
    assert ("allow", "POST") in answer.headers  # type: ignore[union-attr]


# -- HostedApp alone: refusals before any handler runs ----------------------------------------


@pytest.mark.parametrize("raw", [
    b"", b"not json", b"[1, 2]", b'{"capability": "spell"}',
    json.dumps(payload("spell", deadline_ms=0)).encode(),
    json.dumps(payload("spell", arguments=[1])).encode(),
    json.dumps(payload("", auth=None)).encode(),
    json.dumps(payload("spell", auth={"type": "bogus", "token": "x"})).encode(),
    json.dumps(payload("spell", auth={"type": "svantic_jwt"})).encode(),
    json.dumps(payload("spell", dispatch_id="", auth=None)).encode(),
    json.dumps(payload("spell", dispatch_id="x" * 129, auth=None)).encode(),
])
def test_a_malformed_payload_is_400(app: HostedApp, log: Log, raw: bytes) -> None:
    status, code, _ = error_of(app.handle(request(raw=raw)))
    assert (status, code) == (400, "INVALID_REQUEST")
    assert log.runs == []


def _forged(dispatch_id: str) -> Any:
    return envelope(dispatch_id, "get_ticket", secret="another-secret-0123456789abcdef")


@pytest.mark.parametrize("auth", ["missing", "forged", "expired", "other_capability",
                                  "other_instance", "mtls", "shared_secret"])
def test_a_dispatch_whose_auth_fails_is_401_and_never_runs(app: HostedApp, log: Log,
                                                           auth: str) -> None:
    dispatch_id = str(uuid.uuid4())
    envelopes = {
        "missing": None,
        "forged": _forged(dispatch_id),
        "expired": envelope(dispatch_id, "get_ticket", now=time.time() - 3600),
        "other_capability": envelope(dispatch_id, "spell"),
        "other_instance": envelope(dispatch_id, "get_ticket", instance_id="someone-else"),
        "mtls": {"type": "mtls"},
        "shared_secret": {"type": "shared_secret", "secret": "guess"},
    }
    body = payload("get_ticket", {"ticket_id": "T-1"}, dispatch_id=dispatch_id,
                   auth=envelopes[auth])
    status, code, error = error_of(app.handle(request(body)))
    assert (status, code) == (401, "DISPATCH_AUTH_FAILED")
    assert error["detail"]["reason"]
    assert log.runs == []
    # A failed request leaves nothing behind: the genuine dispatch with that id still runs.
    genuine = run(app.handle(request(payload("get_ticket", {"ticket_id": "T-1"},
                                             dispatch_id=dispatch_id))))
    assert result_of(genuine) == {"ticket_id": "T-1", "status": "open"}


def test_with_auth_off_an_envelope_is_refused_and_none_is_needed(log: Log) -> None:
    app = HostedApp(make_agent(log), verifier=None)
    status, code, error = error_of(app.handle(request(payload("spell", {"word": "a"}))))
    assert (status, code) == (401, "DISPATCH_AUTH_FAILED")
    assert error["detail"]["reason"] == "disabled_mismatch"
    assert result_of(run(app.handle(request(payload("spell", {"word": "ab"}, auth=None))))) \
        == {"word": "AB"}


def test_a_shared_secret_envelope_verifies(log: Log) -> None:
    app = HostedApp(make_agent(log), verifier=DispatchAuthVerifier(
        INSTANCE, shared_secret="the-shared-secret-0123456789"))
    body = payload("spell", {"word": "x"},
                   auth={"type": "shared_secret", "secret": "the-shared-secret-0123456789"})
    assert result_of(run(app.handle(request(body)))) == {"word": "X"}


def test_an_unknown_capability_or_bad_arguments_is_422(app: HostedApp, log: Log) -> None:
    status, code, _ = error_of(app.handle(request(payload("nope"))))
    assert (status, code) == (422, "CAPABILITY_NOT_FOUND")
    status, code, error = error_of(app.handle(request(payload("get_ticket", {"ticket_id": 7}))))
    assert (status, code) == (422, "INVALID_ARGUMENTS")
    assert error["message"].startswith("ticket_id: ") and "string" in error["message"]
    status, code, _ = error_of(app.handle(request(payload("get_ticket", {}))))
    assert (status, code) == (422, "INVALID_ARGUMENTS")
    assert log.runs == []


# -- HostedApp alone: running handlers ---------------------------------------------------------


def test_the_handler_gets_the_dispatch_context(app: HostedApp, log: Log) -> None:
    dispatch_id = str(uuid.uuid4())
    body = payload("get_ticket", {"ticket_id": "T-9"}, dispatch_id=dispatch_id,
                   deadline_ms=4000, task_id="task-9", attempt=2, session_context={
                       "session_id": "s-1", "tenant_id": "tenant-1",
                       "propagation_headers": {"traceparent": TRACEPARENT,
                                               "baggage": "k=v"}})
    answer = run(app.handle(request(body)))
    assert answer.status == 200 and json.loads(answer.body) == {
        "result": {"ticket_id": "T-9", "status": "open"}}
    ctx = log.contexts[0]
    assert ctx.dispatch_id == dispatch_id and ctx.capability == "get_ticket"
    assert ctx.task_id == "task-9" and ctx.attempt == 2 and ctx.deadline_ms == 4000
    assert ctx.session_id == "s-1" and ctx.tenant_id == "tenant-1"
    assert ctx.parent_trace_id == "0af7651916cd43dd8448eb211c80319c"
    assert ctx.parent_span_id == "b7ad6b7169203331"
    assert dict(ctx.baggage) == {"k": "v"}


def test_a_handler_failure_names_only_its_type(app: HostedApp, log: Log,
                                               caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="svantic"):
        answer = run(app.handle(request(payload("fail"))))
    status, code, error = error_of(answer)
    assert (status, code) == (422, "DISPATCH_FAILED")
    assert "RuntimeError" in error["message"] and "secret" not in answer.body.decode()
    assert "secret internal detail" in caplog.text and "Traceback" in caplog.text
    status, code, error = error_of(run(app.handle(request(payload("locked")))))
    assert (status, code, error["detail"]) == (422, "TICKET_LOCKED", {"ticket": "T-1"})


def test_results_and_chunks_that_are_not_json(app: HostedApp) -> None:
    status, code, _ = error_of(run(app.handle(request(payload("not_json")))))
    assert (status, code) == (422, "DISPATCH_FAILED")
    answer = run(app.handle(request(payload("bad_chunk"), stream=True)))
    assert b'"refused":"LocalProtocolError"' in answer.body


def _stream(app: HostedApp, body: dict[str, Any]) -> tuple[int, bytes]:
    """Run a streamed call as the glue does, collecting the SSE body."""
    call = app.handle(request(body, stream=True))
    assert isinstance(call, HostedCall) and call.stream
    out: list[bytes] = []
    status, headers = call.open_stream(out.append)
    assert dict(headers)["content-type"] == "text/event-stream"
    out.append(asyncio.run(run_call_async(call)).body)
    return status, b"".join(out)


@pytest.mark.parametrize("capability", ["spell", "async_spell"])
def test_sse_streams_chunks_then_the_result_as_the_mesh_reads_them(
        app: HostedApp, capability: str) -> None:
    status, body = _stream(app, payload(capability, {"word": "abc"}))
    assert status == 200
    events = parse_sse(body.decode())
    assert events == [("chunk", {"seq": 0, "data": "a"}), ("chunk", {"seq": 1, "data": "b"}),
                      ("chunk", {"seq": 2, "data": "c"}), ("result", {"result": {"word": "ABC"}})]
    # The reference mesh's reader of hosted answers takes it as the socket's would be.
    chunks: list[Any] = []
    reader = HostedAnswer("d-1", 200, "text/event-stream", chunks.append)
    outcome = reader.feed(body)
    assert outcome is not None and outcome.code is None and outcome.result == {"word": "ABC"}
    assert chunks == ["a", "b", "c"]


def test_sse_ends_with_the_error_event(app: HostedApp) -> None:
    _, body = _stream(app, payload("fail"))
    [(name, data)] = parse_sse(body.decode())
    assert name == "error" and data["error"]["code"] == "DISPATCH_FAILED"
    reader = HostedAnswer("d-1", 200, "text/event-stream", None)
    outcome = reader.feed(body)
    assert outcome is not None and outcome.code == "DISPATCH_FAILED"


def test_refusals_answer_json_even_to_a_stream_request(app: HostedApp) -> None:
    answer = app.handle(request(payload("nope"), stream=True))
    assert error_of(answer)[:2] == (422, "CAPABILITY_NOT_FOUND")
    outcome = HostedAnswer("d-1", answer.status, "application/json",  # type: ignore[union-attr]
                           None).feed(answer.body)  # type: ignore[union-attr]
    assert outcome is None  # the mesh's reader waits for the end of a JSON body...
    outcome = HostedAnswer("d-1", 422, "application/json", None)
    outcome.feed(answer.body)  # type: ignore[union-attr]
    assert outcome.end().code == "CAPABILITY_NOT_FOUND"  # ...and reads the agent's code


def test_an_async_handler_is_cancelled_at_its_deadline(app: HostedApp, log: Log) -> None:
    started = time.monotonic()
    status, code, _ = error_of(run(app.handle(request(payload("sleepy", deadline_ms=200)))))
    assert (status, code) == (504, "DEADLINE_EXCEEDED")
    assert time.monotonic() - started < 2
    assert app.running == {}


def test_a_plain_handler_past_its_deadline_is_abandoned(app: HostedApp, log: Log) -> None:
    call = app.handle(request(payload("blocking", deadline_ms=200)))
    assert isinstance(call, HostedCall) and call.blocking
    started = time.monotonic()
    status, code, _ = error_of(asyncio.run(run_call_async(call)))
    assert (status, code) == (504, "DEADLINE_EXCEEDED")
    assert time.monotonic() - started < 2
    assert call.context.cancelled  # what a polling handler reads
    log.release.set()
    assert log.cancelled_seen.wait(WAIT)


def test_the_same_dispatch_never_runs_twice(app: HostedApp, log: Log) -> None:
    body = payload("spell", {"word": "ab"})
    first = app.handle(request(body))
    assert isinstance(first, HostedCall)
    # While it runs: refused, the first request gets the answer.
    status, code, _ = error_of(app.handle(request(body)))
    assert (status, code) == (409, "DISPATCH_IN_PROGRESS")
    assert result_of(run(first)) == {"word": "AB"}
    # Once finished: the same answer again, as JSON or as SSE; the handler ran once.
    again = app.handle(request(body))
    assert isinstance(again, HostedResponse) and result_of(again) == {"word": "AB"}
    streamed = app.handle(request(body, stream=True))
    assert isinstance(streamed, HostedResponse)
    assert parse_sse(streamed.body.decode()) == [("result", {"result": {"word": "AB"}})]
    assert log.runs == ["spell"]
    # A failure is kept as well.
    failing = payload("fail")
    run(app.handle(request(failing)))
    assert error_of(app.handle(request(failing)))[:2] == (422, "DISPATCH_FAILED")
    assert log.runs == ["spell", "fail"]


def test_finished_answers_are_bounded(log: Log) -> None:
    now = [1000.0]
    app = HostedApp(make_agent(log), verifier=None, max_finished=2, max_finished_bytes=200,
                    remember_seconds=60, clock=lambda: now[0])
    bodies = [payload("spell", {"word": word}, auth=None) for word in ("a", "b", "c")]
    for body in bodies:
        run(app.handle(request(body)))
    assert isinstance(app.handle(request(bodies[0])), HostedCall)  # forgotten: the oldest
    # A result larger than the byte bound is not kept; its id is: it never runs again.
    big = payload("spell", {"word": "x" * 300}, auth=None)
    assert result_of(run(app.handle(request(big)))) == {"word": "X" * 300}
    status, code, _ = error_of(app.handle(request(big)))
    assert (status, code) == (409, "DUPLICATE_DISPATCH")
    # Past `remember_seconds`, an id is forgotten.
    now[0] += 61
    assert isinstance(app.handle(request(big)), HostedCall)


def test_in_flight_dispatches_are_bounded(log: Log) -> None:
    app = HostedApp(make_agent(log), verifier=None, max_in_flight=1)
    first = app.handle(request(payload("spell", {"word": "a"}, auth=None)))
    assert isinstance(first, HostedCall)
    status, code, error = error_of(app.handle(request(payload("spell", {"word": "b"},
                                                              auth=None))))
    assert (status, code) == (429, "RATE_LIMITED") and error["detail"]["retry_after_ms"] > 0
    run(first)
    assert isinstance(app.handle(request(payload("spell", {"word": "b"}, auth=None))),
                      HostedCall)


# -- served over TLS ----------------------------------------------------------------------------


@dataclass
class Tls:
    ca: trustme.CA
    server: ssl.SSLContext
    client: ssl.SSLContext


@pytest.fixture(scope="module")
def tls() -> Tls:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return Tls(ca, server, client)


def _verifier() -> DispatchAuthVerifier:
    return DispatchAuthVerifier(INSTANCE, hs256_keys=[SECRET])


async def _exercise_async(url: str, client_tls: ssl.SSLContext, log: Log) -> None:
    """JSON, SSE, a refusal and the card, through a real client."""
    async with httpx.AsyncClient(base_url=url, verify=client_tls, trust_env=False,
                                 timeout=WAIT) as http:
        answer = await http.post("/send", json=payload("spell", {"word": "hi"}))
        assert answer.status_code == 200 and answer.json() == {"result": {"word": "HI"}}
        async with http.stream("POST", "/send", json=payload("async_spell", {"word": "ok"}),
                               headers={"accept": "text/event-stream"}) as streamed:
            assert streamed.headers["content-type"].startswith("text/event-stream")
            text = (await streamed.aread()).decode()
        assert parse_sse(text) == [("chunk", {"seq": 0, "data": "o"}),
                                   ("chunk", {"seq": 1, "data": "k"}),
                                   ("result", {"result": {"word": "OK"}})]
        answer = await http.post("/send", json=payload("spell", {"word": "x"}, auth=None))
        assert answer.status_code == 401
        assert answer.json()["error"]["code"] == "DISPATCH_AUTH_FAILED"
        answer = await http.get(CARD_PATH)
        assert answer.status_code == 200 and answer.json()["name"] == "tickets"
        _a2a_reads(answer.json())
        answer = await http.get("/elsewhere")
        assert answer.status_code == 404 and answer.json()["error"]["code"] == "NOT_FOUND"


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_served_on_the_asyncio_adapter(tls: Tls, log: Log, anyio_backend: str) -> None:
    server = await serve(make_agent(log), verifier=_verifier(), ssl_context=tls.server,
                         adapter="asyncio")
    try:
        assert server.url == f"https://127.0.0.1:{server.port}"
        await _exercise_async(server.url, tls.client, log)
        assert log.threads and threading.get_ident() not in log.threads  # a worker thread
    finally:
        with anyio.fail_after(WAIT):
            await server.close()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_served_on_the_anyio_adapter(tls: Tls, log: Log, anyio_backend: str) -> None:
    pytest.importorskip("trio")
    server = await serve(make_agent(log), verifier=_verifier(), ssl_context=tls.server,
                         adapter="anyio", public_url="https://hosted.example")
    try:
        assert server.url == "https://hosted.example"
        await _exercise_async(f"https://127.0.0.1:{server.port}", tls.client, log)
        # A plain handler past its deadline: answered at the deadline, the loop free.
        async with httpx.AsyncClient(verify=tls.client, trust_env=False,
                                     timeout=WAIT) as http:
            started = time.monotonic()
            answer = await http.post(f"https://127.0.0.1:{server.port}/send",
                                     json=payload("blocking", deadline_ms=300))
            assert answer.status_code == 504, answer.text
            assert time.monotonic() - started < 3
        log.release.set()
    finally:
        await server.close()  # no cancel scope around it: the adapter's task group is ours


def test_served_on_the_gevent_adapter(tls: Tls, log: Log) -> None:
    pytest.importorskip("gevent")
    import gevent

    agent = make_agent(log)
    started: list[Any] = []
    ready = threading.Event()
    failure: list[BaseException] = []

    def hub_main() -> None:
        try:
            server = serve(agent, verifier=_verifier(), ssl_context=tls.server,
                           adapter="gevent")
            started.append(server)
            ready.set()
            server.serve_forever()
        except BaseException as exc:
            failure.append(exc)
            ready.set()
        finally:
            gevent.get_hub().destroy(destroy_loop=True)

    thread = threading.Thread(target=hub_main, daemon=True)
    thread.start()
    assert ready.wait(WAIT) and not failure, failure
    server = started[0]
    try:
        with httpx.Client(base_url=server.url, verify=tls.client, trust_env=False,
                          timeout=WAIT) as http:
            answer = http.post("/send", json=payload("spell", {"word": "gv"}))
            assert answer.status_code == 200 and answer.json() == {"result": {"word": "GV"}}
            with http.stream("POST", "/send", json=payload("spell", {"word": "ab"}),
                             headers={"accept": "text/event-stream"}) as streamed:
                text = streamed.read().decode()
            assert [name for name, _ in parse_sse(text)] == ["chunk", "chunk", "result"]
            answer = http.post("/send", json=payload("fail"))
            assert answer.status_code == 422
            assert answer.json()["error"]["code"] == "DISPATCH_FAILED"
            answer = http.get(CARD_PATH)
            assert answer.status_code == 200
            _a2a_reads(answer.json())
    finally:
        server.close()
        thread.join(WAIT)
    assert not thread.is_alive()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_asgi_app_mounted_in_starlette(log: Log, anyio_backend: str) -> None:
    pytest.importorskip("starlette")
    from starlette.applications import Starlette
    from starlette.routing import Mount

    hosted = asgi_app(make_agent(log), verifier=_verifier(),
                      public_url="https://example.test/agent")
    app = Starlette(routes=[Mount("/agent", app=hosted)])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="https://example.test") as http:
        answer = await http.get(f"/agent{CARD_PATH}")
        assert answer.status_code == 200
        assert answer.json()["url"] == "https://example.test/agent"
        answer = await http.post("/agent/send", json=payload("spell", {"word": "as"}))
        assert answer.status_code == 200 and answer.json() == {"result": {"word": "AS"}}
        answer = await http.post("/agent/send", json=payload("async_spell", {"word": "go"}),
                                 headers={"accept": "text/event-stream"})
        assert [name for name, _ in parse_sse(answer.text)] == ["chunk", "chunk", "result"]


# -- end to end: the reference mesh calls the hosted agent ------------------------------------


@pytest.fixture
def hosted_on_mesh(mesh: Mesh, log: Log) -> Iterator[tuple[str, str]]:
    """A hosted agent on asyncio, with a certificate the mesh trusts, registered there.
    Yields (instance id, url)."""
    instance_id = f"hosted-e2e-{uuid.uuid4().hex[:8]}"
    certfile, keyfile = mesh.issue_cert()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile, keyfile)
    verifier = DispatchAuthVerifier(instance_id, hs256_keys=[mesh.signing_secret])
    agent = make_agent(log)
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def main() -> None:
        server = await serve(agent, verifier=verifier, ssl_context=context)
        box["url"], box["stop"] = server.url, anyio.Event()
        box["loop"] = asyncio.get_running_loop()
        ready.set()
        await box["stop"].wait()
        await server.close()

    thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
    thread.start()
    assert ready.wait(WAIT)
    try:
        answer = mesh.post("/agents/register", {"agent_type": "tickets",
                                                "instance_id": instance_id,
                                                "url": box["url"]})
        assert answer.status_code == 200, answer.text
        assert answer.json()["deployment_mode"] == "hosted"
        yield instance_id, box["url"]
    finally:
        box["loop"].call_soon_threadsafe(box["stop"].set)
        thread.join(WAIT)
        mesh.post("/agents/deregister", {"instance_id": instance_id})


def test_the_mesh_dispatches_to_a_hosted_agent(mesh: Mesh, hosted_on_mesh: tuple[str, str],
                                               log: Log) -> None:
    instance_id, _ = hosted_on_mesh
    answer = mesh.call_sync("get_ticket", {"ticket_id": "T-42"}, instance_id=instance_id)
    assert answer.status_code == 200, answer.text
    assert answer.json()["result"] == {"ticket_id": "T-42", "status": "open"}
    assert answer.json()["instance_id"] == instance_id
    ctx = log.contexts[-1]
    assert ctx.dispatch_id == answer.json()["dispatch_id"]
    # Streamed: the chunks pass through the mesh in order.
    answer = mesh.call_sync("spell", {"word": "mesh"}, instance_id=instance_id, stream=True)
    assert answer.status_code == 200, answer.text
    events = parse_sse(answer.text)
    assert [data["data"] for name, data in events if name == "chunk"] == list("mesh")
    assert events[-1][0] == "result" and events[-1][1]["result"] == {"word": "MESH"}
    # The agent's own refusals and failures reach the caller with their codes.
    answer = mesh.call_sync("get_ticket", {"ticket_id": 1}, instance_id=instance_id)
    assert answer.status_code == 422 and answer.json()["error"]["code"] == "INVALID_ARGUMENTS"
    answer = mesh.call_sync("fail", instance_id=instance_id)
    assert answer.status_code == 422 and answer.json()["error"]["code"] == "DISPATCH_FAILED"
    assert "secret" not in answer.text


def test_a_hosted_agent_refuses_envelopes_it_cannot_verify(mesh: Mesh, log: Log) -> None:
    """An agent that holds another secret than the mesh's: every dispatch is
    DISPATCH_AUTH_FAILED, and the handler never runs."""
    instance_id = f"hosted-forged-{uuid.uuid4().hex[:8]}"
    certfile, keyfile = mesh.issue_cert()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile, keyfile)
    verifier = DispatchAuthVerifier(instance_id, hs256_keys=["not-the-mesh-secret-0123456789"])

    async def main() -> httpx.Response:
        server = await serve(make_agent(log), verifier=verifier, ssl_context=context)
        try:
            async with httpx.AsyncClient(base_url=mesh.url, verify=mesh.ssl_context(),
                                         trust_env=False, timeout=WAIT) as http:
                answer = await http.post(  # the mesh probes our card meanwhile: not blocking
                    "/agents/register", headers={"authorization": f"Bearer {mesh.token()}"},
                    json={"agent_type": "tickets", "instance_id": instance_id,
                          "url": server.url})
                assert answer.status_code == 200, answer.text
            return await mesh.call("spell", {"word": "no"}, instance_id=instance_id)
        finally:
            await server.close()

    try:
        answer = asyncio.run(main())
    finally:
        mesh.post("/agents/deregister", {"instance_id": instance_id})
    assert answer.json()["error"]["code"] == "DISPATCH_AUTH_FAILED", answer.text
    assert log.runs == []
