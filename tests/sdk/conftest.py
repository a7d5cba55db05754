"""An in-process reference mesh for the SDK's tests (and any test that needs one).

The mesh runs on the asyncio adapter in a thread of its own with its own event loop, so a
test's agents may run on asyncio, trio or gevent in the test's thread without sharing a loop
with it. Real TLS on 127.0.0.1: a local CA (trustme) signs the mesh's certificate, and the
same CA may sign hosted agents' certificates (`Mesh.issue_cert`), which the mesh trusts for
its `POST {url}/send` calls.

`mesh` is one mesh for the module (dispatch auth on); `make_mesh(**settings)` starts another
with other `MeshSettings` (say `dispatch_auth_enabled=False` or a short `token_ttl`).
Every test should use instance ids of its own: instances registered by one test stay
registered for the next one on the same mesh.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import ssl
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from svantic_adapters.asyncio import MeshServer
from svantic_mesh.app import AsyncMesh, MeshParts
from svantic_mesh.registry import SqliteRegistry
from svantic_mesh.serve import make_parts

from svantic_proto import Config
from svantic_proto.mesh import DispatchRoute

HOST = "127.0.0.1"
WAIT = 15.0
CLIENT_ID = "sdk-client"
CLIENT_SECRET = "sdk-client-secret-0123456789abcdef"
TENANT = "tenant-sdk"
TOKEN_SECRET = b"sdk-token-secret-0123456789abcdef0123456789"
SIGNING_SECRET = "sdk-signing-secret-0123456789abcdef0123456789"


@dataclass
class Mesh:
    """A running mesh. `url` is its `https://127.0.0.1:port`; `ca_file` the PEM of the CA
    that signed its certificate (and any `issue_cert`); `signing_secret` the dispatch-auth
    secret agents verify envelopes with (text)."""

    url: str
    ca_file: str
    client_id: str
    client_secret: str
    signing_secret: str
    tenant_id: str
    parts: MeshParts
    server: MeshServer
    loop: asyncio.AbstractEventLoop
    ca: trustme.CA
    folder: Path
    mint_override: Callable[[DispatchRoute], Any] | None = None
    """When set, the dispatch-auth envelope of every socket dispatch comes from this (say a
    forged or expired one) instead of the mesh's minter; raising fails the dispatch."""
    _token: str | None = field(default=None, repr=False)

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts the mesh's CA."""
        return ssl.create_default_context(cafile=self.ca_file)

    def issue_cert(self, *hosts: str) -> tuple[str, str]:
        """`(certfile, keyfile)` for `hosts` (default 127.0.0.1), signed by the mesh's CA:
        a hosted agent's certificate that the mesh trusts."""
        names = hosts or (HOST,)
        leaf = self.ca.issue_cert(*names)
        stem = "-".join(names).replace(":", "_").replace(".", "_") + f"-{os.urandom(4).hex()}"
        cert = self.folder / f"{stem}.cert.pem"
        key = self.folder / f"{stem}.key.pem"
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        key.write_bytes(leaf.private_key_pem.bytes())
        return str(cert), str(key)

    def token(self) -> str:
        """A transport JWT of the test client (fetched once, reused)."""
        if self._token is None:
            with httpx.Client(base_url=self.url, verify=self.ssl_context(), trust_env=False,
                              timeout=WAIT) as http:
                answer = http.post("/auth/token", json={"client_id": self.client_id,
                                                        "client_secret": self.client_secret})
                self._token = str(answer.raise_for_status().json()["access_token"])
        return self._token

    def _dispatch_body(self, capability: str, arguments: Any, options: dict[str, Any]) -> (
            dict[str, Any]):
        return {"capability": capability, "arguments": {} if arguments is None else arguments,
                **options}

    async def call(self, capability: str, arguments: Any = None, *, stream: bool = False,
                   **options: Any) -> httpx.Response:
        """POST /agents/dispatch with a token (asyncio or trio); `options` are body fields
        (`agent_type`, `instance_id`, `deadline_ms`, `session_id`...). `stream=True` asks
        for SSE (`parse_sse(response.text)`)."""
        headers = {"authorization": f"Bearer {self.token()}"}
        if stream:
            headers["accept"] = "text/event-stream"
        async with httpx.AsyncClient(base_url=self.url, verify=self.ssl_context(),
                                     trust_env=False, timeout=WAIT) as http:
            return await http.post("/agents/dispatch", headers=headers,
                                   json=self._dispatch_body(capability, arguments, options))

    def call_sync(self, capability: str, arguments: Any = None, *, stream: bool = False,
                  **options: Any) -> httpx.Response:
        """`call`, blocking (gevent tests, threads)."""
        headers = {"authorization": f"Bearer {self.token()}"}
        if stream:
            headers["accept"] = "text/event-stream"
        with httpx.Client(base_url=self.url, verify=self.ssl_context(), trust_env=False,
                          timeout=WAIT) as http:
            return http.post("/agents/dispatch", headers=headers,
                             json=self._dispatch_body(capability, arguments, options))

    def post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        """Any control-plane POST with the test client's token, blocking."""
        with httpx.Client(base_url=self.url, verify=self.ssl_context(), trust_env=False,
                          timeout=WAIT) as http:
            return http.post(path, json=body,
                             headers={"authorization": f"Bearer {self.token()}"})

    def in_loop(self, make: Callable[[], Awaitable[Any]], timeout: float = WAIT) -> Any:
        """Run `make()` in the mesh's own loop (say `server.dispatch(...)` directly) and
        return its result, blocking this thread."""
        async def run() -> Any:
            return await make()
        future = asyncio.run_coroutine_threadsafe(run(), self.loop)
        return future.result(timeout)

    async def in_loop_async(self, make: Callable[[], Awaitable[Any]],
                            timeout: float = WAIT) -> Any:
        """`in_loop` for an asyncio test: waits without blocking the test's loop."""
        async def run() -> Any:
            return await make()
        future = asyncio.run_coroutine_threadsafe(run(), self.loop)
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout)

    def connected(self, instance_id: str) -> bool:
        """Whether the mesh has a live socket from `instance_id`."""
        return instance_id in self.server.agents


