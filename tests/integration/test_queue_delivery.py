"""Durable queues against a real broker: acks, retries and their backoff,
dead-lettering (max deliveries, reject), redrive, stale acks, in_progress,
consumer disconnects and delayed publishes.

Every queue uses short times (see queuetools.FAST); timings are asserted as
lower bounds only (the contract): a slow machine makes things late, never
early. Where a time must NOT run out during a step (an ack deadline while a
handler works), it is long next to the step.
"""

from __future__ import annotations

import time

import anyio
import pytest

from tidings.client import connect
from tidings.client.errors import StaleDeliveryError, TidingsError
from queuetools import WAIT, broker_time_passes, collect, declare, headers_of, holds

TOLERANCE = 0.005  # the broker keeps times in whole milliseconds


async def test_publish_consume_ack(broker) -> None:
    async with connect(broker.url) as tc:
        await declare(tc, "jobs")
        acks = [await tc.publish("jobs.email", f"job {i}", headers={"n": i}, msg_id=f"j{i}")
                for i in range(3)]
        assert [a.queues for a in acks] == [1, 1, 1]
        assert len({a.id for a in acks}) == 3 and not any(a.duplicate for a in acks)
        async with tc.consume("jobs") as deliveries:
            got = await collect(deliveries, 3)
            assert [d.payload for d in got] == [b"job 0", b"job 1", b"job 2"]
            assert [d.msg_id for d in got] == ["j0", "j1", "j2"]
            assert [d.message_id for d in got] == [a.id for a in acks]
            assert [d.headers for d in got] == [{"n": 0}, {"n": 1}, {"n": 2}]
            assert all(d.delivery_count == 1 and not d.redelivered for d in got)
            for d in got:
                await d.ack(wait=True)
            with pytest.raises(TidingsError, match="already settled"):
                await got[0].ack()
        info = await tc.queue_info("jobs")
        assert (info["depth"], info["in_flight"], info["acked"]) == (0, 0, 3)


async def test_competing_consumers_share_the_work(broker) -> None:
    async with connect(broker.url) as a, connect(broker.url) as b:
        await declare(a, "work")
        async with a.consume("work", prefetch=5) as da, b.consume("work", prefetch=5) as db:
            for i in range(10):
                await a.publish("work.x", str(i))
            got_a = await collect(da, 5)
            got_b = await collect(db, 5)
            payloads = [d.payload for d in got_a + got_b]
            assert sorted(payloads) == sorted(str(i).encode() for i in range(10))  # each went to one consumer
            for d in got_a + got_b:
                await d.ack()


async def _gaps_between_redeliveries(tc, queue: str, subject: str, attempts: int) -> list[float]:
    """Publish one message, nack every delivery (queue backoff), return the
    gaps between consecutive deliveries."""
    await tc.publish(subject, b"retry me")
    seen: list[float] = []
    async with tc.consume(queue) as deliveries:
        for n in range(1, attempts + 1):
            d = await deliveries.next(timeout=WAIT)
            seen.append(time.monotonic())
            assert d.delivery_count == n
            await d.nack()
    return [b - a for a, b in zip(seen, seen[1:])]


async def test_backoff_schedule_is_followed(broker) -> None:
    schedule = [0.1, 0.2, 0.4]
    async with connect(broker.url) as tc:
        await declare(tc, "sched", backoff_schedule=schedule, max_deliveries=0)
        gaps = await _gaps_between_redeliveries(tc, "sched", "sched.a", 5)
    # past the end of the schedule its last delay repeats
    for gap, want in zip(gaps, schedule + [0.4]):
        assert gap >= want - TOLERANCE, (gaps, schedule)


async def test_exponential_backoff_is_capped(broker) -> None:
    # uncapped this would be 0.1, 10, 1000 s: a missing cap times the test out (WAIT is 5 s; no
    # upper bound on a gap is asserted, so a slow machine cannot fail it)
    async with connect(broker.url) as tc:
        await declare(tc, "expo", backoff_initial=0.1, backoff_multiplier=100, backoff_max=0.2,
                      max_deliveries=0)
        gaps = await _gaps_between_redeliveries(tc, "expo", "expo.a", 4)
    for gap, want in zip(gaps, [0.1, 0.2, 0.2]):
        assert gap >= want - TOLERANCE, gaps


