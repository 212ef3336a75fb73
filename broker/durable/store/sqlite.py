"""SqliteStore: durable queues in one SQLite file (WAL), owned by one actor task.

Writes: callers put operations in a bounded mailbox; the actor (`run`) wakes,
takes everything pending (up to BATCH_MAX_MESSAGES), runs it as ONE
transaction (group commit), commits, and only then calls every covered
operation's `on_done`. A failed transaction is rolled back. If some operation's
data caused it (a duplicate key, say), the operations are retried in smaller
groups so that the bad one fails alone; on a full disk, operations that need new
pages fail with StorageFull at once while those that free space (acks, purges)
still commit; any other error (I/O, busy, corrupt) fails the whole batch.
Each operation is atomic either way: it is wholly stored or not at all.

One transaction is one hand-off to the SQLite thread: BEGIN, every statement,
the id high-water mark, COMMIT (or the rollback) run there in one call, so a
commit costs one loop <-> thread round trip however many statements it has.
Bookkeeping writes nobody waits on (fire-and-forget acks, delivery counts) do
not get a transaction of their own while publishes are arriving: they ride in
the next one (BOOKKEEPING_DELAY, BOOKKEEPING_MAX_ROWS). Checkpoints run off the
commit path: SQLite's automatic checkpoint is off and a thread with its own
connection checkpoints the WAL (see _Checkpointer).

Reads run on the same connection, serialised with transactions by a lock, so
a read never sees a half-done transaction and sees everything committed.
"""

from __future__ import annotations

import asyncio
import io
import linecache
import logging
import os
import sqlite3
import sys
import threading
import time
import traceback
from types import FrameType
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Final

import aiosqlite
import anyio
import anyio.lowlevel
import anyio.to_thread
from anyio.abc import TaskStatus

from tidings.broker.durable.store import migrations
from tidings.broker.durable.store.base import (
    DURABILITIES,
    DeleteMessages,
    MarkDelivered,
    Durability,
    StorageClosed,
    StorageError,
    StorageFull,
    Store,
    UpdateMessages,
    WriteOp,
    is_waited,
)
from tidings.broker.durable.store.batch import RAISE_MAX_ID, Item, plan, prepare
from tidings.broker.durable.store.lockfile import LockFile
from tidings.broker.durable.store.reads import Reads, recover_delivery_marks, translate
from tidings.broker.durable.store.schemas import SchemaReads
from tidings.broker.durable.store.streams import StreamReads

log = logging.getLogger(__name__)

DB_FILENAME: Final = "tidings.db"

#: Mailbox bound, in messages: ~0.3-0.5 s of commits at the measured 100-170k rows/s.
#: A deeper mailbox adds confirm latency without adding throughput; when it is full,
#: `submit` waits, and that wait is what pauses the publishers' socket readers.
MAILBOX_MAX_MESSAGES: Final = 50_000
#: Mailbox bound, in payload bytes: caps the memory held by writes not yet committed.
MAILBOX_MAX_BYTES: Final = 64 * 1024 * 1024
#: Most rows in one transaction: bounds the time to the first confirm of a batch
#: and the WAL growth per commit; beyond a few thousand rows, batching gains little.
BATCH_MAX_MESSAGES: Final = 20_000
#: SQLite page cache of the store connection (negative = KiB): the hot index pages.
CACHE_KIB: Final = 32 * 1024
#: The WAL file is truncated back to this size after a checkpoint.
JOURNAL_SIZE_LIMIT: Final = 64 * 1024 * 1024
#: How often the checkpoint thread looks for new commits and, if any, runs a PASSIVE
#: checkpoint on its own connection. SQLite's automatic checkpoint (wal_autocheckpoint)
#: is off: it ran inside the commit that crossed 1,000 WAL pages, so that publish paid
#: the checkpoint's two syncs. A PASSIVE checkpoint never blocks the writer.
CHECKPOINT_INTERVAL: Final = 0.2
#: The WAL bound: when a commit leaves the WAL file larger than this (the background
#: checkpoint could not catch up with the writer, which then never restarts the log),
#: the actor runs one checkpoint itself between transactions, after that commit's
#: confirms went out. Above JOURNAL_SIZE_LIMIT, to which a restarted WAL is truncated,
#: so a WAL that is being restarted never looks over the bound.
WAL_MAX_BYTES: Final = 96 * 1024 * 1024
#: Bookkeeping writes nobody waits on (DeleteMessages, UpdateMessages, MarkDelivered without a waiter)
#: wait at most this long for the next publish commit to ride in while publishes are
#: arriving (no transaction of their own, so no publish waits behind one). They are
#: already asynchronous to clients; a few ms only delays when an ack's row is gone.
BOOKKEEPING_DELAY: Final = 0.005
#: ... and at most this many rows wait: beyond it they commit at once, so riding
#: along never adds more than ~2 ms (at ~7 us a row) to a publish commit.
BOOKKEEPING_MAX_ROWS: Final = 256
#: Modes of the data directory and of every file in it: payloads are private to the
#: broker's OS user (another user could read them, or hold the lock and stop restarts).
DIR_MODE: Final = 0o700
FILE_MODE: Final = 0o600
#: How long a statement waits for a lock held by another connection (a backup, an admin tool).
BUSY_TIMEOUT_MS: Final = 5_000