def parse_sse(text: str) -> list[tuple[str, Any]]:
    """`(event, data)` pairs of an SSE body."""
    import json

    events = []
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines()
                      if line and not line.startswith(":"))
        if "data" in fields:
            events.append((fields.get("event", "message"), json.loads(fields["data"])))
    return events


@dataclass
class _Running:
    mesh: Mesh
    stop: Callable[[], None]


def _start_mesh(folder: Path, **settings: Any) -> _Running:
    """Start a mesh in a thread of its own; returns once it listens."""
    ca = trustme.CA(organization_name="svantic sdk tests CA")
    leaf = ca.issue_cert(HOST, "localhost")
    ca_file = folder / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(server_ctx)
    hosted_verify = ssl.create_default_context(cafile=str(ca_file))
    registry = SqliteRegistry(":memory:", secret_key=os.urandom(32), scrypt_n=2**4)
    registry.add_client(CLIENT_ID, CLIENT_SECRET, TENANT)
    started: concurrent.futures.Future[Mesh] = concurrent.futures.Future()
    holder: dict[str, Any] = {}

    class Late:
        parts: MeshParts | None = None
        mesh: Mesh | None = None

        def verify_token(self, token: str) -> Any:
            assert self.parts is not None
            return self.parts.verify_token(token)

        def lookup_instance(self, instance_id: str) -> Any:
            assert self.parts is not None
            return self.parts.lookup_instance(instance_id)

        def mint(self, route: DispatchRoute) -> Any:
            assert self.parts is not None and self.mesh is not None
            if self.mesh.mint_override is not None:
                return self.mesh.mint_override(route)
            return self.parts.mint(route)

    late = Late()
    enabled = settings.get("dispatch_auth_enabled", True)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        holder["stop"] = lambda: loop.call_soon_threadsafe(done.set)
        app: dict[str, Any] = {}

        async def http_app(request: Any, responder: Any) -> None:
            await app["mesh"].http_app(request, responder)

        server = MeshServer(ssl_context=server_ctx, verify_token=late.verify_token,
                            lookup_instance=late.lookup_instance,
                            dispatch_auth=late.mint if enabled else None,
                            config=Config(close_timeout=2.0), http_app=http_app)
        async with server:
            host, port = await server.start(HOST, 0)
            url = f"https://{host}:{port}"
            parts = late.parts = make_parts(
                registry, url, {"token_secret": TOKEN_SECRET,
                                "signing_secret": SIGNING_SECRET.encode()},
                hosted_verify=hosted_verify, **settings)
            mesh = AsyncMesh(parts)
            mesh.attach(server)
            app["mesh"] = mesh
            async with mesh:
                late.mesh = Mesh(url=url, ca_file=str(ca_file), client_id=CLIENT_ID,
                                 client_secret=CLIENT_SECRET, signing_secret=SIGNING_SECRET,
                                 tenant_id=TENANT, parts=parts, server=server, loop=loop,
                                 ca=ca, folder=folder)
                started.set_result(late.mesh)
                await done.wait()
                mesh.end_streams()
                await server.close(1.0)
        registry.close()

    def thread_main() -> None:
        import anyio

        try:  # anyio's runner, as `svantic mesh` runs: the mesh's task group is anyio's
            anyio.run(main, backend="asyncio")
        except BaseException as exc:  # surfaced to the test that waits for the start
            if not started.done():
                started.set_exception(exc)
            raise

    thread = threading.Thread(target=thread_main, name="sdk-test-mesh", daemon=True)
    thread.start()
    mesh = started.result(WAIT)

    def stop() -> None:
        holder["stop"]()
        thread.join(WAIT)

    return _Running(mesh, stop)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """One in-process mesh (dispatch auth on) for the module's tests."""
    running = _start_mesh(tmp_path_factory.mktemp("sdk-mesh"))
    try:
        yield running.mesh
    finally:
        running.stop()


@pytest.fixture
def make_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Mesh]]:
    """`make_mesh(**settings)`: another mesh with these `MeshSettings` (stopped after the
    test)."""
    running: list[_Running] = []

    def make(**settings: Any) -> Mesh:
        run = _start_mesh(tmp_path_factory.mktemp("sdk-mesh"), **settings)
        running.append(run)
        return run.mesh

    try:
        yield make
    finally:
        for run in running:
            run.stop()
