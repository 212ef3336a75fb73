"""How long a client takes to resume after the broker is killed and restarted.

    python -m benchmarks.resume [--runs 10] [--messages 2000] [--reconnect-max 2.0]

Part 1, resume time: one client holds a subscription, a queue consumer and
a stream group member. ``--runs`` times, the broker is killed with SIGKILL
and started again on the same port and data directory; each run measures,
from the moment the restarted broker printed its ready line:

- ``reconnected_ms``: until the client's ``on_state_change("reconnected")``
  (every subscription and consumer re-registered and accepted);
- ``first_delivery_ms``: until the first message arrives on the restored
  subscription (the client publishes a plain tick every millisecond,
  before, during and after the outage: ticks made while disconnected wait
  in the outage buffer and go out right behind the re-subscription);
- ``noticed_ms``: from the kill until the client reported "disconnected".

The client uses its default reconnect policy (exponential backoff from 50
ms, capped at ``--reconnect-max`` = 2 s by default, with jitter), so the
figure includes the wait for the next redial after the broker is back.

Part 2, the kill test workload once: a publisher publishes ``--messages``
durable messages with msg_ids, confirms awaited (up to 100 in flight), to a
subject bound to a queue and a stream; a queue consumer, a stream group
member and a plain subscriber consume; the broker is killed and restarted
half way. Counts: confirmed messages never delivered (``lost``) and
messages stored twice (a msg_id under two queue message ids or at two
stream offsets). Both must be 0.

Prints a JSON list of rows, then a table.
"""

from __future__ import annotations

import argparse
import os
import re
import selectors
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from typing import Any

from ._common import emit, percentile, table

READY = re.compile(rb"tidings listening on (\S+):(\d+)")
START_TIMEOUT = 30.0


class KillableBroker:
    """A broker subprocess that can be killed (SIGKILL) and started again on
    the same port and data directory. ``ready_at`` is the time.monotonic()
    at which the last start printed its ready line."""

    def __init__(self, data_dir: str, *extra: str) -> None:
        self.data_dir = data_dir
        self.extra = extra
        self.port = 0
        self.host = "127.0.0.1"
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_at = 0.0

    @property
    def url(self) -> str:
        return f"tidings://{self.host}:{self.port}"

    def start(self) -> float:
        cmd = [sys.executable, "-m", "tidings", "serve", "--port", str(self.port), "--data-dir", self.data_dir,
               "--log-level", "warning", *self.extra]
        env = {k: v for k, v in os.environ.items() if k != "TIDINGS_CONFIG"}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            deadline = time.monotonic() + START_TIMEOUT
            while True:
                if not sel.select(max(0.0, deadline - time.monotonic())):
                    self.kill()
                    raise RuntimeError("the broker did not become ready")
                line = self.proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"the broker exited with {self.proc.wait()}")
                m = READY.search(line)
                if m:
                    self.ready_at = time.monotonic()
                    self.host, self.port = m.group(1).decode().strip("[]"), int(m.group(2))
                    return self.ready_at

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()


# ------------------------------------------------------------ resume time


