"""`svantic agent MODULE:ATTR`: run an agent from a module against a mesh, until Ctrl-C.

What an agent author runs while writing an agent, and what a deployment runs: import
`MODULE`, take its `ATTR` (a `svantic.Agent`), connect it with a `MeshConnector`, log one
line per connection state change and per dispatch (capability, outcome, milliseconds), and
on Ctrl-C or SIGTERM disconnect (deregister) before exiting. `--reload` adds a supervising
parent that restarts the agent's process when the module's file changes.

`svantic_mesh.cli` (the `svantic` command) hands `svantic agent ...` here, after
monkey-patching for gevent when `--adapter gevent` asks for it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["main"]

log = logging.getLogger("svantic.cli")

ENV_URL = "SVANTIC_URL"
ENV_CLIENT_ID = "SVANTIC_CLIENT_ID"
ENV_CLIENT_SECRET = "SVANTIC_CLIENT_SECRET"
ENV_INSTANCE_ID = "SVANTIC_INSTANCE_ID"
ENV_CA = "SVANTIC_CA_FILE"
ENV_SIGNING_SECRET = "SVANTIC_SIGNING_SECRET"
DEFAULT_URL = "https://127.0.0.1:8443"
"""Where `svantic mesh` listens by default, as `svantic call` assumes too."""
ADAPTERS = ("asyncio", "anyio", "trio", "gevent")
RELOAD_POLL = 1.0
"""Seconds between two looks at the watched files' modification times."""
CHILD_STOP_WAIT = 15.0
"""Seconds a stopped agent process gets to deregister before it is killed."""

_DESCRIPTION = __doc__.split("\n\n")[1] if __doc__ else ""
_EPILOG = f"""\
MODULE:ATTR is imported with the current directory first on the module path, so
`svantic agent examples.demo_agent:agent` works from a checkout's root. ATTR may be dotted.

Credentials: --client-id and --client-secret (exchanged for a token, renewed before it
expires), or a ready --token. Environment fallbacks: {ENV_URL}, {ENV_CLIENT_ID},
{ENV_CLIENT_SECRET}, {ENV_INSTANCE_ID}, {ENV_CA}, and
{ENV_SIGNING_SECRET} (the mesh's dispatch-auth secret: every dispatch's envelope is
verified with it).

--reload: a parent process starts the agent in a child process and polls the modification
time of the module's file (every .py file of it, for a package) once a second; on a change it
stops the child (which deregisters) and starts a new one. A child that fails is restarted
after the next change; one that stops cleanly (a signal) stops the supervisor too. For
development: it needs no extra dependency, and costs a poll.

Logs go to stderr: one line per connection state change, and one per dispatch:
`dispatch CAPABILITY OUTCOME MS ms` (OUTCOME is `ok` or the error code)."""


class UsageError(Exception):
    """A mistake on the command line: one line on stderr and exit status 2, no traceback."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """argparse's errors as one line, like every other usage error here."""
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="svantic agent", description=_DESCRIPTION, epilog=_EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("target", metavar="MODULE:ATTR",
                        help="the module to import and its svantic.Agent, e.g. app.agents:agent")
    parser.add_argument("--url", metavar="URL",
                        help=f"the mesh (env {ENV_URL}; default {DEFAULT_URL})")
    parser.add_argument("--client-id", metavar="ID", help=f"API client id (env {ENV_CLIENT_ID})")
    parser.add_argument("--client-secret", metavar="SECRET",
                        help=f"API client secret (env {ENV_CLIENT_SECRET})")
    parser.add_argument("--token", metavar="JWT",
                        help="a ready transport JWT instead of client credentials")
    parser.add_argument("--instance-id", metavar="ID",
                        help=f"this instance's id (env {ENV_INSTANCE_ID}; default hostname-port "
                             "or hostname-pid)")
    parser.add_argument("--cafile", metavar="FILE",
                        help=f"CA file that signed the mesh's certificate (env {ENV_CA}; "
                             "default: the system's trust store)")
    parser.add_argument("--adapter", choices=ADAPTERS, default="asyncio",
                        help="the I/O the agent runs on (trio: the anyio adapter on trio)")
    hosted = parser.add_argument_group("hosted mode (the mesh POSTs dispatches to the agent)")
    hosted.add_argument("--hosted", action="store_true", help="register in hosted mode")
    hosted.add_argument("--public-url", metavar="URL",
                        help="where the mesh reaches this agent (https://...)")
    hosted.add_argument("--listen", metavar="HOST:PORT", help="where to serve /send")
    hosted.add_argument("--certfile", metavar="FILE",
                        help="PEM certificate chain to serve HTTPS with")
    hosted.add_argument("--keyfile", metavar="FILE", help="PEM private key of --certfile")
    parser.add_argument("--reload", action="store_true",
                        help="restart when the module's file changes (polled once a second, "
                             "in a supervising parent process): for development")
    return parser


