"""The Worker helper (client/worker.py) against a real broker: success acks,
failure nacks with the queue's backoff and ends in the DLQ, long handlers
are not redelivered under them, the circuit breaker opens and closes, and
a stream-group worker keeps per-partition order.

Bugs these tests found are kept as regression tests (see their
docstrings). Waits are on events the handlers set, bounded by ``anyio.fail_after``;
queue settings are short (queuetools.FAST); timings are asserted as lower
bounds (the contract) with loose upper bounds.
"""

from __future__ import annotations

import itertools
import random
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import anyio
from queuetools import WAIT, broker_time_passes, collect, declare, headers_of

from tidings.client import Worker, connect
from tidings.client.consumer import Delivery

TOLERANCE = 0.005  # the broker keeps times in whole milliseconds


async def until(predicate: Callable[[], bool], timeout: float = WAIT,
                what: Callable[[], Any] = lambda: "") -> None:
    """Wait (bounded) until the worker's own counters say it is done; on
    timeout, fail with ``what()`` (the state to show)."""
    with anyio.move_on_after(timeout):
        while not predicate():
            await anyio.sleep(0.01)
    assert predicate(), f"not done within {timeout}s: {what()}"


class Breaker:
    """A Worker ``on_state_change`` recorder with an event per (state, n-th time)."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, str]] = []
        self._events: dict[tuple[str, int], anyio.Event] = {}

    def __call__(self, state: str) -> None:
        self.seen.append((time.monotonic(), state))
        n = sum(1 for _, s in self.seen if s == state)
        self.event(state, n).set()

    def event(self, state: str, n: int = 1) -> anyio.Event:
        return self._events.setdefault((state, n), anyio.Event())

    async def wait(self, state: str, n: int = 1, within: float = WAIT) -> float:
        with anyio.fail_after(within):
            await self.event(state, n).wait()
        return [t for t, s in self.seen if s == state][n - 1]

    def names(self) -> list[str]:
        return [s for _, s in self.seen]


async def test_success_acks_with_bounded_concurrency(broker) -> None:
    async with connect(broker.url) as tc:
        await declare(tc, "wk")
        for i in range(20):
            await tc.publish("wk.a", f"{i}")
        active = peak = 0
        handled: list[bytes] = []
        four = anyio.Event()

        async def handle(d: Delivery) -> None:
            nonlocal active, peak
            active += 1
            peak = max(peak, active)
            if active == 4:
                four.set()
            with anyio.fail_after(WAIT):
                await four.wait()  # the first four meet: concurrency reaches its bound
            active -= 1
            handled.append(d.payload)

        worker = Worker(tc, handle, queue="wk", concurrency=4)
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            await until(lambda: worker.succeeded == 20)
            await tc.flush()  # the acks (batched) are applied
            info = await tc.queue_info("wk")
            tg.cancel_scope.cancel()
        assert peak == 4
        assert sorted(handled) == sorted(f"{i}".encode() for i in range(20))
        assert (info["depth"], info["in_flight"], info["acked"], info["redelivered"]) == (0, 0, 20, 0)
        assert (worker.failed, worker.state) == (0, "closed")


async def test_failure_nacks_with_the_queue_backoff_then_dead_letters(broker) -> None:
    schedule = [0.2, 0.4]
    async with connect(broker.url) as tc:
        await declare(tc, "wf", max_deliveries=3, backoff_schedule=schedule)
        ack = await tc.publish("wf.a", b"poison", msg_id="p-1")
        tries: list[tuple[float, int]] = []

        async def handle(d: Delivery) -> None:
            tries.append((time.monotonic(), d.delivery_count))
            raise ValueError("cannot handle this")

        worker = Worker(tc, handle, queue="wf", concurrency=2, failure_threshold=100)
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            async with tc.consume("wf.dlq") as dead:
                d = await dead.next(timeout=WAIT + sum(schedule))
            tg.cancel_scope.cancel()
        assert [n for _, n in tries] == [1, 2, 3]
        gaps = [b - a for (a, _), (b, _) in itertools.pairwise(tries)]
        for gap, want in zip(gaps, schedule):
            assert want - TOLERANCE <= gap < want + 1.0, (gaps, schedule)
        h = headers_of(d)
        assert (d.payload, d.msg_id) == (b"poison", "p-1")
        assert (h["tidings-dlq-reason"], h["tidings-delivery-count"], h["tidings-original-id"]) == (
            "max_deliveries", 3, ack.id)
        assert (worker.failed, worker.succeeded, worker.breaker_opened) == (3, 0, 0)
        info = await tc.queue_info("wf")
        assert (info["depth"], info["in_flight"], info["dead_lettered"]) == (0, 0, 1)


async def test_long_handler_is_not_redelivered_under_it(broker) -> None:
    """ack_deadline 2 s, a handler of 3 s: the worker's in_progress
    extensions keep the message its own. The deadline is long next to the
    extension interval (0.2 s), so an extension may be 1.8 s late on a busy
    machine before the deadline could run out under the handler."""
    async with connect(broker.url) as tc:
        await declare(tc, "wl", ack_deadline=2.0, max_deliveries=0)
        await tc.publish("wl.a", b"long job")
        calls: list[int] = []

        async def handle(d: Delivery) -> None:
            calls.append(d.delivery_count)
            await anyio.sleep(3.0)  # the job: one and a half ack deadlines long

        worker = Worker(tc, handle, queue="wl", concurrency=4, extend_every=0.2)
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            await until(lambda: worker.succeeded == 1, timeout=3.0 + WAIT)
            await tc.flush()
            info = await tc.queue_info("wl")
            tg.cancel_scope.cancel()
        assert calls == [1]
        assert (info["depth"], info["in_flight"], info["acked"], info["redelivered"]) == (0, 0, 1, 0)


async def test_without_extensions_the_same_handler_is_redelivered(broker) -> None:
    """The control for the test above: extending less often than the ack
    deadline lets the broker hand the message out again mid-handler."""
    async with connect(broker.url) as tc:
        await declare(tc, "wn", ack_deadline=0.3, max_deliveries=0)
        await tc.publish("wn.a", b"long job")
        calls: list[int] = []
        second = anyio.Event()

        async def handle(d: Delivery) -> None:
            calls.append(d.delivery_count)
            if len(calls) == 2:
                second.set()
            await anyio.sleep_forever()

        worker = Worker(tc, handle, queue="wn", concurrency=4, extend_every=60.0)
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            with anyio.fail_after(WAIT):
                await second.wait()
            tg.cancel_scope.cancel()
        assert calls == [1, 2]


async def test_circuit_breaker_opens_half_opens_and_closes(broker) -> None:
    """Three consecutive failures open the breaker; nothing is consumed
    while it is open; after the cool-down one probe runs (half-open): a
    failure opens it again, a success closes it and consumption resumes."""
    cooldown = 0.4
    async with connect(broker.url) as tc:
        # Immediate retries: with a backoff, the breaker's stop/start pattern strands messages
        # on the broker (see test_nack_during_a_refill_does_not_strand_the_queue).
        await declare(tc, "wb", max_deliveries=0, backoff_initial=0.0)
        for i in range(10):
            await tc.publish("wb.a", f"{i}")
        br = Breaker()
        calls: list[float] = []
        ok: set[bytes] = set()

        async def handle(d: Delivery) -> None:
            calls.append(time.monotonic())
            if br.names().count("open") < 2:
                raise RuntimeError("downstream is down")  # until the breaker opened twice
            ok.add(d.payload)

        worker = Worker(tc, handle, queue="wb", concurrency=2, failure_threshold=3, cooldown=cooldown,
                        on_state_change=br)
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            opened = await br.wait("open")
            # three consecutive failures trip it; a handler already running when it tripped finishes
            n = len(calls)
            assert 3 <= worker.failed == n <= 3 + 1
            half = await br.wait("half-open", within=cooldown + WAIT)
            assert half - opened >= cooldown - TOLERANCE
            reopened = await br.wait("open", 2)  # the probe failed
            assert len(calls) == n + 1 and worker.failed == n + 1  # one probe only
            half2 = await br.wait("half-open", 2, within=cooldown + WAIT)
            assert half2 - reopened >= cooldown - TOLERANCE
            await br.wait("closed")  # the probe succeeded
            await until(lambda: len(ok) == 10)
            await tc.flush()
            info = await tc.queue_info("wb")
            tg.cancel_scope.cancel()
        assert br.names() == ["open", "half-open", "open", "half-open", "closed"]
        # no handler ran while the breaker was open
        for start, end in ((opened, half), (reopened, half2)):
            assert not [t for t in calls if start < t < end]
        assert worker.breaker_opened == 2 and worker.state == "closed"
        assert (info["depth"], info["in_flight"]) == (0, 0)


async def test_concurrency_comes_back_after_the_breaker_closes(broker) -> None:
    """Regression: the worker kept the half-open limit of one handler after
    the breaker closed again, until the next trip."""
    async with connect(broker.url) as tc:
        await declare(tc, "wc", max_deliveries=0)
        br = Breaker()
        active = 0
        four = anyio.Event()
        alone = anyio.Event()

        async def handle(d: Delivery) -> None:
            nonlocal active
            if not d.payload.startswith(b"job"):
                if d.payload == b"fail" and d.delivery_count == 1:
                    raise RuntimeError("once")
                return
            active += 1
            if active == 4:
                four.set()
            with anyio.move_on_after(2 * WAIT):  # only a bug (one at a time) waits this out
                await four.wait()  # four handlers at once, as configured
            if not four.is_set():
                alone.set()
            active -= 1

        worker = Worker(tc, handle, queue="wc", concurrency=4, failure_threshold=1, cooldown=0.1,
                        on_state_change=br)
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            await tc.publish("wc.a", b"fail")
            await br.wait("open")
            await tc.publish("wc.a", b"probe")
            await br.wait("closed")
            for i in range(4):
                await tc.publish("wc.a", f"job {i}")
            with anyio.fail_after(3 * WAIT):
                async with anyio.create_task_group() as either:
                    for ev in (four, alone):
                        either.start_soon(_set_then_cancel, ev, either.cancel_scope)
            tg.cancel_scope.cancel()
        assert br.names() == ["open", "half-open", "closed"]
        assert four.is_set(), "after the breaker closed, handlers ran one at a time"


async def _set_then_cancel(ev: anyio.Event, scope: anyio.CancelScope) -> None:
    await ev.wait()
    scope.cancel()


async def test_nack_during_a_refill_does_not_strand_the_queue(broker) -> None:
    """Found by the breaker test (a Worker stops and restarts its consumer
    while retries wait out their backoff). A and B wait out a backoff on
    disk; a new consumer's arrival makes the queue page them in, and C is
    nacked while that paging awaits the store.

    Regression (broker/queue.py): C was stranded on disk (on_disk_only 1,
    next_due None) and the queue stopped delivering, new publishes too."""
    async with connect(broker.url) as tc:
        await declare(tc, "st", backoff_schedule=[0.2], max_deliveries=0)
        for p in (b"A", b"B", b"C"):
            await tc.publish("st.a", p)
        async with tc.consume("st", prefetch=3) as deliveries:
            a, b, _c = await collect(deliveries, 3)
            await a.nack(wait=True)  # A and B: back in 0.2 s, from disk
            await b.nack(wait=True)
        await broker_time_passes(tc, 0.3)  # they are due
        seen: list[bytes] = []
        async with tc.consume("st", prefetch=1) as deliveries:
            c = await deliveries.next(timeout=WAIT)  # C (ready in memory); attaching also starts paging A, B in
            await c.nack()  # lands while the page-in awaits the store
            await tc.publish("st.a", b"D")
            with anyio.move_on_after(WAIT):  # everything is due within 0.2 s; a bug waits this out
                while len(seen) < 4:
                    d = await deliveries.next()
                    seen.append(d.payload)
                    await d.ack()
        info = await tc.queue_info("st")
        assert sorted(seen) == [b"A", b"B", b"C", b"D"], (seen, info["on_disk_only"], info["depth"])


# ------------------------------------------------------------- streams


async def publish_keyed(tc: Any, subject: str, keys: list[str], n: int) -> dict[tuple[str, int], tuple[int, int]]:
    """Publish ``key:seq`` round the keys; return (key, seq) -> (partition, offset)."""
    seqs: dict[str, int] = defaultdict(int)
    where = {}
    for i in range(n):
        key = keys[i % len(keys)]
        seq = seqs[key]
        seqs[key] += 1
        ack = await tc.publish(subject, f"{key}:{seq}", key=key)
        where[(key, seq)] = (ack.partition, ack.offset)
    return where


async def test_stream_group_worker_keeps_per_partition_order(broker) -> None:
    partitions, total = 3, 90
    async with connect(broker.url) as tc:
        await tc.declare_stream("ws", partitions=partitions, bind=["ws.>"])
        keys = [f"k{i}" for i in range(9)]
        where = await publish_keyed(tc, "ws.a", keys, total)
        assert len({p for p, _ in where.values()}) == partitions  # every partition has work
        handled: list[tuple[int, int, str, int]] = []  # (partition, offset, key, seq) in handling order
        busy: dict[int, int] = defaultdict(int)
        overlaps: list[tuple[int, int]] = []
        rng = random.Random(5)

        async def handle(m: Any) -> None:
            busy[m.partition] += 1
            if busy[m.partition] > 1:
                overlaps.append((m.partition, m.offset))
            await anyio.sleep(rng.random() * 0.004)  # uneven handler times shuffle the interleaving
            key, seq = m.payload.decode().rsplit(":", 1)
            handled.append((m.partition, m.offset, key, int(seq)))
            busy[m.partition] -= 1

        worker = Worker(tc, handle, stream="ws", group="g", concurrency=8)
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            await until(lambda: worker.succeeded == total)
            await tc.flush()
            info = await tc.stream_info("ws")
            tg.cancel_scope.cancel()
        assert not overlaps, f"two messages of one partition were handled at once: {overlaps[:5]}"
        for p in range(partitions):
            offsets = [o for q, o, _, _ in handled if q == p]
            assert offsets == sorted(offsets) and len(offsets) == len(set(offsets)), p
        for key in keys:
            seqs = [s for _, _, k, s in handled if k == key]
            assert seqs == list(range(len(seqs))) and len(seqs) == total // len(keys), key
        for p, o, key, seq in handled:
            assert where[(key, seq)] == (p, o)
        assert worker.failed == 0 and len(handled) == total
        committed = {g["partition"]: g["committed"] for g in info["groups"]["g"]["partitions"]}
        ends = {p: 1 + max(o for q, o in where.values() if q == p) for p in range(partitions)}
        assert committed == ends  # every ack landed: the group's offsets are at the end


async def test_stream_group_worker_works_on_partitions_in_parallel(broker) -> None:
    """Regression: tasks waiting for one partition's lock held every
    concurrency slot, so a partition with a backlog starved the others."""
    partitions = 3
    async with connect(broker.url) as tc:
        await tc.declare_stream("wp", partitions=partitions, bind=["wp.>"])
        await publish_keyed(tc, "wp.a", [f"k{i}" for i in range(9)], 90)
        busy: set[int] = set()
        every = anyio.Event()

        async def handle(m: Any) -> None:
            busy.add(m.partition)
            if len(busy) == partitions:
                every.set()
            with anyio.move_on_after(2 * WAIT):  # only a bug (too little concurrency) waits this out
                await every.wait()  # one handler per partition at once: 3 <= concurrency
            busy.discard(m.partition)

        worker = Worker(tc, handle, stream="wp", group="g", concurrency=8)
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            with anyio.move_on_after(3 * WAIT):
                await every.wait()
            tg.cancel_scope.cancel()
        assert every.is_set(), f"only partitions {sorted(busy)} were handled at once"


async def test_stream_group_worker_failure_does_not_run_later_messages_first(broker) -> None:
    """Regression: after a failure at offset N the worker still ran the
    partition's later messages it held, which the broker had voided and
    redelivers after N: their effects came before N's retry."""
    async with connect(broker.url) as tc:
        await tc.declare_stream("wr", partitions=1, bind=["wr.>"], backoff_initial=0.05, max_deliveries=0)
        where = await publish_keyed(tc, "wr.a", ["k"], 10)
        calls: list[tuple[int, int]] = []  # (offset, delivery_count) in handling order
        failed_once = False

        async def handle(m: Any) -> None:
            nonlocal failed_once
            calls.append((m.offset, m.delivery_count))
            if m.offset == 3 and not failed_once:
                failed_once = True
                raise RuntimeError("transient")

        worker = Worker(tc, handle, stream="wr", group="g", concurrency=4, failure_threshold=100)
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            await until(lambda: {o for o, _ in calls} == set(range(10)) and calls.count((3, 2)) == 1
                        and calls[-1][0] == 9, what=lambda: calls)
            tg.cancel_scope.cancel()
        assert where[("k", 3)] == (0, 3)
        # The application sees offsets 0..3, the failure of 3, then 3 again and on: never 4 before 3 succeeded.
        first_fail = calls.index((3, 1))
        assert calls[first_fail + 1][0] == 3, f"ran {calls[first_fail + 1:first_fail + 4]} before retrying 3"
