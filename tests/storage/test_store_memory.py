"""MemoryStore beyond the contract: its test hooks (failure injection, pause) and
its lifecycle as the durable layer's unit tests use it."""

from __future__ import annotations

import anyio
import pytest

from tidings.broker.durable.store import (
    CommitOffsets,
    DeleteMessages,
    MemoryData,
    MemoryStore,
    PutMessages,
    StorageError,
    StorageFull,
    UpdateMessages,
)
from tidings.broker.durable.store.memory import MEMORY_PATH


async def test_constructible_with_no_arguments_and_runs_like_sqlite(row):
    store = MemoryStore()
    assert store.path == MEMORY_PATH and store.durability == "full" and not store.is_open
    await store.open()
    assert store.is_open
    async with anyio.create_task_group() as tg:
        await tg.start(store.run)
        tg.start_soon(store.watchdog)  # waits until cancelled
        await store.write(PutMessages([row("q", 1)]))
        assert await store.count("q") == 1
        await store.close()
        tg.cancel_scope.cancel()
    assert not store.is_open


async def test_reopen_over_the_same_data_is_a_restart(row):
    data = MemoryData()
    store = MemoryStore(data)
    await store.open()
    store.submit_nowait(PutMessages([row("q", 1)]))  # no actor: close() commits it
    await store.close()
    again = MemoryStore(data)
    await again.open()
    assert [m.id for m in await again.load_messages("q")] == [1]
    assert await again.max_message_id() == 1
    await again.close()
    with pytest.raises(StorageError):
        await again.open()  # once per store, like SqliteStore


async def test_fail_next_fails_one_whole_batch_and_leaves_no_trace(backend_memory, row):
    async with backend_memory.open() as store:
        await store.write(PutMessages([row("q", 1)]))
        store.fail_next(StorageFull("disk full (injected)"))
        with pytest.raises(StorageFull, match="injected"):
            await store.write(PutMessages([row("q", 2)], [("m2", 10**12, b"r")]))
        assert [m.id for m in await store.load_messages("q")] == [1]
        assert await store.check_dedup(["m2"], now_ms=0) == {}
        assert await store.max_message_id() == 1
        assert store.failed_ops == 1 and store.failed_transactions == 1
        await store.write(PutMessages([row("q", 2)]))  # only one batch was armed
        assert await store.count("q") == 2


async def test_fail_next_where_fails_only_the_selected_ops(backend_memory, row):
    """The way a full disk behaves: publishes fail, acks and offset commits go through."""
    async with backend_memory.open() as store:
        await store.write(PutMessages([row("q", 1), row("q", 2)]))
        store.pause()
        outcomes: dict[str, Exception | None] = {}
        store.fail_next(StorageFull("full"), where=lambda op: isinstance(op, PutMessages))
        store.submit_nowait(PutMessages([row("q", 3)], on_done=lambda e: outcomes.__setitem__("put", e)))
        store.submit_nowait(DeleteMessages("q", [1], on_done=lambda e: outcomes.__setitem__("ack", e)))
        store.submit_nowait(CommitOffsets([("s", "g", 0, 4, 4)], on_done=lambda e: outcomes.__setitem__("off", e)))
        store.submit_nowait(UpdateMessages("q", [(2, 9, 1, "x")], on_done=lambda e: outcomes.__setitem__("upd", e)))
        await anyio.wait_all_tasks_blocked()
        assert outcomes == {} and store.pending_ops == 4  # paused: accepted, not committed
        store.resume()
        await store.write(DeleteMessages("q", []))
        assert isinstance(outcomes.pop("put"), StorageFull)
        assert outcomes == {"ack": None, "off": None, "upd": None}
        assert [(m.id, m.available_ms) for m in await store.load_messages("q")] == [(2, 9)]
        assert await store.load_offsets("s") == {"g": {0: (4, 4)}}


async def test_fail_next_read_fails_one_read(backend_memory, row):
    async with backend_memory.open() as store:
        await store.write(PutMessages([row("q", 1)]))
        store.fail_next_read()
        with pytest.raises(StorageError):
            await store.load_messages("q")
        assert [m.id for m in await store.load_messages("q")] == [1]


async def test_backup_is_refused_without_creating_a_file(backend_memory, tmp_path):
    async with backend_memory.open() as store:
        with pytest.raises(StorageError, match="no file"):
            await store.backup(str(tmp_path / "copy.db"))
    assert list(tmp_path.iterdir()) == []
