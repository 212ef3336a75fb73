"""Durable queues against a real broker: TTL, max length (both overflow
policies), the de-duplication window and re-declaring a queue."""

from __future__ import annotations

import anyio
import pytest

from tidings.client import connect
from tidings.client.errors import ConflictError, InvalidArgumentError, NotFoundError, QueueFullError
from queuetools import WAIT, broker_time_passes, collect, declare, headers_of, holds

# seconds, for the broker of the de-duplication window test: two publishes back to back must fall
# in one window even on a busy machine, and the test waits it out once
DEDUP_WINDOW = 3.0


# ------------------------------------------------------------------- TTL


async def test_message_ttl_expires_undelivered(broker) -> None:
    async with connect(broker.url) as tc:
        await declare(tc, "ttl")
        await tc.publish("ttl.a", b"short-lived", ttl=0.1)
        await tc.publish("ttl.a", b"keeps")
        await broker_time_passes(tc, 0.2)
        await tc.publish("ttl.a", b"sentinel")
        async with tc.consume("ttl") as deliveries:
            got = await collect(deliveries, 2)
            assert [d.payload for d in got] == [b"keeps", b"sentinel"]
            for d in got:
                await d.ack(wait=True)
        info = await tc.queue_info("ttl")
        assert (info["depth"], info["expired"], info["dead_lettered"]) == (0, 1, 0)


async def test_ttl_does_not_apply_once_delivered(broker) -> None:
    # The message must be delivered before its TTL runs out: the TTL is as long as a delivery may
    # take in this suite (WAIT), so a busy machine cannot expire it first.
    async with connect(broker.url) as tc:
        await declare(tc, "ttl2", message_ttl=WAIT)
        async with tc.consume("ttl2") as deliveries:
            await tc.publish("ttl2.a", b"x")
            d = await deliveries.next(timeout=WAIT)
            await broker_time_passes(tc, WAIT + 0.1)
            await d.ack(wait=True)  # an in-flight message is being worked on: it does not expire under us
        assert (await tc.queue_info("ttl2"))["expired"] == 0


@pytest.mark.parametrize("to_dlq", [False, True])
async def test_queue_ttl(broker, to_dlq: bool) -> None:
    async with connect(broker.url) as tc:
        await declare(tc, "qt", message_ttl=0.2, dead_letter_expired=to_dlq)
        await tc.publish("qt.a", b"old", msg_id="old-1")
        await tc.publish("qt.a", b"old but overridden", ttl=3600)  # a per-message TTL wins over the queue's
        await broker_time_passes(tc, 0.3)
        await tc.publish("qt.a", b"fresh", ttl=3600)  # must not expire before it is consumed, however slow
        async with tc.consume("qt") as deliveries:
            got = await collect(deliveries, 2)
            assert [d.payload for d in got] == [b"old but overridden", b"fresh"]
            for d in got:
                await d.ack(wait=True)
        info = await tc.queue_info("qt")
        assert (info["depth"], info["expired"]) == (0, 1)
        if to_dlq:
            [dead] = await holds(tc, "qt.dlq", 1)
            assert (dead.payload, dead.msg_id) == (b"old", "old-1")
            assert headers_of(dead)["tidings-dlq-reason"] == "expired"
        else:
            assert (await tc.queue_info("qt"))["dead_lettered"] == 0


# ------------------------------------------------------------ max length


async def test_max_length_reject(broker) -> None:
    async with connect(broker.url) as tc:
        await declare(tc, "ml", max_length=3)
        for i in range(3):
            await tc.publish("ml.a", f"m{i}")
        with pytest.raises(QueueFullError, match="max_length") as exc:
            await tc.publish("ml.a", b"one too many", msg_id="late-1")
        assert exc.value.retriable
        with pytest.raises(QueueFullError):
            await tc.publish_nowait("ml.a", b"also too many")
        assert (await tc.queue_info("ml"))["depth"] == 3

        async with tc.consume("ml", prefetch=1) as deliveries:
            await (await deliveries.next(timeout=WAIT)).ack(wait=True)
        # room again; the refused msg_id was not remembered, so the retry is stored
        ack = await tc.publish("ml.a", b"one too many", msg_id="late-1")
        assert not ack.duplicate
        assert (await tc.queue_info("ml"))["depth"] == 3
        assert (await tc.queue_info("ml.dlq"))["depth"] == 0


async def test_max_length_reject_refuses_a_fan_out_as_a_whole(broker) -> None:
    async with connect(broker.url) as tc:
        await declare(tc, "small", "fan.out", max_length=1)
        await declare(tc, "big", "fan.out")
        await tc.publish("fan.out", b"fits both")
        with pytest.raises(QueueFullError, match="small"):
            await tc.publish("fan.out", b"fits one")
        assert [(await tc.queue_info(q))["depth"] for q in ("small", "big")] == [1, 1]


