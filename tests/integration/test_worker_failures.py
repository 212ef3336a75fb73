"""What the Worker tells the dead-letter queue, and what it never logs.

A failed handler's exception type and message reach the DLQ's
``tidings-last-error`` header (NACK carries it: docs/PROTOCOL.md 7.15);
``raise Reject(reason)`` and ``non_retryable`` types dead-letter at once;
``max_retries`` bounds the attempts from the client side; and neither the
payload nor the error text (which may quote it) is logged.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
import pytest
from queuetools import WAIT, declare, headers_of

from tidings.client import Worker, connect
from tidings.client.consumer import Delivery
from tidings.client.worker import Reject

SECRET = b"card=4111-1111-1111-1111"


async def _run_until_dead_lettered(tc: Any, worker: Worker, dlq: str) -> Any:
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        async with tc.consume(dlq) as dead:
            d = await dead.next(timeout=WAIT)
            await d.ack()
        tg.cancel_scope.cancel()
    return d


async def test_exception_text_reaches_the_dlq_after_max_deliveries(broker) -> None:
    async with connect(broker.url) as tc:
        await declare(tc, "wl", max_deliveries=2, backoff_schedule=[0.01])
        await tc.publish("wl.a", SECRET)

        async def handle(d: Delivery) -> None:
            raise ValueError(f"cannot parse attempt {d.delivery_count}")

        worker = Worker(tc, handle, queue="wl", failure_threshold=100)
        d = await _run_until_dead_lettered(tc, worker, "wl.dlq")
        h = headers_of(d)
        assert (h["tidings-dlq-reason"], h["tidings-delivery-count"]) == ("max_deliveries", 2)
        assert h["tidings-last-error"] == "ValueError: cannot parse attempt 2"


async def test_reject_dead_letters_at_once_with_its_reason(broker) -> None:
    async with connect(broker.url) as tc:
        await declare(tc, "wr", max_deliveries=5)
        await tc.publish("wr.a", b"{not json")
        calls = 0

        async def handle(d: Delivery) -> None:
            nonlocal calls
            calls += 1
            raise Reject("order has no id")

        worker = Worker(tc, handle, queue="wr", failure_threshold=1)
        d = await _run_until_dead_lettered(tc, worker, "wr.dlq")
        h = headers_of(d)
        assert (h["tidings-dlq-reason"], h["tidings-delivery-count"], h["tidings-last-error"]) == (
            "rejected", 1, "order has no id")
        assert calls == 1
        # a reject is a verdict on the message, not a failure: the breaker stays closed
        assert (worker.rejected, worker.failed, worker.state) == (1, 0, "closed")


async def test_non_retryable_types_dead_letter_at_once(broker) -> None:
    async with connect(broker.url) as tc:
        await declare(tc, "wn", max_deliveries=5)
        await tc.publish("wn.a", b"x")

        async def handle(d: Delivery) -> None:
            raise KeyError("customer")

        worker = Worker(tc, handle, queue="wn", failure_threshold=100, non_retryable=(LookupError,))
        d = await _run_until_dead_lettered(tc, worker, "wn.dlq")
        h = headers_of(d)
        assert (h["tidings-delivery-count"], h["tidings-last-error"]) == (1, "KeyError: 'customer'")


async def test_max_retries_then_dead_letter_with_the_error_text(broker) -> None:
    async with connect(broker.url) as tc:
        await declare(tc, "wm", max_deliveries=0, backoff_schedule=[0.01])  # 0: the queue never gives up
        await tc.publish("wm.a", b"x")
        attempts: list[int] = []

        async def handle(d: Delivery) -> None:
            attempts.append(d.delivery_count)
            raise RuntimeError("downstream said 503")

        worker = Worker(tc, handle, queue="wm", failure_threshold=100, max_retries=2)
        d = await _run_until_dead_lettered(tc, worker, "wm.dlq")
        assert attempts == [1, 2, 3]
        h = headers_of(d)
        assert (h["tidings-delivery-count"], h["tidings-last-error"]) == (3, "RuntimeError: downstream said 503")


async def test_long_error_text_is_cut_to_the_bound(broker) -> None:
    async with connect(broker.url) as tc:
        await declare(tc, "wt")
        await tc.publish("wt.a", b"x")

        async def handle(d: Delivery) -> None:
            raise Reject("x" * 100_000)

        d = await _run_until_dead_lettered(tc, Worker(tc, handle, queue="wt"), "wt.dlq")
        assert headers_of(d)["tidings-last-error"] == "x" * 1000


async def test_payload_and_error_text_are_never_logged(broker, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="tidings")
    async with connect(broker.url) as tc:
        await declare(tc, "wp", max_deliveries=1)
        await tc.publish("wp.a", SECRET)

        async def handle(d: Delivery) -> None:
            raise ValueError(f"bad input {d.payload!r}")  # error texts often quote the input

        d = await _run_until_dead_lettered(tc, Worker(tc, handle, queue="wp", failure_threshold=100), "wp.dlq")
        assert SECRET.decode() in headers_of(d)["tidings-last-error"]
    assert "handler failed" in caplog.text and "ValueError" in caplog.text
    assert "4111" not in caplog.text


async def test_stream_group_worker_error_text_and_reject_move_the_partition_on(broker) -> None:
    """In a stream group a nack's error reaches the stream DLQ too (group.py), and a
    rejected message is settled: the partition goes on past it, in order."""
    async with connect(broker.url) as tc:
        await tc.declare_stream("ws", partitions=1, bind=["ws.>"], backoff_initial=0.01, max_deliveries=2)
        for body in (b"flaky", b"bad", b"good"):
            await tc.publish("ws.a", body, key="k")
        handled: list[tuple[bytes, int]] = []
        good = anyio.Event()

        async def handle(m: Any) -> None:
            handled.append((m.payload, m.delivery_count))
            if m.payload == b"flaky":
                raise TimeoutError("upstream timed out")
            if m.payload == b"bad":
                raise Reject("schema v9 unknown")
            good.set()

        worker = Worker(tc, handle, stream="ws", group="g", failure_threshold=100)
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            with anyio.fail_after(WAIT):
                await good.wait()
            tg.cancel_scope.cancel()
        # (later offsets may count a delivery voided by the rewind after the first failure)
        assert [p for p, _ in handled] == [b"flaky", b"flaky", b"bad", b"good"]
        assert handled[:2] == [(b"flaky", 1), (b"flaky", 2)]
        with anyio.fail_after(WAIT):
            while len(dead := await tc.dlq_list("ws.dlq")) < 2:
                await anyio.sleep(0.02)  # the DLQ copies commit just after the acks (bounded poll)
        assert [(d["payload"], d["headers"]["tidings-last-error"]) for d in dead] == [
            (b"flaky", "TimeoutError: upstream timed out"), (b"bad", "schema v9 unknown")]
