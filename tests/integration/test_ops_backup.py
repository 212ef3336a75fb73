"""Online backup of a real broker under load, restored into a second broker."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import anyio
import pytest

from client import connect
from client.errors import TidingsError

WAIT = 20.0
ENOUGH = 3_000  # confirmed publishes before the backup starts


async def queue_payloads(tc: Any, queue: str) -> set[bytes]:
    """Every message payload of ``queue`` (dlq.list pages any queue without consuming it)."""
    out: set[bytes] = set()
    offset = 0
    while True:
        page = await tc.dlq_list(queue, limit=10_000, offset=offset)
        out.update(m["payload"] for m in page)
        if len(page) < 10_000:
            return out
        offset += len(page)


async def test_backup_during_load_restores_every_confirmed_message(start_broker, tmp_path: Path) -> None:
    b = start_broker()
    copy = tmp_path / "backups" / "tidings.db"
    copy.parent.mkdir()
    confirmed: list[bytes] = []
    async with connect(b.url, reconnect=False) as tc:
        await tc.declare_queue("orders", bind=["orders.>"])
        await tc.declare_stream("events", partitions=2, bind=["events.>"])
        for i in range(40):
            await tc.publish("events.e", f"e{i}".encode(), key=f"k{i % 5}")
        async with tc.stream_consume("events", "projector", window=100) as msgs:
            with anyio.fail_after(WAIT):
                n = 0
                async for m in msgs:
                    await m.ack(wait=True)
                    n += 1
                    if n == 25:
                        break
        events_before = await tc.stream_info("events")

        enough = anyio.Event()
        goal = ENOUGH
        stop = anyio.Event()

        async def publisher(lane: int) -> None:
            i = 0
            while not stop.is_set():
                batch = []
                for _ in range(100):
                    payload = f"{lane}-{i}".encode()
                    batch.append((payload, tc.publish_nowait("orders.new", payload, confirm=True)))
                    i += 1
                for payload, c in batch:
                    await c
                    confirmed.append(payload)
                if len(confirmed) >= goal:
                    enough.set()

        async with anyio.create_task_group() as tg:
            for lane in range(4):
                tg.start_soon(publisher, lane)
            with anyio.fail_after(WAIT):
                await enough.wait()
            before = set(confirmed)
            result = await tc.call("backup", {"path": str(copy)}, timeout=WAIT)
            goal, enough = len(confirmed) + 500, anyio.Event()
            with anyio.fail_after(WAIT):  # the load goes on after the copy too
                await enough.wait()
            stop.set()
        assert result["path"] == str(copy) and result["bytes"] == copy.stat().st_size > 0
        assert result["seconds"] >= 0
        live_total = len(await queue_payloads(tc, "orders"))

    restored_dir = tmp_path / "restored"
    restored_dir.mkdir()
    shutil.copy(copy, restored_dir / "tidings.db")
    r = start_broker(data_dir=restored_dir)
    async with connect(r.url, reconnect=False) as tc:
        payloads = await queue_payloads(tc, "orders")
        missing = before - payloads
        assert not missing, f"{len(missing)} messages confirmed before the backup are missing"
        assert len(payloads) <= live_total
        events = await tc.stream_info("events")
        assert [p["next"] for p in events["partitions"]] == [p["next"] for p in events_before["partitions"]]
        committed = {p["partition"]: p["committed"] for p in events["groups"]["projector"]["partitions"]}
        committed_before = {p["partition"]: p["committed"] for p in
                            events_before["groups"]["projector"]["partitions"]}
        assert committed == committed_before
        assert sum(committed.values()) == 25
        names = {q["name"] for q in await tc.list_queues()}
        assert {"orders", "orders.dlq", "events.dlq"} <= names


async def test_backup_refuses_what_it_must(broker, tmp_path: Path) -> None:
    existing = tmp_path / "exists.db"
    existing.write_bytes(b"keep me")
    async with connect(broker.url, reconnect=False) as tc:
        with pytest.raises(TidingsError, match="relative"):
            await tc.call("backup", {"path": "copy.db"})
        with pytest.raises(TidingsError, match="already exists"):
            await tc.call("backup", {"path": str(existing)})
        assert existing.read_bytes() == b"keep me"
        with pytest.raises(TidingsError, match="does not exist"):
            await tc.call("backup", {"path": str(tmp_path / "no" / "such" / "dir.db")})
        with pytest.raises(TidingsError, match="live database"):
            await tc.call("backup", {"path": str(broker.data_dir / "tidings.db"), "overwrite": True})
        result = await tc.call("backup", {"path": str(existing), "overwrite": True})
        assert result["bytes"] == existing.stat().st_size
        assert existing.read_bytes()[:16] == b"SQLite format 3\x00"