async def test_nack_with_delay_overrides_the_backoff(broker) -> None:
    async with connect(broker.url) as tc:
        await declare(tc, "nd", backoff_initial=0.0, max_deliveries=0)
        await tc.publish("nd.a", b"x")
        async with tc.consume("nd") as deliveries:
            d = await deliveries.next(timeout=WAIT)
            t0 = time.monotonic()
            await d.nack(delay=0.3)
            d2 = await deliveries.next(timeout=WAIT)
            assert time.monotonic() - t0 >= 0.3 - TOLERANCE
            assert (d2.delivery_count, d2.redelivered) == (2, True)
            await d2.ack()


async def test_max_deliveries_moves_to_dlq_with_reason_headers(broker) -> None:
    """Two ack deadlines pass without an ack: the message goes to the DLQ
    with why, how often it was tried and the last error."""
    async with connect(broker.url) as tc:
        await declare(tc, "md", ack_deadline=0.3, max_deliveries=2)
        ack = await tc.publish("md.a", b"poison", headers={"type": "Poison"}, msg_id="p-1")
        async with tc.consume("md") as deliveries:
            first, second = await collect(deliveries, 2)  # the second arrives once the first deadline passed
            assert (first.delivery_count, second.delivery_count) == (1, 2)
            assert first.message_id == second.message_id == ack.id
            async with tc.consume("md.dlq") as dead:
                d = await dead.next(timeout=WAIT)  # the second deadline passed: no third try
        h = headers_of(d)
        assert d.payload == b"poison" and d.subject == "md.a" and d.msg_id == "p-1"
        assert h["type"] == "Poison"  # the publisher's headers are kept
        assert h["tidings-dlq-reason"] == "max_deliveries"
        assert h["tidings-dlq-source"] == "md"
        assert h["tidings-delivery-count"] == 2
        assert h["tidings-last-error"] == "ack deadline exceeded"
        assert h["tidings-original-id"] == ack.id
        assert h["tidings-published-at"] == d.published_ms
        assert h["tidings-dead-lettered-at"] >= d.published_ms
        info = await tc.queue_info("md")
        assert (info["depth"], info["dead_lettered"], info["redelivered"]) == (0, 1, 1)


async def test_nacked_past_max_deliveries_goes_to_dlq(broker) -> None:
    async with connect(broker.url) as tc:
        await declare(tc, "nk", max_deliveries=3, backoff_initial=0.0)
        await tc.publish("nk.a", b"x")
        async with tc.consume("nk") as deliveries:
            for n in (1, 2, 3):
                d = await deliveries.next(timeout=WAIT)
                assert d.delivery_count == n
                await d.nack()
            await tc.publish("nk.a", b"sentinel")  # queues deliver in order: no 4th try comes before it
            assert (await deliveries.next(timeout=WAIT)).payload == b"sentinel"
        [dead] = await holds(tc, "nk.dlq", 1)
        assert headers_of(dead)["tidings-dlq-reason"] == "max_deliveries"
        assert headers_of(dead)["tidings-delivery-count"] == 3


async def test_reject_goes_straight_to_dlq(broker) -> None:
    async with connect(broker.url) as tc:
        await declare(tc, "rj", max_deliveries=5)
        await tc.publish("rj.a", b"bad")
        async with tc.consume("rj") as deliveries:
            d = await deliveries.next(timeout=WAIT)
            await d.reject("schema mismatch: field 'id' missing", wait=True)
        await holds(tc, "rj.dlq", 1)
        listed = await tc.dlq_list("rj.dlq")
        assert len(listed) == 1
        h = listed[0]["headers"]
        assert (h["tidings-dlq-reason"], h["tidings-last-error"], h["tidings-delivery-count"]) == (
            "rejected", "schema mismatch: field 'id' missing", 1)
        info = await tc.queue_info("rj")
        assert (info["depth"], info["rejected"]) == (0, 1)
        assert (await tc.queue_info("rj.dlq"))["depth"] == 1


