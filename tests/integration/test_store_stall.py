"""A stuck storage transaction against a real broker: stats and metrics show the
batch in flight and its age, the log has an ERROR with the stacks, /readyz fails
while it lasts, and everything recovers when it ends.

The stall is real: the test holds the database's write lock from another
connection (as a backup or an admin tool can). The broker's BEGIN then waits
for its busy timeout (5 s) and fails that batch; a publisher keeps submitting,
so the store stays stalled, with short gaps, for as long as the test holds the
lock. The test lets go only once it has seen everything it checks."""

from __future__ import annotations

import sqlite3
from typing import Any

import anyio

from tidings.client import connect
from tidings.client.errors import TidingsError
from queuetools import declare
from tests.opshttp import get, metrics_address, parse, scrape, value

STALL_TIMEOUT = "0.2"  # seconds: the stalls here last up to the broker's 5 s busy timeout each
WAIT = 60.0  # generous bound on each wait


async def readyz(host: str, port: int) -> tuple[int, bytes]:
    status, _, body = await anyio.to_thread.run_sync(get, host, port, "/readyz")
    return status, body


async def test_a_stuck_transaction_is_loud_and_recovers(start_broker) -> None:
    b = start_broker("--metrics-port", "0", env={"TIDINGS_STORE_STALL_TIMEOUT": STALL_TIMEOUT})
    host, port = metrics_address(b.extra_lines)
    async with connect(b.url, reconnect=False) as tc, connect(b.url, reconnect=False) as admin:
        await declare(tc, "stall", "stall.x")
        await tc.publish("stall.x", b"before")
        assert (await readyz(host, port))[0] == 200
        blocker = sqlite3.connect(b.data_dir / "tidings.db", isolation_level=None, timeout=WAIT)
        blocker.execute("BEGIN IMMEDIATE")  # hold the write lock: the broker's commits wait
        holding = True
        outcomes: list[str] = []

        async def keep_publishing() -> None:
            while holding:
                try:
                    await tc.publish("stall.x", b"during")
                    outcomes.append("ok")
                except TidingsError as exc:  # the busy timeout failed the batch: it was not stored
                    outcomes.append(type(exc).__name__)

        stats: dict[str, Any] = {}
        async with anyio.create_task_group() as tg:
            tg.start_soon(keep_publishing)
            with anyio.fail_after(WAIT):
                while True:
                    status, body = await readyz(host, port)
                    if status == 503:
                        break
                    await anyio.sleep(0.05)  # poll interval
            assert b"storage_stalled: true" in body and b"storage: true" in body, body
            with anyio.fail_after(WAIT):
                while not (stats.get("stalled") and stats.get("stalls")):  # stalled, and the watchdog saw it
                    stats = (await admin.call("stats"))["store"]
                    await anyio.sleep(0.05)  # poll interval
            assert stats["inflight_ops"] >= 1 and stats["inflight_messages"] >= 1
            assert stats["inflight_bytes"] >= len(b"during")
            assert stats["transaction_seconds"] > float(STALL_TIMEOUT)
            assert stats["transaction_phase"] == "BEGIN"
            samples = await anyio.to_thread.run_sync(scrape, host, port)
            assert value(samples, "tidings_store_stalls_total") >= 1
            for name in ("inflight_ops", "inflight_messages", "inflight_bytes", "transaction_seconds",
                         "stalled"):
                assert value(samples, f"tidings_store_{name}") >= 0  # exported (may be 0 here)
            holding = False
            blocker.execute("COMMIT")  # the stall ends
            blocker.close()
        # recovery: ready again, and publishes are confirmed
        with anyio.fail_after(WAIT):
            while (await readyz(host, port))[0] != 200:
                await anyio.sleep(0.05)  # poll interval
        ack = await tc.publish("stall.x", b"after")
        assert ack is not None and ack.id > 0
        stats = (await admin.call("stats"))["store"]
        assert not stats["stalled"] and stats["inflight_ops"] == 0 and stats["transaction_phase"] == "idle"
        assert set(outcomes) <= {"ok", "StorageError", "TimeoutError"}, outcomes
    log = b.stderr()
    assert "ERROR" in log and "store: a transaction has run" in log and "phase BEGIN" in log
    assert "storage actor task:" in log and "SQLite thread" in log and "_connection_worker_thread" in log
    assert "the stalled batch" in log and "ended after" in log
    assert value(parse(get(host, port, "/metrics")[2].decode()), "tidings_store_stalled") == 0