@dataclass
class Settings:
    """The command line, checked, with the environment's fallbacks applied."""

    module: str
    attr: str
    adapter: str
    reload: bool
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of `svantic.MeshConnector` (besides the agent and the adapter)."""


def _env(value: str | None, name: str) -> str | None:
    return value if value else (os.environ.get(name) or None)


def settings_from(args: argparse.Namespace) -> Settings:
    """Check what was given and resolve the fallbacks; raises `UsageError`."""
    module, sep, attr = args.target.partition(":")
    names_ok = all(part.isidentifier() for part in module.split(".")) and all(
        part.isidentifier() for part in attr.split("."))
    if not sep or not names_ok:
        raise UsageError(f"{args.target!r} is not MODULE:ATTR (say examples.demo_agent:agent)")
    client_id = _env(args.client_id, ENV_CLIENT_ID)
    client_secret = _env(args.client_secret, ENV_CLIENT_SECRET)
    if args.token and (args.client_id or args.client_secret):
        raise UsageError("give --token or --client-id/--client-secret, not both")
    options: dict[str, Any] = {"svantic_url": _env(args.url, ENV_URL) or DEFAULT_URL}
    if args.token:
        options["token"] = args.token
    elif client_id and client_secret:
        options.update(client_id=client_id, client_secret=client_secret)
    else:
        raise UsageError(f"no credentials: give --client-id and --client-secret (or "
                         f"{ENV_CLIENT_ID} and {ENV_CLIENT_SECRET}), or --token")
    instance_id = _env(args.instance_id, ENV_INSTANCE_ID)
    if instance_id:
        options["instance_id"] = instance_id
    cafile = _env(args.cafile, ENV_CA)
    if cafile:
        if not Path(cafile).is_file():
            raise UsageError(f"no CA file {cafile}")
        options["cafile"] = cafile
    signing = os.environ.get(ENV_SIGNING_SECRET)
    if signing:
        options["signing_secret"] = signing
    hosted_flags = [name for name in ("public_url", "listen", "certfile", "keyfile")
                    if getattr(args, name)]
    if args.hosted:
        if not args.public_url or not args.listen:
            raise UsageError("--hosted needs --public-url and --listen HOST:PORT")
        if bool(args.certfile) != bool(args.keyfile):
            raise UsageError("--certfile and --keyfile go together")
        options.update(deployment_mode="hosted", public_url=args.public_url,
                       listen=_host_port(args.listen))
        if args.certfile:
            options.update(certfile=args.certfile, keyfile=args.keyfile)
    elif hosted_flags:
        flags = ", ".join("--" + name.replace("_", "-") for name in hosted_flags)
        raise UsageError(f"{flags} only apply with --hosted")
    return Settings(module, attr, args.adapter, args.reload, options)


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise UsageError(f"--listen {text!r} is not HOST:PORT (say 127.0.0.1:9000)")
    return host, int(port)


# -- loading the agent ---------------------------------------------------------------------------

def _on_path() -> None:
    """The current directory first on the module path, as `python -m` would have it: a
    project's modules import from its root whichever way `svantic` was installed."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def _find(module: str) -> Any:
    """The module's spec, without running it (its parent packages do run)."""
    _on_path()
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError as exc:
        raise UsageError(f"no module {exc.name!r} (looked in {os.getcwd()} and the "
                         "installed packages)") from None
    except ValueError:
        spec = None
    if spec is None:
        raise UsageError(f"no module {module!r} (looked in {os.getcwd()} and the installed "
                         "packages)")
    return spec


def load_agent(module_name: str, attr: str) -> Any:
    """Import `module_name` and return its `attr`, which must be a `svantic.Agent`.

    A missing module or attribute is a `UsageError`; an exception raised by the module's own
    code while it imports is not, and propagates (with the traceback its author needs)."""
    import svantic

    _find(module_name)
    module = importlib.import_module(module_name)
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise UsageError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not isinstance(target, svantic.Agent):
        raise UsageError(f"{module_name}:{attr} is a {type(target).__name__}, "
                         "not a svantic.Agent")
    return target


