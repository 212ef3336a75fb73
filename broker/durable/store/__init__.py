"""Durable storage: the Store contract (base), its SQLite implementation and
an in-memory one for unit tests (memory, not durable).

    from tidings.broker.durable.store import SqliteStore, PutMessages, StoredMessage
"""

from __future__ import annotations

from tidings.broker.durable.store.base import (
    DURABILITIES,
    CommitOffsets,
    DedupEntry,
    DeleteGroup,
    DeleteMessages,
    DeleteQueue,
    DeleteStream,
    DoneCallback,
    Durability,
    ExpireDedup,
    MarkStreamNext,
    MoveMessages,
    PageKey,
    PurgeQueue,
    PutMessages,
    PutQueue,
    PutStream,
    SchemaTooNew,
    StorageClosed,
    StorageError,
    StorageFull,
    Store,
    StoredMessage,
    StreamRow,
    TrimStream,
    UpdateMessages,
    WriteOp,
)
from tidings.broker.durable.store.memory import MemoryData, MemoryStore
from tidings.broker.durable.store.sqlite import (
    BATCH_MAX_MESSAGES,
    DB_FILENAME,
    MAILBOX_MAX_BYTES,
    MAILBOX_MAX_MESSAGES,
    SqliteStore,
)

__all__ = [
    "BATCH_MAX_MESSAGES",
    "DB_FILENAME",
    "DURABILITIES",
    "CommitOffsets",
    "MAILBOX_MAX_BYTES",
    "MAILBOX_MAX_MESSAGES",
    "MemoryData",
    "MemoryStore",
    "DedupEntry",
    "DeleteGroup",
    "DeleteMessages",
    "DeleteQueue",
    "DeleteStream",
    "DoneCallback",
    "Durability",
    "ExpireDedup",
    "MarkStreamNext",
    "MoveMessages",
    "PageKey",
    "PurgeQueue",
    "PutMessages",
    "PutQueue",
    "PutStream",
    "SchemaTooNew",
    "SqliteStore",
    "StorageClosed",
    "StorageError",
    "StorageFull",
    "Store",
    "StoredMessage",
    "StreamRow",
    "TrimStream",
    "UpdateMessages",
    "WriteOp",
]
