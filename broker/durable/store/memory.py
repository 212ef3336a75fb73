"""MemoryStore: the Store contract in memory, for unit tests. NOT durable.

It keeps the committed state in a `MemoryData` object and nothing on disk: a
process exit loses everything. It exists so that the durable layer's actors
(queues, groups) can be tested without a broker, a socket or a file, against
the same semantics as SqliteStore (tests/storage/test_store_contract.py runs
one suite against both):

    store = MemoryStore()                  # or MemoryStore(data) to "restart" over kept state
    await store.open()
    async with anyio.create_task_group() as tg:
        await tg.start(store.run)          # the actor: writes commit from here
        ...
        await store.close()                # commits what is pending; reads refuse from here

It is an actor with a bounded mailbox and group commit, like SqliteStore:
operations are validated and encoded at submit (with SqliteStore's own
encoder, so a malformed op fails its submitter the same way), the actor takes
everything pending (up to `batch_max_messages`) as one batch, applies the
operations in submission order, each atomically (a failing one, say a
duplicate key, leaves no trace and fails alone), then "commits" and calls the
callbacks. Reads return fresh objects decoded from the stored encoding, so
a caller never shares state with the store.

Test hooks: `fail_next(error, where=...)` makes the next batch fail (all its
operations, or those `where` selects) so that failure paths can be driven;
`fail_next_read(error)` makes the next read raise; `pause()` / `resume()`
hold the actor between batches so a test can look at state with operations
accepted but not committed. `backup()` raises StorageError: there is no file
to copy.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.lowlevel
from anyio.abc import TaskStatus

from tidings.broker.durable.store.base import (
    DURABILITIES,
    CommitOffsets,
    DeleteGroup,
    DeleteMessages,
    DeleteQueue,
    DeleteStream,
    Durability,
    ExpireDedup,
    MarkDelivered,
    MarkStreamNext,
    MoveMessages,
    PageKey,
    PurgeQueue,
    PutMessages,
    PutQueue,
    PutSchema,
    PutSchemaBinding,
    DeleteSchemaBinding,
    PutStream,
    StorageClosed,
    StorageError,
    Store,
    StoredMessage,
    StreamRow,
    TrimStream,
    UpdateMessages,
    WriteOp,
)
from tidings.broker.durable.store.batch import Item, prepare
from tidings.broker.durable.store.reads import decode_message
from tidings.broker.durable.store.sqlite import BATCH_MAX_MESSAGES, MAILBOX_MAX_BYTES, MAILBOX_MAX_MESSAGES
from tidings.broker.durable.store.streams import decode_stream_row

log = logging.getLogger(__name__)

#: What MemoryStore.path says: no file (SQLite's own name for an in-memory database).
MEMORY_PATH: Final = ":memory:"
#: Bytes a stream row counts for beyond its payload in retention (as in SqliteStore's queries).
STREAM_ROW_OVERHEAD: Final = 64

Row = tuple[Any, ...]
_PartKey = tuple[str, int]


class MemoryData:
    """The committed state of MemoryStores. Pass it to a new MemoryStore to reopen
    the "same database" (recovery tests); one store at a time may hold it open.
    Rows are kept in SqliteStore's encoded form (headers msgpack-encoded)."""

    def __init__(self) -> None:
        self.queues: dict[str, tuple[str, int]] = {}          # name -> (config JSON, created_ms)
        self.messages: dict[str, dict[int, Row]] = {}         # queue -> id -> encoded row
        self.dedup: dict[str, tuple[int, bytes]] = {}         # msg_id -> (expires_ms, result)
        self.max_id = 0
        self.streams: dict[str, tuple[str, int]] = {}         # name -> (config JSON, created_ms)
        self.stream_rows: dict[_PartKey, dict[int, Row]] = {}  # (stream, partition) -> offset -> row
        self.floors: dict[_PartKey, int] = {}
        self.marks: dict[_PartKey, int] = {}
        self.delivery_marks: dict[tuple[str, int], tuple[int, int]] = {}  # (queue, lane) -> (available_ms, id)
        self.offsets: dict[tuple[str, str, int], tuple[int, int]] = {}  # (stream, group, partition)
        self.schemas: dict[tuple[str, int], tuple[str, str, int]] = {}  # (name, version) -> (JSON, mode, created)
        self.schema_bindings: dict[str, tuple[str, str, str | None, int]] = {}  # pattern -> binding
        self.holder: MemoryStore | None = None  # the store that has it open


