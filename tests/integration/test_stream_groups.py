"""Consumer groups against a real broker: order per key across rebalances and
consumer crashes, stale members, poison messages.

Payloads carry ``key:seq`` where seq counts that key's publishes, so the
tests can check what a group promises: for each key, the deliveries that
are first deliveries (``delivery_count == 1``) arrive in publish order,
every confirmed message is delivered at least once, and the committed
offset never passes a message that was not acked.
"""

from __future__ import annotations

import itertools
import json
import random
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from tidings.client import Client, connect
from tidings.client.errors import StaleDeliveryError, StaleGenerationError
from tidings.protocol.partition import partition_for

WAIT = 5.0


# --------------------------------------------------------------- helpers


@dataclass
class Ledger:
    """What a test's publishers confirmed and its consumers saw."""

    published: dict[str, int] = field(default_factory=dict)  # key -> how many were published
    confirmed: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)  # (key, seq) -> (p, offset)
    # every delivery, in the order the test's consumers took them:
    # (key, seq, delivery_count, partition, offset, worker)
    seen: list[tuple[str, int, int, int, int, str]] = field(default_factory=list)
    acked: set[tuple[int, int]] = field(default_factory=set)  # (partition, offset) acks the broker accepted
    stale_refusals: int = 0

    def record(self, m: Any, worker: str) -> tuple[str, int]:
        key, seq = m.payload.decode().rsplit(":", 1)
        assert key == m.key
        self.seen.append((key, int(seq), m.delivery_count, m.partition, m.offset, worker))
        return key, int(seq)


def check_order(led: Ledger) -> None:
    """Per key: first sightings are exactly publish order; deliveries with
    delivery_count == 1 are in publish order and never repeat."""
    firsts: dict[str, list[int]] = defaultdict(list)
    ones: dict[str, list[int]] = defaultdict(list)
    known: set[tuple[str, int]] = set()
    for key, seq, count, _p, _o, _w in led.seen:
        if (key, seq) not in known:
            known.add((key, seq))
            firsts[key].append(seq)
        if count == 1:
            ones[key].append(seq)
    for key in led.published:
        confirmed = sorted(s for (k, s) in led.confirmed if k == key)
        assert set(confirmed) <= set(firsts[key]), f"{key}: confirmed messages never delivered"
        assert firsts[key] == sorted(firsts[key]), f"{key}: first sightings out of order: {firsts[key]}"
        assert ones[key] == sorted(set(ones[key])), f"{key}: first deliveries out of order: {ones[key]}"


def check_no_skipped_offsets(led: Ledger, info: dict[str, Any], group: str) -> None:
    """Every offset below a partition's committed offset was acked by some consumer."""
    for p in info["groups"][group]["partitions"]:
        missing = [o for o in range(p["committed"]) if (p["partition"], o) not in led.acked]
        assert not missing, f"partition {p['partition']}: committed past unacked offsets {missing[:10]}"


class Worker:
    """One group member on its own connection. It drops buffered deliveries of
    partitions it no longer owns (as a careful application would: the
    assignment notice told it, or the broker refused an ack), acks each
    message it processes with wait=True, and stops when told to -- leaving
    whatever it still holds unacked, like a consumer that goes away mid-stream."""

    def __init__(self, name: str, url: str, stream: str, group: str, led: Ledger, window: int) -> None:
        self.name = name
        self.url = url
        self.stream = stream
        self.group = group
        self.led = led
        self.window = window
        self.stop = anyio.Event()
        self.stopped = anyio.Event()
        self.processed = 0
        self.lost_partitions: set[tuple[int, int]] = set()  # (partition, generation) an ack was refused for
        self._waiting: anyio.CancelScope | None = None

    def request_stop(self) -> None:
        """Stop after the message in hand (if any); a wait for the next one is cut short."""
        self.stop.set()
        if self._waiting is not None:
            self._waiting.cancel()

    async def run(self, on_message: Any) -> None:
        try:
            async with connect(self.url, name=self.name) as tc:
                async with tc.stream_consume(self.stream, self.group, window=self.window) as msgs:
                    while not self.stop.is_set():
                        m = None
                        with anyio.CancelScope() as self._waiting:
                            m = await msgs.next(timeout=30)
                        self._waiting = None
                        if m is None or self.stop.is_set():
                            break
                        if (m.partition not in msgs.assignment[1]
                                or (m.partition, m.generation) in self.lost_partitions):
                            continue  # a leftover of a partition that moved away: not ours to process
                        self.led.record(m, self.name)
                        try:
                            await m.ack(wait=True)
                            self.led.acked.add((m.partition, m.offset))
                        except (StaleGenerationError, StaleDeliveryError):
                            self.led.stale_refusals += 1
                            self.lost_partitions.add((m.partition, m.generation))
                        self.processed += 1
                        await on_message(self)
        finally:
            self.stopped.set()


