"""`MeshRuntime(serve_http=True)`: plain HTTP on the mesh's port, on a fake clock.

The in-test driver of test_mesh_runtime.py, taught `ServeHttp`: the link's pump switches
to the `HttpServerConnection` the runtime made, and each `HttpRequest` it reports goes to
a list the test answers from (the application)."""

from __future__ import annotations

import json
import random
import re
from typing import Any

from test_mesh_runtime import CONFIG, Driver, Link, RawClient, raw_request

from svantic_proto.auth import DispatchAuthMinter
from svantic_proto.http import HttpRequest, HttpServerConnection
from svantic_proto.mesh import jwt_dispatch_auth
from svantic_proto.mesh_runtime import (
    AT_CAPACITY,
    MeshPhase,
    MeshRuntime,
    ServeHttp,
)
from svantic_proto.resume import ResumeStore
from svantic_proto.states import MeshState
from svantic_proto.testing import TEST_SIGNING_SECRET

IDLE = 60.0  # HttpServerConnection's default idle_timeout


def plain(target: str = "/v1/health", *headers: str, method: str = "GET",
          body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: mesh.test", *headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body


class HttpDriver(Driver):
    """`Driver` with `serve_http`: HTTP links are pumped through their HTTP connection."""

    def __init__(self, *, serve_http: bool = True, max_http_connections: int = 100,
                 max_handshakes: int = 100) -> None:
        super().__init__(CONFIG, max_handshakes=max_handshakes)
        self.runtime = MeshRuntime(
            dispatch_auth=jwt_dispatch_auth(DispatchAuthMinter(TEST_SIGNING_SECRET)),
            wall_clock=self.clock.wall, config=CONFIG,
            resume_store=ResumeStore(window=CONFIG.resume_window,
                                     token_factory=lambda: random.Random(3).randbytes(12).hex()),
            max_connections=100, max_handshakes=max_handshakes,
            random_bytes=self._random, serve_http=serve_http,
            max_http_connections=max_http_connections,
        )
        self.http: dict[Link, HttpServerConnection] = {}
        self.served: list[Link] = []
        self.requests: dict[Link, list[HttpRequest]] = {}

    def service(self, link: Link) -> bool:
        http = self.http.get(link)
        if http is None:
            return super().service(link)
        if not link.open:
            return False
        events = http.events_received()
        for event in events:
            if isinstance(event, HttpRequest):
                self.requests.setdefault(link, []).append(event)
        chunks = http.data_to_send()
        for chunk in chunks:
            if chunk == b"":
                self.closed(link)
                break
            link.agent.receive_data(chunk, self.now)
        if link.open:
            self.runtime.schedule(link, http.next_deadline())
        return bool(events or chunks)

    def from_agent(self, link: Link) -> bool:
        http = self.http.get(link)
        if http is None:
            return super().from_agent(link)
        chunks = link.agent.data_to_send()
        for chunk in chunks:
            http.receive_data(chunk, self.now)
        return bool(chunks)

    def perform(self) -> bool:
        actions = self.runtime.take_actions()
        rest = []
        for action in actions:
            if isinstance(action, ServeHttp):
                self.http[action.link] = action.conn
                self.served.append(action.link)
                self.service(action.link)
            else:
                rest.append(action)
        self.runtime._actions[:0] = rest  # the base driver performs the others
        return super().perform() or bool(actions)

    def get(self, request: bytes | None = None) -> Link:
        return self.raw(request if request is not None else plain())

    def send(self, link: Link, data: bytes) -> None:
        link.agent._out.append(data)
        self.pump()

    def respond(self, link: Link, body: bytes = b"ok") -> None:
        self.http[link].respond(200, [("content-type", "text/plain")], body, now=self.now)
        self.service(link)
        self.pump()

    def pending(self, link: Link) -> list[HttpRequest]:
        return self.requests.get(link, [])


def statuses(client: RawClient) -> list[int]:
    return [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3})", client.received)]


def error_of(client: RawClient) -> dict[str, Any]:
    body = client.received.partition(b"\r\n\r\n")[2]
    return json.loads(body)["error"]  # type: ignore[no-any-return]


