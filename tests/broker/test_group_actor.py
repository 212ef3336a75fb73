"""GroupActor on its own: a DurableContext over a real store, recording fakes
of the members' connections, no socket and no broker.

Covers partition assignment and rebalance (generations, stale acks), in-order
delivery per partition, committed offsets reaching the store, ordered
redelivery after a nack, and dead-lettering at max_deliveries.
"""

from __future__ import annotations

from typing import Any

import anyio
from actorkit import RecordingPeer, World, persisted, until

from tidings.protocol import frames as F
from tidings.protocol.errors import ErrorCode

from tidings.protocol.vocabulary import H_DLQ_SOURCE as DLQ_SOURCE, RESERVED_HEADER_PREFIX as HDR_PREFIX
from tidings.broker.durable.group import GroupActor, Member

ACK, NACK = F.AckAction.ACK, F.AckAction.NACK


def join(g: GroupActor, peer: RecordingPeer, cid: int = 1, window: int = 100) -> Member:
    m = g.join(peer, cid, window)  # type: ignore[arg-type]
    peer.consumers[cid] = m
    return m


async def settle(g: GroupActor, m: Member, items: list[list[Any]]) -> tuple[list[int], Exception | None]:
    """Settle as Durable.settle does: answered once the offsets the acks let
    pass are committed to the store. Returns (codes, store error)."""
    needs = g.needs(m, items)
    codes = m.settle(items)
    return codes, await persisted(g, needs, codes)


def assignment(peer: RecordingPeer) -> dict[str, Any]:
    return peer.notices("assignment")[-1]


async def test_partitions_are_assigned_round_robin_and_rebalanced(store: Any) -> None:
    async with store() as s, anyio.create_task_group() as tg:
        w = World(s, tg)
        st = await w.stream(name="ev", partitions=4)
        g = await w.group(st)
        a, b = RecordingPeer(1), RecordingPeer(2)
        ma = join(g, a)
        assert assignment(a) == {"cid": 1, "group": "g", "generation": 1, "partitions": [0, 1, 2, 3]}
        mb = join(g, b, cid=5)
        assert assignment(a)["partitions"] == [0, 2] and assignment(a)["generation"] == 2
        assert assignment(b) == {"cid": 5, "group": "g", "generation": 2, "partitions": [1, 3]}
        ma.close()
        assert assignment(b)["partitions"] == [0, 1, 2, 3] and assignment(b)["generation"] == 3
        assert g.members == [mb] and len(a.notices("assignment")) == 2
        g.stop()
        tg.cancel_scope.cancel()


async def test_each_partition_is_delivered_in_offset_order_and_acks_commit(store: Any) -> None:
    async with store() as s, anyio.create_task_group() as tg:
        w = World(s, tg)
        st = await w.stream(name="ev", partitions=2)
        g = await w.group(st)
        await w.append(st, 0, b"a0", b"a1", b"a2")
        await w.append(st, 1, b"b0", b"b1")
        peer = RecordingPeer()
        m = join(g, peer)
        got = await peer.deliveries_at_least(5)
        by_part: dict[int, list[tuple[int, bytes]]] = {}
        for it in got:
            part, offset, _key, gen = it[6]
            assert gen == 1 and it[4] == 1
            by_part.setdefault(part, []).append((offset, it[2]))
        assert by_part == {0: [(0, b"a0"), (1, b"a1"), (2, b"a2")], 1: [(0, b"b0"), (1, b"b1")]}
        assert await settle(g, m, [[it[0], ACK, None] for it in got]) == ([0] * 5, None)
        assert [ps.persisted for ps in g.parts] == [3, 2]
        assert (await s.load_offsets("ev"))["g"] == {0: (3, 3), 1: (2, 2)}
        g.stop()
        tg.cancel_scope.cancel()


