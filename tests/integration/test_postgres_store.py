"""One real broker on a PostgreSQL store (`tidings serve --store postgresql://...`).

The server is tests/pgserver.py's throwaway PostgreSQL (skipped when Debian's
postgresql package is absent); each test has a fresh database. Covered: durable
queues and streams, a restart keeping what was confirmed, kill -9 again and
again (test_queue_crash's chaos run), the database stopped under load (publishes
refused as retriable, then recovery with no confirmed message lost), and the
start-up errors of a bad URL or an unreachable database (one line, no password).
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import anyio
import pytest

from tidings.client import connect
from queuetools import WAIT, Bursts, collect, declare
from test_queue_crash import chaos_kills, run_chaos

from tests.pgserver import PgServer, free_port

#: Publishes the load test keeps unconfirmed at once (a producer with many confirms in flight).
IN_FLIGHT = 100
#: How long one publish (its confirm) may take while the database comes back: the store
#: reconnects within RECONNECT_MAX (5 s) of the server being up; this bounds a hang.
RECOVERY_TIMEOUT = 120.0


async def replay(tc: Any, stream: str, partition: int) -> list[Any]:
    out = []
    with anyio.fail_after(WAIT * 4):
        async for m in tc.read_stream(stream, partition, "earliest"):
            out.append(m)
    return out


async def test_queue_and_stream_on_postgres_survive_a_restart(start_broker, pg_url) -> None:
    b = start_broker("--store", pg_url)
    async with connect(b.url) as tc:
        await declare(tc, "jobs")
        await tc.declare_stream("events", partitions=2, bind=["events.>"])
        for i in range(50):
            ack = await tc.publish("jobs.x", f"job-{i}", msg_id=f"j{i}")
            assert ack is not None
        for i in range(20):
            await tc.publish("events.x", f"ev-{i}", key=f"k{i % 4}")
        again = await tc.publish("jobs.x", "job-0", msg_id="j0")  # a duplicate, answered from the store
        assert again is not None and again.duplicate
        async with tc.consume("jobs", prefetch=10) as deliveries:
            for d in await collect(deliveries, 10):
                await d.ack(wait=True)
    assert b.terminate() == 0
    b.restart()
    async with connect(b.url) as tc:
        assert (await tc.queue_info("jobs"))["depth"] == 40
        async with tc.consume("jobs", prefetch=50) as deliveries:
            got = [d.payload for d in await collect(deliveries, 40)]
        assert got == [f"job-{i}".encode() for i in range(10, 50)]
        rows = await replay(tc, "events", 0) + await replay(tc, "events", 1)
        assert sorted(m.payload for m in rows) == sorted(f"ev-{i}".encode() for i in range(20))
        for p in (0, 1):
            offsets = [m.offset for m in await replay(tc, "events", p)]
            assert offsets == list(range(len(offsets)))  # dense, from 0
    assert "tidings.broker.durable.store.postgres" in b.stderr() or "store postgresql://" in b.stderr()


@pytest.mark.timeout(600)  # as test_queue_crash's: its rounds at the host's fsync speed
async def test_kill_9_keeps_every_confirmed_message_on_postgres(start_broker, pg_url,
                                                                pytestconfig: pytest.Config) -> None:
    b = start_broker("--store", pg_url)
    kills = chaos_kills(pytestconfig)  # 3, or 10 with --soak
    # seed 33's kill targets (confirms, deliveries): (0, 0), (568, 0), (1854, 1979) (see KILLS)
    counts = await run_chaos(b, kills, seed=33)  # check(): every confirmed message delivered, none twice
    assert counts["kills"] == kills and counts["messages"] > 0


async def test_database_stopped_under_load_then_back(start_broker, pg_url, pg_server: PgServer) -> None:
    """Stop PostgreSQL while a producer keeps confirms in flight: publishes are refused
    with a retriable STORAGE_ERROR (never confirmed), the broker keeps serving, and once
    the database is back it reconnects; every confirmed message is then delivered."""
    b = start_broker("--store", pg_url)
    burst = Bursts("load.x")
    confirmed, refused = burst.confirmed, burst.refused
    async with connect(b.url) as tc:
        await declare(tc, "load")
        await burst(tc, IN_FLIGHT * 5)
        assert len(confirmed) == IN_FLIGHT * 5
        await anyio.to_thread.run_sync(pg_server.stop, "fast")
        try:
            with anyio.fail_after(RECOVERY_TIMEOUT):
                while not refused:  # the outage is seen: publishes refused, retriable
                    await burst(tc, IN_FLIGHT)
            assert "unavailable" in str(refused[0]) or "connect" in str(refused[0])
            await tc.flush()  # the broker still answers (pub/sub, pings) meanwhile
        finally:
            await anyio.to_thread.run_sync(pg_server.restart)
        before = len(confirmed)
        with anyio.fail_after(RECOVERY_TIMEOUT):
            while len(confirmed) < before + IN_FLIGHT * 3:  # recovered: publishes confirmed again
                await burst(tc, IN_FLIGHT)
        async with tc.consume("load", prefetch=500) as deliveries:
            seen: set[str] = set()
            with anyio.fail_after(RECOVERY_TIMEOUT):
                while not confirmed <= seen:
                    d = await deliveries.next(timeout=RECOVERY_TIMEOUT)
                    seen.add(d.payload.decode())
                    await d.ack()
    assert "reconnected to the database" in b.stderr()


def serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tidings", "serve", "--port", "0", *args],
                          capture_output=True, text=True, timeout=120, check=False)


def test_unreachable_database_fails_the_start_in_one_line_without_the_password(tmp_path) -> None:
    port = free_port()  # nothing listens there
    done = serve("--data-dir", str(tmp_path / "d"), "--store", f"postgresql://tidings:s3cret@127.0.0.1:{port}/db")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith(f"tidings: cannot open the store: cannot connect to "
                                f"postgresql://tidings@127.0.0.1:{port}/db: "), done.stderr
    assert "s3cret" not in done.stderr + done.stdout


def test_missing_database_and_bad_url_are_refused(tmp_path, pg_server: PgServer) -> None:
    done = serve("--data-dir", str(tmp_path / "d"), "--store", pg_server.url("no_such_db"))
    assert done.returncode == 1
    assert "cannot connect to " + pg_server.url("no_such_db") in done.stderr
    assert "no_such_db" in done.stderr.strip().splitlines()[-1]
    done = serve("--data-dir", str(tmp_path / "d"), "--store", "mysql://root:pw@localhost/db")
    assert done.returncode == 2
    assert "store must be empty (SQLite in data_dir) or a postgresql://" in done.stderr
    assert "pw" not in done.stderr


def test_store_setting_from_the_environment(tmp_path, pg_server: PgServer) -> None:

    done = subprocess.run([sys.executable, "-m", "tidings", "serve", "--port", "0", "--data-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "TIDINGS_STORE": pg_server.url("absent_db")})
    assert done.returncode == 1 and "absent_db" in done.stderr
