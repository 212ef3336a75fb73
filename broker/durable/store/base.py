"""The storage contract: the stored message, the write operations, the errors,
and the `Store` protocol that every backend implements (SqliteStore, the
durable one; MemoryStore, for unit tests).

The contract, which tests/storage/test_store_contract.py checks against every
backend:

* A store is an actor. Writers never wait on the disk themselves: they hand a
  write operation to the store's bounded mailbox (`submit`, `submit_nowait`)
  and learn the outcome through the operation's `on_done(error)` callback.
* Order: operations take effect in submission order. The store commits them
  in batches (group commit), but the end state of a batch is always that of
  running its operations one at a time, in the order submitted.
* Atomicity: each operation is wholly stored or not at all; an operation that
  fails (a duplicate key, a full disk) leaves no trace and does not fail the
  others of its batch unless the whole store failed (an I/O error).
* Callbacks: `on_done` is called exactly once per accepted operation, from the
  store's actor task, after the transaction covering it committed (`None`)
  or failed (a `StorageError`): never synchronously from `submit`, never
  before the commit. The callbacks of operations that commit run in their
  submission order (a failed one may be called back earlier).
* Reads see every committed write (every operation whose `on_done` has
  fired with None) and nothing of a transaction in progress or failed.
* Validation happens at submit: an operation that cannot be stored at all
  (not an operation, a header msgpack cannot encode, a move onto its own
  key, a config JSON cannot encode) raises TypeError/ValueError from
  `submit`/`submit_nowait` and is not queued.
* Delivery marks: `MarkDelivered` records, per queue (per priority lane in a
  priority queue), the highest `(available_ms, id)` key whose message was
  delivered for the first time; it only grows. `open()` (recovery) counts
  every stored message at or below its lane's mark whose `deliveries` is 0
  as delivered once (reads then say 1): a first delivery needs no row update
  of its own, and a crash still never lowers a count below the truth. Reads
  of an open store ignore the marks. PurgeQueue and DeleteQueue drop them.
* `close()` commits everything already accepted, then refuses new work
  (StorageClosed) and reads (StorageClosed). Ids never go backwards:
  `max_message_id()` is a high-water mark that deletes do not lower.

Time values are integer milliseconds since the Unix epoch throughout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeAlias

Durability: TypeAlias = Literal["full", "normal"]
DURABILITIES: tuple[Durability, ...] = ("full", "normal")

#: Called once per operation, from the store's actor task, after the
#: transaction that covered it committed (None) or failed (a StorageError).
#: It must be cheap and must not block; an exception it raises is logged.
DoneCallback: TypeAlias = Callable[[Exception | None], None]


def waited(cb: DoneCallback) -> DoneCallback:
    """Mark `cb` as one a caller is waiting on (an ACK that asked for its outcome, a
    `write()`): the store commits its op at once rather than letting bookkeeping ride
    in a later commit. Returns `cb`."""
    cb.waited = True  # type: ignore[attr-defined]
    return cb


def is_waited(cb: DoneCallback | None) -> bool:
    return getattr(cb, "waited", False) is True

#: (msg_id, expires_ms, result): a de-duplication entry; `result` is the
#: msgpack encoding of what the original publish was confirmed with.
DedupEntry: TypeAlias = tuple[str, int, bytes]


class StorageError(Exception):
    """A write or read could not be done; nothing of the failed operation was stored."""

    retriable = False


class StorageFull(StorageError):
    """The disk (or the configured page limit) is full. Retry after space is freed."""

    retriable = True


class StorageClosed(StorageError):
    """The store is closed (or was never opened); it accepts no more work."""


class SchemaTooNew(StorageError):
    """The database was written by a newer tidings (its schema version is higher
    than this code understands); it is refused rather than misread."""


@dataclass(slots=True)
class StoredMessage:
    """One message as stored in one durable queue.

    `id` is broker-assigned and unique within its queue; `(queue, id)` is the key.
    `available_ms` is when it may next be delivered (delays and backoff move it).
    `priority` is None in a plain queue and 0..max_priority in a priority queue
    (settings.QueueConfig.max_priority), whose reads page one priority at a time.
    """

    queue: str
    id: int
    subject: str
    payload: bytes
    headers: dict[str, Any] | None = None
    msg_id: str | None = None
    published_ms: int = 0
    available_ms: int = 0
    expires_ms: int | None = None
    deliveries: int = 0
    last_error: str | None = None
    priority: int | None = None


@dataclass(slots=True)
class StreamRow:
    """One stream message; `(stream, partition, offset)` is its key (a repeated key
    fails the operation that inserts it). Offsets are assigned by the broker."""

    stream: str
    partition: int
    offset: int
    subject: str
    key: str | None
    payload: bytes
    headers: dict[str, Any] | None
    msg_id: str | None
    timestamp_ms: int


# --- write operations --------------------------------------------------------
# Any mix of them can share one transaction; per queue they take effect in
# submission order (a put then a delete of the same id in one batch ends deleted).


@dataclass(slots=True)
class PutMessages:
    """Insert rows (possibly into several queues: a fan-out publish commits atomically)
    and record de-duplication entries (replacing older entries for the same msg_id)."""

    rows: list[StoredMessage]
    dedup: list[DedupEntry] = field(default_factory=list)
    on_done: DoneCallback | None = None
    #: Stream appends committed in the same transaction, so a publish bound to
    #: queues and streams is atomic.
    stream_rows: list[StreamRow] = field(default_factory=list)
    #: Cluster mode (store/pg_cluster.py): called inside the transaction once the
    #: stream rows have their final offsets; returns the de-dup entries encoded
    #: again with them (a duplicate is answered with the offsets that were stored).
    on_offsets: Callable[[], list[DedupEntry]] | None = None


@dataclass(slots=True)
class DeleteMessages:
    """Delete messages by id (acks). Ids that are absent are ignored."""

    queue: str
    ids: list[int]
    on_done: DoneCallback | None = None


@dataclass(slots=True)
class UpdateMessages:
    """Rewrite delivery bookkeeping: `updates` holds (id, available_ms, deliveries,
    last_error) tuples. Ids that are absent are ignored."""

    queue: str
    updates: list[tuple[int, int, int, str | None]]
    on_done: DoneCallback | None = None


#: The lane of a plain queue's delivery mark (a priority queue's lanes are its priorities, 0..N).
PLAIN_LANE = -1


@dataclass(slots=True)
class MarkDelivered:
    """Raise the "delivered up to" marks of `queue`: `marks` holds (lane,
    available_ms, id) triples, lane PLAIN_LANE for a plain queue or the
    priority of a priority queue's lane. A stored mark only grows (a lower key
    is ignored). Recovery (`open()`) counts each message of the lane at or
    below its mark with deliveries 0 as delivered once; nothing else reads it.
    On a full disk it fails like a publish (its first row needs room), not
    with the acks that free space."""

    queue: str
    marks: list[tuple[int, int, int]]
    on_done: DoneCallback | None = None


@dataclass(slots=True)
class MoveMessages:
    """Delete `(src_queue, old_id)` and insert `new_row` for each pair, atomically
    (dead-lettering, redrive). `new_row` carries its own queue, a new id and any
    extended headers; its key must differ from the key it replaces."""

    src_queue: str
    moves: list[tuple[int, StoredMessage]]
    on_done: DoneCallback | None = None


@dataclass(slots=True)
class PutQueue:
    """Create a queue, or replace the config of an existing one (keeping its created_ms)."""

    name: str
    config: dict[str, Any]
    created_ms: int
    on_done: DoneCallback | None = None


@dataclass(slots=True)
class DeleteQueue:
    """Delete a queue and every message in it."""

    name: str
    on_done: DoneCallback | None = None


@dataclass(slots=True)
class PurgeQueue:
    """Delete every message in a queue, keeping the queue."""

    name: str
    on_done: DoneCallback | None = None


@dataclass(slots=True)
class ExpireDedup:
    """Forget de-duplication entries with expires_ms <= before_ms (those that
    `check_dedup(..., now_ms=before_ms)` already treats as expired)."""

    before_ms: int
    on_done: DoneCallback | None = None


# --- stream write operations ---------------------------------------------------
# A stream partition is a run of rows keyed (stream, partition, offset); offsets
# are assigned by the broker before the write is submitted, so a store only inserts.


@dataclass(slots=True)
class PutStream:
    """Create a stream, or replace the config of an existing one (keeping its created_ms)."""

    name: str
    config: dict[str, Any]
    created_ms: int
    on_done: DoneCallback | None = None


@dataclass(slots=True)
class DeleteStream:
    """Delete a stream: its config, rows, floors, next-offset marks and group offsets."""

    name: str
    on_done: DoneCallback | None = None


@dataclass(slots=True)
class DeleteGroup:
    """Forget a consumer group of a stream: its committed offsets, every partition."""

    stream: str
    group: str
    on_done: DoneCallback | None = None


@dataclass(slots=True)
class CommitOffsets:
    """Upsert group offsets: (stream, group, partition, committed, delivered). Each
    stored value only grows: a lower value than the one stored is ignored."""

    offsets: list[tuple[str, str, int, int, int]]
    on_done: DoneCallback | None = None


@dataclass(slots=True)
class MarkStreamNext:
    """Record that offsets below ``next`` were assigned in a partition, as
    (stream, partition, next) triples: after a failed tail write, so that
    recovery never assigns those offsets again. Needs no new pages once the
    row exists, so it commits on a full disk too."""

    marks: list[tuple[str, int, int]]
    on_done: DoneCallback | None = None


@dataclass(slots=True)
class TrimStream:
    """Retention: delete a partition's rows below ``before`` (an offset)."""

    stream: str
    partition: int
    before: int
    on_done: DoneCallback | None = None


