"""Run the reference mesh: its files beside the database, and the serving loop on an adapter.

`MeshHome` keeps what a mesh needs between runs next to its database, created on first run
with owner-only permissions: the two signing secrets and the encryption key (unless the
environment gives them), a local CA and a certificate for localhost and 127.0.0.1 (unless a
certificate is given), and a development client. `serve()` runs one mesh until `stop` is
set (or Ctrl-C / SIGTERM), then drains: agents get `close_request` with the grace, open
HTTP answers finish, and the registry is closed.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import math
import os
import secrets
import signal
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from svantic_proto import Config

from .app import AsyncMesh, GeventMesh, MeshParts, MeshSettings, socket_outcome
from .registry import Registry

__all__ = ["ENV_ENCRYPTION_KEY", "ENV_SIGNING_SECRET", "ENV_TOKEN_SECRET", "MeshHome", "serve"]

log = logging.getLogger("svantic.mesh")

ENV_SIGNING_SECRET = "SVANTIC_SIGNING_SECRET"
"""Spec 7's dispatch-auth secret (agents verify envelopes with it)."""
ENV_TOKEN_SECRET = "SVANTIC_TOKEN_SECRET"
"""Signs transport JWTs; stays in the mesh."""
ENV_ENCRYPTION_KEY = "SVANTIC_ENCRYPTION_KEY"
"""32 bytes as 64 hex digits or base64: encrypts registered shared secrets at rest."""
DEV_TENANT = "dev"
DEV_CLIENT = "dev-client"


def _write_private(path: Path, data: bytes) -> None:
    """Create `path` readable by its owner only, before a byte of the secret is in it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(path, 0o600)


def _key_from_env(value: str) -> bytes:
    text = value.strip()
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = base64.b64decode(text, validate=True)
    if len(raw) != 32:
        raise ValueError(f"{ENV_ENCRYPTION_KEY} must be 32 bytes (64 hex digits or base64)")
    return raw


@dataclass
class MeshHome:
    """The files of one mesh beside its database (a temporary folder for `:memory:`)."""

    db: str
    folder: Path

    @classmethod
    def for_db(cls, db: str) -> MeshHome:
        if db == ":memory:":
            return cls(db, Path(tempfile.mkdtemp(prefix="svantic-mesh-")))
        path = Path(db).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return cls(str(path), path.parent)

    @property
    def stem(self) -> str:
        return "mesh" if self.db == ":memory:" else Path(self.db).stem

    @property
    def secrets_file(self) -> Path:
        """Where the secrets the environment does not give are kept (owner-only)."""
        return self.folder / f"{self.stem}.secrets.json"

    def secrets(self, environ: dict[str, str] | None = None) -> dict[str, Any]:
        """The secrets from the environment, else from the secrets file (made on first run).

        Returns `signing_secret`, `token_secret` (bytes), `encryption_key` (32 bytes) and
        `dev_secret` (the development client's secret, text)."""
        env = os.environ if environ is None else environ
        path = self.secrets_file
        stored: dict[str, str] = {}
        if path.exists():
            stored = json.loads(path.read_text())
        changed = False
        for name in ("signing_secret", "token_secret", "encryption_key", "dev_secret"):
            if name not in stored:
                stored[name] = secrets.token_hex(32) if name != "dev_secret" else (
                    secrets.token_urlsafe(24))
                changed = True
        if changed:
            _write_private(path, json.dumps(stored, indent=2).encode())
            log.info("mesh secrets written to %s (owner-only)", path)
        return {
            "signing_secret": env.get(ENV_SIGNING_SECRET, stored["signing_secret"]).encode(),
            "token_secret": env.get(ENV_TOKEN_SECRET, stored["token_secret"]).encode(),
            "encryption_key": _key_from_env(env.get(ENV_ENCRYPTION_KEY,
                                                    stored["encryption_key"])),
            "dev_secret": stored["dev_secret"],
        }

    def certificate(self) -> tuple[Path, Path, Path]:
        """`(ca_file, cert_file, key_file)`: a local CA and a certificate for localhost and
        127.0.0.1 it signed, made on first run and kept."""
        ca_path = self.folder / f"{self.stem}.ca.pem"
        cert_path = self.folder / f"{self.stem}.cert.pem"
        key_path = self.folder / f"{self.stem}.key.pem"
        if not (ca_path.exists() and cert_path.exists() and key_path.exists()):
            import trustme

            ca = trustme.CA(organization_name="svantic mesh local CA")
            leaf = ca.issue_cert("localhost", "127.0.0.1", "::1")
            ca_path.write_bytes(ca.cert_pem.bytes())
            cert_path.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
            _write_private(key_path, leaf.private_key_pem.bytes())
            log.info("local CA made: %s", ca_path)
        return ca_path, cert_path, key_path


def server_context(certfile: str | os.PathLike[str], keyfile: str | os.PathLike[str]) -> (
        ssl.SSLContext):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile, keyfile)
    return context


