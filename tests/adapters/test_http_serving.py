"""Plain HTTP on the mesh's port (the control plane), over every adapter's `MeshServer`.

Each mesh gets an `http_app` of its adapter's kind (a coroutine function on asyncio and
anyio, a plain function on gevent) and is called with a plain HTTP/1.1 client over real
TLS on 127.0.0.1, trusting the scenario's trustme CA. Every wait is bounded; the streamed
answer is coordinated with an event the client sets once it read the first chunk.
"""

from __future__ import annotations

import http.client
import json
import ssl
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from harness import DRIVERS, HOST, Certs, MeshSide, Scenario, wait_until

SECRET = "kaboom-secret-exception-text"
WAIT = 10.0
GATE_WAIT = 3.0  # how long the streamed answer waits for the client (less than WAIT)


def _marks(kind: str) -> list[pytest.MarkDecorator]:
    reason = DRIVERS[kind].skip_reason()
    return [pytest.mark.skip(reason=reason)] if reason else []


KINDS = [pytest.param(kind, id=kind, marks=_marks(kind)) for kind in DRIVERS]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(tmp_path_factory.mktemp("http-certs"))


@pytest.fixture
def scenario(certs: Certs) -> Iterator[Scenario]:
    built = Scenario(certs)
    try:
        yield built
    finally:
        built.teardown()


class App:
    """The control plane under test: routes, and a gate the streamed answer waits on."""

    def __init__(self) -> None:
        self.gate = threading.Event()  # set by the client once it read the first chunk
        self.seen: list[str] = []

    def route(self, request: Any) -> tuple[str, Any]:
        self.seen.append(request.path)
        if request.path == "/echo":
            document = {
                "method": request.method, "path": request.path, "query": request.query,
                "body": request.body.decode(), "x_test": request.header("x-test"),
            }
            return "respond", json.dumps(document).encode()
        return request.path.strip("/"), None

    def for_kind(self, kind: str) -> Callable[..., Any]:
        if kind == "gevent":
            return self._sync_app
        import anyio

        async def app(request: Any, responder: Any) -> None:
            what, body = self.route(request)
            if what == "respond":
                responder.respond(200, [("content-type", "application/json")], body)
            elif what == "stream":
                responder.start(200, [("content-type", "text/event-stream")])
                responder.send(b"data: one\n\n")
                # The client's thread sets the gate: wait for it in a worker thread, bounded.
                await anyio.to_thread.run_sync(self.gate.wait, GATE_WAIT)
                responder.send(b"data: two\n\n" if self.gate.is_set() else b"data: late\n\n")
                responder.end()
            elif what == "fail":
                raise RuntimeError(SECRET)
            # "silent": return without answering

        return app

    def _sync_app(self, request: Any, responder: Any) -> None:
        import gevent

        what, body = self.route(request)
        if what == "respond":
            responder.respond(200, [("content-type", "application/json")], body)
        elif what == "stream":
            responder.start(200, [("content-type", "text/event-stream")])
            responder.send(b"data: one\n\n")
            # The client's thread sets the gate: the hub's thread pool waits for it.
            gevent.get_hub().threadpool.spawn(self.gate.wait, GATE_WAIT).get()
            responder.send(b"data: two\n\n" if self.gate.is_set() else b"data: late\n\n")
            responder.end()
        elif what == "fail":
            raise RuntimeError(SECRET)


def serving(scenario: Scenario, kind: str, **options: Any) -> tuple[MeshSide, App]:
    app = App()
    mesh = scenario.mesh(kind, http_app=app.for_kind(kind), **options)
    return mesh, app


def client(mesh: MeshSide, certs: Certs) -> http.client.HTTPSConnection:
    context = ssl.create_default_context(cafile=str(certs.cafile))
    return http.client.HTTPSConnection(HOST, mesh.port, context=context, timeout=WAIT)


def http_links(mesh: MeshSide) -> int:
    return int(mesh.call(mesh.server.runtime.http_connections, what="count"))


# -- the tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_an_http_app_answers_json_over_tls(scenario: Scenario, certs: Certs, kind: str) -> None:
    mesh, _ = serving(scenario, kind)
    conn = client(mesh, certs)
    try:
        conn.request("POST", "/echo?x=1", body=b"hello", headers={"X-Test": "yes"})
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("content-type") == "application/json"
        assert json.loads(response.read()) == {
            "method": "POST", "path": "/echo", "query": "x=1", "body": "hello", "x_test": "yes"}
    finally:
        conn.close()


