"""What only the PostgreSQL store does (the shared contract is test_store_contract.py):
its SQL for every write operation, its schema versions, its errors (no password,
retriable when the database is away) and reconnecting after the connection is lost."""

from __future__ import annotations

from typing import Any

import asyncpg
import anyio
import pytest

from tidings.broker.durable.store import (
    CommitOffsets,
    DeleteMessages,
    DeleteQueue,
    DeleteStream,
    ExpireDedup,
    MarkDelivered,
    MarkStreamNext,
    DeleteGroup,
    DeleteSchemaBinding,
    MoveMessages,
    PurgeQueue,
    PutMessages,
    PutQueue,
    PutSchema,
    PutSchemaBinding,
    PutStream,
    SchemaTooNew,
    StorageError,
    TrimStream,
    UpdateMessages,
)
from tidings.broker.durable.store import pg_sql
from tidings.broker.durable.store.base import WriteOp
from tidings.broker.durable.store.postgres import (
    RECONNECT_MAX,
    PostgresStore,
    StorageUnavailable,
    display_url,
    migrate,
)

from tests.pgserver import PgServer, free_port
from tests.storage.storetools import make_row

#: Writes tried while waiting for the store to reconnect: each fails at once until the
#: backoff (at most RECONNECT_MAX) has passed, so this bounds the loop, not the time.
RECONNECT_ATTEMPTS = 200


def test_every_write_operation_has_its_postgresql_statements() -> None:
    """An operation added on the SQLite side (batch.py) without a PostgreSQL form fails here."""
    ops: list[WriteOp] = [
        PutMessages([make_row("q", 1)]), DeleteMessages("q", [1]), UpdateMessages("q", [(1, 2, 3, None)]),
        MoveMessages("q", [(1, make_row("d", 2))]), PutQueue("q", {}, 1), DeleteQueue("q"), PurgeQueue("q"),
        ExpireDedup(1), PutStream("s", {}, 1), DeleteStream("s"), CommitOffsets([("s", "g", 0, 1, 1)]),
        MarkStreamNext([("s", 0, 1)]), TrimStream("s", 0, 1), DeleteGroup("s", "g"),
        PutSchema("S", 1, {"type": "object"}, "backward", 1), PutSchemaBinding("a.>", "S", "reject", None, 1),
        DeleteSchemaBinding("a.>"), MarkDelivered("q", [(-1, 1, 1)]),
    ]
    assert {type(op) for op in ops} == set(WriteOp.__args__)  # type: ignore[attr-defined]
    for op in ops:
        it = pg_sql.prepare(op)
        for sql, _ in it.statements or ():
            assert "$1" in sql and "?" not in sql, sql


def test_urls_are_shown_without_password_or_query() -> None:
    assert display_url("postgresql://u:secret@db.example:6543/tid?sslmode=require") == \
        "postgresql://u@db.example:6543/tid"
    assert display_url("postgres://localhost/x") == "postgresql://localhost:5432/x"
    with pytest.raises(ValueError):
        PostgresStore("sqlite:///x.db")


async def test_unreachable_database_is_one_clear_error_without_the_password(tmp_path) -> None:
    port = free_port()
    store = PostgresStore(f"postgresql://me:hunter2@127.0.0.1:{port}/db", data_dir=tmp_path, connect_timeout=10)
    with pytest.raises(StorageError) as ei:
        await store.open()
    msg = str(ei.value)
    assert msg.startswith(f"cannot connect to postgresql://me@127.0.0.1:{port}/db: ") and "hunter2" not in msg
    assert "\n" not in msg
    assert not store.is_open
    # the data directory's lock was given back: another store may take it
    other = PostgresStore(f"postgresql://me@127.0.0.1:{port}/db", data_dir=tmp_path, connect_timeout=10)
    with pytest.raises(StorageError, match="cannot connect"):
        await other.open()


async def test_schema_is_versioned_and_a_newer_one_is_refused(pg_url) -> None:
    store = PostgresStore(pg_url)
    await store.open()
    await store.close()
    conn = await asyncpg.connect(pg_url)
    try:
        assert await conn.fetchval("SELECT value FROM tidings_meta WHERE key = 'schema_version'") == \
            len(pg_sql.MIGRATIONS)
        # a step added later is applied once, in order
        extra = (*pg_sql.MIGRATIONS, "CREATE TABLE tidings_later (x int)")
        assert await migrate(conn, "db", extra) == len(extra)
        assert await migrate(conn, "db", extra) == len(extra)
        assert await conn.fetchval("SELECT to_regclass('tidings_later') IS NOT NULL")
    finally:
        await conn.close()
    with pytest.raises(SchemaTooNew):
        await PostgresStore(pg_url).open()


