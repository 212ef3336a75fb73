"""Durable queue throughput: publish with confirms -> commit -> deliver -> ack.

    python -m benchmarks.durable [--messages 100000] [--in-flight 1000] [--durability full]
                                 [--store sqlite] [--store pg] [--store postgresql://USER@HOST:PORT/DB]

One producer process keeps up to ``--in-flight`` confirms outstanding
(``publish_nowait`` + awaiting the oldest confirmation: the idiom from
docs/CLIENT.md), one consumer process acks every delivery, 128-byte
payloads, against a broker subprocess at the chosen durability. Prints
end-to-end messages/s, confirm latency p50/p99 and store commits/s.

``--store`` picks where the broker keeps durable state, once per row of the
table (repeat it to compare in one run): ``sqlite`` (the default: the data
directory), ``pg`` (a throwaway PostgreSQL from Debian's postgresql package,
started and removed by tests/pgserver.py, fsync on) or a ``postgresql://`` URL
(``TIDINGS_BENCH_STORE`` sets the default list, comma-separated).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from ._common import broker_process, emit, percentile, spawn
from ._progress import Progress


async def _consumer(url: str, queue: str, expect: int, prefetch: int) -> None:
    from tidings.client import connect

    async with connect(url, name="bench-consumer") as tc:
        async with tc.consume(queue, prefetch=prefetch) as deliveries:
            print("ready", flush=True)
            n = 0
            first = 0
            async for d in deliveries:
                if not n:
                    first = time.monotonic_ns()
                await d.ack()
                n += 1
                if n >= expect:
                    break
            last = time.monotonic_ns()
            await tc.flush()
    print(json.dumps({"received": n, "first": first, "last": last}), flush=True)


async def _producer(url: str, subject: str, count: int, size: int, in_flight: int) -> None:
    from tidings.client import connect

    payload = b"x" * size
    async with connect(url, name="bench-producer") as tc:
        print("ready", flush=True)
        sys.stdin.readline()
        pending: deque[tuple[int, Any]] = deque()
        lat: list[int] = []
        start = time.monotonic_ns()
        pub = tc.publish_nowait
        mono = time.monotonic_ns
        progress = Progress("durable publish (confirmed)", count)
        for i in range(count):
            if len(pending) >= in_flight:
                t0, c = pending.popleft()
                await c
                if i % 16 == 0:
                    lat.append(mono() - t0)
            pending.append((mono(), pub(subject, payload, confirm=True)))
            if not i & 1023:
                progress.update(i - len(pending))
        while pending:
            t0, c = pending.popleft()
            await c
            lat.append(mono() - t0)
        done = mono()
        progress.finish(count)
        stats = await tc.call("stats")
    print(json.dumps({"start": start, "done": done, "lat": lat, "store": stats.get("store", {})}), flush=True)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds the processes `pids` used so far (Linux /proc)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (clock ticks)
    return total / os.sysconf("SC_CLK_TCK")


def run(url: str, count: int, size: int, in_flight: int, prefetch: int, pid: int = 0,
        db_pids: Any = None) -> dict[str, Any]:
    """One run; with `pid` (the broker) and `db_pids` (a callable: the database server's
    processes) it also reports their CPU microseconds per message."""
    import anyio

    from tidings.client import connect

    async def setup() -> dict[str, Any]:
        async with connect(url) as tc:
            await tc.declare_queue("bench.durable", bind=["bench.durable.>"])
            await tc.purge_queue("bench.durable")  # a reused PostgreSQL database may hold an old run's
            return (await tc.call("stats")).get("store", {})  # type: ignore[no-any-return]

    before = anyio.run(setup)
    cons = spawn("benchmarks.durable", "--role", "consumer", "--url", url, "--messages", str(count),
                 "--prefetch", str(prefetch))
    assert cons.stdout is not None
    assert cons.stdout.readline().strip() == b"ready"
    prod = spawn("benchmarks.durable", "--role", "producer", "--url", url, "--messages", str(count),
                 "--payload", str(size), "--in-flight", str(in_flight))
    assert prod.stdout is not None and prod.stdin is not None
    assert prod.stdout.readline().strip() == b"ready"
    cpu0 = cpu_seconds([pid]) if pid else 0.0
    db0 = cpu_seconds(db_pids()) if db_pids else 0.0
    prod.stdin.write(b"go\n")
    prod.stdin.flush()
    p = json.loads(prod.stdout.readline())
    c = json.loads(cons.stdout.readline())
    cpu = cpu_seconds([pid]) - cpu0 if pid else None
    db = cpu_seconds(db_pids()) - db0 if db_pids else None
    prod.wait(60)
    cons.wait(60)
    elapsed = (c["last"] - p["start"]) / 1e9
    pub_s = (p["done"] - p["start"]) / 1e9
    lat = sorted(x / 1e6 for x in p["lat"])
    commits = p["store"].get("commits", 0) - before.get("commits", 0)
    return {
        "scenario": f"durable in_flight={in_flight}",
        "messages": count,
        "consumed": c["received"],
        "seconds": round(elapsed, 3),
        "end_to_end_per_s": round(c["received"] / elapsed),
        "confirmed_per_s": round(count / pub_s),
        "confirm_p50_ms": round(percentile(lat, 50), 2),
        "confirm_p99_ms": round(percentile(lat, 99), 2),
        "commits_per_s": round(commits / pub_s),
        "msgs_per_commit": round(count / commits, 1) if commits else None,
        # CPU per message is what a busy, shared machine changes least (messages/s move with its load)
        "broker_cpu_us_per_msg": round(cpu * 1e6 / count, 1) if cpu is not None else None,
        "db_cpu_us_per_msg": round(db * 1e6 / count, 1) if db is not None else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--payload", type=int, default=128)
    ap.add_argument("--in-flight", type=int, default=1000)
    ap.add_argument("--prefetch", type=int, default=1000)
    ap.add_argument("--durability", choices=["full", "normal"], default="full")
    ap.add_argument("--store", action="append",
                    help="sqlite (default), pg (a throwaway PostgreSQL) or a postgresql:// URL; repeat to compare")
    ap.add_argument("--role", choices=["producer", "consumer"], help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ns = ap.parse_args()
    from tidings.broker.serve import run_loop
    if ns.role == "consumer":
        run_loop(_consumer, ns.url, "bench.durable", ns.messages, ns.prefetch)
        return
    if ns.role == "producer":
        run_loop(_producer, ns.url, "bench.durable.x", ns.messages, ns.payload, ns.in_flight)
        return
    stores = ns.store or os.environ.get("TIDINGS_BENCH_STORE", "sqlite").split(",")
    rows = []
    for store in stores:
        with store_args(store) as (extra, db_pids), broker_process("--durability", ns.durability, *extra) as b:
            row = {"store": "postgresql" if extra else "sqlite",
                   **run(b.url, ns.messages, ns.payload, ns.in_flight, ns.prefetch, b.pid, db_pids)}
        row["durability"] = ns.durability
        rows.append(row)
    emit(rows, list(rows[0]))


@contextlib.contextmanager
def store_args(store: str) -> Iterator[tuple[list[str], Any]]:
    """The `tidings serve` arguments for one --store value (a throwaway server for `pg`),
    and a callable listing the database server's processes (None when unknown)."""
    if store == "sqlite":
        yield [], None
    elif store == "pg":
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from tests.pgserver import SKIP_REASON, PgServer, find_bin_dir

        bin_dir = find_bin_dir()
        if bin_dir is None:
            raise SystemExit(SKIP_REASON)
        server = PgServer(bin_dir)
        try:
            server.start()
            yield ["--store", server.new_database()], server.pids
        finally:
            server.cleanup()
    elif store.startswith(("postgresql://", "postgres://")):
        yield ["--store", store], None
    else:
        raise SystemExit(f"--store: sqlite, pg or a postgresql:// URL, not {store!r}")


if __name__ == "__main__":
    main()
