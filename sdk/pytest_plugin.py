"""A pytest plugin for agent authors: a reference mesh inside the test process, and a client.

Installed with the package (entry point `pytest11`), it gives every test suite two fixtures:

* `svantic_mesh`: a reference mesh (`svantic_mesh`) on 127.0.0.1 with real TLS, its own CA and
  a test API client, started for the test and stopped after it;
* `agent_client`: a `MeshClient` of that mesh, to call capabilities the way a caller would.

An agent's own test then reads::

    @pytest.mark.anyio
    async def test_get_ticket(svantic_mesh):
        async with svantic_mesh.connect(agent):
            result = await svantic_mesh.call("get_ticket", {"ticket_id": "T-1"})
        assert result["id"] == "T-1"

The mesh runs in a thread of its own with its own asyncio loop, so one fixture serves asyncio
and trio tests (anyio's pytest plugin, `@pytest.mark.anyio`) and gevent or plain tests
(`connect_sync`, `call_sync`) without sharing a loop with them. Under gevent's monkey-patching
that thread is a real one (gevent's original `start_new_thread`), not a greenlet.

A gevent suite monkey-patches in its conftest, which runs after plugins load, so this module
imports no more than pytest of its own (the rest when a fixture runs), and its test checks that
gevent finds nothing imported too early. anyio's pytest plugin, when installed, does import
`ssl` first and gevent warns: a gevent suite runs with `-p no:anyio`, or patches before
pytest starts (`python -m gevent.monkey --module pytest`).

Fixtures can also start a mesh of their own with other settings: `start_mesh(folder,
dispatch_auth_enabled=False)` (`MeshSettings` fields), then `stop()` it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import ssl

    import httpx

__all__ = ["MeshClient", "SvanticMesh", "agent_client", "svantic_mesh"]

HOST = "127.0.0.1"
WAIT = 20.0
"""Seconds any one step may take (start, stop, a call) before the test fails."""
CLIENT_ID = "svantic-test-client"
CLIENT_SECRET = "svantic-test-client-secret-0123456789"
TENANT = "svantic-tests"

_instances = itertools.count(1)


def _gevent_patched() -> bool:
    """Whether gevent has monkey-patched this process (then blocking calls yield the hub)."""
    monkey = sys.modules.get("gevent.monkey")
    return bool(monkey is not None and monkey.is_module_patched("socket"))


def _start_thread(target: Callable[[], None], name: str) -> None:
    """A real OS thread, even under gevent's monkey-patching (where `threading.Thread` would
    be a greenlet of this thread's hub, and an event loop in it would stall the tests)."""
    if _gevent_patched():
        from gevent import monkey

        start_new_thread = monkey.get_original("_thread", "start_new_thread")
        start_new_thread(target, ())
        return
    import threading

    threading.Thread(target=target, name=name, daemon=True).start()


