"""broker/limits.py: the memory high-water mark pauses publishers (and only
them) and resumes them; the free-disk mark refuses durable publishes. A real
Broker served in-process, so a test can raise and clear the memory flag
itself instead of growing the process to a gigabyte."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator
from pathlib import Path

import anyio

from tidings.broker.config import Config
from tidings.broker.ops.limits import ResourceMonitor, read_rss
from tidings.broker.app import Broker
from tidings.client import Client, connect
from tidings.client import errors as E

WAIT = 10.0


@contextlib.asynccontextmanager
async def served(tmp_path: Path, **settings: object) -> AsyncIterator[Broker]:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    broker = Broker(Config(port=0, data_dir=str(data), **settings))  # type: ignore[arg-type]
    async with anyio.create_task_group() as tg:
        tg.start_soon(functools.partial(broker.serve, install_signals=False))
        with anyio.fail_after(WAIT):
            await broker.ready.wait()
        yield broker
        tg.cancel_scope.cancel()


def url(broker: Broker) -> str:
    assert broker.bound_address is not None
    return f"tidings://127.0.0.1:{broker.bound_address[1]}"


async def until_paused(ctl: Client, n: int) -> None:
    with anyio.fail_after(WAIT):
        while (await ctl.call("stats"))["limits"]["paused_readers"] != n:
            await ctl.flush()


async def test_memory_high_water_pauses_publishers_while_consumers_drain(tmp_path: Path) -> None:
    async with served(tmp_path, memory_high_water=0, min_free_disk=0) as broker, \
            connect(url(broker)) as pub, connect(url(broker)) as subc, connect(url(broker)) as ctl:
            await ctl.declare_queue("work", bind=["work.>"])
            for i in range(20):
                await pub.publish(f"work.{i}", b"job")
            await pub.flush(timeout=WAIT)
            live = await subc.subscribe("live")

            broker.monitor.set_memory_high(True)
            await pub.publish("live", b"while paused")
            await until_paused(ctl, 1)
            stats = await ctl.call("stats")
            assert stats["limits"]["memory_high"] is True
            # a consumer keeps draining what is stored, and its acks are processed
            async with subc.consume("work", prefetch=5) as deliveries:
                for _ in range(20):
                    d = await deliveries.next(timeout=WAIT)
                    await d.ack(wait=True)
            assert (await ctl.queue_info("work"))["depth"] == 0
            await subc.flush(timeout=WAIT)
            assert live.pending == 0  # the paused publish has not been read yet

            broker.monitor.set_memory_high(False)
            assert (await live.next(timeout=WAIT)).payload == b"while paused"
            await until_paused(ctl, 0)
            await pub.publish("live", b"after")
            assert (await live.next(timeout=WAIT)).payload == b"after"
            assert pub.state == "connected" and pub.reconnects == 0


async def test_paused_publisher_is_kept_alive(tmp_path: Path) -> None:
    async with served(tmp_path, memory_high_water=0, min_free_disk=0) as broker, \
            connect(url(broker), heartbeat=0.5, dead_after=4.0) as pub, connect(url(broker)) as ctl:
            broker.monitor.set_memory_high(True)
            await pub.publish("x", b"1")
            await until_paused(ctl, 1)
            # longer than the client's dead_after: the broker's keepalive PINGs (every 1 s) must reach
            # it; dead_after leaves them 3 s of lateness on a busy machine
            await anyio.sleep(5.0)
            assert pub.state == "connected" and pub.reconnects == 0
            broker.monitor.set_memory_high(False)
            await pub.flush(timeout=WAIT)


async def test_low_disk_refuses_durable_publishes_only(tmp_path: Path) -> None:
    async with served(tmp_path, min_free_disk=2**62, memory_high_water=0) as broker:
        assert broker.monitor.disk_low
        async with connect(url(broker)) as tc:
            await tc.declare_queue("q", bind=["q.>"])
            try:
                await tc.publish("q.1", b"x")
            except E.StorageFullError as exc:
                assert "min_free_disk" in str(exc)
                assert exc.retriable
            else:
                raise AssertionError("a durable publish was accepted below min_free_disk")
            assert (await tc.queue_info("q"))["depth"] == 0
            sub = await tc.subscribe("plain")
            await tc.publish("plain", b"pubsub still works")
            assert (await sub.next(timeout=WAIT)).payload == b"pubsub still works"
            broker.monitor.min_free_disk = 1  # space "freed": the next check clears the flag
            broker.monitor.check()
            await tc.publish("q.2", b"y")
            assert (await tc.queue_info("q"))["depth"] == 1


def test_monitor_measures_rss_and_disk(tmp_path: Path) -> None:
    rss = read_rss()
    assert rss is not None and rss > 1024 * 1024
    m = ResourceMonitor(memory_high_water=1, min_free_disk=1, data_dir=str(tmp_path), interval=1.0)
    m.check()
    assert m.memory_high and not m.disk_low and m.rss > 0 and m.disk_free
    m = ResourceMonitor(memory_high_water=2**62, min_free_disk=2**62, data_dir=str(tmp_path), interval=1.0)
    m.check()
    assert not m.memory_high and m.disk_low


def test_window_budget_shares_fairly_and_never_hands_out_more_than_the_total() -> None:
    from tidings.broker.durable.window import WindowBudget

    b = WindowBudget(100)
    assert b.room(0) == 100  # nothing open: the whole budget
    b.open()
    a = b.hold(0, b.room(0))
    assert a == 100 and b.room(a) == 0
    b.open()  # a second window: its share is 50, but the first still holds everything
    assert b.share() == 50 and b.room(0) == 0
    a = b.hold(a, 30)  # the first delivered 70
    assert b.room(a) == 20 and b.room(0) == 50
    c = b.hold(0, b.room(0))
    assert b.used == 80 and b.room(a) == 20 and b.room(c) == 0
    b.hold(a, 0)
    b.hold(c, 0)
    b.close()
    b.close()
    assert (b.used, b.windows, b.room(0)) == (0, 0, 100)


def test_window_memory_setting() -> None:
    import pytest

    from tidings.broker.config import ConfigError, load

    assert load().window_memory == 256 * 1024 * 1024
    assert load(env={"TIDINGS_WINDOW_MEMORY": "1048576"}).window_memory == 1024 * 1024
    with pytest.raises(ConfigError, match="window_memory"):
        load(env={"TIDINGS_WINDOW_MEMORY": "0"})
