"""Interop: the control plane (spec 6) on `svantic_adapters.asgi.AsgiMesh` through its
`http_app`, and the whole reference mesh as one ASGI application (`svantic_mesh.asgi`),
under a real uvicorn server over real TLS (trustme CA) on 127.0.0.1.

* the whole mesh on one uvicorn port: `/auth/token`, `/agents/register`, an asyncio agent
  connecting at the `connect_url` it was given, `/agents/dispatch` as JSON and as SSE
  (chunks, then the result), a bad body (400), an oversized one (413), `/metrics`; uvicorn's
  lifespan runs the mesh's timers and closes it;
* the same application mounted in Starlette beside a route of its own, the framework's
  lifespan running it;
* `AsgiMesh` alone: an `http_app` that raises is answered 500 INTERNAL without its text (or
  cut mid-stream), one that does not answer 500, a body over the bound 413 without calling
  it, a client that leaves makes `responder.closed` true; without `http_app` the 426 / 404
  answers are unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import uvicorn
from _uvicorn import Certs, _Server, run
from svantic_adapters.asgi import AsgiMesh
from svantic_adapters.asyncio import connect
from svantic_mesh.asgi import asgi_app
from svantic_mesh.registry import SqliteRegistry
from svantic_mesh.serve import make_parts

from svantic_proto import Config, DispatchAuthVerifier, DispatchContext, InstanceRecord
from svantic_proto.http import HttpRequest
from svantic_proto.mesh_runtime import MeshPhase

HOST = "127.0.0.1"
WAIT = 10.0
TOKEN_SECRET = b"asgi-control-token-secret-0123456789abcdef"
SIGNING_SECRET = "asgi-control-signing-secret-0123456789abcdef"
CLIENT_ID, CLIENT_SECRET, TENANT = "asgi-client", "asgi-client-secret-0123456789", "tenant-a"
INSTANCE, AGENT_TYPE = "agent-cp-1", "echo-agent"
AGENT_CONFIG = Config(reconnect_base_delay=0.1, reconnect_max_delay=0.5)
INTERNAL = {"error": {"code": "INTERNAL", "message": "internal error"}}
SECRET_TEXT = "a secret detail that must not leak"


def listening_socket() -> socket.socket:
    """Bound before the app is built: the mesh's `public_url` (where agents are told to
    connect) needs the port, and an ASGI application cannot learn it from the server."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, 0))
    return sock


@asynccontextmanager
async def serving(app: Any, certs: Certs, sock: socket.socket | None = None) -> (
        AsyncIterator[str]):
    """Run `app` under uvicorn in this loop (TLS, no WebSocket compression, lifespan on);
    yields `https://host:port`. On exit the server stops as on a signal: its shutdown,
    then the lifespan's."""
    sock = sock or listening_socket()
    config = uvicorn.Config(app, ssl_certfile=certs.certfile, ws_per_message_deflate=False,
                            lifespan="on", log_config=None, log_level="warning")
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(WAIT):
            while not server.started:  # uvicorn has no event for it
                if task.done():
                    task.result()
                    raise AssertionError("uvicorn stopped before it started")
                await asyncio.sleep(0.01)
        yield f"https://{HOST}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, WAIT)
        sock.close()


def client(base: str, certs: Certs) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=base, verify=certs.client, trust_env=False, timeout=WAIT)


def parse_sse(text: str) -> list[tuple[str, Any]]:
    events = []
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines()
                      if line and not line.startswith(":"))
        if "data" in fields:
            events.append((fields.get("event", "message"), json.loads(fields["data"])))
    return events


