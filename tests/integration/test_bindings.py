"""Durable binding patterns travel after the handshake, per user, capped
(issue 10.2 and the WELCOME part of 10.14).

WELCOME used to carry every binding pattern and had to fit the 16 KiB
pre-handshake frame limit: 1,200 queues, or one declare with many
patterns, stopped every client from connecting (also after a restart).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from tidings.client import connect
from tidings.client import errors as E
from tidings.protocol import ErrorCode
from tidings.protocol import frames as F
from tidings.protocol.codec import PRE_HELLO_MAX_FRAME, Encoder
from rawclient import RawClient
from securitytools import PASSWORDS, WAIT, user, write_config

QUEUES = 1_200


async def declare_many(c: Any, n: int) -> None:
    async def one(i: int) -> None:
        await c.call("queue.declare", {"name": f"work.q{i:04d}", "bind": [f"work.q{i:04d}.>"]}, timeout=60)

    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(one, i)


async def raw_bindings(rc: RawClient, auth: dict[str, Any] | None = None) -> tuple[F.Welcome, list[str], int]:
    """Handshake by hand; return WELCOME, the complete first binding set and how many NOTICEs carried it."""
    await rc.send(F.Hello(F.PROTOCOL_VERSION, "raw", auth, {}))
    welcome = await rc.read_until(lambda f: isinstance(f, (F.Welcome, F.Err)), WAIT)
    assert isinstance(welcome, F.Welcome), welcome
    patterns: list[str] = []
    notices = 0
    while True:
        ev = await rc.read_until(lambda f: isinstance(f, F.Notice) and f.kind == "bindings", WAIT)
        assert isinstance(ev, F.Notice)
        notices += 1
        assert ev.info["epoch"] == welcome.info["bindings"]["epoch"]
        patterns += ev.info["patterns"]
        if not ev.info["more"]:
            return welcome, patterns, notices


async def assert_durable_publish_confirmed(url: str, subject: str) -> None:
    """A publish made right after connect() to a bound subject is confirmed (stored)."""
    async with connect(url, timeout=WAIT) as c:
        ack = await c.publish(subject, b"right after connect")
        assert ack is not None and ack.queues >= 1, ack


async def test_many_queues_do_not_stop_clients_connecting(start_broker) -> None:
    broker = start_broker("--durability", "normal")
    async with connect(broker.url) as admin:
        await declare_many(admin, QUEUES)
    for round_ in ("declared", "restarted"):
        async with RawClient.open(broker.host, broker.port) as rc:
            welcome, patterns, notices = await raw_bindings(rc)
        # the handshake reply is small whatever is declared; the patterns came after it
        assert len(Encoder().encode_value(welcome.to_wire())) < 1024, round_
        assert "patterns" not in welcome.info["bindings"]
        assert len(patterns) == QUEUES and notices > 1, (round_, len(patterns), notices)
        await assert_durable_publish_confirmed(broker.url, f"work.q{QUEUES - 1:04d}.x")
        if round_ == "declared":
            broker.terminate()
            broker.restart()


async def test_bind_patterns_are_capped_per_declare_and_in_total(start_broker) -> None:
    broker = start_broker(env={"TIDINGS_MAX_BINDINGS": "100"})
    async with connect(broker.url) as c:
        many = [f"t.p{i}.>" for i in range(80)]
        with pytest.raises(E.InvalidArgumentError, match="max_bind_patterns"):
            await c.call("queue.declare", {"name": "wide", "bind": many})
        with pytest.raises(E.InvalidArgumentError, match="max_bind_patterns"):
            await c.call("stream.declare", {"name": "wides", "partitions": 1, "bind": many})
        await c.call("queue.declare", {"name": "ok1", "bind": many[:64]})
        with pytest.raises(E.TidingsError, match="max_bindings") as info:
            await c.call("stream.declare", {"name": "ok2", "partitions": 1, "bind": many[:40]})
        assert info.value.code == ErrorCode.OVERLOADED
        assert "ok2" not in [s["name"] for s in await c.call("stream.list")]
    # clients still connect and get confirms on the bound subjects
    await assert_durable_publish_confirmed(broker.url, "t.p63.x")


async def test_a_pattern_set_larger_than_the_pre_handshake_limit_still_connects(start_broker) -> None:
    broker = start_broker("--durability", "normal")
    async with connect(broker.url) as c:
        long = ["x" * 200 + f".k{i:03d}.>" for i in range(64)]
        await c.call("queue.declare", {"name": "longbinds", "bind": long})
        assert sum(len(p) for p in long) > PRE_HELLO_MAX_FRAME / 2
        await c.call("queue.declare", {"name": "longbinds2", "bind": [p.replace("x", "y") for p in long]})
    async with RawClient.open(broker.host, broker.port) as rc:
        _welcome, patterns, notices = await raw_bindings(rc)
    assert len(patterns) == 128 and notices >= 2
    await assert_durable_publish_confirmed(broker.url, long[5][:-1] + "z")


@pytest.fixture
def tenant_broker(start_broker, tmp_path: Path):
    cfg = write_config(tmp_path / "tidings.toml", users={
        **user("admin", publish=[">"], subscribe=[">"], consume=[">"], admin=[">"]),
        **user("alice", publish=["t1.>"], publish_deny=["t1.private.>"], subscribe=["t1.>"]),
        **user("bob"),  # no permissions at all
    })
    return start_broker("--config", str(cfg))


async def test_each_user_gets_only_the_patterns_it_may_publish_into(tenant_broker) -> None:
    b = tenant_broker
    async with connect(b.url, user="admin", password=PASSWORDS["admin"]) as adm:
        for name, bind in (("t1.jobs", ["t1.jobs.>"]), ("t1.priv", ["t1.private.keys"]),
                           ("pay.jobs", ["pay.jobs", "pay.refunds.*"]), ("all", [">"])):
            await adm.call("queue.declare", {"name": name, "bind": bind})

    async def patterns_of(name: str) -> list[str]:
        async with RawClient.open(b.host, b.port) as rc:
            return (await raw_bindings(rc, {"user": name, "password": PASSWORDS[name]}))[1]

    assert sorted(await patterns_of("admin")) == [">", "pay.jobs", "pay.refunds.*", "t1.jobs.>",
                                                  "t1.private.keys"]
    # ">" overlaps t1.> (alice may publish into it); t1.private.keys is wholly denied to her
    assert sorted(await patterns_of("alice")) == [">", "t1.jobs.>"]
    assert await patterns_of("bob") == []
    # a change reaches every connected user, filtered the same way
    async with RawClient.open(b.host, b.port) as rc:
        await raw_bindings(rc, {"user": "bob", "password": PASSWORDS["bob"]})
        async with connect(b.url, user="alice", password=PASSWORDS["alice"]) as alice:
            async with connect(b.url, user="admin", password=PASSWORDS["admin"]) as adm:
                await adm.call("queue.declare", {"name": "t1.more", "bind": ["t1.more.>"]})
            await alice.flush()  # her PONG was queued after the bindings notice
            ack = await alice.publish("t1.more.x", b"durable")
            assert ack is not None and ack.queues == 2  # t1.more and "all"
        ev = await rc.read_until(lambda f: isinstance(f, F.Notice) and f.kind == "bindings", WAIT)
        assert ev.info["patterns"] == [] and ev.info["more"] is False


async def test_after_a_broker_restart_the_client_takes_the_new_binding_set(start_broker) -> None:
    """A restarted broker counts binding epochs from 0 again: the reconnected client must
    not keep its old set because the new epochs are lower."""
    broker = start_broker("--durability", "normal")
    async with connect(broker.url, timeout=WAIT) as c:
        for i in range(3):
            await c.call("queue.declare", {"name": f"before{i}", "bind": [f"before{i}.>"]})
        await c.flush()
        broker.terminate()
        broker.restart()
        await c.wait_connected(timeout=WAIT)
        async with connect(broker.url) as admin:
            await admin.call("queue.declare", {"name": "after", "bind": ["after.>"]})
        await c.flush()  # the bindings NOTICE was queued before this PONG
        ack = await c.publish("after.x", b"durable")
        assert ack is not None and ack.queues == 1
