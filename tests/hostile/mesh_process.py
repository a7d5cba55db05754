"""One reference mesh in a process of its own, for the hostile-input tests: TLS on 127.0.0.1,
an in-memory registry with two tenants' clients, and the bounds the tests want to reach
(small caps, short timeouts) given as JSON.

  python mesh_process.py FOLDER ADAPTER OPTIONS_JSON

FOLDER receives the local CA (`ca.pem`); ADAPTER is asyncio, trio or gevent; OPTIONS_JSON
holds `config` (fields of `svantic_proto.Config`) and the server's caps (`max_connections`,
`max_handshakes`, `max_http_connections`, `max_http_body_bytes`), and `forge_file`: a file
the test writes `{"case": NAME}` into to make this mesh a hostile one that sends the bad
dispatch-auth token NAME of test_bad_tokens.py with every dispatch (`{}`: honest again).
The dispatch-auth secret comes from SVANTIC_SIGNING_SECRET. Prints
`listening https://127.0.0.1:PORT` once it serves; stops (draining briefly) when stdin
closes.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

CLIENTS = (("client-a", "secret-a-0123456789abcdef", "tenant-a"),
           ("client-b", "secret-b-0123456789abcdef", "tenant-b"))
TOKEN_SECRET = b"hostile-token-secret-0123456789abcdef0123"


def main() -> int:
    folder, adapter, raw_options = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    if adapter == "gevent":
        from gevent import monkey

        monkey.patch_all()
    import logging
    import ssl

    import trustme
    from svantic_mesh.registry import SqliteRegistry

    from svantic_proto import Config

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options: dict[str, Any] = json.loads(raw_options)
    ca = trustme.CA(organization_name="svantic hostile tests CA")
    (folder / "ca.pem").write_bytes(ca.cert_pem.bytes())
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    registry = SqliteRegistry(":memory:", secret_key=os.urandom(32), scrypt_n=2**4)
    for client_id, secret, tenant in CLIENTS:
        registry.add_client(client_id, secret, tenant)
    secrets = {"token_secret": TOKEN_SECRET,
               "signing_secret": os.environ["SVANTIC_SIGNING_SECRET"].encode()}
    server_options: dict[str, Any] = {
        name: options[name] for name in ("max_connections", "max_handshakes",
                                         "max_http_connections", "max_http_body_bytes",
                                         "forge_file")
        if name in options}
    server_options["ssl_context"] = context
    server_options["config"] = Config(**options.get("config", {}))
    settings: dict[str, Any] = dict(options.get("settings", {}))
    if "router" in settings:
        from svantic_mesh.routing import RouterConfig

        settings["router"] = RouterConfig(**settings["router"])

    def announce(host: str, port: int) -> None:
        print(f"listening https://{host}:{port}", flush=True)

    if adapter == "gevent":
        _run_gevent(registry, secrets, settings, server_options, announce)
    else:
        import anyio

        anyio.run(_run_async, adapter, registry, (secrets, settings), server_options,
                  announce, backend="trio" if adapter == "trio" else "asyncio")
    registry.close()
    return 0


class _Late:
    """Callbacks the server needs before the parts (which need its port) exist."""

    parts: Any = None
    app: Any = None
    forge_file: str | None = None

    def verify_token(self, token: str) -> Any:
        return self.parts.verify_token(token)

    def lookup_instance(self, instance_id: str) -> Any:
        return self.parts.lookup_instance(instance_id)

    def mint(self, route: Any) -> Any:
        if self.forge_file is not None:
            wanted = json.loads(Path(self.forge_file).read_text(encoding="utf-8") or "{}")
            if "case" in wanted:
                from test_bad_tokens import forged_envelope

                from svantic_proto.frames import SvanticJwtAuth

                envelope = forged_envelope(wanted["case"], route,
                                           os.environ["SVANTIC_SIGNING_SECRET"].encode())
                return SvanticJwtAuth(token=envelope["token"])
        return self.parts.mint(route)


async def _run_async(adapter: str, registry: Any,
                     parts_options: tuple[dict[str, Any], dict[str, Any]],
                     server_options: dict[str, Any], announce: Any) -> None:
    secrets, settings = parts_options
    import importlib

    import anyio
    from svantic_mesh.app import AsyncMesh
    from svantic_mesh.serve import make_parts

    module = importlib.import_module(
        f"svantic_adapters.{'asyncio' if adapter == 'asyncio' else 'anyio'}")
    late = _Late()
    late.forge_file = server_options.pop("forge_file", None)

    async def http_app(request: Any, responder: Any) -> None:
        await late.app(request, responder)

    server = module.MeshServer(verify_token=late.verify_token,
                               lookup_instance=late.lookup_instance, dispatch_auth=late.mint,
                               http_app=http_app, **server_options)
    async with server:
        host, port = await server.start("127.0.0.1", 0)
        parts = late.parts = make_parts(registry, f"https://{host}:{port}", secrets, **settings)
        mesh = AsyncMesh(parts)
        mesh.attach(server)
        late.app = mesh.http_app
        async with mesh:
            announce(host, port)
            await anyio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
            mesh.end_streams()
            await server.close(1.0)


def _run_gevent(registry: Any, secrets: dict[str, Any], settings: dict[str, Any],
                server_options: dict[str, Any], announce: Any) -> None:
    import gevent
    from svantic_adapters import gevent as adapter
    from svantic_mesh.app import GeventMesh
    from svantic_mesh.serve import make_parts

    late = _Late()
    late.forge_file = server_options.pop("forge_file", None)

    def http_app(request: Any, responder: Any) -> Any:
        return late.app(request, responder)

    server = adapter.MeshServer(verify_token=late.verify_token,
                                lookup_instance=late.lookup_instance, dispatch_auth=late.mint,
                                http_app=http_app, **server_options)
    host, port = server.start("127.0.0.1", 0)
    parts = late.parts = make_parts(registry, f"https://{host}:{port}", secrets, **settings)
    mesh = GeventMesh(parts)
    late.app = mesh.http_app
    mesh.attach(server)
    mesh.start()
    announce(host, port)
    gevent.get_hub().threadpool.spawn(sys.stdin.read).get()
    mesh.end_streams()
    server.close(1.0)
    mesh.stop()


if __name__ == "__main__":
    sys.exit(main())
