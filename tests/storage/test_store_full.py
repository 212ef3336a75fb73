"""A full disk (simulated with PRAGMA max_page_count): writes fail cleanly, acks still work."""

from __future__ import annotations

from tidings.broker.durable.store import DeleteMessages, PutMessages, StorageError, StorageFull

PAGES = 80  # 320 KiB of 4 KiB pages: a fresh database uses about ten


async def test_full_disk(open_store, row):
    payload = b"p" * 1_000
    confirmed: list[int] = []
    next_id = 1
    async with open_store(max_page_count=PAGES) as store:
        # Fill it: one op at a time until one fails.
        while True:
            ids = list(range(next_id, next_id + 10))
            next_id += 10
            try:
                await store.write(PutMessages([row("q", i, payload=payload) for i in ids]))
            except StorageFull as exc:
                assert exc.retriable and "full" in str(exc)
                break
            confirmed += ids
            assert next_id < 10_000, "the page limit is not enforced"
        assert confirmed
        failed_ids = ids

        # The actor still serves reads, and a failed op left nothing behind.
        assert await store.count("q") == len(confirmed)

        # A batch mixing acks and puts on a full disk: the puts fail, the acks commit.
        outcomes: dict[str, Exception | None] = {}
        acked = confirmed[: len(confirmed) // 2]
        store.submit_nowait(PutMessages([row("q", i, payload=payload) for i in range(50_000, 50_200)],
                                        on_done=lambda e: outcomes.__setitem__("big put", e)))
        store.submit_nowait(DeleteMessages("q", acked, on_done=lambda e: outcomes.__setitem__("ack", e)))
        await store.write(DeleteMessages("q", [-1]))
        assert isinstance(outcomes["big put"], StorageFull)
        assert outcomes["ack"] is None
        assert await store.count("q") == len(confirmed) - len(acked)

        # Deleting freed pages: a put that failed before now fits.
        await store.write(PutMessages([row("q", i, payload=payload) for i in failed_ids]))
        kept = sorted(set(confirmed) - set(acked)) + failed_ids
        assert store.failed_ops >= 2

    async with open_store() as store:  # reopened without the limit
        assert [m.id for m in await store.list_messages("q", limit=100_000)] == kept
        assert all(m.payload == payload for m in await store.load_messages("q", limit=100_000))
        await store.write(PutMessages([row("q", i, payload=payload) for i in range(50_000, 50_200)]))


async def test_storage_full_is_a_storage_error():
    assert issubclass(StorageFull, StorageError)
    assert StorageFull.retriable and not StorageError.retriable