async def publish_keyed(tc: Client, led: Ledger, subject: str, keys: list[str], n: int,
                        in_flight: int = 200) -> None:
    """Publish n messages round the keys with confirms (in_flight outstanding)."""
    pending: list[tuple[tuple[str, int], Any]] = []
    for i in range(n):
        key = keys[i % len(keys)]
        seq = led.published.get(key, 0)
        led.published[key] = seq + 1
        pending.append(((key, seq), tc.publish_nowait(subject, f"{key}:{seq}", key=key)))
        if len(pending) >= in_flight:
            ks, c = pending.pop(0)
            led.confirmed[ks] = tuple(await c)  # type: ignore[assignment]
        if i % 50 == 0:
            await anyio.lowlevel.checkpoint()
    for ks, c in pending:
        led.confirmed[ks] = tuple(await c)  # type: ignore[assignment]


# ------------------------------------------------------------ stale member


async def test_member_that_lost_its_partition_gets_stale_generation(broker) -> None:
    async with connect(broker.url) as a, connect(broker.url) as b:
        await a.declare_stream("st", partitions=2, bind=["st.>"])
        for key in ("k0", "k1", "k2", "k3", "k4", "k5"):
            await a.publish("st.x", f"{key}:0", key=key)
        async with a.stream_consume("st", "g") as ma:
            held = [await ma.next(timeout=WAIT) for _ in range(6)]
            assert ma.assignment[1] == [0, 1]
            async with b.stream_consume("st", "g") as mb:
                await mb.next(timeout=WAIT)
                lost = [m for m in held if m.partition == 1]
                assert lost
                with pytest.raises(StaleGenerationError):
                    await lost[0].ack(wait=True)


async def test_member_that_lost_its_partition_cannot_commit(broker) -> None:
    """A holds partition 1's messages unacked; B joins and takes partition 1.
    A's acks are refused (wait=True raises; batched acks are counted as
    stale), the committed offset does not move, and B gets the messages
    again, as redeliveries, from the committed offset, in order."""
    async with connect(broker.url) as a, connect(broker.url) as b, connect(broker.url) as obs:
        await a.declare_stream("st", partitions=2, bind=["st.>"])
        keys = [k for k in (f"k{i}" for i in range(40)) if partition_for(k, 2) == 1][:4]
        keys += [k for k in (f"k{i}" for i in range(40)) if partition_for(k, 2) == 0][:2]
        for key in keys:
            await a.publish("st.x", f"{key}:0", key=key)
        async with a.stream_consume("st", "g", window=10) as ma:
            held = [await ma.next(timeout=WAIT) for _ in range(len(keys))]
            gen_a, parts_a = ma.assignment
            assert parts_a == [0, 1]
            first_p1 = [m for m in held if m.partition == 1]
            assert [m.offset for m in first_p1] == [0, 1, 2, 3]
            # A acks the first of partition 1 while it still owns it: that one commits.
            await first_p1[0].ack(wait=True)
            async with b.stream_consume("st", "g", window=10) as mb:
                got_b = [await mb.next(timeout=WAIT) for _ in range(3)]
                assert mb.assignment[1] == [1]
                await a.flush()  # A has read everything the broker sent it before the PONG
                assert ma.assignment[0] > gen_a and ma.assignment[1] == [0]  # A was told, too
                assert [(m.partition, m.offset, m.delivery_count) for m in got_b] == [(1, 1, 2), (1, 2, 2),
                                                                                    (1, 3, 2)]
                assert all(m.generation > gen_a for m in got_b)
                with pytest.raises((StaleGenerationError, StaleDeliveryError)):
                    await first_p1[1].ack(wait=True)
                for m in first_p1[2:]:
                    await m.ack()  # batched: refused, and counted
                await a.flush()
                assert ma.stale_acks == 2
                info = (await obs.stream_info("st"))["groups"]["g"]
                assert info["partitions"][1]["committed"] == 1
                assert info["partitions"][1]["owner_connection"] != info["partitions"][0]["owner_connection"]
                # A still owns partition 0 and may commit there
                for m in held:
                    if m.partition == 0:
                        await m.ack(wait=True)
                for m in got_b:
                    await m.ack(wait=True)
                info = (await obs.stream_info("st"))["groups"]["g"]
                assert [p["committed"] for p in info["partitions"]] == [2, 4]
                assert info["redelivered"] == 3


