"""Crash safety of durable queues, against a real broker and a real SQLite file.

The chaos test SIGKILLs the broker again and again while a publisher
publishes with confirms (every message with a msg_id) and a consumer acks,
reconnecting after each restart and resending whatever was not confirmed.
At the end: every confirmed message was delivered at least once, nothing
was stored twice, and every duplicate delivery is explained by an ack that
was not yet known to be committed when the broker died.
"""

from __future__ import annotations

import random
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio
import pytest

from tidings.client import Client, connect
from tidings.client.errors import ConnectionClosedError, StorageFullError
from queuetools import WAIT, collect, declare, holds

QUEUE = "chaos"
SUBJECT = "chaos.work"
MARK_SUBJECT = "chaosmark.x"  # checkpoint publishes go to their own queue
IN_FLIGHT = 200  # unconfirmed publishes the publisher keeps outstanding
PREFETCH = 200
CHECKPOINT_EVERY = 100  # acks between consumer checkpoints
ROUND_TIMEOUT = 30.0
CRASH_JITTER = 0.05  # seconds: how far past its progress targets a round's kill may land
#: Kills per chaos run. The default suite runs 3, at three kinds of crash point (CHAOS_SEED's
#: kill targets, confirms and deliveries: (0, 0) at once, (1307, 1564) mid-stream, (296, 0)
#: on confirms alone); each restart recovers a store that an earlier crash left behind.
#: --soak runs the 10 the issue asks for at least (CHAOS_SEED's first 3 rounds and 7 more),
#: and test_kill_9_soak 50 on a fresh seed.
KILLS = 3
KILLS_WITH_SOAK = 10
CHAOS_SEED = 28
SOAK_KILLS = 50
#: The clients here see each crash (ConnectionClosedError) and the test reconnects
#: and resends itself, so what survives is the broker's doing, not the client's.
#: The liveness check is relaxed: a connection whose durable publish waits for a
#: commit answers no PING meanwhile, and on a loaded machine (fsync stalls) a
#: commit can take seconds; a false "broker dead" here would end a round early.
MANUAL: dict[str, Any] = {"reconnect": False, "heartbeat": 5.0, "dead_after": 30.0}


@dataclass
class Ledger:
    """What the test knows, across all rounds (one round per broker lifetime)."""

    published: dict[str, bytes] = field(default_factory=dict)  # msg_id -> payload, all ever published
    confirmed: set[str] = field(default_factory=set)
    unconfirmed: set[str] = field(default_factory=set)  # sent, outcome unknown: resent after the restart
    resends: int = 0
    duplicate_confirms: int = 0  # resends the broker recognised as already stored
    # (round, msg_id, broker message id, redelivered flag) of every delivery the consumer saw
    deliveries: list[tuple[int, str, int, bool]] = field(default_factory=list)
    certified: set[str] = field(default_factory=set)  # msg_ids whose ack is known to be committed
    exposed: list[set[str]] = field(default_factory=list)  # per kill: delivered that round, ack not certified
    next_seq: int = 0

    def new_message(self) -> str:
        self.next_seq += 1
        mid = f"m{self.next_seq:06d}"
        self.published[mid] = mid.encode() * 8
        self.unconfirmed.add(mid)
        return mid


class Progress:
    """Counts this round's confirms and deliveries; ``reached`` is set once both hit their targets."""

    def __init__(self, confirms: int, deliveries: int) -> None:
        self.want = (confirms, deliveries)
        self.confirms = 0
        self.deliveries = 0
        self.reached = anyio.Event()
        self.killing = False  # set just before the SIGKILL: from then on a lost connection is expected
        self.check()

    def connection_lost(self, who: str, exc: Exception) -> None:
        if not self.killing:
            raise AssertionError(f"the {who} lost its connection while the broker was running: {exc}") from exc

    def __repr__(self) -> str:
        return f"Progress(confirms={self.confirms}, deliveries={self.deliveries}, want={self.want})"

    def check(self) -> None:
        if self.confirms >= self.want[0] and self.deliveries >= self.want[1]:
            self.reached.set()