def watched_files(module_name: str) -> list[Path]:
    """The files whose change restarts the agent: the module's, or its package's .py files."""
    spec = _find(module_name)
    origin = spec.origin if spec.has_location else None
    if origin is None:
        raise UsageError(f"module {module_name!r} has no file to watch")
    path = Path(origin)
    if spec.submodule_search_locations:  # a package: all of it
        return sorted(path.parent.rglob("*.py"))
    return [path]


# -- logging what happens ------------------------------------------------------------------------

def _cancelled_types() -> tuple[type[BaseException], ...]:
    """What a handler sees when its dispatch is cancelled, on whichever loop is loaded."""
    import asyncio

    kinds: list[type[BaseException]] = [asyncio.CancelledError]
    for module_name, name in (("trio", "Cancelled"), ("greenlet", "GreenletExit")):
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, name):
            kinds.append(getattr(module, name))
    return tuple(kinds)


def _outcome(exc: BaseException) -> str:
    from svantic_proto.capabilities import handler_outcome

    if isinstance(exc, _cancelled_types()):
        return "CANCELLED"
    return handler_outcome(exc)[0]


def _log_dispatch(capability: str, outcome: str, started: float) -> None:
    log.info("dispatch %s %s %.1f ms", capability, outcome,
             (time.perf_counter() - started) * 1000.0)


def _timed(name: str, handler: Callable[..., Any]) -> Callable[..., Any]:
    """`handler`, logging how each call ended; async stays async and plain stays plain, so
    the SDK runs it as it would have run the original (a worker thread for plain ones)."""
    import functools

    call = getattr(handler, "__call__", None)  # noqa: B004  # an object with async __call__
    if inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(call):
        @functools.wraps(handler)
        async def timed_async(args: Any, ctx: Any) -> Any:
            started = time.perf_counter()
            try:
                result = await handler(args, ctx)
            except BaseException as exc:
                _log_dispatch(name, _outcome(exc), started)
                raise
            _log_dispatch(name, _returned(ctx), started)
            return result

        return timed_async

    @functools.wraps(handler)
    def timed(args: Any, ctx: Any) -> Any:
        started = time.perf_counter()
        try:
            result = handler(args, ctx)
        except BaseException as exc:
            _log_dispatch(name, _outcome(exc), started)
            raise
        _log_dispatch(name, _returned(ctx), started)
        return result

    return timed


def _returned(ctx: Any) -> str:
    """A handler that returned after its dispatch was cancelled (or its deadline passed)
    answered no one: the mesh had already ended the dispatch."""
    return "CANCELLED" if getattr(ctx, "cancelled", False) else "ok"


def observe_dispatches(agent: Any) -> None:
    """One log line per dispatch: the handlers, wrapped and defined again (so the agent
    treats each wrapper as it treated the handler), and the registry's refusals (unknown
    capability, invalid arguments), which no handler sees."""
    for name, spec in list(agent.capabilities.items()):
        agent.define_capability(name, spec.description, spec.parameters,
                                _timed(name, agent.handler(name)))
    registry = agent.registry
    resolve = registry.resolve

    def resolve_logged(event: Any) -> Any:
        started = time.perf_counter()
        capability, refusal = resolve(event)
        if refusal is not None:
            _log_dispatch(event.capability, refusal[0], started)
        return capability, refusal

    registry.resolve = resolve_logged


def _describe(agent: Any, settings: Settings) -> str:
    names = ", ".join(agent.capabilities) or "no capabilities"
    return (f"agent {agent.agent_type!r} from {settings.module}:{settings.attr} ({names}) "
            f"on {settings.adapter}")


# -- running -------------------------------------------------------------------------------------

def _connector(agent: Any, settings: Settings) -> Any:
    """The agent's `MeshConnector`; options that cannot work together are a usage error."""
    import svantic

    adapter = {"trio": "anyio"}.get(settings.adapter, settings.adapter)
    try:
        return svantic.MeshConnector(agent, adapter=adapter, **settings.options)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


class ConnectFailed(Exception):
    """The mesh refused the agent or could not be reached: one line, exit status 1."""


def _connect_failed(exc: Exception) -> ConnectFailed:
    return ConnectFailed(f"cannot connect: {type(exc).__name__}: {exc}")