# -------------------------------------------------- rebalances, mid-stream


async def test_member_joining_while_the_group_is_busy_gets_its_partition(broker) -> None:
    """A acks a burst and stops; B joins at once and must get its partition's
    messages. Repeated, because the join has to land while the group actor is
    in the middle of a delivery."""
    async with connect(broker.url) as a, connect(broker.url) as b:
        await a.declare_stream("busy", partitions=2, bind=["busy.>"])
        for i in range(2000):
            a.publish_nowait("busy.x", b"x", key=f"k{i}")
        await a.flush()
        for r in range(20):
            async with a.stream_consume("busy", f"g{r}", window=5) as ma:
                for _ in range(50):
                    await (await ma.next(timeout=WAIT)).ack()
                async with b.stream_consume("busy", f"g{r}", window=5) as mb:
                    m = await mb.next(timeout=WAIT)
                    assert m.partition in mb.assignment[1]


async def test_order_per_key_holds_while_members_join_and_leave(broker) -> None:
    P, N = 4, 3000
    keys = [f"acct-{i}" for i in range(24)]
    led = Ledger()
    url = broker.url
    async with connect(url) as admin:
        await admin.declare_stream("orders", partitions=P, bind=["orders.>"])
        commits: list[list[int]] = []
        workers: dict[str, Worker] = {}
        total = anyio.Event()
        rng = random.Random(4)
        plan = [(300, "start", "B"), (700, "start", "C"), (1100, "stop", "A"), (1500, "start", "D"),
                (1900, "stop", "C"), (2300, "start", "E"), (2600, "stop", "B")]
        steps: list[tuple[int, str, str]] = list(plan)

        async def sample() -> None:
            info = await admin.stream_info("orders")
            commits.append([p["committed"] for p in info["groups"]["g"]["partitions"]])

        async def on_message(w: Worker) -> None:
            n = len(led.seen)
            while steps and n >= steps[0][0]:
                _, what, name = steps.pop(0)
                if what == "start":
                    start(name)
                else:
                    workers[name].request_stop()
                tg.start_soon(sample)
            if len(led.acked) >= N and len(led.confirmed) >= N:
                total.set()
            if rng.random() < 0.2:
                await anyio.lowlevel.checkpoint()  # let the others interleave

        def start(name: str) -> None:
            workers[name] = w = Worker(name, url, "orders", "g", led, window=rng.choice([5, 20, 50]))
            tg.start_soon(w.run, on_message)

        async with connect(url) as pub:
            async with anyio.create_task_group() as tg:
                start("A")
                tg.start_soon(publish_keyed, pub, led, "orders.placed", keys, N)
                with anyio.fail_after(40):
                    await total.wait()
                await sample()
                for w in workers.values():
                    w.request_stop()
        assert not steps
        info = await admin.stream_info("orders")
    assert len(led.confirmed) == N
    check_order(led)
    check_no_skipped_offsets(led, info, "g")
    parts = info["groups"]["g"]["partitions"]
    assert [p["committed"] for p in parts] == [x["next"] for x in info["partitions"]]
    assert sum(x["next"] for x in info["partitions"]) == N
    for a, b in itertools.pairwise(commits):
        assert all(x <= y for x, y in zip(a, b)), commits  # committed offsets never go back
    assert info["groups"]["g"]["generation"] >= 1 + len(plan)
    assert info["groups"]["g"]["redelivered"] > 0  # members left with messages in hand
    # everything acked exactly where the confirm said it was stored
    for (key, seq), (p, o) in led.confirmed.items():
        assert p == partition_for(key, P)
        assert (p, o) in led.acked


