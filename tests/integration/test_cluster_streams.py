"""Streams across several real brokers on one PostgreSQL database (issue 13 item 2):
offsets dense and in commit order whichever broker publishes, readers on any broker
seeing every broker's entries in order, consumer groups spanning brokers, and a
broker killed (-9) under load handing its partitions to the others.

The streams are declared on every broker (same settings: the declare is idempotent)
until the shared catalog makes one declare enough."""

from __future__ import annotations

from typing import Any

import anyio
import asyncpg
import pytest

from tidings.client import connect
from tidings.client.errors import StaleDeliveryError, StaleGenerationError

from tests.integration.test_stream_groups import Ledger, Worker, check_order, publish_keyed

WAIT = 30.0  # generous: 2 shared cores, three brokers and a database
POLLS = 600  # bounded polls of state, POLL_STEP apart (60 s in all)
POLL_STEP = 0.1

pytestmark = pytest.mark.timeout(300)


async def declare_everywhere(brokers: list[Any], name: str, partitions: int) -> None:
    for b in brokers:
        async with connect(b.url) as tc:
            await tc.declare_stream(name, partitions=partitions, bind=[f"{name}.>"])


async def db_state(url: str, stream: str, group: str | None = None) -> dict[str, Any]:
    """What the database holds: each partition's offsets, head and the group's commits."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch('SELECT partition, "offset" FROM tidings_stream_messages WHERE stream = $1'
                                ' ORDER BY partition, "offset"', stream)
        heads = {r[0]: r[1] for r in await conn.fetch(
            "SELECT partition, next FROM tidings_stream_heads WHERE stream = $1", stream)}
        committed = {r[0]: r[1] for r in await conn.fetch(
            "SELECT partition, committed FROM tidings_stream_offsets WHERE stream = $1 AND grp = $2",
            stream, group)} if group else {}
    finally:
        await conn.close()
    offsets: dict[int, list[int]] = {}
    for p, o in rows:
        offsets.setdefault(p, []).append(o)
    return {"offsets": offsets, "heads": heads, "committed": committed}


async def db_owners(url: str, stream: str, group: str) -> dict[int, str | None]:
    conn = await asyncpg.connect(url)
    try:
        return {r[0]: r[1] for r in await conn.fetch(
            "SELECT partition, owner FROM tidings_group_parts WHERE stream = $1 AND grp = $2", stream, group)}
    finally:
        await conn.close()


async def test_publishers_on_two_brokers_share_one_partition_and_a_reader_on_a_third_sees_all(
        start_cluster) -> None:
    a, b, c = start_cluster(3)
    await declare_everywhere([a, b, c], "st", 1)
    n = 300
    confirmed: dict[str, list[tuple[int, int]]] = {"A": [], "B": []}
    seen: list[tuple[int, str]] = []
    got_all = anyio.Event()

    async def read_on_c() -> None:
        async with connect(c.url) as tc:
            async for m in tc.read_stream("st", 0, "earliest", follow=True):
                seen.append((m.offset, m.payload.decode()))
                if len(seen) == 2 * n:
                    got_all.set()
                    return

    async def publish(url: str, tag: str) -> None:
        async with connect(url) as tc:
            pending = [tc.publish_nowait("st.x", f"{tag}:{i}") for i in range(n)]
            for fut in pending:
                confirmed[tag].append(tuple(await fut))  # type: ignore[arg-type]

    async with anyio.create_task_group() as tg:
        tg.start_soon(read_on_c)
        async with anyio.create_task_group() as pubs:
            pubs.start_soon(publish, a.url, "A")
            pubs.start_soon(publish, b.url, "B")
        with anyio.fail_after(WAIT):
            await got_all.wait()
    offsets = sorted(o for tag in confirmed for _p, o in confirmed[tag])
    assert offsets == list(range(2 * n)), "offsets are not dense across the two brokers"
    for tag in confirmed:  # each publisher's order is kept
        mine = [o for _p, o in confirmed[tag]]
        assert mine == sorted(mine)
    # the reader on C saw every entry, in offset order, each where its confirm said
    assert [o for o, _ in seen] == list(range(2 * n))
    by_offset = dict(seen)
    for tag in confirmed:
        assert [by_offset[o] for _p, o in confirmed[tag]] == [f"{tag}:{i}" for i in range(n)]
    state = await db_state(start_cluster.url, "st")
    assert state["offsets"][0] == list(range(2 * n)) and state["heads"] == {0: 2 * n}


async def wait_for_assignment(workers: list[Any], partitions: int) -> list[list[int]]:
    """Until the members' assignments (latest generation each) are disjoint and cover every partition."""
    for _ in range(POLLS):
        parts = [sorted(w.assignment[1]) for w in workers]
        flat = [p for ps in parts for p in ps]
        if sorted(flat) == list(range(partitions)) and all(parts):
            return parts
        await anyio.sleep(POLL_STEP)
    raise AssertionError(f"no disjoint covering assignment: {[w.assignment for w in workers]}")


