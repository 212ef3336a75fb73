"""Schema versions: create, migrate forward, refuse what is newer or not ours."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tidings.broker.durable.store import PutMessages, SchemaTooNew, SqliteStore, StorageError, migrations

# The version-1 schema exactly as it shipped, written out by hand: a database that
# an older tidings created. If MIGRATIONS[0] is edited, test_fresh_matches_v1 fails.
V1_BY_HAND = """
PRAGMA application_id = 1414087751;
CREATE TABLE queues (name TEXT PRIMARY KEY, config TEXT NOT NULL, created_ms INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE messages (
    queue TEXT NOT NULL, id INTEGER NOT NULL, subject TEXT NOT NULL, payload BLOB NOT NULL, headers BLOB,
    msg_id TEXT, published_ms INTEGER NOT NULL, available_ms INTEGER NOT NULL, expires_ms INTEGER,
    deliveries INTEGER NOT NULL DEFAULT 0, last_error TEXT, PRIMARY KEY (queue, id)) WITHOUT ROWID;
CREATE INDEX messages_due ON messages (queue, available_ms, id);
CREATE TABLE dedup (msg_id TEXT PRIMARY KEY, expires_ms INTEGER NOT NULL, result BLOB NOT NULL) WITHOUT ROWID;
CREATE INDEX dedup_expiry ON dedup (expires_ms);
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO meta (key, value) VALUES ('max_message_id', 0);
PRAGMA user_version = 1;
"""


def make_v1(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    conn.executescript(V1_BY_HAND)
    conn.execute("INSERT INTO queues VALUES ('orders', '{\"max_deliveries\":3}', 17)")
    conn.execute("INSERT INTO messages (queue, id, subject, payload, published_ms, available_ms)"
                 " VALUES ('orders', 5, 'orders.new', x'00ff', 1, 2)")
    conn.execute("UPDATE meta SET value = 5")
    conn.commit()
    conn.close()


def shape(path: Path) -> dict[str, list[tuple[object, ...]]]:
    """Tables and indexes with their columns: what the code relies on."""
    conn = sqlite3.connect(path)
    try:
        out = {}
        for kind, name in conn.execute("SELECT type, name FROM sqlite_master ORDER BY name"):
            pragma = "table_xinfo" if kind == "table" else "index_info"
            out[f"{kind}:{name}"] = [tuple(r) for r in conn.execute(f"PRAGMA {pragma}({name})")]
        return out
    finally:
        conn.close()


def version(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("PRAGMA user_version").fetchone()[0]
    finally:
        conn.close()


async def test_fresh_database_gets_the_current_schema(open_store, db_path):
    assert not db_path.parent.exists()
    async with open_store():
        pass
    assert version(db_path) == len(migrations.MIGRATIONS)


async def test_fresh_matches_a_migrated_v1(open_store, db_path, tmp_path):
    """A new database and one created by the previous schema and then
    migrated have exactly the same shape."""
    async with open_store():
        pass
    from tidings.broker.durable.store.sqlite import SqliteStore
    old = tmp_path / "v1" / "tidings.db"
    old.parent.mkdir()
    make_v1(old)
    s2 = SqliteStore(old)
    await s2.open()
    await s2.close()
    assert shape(db_path) == shape(old)


async def test_v1_database_opens_with_its_data(open_store, db_path, row):
    make_v1(db_path)
    async with open_store() as store:
        assert await store.load_queues() == [("orders", {"max_deliveries": 3}, 17)]
        [m] = await store.load_messages("orders")
        assert (m.id, m.payload, m.headers, m.deliveries) == (5, b"\x00\xff", None, 0)
        assert m.priority is None  # messages from before priority queues: a plain queue's
        assert await store.count("orders", priority=0) == 0
        assert await store.max_message_id() == 5
        await store.write(PutMessages([row("orders", 6)]))
        assert await store.load_streams() == []
    assert version(db_path) == len(migrations.MIGRATIONS)


async def test_previous_version_is_migrated(open_store, db_path, monkeypatch):
    """A database two versions back is brought to the newest, keeping its data
    (v1 -> v2 streams -> a test v3 step)."""
    make_v1(db_path)
    step3 = "CREATE TABLE test_step (name TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID;"
    newest = len(migrations.MIGRATIONS) + 1
    monkeypatch.setattr(migrations, "MIGRATIONS", (*migrations.MIGRATIONS, step3))
    async with open_store() as store:
        assert [m.id for m in await store.load_messages("orders")] == [5]
        assert (await store._fetch("SELECT count(*) FROM test_step"))[0][0] == 0
        assert (await store._fetch("SELECT count(*) FROM streams"))[0][0] == 0
    assert version(db_path) == newest


async def test_failed_migration_leaves_no_trace(open_store, db_path, monkeypatch):
    make_v1(db_path)
    bad = "CREATE TABLE test_step (name TEXT PRIMARY KEY);\nTHIS IS NOT SQL;"
    current = len(migrations.MIGRATIONS)
    monkeypatch.setattr(migrations, "MIGRATIONS", (*migrations.MIGRATIONS, bad))
    with pytest.raises(StorageError, match=f"schema version {current + 1} failed"):
        async with open_store():
            pass
    assert version(db_path) == current
    assert "table:test_step" not in shape(db_path)
    monkeypatch.undo()
    async with open_store() as store:  # and the lock was released
        assert await store.count("orders") == 1


async def test_newer_version_is_refused(db_path):
    make_v1(db_path)
    conn = sqlite3.connect(db_path)
    conn.execute("PRAGMA user_version = 7")
    conn.close()
    store = SqliteStore(db_path)
    with pytest.raises(SchemaTooNew, match=rf"schema version 7.*up to {len(migrations.MIGRATIONS)}.*newer tidings"):
        await store.open()
    assert version(db_path) == 7


async def test_foreign_database_is_refused(db_path):
    db_path.parent.mkdir(parents=True)
    conn = sqlite3.connect(db_path)
    conn.execute("CREATE TABLE users (name TEXT)")
    conn.commit()
    conn.close()
    with pytest.raises(StorageError, match="not a tidings one"):
        await SqliteStore(db_path).open()
    assert "table:queues" not in shape(db_path)
