"""Day two against a real broker: settings changed in place, deletes that take
the dead-letter queue along, consumer groups listed and deleted (client and
CLI)."""

from __future__ import annotations

import anyio
import pytest

from tidings.client import connect
from tidings.client.errors import ConflictError, ImmutableSettingError, NotFoundError, PublishBufferFullError
from queuetools import WAIT, collect, declare, holds
from test_queue_cli import tidings, tidings_json


async def restart(broker) -> None:
    """Stop the broker cleanly and start it again on its data directory."""
    await anyio.to_thread.run_sync(broker.terminate)
    await anyio.to_thread.run_sync(broker.restart)


# ------------------------------------------------------------- queue update


async def test_queue_update_applies_live_and_survives_restart(broker) -> None:
    async with connect(broker.url) as tc:
        await declare(tc, "upd", max_deliveries=5, ack_deadline=30.0)
        # a new ack deadline applies to the next deliveries: a short one makes an
        # unsettled delivery come back, counted
        info = await tc.update_queue("upd", ack_deadline=0.2, max_deliveries=2)
        assert info["config"]["ack_deadline"] == 0.2 and info["config"]["max_deliveries"] == 2
        await tc.publish("upd.x", b"m", confirm=True)
        async with tc.consume("upd", prefetch=1) as deliveries:
            first = await deliveries.next(timeout=WAIT)
            second = await deliveries.next(timeout=WAIT)  # the deadline ran out: delivered again
            assert (first.payload, second.payload) == (b"m", b"m")
            assert second.delivery_count == 2
            await second.nack(wait=True)  # max_deliveries 2 reached at this failure: dead-lettered
        dead = await holds(tc, "upd.dlq", 1)  # (holds waits for the move to commit)
        assert dead[0].payload == b"m"
    await restart(broker)
    async with connect(broker.url) as tc:
        conf = (await tc.queue_info("upd"))["config"]
        assert conf["ack_deadline"] == 0.2 and conf["max_deliveries"] == 2


async def test_queue_update_max_length_trims_at_once(broker) -> None:
    async with connect(broker.url) as tc:
        await declare(tc, "trim", overflow="dead_letter_oldest")
        for i in range(10):
            await tc.publish("trim.x", str(i).encode(), confirm=True)
        await tc.update_queue("trim", max_length=4)
        dead = await holds(tc, "trim.dlq", 6)
        assert [d.payload for d in dead] == [str(i).encode() for i in range(6)]
        assert (await tc.queue_info("trim"))["depth"] == 4
        # "none" (nil) lifts the limit again
        info = await tc.update_queue("trim", max_length=None)
        assert info["config"]["max_length"] is None


async def test_queue_update_refuses_immutable_settings(broker) -> None:
    async with connect(broker.url) as tc:
        await declare(tc, "imm")
        with pytest.raises(ImmutableSettingError, match="bind cannot change in place"):
            await tc.update_queue("imm", bind=["other.>"])
        with pytest.raises(ImmutableSettingError, match="dead_letter"):
            await tc.update_queue("imm", dead_letter="elsewhere")
        # the same value is no change: accepted
        await tc.update_queue("imm", bind=["imm.>"], max_deliveries=3)
        with pytest.raises(NotFoundError):
            await tc.update_queue("nope", max_deliveries=3)
        # a redeclare with different settings is still refused (CONFLICT), update is the way
        with pytest.raises(ConflictError, match="queue.update"):
            await declare(tc, "imm", max_deliveries=4)
    r = await tidings("queues", "update", "imm", "--max-length", "5", "--ttl", "1m", "--ack-deadline", "30s",
                      url=broker.url)
    assert "max_length=5" in r.stdout and "message_ttl=60.0" in r.stdout
    r = await tidings("queues", "update", "imm", url=broker.url, check=False)
    assert r.returncode == 1 and "give at least one setting" in r.stderr and "Traceback" not in r.stderr
    r = await tidings("queues", "update", "imm", "--bind", "x.>", url=broker.url, check=False)
    assert r.returncode == 2  # not an update flag: usage error
    r = await tidings("queues", "declare", "cli-prio", "--bind", "cli-prio.>", "--max-priority", "5", url=broker.url)
    assert (await tidings_json("queues", "info", "cli-prio", url=broker.url))["config"]["max_priority"] == 5
    r = await tidings("streams", "update", "nostream", "--retention", "7d", url=broker.url, check=False)
    assert r.returncode == 1 and "no stream named" in r.stderr and "Traceback" not in r.stderr


