"""Streams against a real broker: declaring, partitioning by key, offsets.

Every publish here is confirmed, and the confirm (PublishAck) says where the
message landed: the tests check those positions against the partitioner
(protocol.partition.partition_for) and against what a reader replays.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

import anyio
import pytest

from tidings.client import connect
from tidings.client.errors import ConflictError, InvalidArgumentError, NotFoundError
from tidings.protocol.partition import partition_for

WAIT = 5.0


async def replay(tc: Any, stream: str, partition: int, start: Any = "earliest", **kw: Any) -> list[Any]:
    """Everything a non-following reader returns for one partition."""
    out = []
    with anyio.fail_after(WAIT * 4):
        async for m in tc.read_stream(stream, partition, start, **kw):
            out.append(m)
    return out


async def test_declare_is_idempotent_and_conflicts_on_different_settings(broker) -> None:
    async with connect(broker.url) as tc:
        info = await tc.declare_stream("orders", partitions=3, bind=["orders.>"], max_messages=1000)
        assert info["created"] is True
        assert [p["partition"] for p in info["partitions"]] == [0, 1, 2]
        assert info["config"]["dead_letter"] == "orders.dlq"
        again = await tc.declare_stream("orders", partitions=3, bind=["orders.>"], max_messages=1000)
        assert again["created"] is False
        for changed in ({"partitions": 4, "bind": ["orders.>"], "max_messages": 1000},
                        {"partitions": 3, "bind": ["orders.*"], "max_messages": 1000},
                        {"partitions": 3, "bind": ["orders.>"], "max_messages": 999},
                        {"partitions": 3, "bind": ["orders.>"], "max_messages": 1000, "max_deliveries": 2}):
            with pytest.raises(ConflictError) as ei:
                await tc.declare_stream("orders", **changed)
            assert "different settings" in str(ei.value)
        # the original is untouched
        info = await tc.stream_info("orders")
        assert len(info["partitions"]) == 3 and info["config"]["max_messages"] == 1000
        # a queue's name cannot become a stream, and bad settings are refused
        await tc.declare_queue("jobs", bind=["jobs.>"])
        with pytest.raises(ConflictError):
            await tc.declare_stream("jobs", partitions=1)
        with pytest.raises(InvalidArgumentError):
            await tc.declare_stream("bad", partitions=0)
        with pytest.raises(NotFoundError):
            await tc.stream_info("nope")
        assert [s["name"] for s in await tc.list_streams()] == ["orders"]


async def test_key_picks_partition_and_offsets_are_dense_per_partition(broker) -> None:
    P = 5
    keys = [f"customer-{i}" for i in range(40)] + ["ü-ñíçødé", "a", "A", "x" * 255]
    async with connect(broker.url) as tc:
        await tc.declare_stream("ev", partitions=P, bind=["ev.>"])
        pending = []
        for n in range(600):
            key = keys[n % len(keys)]
            pending.append((key, n, tc.publish_nowait("ev.created", f"{key}|{n}", key=key)))
        placed: dict[int, list[tuple[int, str, int]]] = defaultdict(list)
        for key, n, conf in pending:
            ack = await conf
            assert ack.stream == "ev"
            partition, offset = ack  # PublishAck unpacks to (partition, offset)
            assert (partition, offset) == (ack.partition, ack.offset)
            assert partition == partition_for(key, P), key
            placed[partition].append((offset, key, n))
        for p in range(P):
            offsets = [o for o, _k, _n in placed[p]]
            # one publisher: offsets are handed out in publish order, dense from 0
            assert offsets == list(range(len(offsets))), p
        info = await tc.stream_info("ev")
        assert [x["next"] for x in info["partitions"]] == [len(placed[p]) for p in range(P)]
        assert info["published"] == 600
        # the stored log says the same as the confirms
        for p in range(P):
            got = await replay(tc, "ev", p)
            assert [(m.offset, m.key, m.payload.decode()) for m in got] == \
                [(o, k, f"{k}|{n}") for o, k, n in placed[p]]
            assert all(m.partition == p and m.subject == "ev.created" for m in got)


async def test_concurrent_publishers_get_dense_increasing_offsets(broker) -> None:
    """Several connections publishing to the same partitions at once: every
    partition's offsets are 0..n-1 with no gap or repeat, and each publisher
    sees its own messages in increasing offset order."""
    P = 3
    async with connect(broker.url) as admin:
        await admin.declare_stream("multi", partitions=P, bind=["multi.>"])
        results: dict[int, list[tuple[int, int, str]]] = {}

        async def publisher(w: int) -> None:
            async with connect(broker.url) as tc:
                confs = [(i, tc.publish_nowait("multi.x", f"{w}:{i}", key=f"k{i % 7}")) for i in range(300)]
                results[w] = [(i, *(await c)) for i, c in confs]  # type: ignore[misc]

        async with anyio.create_task_group() as tg:
            for w in range(4):
                tg.start_soon(publisher, w)
        per_part: dict[int, list[int]] = defaultdict(list)
        for w, rows in results.items():
            last: dict[int, int] = {}
            for i, partition, offset in rows:
                assert partition == partition_for(f"k{i % 7}", P)
                assert offset > last.get(partition, -1), (w, i)
                last[partition] = offset
                per_part[partition].append(offset)
        for p, offsets in per_part.items():
            assert sorted(offsets) == list(range(len(offsets))), p
        assert sum(len(v) for v in per_part.values()) == 1200


async def test_keyless_publishes_spread_over_partitions(broker) -> None:
    P = 4
    async with connect(broker.url) as tc:
        await tc.declare_stream("spread", partitions=P, bind=["spread.>"])
        acks = [await c for c in [tc.publish_nowait("spread.x", str(i)) for i in range(400)]]
        counts = Counter(a.partition for a in acks)
        assert set(counts) == set(range(P))
        assert max(counts.values()) - min(counts.values()) <= 1, counts  # round-robin
        for p in range(P):
            assert sorted(a.offset for a in acks if a.partition == p) == list(range(counts[p]))
            got = await replay(tc, "spread", p)
            assert len(got) == counts[p] and all(m.key is None for m in got)


async def test_one_publish_lands_in_every_bound_stream_and_queue(broker) -> None:
    async with connect(broker.url) as tc:
        await tc.declare_stream("a", partitions=2, bind=["shop.>"])
        await tc.declare_stream("b", partitions=3, bind=["shop.orders.*"])
        await tc.declare_queue("q", bind=["shop.orders.>"])
        ack = await tc.publish("shop.orders.created", b"o1", key="c42")
        assert ack is not None and ack.queues == 1
        where = {ack.stream: (ack.partition, ack.offset)}
        for name, p, o in ack.raw.get("streams", []):
            where[name] = (p, o)
        assert where == {"a": (partition_for("c42", 2), 0), "b": (partition_for("c42", 3), 0)}
        # a subject only one stream binds
        ack = await tc.publish("shop.refunds.x", b"r1", key="c42")
        assert (ack.stream, ack.partition, ack.offset) == ("a", partition_for("c42", 2), 1)
        assert ack.queues == 0 and "streams" not in ack.raw