async def test_max_length_dead_letter_oldest(broker) -> None:
    async with connect(broker.url) as tc:
        await declare(tc, "mo", max_length=3, overflow="dead_letter_oldest")
        for i in range(5):
            await tc.publish("mo.a", f"m{i}")  # never refused
        dead = await holds(tc, "mo.dlq", 2)
        assert [d.payload for d in dead] == [b"m0", b"m1"]
        assert all(headers_of(d)["tidings-dlq-reason"] == "max_length" for d in dead)
        async with tc.consume("mo") as deliveries:
            kept = await collect(deliveries, 3)
            assert [d.payload for d in kept] == [b"m2", b"m3", b"m4"]
            for d in kept:
                await d.ack()
        assert (await tc.queue_info("mo"))["dead_lettered"] == 2


# ---------------------------------------------------------- de-duplication


async def test_dedup_window(start_broker) -> None:
    b = start_broker(env={"TIDINGS_DEDUP_WINDOW": str(DEDUP_WINDOW)})
    async with connect(b.url) as tc:
        await declare(tc, "dd")
        first = await tc.publish("dd.a", b"v1", msg_id="order-42")
        again = await tc.publish("dd.a", b"v2", msg_id="order-42")
        assert not first.duplicate
        assert again.duplicate and again.id == first.id  # confirmed with what was stored the first time

        # the same msg_id twice in one batch (one PUB frame) is stored once too
        one = tc.publish_nowait("dd.a", b"x", msg_id="batch-1")
        two = tc.publish_nowait("dd.a", b"x", msg_id="batch-1")
        ra, rb = await one, await two
        assert (ra.duplicate, rb.duplicate) == (False, True)
        assert (await tc.queue_info("dd"))["depth"] == 2

        await broker_time_passes(tc, DEDUP_WINDOW + 0.1)
        later = await tc.publish("dd.a", b"v3", msg_id="order-42")
        assert not later.duplicate and later.id != first.id  # the window is over: a new message

        async with tc.consume("dd") as deliveries:
            got = await collect(deliveries, 3)
            assert [(d.payload, d.msg_id) for d in got] == [(b"v1", "order-42"), (b"x", "batch-1"),
                                                            (b"v3", "order-42")]
            for d in got:
                await d.ack()
        stats = await tc.call("stats")
        assert stats["duplicates"] == 2


async def test_dedup_survives_a_crash(broker) -> None:
    async with connect(broker.url) as tc:
        await declare(tc, "dc")
        first = await tc.publish("dc.a", b"v1", msg_id="pay-7")
    await anyio.to_thread.run_sync(broker.kill)
    await anyio.to_thread.run_sync(broker.restart)
    async with connect(broker.url) as tc:
        again = await tc.publish("dc.a", b"v1", msg_id="pay-7")
        assert again.duplicate and again.id == first.id
        assert (await tc.queue_info("dc"))["depth"] == 1


# ---------------------------------------------------------------- declare


async def test_redeclare(broker) -> None:
    async with connect(broker.url) as tc:
        created = await declare(tc, "rq", max_deliveries=3)
        assert created["created"] and created["dead_letter"] == "rq.dlq"
        same = await declare(tc, "rq", max_deliveries=3)
        assert not same["created"] and same["config"] == created["config"]

        with pytest.raises(ConflictError, match=r"max_deliveries") as exc:
            await declare(tc, "rq", max_deliveries=4)
        assert not exc.value.retriable
        with pytest.raises(ConflictError, match=r"bind"):
            await declare(tc, "rq", "other.>", max_deliveries=3)
        assert (await tc.queue_info("rq"))["config"]["max_deliveries"] == 3  # unchanged

        with pytest.raises(NotFoundError, match="declare it first"):
            await tc.declare_queue("rq2", bind=["x"], dead_letter="nonexistent")
        with pytest.raises(NotFoundError):
            await tc.queue_info("rq2")


async def test_declare_with_invalid_settings_fails_fast(broker) -> None:
    async with connect(broker.url, timeout=WAIT) as tc:  # the bug costs the whole timeout (then fails)
        for bad in ({"max_delivery": 3}, {"overflow": "drop_newest"}, {"ack_deadline": -1},
                    {"name": "has space"}, {"bind": ["a..b"]}):
            with pytest.raises(InvalidArgumentError):
                await tc.call("queue.declare", {"name": "bad", "bind": ["bad.>"], **bad})
        assert [q["name"] for q in await tc.list_queues()] == []


async def test_an_error_in_the_block_reaches_the_caller_as_itself(broker) -> None:
    async with connect(broker.url) as tc:
        await declare(tc, "once", max_deliveries=3)
    with pytest.raises(ConflictError):
        async with connect(broker.url) as tc:
            await declare(tc, "once", max_deliveries=4)


async def test_declared_queues_survive_a_restart(broker) -> None:
    async with connect(broker.url) as tc:
        await declare(tc, "keep", ack_deadline=0.3, max_deliveries=2, max_length=10)
        config = (await tc.queue_info("keep"))["config"]
    broker.terminate()
    await anyio.to_thread.run_sync(broker.restart)
    async with connect(broker.url) as tc:
        assert (await tc.queue_info("keep"))["config"] == config
        assert not (await declare(tc, "keep", ack_deadline=0.3, max_deliveries=2, max_length=10))["created"]
        assert (await tc.publish("keep.a", b"still bound")).queues == 1