async def test_stream_update_applies_and_refuses_partitions(broker) -> None:
    async with connect(broker.url) as tc:
        await tc.declare_stream("supd", partitions=2, bind=["supd.>"])
        for i in range(10):
            await tc.publish("supd.x", str(i).encode(), key="k", confirm=True)
        with pytest.raises(ImmutableSettingError, match="partitions cannot change in place"):
            await tc.update_stream("supd", partitions=3)
        info = await tc.update_stream("supd", max_messages=3)
        assert sum(p["messages"] for p in info["partitions"]) == 3  # retention ran at once
    r = await tidings("streams", "update", "supd", "--retention", "7d", url=broker.url)
    assert "max_age=604800.0" in r.stdout
    await restart(broker)
    async with connect(broker.url) as tc:
        conf = (await tc.stream_info("supd"))["config"]
        assert conf["max_messages"] == 3 and conf["max_age"] == 604800.0


# ------------------------------------------------------------ delete + DLQ


async def test_delete_queue_deletes_its_dlq_unless_kept(broker) -> None:
    async with connect(broker.url) as tc:
        await declare(tc, "gone")
        await declare(tc, "kept")
        names = {q["name"] for q in await tc.list_queues()}
        assert {"gone.dlq", "kept.dlq"} <= names
        res = await tc.delete_queue("gone")
        assert res["dead_letter"]["deleted"] == "gone.dlq"
        res = await tc.delete_queue("kept", keep_dlq=True)
        assert "dead_letter" not in res
        names = {q["name"] for q in await tc.list_queues()}
        assert "gone.dlq" not in names and "kept.dlq" in names
        # a DLQ another queue also uses stays
        await declare(tc, "a1", dead_letter="shared.dlq")
        await declare(tc, "a2", dead_letter="shared.dlq")
        assert "dead_letter" not in await tc.delete_queue("a1")
        assert (await tc.delete_queue("a2"))["dead_letter"]["deleted"] == "shared.dlq"
        # streams too
        await tc.declare_stream("sgone", bind=["sgone.>"])
        assert (await tc.delete_stream("sgone"))["dead_letter"]["deleted"] == "sgone.dlq"
        await tc.declare_stream("skept", bind=["skept.>"])
    r = await tidings("streams", "delete", "skept", "--keep-dlq", url=broker.url)
    assert "dead-letter" not in r.stdout
    await declare_cli_queue(broker.url, "cligone")
    r = await tidings("queues", "delete", "cligone", url=broker.url)
    assert "deleted its dead-letter queue cligone.dlq" in r.stdout
    names = {q["name"] for q in await tidings_json("queues", url=broker.url)}
    assert "skept.dlq" in names and "cligone.dlq" not in names
    await restart(broker)
    async with connect(broker.url) as tc:
        names = {q["name"] for q in await tc.list_queues()}
        assert "gone.dlq" not in names and "kept.dlq" in names and "sgone.dlq" not in names


async def declare_cli_queue(url: str, name: str) -> None:
    await tidings("queues", "declare", name, "--bind", f"{name}.>", url=url)


# --------------------------------------------------------- consumer groups


