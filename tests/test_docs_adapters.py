"""docs/adapters.md's code runs as written: its four python blocks (the asyncio agent, the
anyio agent on trio, the gevent agent and the asyncio mesh), each against this project's
other side on 127.0.0.1 over real TLS (trustme CA).

Only placeholders are swapped in: the mesh address, the token, the secret or verifier, the
CA file (as one extra keyword argument), the mesh's TLS context, token check, registry and
signing secret, and the mesh's fixed port (for 0, read back from what `start` returns).
`_swap` asserts each swapped text is still on the page, so this fails when the docs change.
The one line of each agent example that blocks forever is replaced by `PROVE(agent)`: the
mesh dispatches `echo` to the agent, gets its arguments back, and the agent stops.

Each agent example runs in a thread of its own (its own event loop or hub, as written down
to `asyncio.run` / `anyio.run(main, backend="trio")`), the mesh in another; every wait is
bounded.
"""

from __future__ import annotations

import ast
import asyncio
import concurrent.futures
import contextlib
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from svantic_adapters.asyncio import MeshServer, connect

from svantic_proto import (
    DispatchAuthMinter,
    DispatchAuthVerifier,
    InstanceRecord,
    jwt_dispatch_auth,
)

with contextlib.suppress(ImportError):
    # gevent gives its default loop to the first thread that imports it: let that be pytest's
    # main thread, not the thread the gevent example runs in (see tests/adapters/harness.py).
    import gevent  # noqa: F401

PAGE_PATH = Path(__file__).resolve().parents[1] / "docs" / "adapters.md"
PAGE = PAGE_PATH.read_text(encoding="utf-8")
BLOCKS = re.findall(r"^```python\n(.*?)^```", PAGE, re.S | re.M)
HOST = "127.0.0.1"
INSTANCE = "a-1"
TENANT = "t-1"
TOKEN = "docs-adapters-transport-token"
SECRET = "docs-adapters-signing-secret-of-32+bytes"
ARGS = {"x": 1}
WAIT = 20.0
"""Upper bound for each wait below."""


def _block(marker: str) -> str:
    assert len(BLOCKS) == 4, f"docs/adapters.md has {len(BLOCKS)} python blocks, not 4"
    found = [block for block in BLOCKS if marker in block]
    assert len(found) == 1, f"no single python block of docs/adapters.md has {marker!r}"
    return found[0]


def _swap(source: str, old: str, new: str) -> str:
    assert old in source, f"docs/adapters.md no longer contains {old!r}: update this test"
    return source.replace(old, new)


def _verify_transport_jwt(token: str) -> dict[str, Any]:
    if token != TOKEN:
        raise PermissionError("not a token this mesh issued")
    return {"tenant_id": TENANT, "sub": "docs", "exp": time.time() + 3600}


REGISTRY = {INSTANCE: InstanceRecord(INSTANCE, TENANT, "connected", "echo-agent")}


class Tls:
    """A private CA, the mesh's context for 127.0.0.1, and the CA file agents trust."""

    def __init__(self, directory: Path) -> None:
        ca = trustme.CA()
        self.server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(HOST).configure_cert(self.server)
        self.cafile = str(directory / "docs-ca.pem")
        ca.cert_pem.write_to_path(self.cafile)


@pytest.fixture
def tls(tmp_path: Path) -> Tls:
    return Tls(tmp_path)


class Mesh:
    """This project's asyncio mesh on 127.0.0.1 over TLS, in a thread with its own loop."""

    def __init__(self, tls: Tls) -> None:
        self._tls = tls
        self._up = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.url = ""
        self._thread = threading.Thread(target=self._main, daemon=True, name="docs-mesh")

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:
            self._error = exc
            self._up.set()

    async def _serve(self) -> None:
        self.server = MeshServer(
            ssl_context=self._tls.server,
            verify_token=_verify_transport_jwt,
            lookup_instance=REGISTRY.get,
            dispatch_auth=jwt_dispatch_auth(DispatchAuthMinter(SECRET)),
        )
        host, port = await self.server.start(HOST, 0)
        self.url = f"wss://{host}:{port}/agents/connect"
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._up.set()
        try:
            await self._stop.wait()
        finally:
            await asyncio.wait_for(self.server.close(grace=0), WAIT)

    def __enter__(self) -> Mesh:
        self._thread.start()
        assert self._up.wait(WAIT), "the mesh did not start"
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # its loop already ended
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(WAIT)
        assert not self._thread.is_alive(), "the mesh did not close"

    def _submit(self, coroutine: Any) -> concurrent.futures.Future[Any]:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def echo_soon(self) -> concurrent.futures.Future[Any]:
        """Dispatch `echo` with ARGS once the agent is there; its Future has the result."""
        async def echo() -> Any:
            await self.server.wait_for_agent(INSTANCE, timeout=WAIT)
            return await self.server.dispatch(INSTANCE, "echo", ARGS, deadline_ms=10_000)

        return self._submit(echo())

    def wait_gone(self) -> None:
        """Until the agent's session has ended on the mesh's side."""
        async def gone() -> None:
            async with asyncio.timeout(WAIT):
                while INSTANCE in self.server.agents:
                    await asyncio.sleep(0.01)

        self._submit(gone()).result(WAIT + 5)