async def test_an_out_of_order_ack_waits_for_the_offsets_before_it(store: Any) -> None:
    async with store() as s, anyio.create_task_group() as tg:
        w = World(s, tg)
        st = await w.stream(name="ev")
        g = await w.group(st)
        await w.append(st, 0, b"m0", b"m1")
        peer = RecordingPeer()
        m = join(g, peer)
        first, second = await peer.deliveries_at_least(2)
        assert m.settle([[second[0], ACK, None]]) == [0]
        assert g.parts[0].committed == 0  # offset 0 is not acked yet
        assert await settle(g, m, [[first[0], ACK, None]]) == ([0], None)
        assert g.parts[0].committed == 2 and g.parts[0].persisted == 2
        g.stop()
        tg.cancel_scope.cancel()


async def test_a_nack_rewinds_the_partition_and_redelivers_in_order(store: Any) -> None:
    async with store() as s, anyio.create_task_group() as tg:
        w = World(s, tg)
        st = await w.stream(name="ev")
        g = await w.group(st)
        await w.append(st, 0, b"m0", b"m1", b"m2")
        peer = RecordingPeer()
        m = join(g, peer)
        got = await peer.deliveries_at_least(3)
        assert m.settle([[got[1][0], NACK, 0]]) == [0]
        # offset 2, delivered after the nacked one, is void: its ack is stale
        assert m.settle([[got[2][0], ACK, None]]) == [int(ErrorCode.STALE_DELIVERY)]
        again = (await peer.deliveries_at_least(5))[3:]
        assert [(it[6][1], it[2], it[4]) for it in again] == [(1, b"m1", 2), (2, b"m2", 2)]
        assert g.redelivered == 2
        g.stop()
        tg.cancel_scope.cancel()


async def test_acks_from_before_a_rebalance_are_stale_generation(store: Any) -> None:
    async with store() as s, anyio.create_task_group() as tg:
        w = World(s, tg)
        st = await w.stream(name="ev", partitions=2)
        g = await w.group(st)
        await w.append(st, 1, b"x")
        a, b = RecordingPeer(1), RecordingPeer(2)
        ma = join(g, a)
        [d] = await a.deliveries_at_least(1)
        assert d[6][0] == 1
        join(g, b, cid=2)  # partition 1 moves to b
        assert ma.settle([[d[0], ACK, None]]) == [int(ErrorCode.STALE_GENERATION)]
        [again] = await b.deliveries_at_least(1)
        assert again[2] == b"x" and again[6][3] == 2 and again[4] == 2
        g.stop()
        tg.cancel_scope.cancel()


async def test_max_deliveries_copies_the_message_to_the_dlq_and_moves_on(store: Any) -> None:
    async with store() as s, anyio.create_task_group() as tg:
        w = World(s, tg)
        st = await w.stream(name="ev", max_deliveries=2, backoff_initial=0)
        g = await w.group(st)
        await w.append(st, 0, b"poison", b"next")
        peer = RecordingPeer()
        m = join(g, peer, window=1)
        for n in (1, 2):
            d = (await peer.deliveries_at_least(n))[-1]
            assert d[2] == b"poison" and d[4] == n
            m.settle([[d[0], NACK, 0]])
        nxt = (await peer.deliveries_at_least(3))[-1]
        assert nxt[2] == b"next" and nxt[6][1] == 1
        dlq = w.queues["ev.dlq"]
        await until(lambda: dlq.count == 1)
        [moved] = await s.list_messages("ev.dlq")
        h = moved.headers or {}
        assert moved.payload == b"poison" and h[DLQ_SOURCE] == "ev"
        assert h[HDR_PREFIX + "dlq-reason"] == "max_deliveries" and h[HDR_PREFIX + "stream-offset"] == 0
        assert g.dead_lettered == 1 and st.dead_lettered == 1
        assert await settle(g, m, [[nxt[0], ACK, None]]) == ([0], None)
        assert (await s.load_offsets("ev"))["g"][0][0] == 2
        g.stop()
        dlq.stop()
        tg.cancel_scope.cancel()


async def test_close_tells_every_member(store: Any) -> None:
    async with store() as s, anyio.create_task_group() as tg:
        w = World(s, tg)
        st = await w.stream(name="ev")
        g = await w.group(st)
        peer = RecordingPeer()
        join(g, peer, cid=9)
        st.close("stream deleted")
        assert peer.notices("consumer_closed") == [{"cid": 9, "reason": "stream deleted"}]
        assert peer.consumers == {}
        tg.cancel_scope.cancel()
