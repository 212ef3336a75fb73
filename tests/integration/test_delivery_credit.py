"""Outbound bytes per connection are bounded for every kind of delivery (issue 10
item 3). A consumer that never reads holds its deliveries back as credit
(nothing lost) instead of filling the broker's memory; other consumers keep
being served; the caps on subscriptions, consumers and groups are typed
errors; a reply larger than the client's max_frame fails that call only."""

from __future__ import annotations

from collections import deque
from typing import Any

import anyio
import pytest

from tidings.client import Client, connect
from tidings.client.errors import LimitExceededError
from tidings.protocol import ErrorCode
from tidings.protocol import frames as F
from rawclient import RawClient
from securitytools import PASSWORDS, user, write_config

WAIT = 30.0
MB = 1024 * 1024
LIMIT = 1 * MB  # max_pending_bytes of these brokers
SIZE = 8 * 1024
# rc stops reading on purpose, so it cannot answer the broker's heartbeat PINGs: with the
# default (20 s, closed after two misses) a slow disk that stretches the publish past 40 s
# closed rc before the test looked (seen in CI). The heartbeat is not what these tests test.
CREDIT_ENV = {"TIDINGS_MAX_PENDING_BYTES": str(LIMIT), "TIDINGS_HEARTBEAT": "3600"}


async def publish_numbered(tc: Client, subject: str, first: int, n: int) -> None:
    """Publish payloads numbered first..first+n-1 (8 KiB each) with confirms, 500 in flight."""
    pending: deque[Any] = deque()
    filler = b"x" * (SIZE - 8)
    for i in range(first, first + n):
        if len(pending) >= 500:
            await pending.popleft()
        pending.append(tc.publish_nowait(subject, i.to_bytes(8, "big") + filler, confirm=True))
    while pending:
        await pending.popleft()


async def stats(tc: Client) -> dict[str, Any]:
    result: dict[str, Any] = await tc.call("stats")
    return result


async def wait_for(tc: Client, pred: Any, what: str, timeout: float = 60.0) -> dict[str, Any]:
    """Poll the stats call (bounded) until ``pred(stats)``."""
    with anyio.fail_after(timeout):
        while True:
            s = await stats(tc)
            if pred(s):
                return s
            await anyio.sleep(0.05)  # a bounded poll of broker state, not a synchronisation sleep


async def read_deliveries(rc: RawClient, cid: int, want: set[int], timeout: float = 90.0) -> list[int]:
    """Read DELIVER frames for ``cid``, ack each batch, until every number in ``want`` came."""
    got: list[int] = []
    with anyio.fail_after(timeout):
        while not want.issubset(got):
            f = await rc.read_frame()
            if isinstance(f, F.Deliver) and f.cid == cid:
                got.extend(int.from_bytes(it[F.D_PAYLOAD][:8], "big") for it in f.items)
                await rc.send_wire([F.Op.ACK, 0, cid, [[it[F.D_ID], F.AckAction.ACK, None] for it in f.items]])
    return got


@pytest.mark.timeout(300)
async def test_a_consumer_that_never_reads_keeps_broker_memory_bounded(start_broker) -> None:
    n = 20_000  # 160 MB of payload; prefetch 10,000 used to pull 80 MB of it into one outbound buffer
    broker = start_broker(env=CREDIT_ENV)
    async with connect(broker.url, timeout=60) as tc, connect(broker.url, timeout=60) as other:
        await tc.declare_queue("credit", bind=["credit.>"], ack_deadline=3600.0)
        async with RawClient.open(broker.host, broker.port) as rc:
            await rc.hello()
            await rc.send_wire([F.Op.CONSUME, 1, 1, {"queue": "credit", "prefetch": 10_000}])
            ok = await rc.read_until(lambda f: isinstance(f, (F.Ok, F.Err)) and f.rid == 1, WAIT)
            assert isinstance(ok, F.Ok), ok
            # from here on rc does not read its socket
            before = broker.rss_bytes()
            await publish_numbered(tc, "credit.a", 0, n)
            s = await wait_for(tc, lambda s: s["credit_waits"] >= 1, "the queue to hold deliveries back")
            info = await tc.queue_info("credit")
            grown = broker.rss_bytes() - before
            assert info["depth"] == n
            # what left the broker sits in loopback socket buffers (a few MB at most)
            assert info["in_flight"] < 2_500, info
            assert s["outbound_bytes_max"] <= LIMIT + 64 * 1024, s
            # measured: +209 MB before the fix (10,000 in flight, 10,000 more in the queue's
            # window) and +125 MB after it, most of which is the window (10,000 x 8 KiB)
            assert grown < 170 * MB, f"RSS grew {grown / MB:.0f} MB"

            # another connection keeps being served while rc is full
            async with other.consume("credit", prefetch=100) as deliveries:
                served = []
                for _ in range(300):
                    d = await deliveries.next(timeout=WAIT)
                    served.append(int.from_bytes(d.payload[:8], "big"))
                    await d.ack()
            await other.flush()

            # once rc reads, it gets every other message, each once
            rest = set(range(n)) - set(served)
            got = await read_deliveries(rc, 1, rest)
            assert len(got) == len(set(got)) and set(got) | set(served) == set(range(n))
            assert not set(got) & set(served)
    assert "Traceback" not in broker.stderr()