#: A batch whose transaction (lock wait included) runs longer than this is a stall: the
#: watchdog logs it with the actor's and the SQLite thread's stacks and /readyz fails
#: until it ends. Commits take milliseconds; a busy disk can make one take a second or
#: two, so 5 s is well past normal but short next to a client's 30 s dead-peer timeout.
STALL_TIMEOUT: Final = 5.0
#: The watchdog looks this many times per stall_timeout (at most once a second).
WATCH_CHECKS_PER_TIMEOUT: Final = 4

_SYNCHRONOUS: Final = {"full": "FULL", "normal": "NORMAL"}
#: The operations that may wait for the next publish commit when nobody waits on them.
_BOOKKEEPING: Final = frozenset({DeleteMessages, UpdateMessages, MarkDelivered})


def _op_specific(error: StorageError) -> bool:
    """Whether `error` comes from the data of some op (a duplicate key, a value SQLite
    cannot bind or store, a bug tripped by one op) rather than from the database as a whole."""
    cause = error.__cause__
    return (isinstance(cause, (sqlite3.IntegrityError, sqlite3.DataError, sqlite3.ProgrammingError,
                               sqlite3.InterfaceError))
            or not isinstance(cause, sqlite3.Error))


def _restrict(path: str, mode: int, what: str) -> None:
    """Take group/other permissions off ``path`` (left by an older tidings, or a lax
    umask) and say so. OSError if it cannot be done."""
    st = os.stat(path)
    if st.st_mode & 0o077:
        os.chmod(path, mode)
        log.warning("%s %s was mode %03o, readable by other OS users; now %03o", what, path,
                    st.st_mode & 0o777, mode)


