"""Replay, follow and retention, against a real broker.

Replay from an offset or a point in time returns exactly the stored
history; retention (max_messages, max_bytes, max_age) removes what it
should and nothing else. Retention is applied with the "stream.trim" call
instead of waiting for the broker's background pass. Where wall-clock time
has to pass (max_age), the broker's own clock is the witness: a message
published with ``delay`` becomes deliverable only once the broker's timer
says so.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from typing import Any

import anyio
import pytest

from tidings.client import Client, connect
from tidings.client.errors import OffsetOutOfRangeError
from tidings.protocol.partition import partition_for

WAIT = 5.0


async def replay(tc: Client, stream: str, partition: int, start: Any = "earliest", **kw: Any) -> list[Any]:
    out = []
    with anyio.fail_after(WAIT * 4):
        async for m in tc.read_stream(stream, partition, start, **kw):
            out.append(m)
    return out


async def publish_all(tc: Client, subject: str, items: list[tuple[str | None, bytes]]) -> dict[int, list]:
    """Publish (key, payload) pairs with confirms; partition -> [(offset, key, payload)] in offset order."""
    confs = [(k, p, tc.publish_nowait(subject, p, key=k)) for k, p in items]
    out: dict[int, list] = defaultdict(list)
    for k, p, c in confs:
        partition, offset = await c
        out[partition].append((offset, k, p))
    for rows in out.values():
        rows.sort()
    return out


async def broker_time_passes(tc: Client, seconds: float) -> None:
    """Return once the broker's clock has moved ``seconds`` on (a delayed
    message in a scratch queue becomes deliverable no earlier)."""
    await tc.declare_queue("test.clock", bind=["test.clock"])
    await tc.publish("test.clock", b"tick", delay=seconds)
    async with tc.consume("test.clock", prefetch=1) as ticks:
        d = await ticks.next(timeout=seconds + WAIT)
        await d.ack(wait=True)


async def test_replay_from_offset_returns_exactly_the_stored_history(broker) -> None:
    P = 3
    async with connect(broker.url) as tc:
        await tc.declare_stream("hist", partitions=P, bind=["hist.>"])
        items = [(f"acct-{i % 11}", f"event-{i}".encode() * (1 + i % 5)) for i in range(500)]
        stored = await publish_all(tc, "hist.e", items)
        for p in range(P):
            rows = stored[p]
            n = len(rows)
            assert [o for o, *_ in rows] == list(range(n))
            for start in (0, 1, n // 2, n - 1, n):
                got = await replay(tc, "hist", p, start)
                assert [(m.offset, m.key, m.payload) for m in got] == [tuple(r) for r in rows[start:]], (p, start)
                assert all(m.partition == p and m.delivery_count == 1 for m in got)
            assert [m.offset for m in await replay(tc, "hist", p, "earliest")] == list(range(n))
            assert await replay(tc, "hist", p, "latest") == []
            # headers, subject and timestamps survive the round trip
        await tc.publish("hist.special", b"h", key="acct-1", headers={"type": "Deposited", "v": 2, "b": b"\x00"})
        p = partition_for("acct-1", P)
        last = (await replay(tc, "hist", p, len(stored[p])))
        assert len(last) == 1
        m = last[0]
        assert (m.subject, m.headers, m.key) == ("hist.special", {"type": "Deposited", "v": 2, "b": b"\x00"}, "acct-1")
        assert abs(m.timestamp_ms - dt.datetime.now().timestamp() * 1000) < 60_000


async def test_replay_from_timestamp(broker) -> None:
    """start={"time_ms": T} (or a datetime) begins at the first message whose
    broker timestamp is >= T, whatever the partition holds before it."""
    async with connect(broker.url) as tc:
        await tc.declare_stream("ts", partitions=2, bind=["ts.>"])
        # publish in rounds until the log spans several distinct milliseconds
        n = 0
        while True:
            await publish_all(tc, "ts.e", [("k", f"m{n + i}".encode()) for i in range(20)])
            n += 20
            log = await replay(tc, "ts", partition_for("k", 2))
            if len({m.timestamp_ms for m in log}) >= 4:
                break
        stamps = [m.timestamp_ms for m in log]
        assert stamps == sorted(stamps)  # a partition's timestamps never go backwards
        p = partition_for("k", 2)
        for t in sorted(set(stamps)):
            expected = [m.offset for m in log if m.timestamp_ms >= t]
            got = await replay(tc, "ts", p, {"time_ms": t})
            assert [m.offset for m in got] == expected
            assert [m.payload for m in got] == [m.payload for m in log if m.timestamp_ms >= t]
        # between two stamps: starts at the later one
        t1, t2 = sorted(set(stamps))[1:3]
        if t2 > t1 + 1:
            got = await replay(tc, "ts", p, {"time_ms": t1 + 1})
            assert got[0].timestamp_ms == t2
        # a datetime works too; before everything = all of it; after everything = nothing
        got = await replay(tc, "ts", p, dt.datetime.fromtimestamp(stamps[0] / 1000 - 3600, dt.UTC))
        assert [m.offset for m in got] == [m.offset for m in log]
        assert await replay(tc, "ts", p, {"time_ms": stamps[-1] + 3_600_000}) == []
        other = 1 - p
        assert await replay(tc, "ts", other, {"time_ms": 0}) == []  # an empty partition


async def test_offset_out_of_range(broker) -> None:
    async with connect(broker.url) as tc:
        await tc.declare_stream("oor", partitions=1, bind=["oor.>"], max_messages=5)
        await publish_all(tc, "oor.x", [(None, f"{i}".encode()) for i in range(12)])
        assert (await tc.call("stream.trim", {"name": "oor"}))["removed"] == 7
        info = (await tc.stream_info("oor"))["partitions"][0]
        assert (info["first"], info["next"]) == (7, 12)
        for bad in (0, 6, 13, 1000):
            with pytest.raises(OffsetOutOfRangeError):
                await replay(tc, "oor", 0, bad)
        got = await replay(tc, "oor", 0, 3, out_of_range="earliest")
        assert [m.offset for m in got] == list(range(7, 12))
        assert [m.payload for m in got] == [f"{i}".encode() for i in range(7, 12)]
        # the boundaries themselves are fine
        assert [m.offset for m in await replay(tc, "oor", 0, 7)] == list(range(7, 12))
        assert await replay(tc, "oor", 0, 12) == []


async def test_follow_reader_receives_new_messages_as_they_arrive(broker) -> None:
    async with connect(broker.url) as tc, connect(broker.url) as pub:
        await tc.declare_stream("live", partitions=2, bind=["live.>"])
        p = partition_for("k", 2)
        await publish_all(pub, "live.x", [("k", b"old-0"), ("k", b"old-1"), ("other", b"x")])
        got: list[Any] = []
        gate = anyio.Event()
        want = [anyio.Event() for _ in range(4)]

        async def follow() -> None:
            async for m in tc.read_stream("live", p, "earliest", follow=True):
                got.append(m)
                if len(got) <= len(want):
                    want[len(got) - 1].set()
                if len(got) == 2:
                    gate.set()

        async def tail() -> None:
            async for m in tc.read_stream("live", p, "latest", follow=True):
                tail_got.append(m.payload)
                if len(tail_got) == 2:
                    tail_done.set()

        tail_got: list[bytes] = []
        tail_done = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(follow)
            tg.start_soon(tail)
            with anyio.fail_after(WAIT):
                await gate.wait()  # the history arrived; the reader is now caught up and waiting
            for i in range(2):
                await pub.publish("live.x", f"new-{i}", key="k")
                with anyio.fail_after(WAIT):
                    await want[2 + i].wait()  # each arrives while the reader follows
            with anyio.fail_after(WAIT):
                await tail_done.wait()
            tg.cancel_scope.cancel()
        assert [m.payload for m in got] == [b"old-0", b"old-1", b"new-0", b"new-1"]
        assert [m.offset for m in got] == [0, 1, 2, 3]
        assert tail_got == [b"new-0", b"new-1"]  # "latest" skips the history
        # the readers stopped with their tasks
        assert (await tc.stream_info("live"))["readers"] == 0


async def test_retention_by_count_removes_the_oldest_and_nothing_else(broker) -> None:
    P = 2
    async with connect(broker.url) as tc:
        await tc.declare_stream("cnt", partitions=P, bind=["cnt.>"], max_messages=10)
        items = [(f"k{i % 6}", f"{i}".encode()) for i in range(70)]
        stored = await publish_all(tc, "cnt.e", items)
        # a group that consumed nothing yet, and one that is past the cut
        async with tc.stream_consume("cnt", "slow") as _slow:
            pass
        before = await tc.stream_info("cnt")
        assert before["trimmed"] == 0
        removed = (await tc.call("stream.trim", {"name": "cnt"}))["removed"]
        assert removed == sum(max(0, len(stored[p]) - 10) for p in range(P))
        assert (await tc.call("stream.trim", {"name": "cnt"}))["removed"] == 0  # idempotent
        info = await tc.stream_info("cnt")
        for p in range(P):
            n = len(stored[p])
            part = info["partitions"][p]
            assert (part["first"], part["next"], part["messages"]) == (max(0, n - 10), n, min(n, 10))
            got = await replay(tc, "cnt", p)
            assert [(m.offset, m.key, m.payload) for m in got] == [tuple(r) for r in stored[p][-10:]]
        assert info["trimmed"] == removed
        # new messages after the trim get the next offsets (no reuse)
        ack = await tc.publish("cnt.e", b"late", key="k0")
        assert ack.offset == len(stored[ack.partition])
        # the group that had committed nothing resumes at the oldest retained message
        async with tc.stream_consume("cnt", "slow") as msgs:
            seen = defaultdict(list)
            for _ in range(sum(min(len(stored[p]), 10) for p in range(P)) + 1):
                m = await msgs.next(timeout=WAIT)
                seen[m.partition].append(m.offset)
                await m.ack()
            for p in range(P):
                n = len(stored[p]) + (1 if p == ack.partition else 0)
                assert seen[p] == list(range(max(0, len(stored[p]) - 10), n))
            await tc.flush()
        g = (await tc.stream_info("cnt"))["groups"]["slow"]["partitions"]
        assert [x["lag"] for x in g] == [0] * P


async def test_retention_by_bytes(broker) -> None:
    """max_bytes counts each message as payload + 64 bytes; the newest that fit stay."""
    async with connect(broker.url) as tc:
        await tc.declare_stream("byt", partitions=1, bind=["byt.>"], max_bytes=10 * (100 + 64))
        sizes = [100] * 20 + [500, 36, 36]
        stored = await publish_all(tc, "byt.e", [(None, bytes([65 + i % 26]) * s) for i, s in enumerate(sizes)])
        removed = (await tc.call("stream.trim", {"name": "byt"}))["removed"]
        # newest first: 36+64, 36+64, 500+64 = 764; then 100+64 each: 5 more fit (1584 <= 1640), a 6th does not
        keep = 3 + 5
        assert removed == len(sizes) - keep
        got = await replay(tc, "byt", 0)
        assert [(m.offset, m.payload) for m in got] == [(o, p) for o, _k, p in stored[0][-keep:]]
        assert sum(len(m.payload) + 64 for m in got) <= 10 * (100 + 64)


async def test_retention_by_age(broker) -> None:
    # The new messages must not reach max_age between their publish and the checks below: AGE is
    # long next to those steps (tens of ms) for a busy machine. A background retention pass
    # (every 5 s) may do the trim before stream.trim does: count what was trimmed, by either.
    age = 3.0
    async with connect(broker.url) as tc:
        await tc.declare_stream("age", partitions=2, bind=["age.>"], max_age=age)
        old = await publish_all(tc, "age.e", [(f"k{i}", f"old-{i}".encode()) for i in range(30)])
        assert (await tc.call("stream.trim", {"name": "age"}))["removed"] == 0  # nothing is that old yet
        await broker_time_passes(tc, age + 0.2)
        new = await publish_all(tc, "age.e", [(f"k{i}", f"new-{i}".encode()) for i in range(30)])
        await tc.call("stream.trim", {"name": "age"})
        assert (await tc.stream_info("age"))["trimmed"] == 30
        for p in range(2):
            got = await replay(tc, "age", p)
            assert [(m.offset, m.payload) for m in got] == [(o, pl) for o, _k, pl in new[p]]
            assert (await tc.stream_info("age"))["partitions"][p]["first"] == len(old[p])


async def test_trimmed_partition_can_be_emptied_and_keeps_its_offsets_after_restart(broker) -> None:
    async with connect(broker.url) as tc:
        await tc.declare_stream("empty", partitions=1, bind=["empty.>"], max_age=0.5)
        await publish_all(tc, "empty.e", [(None, b"x")] * 5)
        await broker_time_passes(tc, 0.7)
        assert (await tc.call("stream.trim", {"name": "empty"}))["removed"] == 5
        assert await replay(tc, "empty", 0) == []
    broker.terminate()
    broker.restart()
    async with connect(broker.url) as tc:
        part = (await tc.stream_info("empty"))["partitions"][0]
        assert (part["first"], part["next"]) == (5, 5)
        ack = await tc.publish("empty.e", b"y")
        assert ack.offset == 5  # offsets are never reused, even after retention emptied the partition
        # [] only if a background retention pass (every 5 s) aged "y" out already on a slow machine
        assert [m.offset for m in await replay(tc, "empty", 0)] in ([5], [])
        assert (await tc.stream_info("empty"))["partitions"][0]["next"] == 6

