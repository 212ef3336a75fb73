"""Unchecked numbers (issue 10 item 4): every numeric field of a frame or call
is range- and type-checked when it is decoded, before any state changes. A bad
one is INVALID_ARGUMENT for that operation only: the connection keeps working,
nothing is stored, and no message is stranded."""

from __future__ import annotations

from typing import Any

import pytest

from tidings.client import connect
from tidings.client.errors import InvalidArgumentError
from tidings.protocol import ErrorCode
from tidings.protocol import frames as F
from tidings.protocol import numbers as N
from rawclient import RawClient

WAIT = 10.0
BIG = 2**64 - 1


async def expect_err(rc: RawClient, wire: list[Any], rid: int) -> F.Err:
    """Send ``wire``; its answer must be ERR INVALID_ARGUMENT for ``rid``; then PING still works."""
    await rc.send_wire(wire)
    ev = await rc.read_until(lambda f: isinstance(f, (F.Err, F.Ok)) and f.rid == rid, WAIT)
    assert isinstance(ev, F.Err) and ev.code == ErrorCode.INVALID_ARGUMENT, ev
    await rc.ping()
    return ev


async def test_publish_delay_2_64_is_refused_and_nothing_is_stored(broker) -> None:
    async with connect(broker.url) as tc:
        await tc.declare_queue("nums.q", bind=["nums.q.>"])
        async with RawClient.open(broker.host, broker.port) as rc:
            await rc.hello()
            await expect_err(rc, [F.Op.PUB, [["nums.q.x", b"p", None, None, 1, {"delay": BIG}]]], 0)
            # the same connection publishes a good message next
            await rc.send_wire([F.Op.PUB, [["nums.q.x", b"ok", None, None, 2, {"delay": 0}]]])
            conf = await rc.read_until(lambda f: isinstance(f, F.Confirm), WAIT)
            assert conf.items[0][0] == 2 and conf.items[0][1] == 0, conf
        assert (await tc.queue_info("nums.q"))["depth"] == 1
        with pytest.raises(InvalidArgumentError):
            await tc.publish("nums.q.x", b"p", delay=2.0**64)
    assert "Traceback" not in broker.stderr()
    assert broker.alive()


async def test_stream_read_from_time_2_64_is_refused_and_connection_lives(broker) -> None:
    async with connect(broker.url) as tc:
        await tc.declare_stream("nums.s", bind=["nums.s.>"])
        async with RawClient.open(broker.host, broker.port) as rc:
            await rc.hello()
            await expect_err(rc, [F.Op.CONSUME, 5, 1, {"stream": "nums.s", "start": {"time_ms": BIG}}], 5)
            # a good read on the same connection still works
            await rc.send_wire([F.Op.CONSUME, 6, 1, {"stream": "nums.s", "start": {"time_ms": 0}}])
            ok = await rc.read_until(lambda f: isinstance(f, (F.Ok, F.Err)) and f.rid == 6, WAIT)
            assert isinstance(ok, F.Ok), ok
    assert "Traceback" not in broker.stderr()


async def test_nack_with_a_string_does_not_strand_the_message(broker) -> None:
    async with connect(broker.url) as tc:
        await tc.declare_queue("nums.n", bind=["nums.n.>"], ack_deadline=300.0)
        await tc.publish("nums.n.x", b"job", confirm=True)
        async with RawClient.open(broker.host, broker.port) as rc:
            await rc.hello()
            await rc.send_wire([F.Op.CONSUME, 1, 1, {"queue": "nums.n", "prefetch": 1}])
            d = await rc.read_until(lambda f: isinstance(f, F.Deliver), WAIT)
            did = d.items[0][F.D_ID]
            await expect_err(rc, [F.Op.ACK, 2, 1, [[did, F.AckAction.NACK, "soon"]]], 2)
            info = await tc.queue_info("nums.n")
            assert (info["depth"], info["in_flight"]) == (1, 1), info  # still held by this consumer
            # the delivery is still ours to settle: a good NACK redelivers it at once
            await rc.send_wire([F.Op.ACK, 3, 1, [[did, F.AckAction.NACK, 0]]])
            # The answer comes once the NACK is committed; the redelivery may come before it.
            got: list[F.Frame] = []
            while not (any(isinstance(f, F.Deliver) for f in got)
                       and any(isinstance(f, (F.Ok, F.Err)) and f.rid == 3 for f in got)):
                got.append(await rc.read_until(
                    lambda f: isinstance(f, F.Deliver) or (isinstance(f, (F.Ok, F.Err)) and f.rid == 3), WAIT))
            ok = next(f for f in got if isinstance(f, (F.Ok, F.Err)))
            assert isinstance(ok, F.Ok) and ok.result == [0], ok
            again = next(f for f in got if isinstance(f, F.Deliver))
            assert again.items[0][F.D_PAYLOAD] == b"job" and again.items[0][F.D_COUNT] == 2
    assert "Traceback" not in broker.stderr()