class SqliteStore(Reads, StreamReads, SchemaReads):
    """The durable store of one data directory. Lifecycle:

        store = SqliteStore(path)           # or SqliteStore.in_dir(data_dir)
        await store.open()                  # create/migrate; reads work from here
        await tg.start(store.run)           # the actor: writes commit from here
        ...
        await store.close()                 # commits what is pending, then closes

    `durability="full"` (default): synchronous=FULL, a confirmed write survives a
    process crash and a power loss. `"normal"`: synchronous=NORMAL, survives a
    process crash but the last commits may be lost on power loss (warned at open).
    `max_page_count` caps the database size in pages (used to test a full disk).

    Metrics (plain attributes, for the metrics exporter): commits, committed_ops,
    committed_messages, failed_ops, failed_transactions, last_commit_seconds,
    commit_seconds_total, last_batch_ops, last_batch_messages, stalls; the pending_*
    properties (the mailbox); inflight_ops, inflight_messages, inflight_bytes (the
    batch being committed), transaction_seconds, transaction_phase and stalled.
    `on_commit(seconds, messages)`, if set, is called after each
    commit (in the actor, before the confirms go out): it must be quick and not raise.

    A transaction that does not return is loud: `watchdog()` (a task beside `run`)
    logs an ERROR with the stacks of the storage actor, of the task holding the
    store lock and of the SQLite thread once a batch has been in flight longer than
    `stall_timeout`, and `stalled` is true (readiness fails) until it ends.
    """

    def __init__(self, path: str | os.PathLike[str], durability: Durability = "full", *,
                 max_page_count: int | None = None,
                 mailbox_max_messages: int = MAILBOX_MAX_MESSAGES,
                 mailbox_max_bytes: int = MAILBOX_MAX_BYTES,
                 batch_max_messages: int = BATCH_MAX_MESSAGES,
                 stall_timeout: float = STALL_TIMEOUT) -> None:
        if durability not in DURABILITIES:
            raise ValueError(f"durability must be one of {DURABILITIES}, not {durability!r}")
        super().__init__()
        try:  # the actor takes the lock once per commit: no extra pass of the event loop when free
            self._lock = anyio.Lock(fast_acquire=True)
        except TypeError:  # anyio < 4.5
            pass
        self.path = os.fspath(path)
        self.durability: Durability = durability
        self.max_page_count = max_page_count
        self.mailbox_max_messages = mailbox_max_messages
        self.mailbox_max_bytes = mailbox_max_bytes
        self.batch_max_messages = batch_max_messages
        if not stall_timeout > 0:
            raise ValueError(f"stall_timeout must be positive, not {stall_timeout!r}")
        self.stall_timeout = stall_timeout
        self._lockfile = LockFile(self.path + ".lock")
        self._mailbox: deque[Item] = deque()
        self._pending_messages = 0
        self._pending_bytes = 0
        # set when work arrives (or on close); one Event, cleared after each wake-up
        self._wakeup = asyncio.Event()
        self._space: anyio.Event | None = None  # set when a full mailbox drains
        self._stopped = anyio.Event()
        self._running = False
        self._idle = False  # the actor is parked on _wakeup
        self._deferring = False  # the actor holds bookkeeping for the next publish commit
        self._urgent_pending = 0  # mailbox items that are not bookkeeping nobody waits on
        self._last_batch_urgent = False  # the last batch taken had such an item (publishes arrive)
        self._db: sqlite3.Connection | None = None  # aiosqlite's sqlite3 connection (its thread only)
        self._checkpointer: _Checkpointer | None = None
        self._wal_over = False  # the last commit left the WAL over WAL_MAX_BYTES
        self._closing = False
        self._max_id = 0
        self._actor_task: asyncio.Task[Any] | None = None  # for the watchdog's stack dump
        # the batch being committed (taken from the mailbox, not yet resolved)
        self.inflight_ops = 0
        self.inflight_messages = 0
        self.inflight_bytes = 0
        self._batch_started: float | None = None  # time.monotonic() when it was taken
        self._batch_serial = 0
        self._reported_serial = 0  # the batch the watchdog last reported as stalled
        self.transaction_phase = "idle"  # where the current batch is: lock, BEGIN, write, COMMIT, ROLLBACK
        # metrics
        self.commits = 0
        self.committed_ops = 0
        self.committed_messages = 0
        self.failed_ops = 0
        self.failed_transactions = 0
        self.last_commit_seconds = 0.0
        self.commit_seconds_total = 0.0
        self.last_batch_ops = 0
        self.last_batch_messages = 0
        self.stalls = 0  # batches the watchdog reported as stalled
        self.checkpoints = 0  # background PASSIVE checkpoints run
        self.forced_checkpoints = 0  # checkpoints the actor ran because the WAL passed WAL_MAX_BYTES
        self.on_commit: Callable[[float, int], None] | None = None  # the metrics exporter's hook

    @classmethod
    def in_dir(cls, data_dir: str | os.PathLike[str], durability: Durability = "full",
               **kwargs: Any) -> SqliteStore:
        """The store of a data directory: its one database file is `<data_dir>/tidings.db`."""
        return cls(os.path.join(os.fspath(data_dir), DB_FILENAME), durability, **kwargs)

    # --- lifecycle --------------------------------------------------------------

    async def open(self) -> None:
        """Create the directory and database if missing, take the data directory's
        lock, apply pending migrations and load the id high-water mark.

        Raises StorageError if the file is not a usable tidings database or another
        process holds it, SchemaTooNew if a newer tidings wrote it.
        """
        if self._conn is not None or self._closing:
            raise StorageError("open() may be called once per SqliteStore")
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(directory, mode=DIR_MODE, exist_ok=True)
            _restrict(directory, DIR_MODE, "data directory")
        except OSError as exc:
            raise StorageError(f"cannot create or restrict the directory of {self.path}: {exc}") from exc
        self._lockfile.acquire()
        try:
            # SQLite creates -wal and -shm with the database's mode: create it 0600 first.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE))
            # the database, its -wal/-shm, the audit log: every file an older version left
            ours = os.path.basename(self.path)
            for entry in os.scandir(directory):
                if entry.is_file(follow_symlinks=False):
                    what = "database file" if entry.name.startswith(ours) else "data file"
                    _restrict(entry.path, FILE_MODE, what)
        except OSError as exc:
            self._lockfile.release()
            raise StorageError(f"cannot create or restrict {self.path}: {exc}") from exc
        try:
            conn = await aiosqlite.connect(self.path, isolation_level=None)
        except sqlite3.Error as exc:
            self._lockfile.release()
            raise StorageError(f"cannot open {self.path}: {exc}") from exc
        try:
            await self._configure(conn)
            await migrations.migrate(conn, self.path)
            recovered = await recover_delivery_marks(conn)
            if recovered:
                log.info("store %s: %d messages delivered before the restart count one delivery", self.path,
                         recovered)
            rows = list(await conn.execute_fetchall("SELECT value FROM meta WHERE key = 'max_message_id'"))
            self._max_id = int(rows[0][0]) if rows else 0
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await conn.close()
            self._lockfile.release()
            if isinstance(exc, sqlite3.Error):
                raise StorageError(f"cannot open {self.path}: {exc}") from exc
            raise
        self._conn = conn
        self._db = _raw_connection(conn)
        self._checkpointer = _Checkpointer(self)
        log.info("store %s open (durability=%s, max message id %d)", self.path, self.durability, self._max_id)

    async def _configure(self, conn: aiosqlite.Connection) -> None:
        rows = list(await conn.execute_fetchall("PRAGMA journal_mode = WAL"))
        if not rows or str(rows[0][0]).lower() != "wal":
            raise StorageError(f"{self.path}: SQLite refused WAL mode (got {rows[0][0] if rows else None!r})")
        await conn.execute(f"PRAGMA synchronous = {_SYNCHRONOUS[self.durability]}")
        if self.durability == "full":
            # macOS: a plain fsync does not reach the platter; F_FULLFSYNC does. No-op elsewhere.
            await conn.execute("PRAGMA fullfsync = ON")
            await conn.execute("PRAGMA checkpoint_fullfsync = ON")
        await conn.execute(f"PRAGMA cache_size = {-CACHE_KIB}")
        await conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
        await conn.execute("PRAGMA wal_autocheckpoint = 0")  # the _Checkpointer's job
        await conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        await conn.execute("PRAGMA temp_store = MEMORY")
        if self.max_page_count is not None:
            await conn.execute(f"PRAGMA max_page_count = {int(self.max_page_count)}")
        if self.durability == "normal":
            log.warning(
                "store %s: durability=normal (synchronous=NORMAL): confirmed writes survive a "
                "broker crash, but the last commits before a power loss or OS crash may be lost",
                self.path)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The storage actor. Start it with `await tg.start(store.run)` after `open()`.

        Returns once `close()` has been called and the mailbox is drained. Each
        transaction is shielded from cancellation, so a cancelled actor never
        leaves an operation half-done or its callback uncalled; whatever is still
        queued when it is cancelled is committed by `close()`.
        """
        if self._conn is None:
            raise StorageClosed("open() the store before running it")
        if self._running:
            raise RuntimeError("the store actor is already running")
        self._running = True
        self._stopped = anyio.Event()
        try:
            self._actor_task = asyncio.current_task()
        except RuntimeError:  # not asyncio: the watchdog reports without the actor's stack
            self._actor_task = None
        task_status.started()
        try:
            while True:
                if not self._mailbox:
                    if self._closing:
                        return
                    self._idle = True
                    await self._wakeup.wait()
                    self._idle = False
                    self._wakeup.clear()
                    continue
                if self._may_defer():
                    # Only bookkeeping is pending and publishes are arriving: wait for the
                    # next one (or the delay, or the row bound) and commit them together.
                    self._deferring = True
                    with anyio.move_on_after(BOOKKEEPING_DELAY):
                        await self._wakeup.wait()
                    self._deferring = False
                    self._wakeup.clear()
                with anyio.CancelScope(shield=True):
                    await self._commit_next()
                # Under sustained load the mailbox never empties: be cancellable between batches.
                await anyio.lowlevel.checkpoint_if_cancelled()
        finally:
            self._running = False
            self._stopped.set()

    async def close(self) -> None:
        """Refuse new work, commit everything already submitted, close the database.

        Idempotent. Shielded from cancellation: the work it waits for is bounded
        (one mailbox) and abandoning it would lose submitted writes.
        """
        if self._conn is None:
            return
        self._closing = True
        self._wakeup.set()
        if self._space is not None:
            self._space.set()  # blocked submitters wake up and see StorageClosed
        with anyio.CancelScope(shield=True):
            if self._running:
                await self._stopped.wait()
            while self._mailbox:
                await self._commit_next()
            checkpointer, self._checkpointer = self._checkpointer, None
            if checkpointer is not None:
                await anyio.to_thread.run_sync(checkpointer.stop)
            async with self._lock:
                conn, self._conn = self._conn, None
                self._db = None
                if conn is not None:
                    await conn.close()
            self._lockfile.release()
        log.info("store %s closed", self.path)

    async def max_message_id(self) -> int:
        """The highest message id ever committed (0 for a new database), including
        ids since deleted: the broker continues its id sequence above it."""
        if self._conn is None:
            raise StorageClosed(f"store {self.path} is closed")
        return self._max_id

    # --- the mailbox ------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        """Open, and not closing: what the readiness endpoint asks of storage."""
        return self._conn is not None and not self._closing

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

    def submit_nowait(self, op: WriteOp) -> None:
        """Queue `op` for the next transaction.

        Raises anyio.WouldBlock if the mailbox is full, StorageClosed if the store
        is closing or closed, TypeError/ValueError if `op` cannot be stored. A single
        operation is accepted into a non-full mailbox whatever its size.
        """
        if self._closing or self._conn is None:
            raise StorageClosed(f"store {self.path} is closed")
        if self._full():
            raise anyio.WouldBlock
        self._enqueue(prepare(op))

    async def submit(self, op: WriteOp) -> None:
        """Queue `op`, first waiting while the mailbox is full (backpressure).

        Returns as soon as `op` is queued, not when it is committed: the outcome
        arrives through `op.on_done`. Raises like submit_nowait, except WouldBlock.
        Waiters are woken together when space frees up (no FIFO guarantee).
        """
        it = prepare(op)
        while True:
            if self._closing or self._conn is None:
                raise StorageClosed(f"store {self.path} is closed")
            if not self._full():
                self._enqueue(it)
                return
            if self._space is None:
                self._space = anyio.Event()
            await self._space.wait()

    async def wait_for_space(self) -> None:
        """Return once the mailbox has room, so that a following submit_nowait
        (with no await in between) succeeds. Raises StorageClosed."""
        while True:
            if self._closing or self._conn is None:
                raise StorageClosed(f"store {self.path} is closed")
            if not self._full():
                return
            if self._space is None:
                self._space = anyio.Event()
            await self._space.wait()

    async def write(self, op: WriteOp) -> None:
        """Submit `op` and wait until it is committed. Raises the StorageError it
        failed with. If the caller is cancelled after submitting, the operation
        still commits (its own on_done, if any, still runs)."""
        waiter = _Waiter(op.on_done)
        op.on_done = waiter  # waited on: never held back as bookkeeping
        await self.submit(op)
        await waiter.done.wait()
        error = waiter.outcome[0]
        if error is not None:
            # A fresh instance: one error object is shared by every op of a failed batch.
            raise type(error)(*error.args) from error.__cause__

    def _enqueue(self, it: Item) -> None:
        self._mailbox.append(it)
        self._pending_messages += it.messages
        self._pending_bytes += it.nbytes
        urgent = _urgent(it)
        if urgent:
            self._urgent_pending += 1
        # only a parked actor needs the (not free) Event.set(); one holding bookkeeping,
        # only for work that ends the wait
        if self._idle or (self._deferring and (urgent or self._pending_messages >= BOOKKEEPING_MAX_ROWS)):
            self._idle = self._deferring = False
            self._wakeup.set()

    def _may_defer(self) -> bool:
        """Whether the mailbox holds only bookkeeping nobody waits on, few rows of it,
        and the last batch carried publishes (so the next one is likely near)."""
        return (self._urgent_pending == 0 and self._last_batch_urgent and not self._closing
                and self._pending_messages < BOOKKEEPING_MAX_ROWS)

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
        urgent_left = sum(1 for it in mailbox if _urgent(it)) if mailbox else 0  # rare: the cap cut the batch
        self._last_batch_urgent = self._urgent_pending > urgent_left
        self._urgent_pending = urgent_left
        self.inflight_ops, self.inflight_messages, self.inflight_bytes = len(batch), n, nbytes
        self._batch_serial += 1
        self._batch_started = time.monotonic()
        if self._space is not None and not self._full():
            self._space.set()
            self._space = None
        return batch

    # --- the transaction --------------------------------------------------------

    async def _commit_next(self) -> None:
        batch = self._take_batch()
        try:
            self.transaction_phase = "lock"  # a read holds the connection
            async with self._lock:
                await self._execute(batch)
                if self._wal_over:  # after the batch's callbacks: its confirms are out
                    self._wal_over = False
                    self.transaction_phase = "checkpoint"
                    await self._forced_checkpoint()
        finally:
            if self._reported_serial == self._batch_serial:
                log.warning("store: the stalled batch (%d ops) ended after %.1f s", len(batch),
                            self.transaction_seconds)
            self.inflight_ops = self.inflight_messages = self.inflight_bytes = 0
            self._batch_started = None
            self.transaction_phase = "idle"

    # --- the watchdog -----------------------------------------------------------

    @property
    def transaction_seconds(self) -> float:
        """How long the batch in flight has been (lock wait included); 0 when none is."""
        started = self._batch_started
        return 0.0 if started is None else time.monotonic() - started

    @property
    def stalled(self) -> bool:
        """A batch has been in flight longer than `stall_timeout`."""
        return self.transaction_seconds > self.stall_timeout

    async def watchdog(self) -> None:
        """Report each stalled batch once (an ERROR with the stacks) until cancelled.
        Start it beside `run`; it only reads, it never interferes with the actor."""
        interval = min(1.0, self.stall_timeout / WATCH_CHECKS_PER_TIMEOUT)
        while True:
            await anyio.sleep(interval)
            serial = self._batch_serial
            if self.stalled and self._reported_serial != serial:
                self._reported_serial = serial
                self.stalls += 1
                log.error("store: a transaction has run %.1f s (stall_timeout %.1f s), phase %s, "
                          "%d ops / %d messages / %d bytes in flight, %d ops pending; "
                          "the broker is not ready until it ends\n%s",
                          self.transaction_seconds, self.stall_timeout, self.transaction_phase,
                          self.inflight_ops, self.inflight_messages, self.inflight_bytes,
                          self.pending_ops, self.stack_report())

    def stack_report(self) -> str:
        """The stacks that tell where a transaction waits: the actor task's await
        chain, the store lock's holder (if not the actor), the SQLite thread."""
        out = io.StringIO()
        tasks = {id(t): t for t in asyncio.all_tasks()} if self._actor_task is not None else {}
        if self._actor_task is not None:
            out.write("storage actor task:\n")
            out.write(_await_chain(self._actor_task))
        stats = self._lock.statistics()
        owner = stats.owner
        out.write(f"store lock: {'held by task ' + repr(owner.name) if owner else 'free'}, "
                  f"{stats.tasks_waiting} waiting\n")
        if owner is not None and (self._actor_task is None or owner.id != id(self._actor_task)):
            holder = tasks.get(owner.id)
            if holder is not None:
                out.write(_await_chain(holder))
        thread = getattr(self._conn, "_thread", None)  # aiosqlite's worker thread (a private attribute)
        frame = sys._current_frames().get(thread.ident) if thread is not None and thread.ident else None
        if frame is None:
            out.write("SQLite thread: not found\n")
        else:
            # Idle in its queue while the actor awaits it: the call's completion was lost
            # (not SQLite). Inside a call: SQLite itself waits (a lock, I/O).
            worker: FrameType | None = frame
            while worker is not None and worker.f_code.co_name != "_connection_worker_thread":
                worker = worker.f_back
            line = linecache.getline(worker.f_code.co_filename, worker.f_lineno) if worker is not None else ""
            state = ("idle, waiting for work" if ".get(" in line else
                     "in a call" if "function()" in line else "between calls")
            out.write(f"SQLite thread {getattr(thread, 'name', '?')} ({state}):\n")
            out.write("".join(traceback.format_stack(frame)))
        return out.getvalue()

    async def _execute(self, items: list[Item]) -> None:
        """Commit `items`, or fail them. A group that failed because of some op's data
        is retried in halves until each failing op stands alone, so one bad op never
        fails the others; on a full disk, ops that need pages fail at once and the
        others are retried together."""
        error = await self._transaction(items)
        if error is None:
            self._resolve(items, None)
            return
        if len(items) == 1:
            self.failed_ops += 1
            self._resolve(items, error)
            return
        if isinstance(error, StorageFull):
            growing = [it for it in items if it.grows]
            if growing and len(growing) < len(items):
                # Whatever needs pages fails now; acks and purges still commit (and free space).
                self.failed_ops += len(growing)
                self._resolve(growing, error)
                await self._execute([it for it in items if not it.grows])
                return
            if len(growing) == len(items):
                self.failed_ops += len(items)
                self._resolve(items, error)
                return
        if not _op_specific(error):
            # A busy, read-only, corrupt or failing disk fails every op alike: retrying
            # them one by one would only multiply the wait.
            self.failed_ops += len(items)
            self._resolve(items, error)
            return
        mid = len(items) // 2
        await self._execute(items[:mid])
        await self._execute(items[mid:])

    async def _transaction(self, items: list[Item]) -> StorageError | None:
        """Run `items` as one transaction. Returns None once committed, or the error
        after rolling back (the database is then exactly as before)."""
        conn, db = self._conn, self._db
        assert conn is not None and db is not None
        started = time.perf_counter()
        error = await _on_sqlite_thread(conn, self._transaction_on_thread, db, items)
        if error is not None:
            self.failed_transactions += 1
            return error
        max_id = max(it.max_id for it in items)
        self._max_id = max(self._max_id, max_id)
        self.last_commit_seconds = time.perf_counter() - started
        self.commit_seconds_total += self.last_commit_seconds
        self.last_batch_ops = len(items)
        self.last_batch_messages = sum(it.messages for it in items)
        self.commits += 1
        self.committed_ops += len(items)
        self.committed_messages += self.last_batch_messages
        if self.on_commit is not None:
            self.on_commit(self.last_commit_seconds, self.last_batch_messages)
        return None

    def _transaction_on_thread(self, db: sqlite3.Connection, items: list[Item]) -> StorageError | None:
        """The whole transaction in one call on the SQLite thread: BEGIN, the stages, the
        id high-water mark, COMMIT, or the rollback. Sets transaction_phase as it goes (a
        plain attribute, read by the watchdog). Returns None once committed, or the error."""
        try:
            if db.in_transaction:  # left over from a rollback that failed
                self.transaction_phase = "ROLLBACK"
                db.execute("ROLLBACK")
            self.transaction_phase = "BEGIN"
            db.execute("BEGIN IMMEDIATE")
            self.transaction_phase = "write"
            for stage in plan(items):
                stage.execute(db)
            max_id = max(it.max_id for it in items)
            if max_id > self._max_id:
                db.execute(RAISE_MAX_ID, (max_id,))
            self.transaction_phase = "COMMIT"
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback(db)
            log.debug("transaction of %d ops failed: %s", len(items), exc)
            return translate(exc)
        except Exception as exc:  # actor boundary: a bug must fail these ops, not the store
            log.exception("store transaction failed unexpectedly")
            self._rollback(db)
            err = StorageError(f"internal store error: {exc!r}")
            err.__cause__ = exc
            return err
        try:
            self._wal_over = os.stat(self.path + "-wal").st_size > WAL_MAX_BYTES
        except OSError:
            pass  # no WAL file (yet): nothing to bound
        return None

    def _rollback(self, db: sqlite3.Connection) -> None:
        if not db.in_transaction:
            return  # SQLite already rolled back (it does so itself on SQLITE_FULL, for one)
        self.transaction_phase = "ROLLBACK"
        try:
            db.execute("ROLLBACK")
        except sqlite3.Error:
            log.exception("store rollback failed; it is retried before the next transaction")

    async def _forced_checkpoint(self) -> None:
        """The background checkpoint fell behind: checkpoint on the writer's connection,
        between transactions (a PASSIVE one: it never waits for a reader, such as a
        backup, whose snapshot keeps the WAL)."""
        conn = self._conn
        assert conn is not None
        self.forced_checkpoints += 1
        try:
            await conn.execute_fetchall("PRAGMA wal_checkpoint(PASSIVE)")  # its row read: the statement ends
        except sqlite3.Error as exc:
            log.warning("store %s: checkpoint failed: %s", self.path, exc)

    @staticmethod
    def _resolve(items: list[Item], error: StorageError | None) -> None:
        for it in items:
            cb = it.op.on_done
            if cb is None:
                continue
            try:
                cb(error)
            except Exception:  # actor boundary: a faulty callback must not stop the store
                log.exception("store on_done callback raised (op %s)", type(it.op).__name__)


