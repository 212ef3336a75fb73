"""Crossing between users (issue 10, items 6, 7, 9 and 15) against a real
broker with users: forged dead-letter headers and redrive, msg_id
de-duplication scope, consumer-group permissions, DLQ name squatting."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import anyio
import msgpack
import pytest
from queuetools import collect, holds
from rawclient import RawClient
from securitytools import PASSWORDS, WAIT, user, write_config

from tidings.client import connect
from tidings.client import errors as E
from tidings.protocol import ErrorCode
from tidings.protocol import frames as F

EVERYTHING = {"publish": [">"], "subscribe": [">"], "consume": [">"], "admin": [">"]}
T1 = {"publish": ["t1.>"], "subscribe": ["t1.>"], "consume": ["t1.>"], "admin": ["t1.>"]}


@pytest.fixture
def tenants(start_broker, tmp_path: Path):
    cfg = write_config(tmp_path / "tidings.toml", users={
        **user("admin", **EVERYTHING),
        **user("alice", **T1),  # tenant t1
        # may administer and read t1's queues, but publish nothing: no redrive into them
        **user("carol", consume=["t1.>"], admin=["t1.>"]),
        **user("bob", publish=["shared.>"], subscribe=["shared.>"]),
        **user("svc", password="svc-secret-pw", publish=["shared.>"], subscribe=["shared.>"],
               consume=["events", "events/workers"], admin=["x.dlq"]),
    })
    return start_broker("--config", str(cfg))


def login(b: Any, name: str) -> connect:
    pw = PASSWORDS.get(name, f"{name}-secret-pw")
    return connect(b.url, user=name, password=pw, reconnect=False)


# ------------------------------------------------------- 10.6 forged dead letters

async def test_publisher_cannot_set_reserved_headers(tenants) -> None:
    """A PUB with a tidings-* header (any letter case) is refused and stores
    nothing; the client refuses it locally, for that publish alone."""
    async with login(tenants, "admin") as adm:
        await adm.declare_queue("t1.q", bind=["t1.q.>"])
    async with login(tenants, "alice") as alice:
        await alice.wait_connected()
        for name in ("tidings-dlq-source", "Tidings-DLQ-Source"):
            with pytest.raises(E.InvalidArgumentError, match="reserved"):
                await alice.publish("t1.q.x", b"forged", headers={name: "pay.jobs"})
        await alice.publish("t1.q.x", b"fine", headers={"tidings": "ok", "x-tidings-y": "ok"})
    async with RawClient.open(tenants.host, tenants.port) as rc:
        creds = {"user": "alice", "password": PASSWORDS["alice"]}
        await rc.send(F.Hello(F.PROTOCOL_VERSION, "raw", creds, {}))
        await rc.read_until(lambda f: isinstance(f, F.Welcome), WAIT)
        forged = ["t1.q.x", b"forged", {"TIDINGS-dlq-source": "pay.jobs"}, None, 5, None]
        await rc.send_wire([F.Op.PUB, [forged]])
        err = await rc.read_until(lambda f: isinstance(f, F.Err), WAIT)
        assert err.code == ErrorCode.INVALID_ARGUMENT and "reserved" in err.message
        await rc.ping()  # the connection stays usable
    async with login(tenants, "admin") as adm:
        assert (await adm.queue_info("t1.q"))["depth"] == 1  # only the allowed one


async def test_forged_dlq_source_cannot_cross_into_another_tenant(tenants) -> None:
    """The reported attack: alice (t1.> only) stores a message claiming
    dlq-source pay.jobs in her own queue and redrives it. Nothing reaches
    pay.jobs: the header is refused, only a DLQ can be redriven, and a
    redrive into pay.jobs needs rights on it."""
    async with login(tenants, "admin") as adm:
        await adm.declare_queue("pay.jobs", bind=["pay.jobs"])
        async with login(tenants, "alice") as alice:
            await alice.declare_queue("t1.q", bind=["t1.q.>"])
            with pytest.raises(E.InvalidArgumentError):
                await alice.publish("t1.q.x", b"steal", headers={"tidings-dlq-source": "pay.jobs"})
            await alice.publish("t1.q.x", b"plain")
            with pytest.raises(E.InvalidArgumentError, match="not a dead-letter queue"):
                await alice.dlq_redrive("t1.q")
            # a queue declared as a DLQ (and bound, to be fillable) redrives nowhere foreign
            await alice.declare_queue("t1.fake", bind=["t1.fake.>"], is_dlq=True)
            await alice.publish("t1.fake.x", b"plain")
            assert await alice.dlq_redrive("t1.fake") == 0
            with pytest.raises(E.PermissionDeniedError):
                await alice.dlq_redrive("t1.fake", to="pay.jobs")
        assert (await adm.queue_info("pay.jobs"))["depth"] == 0


def _plant_forged_dead_letter(db: Path) -> None:
    """What a broker before the header rule could hold: a message in
    t1.q.dlq whose (publisher-written) header claims it came from pay.jobs."""
    with sqlite3.connect(db) as conn:
        (top,) = conn.execute("SELECT max(id) FROM messages").fetchone()
        new_id = (top or 0) + 1_000
        conn.execute("INSERT INTO messages (queue, id, subject, payload, headers, published_ms, available_ms) "
                     "VALUES ('t1.q.dlq', ?, 't1.q.x', x'00', ?, 1, 1)",
                     (new_id, msgpack.packb({"tidings-dlq-source": "pay.jobs"})))
        conn.execute("UPDATE meta SET value = max(value, ?) WHERE key = 'max_message_id'", (new_id,))
    conn.close()


async def test_redrive_ignores_a_dlq_source_the_broker_did_not_write(tenants) -> None:
    """The broker sends a dead letter back only to a queue that dead-letters
    into that DLQ, whatever its header says: a forged header stored by an
    older broker still cannot move a message into another tenant's queue."""
    async with login(tenants, "admin") as adm:
        await adm.declare_queue("pay.jobs", bind=["pay.jobs"])
        await adm.declare_queue("t1.q", bind=["t1.q.>"])
    assert tenants.terminate() == 0
    await anyio.to_thread.run_sync(_plant_forged_dead_letter, tenants.data_dir / "tidings.db")
    tenants.restart()
    async with login(tenants, "alice") as alice:
        res = await alice.call("dlq.redrive", {"name": "t1.q.dlq"})
        assert res == {"redriven": 0, "skipped": 1}
    async with login(tenants, "admin") as adm:
        assert (await adm.queue_info("pay.jobs"))["depth"] == 0
        assert (await adm.call("dlq.count", {"name": "t1.q.dlq"}))["count"] == 1


