"""Real Redis and PostgreSQL servers for the tests, started once per test run.

The scale-out tests run against the servers users run, never against fakes: Debian's
`redis-server` and PostgreSQL's own binaries, on 127.0.0.1 with ports picked free at start.
`tests/conftest.py` offers the fixtures to every test, so a test just names them:

* `redis_server`: one `redis-server` for the session (nothing saved to disk). Its `.url` is the
  address to give a client; `stop()` and `start()` kill it and bring it back on the SAME port, for
  the tests of what happens while Redis is away; `flush()` empties it between tests.
* `postgres_server`: one PostgreSQL cluster for the session, initialised in a temporary directory,
  with durability switched off (fsync, synchronous commit: a test run needs no crash safety).
  `stop()` / `start()` as for Redis; `create_database()` makes a new empty database.
* `postgres_url`: a fresh database for one test, dropped after it.

Every wait is bounded; a server that does not come up fails the test with the tail of its log.
When the binaries are missing the fixtures skip, saying what to install (`.ci/run` installs both
on CI).
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pytest

HOST = "127.0.0.1"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
# PostgreSQL refuses to run as root: when the tests run as root (CI containers, this machine),
# the cluster runs as this unprivileged user instead, and its directory belongs to it.
PG_USER_WHEN_ROOT = "nobody"
PG_ROLE = "svantic"


def free_port() -> int:
    """A port nobody listens on now (the kernel's pick); the server binds it a moment later."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _die_with_parent(sig: int) -> Callable[[], None] | None:
    """A `preexec_fn` that has Linux send `sig` to the server when the test run dies, so a run
    killed before its teardown (a timeout, Ctrl-C twice) leaves no server behind. Runs in
    the child after its user change (which would clear it), just before exec."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def arm() -> None:
        prctl(pr_set_pdeathsig, int(sig), 0, 0, 0)

    return arm


def _log_tail(path: Path, limit: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return "(no log)"


def _stop_process(proc: subprocess.Popen[bytes] | None, sig: int) -> None:
    """Ask politely with `sig`, then kill: a server that ignores us must not hang the run."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT)


def _redis_ping(port: int) -> bool:
    """One PING over a raw socket: the fixture needs no Redis client library to start Redis."""
    try:
        with socket.create_connection((HOST, port), timeout=1.0) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One `redis-server` process on 127.0.0.1, restartable on the same port."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.host = HOST
        self.log_path = workdir / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start (or restart, on the same port) and return once it answers PING."""
        if self.running:
            return
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        args = [
            self.binary,
            "--bind", HOST,
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", str(self.workdir),
            "--logfile", "",
        ]
        self._proc = subprocess.Popen(
            args, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=_die_with_parent(signal.SIGKILL),  # noqa: PLW1509
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            if _redis_ping(self.port):
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(
            f"redis-server did not answer PING on {HOST}:{self.port} within {START_TIMEOUT} s:\n"
            + _log_tail(self.log_path)
        )

    def stop(self) -> None:
        """Kill it at once (SIGKILL, like a crash): clients see their connections drop."""
        _stop_process(self._proc, signal.SIGKILL)
        self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def flush(self) -> None:
        """Empty every database (FLUSHALL), so a test starts from nothing."""
        with socket.create_connection((HOST, self.port), timeout=5.0) as sock:
            sock.sendall(b"FLUSHALL\r\n")
            reply = sock.recv(64)
        if not reply.startswith(b"+OK"):
            raise RuntimeError(f"FLUSHALL answered {reply!r}")


def _find_pg_bindir() -> Path | None:
    """PostgreSQL's server binaries: `pg_config --bindir`, else Debian's versioned directories."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            candidates.append(Path(out))
    # Debian installs the server outside PATH, newest version last in sorted order.
    candidates += [
        Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    ]
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "postgres").is_file():
            return bindir
    return None