async def measure_resume(b: KillableBroker, runs: int, reconnect_max: float) -> list[dict[str, Any]]:
    import anyio

    from tidings.client import connect

    events: dict[str, anyio.Event] = {}
    stamps: dict[str, float] = {}

    def on_state(state: str) -> None:
        stamps[state] = time.monotonic()
        ev = events.get(state)
        if ev is not None:
            ev.set()

    rows: list[dict[str, Any]] = []
    async with connect(b.url, name="resume-bench", on_state_change=on_state,
                       reconnect_wait=(0.05, reconnect_max)) as tc:
        await tc.declare_queue("resume.q", bind=["resume.job"])
        await tc.declare_stream("resume.s", partitions=2, bind=["resume.job"])
        sub = await tc.subscribe("resume.tick")
        first: dict[str, Any] = {"base": 1 << 62, "at": 0.0, "ev": anyio.Event()}

        async def ticker() -> None:
            while True:
                tc.publish_nowait("resume.tick", b"t") if tc.state == "connected" else await tc.publish(
                    "resume.tick", b"t")
                await anyio.sleep(0.001)

        async def watch() -> None:
            async for _ in sub:
                if sub.received > first["base"] and not first["ev"].is_set():
                    first["at"] = time.monotonic()
                    first["ev"].set()

        registered = anyio.Event()

        async def idle_consumers() -> None:
            async with tc.consume("resume.q") as dq, tc.stream_consume("resume.s", "g") as ds, \
                    anyio.create_task_group() as g:
                registered.set()
                g.start_soon(_drain, dq)
                g.start_soon(_drain, ds)

        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            tg.start_soon(watch)
            tg.start_soon(idle_consumers)
            await registered.wait()  # every consumer is registered before the first kill
            await tc.flush()
            for run in range(runs):
                events.clear()
                stamps.clear()
                for name in ("disconnected", "reconnected"):
                    events[name] = anyio.Event()
                first["ev"] = anyio.Event()
                first["base"] = 1 << 62
                killed = time.monotonic()
                await anyio.to_thread.run_sync(b.kill)
                with anyio.fail_after(30):
                    await events["disconnected"].wait()
                first["base"] = sub.received  # no reader runs while disconnected
                ready = await anyio.to_thread.run_sync(b.start)
                with anyio.fail_after(60):
                    await events["reconnected"].wait()
                    await first["ev"].wait()
                rows.append({
                    "run": run + 1,
                    "noticed_ms": round((stamps["disconnected"] - killed) * 1000, 1),
                    "restart_ms": round((ready - killed) * 1000, 1),
                    "reconnected_ms": round((stamps["reconnected"] - ready) * 1000, 1),
                    "first_delivery_ms": round((first["at"] - ready) * 1000, 1),
                })
                print(f"run {run + 1}: {rows[-1]}", file=sys.stderr, flush=True)
            tg.cancel_scope.cancel()
    return rows


async def _drain(deliveries: Any) -> None:
    async for d in deliveries:
        await d.ack()


# ------------------------------------------------------ kill test workload


