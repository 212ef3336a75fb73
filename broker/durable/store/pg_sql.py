"""PostgreSQL's side of the store: the schema steps, the write statements and
how a batch's stages run on one connection (PostgresStore's transaction).

The write path reuses batch.py: `prepare(op)` encodes an operation once at
submit and `plan(items)` cuts a batch into stages whose in-order execution ends
as if every operation had run in submission order. Here a stage costs a few
statements whatever its size: inserts go by binary COPY, dedup entries and group
offsets as one array per column expanded with `unnest`, updates and deletes as
one statement per queue with the ids as one array (one round trip for 20,000
rows). Whole-table operations (declare, purge, delete, trim...) carry
SQLite statements from batch.py/streams.py; PG_STATEMENTS gives each its
PostgreSQL form, so a new operation needs one line here besides its SQLite SQL
(prepare fails with TypeError, and tests/storage/test_store_postgres.py fails,
for a statement that has none).

Set-based statements see a stage's rows at once, not one after another, so
what SQLite's executemany did by running them in order is done before sending:
two updates of one message keep the last, two dedup entries for one msg_id keep
the last, two offset commits for one (stream, group, partition) keep the
highest values. A duplicate key among inserts still fails the statement (and
the store then isolates the operation that caused it).

Tables are prefixed `tidings_` so that the store can live in a database (and a
schema, through the URL's search_path) that holds other tables too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from tidings.broker.durable.store import batch, schemas, streams
from tidings.broker.durable.store.base import WriteOp
from tidings.broker.durable.store.batch import Item, Stage

if TYPE_CHECKING:
    import asyncpg

#: The schema, one step per version: MIGRATIONS[i] takes a database from version i
#: to i + 1 (recorded in tidings_meta under 'schema_version'). Append steps; never
#: edit one that has shipped. A step runs in one transaction with its version bump.
_V1: Final = """
CREATE TABLE tidings_meta (
    key   text PRIMARY KEY,
    value bigint NOT NULL
);
-- max_message_id: a high-water mark, so ids are never reused after deletes.
INSERT INTO tidings_meta (key, value) VALUES ('schema_version', 0), ('max_message_id', 0);

CREATE TABLE tidings_queues (
    name       text PRIMARY KEY,
    config     text NOT NULL,            -- JSON object of the queue's settings
    created_ms bigint NOT NULL
);

CREATE TABLE tidings_messages (
    queue        text NOT NULL,
    id           bigint NOT NULL,
    subject      text NOT NULL,
    payload      bytea NOT NULL,
    headers      bytea,                  -- msgpack map, or NULL
    msg_id       text,
    published_ms bigint NOT NULL,
    available_ms bigint NOT NULL,
    expires_ms   bigint,
    deliveries   integer NOT NULL DEFAULT 0,
    last_error   text,
    PRIMARY KEY (queue, id)
) WITH (fillfactor = 80);
-- fillfactor: room on each page for the delivery-count update every delivery makes, so that
-- it is a HOT update (no new index entries: neither indexed column changes).
-- Delivery order: page a queue's backlog by (available_ms, id).
CREATE INDEX tidings_messages_due ON tidings_messages (queue, available_ms, id);

CREATE TABLE tidings_dedup (
    msg_id     text PRIMARY KEY,
    expires_ms bigint NOT NULL,
    result     bytea NOT NULL            -- msgpack of what the original publish confirmed
);
CREATE INDEX tidings_dedup_expiry ON tidings_dedup (expires_ms);

CREATE TABLE tidings_streams (
    name       text PRIMARY KEY,
    config     text NOT NULL,
    created_ms bigint NOT NULL
);

CREATE TABLE tidings_stream_messages (
    stream       text NOT NULL,
    partition    integer NOT NULL,
    "offset"     bigint NOT NULL,
    subject      text NOT NULL,
    key          text,
    payload      bytea NOT NULL,
    headers      bytea,
    msg_id       text,
    timestamp_ms bigint NOT NULL,
    PRIMARY KEY (stream, partition, "offset")
);
-- Replay from a point in time.
CREATE INDEX tidings_stream_messages_time ON tidings_stream_messages (stream, partition, timestamp_ms);

-- The lowest offset each partition keeps after retention (offsets are never reused).
CREATE TABLE tidings_stream_floors (
    stream    text NOT NULL,
    partition integer NOT NULL,
    first     bigint NOT NULL,
    PRIMARY KEY (stream, partition)
);

