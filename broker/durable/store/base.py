"""What every store offers: the stored message, the write operations, errors,
and the `Store` protocol.

A store is an actor. Writers never wait on the disk themselves: they hand a
write operation to the store's bounded mailbox (`submit`, `submit_nowait`)
and learn the outcome through the operation's `on_done(error)` callback,
which runs only after the transaction covering the operation has committed
(`error is None`) or failed (`error` is a `StorageError`). Each operation is
atomic: all of it is stored, or none of it.

Time values are integer milliseconds since the Unix epoch throughout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeAlias

Durability: TypeAlias = Literal["full", "normal"]
DURABILITIES: tuple[Durability, ...] = ("full", "normal")

#: Called once per operation, from the store's actor task, after the
#: transaction that covered it committed (None) or failed (a StorageError).
#: It must be cheap and must not block; an exception it raises is logged.
DoneCallback: TypeAlias = Callable[[Exception | None], None]

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
    #: Stream appends (broker.store.streams.StreamRow) committed in the same
    #: transaction, so a publish bound to queues and streams is atomic.
    stream_rows: list[Any] = field(default_factory=list)


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


WriteOp: TypeAlias = (
    PutMessages | DeleteMessages | UpdateMessages | MoveMessages
    | PutQueue | DeleteQueue | PurgeQueue | ExpireDedup
)

#: A paging cursor: the (available_ms, id) of the last message already read.
PageKey: TypeAlias = tuple[int, int]


class Store(Protocol):
    """The contract every store implements (see SqliteStore for the details)."""

    durability: Durability

    async def open(self) -> None: ...
    async def run(self, *, task_status: Any = ...) -> None: ...
    async def close(self) -> None: ...

    async def submit(self, op: WriteOp) -> None: ...
    def submit_nowait(self, op: WriteOp) -> None: ...
    async def write(self, op: WriteOp) -> None: ...

    async def check_dedup(self, msg_ids: list[str], now_ms: int | None = None) -> dict[str, bytes]: ...
    async def load_queues(self) -> list[tuple[str, dict[str, Any], int]]: ...
    async def load_messages(self, queue: str, after: PageKey | None = None, *,
                            due_before_ms: int | None = None, limit: int = 1000,
                            max_bytes: int | None = None, min_rows: int = 1) -> list[StoredMessage]: ...
    async def next_available_ms(self, queue: str, after: PageKey | None = None) -> int | None: ...
    async def count(self, queue: str) -> int: ...
    async def oldest(self, queue: str, n: int) -> list[StoredMessage]: ...
    async def list_messages(self, queue: str, limit: int = 100, offset: int = 0) -> list[StoredMessage]: ...
    async def max_message_id(self) -> int: ...
    async def backup(self, path: str) -> None: ...
