"""The registry keeps what the control plane acknowledged, across restarts, and never keeps a
secret in the clear.

Every test of behaviour runs on both backends, SQLite (one process) and PostgreSQL (several;
a real server, a fresh database per test: tests/servers.py), through the `backend` fixture.
What only one backend has (a file, a server) is tested by name.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from svantic_mesh.model import InstanceRow
from svantic_mesh.registry import (
    MIGRATIONS,
    InstanceConflict,
    Registry,
    RegistryError,
    SecretUnavailable,
    SqliteRegistry,
    open_registry,
)
from svantic_mesh.registry_pg import PG_MIGRATIONS, PostgresRegistry

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
CHEAP_N = 2**4  # scrypt cost for tests; the default is exercised once below
SECRET = "s3cr3t-XYZ-0123456789"
CLIENT_SECRET = "client-s3cr3t-QWE-9876543210"


AnyRegistry = SqliteRegistry | PostgresRegistry


def open_sqlite(path: Path | str = ":memory:", key: bytes = KEY) -> SqliteRegistry:
    return SqliteRegistry(path, secret_key=key, scrypt_n=CHEAP_N)


@dataclass
class Backend:
    """One database of either kind: opened (and reopened, as a restart) by `open`, and
    reached behind the registry's back by `raw`, as an operator or an attacker would."""

    name: str
    target: str
    datadir: Path | None = None  # PostgreSQL's cluster directory

    def open(self, key: bytes = KEY, **options: Any) -> AnyRegistry:
        reg = open_registry(self.target, secret_key=key, scrypt_n=options.pop("scrypt_n",
                                                                              CHEAP_N), **options)
        assert isinstance(reg, SqliteRegistry | PostgresRegistry)
        return reg

    def raw(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """One statement (`?` placeholders) on a connection of its own, committed."""
        if self.name == "sqlite":
            db = sqlite3.connect(self.target)
            try:
                cur = db.execute(sql, params)
                rows = cur.fetchall()
                db.commit()
                return rows
            finally:
                db.close()
        import psycopg

        with psycopg.connect(self.target, autocommit=True) as conn:
            cur = conn.execute(sql.replace("?", "%s"), params)
            return cur.fetchall() if cur.description else []

    def stored_bytes(self) -> bytes:
        """Every byte the database keeps: SQLite's file, WAL and shared memory; PostgreSQL's
        whole cluster directory (tables, write-ahead log), after a checkpoint."""
        if self.name == "sqlite":
            return db_bytes(Path(self.target))
        assert self.datadir is not None
        self.raw("CHECKPOINT")
        chunks: list[bytes] = []
        for folder, _, files in os.walk(self.datadir):
            for name in files:
                with contextlib.suppress(OSError):  # a temporary file that went meanwhile
                    chunks.append(Path(folder, name).read_bytes())
        return b"".join(chunks)

    def set_schema_version(self, version: int) -> None:
        if self.name == "sqlite":
            self.raw(f"PRAGMA user_version = {version}")
        else:
            self.raw("UPDATE svantic_schema SET version = ?", (version,))


def full_row(instance_id: str = "nav-01", tenant_id: str = "t1", **changes: object) -> InstanceRow:
    row = InstanceRow(
        instance_id=instance_id,
        tenant_id=tenant_id,
        agent_type="navigator",
        deployment_mode="hosted",
        url="https://nav.example.test",
        dispatch_auth_type="shared_secret",
        credentials_ref="ref-7",
        agent_card={"name": "Navigator", "skills": [{"id": "route"}], "n": 1.5},
        tools=[{"name": "plan", "parameters": {"type": "object"}}, {"name": "go"}],
        mcp_servers={"fs": {"command": "mcp-fs", "args": ["--ro", "ünï"]}},
        max_concurrent_sessions=4,
        routing_status="available",
        connection_status="healthy",
        last_heartbeat_at=1_700_000_123.25,
        last_dispatch_error={"code": "AGENT_UNHEALTHY", "message": "x", "at": 1.0},
        registered_at=1_700_000_000.5,
    )
    for name, value in changes.items():
        setattr(row, name, value)
    return row


def must_get(reg: Registry, instance_id: str) -> InstanceRow:
    row = reg.get_instance(instance_id)
    assert row is not None
    return row


def must_session(reg: Registry, session_id: str) -> dict[str, object]:
    found = reg.get_session(session_id)
    assert found is not None
    return found


def row_ids(rows: list[InstanceRow]) -> list[str]:
    return [r.instance_id for r in rows]


def db_bytes(path: Path) -> bytes:
    """Every byte SQLite keeps for this database: the file, its WAL and shared memory."""
    data = b""
    for suffix in ("", "-wal", "-shm", "-journal"):
        part = Path(str(path) + suffix)
        if part.exists():
            data += part.read_bytes()
    return data


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        return Backend("sqlite", str(tmp_path / "reg.db"))
    server = request.getfixturevalue("postgres_server")
    return Backend("postgres", request.getfixturevalue("postgres_url"), server.datadir)


@pytest.fixture
def reg(backend: Backend) -> Iterator[AnyRegistry]:
    r = backend.open()
    yield r
    r.close()


# -- construction and schema --------------------------------------------------------


def test_implements_the_registry_protocol(reg: AnyRegistry) -> None:
    assert isinstance(reg, Registry)


@pytest.mark.parametrize("key", [b"", bytes(16), bytes(31), bytes(33)])
def test_key_must_be_32_bytes(key: bytes) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        SqliteRegistry(secret_key=key)
    with pytest.raises(ValueError, match="32 bytes"):  # before any connection is tried
        PostgresRegistry("postgresql://127.0.0.1:1/none", secret_key=key)


def test_both_backends_have_the_same_schema_steps() -> None:
    assert len(PG_MIGRATIONS) == len(MIGRATIONS)


def test_the_shared_queries_hold_no_percent_sign() -> None:
    """psycopg reads `%` as a placeholder: a query text shared with SQLite must have none."""
    import svantic_mesh.registry as module

    texts = {name: getattr(module, name) for name in dir(module) if name.startswith("SQL_")}
    assert len(texts) >= 10
    assert [name for name, text in texts.items() if "%" in text] == []


def test_schema_version_is_the_number_of_migrations(backend: Backend) -> None:
    with backend.open() as reg:
        assert reg.schema_version == len(MIGRATIONS) >= 1
    with backend.open() as reg:  # reopening applies nothing twice
        assert reg.schema_version == len(MIGRATIONS)


def test_database_from_a_newer_version_is_refused(backend: Backend) -> None:
    backend.open().close()
    backend.set_schema_version(len(MIGRATIONS) + 1)
    with pytest.raises(RegistryError, match="newer"):
        backend.open()


def test_a_file_that_is_not_a_database_is_a_registry_error(tmp_path: Path) -> None:
    path = tmp_path / "reg.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(RegistryError):
        open_sqlite(path)


def test_closing_checkpoints_the_file(tmp_path: Path) -> None:
    path = tmp_path / "reg.db"
    with open_sqlite(path) as reg:
        reg.allow_type("t1", "navigator")
    reg.close()  # closing twice is harmless
    # Everything is in the main file afterwards, so copying that one file is a backup.
    assert not Path(f"{path}-wal").exists()
    raw = sqlite3.connect(path)
    assert raw.execute("SELECT agent_type FROM allowed_types").fetchall() == [("navigator",)]
    raw.close()


def test_migrations_are_logged_and_secrets_never_are(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="svantic.mesh.registry")
    with backend.open() as reg:
        reg.add_client("c1", CLIENT_SECRET, "t1")
        reg.put_instance(full_row(), secret=SECRET)
        assert reg.instance_secret("nav-01") == SECRET
    migrated = [r for r in caplog.records if "version" in r.getMessage()]
    assert [r.levelno for r in migrated] == [logging.INFO] * len(MIGRATIONS)
    assert all(r.name == "svantic.mesh.registry" for r in caplog.records)
    assert SECRET not in caplog.text
    assert CLIENT_SECRET not in caplog.text


# -- persistence ----------------------------------------------------------------------


def test_every_instance_field_survives_a_restart(backend: Backend) -> None:
    written = full_row()
    with backend.open() as reg:
        reg.put_instance(written, secret=SECRET)
        reg.put_instance(full_row("bare-01", agent_card=None, tools=[], mcp_servers=None,
                                  url=None, credentials_ref=None, last_heartbeat_at=None,
                                  last_dispatch_error=None, routing_status="unknown",
                                  connection_status="unknown"))
    with backend.open() as reg:
        got = reg.get_instance("nav-01")
        bare = reg.get_instance("bare-01")
        assert reg.instance_secret("nav-01") == SECRET
    written.has_secret = True
    assert got == written
    assert bare is not None
    assert (bare.agent_card, bare.tools, bare.mcp_servers, bare.url) == (None, [], None, None)
    assert (bare.last_heartbeat_at, bare.last_dispatch_error, bare.has_secret) == (
        None, None, False)


def test_clients_policy_types_and_sessions_survive_a_restart(backend: Backend) -> None:
    with backend.open() as reg:
        reg.add_client("c1", CLIENT_SECRET, "t1")
        reg.set_policy_mode("t1", "allow-list")
        reg.allow_type("t1", "navigator")
        reg.create_session("s1", "t1", "navigator", {"k": "v"}, now=10.0)
        reg.update_status("missing", routing_status="busy")  # no row: no effect
    with backend.open() as reg:
        assert reg.verify_client("c1", CLIENT_SECRET) == "t1"
        assert reg.policy_mode("t1") == "allow-list"
        assert reg.allowed_types("t1") == {"navigator"}
        assert reg.get_session("s1") == {
            "session_id": "s1", "tenant_id": "t1", "agent_type": "navigator",
            "metadata": {"k": "v"}, "created_at": 10.0, "closed_at": None,
        }


# -- secrets at rest -----------------------------------------------------------------


def test_no_secret_is_stored_in_the_clear(backend: Backend) -> None:
    reg = backend.open()
    reg.put_instance(full_row(), secret=SECRET)
    reg.add_client("c1", CLIENT_SECRET, "t1")
    needles = [SECRET.encode(), CLIENT_SECRET.encode(), SECRET.encode("utf-16-le")]
    # While open the latest pages are in SQLite's WAL; after close they are checkpointed.
    for stage in ("open", "closed"):
        data = backend.stored_bytes()
        assert b"nav.example.test" in data, stage  # the scan does see stored values
        for needle in needles:
            assert needle not in data, stage
        reg.close()
    with backend.open() as again:
        assert again.instance_secret("nav-01") == SECRET
        assert again.verify_client("c1", CLIENT_SECRET) == "t1"


def test_client_secret_is_a_scrypt_hash_with_default_cost(backend: Backend) -> None:
    with backend.open(scrypt_n=2**14) as reg:
        reg.add_client("c1", CLIENT_SECRET, "t1")
        assert reg.verify_client("c1", CLIENT_SECRET) == "t1"
    ((stored,),) = backend.raw("SELECT secret_hash FROM api_clients")
    scheme, n, r, p, salt, digest = stored.split("$")
    assert (scheme, n, r, p) == ("scrypt", str(2**14), "8", "1")
    assert len(salt) == len(digest) - 20 == 24  # 16 and 32 bytes in base64


def test_wrong_key_makes_the_secret_unavailable_not_wrong(backend: Backend) -> None:
    with backend.open() as reg:
        reg.put_instance(full_row(), secret=SECRET)
    with backend.open(key=OTHER_KEY) as reg:
        assert reg.get_instance("nav-01") is not None  # the rest stays readable
        with pytest.raises(SecretUnavailable, match="key") as caught:
            reg.instance_secret("nav-01")
    assert SECRET not in str(caught.value)


def test_a_ciphertext_moved_to_another_row_does_not_decrypt(backend: Backend) -> None:
    with backend.open() as reg:
        reg.put_instance(full_row("victim-01", tenant_id="t1"), secret=SECRET)
        reg.put_instance(full_row("thief-01", tenant_id="t2"), secret="mine")
    backend.raw(
        "UPDATE instances SET secret_ciphertext = "
        "(SELECT secret_ciphertext FROM instances WHERE instance_id = 'victim-01') "
        "WHERE instance_id = 'thief-01'"
    )
    with backend.open() as reg:
        assert reg.instance_secret("victim-01") == SECRET
        with pytest.raises(SecretUnavailable):
            reg.instance_secret("thief-01")


def test_a_tampered_or_truncated_ciphertext_is_refused(backend: Backend) -> None:
    with backend.open() as reg:
        reg.put_instance(full_row("a"), secret=SECRET)
        reg.put_instance(full_row("b"), secret=SECRET)
    ((blob,),) = backend.raw("SELECT secret_ciphertext FROM instances WHERE instance_id = 'a'")
    flipped = bytes(blob[:-1]) + bytes([blob[-1] ^ 1])
    backend.raw("UPDATE instances SET secret_ciphertext = ? WHERE instance_id = 'a'", (flipped,))
    backend.raw("UPDATE instances SET secret_ciphertext = ? WHERE instance_id = 'b'", (b"\0",))
    with backend.open() as reg:
        for instance_id in ("a", "b"):
            with pytest.raises(SecretUnavailable):
                reg.instance_secret(instance_id)


def test_secret_is_replaced_and_removed_with_the_row(reg: AnyRegistry) -> None:
    reg.put_instance(full_row(), secret=SECRET)
    assert must_get(reg, "nav-01").has_secret
    reg.put_instance(full_row(), secret="rotated")
    assert reg.instance_secret("nav-01") == "rotated"
    reg.put_instance(full_row(dispatch_auth_type="svantic_jwt"))  # no secret: removed
    assert reg.instance_secret("nav-01") is None
    assert not must_get(reg, "nav-01").has_secret
    assert reg.instance_secret("unknown") is None


def test_same_secret_twice_gives_different_ciphertexts(backend: Backend) -> None:
    with backend.open() as reg:
        reg.put_instance(full_row("a"), secret=SECRET)
        reg.put_instance(full_row("b"), secret=SECRET)
    blobs = [bytes(b) for (b,) in backend.raw("SELECT secret_ciphertext FROM instances")]
    assert len(set(blobs)) == 2  # fresh nonce per write


# -- API clients -----------------------------------------------------------------------


def test_verify_client(reg: AnyRegistry) -> None:
    reg.add_client("c1", CLIENT_SECRET, "t1")
    assert reg.verify_client("c1", CLIENT_SECRET) == "t1"
    assert reg.verify_client("c1", CLIENT_SECRET + "x") is None
    assert reg.verify_client("c1", "") is None
    assert reg.verify_client("nobody", CLIENT_SECRET) is None


def test_add_client_upserts(reg: AnyRegistry) -> None:
    reg.add_client("c1", "old", "t1")
    reg.add_client("c1", "new", "t2")
    assert reg.verify_client("c1", "old") is None
    assert reg.verify_client("c1", "new") == "t2"


def test_tenant_supplied_text_is_data_not_sql(reg: AnyRegistry) -> None:
    hostile = "x'); DROP TABLE instances; --"
    reg.add_client(hostile, hostile, hostile)
    reg.allow_type(hostile, hostile)
    reg.put_instance(full_row(hostile, tenant_id=hostile))
    assert reg.verify_client(hostile, hostile) == hostile
    assert reg.allowed_types(hostile) == {hostile}
    assert row_ids(reg.list_instances(hostile, agent_type="navigator")) == [hostile]


# -- tenant policy ---------------------------------------------------------------------


def test_policy_defaults_to_open_and_changes(reg: AnyRegistry) -> None:
    assert reg.policy_mode("never-seen") == "open"
    reg.set_policy_mode("t1", "audit")
    assert reg.policy_mode("t1") == "audit"
    reg.set_policy_mode("t1", "allow-list")
    assert reg.policy_mode("t1") == "allow-list"
    assert reg.policy_mode("t2") == "open"
    with pytest.raises(ValueError, match="policy mode"):
        reg.set_policy_mode("t1", "closed")
    assert reg.policy_mode("t1") == "allow-list"


def test_allow_list_is_per_tenant(reg: AnyRegistry) -> None:
    assert reg.allowed_types("t1") == frozenset()
    reg.allow_type("t1", "navigator")
    reg.allow_type("t1", "navigator")  # idempotent
    reg.allow_type("t1", "billing")
    reg.allow_type("t2", "other")
    assert reg.allowed_types("t1") == frozenset({"navigator", "billing"})
    assert reg.allowed_types("t2") == frozenset({"other"})


# -- instances ------------------------------------------------------------------------


def test_put_instance_upserts_one_row(reg: AnyRegistry) -> None:
    reg.put_instance(full_row())
    reg.put_instance(full_row(url="https://moved.example.test", tools=[{"name": "only"}]))
    rows = reg.list_instances("t1")
    assert row_ids(rows) == ["nav-01"]
    assert rows[0].url == "https://moved.example.test"
    assert rows[0].capabilities() == ["only", "route"]


def test_re_registering_may_keep_what_the_mesh_observed(reg: AnyRegistry) -> None:
    reg.put_instance(full_row(last_heartbeat_at=None, last_dispatch_error=None))
    error = {"code": "AGENT_DISCONNECTED", "message": "gone", "at": "t"}
    reg.update_status("nav-01", last_heartbeat_at=77.0, last_dispatch_error=error)
    # The agent describes itself again (no observations in its row): they are kept ...
    reg.put_instance(full_row(url="https://v2.test", last_heartbeat_at=None,
                              last_dispatch_error=None), keep_observed=True)
    got = must_get(reg, "nav-01")
    assert (got.url, got.last_heartbeat_at, got.last_dispatch_error) == (
        "https://v2.test", 77.0, error)
    # ... newer ones given in the row win ...
    reg.put_instance(full_row(last_heartbeat_at=78.0, last_dispatch_error=None),
                     keep_observed=True)
    assert must_get(reg, "nav-01").last_heartbeat_at == 78.0
    # ... and a plain put replaces everything, observations included.
    reg.put_instance(full_row(last_heartbeat_at=None, last_dispatch_error=None))
    got = must_get(reg, "nav-01")
    assert (got.last_heartbeat_at, got.last_dispatch_error) == (None, None)
    # A new id is created the same either way; another tenant's is still refused.
    reg.put_instance(full_row("fresh-01", last_heartbeat_at=None), keep_observed=True)
    assert must_get(reg, "fresh-01").last_heartbeat_at is None
    with pytest.raises(InstanceConflict):
        reg.put_instance(full_row(tenant_id="t2"), keep_observed=True)


def test_an_instance_id_cannot_move_to_another_tenant(reg: AnyRegistry) -> None:
    reg.put_instance(full_row(tenant_id="t1"), secret=SECRET)
    with pytest.raises(InstanceConflict):
        reg.put_instance(full_row(tenant_id="t2", url="https://evil.example.test"))
    kept = reg.get_instance("nav-01")
    assert kept is not None
    assert (kept.tenant_id, kept.url) == ("t1", "https://nav.example.test")
    assert reg.instance_secret("nav-01") == SECRET


def test_invalid_statuses_are_refused(reg: AnyRegistry) -> None:
    with pytest.raises(ValueError, match="routing_status"):
        reg.put_instance(full_row(routing_status="asleep"))
    reg.put_instance(full_row())
    with pytest.raises(ValueError, match="connection_status"):
        reg.update_status("nav-01", connection_status="asleep")


def test_delete_instance(reg: AnyRegistry) -> None:
    reg.put_instance(full_row(), secret=SECRET)
    assert reg.delete_instance("nav-01") is True
    assert reg.get_instance("nav-01") is None
    assert reg.instance_secret("nav-01") is None
    assert reg.delete_instance("nav-01") is False
    reg.put_instance(full_row(tenant_id="t2"))  # the id is free again, for anyone
    assert must_get(reg, "nav-01").tenant_id == "t2"


def test_list_pages_with_an_exclusive_cursor(reg: AnyRegistry) -> None:
    ids = [f"i-{n:02d}" for n in range(7)]
    for instance_id in reversed(ids):
        reg.put_instance(full_row(instance_id))
    pages: list[list[str]] = []
    after: str | None = None
    while page := row_ids(reg.list_instances("t1", limit=3, after=after)):
        pages.append(page)
        after = page[-1]
    assert pages == [ids[0:3], ids[3:6], ids[6:7]]
    assert row_ids(reg.list_instances("t1", after="i-03", limit=2)) == ["i-04", "i-05"]
    assert row_ids(reg.list_instances("t1", after="i-0")) == ids  # any string is a cursor
    with pytest.raises(ValueError):
        reg.list_instances("t1", limit=0)


def test_list_filters_and_tenant_scope(reg: AnyRegistry) -> None:
    reg.put_instance(full_row("a", "t1", agent_type="nav", routing_status="available"))
    reg.put_instance(full_row("b", "t1", agent_type="nav", routing_status="busy",
                              connection_status="online"))
    reg.put_instance(full_row("c", "t1", agent_type="bill", routing_status="available"))
    reg.put_instance(full_row("d", "t2", agent_type="nav", routing_status="available"))
    assert row_ids(reg.list_instances("t1")) == ["a", "b", "c"]
    assert row_ids(reg.list_instances("t2")) == ["d"]
    assert row_ids(reg.list_instances()) == ["a", "b", "c", "d"]
    assert row_ids(reg.list_instances("t1", agent_type="nav")) == ["a", "b"]
    assert row_ids(reg.list_instances(agent_type="nav", routing_status="available")) == [
        "a", "d"]
    assert row_ids(reg.list_instances("t1", connection_status="online")) == ["b"]
    assert reg.list_instances("t3") == []


def test_update_status_changes_only_what_is_given(reg: AnyRegistry) -> None:
    reg.put_instance(full_row())
    assert reg.update_status("nav-01", routing_status="busy") is True
    got = reg.get_instance("nav-01")
    assert got is not None
    assert (got.routing_status, got.connection_status) == ("busy", "healthy")
    assert got.last_heartbeat_at == 1_700_000_123.25
    assert got.last_dispatch_error == {"code": "AGENT_UNHEALTHY", "message": "x", "at": 1.0}

    reg.update_status("nav-01", connection_status="degraded", last_heartbeat_at=5.0)
    got = reg.get_instance("nav-01")
    assert got is not None
    assert (got.routing_status, got.connection_status, got.last_heartbeat_at) == (
        "busy", "degraded", 5.0)
    assert got.last_dispatch_error is not None

    error = {"code": "AGENT_DISCONNECTED", "message": "gone", "at": 6.0}
    reg.update_status("nav-01", last_dispatch_error=error)
    assert must_get(reg, "nav-01").last_dispatch_error == error

    reg.update_status("nav-01", last_dispatch_error=None, last_heartbeat_at=None)
    got = reg.get_instance("nav-01")
    assert got is not None
    assert (got.last_dispatch_error, got.last_heartbeat_at) == (None, None)
    assert (got.routing_status, got.connection_status) == ("busy", "degraded")

    assert reg.update_status("nav-01") is True  # nothing given: nothing changes
    assert reg.update_status("missing", routing_status="offline") is False
    assert reg.update_status("missing") is False


# -- sessions -------------------------------------------------------------------------


def test_session_create_and_close(reg: AnyRegistry) -> None:
    reg.create_session("s1", "t1", None, None, now=100.0)
    assert reg.get_session("s1") == {
        "session_id": "s1", "tenant_id": "t1", "agent_type": None, "metadata": None,
        "created_at": 100.0, "closed_at": None,
    }
    assert reg.close_session("t2", "s1", now=101.0) is False  # another tenant's
    assert must_session(reg, "s1")["closed_at"] is None
    assert reg.close_session("t1", "s1", now=102.0) is True
    assert must_session(reg, "s1")["closed_at"] == 102.0
    assert reg.close_session("t1", "s1", now=103.0) is False  # already closed
    assert must_session(reg, "s1")["closed_at"] == 102.0
    assert reg.close_session("t1", "nope", now=104.0) is False
    assert reg.get_session("nope") is None


def test_session_ids_are_unique(reg: AnyRegistry) -> None:
    reg.create_session("s1", "t1", "nav", {"a": [1, 2]}, now=1.0)
    with pytest.raises(RegistryError, match="already exists"):
        reg.create_session("s1", "t2", None, None, now=2.0)
    assert must_session(reg, "s1")["tenant_id"] == "t1"


def test_in_memory_registries_are_independent() -> None:
    with open_sqlite() as one, open_sqlite() as two:
        one.allow_type("t1", "nav")
        assert two.allowed_types("t1") == frozenset()


# -- choosing a backend --------------------------------------------------------------


def test_open_registry_picks_sqlite_for_paths_and_sqlite_urls(tmp_path: Path) -> None:
    path = tmp_path / "reg.db"
    for label, target in (("path", path), ("text", str(path)), ("url", f"sqlite:///{path}")):
        with open_registry(target, secret_key=KEY, scrypt_n=CHEAP_N) as reg:
            assert isinstance(reg, SqliteRegistry)
            reg.allow_type("t1", label)
    with open_sqlite(path) as reg:  # all three were the same file
        assert reg.allowed_types("t1") == {"path", "text", "url"}
    for target in (":memory:", "sqlite://"):
        with open_registry(target, secret_key=KEY) as reg:
            assert isinstance(reg, SqliteRegistry)


def test_open_registry_picks_postgres_for_its_urls(postgres_url: str) -> None:
    for target in (postgres_url, postgres_url.replace("postgresql://", "postgres://", 1)):
        with open_registry(target, secret_key=KEY, scrypt_n=CHEAP_N, pool_size=1) as reg:
            assert isinstance(reg, PostgresRegistry)


def test_open_registry_refuses_what_it_cannot_open(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mysql://"):
        open_registry("mysql://db/x", secret_key=KEY)
    with pytest.raises(ValueError, match="three slashes"):
        open_registry("sqlite://relative.db", secret_key=KEY)
    with pytest.raises(TypeError, match="pool_size"):  # a PostgreSQL option on SQLite
        open_registry(tmp_path / "reg.db", secret_key=KEY, pool_size=2)
