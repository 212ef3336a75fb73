"""Durable queues shared by several brokers on one PostgreSQL database (issue 13 item 2).

Real brokers (tests/clustertools.py `start_cluster`, `--cluster`) on a throwaway
PostgreSQL (skipped when absent). Every wait is an event or a bounded poll of
state; nothing asserts on timing.

The three-broker kill test may be repeated: CLUSTER_KILL_ROUNDS=10 runs it ten
times in a row in one test (the issue's "passes 10 times in a row"; not a TIDINGS_*
variable, which the brokers would read as a setting).
"""

from __future__ import annotations

import os
from typing import Any

import anyio
import pytest

from tidings.client import connect
from tidings.client.errors import QueueFullError, StorageError as ClientStorageError
from queuetools import WAIT, Bursts, broker_time_passes, declare

#: The catalog reaches the other brokers within CATALOG_POLL (1 s); this bounds the wait.
CATALOG_WAIT = 30.0
#: Repetitions of the three-broker kill test (env), default 1.
KILL_ROUNDS = int(os.environ.get("CLUSTER_KILL_ROUNDS", "1"))


async def known_on(tc: Any, queue: str) -> dict[str, Any]:
    """Wait (bounded) until the broker behind `tc` knows `queue`; returns its info."""
    with anyio.fail_after(CATALOG_WAIT):
        while True:
            try:
                return await tc.queue_info(queue)
            except Exception as exc:  # NOT_FOUND until the catalog poll saw it
                if "no queue" not in str(exc):
                    raise
            await anyio.sleep(0.05)


async def drain(tc: Any, queue: str, n: int, seen: dict[bytes, int], *, timeout: float = WAIT * 4,
                prefetch: int = 50) -> None:
    """Consume and ack until `seen` holds `n` distinct payloads."""
    async with tc.consume(queue, prefetch=prefetch) as deliveries:
        with anyio.fail_after(timeout):
            while len(seen) < n:
                d = await deliveries.next(timeout=timeout)
                seen[d.payload] = seen.get(d.payload, 0) + 1
                await d.ack()


async def test_queue_declared_on_a_is_used_on_b(start_cluster) -> None:
    a, b = start_cluster(2)
    async with connect(a.url) as ta, connect(b.url) as tb:
        await declare(ta, "jobs")
        info = await known_on(tb, "jobs")
        assert info["bind"] == ["jobs.>"]
        for i in range(20):
            await tb.publish("jobs.x", f"m{i}")
        seen: dict[bytes, int] = {}
        await drain(ta, "jobs", 20, seen)
        assert sorted(seen) == sorted(f"m{i}".encode() for i in range(20))
        await ta.delete_queue("jobs")
        with anyio.fail_after(CATALOG_WAIT):
            while any(q["name"] == "jobs" for q in await tb.list_queues()):
                await anyio.sleep(0.05)


async def test_updates_and_streams_reach_the_other_brokers(start_cluster) -> None:
    a, b = start_cluster(2)
    async with connect(a.url) as ta, connect(b.url) as tb:
        await declare(ta, "tuned")
        await known_on(tb, "tuned")
        await ta.update_queue("tuned", max_deliveries=7)
        with anyio.fail_after(CATALOG_WAIT):
            while (await tb.queue_info("tuned"))["config"]["max_deliveries"] != 7:
                await anyio.sleep(0.05)
        await ta.declare_stream("events", partitions=2, bind=["events.>"])
        with anyio.fail_after(CATALOG_WAIT):
            while True:
                try:
                    info = await tb.stream_info("events")
                    break
                except Exception as exc:
                    if "no stream" not in str(exc):
                        raise
                await anyio.sleep(0.05)
        assert len(info["partitions"]) == 2 and info["bind"] == ["events.>"]
        await tb.delete_stream("events")
        with anyio.fail_after(CATALOG_WAIT):
            while any(st["name"] == "events" for st in await ta.list_streams()):
                await anyio.sleep(0.05)