def _urgent(it: Item) -> bool:
    """Anything but bookkeeping, and bookkeeping someone waits on (`SqliteStore.write`),
    starts a transaction at once; the rest may ride in the next one."""
    op = it.op
    return type(op) not in _BOOKKEEPING or is_waited(op.on_done)


class _Waiter:
    """The callback `SqliteStore.write` puts on the op it waits for."""

    __slots__ = ("chained", "done", "outcome")
    waited = True  # never held back as bookkeeping (base.is_waited)

    def __init__(self, chained: Callable[[Exception | None], None] | None) -> None:
        self.chained = chained
        self.done = anyio.Event()
        self.outcome: list[Exception | None] = []

    def __call__(self, error: Exception | None) -> None:
        self.outcome.append(error)
        self.done.set()
        if self.chained is not None:
            self.chained(error)


def _raw_connection(conn: aiosqlite.Connection) -> sqlite3.Connection:
    """The sqlite3 connection inside `conn`, to be used on its thread only (through
    `_on_sqlite_thread`). aiosqlite keeps it in a private attribute; a version that
    moved it fails here, at open, not in a transaction."""
    db = getattr(conn, "_connection", None)
    if not isinstance(db, sqlite3.Connection) or not callable(getattr(conn, "_execute", None)):
        raise StorageError(f"aiosqlite {aiosqlite.__version__} does not expose its connection and thread "
                           "as this store expects (Connection._connection, Connection._execute)")
    return db


