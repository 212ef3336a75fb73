"""Broker memory under a deep backlog: a queue's backlog must cost disk, not RAM.

    python -m benchmarks.backlog [--messages 1000000] [--payload 128] [--in-flight 2000]

Starts a broker (durability full by default), declares one queue, publishes
``--messages`` payloads with confirms (``publish_nowait`` keeping
``--in-flight`` confirms outstanding) while nothing consumes, and reads
the broker's RSS (VmRSS in /proc/PID/status; Linux only) before and after.
Then one consumer drains and acks everything and the drain rate is
reported, with the RSS peak while draining (sampled every 0.25 s). The bar
(DESIGN.md, Storage): RSS growth <= ``--max-growth-mb`` (100 MB) for 1M
queued messages; the exit status is 1 if it is missed. ``-v`` prints the
RSS timeline.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import deque
from typing import Any

from ._common import RunningBroker, broker_process, emit, proc_status_kib

QUEUE = "bench.backlog"
SUBJECT = "bench.backlog.x"


def _mb(kib: int) -> float:
    return round(kib / 1024, 1)


class RssWatch:
    """Samples the broker's VmRSS every ``interval`` seconds (a measurement,
    not a synchronisation): ``peak`` since the last ``reset``, and a timeline."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self.timeline: list[tuple[float, int]] = []
        self._t0 = time.monotonic()

    def reset(self) -> None:
        self.peak = 0

    async def run(self) -> None:
        import anyio

        while True:
            kib = proc_status_kib(self.pid, "VmRSS")
            self.peak = max(self.peak, kib)
            self.timeline.append((round(time.monotonic() - self._t0, 2), kib))
            await anyio.sleep(self.interval)


async def _run(b: RunningBroker, count: int, size: int, in_flight: int, prefetch: int,
               ack_deadline: float | None, auto_msg_id: bool, verbose: bool) -> dict[str, Any]:
    import anyio

    watch = RssWatch(b.pid)
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch.run)
        row = await _measure(b, count, size, in_flight, prefetch, ack_deadline, auto_msg_id, watch)
        tg.cancel_scope.cancel()
    if verbose:
        for t, kib in watch.timeline:
            print(f"{t:8.2f}s  rss {_mb(kib):8.1f} MB", file=sys.stderr)
    return row


async def _measure(b: RunningBroker, count: int, size: int, in_flight: int, prefetch: int,
                   ack_deadline: float | None, auto_msg_id: bool, watch: RssWatch) -> dict[str, Any]:
    from tidings.client import connect

    payload = b"x" * size
    row: dict[str, Any] = {"messages": count, "payload": size}
    async with connect(b.url, name="bench-backlog", timeout=60, auto_msg_id=auto_msg_id) as tc:
        settings = {} if ack_deadline is None else {"ack_deadline": ack_deadline}
        await tc.declare_queue(QUEUE, bind=[QUEUE + ".>"], **settings)
        await tc.flush()
        rss_before = proc_status_kib(b.pid, "VmRSS")
        watch.reset()

        pending: deque[Any] = deque()
        pub = tc.publish_nowait
        start = time.monotonic()
        for _ in range(count):
            if len(pending) >= in_flight:
                await pending.popleft()
            pending.append(pub(SUBJECT, payload, confirm=True))
        while pending:
            await pending.popleft()
        published = time.monotonic()
        info = await tc.queue_info(QUEUE)
        assert info["depth"] == count, info
        rss_after = proc_status_kib(b.pid, "VmRSS")
        row.update({
            "publish_per_s": round(count / (published - start)),
            "rss_before_mb": _mb(rss_before),
            "rss_backlog_mb": _mb(rss_after),
            "rss_growth_mb": _mb(rss_after - rss_before),
            "rss_peak_mb": _mb(max(watch.peak, rss_after)),
            "in_memory": info["ready_in_memory"],
            "db_mb": round(_db_bytes(b.data_dir) / 2**20, 1),
        })

        watch.reset()
        n = 0
        async with tc.consume(QUEUE, prefetch=prefetch) as deliveries:
            t0 = time.monotonic()
            async for d in deliveries:
                await d.ack()
                n += 1
                if n >= count:
                    break
            drained = time.monotonic()
            await tc.flush()
        left = (await tc.queue_info(QUEUE))["depth"]
        row.update({
            "drain_per_s": round(n / (drained - t0)),
            "left": left,
            "rss_drained_mb": _mb(proc_status_kib(b.pid, "VmRSS")),
            "rss_drain_peak_mb": _mb(watch.peak),
        })
    return row


def _db_bytes(data_dir: str) -> int:
    return sum(os.path.getsize(os.path.join(data_dir, f)) for f in os.listdir(data_dir)
               if f.startswith("tidings.db"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=1_000_000)
    ap.add_argument("--payload", type=int, default=128)
    ap.add_argument("--in-flight", type=int, default=2000)
    ap.add_argument("--prefetch", type=int, default=1000)
    ap.add_argument("--durability", choices=["full", "normal"], default="full")
    ap.add_argument("--ack-deadline", type=float, help="the queue's ack deadline (default: the broker's, 30 s)")
    ap.add_argument("--no-auto-msg-id", dest="auto_msg_id", action="store_false",
                    help="publish without the client's automatic de-duplication ids")
    ap.add_argument("--verbose", "-v", action="store_true", help="print the RSS timeline to stderr")
    ap.add_argument("--max-growth-mb", type=float, default=100.0, help="the bar for RSS growth (default 100)")
    ns = ap.parse_args()
    from tidings.broker.serve import run_loop

    with broker_process("--durability", ns.durability) as b:
        row = run_loop(_run, b, ns.messages, ns.payload, ns.in_flight, ns.prefetch, ns.ack_deadline,
                       ns.auto_msg_id, ns.verbose)
    row["durability"] = ns.durability
    row["ack_deadline"] = ns.ack_deadline or 30.0
    row["auto_msg_id"] = "yes" if ns.auto_msg_id else "no"
    row["bar_mb"] = ns.max_growth_mb
    ok = row["rss_growth_mb"] <= ns.max_growth_mb and row["left"] == 0
    row["verdict"] = "pass" if ok else "FAIL"
    emit([row], list(row))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