async def test_publishers_on_a_and_b_consumers_on_b_and_c(start_cluster) -> None:
    """Every confirmed message is delivered; none to two consumers at once (each
    payload acked once: a second delivery would only follow a lapsed deadline, and
    the deadline here is far away)."""
    a, b, c = start_cluster(3)
    n_each = 300
    async with connect(a.url) as ta, connect(b.url) as tb, connect(c.url) as tc:
        await declare(ta, "work", ack_deadline=120.0)
        await known_on(tb, "work")
        await known_on(tc, "work")
        seen: dict[bytes, int] = {}
        done = anyio.Event()

        async def consume(client: Any) -> None:
            async with client.consume("work", prefetch=20) as deliveries:
                while not done.is_set():
                    with anyio.move_on_after(0.5):
                        d = await deliveries.next(timeout=WAIT * 4)
                        seen[d.payload] = seen.get(d.payload, 0) + 1
                        await d.ack()
                        if len(seen) >= 2 * n_each:
                            done.set()

        async def publish(client: Any, tag: str) -> None:
            pending = [client.publish_nowait("work.x", f"{tag}{i}") for i in range(n_each)]
            for p in pending:
                assert await p is not None

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                tg.start_soon(consume, tb)
                tg.start_soon(consume, tc)
                await publish(ta, "a")
                await publish(tb, "b")
                await done.wait()
        assert len(seen) == 2 * n_each
        assert all(v == 1 for v in seen.values()), {k: v for k, v in seen.items() if v > 1}


async def test_nack_with_delay_then_dead_letter_across_brokers(start_cluster) -> None:
    a, b = start_cluster(2)
    async with connect(a.url) as ta, connect(b.url) as tb:
        await declare(ta, "poison", max_deliveries=3, dead_letter="poison.dlq")
        await known_on(tb, "poison")
        await known_on(tb, "poison.dlq")
        await ta.publish("poison.x", "bad")
        deliveries_seen: list[int] = []
        # deliveries alternate between brokers: each nack (with a delay) frees it for any broker.
        # (A stopping consumer may be handed it once more before its stop lands: that delivery
        # counts, so the counts only have to increase, up to max_deliveries.)
        for attempt in range(10):
            client = (ta, tb)[attempt % 2]
            async with client.consume("poison", prefetch=1) as ds:
                d = await ds.next(timeout=WAIT * 4)
                deliveries_seen.append(d.delivery_count)
                await d.nack(delay=0.1, wait=True)
            if d.delivery_count >= 3:
                break
        assert deliveries_seen == sorted(set(deliveries_seen)) and deliveries_seen[-1] == 3
        assert len(deliveries_seen) >= 2  # both brokers delivered it
        (dead,) = await tb.dlq_list("poison.dlq")  # moved by whichever broker had the last delivery
        assert dead["payload"] == b"bad" and dead["headers"].get("tidings-dlq-reason") == "max_deliveries"
        assert await ta.dlq_redrive("poison.dlq") == 1  # redriven on A, delivered afresh on B
        async with tb.consume("poison", prefetch=1) as ds:
            d = await ds.next(timeout=WAIT * 4)
            assert d.payload == b"bad" and d.delivery_count == 1
            await d.ack(wait=True)
        assert await tb.dlq_list("poison.dlq") == []


async def test_dedup_by_msg_id_across_brokers(start_cluster) -> None:
    a, b = start_cluster(2)
    async with connect(a.url) as ta, connect(b.url) as tb:
        await declare(ta, "once")
        await known_on(tb, "once")
        first = await ta.publish("once.x", "one", msg_id="k1")
        again = await tb.publish("once.x", "one", msg_id="k1")
        assert not first.duplicate and again.duplicate and again.id == first.id
        # the same msg_id from both brokers at once: one copy stored, whichever wins

        async def send(client: Any, out: list[Any]) -> None:
            for _ in range(50):  # a refused copy (the other broker's insert won) is resent
                try:
                    out.append(await client.publish("once.x", "two", msg_id="k2"))
                    return
                except ClientStorageError as exc:
                    assert exc.retriable
        got: list[Any] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(send, ta, got)
            tg.start_soon(send, tb, got)
        assert len(got) == 2 and len({r.id for r in got}) == 1
        assert sum(1 for r in got if not r.duplicate) <= 1
        seen: dict[bytes, int] = {}
        await drain(tb, "once", 2, seen)
        assert seen == {b"one": 1, b"two": 1}
        with anyio.fail_after(CATALOG_WAIT):  # the depth is re-read from the database
            while (await ta.queue_info("once"))["depth"] != 0:
                await anyio.sleep(0.1)


