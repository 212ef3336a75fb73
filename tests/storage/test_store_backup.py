"""Online backup: a consistent copy while writes keep flowing."""

from __future__ import annotations

import os
import stat

import anyio
import pytest

from tidings.broker.durable.store import PutMessages, PutQueue, SqliteStore, StorageClosed, StorageError

GROUP = 4


async def test_backup_while_writing(open_store, row, tmp_path):
    backup = tmp_path / "backup" / "copy.db"
    backup.parent.mkdir()
    confirmed: set[int] = set()
    enough = anyio.Event()
    stop = anyio.Event()
    async with open_store() as store:
        await store.write(PutQueue("q", {"k": 1}, 5))
        ids = iter(range(1, 10**9))

        async def writer() -> None:
            while not stop.is_set():
                batch = [next(ids) for _ in range(GROUP)]
                await store.write(PutMessages([row("q", i) for i in batch]))
                confirmed.update(batch)
                if len(confirmed) >= 2_000:
                    enough.set()

        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(writer)
            await enough.wait()
            before = set(confirmed)
            await store.backup(backup)
            stop.set()
        total = await store.count("q")

    copy = SqliteStore(backup)
    await copy.open()
    try:
        ids_in_copy = {m.id for m in await copy.list_messages("q", limit=10**9)}
        assert await copy.load_queues() == [("q", {"k": 1}, 5)]
        assert await copy.max_message_id() >= max(before)
    finally:
        await copy.close()
    assert before <= ids_in_copy, f"{len(before - ids_in_copy)} messages confirmed before the backup are missing"
    assert len(ids_in_copy) <= total
    for first in range(1, max(ids_in_copy) + 1, GROUP):  # each op is wholly in, or wholly out
        assert len({first + k in ids_in_copy for k in range(GROUP)}) == 1
    assert not list(backup.parent.glob(".*.tmp*"))  # no temporary file left beside it


async def test_backup_never_replaces_a_file(open_store, row, tmp_path):
    backup = tmp_path / "copy.db"
    backup.write_bytes(b"stale")
    async with open_store() as store:
        await store.write(PutMessages([row("q", 1)]))
        with pytest.raises(StorageError, match="exists"):
            await store.backup(backup)
    assert backup.read_bytes() == b"stale"
    assert list(tmp_path.glob(".copy.db.*")) == []


async def test_backup_is_durable_file_then_directory(open_store, row, tmp_path, monkeypatch):
    """Issue 17.7: the copy is fsynced, and so is its directory once the copy has its name
    (a power loss right after the call returned must not lose the backup)."""
    backup = tmp_path / "backups" / "copy.db"
    backup.parent.mkdir()
    synced: list[tuple[str, bool]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        synced.append((kind, backup.exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    async with open_store() as store:
        await store.write(PutMessages([row("q", 1)]))
        await store.backup(backup)
    assert synced[0] == ("file", False)  # the finished copy, before it gets its name
    assert synced[-1] == ("dir", True)  # the directory, after
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600


async def test_backup_of_closed_store_is_refused(open_store, tmp_path):
    async with open_store() as store:
        pass
    with pytest.raises(StorageClosed):
        await store.backup(tmp_path / "copy.db")


async def test_backup_from_an_awkward_path(open_store, row, tmp_path):
    odd = tmp_path / "data ?#%20 dir" / "tidings.db"
    async with open_store(odd) as store:
        await store.write(PutMessages([row("q", 1)]))
        await store.backup(tmp_path / "copy.db")
    copy = SqliteStore(tmp_path / "copy.db")
    await copy.open()
    try:
        assert await copy.count("q") == 1
    finally:
        await copy.close()