# (id, wire frame with rid 7 where it has one, rid of the error)
TABLE: list[tuple[str, list[Any], int]] = [
    ("pub-delay-over", [F.Op.PUB, [["nums.t.x", b"p", None, None, 1, {"delay": N.MAX_DURATION_MS + 1}]]], 0),
    ("pub-ttl-2**64-1", [F.Op.PUB, [["nums.t.x", b"p", None, None, 1, {"ttl": BIG}]]], 0),
    ("pub-at-2**64-1", [F.Op.PUB, [["nums.t.x", b"p", None, None, 1, {"at": BIG}]]], 0),
    ("pub-delay-str", [F.Op.PUB, [["nums.t.x", b"p", None, None, 1, {"delay": "1"}]]], 0),
    ("nack-2**64-1", [F.Op.ACK, 7, 1, [[1, F.AckAction.NACK, BIG]]], 7),
    ("nack-negative", [F.Op.ACK, 7, 1, [[1, F.AckAction.NACK, -1]]], 7),
    ("ack-id-2**64-1", [F.Op.ACK, 7, 1, [[BIG, F.AckAction.ACK, None]]], 7),
    ("prefetch-2**64-1", [F.Op.CONSUME, 7, 1, {"queue": "nums.t", "prefetch": BIG}], 7),
    ("prefetch-str", [F.Op.CONSUME, 7, 1, {"queue": "nums.t", "prefetch": "5"}], 7),
    ("window-0", [F.Op.CONSUME, 7, 1, {"stream": "nums.ts", "group": "g", "window": 0}], 7),
    ("partition-2**64-1", [F.Op.CONSUME, 7, 1, {"stream": "nums.ts", "partition": BIG}], 7),
    ("start-offset-2**64-1", [F.Op.CONSUME, 7, 1, {"stream": "nums.ts", "start": BIG}], 7),
    ("time-negative", [F.Op.CONSUME, 7, 1, {"stream": "nums.ts", "start": {"time_ms": -1}}], 7),
    ("dlq-list-offset-2**64-1", [F.Op.CALL, 7, "dlq.list", {"name": "nums.t.dlq", "offset": BIG}], 7),
    ("dlq-redrive-count-0", [F.Op.CALL, 7, "dlq.redrive", {"name": "nums.t.dlq", "count": 0}], 7),
    ("declare-max-length-2**64-1", [F.Op.CALL, 7, "queue.declare", {"name": "nums.x", "max_length": BIG}], 7),
    ("declare-max-deliveries-2**64-1",
     [F.Op.CALL, 7, "queue.declare", {"name": "nums.x", "max_deliveries": BIG}], 7),
    ("declare-backoff-inf", [F.Op.CALL, 7, "queue.declare", {"name": "nums.x", "backoff_schedule": [1e300]}], 7),
    ("stream-max-bytes-2**64-1", [F.Op.CALL, 7, "stream.declare", {"name": "nums.y", "max_bytes": BIG}], 7),
    ("stream-max-age-huge", [F.Op.CALL, 7, "stream.declare", {"name": "nums.y", "max_age": 1e300}], 7),
]


async def test_every_numeric_field_is_checked(broker) -> None:
    async with connect(broker.url) as tc:
        await tc.declare_queue("nums.t", bind=["nums.t.>"])
        await tc.declare_stream("nums.ts", bind=["nums.ts.>"])
        async with RawClient.open(broker.host, broker.port) as rc:
            await rc.hello()
            for case, wire, rid in TABLE:
                try:
                    await expect_err(rc, wire, rid)
                except AssertionError as exc:
                    raise AssertionError(f"{case}: {exc}") from None
        # nothing was stored or created by any of them
        assert (await tc.queue_info("nums.t"))["depth"] == 0
        names = {q["name"] for q in await tc.list_queues()}
        assert "nums.x" not in names
        assert "nums.y" not in {s["name"] for s in await tc.list_streams()}
    assert "Traceback" not in broker.stderr()