async def test_stream_group_and_reader_deliveries_wait_for_credit(start_broker) -> None:
    n = 2_000  # 16 MB against a 1 MiB mailbox
    broker = start_broker(env=CREDIT_ENV)
    async with connect(broker.url, timeout=60) as tc:
        await tc.declare_stream("cs", bind=["cs.>"], partitions=2)
        await publish_numbered(tc, "cs.a", 0, n)
        async with RawClient.open(broker.host, broker.port) as rc:
            await rc.hello()
            await rc.send_wire([F.Op.CONSUME, 1, 1, {"stream": "cs", "group": "g", "window": 10_000}])
            await rc.send_wire([F.Op.CONSUME, 2, 2, {"stream": "cs", "partition": 0, "start": "earliest"}])
            await rc.send_wire([F.Op.CONSUME, 3, 3, {"stream": "cs", "partition": 1, "start": "earliest"}])
            s = await wait_for(tc, lambda s: s["credit_waits"] >= 1 and s["outbound_bytes_max"] > 0,
                               "the group to hold deliveries back")
            assert s["outbound_bytes_max"] <= LIMIT + 64 * 1024, s
            # the group and both readers still deliver everything once rc reads
            group: list[int] = []
            readers: list[int] = []
            with anyio.fail_after(90):
                while len(set(group)) < n or len(readers) < n:
                    f = await rc.read_frame()
                    if not isinstance(f, F.Deliver):
                        continue
                    nums = [int.from_bytes(it[F.D_PAYLOAD][:8], "big") for it in f.items]
                    if f.cid == 1:
                        group.extend(nums)
                        await rc.send_wire([F.Op.ACK, 0, 1, [[it[F.D_ID], 0, None] for it in f.items]])
                    else:
                        readers.extend(nums)
            assert sorted(set(group)) == list(range(n)) and sorted(readers) == list(range(n))
        s = await stats(tc)
        assert s["outbound_bytes_max"] <= LIMIT + 64 * 1024


@pytest.mark.parametrize("kind", ["queue", "group"])
async def test_a_consumer_that_reads_before_it_acks_gets_its_whole_window(start_broker, kind: str) -> None:
    """A consumer that acks only once it holds its whole window (a batch consumer):
    the deliveries that ran out of credit must follow as soon as the connection has
    sent the first ones. The queue and the group used to stop after the first 1 MiB
    and wait for an ack (or the ack deadline) that this consumer never sends first."""
    n = 600  # 4.8 MB against a 1 MiB mailbox
    broker = start_broker(env=CREDIT_ENV)
    async with connect(broker.url, timeout=60) as tc:
        if kind == "queue":
            await tc.declare_queue("batch", bind=["batch.>"], ack_deadline=3600.0)
            ctx: Any = tc.consume("batch", prefetch=n)
        else:
            await tc.declare_stream("batch", bind=["batch.>"])
            ctx = tc.stream_consume("batch", "g", window=n)
        await publish_numbered(tc, "batch.a", 0, n)
        async with ctx as deliveries:
            got = [await deliveries.next(timeout=WAIT) for _ in range(n)]
            assert sorted(int.from_bytes(d.payload[:8], "big") for d in got) == list(range(n))
            for d in got:
                await d.ack()


