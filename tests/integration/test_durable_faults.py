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

from tidings.client import Client, connect
from tidings.client import errors as E

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


# ------------------------------------------------------------------ helpers


class Locked:
    """Another process's write lock on the broker's database (as a backup or
    an admin tool might hold it): the broker's writes fail with SQLITE_BUSY
    once its busy timeout passes. ``with Locked(data_dir):``"""

    def __init__(self, data_dir: Path) -> None:
        self.conn = sqlite3.connect(data_dir / "tidings.db", timeout=LONG, isolation_level=None)

    def __enter__(self) -> "Locked":
        self.conn.execute("BEGIN EXCLUSIVE")
        return self

    def __exit__(self, *exc: object) -> None:
        self.conn.execute("ROLLBACK")
        self.conn.close()


async def stats_store(tc: Client) -> dict[str, Any]:
    return (await tc.call("stats"))["store"]  # type: ignore[no-any-return]


# ------------------------------------------------------------------ 17.2


async def test_a_reject_whose_dead_letter_move_fails_is_delivered_again(start_broker) -> None:
    """On a full disk the move to the DLQ fails: reject(wait=True) gets
    STORAGE_FULL, the message stays counted in its queue and comes back;
    the failure is counted."""
    b = start_broker(env={"TIDINGS_MAX_DB_PAGES": PAGES})
    async with connect(b.url) as tc:
        await declare(tc, "jobs")
        await tc.declare_queue("filler", bind=["filler.>"])
        await tc.publish("jobs.1", PAYLOAD)
        await fill(tc, "filler.x", 1)
        before = (await stats_store(tc)).get("state_failures", 0)
        async with tc.consume("jobs", prefetch=1) as deliveries:
            d = await deliveries.next(timeout=WAIT)
            try:
                await d.reject("poison", wait=True)
            except E.StorageFullError:
                pass
            else:
                raise AssertionError("reject answered OK although the move to the DLQ failed")
            assert (await tc.queue_info("jobs"))["depth"] == 1
            assert (await tc.queue_info("jobs.dlq"))["depth"] == 0
            again = await deliveries.next(timeout=WAIT)
            assert (again.message_id, again.delivery_count) == (d.message_id, 2)
            await again.ack(wait=True)  # deletes need no new pages: this one commits
        assert (await tc.queue_info("jobs"))["depth"] == 0
        assert (await stats_store(tc))["state_failures"] > before
    assert b.alive()


async def test_a_group_reject_whose_dead_letter_copy_fails_does_not_pass_the_message(start_broker) -> None:
    """On a full disk the copy to the stream's DLQ fails: reject(wait=True)
    gets STORAGE_FULL, the committed offset stays before the message, and
    the message is delivered again."""
    b = start_broker(env={"TIDINGS_MAX_DB_PAGES": PAGES})
    async with connect(b.url) as tc:
        await tc.declare_stream("ev", bind=["ev.>"])
        await tc.declare_queue("filler", bind=["filler.>"])
        async with tc.stream_consume("ev", "g") as msgs:
            await tc.publish("ev.x", PAYLOAD)
            m = await msgs.next(timeout=WAIT)
            await fill(tc, "filler.x", 1)
            try:
                await m.reject("poison", wait=True)
            except E.StorageFullError:
                pass
            else:
                raise AssertionError("reject answered OK although the copy to the DLQ failed")
            again = await msgs.next(timeout=WAIT)
            assert (again.offset, again.delivery_count) == (0, 2)
            info = await tc.stream_info("ev")
            assert info["groups"]["g"]["partitions"][0]["persisted"] == 0
            assert info["dead_lettered"] == 0
            await again.ack(wait=True)
        assert (await tc.stream_info("ev"))["groups"]["g"]["partitions"][0]["persisted"] == 1
    assert b.alive()


# ------------------------------------------------------------------ 17.3


async def test_queue_ack_wait_is_answered_after_its_commit(start_broker) -> None:
    """While another process locks the database the delete cannot commit:
    ack(wait=True) raises STORAGE_ERROR (it was answered OK at once before),
    and the message, still stored, is delivered again once the lock goes."""
    b = start_broker()
    async with connect(b.url, timeout=LONG) as tc:
        await declare(tc, "jobs")
        await tc.publish("jobs.1", b"one")
        async with tc.consume("jobs", prefetch=1) as deliveries:
            d = await deliveries.next(timeout=WAIT)
            with Locked(b.data_dir):
                try:
                    await d.ack(wait=True)
                except E.StorageError:
                    pass
                else:
                    raise AssertionError("ack(wait=True) answered OK although nothing was committed")
            again = await deliveries.next(timeout=LONG)
            assert again.message_id == d.message_id
            await again.ack(wait=True)
        assert (await tc.queue_info("jobs"))["depth"] == 0
        assert (await stats_store(tc))["state_failures"] >= 1
    assert b.alive()


