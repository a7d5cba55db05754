"""Fuzz target: the control-plane request path, from bytes to answer (spec 6).

Bytes go into `HttpServerConnection` (the parser every control-plane call crosses, fast path
and h11 alike), cut anywhere; each request it hands out goes to `ControlPlane.handle` on a
real registry, router and fleet, with a valid token of tenant A, tenant B, or a broken one;
the answer goes back through the connection. Requests come from the grammar of real calls:
every path, bodies from valid ones mutated (wrong types, unknown fields, unicode, SQL
metacharacters, deep nesting, huge strings), headers bent.

The oracle: nothing raises; the events do not depend on the chunking; every answer is one a
client parses, with a documented status and, for an error, exactly the spec 1 body; no answer
ever carries exception text, a traceback or another tenant's instance id; the mesh never
answers 500.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator
from typing import Any

import h11
import pytest
from fuzz_settings import FUZZ
from hypothesis import given
from hypothesis import strategies as st
from svantic_mesh.control import ControlPlane, Response
from svantic_mesh.events import EventBus
from svantic_mesh.fleet import Fleet
from svantic_mesh.metrics import MeshMetrics
from svantic_mesh.registry import SqliteRegistry
from svantic_mesh.routing import Router
from svantic_mesh.tokens import TokenIssuer

from svantic_proto.http import HttpClosed, HttpRequest, HttpServerConnection

WALL = 1_790_000_000.0
NOW = 100.0
PATHS = ["/auth/token", "/agents/register", "/agents/deregister", "/agents/heartbeat",
         "/agents/get_connection", "/agents/get_connection_stats", "/agents/list_connections",
         "/agents/allow_type", "/agents/set_policy", "/sessions/init", "/sessions/close",
         "/agents/dispatch", "/events", "/metrics", "/.well-known/jwks.json", "/healthz",
         "/dashboard", "/nope", "/agents/../auth/token", "/%61gents/register"]
STATUSES = {200, 201, 400, 401, 403, 404, 405, 408, 409, 413, 415, 422, 431, 502, 503, 504}
SECRET_TENANT_B = "b-secret-instance-7f3a"
LEAKS = re.compile(
    r"Traceback|File \"|[A-Za-z]+(Error|Exception)\b|sqlite|psycopg|msgspec|"
    + re.escape(SECRET_TENANT_B))
SQL = ["' OR 1=1 --", "\"; DROP TABLE instances; --", "x'); DELETE FROM clients; --",
       "%", "_", "\\", "\x00", "Robert'); --"]
WEIRD = ["é", "\u202e", "\ud7ff", "🙂" * 3, "a" * 5000, "", " ", "\n", "null", "0"]

VALID_BODIES: dict[str, dict[str, Any]] = {
    "/auth/token": {"client_id": "client-a", "client_secret": "secret-a"},
    "/agents/register": {"agent_type": "nav", "instance_id": "a-1",
                         "tools": [{"name": "get"}], "max_concurrent_sessions": 2},
    "/agents/deregister": {"instance_id": "a-1"},
    "/agents/heartbeat": {"instance_id": "a-1", "active_sessions": 0, "status": "available",
                          "load": 0.5},
    "/agents/get_connection": {"instance_id": "a-1"},
    "/agents/get_connection_stats": {"agent_type": "nav"},
    "/agents/list_connections": {"limit": 10},
    "/agents/allow_type": {"agent_type": "nav"},
    "/agents/set_policy": {"policy_mode": "open"},
    "/sessions/init": {"agent_type": "nav", "metadata": {"k": "v"}},
    "/sessions/close": {"session_id": "s-1"},
    "/agents/dispatch": {"capability": "get", "arguments": {}, "deadline_ms": 1000},
}
json_leaf = (st.none() | st.booleans() | st.integers(-(2**64), 2**64)
             | st.floats(allow_nan=False) | st.sampled_from(SQL + WEIRD) | st.text(max_size=20))
json_values = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                  max_size=3),
    max_leaves=8)


@st.composite
def body_for(draw: st.DrawFn, path: str) -> bytes:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=200))
    if kind == 1:
        depth = draw(st.integers(1, 5000))
        return ("[" * depth + "]" * depth).encode()
    body = dict(VALID_BODIES.get(path, {}))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["retype", "sql", "drop", "unknown"]))
        names = list(body)
        if op == "retype" and names:
            body[draw(st.sampled_from(names))] = draw(json_values)
        elif op == "sql" and names:
            name = draw(st.sampled_from(names))
            body[name] = draw(st.sampled_from(SQL + WEIRD))
        elif op == "drop" and names:
            body.pop(draw(st.sampled_from(names)))
        else:
            body[draw(st.text(max_size=10))] = draw(json_values)
    text = json.dumps(body, ensure_ascii=draw(st.booleans()))
    return text.encode("utf-8", "surrogatepass")


@st.composite
def request_bytes(draw: st.DrawFn, tokens: dict[str, str]) -> bytes:
    path = draw(st.sampled_from(PATHS))
    method = draw(st.sampled_from(["POST", "POST", "GET", "PUT", "HEAD", "post"]))
    body = draw(body_for(path))
    auth = draw(st.sampled_from(["a", "a", "b", "bad", "none", "basic", "huge"]))
    headers = [("Host", "127.0.0.1")]
    if auth in ("a", "b"):
        headers.append(("Authorization", f"Bearer {tokens[auth]}"))
    elif auth == "bad":
        headers.append(("Authorization", f"Bearer {tokens['a'][:-3]}xyz"))
    elif auth == "basic":
        headers.append(("Authorization", "Basic YTpi"))
    elif auth == "huge":
        headers.append(("Authorization", "Bearer " + "A" * 9000))
    length = draw(st.sampled_from(["exact", "exact", "exact", "none", "short", "chunked"]))
    if length == "exact":
        headers.append(("Content-Length", str(len(body))))
    elif length == "short":
        headers.append(("Content-Length", str(max(0, len(body) - 1))))
    elif length == "chunked":
        headers.append(("Transfer-Encoding", "chunked"))
        body = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n" if body else b"0\r\n\r\n"
    if draw(st.integers(0, 5)) == 0:
        headers.append((draw(st.sampled_from(["Accept", "Connection", "X-A", "Expect"])),
                        draw(st.sampled_from(["text/event-stream", "close", "keep-alive",
                                              "100-continue", "\x7f", "é"]))))
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
    return head.encode("utf-8", "surrogatepass") + b"\r\n" + body


class Plane:
    def __init__(self) -> None:
        self.registry = SqliteRegistry(":memory:", secret_key=b"k" * 32, scrypt_n=2)
        self.registry.add_client("client-a", "secret-a", "tenant-a")
        self.registry.add_client("client-b", "secret-b", "tenant-b")
        events = EventBus()
        metrics = MeshMetrics()
        fleet = Fleet(registry=self.registry, router=Router(), events=events, metrics=metrics)
        self.tokens = TokenIssuer(b"t" * 32, ttl=3600.0)
        ids = (f"id-{n}" for n in itertools.count(1))
        self.cp = ControlPlane(registry=self.registry, fleet=fleet, tokens=self.tokens,
                               events=events, metrics=metrics, public_url="https://127.0.0.1:1",
                               max_body_bytes=16384, new_id=lambda: next(ids))
        self.token = {name: self.tokens.issue(f"client-{name}", f"tenant-{name}", WALL)[0]
                      for name in ("a", "b")}
        # Tenant B owns an instance whose id must never reach tenant A.
        answer = self.cp.handle(HttpRequest(
            "POST", "/agents/register", "/agents/register", "",
            (("authorization", f"Bearer {self.token['b']}"),),
            json.dumps({"agent_type": "nav", "instance_id": SECRET_TENANT_B,
                        "tools": [{"name": "get"}]}).encode()), now=NOW, wall=WALL)
        assert isinstance(answer, Response) and answer.status == 200, answer


@pytest.fixture(scope="module")
def plane() -> Iterator[Plane]:
    made = Plane()
    yield made
    made.registry.close()


def serve(plane: Plane, data: bytes, cuts: list[int]) -> tuple[list[Any], bytes]:
    """Feed `data` cut at `cuts`; answer each request as the mesh would. Returns what the
    connection handed out (comparable) and every byte written."""
    conn = HttpServerConnection(now=NOW, max_header_bytes=4096, max_body_bytes=16384,
                                max_buffered_bytes=16384 + 4096)
    seen: list[Any] = []
    out = bytearray()
    for begin, end in itertools.pairwise([0, *cuts, len(data)]):
        conn.receive_data(data[begin:end], NOW)
        for _ in range(100):  # an answer may let the connection read a pipelined request
            events = conn.events_received()
            if not events:
                break
            for event in events:
                if isinstance(event, HttpClosed):
                    seen.append("closed")
                    continue
                seen.append((event.method, event.target, event.headers, event.body))
                answer = plane.cp.handle(event, now=NOW, wall=WALL)
                if not isinstance(answer, Response):  # an effect: the serving code's I/O
                    answer = Response.json(200, {"effect": type(answer).__name__})
                check_answer(plane, event, answer)
                conn.respond(answer.status, answer.headers, answer.body, now=NOW)
        for chunk in conn.data_to_send():
            out += chunk
    conn.receive_eof(NOW)
    for chunk in conn.data_to_send():
        out += chunk
    return seen, bytes(out)


def check_answer(plane: Plane, request: HttpRequest, answer: Response) -> None:
    assert answer.status in STATUSES, (answer.status, answer.body[:200])
    assert answer.header("cache-control") == "no-store"
    text = answer.body.decode("utf-8")
    if request.path in ("/dashboard", "/metrics"):
        return
    if answer.status >= 400:
        body = json.loads(text)
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
        assert re.fullmatch(r"[A-Z][A-Z0-9_]*", body["error"]["code"])
    assert LEAKS.search(text) is None or (
        # Tenant B may see its own instance.
        SECRET_TENANT_B in text and f"Bearer {plane.token['b']}" in request.headers.__repr__()
    ), text[:300]


def check_wire(out: bytes, seen: list[Any]) -> None:
    """Every byte written is a sequence of complete HTTP answers a client reads, one per
    request handed out (and at most one refusal after them)."""
    methods = [item[0].upper() for item in seen if item != "closed"] + ["POST"]
    client = h11.Connection(h11.CLIENT)
    client.receive_data(out)
    for method in methods:
        client.send(h11.Request(method=method if method in ("HEAD", "GET") else "POST",
                                target="/", headers=[("Host", "x"), ("Content-Length", "0")]))
        client.send(h11.EndOfMessage())
        event = client.next_event()
        while isinstance(event, h11.InformationalResponse):  # 100 Continue
            event = client.next_event()
        if event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
            return
        assert isinstance(event, h11.Response), event
        while not isinstance(event, h11.EndOfMessage):
            event = client.next_event()
            assert event is not h11.NEED_DATA, "an answer was cut short"
        if client.their_state is not h11.DONE or client.our_state is not h11.DONE:
            return
        client.start_next_cycle()


@FUZZ
@given(data=st.data())
def test_control_plane_answers_every_request_as_documented(plane: Plane,
                                                           data: st.DataObject) -> None:
    stream = b"".join(data.draw(st.lists(request_bytes(plane.token), min_size=1, max_size=3)))
    if data.draw(st.integers(0, 9)) == 0:
        stream += data.draw(st.binary(max_size=60))
    whole_seen, whole_out = serve(plane, stream, [])
    cuts = sorted(set(data.draw(st.lists(st.integers(1, max(1, len(stream) - 1)),
                                         max_size=6))))
    seen, out = serve(plane, stream, cuts)
    requests = [s for s in seen if s != "closed"]
    assert requests == [s for s in whole_seen if s != "closed"][:len(requests)] or (
        # A deadline or a bound can only shorten what one chunking reads, never change it.
        not requests)
    check_wire(whole_out, whole_seen)
    check_wire(out, seen)
    for text in (whole_out, out):
        assert LEAKS.search(text.decode("latin-1").replace(SECRET_TENANT_B, "")) is None


@FUZZ
@given(data=st.binary(max_size=600))
def test_random_bytes_get_a_400_answer_or_wait(plane: Plane, data: bytes) -> None:
    """Bytes that are not HTTP are answered 400 (or 431 when huge) at once, never 500."""
    seen, out = serve(plane, data, [])
    if out.startswith(b"HTTP/1.1 5"):
        pytest.fail(f"a 5xx answer to random bytes: {out[:200]!r}")
    if out and not seen:
        assert out.startswith((b"HTTP/1.1 400", b"HTTP/1.1 431", b"HTTP/1.1 413",
                               b"HTTP/1.1 408")), out[:100]