async def publisher(tc: Client, led: Ledger, progress: Progress, *, fresh: bool) -> None:
    """Resend what is unconfirmed (same msg_id), then publish new messages
    (``fresh``) with IN_FLIGHT confirms outstanding, until the connection dies;
    without ``fresh``, return once every resend is confirmed."""
    pending: deque[tuple[str, Any]] = deque()

    def send(mid: str) -> None:
        pending.append((mid, tc.publish_nowait(SUBJECT, led.published[mid], msg_id=mid)))

    try:
        for mid in sorted(led.unconfirmed):
            led.resends += 1
            send(mid)
        while pending or fresh:
            if fresh and len(pending) < IN_FLIGHT:
                send(led.new_message())
                continue
            mid, confirmation = pending.popleft()
            ack = await confirmation
            led.unconfirmed.discard(mid)
            led.confirmed.add(mid)
            led.duplicate_confirms += ack.duplicate
            progress.confirms += 1
            progress.check()
    except ConnectionClosedError as exc:
        progress.connection_lost("publisher", exc)


async def consumer(tc: Client, led: Ledger, progress: Progress, rnd: int, seen_this_round: set[str]) -> None:
    """Ack everything, and every CHECKPOINT_EVERY acks prove earlier acks committed.

    A checkpoint is a flush (the broker has applied the acks before it) and
    then a confirmed publish (the store committed a transaction after the
    queue handed it those deletes). The certificate lags one checkpoint, so
    a queue actor that was busy paging when the acks arrived has had a
    whole checkpoint interval to hand its deletes to the store."""
    since: list[str] = []
    before_last: list[str] = []
    try:
        async with tc.consume(QUEUE, prefetch=PREFETCH) as deliveries:
            while True:
                d = await deliveries.next()  # ends with ConnectionClosedError at the kill
                assert d.msg_id is not None
                led.deliveries.append((rnd, d.msg_id, d.message_id, d.redelivered))
                seen_this_round.add(d.msg_id)
                await d.ack()
                since.append(d.msg_id)
                progress.deliveries += 1
                progress.check()
                if len(since) >= CHECKPOINT_EVERY:
                    await tc.flush()
                    await tc.publish(MARK_SUBJECT, b"", confirm=True)
                    led.certified.update(before_last)
                    before_last, since = since, []
    except ConnectionClosedError as exc:
        progress.connection_lost("consumer", exc)


async def drain(tc: Client, led: Ledger, rnd: int) -> None:
    """Consume and ack until every published message was seen and the queue is empty."""
    everything = set(led.published)
    seen = {mid for _, mid, _, _ in led.deliveries}
    async with tc.consume(QUEUE, prefetch=PREFETCH) as deliveries:
        while True:
            if seen >= everything:
                await tc.flush()  # every ack so far is applied: depth counts only what is left
                if (await tc.queue_info(QUEUE))["depth"] == 0:
                    return
            d = await deliveries.next(timeout=WAIT)
            led.deliveries.append((rnd, d.msg_id, d.message_id, d.redelivered))
            seen.add(d.msg_id)
            await d.ack()


async def queue_state(url: str) -> dict[str, Any]:
    """The chaos queue's counters, for a failure message."""
    with anyio.move_on_after(5):
        async with connect(url, **MANUAL) as tc:
            return await tc.queue_info(QUEUE)  # type: ignore[no-any-return]
    return {}


async def broker_stats(url: str) -> Any:
    async with connect(url, reconnect=False) as tc:
        return await tc.call("stats")


LOG_TAIL = 60  # broker log lines shown when a round is stuck
MAX_ROUND_WAITS = 10  # ROUND_TIMEOUTs a round may take while the broker keeps making progress
STUCK_SECOND_LOOK = 6.0  # seconds between the two stats samples of a stuck round (a diagnosis, not a wait)


def stuck_report(broker: Any, stats: Any) -> str:
    """What tells where a stuck round waits: the store's counters (pending_* is the
    mailbox; inflight_*, transaction_seconds and transaction_phase the batch being
    committed: a phase other than "idle" for longer than store_stall_timeout is a
    transaction that does not return, and the watchdog's ERROR with the stacks is in
    the log; pending ops with phase "idle" would be an actor that was not woken), the
    warnings and errors of this broker lifetime, and the log's tail."""
    lines = broker.stderr().splitlines()
    starts = [i for i, line in enumerate(lines) if " open (durability=" in line]  # each start opens the store
    lifetime = lines[starts[-1]:] if starts else lines
    loud = [line for line in lifetime
            if " WARNING " in line or " ERROR " in line or line.startswith((" ", "\t"))]
    store = stats.get("store") if isinstance(stats, dict) else stats
    return (f"store: {store}; limits: {stats.get('limits') if isinstance(stats, dict) else None}\n"
            "--- warnings/errors of this broker lifetime ---\n" + "\n".join(loud[-200:]) +
            f"\n--- broker log tail ({LOG_TAIL} lines) ---\n" + "\n".join(lines[-LOG_TAIL:]))