# -- a plain request ---------------------------------------------------------------------------


def test_a_plain_request_is_served_and_leaves_the_handshakes() -> None:
    driver = HttpDriver()
    link = driver.get(plain("/v1/agents?limit=2", "Accept: application/json"))
    assert driver.served == [link]
    (request,) = driver.pending(link)
    assert (request.method, request.path, request.query) == ("GET", "/v1/agents", "limit=2")
    assert request.header("accept") == "application/json"
    assert driver.runtime.handshakes() == 0
    assert driver.runtime.http_connections() == 1
    assert driver.runtime.connections() == 0
    assert driver.admissions == []  # no verify, no lookup for plain HTTP
    assert link.conn is not None and link.conn.state is MeshState.CLOSED
    assert link.mesh_events[-1].__class__.__name__ == "HttpRequested"
    driver.respond(link, b"fine")
    assert link.agent.received.endswith(b"fine")
    assert link.open


def test_the_hello_timeout_does_not_drop_an_http_link_while_it_answers() -> None:
    driver = HttpDriver()
    link = driver.get()
    driver.advance(CONFIG.hello_timeout * 10)
    assert link.open and driver.drops == []
    assert driver.runtime.http_connections() == 1
    driver.respond(link)
    assert statuses(link.agent) == [200] and link.open


def test_max_handshakes_does_not_count_http_links() -> None:
    driver = HttpDriver(max_handshakes=1)
    first = driver.get()
    second = driver.get()
    assert first.open and second.open and driver.drops == []
    assert driver.runtime.http_connections() == 2


def test_a_kept_alive_http_link_closes_at_the_idle_timeout_through_the_runtime_timer() -> None:
    driver = HttpDriver()
    link = driver.get()
    driver.respond(link)
    answered = driver.now
    assert driver.runtime.next_deadline() == answered + IDLE
    driver.advance(IDLE - 0.5)
    assert link.open
    driver.send(link, plain("/again"))  # a second request on the same connection
    assert [r.path for r in driver.pending(link)] == ["/v1/health", "/again"]
    driver.respond(link)
    second = driver.now
    driver.advance(IDLE - 0.001)
    assert link.open
    driver.advance(0.001)
    assert not link.open and driver.now == second + IDLE
    assert statuses(link.agent) == [200, 200]  # closed quietly: nothing more written
    assert driver.runtime.http_connections() == 0
    assert driver.runtime.next_deadline() is None


def test_a_stalled_second_request_is_408_through_the_runtime_timer() -> None:
    driver = HttpDriver()
    link = driver.get()
    driver.respond(link)
    driver.send(link, b"GET /slow HTTP/1.1\r\nHost: x\r\n")
    driver.advance(CONFIG.hello_timeout)  # the request timeout is the hello timeout
    assert statuses(link.agent) == [200, 408] and not link.open


def test_the_transport_closing_aborts_the_http_link() -> None:
    driver = HttpDriver()
    link = driver.get()
    http = driver.http[link]
    driver.cut(link)
    assert http.closed and driver.runtime.http_connections() == 0
    http.respond(200, [], b"late", now=driver.now)  # the application answers late: no-op
    assert http.data_to_send() == []


def test_the_websocket_upgrade_is_unchanged_with_serve_http() -> None:
    driver = HttpDriver()
    web = driver.get()
    agent = driver.dial("agent-1")
    assert driver.arrived == ["agent-1"]
    assert driver.runtime.connections() == 1 and driver.runtime.handshakes() == 0
    assert driver.runtime.http_connections() == 1
    assert agent not in driver.served and web in driver.served
    assert agent.conn is not None and agent.conn.state is MeshState.READY
    assert driver.lookup_calls == ["agent-1"]


def test_an_upgrade_to_another_path_is_plain_http() -> None:
    driver = HttpDriver()
    link = driver.get(raw_request(target="/elsewhere"))
    assert driver.served == [link]
    assert driver.pending(link)[0].path == "/elsewhere"


