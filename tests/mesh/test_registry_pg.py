"""What only the PostgreSQL registry has: several processes and connections on one database,
a server that can go away and come back, and a driver that must not block gevent's hub.

The behaviour both backends share is tested on both in test_registry.py. A real PostgreSQL
(tests/servers.py), a fresh database per test.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest
from servers import PostgresServer, free_port
from svantic_mesh.model import InstanceRow
from svantic_mesh.registry import InstanceConflict, RegistryError, open_registry
from svantic_mesh.registry_pg import PostgresRegistry

KEY = bytes(range(32))
CHEAP_N = 2**4
SECRET = "s3cr3t-shared-between-processes"
CHILD_TIMEOUT = 60.0


def row(instance_id: str, tenant_id: str = "t1", **changes: object) -> InstanceRow:
    record = InstanceRow(instance_id, tenant_id, "navigator", "connected",
                         dispatch_auth_type="shared_secret", registered_at=1.0)
    for name, value in changes.items():
        setattr(record, name, value)
    return record


def open_pg(url: str, **options: object) -> PostgresRegistry:
    return PostgresRegistry(url, secret_key=KEY, scrypt_n=CHEAP_N, **options)  # type: ignore[arg-type]


@pytest.fixture
def reg(postgres_url: str) -> Iterator[PostgresRegistry]:
    r = open_pg(postgres_url)
    yield r
    r.close()


def run_child(code: str, *args: str) -> str:
    """Run `code` in another Python process (argv[1:] = args); its stdout."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True, text=True, timeout=CHILD_TIMEOUT, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


CHILD_REGISTRY = """
    import json, sys
    from svantic_mesh.model import InstanceRow
    from svantic_mesh.registry import open_registry

    url, key_hex = sys.argv[1], sys.argv[2]
    reg = open_registry(url, secret_key=bytes.fromhex(key_hex), scrypt_n=16)
"""


def test_two_processes_see_each_others_writes(reg: PostgresRegistry, postgres_url: str) -> None:
    reg.put_instance(row("parent-01"), secret=SECRET)
    reg.add_client("parent-client", "parent-pw", "t1")
    out = run_child(CHILD_REGISTRY + """
    seen = {
        "secret": reg.instance_secret("parent-01"),
        "client": reg.verify_client("parent-client", "parent-pw"),
    }
    reg.put_instance(InstanceRow("child-01", "t1", "navigator", "hosted", url="https://c.test",
                                 registered_at=2.0), secret="from-the-child")
    reg.update_status("parent-01", routing_status="busy", last_heartbeat_at=42.0)
    reg.create_session("child-session", "t1", None, {"by": "child"}, now=3.0)
    reg.close()
    print(json.dumps(seen))
    """, postgres_url, KEY.hex())
    # The child read what this process wrote, secrets included (same key) ...
    assert json.loads(out) == {"secret": SECRET, "client": "t1"}
    # ... and this process reads what the child wrote, with no reopening.
    child = reg.get_instance("child-01")
    assert child is not None
    assert (child.url, child.has_secret) == ("https://c.test", True)
    assert reg.instance_secret("child-01") == "from-the-child"
    parent = reg.get_instance("parent-01")
    assert parent is not None
    assert (parent.routing_status, parent.last_heartbeat_at) == ("busy", 42.0)
    session = reg.get_session("child-session")
    assert session is not None
    assert session["metadata"] == {"by": "child"}
    assert [r.instance_id for r in reg.list_instances("t1")] == ["child-01", "parent-01"]


