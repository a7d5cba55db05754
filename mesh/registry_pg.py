"""The registry on PostgreSQL, for several mesh processes sharing their durable records.

The same queries and rules as the embedded registry (`registry._SqlRegistry`): only the
placeholders (`%s` for `?`), the column types (`DOUBLE PRECISION`, `BYTEA`) and the way to
reach the database differ. psycopg 3 (the `scale` extra) is the driver.

Connections: a small pool, bounded (`pool_size`, 4 by default), shared by every thread that
calls. The mesh calls the registry synchronously from its event loop, so every wait is bounded:
a connection is opened within `connect_timeout`, a checkout waits at most `acquire_timeout`, a
statement runs at most `statement_timeout` (a row lock held by a stuck process cannot hang the
loop), and for `retry_interval` after PostgreSQL could not be reached, calls fail at once with
`RegistryError` instead of each blocking the loop for another `connect_timeout`. A connection
that died while idle (PostgreSQL restarted) is replaced and the call run once more on the
new one; every write the registry makes is idempotent, so a rerun cannot apply twice what the
caller asked once (a session created twice is refused as a duplicate, like any reused id).

Under gevent: psycopg drives libpq without blocking and waits on its socket in Python, with
`select` when gevent has patched it, so a query yields to the hub like any gevent socket. That
choice is made when psycopg is first imported: patch first (`svantic mesh --adapter gevent`
does), then import this module.

Several processes: each opens its own pool; the schema is migrated under a PostgreSQL advisory
lock, so processes starting together migrate once. They must share the encryption key (the
`secret_key` argument; `svantic mesh` reads it from `SVANTIC_ENCRYPTION_KEY`): a process with
another key reads every record but cannot decrypt a shared secret (`SecretUnavailable`).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Final, TypeVar

import psycopg

from .registry import RegistryError, _SqlRegistry, _Tx

__all__ = ["PG_MIGRATIONS", "PostgresRegistry"]

log = logging.getLogger("svantic.mesh.registry")

_T = TypeVar("_T")

# Ids compare and sort byte by byte ("C"), as SQLite's default BINARY collation does, whatever
# the database's locale: keyset paging (`instance_id > ?`) then returns the same pages here as
# there, and the primary keys' indexes serve it.
PG_MIGRATIONS: Final[tuple[str, ...]] = (
    # 1: registry.MIGRATIONS[0] in PostgreSQL's types.
    """
    CREATE TABLE tenants (
        tenant_id   TEXT COLLATE "C" PRIMARY KEY,
        policy_mode TEXT NOT NULL DEFAULT 'open'
    );
    CREATE TABLE api_clients (
        client_id   TEXT COLLATE "C" PRIMARY KEY,
        tenant_id   TEXT COLLATE "C" NOT NULL REFERENCES tenants(tenant_id),
        secret_hash TEXT NOT NULL
    );
    CREATE TABLE allowed_types (
        tenant_id  TEXT COLLATE "C" NOT NULL REFERENCES tenants(tenant_id),
        agent_type TEXT COLLATE "C" NOT NULL,
        PRIMARY KEY (tenant_id, agent_type)
    );
    CREATE TABLE instances (
        instance_id             TEXT COLLATE "C" PRIMARY KEY,
        tenant_id               TEXT COLLATE "C" NOT NULL REFERENCES tenants(tenant_id),
        agent_type              TEXT COLLATE "C" NOT NULL,
        deployment_mode         TEXT NOT NULL,
        url                     TEXT,
        dispatch_auth_type      TEXT NOT NULL,
        credentials_ref         TEXT,
        agent_card              TEXT,
        tools                   TEXT NOT NULL,
        mcp_servers             TEXT,
        max_concurrent_sessions INTEGER NOT NULL,
        routing_status          TEXT NOT NULL,
        connection_status       TEXT NOT NULL,
        last_heartbeat_at       DOUBLE PRECISION,
        last_dispatch_error     TEXT,
        registered_at           DOUBLE PRECISION NOT NULL,
        secret_ciphertext       BYTEA
    );
    CREATE INDEX instances_by_tenant ON instances (tenant_id, instance_id);
    CREATE INDEX instances_by_type ON instances (tenant_id, agent_type, instance_id);
    CREATE TABLE sessions (
        session_id TEXT COLLATE "C" PRIMARY KEY,
        tenant_id  TEXT COLLATE "C" NOT NULL REFERENCES tenants(tenant_id),
        agent_type TEXT,
        metadata   TEXT,
        created_at DOUBLE PRECISION NOT NULL,
        closed_at  DOUBLE PRECISION
    );
    """,
)
"""PostgreSQL's schema steps, one for each of `registry.MIGRATIONS` (same tables, columns and
meaning): step i brings `svantic_schema.version` to i + 1. Append only, as there."""

# pg_advisory_xact_lock key of schema migration: any fixed number; this one spells "svantic".
_MIGRATION_LOCK: Final = 0x73766E74_6963


@functools.lru_cache(maxsize=512)
def _pg(sql: str) -> str:
    """The registry's `?` placeholders in psycopg's style (its texts hold no other `?`/`%`)."""
    return sql.replace("?", "%s")


class _PgTx:
    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self._conn.execute(_pg(sql), params).rowcount


class _Pool:
    """At most `size` connections, handed out one caller at a time, LIFO (the warm one).

    Fork-safe: a child process (a mesh forking its workers after opening the registry) never
    touches the connections it inherited, since their sockets are the parent's sessions; it
    opens its own. The inherited ones are kept referenced, never closed or collected: closing
    (or a finalizer) would end the parent's session on the server.
    """

    def __init__(
        self, connect: Callable[[], psycopg.Connection[Any]], size: int, acquire_timeout: float
    ) -> None:
        self._connect = connect
        self._size = size
        self._acquire_timeout = acquire_timeout
        self._idle: list[psycopg.Connection[Any]] = []
        self._open = 0
        self._closed = False
        self._cond = threading.Condition(threading.Lock())
        self._pid = os.getpid()
        self._inherited: list[psycopg.Connection[Any]] = []

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        conn = self._checkout()
        try:
            yield conn
        finally:
            self._checkin(conn)

    def _checkout(self) -> psycopg.Connection[Any]:
        with self._cond:
            if os.getpid() != self._pid:
                self._pid = os.getpid()
                self._inherited += self._idle
                self._idle = []
                self._open = 0  # the parent's busy ones are not ours either
            if not self._cond.wait_for(
                lambda: self._closed or self._idle or self._open < self._size,
                timeout=self._acquire_timeout,
            ):
                raise RegistryError(
                    f"no registry connection free within {self._acquire_timeout} s "
                    f"(all {self._size} busy)"
                )
            if self._closed:
                raise RegistryError("the registry is closed")
            if self._idle:
                return self._idle.pop()
            self._open += 1
        try:
            return self._connect()  # outside the lock: others may use idle connections
        except BaseException:
            with self._cond:
                self._open -= 1
                self._cond.notify()
            raise

    def _checkin(self, conn: psycopg.Connection[Any]) -> None:
        with self._cond:
            if os.getpid() != self._pid:  # checked out before a fork: the parent's
                self._inherited.append(conn)
                return
            if self._closed or conn.closed or conn.broken:
                self._open -= 1
                discard = True
            else:
                self._idle.append(conn)
                discard = False
            self._cond.notify()
        if discard:
            conn.close()

    def drop_idle(self) -> None:
        """Close the idle connections: one was found dead, and they all went to the same
        server, so the rest likely died with it (a restart); better to reconnect once."""
        with self._cond:
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._cond.notify_all()
        for conn in idle:
            conn.close()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._cond.notify_all()
        for conn in idle:
            conn.close()


class PostgresRegistry(_SqlRegistry):
    """`Registry` on PostgreSQL (`postgresql://user@host:port/db`), shareable by processes.

    `url` is any libpq connection string or URL (a password may come from `PGPASSWORD` or
    `~/.pgpass` rather than the URL). The tables go in the connection's first schema on its
    `search_path` (`?options=-csearch_path%3Dmesh` in the URL picks another).
    """

    def __init__(
        self,
        url: str,
        *,
        secret_key: bytes,
        scrypt_n: int = 2**14,
        pool_size: int = 4,
        connect_timeout: float = 5.0,
        acquire_timeout: float = 5.0,
        statement_timeout: float = 5.0,
        retry_interval: float = 1.0,
    ) -> None:
        super().__init__(secret_key=secret_key, scrypt_n=scrypt_n)
        if pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        for name, value in (
            ("connect_timeout", connect_timeout),
            ("acquire_timeout", acquire_timeout),
            ("statement_timeout", statement_timeout),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be above 0")
        self._url = url
        self._connect_timeout = max(1, round(connect_timeout))  # libpq counts whole seconds
        self._statement_timeout_ms = max(1, round(statement_timeout * 1000))
        self._retry_interval = retry_interval
        self._down_until = 0.0
        self._was_down = False
        self._down_lock = threading.Lock()
        self._pool = _Pool(self._connect, pool_size, acquire_timeout)
        self._closed = False
        try:
            where = self._run(self._migrate)
        except BaseException:
            self._pool.close()
            raise
        log.info("registry on PostgreSQL %s (a pool of up to %d connections)", where, pool_size)

    # -- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        """Close every idle connection now, and each busy one when it comes back."""
        if not self._closed:
            self._closed = True
            self._pool.close()

    @property
    def schema_version(self) -> int:
        """The migration step this database is at (`svantic_schema.version`)."""
        rows = self._query("SELECT version FROM svantic_schema")
        return int(rows[0][0]) if rows else 0

    def _connect(self) -> psycopg.Connection[Any]:
        with self._down_lock:
            if time.monotonic() < self._down_until:
                raise RegistryError(
                    "the registry database was unreachable a moment ago; retrying after "
                    f"{self._retry_interval} s"
                )
        conn: psycopg.Connection[Any] | None = None
        try:
            conn = psycopg.connect(
                self._url, autocommit=True, connect_timeout=self._connect_timeout
            )
            # Bounded waits on the server side too: a statement that waits on a lock or
            # runs long is cancelled rather than holding the mesh's loop.
            conn.execute(f"SET statement_timeout = {self._statement_timeout_ms}")
            conn.execute("SET idle_in_transaction_session_timeout = 60000")
        except psycopg.Error as exc:
            if conn is not None:
                conn.close()
            with self._down_lock:
                self._down_until = time.monotonic() + self._retry_interval
                self._was_down = True
            log.warning("registry database unreachable: %s", _first_line(exc))
            raise RegistryError(
                f"cannot reach the registry database: {_first_line(exc)}"
            ) from exc
        with self._down_lock:
            back, self._was_down = self._was_down, False
        if back:
            log.info("registry database reachable again")
        return conn

    def _migrate(self, conn: psycopg.Connection[Any]) -> str:
        """Bring the schema up to date; where the database is, for the log."""
        known = len(PG_MIGRATIONS)
        applied: list[int] = []
        with conn.transaction():
            # Processes starting together take turns: the second finds the work done.
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS svantic_schema (version INTEGER NOT NULL)")
            found = conn.execute("SELECT version FROM svantic_schema").fetchone()
            current = 0 if found is None else int(found[0])
            if current > known:
                raise RegistryError(
                    f"the registry database is at schema version {current}, newer than this "
                    f"version of svantic-mesh supports ({known}); upgrade svantic-mesh"
                )
            # All steps in one transaction (PostgreSQL's DDL is transactional): a failed
            # step leaves the database where it was, not half-migrated.
            for version in range(current + 1, known + 1):
                conn.execute(PG_MIGRATIONS[version - 1].encode())
                applied.append(version)
            if applied:
                conn.execute("DELETE FROM svantic_schema")
                conn.execute("INSERT INTO svantic_schema (version) VALUES (%s)", (known,))
        for version in applied:
            log.info("registry schema migrated to version %d", version)
        info = conn.info
        return f"{info.host}:{info.port} database {info.dbname}"

    # -- the backend ---------------------------------------------------------------------

    def _run(self, work: Callable[[psycopg.Connection[Any]], _T]) -> _T:
        """`work` on a pooled connection, once more on a new one if that one was dead."""
        if self._closed:
            raise RegistryError("the registry is closed")
        for attempt in (1, 2):
            with self._pool.connection() as conn:
                try:
                    return work(conn)
                except psycopg.OperationalError as exc:
                    # A connection found dead (server restarted, network cut) goes back
                    # broken and is dropped; the next attempt connects afresh.
                    if attempt == 1 and conn.broken:
                        self._pool.drop_idle()
                        log.info("registry connection lost (%s); reconnecting",
                                 _first_line(exc))
                        continue
                    raise RegistryError(
                        f"the registry database failed: {_first_line(exc)}"
                    ) from exc
                except psycopg.errors.UniqueViolation:
                    raise  # `_is_duplicate` tells the caller
                except psycopg.Error as exc:
                    raise RegistryError(
                        f"the registry database refused a statement: {_first_line(exc)}"
                    ) from exc
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._run(lambda conn: conn.execute(_pg(sql), params).fetchall())

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        # One statement in autocommit is its own transaction: one round trip, not three.
        return self._run(lambda conn: conn.execute(_pg(sql), params).rowcount)

    def _transact(self, work: Callable[[_Tx], _T]) -> _T:
        def in_transaction(conn: psycopg.Connection[Any]) -> _T:
            with conn.transaction():
                return work(_PgTx(conn))

        return self._run(in_transaction)

    def _is_duplicate(self, exc: BaseException) -> bool:
        return isinstance(exc, psycopg.errors.UniqueViolation)


def _first_line(exc: BaseException) -> str:
    """An error's first line: psycopg's messages continue with server detail and hints."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
