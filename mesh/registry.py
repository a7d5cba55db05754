"""The mesh's durable state: API clients, tenant policy, registered instances and sessions.

`Registry` is the narrow interface the control plane and the router depend on, so a server
database can replace the embedded one without touching them. Two implementations share every
query and every rule of this module (`_SqlRegistry`), and differ only in how they reach their
database:

* `SqliteRegistry`, the embedded default for one mesh process: one file (or memory), the
  standard library's `sqlite3`, and synchronous calls, because SQLite answers in microseconds
  and a thread hop per call would cost more than the query;
* `PostgresRegistry` (`svantic_mesh.registry_pg`, the `scale` extra) for several mesh processes
  sharing one PostgreSQL through psycopg 3.

`open_registry()` picks one from a path or a URL.

Two kinds of secret pass through here and neither is ever stored in the clear:

* an API client's secret is only ever compared, so only a slow salted hash (scrypt) is kept;
* an instance's dispatch shared secret must be handed back to mint dispatch envelopes, so it
  is encrypted with AES-256-GCM under the mesh's key, bound to its tenant and instance so a
  ciphertext copied to another row does not decrypt there.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import json
import logging
import os
import secrets
import sqlite3
import threading
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol, Self, TypeVar, runtime_checkable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .model import (
    CONNECTION_STATUSES,
    POLICY_MODES,
    ROUTING_STATUSES,
    InstanceRow,
    RegistryError,
)

__all__ = [
    "MIGRATIONS",
    "UNSET",
    "InstanceConflict",
    "Registry",
    "RegistryError",
    "SecretUnavailable",
    "SqliteRegistry",
    "Unset",
    "open_registry",
]

log = logging.getLogger("svantic.mesh.registry")


class SecretUnavailable(RegistryError):
    """A stored instance secret failed authentication, so no dispatch can be authenticated
    with it; the mesh must fail that dispatch closed rather than send it unauthenticated."""


class InstanceConflict(RegistryError):
    """An instance id is already registered by another tenant. Instance ids are global, so
    letting an upsert move a row across tenants would let one tenant hijack another's
    instance (and its routing)."""


class Unset(enum.Enum):
    """The type of `UNSET`: a keyword left out, as opposed to one given as None (which for
    some fields means "clear it")."""

    UNSET = "UNSET"


UNSET: Final = Unset.UNSET

_SECRET_AAD_PREFIX: Final = b"svantic-instance-secret\0"
_NONCE_LEN: Final = 12
_TAG_LEN: Final = 16
_SCRYPT_R: Final = 8
_SCRYPT_P: Final = 1
_SCRYPT_SALT_LEN: Final = 16
_SCRYPT_DKLEN: Final = 32

MIGRATIONS: Final[tuple[str, ...]] = (
    # 1: the first schema. Tenants exist so every other table can reference one; the
    # secrets live in their own columns so no query that lists rows ever reads them.
    """
    CREATE TABLE tenants (
        tenant_id   TEXT PRIMARY KEY,
        policy_mode TEXT NOT NULL DEFAULT 'open'
    );
    CREATE TABLE api_clients (
        client_id   TEXT PRIMARY KEY,
        tenant_id   TEXT NOT NULL REFERENCES tenants(tenant_id),
        secret_hash TEXT NOT NULL
    );
    CREATE TABLE allowed_types (
        tenant_id  TEXT NOT NULL REFERENCES tenants(tenant_id),
        agent_type TEXT NOT NULL,
        PRIMARY KEY (tenant_id, agent_type)
    ) WITHOUT ROWID;
    CREATE TABLE instances (
        instance_id             TEXT PRIMARY KEY,
        tenant_id               TEXT NOT NULL REFERENCES tenants(tenant_id),
        agent_type              TEXT NOT NULL,
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
        last_heartbeat_at       REAL,
        last_dispatch_error     TEXT,
        registered_at           REAL NOT NULL,
        secret_ciphertext       BLOB
    );
    CREATE INDEX instances_by_tenant ON instances (tenant_id, instance_id);
    CREATE INDEX instances_by_type ON instances (tenant_id, agent_type, instance_id);
    CREATE TABLE sessions (
        session_id TEXT PRIMARY KEY,
        tenant_id  TEXT NOT NULL REFERENCES tenants(tenant_id),
        agent_type TEXT,
        metadata   TEXT,
        created_at REAL NOT NULL,
        closed_at  REAL
    );
    """,
)
"""SQLite's schema steps, applied in order; step i brings `PRAGMA user_version` to i + 1.
Append only: an applied step is never edited, since databases already past it would not rerun
it. `registry_pg.PG_MIGRATIONS` holds the same steps in PostgreSQL's types, one for one."""


