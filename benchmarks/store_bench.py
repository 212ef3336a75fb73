"""Micro benchmark of the storage actor: group-committed puts, then deletes.

    python -m benchmarks.store_bench [--messages 100000] [--size 128] [--inflight 1000]
                                     [--per-op 1] [--durability full] [--no-uvloop] [--json]

Each operation carries `--per-op` messages (1: one publish to one queue, the
worst case). Up to `--inflight` operations' worth of messages wait for their
commit at any time, as publishers waiting for confirms would. Prints JSON and
a table: messages/s for put and delete, commits/s, and the mean batch size
(operations and messages per commit).
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import anyio

from benchmarks._common import emit
from tidings.broker.durable.store import DeleteMessages, PutMessages, SqliteStore, StoredMessage, WriteOp


class InFlight:
    """Counts submitted-but-unconfirmed messages; lets the producer wait below a limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.n = 0
        self.errors = 0
        self._space: anyio.Event | None = None
        self._wait_until = 0

    def on_done(self, k: int, error: Exception | None) -> None:
        self.n -= k
        if error is not None:
            self.errors += 1
        if self._space is not None and self.n <= self._wait_until:
            self._space.set()
            self._space = None

    async def wait_below(self, n: int) -> None:
        if self.n > n:
            self._wait_until = n
            self._space = anyio.Event()
            await self._space.wait()


async def phase(store: SqliteStore, name: str, ops: Iterator[tuple[WriteOp, int]], inflight: int) -> dict[str, Any]:
    """Submit `ops` (built lazily, as a publisher would), keeping at most `inflight`
    messages unconfirmed; return the throughput figures."""
    track = InFlight(inflight)
    commits0, ops0, busy0 = store.commits, store.committed_ops, store.commit_seconds_total
    messages = 0
    started = time.perf_counter()
    for op, k in ops:
        if track.n > inflight - k:
            await track.wait_below(inflight - k)
        op.on_done = functools.partial(track.on_done, k)
        track.n += k
        messages += k
        await store.submit(op)
    await track.wait_below(0)
    elapsed = time.perf_counter() - started
    commits = store.commits - commits0
    return {
        "phase": name,
        "messages": messages,
        "seconds": round(elapsed, 3),
        "msgs_per_s": round(messages / elapsed),
        "commits": commits,
        "commits_per_s": round(commits / elapsed),
        "ops_per_commit": round((store.committed_ops - ops0) / max(1, commits), 1),
        "msgs_per_commit": round(messages / max(1, commits), 1),
        "commit_busy_pct": round(100 * (store.commit_seconds_total - busy0) / elapsed, 1),
        "errors": track.errors,
    }


async def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    payload = os.urandom(args.size)
    n, per = args.messages, args.per_op
    with tempfile.TemporaryDirectory(prefix="tidings-store-bench-") as data:
        store = SqliteStore.in_dir(data, args.durability)
        await store.open()
        results = []
        async with anyio.create_task_group() as tg:
            await tg.start(store.run)
            now = int(time.time() * 1000)

            def puts() -> Iterator[tuple[WriteOp, int]]:
                for start in range(1, n + 1, per):
                    rows = [StoredMessage("bench", i, "bench.subject", payload, None, None, now, now)
                            for i in range(start, min(n + 1, start + per))]
                    yield PutMessages(rows), len(rows)

            def deletes() -> Iterator[tuple[WriteOp, int]]:
                for start in range(1, n + 1, per):
                    ids = list(range(start, min(n + 1, start + per)))
                    yield DeleteMessages("bench", ids), len(ids)

            results.append(await phase(store, "put", puts(), args.inflight))
            results.append(await phase(store, "delete", deletes(), args.inflight))
            await store.close()
        for r in results:
            r.update(durability=args.durability, size=args.size, per_op=per, inflight=args.inflight)
        return results


def cli() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.store_bench", description=__doc__.split("\n")[0])
    p.add_argument("--messages", type=int, default=100_000)
    p.add_argument("--size", type=int, default=128, help="payload bytes")
    p.add_argument("--inflight", type=int, default=1_000, help="most messages awaiting their commit")
    p.add_argument("--per-op", type=int, default=1, help="messages per store operation")
    p.add_argument("--durability", choices=["full", "normal"], default="full")
    p.add_argument("--no-uvloop", action="store_true")
    p.add_argument("--json", action="store_true", help="print the JSON only")
    args = p.parse_args()
    results = anyio.run(main, args, backend_options={"use_uvloop": not args.no_uvloop})
    emit(results, ["phase", "msgs_per_s", "commits_per_s", "ops_per_commit", "msgs_per_commit", "commit_busy_pct", "seconds",
                   "errors"], as_json_only=args.json)


if __name__ == "__main__":
    cli()
