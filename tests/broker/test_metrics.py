"""broker/ops/metrics.py in-process: a real Broker served on the test's loop, its
HTTP port (broker/http/) beside it, scraped over loopback and parsed as Prometheus text."""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import pytest

from tidings.broker.config import Config
from tidings.broker.http.app import build_server
from tidings.broker.ops.metrics import BrokerCollector, install_hooks, readiness
from tidings.broker.durable.queue import QueueActor
from tidings.broker.durable.settings import QueueConfig
from tidings.broker.app import Broker
from tidings.client import connect
from tidings.client.errors import TidingsError
from tests.opshttp import get, parse, request, value

WAIT = 10.0


def config(tmp_path: Path) -> Config:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)  # `tidings serve` creates it before starting the broker
    return Config(port=0, data_dir=str(data))


async def aget(addr: tuple[str, int], path: str, **kw: Any) -> tuple[int, dict[str, str], bytes]:
    return await anyio.to_thread.run_sync(functools.partial(get, addr[0], addr[1], path, **kw))


async def ascrape(addr: tuple[str, int]) -> dict[Any, float]:
    status, headers, body = await aget(addr, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    return parse(body.decode())


@contextlib.asynccontextmanager
async def served(tmp_path: Path) -> AsyncIterator[tuple[Broker, tuple[str, int]]]:
    """A broker serving clients on a free port, with its HTTP port."""
    broker = Broker(config(tmp_path))
    async with anyio.create_task_group() as tg:
        addr = await tg.start(build_server(broker, "127.0.0.1", 0).run)
        tg.start_soon(functools.partial(broker.serve, install_signals=False))
        with anyio.fail_after(WAIT):
            await broker.ready.wait()
        yield broker, addr
        tg.cancel_scope.cancel()


def url(broker: Broker) -> str:
    assert broker.bound_address is not None
    return f"tidings://127.0.0.1:{broker.bound_address[1]}"


async def take(deliveries: Any, n: int) -> list[Any]:
    out = []
    with anyio.fail_after(WAIT):
        async for d in deliveries:
            out.append(d)
            if len(out) == n:
                break
    return out


async def test_health_flips_with_the_broker_lifecycle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broker = Broker(config(tmp_path))
    async with anyio.create_task_group() as outer:
        addr = await outer.start(build_server(broker, "127.0.0.1", 0).run)
        assert f"tidings metrics on http://127.0.0.1:{addr[1]}" in capsys.readouterr().out
        # before storage is recovered and the listener bound: alive, not ready
        assert (await aget(addr, "/healthz"))[0] == 200
        status, _, body = await aget(addr, "/readyz")
        assert status == 503 and b"storage: false" in body and b"listener: false" in body
        assert value(await ascrape(addr), "tidings_ready") == 0
        async with anyio.create_task_group() as inner:
            inner.start_soon(functools.partial(broker.serve, install_signals=False))
            with anyio.fail_after(WAIT):
                await broker.ready.wait()
            status, _, body = await aget(addr, "/readyz")
            assert status == 200, body
            assert value(await ascrape(addr), "tidings_ready") == 1
            inner.cancel_scope.cancel()  # the broker shuts down (drain, close the store)
        assert broker.shutting_down
        status, _, body = await aget(addr, "/readyz")
        assert status == 503 and b"shutting_down: true" in body and b"storage: false" in body
        assert (await aget(addr, "/healthz"))[0] == 200
        outer.cancel_scope.cancel()


def test_readiness_needs_open_storage() -> None:
    stub = SimpleNamespace(ready=SimpleNamespace(is_set=lambda: True), bound_address=("127.0.0.1", 1),
                           shutting_down=False, durable=SimpleNamespace(store=SimpleNamespace(is_open=False)))
    assert readiness(stub) == {"ready": False, "listener": True, "storage": False, "storage_stalled": False,
                               "shutting_down": False}
    stub.durable.store.is_open = True
    assert readiness(stub)["ready"] is True
    stub.durable.store.stalled = True  # a storage transaction past store_stall_timeout
    assert readiness(stub)["ready"] is False
    stub.durable.store.stalled = False
    stub.shutting_down = True
    assert readiness(stub)["ready"] is False


async def test_metrics_follow_a_known_workload(tmp_path: Path) -> None:
    async with served(tmp_path) as (broker, addr):
        before = await ascrape(addr)
        assert value(before, "tidings_connections") == 0
        async with connect(url(broker), reconnect=False) as tc:
            await tc.declare_queue("jobs", bind=["jobs.>"], max_deliveries=5)
            await tc.declare_stream("ev", partitions=2, bind=["ev.>"])
            for i in range(10):
                await tc.publish("jobs.x", f"job {i}".encode())
            for i in range(6):
                await tc.publish("ev.x", f"ev {i}".encode(), key=f"k{i % 3}")
            await tc.publish("plain.subject", b"nobody listens")
            await tc.flush()
            with pytest.raises(TidingsError):
                await tc.call("no.such.method")
            async with tc.consume("jobs", prefetch=100) as deliveries:
                got = await take(deliveries, 10)
                for d in got[:6]:
                    await d.ack(wait=True)
                for d in got[6:8]:
                    await d.nack(0, wait=True)
                for d in got[8:]:
                    await d.reject("bad", wait=True)
                again = await take(deliveries, 2)
                assert all(d.redelivered for d in again)
                for d in again:
                    await d.ack(wait=True)
            async with tc.consume("jobs.dlq") as dead:  # the moves to the DLQ have committed once these arrive
                for d in await take(dead, 2):
                    await d.ack(wait=True)
            async with tc.stream_consume("ev", "readers", window=10) as msgs:
                seen = await take(msgs, 4)
                for m in seen:
                    await m.ack(wait=True)
                s = await ascrape(addr)
                assert value(s, "tidings_stream_group_members", stream="ev", group="readers") == 1
            assert value(s, "tidings_connections") == 1
            qinfo = await tc.queue_info("jobs")
            sinfo = await tc.stream_info("ev")

        q = {"queue": "jobs"}
        assert value(s, "tidings_queue_published_total", **q) == 10
        assert value(s, "tidings_queue_delivered_total", **q) == 12
        assert value(s, "tidings_queue_redelivered_total", **q) == 2
        assert value(s, "tidings_queue_acked_total", **q) == 8
        assert value(s, "tidings_queue_nacked_total", **q) == 2
        assert value(s, "tidings_queue_rejected_total", **q) == 2
        assert value(s, "tidings_queue_dead_lettered_total", **q) == 2
        assert value(s, "tidings_queue_expired_total", **q) == 0
        assert value(s, "tidings_queue_depth", **q) == qinfo["depth"] == 0
        assert value(s, "tidings_queue_in_flight", **q) == 0
        assert value(s, "tidings_queue_published_total", queue="jobs.dlq") == 2
        assert value(s, "tidings_queue_acked_total", queue="jobs.dlq") == 2
        assert value(s, "tidings_queue_depth", queue="jobs.dlq") == 0
        assert value(s, "tidings_publish_confirmed_total") == 16
        assert value(s, "tidings_messages_published_total") == 17
        assert value(s, "tidings_errors_total", code=8, name="UNKNOWN_OPERATION") == 1

        assert value(s, "tidings_stream_published_total", stream="ev") == 6
        per_part = {p["partition"]: p for p in sinfo["partitions"]}
        lags = {p["partition"]: p["lag"] for p in sinfo["groups"]["readers"]["partitions"]}
        for p, info in per_part.items():
            assert value(s, "tidings_stream_messages", stream="ev", partition=p) == info["messages"]
            assert value(s, "tidings_stream_next_offset", stream="ev", partition=p) == info["next"]
            assert value(s, "tidings_stream_group_lag", stream="ev", group="readers", partition=p) == lags[p]
        assert sum(lags.values()) == 6 - 4
        assert value(s, "tidings_stream_group_delivered_total", stream="ev", group="readers") >= 4

        # histograms: observed per batch, never more often than per message
        n_confirm = value(s, "tidings_publish_confirm_seconds_count")
        assert 1 <= n_confirm <= 16
        assert value(s, "tidings_publish_confirm_seconds_bucket", le="+Inf") == n_confirm
        assert value(s, "tidings_publish_confirm_seconds_sum") > 0
        commits = value(s, "tidings_store_commits_total")
        assert commits >= 1
        assert value(s, "tidings_store_commit_seconds_count") == commits
        assert value(s, "tidings_store_batch_messages_count") == commits
        assert value(s, "tidings_store_batch_messages_sum") == value(s, "tidings_store_committed_messages_total")
        assert value(s, "tidings_store_file_bytes", file="db") > 0
        assert value(s, "tidings_process_resident_memory_bytes") > 10 * 1024 * 1024

        after = await ascrape(addr)
        assert value(after, "tidings_connections") == 0
        assert value(after, "tidings_connections_opened_total") >= 1


async def test_openmetrics_on_request_and_head(tmp_path: Path) -> None:
    async with served(tmp_path) as (_broker, addr):
        status, headers, body = await aget(addr, "/metrics", accept="application/openmetrics-text; version=1.0.0")
        assert status == 200
        assert headers["content-type"].startswith("application/openmetrics-text")
        assert body.rstrip().endswith(b"# EOF")
        status, headers, body = await aget(addr, "/metrics", method="HEAD")
        assert status == 200 and body == b"" and int(headers["content-length"]) > 0


async def test_http_errors_and_limits(tmp_path: Path) -> None:
    broker = Broker(config(tmp_path))
    async with anyio.create_task_group() as tg:
        # read_timeout: long next to sending a complete request, even from a busy machine's thread
        h, p = await tg.start(build_server(broker, "127.0.0.1", 0, header_timeout=2.0).run)

        async def raw(data: bytes) -> tuple[int, dict[str, str], bytes]:
            return await anyio.to_thread.run_sync(request, h, p, data)

        assert (await aget((h, p), "/nope"))[0] == 404
        status, headers, _ = await aget((h, p), "/metrics", method="POST")
        assert status == 405 and headers["allow"] == "GET, HEAD"
        assert (await raw(b"complete nonsense\r\n\r\n"))[0] == 400
        assert (await raw(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n"))[0] == 431
        assert (await raw(b"GET /metr"))[0] == 408  # never finishes its request (request() waits 10 s)
        assert (await aget((h, p), "/healthz"))[0] == 200  # the listener is still fine
        tg.cancel_scope.cancel()


def test_scrape_snapshot_cost_with_many_queues(tmp_path: Path) -> None:
    """The part of a scrape that runs on the event loop (copying the numbers)
    stays in the low milliseconds for 2,000 queues; building the families and
    the text happens off the loop."""
    broker = Broker(config(tmp_path))
    durable = broker.durable
    for i in range(2000):
        qc = QueueConfig.from_args({"name": f"q{i}", "bind": [f"q{i}.>"]})
        durable.queues[qc.name] = QueueActor(durable.ctx, qc, i)
    collector = BrokerCollector(broker)
    collector.snapshot()
    started = time.perf_counter()
    snap = collector.snapshot()
    took = time.perf_counter() - started
    depth = next(f for f in BrokerCollector.families(snap) if f.name == "tidings_queue_depth")
    assert len(depth.samples) == 2000
    assert {s.labels["queue"]: s.value for s in depth.samples}["q1234"] == 1234
    assert took < 0.1, f"snapshot of 2000 queues took {took * 1000:.1f} ms"


def test_queue_metrics_mirror_queue_info(tmp_path: Path) -> None:
    """Every per-queue metric reads the same number as QueueActor.info() (so a
    renamed actor attribute cannot go unnoticed)."""
    broker = Broker(config(tmp_path))
    durable = broker.durable
    qc = QueueConfig.from_args({"name": "q", "bind": ["q.>"]})
    q = durable.queues["q"] = QueueActor(durable.ctx, qc, 7)
    for n, attr in enumerate(("published", "delivered", "redelivered", "acked", "nacked", "rejected",
                              "dead_lettered", "expired"), start=11):
        setattr(q, attr, n)
    info = q.info()
    samples = {(f.name, s.name): s.value for f in BrokerCollector(broker).collect() for s in f.samples
               if s.labels.get("queue") == "q"}
    keys = {"depth": "depth", "in_flight": "in_flight", "consumers": "consumers", "memory_messages": "ready_in_memory"}
    for metric, key in keys.items():
        assert samples[(f"tidings_queue_{metric}", f"tidings_queue_{metric}")] == info[key], metric
    for key in ("published", "delivered", "redelivered", "acked", "nacked", "rejected", "dead_lettered", "expired"):
        name = f"tidings_queue_{key}"
        assert samples[(name, name + "_total")] == info[key], key


def test_install_hooks_feeds_the_histograms(tmp_path: Path) -> None:
    broker = Broker(config(tmp_path))
    metrics = install_hooks(broker)
    assert broker.durable.store.on_commit is not None and broker.durable.admission.on_confirm_latency is not None
    broker.durable.store.on_commit(0.002, 300)
    broker.durable.admission.on_confirm_latency(0.004)
    reg = metrics.histograms
    assert reg.get_sample_value("tidings_store_commit_seconds_count") == 1
    assert reg.get_sample_value("tidings_store_batch_messages_bucket", {"le": "500.0"}) == 1
    assert reg.get_sample_value("tidings_store_batch_messages_bucket", {"le": "250.0"}) == 0
    assert reg.get_sample_value("tidings_publish_confirm_seconds_sum") == pytest.approx(0.004)


def test_network_metrics_host_is_refused_without_users() -> None:
    from tidings.broker.config import ConfigError
    with pytest.raises(ConfigError, match="refusing to serve metrics on '10.1.2.3'"):
        Config(metrics_port=9421, metrics_host="10.1.2.3").validate()
    Config(metrics_port=9421, metrics_host="10.1.2.3", allow_open=True).validate()  # the operator's choice
    Config(metrics_port=-1, metrics_host="10.1.2.3").validate()  # off: nothing is served
    Config(metrics_port=9421, metrics_host="::1").validate()
