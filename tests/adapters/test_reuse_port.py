"""`MeshServer.start(host, port, reuse_port=True)` on every adapter: several mesh servers
listen on one port (SO_REUSEPORT) and the kernel spreads new connections among them, which is
what `svantic mesh --workers N` relies on. Without the option the port stays exclusive.

Each server runs in its own thread (its own event loop or hub), answers plain HTTP over real
TLS on 127.0.0.1 with its own name, and is reached by new connections until both names came
back (the kernel picks a listener by hashing each connection's addresses, so a new source port
is a new draw). Every wait is bounded.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import http.client
import ssl
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from harness import CALL_TIMEOUT, DRIVERS, HOST, Certs, Registry

from svantic_proto import Config

CONNECTIONS = 64
"""New connections tried before giving up on seeing both servers (each has a 1 in 2 chance
of reaching either one: missing one of them 64 times running is 2**-63)."""


def _marks(kind: str) -> list[pytest.MarkDecorator]:
    reason = DRIVERS[kind].skip_reason()
    return [pytest.mark.skip(reason=reason)] if reason else []


KINDS = [pytest.param(kind, id=kind, marks=_marks(kind)) for kind in DRIVERS]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(tmp_path_factory.mktemp("reuse-port-certs"))


def _app(kind: str, name: str) -> Callable[..., Any]:
    body = name.encode()
    headers = [("content-type", "text/plain")]
    if kind == "gevent":
        def sync_app(request: Any, responder: Any) -> None:
            responder.respond(200, headers, body)

        return sync_app

    async def app(request: Any, responder: Any) -> None:
        responder.respond(200, headers, body)

    return app


class Listening:
    """One `MeshServer` of adapter `kind` in a thread of its own, answering its `name`."""

    def __init__(self, kind: str, certs: Certs, name: str, port: int, *,
                 reuse_port: bool) -> None:
        self.driver = DRIVERS[kind]
        self.runner = self.driver.runner()
        self.runner.start()
        module = self.driver.adapter()
        registry = Registry()
        ssl_context = self.driver.server_ssl(certs)
        self.server = self.runner.call(lambda: module.MeshServer(
            ssl_context=ssl_context, verify_token=registry.verify_token,
            lookup_instance=registry.lookup_instance, dispatch_auth=None, config=Config(),
            http_app=_app(kind, name)), what="build the mesh")
        self._stop: Any = None
        started: concurrent.futures.Future[int] = concurrent.futures.Future()
        if kind == "gevent":
            def hold() -> Any:
                self._stop = self.driver.new_event()
                try:
                    _, bound = self.server.start(HOST, port, reuse_port=reuse_port)
                except BaseException as exc:
                    started.set_exception(exc)
                    return None
                started.set_result(bound)
                self._stop.wait()
                self.server.close(0)
                return None
        else:
            async def hold_async() -> None:
                self._stop = self.driver.new_event()
                try:
                    _, bound = await self.server.start(HOST, port, reuse_port=reuse_port)
                except BaseException as exc:
                    started.set_exception(exc)
                    return
                started.set_result(bound)
                await self._stop.wait()
                await self.server.close(0)

            hold = hold_async
        self._holder = self.runner.submit(hold)
        try:
            self.port = started.result(CALL_TIMEOUT)
        except BaseException:
            self.runner.stop()
            raise

    def close(self) -> None:
        stop = self._stop
        with contextlib.suppress(Exception):
            self.runner.call(stop.set, what="stop")
            self._holder.result(CALL_TIMEOUT)
        self.runner.stop()


@pytest.fixture
def started() -> Iterator[list[Listening]]:
    servers: list[Listening] = []
    try:
        yield servers
    finally:
        for server in servers:
            server.close()


def _who(port: int, certs: Certs) -> str:
    context = ssl.create_default_context(cafile=str(certs.cafile))
    connection = http.client.HTTPSConnection(HOST, port, context=context, timeout=CALL_TIMEOUT)
    try:
        connection.request("GET", "/who", headers={"connection": "close"})
        answer = connection.getresponse()
        assert answer.status == 200
        return answer.read().decode()
    finally:
        connection.close()


@pytest.mark.parametrize("kind", KINDS)
def test_two_servers_with_reuse_port_share_one_port_and_both_accept(
        kind: str, certs: Certs, started: list[Listening]) -> None:
    first = Listening(kind, certs, "first", 0, reuse_port=True)
    started.append(first)
    second = Listening(kind, certs, "second", first.port, reuse_port=True)
    started.append(second)
    assert second.port == first.port
    seen: set[str] = set()
    for _ in range(CONNECTIONS):
        seen.add(_who(first.port, certs))
        if seen == {"first", "second"}:
            break
    assert seen == {"first", "second"}


@pytest.mark.parametrize("kind", KINDS)
def test_without_reuse_port_the_port_stays_exclusive(
        kind: str, certs: Certs, started: list[Listening]) -> None:
    first = Listening(kind, certs, "first", 0, reuse_port=False)
    started.append(first)
    with pytest.raises(OSError) as refused:
        started.append(Listening(kind, certs, "second", first.port, reuse_port=True))
    assert refused.value.errno == errno.EADDRINUSE
    assert _who(first.port, certs) == "first"  # the first one keeps serving