async def test_redrive_back_to_source_and_elsewhere(broker) -> None:
    async with connect(broker.url) as tc:
        await declare(tc, "rd")
        await declare(tc, "other", "nothing.binds.here")
        for i in range(5):
            await tc.publish("rd.a", f"m{i}", headers={"keep": "me"}, msg_id=f"rd-{i}")
        async with tc.consume("rd", prefetch=5) as deliveries:
            for d in await collect(deliveries, 5):
                await d.reject("later", wait=True)
        await holds(tc, "rd.dlq", 5)

        # a peek, paged (delivery counts may still be settling from holds(): compare ids and payloads)
        page = [(m["id"], m["payload"]) for m in await tc.dlq_list("rd.dlq", limit=2, offset=1)]
        assert page == [(m["id"], m["payload"]) for m in await tc.dlq_list("rd.dlq")][1:3]
        assert await tc.dlq_redrive("rd.dlq", count=2) == 2
        assert await tc.dlq_redrive("rd.dlq", count=1, to="other") == 1
        assert [(await tc.queue_info(q))["depth"] for q in ("rd", "rd.dlq", "other")] == [2, 2, 1]

        async with tc.consume("rd") as deliveries:
            back = await collect(deliveries, 2)
        assert [d.payload for d in back] == [b"m0", b"m1"]  # oldest first
        for d in back:
            h = headers_of(d)
            assert d.delivery_count == 1  # counts start again
            assert h == {"keep": "me", "tidings-redriven-from": "rd.dlq"}  # DLQ bookkeeping dropped
            assert d.msg_id is not None and d.msg_id.startswith("rd-")
        async with tc.consume("other") as deliveries:
            assert (await deliveries.next(timeout=WAIT)).payload == b"m2"

        assert await tc.dlq_purge("rd.dlq") == 2
        assert (await tc.queue_info("rd.dlq"))["depth"] == 0


async def test_redrive_skips_messages_whose_source_is_gone(broker) -> None:
    async with connect(broker.url) as tc:
        await declare(tc, "gone", dead_letter="shared.dlq")
        await declare(tc, "stays", dead_letter="shared.dlq")
        await tc.publish("gone.a", b"g")
        await tc.publish("stays.a", b"s")
        for q in ("gone", "stays"):
            async with tc.consume(q) as deliveries:
                await (await deliveries.next(timeout=WAIT)).reject(wait=True)
        await holds(tc, "shared.dlq", 2)
        await tc.delete_queue("gone")
        res = await tc.call("dlq.redrive", {"name": "shared.dlq"})
        assert res == {"redriven": 1, "skipped": 1}
        assert [m["payload"] for m in await tc.dlq_list("shared.dlq")] == [b"g"]


async def test_ack_after_the_deadline_is_stale(broker) -> None:
    async with connect(broker.url) as tc:
        await declare(tc, "st", ack_deadline=0.3, max_deliveries=0)
        await tc.publish("st.a", b"slow")
        async with tc.consume("st") as deliveries:
            late = await deliveries.next(timeout=WAIT)
            again = await deliveries.next(timeout=WAIT)  # redelivered: the deadline passed
            assert again.message_id == late.message_id and again.delivery_id != late.delivery_id
            with pytest.raises(StaleDeliveryError):
                await late.ack(wait=True)
            await again.ack(wait=True)
        info = await tc.queue_info("st")
        assert (info["depth"], info["acked"], info["redelivered"]) == (0, 1, 1)


