"""Shared durable queue throughput with 1, 2, ... brokers on one PostgreSQL database.

    python -m benchmarks.cluster_queue [--brokers 1 --brokers 2] [--messages 50000] [--in-flight 1000]
                                       [--store pg | --store postgresql://USER@HOST:PORT/DB]

For each broker count N: N brokers with ``--cluster`` on one fresh database
(``pg``: a throwaway PostgreSQL from tests/pgserver.py), one producer and one
consumer per broker (each producer publishes messages/N with up to
``--in-flight`` confirms outstanding, each consumer acks everything it gets:
the consumers share the queue). The run ends when the database holds no
message of the queue. Prints end-to-end messages/s, confirm p50/p99 and
broker CPU microseconds per message (all brokers together).

``run_cluster(db_url, brokers, ...)`` is the function other benchmarks call
(benchmarks.cluster): it starts and stops its brokers and returns one row.
On a 2-core machine more brokers cannot add cores: see docs/SCALING.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from typing import Any, Callable

from ._common import broker_process, emit, percentile, spawn
from .durable import cpu_seconds, store_args

QUEUE = "bench.shared"
#: Seconds the database may take to drain the queue after the last confirm (a bound, not a wait).
DRAIN_TIMEOUT = 300.0


async def _consumer(url: str, prefetch: int) -> None:
    """Ack everything until told to stop (a line on stdin); then report."""
    import anyio

    from tidings.client import connect

    n = 0
    first = last = 0
    async with connect(url, name="bench-consumer") as tc:
        async with tc.consume(QUEUE, prefetch=prefetch) as deliveries:
            print("ready", flush=True)

            async def take() -> None:
                nonlocal n, first, last
                async for d in deliveries:
                    if not n:
                        first = time.monotonic_ns()
                    await d.ack()
                    n += 1
                    last = time.monotonic_ns()

            async with anyio.create_task_group() as tg:
                tg.start_soon(take)
                await anyio.to_thread.run_sync(sys.stdin.readline)
                tg.cancel_scope.cancel()
            await tc.flush()
    print(json.dumps({"received": n, "first": first, "last": last}), flush=True)


async def _producer(url: str, count: int, size: int, in_flight: int) -> None:
    from collections import deque

    from tidings.client import connect

    payload = b"x" * size
    async with connect(url, name="bench-producer") as tc:
        print("ready", flush=True)
        sys.stdin.readline()
        pending: deque[tuple[int, Any]] = deque()
        lat: list[int] = []
        mono = time.monotonic_ns
        start = mono()
        for i in range(count):
            if len(pending) >= in_flight:
                t0, c = pending.popleft()
                await c
                if i % 16 == 0:
                    lat.append(mono() - t0)
            pending.append((mono(), tc.publish_nowait(QUEUE + ".x", payload, confirm=True)))
        while pending:
            t0, c = pending.popleft()
            await c
            lat.append(mono() - t0)
        done = mono()
    print(json.dumps({"start": start, "done": done, "lat": lat}), flush=True)


async def _depth(db_url: str) -> int:
    import asyncpg

    conn = await asyncpg.connect(db_url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM tidings_messages WHERE queue = $1", QUEUE))
    finally:
        await conn.close()


def run_cluster(db_url: str, brokers: int, count: int = 50_000, size: int = 128, in_flight: int = 1000,
                prefetch: int = 1000, db_pids: Callable[[], list[int]] | None = None) -> dict[str, Any]:
    """One run with ``brokers`` brokers on the (empty or reused) database ``db_url``."""
    import anyio

    from tidings.client import connect

    with contextlib.ExitStack() as stack:
        procs = [stack.enter_context(broker_process("--store", db_url, "--cluster")) for _ in range(brokers)]

        async def setup() -> None:
            async with connect(procs[0].url) as tc:
                await tc.declare_queue(QUEUE, bind=[QUEUE + ".>"])
                await tc.purge_queue(QUEUE)
            for b in procs[1:]:  # every broker knows the queue before the run (the catalog poll)
                async with connect(b.url) as tc:
                    with anyio.fail_after(30):
                        while not any(q["name"] == QUEUE for q in await tc.list_queues()):
                            await anyio.sleep(0.05)

        anyio.run(setup)
        cons = [spawn("benchmarks.cluster_queue", "--role", "consumer", "--url", b.url,
                      "--prefetch", str(prefetch)) for b in procs]
        for c in cons:
            assert c.stdout is not None and c.stdout.readline().strip() == b"ready"
        share = count // brokers
        prods = [spawn("benchmarks.cluster_queue", "--role", "producer", "--url", b.url, "--messages", str(share),
                       "--payload", str(size), "--in-flight", str(in_flight)) for b in procs]
        for p in prods:
            assert p.stdout is not None and p.stdout.readline().strip() == b"ready"
        pids = [b.pid for b in procs]
        cpu0 = cpu_seconds(pids)
        db0 = cpu_seconds(db_pids()) if db_pids else 0.0
        for p in prods:
            assert p.stdin is not None
            p.stdin.write(b"go\n")
            p.stdin.flush()
        pres = [json.loads(p.stdout.readline()) for p in prods if p.stdout is not None]
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while anyio.run(_depth, db_url) and time.monotonic() < deadline:
            time.sleep(0.05)
        cres = []
        for c in cons:
            assert c.stdin is not None and c.stdout is not None
            c.stdin.write(b"stop\n")
            c.stdin.flush()
            cres.append(json.loads(c.stdout.readline()))
        cpu = cpu_seconds(pids) - cpu0
        db = cpu_seconds(db_pids()) - db0 if db_pids else None
        for p in prods + cons:
            p.wait(60)
    total = share * brokers
    received = sum(c["received"] for c in cres)
    start = min(p["start"] for p in pres)
    end = max(c["last"] for c in cres if c["received"]) if received else start
    elapsed = (end - start) / 1e9
    pub_s = (max(p["done"] for p in pres) - start) / 1e9
    lat = sorted(x / 1e6 for p in pres for x in p["lat"])
    return {
        "scenario": f"shared queue, {brokers} broker{'s' if brokers > 1 else ''}",
        "brokers": brokers,
        "messages": total,
        "consumed": received,
        "per_consumer": [c["received"] for c in cres],
        "seconds": round(elapsed, 3),
        "end_to_end_per_s": round(received / elapsed) if elapsed > 0 else None,
        "confirmed_per_s": round(total / pub_s) if pub_s > 0 else None,
        "confirm_p50_ms": round(percentile(lat, 50), 2),
        "confirm_p99_ms": round(percentile(lat, 99), 2),
        "broker_cpu_us_per_msg": round(cpu * 1e6 / total, 1),
        "db_cpu_us_per_msg": round(db * 1e6 / total, 1) if db is not None else None,
    }


@contextlib.contextmanager
def database(store: str) -> Iterator[tuple[str, Any]]:
    """A database URL for ``--store`` (``pg``: a throwaway server) and its server's processes."""
    with store_args(store) as (extra, db_pids):
        if not extra:
            raise SystemExit("--store: pg or a postgresql:// URL (several brokers need PostgreSQL)")
        yield extra[1], db_pids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--brokers", type=int, action="append")
    ap.add_argument("--messages", type=int, default=50_000)
    ap.add_argument("--payload", type=int, default=128)
    ap.add_argument("--in-flight", type=int, default=1000)
    ap.add_argument("--prefetch", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=1, help="repeat the broker counts, alternating (A/B/A/B)")
    ap.add_argument("--store", default="pg")
    ap.add_argument("--role", choices=["producer", "consumer"], help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ns = ap.parse_args()
    from tidings.broker.serve import run_loop
    if ns.role == "consumer":
        run_loop(_consumer, ns.url, ns.prefetch)
        return
    if ns.role == "producer":
        run_loop(_producer, ns.url, ns.messages, ns.payload, ns.in_flight)
        return
    rows = []
    with database(ns.store) as (url, db_pids):
        for _ in range(ns.rounds):
            for n in ns.brokers or [1, 2]:
                rows.append(run_cluster(url, n, ns.messages, ns.payload, ns.in_flight, ns.prefetch, db_pids))
    emit(rows, list(rows[0]))


if __name__ == "__main__":
    main()