async def test_redrive_needs_publish_rights_on_the_destination(tenants) -> None:
    """carol administers t1.> but may publish nothing: she may not put
    messages into t1.q by redriving its DLQ; alice, who may publish on
    t1.q's bindings, redrives them back (the broker's own DLQ headers)."""
    async with login(tenants, "alice") as alice:
        await alice.declare_queue("t1.q", bind=["t1.q.>"], max_deliveries=1)
        await alice.publish("t1.q.a", b"poison", headers={"type": "x"})
        async with alice.consume("t1.q") as deliveries:
            (d,) = await collect(deliveries, 1)
            await d.reject("bad", wait=True)
        (dead,) = await holds(alice, "t1.q.dlq", 1)
        h = dict(dead.headers or {})
        assert h["tidings-dlq-source"] == "t1.q" and h["tidings-dlq-reason"] and h["type"] == "x"
        async with login(tenants, "carol") as carol:
            with pytest.raises(E.PermissionDeniedError, match="publish"):
                await carol.dlq_redrive("t1.q.dlq")
            with pytest.raises(E.PermissionDeniedError, match="publish"):
                await carol.dlq_redrive("t1.q.dlq", to="t1.q")
            assert len(await carol.dlq_list("t1.q.dlq")) == 1  # reading needs consume, which she has
        assert await alice.dlq_redrive("t1.q.dlq") == 1
        assert (await alice.queue_info("t1.q"))["depth"] == 1


