"""The cost of content filters on pub/sub throughput.

    python -m benchmarks.filters [--messages 100000] [--rounds 3] [--fanout 2]

One broker; the subject ``bench.orders`` is bound to the ``OrderPlaced``
schema (the realistic 10-field event of benchmarks/schemas.py), so every
publish is validated on both sides. Each round starts ``--fanout`` subscriber
processes and one publisher process (the pub/sub benchmark's shape,
benchmarks/pubsub.py): on the ``filtered`` side every subscription carries
the filter ``{"region": [{"prefix": "eu-"}], "data": {"amount": [{"numeric":
[">", 100]}]}}`` (a header and a payload field), which every event matches,
so both sides deliver the same messages; on the ``plain`` side none does.
Rounds alternate (plain, filtered, filtered, plain, ...) after an uncounted
warm-up. Reports delivered messages/s per side (medians), the ratio (the
issue's bar: filters cost at most 15% of pub/sub throughput) and the broker
process's CPU time per published message on each side.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

from ._common import broker_process, emit, spawn
from .schemas import EVENT, ORDER_PLACED

SUBJECT = "bench.orders"
FILTER: dict[str, Any] = {"region": [{"prefix": "eu-"}], "data": {"amount": [{"numeric": [">", 100]}]}}
HEADERS = {"content-type": "application/json", "region": "eu-west"}


async def _setup(url: str) -> None:
    from tidings.client import connect

    async with connect(url) as tc:
        await tc.register_schema("OrderPlaced", ORDER_PLACED)
        await tc.bind_schema(SUBJECT, "OrderPlaced")


async def _subscriber(url: str, expect: int, filtered: bool) -> None:
    import anyio

    from tidings.client import connect

    async with connect(url, name="bench-sub") as tc:
        sub = await tc.subscribe(SUBJECT, max_pending=1_000_000, match=FILTER if filtered else None)
        end = await tc.subscribe(SUBJECT + ".end")
        print("ready", flush=True)
        n = 0
        first = last = 0
        async with anyio.create_task_group() as tg:
            async def wait_end() -> None:
                await end.next(timeout=None)
                while sub.pending:  # let what already arrived drain, then stop counting
                    await anyio.sleep(0.01)
                tg.cancel_scope.cancel()
            tg.start_soon(wait_end)
            async for _m in sub:
                now = time.monotonic_ns()
                if not n:
                    first = now
                n += 1
                last = now
                if n >= expect:
                    break
            tg.cancel_scope.cancel()
        print(json.dumps({"received": n, "first": first, "last": last,
                          "dropped": sub.dropped_by_broker + sub.dropped}), flush=True)


async def _publisher(url: str, count: int) -> None:
    from tidings.client import connect

    payload = json.dumps(EVENT).encode()
    async with connect(url, name="bench-pub") as tc:
        print("ready", flush=True)
        sys.stdin.readline()
        start = time.monotonic_ns()
        publish = tc.publish
        for _ in range(count):
            await publish(SUBJECT, payload, headers=dict(HEADERS))
        await tc.flush(timeout=60)
        done = time.monotonic_ns()
        await tc.publish(SUBJECT + ".end", b"")
        await tc.flush()
        print(json.dumps({"start": start, "done": done}), flush=True)


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    import os
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_round(url: str, pid: int, count: int, fanout: int, filtered: bool) -> dict[str, float]:
    flag = ["--filtered"] if filtered else []
    subs = [spawn("benchmarks.filters", "--role", "sub", "--url", url, "--messages", str(count), *flag)
            for _ in range(fanout)]
    for p in subs:
        assert p.stdout is not None and p.stdout.readline().strip() == b"ready"
    pub = spawn("benchmarks.filters", "--role", "pub", "--url", url, "--messages", str(count))
    assert pub.stdout is not None and pub.stdin is not None
    assert pub.stdout.readline().strip() == b"ready"
    c0 = _cpu_seconds(pid)
    pub.stdin.write(b"go\n")
    pub.stdin.flush()
    pres = json.loads(pub.stdout.readline())
    results = []
    for p in subs:
        assert p.stdout is not None
        results.append(json.loads(p.stdout.readline()))
    cpu = _cpu_seconds(pid) - c0
    for p in subs:
        p.wait(30)
    pub.wait(30)
    received = sum(r["received"] for r in results)
    elapsed = (max(r["last"] for r in results) - pres["start"]) / 1e9
    return {"delivered": received, "dropped": sum(r["dropped"] for r in results),
            "per_s": received / elapsed, "cpu_us": cpu / count * 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=100_000, help="events published per round")
    ap.add_argument("--rounds", type=int, default=3, help="counted rounds per side")
    ap.add_argument("--fanout", type=int, default=2, help="subscriber processes (each filtered on that side)")
    ap.add_argument("--role", choices=["pub", "sub"], help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--filtered", action="store_true", help=argparse.SUPPRESS)
    ns = ap.parse_args()
    from tidings.broker.serve import run_loop

    if ns.role == "sub":
        run_loop(_subscriber, ns.url, ns.messages, ns.filtered)
        return
    if ns.role == "pub":
        run_loop(_publisher, ns.url, ns.messages)
        return
    sides: dict[str, list[dict[str, float]]] = {"plain": [], "filtered": []}
    with broker_process() as b:
        run_loop(_setup, b.url)
        one_round(b.url, b.pid, ns.messages // 4, ns.fanout, False)  # warm-up
        one_round(b.url, b.pid, ns.messages // 4, ns.fanout, True)
        order = [("plain", False), ("filtered", True)]
        for i in range(ns.rounds):
            for side, filtered in (order if i % 2 == 0 else order[::-1]):
                sides[side].append(one_round(b.url, b.pid, ns.messages, ns.fanout, filtered))
    p = statistics.median(r["per_s"] for r in sides["plain"])
    f = statistics.median(r["per_s"] for r in sides["filtered"])
    cp = statistics.median(r["cpu_us"] for r in sides["plain"])
    cf = statistics.median(r["cpu_us"] for r in sides["filtered"])
    row = {"scenario": f"pub/sub 1->{ns.fanout}, schema-bound OrderPlaced", "events_per_round": ns.messages,
           "rounds": ns.rounds, "delivered_plain": sum(r["delivered"] for r in sides["plain"]),
           "delivered_filtered": sum(r["delivered"] for r in sides["filtered"]),
           "dropped": sum(r["dropped"] for s in sides.values() for r in s),
           "plain_per_s": round(p), "filtered_per_s": round(f), "ratio": round(f / p, 3),
           "cost_pct": round((1 - f / p) * 100, 1), "broker_cpu_us_plain": round(cp, 2),
           "broker_cpu_us_filtered": round(cf, 2), "cpu_cost_pct": round((cf / cp - 1) * 100, 1)}
    emit([row], list(row))


if __name__ == "__main__":
    main()
