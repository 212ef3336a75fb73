"""Throughput with the web console open: pub/sub and durable, without and with N live pages.

    python -m benchmarks.console [--viewers 8] [--rounds 2] [--messages 200000] [--durable-messages 50000]

Each round starts a fresh broker with its HTTP port on, runs the pub/sub 1->1
scenario (benchmarks/pubsub.py) and the durable scenario (benchmarks/durable.py)
once with no console page open and once with ``--viewers`` pages following the
console's live event stream (/console/events: a snapshot per second each, as
an open browser tab gets), alternating which goes first so a drifting host
does not favour one side. The viewers run in their own process and read every
snapshot the broker sends. Prints one row per run and the median ratio
with/without per metric: it should stay within the noise between rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

from ._common import emit, spawn

LISTENING = re.compile(rb"tidings listening on (\S+):(\d+)")
HTTP = re.compile(rb"tidings http on http://(\S+):(\d+)")


@contextlib.contextmanager
def broker_with_http() -> Iterator[tuple[str, str, int]]:
    """A broker with ``--http-port 0``: (tidings URL, http host, http port)."""
    with tempfile.TemporaryDirectory(prefix="tidings-bench-") as data:
        cmd = [sys.executable, "-m", "tidings", "serve", "--port", "0", "--http-port", "0",
               "--data-dir", data, "--log-level", "warning"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            assert proc.stdout is not None
            http: tuple[str, int] | None = None
            for _ in range(20):
                line = proc.stdout.readline()
                if not line:
                    raise RuntimeError("broker exited before it was ready")
                m = HTTP.search(line)
                if m and http is None:
                    http = (m.group(1).decode().strip("[]"), int(m.group(2)))
                m = LISTENING.search(line)
                if m:
                    break
            else:
                raise RuntimeError("no ready line from the broker")
            assert http is not None
            yield f"tidings://{m.group(1).decode()}:{m.group(2).decode()}", http[0], http[1]
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def _viewers(host: str, port: int, n: int) -> None:
    """Role ``viewers``: ``n`` event streams read until stdin closes; prints "ready" once each
    got its first snapshot, then the snapshots received in all."""
    counts = [0] * n
    first = asyncio.Event()
    got_first = 0

    async def one(i: int) -> None:
        nonlocal got_first
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(f"GET /console/events HTTP/1.1\r\nHost: {host}:{port}\r\n"
                     "Accept: text/event-stream\r\n\r\n".encode())
        await writer.drain()
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                if line.startswith(b"event: snapshot"):
                    counts[i] += 1
                    if counts[i] == 1:
                        got_first += 1
                        if got_first == n:
                            first.set()
        finally:
            writer.close()

    tasks = [asyncio.ensure_future(one(i)) for i in range(n)]
    await first.wait()
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)  # until the parent says stop
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    print(json.dumps({"snapshots": sum(counts)}), flush=True)


def run_once(viewers: int, messages: int, durable_messages: int) -> list[dict[str, Any]]:
    from . import durable, pubsub

    rows = []
    with broker_with_http() as (url, host, port):
        watcher = None
        if viewers:
            watcher = spawn("benchmarks.console", "--role", "viewers", "--host", host, "--port", str(port),
                            "--viewers", str(viewers))
            assert watcher.stdout is not None
            if watcher.stdout.readline().strip() != b"ready":
                raise RuntimeError("the viewers did not get their first snapshot")
        try:
            ps = pubsub.run_scenario(url, 1, messages, 128)
            du = durable.run(url, durable_messages, 128, 1000, 1000)
        finally:
            seen = None
            if watcher is not None:
                assert watcher.stdin is not None and watcher.stdout is not None
                watcher.stdin.write(b"stop\n")
                watcher.stdin.flush()
                seen = json.loads(watcher.stdout.readline())["snapshots"]
                watcher.wait(30)
        rows.append({"viewers": viewers, "pubsub_delivered_per_s": ps["delivered_per_s"],
                     "pubsub_p99_us": ps["p99_us"], "durable_end_to_end_per_s": du["end_to_end_per_s"],
                     "durable_confirmed_per_s": du["confirmed_per_s"], "confirm_p99_ms": du["confirm_p99_ms"],
                     "snapshots_read": seen})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--viewers", type=int, default=8, help="console pages open during the second run")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--messages", type=int, default=200_000, help="pub/sub messages per run")
    ap.add_argument("--durable-messages", type=int, default=50_000, help="durable messages per run")
    ap.add_argument("--role", choices=["viewers"], help=argparse.SUPPRESS)
    ap.add_argument("--host", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ns = ap.parse_args()
    if ns.role == "viewers":
        asyncio.run(_viewers(ns.host, ns.port, ns.viewers))
        return
    rows: list[dict[str, Any]] = []
    for r in range(ns.rounds):
        order = (0, ns.viewers) if r % 2 == 0 else (ns.viewers, 0)
        for v in order:
            for row in run_once(v, ns.messages, ns.durable_messages):
                rows.append({"round": r + 1, **row})
    cols = ["round", "viewers", "pubsub_delivered_per_s", "pubsub_p99_us", "durable_end_to_end_per_s",
            "durable_confirmed_per_s", "confirm_p99_ms", "snapshots_read"]
    emit(rows, cols)
    for key in ("pubsub_delivered_per_s", "durable_end_to_end_per_s", "durable_confirmed_per_s"):
        without = statistics.median(x[key] for x in rows if not x["viewers"])
        with_ = statistics.median(x[key] for x in rows if x["viewers"])
        print(f"{key}: with {ns.viewers} console pages / without = {with_ / without:.3f}", file=sys.stderr)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
