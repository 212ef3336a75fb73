"""Pub/sub across brokers: a publisher on broker A, a subscriber on broker B.

    python -m benchmarks.cluster_pubsub [--messages N] [--payload BYTES] [--store pg|postgresql://...]

Starts a throwaway PostgreSQL (tests/pgserver.py; or uses the given URL), two
brokers with ``--cluster`` on it, waits for their route, then runs the
publisher and subscriber processes of benchmarks/pubsub.py: first both on A
(one broker, the baseline), then publisher on A and subscriber on B (every
message crosses the route). Prints delivered msg/s, latency percentiles and
the brokers' CPU per message (user + system of both broker processes, divided
by the messages delivered).

``scenario(pub_url, sub_url, count, size, broker_pids)`` runs one measurement
(benchmarks.cluster may import it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from typing import Any, Iterator

from ._common import broker_process, emit, percentile, spawn
from .durable import cpu_seconds, store_args

#: Seconds to wait for the route between the brokers and for the subscriber's interest to reach A.
SETTLE_TIMEOUT = 60.0


def _poll_stats(url: str, until: Any, timeout: float = SETTLE_TIMEOUT) -> None:
    """Call ``stats`` on ``url`` until ``until(stats)`` is true (bounded)."""
    import anyio

    from tidings.broker.serve import run_loop
    from tidings.client import connect

    async def go() -> None:
        async with connect(url, name="bench-probe") as tc:
            with anyio.fail_after(timeout):
                while not until(await tc.call("stats", {})):
                    await anyio.sleep(0.05)

    run_loop(go)


def scenario(pub_url: str, sub_url: str, count: int, size: int, broker_pids: list[int],
             label: str = "A->B") -> dict[str, Any]:
    """Publisher on ``pub_url``, one subscriber on ``sub_url``; the brokers' CPU from ``broker_pids``."""
    subject = f"bench.cluster.{int(time.time() * 1000)}"
    sub = spawn("benchmarks.pubsub", "--role", "sub", "--url", sub_url, "--subject", subject, "--messages", str(count))
    assert sub.stdout is not None
    assert sub.stdout.readline().strip() == b"ready"
    if pub_url != sub_url:
        # the subscriber's two subscriptions (messages, end) must be known to A before it publishes
        _poll_stats(pub_url, lambda s: s.get("cluster", {}).get("remote_interest", 0) >= 2)
    pub = spawn("benchmarks.pubsub", "--role", "pub", "--url", pub_url, "--subject", subject,
                "--messages", str(count), "--payload", str(size))
    assert pub.stdout is not None and pub.stdin is not None
    assert pub.stdout.readline().strip() == b"ready"
    cpu0 = [cpu_seconds([p]) for p in broker_pids]
    pub.stdin.write(b"go\n")
    pub.stdin.flush()
    pres = json.loads(pub.stdout.readline())
    res = json.loads(sub.stdout.readline())
    each = [cpu_seconds([p]) - c for p, c in zip(broker_pids, cpu0)]
    cpu = sum(each)
    sub.wait(30)
    pub.wait(30)
    elapsed = (res["last"] - pres["start"]) / 1e9
    lat = sorted(x / 1e3 for x in res["lat"])
    received = res["received"]
    return {
        "scenario": label,
        "published": count,
        "delivered": received,
        "dropped": res["dropped_by_broker"] + res["dropped"],
        "seconds": round(elapsed, 3),
        "delivered_per_s": round(received / elapsed) if elapsed > 0 else 0,
        "p50_us": round(percentile(lat, 50), 1),
        "p99_us": round(percentile(lat, 99), 1),
        "broker_cpu_us_per_msg": round(cpu * 1e6 / max(received, 1), 2),
        # each broker's own share (A publishes' side, B the subscriber's): with a core per
        # broker the busier one bounds the rate
        **{f"cpu_us_per_msg_{chr(65 + i)}": round(c * 1e6 / max(received, 1), 2) for i, c in enumerate(each)},
    }


def run(urls: list[str], messages: int, pids: list[int] | None = None) -> dict[str, Any]:
    """benchmarks.cluster's entry: publisher on the first broker, subscriber on the last,
    once every broker's routes to the others are up."""
    for url in urls:
        _poll_stats(url, lambda s: s.get("cluster", {}).get("routes", 0) >= len(urls) - 1)
    return scenario(urls[0], urls[-1], messages, 128, pids or [], f"{len(urls)} brokers, first -> last")


@contextlib.contextmanager
def two_brokers(store: str) -> Iterator[tuple[Any, Any]]:
    """Two brokers with --cluster on one database, their route up."""
    with store_args(store) as (args, _db_pids):
        with broker_process(*args, "--cluster") as a, broker_process(*args, "--cluster") as b:
            for one in (a, b):
                _poll_stats(one.url, lambda s: s.get("cluster", {}).get("routes", 0) >= 1)
            yield a, b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=500_000)
    ap.add_argument("--payload", type=int, default=128)
    ap.add_argument("--store", default="pg", help="pg (a throwaway PostgreSQL) or a postgresql:// URL")
    ap.add_argument("--rounds", type=int, default=1, help="alternate the two scenarios this many times")
    ns = ap.parse_args()
    rows = []
    with two_brokers(ns.store) as (a, b):
        pids = [a.pid, b.pid]
        for _ in range(ns.rounds):
            rows.append(scenario(a.url, a.url, ns.messages, ns.payload, pids, "A->A (one broker)"))
            rows.append(scenario(a.url, b.url, ns.messages, ns.payload, pids, "A->B (across the route)"))
    emit(rows, list(rows[0]))


if __name__ == "__main__":
    main()