async def wait_for_round(broker: Any, progress: Progress, rnd: int, led: Ledger) -> None:
    """Wait until the round reaches its targets, for as long as the broker makes progress.

    A round is stuck only when a whole ROUND_TIMEOUT passes with no commit and no
    confirm or delivery: on a machine whose disk is slow (seen here: every 200-row
    transaction taking 3-9 s for minutes while other jobs loaded the disk), a round
    legitimately takes longer, and failing it on a fixed real-time deadline was the
    "stuck round" of the issue. Bounded: at most MAX_ROUND_WAITS intervals."""
    last: tuple[Any, ...] | None = None
    for _ in range(MAX_ROUND_WAITS):
        with anyio.move_on_after(ROUND_TIMEOUT):
            await progress.reached.wait()
        if progress.reached.is_set():
            return
        first = await broker_stats(broker.url)
        mark = (first["store"]["commits"], progress.confirms, progress.deliveries)
        if mark == last:
            break  # no commit, no confirm, no delivery for a whole ROUND_TIMEOUT: stuck
        last = mark  # slow (or the first look): wait another interval
    # A second look once the store's watchdog has had time to report (its default
    # store_stall_timeout is 5 s): slow storage commits meanwhile, stuck storage does not.
    await anyio.sleep(STUCK_SECOND_LOOK)
    stats = await broker_stats(broker.url)
    pytest.fail(f"round {rnd}: stuck at {progress!r} (ledger: {len(led.confirmed)} confirmed, "
                f"{len(led.unconfirmed)} unconfirmed, {len(led.deliveries)} delivered); "
                f"broker: {await queue_state(broker.url)}; stats: {first}\n"
                f"{STUCK_SECOND_LOOK:.0f} s later: {stuck_report(broker, stats)}")


