"""The `svantic` command.

  svantic mesh   run the reference mesh (control plane, agents' sockets, dashboard) over TLS
  svantic call   call a capability through a mesh's `POST /agents/dispatch`
  svantic agent  run an agent (MODULE:ATTR, a svantic.Agent) against a mesh until Ctrl-C
  svantic demo   the whole story in one process: the mesh, a connected and a hosted agent,
                 dispatches, a tool call, a cut socket; real TLS on 127.0.0.1
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from svantic_proto import __version__

ADAPTERS = ("asyncio", "anyio", "trio", "gevent")
ENV_URL = "SVANTIC_URL"
ENV_CLIENT_ID = "SVANTIC_CLIENT_ID"
ENV_CLIENT_SECRET = "SVANTIC_CLIENT_SECRET"
ENV_CA = "SVANTIC_CA_FILE"


def _client_spec(text: str) -> tuple[str, str, str]:
    parts = text.split(":")
    if len(parts) != 3 or not all(parts):
        raise argparse.ArgumentTypeError("expected ID:SECRET:TENANT")
    return parts[0], parts[1], parts[2]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="svantic", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"svantic-proto {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    mesh = commands.add_parser("mesh", help="run the reference mesh over TLS")
    mesh.add_argument("--host", default="127.0.0.1")
    mesh.add_argument("--port", type=int, default=8443)
    mesh.add_argument("--certfile", help="PEM certificate chain (default: a local CA's)")
    mesh.add_argument("--keyfile", help="PEM private key of --certfile")
    mesh.add_argument("--db", "--database", dest="db", default="svantic-mesh.db",
                      help="SQLite file (or :memory:), or a postgresql:// URL (several "
                      "processes); secrets and the local CA live beside the file, or in --home")
    mesh.add_argument("--home", help="folder for the secrets and the local CA (default: beside "
                      "the SQLite file; the current folder for a URL)")
    mesh.add_argument("--redis", metavar="URL",
                      help="join the other mesh processes on this Redis (scale-out; the "
                      "asyncio, anyio and gevent adapters; see docs/scale-out.md)")
    mesh.add_argument("--cluster-prefix", default="svantic",
                      help="prefix of the cluster's Redis keys (one per mesh)")
    mesh.add_argument("--workers", type=int, default=1, metavar="N",
                      help="N mesh processes on one --port (SO_REUSEPORT, Linux), joined "
                      "on --redis; stopping this one stops them all")
    mesh.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    mesh.add_argument("--client", action="append", type=_client_spec, default=[],
                      metavar="ID:SECRET:TENANT", help="an API client (repeatable)")
    mesh.add_argument("--policy", choices=("open", "allow-list", "audit"), default=None,
                      help="registration policy of the clients' tenants")
    mesh.add_argument("--adapter", choices=ADAPTERS, default="asyncio")
    mesh.add_argument("--grace", type=float, default=10.0,
                      help="seconds agents get to finish on Ctrl-C")
    mesh.add_argument("--no-dispatch-auth", action="store_true",
                      help="send dispatches without spec 7 envelopes (agents must agree)")
    mesh.add_argument("--trust-ca", help="CA file to trust for hosted agents' HTTPS")

    call = commands.add_parser("call", help="call a capability through a mesh")
    call.add_argument("capability")
    call.add_argument("arguments", nargs="?", default="{}", help="JSON object")
    call.add_argument("--agent-type")
    call.add_argument("--instance")
    call.add_argument("--stream", action="store_true", help="print chunks as they arrive")
    call.add_argument("--deadline-ms", type=int)
    call.add_argument("--url", default=os.environ.get(ENV_URL, "https://127.0.0.1:8443"),
                      help=f"the mesh (env {ENV_URL})")
    call.add_argument("--client-id", default=os.environ.get(ENV_CLIENT_ID),
                      help=f"env {ENV_CLIENT_ID}")
    call.add_argument("--client-secret", default=os.environ.get(ENV_CLIENT_SECRET),
                      help=f"env {ENV_CLIENT_SECRET}")
    call.add_argument("--ca", default=os.environ.get(ENV_CA),
                      help=f"CA file that signed the mesh's certificate (env {ENV_CA})")

    # `svantic agent` parses its own arguments (svantic.cli); listed here for `svantic --help`.
    commands.add_parser("agent", add_help=False,
                        help="run an agent (MODULE:ATTR) against a mesh (svantic agent --help)")

    demo = commands.add_parser("demo", help="mesh + connected and hosted agents + dispatches "
                               "over TLS on 127.0.0.1")
    demo.add_argument("--adapter", choices=("asyncio", "anyio", "gevent"), default="asyncio")
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    if arguments[:1] == ["agent"]:
        return agent(arguments[1:])
    args = _parser().parse_args(arguments)
    if args.command == "demo":
        from . import demo as demo_command  # patches for gevent before the SDK loads

        return demo_command.main(["--adapter", args.adapter])
    if args.command == "call":
        return call(args)
    return mesh(args)


def agent(argv: list[str]) -> int:
    """`svantic agent ...`: the agent SDK's command (`svantic.cli`), loaded only when asked for.

    gevent must patch the standard library before anything imports `ssl` or `socket`, the
    SDK included, so `--adapter gevent` is honoured here, before the SDK loads (not in the
    `--reload` supervisor: it runs no agent, its child does)."""
    if _wants_gevent(argv) and "--reload" not in argv:
        from gevent import monkey

        monkey.patch_all()
    from svantic import cli as agent_cli

    return agent_cli.main(argv)


def _wants_gevent(argv: list[str]) -> bool:
    for index, arg in enumerate(argv):
        if arg == "--adapter" and argv[index + 1:index + 2] == ["gevent"]:
            return True
        if arg == "--adapter=gevent":
            return True
    return False


def _workers_refused(args: argparse.Namespace) -> str | None:
    """Why `--workers` cannot run as given (before anything is made), or None."""
    if args.workers < 1:
        return "--workers must be 1 or more"
    if args.workers == 1:
        return None
    if not args.redis:
        return ("--workers N needs --redis URL: the workers share their agents and "
                "dispatches through it (see docs/scale-out.md)")
    if args.port == 0:
        return "--workers needs a known --port (not 0): every worker listens on that one port"
    if args.db == ":memory:":
        return "--workers needs a database file or URL (not :memory:): the workers share it"
    return None


def mesh(args: argparse.Namespace, out: Callable[[str], None] = print) -> int:
    if args.redis and args.adapter not in ("asyncio", "anyio", "gevent"):  # CLUSTER_ADAPTERS
        print(f"svantic mesh: --redis needs the asyncio, anyio (on asyncio) or gevent adapter: "
              f"a {args.adapter} mesh stays one process (see docs/scale-out.md)",
              file=sys.stderr)
        return 2
    refused = _workers_refused(args)
    if refused is not None:
        print(f"svantic mesh: {refused}", file=sys.stderr)
        return 2
    if args.adapter == "gevent":
        from gevent import monkey

        monkey.patch_all()
    import ssl

    from .registry import open_registry
    from .serve import (
        DEV_CLIENT,
        DEV_TENANT,
        ENV_SIGNING_SECRET,
        MeshHome,
        make_parts,
        serve,
        server_context,
    )

    tag = ""
    if args.worker is not None or args.workers > 1:
        tag = f" [worker {args.worker or 1}]"
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s %(name)s{tag}: %(message)s")
    if bool(args.certfile) != bool(args.keyfile):
        print("svantic mesh: --certfile and --keyfile go together", file=sys.stderr)
        return 2
    cluster = None
    if args.redis:
        from .cluster import ClusterSettings

        cluster = ClusterSettings(redis_url=args.redis, prefix=args.cluster_prefix)
    is_url = "://" in args.db
    if is_url or args.home:
        folder = Path(args.home or ".").expanduser().resolve()
        folder.mkdir(parents=True, exist_ok=True)
        home = MeshHome(":memory:" if is_url else args.db, folder)
        db = args.db
    else:
        home = MeshHome.for_db(args.db)
        db = home.db
    secrets = home.secrets()
    registry = open_registry(db, secret_key=secrets["encryption_key"])
    clients = list(args.client)
    if not clients:
        clients = [(DEV_CLIENT, secrets["dev_secret"], DEV_TENANT)]
        out(f"development client: id {DEV_CLIENT}  secret {secrets['dev_secret']}  "
            f"tenant {DEV_TENANT}")
    if ENV_SIGNING_SECRET not in os.environ:  # agents need it to verify dispatch auth
        out(f"dispatch-auth secret for agents ({ENV_SIGNING_SECRET}): \"signing_secret\" "
            f"in {home.secrets_file}")
    for client_id, secret, tenant in clients:
        registry.add_client(client_id, secret, tenant)
        if args.policy is not None:
            registry.set_policy_mode(tenant, args.policy)
    if args.certfile:
        context = server_context(args.certfile, args.keyfile)
    else:
        ca_file, cert_file, key_file = home.certificate()
        context = server_context(cert_file, key_file)
        out(f"local CA (trust it in clients): {ca_file}")
    hosted_verify: ssl.SSLContext | bool = True
    if args.trust_ca:
        hosted_verify = ssl.create_default_context(cafile=args.trust_ca)

    def parts_factory(public_url: str, events: Any = None) -> Any:
        return make_parts(registry, public_url, secrets,
                          dispatch_auth_enabled=not args.no_dispatch_auth,
                          hosted_verify=hosted_verify, events=events)

    def announce(host: str, port: int) -> None:
        url = f"https://{host}:{port}"
        out(f"svantic mesh listening on {url} (dashboard: {url}/dashboard)")
        sys.stdout.flush()

    # Every file beside the database exists by now (secrets, CA, the database itself): the
    # workers only read them, so starting them here, not earlier, is what keeps this race-free.
    pool = _Workers(args, out) if args.workers > 1 else None
    ready: Callable[[str, int], None] = announce if pool is None else pool.ready(announce)
    try:
        if pool is not None:
            pool.start()
        serve(adapter=args.adapter, parts_factory=parts_factory, host=args.host, port=args.port,
              ssl_context=context, grace=args.grace, ready=ready,
              dispatch_auth_enabled=not args.no_dispatch_auth, cluster=cluster,
              reuse_port=args.workers > 1 or args.worker is not None,
              parent_fd=sys.stdin.fileno() if args.worker is not None else None,
              draining=pool.terminate if pool is not None else None)
    except OSError as exc:
        print(f"svantic mesh: cannot listen on {args.host}:{args.port}: {exc.strerror}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if pool is not None:
            pool.stop()
    return 1 if pool is not None and pool.failed else 0


class _Workers:
    """The other `svantic mesh --workers` processes, started and stopped by this one.

    Each worker runs this command again with the same flags on the same port (all with
    SO_REUSEPORT) and `--worker I`, in a process group of its own (a Ctrl-C at the terminal
    reaches this process alone, which then stops every worker once, with SIGTERM). Its stdin
    is a pipe from this process: it drains and exits at that pipe's end-of-file, which comes
    however this process ends, SIGKILL included, so no worker is orphaned. Its stdout is read
    here for its ready line; its log goes to this process's stderr, tagged `[worker I]`."""

    START_TIMEOUT = 60.0
    """Seconds the workers get to be listening (and joined on Redis) before the mesh gives up."""

    def __init__(self, args: argparse.Namespace, out: Callable[[str], None]) -> None:
        import threading

        self.args = args
        self.out = out
        self.procs: dict[int, Any] = {}
        self.listening: dict[int, threading.Event] = {}
        self.failed = False
        self._stopping = threading.Event()
        self._log = logging.getLogger("svantic.mesh.workers")

    def argv(self, index: int) -> list[str]:
        args = self.args
        argv = [sys.executable, "-m", "svantic_mesh.cli", "mesh", "--host", args.host,
                "--port", str(args.port), "--db", args.db, "--redis", args.redis,
                "--cluster-prefix", args.cluster_prefix, "--adapter", args.adapter,
                "--grace", repr(args.grace), "--worker", str(index)]
        for flag, value in (("--home", args.home), ("--certfile", args.certfile),
                            ("--keyfile", args.keyfile), ("--policy", args.policy),
                            ("--trust-ca", args.trust_ca)):
            if value is not None:
                argv += [flag, value]
        for client in args.client:
            argv += ["--client", ":".join(client)]
        if args.no_dispatch_auth:
            argv.append("--no-dispatch-auth")
        return argv

    def start(self) -> None:
        import subprocess
        import threading

        for index in range(2, self.args.workers + 1):
            proc = subprocess.Popen(self.argv(index), stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True, process_group=0)
            self.procs[index] = proc
            self.listening[index] = threading.Event()
            self._log.info("worker %d started (pid %d)", index, proc.pid)
            threading.Thread(target=self._watch, args=(index, proc), daemon=True,
                             name=f"svantic-worker-{index}").start()

    def _watch(self, index: int, proc: Any) -> None:
        """Read the worker's stdout (its ready line, then to the end), then its exit."""
        for line in proc.stdout:
            if line.startswith("svantic mesh listening on "):
                self.listening[index].set()
        code = proc.wait()
        if self._stopping.is_set():
            self._log.info("worker %d stopped (exit code %s)", index, code)
        else:
            self._log.warning("worker %d exited on its own (exit code %s): the others go on",
                              index, code)

    def ready(self, announce: Callable[[str, int], None]) -> Callable[[str, int], None]:
        """The `ready` of this process: the ready line once every worker listens too."""
        import threading

        def wait_all(host: str, port: int) -> None:
            import time

            deadline = time.monotonic() + self.START_TIMEOUT
            for index, proc in self.procs.items():
                while not self.listening[index].wait(0.1):
                    if self._stopping.is_set():
                        return
                    if proc.poll() is not None or time.monotonic() > deadline:
                        self._log.error("worker %d did not start listening: stopping the mesh",
                                        index)
                        self.failed = True
                        import signal

                        os.kill(os.getpid(), signal.SIGTERM)
                        return
            self._log.info("all %d workers listening on port %d", self.args.workers, port)
            announce(host, port)

        def ready(host: str, port: int) -> None:
            threading.Thread(target=wait_all, args=(host, port), daemon=True,
                             name="svantic-workers-ready").start()

        return ready

    def terminate(self) -> None:
        """Begin every worker's drain (once): SIGTERM, as a service manager would."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        import signal

        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        """Stop every worker and wait for it: its grace, then a bound, then SIGKILL."""
        import subprocess

        self.terminate()
        for index, proc in self.procs.items():
            try:
                proc.wait(self.args.grace + 10.0)
            except subprocess.TimeoutExpired:
                self._log.warning("worker %d did not stop in time: killed", index)
                proc.kill()
                proc.wait(10.0)
            if proc.stdin is not None:
                proc.stdin.close()


def call(args: argparse.Namespace, out: Callable[[str], None] = print) -> int:
    """Get a token, call `/agents/dispatch`, print chunks as they arrive and the result."""
    import httpx

    try:
        arguments = json.loads(args.arguments)
    except json.JSONDecodeError as exc:
        print(f"svantic call: the arguments are not JSON: {exc.msg}", file=sys.stderr)
        return 2
    if not isinstance(arguments, dict):
        print("svantic call: the arguments must be a JSON object", file=sys.stderr)
        return 2
    if not args.client_id or not args.client_secret:
        print(f"svantic call: give --client-id and --client-secret (or {ENV_CLIENT_ID} and "
              f"{ENV_CLIENT_SECRET})", file=sys.stderr)
        return 2
    verify: Any = True
    if args.ca:
        import ssl

        if not Path(args.ca).exists():
            print(f"svantic call: no CA file {args.ca}", file=sys.stderr)
            return 2
        verify = ssl.create_default_context(cafile=args.ca)
    body: dict[str, Any] = {"capability": args.capability, "arguments": arguments}
    for key, value in (("agent_type", args.agent_type), ("instance_id", args.instance),
                       ("deadline_ms", args.deadline_ms)):
        if value is not None:
            body[key] = value
    base = args.url.rstrip("/")
    try:
        with httpx.Client(verify=verify, timeout=httpx.Timeout(10.0, read=None),
                          trust_env=False) as client:
            answer = client.post(f"{base}/auth/token", json={
                "client_id": args.client_id, "client_secret": args.client_secret})
            if answer.status_code != 200:
                return _failed(answer.status_code, answer.content)
            token = answer.json()["access_token"]
            headers = {"authorization": f"Bearer {token}"}
            if not args.stream:
                answer = client.post(f"{base}/agents/dispatch", json=body, headers=headers)
                if answer.status_code != 200:
                    return _failed(answer.status_code, answer.content)
                out(json.dumps(answer.json()["result"]))
                return 0
            headers["accept"] = "text/event-stream"
            with client.stream("POST", f"{base}/agents/dispatch", json=body,
                               headers=headers) as answer:
                if answer.status_code != 200:
                    return _failed(answer.status_code, answer.read())
                return _print_stream(answer.iter_lines(), out)
    except httpx.HTTPError as exc:
        print(f"svantic call: {base}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def _print_stream(lines: Any, out: Callable[[str], None]) -> int:
    event, data = "message", []
    for line in lines:
        if line.startswith(":"):
            continue
        if line:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
            continue
        if not data:
            continue
        document = json.loads("\n".join(data))
        if event == "chunk":
            out(f"chunk {document.get('seq')}: {json.dumps(document.get('data'))}")
        elif event == "result":
            out(json.dumps(document.get("result")))
            return 0
        elif event == "error":
            error = document.get("error", {})
            print(f"svantic call: {error.get('code')}: {error.get('message')}", file=sys.stderr)
            return 1
        event, data = "message", []
    print("svantic call: the stream ended without a result", file=sys.stderr)
    return 1


def _failed(status: int, body: bytes) -> int:
    try:
        error = json.loads(body)["error"]
        text = f"{error['code']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        text = "(no error body)"
    print(f"svantic call: HTTP {status} {text}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