async def kill_workload(b: KillableBroker, total: int) -> dict[str, Any]:
    import anyio

    from tidings.client import connect

    confirmed: dict[str, Any] = {}
    queue_ids: dict[str, set[int]] = {}
    stream_seen: set[str] = set()
    sub_counts = {"before": 0, "after": 0}
    phase = {"after": False}
    done = anyio.Event()
    half = anyio.Event()
    disconnected = anyio.Event()

    def check() -> None:
        if len(confirmed) >= total // 2:
            half.set()
        if len(queue_ids) >= total and len(stream_seen) >= total and len(confirmed) >= total:
            done.set()

    async def publisher(tc: Any) -> None:
        pending: deque[tuple[str, Any]] = deque()
        for i in range(total):
            mid = f"k{i:07d}"
            pending.append((mid, tc.publish_nowait("kill.job", mid, msg_id=mid, key=f"key{i % 16}")))
            if len(pending) >= 100:
                m, c = pending.popleft()
                confirmed[m] = await c
                check()
        while pending:
            m, c = pending.popleft()
            confirmed[m] = await c
            check()

    async def queue_consumer(tc: Any) -> None:
        async with tc.consume("kill.q", prefetch=200) as deliveries:
            async for d in deliveries:
                queue_ids.setdefault(d.msg_id, set()).add(d.message_id)
                await d.ack()
                check()

    async def stream_member(tc: Any) -> None:
        async with tc.stream_consume("kill.s", "g", window=200) as msgs:
            async for m in msgs:
                stream_seen.add(m.payload.decode())
                await m.ack()
                check()

    async def subscriber(sub: Any) -> None:
        async for _ in sub:
            sub_counts["after" if phase["after"] else "before"] += 1

    async def ticker(tc: Any) -> None:
        """Plain publishes, so the subscriber has something to receive after the restart."""
        while True:
            await tc.publish("kill.tick", b"t")
            await anyio.sleep(0.005)

    t0 = time.monotonic()
    async with connect(b.url, name="kill-pub") as pub, \
            connect(b.url, name="kill-con", on_state_change=lambda s: s == "disconnected" and disconnected.set()) \
            as con:
        await con.declare_queue("kill.q", bind=["kill.job"])
        await con.declare_stream("kill.s", partitions=4, bind=["kill.job"])
        sub = await con.subscribe("kill.>")
        async with anyio.create_task_group() as tg:
            tg.start_soon(queue_consumer, con)
            tg.start_soon(stream_member, con)
            tg.start_soon(subscriber, sub)
            tg.start_soon(publisher, pub)
            tg.start_soon(ticker, pub)
            with anyio.fail_after(120):
                await half.wait()
            await anyio.to_thread.run_sync(b.kill)
            await disconnected.wait()
            phase["after"] = True
            await anyio.to_thread.run_sync(b.start)
            with anyio.fail_after(120):
                await done.wait()
                # redeliveries of messages acked just before the kill: wait until the queue is empty
                while True:
                    await con.flush()
                    info = await con.queue_info("kill.q")
                    if info["depth"] == 0 and info["in_flight"] == 0:
                        break
                    await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
        stored: dict[str, list[tuple[int, int]]] = {}
        for p in range(4):
            async for m in con.read_stream("kill.s", p):
                stored.setdefault(m.payload.decode(), []).append((m.partition, m.offset))
    lost_q = [m for m in confirmed if m not in queue_ids]
    lost_s = [m for m in confirmed if m not in stream_seen or m not in stored]
    twice_q = [m for m, ids in queue_ids.items() if len(ids) > 1]
    twice_s = [m for m, offs in stored.items() if len(offs) > 1]
    return {
        "scenario": "kill -9 mid-flow",
        "messages": total,
        "confirmed": len(confirmed),
        "lost": len(set(lost_q) | set(lost_s)),
        "stored_twice": len(set(twice_q) | set(twice_s)),
        "stored_in_stream": sum(len(v) for v in stored.values()),
        "resends_deduplicated": sum(1 for a in confirmed.values() if a is not None and a.duplicate),
        "sub_after_restart": sub_counts["after"],
        "seconds": round(time.monotonic() - t0, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10, help="kill/restart cycles to time (default 10)")
    ap.add_argument("--messages", type=int, default=2000, help="messages in the kill workload (default 2000)")
    ap.add_argument("--reconnect-max", type=float, default=2.0,
                    help="the client's longest wait between redials, s (default 2.0, the client default)")
    ns = ap.parse_args()
    from tidings.broker.serve import run_loop

    with tempfile.TemporaryDirectory(prefix="tidings-resume-") as data:
        b = KillableBroker(os.path.join(data, "resume"))
        b.start()
        try:
            runs = run_loop(measure_resume, b, ns.runs, ns.reconnect_max)
        finally:
            b.stop()
        k = KillableBroker(os.path.join(data, "kill"))
        k.start()
        try:
            workload = run_loop(kill_workload, k, ns.messages)
        finally:
            k.stop()
    rec = sorted(r["reconnected_ms"] for r in runs)
    first = sorted(r["first_delivery_ms"] for r in runs)
    summary = {
        "scenario": f"resume after kill -9 + restart (median of {len(runs)})",
        "reconnect_max_s": ns.reconnect_max,
        "reconnected_p50_ms": round(statistics.median(rec), 1),
        "first_delivery_p50_ms": round(statistics.median(first), 1),
        "first_delivery_max_ms": max(first),
        "first_delivery_p90_ms": percentile(first, 90),
        "noticed_p50_ms": round(statistics.median(r["noticed_ms"] for r in runs), 1),
        "restart_p50_ms": round(statistics.median(r["restart_ms"] for r in runs), 1),
    }
    emit([summary, workload, *runs], [], as_json_only=True)
    print()
    print(table(runs, ["run", "noticed_ms", "restart_ms", "reconnected_ms", "first_delivery_ms"]))
    print()
    print(table([summary], ["scenario", "reconnected_p50_ms", "first_delivery_p50_ms", "first_delivery_max_ms"]))
    print()
    print(table([workload], ["scenario", "messages", "confirmed", "lost", "stored_twice", "resends_deduplicated",
                             "sub_after_restart"]))


if __name__ == "__main__":
    main()
