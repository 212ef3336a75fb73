"""QueueActor on its own: a DurableContext over a real store, a recording
fake of the consumer's connection, no socket and no broker.

Covers delivery order, the prefetch window, ack/nack/redelivery,
dead-lettering at max_deliveries and on reject, a failed store write that
gives the messages back, and what purge, delete and redrive ask of the actor.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from actorkit import RecordingPeer, World, persisted, until

from tidings.protocol import frames as F
from tidings.protocol.errors import ErrorCode

from tidings.protocol.vocabulary import H_DLQ_SOURCE as DLQ_SOURCE, RESERVED_HEADER_PREFIX as HDR_PREFIX
from tidings.broker.durable import priority as priority_module
from tidings.broker.durable import queue as queue_module
from tidings.broker.durable.priority import PriorityQueueActor
from tidings.broker.durable.queue import Consumer, QueueActor
from tidings.broker.durable.settings import QueueConfig
from tidings.broker.durable.store.base import PutMessages, PutQueue, StoredMessage, UpdateMessages

ACK, NACK, REJECT = F.AckAction.ACK, F.AckAction.NACK, F.AckAction.REJECT


def consume(q: QueueActor, peer: RecordingPeer, cid: int = 1, prefetch: int = 100) -> Consumer:
    c = Consumer(peer, cid, q, prefetch)  # type: ignore[arg-type]
    peer.consumers[cid] = c
    q.attach(c)
    return c


async def settle(c: Consumer, items: list[list[Any]]) -> tuple[list[int], Exception | None]:
    """Settle as Durable.settle does: the answer waits for the commit of what
    the settle changed. Returns (codes, store error)."""
    codes = c.settle(items)
    return codes, await persisted(c.queue)


def payloads(items: list[list[Any]]) -> list[bytes]:
    return [it[2] for it in items]


async def test_delivers_in_publish_order_within_the_prefetch_window(store: Any) -> None:
    async with store() as s, anyio.create_task_group() as tg:
        w = World(s, tg)
        q = await w.queue(name="jobs")
        await w.publish(q, *[b"m%d" % i for i in range(5)])
        peer = RecordingPeer()
        c = consume(q, peer, prefetch=2)
        got = await peer.deliveries_at_least(2)
        assert payloads(got) == [b"m0", b"m1"]
        assert len(q.inflight) == 2 and len(c.inflight) == 2
        # one ack frees one slot of the window: exactly one more delivery
        assert await settle(c, [[got[0][0], ACK, None]]) == ([0], None)
        assert await s.count("jobs") == 4 and q.count == 4
        got = await peer.deliveries_at_least(3)
        assert payloads(got) == [b"m0", b"m1", b"m2"]
        q.stop()
        tg.cancel_scope.cancel()


async def test_nack_redelivers_with_the_delivery_counted(store: Any) -> None:
    async with store() as s, anyio.create_task_group() as tg:
        w = World(s, tg)
        q = await w.queue(name="jobs")
        await w.publish(q, b"a", b"b")
        peer = RecordingPeer()
        c = consume(q, peer, prefetch=1)
        first = (await peer.deliveries_at_least(1))[0]
        assert first[2] == b"a" and first[4] == 1
        assert c.settle([[first[0], NACK, 0]]) == [0]  # retry at once
        again = (await peer.deliveries_at_least(2))[1]
        assert again[2] == b"a" and again[4] == 2 and again[0] != first[0]
        assert q.nacked == 1 and q.redelivered == 1
        # the old delivery id is settled: acking it again is stale
        assert c.settle([[first[0], ACK, None]]) == [int(ErrorCode.STALE_DELIVERY)]
        q.stop()
        tg.cancel_scope.cancel()


async def test_detach_returns_unacked_messages_to_the_front(store: Any) -> None:
    async with store() as s, anyio.create_task_group() as tg:
        w = World(s, tg)
        q = await w.queue(name="jobs")
        await w.publish(q, b"a", b"b", b"c")
        one = RecordingPeer(1)
        c1 = consume(q, one, prefetch=2)
        await one.deliveries_at_least(2)
        c1.close()
        two = RecordingPeer(2)
        consume(q, two, cid=7, prefetch=10)
        got = await two.deliveries_at_least(3)
        assert payloads(got) == [b"a", b"b", b"c"]
        assert [it[4] for it in got] == [2, 2, 1]
        q.stop()
        tg.cancel_scope.cancel()


async def test_max_deliveries_moves_the_message_to_the_dead_letter_queue(store: Any) -> None:
    async with store() as s, anyio.create_task_group() as tg:
        w = World(s, tg)
        q = await w.queue(name="jobs", max_deliveries=2)
        rows = await w.publish(q, b"poison")
        peer = RecordingPeer()
        c = consume(q, peer, prefetch=1)
        for n in (1, 2):
            d = (await peer.deliveries_at_least(n))[-1]
            assert d[4] == n
            assert await settle(c, [[d[0], NACK, 0]]) == ([0], None)
        dlq = w.queues["jobs.dlq"]
        assert dlq.count == 1 and q.count == 0 and q.dead_lettered == 1
        assert await s.count("jobs") == 0
        [moved] = await s.list_messages("jobs.dlq")
        assert moved.payload == b"poison" and moved.id != rows[0].id
        h = moved.headers or {}
        assert h[DLQ_SOURCE] == "jobs" and h[HDR_PREFIX + "dlq-reason"] == "max_deliveries"
        assert h[HDR_PREFIX + "delivery-count"] == 2 and h[HDR_PREFIX + "original-id"] == rows[0].id
        assert len(peer.deliveries()) == 2  # not delivered a third time
        q.stop()
        dlq.stop()
        tg.cancel_scope.cancel()


async def test_reject_dead_letters_at_once_with_the_reason(store: Any) -> None:
    async with store() as s, anyio.create_task_group() as tg:
        w = World(s, tg)
        q = await w.queue(name="jobs")
        await w.publish(q, b"bad")
        peer = RecordingPeer()
        c = consume(q, peer)
        d = (await peer.deliveries_at_least(1))[0]
        assert await settle(c, [[d[0], REJECT, "cannot parse"]]) == ([0], None)
        [moved] = await s.list_messages("jobs.dlq")
        h = moved.headers or {}
        assert h[HDR_PREFIX + "dlq-reason"] == "rejected" and h[HDR_PREFIX + "last-error"] == "cannot parse"
        assert w.queues["jobs.dlq"].count == 1 and q.rejected == 1
        q.stop()
        tg.cancel_scope.cancel()


async def test_a_failed_dead_letter_move_gives_the_message_back(store: Any) -> None:
    """The store refuses the move (its new row collides with a stored one): the
    message is still stored in the source queue, so the actor counts it again
    and delivers it again after a pause; the next attempt succeeds."""
    async with store() as s, anyio.create_task_group() as tg:
        w = World(s, tg)
        q = await w.queue(name="jobs", max_deliveries=1)
        await w.publish(q, b"poison")
        # A row already in the DLQ under the id the move will be given next.
        taken = StoredMessage("jobs.dlq", w.ctx.last_id + 1, "x", b"x", None, None, 0, 0, None, 0, None)
        await s.write(PutMessages([taken]))
        peer = RecordingPeer()
        c = consume(q, peer, prefetch=1)
        d = (await peer.deliveries_at_least(1))[0]
        codes, err = await settle(c, [[d[0], NACK, 0]])
        assert codes == [0] and err is not None  # the move failed...
        assert q.store_failures == 1 and w.ctx.counters.state_failures == 1
        assert q.count == 1 and q.dead_lettered == 0  # ...and the message is back
        assert await s.count("jobs") == 1
        again = (await peer.deliveries_at_least(2))[1]
        assert again[2] == b"poison" and again[6]["id"] == d[6]["id"]
        assert await settle(c, [[again[0], NACK, 0]]) == ([0], None)  # now the move gets a fresh id
        assert await s.count("jobs") == 0 and await s.count("jobs.dlq") == 2
        q.stop()
        tg.cancel_scope.cancel()


async def test_purge_drops_everything_and_makes_held_deliveries_stale(store: Any) -> None:
    async with store() as s, anyio.create_task_group() as tg:
        w = World(s, tg)
        q = await w.queue(name="jobs")
        await w.publish(q, b"a", b"b", b"c")
        peer = RecordingPeer()
        c = consume(q, peer, prefetch=1)
        d = (await peer.deliveries_at_least(1))[0]
        assert await q.purge() == 3
        assert q.count == 0 and not q.inflight and await s.count("jobs") == 0
        assert c.settle([[d[0], ACK, None]]) == [int(ErrorCode.STALE_DELIVERY)]
        await w.publish(q, b"d")
        got = await peer.deliveries_at_least(2)
        assert got[-1][2] == b"d"
        q.stop()
        tg.cancel_scope.cancel()


async def test_close_tells_every_consumer_and_stops(store: Any) -> None:
    async with store() as s, anyio.create_task_group() as tg:
        w = World(s, tg)
        q = await w.queue(name="jobs")
        peer = RecordingPeer()
        consume(q, peer, cid=3)
        q.close("queue deleted")
        assert peer.notices("consumer_closed") == [{"cid": 3, "reason": "queue deleted"}]
        assert peer.consumers == {} and q.consumers == []
        tg.cancel_scope.cancel()


async def test_move_out_takes_messages_to_another_queue(store: Any) -> None:
    """What a redrive asks of the DLQ's actor: take ready messages, move them
    out (count and store in one step), the target gets them on commit."""
    async with store() as s, anyio.create_task_group() as tg:
        w = World(s, tg)
        src = await w.queue(name="dead", is_dlq=True)
        dst = await w.queue(name="work")
        await w.publish(src, b"a", b"b")
        taken = await src.take(10)
        assert [m.payload for m in taken] == [b"a", b"b"]
        now = w.ctx.now_ms()
        moves = [(m.id, StoredMessage("work", w.ctx.next_id(), m.subject, m.payload, None, None, m.published_ms,
                                      now, None, 0, None)) for m in taken]
        await s.write(src.move_out("work", moves, taken, dst.on_committed))
        assert src.count == 0 and dst.count == 2
        assert await s.count("dead") == 0 and await s.count("work") == 2
        peer = RecordingPeer()
        consume(dst, peer)
        assert payloads(await peer.deliveries_at_least(2)) == [b"a", b"b"]
        src.stop()
        dst.stop()
        tg.cancel_scope.cancel()


# ------------------------------------------------------------ priority queues


async def _priority_queue(w: World, name: str = "prio", count: int = 0, lanes: list[int] | None = None,
                          **settings: Any) -> PriorityQueueActor:
    cfg = QueueConfig.from_args({"name": name, "max_priority": 9, **settings})
    if lanes is None:
        await w.dead_letters.ensure(cfg.dead_letter or "")
        await w.store.write(PutQueue(cfg.name, cfg.to_dict(), w.ctx.now_ms()))
    q = PriorityQueueActor(w.ctx, cfg, count, lanes)
    w.queues[cfg.name] = q
    await w.tg.start(q.run)
    return q


async def _publish_prio(w: World, q: QueueActor, items: list[tuple[bytes, int]], delay_ms: int = 0) -> None:
    now = w.ctx.now_ms()
    rows = [StoredMessage(q.name, w.ctx.next_id(), "s", p, None, None, now, now + delay_ms, None, 0, None,
                          q.cfg.priority_of(prio)) for p, prio in items]

    def done(error: Exception | None) -> None:
        if error is None:
            q.on_committed(rows)

    await w.store.write(PutMessages(rows, [], done))


async def _drain(peer: RecordingPeer, c: Consumer, n: int, skip: int = 0) -> list[bytes]:
    """Take ``n`` deliveries (after the first ``skip``) one at a time (prefetch 1),
    acking each: the order the queue chose."""
    out: list[bytes] = []
    while len(out) < n:
        got = await peer.deliveries_at_least(skip + len(out) + 1)
        d = got[skip + len(out)]
        out.append(d[2])
        assert await settle(c, [[d[0], ACK, None]]) == ([0], None)
    return out


async def test_priority_queue_delivers_higher_priorities_first_then_fifo(store: Any) -> None:
    async with store() as s, anyio.create_task_group() as tg:
        w = World(s, tg)
        q = await _priority_queue(w)
        await _publish_prio(w, q, [(b"a0", 0), (b"b5", 5), (b"c9", 9), (b"d5", 5), (b"e0", 0), (b"f", 42)])
        await _publish_prio(w, q, [(b"late9", 9)], delay_ms=3_600_000)  # not due: not eligible
        peer = RecordingPeer()
        c = consume(q, peer, prefetch=1)
        # 42 is clamped to max_priority 9; FIFO (by id) among equal priorities
        assert await _drain(peer, c, 6) == [b"c9", b"f", b"b5", b"d5", b"a0", b"e0"]
        assert q.count == 1 and q.beyond == 1 and not q.inflight
        q.stop()
        tg.cancel_scope.cancel()


async def test_priority_backlog_on_disk_beyond_the_window(store: Any, monkeypatch: Any) -> None:
    """With the window far smaller than the backlog, a high priority published
    behind a long low-priority backlog (most of it on disk) goes out next."""
    monkeypatch.setattr(queue_module, "WINDOW", 8)
    monkeypatch.setattr(priority_module, "WINDOW", 8)
    async with store() as s, anyio.create_task_group() as tg:
        w = World(s, tg)
        q = await _priority_queue(w)
        peer = RecordingPeer()
        c = consume(q, peer, prefetch=1)
        await _publish_prio(w, q, [(b"low%02d" % i, 1) for i in range(40)])
        first = (await peer.deliveries_at_least(1))[0]
        assert q.beyond > 0  # most of the backlog is on disk only
        await _publish_prio(w, q, [(b"hi%d" % i, 7) for i in range(12)] + [(b"top", 9)])
        assert await settle(c, [[first[0], ACK, None]]) == ([0], None)
        got = await _drain(peer, c, 52, skip=1)
        assert [first[2]] + got == [b"low00", b"top"] + [b"hi%d" % i for i in range(12)] + [b"low%02d" % i for i in range(1, 40)]
        q.stop()
        tg.cancel_scope.cancel()


async def test_priority_order_survives_a_restart_and_nacks_keep_their_lane(store: Any) -> None:
    async with store() as s, anyio.create_task_group() as tg:
        w = World(s, tg)
        q = await _priority_queue(w, backoff_initial=0.0, backoff_jitter=0.0)
        await _publish_prio(w, q, [(b"x0", 0), (b"y3", 3), (b"z3", 3), (b"w9", 9)])
        peer = RecordingPeer()
        c = consume(q, peer, prefetch=1)
        d = (await peer.deliveries_at_least(1))[0]
        assert d[2] == b"w9"
        assert await settle(c, [[d[0], NACK, 0]]) == ([0], None)  # back to the front of its lane
        d = (await peer.deliveries_at_least(2))[1]
        assert d[2] == b"w9" and d[4] == 2
        c.close()
        q.stop()
        # what a restart finds: the counts per priority, everything on disk
        lanes = [await s.count("prio", p) for p in range(10)]
        assert sum(lanes) == 4 and lanes[3] == 2
        q2 = await _priority_queue(w, "prio", 4, lanes, backoff_initial=0.0, backoff_jitter=0.0)
        peer2 = RecordingPeer(2)
        c2 = consume(q2, peer2, prefetch=1)
        assert await _drain(peer2, c2, 4) == [b"w9", b"y3", b"z3", b"x0"]
        q2.stop()
        tg.cancel_scope.cancel()


# ------------------------------------------------- delivery counts across a restart


def _reopenable(kind: str, tmp_path: Any) -> Any:
    """A factory of stores over one data set (a file, or a MemoryData): each call is
    the same database after a restart."""
    from tidings.broker.durable.store.memory import MemoryData, MemoryStore
    from tidings.broker.durable.store.sqlite import SqliteStore

    data = MemoryData()
    return lambda: SqliteStore(tmp_path / "tidings.db") if kind == "sqlite" else MemoryStore(data)


async def _on_disk(s: Any, queue: str) -> dict[bytes, int]:
    """Each message's stored count, once every write submitted so far has committed
    (the store commits in submission order: an empty write is a barrier)."""
    await s.write(UpdateMessages(queue, []))
    return {m.payload: m.deliveries for m in await s.load_messages(queue)}


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
async def test_first_deliveries_write_a_mark_not_a_row_and_count_after_a_restart(kind: str, tmp_path: Any) -> None:
    """A first delivery writes no row (only the queue's delivery mark), a redelivery
    does; after a restart every message delivered before it counts its deliveries
    (never fewer), and max_deliveries dead-letters at the right delivery."""
    new_store = _reopenable(kind, tmp_path)
    s = new_store()
    await s.open()
    async with anyio.create_task_group() as tg:
        await tg.start(s.run)
        w = World(s, tg)
        q = await w.queue(name="jobs", max_deliveries=2, backoff_initial=0.0, backoff_jitter=0.0)
        await w.publish(q, b"a", b"b", b"c", b"d", b"e")
        peer = RecordingPeer()
        c = consume(q, peer, prefetch=3)
        got = await peer.deliveries_at_least(3)
        assert [(it[2], it[4]) for it in got] == [(b"a", 1), (b"b", 1), (b"c", 1)]
        assert c.settle([[got[1][0], NACK, 0]]) == [0]  # b again at once
        again = (await peer.deliveries_at_least(4))[3]
        assert (again[2], again[4]) == (b"b", 2)
        # first deliveries left their rows alone; b's redelivery wrote its own
        assert await _on_disk(s, "jobs") == {b"a": 0, b"b": 2, b"c": 0, b"d": 0, b"e": 0}
        await until(lambda: not q._marks)  # submitted: closing the store commits it
        q.stop()  # no detach, no acks: what a kill -9 leaves (the store's commits aside)
        await s.close()
        tg.cancel_scope.cancel()
    s = new_store()
    await s.open()
    async with anyio.create_task_group() as tg:
        await tg.start(s.run)
        # recovery: a and c were delivered once (the mark covers them), d and e never
        assert await _on_disk(s, "jobs") == {b"a": 1, b"b": 2, b"c": 1, b"d": 0, b"e": 0}
        w = World(s, tg)
        cfg = QueueConfig.from_args({"name": "jobs", "max_deliveries": 2, "backoff_initial": 0.0,
                                     "backoff_jitter": 0.0, "dead_letter": "jobs.dlq"})
        await w.dead_letters.ensure("jobs.dlq")
        q = await w._start_queue(cfg, await s.count("jobs"))
        peer = RecordingPeer(2)
        c = consume(q, peer, prefetch=5)
        got = await peer.deliveries_at_least(5)
        assert sorted((it[2], it[4]) for it in got) == [(b"a", 2), (b"b", 3), (b"c", 2), (b"d", 1), (b"e", 1)]
        # a nack now is the second failure of a, b and c: max_deliveries=2 dead-letters them
        codes, error = await settle(c, [[it[0], NACK, 0] for it in got])
        assert codes == [0] * 5 and error is None
        assert q.dead_lettered == 3
        assert sorted(m.payload for m in await s.list_messages("jobs.dlq")) == [b"a", b"b", b"c"]
        q.stop()
        w.queues["jobs.dlq"].stop()
        await s.close()
        tg.cancel_scope.cancel()


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
async def test_each_priority_lane_has_its_own_delivery_mark(kind: str, tmp_path: Any) -> None:
    """High priorities delivered first must not count the lower lanes' older,
    undelivered messages as delivered after a restart."""
    new_store = _reopenable(kind, tmp_path)
    s = new_store()
    await s.open()
    async with anyio.create_task_group() as tg:
        await tg.start(s.run)
        w = World(s, tg)
        q = await _priority_queue(w)
        await _publish_prio(w, q, [(b"x0", 0), (b"y0", 0)])
        await _publish_prio(w, q, [(b"w9", 9), (b"v9", 9)])  # newer keys, higher priority
        peer = RecordingPeer()
        c = consume(q, peer, prefetch=3)
        got = await peer.deliveries_at_least(3)
        assert [it[2] for it in got] == [b"w9", b"v9", b"x0"] and len(c.inflight) == 3
        await until(lambda: not q._marks)  # submitted: closing the store commits it
        q.stop()
        await s.close()
        tg.cancel_scope.cancel()
    s = new_store()
    await s.open()
    async with anyio.create_task_group() as tg:
        await tg.start(s.run)
        assert await _on_disk(s, "prio") == {b"x0": 1, b"y0": 0, b"w9": 1, b"v9": 1}
        await s.close()


async def test_a_failed_ack_writes_the_delivery_count_of_the_message_it_gives_back() -> None:
    """A first delivery has no row of its own; when the ack's delete fails the
    message comes back and may be paged out and in again (its consumer gone), so
    its count is written to its row then."""
    from tidings.broker.durable.store.base import DeleteMessages
    from tidings.broker.durable.store.memory import MemoryStore

    s = MemoryStore()
    await s.open()
    async with anyio.create_task_group() as tg:
        await tg.start(s.run)
        w = World(s, tg)
        q = await w.queue(name="jobs")
        await w.publish(q, b"a")
        peer = RecordingPeer()
        c = consume(q, peer, prefetch=1)
        d = (await peer.deliveries_at_least(1))[0]
        assert await _on_disk(s, "jobs") == {b"a": 0}  # counted by the mark only
        s.fail_next(where=lambda op: isinstance(op, DeleteMessages))
        codes, err = await settle(c, [[d[0], ACK, None]])
        assert codes == [0] and err is not None and q.count == 1
        assert await _on_disk(s, "jobs") == {b"a": 1}
        c.close()
        q.stop()
        await s.close()
        tg.cancel_scope.cancel()