@dataclass
class _Run:
    parts_factory: Callable[..., MeshParts]
    host: str
    port: int
    ssl_context: ssl.SSLContext
    config: Config | None
    grace: float
    ready: Callable[[str, int], None]
    stop: Any
    dispatch_auth_enabled: bool
    cluster: Any = None
    reuse_port: bool = False
    parent_fd: int | None = None
    draining: Callable[[], None] | None = None


CLUSTER_ADAPTERS = ("asyncio", "anyio", "gevent")
"""The adapters a mesh process can join a cluster on (`--redis`): asyncio's event loop, where
`redis.asyncio` runs, and gevent, where redis-py's blocking client runs on patched sockets
(see docs/scale-out.md for trio)."""


def serve(*, adapter: str, parts_factory: Callable[..., MeshParts], host: str, port: int,
          ssl_context: ssl.SSLContext, config: Config | None = None, grace: float = 10.0,
          ready: Callable[[str, int], None], stop: Any = None,
          dispatch_auth_enabled: bool = True, cluster: Any = None, reuse_port: bool = False,
          parent_fd: int | None = None, draining: Callable[[], None] | None = None) -> None:
    """Run one mesh on `adapter` until Ctrl-C / SIGTERM (or `stop`), then drain.

    `parts_factory(public_url)` makes the mesh's parts once the port is known. With
    `cluster` (a `mesh.cluster.ClusterSettings`) the process joins the other mesh processes
    on that Redis, and `parts_factory(public_url, events=bus)` is given the cluster's
    event bus; only the asyncio-based adapters can (`CLUSTER_ADAPTERS`).

    The `svantic mesh --workers` options: `reuse_port` listens with SO_REUSEPORT, so the
    workers share one port; `parent_fd` is a pipe whose end-of-file (the parent process
    exited, however it died) drains this one too, so no worker outlives its parent;
    `draining()` is called once the drain begins, whatever began it (the parent stops its
    workers then, in parallel with its own drain)."""
    if cluster is not None and adapter not in CLUSTER_ADAPTERS:
        raise ValueError(f"a {adapter} mesh cannot join a cluster: use one of "
                         f"{', '.join(CLUSTER_ADAPTERS)}")
    run = _Run(parts_factory, host, port, ssl_context, config, grace, ready, stop,
               dispatch_auth_enabled, cluster, reuse_port, parent_fd, draining)
    if adapter == "gevent":
        _serve_gevent(run)
        return
    import anyio

    backend = "trio" if adapter == "trio" else "asyncio"
    module = "anyio" if adapter in ("anyio", "trio") else "asyncio"
    anyio.run(_serve_async, module, run, backend=backend)


class _Late:
    """The server needs its callbacks before it listens; the parts need the port it got:
    the callbacks reach the parts (and the app) once they exist."""

    def __init__(self) -> None:
        self.parts: Any = None
        self.app: Any = None

    def verify_token(self, token: str) -> Any:
        return self.parts.verify_token(token)

    def lookup_instance(self, instance_id: str) -> Any:
        return self.parts.lookup_instance(instance_id)

    def mint(self, route: Any) -> Any:
        return self.parts.mint(route)

    def http_app(self, request: Any, responder: Any) -> Any:
        return self.app(request, responder)

    async def http_app_async(self, request: Any, responder: Any) -> None:
        await self.app(request, responder)

    def server_options(self, run: _Run, *, is_async: bool) -> dict[str, Any]:
        return {
            "ssl_context": run.ssl_context, "verify_token": self.verify_token,
            "lookup_instance": self.lookup_instance,
            "dispatch_auth": self.mint if run.dispatch_auth_enabled else None,
            "config": run.config,
            "http_app": self.http_app_async if is_async else self.http_app,
        }