# --- schema registry write operations -------------------------------------------
# The broker's schema registry (tidings.broker.schemas) keeps its state here. A
# schema version is immutable: storing (name, version) twice fails the second op.


@dataclass(slots=True)
class PutSchema:
    """Store version ``version`` of schema ``name``: a JSON Schema ``document`` (any
    JSON value) and the name's ``compatibility`` mode from then on. Fails (alone) if
    that version is already stored."""

    name: str
    version: int
    document: Any
    compatibility: str
    created_ms: int
    on_done: DoneCallback | None = None


@dataclass(slots=True)
class PutSchemaBinding:
    """Bind subject ``pattern`` to schema ``schema`` (replacing any binding of that
    pattern): ``on_invalid`` is "reject" or "dead_letter", ``dead_letter`` the queue
    for the latter (None otherwise)."""

    pattern: str
    schema: str
    on_invalid: str
    dead_letter: str | None
    created_ms: int
    on_done: DoneCallback | None = None


@dataclass(slots=True)
class DeleteSchemaBinding:
    """Remove the binding of ``pattern``, if any."""

    pattern: str
    on_done: DoneCallback | None = None


if TYPE_CHECKING:
    from anyio.abc import TaskStatus

#: Every write operation a store accepts.
WriteOp: TypeAlias = (
    PutMessages | DeleteMessages | UpdateMessages | MarkDelivered | MoveMessages
    | PutQueue | DeleteQueue | PurgeQueue | ExpireDedup
    | PutStream | DeleteStream | CommitOffsets | MarkStreamNext | TrimStream
    | PutSchema | PutSchemaBinding | DeleteSchemaBinding
    | DeleteGroup
)