async def test_caps_on_subscriptions_consumers_and_groups_are_typed_errors(start_broker) -> None:
    broker = start_broker(env={"TIDINGS_MAX_SUBSCRIPTIONS_PER_CONNECTION": "3",
                               "TIDINGS_MAX_CONSUMERS_PER_CONNECTION": "2",
                               "TIDINGS_MAX_GROUPS_PER_STREAM": "2"})
    async with connect(broker.url) as tc:
        await tc.declare_queue("capq", bind=["capq.>"])
        await tc.declare_stream("caps", bind=["caps.>"])
        async with RawClient.open(broker.host, broker.port) as rc:
            await rc.hello()
            for sid in (1, 2, 3):
                await rc.subscribe(f"s.{sid}", sid)
            await rc.send_wire([F.Op.SUB, 10, 4, "s.4", None])
            err = await rc.read_until(lambda f: isinstance(f, (F.Ok, F.Err)) and f.rid == 10, WAIT)
            assert isinstance(err, F.Err) and err.code == ErrorCode.LIMIT_EXCEEDED, err
            # groups: two exist, a third is refused (a member of an existing one is not)
            for rid, cid, group in ((11, 1, "g1"), (12, 2, "g2")):
                await rc.send_wire([F.Op.CONSUME, rid, cid, {"stream": "caps", "group": group}])
                ok = await rc.read_until(lambda f, r=rid: isinstance(f, (F.Ok, F.Err)) and f.rid == r, WAIT)
                assert isinstance(ok, F.Ok), ok
            # consumers: the connection holds two, a third is refused
            await rc.send_wire([F.Op.CONSUME, 13, 3, {"queue": "capq"}])
            err = await rc.read_until(lambda f: isinstance(f, (F.Ok, F.Err)) and f.rid == 13, WAIT)
            assert isinstance(err, F.Err) and err.code == ErrorCode.LIMIT_EXCEEDED, err
            await rc.ping()
        async with connect(broker.url) as other:
            with pytest.raises(LimitExceededError):
                async with other.stream_consume("caps", "g3"):
                    pass
            async with other.stream_consume("caps", "g1"):
                pass
    assert broker.alive()


async def test_per_user_caps_count_every_connection_of_the_user(start_broker, tmp_path) -> None:
    cfg = write_config(tmp_path / "tidings.toml", users=user("alice", publish=[">"], subscribe=[">"],
                                                                consume=[">"], admin=[">"]))
    broker = start_broker("--config", str(cfg), env={"TIDINGS_MAX_SUBSCRIPTIONS_PER_USER": "2",
                                                      "TIDINGS_MAX_CONSUMERS_PER_USER": "1"})
    url, pw = broker.url, PASSWORDS["alice"]
    async with connect(url, user="alice", password=pw) as a1, connect(url, user="alice", password=pw) as a2:
        await a1.declare_queue("uq", bind=["uq.>"])
        await a1.subscribe("u.1")
        await a2.subscribe("u.2")
        with pytest.raises(LimitExceededError):
            await a2.subscribe("u.3")
        async with a1.consume("uq"):
            with pytest.raises(LimitExceededError):
                async with a2.consume("uq"):
                    pass
        # released: the user may consume again
        async with a2.consume("uq"):
            pass


async def test_a_reply_larger_than_the_clients_max_frame_fails_that_call_only(broker) -> None:
    async with connect(broker.url) as tc:
        await tc.declare_stream("wide", bind=["wide.>"], partitions=256)
        async with tc.stream_consume("wide", "g"):  # a group lists every partition: its info is > 16 KiB
            pass
        async with RawClient.open(broker.host, broker.port, max_frame=16 * 1024) as rc:
            await rc.send(F.Hello(F.PROTOCOL_VERSION, "small", None, {"max_frame": 16 * 1024}))
            await rc.read_until(lambda f: isinstance(f, F.Welcome), WAIT)
            await rc.send_wire([F.Op.CALL, 5, "stream.info", {"name": "wide"}])
            err = await rc.read_until(lambda f: isinstance(f, (F.Ok, F.Err)) and f.rid == 5, WAIT)
            assert isinstance(err, F.Err) and err.code == ErrorCode.REPLY_TOO_LARGE, err
            # the connection is still usable, for small replies too
            await rc.ping()
            await rc.send_wire([F.Op.CALL, 6, "server.info", {}])
            ok = await rc.read_until(lambda f: isinstance(f, (F.Ok, F.Err)) and f.rid == 6, WAIT)
            assert isinstance(ok, F.Ok), ok
    assert "Traceback" not in broker.stderr()