def _run_in_thread(body: Callable[[], None], what: str) -> None:
    """Run `body` in a fresh thread (so a fresh event loop or hub); re-raise what it raised."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            body()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True, name=what)
    thread.start()
    thread.join(3 * WAIT)
    assert not thread.is_alive(), f"{what} did not finish in {3 * WAIT} s"
    if errors:
        raise errors[0]


def _exec(source: str, namespace: dict[str, Any]) -> None:
    exec(compile(source, str(PAGE_PATH), "exec"), namespace)


@pytest.fixture
def mesh(tls: Tls) -> Iterator[Mesh]:
    with Mesh(tls) as running:
        yield running


def _agent_namespace(mesh: Mesh, tls: Tls, prove: Callable[[Any], Any]) -> dict[str, Any]:
    return {
        "__name__": "adapters_example",
        "URL": mesh.url,
        "TOKEN": TOKEN,
        "SECRET": SECRET,
        "verifier": DispatchAuthVerifier(INSTANCE, hs256_keys=[SECRET]),
        "CAFILE": tls.cafile,
        "PROVE": prove,
    }


@pytest.mark.timeout(60)
def test_the_asyncio_agent_example_serves_a_dispatch(mesh: Mesh, tls: Tls) -> None:
    source = _block("from svantic_adapters.asyncio import connect")
    source = _swap(source, "wss://mesh.example/agents/connect", mesh.url)
    source = _swap(source, "token=TOKEN,", "token=TOKEN, cafile=CAFILE,")
    source = _swap(source, "    await agent.run()\n", "    await PROVE(agent)\n")
    echoed: list[Any] = []

    async def prove(agent: Any) -> None:
        async with asyncio.timeout(WAIT), agent:  # agent.run() inside; agent.stop() on exit
            echoed.append(await asyncio.wrap_future(mesh.echo_soon()))

    _run_in_thread(lambda: _exec(source, _agent_namespace(mesh, tls, prove)), "asyncio example")
    assert echoed == [ARGS]
    mesh.wait_gone()


@pytest.mark.timeout(60)
def test_the_anyio_agent_example_serves_a_dispatch_on_trio(mesh: Mesh, tls: Tls) -> None:
    pytest.importorskip("trio")
    import anyio.to_thread

    source = _block("from svantic_adapters.anyio import connect")
    assert 'anyio.run(main, backend="trio")' in source
    source = _swap(source, "dispatch_auth=verifier)", "dispatch_auth=verifier, cafile=CAFILE)")
    source = _swap(source, "await anyio.sleep_forever()", "await PROVE(agent)")
    echoed: list[Any] = []

    async def prove(agent: Any) -> None:  # the example's `async with agent:` stops it after
        echoed.append(await anyio.to_thread.run_sync(mesh.echo_soon().result, WAIT))

    _run_in_thread(lambda: _exec(source, _agent_namespace(mesh, tls, prove)), "anyio example")
    assert echoed == [ARGS]
    mesh.wait_gone()


@pytest.mark.timeout(60)
def test_the_gevent_agent_example_serves_a_dispatch(mesh: Mesh, tls: Tls) -> None:
    pytest.importorskip("gevent")
    import gevent

    source = _block("from svantic_adapters.gevent import connect")
    source = _swap(source, "dispatch_auth=verifier)", "dispatch_auth=verifier, cafile=CAFILE)")
    source = _swap(source, "\nagent.run() ", "\nPROVE(agent) ")
    echoed: list[Any] = []

    def prove(agent: Any) -> None:
        try:
            future = mesh.echo_soon()
            deadline = time.monotonic() + WAIT
            while not future.done() and time.monotonic() < deadline:
                gevent.sleep(0.01)  # the hub serves the agent meanwhile
            echoed.append(future.result(0))
        finally:
            agent.stop(0)

    def run() -> None:
        try:
            _exec(source, _agent_namespace(mesh, tls, prove))
        finally:  # this thread's hub; its ident may be reused by a later thread
            gevent.get_hub().destroy(destroy_loop=True)

    _run_in_thread(run, "gevent example")
    assert echoed == [ARGS]
    mesh.wait_gone()


@pytest.mark.timeout(60)
def test_the_mesh_example_dispatches_to_an_agent(tls: Tls) -> None:
    source = _block("MeshServer(")
    source = _swap(source, f'"{HOST}", 8443)', f'"{HOST}", 0)')
    code = compile(source, str(PAGE_PATH), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    namespace: dict[str, Any] = {
        "__name__": "adapters_example",
        "server_tls": tls.server,
        "verify_transport_jwt": _verify_transport_jwt,
        "registry": REGISTRY,
        "SIGNING_SECRET": SECRET,
    }

    async def scenario() -> None:
        example = asyncio.ensure_future(eval(code, namespace))  # its top-level awaits
        agent = None
        running: asyncio.Future[None] | None = None
        try:
            async with asyncio.timeout(WAIT):
                while "port" not in namespace:  # set once `server.start` returned
                    if example.done():
                        example.result()
                        raise AssertionError("the mesh example ended before it listened")
                    await asyncio.sleep(0.01)
            assert namespace["host"] == HOST
            agent = connect(f"wss://{HOST}:{namespace['port']}/agents/connect", token=TOKEN,
                            instance_id=INSTANCE, cafile=tls.cafile,
                            dispatch_auth=DispatchAuthVerifier(INSTANCE, hs256_keys=[SECRET]))
            agent.add("echo", lambda args, ctx: args)
            running = asyncio.ensure_future(agent.run())
            await asyncio.wait_for(example, WAIT)
            assert namespace["agent"].instance_id == INSTANCE
            assert namespace["result"] == ARGS
        finally:
            if not example.done():
                example.cancel()
            if agent is not None and running is not None:
                await asyncio.wait_for(agent.stop(0), WAIT)
                await asyncio.wait_for(running, WAIT)
            if "server" in namespace:  # a no-op once the example closed it
                await asyncio.wait_for(namespace["server"].close(grace=0), WAIT)

    asyncio.run(asyncio.wait_for(scenario(), 2 * WAIT + 10))
