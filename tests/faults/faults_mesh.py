"""One reference mesh in a process of its own, as `svantic mesh` runs it, for the fault tests.

It is `svantic mesh` (SQLite on disk, its files beside the database, a local CA) with what
the command line does not offer and the fault tests need: short timers (a `Config` given as
JSON) and the URL agents are told to dial (`connect_url`), so that their sockets go through
a fault proxy in front of the mesh. Prints `ready PORT` once it listens; SIGTERM drains it,
SIGKILL is a crash.

  python faults_mesh.py --db PATH [--port N] [--adapter A] [--public-url URL]
         [--config JSON] [--client ID:SECRET:TENANT]
  (SVANTIC_SIGNING_SECRET in the environment: the dispatch-auth secret agents verify with)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--adapter", default="asyncio")
    parser.add_argument("--public-url")
    parser.add_argument("--config", default="{}")
    parser.add_argument("--client", action="append", default=[])
    parser.add_argument("--grace", type=float, default=1.0)
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args()
    if args.adapter == "gevent":
        from gevent import monkey

        monkey.patch_all()
    from svantic_mesh.registry import SqliteRegistry
    from svantic_mesh.serve import MeshHome, make_parts, serve, server_context

    from svantic_proto import Config

    logging.basicConfig(level=getattr(logging, args.log_level), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    home = MeshHome.for_db(args.db)
    secrets = home.secrets()
    registry = SqliteRegistry(home.db, secret_key=secrets["encryption_key"])
    for spec in args.client:
        client_id, secret, tenant = spec.split(":")
        registry.add_client(client_id, secret, tenant)
    _, cert_file, key_file = home.certificate()
    config = Config(**json.loads(args.config))

    def parts_factory(public_url: str) -> Any:
        return make_parts(registry, args.public_url or public_url, secrets, config=config)

    def ready(host: str, port: int) -> None:
        print(f"ready {port}", flush=True)

    serve(adapter=args.adapter, parts_factory=parts_factory, host="127.0.0.1", port=args.port,
          ssl_context=server_context(cert_file, key_file), config=config, grace=args.grace,
          ready=ready)
    return 0


if __name__ == "__main__":
    sys.exit(main())
