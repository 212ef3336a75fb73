"""Process-wide limits on a real broker: above memory_high_water publishers
are no longer read while consumers drain; below min_free_disk durable
publishes are refused with STORAGE_FULL while pub/sub goes on. (Resuming
after the memory flag clears is tested in-process: tests/broker/test_limits.py.)"""

from __future__ import annotations

import anyio
from securitytools import WAIT, audit_lines

from tidings.client import Client, connect
from tidings.client import errors as E


async def until_paused(ctl: Client, n: int) -> dict:
    with anyio.fail_after(WAIT):
        while True:
            stats = await ctl.call("stats")
            if stats["limits"]["paused_readers"] == n:
                return stats
            await ctl.flush()


async def test_over_memory_high_water_publishers_pause_and_consumers_drain(start_broker, tmp_path) -> None:
    data = tmp_path / "data"
    b = start_broker(data_dir=data)
    async with connect(b.url) as tc:
        await tc.declare_queue("work", bind=["work.>"])
        for i in range(50):
            await tc.publish(f"work.{i}", str(i).encode())
    assert b.terminate() == 0
    # The same data, restarted with a mark every process is above: RSS > 1 byte.
    b = start_broker(data_dir=data, env={"TIDINGS_MEMORY_HIGH_WATER": "1"})
    async with connect(b.url) as ctl, connect(b.url) as pub:
        live = await ctl.subscribe("live")
        await pub.publish("live", b"not read while paused")
        stats = await until_paused(ctl, 1)
        assert stats["limits"]["memory_high"] is True and stats["limits"]["rss"] > 0
        async with ctl.consume("work", prefetch=10) as deliveries:
            got = []
            for _ in range(50):
                d = await deliveries.next(timeout=WAIT)
                got.append(int(d.payload))
                await d.ack(wait=True)
        assert got == list(range(50))
        assert (await ctl.queue_info("work"))["depth"] == 0
        await ctl.flush(timeout=WAIT)
        assert live.pending == 0
        assert pub.state == "connected"
    assert b.alive()


async def test_below_min_free_disk_durable_publishes_are_refused(start_broker) -> None:
    b = start_broker(env={"TIDINGS_MIN_FREE_DISK": str(2**62)})
    async with connect(b.url) as tc:
        await tc.declare_queue("q", bind=["q.>"])
        for _ in range(3):
            try:
                await tc.publish("q.x", b"x")
            except E.StorageFullError as exc:
                assert "free disk space below min_free_disk" in str(exc)
            else:
                raise AssertionError("stored below min_free_disk")
        assert (await tc.queue_info("q"))["depth"] == 0
        stats = await tc.call("stats")
        assert stats["limits"]["disk_low"] is True
        sub = await tc.subscribe("plain.>")
        await tc.publish("plain.x", b"pub/sub works")
        assert (await sub.next(timeout=WAIT)).payload == b"pub/sub works"
    assert b.terminate() == 0
    refusals = [x for x in audit_lines(b.data_dir) if x["event"] == "limit_refused"]
    assert refusals and all(x["limit"] == "min_free_disk" for x in refusals)