async def _serve_async(module_name: str, run: _Run) -> None:
    import importlib

    import anyio

    module = importlib.import_module(f"svantic_adapters.{module_name}")
    late = _Late()
    options = late.server_options(run, is_async=True)
    cluster: Any = contextlib.nullcontext()
    if run.cluster is not None:
        from .cluster import ClusterBus, ClusterResumeStore, MeshCluster

        store = ClusterResumeStore(window=(run.config or Config()).resume_window)
        options["resume_store"] = store
        cluster = MeshCluster(run.cluster, store)
    server = module.MeshServer(**options)
    async with server:
        host, port = await server.start(run.host, run.port, reuse_port=run.reuse_port)
        if run.cluster is not None:
            parts = run.parts_factory(_public_url(host, port), events=ClusterBus())
        else:
            parts = run.parts_factory(_public_url(host, port))
        late.parts = parts
        mesh = AsyncMesh(parts)
        mesh.attach(server)
        late.app = mesh.http_app
        if run.cluster is not None:
            cluster.bind(parts, server, socket_outcome)
            parts.cluster = cluster
        async with mesh, cluster:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                # Ready only once a signal drains: whoever saw the ready line (a parent
                # process, a service manager) may send SIGTERM at once.
                run.ready(host, port)
                async with anyio.create_task_group() as group:
                    async def wait_signal() -> None:
                        async for signum in signals:
                            log.info("signal %s: draining (grace %s s)", signum, run.grace)
                            break
                        group.cancel_scope.cancel()

                    async def wait_stop() -> None:
                        if run.stop is None:
                            await anyio.sleep_forever()
                        await run.stop.wait()
                        group.cancel_scope.cancel()

                    async def wait_parent() -> None:
                        if run.parent_fd is None:
                            await anyio.sleep_forever()
                        else:
                            await _parent_gone_async(run.parent_fd, run.grace)
                        group.cancel_scope.cancel()

                    group.start_soon(wait_signal)
                    group.start_soon(wait_stop)
                    group.start_soon(wait_parent)
            if run.draining is not None:
                run.draining()
            mesh.end_streams()
            await server.close(run.grace)
        parts.registry.close()
        log.info("svantic mesh stopped")


def _serve_gevent(run: _Run) -> None:
    import gevent
    import gevent.event
    from svantic_adapters import gevent as adapter

    late = _Late()
    options = late.server_options(run, is_async=False)
    cluster: Any = None
    if run.cluster is not None:
        from .cluster import ClusterBus, ClusterResumeStore, MeshCluster

        store = ClusterResumeStore(window=(run.config or Config()).resume_window)
        options["resume_store"] = store
        cluster = MeshCluster(run.cluster, store, gevent=True)
    server = adapter.MeshServer(**options)
    host, port = server.start(run.host, run.port, reuse_port=run.reuse_port)
    if cluster is not None:
        parts = run.parts_factory(_public_url(host, port), events=ClusterBus())
    else:
        parts = run.parts_factory(_public_url(host, port))
    late.parts = parts
    mesh = GeventMesh(parts)
    late.app = mesh.http_app
    mesh.attach(server)
    mesh.start()
    if cluster is not None:
        cluster.bind(parts, server, socket_outcome)
        parts.cluster = cluster
        cluster.start()
    done = run.stop if run.stop is not None else gevent.event.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(signum, done.set)
    if run.parent_fd is not None:
        gevent.spawn(_parent_gone_gevent, run.parent_fd, done, run.grace)
    run.ready(host, port)
    done.wait()
    log.info("draining (grace %s s)", run.grace)
    if run.draining is not None:
        run.draining()
    mesh.end_streams()
    server.close(run.grace)
    if cluster is not None:
        cluster.stop()
    mesh.stop()
    parts.registry.close()
    log.info("svantic mesh stopped")


ORPHAN_MARGIN = 10
"""Seconds past the grace a worker whose parent is gone may take to drain before SIGALRM
ends it: nobody is left to stop it, so its drain must be bounded by itself."""


def _orphan_deadline(grace: float) -> None:
    """The parent is gone: drain, but be gone `grace` + `ORPHAN_MARGIN` s from now at the
    latest (SIGALRM's default action ends the process), whatever the drain waits for."""
    bound = math.ceil(grace) + ORPHAN_MARGIN
    log.info("parent process gone: draining (grace %s s, exit within %d s)", grace, bound)
    signal.alarm(bound)


async def _parent_gone_async(fd: int, grace: float) -> None:
    """Return once the parent's pipe reaches end-of-file (the parent exited)."""
    import anyio

    while True:
        await anyio.wait_readable(fd)
        if not os.read(fd, 4096):
            break
    _orphan_deadline(grace)


def _parent_gone_gevent(fd: int, done: Any, grace: float) -> None:
    """Set `done` once the parent's pipe reaches end-of-file (the parent exited)."""
    import gevent.socket

    while True:
        gevent.socket.wait_read(fd)
        if not os.read(fd, 4096):
            break
    _orphan_deadline(grace)
    done.set()


def _public_url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    if ":" in shown:
        shown = f"[{shown}]"
    return f"https://{shown}:{port}"


def make_parts(registry: Registry, public_url: str, home_secrets: dict[str, Any], *,
               dispatch_auth_enabled: bool = True, hosted_verify: ssl.SSLContext | bool = True,
               events: Any = None, **settings: Any) -> MeshParts:
    return MeshParts(registry, MeshSettings(
        public_url=public_url, token_secret=home_secrets["token_secret"],
        signing_secret=home_secrets["signing_secret"],
        dispatch_auth_enabled=dispatch_auth_enabled, hosted_verify=hosted_verify, **settings),
        events=events)