def _wait_for(done: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Poll `done()` (cheap, and safe across a real thread and gevent's hub alike)."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} after {timeout} s")
        time.sleep(0.005)  # gevent.sleep once monkey-patched: the hub keeps running


# -- calling capabilities ------------------------------------------------------------------------

def _error(status: int, body: bytes) -> Exception:
    """The SDK's exception for a failed call, with the mesh's code and message."""
    from svantic import errors

    try:
        document = json.loads(body)
    except ValueError:
        document = None
    return errors.error_for(status, document)


_NO_RESULT = {"error": {"code": "DISPATCH_FAILED",
                       "message": "the stream ended without a result"}}


class _Stream:
    """One streamed call's SSE, fed line by line: each chunk to `on_chunk` as it arrives,
    then the result (or the error, raised)."""

    def __init__(self, status: int, on_chunk: Callable[[Any], object]) -> None:
        self.status = status
        self.on_chunk = on_chunk
        self.event = "message"
        self.data: list[str] = []
        self.ended = False
        self.result: Any = None

    def feed(self, line: str) -> bool:
        """Take one line; True once the result is in (the rest is not read)."""
        if line.startswith(":"):
            return False
        if line:
            name, _, value = line.partition(":")
            if name == "event":
                self.event = value.removeprefix(" ")
            elif name == "data":
                self.data.append(value.removeprefix(" "))
            return False
        event, data = self.event, self.data
        self.event, self.data = "message", []
        if not data:
            return False
        document = json.loads("\n".join(data))
        if event == "chunk":
            self.on_chunk(document.get("data"))
        elif event == "result":
            self.result, self.ended = document.get("result"), True
        elif event == "error":
            raise _error(self.status, json.dumps(document).encode())
        return self.ended

    def outcome(self) -> Any:
        if not self.ended:
            self.feed("")  # a last event without its blank line
        if not self.ended:
            raise _error(self.status, json.dumps(_NO_RESULT).encode())
        return self.result


@dataclass
class MeshClient:
    """A caller of one mesh: `POST /auth/token` once, then `POST /agents/dispatch`.

    `call` (asyncio or trio) and `call_sync` (gevent, threads, plain tests) return the
    capability's result, or raise the SDK's error for the mesh's code
    (`svantic.errors.SvanticApiError` with `.code` and `.message`: `DISPATCH_FAILED` for a
    handler that raised, `INVALID_ARGUMENTS`, or `AgentUnavailableError` when no agent
    offers the capability). `on_chunk` asks for the streamed form and gets each chunk."""

    url: str
    ca_file: str
    client_id: str = CLIENT_ID
    client_secret: str = CLIENT_SECRET
    _token: str | None = field(default=None, repr=False)

    def ssl_context(self) -> ssl.SSLContext:
        """A client TLS context that trusts the mesh's CA (and nothing else)."""
        import ssl

        return ssl.create_default_context(cafile=self.ca_file)

    def _credentials(self) -> dict[str, str]:
        return {"client_id": self.client_id, "client_secret": self.client_secret}

    def _accept(self, answer: httpx.Response) -> str:
        if answer.status_code != 200:
            raise _error(answer.status_code, answer.content)
        self._token = str(answer.json()["access_token"])
        return self._token

    def token(self) -> str:
        """The test client's transport JWT (fetched once), blocking."""
        import httpx

        if self._token is None:
            with httpx.Client(base_url=self.url, verify=self.ssl_context(), trust_env=False,
                              timeout=WAIT) as http:
                self._accept(http.post("/auth/token", json=self._credentials()))
        assert self._token is not None
        return self._token

    @staticmethod
    def _body(capability: str, arguments: Mapping[str, Any] | None,
              options: dict[str, Any]) -> dict[str, Any]:
        body = {"capability": capability, "arguments": dict(arguments or {})}
        body.update((key, value) for key, value in options.items() if value is not None)
        return body

    async def call(self, capability: str, arguments: Mapping[str, Any] | None = None, *,
                   agent_type: str | None = None, instance_id: str | None = None,
                   deadline_ms: int | None = None, session_id: str | None = None,
                   on_chunk: Callable[[Any], object] | None = None) -> Any:
        """Dispatch `capability` through the mesh and return its result (asyncio or trio)."""
        import httpx

        body = self._body(capability, arguments, {
            "agent_type": agent_type, "instance_id": instance_id, "deadline_ms": deadline_ms,
            "session_id": session_id})
        async with httpx.AsyncClient(base_url=self.url, verify=self.ssl_context(),
                                     trust_env=False, timeout=WAIT) as http:
            token = self._token or self._accept(
                await http.post("/auth/token", json=self._credentials()))
            headers = {"authorization": f"Bearer {token}"}
            if on_chunk is None:
                answer = await http.post("/agents/dispatch", json=body, headers=headers)
                if answer.status_code != 200:
                    raise _error(answer.status_code, answer.content)
                return answer.json()["result"]
            headers["accept"] = "text/event-stream"
            async with http.stream("POST", "/agents/dispatch", json=body,
                                   headers=headers) as answer:
                if answer.status_code != 200:
                    raise _error(answer.status_code, await answer.aread())
                stream = _Stream(answer.status_code, on_chunk)
                async for line in answer.aiter_lines():
                    if stream.feed(line):
                        break
            return stream.outcome()

    def call_sync(self, capability: str, arguments: Mapping[str, Any] | None = None, *,
                  agent_type: str | None = None, instance_id: str | None = None,
                  deadline_ms: int | None = None, session_id: str | None = None,
                  on_chunk: Callable[[Any], object] | None = None) -> Any:
        """`call`, blocking: for gevent tests (it yields to the hub) and plain ones."""
        import httpx

        body = self._body(capability, arguments, {
            "agent_type": agent_type, "instance_id": instance_id, "deadline_ms": deadline_ms,
            "session_id": session_id})
        headers = {"authorization": f"Bearer {self.token()}"}
        with httpx.Client(base_url=self.url, verify=self.ssl_context(), trust_env=False,
                          timeout=WAIT) as http:
            if on_chunk is None:
                answer = http.post("/agents/dispatch", json=body, headers=headers)
                if answer.status_code != 200:
                    raise _error(answer.status_code, answer.content)
                return answer.json()["result"]
            headers["accept"] = "text/event-stream"
            with http.stream("POST", "/agents/dispatch", json=body, headers=headers) as answer:
                if answer.status_code != 200:
                    raise _error(answer.status_code, answer.read())
                stream = _Stream(answer.status_code, on_chunk)
                for line in answer.iter_lines():
                    if stream.feed(line):
                        break
            return stream.outcome()

    def post(self, path: str, body: Mapping[str, Any]) -> Any:
        """Any control-plane `POST` with the test client's token (say `/agents/list`), blocking;
        returns the JSON answer or raises the SDK's error."""
        import httpx

        with httpx.Client(base_url=self.url, verify=self.ssl_context(), trust_env=False,
                          timeout=WAIT) as http:
            answer = http.post(path, json=dict(body),
                               headers={"authorization": f"Bearer {self.token()}"})
        if answer.status_code != 200:
            raise _error(answer.status_code, answer.content)
        return answer.json()


# -- the mesh ------------------------------------------------------------------------------------

@dataclass
class SvanticMesh(MeshClient):
    """A reference mesh running for one test: `url`, `ca_file` (the CA that signed its
    certificate), the test client's credentials, `signing_secret` (its dispatch-auth secret,
    which agents verify envelopes with), and a caller's `call`/`call_sync`."""

    signing_secret: str = ""
    dispatch_auth_enabled: bool = True
    tenant_id: str = TENANT
    folder: Path = field(default_factory=Path)
    _ca: Any = field(default=None, repr=False)
    _stop: Callable[[], None] = field(default=lambda: None, repr=False)

    def client(self) -> MeshClient:
        """Another caller of this mesh (its own token)."""
        return MeshClient(self.url, self.ca_file, self.client_id, self.client_secret)

    def connector_options(self, **options: Any) -> dict[str, Any]:
        """Keyword arguments of `svantic.MeshConnector` that reach this mesh: its URL, CA,
        the test client, the dispatch-auth secret, and an instance id of its own; `options`
        override or add to them."""
        settings: dict[str, Any] = {
            "svantic_url": self.url, "client_id": self.client_id,
            "client_secret": self.client_secret, "cafile": self.ca_file,
            "signing_secret": self.signing_secret,
            "instance_id": f"test-{os.getpid()}-{next(_instances)}"}
        if not self.dispatch_auth_enabled:  # the mesh sends no envelopes: expect none
            settings["environ"] = {**os.environ, "SVANTIC_DISPATCH_AUTH_ENABLED": "false"}
        settings.update(options)
        return settings

    @contextlib.asynccontextmanager
    async def connect(self, agent: Any, **options: Any) -> AsyncIterator[Any]:
        """`async with svantic_mesh.connect(agent) as connector:` the agent registered and
        connected to this mesh (on the test's own loop, asyncio or trio), disconnected after.
        `options` are `MeshConnector`'s (`instance_id`, `deployment_mode="hosted"`, ...)."""
        import asyncio

        import svantic

        try:
            asyncio.get_running_loop()
            adapter = "asyncio"
        except RuntimeError:  # not asyncio: trio, which the anyio adapter runs on
            adapter = "anyio"
        options.setdefault("adapter", adapter)
        connector = svantic.MeshConnector(agent, **self.connector_options(**options))
        await connector.connect()
        try:
            yield connector
        finally:
            await connector.disconnect()

    @contextlib.contextmanager
    def connect_sync(self, agent: Any, **options: Any) -> Iterator[Any]:
        """`connect` for gevent tests (the gevent adapter, in this hub) and plain ones (an
        asyncio loop in a thread of its own runs the agent); yields the connector."""
        import svantic

        if _gevent_patched():
            options.setdefault("adapter", "gevent")
            connector = svantic.MeshConnector(agent, **self.connector_options(**options))
            connector.connect()
            try:
                yield connector
            finally:
                connector.disconnect()
            return
        options.setdefault("adapter", "asyncio")
        connector = svantic.MeshConnector(agent, **self.connector_options(**options))
        with _LoopThread("svantic-test-agent") as loop:
            loop.run(connector.connect)
            try:
                yield connector
            finally:
                loop.run(connector.disconnect)

    def issue_cert(self, *hosts: str) -> tuple[str, str]:
        """`(certfile, keyfile)` for `hosts` (default 127.0.0.1) signed by the mesh's CA, which
        the mesh trusts: what a hosted agent in a test serves HTTPS with."""
        names = hosts or (HOST,)
        leaf = self._ca.issue_cert(*names)
        stem = f"hosted-{next(_instances)}"
        cert, key = self.folder / f"{stem}.cert.pem", self.folder / f"{stem}.key.pem"
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        key.write_bytes(leaf.private_key_pem.bytes())
        return str(cert), str(key)

    def stop(self) -> None:
        """Close the mesh (the fixture does, after the test)."""
        self._stop()


class _LoopThread:
    """An asyncio loop in a real thread of its own, to run coroutines from blocking code."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.loop: Any = None
        self.ended = False

    def __enter__(self) -> _LoopThread:
        import asyncio

        def main() -> None:
            loop = asyncio.new_event_loop()
            self.loop = loop
            try:
                loop.run_forever()
            finally:
                loop.close()
                self.ended = True

        _start_thread(main, self.name)
        _wait_for(lambda: self.loop is not None and self.loop.is_running(),
                  f"{self.name} did not start")
        return self

    def run(self, make: Callable[[], Any], timeout: float = WAIT) -> Any:
        """`await make()` in the loop; blocks until it returns (or raises) or `timeout`."""
        import asyncio

        async def call() -> Any:
            return await make()

        future = asyncio.run_coroutine_threadsafe(call(), self.loop)
        _wait_for(future.done, f"{self.name}: no answer", timeout)
        return future.result()

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        _wait_for(lambda: self.ended, f"{self.name} did not stop")


class _Late:
    """The server wants its callbacks before it listens, the mesh's parts want the port it
    got: the callbacks reach the parts once they exist."""

    parts: Any = None
    mesh: Any = None

    def verify_token(self, token: str) -> Any:
        return self.parts.verify_token(token)

    def lookup_instance(self, instance_id: str) -> Any:
        return self.parts.lookup_instance(instance_id)

    def mint(self, route: Any) -> Any:
        return self.parts.mint(route)

    async def http_app(self, request: Any, responder: Any) -> None:
        await self.mesh.http_app(request, responder)


_ca_cache: list[Any] = []


def _local_ca() -> Any:
    """One CA per test session: made once (a key pair is the slow part of a mesh's start)."""
    if not _ca_cache:
        import trustme

        _ca_cache.append(trustme.CA(organization_name="svantic test mesh CA"))
    return _ca_cache[0]


def start_mesh(folder: Path, **settings: Any) -> SvanticMesh:
    """Start a reference mesh in a thread of its own on 127.0.0.1; returns once it listens.

    `settings` are `svantic_mesh.app.MeshSettings` fields (`dispatch_auth_enabled=False`,
    `token_ttl=...`, `default_deadline_ms=...`). Call `stop()` when done."""
    import asyncio
    import ssl

    # Imported here, not in the mesh's thread: a first import may run a subprocess (trio,
    # through httpcore, asks ldconfig), which gevent can only watch from the main thread.
    import httpcore  # noqa: F401  # what the mesh's HTTP client loads when it is made
    from svantic_adapters.asyncio import MeshServer
    from svantic_mesh.app import AsyncMesh
    from svantic_mesh.registry import SqliteRegistry
    from svantic_mesh.serve import make_parts

    from svantic_proto import Config

    ca = _local_ca()
    ca_file = folder / "svantic-mesh-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    leaf = ca.issue_cert(HOST, "localhost")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(server_context)
    signing_secret = os.urandom(24).hex()
    state: dict[str, Any] = {}

    async def main() -> None:
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        state["stop"] = lambda: loop.call_soon_threadsafe(done.set)
        registry = SqliteRegistry(":memory:", secret_key=os.urandom(32), scrypt_n=2**4)
        registry.add_client(CLIENT_ID, CLIENT_SECRET, TENANT)
        late = _Late()
        enabled = settings.get("dispatch_auth_enabled", True)
        server = MeshServer(
            ssl_context=server_context, verify_token=late.verify_token,
            lookup_instance=late.lookup_instance,
            dispatch_auth=late.mint if enabled else None,
            config=Config(close_timeout=2.0), http_app=late.http_app)
        try:
            async with server:
                host, port = await server.start(HOST, 0)
                url = f"https://{host}:{port}"
                parts = late.parts = make_parts(
                    registry, url, {"token_secret": os.urandom(32),
                                    "signing_secret": signing_secret.encode()},
                    hosted_verify=ssl.create_default_context(cafile=str(ca_file)), **settings)
                mesh = late.mesh = AsyncMesh(parts)
                mesh.attach(server)
                async with mesh:
                    state["url"] = url
                    await done.wait()
                    mesh.end_streams()
                    await server.close(1.0)
        finally:
            registry.close()

    def thread_main() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:  # handed to the test that waits for the start
            state["error"] = exc
        finally:
            state["ended"] = True

    _start_thread(thread_main, "svantic-test-mesh")
    _wait_for(lambda: "url" in state or "ended" in state, "the test mesh did not start")
    if "url" not in state:
        raise RuntimeError(f"the test mesh did not start: {state.get('error')!r}")

    def stop() -> None:
        if not state.get("ended"):
            state["stop"]()
            _wait_for(lambda: "ended" in state, "the test mesh did not stop")

    return SvanticMesh(url=state["url"], ca_file=str(ca_file), signing_secret=signing_secret,
                       dispatch_auth_enabled=settings.get("dispatch_auth_enabled", True),
                       folder=folder, _ca=ca, _stop=stop)


@pytest.fixture
def svantic_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SvanticMesh]:
    """A reference mesh on 127.0.0.1 with TLS, for this test (dispatch auth on)."""
    mesh = start_mesh(tmp_path_factory.mktemp("svantic-mesh"))
    try:
        yield mesh
    finally:
        mesh.stop()


@pytest.fixture
def agent_client(svantic_mesh: SvanticMesh) -> MeshClient:
    """A caller of `svantic_mesh`: `await agent_client.call("echo", {...})`."""
    return svantic_mesh.client()