async def raw_request(base: str, certs: Certs, head: str, body: bytes = b"") -> (
        tuple[int, bytes]):
    """One request over a TLS socket of our own: a head that announces more body than is
    sent (the oversized case) must not make a client write a megabyte first."""
    port = int(base.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection(HOST, port, ssl=certs.client,
                                                   server_hostname=HOST)
    try:
        writer.write(head.encode("latin-1") + b"\r\n" + body)
        await writer.drain()
        response = b""
        async with asyncio.timeout(WAIT):
            while b"\r\n\r\n" not in response:
                piece = await reader.read(65536)
                assert piece, f"closed before an answer: {response!r}"
                response += piece
            head_bytes, _, rest = response.partition(b"\r\n\r\n")
            length = next(int(line.split(b":", 1)[1]) for line in head_bytes.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            while len(rest) < length:
                piece = await reader.read(65536)
                assert piece, "closed mid-body"
                rest += piece
        return int(head_bytes.split(b" ")[1]), rest[:length]
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


# -- the whole mesh as one ASGI application -----------------------------------------------


def mesh_parts(public_url: str) -> Any:
    registry = SqliteRegistry(":memory:", secret_key=os.urandom(32), scrypt_n=2**4)
    registry.add_client(CLIENT_ID, CLIENT_SECRET, TENANT)
    return make_parts(registry, public_url, {"token_secret": TOKEN_SECRET,
                                             "signing_secret": SIGNING_SECRET.encode()})


async def token_and_connect_url(http: httpx.AsyncClient) -> tuple[str, str]:
    answer = await http.post("/auth/token", json={"client_id": CLIENT_ID,
                                                  "client_secret": CLIENT_SECRET})
    assert answer.status_code == 200, answer.text
    token = str(answer.json()["access_token"])
    answer = await http.post("/agents/register", headers={"authorization": f"Bearer {token}"},
                             json={"agent_type": AGENT_TYPE, "instance_id": INSTANCE,
                                   "tools": [{"name": "echo"}, {"name": "count"}]})
    assert answer.status_code == 200, answer.text
    return token, str(answer.json()["connect_url"])


def agent_at(connect_url: str, token: str, certs: Certs) -> Any:
    agent = connect(connect_url, token=token, instance_id=INSTANCE, agent_type=AGENT_TYPE,
                    ssl_context=certs.client, config=AGENT_CONFIG,
                    dispatch_auth=DispatchAuthVerifier(INSTANCE, hs256_keys=[SIGNING_SECRET]))

    @agent.capability("echo")
    def echo(arguments: Any, context: DispatchContext) -> Any:
        return {"echo": dict(arguments)}

    @agent.capability("count")
    def count(arguments: Any, context: DispatchContext) -> Any:
        for n in range(arguments["to"]):
            context.chunk(n)
        return {"counted": arguments["to"]}

    return agent


def test_the_whole_mesh_is_one_asgi_app_on_one_port(certs: Certs) -> None:
    async def scenario() -> None:
        sock = listening_socket()
        base = f"https://{HOST}:{sock.getsockname()[1]}"
        parts = mesh_parts(base)
        app = asgi_app(parts, config=Config(close_timeout=1.0), shutdown_grace=1.0)
        async with serving(app, certs, sock), client(base, certs) as http:
            token, connect_url = await token_and_connect_url(http)
            assert connect_url == f"wss://{HOST}:{sock.getsockname()[1]}/agents/connect" \
                f"?instance_id={INSTANCE}"
            auth = {"authorization": f"Bearer {token}"}
            async with agent_at(connect_url, token, certs):  # the same uvicorn port
                await app.wait_for_agent(INSTANCE, WAIT)
                answer = await http.post("/agents/dispatch", headers=auth, json={
                    "capability": "echo", "arguments": {"x": 1}, "instance_id": INSTANCE})
                assert answer.status_code == 200, answer.text
                assert answer.headers["content-type"].startswith("application/json")
                assert answer.json()["result"] == {"echo": {"x": 1}}
                assert answer.json()["instance_id"] == INSTANCE

                answer = await http.post(
                    "/agents/dispatch", headers={**auth, "accept": "text/event-stream"},
                    json={"capability": "count", "arguments": {"to": 3},
                          "agent_type": AGENT_TYPE})
                assert answer.status_code == 200, answer.text
                assert answer.headers["content-type"].startswith("text/event-stream")
                events = parse_sse(answer.text)
                assert [name for name, _ in events] == ["chunk"] * 3 + ["result"]
                assert [data["data"] for _, data in events[:3]] == [0, 1, 2]
                assert [data["seq"] for _, data in events[:3]] == [0, 1, 2]
                assert events[-1][1]["result"] == {"counted": 3}

            answer = await http.post("/agents/dispatch", headers=auth, content=b"{not json")
            assert answer.status_code == 400
            assert answer.json()["error"]["code"] == "INVALID_REQUEST"

            status, body = await raw_request(
                base, certs, f"POST /agents/dispatch HTTP/1.1\r\nHost: {HOST}\r\n"
                f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {(1 << 20) + 1}\r\n", b"{")
            assert status == 413
            assert json.loads(body)["error"]["code"] == "PAYLOAD_TOO_LARGE"

            answer = await http.get("/metrics", headers=auth)
            assert answer.status_code == 200
            assert "svantic_dispatches_total" in answer.text
            answer = await http.get("/metrics")
            assert answer.status_code == 401

            answer = await http.get("/agents/connect")  # plain HTTP on the agents' endpoint
            assert answer.status_code == 426
            assert answer.json()["error"]["code"] == "UPGRADE_REQUIRED"
        assert app.runtime.phase is MeshPhase.CLOSED  # the ASGI lifespan closed it
        parts.registry.close()
    run(scenario())


def test_the_mesh_mounted_in_starlette_beside_a_route_of_its_own(certs: Certs) -> None:
    pytest.importorskip("starlette")
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route

    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse("hello from the application")

    async def scenario() -> None:
        sock = listening_socket()
        base = f"https://{HOST}:{sock.getsockname()[1]}"
        parts = mesh_parts(base)
        mesh = asgi_app(parts, config=Config(close_timeout=1.0), shutdown_grace=1.0)
        ticking = []
        mesh.lifespan = _Recorded(mesh.lifespan, ticking)
        app = Starlette(routes=[Route("/hello", hello), Mount("/", app=mesh)],
                        lifespan=mesh.lifespan_context)  # a mounted app gets no events
        async with serving(app, certs, sock), client(base, certs) as http:
            assert ticking == ["entered"]
            answer = await http.get("/hello")
            assert (answer.status_code, answer.text) == (200, "hello from the application")
            token, connect_url = await token_and_connect_url(http)
            async with agent_at(connect_url, token, certs):
                await mesh.wait_for_agent(INSTANCE, WAIT)
                answer = await http.post(
                    "/agents/dispatch", headers={"authorization": f"Bearer {token}"},
                    json={"capability": "echo", "arguments": {"m": 1},
                          "instance_id": INSTANCE})
                assert answer.status_code == 200, answer.text
                assert answer.json()["result"] == {"echo": {"m": 1}}
            answer = await http.get("/nowhere")
            assert answer.status_code == 404
            assert answer.json()["error"]["code"] == "NOT_FOUND"  # the control plane's
        assert ticking == ["entered", "left"]
        assert mesh.runtime.phase is MeshPhase.CLOSED
        parts.registry.close()
    run(scenario())


class _Recorded:
    """The mesh's lifespan context, noting when the framework enters and leaves it."""

    def __init__(self, inner: Any, seen: list[str]) -> None:
        self.inner, self.seen = inner, seen

    async def __aenter__(self) -> Any:
        entered = await self.inner.__aenter__()
        self.seen.append("entered")
        return entered

    async def __aexit__(self, *exc: Any) -> None:
        await self.inner.__aexit__(*exc)
        self.seen.append("left")


# -- AsgiMesh alone ---------------------------------------------------------------------------


def bare_mesh(http_app: Callable[[HttpRequest, Any], Awaitable[None]] | None = None,
              **options: Any) -> AsgiMesh:
    records = {INSTANCE: InstanceRecord(INSTANCE, TENANT, "connected", AGENT_TYPE)}
    return AsgiMesh(verify_token=lambda token: {"tenant_id": TENANT},
                    lookup_instance=records.get, dispatch_auth=None,
                    config=Config(close_timeout=1.0), http_app=http_app, **options)


def test_an_app_that_raises_is_answered_500_without_its_text(
        certs: Certs, caplog: pytest.LogCaptureFixture) -> None:
    first_part_read = asyncio.Event()

    async def failing(request: HttpRequest, responder: Any) -> None:
        if request.path in ("/stream", "/unsent"):
            responder.start(200, [("content-type", "text/plain")])
            responder.send(b"part")
            if request.path == "/stream":  # the head and a part reached the client
                await first_part_read.wait()
        elif request.path == "/silent":
            return  # no answer at all
        raise RuntimeError(SECRET_TEXT)

    async def scenario() -> None:
        async with serving(bare_mesh(failing), certs) as base, client(base, certs) as http:
            answer = await http.post("/boom", content=b"x")
            assert answer.status_code == 500
            assert answer.json() == INTERNAL
            assert SECRET_TEXT not in answer.text
            answer = await http.get("/silent")
            assert (answer.status_code, answer.json()) == (500, INTERNAL)
            # Started, but nothing went out yet: the client can still be told 500.
            answer = await http.get("/unsent")
            assert (answer.status_code, answer.json()) == (500, INTERNAL)
            with pytest.raises(httpx.RemoteProtocolError):  # cut, never a whole-looking answer
                async with http.stream("GET", "/stream") as stream:
                    assert stream.status_code == 200
                    async for piece in stream.aiter_raw():
                        assert piece == b"part"
                        first_part_read.set()

    with caplog.at_level(logging.ERROR, logger="svantic.mesh"):
        run(scenario())
    failures = [r for r in caplog.records if r.getMessage().startswith(
        "HTTP application failed")]
    assert len(failures) == 3 and all(r.exc_info for r in failures)  # log.exception
    assert any("gave no answer" in r.getMessage() for r in caplog.records)


def test_the_app_gets_the_request_and_streams_its_answer(certs: Certs) -> None:
    seen: list[HttpRequest] = []
    left = asyncio.Event()

    async def app(request: HttpRequest, responder: Any) -> None:
        seen.append(request)
        if request.path == "/follow":
            responder.start(200, [("content-type", "text/event-stream")])
            responder.send(b"data: 1\n\n")
            while not responder.closed:  # the client leaves: http.disconnect
                await asyncio.sleep(0.01)
                responder.send(b": keep-alive\n\n")
            left.set()
            return
        responder.respond(201, [("content-type", "text/plain"), ("x-seen", request.method)],
                          request.body[::-1])

    async def scenario() -> None:
        async with serving(bare_mesh(app), certs) as base, client(base, certs) as http:
            answer = await http.put("/echo%20it?a=1&b=%2F", content=b"abc",
                                    headers={"X-Custom": "V"})
            assert (answer.status_code, answer.content) == (201, b"cba")
            assert answer.headers["x-seen"] == "PUT"
            assert answer.headers["content-length"] == "3"
            request = seen[-1]
            assert (request.method, request.path, request.query) == (
                "PUT", "/echo it", "a=1&b=%2F")
            assert request.target == "/echo%20it?a=1&b=%2F"
            assert request.header("x-custom") == "V" and request.body == b"abc"

            async with http.stream("GET", "/follow") as stream:
                async for line in stream.aiter_lines():
                    assert line == "data: 1"
                    break
            await asyncio.wait_for(left.wait(), WAIT)
    run(scenario())


def test_a_body_over_the_bound_is_413_without_calling_the_app(certs: Certs) -> None:
    calls: list[HttpRequest] = []

    async def app(request: HttpRequest, responder: Any) -> None:
        calls.append(request)
        responder.respond(200, [], b"")

    async def scenario() -> None:
        mesh = bare_mesh(app, max_http_body_bytes=100)
        async with serving(mesh, certs) as base, client(base, certs) as http:
            answer = await http.post("/x", content=b"y" * 101)  # by its Content-Length
            assert answer.status_code == 413
            assert answer.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"

            async def pieces() -> AsyncIterator[bytes]:  # chunked: counted as it comes
                for _ in range(3):
                    yield b"z" * 40
            answer = await http.post("/x", content=pieces())
            assert answer.status_code == 413
            assert answer.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"
            assert calls == []
            answer = await http.post("/x", content=b"y" * 100)
            assert answer.status_code == 200 and len(calls) == 1
    run(scenario())


def test_without_http_app_the_426_and_404_answers_stay(certs: Certs) -> None:
    async def scenario() -> None:
        async with serving(bare_mesh(), certs) as base, client(base, certs) as http:
            answer = await http.get("/agents/connect?instance_id=x")
            assert (answer.status_code, answer.headers["upgrade"]) == (426, "websocket")
            assert answer.json()["error"]["code"] == "UPGRADE_REQUIRED"
            answer = await http.post("/agents/dispatch", json={})
            assert answer.status_code == 404
            assert answer.json()["error"]["code"] == "NOT_FOUND"
    run(scenario())


def test_with_http_app_the_agents_endpoint_still_answers_426(certs: Certs) -> None:
    async def app(request: HttpRequest, responder: Any) -> None:
        responder.respond(200, [], b"app")

    async def scenario() -> None:
        async with serving(bare_mesh(app), certs) as base, client(base, certs) as http:
            answer = await http.get("/agents/connect")
            assert answer.status_code == 426
            assert (await http.get("/anything")).text == "app"
    run(scenario())