async def test_ids_are_unique_across_brokers(start_cluster) -> None:
    a, b = start_cluster(2)
    async with connect(a.url) as ta, connect(b.url) as tb:
        await declare(ta, "ids")
        await known_on(tb, "ids")
        acks = [await (ta, tb)[i % 2].publish("ids.x", f"p{i}") for i in range(40)]
        assert len({r.id for r in acks}) == 40


@pytest.mark.timeout(300 + 240 * KILL_ROUNDS)
async def test_kill_9_of_a_broker_under_load(start_cluster) -> None:
    """Three brokers; publishers on B and C keep publishing while consumers on B and C
    ack and a consumer on A holds unacked messages; A is killed (-9) in the middle.
    Every confirmed message is acked exactly once by the consumers on B and C (the
    ones A held come back after the ack deadline; none reaches two consumers before
    it), whatever round of CLUSTER_KILL_ROUNDS."""
    for round_ in range(KILL_ROUNDS):
        start_cluster.brokers.clear()
        a, b, c = start_cluster(3)
        queue = f"crash{round_}"
        n_each = 300
        async with connect(b.url) as tb, connect(c.url) as tc:
            # the deadline is far beyond how long a live consumer keeps a delivery here
            await declare(tb, queue, ack_deadline=8.0)
            await known_on(tc, queue)
            confirmed: set[bytes] = set()
            acked: dict[bytes, int] = {}

            async def publish(client: Any, tag: str, n: int) -> None:
                for i in range(n):
                    body = f"{round_}-{tag}{i}"  # msg_ids of one round: dedup spans rounds
                    for _ in range(100):  # a publish refused while the cluster settles is resent
                        try:
                            await client.publish(f"{queue}.x", body, msg_id=body)
                            break
                        except ClientStorageError as exc:
                            assert exc.retriable
                    confirmed.add(body.encode())

            async def consume(client: Any) -> None:
                async with client.consume(queue, prefetch=20) as ds:
                    while True:
                        d = await ds.next(timeout=WAIT * 12)
                        acked[d.payload] = acked.get(d.payload, 0) + 1
                        await d.ack()

            async with connect(a.url) as ta:
                await known_on(ta, queue)
                with anyio.fail_after(200):
                    async with ta.consume(queue, prefetch=30) as held_by_a:
                        await publish(tb, "w", 30)  # A's consumer takes these and never acks them
                        held = [(await held_by_a.next(timeout=WAIT * 4)).payload for _ in range(30)]
                        async with anyio.create_task_group() as tg:
                            tg.start_soon(consume, tb)
                            tg.start_soon(consume, tc)
                            async with anyio.create_task_group() as pubs:
                                pubs.start_soon(publish, tb, "b", n_each)
                                pubs.start_soon(publish, tc, "c", n_each)
                                while len(acked) < 100:  # under load: then A dies
                                    await anyio.sleep(0.02)
                                a.kill()
                            while not set(acked) >= confirmed:  # A's 30 come back after the deadline
                                await anyio.sleep(0.05)
                            tg.cancel_scope.cancel()
            assert not a.alive() and len(held) == 30
            assert set(acked) == confirmed and len(confirmed) == 2 * n_each + 30
            assert set(held) <= set(acked)
            assert all(v == 1 for v in acked.values()), {k: v for k, v in acked.items() if v > 1}
        for x in (b, c):
            x.terminate()


async def test_priority_queues_are_refused_in_cluster_mode(start_cluster) -> None:
    (a,) = start_cluster(1)
    async with connect(a.url) as ta:
        with pytest.raises(Exception, match="priority queues are not available with several brokers"):
            await declare(ta, "urgent", max_priority=5)
        await declare(ta, "plain")  # the broker serves on