CREATE TABLE tidings_stream_offsets (
    stream    text NOT NULL,
    grp       text NOT NULL,
    partition integer NOT NULL,
    committed bigint NOT NULL,
    delivered bigint NOT NULL DEFAULT 0,  -- offsets below were delivered at least once
    PRIMARY KEY (stream, grp, partition)
);

-- A partition's next offset, recorded when a write at its tail failed.
CREATE TABLE tidings_stream_next (
    stream    text NOT NULL,
    partition integer NOT NULL,
    next      bigint NOT NULL,
    PRIMARY KEY (stream, partition)
);
"""

#: 1 -> 2: the schema registry (SQLite's step 3 -> 4, store/schemas.py): a version is
#: immutable once stored (the primary key refuses a second row); a binding is replaced whole.
_V2_SCHEMAS: Final = """
CREATE TABLE tidings_schemas (
    name          text NOT NULL,
    version       integer NOT NULL,
    document      text NOT NULL,          -- the JSON Schema document, as JSON
    compatibility text NOT NULL,
    created_ms    bigint NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE tidings_schema_bindings (
    pattern     text PRIMARY KEY,
    schema      text NOT NULL,
    on_invalid  text NOT NULL,
    dead_letter text,
    created_ms  bigint NOT NULL
);
"""

#: 2 -> 3: priority queues (SQLite's step 4 -> 5): each message's priority, NULL in a
#: plain queue; a priority queue pages each priority in (available_ms, id) order.
_V3_PRIORITY: Final = """
ALTER TABLE tidings_messages ADD COLUMN priority integer;
CREATE INDEX tidings_messages_priority ON tidings_messages (queue, priority, available_ms, id)
    WHERE priority IS NOT NULL;
"""

#: 3 -> 4: several brokers on one database (broker/cluster/, docs/SCALING.md): the membership
#: table (one row per running broker, its lease renewed in database time) and the cluster's
#: settings, of which the route secret (generated by the first broker, read by every other).
_V4_CLUSTER: Final = """
CREATE TABLE tidings_brokers (
    id          text PRIMARY KEY,            -- fresh at each start: a restarted broker is a new member
    address     text NOT NULL,               -- host:port its peers and clients reach it at
    started     timestamptz NOT NULL,
    lease_until timestamptz NOT NULL         -- past it (database time) the broker is dead
);
CREATE TABLE tidings_cluster (
    key   text PRIMARY KEY,
    value text NOT NULL
);
"""

#: 4 -> 5: streams across brokers (cluster mode, pg_cluster.py): each partition's next
#: offset as one counter row, locked by the transaction that appends to the partition
#: (dense offsets in commit order whichever broker publishes); consumer groups spanning
#: brokers: the group row (its generation; locked by the one broker that computes an
#: assignment), each member's lease, and each partition's owner with the generation
#: that gave it (offset commits are fenced by it).
_V5_CLUSTER_STREAMS: Final = """
CREATE TABLE tidings_stream_heads (
    stream    text NOT NULL,
    partition integer NOT NULL,
    next      bigint NOT NULL,              -- every offset below is taken by a committed row
    PRIMARY KEY (stream, partition)
);
CREATE TABLE tidings_groups (
    stream     text NOT NULL,
    grp        text NOT NULL,
    generation bigint NOT NULL,
    members    text[] NOT NULL,             -- the live members the generation was computed for
    PRIMARY KEY (stream, grp)
);
CREATE TABLE tidings_group_members (
    stream      text NOT NULL,
    grp         text NOT NULL,
    member      text NOT NULL,              -- broker id / member number
    lease_until timestamptz NOT NULL,       -- database time: the member is dead after it
    PRIMARY KEY (stream, grp, member)
);
CREATE TABLE tidings_group_parts (
    stream     text NOT NULL,
    grp        text NOT NULL,
    partition  integer NOT NULL,
    owner      text,                        -- a member, or NULL
    generation bigint NOT NULL,             -- the generation that gave it to its owner
    PRIMARY KEY (stream, grp, partition)
);
"""

#: 5 -> 6: delivery marks (SQLite's step 5 -> 6, store.base.MarkDelivered): per queue
#: lane (-1: a plain queue, else the priority) the highest (available_ms, id) delivered
#: for the first time; recovery counts the messages at or below it with 0 deliveries once.
_V6_MARKS: Final = """
CREATE TABLE tidings_queue_marks (
    queue        text NOT NULL,
    lane         integer NOT NULL,
    available_ms bigint NOT NULL,
    id           bigint NOT NULL,
    PRIMARY KEY (queue, lane)
);
"""

#: 6 -> 7: shared durable queues (issue 13, pg_claims.py): who holds a claimed
#: message (its claim lasts until available_ms, the visibility deadline) and the catalog
#: version every declare/delete/update bumps and every broker polls.
_V7_CLUSTER_QUEUES: Final = """
ALTER TABLE tidings_messages ADD COLUMN claimed_by text;
INSERT INTO tidings_meta (key, value) VALUES ('catalog_version', 0) ON CONFLICT (key) DO NOTHING;
"""

MIGRATIONS: tuple[str, ...] = (
    _V1,  # 0 -> 1: meta, queues, messages, dedup, streams and their rows, floors, offsets, next marks
    _V2_SCHEMAS,  # 1 -> 2: tidings_schemas, tidings_schema_bindings (the schema registry)
    _V3_PRIORITY,  # 2 -> 3: tidings_messages.priority and its partial index (priority queues)
    _V4_CLUSTER,  # 3 -> 4: tidings_brokers (membership leases), tidings_cluster (the route secret)
    _V5_CLUSTER_STREAMS,  # 4 -> 5: stream heads, shared consumer groups (several brokers)
    _V6_MARKS,  # 5 -> 6: tidings_queue_marks (delivery counts persisted per batch)
    _V7_CLUSTER_QUEUES,  # 6 -> 7: tidings_messages.claimed_by, tidings_meta catalog_version (several brokers)
)

#: Every table of the schema (a database holding some of them but no tidings_meta is
#: not one tidings made, and is refused).
TABLES: Final = ("tidings_meta", "tidings_queues", "tidings_messages", "tidings_dedup", "tidings_streams",
                 "tidings_stream_messages", "tidings_stream_floors", "tidings_stream_offsets",
                 "tidings_stream_next", "tidings_schemas", "tidings_schema_bindings",
                 "tidings_brokers", "tidings_cluster",
                 "tidings_stream_heads", "tidings_groups", "tidings_group_members", "tidings_group_parts",
                 "tidings_queue_marks")

#: The tables the store ANALYZEs when it opens (those that grow and shrink by the million).
ANALYZED: Final = ("tidings_messages", "tidings_stream_messages", "tidings_dedup")

#: pg_advisory_xact_lock key held while migrating ("TIDM"): brokers that start together
#: on one database migrate it one after the other.
MIGRATION_LOCK: Final = 0x5449444D

# --- the set-based statements of a stage (one array per column) ----------------------

#: Columns of the rows batch.encode_row and streams.encode_stream_row build, in order:
#: inserts go by binary COPY (asyncpg encodes a record per row in C; arrays of
#: parameters cost it Python-level type checks per element, 3x slower end to end).
MESSAGE_COLUMNS: Final = ("queue", "id", "subject", "payload", "headers", "msg_id", "published_ms",
                          "available_ms", "expires_ms", "deliveries", "last_error", "priority")
STREAM_COLUMNS: Final = ("stream", "partition", "offset", "subject", "key", "payload", "headers", "msg_id",
                         "timestamp_ms")
UPSERT_DEDUP: Final = (
    "INSERT INTO tidings_dedup (msg_id, expires_ms, result)"
    " SELECT * FROM unnest($1::text[], $2::bigint[], $3::bytea[])"
    " ON CONFLICT (msg_id) DO UPDATE SET expires_ms = excluded.expires_ms, result = excluded.result")
# Per queue (a batch's acks and deliveries touch few queues); integer columns go as one
# array literal each ('{1,2,3}'), which the server parses: no per-element work in asyncpg.
# The ids are parsed once, in a scalar subquery (an InitPlan): written as a plain cast,
# the literal was parsed again for every row of the queue and the primary key was not
# used (seen with EXPLAIN ANALYZE); as a subquery they are an index condition on it.
IDS: Final = "(SELECT $2::text::bigint[])::bigint[]"
UPDATE_MESSAGES: Final = (
    "UPDATE tidings_messages AS m SET available_ms = u.a, deliveries = u.d, last_error = u.e"
    " FROM unnest($2::text::bigint[], $3::text::bigint[], $4::text::integer[], $5::text[]) AS u(i, a, d, e)"
    f" WHERE m.queue = $1 AND m.id = ANY({IDS}) AND m.id = u.i")
DELETE_MESSAGES: Final = f"DELETE FROM tidings_messages WHERE queue = $1 AND id = ANY({IDS})"
UPSERT_OFFSETS: Final = (
    "INSERT INTO tidings_stream_offsets AS o (stream, grp, partition, committed, delivered)"
    " SELECT * FROM unnest($1::text[], $2::text[], $3::integer[], $4::bigint[], $5::bigint[])"
    " ON CONFLICT (stream, grp, partition) DO UPDATE SET"
    " committed = GREATEST(o.committed, excluded.committed), delivered = GREATEST(o.delivered, excluded.delivered)")
UPSERT_MARKS: Final = (
    "INSERT INTO tidings_queue_marks AS k (queue, lane, available_ms, id)"
    " SELECT * FROM unnest($1::text[], $2::integer[], $3::bigint[], $4::bigint[])"
    " ON CONFLICT (queue, lane) DO UPDATE SET available_ms = excluded.available_ms, id = excluded.id"
    " WHERE (excluded.available_ms, excluded.id) > (k.available_ms, k.id)")
RAISE_MAX_ID: Final = "UPDATE tidings_meta SET value = $1 WHERE key = 'max_message_id' AND value < $1"
#: Several brokers (cluster mode): a msg_id's de-dup entry must be inserted by one broker
#: only, so the upsert becomes a plain insert (a second broker's copy fails with a unique
#: violation and the store isolates its operation); an expired entry not swept yet is
#: dropped first so that it does not refuse a new publish.
DROP_EXPIRED_DEDUP: Final = "DELETE FROM tidings_dedup WHERE msg_id = ANY($1::text[]) AND expires_ms <= $2"
INSERT_DEDUP: Final = ("INSERT INTO tidings_dedup (msg_id, expires_ms, result)"
                       " SELECT * FROM unnest($1::text[], $2::bigint[], $3::bytea[])")

#: The PostgreSQL form of each whole-table statement batch.py and streams.py prepare
#: (same parameters, same order).
PG_STATEMENTS: Final[dict[str, str]] = {
    batch.UPSERT_QUEUE: ("INSERT INTO tidings_queues (name, config, created_ms) VALUES ($1, $2, $3)"
                         " ON CONFLICT (name) DO UPDATE SET config = excluded.config"),
    batch.PURGE_QUEUE: "DELETE FROM tidings_messages WHERE queue = $1",
    batch.DELETE_QUEUE: "DELETE FROM tidings_queues WHERE name = $1",
    batch.DELETE_MARKS: "DELETE FROM tidings_queue_marks WHERE queue = $1",
    batch.EXPIRE_DEDUP: "DELETE FROM tidings_dedup WHERE expires_ms <= $1",
    streams.UPSERT_STREAM: ("INSERT INTO tidings_streams (name, config, created_ms) VALUES ($1, $2, $3)"
                            " ON CONFLICT (name) DO UPDATE SET config = excluded.config"),
    streams.TRIM: "DELETE FROM tidings_stream_messages WHERE stream = $1 AND partition = $2 AND \"offset\" < $3",
    streams.UPSERT_FLOOR: ("INSERT INTO tidings_stream_floors AS f (stream, partition, first) VALUES ($1, $2, $3)"
                           " ON CONFLICT (stream, partition) DO UPDATE SET first = GREATEST(f.first, excluded.first)"),
    streams.UPSERT_NEXT: ("INSERT INTO tidings_stream_next AS n (stream, partition, next) VALUES ($1, $2, $3)"
                          " ON CONFLICT (stream, partition) DO UPDATE SET next = GREATEST(n.next, excluded.next)"),
    # (with the group's shared state of cluster mode, pg_cluster.py: empty on one broker)
    streams.DELETE_GROUP: ("WITH g AS (DELETE FROM tidings_groups WHERE stream = $1 AND grp = $2),"
                           " m AS (DELETE FROM tidings_group_members WHERE stream = $1 AND grp = $2),"
                           " p AS (DELETE FROM tidings_group_parts WHERE stream = $1 AND grp = $2)"
                           " DELETE FROM tidings_stream_offsets WHERE stream = $1 AND grp = $2"),
    schemas.INSERT_SCHEMA: ("INSERT INTO tidings_schemas (name, version, document, compatibility, created_ms)"
                            " VALUES ($1, $2, $3, $4, $5)"),
    schemas.UPSERT_BINDING: ("INSERT INTO tidings_schema_bindings (pattern, schema, on_invalid, dead_letter,"
                             " created_ms) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (pattern) DO UPDATE SET"
                             " schema = excluded.schema, on_invalid = excluded.on_invalid,"
                             " dead_letter = excluded.dead_letter, created_ms = excluded.created_ms"),
    schemas.DELETE_BINDING: "DELETE FROM tidings_schema_bindings WHERE pattern = $1",
    streams.DELETE_STREAM[0][0]: ("WITH h AS (DELETE FROM tidings_stream_heads WHERE stream = $1),"
                                  " g AS (DELETE FROM tidings_groups WHERE stream = $1),"
                                  " m AS (DELETE FROM tidings_group_members WHERE stream = $1),"
                                  " p AS (DELETE FROM tidings_group_parts WHERE stream = $1)"
                                  " DELETE FROM tidings_stream_next WHERE stream = $1"),
    streams.DELETE_STREAM[1][0]: "DELETE FROM tidings_stream_messages WHERE stream = $1",
    streams.DELETE_STREAM[2][0]: "DELETE FROM tidings_stream_offsets WHERE stream = $1",
    streams.DELETE_STREAM[3][0]: "DELETE FROM tidings_stream_floors WHERE stream = $1",
    streams.DELETE_STREAM[4][0]: "DELETE FROM tidings_streams WHERE name = $1",
}


def prepare(op: WriteOp) -> Item:
    """batch.prepare, with whole-table statements in their PostgreSQL form.
    Raises TypeError/ValueError like batch.prepare, and TypeError for a statement
    that has no PostgreSQL form yet (an operation added on the SQLite side only)."""
    it = batch.prepare(op)
    if it.statements is not None:
        try:
            it.statements = [(PG_STATEMENTS[sql], params) for sql, params in it.statements]
        except KeyError as exc:
            raise TypeError(f"{type(op).__name__} has no PostgreSQL statement yet: {exc.args[0]!r}") from None
    return it


def _columns(rows: list[Any], width: int) -> list[list[Any]]:
    """Rows -> one list per column (what unnest takes)."""
    return [list(c) for c in zip(*rows)] if rows else [[] for _ in range(width)]


def int_array(values: Any) -> str:
    """An integer array literal ('{1,2,3}'); int() refuses anything else (ValueError)."""
    return "{" + ",".join([str(int(v)) for v in values]) + "}"


def _by_queue(rows: Any) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for r in rows:
        q = r[0]
        group = out.get(q)
        if group is None:
            out[q] = [r]
        else:
            group.append(r)
    return out


async def execute_stage(conn: asyncpg.Connection, stage: Stage, *, now_ms: int | None = None) -> None:
    """Run one stage of batch.plan inside the caller's transaction (see the module
    docstring for what is merged first). Raises whatever asyncpg raises.
    ``now_ms`` (cluster mode): de-dup entries are inserted, not upserted, so a msg_id
    another broker stored (and not expired by ``now_ms``) fails with a unique violation."""
    if stage.statements is not None:
        for sql, params in stage.statements:
            await conn.execute(sql, *params)
        return
    if stage.stream_inserts:
        await conn.copy_records_to_table("tidings_stream_messages", records=stage.stream_inserts,
                                         columns=STREAM_COLUMNS)
    if stage.inserts:
        await conn.copy_records_to_table("tidings_messages", records=stage.inserts, columns=MESSAGE_COLUMNS)
    if stage.dedup:
        last = {d[0]: d for d in stage.dedup}  # INSERT OR REPLACE in order: the last one stays
        if now_ms is None:
            await conn.execute(UPSERT_DEDUP, *_columns(list(last.values()), 3))
        else:
            await conn.execute(DROP_EXPIRED_DEDUP, list(last), now_ms)
            await conn.execute(INSERT_DEDUP, *_columns(list(last.values()), 3))
    if stage.updates:
        gone = set(stage.deletes) if stage.deletes else ()
        # one row per message, the last update of it; none for a message this stage deletes
        latest = {(u[0], u[1]): u for u in stage.updates if (u[0], u[1]) not in gone}
        for queue, ups in _by_queue(latest.values()).items():
            await conn.execute(UPDATE_MESSAGES, queue, int_array([u[1] for u in ups]),
                               int_array([u[2] for u in ups]), int_array([u[3] for u in ups]),
                               [u[4] for u in ups])
    if stage.deletes:
        for queue, keys in _by_queue(stage.deletes).items():
            await conn.execute(DELETE_MESSAGES, queue, int_array([k[1] for k in keys]))
    if stage.marks:
        await conn.execute(UPSERT_MARKS, *_columns(stage.merged_marks(), 4))
    if stage.offsets:
        merged: dict[tuple[Any, ...], list[Any]] = {}
        for s, g, p, c, d in stage.offsets:
            had = merged.get((s, g, p))
            if had is None:
                merged[(s, g, p)] = [s, g, p, c, d]
            else:
                had[3] = max(had[3], c)
                had[4] = max(had[4], d)
        await conn.execute(UPSERT_OFFSETS, *_columns(list(merged.values()), 5))
