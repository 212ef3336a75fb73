"""The client rides through a broker that dies, restarts or freezes.

Against a real broker subprocess:

- kill -9 and restart mid-flow, while a publisher publishes with msg_ids
  (durable: the subject is bound to a queue AND a stream), a queue consumer,
  a stream group member and a plain subscriber are active: all of them resume
  on their own, no confirmed message is lost, none is stored twice;
- SIGSTOP (a frozen broker: TCP says nothing): heartbeats notice within the
  dead_after window; with ``reconnect=True`` a publish waits and completes
  after SIGCONT, with ``reconnect=False`` a pending request raises;
- giving up after ``max_reconnects``; the outage buffer for plain publishes.

Synchronisation is on events (``on_state_change``, deliveries, confirms),
bounded by ``anyio.fail_after``; the few sleeps below are part of a
scenario (how long a broker stays frozen), never a hope that something has
happened by then.

Test clients use a short request ``timeout`` and redial wait (FAST): they
bound every dial and request and keep the suite quick.

Bugs these tests found are kept as regression tests (see their
docstrings).
"""

from __future__ import annotations

import os
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Self

import anyio
import pytest

from tidings.client import connect
from tidings.client.errors import ConnectionClosedError, PublishBufferFullError, TidingsError, TimeoutError
from tidings.client.results import PublishAck

WAIT = 10.0  # seconds an expected event may take before the test fails (generous, for slow CI)
# timeout: long next to any request to a live broker, even a busy one; it only costs time where it
# fires (a dial to a frozen broker).
FAST: dict[str, Any] = {"timeout": 5.0, "reconnect_wait": (0.05, 0.25)}


