"""Pub/sub throughput and latency: 1 -> 1 and 1 -> 4 subscribers, 128-byte payloads.

    python -m benchmarks.pubsub [--messages N] [--payload BYTES] [--fanout 1 4]

Starts a broker subprocess on a free port, one subscriber process per
subscriber and one publisher process, all separate processes. The
publisher is a plain loop of awaited ``publish`` calls; subscribers use
``async for`` over their subscription. Prints delivered messages per
second (all subscribers together) and publish-to-receive latency
percentiles, as JSON and as a table.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from ._common import broker, emit, percentile, spawn
from ._progress import Progress

STAMP = struct.Struct(">q")


async def _subscriber(url: str, subject: str, expect: int, **creds: Any) -> None:
    from tidings.client import connect

    async with connect(url, name="bench-sub", **creds) as tc:
        sub = await tc.subscribe(subject, max_pending=1_000_000)
        end = await tc.subscribe(subject + ".end")
        print("ready", flush=True)
        n = 0
        lat: list[int] = []
        first = last = 0
        import anyio
        async with anyio.create_task_group() as tg:
            async def wait_end() -> None:
                await end.next(timeout=None)
                # let already-received messages drain, then stop counting
                while sub.pending:
                    await anyio.sleep(0.01)
                tg.cancel_scope.cancel()
            tg.start_soon(wait_end)
            async for m in sub:
                now = time.monotonic_ns()
                if not n:
                    first = now
                n += 1
                last = now
                if n % 64 == 0:
                    lat.append(now - STAMP.unpack_from(m.payload)[0])
                if n >= expect:
                    break
            tg.cancel_scope.cancel()
        print(json.dumps({"received": n, "first": first, "last": last, "lat": lat,
                          "dropped_by_broker": sub.dropped_by_broker, "dropped": sub.dropped}), flush=True)


async def _publisher(url: str, subject: str, count: int, size: int, **creds: Any) -> None:
    from tidings.client import connect

    pad = b"x" * (size - STAMP.size)
    async with connect(url, name="bench-pub", **creds) as tc:
        print("ready", flush=True)
        sys.stdin.readline()
        start = time.monotonic_ns()
        publish = tc.publish
        pack = STAMP.pack
        mono = time.monotonic_ns
        progress = Progress(f"publish {subject}", count)
        for i in range(count):
            await publish(subject, pack(mono()) + pad)
            if not i & 4095:
                progress.update(i)
        await tc.flush(timeout=60)
        progress.finish(count)
        done = time.monotonic_ns()
        await tc.publish(subject + ".end", b"")
        await tc.flush()
        print(json.dumps({"start": start, "done": done}), flush=True)


def run_scenario(url: str, fanout: int, count: int, size: int, worker_args: Sequence[str] = (),
                 on_go: Callable[[], None] | None = None, on_done: Callable[[], None] | None = None,
                 ) -> dict[str, Any]:
    """One scenario; ``worker_args`` (e.g. ``--user U --password P --ca-file F``) go to every
    worker; ``on_go``/``on_done`` are called as the publisher starts (everyone connected and
    logged in) and once every subscriber has reported (benchmarks/secure.py reads CPU times there)."""
    subject = f"bench.fan{fanout}"
    subs = [spawn("benchmarks.pubsub", "--role", "sub", "--url", url, "--subject", subject,
                  "--messages", str(count), *worker_args) for _ in range(fanout)]
    for p in subs:
        assert p.stdout is not None
        assert p.stdout.readline().strip() == b"ready"
    pub = spawn("benchmarks.pubsub", "--role", "pub", "--url", url, "--subject", subject,
                "--messages", str(count), "--payload", str(size), *worker_args)
    assert pub.stdout is not None and pub.stdin is not None
    assert pub.stdout.readline().strip() == b"ready"
    if on_go is not None:
        on_go()
    pub.stdin.write(b"go\n")
    pub.stdin.flush()
    pres = json.loads(pub.stdout.readline())
    results = []
    for p in subs:
        assert p.stdout is not None
        results.append(json.loads(p.stdout.readline()))
    if on_done is not None:
        on_done()
    for p in subs:
        p.wait(30)
    pub.wait(30)
    received = sum(r["received"] for r in results)
    last = max(r["last"] for r in results)
    elapsed = (last - pres["start"]) / 1e9
    lat = sorted(x / 1e3 for r in results for x in r["lat"])
    return {
        "scenario": f"1->{fanout}",
        "published": count,
        "delivered": received,
        "dropped": sum(r["dropped_by_broker"] + r["dropped"] for r in results),
        "seconds": round(elapsed, 3),
        "publish_rate": round(count / ((pres["done"] - pres["start"]) / 1e9)),
        "delivered_per_s": round(received / elapsed),
        "p50_us": round(percentile(lat, 50), 1),
        "p99_us": round(percentile(lat, 99), 1),
    }


def _tls_without_close_notify() -> None:
    """Work around a client bug: with anyio's default tls_standard_compatible=True,
    Client.close() and the client's supervisor both wait to read the broker's
    close_notify and one fails with BusyResourceError (a traceback at exit, after
    the results are out). The broker does not use close_notify; neither do these workers."""
    import anyio

    real = anyio.connect_tcp

    async def connect_tcp(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("tls"):
            kwargs.setdefault("tls_standard_compatible", False)
        return await real(*args, **kwargs)

    anyio.connect_tcp = connect_tcp  # type: ignore[assignment]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=500_000)
    ap.add_argument("--payload", type=int, default=128)
    ap.add_argument("--fanout", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--role", choices=["pub", "sub"], help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--subject", help=argparse.SUPPRESS)
    # worker credentials (benchmarks/secure.py runs these scenarios against a secured broker)
    ap.add_argument("--user", help=argparse.SUPPRESS)
    ap.add_argument("--password", help=argparse.SUPPRESS)
    ap.add_argument("--ca-file", help=argparse.SUPPRESS)
    ns = ap.parse_args()
    if ns.role:
        import functools

        from tidings.broker.serve import run_loop
        creds = {k: v for k, v in (("user", ns.user), ("password", ns.password), ("ca_file", ns.ca_file))
                 if v is not None}
        if ns.ca_file:
            _tls_without_close_notify()
        if ns.role == "sub":
            run_loop(functools.partial(_subscriber, **creds), ns.url, ns.subject, ns.messages)
        else:
            run_loop(functools.partial(_publisher, **creds), ns.url, ns.subject, ns.messages, ns.payload)
        return
    rows = []
    with broker() as url:
        for f in ns.fanout:
            rows.append(run_scenario(url, f, ns.messages, ns.payload))
    emit(rows, ["scenario", "published", "delivered", "dropped", "seconds", "publish_rate",
                "delivered_per_s", "p50_us", "p99_us"])


if __name__ == "__main__":
    main()
