"""Turning write operations into few SQL calls: one transaction per batch.

`prepare(op)` converts an operation into SQL parameter tuples once, when it is
submitted (so a malformed op fails its submitter, not a batch). `plan(items)`
cuts a batch into stages: a stage is at most four `executemany` calls (insert
messages, upsert dedup entries, update messages, delete messages, in that fixed
order; deletes go as `id IN (...)` lists, delivery marks as one upsert per
queue lane), so a batch of interleaved publishes and acks costs a handful of statements
instead of one per operation (and the whole transaction one thread hop).

Reordering must not change the outcome: per key, the batch has to end as if its
operations had run in submission order. With the fixed stage order, an update
or delete never conflicts (running it later in the stage, after inserts, gives
the same end state), and an insert conflicts only with an update or delete of
the same key earlier in the stage (a delete-then-insert would become
insert-then-delete); such an insert starts a new stage. Whole-queue and
dedup-table operations (PutQueue, DeleteQueue, PurgeQueue, ExpireDedup) run in
a stage of their own, at their place in the order.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from typing import Any, Final

import msgpack

from tidings.broker.durable.store.base import (
    CommitOffsets,
    DedupEntry,
    DeleteGroup,
    DeleteMessages,
    DeleteQueue,
    MarkDelivered,
    DeleteStream,
    ExpireDedup,
    MarkStreamNext,
    MoveMessages,
    PurgeQueue,
    PutMessages,
    PutQueue,
    PutSchema,
    PutSchemaBinding,
    DeleteSchemaBinding,
    PutStream,
    StoredMessage,
    TrimStream,
    UpdateMessages,
    WriteOp,
)
from tidings.broker.durable.store.schemas import DELETE_BINDING, INSERT_SCHEMA, UPSERT_BINDING, encode_document
from tidings.broker.durable.store.streams import (
    DELETE_GROUP, DELETE_STREAM, INSERT_STREAM_ROW, TRIM, UPSERT_FLOOR, UPSERT_NEXT, UPSERT_OFFSET, UPSERT_STREAM,
    encode_stream_row,
)

INSERT_MESSAGE: Final = (
    "INSERT INTO messages (queue, id, subject, payload, headers, msg_id, published_ms,"
    " available_ms, expires_ms, deliveries, last_error, priority) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)")
UPSERT_DEDUP: Final = "INSERT OR REPLACE INTO dedup (msg_id, expires_ms, result) VALUES (?,?,?)"
# Parameters are (queue, id, available_ms, deliveries, last_error): the key comes first,
# like every other per-message tuple here, so the planner reads keys the same way.
UPDATE_MESSAGE: Final = "UPDATE messages SET available_ms = ?3, deliveries = ?4, last_error = ?5 WHERE queue = ?1 AND id = ?2"
#: Ids per `DELETE ... id IN (...)`: under SQLITE_MAX_VARIABLE_NUMBER (999 before
#: SQLite 3.32). A list deletes 1.5-2x the rows per second of one statement per
#: row (measured on SQLite 3.40, batches of 20-2,000 acks).
DELETE_CHUNK: Final = 512
#: A delivery mark only grows: a lower key than the stored one changes nothing.
UPSERT_MARK: Final = (
    "INSERT INTO queue_marks (queue, lane, available_ms, id) VALUES (?,?,?,?)"
    " ON CONFLICT (queue, lane) DO UPDATE SET available_ms = excluded.available_ms, id = excluded.id"
    " WHERE (excluded.available_ms, excluded.id) > (queue_marks.available_ms, queue_marks.id)")
DELETE_MARKS: Final = "DELETE FROM queue_marks WHERE queue = ?"
RAISE_MAX_ID: Final = "UPDATE meta SET value = ?1 WHERE key = 'max_message_id' AND value < ?1"
UPSERT_QUEUE: Final = (
    "INSERT INTO queues (name, config, created_ms) VALUES (?,?,?)"
    " ON CONFLICT (name) DO UPDATE SET config = excluded.config")
PURGE_QUEUE: Final = "DELETE FROM messages WHERE queue = ?"
DELETE_QUEUE: Final = "DELETE FROM queues WHERE name = ?"
EXPIRE_DEDUP: Final = "DELETE FROM dedup WHERE expires_ms <= ?"

Key = tuple[str, int]
Row = tuple[Any, ...]


def encode_row(m: StoredMessage) -> Row:
    """The INSERT_MESSAGE parameters for one message (headers msgpack-encoded)."""
    headers = None if m.headers is None else msgpack.packb(m.headers, use_bin_type=True)
    return (m.queue, m.id, m.subject, m.payload, headers, m.msg_id, m.published_ms,
            m.available_ms, m.expires_ms, m.deliveries, m.last_error, m.priority)


_NONE: Final[tuple[Any, ...]] = ()  # shared "no rows of this kind" (never mutated)


class Item:
    """One submitted operation in SQL-parameter form, plus its mailbox weight."""

    __slots__ = ("op", "messages", "nbytes", "grows", "inserts", "dedup", "updates", "deletes",
                 "statements", "max_id", "stream_inserts", "offsets", "marks")

    def __init__(self, op: WriteOp, messages: int, *, nbytes: int = 0, grows: bool = False,
                 inserts: list[Row] | tuple[()] = _NONE, dedup: list[DedupEntry] | tuple[()] = _NONE,
                 updates: list[Row] | tuple[()] = _NONE, deletes: list[Key] | tuple[()] = _NONE,
                 statements: list[tuple[str, tuple[Any, ...]]] | None = None, max_id: int = 0,
                 stream_inserts: list[Row] | tuple[()] = _NONE, offsets: list[Row] | tuple[()] = _NONE,
                 marks: list[Row] | tuple[()] = _NONE) -> None:
        self.op = op
        self.messages = messages  # rows it touches: its weight against the mailbox bound
        self.nbytes = nbytes      # payload bytes it holds in memory
        self.grows = grows        # may need new pages (fails first when the disk is full)
        self.inserts = inserts
        self.dedup = dedup
        self.updates = updates
        self.deletes = deletes
        self.statements = statements  # set for whole-table operations: they run in a stage alone
        self.max_id = max_id
        self.stream_inserts = stream_inserts  # stream rows: append-only, never conflict with queue rows
        self.offsets = offsets  # committed group offsets (upserts)
        self.marks = marks  # (queue, lane, available_ms, id): delivery marks (upserts that only grow)


def prepare(op: WriteOp) -> Item:
    """Encode `op` for execution. Raises TypeError or ValueError if it cannot be stored."""
    try:
        fn = _PREPARE[type(op)]
    except KeyError:
        raise TypeError(f"not a store write operation: {op!r}") from None
    return fn(op)


def _put(op: PutMessages) -> Item:  # the hot path: one call per publish batch
    inserts = []
    nbytes = max_id = 0
    for m in op.rows:
        inserts.append(encode_row(m))
        nbytes += len(m.payload)
        if m.id > max_id:  # noqa: PLR1730 (cheaper than max() per row)
            max_id = m.id
    dedup = [(str(d[0]), int(d[1]), bytes(d[2])) for d in op.dedup] if op.dedup else _NONE
    sins: list[Row] | tuple[()] = _NONE
    if op.stream_rows:
        sins = [encode_stream_row(r) for r in op.stream_rows]
        nbytes += sum(len(r.payload) for r in op.stream_rows)
    return Item(op, (len(inserts) + len(sins)) or 1, nbytes=nbytes, grows=True, inserts=inserts, dedup=dedup,
                max_id=max_id, stream_inserts=sins)


def _delete(op: DeleteMessages) -> Item:
    q = op.queue
    return Item(op, len(op.ids) or 1, deletes=[(q, i) for i in op.ids])


def _update(op: UpdateMessages) -> Item:
    q = op.queue
    return Item(op, len(op.updates) or 1, updates=[(q, u[0], u[1], u[2], u[3]) for u in op.updates])


def _mark(op: MarkDelivered) -> Item:
    # grows: a queue's first mark is a new row. On a full disk it then fails with the
    # publishes, never with the acks that free space (the queue sends it again).
    q = op.queue
    return Item(op, 1, grows=True, marks=[(q, int(lane), int(a), int(i)) for lane, a, i in op.marks])


def _move(op: MoveMessages) -> Item:
    q = op.src_queue
    deletes = [(q, old) for old, _ in op.moves]
    inserts = [encode_row(new) for _, new in op.moves]
    for key, row in zip(deletes, inserts):
        if key == (row[0], row[1]):
            raise ValueError(f"MoveMessages: {key} would be moved onto itself")
    return Item(op, len(inserts) or 1, nbytes=sum(len(new.payload) for _, new in op.moves), grows=True,
                inserts=inserts, deletes=deletes, max_id=max((r[1] for r in inserts), default=0))


def _put_queue(op: PutQueue) -> Item:
    config = json.dumps(op.config, sort_keys=True, separators=(",", ":"))
    return Item(op, 1, grows=True, statements=[(UPSERT_QUEUE, (op.name, config, op.created_ms))])


def _delete_queue(op: DeleteQueue) -> Item:
    return Item(op, 1, statements=[(PURGE_QUEUE, (op.name,)), (DELETE_MARKS, (op.name,)),
                                   (DELETE_QUEUE, (op.name,))])


def _purge_queue(op: PurgeQueue) -> Item:
    return Item(op, 1, statements=[(PURGE_QUEUE, (op.name,)), (DELETE_MARKS, (op.name,))])


def _expire_dedup(op: ExpireDedup) -> Item:
    return Item(op, 1, statements=[(EXPIRE_DEDUP, (op.before_ms,))])


def _commit_offsets(op: CommitOffsets) -> Item:
    return Item(op, len(op.offsets) or 1, offsets=[tuple(o) for o in op.offsets])


# Whole-stream operations (declare, delete, trim, next-offset marks) run in a stage of their own.

def _put_stream(op: PutStream) -> Item:
    config = json.dumps(op.config, sort_keys=True)
    return Item(op, 1, grows=True, statements=[(UPSERT_STREAM, (op.name, config, op.created_ms))])


def _delete_stream(op: DeleteStream) -> Item:
    return Item(op, 1, statements=[(sql, (op.name,)) for sql, _ in DELETE_STREAM])


def _delete_group(op: DeleteGroup) -> Item:
    return Item(op, 1, statements=[(DELETE_GROUP, (op.stream, op.group))])


def _trim_stream(op: TrimStream) -> Item:
    return Item(op, 1, statements=[(TRIM, (op.stream, op.partition, op.before)),
                                   (UPSERT_FLOOR, (op.stream, op.partition, op.before))])


def _mark_stream_next(op: MarkStreamNext) -> Item:
    return Item(op, 1, statements=[(UPSERT_NEXT, tuple(m)) for m in op.marks])


# Schema registry operations: rare, small, each in a stage of its own.

def _put_schema(op: PutSchema) -> Item:
    row = (str(op.name), int(op.version), encode_document(op.document), str(op.compatibility), int(op.created_ms))
    return Item(op, 1, grows=True, statements=[(INSERT_SCHEMA, row)])


def _put_binding(op: PutSchemaBinding) -> Item:
    row = (str(op.pattern), str(op.schema), str(op.on_invalid),
           None if op.dead_letter is None else str(op.dead_letter), int(op.created_ms))
    return Item(op, 1, grows=True, statements=[(UPSERT_BINDING, row)])


def _delete_binding(op: DeleteSchemaBinding) -> Item:
    return Item(op, 1, statements=[(DELETE_BINDING, (str(op.pattern),))])


_PREPARE: Final[dict[type, Callable[[Any], Item]]] = {
    PutMessages: _put, DeleteMessages: _delete, UpdateMessages: _update, MoveMessages: _move, MarkDelivered: _mark,
    PutQueue: _put_queue, DeleteQueue: _delete_queue, PurgeQueue: _purge_queue, ExpireDedup: _expire_dedup,
    CommitOffsets: _commit_offsets, PutStream: _put_stream, DeleteStream: _delete_stream,
    TrimStream: _trim_stream, MarkStreamNext: _mark_stream_next, DeleteGroup: _delete_group,
    PutSchema: _put_schema, PutSchemaBinding: _put_binding, DeleteSchemaBinding: _delete_binding,
}


class Stage:
    """Statements that run back to back; see the module docstring for why this order is safe."""

    __slots__ = ("inserts", "dedup", "updates", "deletes", "touched", "statements", "stream_inserts", "offsets",
                 "marks")

    def __init__(self, statements: list[tuple[str, tuple[Any, ...]]] | None = None) -> None:
        self.stream_inserts: list[Row] = []
        self.offsets: list[Row] = []
        self.inserts: list[Row] = []
        self.dedup: list[DedupEntry] = []
        self.updates: list[Row] = []
        self.deletes: list[Key] = []
        self.touched: set[Key] = set()  # keys updated or deleted in this stage
        self.statements = statements
        self.marks: list[Row] = []

    def conflicts(self, it: Item) -> bool:
        touched = self.touched
        return bool(touched) and any((r[0], r[1]) in touched for r in it.inserts)

    def add(self, it: Item) -> None:
        if it.stream_inserts:
            self.stream_inserts += it.stream_inserts
        if it.offsets:
            self.offsets += it.offsets
        if it.inserts:
            self.inserts += it.inserts
        if it.dedup:
            self.dedup += it.dedup
        if it.updates:
            self.updates += it.updates
            self.touched.update((u[0], u[1]) for u in it.updates)
        if it.deletes:
            self.deletes += it.deletes
            self.touched.update(it.deletes)
        if it.marks:
            self.marks += it.marks

    def merged_marks(self) -> list[Row]:
        """The stage's delivery marks, the highest key per (queue, lane): one upsert each."""
        top: dict[tuple[str, int], Row] = {}
        for m in self.marks:
            had = top.get((m[0], m[1]))
            if had is None or (m[2], m[3]) > (had[2], had[3]):
                top[(m[0], m[1])] = m
        return list(top.values())

    def execute(self, conn: sqlite3.Connection) -> None:
        """Run the stage inside the caller's transaction, on the SQLite thread (the whole
        transaction is one call there: see SqliteStore._transaction). Raises sqlite3.Error."""
        if self.statements is not None:
            for sql, params in self.statements:
                conn.execute(sql, params)
            return
        if self.stream_inserts:
            conn.executemany(INSERT_STREAM_ROW, self.stream_inserts)
        if self.inserts:
            conn.executemany(INSERT_MESSAGE, self.inserts)
        if self.dedup:
            conn.executemany(UPSERT_DEDUP, self.dedup)
        updates = self.updates
        if updates and self.deletes:
            # An update of a row this stage deletes anyway is wasted work (the
            # common case: a delivery's count, then its ack, in one commit).
            gone = set(self.deletes)
            updates = [u for u in updates if (u[0], u[1]) not in gone]
        if updates:
            conn.executemany(UPDATE_MESSAGE, updates)
        if self.deletes:
            for sql, params in delete_lists(self.deletes):
                conn.execute(sql, params)
        if self.marks:
            conn.executemany(UPSERT_MARK, self.merged_marks())
        if self.offsets:
            conn.executemany(UPSERT_OFFSET, self.offsets)