class States:
    """An ``on_state_change`` callback that records every state and lets a
    test wait for one (an anyio.Event per state name)."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, str]] = []
        self._events: dict[str, anyio.Event] = {}

    def __call__(self, state: str) -> None:
        self.seen.append((time.monotonic(), state))
        self.event(state).set()

    def event(self, state: str) -> anyio.Event:
        ev = self._events.get(state)
        if ev is None:
            ev = self._events[state] = anyio.Event()
        return ev

    def names(self) -> list[str]:
        return [s for _, s in self.seen]

    def when(self, state: str) -> float:
        return next(t for t, s in reversed(self.seen) if s == state)

    async def wait(self, state: str, within: float = WAIT) -> float:
        """Wait until ``state`` was reported (at most ``within`` s); return when it was."""
        with anyio.fail_after(within):
            await self.event(state).wait()
        return self.when(state)

    def reset(self) -> None:
        self._events.clear()


# ------------------------------------------------------------ kill -9

QUEUE, STREAM, GROUP, PARTITIONS = "work", "log", "g", 3
BOUND = "orders.*"  # the queue and the stream store these (durable, confirmed publishes)
WATCHED = "orders.>"  # the plain subscriber sees those and the ticker's orders.tick.N (pub/sub only)


@dataclass
class Ledger:
    """What the publisher confirmed and what each consumer saw."""

    issued: list[str] = field(default_factory=list)  # msg_ids in publish order
    confirmed: dict[str, PublishAck] = field(default_factory=dict)
    queue: dict[str, set[int]] = field(default_factory=dict)  # msg_id -> broker message ids delivered
    queue_deliveries: int = 0
    stream: dict[str, set[tuple[int, int]]] = field(default_factory=dict)  # msg_id -> (partition, offset)
    stream_deliveries: int = 0
    sub_total: int = 0


class Workload:
    """One publisher client and one consumer client (queue consumer, stream
    group member and plain subscriber), all with the default reconnect=True.

    The publisher keeps ``window`` confirms in flight and never stops for a
    kill: publishes made while the broker is down wait, unconfirmed ones are
    resent with their msg_id after the reconnect."""

    def __init__(self, url: str, total: int, window: int = 20) -> None:
        self.url = url
        self.total = total
        self.window = window
        self.led = Ledger()
        self.pub_states = States()
        self.con_states = States()
        self.progress = anyio.Event()
        self.target = (0, 0, 0)  # (confirms, queue deliveries, stream deliveries) that set progress
        self.sub_resumed = anyio.Event()
        self.sub_base = 1 << 62  # sub.received when the connection was lost (no reader runs in an outage)
        self.all_queue = anyio.Event()
        self.all_stream = anyio.Event()
        self.published = anyio.Event()

    def _check(self) -> None:
        c, q, s = self.target
        led = self.led
        if len(led.confirmed) >= c and led.queue_deliveries >= q and led.stream_deliveries >= s:
            self.progress.set()
        if len(led.queue) >= self.total:
            self.all_queue.set()
        if len(led.stream) >= self.total:
            self.all_stream.set()

    def expect(self, confirms: int, queue: int, stream: int) -> anyio.Event:
        self.progress = anyio.Event()
        self.target = (confirms, queue, stream)
        self._check()
        return self.progress

    async def publisher(self, tc: Any) -> None:
        pending: deque[tuple[str, Any]] = deque()
        led = self.led

        async def settle_oldest() -> None:
            mid, confirmation = pending.popleft()
            led.confirmed[mid] = await confirmation
            self._check()

        for i in range(self.total):
            mid = f"m{i:06d}"
            led.issued.append(mid)
            pending.append((mid, tc.publish_nowait(f"orders.{i % 4}", mid, msg_id=mid, key=f"k{i % 7}")))
            if len(pending) >= self.window:
                await settle_oldest()
        while pending:
            await settle_oldest()
        self.published.set()

    async def queue_consumer(self, tc: Any) -> None:
        async with tc.consume(QUEUE, prefetch=50) as deliveries:
            async for d in deliveries:
                self.led.queue.setdefault(d.msg_id, set()).add(d.message_id)
                self.led.queue_deliveries += 1
                await d.ack()
                self._check()

    async def stream_member(self, tc: Any) -> None:
        async with tc.stream_consume(STREAM, GROUP, window=50) as msgs:
            async for m in msgs:
                self.led.stream.setdefault(m.payload.decode(), set()).add((m.partition, m.offset))
                self.led.stream_deliveries += 1
                await m.ack()
                self._check()

    async def ticker(self, tc: Any) -> None:
        """Plain publishes to the watched subjects, paced, until the subscriber got some."""
        n = 0
        while not self.sub_resumed.is_set():
            n += 1
            await tc.publish(f"orders.tick.{n}", b"tick")
            with anyio.move_on_after(0.02):
                await self.sub_resumed.wait()

    async def subscriber(self, sub: Any) -> None:
        async for _m in sub:
            self.led.sub_total += 1
            if sub.received >= self.sub_base + 5:  # received on the new connection
                self.sub_resumed.set()


async def run_kill_workload(broker: Any, *, kills: int, total: int) -> tuple[Ledger, dict[str, Any]]:
    """Run the workload, kill -9 + restart the broker ``kills`` times mid-flow,
    wait until both consumers saw every message, then read back what is stored."""
    w = Workload(broker.url, total)
    async with connect(broker.url, name="publisher", on_state_change=w.pub_states, **FAST) as pub, \
            connect(broker.url, name="consumer", on_state_change=w.con_states, **FAST) as con:
        await con.declare_queue(QUEUE, bind=[BOUND], ack_deadline=30.0)
        await con.declare_stream(STREAM, partitions=PARTITIONS, bind=[BOUND])
        sub = await con.subscribe(WATCHED)
        async with anyio.create_task_group() as tg:
            tg.start_soon(w.queue_consumer, con)
            tg.start_soon(w.stream_member, con)
            tg.start_soon(w.subscriber, sub)
            tg.start_soon(w.publisher, pub)
            for k in range(kills):
                # kill mid-flow: confirms, queue and stream deliveries all under way
                share = total * (k + 1) // (kills + 1)
                with anyio.fail_after(WAIT * 3):
                    await w.expect(share, share // 2, share // 2).wait()
                for st in (w.pub_states, w.con_states):
                    st.reset()
                w.sub_base = 1 << 62  # until the loss: messages received before it do not count
                w.sub_resumed = anyio.Event()
                await anyio.to_thread.run_sync(broker.kill)
                await w.pub_states.wait("disconnected")  # TCP says the broker is gone: noticed at once
                await w.con_states.wait("disconnected")
                w.sub_base = sub.received
                await anyio.to_thread.run_sync(broker.restart)
                # everyone resumes on their own: the subscriber receives again (pub/sub is at
                # most once, so plain ticks keep coming until it has: the durable publisher
                # may well be done before the subscriber is back)
                with anyio.fail_after(WAIT * 2):
                    await w.ticker(pub)
                await w.pub_states.wait("reconnected")
                await w.con_states.wait("reconnected")  # every consumer re-registered
            with anyio.fail_after(WAIT * 3):
                await w.published.wait()
                await w.all_queue.wait()
                await w.all_stream.wait()
                # redeliveries of messages acked just before a kill may still be on their way:
                # done when every ack is applied and the queue holds nothing
                while True:
                    await con.flush()
                    info = await con.queue_info(QUEUE)
                    if info["depth"] == 0 and info["in_flight"] == 0:
                        break
                    await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
        stored: dict[str, list[tuple[int, int]]] = {}
        for p in range(PARTITIONS):
            with anyio.fail_after(WAIT):
                async for m in con.read_stream(STREAM, p):
                    stored.setdefault(m.payload.decode(), []).append((m.partition, m.offset))
        extra = {"stored": stored, "queue_info": info, "pub_states": w.pub_states.names(),
                 "con_states": w.con_states.names()}
    return w.led, extra


def check_kill_ledger(led: Ledger, extra: dict[str, Any], total: int) -> dict[str, int]:
    """The bar: no confirmed message lost, none stored twice."""
    stored = extra["stored"]
    assert len(led.confirmed) == total  # with reconnect=True every publish ends confirmed
    lost_queue = [m for m in led.confirmed if m not in led.queue]
    lost_stream = [m for m in led.confirmed if m not in led.stream]
    lost_stored = [m for m in led.confirmed if m not in stored]
    twice_queue = {m: ids for m, ids in led.queue.items() if len(ids) != 1}
    twice_stream = {m: offs for m, offs in stored.items() if len(offs) != 1}
    twice_delivered_at = {m: offs for m, offs in led.stream.items() if len(offs) != 1}
    assert not lost_queue, f"confirmed but never delivered from the queue: {lost_queue[:10]}"
    assert not lost_stream, f"confirmed but never delivered to the group member: {lost_stream[:10]}"
    assert not lost_stored, f"confirmed but not in the stream: {lost_stored[:10]}"
    assert not twice_queue, f"stored twice in the queue (several message ids): {list(twice_queue.items())[:10]}"
    assert not twice_stream, f"stored twice in the stream: {list(twice_stream.items())[:10]}"
    assert not twice_delivered_at, f"delivered from several offsets: {list(twice_delivered_at.items())[:10]}"
    assert sum(len(v) for v in stored.values()) == total  # nothing else was stored either
    assert set(led.queue) == set(led.issued)
    # the confirm names where the message was stored, also when a resend was de-duplicated
    for mid, ack in led.confirmed.items():
        assert ack.id in led.queue[mid], (mid, ack)
        assert [(ack.partition, ack.offset)] == stored[mid], (mid, ack)
    return {"lost": len(lost_queue) + len(lost_stream), "stored_twice": len(twice_queue) + len(twice_stream)}


async def test_kill_9_mid_flow_everyone_resumes_nothing_lost_nothing_stored_twice(broker) -> None:
    total = 600
    led, extra = await run_kill_workload(broker, kills=1, total=total)
    counts = check_kill_ledger(led, extra, total)
    assert counts == {"lost": 0, "stored_twice": 0}
    assert extra["pub_states"] == extra["con_states"] == ["connected", "disconnected", "reconnected"]
    assert led.sub_total > 0


@pytest.mark.soak
async def test_kill_9_ten_times_soak(broker) -> None:
    total = 3000
    led, extra = await run_kill_workload(broker, kills=10, total=total)
    assert check_kill_ledger(led, extra, total) == {"lost": 0, "stored_twice": 0}
    cycles = ["connected"] + ["disconnected", "reconnected"] * 10
    assert extra["pub_states"] == extra["con_states"] == cycles


async def test_reconnect_is_reported_promptly(broker) -> None:
    """After kill -9 + restart: on_state_change gets "disconnected" then
    "reconnected", ``state`` is "connected" again and ``reconnects`` counts
    it, well before the request timeout (here 10 s, the default).

    Regression: the client restored the session before starting the task
    that reads the broker's answers, so every reconnect of a client with a
    subscription or consumer stalled for ``timeout`` seconds and ended in
    "disconnected" for good."""
    states = States()
    async with connect(broker.url, on_state_change=states, reconnect_wait=(0.05, 0.25)) as tc:
        sub = await tc.subscribe("ping")
        await anyio.to_thread.run_sync(broker.kill)
        await states.wait("disconnected")
        await anyio.to_thread.run_sync(broker.restart)
        restarted = time.monotonic()
        reconnected = await states.wait("reconnected", within=WAIT)
        # the bug stalled for the whole 10 s timeout; half of it leaves a busy machine room
        assert reconnected - restarted < 5.0, f"took {reconnected - restarted:.2f}s after the restart"
        assert tc.state == "connected" and tc.reconnects == 1
        assert states.names() == ["connected", "disconnected", "reconnected"]
        await tc.publish("ping", b"x")
        assert (await sub.next(timeout=WAIT)).payload == b"x"


# ------------------------------------------------------------ SIGSTOP

# dead_after is long next to a live broker's PONG, even on a busy machine: only the freeze is noticed.
HEARTBEAT, DEAD_AFTER = 0.5, 3.0
# silence for dead_after, noticed at the next heartbeat tick, and slack for a busy machine
# (still far below the 30 s request timeout the heartbeat must beat)
NOTICE_WITHIN = DEAD_AFTER + HEARTBEAT + WAIT


class Frozen:
    """SIGSTOP the broker for the block; SIGCONT on exit whatever happens."""

    def __init__(self, broker: Any) -> None:
        self.broker = broker
        self.frozen = False

    def __enter__(self) -> Self:
        os.kill(self.broker.pid, signal.SIGSTOP)
        self.frozen = True
        self.at = time.monotonic()
        return self

    def thaw(self) -> None:
        if self.frozen:
            os.kill(self.broker.pid, signal.SIGCONT)
            self.frozen = False

    def __exit__(self, *exc: object) -> None:
        self.thaw()


async def test_frozen_broker_is_noticed_and_publishes_wait_for_it(broker) -> None:
    """SIGSTOP: the broker's kernel keeps the TCP connection up, only the
    heartbeat can tell. Publish A is written into the frozen socket; B is
    made once the client knows it is disconnected. Both wait, and complete
    after SIGCONT."""
    states = States()
    async with connect(broker.url, heartbeat=HEARTBEAT, dead_after=DEAD_AFTER, on_state_change=states,
                       **FAST) as tc:
        await tc.declare_queue("frz", bind=["frz.>"])
        acks: dict[str, Any] = {}
        done = {"A": anyio.Event(), "B": anyio.Event()}

        async def publish(name: str) -> None:
            try:
                acks[name] = await tc.publish("frz.a", name, msg_id=f"frozen-{name}")
            except TidingsError as exc:  # pragma: no cover - the failure the test reports
                acks[name] = exc
            done[name].set()

        async with anyio.create_task_group() as tg:
            with Frozen(broker) as fz:
                tg.start_soon(publish, "A")  # into a socket nobody reads
                noticed = await states.wait("disconnected", within=NOTICE_WITHIN)
                # not before dead_after of silence (the last PONG came at most ~2 heartbeats before)
                assert DEAD_AFTER - 2 * HEARTBEAT <= noticed - fz.at <= NOTICE_WITHIN
                tg.start_soon(publish, "B")  # while disconnected
                # every request has a timeout: nothing hangs while the broker stays frozen
                t0 = time.monotonic()
                with pytest.raises(TimeoutError) as ei:
                    await tc.call("stats", timeout=0.5)
                assert ei.value.retriable and time.monotonic() - t0 < 0.5 + WAIT
                assert not done["A"].is_set() and not done["B"].is_set(), acks  # waiting: no error, no confirm
            # SIGCONT: the client reconnects and both publishes complete
            with anyio.fail_after(WAIT + tc.timeout):
                await done["A"].wait()
                await done["B"].wait()
            await states.wait("reconnected")
        assert all(isinstance(a, PublishAck) and a.queues == 1 for a in acks.values()), acks
        assert states.names() == ["connected", "disconnected", "reconnected"] and tc.state == "connected"
        copies: dict[str, list[int]] = {}
        stored = (await tc.queue_info("frz"))["depth"]
        async with tc.consume("frz", prefetch=stored) as deliveries:
            for _ in range(stored):
                d = await deliveries.next(timeout=WAIT)
                copies.setdefault(d.payload.decode(), []).append(d.message_id)
                await d.ack()
        assert copies["B"] == [acks["B"].id]  # stored once
        # The thawed broker may store A from the old connection while the resend arrives on the
        # new one; de-duplication should keep one (test_msg_id_dedup_holds_across_connections).
        assert acks["A"].id in copies["A"] and 1 <= len(copies["A"]) <= 2


async def test_frozen_broker_without_reconnect_fails_pending_requests(broker) -> None:
    states = States()
    async with connect(broker.url, heartbeat=HEARTBEAT, dead_after=DEAD_AFTER, reconnect=False,
                       timeout=30.0, on_state_change=states) as tc:
        await tc.declare_queue("frz", bind=["frz.>"])
        with Frozen(broker) as fz:
            with anyio.fail_after(NOTICE_WITHIN):  # not the 30 s request timeout: the heartbeat
                with pytest.raises(ConnectionClosedError) as ei:
                    await tc.call("stats")
            assert time.monotonic() - fz.at <= NOTICE_WITHIN
            assert ei.value.retriable and "no data from the broker" in str(ei.value)
            await states.wait("closed", within=WAIT)
            assert tc.state == "closed" and tc.is_closed
            assert states.names() == ["connected", "closed"]
            with pytest.raises(ConnectionClosedError):
                await tc.publish("frz.a", b"too late")


async def test_msg_id_dedup_holds_across_connections(broker) -> None:
    """What makes a resend invisible when the original is still on its way
    over the old connection (a frozen broker thawing, a half-dead link): the
    same msg_id arriving on two connections at once is stored once."""
    rounds, per_round = 10, 100
    async with connect(broker.url) as a, connect(broker.url) as b:
        await a.declare_queue("dd", bind=["dd.>"])
        await b.flush()  # b knows the binding: its publishes are durable too
        acks: list[tuple[Any, Any]] = []
        for r in range(rounds):
            pairs = []
            for i in range(per_round):
                mid = f"r{r}-{i}"
                pairs.append((a.publish_nowait("dd.x", mid, msg_id=mid), b.publish_nowait("dd.x", mid, msg_id=mid)))
            for ca, cb in pairs:
                acks.append((await ca, await cb))
        depth = (await a.queue_info("dd"))["depth"]
    twice = sum(1 for x, y in acks if not x.duplicate and not y.duplicate)
    assert twice == 0 and depth == rounds * per_round, f"{twice} msg_ids stored twice; depth {depth}"


@pytest.mark.parametrize("what", ["subscription", "queue consumer", "stream group member"])
async def test_leaving_a_consumer_during_an_outage_is_quiet(broker, what: str) -> None:
    """Its registration died with the connection: there is nothing to stop,
    so leaving the block must neither fail nor wait for the broker."""
    states = States()
    async with connect(broker.url, on_state_change=states, **FAST) as tc:
        await tc.declare_queue("lq", bind=["lq.>"])
        await tc.declare_stream("ls", bind=["ls.>"])

        killed = anyio.Event()

        async def restart_once_down() -> None:
            await killed.wait()
            await anyio.to_thread.run_sync(broker.restart)

        async with anyio.create_task_group() as tg:
            tg.start_soon(restart_once_down)
            if what == "subscription":
                block: Any = await tc.subscribe("lq.x")
            elif what == "queue consumer":
                block = tc.consume("lq")
            else:
                block = tc.stream_consume("ls", "g")
            async with block:
                await anyio.to_thread.run_sync(broker.kill)
                await states.wait("disconnected")
                killed.set()  # the restart begins while the block is being left
            # left during the outage
        await states.wait("reconnected")
        async with tc.consume("lq") as deliveries:  # the client is fine
            await tc.publish("lq.x", b"after")
            assert (await deliveries.next(timeout=WAIT)).payload == b"after"


# ------------------------------------------------------------ give up


async def test_gives_up_after_max_reconnects(broker) -> None:
    states = States()
    async with connect(broker.url, max_reconnects=2, on_state_change=states, **FAST) as tc:
        await tc.declare_queue("gu", bind=["gu.>"])
        await anyio.to_thread.run_sync(broker.kill)  # and never restarted
        await states.wait("disconnected")
        with anyio.fail_after(WAIT):
            with pytest.raises(ConnectionClosedError, match="gave up reconnecting"):
                await tc.publish("gu.a", b"nobody will store this")  # waits, then fails with the reason
        await states.wait("closed", within=WAIT)
        assert states.names() == ["connected", "disconnected", "closed"]
        assert tc.state == "closed" and tc.is_closed
        with pytest.raises(ConnectionClosedError, match="gave up"):
            await tc.wait_connected(timeout=1)
        with pytest.raises(ConnectionClosedError):
            tc.publish_nowait("gu.b", b"x")


# ------------------------------------------------------------ outage buffer


async def test_outage_buffer_bounds_plain_publishes(broker) -> None:
    """While disconnected, plain publishes are kept up to ``outage_buffer``
    bytes; beyond it publish_nowait raises PublishBufferFullError
    (retriable) and publish waits for the reconnect. What was kept is sent
    after it, in order."""
    states = States()
    budget = 4096
    async with connect(broker.url, outage_buffer=budget, on_state_change=states, **FAST) as tc:
        sub = await tc.subscribe("ob.>")
        await tc.declare_queue("obq", bind=["obq.>"])
        await anyio.to_thread.run_sync(broker.kill)
        await states.wait("disconnected")
        kept = 0
        with pytest.raises(PublishBufferFullError) as ei:
            for i in range(1000):
                tc.publish_nowait("ob.x", f"{i:0100d}")
                kept += 1
        assert ei.value.retriable and isinstance(ei.value, TidingsError)
        assert budget / 2 <= kept * 100 <= budget + 100  # bounded by bytes (payload plus a small overhead)
        # durable publishes made during the outage count against the same bytes
        with pytest.raises(PublishBufferFullError):
            tc.publish_nowait("obq.x", b"durable", msg_id="d-1")
        # publish waits instead of raising: still waiting after a while
        with anyio.move_on_after(0.3) as waited:
            await tc.publish("ob.x", b"late")
        assert waited.cancelled_caught
        await anyio.to_thread.run_sync(broker.restart)
        with anyio.fail_after(WAIT + tc.timeout):
            await tc.publish("ob.x", b"after")  # returns once the reconnect took the buffer over
        got = [(await sub.next(timeout=WAIT)).payload for _ in range(kept + 1)]
        assert got == [f"{i:0100d}".encode() for i in range(kept)] + [b"after"]


async def test_durable_publish_during_outage_is_stored_once_without_msg_id(broker) -> None:
    """Regression: a durable publish made while disconnected was sent twice
    after the reconnect (queued, and resent as unconfirmed); without a
    msg_id the broker stored it twice."""
    states = States()
    async with connect(broker.url, auto_msg_id=False, on_state_change=states, **FAST) as tc:
        await tc.declare_queue("once", bind=["once.>"])
        await anyio.to_thread.run_sync(broker.kill)
        await states.wait("disconnected")
        confirmation = tc.publish_nowait("once.a", b"published while disconnected")
        await anyio.to_thread.run_sync(broker.restart)
        with anyio.fail_after(WAIT + tc.timeout):
            ack = await confirmation
        assert ack.queues == 1 and not ack.duplicate
        await tc.flush()
        info = await tc.queue_info("once")
        assert info["depth"] == 1, f"stored {info['depth']} times"


async def test_durable_publish_during_outage_is_not_reported_duplicate(broker) -> None:
    """Regression (same cause): with the generated msg_id the second copy was
    de-duplicated, but its early "duplicate" confirm reached the publisher
    first."""
    states = States()
    async with connect(broker.url, on_state_change=states, auto_msg_id=True, **FAST) as tc:
        await tc.declare_queue("once", bind=["once.>"])
        await anyio.to_thread.run_sync(broker.kill)
        await states.wait("disconnected")
        confirmation = tc.publish_nowait("once.a", b"published while disconnected")
        await anyio.to_thread.run_sync(broker.restart)
        with anyio.fail_after(WAIT + tc.timeout):
            ack = await confirmation
        await tc.flush()
        assert (await tc.queue_info("once"))["depth"] == 1  # stored once: this part holds
        assert not ack.duplicate, "the first and only store of this message is reported as a duplicate"