async def test_group_members_on_three_brokers_get_disjoint_partitions(start_cluster) -> None:
    brokers = start_cluster(3)
    await declare_everywhere(brokers, "gs", 6)
    led = Ledger()
    keys = [f"k{i}" for i in range(24)]
    async with connect(brokers[0].url) as pub:
        await publish_keyed(pub, led, "gs.x", keys, 240)
    async with connect(brokers[0].url) as ca, connect(brokers[1].url) as cb, connect(brokers[2].url) as cc:
        consumers = [c.stream_consume("gs", "g", window=20) for c in (ca, cb, cc)]
        streams = [await cm.__aenter__() for cm in consumers]
        try:
            parts = await wait_for_assignment(streams, 6)
            assert all(len(p) == 2 for p in parts)
            owners = {p: i for i, ps in enumerate(parts) for p in ps}

            lost: set[tuple[int, int]] = set()  # (partition, generation) an ack was refused for

            async def consume(i: int) -> None:
                while len(led.acked) < 240:
                    m = await streams[i].next(timeout=WAIT)
                    if m is None:
                        return
                    if m.partition not in streams[i].assignment[1] or (m.partition, m.generation) in lost:
                        continue  # a leftover from an earlier generation: not ours
                    assert owners[m.partition] == i, "a member got a partition it does not own"
                    led.record(m, str(i))
                    try:
                        await m.ack(wait=True)
                    except (StaleGenerationError, StaleDeliveryError):
                        # sent before the partition moved away and came back: void, delivered again
                        lost.add((m.partition, m.generation))
                        continue
                    led.acked.add((m.partition, m.offset))

            with anyio.fail_after(WAIT * 2):
                async with anyio.create_task_group() as tg:
                    for i in range(3):
                        tg.start_soon(consume, i)
                    while len(led.acked) < 240:
                        await anyio.sleep(POLL_STEP)
                    tg.cancel_scope.cancel()
            check_order(led)
            assert {ks for ks in led.confirmed} <= {(k, s) for k, s, *_ in led.seen}
        finally:
            for cm in consumers:
                await cm.__aexit__(None, None, None)
    state = await db_state(start_cluster.url, "gs", "g")
    assert state["committed"] == {p: len(state["offsets"].get(p, [])) for p in range(6)}


async def test_broker_killed_under_load_hands_its_partitions_to_the_others(start_cluster) -> None:
    """Members on A, B and C; publishers on A and B keep publishing; C is killed (-9).
    C's partitions move to A and B once its leases lapse; every confirmed message is
    delivered, per key in publish order, committed offsets never pass an unacked
    message, and the partitions have no offset gaps."""
    a, b, c = start_cluster(3)
    await declare_everywhere([a, b, c], "ks", 4)
    led = Ledger()
    keys = [f"k{i}" for i in range(16)]
    workers = [Worker(name, br.url, "ks", "g", led, 10) for name, br in (("A", a), ("B", b), ("C", c))]

    async def nothing(_w: Worker) -> None:
        return None

    async with anyio.create_task_group() as tg:
        for w in workers[:2]:
            tg.start_soon(w.run, nothing)
        c_scope = anyio.CancelScope()
        tg.start_soon(_run_until_cancelled, workers[2], nothing, c_scope)
        async with connect(a.url) as pa, connect(b.url) as pb:
            await publish_keyed(pa, led, "ks.x", keys, 200)
            await publish_keyed(pb, led, "ks.x", keys, 200)
            # C has taken part before it dies
            for _ in range(POLLS):
                if workers[2].processed:
                    break
                await anyio.sleep(POLL_STEP)
            assert workers[2].processed, "C never got a partition"
            c.kill()
            c_scope.cancel()
            await publish_keyed(pa, led, "ks.x", keys, 200)
            await publish_keyed(pb, led, "ks.x", keys, 200)
        # every confirmed message reaches A or B (C's partitions after its leases lapse)
        for _ in range(POLLS):
            if set(led.confirmed) <= {(k, s) for k, s, *_ in led.seen}:
                break
            await anyio.sleep(POLL_STEP)
        owners = await db_owners(start_cluster.url, "ks", "g")  # while A's and B's members are live
        for w in workers[:2]:
            w.request_stop()
    check_order(led)
    assert set(led.confirmed) <= {(k, s) for k, s, *_ in led.seen}
    assert None not in owners.values() and len(set(owners.values())) == 2, f"C's partitions did not move: {owners}"
    state = await db_state(start_cluster.url, "ks", "g")
    for p in range(4):
        offs = state["offsets"].get(p, [])
        assert offs == list(range(len(offs))), f"partition {p} has offset gaps"
        assert state["heads"].get(p, 0) == len(offs)
        committed = state["committed"][p]
        # C's last acks may have committed with their answers lost in the kill: only a
        # message C held may be committed without an ack the test saw
        held_by_c = {(sp, so) for _k, _s, _n, sp, so, w in led.seen if w == "C"}
        missing = [o for o in range(committed) if (p, o) not in led.acked and (p, o) not in held_by_c]
        assert not missing, f"partition {p}: committed past unacked offsets {missing[:10]}"


async def _run_until_cancelled(w: Worker, on_message: Any, scope: anyio.CancelScope) -> None:
    with scope:
        await w.run(on_message)


async def test_a_duplicate_is_answered_with_the_offset_allocated_at_commit(start_cluster) -> None:
    """B publishes first, so A's own idea of the next offset (0) is not what the
    commit gives its publish (5): a resend of the same msg_id, on A (its memory) or
    on B (the database's de-dup record), is answered with the stored offset."""
    a, b = start_cluster(2)
    await declare_everywhere([a, b], "dd", 1)
    async with connect(a.url) as ta, connect(b.url) as tb:
        for i in range(5):
            await tb.publish("dd.x", f"b{i}")
        first = await ta.publish("dd.x", "a", msg_id="m-1")
        assert first is not None and (first.partition, first.offset) == (0, 5) and not first.duplicate
        again = await ta.publish("dd.x", "a", msg_id="m-1")
        assert again is not None and again.duplicate and again.offset == 5
        elsewhere = await tb.publish("dd.x", "a", msg_id="m-1")
        assert elsewhere is not None and elsewhere.duplicate and elsewhere.offset == 5