async def test_group_ack_wait_reports_a_failed_offset_commit(start_broker) -> None:
    b = start_broker()
    async with connect(b.url, timeout=LONG) as tc:
        await tc.declare_stream("ev", bind=["ev.>"])
        async with tc.stream_consume("ev", "g") as msgs:
            await tc.publish("ev.x", b"zero")
            m = await msgs.next(timeout=WAIT)
            with Locked(b.data_dir):
                try:
                    await m.ack(wait=True)
                except E.StorageError:
                    pass
                else:
                    raise AssertionError("ack(wait=True) answered OK although the offset commit failed")
            # the ack stands in memory and its commit is tried again
            await poll(tc, "stream.info", {"name": "ev"},
                       lambda r: r["groups"]["g"]["partitions"][0]["persisted"] == 1)
    assert b.alive()


async def test_out_of_order_group_ack_waits_for_the_covering_commit(broker) -> None:
    """An ack of offset 1 while offset 0 is unacked is held in memory only:
    its wait=True answer comes once offset 0 is acked and the committed
    offset 2 is stored, not before (an ack on another partition, sent after
    it, is answered first)."""
    from rawclient import RawClient

    from tidings.protocol import frames as F
    from tidings.protocol.partition import partition_for

    keys = {p: next(f"k{i}" for i in range(1000) if partition_for(f"k{i}", 2) == p) for p in (0, 1)}
    async with connect(broker.url) as tc:
        await tc.declare_stream("ev", bind=["ev.>"], partitions=2)
        async with RawClient.open(broker.host, broker.port) as rc:
            await rc.hello()
            await rc.send(F.Consume(rc.next_rid(), 1, {"stream": "ev", "group": "g", "window": 10}))
            for key in (keys[0], keys[0], keys[1]):
                await tc.publish("ev.x", b"m", key=key)
            dids: dict[tuple[int, int], int] = {}
            with anyio.fail_after(WAIT):
                while len(dids) < 3:
                    f = await rc.read_frame()
                    if isinstance(f, F.Deliver):
                        for it in f.items:
                            dids[(it[6][0], it[6][1])] = it[0]
            early, other, late = rc.next_rid(), rc.next_rid(), rc.next_rid()
            await rc.send(F.Ack(early, 1, [[dids[(0, 1)], int(F.AckAction.ACK), None]]))
            await rc.send(F.Ack(other, 1, [[dids[(1, 0)], int(F.AckAction.ACK), None]]))
            answered: list[int] = []
            with anyio.fail_after(WAIT):
                while other not in answered:
                    f = await rc.read_frame()
                    if isinstance(f, F.Ok):
                        assert f.result == [0], f
                        answered.append(f.rid)
            assert early not in answered, "an out-of-order ack was answered before its offset was committed"
            await rc.send(F.Ack(late, 1, [[dids[(0, 0)], int(F.AckAction.ACK), None]]))
            with anyio.fail_after(WAIT):
                while early not in answered or late not in answered:
                    f = await rc.read_frame()
                    if isinstance(f, F.Ok):
                        assert f.result == [0]
                        answered.append(f.rid)
        info = await tc.stream_info("ev")
        assert info["groups"]["g"]["partitions"][0]["persisted"] == 2


# ------------------------------------------------------------------ 17.4


async def test_a_refill_that_cannot_read_is_retried_and_the_broker_serves_on(start_broker) -> None:
    """A delayed message falls due while another process locks the database:
    the refill fails (SQLITE_BUSY after the busy timeout), is counted and
    retried; the broker keeps serving, and once the lock goes the message
    is delivered."""
    b = start_broker()
    async with connect(b.url, timeout=LONG) as tc:
        await declare(tc, "jobs")
        async with tc.consume("jobs", prefetch=1) as deliveries:
            delay = 1.0
            for _ in range(5):  # the lock must be taken before the message falls due
                await tc.publish("jobs.1", b"later", delay=delay)
                with Locked(b.data_dir):
                    if (await tc.queue_info("jobs"))["on_disk_only"] == 1:
                        await poll(tc, "stats", {}, lambda r: r["store"].get("read_errors", 0) >= 1)
                        assert (await tc.queue_info("jobs"))["depth"] == 1  # still serving
                        break
                await (await deliveries.next(timeout=LONG)).ack(wait=True)
                delay *= 2
            else:
                raise AssertionError("could never lock the database before the message fell due")
            d = await deliveries.next(timeout=LONG)
            assert d.payload == b"later"
            await d.ack(wait=True)
        assert (await tc.queue_info("jobs"))["depth"] == 0
    assert b.alive()
