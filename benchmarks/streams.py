"""Stream throughput: keyed publishes with confirms -> consumer group -> acks; then replay.

    python -m benchmarks.streams [--messages 100000] [--partitions 4] [--in-flight 1000]

End to end: one producer process publishes ``--messages`` keyed messages
(``--keys`` keys, 128-byte payloads) with confirms, keeping up to
``--in-flight`` unconfirmed (``publish_nowait`` + awaiting the oldest
confirmation), to a stream of ``--partitions`` partitions; a consumer group
of ``--consumers`` consumer processes acks every message. Each consumer
checks per-key order as it goes: every payload carries its key's sequence
number, and a first delivery whose number is not the key's previous one
plus one counts as an order violation (or a gap). The producer ends each
partition with a sentinel so consumers know when they are done. Reports
end-to-end messages/s (first publish to last delivery).

Replay: one reader reads one stored partition from the earliest offset
(``read_stream``, follow=False) and reports messages/s.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import deque
from typing import Any

from ._common import broker, emit, percentile, spawn

STREAM = "bench.stream"
SUBJECT = "bench.stream.x"
GROUP = "bench"
END = b"END"


def _sentinel_keys(partitions: int) -> list[str]:
    """One key per partition (``end-N`` strings that hash to it)."""
    from tidings.protocol.partition import partition_for

    keys: dict[int, str] = {}
    i = 0
    while len(keys) < partitions:
        k = f"end-{i}"
        keys.setdefault(partition_for(k, partitions), k)
        i += 1
    return [keys[p] for p in range(partitions)]


async def _consumer(url: str, window: int) -> None:
    import anyio

    from tidings.client import connect

    async with connect(url, name="bench-stream-consumer") as tc:
        async with tc.stream_consume(STREAM, GROUP, window=window) as msgs:
            # wait until the group has settled: the parent starts every consumer before the producer
            print("ready", flush=True)
            last: dict[str, int] = {}
            n = violations = gaps = redelivered = 0
            first = 0
            ended: set[int] = set()
            frm = int.from_bytes
            async for m in msgs:
                payload = m.payload
                if payload == END:
                    ended.add(m.partition)
                    await m.ack()
                    if ended >= set(msgs.assignment[1]):
                        break
                    continue
                if not n:
                    first = time.monotonic_ns()
                n += 1
                if m.delivery_count == 1:
                    seq = frm(payload[:8], "big")
                    prev = last.get(m.key, -1)  # type: ignore[arg-type]
                    if seq <= prev:
                        violations += 1
                    elif seq != prev + 1:
                        gaps += 1
                    last[m.key] = seq  # type: ignore[index]
                else:
                    redelivered += 1
                await m.ack()
            done = time.monotonic_ns()
            await tc.flush()
            parts = msgs.assignment[1]
            print(json.dumps({"received": n, "first": first, "last": done, "violations": violations,
                              "gaps": gaps, "redelivered": redelivered, "partitions": parts,
                              "keys": len(last)}), flush=True)
            # Stay in the group until every consumer is done: leaving earlier would hand this
            # member's partitions (sentinels already acked) to a member still waiting for its own.
            await anyio.to_thread.run_sync(sys.stdin.readline)


async def _producer(url: str, count: int, size: int, in_flight: int, keys: int, partitions: int) -> None:
    from tidings.client import connect

    pad = b"x" * (size - 8)
    names = [f"key-{i}" for i in range(keys)]
    seqs = [0] * keys
    async with connect(url, name="bench-stream-producer") as tc:
        tc.max_in_flight = max(tc.max_in_flight, in_flight)
        print("ready", flush=True)
        sys.stdin.readline()
        pending: deque[tuple[int, Any]] = deque()
        lat: list[int] = []
        pub = tc.publish_nowait
        mono = time.monotonic_ns
        start = mono()
        for i in range(count):
            if len(pending) >= in_flight:
                t0, c = pending.popleft()
                await c
                if i % 16 == 0:
                    lat.append(mono() - t0)
            k = i % keys
            seq = seqs[k]
            seqs[k] = seq + 1
            pending.append((mono(), pub(SUBJECT, seq.to_bytes(8, "big") + pad, key=names[k], confirm=True)))
        while pending:
            t0, c = pending.popleft()
            await c
            lat.append(mono() - t0)
        done = mono()
        store = (await tc.call("stats")).get("store", {})
        for key in _sentinel_keys(partitions):
            await tc.publish(SUBJECT, END, key=key, confirm=True)
    print(json.dumps({"start": start, "done": done, "lat": lat, "store": store}), flush=True)


async def _setup(url: str, partitions: int) -> dict[str, Any]:
    from tidings.client import connect

    async with connect(url) as tc:
        await tc.declare_stream(STREAM, partitions=partitions, bind=[STREAM + ".>"])
        return (await tc.call("stats")).get("store", {})  # type: ignore[no-any-return]


async def _replay(url: str, partition: int) -> dict[str, Any]:
    from tidings.client import connect

    async with connect(url, name="bench-replay") as tc:
        info = await tc.stream_info(STREAM)
        stored = info["partitions"][partition]["messages"]
        n = 0
        nbytes = 0
        t0 = time.perf_counter()
        async for m in tc.read_stream(STREAM, partition, "earliest"):
            n += 1
            nbytes += len(m.payload)
        secs = time.perf_counter() - t0
    return {"partition": partition, "stored": stored, "read": n, "seconds": secs, "bytes": nbytes}


def run(url: str, ns: argparse.Namespace) -> list[dict[str, Any]]:
    from tidings.broker.serve import run_loop

    before = run_loop(_setup, url, ns.partitions)
    consumers = [spawn("benchmarks.streams", "--role", "consumer", "--url", url, "--window", str(ns.window))
                 for _ in range(ns.consumers)]
    for c in consumers:
        assert c.stdout is not None
        assert c.stdout.readline().strip() == b"ready"
    prod = spawn("benchmarks.streams", "--role", "producer", "--url", url, "--messages", str(ns.messages),
                 "--payload", str(ns.payload), "--in-flight", str(ns.in_flight), "--keys", str(ns.keys),
                 "--partitions", str(ns.partitions))
    assert prod.stdout is not None and prod.stdin is not None
    assert prod.stdout.readline().strip() == b"ready"
    prod.stdin.write(b"go\n")
    prod.stdin.flush()
    p = json.loads(prod.stdout.readline())
    cs = [json.loads(c.stdout.readline()) for c in consumers]  # type: ignore[union-attr]
    prod.wait(60)
    for c in consumers:
        assert c.stdin is not None
        c.stdin.write(b"exit\n")
        c.stdin.flush()
        c.wait(60)
    received = sum(c["received"] for c in cs)
    elapsed = (max(c["last"] for c in cs) - p["start"]) / 1e9
    pub_s = (p["done"] - p["start"]) / 1e9
    lat = sorted(x / 1e6 for x in p["lat"])
    commits = p["store"].get("commits", 0) - before.get("commits", 0)
    ops = p["store"].get("committed_ops", 0) - before.get("committed_ops", 0)
    e2e = {
        "scenario": f"stream e2e P={ns.partitions} consumers={ns.consumers} in_flight={ns.in_flight}",
        "messages": ns.messages,
        "consumed": received,
        "seconds": round(elapsed, 3),
        "msgs_per_s": round(received / elapsed),
        "confirmed_per_s": round(ns.messages / pub_s),
        "confirm_p50_ms": round(percentile(lat, 50), 2),
        "confirm_p99_ms": round(percentile(lat, 99), 2),
        "store_commits_per_s": round(commits / pub_s),
        "store_ops_per_commit": round(ops / commits, 1) if commits else None,
        "order_violations": sum(c["violations"] for c in cs),
        "gaps": sum(c["gaps"] for c in cs),
        "redelivered": sum(c["redelivered"] for c in cs),
        "assignments": "/".join(",".join(map(str, c["partitions"])) for c in cs),
    }
    r = run_loop(_replay, url, 0)
    replay = {
        "scenario": f"replay 1 partition of {r['stored']:,} to 1 reader",
        "messages": r["stored"],
        "consumed": r["read"],
        "seconds": round(r["seconds"], 3),
        "msgs_per_s": round(r["read"] / r["seconds"]) if r["seconds"] else None,
        "MB_per_s": round(r["bytes"] / r["seconds"] / 1e6, 1) if r["seconds"] else None,
    }
    return [e2e, replay]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--payload", type=int, default=128, help="payload bytes (>= 8)")
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--consumers", type=int, default=2, help="consumer processes in the group")
    ap.add_argument("--keys", type=int, default=1000)
    ap.add_argument("--in-flight", type=int, default=1000)
    ap.add_argument("--window", type=int, default=1000, help="in-flight deliveries per partition")
    ap.add_argument("--durability", choices=["full", "normal"], default="full")
    ap.add_argument("--role", choices=["producer", "consumer"], help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ns = ap.parse_args()
    from tidings.broker.serve import run_loop
    if ns.role == "consumer":
        run_loop(_consumer, ns.url, ns.window)
        return
    if ns.role == "producer":
        run_loop(_producer, ns.url, ns.messages, ns.payload, ns.in_flight, ns.keys, ns.partitions)
        return
    if ns.payload < 8:
        ap.error("--payload must be at least 8 bytes (the sequence number)")
    with broker("--durability", ns.durability) as url:
        rows = run(url, ns)
    for row in rows:
        row["durability"] = ns.durability
    violations = rows[0]["order_violations"]
    emit(rows, ["scenario", "messages", "consumed", "seconds", "msgs_per_s", "order_violations", "gaps"])
    if violations or rows[0]["consumed"] != ns.messages:
        sys.exit(1)


if __name__ == "__main__":
    main()