async def test_tables_tidings_did_not_make_are_not_touched(pg_url) -> None:
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute("CREATE TABLE tidings_messages (x int)")
    finally:
        await conn.close()
    with pytest.raises(StorageError, match="not a database tidings made"):
        await PostgresStore(pg_url).open()


async def test_lost_connection_fails_retriably_then_reconnects(pg_url) -> None:
    """The writer's connection is killed: the batch in flight fails with a retriable
    StorageUnavailable (nothing confirmed), and later writes reconnect and commit."""
    store = PostgresStore(pg_url)
    await store.open()
    async with anyio.create_task_group() as tg:
        await tg.start(store.run)
        await store.write(PutMessages([make_row("q", 1)]))
        admin = await asyncpg.connect(pg_url)
        try:
            killed = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name = 'tidings' AND datname = current_database()")
        finally:
            await admin.close()
        assert killed == 1
        # The store finds the connection dead either before the next batch (it reconnects
        # at once) or in the middle of it (the batch fails, retriable, and a later one
        # reconnects after the backoff): either way nothing failed is stored.
        failures: list[StorageError] = []
        for i in range(2, 2 + RECONNECT_ATTEMPTS):
            try:
                await store.write(PutMessages([make_row("q", i)]))
                break
            except StorageError as exc:
                failures.append(exc)
                await anyio.sleep(RECONNECT_MAX / 20)  # the backoff runs on the clock
        else:
            raise AssertionError("the store did not reconnect")
        assert all(isinstance(e, StorageUnavailable) and e.retriable for e in failures), failures
        assert store.reconnects == 1
        assert [m.id for m in await store.load_messages("q")] == [1, i]
        await store.close()


async def test_database_stopped_and_started_again(pg_server: PgServer) -> None:
    url = pg_server.new_database()
    store = PostgresStore(url)
    await store.open()
    async with anyio.create_task_group() as tg:
        await tg.start(store.run)
        tg.start_soon(store.watchdog)
        await store.write(PutMessages([make_row("q", 1)]))
        assert store.is_open
        await anyio.to_thread.run_sync(pg_server.stop, "immediate")
        try:
            with pytest.raises(StorageUnavailable):
                await store.write(PutMessages([make_row("q", 2)]))
            assert not store.is_open  # readiness fails while the database is away
            with pytest.raises(StorageError):
                await store.count("q")  # reads fail too, and are retried by their callers
        finally:
            await anyio.to_thread.run_sync(pg_server.restart)
        with anyio.fail_after(120):  # no write needed: the watchdog's probe reconnects
            while not store.is_open:
                await anyio.sleep(0.1)
        assert store.reconnects == 1
        for _ in range(RECONNECT_ATTEMPTS):
            try:
                await store.write(PutMessages([make_row("q", 3)]))
                break
            except StorageUnavailable:
                await anyio.sleep(RECONNECT_MAX / 20)
        else:
            raise AssertionError("the store did not reconnect")
        assert await store.count("q") == 2
        await store.close()
        tg.cancel_scope.cancel()


async def test_durability_sets_synchronous_commit(pg_url) -> None:
    for durability, expected in (("full", "on"), ("normal", "off")):
        store = PostgresStore(pg_url, durability)  # type: ignore[arg-type]
        await store.open()
        try:
            assert store._writer is not None
            assert await store._writer.fetchval("SHOW synchronous_commit") == expected
        finally:
            await store.close()