@runtime_checkable
class Registry(Protocol):
    """What the mesh needs from its store. Synchronous: the mesh calls it from its event
    loop, so an implementation must answer quickly (an embedded database, or a pool with
    short queries)."""

    def close(self) -> None: ...

    # API clients and tenants
    def add_client(self, client_id: str, client_secret: str, tenant_id: str) -> None: ...
    def verify_client(self, client_id: str, client_secret: str) -> str | None: ...
    def policy_mode(self, tenant_id: str) -> str: ...
    def set_policy_mode(self, tenant_id: str, mode: str) -> None: ...
    def allowed_types(self, tenant_id: str) -> frozenset[str]: ...
    def allow_type(self, tenant_id: str, agent_type: str) -> None: ...

    # Instances
    def put_instance(
        self, row: InstanceRow, *, secret: str | None = None, keep_observed: bool = False
    ) -> None: ...
    def get_instance(self, instance_id: str) -> InstanceRow | None: ...
    def delete_instance(self, instance_id: str) -> bool: ...
    def list_instances(
        self,
        tenant_id: str | None = None,
        *,
        agent_type: str | None = None,
        routing_status: str | None = None,
        connection_status: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> list[InstanceRow]: ...
    def update_status(
        self,
        instance_id: str,
        *,
        routing_status: str | Unset = UNSET,
        connection_status: str | Unset = UNSET,
        last_heartbeat_at: float | Unset | None = UNSET,
        last_dispatch_error: dict[str, Any] | Unset | None = UNSET,
    ) -> bool: ...
    def instance_secret(self, instance_id: str) -> str | None: ...

    # Sessions
    def create_session(
        self,
        session_id: str,
        tenant_id: str,
        agent_type: str | None,
        metadata: dict[str, Any] | None,
        now: float,
    ) -> None: ...
    def close_session(self, tenant_id: str, session_id: str, now: float) -> bool: ...
    def get_session(self, session_id: str) -> dict[str, Any] | None: ...


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _scrypt(secret: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    # OpenSSL's default memory cap (32 MiB) refuses n >= 2**15 at r=8; allow what the
    # parameters need, so a stronger stored cost still verifies.
    maxmem = 130 * n * r * p + (1 << 20)
    return hashlib.scrypt(
        secret.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=_SCRYPT_DKLEN
    )


def _json_or_none(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))


def _load_json(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _secret_aad(tenant_id: str, instance_id: str) -> bytes:
    # Binding the ciphertext to its row means a copied or moved BLOB fails authentication
    # instead of handing tenant A's secret to a dispatch for tenant B's instance.
    return (
        _SECRET_AAD_PREFIX + tenant_id.encode("utf-8") + b"\0" + instance_id.encode("utf-8")
    )


def _check_status(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")


_INSTANCE_COLUMNS: Final = (
    "instance_id, tenant_id, agent_type, deployment_mode, url, dispatch_auth_type, "
    "credentials_ref, agent_card, tools, mcp_servers, max_concurrent_sessions, "
    "routing_status, connection_status, last_heartbeat_at, last_dispatch_error, "
    "registered_at, secret_ciphertext IS NOT NULL"
)


def _row_to_instance(r: tuple[Any, ...]) -> InstanceRow:
    return InstanceRow(
        instance_id=r[0],
        tenant_id=r[1],
        agent_type=r[2],
        deployment_mode=r[3],
        url=r[4],
        dispatch_auth_type=r[5],
        credentials_ref=r[6],
        agent_card=_load_json(r[7]),
        tools=_load_json(r[8]) or [],
        mcp_servers=_load_json(r[9]),
        max_concurrent_sessions=r[10],
        routing_status=r[11],
        connection_status=r[12],
        last_heartbeat_at=r[13],
        last_dispatch_error=_load_json(r[14]),
        registered_at=r[15],
        has_secret=bool(r[16]),
    )


# -- the queries, one text for both databases ---------------------------------------------
#
# Written in the SQL SQLite and PostgreSQL share (`ON CONFLICT ... DO UPDATE/NOTHING`,
# `excluded.`, `COALESCE`), with `?` placeholders: a backend whose driver wants another style
# rewrites them (registry_pg: `%s`). None of these texts holds a `?` or `%` of its own.

SQL_ENSURE_TENANT: Final = "INSERT INTO tenants (tenant_id) VALUES (?) ON CONFLICT DO NOTHING"
SQL_UPSERT_CLIENT: Final = (
    "INSERT INTO api_clients (client_id, tenant_id, secret_hash) VALUES (?, ?, ?) "
    "ON CONFLICT (client_id) DO UPDATE SET "
    "tenant_id = excluded.tenant_id, secret_hash = excluded.secret_hash"
)
SQL_CLIENT_HASH: Final = "SELECT tenant_id, secret_hash FROM api_clients WHERE client_id = ?"
SQL_POLICY_MODE: Final = "SELECT policy_mode FROM tenants WHERE tenant_id = ?"
SQL_SET_POLICY_MODE: Final = (
    "INSERT INTO tenants (tenant_id, policy_mode) VALUES (?, ?) "
    "ON CONFLICT (tenant_id) DO UPDATE SET policy_mode = excluded.policy_mode"
)
SQL_ALLOWED_TYPES: Final = "SELECT agent_type FROM allowed_types WHERE tenant_id = ?"
SQL_ALLOW_TYPE: Final = (
    "INSERT INTO allowed_types (tenant_id, agent_type) VALUES (?, ?) ON CONFLICT DO NOTHING"
)
# The tenant check is in the upsert's WHERE, so it holds under concurrent writers too: a row
# of another tenant makes the statement change nothing (rowcount 0), atomically.
_SQL_UPSERT_INSTANCE: Final = (
    "INSERT INTO instances (instance_id, tenant_id, agent_type, deployment_mode, "
    "url, dispatch_auth_type, credentials_ref, agent_card, tools, mcp_servers, "
    "max_concurrent_sessions, routing_status, connection_status, "
    "last_heartbeat_at, last_dispatch_error, registered_at, secret_ciphertext) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (instance_id) DO UPDATE SET "
    "agent_type = excluded.agent_type, "
    "deployment_mode = excluded.deployment_mode, url = excluded.url, "
    "dispatch_auth_type = excluded.dispatch_auth_type, "
    "credentials_ref = excluded.credentials_ref, "
    "agent_card = excluded.agent_card, tools = excluded.tools, "
    "mcp_servers = excluded.mcp_servers, "
    "max_concurrent_sessions = excluded.max_concurrent_sessions, "
    "routing_status = excluded.routing_status, "
    "connection_status = excluded.connection_status, "
    "last_heartbeat_at = {last_heartbeat_at}, "
    "last_dispatch_error = {last_dispatch_error}, "
    "registered_at = excluded.registered_at, "
    "secret_ciphertext = excluded.secret_ciphertext "
    "WHERE instances.tenant_id = excluded.tenant_id"
)
SQL_UPSERT_INSTANCE: Final = _SQL_UPSERT_INSTANCE.format(
    last_heartbeat_at="excluded.last_heartbeat_at",
    last_dispatch_error="excluded.last_dispatch_error",
)
# What the mesh observed (last heartbeat, last error) merged into the same statement, instead
# of read before and written back after: between those two, another mesh process may have
# recorded a newer heartbeat, which the write-back would undo.
SQL_UPSERT_INSTANCE_KEEP_OBSERVED: Final = _SQL_UPSERT_INSTANCE.format(
    last_heartbeat_at="COALESCE(excluded.last_heartbeat_at, instances.last_heartbeat_at)",
    last_dispatch_error="COALESCE(excluded.last_dispatch_error, instances.last_dispatch_error)",
)
SQL_INSTANCE_SECRET: Final = (
    "SELECT tenant_id, secret_ciphertext FROM instances WHERE instance_id = ?"
)
SQL_DELETE_INSTANCE: Final = "DELETE FROM instances WHERE instance_id = ?"
SQL_CREATE_SESSION: Final = (
    "INSERT INTO sessions (session_id, tenant_id, agent_type, metadata, created_at) "
    "VALUES (?, ?, ?, ?, ?)"
)
SQL_CLOSE_SESSION: Final = (
    "UPDATE sessions SET closed_at = ? "
    "WHERE session_id = ? AND tenant_id = ? AND closed_at IS NULL"
)
SQL_GET_SESSION: Final = (
    "SELECT session_id, tenant_id, agent_type, metadata, created_at, closed_at "
    "FROM sessions WHERE session_id = ?"
)


class _Tx(Protocol):
    """One open write transaction of a backend: statements in `?` style."""

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement; its row count."""
        ...


_T = TypeVar("_T")


class _SqlRegistry:
    """Everything both SQL backends do alike: validation, secrets, the queries, the rows.

    A backend supplies four things: `_query` (one read), `_execute` (one write statement,
    committed on its own), `_transact` (a function of several writes run in one transaction,
    which a backend may run again on a fresh connection when the first one turned out dead:
    every such function here is idempotent) and `_is_duplicate` (whether an exception is a
    unique-key violation). Each must be safe to call from any thread: the mesh calls the
    registry from its event loop and from worker threads.
    """

    def __init__(self, *, secret_key: bytes, scrypt_n: int) -> None:
        if not isinstance(secret_key, bytes) or len(secret_key) != 32:
            raise ValueError("secret_key must be 32 bytes (an AES-256-GCM key)")
        if scrypt_n < 2 or scrypt_n & (scrypt_n - 1):
            raise ValueError("scrypt_n must be a power of two greater than 1")
        self._aead = AESGCM(secret_key)
        self._scrypt_n = scrypt_n

    # -- what a backend supplies ----------------------------------------------------------

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        raise NotImplementedError

    def _transact(self, work: Callable[[_Tx], _T]) -> _T:
        raise NotImplementedError

    def _is_duplicate(self, exc: BaseException) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _query_one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        rows = self._query(sql, params)
        return rows[0] if rows else None

    # -- API clients and tenant policy -----------------------------------------------

    def _hash_secret(self, client_secret: str) -> str:
        salt = secrets.token_bytes(_SCRYPT_SALT_LEN)
        digest = _scrypt(client_secret, salt, self._scrypt_n, _SCRYPT_R, _SCRYPT_P)
        return f"scrypt${self._scrypt_n}${_SCRYPT_R}${_SCRYPT_P}${_b64(salt)}${_b64(digest)}"

    def add_client(self, client_id: str, client_secret: str, tenant_id: str) -> None:
        """Create or replace an API client; replacing re-hashes with a fresh salt."""
        encoded = self._hash_secret(client_secret)  # slow: outside the transaction

        def work(tx: _Tx) -> None:
            tx.execute(SQL_ENSURE_TENANT, (tenant_id,))
            tx.execute(SQL_UPSERT_CLIENT, (client_id, tenant_id, encoded))

        self._transact(work)

    def verify_client(self, client_id: str, client_secret: str) -> str | None:
        """The client's tenant when the secret matches, else None.

        An unknown id costs one hash too, so response time does not tell a caller which
        client ids exist."""
        found = self._query_one(SQL_CLIENT_HASH, (client_id,))
        if found is None:
            _scrypt(client_secret, bytes(_SCRYPT_SALT_LEN), self._scrypt_n, _SCRYPT_R, _SCRYPT_P)
            return None
        tenant_id, encoded = found
        try:
            scheme, n, r, p, salt_b64, hash_b64 = str(encoded).split("$")
            if scheme != "scrypt":
                raise ValueError(scheme)
            salt, expected = base64.b64decode(salt_b64), base64.b64decode(hash_b64)
            actual = _scrypt(client_secret, salt, int(n), int(r), int(p))
        except ValueError as exc:
            raise RegistryError(f"the stored hash of client {client_id!r} is malformed") from exc
        return str(tenant_id) if hmac.compare_digest(actual, expected) else None

    def policy_mode(self, tenant_id: str) -> str:
        """The tenant's registration policy; a tenant never configured is "open" (seed)."""
        found = self._query_one(SQL_POLICY_MODE, (tenant_id,))
        return "open" if found is None else str(found[0])

    def set_policy_mode(self, tenant_id: str, mode: str) -> None:
        _check_status("policy mode", mode, POLICY_MODES)
        self._execute(SQL_SET_POLICY_MODE, (tenant_id, mode))

    def allowed_types(self, tenant_id: str) -> frozenset[str]:
        rows = self._query(SQL_ALLOWED_TYPES, (tenant_id,))
        return frozenset(str(r[0]) for r in rows)

    def allow_type(self, tenant_id: str, agent_type: str) -> None:
        def work(tx: _Tx) -> None:
            tx.execute(SQL_ENSURE_TENANT, (tenant_id,))
            tx.execute(SQL_ALLOW_TYPE, (tenant_id, agent_type))

        self._transact(work)

    # -- instances -------------------------------------------------------------------

    def put_instance(
        self, row: InstanceRow, *, secret: str | None = None, keep_observed: bool = False
    ) -> None:
        """Create or replace an instance, and its stored secret with `secret`.

        `row.has_secret` is ignored: what is stored decides it. Re-registering without a
        secret removes the old one, so a switch away from shared_secret leaves none behind.
        With `keep_observed`, a `last_heartbeat_at` or `last_dispatch_error` that is None in
        `row` keeps the stored one (a re-registration describes the agent, not what the mesh
        saw of it), in the same statement: safe against another process's writes.
        Raises `InstanceConflict` when the id belongs to another tenant.
        """
        _check_status("routing_status", row.routing_status, ROUTING_STATUSES)
        _check_status("connection_status", row.connection_status, CONNECTION_STATUSES)
        blob: bytes | None = None
        if secret is not None:
            nonce = secrets.token_bytes(_NONCE_LEN)
            aad = _secret_aad(row.tenant_id, row.instance_id)
            blob = nonce + self._aead.encrypt(nonce, secret.encode("utf-8"), aad)
        values = (
            row.instance_id,
            row.tenant_id,
            row.agent_type,
            row.deployment_mode,
            row.url,
            row.dispatch_auth_type,
            row.credentials_ref,
            _json_or_none(row.agent_card),
            json.dumps(row.tools, separators=(",", ":")),
            _json_or_none(row.mcp_servers),
            row.max_concurrent_sessions,
            row.routing_status,
            row.connection_status,
            row.last_heartbeat_at,
            _json_or_none(row.last_dispatch_error),
            row.registered_at,
            blob,
        )
        upsert = SQL_UPSERT_INSTANCE_KEEP_OBSERVED if keep_observed else SQL_UPSERT_INSTANCE

        def work(tx: _Tx) -> None:
            tx.execute(SQL_ENSURE_TENANT, (row.tenant_id,))
            if tx.execute(upsert, values) != 1:
                raise InstanceConflict(
                    f"instance id {row.instance_id!r} is registered by another tenant"
                )

        self._transact(work)

    def get_instance(self, instance_id: str) -> InstanceRow | None:
        found = self._query_one(
            f"SELECT {_INSTANCE_COLUMNS} FROM instances WHERE instance_id = ?", (instance_id,)
        )
        return None if found is None else _row_to_instance(found)

    def delete_instance(self, instance_id: str) -> bool:
        """Remove an instance and its secret; False when there was none."""
        return self._execute(SQL_DELETE_INSTANCE, (instance_id,)) > 0

    def list_instances(
        self,
        tenant_id: str | None = None,
        *,
        agent_type: str | None = None,
        routing_status: str | None = None,
        connection_status: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> list[InstanceRow]:
        """One page of instances ordered by id; pass the last id seen as `after` for the
        next. Keyset paging stays correct while rows are added or removed between pages.
        `tenant_id=None` spans every tenant (start-up loading of the router)."""
        if limit < 1:
            raise ValueError("limit must be at least 1")
        clauses: list[str] = []
        params: list[Any] = []
        for column, value in (
            ("tenant_id", tenant_id),
            ("agent_type", agent_type),
            ("routing_status", routing_status),
            ("connection_status", connection_status),
        ):
            if value is not None:
                clauses.append(f"{column} = ?")  # column from the fixed list above
                params.append(value)
        if after is not None:
            clauses.append("instance_id > ?")
            params.append(after)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        params.append(limit)
        rows = self._query(
            f"SELECT {_INSTANCE_COLUMNS} FROM instances{where} ORDER BY instance_id LIMIT ?",
            params,
        )
        return [_row_to_instance(r) for r in rows]

    def update_status(
        self,
        instance_id: str,
        *,
        routing_status: str | Unset = UNSET,
        connection_status: str | Unset = UNSET,
        last_heartbeat_at: float | Unset | None = UNSET,
        last_dispatch_error: dict[str, Any] | Unset | None = UNSET,
    ) -> bool:
        """Change only the keywords given (None clears a nullable one), so health and
        connection code can each write their field without clobbering the other's.
        False when the instance is unknown.

        One UPDATE of the given columns, never a read then a write: two mesh processes
        writing different fields of one instance at once both land."""
        sets: list[str] = []
        params: list[Any] = []
        if not isinstance(routing_status, Unset):
            _check_status("routing_status", routing_status, ROUTING_STATUSES)
            sets.append("routing_status = ?")
            params.append(routing_status)
        if not isinstance(connection_status, Unset):
            _check_status("connection_status", connection_status, CONNECTION_STATUSES)
            sets.append("connection_status = ?")
            params.append(connection_status)
        if not isinstance(last_heartbeat_at, Unset):
            sets.append("last_heartbeat_at = ?")
            params.append(last_heartbeat_at)
        if not isinstance(last_dispatch_error, Unset):
            sets.append("last_dispatch_error = ?")
            params.append(_json_or_none(last_dispatch_error))
        if not sets:
            return self.get_instance(instance_id) is not None
        params.append(instance_id)
        return self._execute(
            f"UPDATE instances SET {', '.join(sets)} WHERE instance_id = ?", params
        ) > 0

    def instance_secret(self, instance_id: str) -> str | None:
        """The instance's shared secret in the clear, for minting one dispatch envelope;
        None when the instance or its secret does not exist.

        Raises `SecretUnavailable` when the stored ciphertext does not authenticate."""
        found = self._query_one(SQL_INSTANCE_SECRET, (instance_id,))
        if found is None or found[1] is None:
            return None
        tenant_id, blob = str(found[0]), bytes(found[1])
        unavailable = SecretUnavailable(
            f"the stored secret of instance {instance_id!r} does not decrypt: the registry's "
            "secret key is not the one it was stored with, or the row was altered or copied"
        )
        if len(blob) < _NONCE_LEN + _TAG_LEN:
            raise unavailable
        try:
            plain = self._aead.decrypt(
                blob[:_NONCE_LEN], blob[_NONCE_LEN:], _secret_aad(tenant_id, instance_id)
            )
        except InvalidTag:
            raise unavailable from None
        return plain.decode("utf-8")

    # -- sessions --------------------------------------------------------------------

    def create_session(
        self,
        session_id: str,
        tenant_id: str,
        agent_type: str | None,
        metadata: dict[str, Any] | None,
        now: float,
    ) -> None:
        """Record an opened session (spec 6 /sessions/init); the id must be new."""
        def work(tx: _Tx) -> None:
            tx.execute(SQL_ENSURE_TENANT, (tenant_id,))
            tx.execute(
                SQL_CREATE_SESSION,
                (session_id, tenant_id, agent_type, _json_or_none(metadata), now),
            )

        try:
            self._transact(work)
        except Exception as exc:
            if self._is_duplicate(exc):
                raise RegistryError(f"session {session_id!r} already exists") from exc
            raise

    def close_session(self, tenant_id: str, session_id: str, now: float) -> bool:
        """Close a tenant's open session. False for an unknown id, another tenant's
        session (indistinguishable on purpose) or one already closed."""
        return self._execute(SQL_CLOSE_SESSION, (now, session_id, tenant_id)) > 0

    def get_session(self, session_id: str) -> dict[str, Any] | None:
        found = self._query_one(SQL_GET_SESSION, (session_id,))
        if found is None:
            return None
        return {
            "session_id": found[0],
            "tenant_id": found[1],
            "agent_type": found[2],
            "metadata": _load_json(found[3]),
            "created_at": found[4],
            "closed_at": found[5],
        }


class _SqliteTx:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self._db.execute(sql, params).rowcount


class SqliteRegistry(_SqlRegistry):
    """`Registry` on one SQLite file (or ":memory:" for tests and throwaway meshes).

    Every write is its own committed transaction, so what the control plane acknowledged
    survives a restart. A file runs in WAL mode so readers (the dashboard, stats) never
    wait on a heartbeat's write.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] = ":memory:",
        *,
        secret_key: bytes,
        scrypt_n: int = 2**14,
    ) -> None:
        super().__init__(secret_key=secret_key, scrypt_n=scrypt_n)
        # One connection shared by whichever thread calls (check_same_thread=False); the
        # lock keeps a transaction from interleaving with another thread's statements.
        self._lock = threading.RLock()
        target = os.fspath(path)
        in_memory = target in (":memory:", "")
        try:
            self._db = sqlite3.connect(target, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as exc:
            raise RegistryError(f"cannot open the registry database: {exc}") from exc
        try:
            self._db.execute("PRAGMA foreign_keys = ON")
            self._db.execute("PRAGMA busy_timeout = 5000")
            if not in_memory:
                self._db.execute("PRAGMA journal_mode = WAL")
                # In WAL mode NORMAL is durable across a process crash or restart; only a
                # power loss can drop the last commits, and it spares the event loop an
                # fsync per heartbeat.
                self._db.execute("PRAGMA synchronous = NORMAL")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise RegistryError(f"the registry database is unusable: {exc}") from exc
        except BaseException:
            self._db.close()
            raise
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        """Close the database; the last close of a WAL file checkpoints it into the file."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.close()

    @property
    def schema_version(self) -> int:
        """The migration step this database is at (`PRAGMA user_version`)."""
        with self._lock:
            return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        current = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        known = len(MIGRATIONS)
        if current > known:
            # A newer mesh wrote tables this code does not know; writing to them could
            # corrupt state the newer code relies on, so refuse rather than guess.
            raise RegistryError(
                f"the registry database is at schema version {current}, newer than this "
                f"version of svantic-mesh supports ({known}); upgrade svantic-mesh"
            )
        for version in range(current + 1, known + 1):
            step = MIGRATIONS[version - 1]
            # One transaction per step, version bump included, so a failed step leaves
            # the database at the previous version rather than half-migrated.
            try:
                self._db.executescript(
                    f"BEGIN IMMEDIATE;\n{step}\nPRAGMA user_version = {version};\nCOMMIT;"
                )
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            log.info("registry schema migrated to version %d", version)

    # -- the backend ---------------------------------------------------------------------

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self._transact(lambda tx: tx.execute(sql, params))

    def _transact(self, work: Callable[[_Tx], _T]) -> _T:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                result = work(_SqliteTx(self._db))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return result

    def _is_duplicate(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.IntegrityError)


def open_registry(
    target: str | os.PathLike[str],
    *,
    secret_key: bytes,
    scrypt_n: int = 2**14,
    **options: Any,
) -> Registry:
    """The registry `target` names: a `postgresql://` (or `postgres://`) URL opens a
    `PostgresRegistry` (the `scale` extra: several mesh processes share it); a path,
    `:memory:` or a `sqlite:///path` URL opens a `SqliteRegistry` (one process).

    `secret_key` encrypts instance secrets at rest; every process sharing one database must
    be given the same key. `options` go to `PostgresRegistry` (pool size, timeouts)."""
    text = os.fspath(target)
    if text.startswith(("postgresql://", "postgres://")):
        from .registry_pg import PostgresRegistry

        return PostgresRegistry(text, secret_key=secret_key, scrypt_n=scrypt_n, **options)
    if options:
        raise TypeError(f"options for PostgreSQL only: {', '.join(sorted(options))}")
    if text.startswith("sqlite://"):
        # sqlite:///relative/x.db and sqlite:////absolute/x.db, as SQLAlchemy spells them;
        # sqlite:// alone (no path) is an in-memory database.
        rest = text[len("sqlite://"):]
        if rest and not rest.startswith("/"):
            raise ValueError("a SQLite URL is sqlite:///PATH (three slashes, then the path)")
        text = rest[1:] or ":memory:"
    elif "://" in text:
        raise ValueError(
            "the registry is a SQLite path, sqlite:///PATH or a postgresql:// URL, "
            f"not {text.split('://', 1)[0]}://"
        )
    return SqliteRegistry(text, secret_key=secret_key, scrypt_n=scrypt_n)