async def test_in_progress_extends_the_deadline(broker) -> None:
    # The deadline must not run out between two in_progress calls: each step takes a quarter
    # of it, so a step may be 1.5 s late on a busy machine before the test could fail.
    deadline = 2.0
    async with connect(broker.url) as tc:
        await declare(tc, "ip", ack_deadline=deadline, max_deliveries=0)
        await tc.publish("ip.a", b"long job")
        async with tc.consume("ip") as deliveries:
            d = await deliveries.next(timeout=WAIT)
            held_from = time.monotonic()
            for _ in range(6):  # 3 s of the broker's time in all: longer than the deadline
                await broker_time_passes(tc, deadline / 4)
                await d.in_progress(wait=True)
            assert time.monotonic() - held_from > deadline
            await d.ack(wait=True)  # still ours: no StaleDeliveryError
        info = await tc.queue_info("ip")
        assert (info["depth"], info["redelivered"], info["acked"]) == (0, 0, 1)


@pytest.mark.parametrize("how", ["stop consuming", "close the connection"])
async def test_unacked_return_at_once_when_a_consumer_goes(broker, how: str) -> None:
    """The ack deadline is 30 s: a prompt redelivery can only come from the
    consumer leaving. Returned messages go back to the front, in order."""
    async with connect(broker.url) as tc, connect(broker.url) as other:
        await declare(tc, "dc")
        for i in range(6):
            await tc.publish("dc.a", f"m{i}")
        if how == "stop consuming":
            async with tc.consume("dc", prefetch=5) as mine:
                held = await collect(mine, 5)
        else:
            async with connect(broker.url) as leaving, leaving.consume("dc", prefetch=5) as mine:
                held = await collect(mine, 5)
                await leaving.close()  # gone while still holding all five
        assert [d.payload for d in held] == [f"m{i}".encode() for i in range(5)]
        async with other.consume("dc", prefetch=10) as deliveries:
            got = await collect(deliveries, 6)
            assert [d.payload for d in got] == [f"m{i}".encode() for i in range(6)]
            assert [d.delivery_count for d in got] == [2] * 5 + [1]
            for d in got:
                await d.ack()


async def test_delayed_publish(broker) -> None:
    async with connect(broker.url) as tc:
        await declare(tc, "dl")
        async with tc.consume("dl") as deliveries:
            await tc.publish("dl.a", b"later", delay=0.4)
            at = time.time() + 0.2
            await tc.publish("dl.a", b"at", at=at)
            await tc.publish("dl.a", b"now")
            got, received = [], {}
            for _ in range(3):  # the order depends on how fast the publishes went: check each one's time
                d = await deliveries.next(timeout=WAIT)
                received[d.payload] = time.time()
                got.append(d)
            assert sorted(d.payload for d in got) == [b"at", b"later", b"now"]
            later = next(d for d in got if d.payload == b"later")
            assert received[b"later"] >= later.published_ms / 1000 + 0.4 - TOLERANCE
            assert received[b"at"] >= at - TOLERANCE
            info = await tc.queue_info("dl")
            assert info["in_flight"] == 3
            for d in got:
                await d.ack()


async def test_delay_does_not_block_what_is_due(broker) -> None:
    """A delayed message at the head of the queue must not hold back the
    messages published after it (a consumer attached later gets them first)."""
    async with connect(broker.url) as tc:
        await declare(tc, "dh")
        await tc.publish("dh.a", b"in an hour", delay=3600)
        for i in range(3):
            await tc.publish("dh.a", f"m{i}")
        async with tc.consume("dh") as deliveries:
            assert [d.payload for d in await collect(deliveries, 3)] == [b"m0", b"m1", b"m2"]
        assert (await tc.queue_info("dh"))["depth"] == 4


async def test_prefetch_bounds_unacked_deliveries(broker) -> None:
    async with connect(broker.url) as tc:
        await declare(tc, "pf")
        for i in range(5):
            await tc.publish("pf.a", f"m{i}")
        async with tc.consume("pf", prefetch=2) as deliveries:
            first = await collect(deliveries, 2)
            await tc.flush()
            assert (await tc.queue_info("pf"))["in_flight"] == 2
            await first[0].ack()
            third = await deliveries.next(timeout=WAIT)
            assert third.payload == b"m2"
            for d in [first[1], third]:
                await d.ack()
            with anyio.fail_after(WAIT):
                rest = await collect(deliveries, 2)
            assert [d.payload for d in rest] == [b"m3", b"m4"]
