"""The SQLite schema, as an ordered list of migrations keyed by PRAGMA user_version.

`MIGRATIONS[i]` is the SQL that takes a database from version i to i+1, so the
current version is `len(MIGRATIONS)`. To change the schema, append a step;
never edit a step that has shipped. Each step runs in one transaction together
with the user_version bump: it is applied completely or not at all.
"""

from __future__ import annotations

import logging
import sqlite3
from typing import Final

import aiosqlite

from tidings.broker.durable.store.base import SchemaTooNew, StorageError
from tidings.broker.durable.store.schemas import MIGRATION_SCHEMAS
from tidings.broker.durable.store.streams import MIGRATION_STREAM_NEXT, MIGRATION_V2

log = logging.getLogger(__name__)

#: PRAGMA application_id of a tidings database ("TIDG"): tells our files from
#: any other SQLite file someone points the data directory at.
APPLICATION_ID: Final = 0x54494447

_V1: Final = f"""
PRAGMA application_id = {APPLICATION_ID};

CREATE TABLE queues (
    name       TEXT PRIMARY KEY,
    config     TEXT NOT NULL,          -- JSON object of the queue's settings
    created_ms INTEGER NOT NULL
) WITHOUT ROWID;

-- Clustered on (queue, id): rows of one queue sit together and new ids append.
CREATE TABLE messages (
    queue        TEXT NOT NULL,
    id           INTEGER NOT NULL,
    subject      TEXT NOT NULL,
    payload      BLOB NOT NULL,
    headers      BLOB,                 -- msgpack map, or NULL
    msg_id       TEXT,
    published_ms INTEGER NOT NULL,
    available_ms INTEGER NOT NULL,
    expires_ms   INTEGER,
    deliveries   INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT,
    PRIMARY KEY (queue, id)
) WITHOUT ROWID;
-- Delivery order: page a queue's backlog by (available_ms, id).
CREATE INDEX messages_due ON messages (queue, available_ms, id);

CREATE TABLE dedup (
    msg_id     TEXT PRIMARY KEY,
    expires_ms INTEGER NOT NULL,
    result     BLOB NOT NULL           -- msgpack of what the original publish confirmed
) WITHOUT ROWID;
CREATE INDEX dedup_expiry ON dedup (expires_ms);

-- Small named counters. max_message_id is a high-water mark, so ids are never
-- reused even after every message has been deleted.
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO meta (key, value) VALUES ('max_message_id', 0);
"""

#: Priority queues (settings.QueueConfig.max_priority): each message's priority,
#: NULL in a plain queue. A priority queue pages each priority in (available_ms,
#: id) order; the index is partial, so plain queues' inserts pay nothing for it.
MIGRATION_PRIORITY: Final = """
ALTER TABLE messages ADD COLUMN priority INTEGER;
CREATE INDEX messages_priority ON messages (queue, priority, available_ms, id) WHERE priority IS NOT NULL;
"""

#: Delivery marks (store.base.MarkDelivered): per queue lane (-1: a plain queue,
#: else the priority), the highest (available_ms, id) delivered for the first
#: time. Recovery counts the messages at or below it with deliveries 0 as
#: delivered once, so a first delivery writes no row of its own.
MIGRATION_MARKS: Final = """
CREATE TABLE queue_marks (
    queue        TEXT NOT NULL,
    lane         INTEGER NOT NULL,
    available_ms INTEGER NOT NULL,
    id           INTEGER NOT NULL,
    PRIMARY KEY (queue, lane)
) WITHOUT ROWID;
"""

MIGRATIONS: tuple[str, ...] = (
    _V1,  # 0 -> 1: queues, messages, dedup, meta
    MIGRATION_V2,  # 1 -> 2: streams, stream_messages, stream_floors, stream_offsets
    MIGRATION_STREAM_NEXT,  # 2 -> 3: stream_next (offsets assigned by failed tail writes)
    MIGRATION_SCHEMAS,  # 3 -> 4: schemas, schema_bindings (the schema registry)
    MIGRATION_PRIORITY,  # 4 -> 5: messages.priority and its partial index (priority queues)
    MIGRATION_MARKS,  # 5 -> 6: queue_marks (delivery counts persisted per batch)
)


async def migrate(conn: aiosqlite.Connection, path: str, steps: tuple[str, ...] | None = None) -> int:
    """Bring the database on `conn` to `len(steps)` (default: MIGRATIONS) and return that version.

    Raises SchemaTooNew if the database is newer than `steps`, and StorageError
    if it is not a tidings database or a step fails (the failed step leaves no trace).
    """
    if steps is None:
        steps = MIGRATIONS  # looked up at call time, so tests can add a step
    version = await _pragma_int(conn, "user_version")
    target = len(steps)
    if version > target:
        raise SchemaTooNew(
            f"{path} has schema version {version}, but this tidings understands versions up to "
            f"{target}; it was written by a newer tidings. Refusing to open it: upgrade tidings "
            "or point it at another data directory.")
    app_id = await _pragma_int(conn, "application_id")
    if app_id not in (0, APPLICATION_ID) or (version == 0 and await _has_tables(conn)):
        raise StorageError(f"{path} is an SQLite database but not a tidings one; refusing to touch it")
    for v in range(version, target):
        log.info("migrating %s from schema version %d to %d", path, v, v + 1)
        script = f"BEGIN IMMEDIATE;\n{steps[v]}\nPRAGMA user_version = {v + 1};\nCOMMIT;"
        try:
            await conn.executescript(script)
        except sqlite3.Error as exc:
            if conn.in_transaction:
                await conn.rollback()
            raise StorageError(f"migrating {path} to schema version {v + 1} failed: {exc}") from exc
    return target


async def _pragma_int(conn: aiosqlite.Connection, name: str) -> int:
    rows = list(await conn.execute_fetchall(f"PRAGMA {name}"))
    return int(rows[0][0])


async def _has_tables(conn: aiosqlite.Connection) -> bool:
    rows = list(await conn.execute_fetchall("SELECT 1 FROM sqlite_master WHERE type = 'table' LIMIT 1"))
    return bool(rows)
