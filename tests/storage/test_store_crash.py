"""Crash safety: every confirmed write is on disk when the process dies without closing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import pytest

from tidings.broker.durable.store import SqliteStore

REPO = Path(__file__).resolve().parents[2]
GROUP = 5  # ids per PutMessages in the child

# 20 concurrent writers, each putting GROUP rows per op; every confirmed op prints its ids.
# In "exit" mode the child leaves with os._exit(0) from inside the callback of the
# EXIT_AFTER-th confirm (no close, no flush of anything); in "kill" mode the parent
# SIGKILLs it at an arbitrary point while writes are in flight.
CHILD = textwrap.dedent(f"""
    import os, sys, anyio
    from tidings.broker.durable.store import PutMessages, SqliteStore, StoredMessage

    path, mode = sys.argv[1], sys.argv[2]
    EXIT_AFTER = 150
    confirmed = 0

    async def main():
        store = SqliteStore(path)
        await store.open()
        ids = iter(range(1, 10**9))

        def confirm(batch):
            def on_done(error):
                global confirmed
                if error is None:
                    confirmed += 1
                    sys.stdout.write(" ".join(map(str, batch)) + "\\n")
                    sys.stdout.flush()
                    if mode == "exit" and confirmed == EXIT_AFTER:
                        os._exit(0)
            return on_done

        async def writer():
            while True:
                batch = [next(ids) for _ in range({GROUP})]
                rows = [StoredMessage("q", i, "s", b"x" * 100, None, None, 1, 1) for i in batch]
                await store.write(PutMessages(rows, on_done=confirm(batch)))

        async with anyio.create_task_group() as tg:
            await tg.start(store.run)
            for _ in range(20):
                tg.start_soon(writer)

    anyio.run(main)
""")


async def _stored_ids(path: Path) -> list[int]:
    store = SqliteStore(path)
    await store.open()
    try:
        return [m.id for m in await store.list_messages("q", limit=10**9)]
    finally:
        await store.close()


@pytest.mark.parametrize("mode", ["exit", "kill"])
def test_confirmed_writes_survive_a_crash(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "data" / "tidings.db"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    confirmed: list[int] = []
    with subprocess.Popen([sys.executable, "-c", CHILD, str(path), mode], stdout=subprocess.PIPE,
                          env=env, cwd=REPO) as proc:
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                confirmed += [int(x) for x in line.split()]
                if mode == "kill" and len(confirmed) >= 200 * GROUP:
                    proc.send_signal(signal.SIGKILL)
                    break
            confirmed += [int(x) for x in proc.stdout.read().split()]  # confirms already in the pipe
        finally:
            proc.kill()
            returncode = proc.wait(30)
    assert returncode == (0 if mode == "exit" else -signal.SIGKILL)
    assert len(confirmed) >= 150 * GROUP

    stored = anyio.run(_stored_ids, path)
    missing = set(confirmed) - set(stored)
    assert not missing, f"{len(missing)} confirmed messages lost, e.g. {sorted(missing)[:5]}"
    # Unconfirmed ops may or may not have committed, but each one is all or nothing.
    present = set(stored)
    for first in range(1, max(stored) + 1, GROUP):
        block = {first + k in present for k in range(GROUP)}
        assert len(block) == 1, f"op with ids {first}..{first + GROUP - 1} is half stored"