async def test_connection_lost_mid_transaction_confirms_nothing(pg_url) -> None:
    """The writer's backend dies while its transaction waits on a lock: every op of the
    batch fails with a retriable StorageUnavailable, none of it is stored, and the store
    writes again once reconnected."""
    store = PostgresStore(pg_url)
    await store.open()
    admin = await asyncpg.connect(pg_url)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(store.run)
            await store.write(PutMessages([make_row("q", 1)]))
            await admin.execute("BEGIN; LOCK TABLE tidings_messages IN ACCESS EXCLUSIVE MODE")
            outcomes: list[Exception | None] = []
            store.submit_nowait(PutMessages([make_row("q", 2)], on_done=outcomes.append))
            store.submit_nowait(DeleteMessages("q", [1], on_done=outcomes.append))
            for _ in range(RECONNECT_ATTEMPTS):  # until the batch waits on the lock
                if await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'tidings'"
                                        " AND wait_event_type = 'Lock'"):
                    break
                await anyio.sleep(0.05)
            else:
                raise AssertionError("the batch never waited on the lock")
            assert outcomes == []
            await admin.fetchval("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                                 " WHERE application_name = 'tidings'")
            await admin.execute("ROLLBACK")
            with anyio.fail_after(60):
                while len(outcomes) < 2:
                    await anyio.sleep(0.05)
            assert all(isinstance(e, StorageUnavailable) and e.retriable for e in outcomes), outcomes
            for _ in range(RECONNECT_ATTEMPTS):
                try:
                    await store.write(PutMessages([make_row("q", 3)]))
                    break
                except StorageUnavailable:
                    await anyio.sleep(RECONNECT_MAX / 20)
            assert [m.id for m in await store.load_messages("q")] == [1, 3]
            await store.close()
    finally:
        await admin.close()


async def test_acks_and_delivery_counts_find_their_rows_by_primary_key(pg_url) -> None:
    """The ids of a delete or update are parsed once per statement and, with statistics
    (the store ANALYZEs at open; autovacuum keeps them), are an index condition on
    (queue, id): not a filter over the whole queue (a million-message backlog scanned per
    commit), and never a literal parsed again for each row of the queue."""
    store = PostgresStore(pg_url)
    await store.open()
    async with anyio.create_task_group() as tg:
        await tg.start(store.run)
        await store.write(PutMessages([make_row("q", i) for i in range(1, 5001)]))
        await store.close()
    conn = await asyncpg.connect(pg_url)
    ids = pg_sql.int_array(range(100, 600))
    statements = ((pg_sql.DELETE_MESSAGES, ("q", ids)),
                  (pg_sql.UPDATE_MESSAGES, ("q", ids, pg_sql.int_array([1] * 500), pg_sql.int_array([1] * 500),
                                            [None] * 500)))

    async def plan(sql: str, args: Any) -> list[str]:
        tx = conn.transaction()
        await tx.start()
        try:  # EXPLAIN ANALYZE runs the statement: rolled back
            return [r[0] for r in await conn.fetch("EXPLAIN ANALYZE " + sql, *args)]
        finally:
            await tx.rollback()

    try:
        for sql, args in statements:  # statistics still those of an empty table
            lines = await plan(sql, args)
            assert not any("Filter" in line and "cstring" in line for line in lines), "\n".join(lines)
        store = PostgresStore(pg_url)
        await store.open()  # ANALYZEs
        await store.close()
        for sql, args in statements:
            lines = await plan(sql, args)
            assert any("Index Cond" in line and "id = ANY" in line for line in lines), "\n".join(lines)
            assert any("tidings_messages_pkey" in line for line in lines), "\n".join(lines)
    finally:
        await conn.close()


async def test_second_broker_is_refused_unless_both_are_in_a_cluster(pg_url, tmp_path) -> None:
    """Sharing a database is a choice (`cluster = true`), never an accident."""
    for name in "abcd":
        (tmp_path / name).mkdir()
    first = PostgresStore(pg_url, data_dir=tmp_path / "a")
    await first.open()
    try:
        second = PostgresStore(pg_url, data_dir=tmp_path / "b")
        with pytest.raises(StorageError, match="in use by another tidings broker"):
            await second.open()
    finally:
        await first.close()
    shared = [PostgresStore(pg_url, data_dir=tmp_path / n, cluster=True) for n in ("c", "d")]
    for store in shared:
        await store.open()
    try:
        assert all(store.is_open for store in shared)
    finally:
        for store in shared:
            await store.close()


def test_cluster_needs_a_postgresql_store(tmp_path) -> None:
    from tidings.broker.config import Config, ConfigError
    with pytest.raises(ConfigError, match="cluster = true needs a shared postgresql"):
        Config(data_dir=str(tmp_path), cluster=True).validate()


async def test_delivery_mark_recovery_walks_an_index_up_to_the_mark(pg_url) -> None:
    """Recovery applies each delivery mark as a range of the queue's (available_ms, id)
    index up to the mark, not as a scan of every message of every queue."""
    from tidings.broker.durable.store.pg_reads import RECOVER_PLAIN

    store = PostgresStore(pg_url)
    await store.open()
    async with anyio.create_task_group() as tg:
        await tg.start(store.run)
        await store.write(PutMessages([make_row("q", i, available_ms=1000 + i) for i in range(1, 5001)]))
        await store.write(MarkDelivered("q", [(-1, 1100, 100)]))
        await store.close()
    store = PostgresStore(pg_url)
    await store.open()  # ANALYZEs, and applies the mark
    try:
        got = {m.id: m.deliveries for m in await store.load_messages("q", limit=200)}
        assert got == {i: 1 if i <= 100 else 0 for i in range(1, 201)}
    finally:
        await store.close()
    conn = await asyncpg.connect(pg_url)
    try:
        tx = conn.transaction()
        await tx.start()
        try:
            lines = [r[0] for r in await conn.fetch("EXPLAIN ANALYZE " + RECOVER_PLAIN, "q", 1100, 100)]
        finally:
            await tx.rollback()
        assert any("Index Cond" in line and "available_ms" in line for line in lines), "\n".join(lines)
    finally:
        await conn.close()