class PostgresServer:
    """One PostgreSQL cluster in a temporary directory, on 127.0.0.1 and a unix socket there."""

    def __init__(self, bindir: Path, basedir: Path) -> None:
        self.bindir = bindir
        self.basedir = basedir
        self.datadir = basedir / "data"
        self.sockdir = basedir / "sock"
        self.log_path = basedir / "postgres.log"
        self.port = free_port()
        self.host = HOST
        self.user = PG_ROLE
        self.dbname = "svantic"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._counter = itertools.count(1)
        self._run_as: str | None = PG_USER_WHEN_ROOT if os.geteuid() == 0 else None

    def url_for(self, dbname: str) -> str:
        return f"postgresql://{self.user}@{HOST}:{self.port}/{dbname}"

    @property
    def url(self) -> str:
        return self.url_for(self.dbname)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _ids(self) -> tuple[int | None, int | None, list[int] | None]:
        """(user, group, extra groups) to run PostgreSQL's binaries as: ourselves unless root."""
        if self._run_as is None:
            return None, None, None
        entry = pwd.getpwnam(self._run_as)
        return entry.pw_uid, entry.pw_gid, []

    def initdb(self) -> None:
        """A new cluster: trust authentication on loopback (the role has no password)."""
        self.sockdir.mkdir()
        if self._run_as is not None:
            entry = pwd.getpwnam(self._run_as)
            for path in (self.basedir, self.sockdir):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        uid, gid, groups = self._ids()
        result = subprocess.run(
            [
                str(self.bindir / "initdb"), "-D", str(self.datadir), "-U", PG_ROLE,
                "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync",
            ],
            capture_output=True, timeout=120, cwd=self.basedir,
            user=uid, group=gid, extra_groups=groups, check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                "initdb failed:\n" + (result.stdout + result.stderr).decode(errors="replace")
            )

    def start(self) -> None:
        """Start (or restart, same port and data) and return once it accepts connections."""
        if self.running:
            return
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        args = [
            str(self.bindir / "postgres"), "-D", str(self.datadir),
            "-h", HOST, "-p", str(self.port), "-k", str(self.sockdir),
            "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
            "-c", "max_connections=200", "-c", "shared_buffers=32MB",
        ]
        uid, gid, groups = self._ids()
        self._proc = subprocess.Popen(
            args, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=self.basedir, start_new_session=True, user=uid, group=gid, extra_groups=groups,
            # SIGQUIT: PostgreSQL's immediate shutdown, which takes its backends down too.
            preexec_fn=_die_with_parent(signal.SIGQUIT),  # noqa: PLW1509
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            if self._ready():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(
            f"postgres did not accept connections on {HOST}:{self.port} within "
            f"{START_TIMEOUT} s:\n" + _log_tail(self.log_path)
        )

    def _ready(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(self.url_for("postgres"), connect_timeout=2) as conn:
                conn.execute("SELECT 1")
        except psycopg.Error:
            return False
        return True

    def stop(self) -> None:
        """Fast shutdown (SIGINT: open sessions are cut, the data stays), killed if it lingers."""
        _stop_process(self._proc, signal.SIGINT)
        self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; returns its URL."""
        import psycopg

        name = name or f"test_{os.getpid()}_{next(self._counter)}"
        with psycopg.connect(self.url_for("postgres"), autocommit=True, connect_timeout=5) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.url_for("postgres"), autocommit=True, connect_timeout=5) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    binary = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.isfile("/usr/bin/redis-server") else None
    )
    if binary is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
    workdir = Path(tempfile.mkdtemp(prefix="svantic-redis-"))
    server = RedisServer(binary, workdir)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bindir = _find_pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL's server is not installed (Debian: apt-get install postgresql)")
    pytest.importorskip("psycopg", reason="psycopg 3 is in the test extra")
    # Not under pytest's tmp_path: its root is private to the user running the tests, and the
    # cluster may run as another user (see PG_USER_WHEN_ROOT), which must reach its directory.
    basedir = Path(tempfile.mkdtemp(prefix="svantic-pg-"))
    server = PostgresServer(bindir, basedir)
    try:
        server.initdb()
        server.start()
        server.create_database(server.dbname)
        yield server
    finally:
        server.stop()
        shutil.rmtree(basedir, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh, empty database for one test (dropped afterwards, connections and all)."""
    url = postgres_server.create_database()
    yield url
    if postgres_server.running:
        postgres_server.drop_database(url.rsplit("/", 1)[1])