# ----------------------------------------------------------- consumer crash

CONSUMER = r"""
import sys, json, anyio
from tidings import connect

async def main(url, hold_after):
    async with connect(url, name="doomed") as tc:
        async with tc.stream_consume("crash", "g", window=40) as msgs:
            n = 0
            async for m in msgs:
                print(json.dumps([m.payload.decode(), m.partition, m.offset, m.delivery_count]), flush=True)
                n += 1
                if n <= hold_after:
                    await m.ack()
                if n == hold_after:
                    await tc.flush()  # the broker has every ack so far
                    print("holding", flush=True)
                if n >= hold_after + 40:
                    break
            print("idle", flush=True)
            await anyio.sleep_forever()

anyio.run(main, sys.argv[1], int(sys.argv[2]))
"""


async def test_consumer_killed_mid_stream_resumes_at_committed_offset(broker, tmp_path) -> None:
    P, N, HOLD = 3, 900, 300
    keys = [f"dev-{i}" for i in range(12)]
    led = Ledger()
    async with connect(broker.url) as tc:
        await tc.declare_stream("crash", partitions=P, bind=["crash.>"])
        await publish_keyed(tc, led, "crash.t", keys, N)
        script = tmp_path / "consumer.py"
        script.write_text(CONSUMER)
        proc = await anyio.open_process([sys.executable, str(script), broker.url, str(HOLD)],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        doomed: list[list[Any]] = []
        try:
            buf = b""
            with anyio.fail_after(30):
                assert proc.stdout is not None
                while b"idle\n" not in buf:
                    chunk = await proc.stdout.receive()
                    buf += chunk
            for line in buf.decode().splitlines():
                if line.startswith("["):
                    doomed.append(json.loads(line))
            committed_before = [p["committed"] for p in (await tc.stream_info("crash"))["groups"]["g"]["partitions"]]
            assert sum(committed_before) == HOLD
            # it acked its first HOLD deliveries, in order per partition, so these are committed
            acked_by_doomed = {(p, o) for _pl, p, o, _c in doomed[:HOLD]}
            for p in range(P):
                assert committed_before[p] == len([1 for q, _o in acked_by_doomed if q == p])
            proc.kill()  # SIGKILL: 40 deliveries in hand, unacked
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
            await proc.aclose()
        assert len(doomed) == HOLD + 40
        for pl, p, o, c in doomed:
            key, seq = pl.rsplit(":", 1)
            led.seen.append((key, int(seq), c, p, o, "doomed"))
            if len(led.seen) <= HOLD:
                led.acked.add((p, o))
        in_hand = {(p, o) for _pl, p, o, _c in doomed[HOLD:]}

        firsts: dict[int, int] = {}
        counts: dict[int, list[int]] = defaultdict(list)
        async with tc.stream_consume("crash", "g", window=100) as msgs:
            while len(led.acked) < N:
                m = await msgs.next(timeout=WAIT)
                firsts.setdefault(m.partition, m.offset)
                counts[m.partition].append(m.delivery_count)
                led.record(m, "survivor")
                if (m.partition, m.offset) in in_hand:
                    assert m.delivery_count == 2, m  # what the dead member held comes again, marked
                await m.ack()
                led.acked.add((m.partition, m.offset))
            await tc.flush()
            info = await tc.stream_info("crash")
        # each partition resumed exactly at its committed offset: redeliveries first, then new ones
        assert firsts == {p: committed_before[p] for p in range(P)
                          if committed_before[p] < info["partitions"][p]["next"]}
        for p, cs in counts.items():
            assert cs == sorted(cs, reverse=True) and set(cs) <= {1, 2}, (p, cs)
        assert [m["client"] for m in info["groups"]["g"]["members"]] == [tc.name]  # the dead member is gone
        assert [p["committed"] for p in info["groups"]["g"]["partitions"]] == \
            [x["next"] for x in info["partitions"]]
    check_order(led)
    check_no_skipped_offsets(led, info, "g")


# ---------------------------------------------------------------- poison


async def test_poison_message_goes_to_the_dlq_and_the_partition_moves_on(broker) -> None:
    async with connect(broker.url) as tc:
        await tc.declare_stream("pay", partitions=2, bind=["pay.>"], max_deliveries=3, backoff_initial=0.01,
                                backoff_multiplier=1.0, backoff_max=0.01)
        key = "acct-7"
        p = partition_for(key, 2)
        for i in range(5):
            await tc.publish("pay.x", f"{key}:{i}", key=key, headers={"n": i})
        seen: list[tuple[int, int]] = []
        acked: list[int] = []
        async with tc.stream_consume("pay", "g", window=10) as msgs:
            while not acked or acked[-1] != 4:
                m = await msgs.next(timeout=WAIT)
                seen.append((m.offset, m.delivery_count))
                if m.payload == b"acct-7:1":
                    await m.nack()  # poison: fails every time
                    continue
                try:
                    await m.ack(wait=True)
                    acked.append(m.offset)
                except StaleDeliveryError:
                    pass  # delivered before the nack rewound the partition: it comes again
            info = await tc.stream_info("pay")
        # offset 1 is delivered three times (each nack rewinds the partition to it), then dead-lettered;
        # the messages behind it wait for it, and then come in order
        assert [o for o, c in seen if c == 1] == [0, 1, 2, 3, 4]
        assert [c for o, c in seen if o == 1] == [1, 2, 3]
        assert acked == [0, 2, 3, 4]
        assert seen.index((1, 3)) < seen.index((2, 3))
        assert info["dead_lettered"] == 1
        assert info["groups"]["g"]["partitions"][p]["committed"] == 5
        dead = await tc.dlq_list("pay.dlq")
        assert len(dead) == 1
        h = dead[0]["headers"]
        assert dead[0]["payload"] == b"acct-7:1"
        assert (h["n"], h["tidings-dlq-source"], h["tidings-dlq-reason"], h["tidings-delivery-count"],
                h["tidings-stream-partition"], h["tidings-stream-offset"], h["tidings-stream-key"]) == \
            (1, "pay", "max_deliveries", 3, p, 1, key)
        assert h["tidings-last-error"] == "nacked"

        # reject: straight to the DLQ with the reason, and the partition goes on at once
        await tc.publish("pay.x", "bad", key=key)
        await tc.publish("pay.x", "good", key=key)
        async with tc.stream_consume("pay", "g") as msgs:
            m = await msgs.next(timeout=WAIT)
            assert (m.payload, m.delivery_count) == (b"bad", 1)
            await m.reject("schema v9 unknown")
            m = await msgs.next(timeout=WAIT)
            assert (m.payload, m.offset) == (b"good", 6)
            await m.ack(wait=True)
        dead = await tc.dlq_list("pay.dlq")
        assert [d["payload"] for d in dead] == [b"acct-7:1", b"bad"]
        h = dead[1]["headers"]
        assert (h["tidings-dlq-reason"], h["tidings-last-error"], h["tidings-stream-offset"]) == \
            ("rejected", "schema v9 unknown", 5)
        assert (await tc.stream_info("pay"))["groups"]["g"]["partitions"][p]["committed"] == 7


async def test_dead_lettering_survives_a_restart(broker) -> None:
    """The DLQ copy and the committed offset past it are stored together:
    after a restart the poison message is neither lost nor delivered again."""
    async with connect(broker.url) as tc:
        await tc.declare_stream("dl", partitions=1, bind=["dl.>"], max_deliveries=1)
        await tc.publish("dl.x", "poison", key="k")
        await tc.publish("dl.x", "fine", key="k")
        async with tc.stream_consume("dl", "g") as msgs:
            m = await msgs.next(timeout=WAIT)
            await m.nack(wait=True)  # max_deliveries=1: straight to the DLQ
            m = await msgs.next(timeout=WAIT)
            assert m.payload == b"fine"
            await m.ack(wait=True)
    broker.terminate()
    broker.restart()
    async with connect(broker.url) as tc:
        assert [d["payload"] for d in await tc.dlq_list("dl.dlq")] == [b"poison"]
        info = await tc.stream_info("dl")
        assert info["groups"]["g"]["partitions"][0]["committed"] == 2
        await tc.publish("dl.x", "next", key="k")
        async with tc.stream_consume("dl", "g") as msgs:
            m = await msgs.next(timeout=WAIT)
            assert (m.payload, m.offset) == (b"next", 2)