_DELETE_IN: dict[int, str] = {}  # chunk size -> its DELETE ... IN statement (powers of two: few statements to cache)


def delete_lists(keys: list[Key]) -> list[tuple[str, tuple[Any, ...]]]:
    """`DELETE ... WHERE queue = ? AND id IN (...)` statements for `keys`, per queue,
    at most DELETE_CHUNK ids each. A chunk is padded to a power of two by repeating
    its last id, so a few prepared statements serve every batch size."""
    by_queue: dict[str, list[int]] = {}
    for q, i in keys:
        ids = by_queue.get(q)
        if ids is None:
            by_queue[q] = [i]
        else:
            ids.append(i)
    out = []
    for q, ids in by_queue.items():
        for start in range(0, len(ids), DELETE_CHUNK):
            chunk = ids[start:start + DELETE_CHUNK]
            n = 1
            while n < len(chunk):
                n *= 2
            if n > len(chunk):
                chunk += [chunk[-1]] * (n - len(chunk))
            sql = _DELETE_IN.get(n)
            if sql is None:
                sql = _DELETE_IN[n] = f"DELETE FROM messages WHERE queue = ? AND id IN ({','.join('?' * n)})"
            out.append((sql, (q, *chunk)))
    return out


def plan(items: list[Item]) -> list[Stage]:
    """Cut `items` (in submission order) into stages whose in-order execution
    ends in the same state as executing every item in submission order."""
    stages: list[Stage] = []
    cur: Stage | None = None
    for it in items:
        if it.statements is not None:
            stages.append(Stage(it.statements))
            cur = None
            continue
        if cur is None or (cur.touched and it.inserts and cur.conflicts(it)):
            cur = Stage()
            stages.append(cur)
        cur.add(it)
    return stages