# ------------------------------------------------------- 10.7 de-duplication scope

async def test_msg_id_dedup_is_scoped_per_user(tenants) -> None:
    """bob's msg_id does not make svc's publish with the same id a duplicate
    nor reveal bob's offset; each user's own resend still de-duplicates."""
    async with login(tenants, "admin") as adm:
        await adm.declare_stream("shared", bind=["shared.>"])
        await adm.declare_queue("shared.q", bind=["shared.>"])
    async with login(tenants, "bob") as bob, login(tenants, "svc") as svc:
        await bob.wait_connected()
        await svc.wait_connected()
        first = await bob.publish("shared.invoice", b"bob's", msg_id="invoice-2026-0042")
        other = await svc.publish("shared.invoice", b"svc's", msg_id="invoice-2026-0042")
        assert not other.duplicate
        assert other.offset != first.offset and other.id != first.id
        again = await svc.publish("shared.invoice", b"svc's", msg_id="invoice-2026-0042")
        assert again.duplicate and (again.id, again.offset) == (other.id, other.offset)
        again = await bob.publish("shared.invoice", b"bob's", msg_id="invoice-2026-0042")
        assert again.duplicate and (again.id, again.offset) == (first.id, first.offset)
    async with login(tenants, "admin") as adm:
        assert (await adm.queue_info("shared.q"))["depth"] == 2
        payloads = [m.payload async for m in adm.read_stream("shared", 0)]
        assert payloads == [b"bob's", b"svc's"]


# ------------------------------------------------------- 10.9 consumer groups

async def test_stream_consume_permission_names_the_group(tenants) -> None:
    """svc may consume stream events in group workers only: joining billing
    (and so committing its offsets) is refused; reading the stream is not."""
    async with login(tenants, "admin") as adm:
        await adm.declare_stream("events", bind=["events.>"])
        await adm.publish("events.a", b"1")
        async with adm.stream_consume("events", "billing") as msgs:
            assert (await msgs.next(timeout=WAIT)).payload == b"1"  # billing holds it unacked
    async with login(tenants, "svc") as svc:
        with pytest.raises(E.PermissionDeniedError, match="events/billing"):
            async with svc.stream_consume("events", "billing") as msgs:
                await (await msgs.next(timeout=WAIT)).ack()
        async with svc.stream_consume("events", "workers") as msgs:
            m = await msgs.next(timeout=WAIT)
            await m.ack()
        assert [m.payload async for m in svc.read_stream("events", 0)] == [b"1"]
    async with login(tenants, "admin") as adm:
        groups = (await adm.stream_info("events"))["groups"]
        assert groups["billing"]["partitions"][0]["committed"] == 0, groups  # nobody committed billing's


# ------------------------------------------------------- 10.15 DLQ name squatting

@pytest.mark.parametrize("declare", ["queue", "stream"])
async def test_declaring_x_dlq_needs_admin_on_its_own_dlq(tenants, declare: str) -> None:
    """svc has admin on x.dlq only: declaring x.dlq would create x.dlq.dlq,
    so it is refused; as a DLQ itself (no DLQ of its own) it is allowed."""
    async with login(tenants, "svc") as svc:
        with pytest.raises(E.PermissionDeniedError, match="x.dlq.dlq"):
            if declare == "queue":
                await svc.declare_queue("x.dlq")
            else:
                await svc.declare_stream("x.dlq")
        if declare == "queue":
            await svc.declare_queue("x.dlq", is_dlq=True)
    async with login(tenants, "admin") as adm:
        assert "x.dlq.dlq" not in [q["name"] for q in await adm.list_queues()]