async def _on_sqlite_thread(conn: aiosqlite.Connection, fn: Callable[..., Any], *args: Any) -> Any:
    """Run `fn(*args)` on `conn`'s thread, after every call queued before it, in one
    hand-off (aiosqlite runs any callable there; its public methods are one statement each)."""
    return await conn._execute(fn, *args)


class _Checkpointer:
    """PASSIVE checkpoints of the store's WAL on a connection and a thread of their own,
    every CHECKPOINT_INTERVAL when something was committed meanwhile: the WAL's pages
    reach the database file (and the writer can restart the log) without a publish
    commit paying the syncs. A PASSIVE checkpoint takes no write lock; SQLite never runs
    two checkpoints at once (the actor's forced one waits for this one, or the reverse)."""

    def __init__(self, store: SqliteStore) -> None:
        self._store = store
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tidings-checkpoint", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop and join the thread (blocking: call it from a worker thread)."""
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        store = self._store
        try:
            db = sqlite3.connect(store.path, isolation_level=None, check_same_thread=True)
        except sqlite3.Error as exc:
            log.error("store %s: the checkpoint thread cannot open the database: %s", store.path, exc)
            return
        try:
            # the checkpoint's syncs follow the connection that runs it: the store's own setting
            db.execute(f"PRAGMA synchronous = {_SYNCHRONOUS[store.durability]}")
            if store.durability == "full":
                db.execute("PRAGMA checkpoint_fullfsync = ON")
            db.execute("PRAGMA wal_autocheckpoint = 0")
            seen = store.commits
            failing = False
            while not self._stop.wait(CHECKPOINT_INTERVAL):
                commits = store.commits
                if commits == seen:
                    continue
                seen = commits
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:
                    if not failing:  # once per run of failures, not every interval
                        log.warning("store %s: background checkpoint failed: %s", store.path, exc)
                    failing = True
                    continue
                failing = False
                store.checkpoints += 1
        finally:
            db.close()


def _await_chain(task: asyncio.Task[Any]) -> str:
    """Where `task` is suspended: every frame of its chain of awaits, innermost last,
    then what the innermost one waits on (a Future, say). Task.print_stack shows only
    the outermost frame of a suspended task, which says nothing here."""
    lines = [f"  {task!r}\n"]
    aw: Any = task.get_coro()
    for _ in range(100):  # bounded: a chain is a few dozen awaits deep at most
        if aw is None:
            break
        for frame_attr, next_attr in (("cr_frame", "cr_await"), ("gi_frame", "gi_yieldfrom"),
                                      ("ag_frame", "ag_await")):
            if hasattr(aw, frame_attr):
                break
        else:
            lines.append(f"  waiting on {aw!r}\n")
            break
        frame = getattr(aw, frame_attr)
        if frame is None:  # finished, or not started
            break
        code = frame.f_code
        lines.extend(traceback.format_list([(code.co_filename, frame.f_lineno, code.co_name, None)]))
        aw = getattr(aw, next_attr)
    return "".join(lines)


if TYPE_CHECKING:
    _: type[Store] = SqliteStore  # mypy checks that SqliteStore meets the whole contract