async def run_chaos(broker: Any, kills: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    led = Ledger()
    async with connect(broker.url) as tc:
        await declare(tc, QUEUE, SUBJECT, ack_deadline=600.0, max_deliveries=0)  # redelivery only by crash
        await declare(tc, "chaosmark", MARK_SUBJECT)
    for rnd in range(kills):
        # kill at a random point: sometimes at once after reconnecting, sometimes mid-stream
        progress = Progress(rng.choice([0, rng.randint(1, 2000)]), rng.choice([0, rng.randint(1, 2000)]))
        seen_this_round: set[str] = set()
        async with connect(broker.url, **MANUAL) as pub, connect(broker.url, **MANUAL) as sub:
            async with anyio.create_task_group() as tg:
                tg.start_soon(consumer, sub, led, progress, rnd, seen_this_round)
                tg.start_soon(partial(publisher, pub, led, progress, fresh=True))
                await wait_for_round(broker, progress, rnd, led)
                # Confirms and deliveries arrive in batches, so the targets alone would always
                # kill at a batch boundary; a random extra moment spreads the crash points over
                # commits, confirms and acks. (It waits for nothing: any moment is a valid crash.)
                await anyio.sleep(rng.random() * CRASH_JITTER)
                progress.killing = True
                # SIGKILL; both tasks end on ConnectionClosedError
                await anyio.to_thread.run_sync(broker.kill)
        led.exposed.append(seen_this_round - led.certified)
        await anyio.to_thread.run_sync(broker.restart)

    async with connect(broker.url, **MANUAL) as pub, connect(broker.url, **MANUAL) as sub:
        with anyio.fail_after(ROUND_TIMEOUT):
            await publisher(pub, led, Progress(0, 0), fresh=False)
            assert not led.unconfirmed
            await drain(sub, led, kills)
    return check(led)


def check(led: Ledger) -> dict[str, int]:
    """The guarantees, checked over the whole run; returns the counts."""
    assert led.confirmed == set(led.published), "every publish is confirmed in the end (after resends)"
    stored_as: defaultdict[str, set[int]] = defaultdict(set)
    for _, mid, message_id, _ in led.deliveries:
        stored_as[mid].add(message_id)
    assert set(stored_as) == led.confirmed, "every confirmed message was delivered, and nothing else"
    twice = {mid: ids for mid, ids in stored_as.items() if len(ids) > 1}
    assert not twice, f"stored more than once despite its msg_id: {sorted(twice.items())[:5]}"

    per_round = Counter((rnd, mid) for rnd, mid, _, _ in led.deliveries)
    assert max(per_round.values()) == 1, "within one broker lifetime nothing is redelivered (600 s deadline)"
    duplicates = 0
    first_round: dict[str, int] = {}
    unexplained = []
    for rnd, mid, _, _ in led.deliveries:
        if mid not in first_round:
            first_round[mid] = rnd
            continue
        duplicates += 1
        if not any(mid in led.exposed[r] for r in range(rnd)):
            unexplained.append((rnd, mid))
    assert not unexplained, f"redelivered although its ack was known committed: {unexplained[:5]}"
    exposed = sum(len(e) for e in led.exposed)
    assert duplicates <= exposed
    return {"kills": len(led.exposed), "messages": len(led.published), "deliveries": len(led.deliveries),
            "duplicates": duplicates, "exposed_at_kills": exposed, "resends": led.resends,
            "resends_already_stored": led.duplicate_confirms,
            "deliveries_flagged_redelivered": sum(1 for _, _, _, r in led.deliveries if r)}


def chaos_kills(config: pytest.Config) -> int:
    """How many times a chaos run kills the broker: KILLS, or KILLS_WITH_SOAK with --soak."""
    return KILLS_WITH_SOAK if config.getoption("--soak") else KILLS


# Its time is the host's fsync speed times the rounds: 17 s for 10 rounds on a quiet disk,
# 150 s on a slow one (seen on this machine in one afternoon). A stuck round is caught by
# run_chaos itself (a whole round without progress), so the overall bound only has to be generous.
@pytest.mark.timeout(600)
async def test_kill_9_again_and_again(broker, pytestconfig: pytest.Config) -> None:
    kills = chaos_kills(pytestconfig)
    t0 = time.monotonic()
    counts = await run_chaos(broker, kills, seed=CHAOS_SEED)
    print(f"chaos: {counts} in {time.monotonic() - t0:.1f}s")
    assert counts["kills"] == kills


@pytest.mark.soak
@pytest.mark.timeout(900)
async def test_kill_9_soak(broker) -> None:
    seed = int(time.time())
    print(f"chaos soak seed {seed}")  # shown with a failure: run_chaos(broker, SOAK_KILLS, seed) repeats it
    counts = await run_chaos(broker, SOAK_KILLS, seed)
    print(f"chaos soak: {counts}")


# ------------------------------------------------------------ recovery


async def test_unacked_and_delayed_messages_survive_kill_9(broker) -> None:
    async with connect(broker.url, **MANUAL) as tc:
        await declare(tc, "rec")
        await tc.publish("rec.a", b"in flight", msg_id="a")
        await tc.publish("rec.a", b"delayed", msg_id="b", delay=0.5)
        await tc.publish("rec.a", b"waiting", msg_id="c")
        async with tc.consume("rec", prefetch=1) as deliveries:
            assert (await deliveries.next(timeout=WAIT)).payload == b"in flight"
            await anyio.to_thread.run_sync(broker.kill)
    await anyio.to_thread.run_sync(broker.restart)
    async with connect(broker.url) as tc:
        assert (await tc.queue_info("rec"))["depth"] == 3
        async with tc.consume("rec") as deliveries:
            got = await collect(deliveries, 3)
            # Whether the delay ran out before recovery depends on how fast the restart was, and so
            # does where "delayed" lands: check the others' order and the delayed one's time.
            assert sorted(d.payload for d in got) == [b"delayed", b"in flight", b"waiting"]
            assert [d.payload for d in got if d.payload != b"delayed"] == [b"in flight", b"waiting"]
            delayed = next(d for d in got if d.payload == b"delayed")
            assert time.time() >= delayed.published_ms / 1000 + 0.5 - 0.005
            for d in got:
                await d.ack()


async def test_delivery_count_survives_kill_9(broker) -> None:
    async with connect(broker.url, **MANUAL) as tc:
        await declare(tc, "cnt")
        await tc.publish("cnt.a", b"x")
        async with tc.consume("cnt") as deliveries:
            assert (await deliveries.next(timeout=WAIT)).delivery_count == 1
            # Delivery counts are written with the next group commit after the
            # delivery: a confirmed publish submitted afterwards proves that
            # commit happened (the store commits in submission order).
            await tc.publish("cnt.b", b"sync")
            await anyio.to_thread.run_sync(broker.kill)
    await anyio.to_thread.run_sync(broker.restart)
    async with connect(broker.url) as tc, tc.consume("cnt") as deliveries:
        d = await deliveries.next(timeout=WAIT)
        assert (d.delivery_count, d.redelivered) == (2, True)


async def test_delivered_unacked_messages_count_their_deliveries_after_kill_9(broker) -> None:
    """First deliveries are counted by the queue's delivery mark (no row each),
    redeliveries by their own row: after a kill -9 every message delivered and not
    acked comes back counting every delivery it had, and max_deliveries still
    dead-letters at the right one."""
    async with connect(broker.url, **MANUAL) as tc:
        await declare(tc, "mk", max_deliveries=2, backoff_initial=0.0, backoff_jitter=0.0)
        await declare(tc, "mk-sync")
        for i in range(10):
            await tc.publish("mk.a", b"m%d" % i)
        async with tc.consume("mk", prefetch=4) as deliveries:
            got = await collect(deliveries, 4)
            assert [(d.payload, d.delivery_count) for d in got] == [(b"m%d" % i, 1) for i in range(4)]
            await got[0].nack(0.0)  # m0 again at once: its second delivery
            again = await deliveries.next(timeout=WAIT)
            assert (again.payload, again.delivery_count) == (b"m0", 2)
            # The mark and the counts are submitted before the deliveries go out; the
            # store commits in submission order, so a confirmed publish proves them.
            await tc.publish("mk-sync.a", b"sync")
            await anyio.to_thread.run_sync(broker.kill)
    await anyio.to_thread.run_sync(broker.restart)
    async with connect(broker.url) as tc:
        async with tc.consume("mk", prefetch=10) as deliveries:
            got = await collect(deliveries, 10)
            counts = {d.payload: d.delivery_count for d in got}
            assert counts == {b"m0": 3, b"m1": 2, b"m2": 2, b"m3": 2,
                              **{b"m%d" % i: 1 for i in range(4, 10)}}
            assert all(d.redelivered for d in got if counts[d.payload] > 1)
            for d in got:
                await d.nack(0.0, wait=True)  # a second failure for m0-m3: into the DLQ
            back = await collect(deliveries, 6)
            assert sorted((d.payload, d.delivery_count) for d in back) == [(b"m%d" % i, 2) for i in range(4, 10)]
            for d in back:
                await d.ack(wait=True)
        dead = await holds(tc, "mk.dlq", 4)
        assert sorted(d.payload for d in dead) == [b"m0", b"m1", b"m2", b"m3"]
        assert (await tc.queue_info("mk"))["depth"] == 0


# ------------------------------------------------------------ full disk

DB_PAGES = 200  # 800 KiB of 4 KiB pages: a fresh database uses about ten


async def test_full_disk(start_broker) -> None:
    """The publisher gets StorageFullError; everything confirmed before is
    still delivered; consumers keep being served and their acks free room."""
    b = start_broker(env={"TIDINGS_MAX_DB_PAGES": str(DB_PAGES)})
    payload = b"p" * 1000
    async with connect(b.url) as tc:
        await declare(tc, "full")
        confirmed = []
        with anyio.fail_after(30):
            while True:
                try:
                    await tc.publish("full.a", payload, msg_id=f"f{len(confirmed)}")
                except StorageFullError as exc:
                    assert exc.retriable and "full" in str(exc)
                    break
                confirmed.append(f"f{len(confirmed)}")
        assert confirmed
        with pytest.raises(StorageFullError):  # still full, and still answering
            await tc.publish("full.a", payload, msg_id="refused")
        async with tc.consume("full", prefetch=len(confirmed) + 1) as deliveries:
            got = await collect(deliveries, len(confirmed))
            assert [d.msg_id for d in got] == confirmed
            for d in got:
                await d.ack(wait=True)
        # acks freed the pages: publishing works again, and the refused msg_id was not remembered
        ack = await tc.publish("full.a", payload, msg_id="refused")
        assert not ack.duplicate