async def test_groups_listed_and_deleted(broker) -> None:
    async with connect(broker.url) as tc:
        await tc.declare_stream("gs", partitions=2, bind=["gs.>"])
        for i in range(6):
            await tc.publish("gs.x", str(i).encode(), key=f"k{i}", confirm=True)
        async with tc.stream_consume("gs", "billing") as msgs:
            got = [await msgs.next(timeout=WAIT) for _ in range(2)]
            for m in got:
                await m.ack(wait=True)
            groups = await tc.stream_groups("gs")
            g = groups["billing"]
            assert len(g["members"]) == 1
            assert sum(p["committed"] for p in g["partitions"]) == 2
            assert sum(p["lag"] for p in g["partitions"]) == 4
            r = await tidings("streams", "groups", "gs", url=broker.url)
            assert "gs/billing" in r.stdout and "LAG" in r.stdout
            # live members: refused unless forced
            with pytest.raises(ConflictError, match="live members"):
                await tc.delete_group("gs", "billing")
            r = await tidings("streams", "groups", "gs", "delete", "billing", url=broker.url, check=False)
            assert r.returncode == 1 and "live members" in r.stderr
        # the member left: the group and its offsets go
        r = await tidings("streams", "groups", "gs", "delete", "billing", url=broker.url)
        assert "deleted consumer group gs/billing" in r.stdout
        assert await tc.stream_groups("gs") == {}
        with pytest.raises(NotFoundError):
            await tc.delete_group("gs", "billing")
    await restart(broker)
    async with connect(broker.url) as tc:
        assert await tc.stream_groups("gs") == {}  # its offsets were removed from the store
        # joining again starts a new group from the start
        async with tc.stream_consume("gs", "billing") as msgs:
            got = [await msgs.next(timeout=WAIT) for _ in range(6)]
            assert sorted(m.payload for m in got) == [str(i).encode() for i in range(6)]


async def test_force_delete_ends_live_members(broker) -> None:
    async with connect(broker.url) as tc:
        await tc.declare_stream("gf", bind=["gf.>"])
        await tc.publish("gf.x", b"1", confirm=True)
        async with tc.stream_consume("gf", "g1") as msgs:
            await msgs.next(timeout=WAIT)
            res = await tc.delete_group("gf", "g1", force=True)
            assert res == {"stream": "gf", "deleted": "g1"}
            with anyio.fail_after(WAIT):
                async for _ in msgs:  # the consumer ends (consumer_closed)
                    pass
        assert await tc.stream_groups("gf") == {}


# ---------------------------------------------------------- priority queues

BACKLOG = 10_500  # more than a queue's window (queue.WINDOW, 10,000): most of it stays on disk


async def _publish_many(tc, subject: str, payloads: list[bytes], priority: int) -> None:
    pending = []
    for p in payloads:
        while True:
            try:
                pending.append(tc.publish_nowait(subject, p, priority=priority, confirm=True))
                break
            except PublishBufferFullError:
                await pending.pop(0)
    for c in pending:
        await c


async def test_priority_order_with_a_backlog_on_disk_and_after_kill_9(broker) -> None:
    async with connect(broker.url, auto_msg_id=False) as tc:
        info = await tc.declare_queue("pq", bind=["pq.>"], max_priority=9)
        assert info["config"]["max_priority"] == 9
        with pytest.raises(ImmutableSettingError, match="max_priority"):
            await tc.update_queue("pq", max_priority=3)
        lows = [b"low%05d" % i for i in range(BACKLOG)]
        await _publish_many(tc, "pq.x", lows, 1)
        async with tc.consume("pq", prefetch=1) as deliveries:
            first = await deliveries.next(timeout=WAIT)
            assert first.payload == b"low00000"
            # published behind the whole backlog, most of which is on disk only
            await tc.publish("pq.x", b"top", priority=9, confirm=True)
            await _publish_many(tc, "pq.x", [b"mid%d" % i for i in range(5)], 5)
            await tc.publish("pq.x", b"clamped", priority=200, confirm=True)  # treated as 9
            await first.ack(wait=True)
            d = await deliveries.next(timeout=WAIT)
            assert d.payload == b"top"
            await d.ack(wait=True)
            d = await deliveries.next(timeout=WAIT)
            assert d.payload == b"clamped"  # prefetched, unacked: back to the front of its lane after the kill
            await anyio.to_thread.run_sync(broker.kill)
    await anyio.to_thread.run_sync(broker.restart)
    async with connect(broker.url) as tc:
        assert (await tc.queue_info("pq"))["depth"] == BACKLOG - 1 + 6
        await tc.publish("pq.x", b"new-low", confirm=True)  # priority 0: after everything else
        async with tc.consume("pq", prefetch=1) as deliveries:
            got = []
            for _ in range(12):
                d = await deliveries.next(timeout=WAIT)
                got.append(d.payload)
                await d.ack(wait=True)
        assert got == [b"clamped"] + [b"mid%d" % i for i in range(5)] + lows[1:7]
        await tc.delete_queue("pq")