def test_racing_registrations_of_one_id_by_two_tenants_leave_one_owner(
    postgres_url: str,
) -> None:
    """Two connections register the same new id for two tenants at the same moment, many
    times: each time exactly one wins and the other gets InstanceConflict, never an error
    of the database's and never a row moved across tenants."""
    regs = [open_pg(postgres_url, pool_size=1) for _ in range(2)]
    rounds = 40
    barrier = threading.Barrier(2, timeout=30)
    outcomes: list[list[str]] = [[], []]

    def racer(side: int) -> None:
        tenant = f"tenant-{side}"
        for n in range(rounds):
            barrier.wait()
            try:
                regs[side].put_instance(row(f"race-{n}", tenant), secret=f"{tenant}-{n}")
                outcomes[side].append(tenant)
            except InstanceConflict:
                outcomes[side].append("conflict")
            except Exception as exc:  # anything else fails the test below
                outcomes[side].append(repr(exc))

    threads = [threading.Thread(target=racer, args=(side,)) for side in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
        assert not thread.is_alive()
    try:
        for n in range(rounds):
            results = {outcomes[0][n], outcomes[1][n]}
            stored = regs[0].get_instance(f"race-{n}")
            assert stored is not None
            assert results == {stored.tenant_id, "conflict"}, (n, results)
            # The winner's secret, bound to the winner's tenant, decrypts.
            assert regs[1].instance_secret(f"race-{n}") == f"{stored.tenant_id}-{n}"
    finally:
        for r in regs:
            r.close()


def test_concurrent_upserts_and_status_writes_of_one_tenant_all_land(
    postgres_url: str,
) -> None:
    """Re-registrations and status writes of one instance from several connections at once:
    no write fails, and each status column ends with a value some writer wrote."""
    regs = [open_pg(postgres_url, pool_size=2) for _ in range(3)]
    regs[0].put_instance(row("shared-01"))
    errors: list[BaseException] = []
    barrier = threading.Barrier(6, timeout=30)

    def upserter(r: PostgresRegistry, n: int) -> None:
        barrier.wait()
        try:
            for i in range(30):
                r.put_instance(row("shared-01", url=f"https://w{n}.test/{i}"))
        except BaseException as exc:
            errors.append(exc)

    def heartbeat(r: PostgresRegistry, n: int) -> None:
        barrier.wait()
        try:
            for i in range(30):
                assert r.update_status("shared-01", last_heartbeat_at=float(n * 100 + i))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=upserter, args=(r, n)) for n, r in enumerate(regs)]
    threads += [threading.Thread(target=heartbeat, args=(r, n)) for n, r in enumerate(regs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
        assert not thread.is_alive()
    try:
        assert errors == []
        got = regs[1].get_instance("shared-01")
        assert got is not None
        assert got.url in {f"https://w{n}.test/29" for n in range(3)}
        assert [r.instance_id for r in regs[2].list_instances()] == ["shared-01"]
    finally:
        for r in regs:
            r.close()


def test_processes_starting_together_migrate_once(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="svantic.mesh.registry")
    opened: list[PostgresRegistry] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4, timeout=30)

    def start() -> None:
        barrier.wait()
        try:
            opened.append(open_pg(postgres_url, pool_size=1))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    try:
        assert errors == []
        assert len(opened) == 4
        assert {r.schema_version for r in opened} == {1}
        migrated = [r for r in caplog.records if "migrated" in r.getMessage()]
        assert len(migrated) == 1
    finally:
        for r in opened:
            r.close()


def test_an_unreachable_server_is_a_registry_error_soon() -> None:
    url = f"postgresql://svantic@127.0.0.1:{free_port()}/nothing"
    started = time.monotonic()
    with pytest.raises(RegistryError, match="cannot reach"):
        open_pg(url, connect_timeout=1)
    assert time.monotonic() - started < 5


def test_a_restarted_server_is_reconnected_and_calls_meanwhile_fail_fast(
    postgres_server: PostgresServer, postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="svantic.mesh.registry")
    reg = open_pg(postgres_url, pool_size=3, connect_timeout=1, retry_interval=0.3)
    try:
        reg.put_instance(row("r-01"), secret=SECRET)
        # Fill the pool with open connections, all of which the restart will kill.
        barrier = threading.Barrier(3, timeout=30)

        def use() -> None:
            barrier.wait()
            reg.get_instance("r-01")

        users = [threading.Thread(target=use) for _ in range(3)]
        for thread in users:
            thread.start()
        for thread in users:
            thread.join(timeout=30)
        postgres_server.stop()
        try:
            started = time.monotonic()
            with pytest.raises(RegistryError):
                reg.get_instance("r-01")
            assert time.monotonic() - started < 5  # bounded by connect_timeout
            started = time.monotonic()
            with pytest.raises(RegistryError, match="a moment ago"):
                reg.update_status("r-01", routing_status="offline")
            assert time.monotonic() - started < 0.2  # no new attempt within retry_interval
        finally:
            postgres_server.start()
        deadline = time.monotonic() + 10
        while True:  # bounded: the retry interval is 0.3 s
            try:
                assert reg.instance_secret("r-01") == SECRET
                break
            except RegistryError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert reg.update_status("r-01", routing_status="offline")
        # One line when it went, one when it came back: not one per failed call.
        assert caplog.text.count("unreachable") == 1
        assert caplog.text.count("reachable again") == 1
    finally:
        reg.close()


def test_a_transaction_on_a_connection_killed_by_a_restart_runs_again(
    postgres_server: PostgresServer, reg: PostgresRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    """The pooled connection died while idle (a quick restart): the write, a transaction of
    several statements, is run once on a new connection, and applied once."""
    caplog.set_level(logging.INFO, logger="svantic.mesh.registry")
    reg.allow_type("t1", "navigator")  # leaves one idle connection in the pool
    postgres_server.stop()
    postgres_server.start()
    reg.put_instance(row("after-restart"), secret=SECRET)
    reg.create_session("after-restart", "t1", None, None, now=1.0)
    assert reg.instance_secret("after-restart") == SECRET
    assert [r.instance_id for r in reg.list_instances()] == ["after-restart"]
    assert "connection lost" in caplog.text


def test_a_write_blocked_by_a_row_lock_times_out(
    reg: PostgresRegistry, postgres_url: str
) -> None:
    """A row held by a stuck transaction elsewhere fails the write within the statement
    timeout instead of holding the mesh's event loop."""
    quick = open_pg(postgres_url, statement_timeout=0.3, pool_size=1)
    reg.put_instance(row("locked-01"))
    try:
        with psycopg.connect(postgres_url) as other:  # a transaction left open
            other.execute("SELECT 1 FROM instances WHERE instance_id = 'locked-01' FOR UPDATE")
            started = time.monotonic()
            with pytest.raises(RegistryError, match="statement timeout"):
                quick.update_status("locked-01", routing_status="busy")
            assert 0.25 < time.monotonic() - started < 3
            other.rollback()
        assert quick.update_status("locked-01", routing_status="busy")  # usable again
        got = reg.get_instance("locked-01")
        assert got is not None
        assert got.routing_status == "busy"
    finally:
        quick.close()


def test_ids_sort_bytewise_whatever_the_database_locale(postgres_server: PostgresServer) -> None:
    """Pages come in the same order as on SQLite (byte order), even in a database whose
    collation would sort "a" before "B" (ICU English)."""
    name = "icu_english"
    admin = postgres_server.url_for("postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        try:
            conn.execute(
                f"CREATE DATABASE {name} TEMPLATE template0 LOCALE_PROVIDER icu "
                "ICU_LOCALE 'en-US' LOCALE 'C'"
            )
        except psycopg.errors.FeatureNotSupported:
            pytest.skip("this PostgreSQL is built without ICU")
    try:
        url = postgres_server.url_for(name)
        with psycopg.connect(url) as conn:  # the database's own order differs from bytes
            words = [r[0] for r in conn.execute(
                "SELECT w FROM (VALUES ('a'), ('B'), ('_c')) AS v(w) ORDER BY w")]
            assert words != sorted(words)
        with open_registry(url, secret_key=KEY, scrypt_n=CHEAP_N) as reg:
            ids = ["a-1", "B-1", "_c", "b-0", "A-2", "é"]
            for instance_id in ids:
                reg.put_instance(row(instance_id))
            assert [r.instance_id for r in reg.list_instances("t1")] == sorted(ids)
            first = [r.instance_id for r in reg.list_instances("t1", limit=3)]
            rest = [r.instance_id for r in reg.list_instances("t1", after=first[-1])]
            assert first + rest == sorted(ids)
    finally:
        postgres_server.drop_database(name)


GEVENT_CHILD = """
    from gevent import monkey

    monkey.patch_all()  # before psycopg is imported: it then waits with gevent's select
    import sys, time

    import gevent
    import gevent.event
    import psycopg
    from svantic_mesh.model import InstanceRow
    from svantic_mesh.registry import open_registry

    url = sys.argv[1]
    reg = open_registry(url, secret_key=bytes(32), scrypt_n=16)
    reg.put_instance(InstanceRow("g-01", "t1", "navigator", "connected"))
    ticks = 0
    stop = False

    def ticker():
        global ticks
        while not stop:
            ticks += 1
            gevent.sleep(0.01)

    def holder(locked):
        with psycopg.connect(url) as other:
            other.execute("SELECT 1 FROM instances WHERE instance_id = 'g-01' FOR UPDATE")
            locked.set()
            gevent.sleep(0.5)  # the registry's write waits on this lock meanwhile
            other.rollback()

    locked = gevent.event.Event()
    tick = gevent.spawn(ticker)
    hold = gevent.spawn(holder, locked)
    locked.wait(10)
    before = ticks
    started = time.monotonic()
    updated = reg.update_status("g-01", routing_status="busy")  # blocks ~0.5 s on the lock
    waited = time.monotonic() - started
    stop = True
    gevent.joinall([tick, hold], timeout=10)
    print(updated, round(waited, 2), ticks - before)
"""


def test_under_gevent_a_waiting_query_lets_other_greenlets_run(postgres_url: str) -> None:
    """The registry's write waits 0.5 s on a row lock another greenlet holds: the hub keeps
    running (the holder commits, a ticker ticks), so the write succeeds. A driver blocking in
    C would freeze the holder too, and the write would end in the statement timeout."""
    pytest.importorskip("gevent")
    updated, waited, ticks = run_child(GEVENT_CHILD, postgres_url).split()
    assert updated == "True"
    assert 0.4 < float(waited) < 4.5
    assert int(ticks) >= 20  # ~50 when nothing blocks the hub


def test_a_forked_worker_opens_its_own_connections(
    reg: PostgresRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    """A mesh may open its registry, then fork workers: a child must not talk on the
    parent's sockets (that corrupts both sessions) nor close them (that ends the parent's)."""
    caplog.set_level(logging.INFO, logger="svantic.mesh.registry")
    reg.put_instance(row("before-fork"))
    pid = os.fork()
    if pid == 0:  # the child: exit status says whether the registry worked here
        code = 1
        try:
            found = reg.get_instance("before-fork")
            reg.put_instance(row("from-child"))
            reg.close()  # a worker shutting down
            code = 0 if found is not None else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # The parent's pooled connection still works, and sees the child's write.
    assert [r.instance_id for r in reg.list_instances("t1")] == ["before-fork", "from-child"]
    assert reg.update_status("before-fork", routing_status="busy")
    assert "connection lost" not in caplog.text  # the same session as before the fork