def test_a_refused_upgrade_of_the_connect_path_is_still_refused() -> None:
    driver = HttpDriver()
    link = driver.raw(raw_request(auth=None))
    assert driver.served == []
    assert link.agent.status()[0] == 401


# -- max_http_connections ----------------------------------------------------------------------


def test_over_max_http_connections_the_oldest_idle_one_is_aborted() -> None:
    driver = HttpDriver(max_http_connections=2)
    oldest, middle = driver.get(), driver.get()
    driver.respond(oldest)
    driver.respond(middle)  # both idle now, oldest first
    newcomer = driver.get()
    assert not oldest.open and middle.open and newcomer.open
    assert driver.pending(newcomer)
    assert driver.runtime.http_connections() == 2
    driver.respond(newcomer)
    assert statuses(newcomer.agent) == [200]


def test_an_answering_link_is_not_the_one_aborted() -> None:
    driver = HttpDriver(max_http_connections=2)
    busy, idle = driver.get(), driver.get()
    driver.respond(idle)  # `busy` still waits for its answer
    newcomer = driver.get()
    assert busy.open and not idle.open and newcomer.open
    driver.respond(busy)
    assert statuses(busy.agent) == [200]


def test_over_max_http_connections_with_none_idle_the_newcomer_gets_503() -> None:
    driver = HttpDriver(max_http_connections=1)
    busy = driver.get()
    refused = driver.get(plain("/secret-path"))
    assert busy.open and not refused.open
    assert refused.agent.status()[:2] == (503, AT_CAPACITY)
    assert b"secret-path" not in refused.agent.received
    assert driver.pending(refused) == []
    assert driver.runtime.http_connections() == 1
    driver.respond(busy)
    assert statuses(busy.agent) == [200]


# -- shutdown ----------------------------------------------------------------------------------


def test_shutdown_lets_an_answer_in_progress_finish_then_closes() -> None:
    driver = HttpDriver()
    busy, idle = driver.get(), driver.get()
    driver.respond(idle)
    driver.runtime.begin_shutdown(driver.now)
    driver.pump()
    assert not idle.open  # nothing in progress: closed at once
    assert busy.open and driver.runtime.phase is not MeshPhase.CLOSED
    driver.respond(busy, b"last words")
    assert busy.agent.received.endswith(b"last words")
    assert b"connection: close" in busy.agent.received.lower()
    assert not busy.open
    assert driver.runtime.phase is MeshPhase.CLOSED and driver.completed == 1


def test_shutdown_drops_an_answer_that_outlasts_the_close_timeout() -> None:
    driver = HttpDriver()
    busy = driver.get()
    driver.runtime.begin_shutdown(driver.now)
    driver.pump()
    assert busy.open
    driver.advance(CONFIG.close_timeout)
    assert not busy.open and (busy, "mesh shut down") in driver.drops
    assert driver.runtime.phase is MeshPhase.CLOSED and driver.completed == 1


def test_shutdown_with_an_agent_waits_for_both_the_agent_and_the_answer() -> None:
    driver = HttpDriver()
    agent = driver.dial("agent-1")
    busy = driver.get()
    driver.runtime.begin_shutdown(driver.now, grace=3.0)
    driver.pump()
    assert not agent.open  # it had nothing in flight: it left at the close_request
    assert busy.open and driver.runtime.phase is MeshPhase.CLOSING
    driver.respond(busy)
    assert not busy.open and statuses(busy.agent) == [200]
    assert driver.runtime.phase is MeshPhase.CLOSED and driver.completed == 1


def test_shutdown_refuses_a_new_transport() -> None:
    driver = HttpDriver()
    driver.runtime.begin_shutdown(driver.now)
    link = driver.get()
    assert (link, "refused at accept") in driver.drops and driver.served == []


# -- without serve_http ------------------------------------------------------------------------


def test_without_serve_http_a_plain_request_still_gets_426() -> None:
    driver = HttpDriver(serve_http=False)
    link = driver.get(plain("/v1/health"))
    assert driver.served == [] and driver.runtime.http_connections() == 0
    status, code, _ = link.agent.status()
    assert (status, code) == (426, "UPGRADE_REQUIRED")
    assert not link.open