@pytest.mark.parametrize("kind", KINDS)
def test_keep_alive_serves_two_requests_on_one_connection(scenario: Scenario, certs: Certs,
                                                          kind: str) -> None:
    mesh, app = serving(scenario, kind)
    conn = client(mesh, certs)
    try:
        conn.request("GET", "/echo?n=1")
        first = conn.getresponse()
        assert json.loads(first.read())["query"] == "n=1"
        sock = conn.sock
        assert sock is not None
        conn.request("GET", "/echo?n=2")
        second = conn.getresponse()
        assert json.loads(second.read())["query"] == "n=2"
        assert conn.sock is sock  # the same TCP connection: not reopened
        assert http_links(mesh) == 1
        assert app.seen == ["/echo", "/echo"]
    finally:
        conn.close()
    wait_until(lambda: http_links(mesh) == 0, WAIT, "the mesh to notice the client left")


@pytest.mark.parametrize("kind", KINDS)
def test_a_streamed_answer_arrives_chunk_by_chunk(scenario: Scenario, certs: Certs,
                                                  kind: str) -> None:
    mesh, app = serving(scenario, kind)
    conn = client(mesh, certs)
    try:
        conn.request("GET", "/stream", headers={"Accept": "text/event-stream"})
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("content-type") == "text/event-stream"
        assert response.getheader("transfer-encoding") == "chunked"
        # The first chunk is read while the application still holds the second: had it
        # been held back, the application would give up waiting and send "late" instead.
        assert response.readline() == b"data: one\n"
        assert response.readline() == b"\n"
        app.gate.set()
        assert response.read() == b"data: two\n\n"
        conn.request("GET", "/echo")  # the connection lives on after the stream
        assert conn.getresponse().status == 200
    finally:
        conn.close()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("path", ["/fail", "/silent"])
def test_an_app_that_fails_or_gives_no_answer_is_500_internal(
        scenario: Scenario, certs: Certs, kind: str, path: str) -> None:
    mesh, _ = serving(scenario, kind)
    conn = client(mesh, certs)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        assert response.status == 500
        assert json.loads(body) == {"error": {"code": "INTERNAL", "message": "internal error"}}
        assert SECRET.encode() not in body
        conn.request("GET", "/echo")  # the connection still serves
        assert conn.getresponse().status == 200
    finally:
        conn.close()


@pytest.mark.parametrize("kind", KINDS)
def test_an_agent_connects_on_the_same_port_while_http_is_served(
        scenario: Scenario, certs: Certs, kind: str) -> None:
    mesh, _ = serving(scenario, kind)
    conn = client(mesh, certs)
    try:
        conn.request("GET", "/echo?before")
        assert conn.getresponse().read()
        agent = scenario.agent(kind, mesh.url)
        mesh.wait_for_agent(agent.instance_id)
        assert mesh.dispatch(agent.instance_id, "echo", {"x": 1}) == {"x": 1}
        conn.request("GET", "/echo?after")  # the kept-alive HTTP link was not disturbed
        assert json.loads(conn.getresponse().read())["query"] == "after"
        assert http_links(mesh) == 1
    finally:
        conn.close()


@pytest.mark.parametrize("kind", KINDS)
def test_a_body_over_the_bound_is_413(scenario: Scenario, certs: Certs, kind: str) -> None:
    mesh, app = serving(scenario, kind)
    conn = client(mesh, certs)
    try:
        conn.putrequest("POST", "/echo")
        conn.putheader("Content-Length", str(2 << 20))  # over the 1 MiB default
        conn.endheaders()
        response = conn.getresponse()
        body = response.read()
        assert response.status == 413
        assert json.loads(body)["error"]["code"] == "PAYLOAD_TOO_LARGE"
        assert app.seen == []
    finally:
        conn.close()


@pytest.mark.parametrize("kind", KINDS)
def test_without_http_app_a_plain_request_is_426(scenario: Scenario, certs: Certs,
                                                 kind: str) -> None:
    mesh = scenario.mesh(kind)
    conn = client(mesh, certs)
    try:
        conn.request("GET", "/v1/health")
        response = conn.getresponse()
        assert response.status == 426
        assert json.loads(response.read())["error"]["code"] == "UPGRADE_REQUIRED"
    finally:
        conn.close()