#: A paging cursor: the (available_ms, id) of the last message already read.
PageKey: TypeAlias = tuple[int, int]


class Store(Protocol):
    """The contract every store implements; the module docstring states the
    guarantees all methods share. SqliteStore and MemoryStore implement it.

    Reads raise StorageClosed once the store is closed (or before `open()`),
    and StorageError if the backend fails; they never raise for an unknown
    queue or stream (they return what is stored: nothing).
    """

    #: Where the data lives: the database file (SqliteStore), or a name that is
    #: no file (MemoryStore: ":memory:"). The backup call refuses a backup
    #: directory equal to its directory; the metrics stat it (absent: no metric).
    path: str
    #: Called in the actor after each commit, before the callbacks, with the
    #: transaction's seconds and messages (the metrics' histograms). Quick, never raises.
    on_commit: Callable[[float, int], None] | None

    @property
    def durability(self) -> Durability:
        """What a commit survives: "full" (power loss), "normal" (a process crash)."""
        ...

    # --- lifecycle ---------------------------------------------------------------

    async def open(self) -> None:
        """Make the stored state readable (create, migrate, recover). Once per store.
        Reads work from here; writes are accepted but commit only once `run` runs.
        Raises StorageError (SchemaTooNew) if the data cannot be used, or is held
        by another open store."""
        ...

    async def run(self, *, task_status: TaskStatus[None] = ...) -> None:
        """The actor: `await tg.start(store.run)` after `open()`. Commits the mailbox
        batch by batch until `close()` (then returns once drained). Cancelling it
        never leaves an operation half done or its callback uncalled: `close()`
        commits what is left."""
        ...

    async def close(self) -> None:
        """Refuse new work, commit everything accepted, release the data. Idempotent,
        shielded from cancellation; blocked submitters wake with StorageClosed."""
        ...

    async def watchdog(self) -> None:
        """Report stalled transactions until cancelled (a task beside `run`). A store
        whose transactions cannot stall may just wait to be cancelled."""
        ...

    # --- writes --------------------------------------------------------------------

    async def submit(self, op: WriteOp) -> None:
        """Queue `op`, first waiting while the mailbox is full (backpressure). Returns
        once queued, not committed: the outcome arrives through `op.on_done`.
        Raises StorageClosed, TypeError/ValueError for an op that cannot be stored."""
        ...

    def submit_nowait(self, op: WriteOp) -> None:
        """Queue `op` now, with no await (ids assigned just before stay in commit
        order). Raises anyio.WouldBlock if the mailbox is full, else like `submit`.
        A single op is accepted into a non-full mailbox whatever its size."""
        ...

    async def wait_for_space(self) -> None:
        """Return once the mailbox has room, so that a `submit_nowait` right after
        it (no await between) succeeds. Raises StorageClosed."""
        ...

    async def write(self, op: WriteOp) -> None:
        """Submit `op` and wait until it is committed; raise the StorageError it
        failed with (a fresh instance). `op.on_done`, if set, is still called.
        Cancelling the caller after the submit does not withdraw the op."""
        ...

    # --- queue reads -------------------------------------------------------------------

    async def max_message_id(self) -> int:
        """The highest message id ever committed (0 for a new store), including ids
        since deleted: the broker continues its id sequence above it."""
        ...

    async def check_dedup(self, msg_ids: list[str], now_ms: int | None = None) -> dict[str, bytes]:
        """msg_id -> stored result for each of `msg_ids` with an entry that has not
        expired at `now_ms` (expires_ms > now_ms; default: the wall clock). Any
        number of ids."""
        ...

    async def load_queues(self) -> list[tuple[str, dict[str, Any], int]]:
        """Every queue as (name, config, created_ms), by name. The config comes back
        as JSON would return it (sorted keys; tuples become lists)."""
        ...

    async def load_messages(self, queue: str, after: PageKey | None = None, *,
                            due_before_ms: int | None = None, limit: int = 1000,
                            max_bytes: int | None = None, min_rows: int = 1,
                            priority: int | None = None) -> list[StoredMessage]:
        """Up to `limit` messages of `queue` in delivery order (available_ms, id),
        strictly after the cursor `after`; with `due_before_ms` only those with
        available_ms <= it; with `max_bytes`, beyond the first `min_rows` only as
        many as keep the page's payload bytes within it; with `priority`, only
        the messages of that priority (a priority queue's lane). Each call returns new
        StoredMessage objects (the caller may change them)."""
        ...

    async def next_available_ms(self, queue: str, after: PageKey | None = None,
                                priority: int | None = None) -> int | None:
        """The available_ms of the first message of `queue` (of that `priority`,
        when given) after the cursor (in delivery order), or None if there is none."""
        ...

    async def count(self, queue: str, priority: int | None = None) -> int:
        """How many messages `queue` holds (of that `priority`, when given); may be
        O(length): recovery and admin."""
        ...

    async def oldest(self, queue: str, n: int) -> list[StoredMessage]:
        """The `n` messages of `queue` with the smallest ids."""
        ...

    async def list_messages(self, queue: str, limit: int = 100, offset: int = 0) -> list[StoredMessage]:
        """A page of `queue` by id: skip `offset` messages, then up to `limit`."""
        ...

    async def backup(self, path: str) -> None:
        """Write a consistent copy of the committed state to `path` (a file that
        must not exist) while the store runs: complete once this returns, never a
        partial file. Raises StorageError, also if `path` exists or the backend
        has nothing to copy to a file (MemoryStore)."""
        ...

    # --- stream reads ----------------------------------------------------------------

    async def load_streams(self) -> list[tuple[str, dict[str, Any], int]]:
        """Every stream as (name, config, created_ms), by name (config as JSON returns it)."""
        ...

    async def partition_bounds(self, stream: str) -> dict[int, tuple[int, int, int]]:
        """partition -> (first offset, last offset, bytes) for each partition that has
        rows; bytes counts each row as len(payload) + 64 (the retention measure)."""
        ...

    async def partition_floors(self, stream: str) -> dict[int, int]:
        """partition -> the highest `before` any TrimStream recorded: offsets below it
        are gone for good, even when the partition is now empty."""
        ...

    async def partition_marks(self, stream: str) -> dict[int, int]:
        """partition -> the highest `next` any MarkStreamNext recorded: offsets below it
        were assigned once (by a failed write) and must not be assigned again."""
        ...

    async def read_partition(self, stream: str, partition: int, from_offset: int, limit: int,
                             max_bytes: int | None = None, min_rows: int = 1) -> list[StreamRow]:
        """Up to `limit` rows of a partition from `from_offset` (inclusive) in offset
        order; `max_bytes`/`min_rows` bound the page like load_messages."""
        ...

    async def offset_for_time(self, stream: str, partition: int, ts_ms: int) -> int | None:
        """The lowest offset whose timestamp_ms >= ts_ms, or None if there is none."""
        ...

    async def load_offsets(self, stream: str) -> dict[str, dict[int, tuple[int, int]]]:
        """group -> partition -> (committed, delivered): each the highest value any
        CommitOffsets recorded (offsets never go backwards)."""
        ...

    async def cutoff_by_age(self, stream: str, partition: int, before_ms: int) -> int | None:
        """One past the highest offset with timestamp_ms < before_ms (rows below it
        may be trimmed by age), or None if there is none."""
        ...

    async def cutoff_by_bytes(self, stream: str, partition: int, max_bytes: int) -> int | None:
        """The lowest offset to keep so that the newest rows fit in `max_bytes`
        (len(payload) + 64 per row), or None if all of them fit."""
        ...

    # --- schema registry reads ------------------------------------------------------

    async def load_schemas(self) -> list[tuple[str, int, Any, str, int]]:
        """Every schema version as (name, version, document, compatibility, created_ms),
        by name then version (the document as JSON returns it)."""
        ...

    async def load_schema_bindings(self) -> list[tuple[str, str, str, str | None, int]]:
        """Every binding as (pattern, schema, on_invalid, dead_letter, created_ms), by pattern."""
        ...

    # --- state for stats, metrics and readiness (plain reads, no await) -----------

    @property
    def is_open(self) -> bool:
        """Open and not closing: what readiness asks of storage."""
        ...

    @property
    def pending_ops(self) -> int:
        """Operations in the mailbox, not yet taken into a transaction."""
        ...

    @property
    def pending_messages(self) -> int:
        """Rows those operations touch (the mailbox's bound is in these)."""
        ...

    @property
    def pending_bytes(self) -> int:
        """Payload bytes those operations hold."""
        ...

    @property
    def stalled(self) -> bool:
        """A transaction has run past the stall timeout (readiness fails meanwhile)."""
        ...

    @property
    def transaction_seconds(self) -> float:
        """How long the batch in flight has run; 0 when none is."""
        ...

    @property
    def transaction_phase(self) -> str:
        """Where the batch in flight is ("idle" between batches)."""
        ...

    # counters since open, and the batch in flight (0 between batches)
    @property
    def commits(self) -> int: ...
    @property
    def committed_ops(self) -> int: ...
    @property
    def committed_messages(self) -> int: ...
    @property
    def failed_ops(self) -> int: ...
    @property
    def failed_transactions(self) -> int: ...
    @property
    def stalls(self) -> int: ...
    @property
    def last_commit_seconds(self) -> float: ...
    @property
    def commit_seconds_total(self) -> float: ...
    @property
    def last_batch_ops(self) -> int: ...
    @property
    def last_batch_messages(self) -> int: ...
    @property
    def inflight_ops(self) -> int: ...
    @property
    def inflight_messages(self) -> int: ...
    @property
    def inflight_bytes(self) -> int: ...