def run_async(agent: Any, settings: Settings) -> int:
    """Connect, wait for SIGINT or SIGTERM, disconnect (deregister): on asyncio, or on trio
    through the anyio adapter. The connector logs each change of the connection's state."""
    import anyio
    import httpx
    import svantic

    connector = _connector(agent, settings)

    async def serve() -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            try:
                await connector.connect()
            except (svantic.SvanticApiError, httpx.HTTPError, OSError, TimeoutError) as exc:
                raise _connect_failed(exc) from None
            try:
                async for signum in signals:
                    log.info("%s: disconnecting", signal.Signals(signum).name)
                    break
            finally:
                with anyio.CancelScope(shield=True):
                    await connector.disconnect()

    log.info("starting %s", _describe(agent, settings))
    anyio.run(serve, backend="trio" if settings.adapter == "trio" else "asyncio")
    return 0


def run_gevent(agent: Any, settings: Settings) -> int:
    """`run_async` on gevent: the connector's methods block this greenlet, not the hub."""
    import gevent
    import gevent.event
    import httpx
    import svantic

    connector = _connector(agent, settings)
    done = gevent.event.Event()
    received: list[int] = []

    def stop(signum: int) -> None:
        received.append(signum)
        done.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(signum, stop, signum)
    log.info("starting %s", _describe(agent, settings))
    try:
        connector.connect()
    except (svantic.SvanticApiError, httpx.HTTPError, OSError, TimeoutError) as exc:
        raise _connect_failed(exc) from None
    try:
        done.wait()
        log.info("%s: disconnecting", signal.Signals(received[0]).name if received else "stop")
    finally:
        connector.disconnect()
    return 0


def run(settings: Settings) -> int:
    agent = load_agent(settings.module, settings.attr)
    observe_dispatches(agent)
    if settings.adapter == "gevent":
        return run_gevent(agent, settings)
    return run_async(agent, settings)


# -- --reload ------------------------------------------------------------------------------------

def _mtimes(files: Sequence[Path]) -> dict[Path, float | None]:
    stamps: dict[Path, float | None] = {}
    for path in files:
        try:
            stamps[path] = path.stat().st_mtime_ns
        except OSError:
            stamps[path] = None  # removed (an editor saving by rename, say): a change too
    return stamps


class _Stop(Exception):
    """SIGTERM to the supervisor: stop the child and exit, as Ctrl-C does."""


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stop


def _stop_child(child: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the agent deregisters), a bounded wait, then SIGKILL."""
    if child.poll() is not None:
        return
    child.send_signal(signal.SIGTERM)
    try:
        child.wait(CHILD_STOP_WAIT)
    except subprocess.TimeoutExpired:
        log.warning("agent process %s did not stop in %s s: killed", child.pid, CHILD_STOP_WAIT)
        child.kill()
        child.wait()


def supervise(settings: Settings, argv: Sequence[str]) -> int:
    """Run the agent in a child process; restart it when a watched file changes."""
    files = watched_files(settings.module)
    command = [sys.executable, "-m", "svantic_mesh.cli", "agent",
               *(arg for arg in argv if arg != "--reload")]
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    log.info("reloading on changes to %s (polled every %s s)",
             ", ".join(str(path) for path in files), RELOAD_POLL)
    stamps = _mtimes(files)
    child = subprocess.Popen(command)
    reported = False
    try:
        while True:
            time.sleep(RELOAD_POLL)
            now = _mtimes(files)
            changed = [path for path in files if now[path] != stamps[path]]
            if changed:
                stamps = now
                log.info("%s changed: restarting the agent", ", ".join(p.name for p in changed))
                _stop_child(child)
                child = subprocess.Popen(command)
                reported = False
            elif child.poll() == 0:  # stopped by a signal of its own (Ctrl-C, SIGTERM)
                log.info("the agent process stopped: so does the supervisor")
                break
            elif child.poll() is not None and not reported:
                log.info("the agent process exited with status %s: waiting for a change",
                         child.returncode)
                reported = True
    except (KeyboardInterrupt, _Stop):
        log.info("stopping the agent process")
    finally:
        _stop_child(child)
        signal.signal(signal.SIGTERM, previous)
    return 0


# -- the command ---------------------------------------------------------------------------------

def _logging() -> None:
    """INFO to stderr: the connector's state changes (`svantic.sdk`) and the dispatches
    (`svantic.cli`). The transport's own account of the same changes (`svantic.agent`) and
    httpx's line per request would say each thing twice: their warnings still show."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("svantic.agent", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """`svantic agent ...` (`argv` without the word `agent`); returns the exit status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(arguments)
    try:
        settings = settings_from(args)
        _logging()
        if settings.reload:
            return supervise(settings, arguments)
        return run(settings)
    except UsageError as exc:
        print(f"svantic agent: {exc}", file=sys.stderr)
        return 2
    except ConnectFailed as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
