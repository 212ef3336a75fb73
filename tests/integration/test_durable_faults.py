"""Storage faults against a real broker (issue 17): a full disk (a small
``max_db_pages``) and a database locked by another process. What must hold:
offsets are never reused, a failed store op never hides a message, a
``wait=True`` answer means committed, and a failed read does not stop the
broker."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any, Final

import anyio
from queuetools import WAIT, declare

from client import Client, connect
from client import errors as E

#: Pages of 4 KiB the broker may use: the schema and a few dozen messages.
PAGES: Final = "80"
PAYLOAD: Final = b"x" * 8192  # two overflow pages per message: the disk fills fast
FILL_LIMIT: Final = 1_000  # publishes tried before giving up on filling the disk
LONG: Final = 60.0  # bound for waits that include SQLite's 5 s busy timeout


async def fill(tc: Client, subject: str, failures: int) -> int:
    """Publish to ``subject`` until ``failures`` publishes were refused with
    STORAGE_FULL; returns how many were stored."""
    stored = refused = 0
    for _ in range(FILL_LIMIT):
        try:
            await tc.publish(subject, PAYLOAD)
        except E.StorageFullError:
            refused += 1
            if refused == failures:
                return stored
        else:
            stored += 1
    raise AssertionError(f"the disk never filled ({stored} stored)")


async def poll(tc: Client, method: str, args: dict[str, Any], ok: Any, timeout: float = LONG) -> dict[str, Any]:
    """Call ``method`` until ``ok(result)``; bounded by ``timeout``."""
    with anyio.fail_after(timeout):
        while True:
            r = await tc.call(method, args)
            if ok(r):
                return r  # type: ignore[no-any-return]
            await tc.flush()


# ------------------------------------------------------------------ 17.1


async def test_offsets_of_failed_tail_writes_are_never_reused(start_broker, tmp_path: Path) -> None:
    """Rows 0..n-1 stored, the next 3 writes fail (gaps), a group acks past
    them. After a restart the next publish gets offset n+3, not n (which the
    group's committed offset has passed: it would never be delivered), and a
    stream with no group keeps its failed offsets too."""
    data = tmp_path / "data"
    b = start_broker(data_dir=data, env={"TIDINGS_MAX_DB_PAGES": PAGES})
    async with connect(b.url) as tc:
        await tc.declare_stream("ev", bind=["ev.>"])
        await tc.declare_stream("solo", bind=["solo.>"])
        async with tc.stream_consume("ev", "g") as msgs:  # the group exists before the disk is full
            stored = await fill(tc, "ev.x", 3)
            for _ in range(stored):
                m = await msgs.next(timeout=WAIT)
                await m.ack()
            info = await poll(tc, "stream.info", {"name": "ev"},
                              lambda r: r["groups"]["g"]["partitions"][0]["persisted"] == stored + 3)
        assert info["partitions"][0]["next"] == stored + 3
        for _ in range(2):  # no group: nothing but the mark remembers these offsets
            try:
                await tc.publish("solo.x", PAYLOAD)
            except E.StorageFullError:
                pass
            else:
                raise AssertionError("stored on a full disk")
        await poll(tc, "stream.info", {"name": "solo"}, lambda r: r["partitions"][0]["next"] == 2)
    assert b.terminate() == 0

    b = start_broker(data_dir=data)  # room again
    async with connect(b.url) as tc:
        info = await tc.stream_info("ev")
        assert info["partitions"][0]["next"] == stored + 3
        assert info["groups"]["g"]["partitions"][0]["lag"] == 0
        ack = await tc.publish("ev.x", b"after restart")
        assert ack.offset == stored + 3
        async with tc.stream_consume("ev", "g") as msgs:
            m = await msgs.next(timeout=WAIT)
            assert (m.offset, m.payload) == (stored + 3, b"after restart")
        assert (await tc.publish("solo.x", b"after restart")).offset == 2
