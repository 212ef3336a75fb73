"""Online backup: a consistent copy while writes keep flowing."""

from __future__ import annotations

import anyio
import pytest

from broker.store import PutMessages, PutQueue, SqliteStore, StorageClosed

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
    assert not list(backup.parent.glob("*.tmp-*"))


async def test_backup_replaces_an_old_copy(open_store, row, tmp_path):
    backup = tmp_path / "copy.db"
    backup.write_bytes(b"stale")
    async with open_store() as store:
        await store.write(PutMessages([row("q", 1)]))
        await store.backup(backup)
    copy = SqliteStore(backup)
    await copy.open()
    try:
        assert await copy.count("q") == 1
    finally:
        await copy.close()


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