class _OpFailed(Exception):
    """An operation's data cannot be applied (a duplicate key): it fails alone."""


class MemoryStore:
    """The Store contract in memory (see the module docstring). Not durable."""

    def __init__(self, data: MemoryData | None = None, durability: Durability = "full", *,
                 mailbox_max_messages: int = MAILBOX_MAX_MESSAGES,
                 mailbox_max_bytes: int = MAILBOX_MAX_BYTES,
                 batch_max_messages: int = BATCH_MAX_MESSAGES) -> None:
        if durability not in DURABILITIES:
            raise ValueError(f"durability must be one of {DURABILITIES}, not {durability!r}")
        self.data = data if data is not None else MemoryData()
        self.path = MEMORY_PATH
        self.durability: Durability = durability
        self.mailbox_max_messages = mailbox_max_messages
        self.mailbox_max_bytes = mailbox_max_bytes
        self.batch_max_messages = batch_max_messages
        self.on_commit: Callable[[float, int], None] | None = None
        self._mailbox: deque[Item] = deque()
        self._pending_messages = 0
        self._pending_bytes = 0
        self._wakeup = anyio.Event()
        self._space: anyio.Event | None = None
        self._stopped = anyio.Event()
        self._opened = False
        self._open = False  # opened and not closed: reads work
        self._closing = False
        self._running = False
        self._idle = False
        self._paused = False
        self._failures: deque[tuple[StorageError, Callable[[WriteOp], bool] | None]] = deque()
        self._read_failures: deque[StorageError] = deque()
        # the contract's stats (a batch is applied with no await: nothing is ever "in flight" for long)
        self.inflight_ops = self.inflight_messages = self.inflight_bytes = 0
        self.transaction_phase = "idle"
        self.transaction_seconds = 0.0
        self.stalled = False
        self.stalls = 0
        self.commits = self.committed_ops = self.committed_messages = 0
        self.failed_ops = self.failed_transactions = 0
        self.last_commit_seconds = self.commit_seconds_total = 0.0
        self.last_batch_ops = self.last_batch_messages = 0

    # --- lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        """Take hold of the data. Raises StorageError if called twice, or if another
        open MemoryStore holds the same MemoryData (like a second process on a data dir)."""
        await anyio.lowlevel.checkpoint()
        if self._opened:
            raise StorageError("open() may be called once per MemoryStore")
        if self.data.holder is not None:
            raise StorageError("this MemoryData is held by another open MemoryStore (as another "
                               "tidings process would hold a data directory)")
        self.data.holder = self
        self._recover_delivery_marks()
        self._opened = self._open = True

    def _recover_delivery_marks(self) -> None:
        """As SqliteStore's open: a message at or below its lane's delivery mark
        with 0 deliveries counts one."""
        d = self.data
        for (queue, lane), key in d.delivery_marks.items():
            rows = d.messages.get(queue)
            if not rows:
                continue
            want = None if lane < 0 else lane
            for i, r in list(rows.items()):
                if r[9] == 0 and r[11] == want and (r[7], r[1]) <= key:
                    rows[i] = (*r[:9], 1, *r[10:])

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The actor; see Store.run. Returns once close() is called (close commits the rest)."""
        if not self._open:
            raise StorageClosed("open() the store before running it")
        if self._running:
            raise RuntimeError("the store actor is already running")
        self._running = True
        self._stopped = anyio.Event()
        task_status.started()
        try:
            while not self._closing:
                if not self._mailbox or self._paused:
                    self._idle = True
                    await self._wakeup.wait()
                    self._idle = False
                    self._wakeup = anyio.Event()
                    continue
                with anyio.CancelScope(shield=True):
                    batch = self._take_batch()
                    # A real await between taking and committing: what is submitted
                    # meanwhile goes into the next batch, as with a real transaction.
                    await anyio.lowlevel.checkpoint()
                    self._commit(batch)
                await anyio.lowlevel.checkpoint_if_cancelled()
        finally:
            self._running = False
            self._stopped.set()

    async def close(self) -> None:
        """Refuse new work, commit everything accepted (paused or not), release the data."""
        if not self._open:
            return
        self._closing = True
        self._wakeup.set()
        if self._space is not None:
            self._space.set()
        with anyio.CancelScope(shield=True):
            if self._running:
                await self._stopped.wait()
            while self._mailbox:
                self._commit(self._take_batch())
        self._open = False
        self.data.holder = None

    async def watchdog(self) -> None:
        """Nothing can stall in memory: waits until cancelled."""
        await anyio.sleep_forever()

    @property
    def is_open(self) -> bool:
        return self._open and not self._closing

    # --- test hooks ------------------------------------------------------------------

    def fail_next(self, error: StorageError | None = None, *,
                  where: Callable[[WriteOp], bool] | None = None) -> None:
        """Make the next batch the actor commits fail: every op of it, or those for
        which `where(op)` is true (the others commit, as acks do on a full disk).
        Failed ops leave no trace and get `error` (default: a StorageError). Each
        call arms one batch; calls queue up."""
        self._failures.append((error if error is not None else StorageError("injected storage failure"), where))

    def fail_next_read(self, error: StorageError | None = None) -> None:
        """Make the next read (any read method) raise `error` (default: a StorageError)."""
        self._read_failures.append(error if error is not None else StorageError("injected read failure"))

    def pause(self) -> None:
        """Hold the actor between batches: submitted ops stay pending until resume()."""
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        self._wakeup.set()

    # --- the mailbox (as SqliteStore's) ------------------------------------------------

    @property
    def pending_ops(self) -> int:
        return len(self._mailbox)

    @property
    def pending_messages(self) -> int:
        return self._pending_messages

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    def _full(self) -> bool:
        return (self._pending_messages >= self.mailbox_max_messages
                or self._pending_bytes >= self.mailbox_max_bytes)

    def _check_accepting(self) -> None:
        if self._closing or not self._open:
            raise StorageClosed("store :memory: is closed")

    def submit_nowait(self, op: WriteOp) -> None:
        self._check_accepting()
        if self._full():
            raise anyio.WouldBlock
        self._enqueue(prepare(op))

    async def submit(self, op: WriteOp) -> None:
        it = prepare(op)
        while True:
            self._check_accepting()
            if not self._full():
                self._enqueue(it)
                return
            if self._space is None:
                self._space = anyio.Event()
            await self._space.wait()

    async def wait_for_space(self) -> None:
        while True:
            self._check_accepting()
            if not self._full():
                return
            if self._space is None:
                self._space = anyio.Event()
            await self._space.wait()

    async def write(self, op: WriteOp) -> None:
        done = anyio.Event()
        outcome: list[Exception | None] = []
        chained = op.on_done

        def on_done(error: Exception | None) -> None:
            outcome.append(error)
            done.set()
            if chained is not None:
                chained(error)

        op.on_done = on_done
        await self.submit(op)
        await done.wait()
        error = outcome[0]
        if error is not None:
            raise type(error)(*error.args) from error.__cause__

    def _enqueue(self, it: Item) -> None:
        self._mailbox.append(it)
        self._pending_messages += it.messages
        self._pending_bytes += it.nbytes
        if self._idle:
            self._idle = False
            self._wakeup.set()

    def _take_batch(self) -> list[Item]:
        mailbox, cap = self._mailbox, self.batch_max_messages
        batch: list[Item] = []
        n = nbytes = 0
        while mailbox and (n == 0 or n + mailbox[0].messages <= cap):
            it = mailbox.popleft()
            batch.append(it)
            n += it.messages
            nbytes += it.nbytes
        self._pending_messages -= n
        self._pending_bytes -= nbytes
        if self._space is not None and not self._full():
            self._space.set()
            self._space = None
        return batch

    # --- the "transaction" ------------------------------------------------------------

    def _commit(self, batch: list[Item]) -> None:
        """Apply `batch` op by op in submission order, each atomically (a failing op
        leaves no trace), count the "commit", then call every op back in order."""
        started = time.perf_counter()
        injected, where = self._failures.popleft() if self._failures else (None, None)
        outcomes: list[StorageError | None] = []
        for it in batch:
            if injected is not None and (where is None or where(it.op)):
                outcomes.append(injected)
                continue
            try:
                self._apply(it)
            except _OpFailed as exc:
                outcomes.append(StorageError(f"storage error: {exc}"))
                self.failed_transactions += 1  # its rolled-back attempt
                continue
            outcomes.append(None)
        ok = [it for it, e in zip(batch, outcomes) if e is None]
        failed = len(batch) - len(ok)
        self.failed_ops += failed
        if injected is not None and failed:
            self.failed_transactions += 1
        if ok:
            self.last_commit_seconds = time.perf_counter() - started
            self.commit_seconds_total += self.last_commit_seconds
            self.last_batch_ops = len(ok)
            self.last_batch_messages = sum(it.messages for it in ok)
            self.commits += 1
            self.committed_ops += len(ok)
            self.committed_messages += self.last_batch_messages
            if self.on_commit is not None:
                self.on_commit(self.last_commit_seconds, self.last_batch_messages)
        for it, error in zip(batch, outcomes):
            cb = it.op.on_done
            if cb is None:
                continue
            try:
                cb(error)
            except Exception:  # actor boundary, as in SqliteStore
                log.exception("store on_done callback raised (op %s)", type(it.op).__name__)

    def _apply(self, it: Item) -> None:
        """One operation, all of it or (raising _OpFailed) none of it."""
        d = self.data
        op = it.op
        if isinstance(op, (PutMessages, MoveMessages)):
            new_keys = [(r[0], r[1]) for r in it.inserts]
            if len(set(new_keys)) != len(new_keys):
                raise _OpFailed(f"UNIQUE constraint failed: a message key repeats in one op {new_keys}")
            for q, i in new_keys:  # a move inserts before it deletes, as SqliteStore's plan does
                if i in d.messages.get(q, ()):
                    raise _OpFailed(f"UNIQUE constraint failed: message ({q!r}, {i}) exists")
            srows = it.stream_inserts
            skeys = [((r[0], r[1]), r[2]) for r in srows]
            if len(set(skeys)) != len(skeys):
                raise _OpFailed("UNIQUE constraint failed: a stream offset repeats in one op")
            for pk, off in skeys:
                if off in d.stream_rows.get(pk, ()):
                    raise _OpFailed(f"UNIQUE constraint failed: stream row {pk} offset {off} exists")
            for row in it.inserts:
                d.messages.setdefault(row[0], {})[row[1]] = row
            for q, i in it.deletes:
                d.messages.get(q, {}).pop(i, None)
            for row in srows:
                d.stream_rows.setdefault((row[0], row[1]), {})[row[2]] = row
            for msg_id, expires, result in it.dedup:
                d.dedup[msg_id] = (expires, result)
            d.max_id = max(d.max_id, it.max_id)
        elif isinstance(op, DeleteMessages):
            rows = d.messages.get(op.queue)
            if rows:
                for i in op.ids:
                    rows.pop(i, None)
        elif isinstance(op, UpdateMessages):
            rows = d.messages.get(op.queue)
            if rows:
                for i, avail, deliveries, error in op.updates:
                    r = rows.get(i)
                    if r is not None:
                        rows[i] = (*r[:7], avail, r[8], deliveries, error, *r[11:])
        elif isinstance(op, MarkDelivered):
            marks = d.delivery_marks
            for q, lane, avail, i in it.marks:
                had = marks.get((q, lane))
                if had is None or (avail, i) > had:
                    marks[(q, lane)] = (avail, i)
        elif isinstance(op, PutQueue):
            old = d.queues.get(op.name)
            d.queues[op.name] = (json.dumps(op.config, sort_keys=True), old[1] if old else op.created_ms)
        elif isinstance(op, (PurgeQueue, DeleteQueue)):
            d.messages.pop(op.name, None)
            for mkey in [k for k in d.delivery_marks if k[0] == op.name]:
                del d.delivery_marks[mkey]
            if isinstance(op, DeleteQueue):
                d.queues.pop(op.name, None)
        elif isinstance(op, ExpireDedup):
            d.dedup = {k: v for k, v in d.dedup.items() if v[0] > op.before_ms}
        elif isinstance(op, PutStream):
            old = d.streams.get(op.name)
            d.streams[op.name] = (json.dumps(op.config, sort_keys=True), old[1] if old else op.created_ms)
        elif isinstance(op, DeleteStream):
            name = op.name
            for table in (d.stream_rows, d.floors, d.marks):
                for key in [k for k in table if k[0] == name]:
                    del table[key]
            for okey in [k for k in d.offsets if k[0] == name]:
                del d.offsets[okey]
            d.streams.pop(name, None)
        elif isinstance(op, DeleteGroup):
            for okey in [k for k in d.offsets if k[0] == op.stream and k[1] == op.group]:
                del d.offsets[okey]
        elif isinstance(op, CommitOffsets):
            for stream, grp, part, committed, delivered in it.offsets:
                c, dl = d.offsets.get((stream, grp, part), (committed, delivered))
                d.offsets[(stream, grp, part)] = (max(c, committed), max(dl, delivered))
        elif isinstance(op, MarkStreamNext):
            for stream, part, nxt in op.marks:
                d.marks[(stream, part)] = max(d.marks.get((stream, part), nxt), nxt)
        elif isinstance(op, TrimStream):
            pk = (op.stream, op.partition)
            rows = d.stream_rows.get(pk)
            if rows:
                for off in [o for o in rows if o < op.before]:
                    del rows[off]
            d.floors[pk] = max(d.floors.get(pk, op.before), op.before)
        elif isinstance(op, PutSchema):
            _sql, (name, version, doc, mode, created) = it.statements[0]  # type: ignore[index]
            if (name, version) in d.schemas:
                raise _OpFailed(f"UNIQUE constraint failed: schema {name!r} version {version} exists")
            d.schemas[(name, version)] = (doc, mode, created)
        elif isinstance(op, PutSchemaBinding):
            _sql, (pattern, schema, on_invalid, dead_letter, created) = it.statements[0]  # type: ignore[index]
            d.schema_bindings[pattern] = (schema, on_invalid, dead_letter, created)
        elif isinstance(op, DeleteSchemaBinding):
            d.schema_bindings.pop(op.pattern, None)
        else:  # prepare() accepted it, so the two lists of operations disagree
            raise AssertionError(f"MemoryStore cannot apply {type(op).__name__}")

    # --- reads -----------------------------------------------------------------------

    async def _read(self) -> MemoryData:
        """Every read starts here: a real await (like a query), then the closed check."""
        await anyio.lowlevel.checkpoint()
        if not self._open:
            raise StorageClosed("store :memory: is closed")
        if self._read_failures:
            raise self._read_failures.popleft()
        return self.data

    async def max_message_id(self) -> int:
        return (await self._read()).max_id

    async def check_dedup(self, msg_ids: list[str], now_ms: int | None = None) -> dict[str, bytes]:
        d = await self._read()
        if now_ms is None:
            now_ms = int(time.time() * 1000)
        found: dict[str, bytes] = {}
        for m in msg_ids:
            e = d.dedup.get(m)
            if e is not None and e[0] > now_ms:
                found[m] = e[1]
        return found

    async def load_queues(self) -> list[tuple[str, dict[str, Any], int]]:
        d = await self._read()
        return [(name, json.loads(conf), created) for name, (conf, created) in sorted(d.queues.items())]

    async def load_messages(self, queue: str, after: PageKey | None = None, *,
                            due_before_ms: int | None = None, limit: int = 1000,
                            max_bytes: int | None = None, min_rows: int = 1,
                            priority: int | None = None) -> list[StoredMessage]:
        d = await self._read()
        rows = sorted(d.messages.get(queue, {}).values(), key=_due_key)
        if priority is not None:
            rows = [r for r in rows if r[11] == priority]
        if after is not None:
            rows = [r for r in rows if (r[7], r[1]) > after]
        if due_before_ms is not None:
            rows = [r for r in rows if r[7] <= due_before_ms]
        return [decode_message(r) for r in _page(rows, 3, limit, max_bytes, min_rows)]

    async def next_available_ms(self, queue: str, after: PageKey | None = None,
                                priority: int | None = None) -> int | None:
        d = await self._read()
        keys = [(r[7], r[1]) for r in d.messages.get(queue, {}).values() if priority is None or r[11] == priority]
        if after is not None:
            keys = [k for k in keys if k > after]
        return min(keys)[0] if keys else None

    async def count(self, queue: str, priority: int | None = None) -> int:
        rows = (await self._read()).messages.get(queue, {})
        if priority is not None:
            return sum(1 for r in rows.values() if r[11] == priority)
        return len(rows)

    async def oldest(self, queue: str, n: int) -> list[StoredMessage]:
        rows = (await self._read()).messages.get(queue, {})
        return [decode_message(rows[i]) for i in sorted(rows)[:max(n, 0)]]

    async def list_messages(self, queue: str, limit: int = 100, offset: int = 0) -> list[StoredMessage]:
        rows = (await self._read()).messages.get(queue, {})
        return [decode_message(rows[i]) for i in sorted(rows)[max(offset, 0):max(offset, 0) + max(limit, 0)]]

    async def backup(self, path: str) -> None:
        """Not supported: a MemoryStore has no file to copy. Raises StorageError."""
        await self._read()
        raise StorageError(f"backup to {path} failed: the in-memory store keeps no file to copy")

    async def load_schemas(self) -> list[tuple[str, int, Any, str, int]]:
        d = await self._read()
        return [(name, version, json.loads(doc), mode, created)
                for (name, version), (doc, mode, created) in sorted(d.schemas.items())]

    async def load_schema_bindings(self) -> list[tuple[str, str, str, str | None, int]]:
        d = await self._read()
        return [(p, *b) for p, b in sorted(d.schema_bindings.items())]

    async def load_streams(self) -> list[tuple[str, dict[str, Any], int]]:
        d = await self._read()
        return [(name, json.loads(conf), created) for name, (conf, created) in sorted(d.streams.items())]

    async def partition_bounds(self, stream: str) -> dict[int, tuple[int, int, int]]:
        d = await self._read()
        return {p: (min(rows), max(rows), sum(len(r[5]) + STREAM_ROW_OVERHEAD for r in rows.values()))
                for (s, p), rows in d.stream_rows.items() if s == stream and rows}

    async def partition_floors(self, stream: str) -> dict[int, int]:
        d = await self._read()
        return {p: v for (s, p), v in d.floors.items() if s == stream}

    async def partition_marks(self, stream: str) -> dict[int, int]:
        d = await self._read()
        return {p: v for (s, p), v in d.marks.items() if s == stream}

    async def read_partition(self, stream: str, partition: int, from_offset: int, limit: int,
                             max_bytes: int | None = None, min_rows: int = 1) -> list[StreamRow]:
        rows = (await self._read()).stream_rows.get((stream, partition), {})
        page = [rows[o] for o in sorted(o for o in rows if o >= from_offset)]
        return [decode_stream_row(r) for r in _page(page, 5, limit, max_bytes, min_rows)]

    async def offset_for_time(self, stream: str, partition: int, ts_ms: int) -> int | None:
        rows = (await self._read()).stream_rows.get((stream, partition), {})
        return min((o for o, r in rows.items() if r[8] >= ts_ms), default=None)

    async def load_offsets(self, stream: str) -> dict[str, dict[int, tuple[int, int]]]:
        d = await self._read()
        out: dict[str, dict[int, tuple[int, int]]] = {}
        for (s, g, p), v in d.offsets.items():
            if s == stream:
                out.setdefault(g, {})[p] = v
        return out

    async def cutoff_by_age(self, stream: str, partition: int, before_ms: int) -> int | None:
        rows = (await self._read()).stream_rows.get((stream, partition), {})
        last = max((o for o, r in rows.items() if r[8] < before_ms), default=None)
        return None if last is None else last + 1

    async def cutoff_by_bytes(self, stream: str, partition: int, max_bytes: int) -> int | None:
        rows = (await self._read()).stream_rows.get((stream, partition), {})
        total = 0
        for o in sorted(rows, reverse=True):
            total += len(rows[o][5]) + STREAM_ROW_OVERHEAD
            if total > max_bytes:
                return o + 1
        return None


def _due_key(r: Row) -> tuple[int, int]:
    return (r[7], r[1])


def _page(rows: list[Row], payload_at: int, limit: int, max_bytes: int | None, min_rows: int) -> list[Row]:
    """The first rows of `rows`: at most `limit`, and beyond `min_rows` only while
    their payloads (column `payload_at`) add up to at most `max_bytes` (as Reads._fetch_page)."""
    rows = rows[:max(limit, 0)]
    if max_bytes is None:
        return rows
    total = fit = 0
    for r in rows:
        total += len(r[payload_at])
        if fit >= min_rows and total > max_bytes:
            break
        fit += 1
    return rows[:fit]


if TYPE_CHECKING:
    _: type[Store] = MemoryStore  # mypy checks that MemoryStore meets the whole contract