#: Publishes in flight per burst, and the bound on each wait around the outage (a
#: reconnect backs off up to RECONNECT_MAX; the catalog and claims resume after it).
OUTAGE_IN_FLIGHT = 100
RECOVERY_TIMEOUT = 120.0


async def test_database_restarted_under_load_in_a_cluster(start_cluster, pg_server) -> None:
    """Two brokers publish into one shared queue while PostgreSQL is stopped and started
    again: during the outage publishes are refused as retriable on both, never confirmed;
    afterwards both confirm again, and a consumer on one broker receives every message
    either broker confirmed, before and after the outage."""
    a, b = start_cluster(2)
    burst = Bursts("outage.x")
    confirmed, refused = burst.confirmed, burst.refused
    async with connect(a.url) as ta, connect(b.url) as tb:
        await declare(ta, "outage")
        await known_on(tb, "outage")
        for tc in (ta, tb):
            await burst(tc, OUTAGE_IN_FLIGHT * 3)
        assert len(confirmed) == OUTAGE_IN_FLIGHT * 6
        await anyio.to_thread.run_sync(pg_server.stop, "fast")
        try:
            for tc in (ta, tb):
                had = len(refused)
                with anyio.fail_after(RECOVERY_TIMEOUT):
                    while len(refused) == had:  # the outage is seen on this broker too
                        await burst(tc, OUTAGE_IN_FLIGHT)
        finally:
            await anyio.to_thread.run_sync(pg_server.restart)
        for tc in (ta, tb):
            before = len(confirmed)
            with anyio.fail_after(RECOVERY_TIMEOUT):
                while len(confirmed) < before + OUTAGE_IN_FLIGHT * 2:  # this broker confirms again
                    await burst(tc, OUTAGE_IN_FLIGHT)
        async with tb.consume("outage", prefetch=500) as deliveries:
            seen: set[str] = set()
            with anyio.fail_after(RECOVERY_TIMEOUT):
                while not confirmed <= seen:
                    d = await deliveries.next(timeout=RECOVERY_TIMEOUT)
                    seen.add(d.payload.decode())
                    await d.ack()
    assert a.alive() and b.alive()


async def test_ttl_expires_on_whichever_broker_claims(start_cluster) -> None:
    """A message published on A past its time to live is never delivered on B: the
    broker that claims it dead-letters it as expired."""
    a, b = start_cluster(2)
    async with connect(a.url) as ta, connect(b.url) as tb:
        await declare(ta, "brief", message_ttl=0.5, dead_letter="brief.dlq", dead_letter_expired=True)
        await known_on(tb, "brief")
        await known_on(tb, "brief.dlq")
        await ta.publish("brief.x", "stale", confirm=True)
        await broker_time_passes(ta, 1.0)
        await ta.publish("brief.x", "fresh", confirm=True)
        async with tb.consume("brief", prefetch=10) as ds:
            d = await ds.next(timeout=WAIT * 4)
            assert d.payload == b"fresh"  # the stale one was claimed and expired, not delivered
            await d.ack(wait=True)
        with anyio.fail_after(CATALOG_WAIT):
            while not (dead := await tb.dlq_list("brief.dlq")):
                await anyio.sleep(0.05)
        assert [m["payload"] for m in dead] == [b"stale"]
        assert dead[0]["headers"].get("tidings-dlq-reason") == "expired"


async def test_max_length_counts_what_other_brokers_stored(start_cluster) -> None:
    """max_length with overflow "reject" is judged on the queue's depth across the
    brokers: once B has re-counted (every COUNT_REFRESH), a publish on B past what A
    stored is refused with QUEUE_FULL. (Between re-counts the depth is approximate:
    docs/SCALING.md.)"""
    a, b = start_cluster(2)
    async with connect(a.url) as ta, connect(b.url) as tb:
        await declare(ta, "small", max_length=5, overflow="reject")
        await known_on(tb, "small")
        for i in range(5):
            await ta.publish("small.x", f"m{i}", confirm=True)
        with anyio.fail_after(CATALOG_WAIT):
            while (await tb.queue_info("small"))["depth"] < 5:
                await anyio.sleep(0.05)
        with pytest.raises(QueueFullError):
            await tb.publish("small.x", "one too many", confirm=True)
