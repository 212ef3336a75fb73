"""`tidings stats` and `tidings backup` against a live broker, in both output formats.

They run as a user runs them, `python -m tidings stats|backup` (the commands
live in client/cli/ops.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from tidings.broker.security.auth import hash_password
from tidings.client import connect

TIDINGS = ("-m", "tidings")


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=full_env,
                          check=False)


async def workload(url: str, **auth: str) -> None:
    async with connect(url, reconnect=False, **auth) as tc:
        await tc.declare_queue("mail", bind=["mail.>"])
        await tc.declare_stream("audit", partitions=2, bind=["audit.>"])
        for i in range(7):
            await tc.publish("mail.send", f"m{i}".encode())
        for i in range(5):
            await tc.publish("audit.x", f"a{i}".encode(), key=f"k{i}")
        async with tc.stream_consume("audit", "indexer") as msgs:
            with anyio.fail_after(10):
                n = 0
                async for m in msgs:
                    await m.ack(wait=True)
                    n += 1
                    if n == 3:
                        break


def check_json_frame(frame: dict) -> None:
    assert frame["connections"] >= 1  # the stats command's own connection at least
    assert set(frame["rates"]) >= {"published", "confirmed", "delivered", "acked", "nacked", "redelivered",
                                   "dead_lettered", "expired", "dropped", "errors"}
    assert frame["totals"]["published"] >= 12 and frame["totals"]["confirmed"] == 12
    queues = {q["name"]: q for q in frame["queues"]}
    assert queues["mail"]["depth"] == 7 and queues["mail"]["in_flight"] == 0 and queues["mail"]["dlq_depth"] == 0
    streams = {s["name"]: s for s in frame["streams"]}
    assert streams["audit"]["partitions"] == 2 and streams["audit"]["messages"] == 5
    assert streams["audit"]["groups"]["indexer"]["lag"] == 2


async def test_stats_once_json_and_text(broker) -> None:
    await workload(broker.url)
    p = await anyio.to_thread.run_sync(lambda: run(*TIDINGS, "stats", "--once", "--json", "--interval", "0.2",
                                                   "--url", broker.url))
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1
    check_json_frame(json.loads(lines[0]))

    p = await anyio.to_thread.run_sync(lambda: run(*TIDINGS, "stats", "--once", "--interval", "0.2",
                                                   "--url", broker.url))
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "\x1b[" not in out  # not a terminal: no screen clearing
    assert f"tidings stats  {broker.url}" in out
    assert "PUBLISHED" in out and "CONFIRMED" in out and "ACKED" in out
    mail = next(line for line in out.splitlines() if line.startswith("mail "))
    assert mail.split()[1] == "7"  # DEPTH
    audit = next(line for line in out.splitlines() if line.startswith("audit "))
    assert audit.split()[1:3] == ["2", "5"]  # PARTITIONS, MESSAGES
    assert audit.split()[5] == "2"  # MAX GROUP LAG


def test_stats_refreshes_and_reports_rates(broker) -> None:
    """Frames keep coming (--count), and a rate reflects what happened between samples.
    The publishes may span any number of frames (a busy machine): frames are read until one
    has seen them all, and the rates of all frames add up to them."""
    frames_max = 120  # 60 s of frames: bounds the loop below
    proc = subprocess.Popen([sys.executable, *TIDINGS, "stats", "--json", "--count", str(frames_max),
                             "--interval", "0.5", "--url", broker.url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None

    async def publish() -> None:
        async with connect(broker.url, reconnect=False) as tc:
            for i in range(200):
                await tc.publish("plain.rate", b"x")
            await tc.flush()

    frames = [json.loads(proc.stdout.readline())]
    anyio.run(publish)
    while frames[-1]["totals"]["published"] < 200 and len(frames) < frames_max:
        frames.append(json.loads(proc.stdout.readline()))
    assert len(frames) >= 2 and frames[-1]["totals"]["published"] == 200
    assert sum(f["rates"]["published"] * f["interval"] for f in frames) == pytest.approx(200, rel=0.05)
    if len(frames) < frames_max:
        proc.terminate()  # ours: it would go on to --count
    proc.wait(30)
    proc.stderr.close() if proc.stderr else None
    proc.stdout.close()


def test_stats_without_a_broker_fails_cleanly(tmp_path: Path) -> None:
    p = run(*TIDINGS, "stats", "--once", "--url", "tidings://127.0.0.1:1", "--timeout", "2")
    assert p.returncode == 1
    assert "tidings: cannot connect" in p.stderr and "Traceback" not in p.stderr
    p = run(*TIDINGS, "stats", "--once", "--url", "http://nope")
    assert p.returncode == 1 and "Traceback" not in p.stderr


def test_backup_command_both_formats(broker, tmp_path: Path) -> None:
    anyio.run(workload, broker.url)
    target = broker.data_dir / "backups" / "copy.db"
    p = run(*TIDINGS, "backup", "copy.db", "--url", broker.url)
    assert p.returncode == 0, p.stderr
    assert f"backed up to {target} on the broker's machine" in p.stdout
    size = target.stat().st_size
    assert f"{size:,} bytes" in p.stdout

    p = run(*TIDINGS, "backup", "copy.db", "--url", broker.url)  # exists: refused, left alone
    assert p.returncode == 1 and "already exists" in p.stderr

    p = run(*TIDINGS, "backup", "copy2.db", "--json", "--url", broker.url)
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout)
    assert result["path"] == str(target.parent / "copy2.db") and result["bytes"] > 0
    assert set(result) == {"name", "path", "bytes", "seconds"}

    p = run(*TIDINGS, "backup", str(tmp_path / "copy.db"), "--url", broker.url)
    assert p.returncode == 1 and "not a path" in p.stderr
    p = run(*TIDINGS, "backup", "copy.db", "--overwrite", "--url", broker.url)
    assert p.returncode == 2  # there is no --overwrite: a backup never replaces a file


def test_ops_commands_pass_credentials(start_broker, tmp_path: Path) -> None:
    """With users configured, the commands authenticate from flags or TIDINGS_USER/TIDINGS_PASSWORD."""
    conf = tmp_path / "tidings.toml"
    conf.write_text(f'[users.ops]\npassword = "{hash_password("s3cret")}"\n'
                    '[users.ops.permissions]\nadmin = [">"]\npublish = [">"]\nsubscribe = [">"]\n'
                    'consume = [">"]\n')
    b = start_broker("--config", str(conf))
    anyio.run(lambda: workload(b.url, user="ops", password="s3cret"))
    p = run(*TIDINGS, "stats", "--once", "--json", "--interval", "0.2", "--url", b.url)
    assert p.returncode == 1 and "tidings: " in p.stderr  # no credentials: refused
    p = run(*TIDINGS, "stats", "--once", "--json", "--interval", "0.2", "--url", b.url,
            env={"TIDINGS_USER": "ops", "TIDINGS_PASSWORD": "s3cret"})
    assert p.returncode == 0, p.stderr
    check_json_frame(json.loads(p.stdout))
    p = run(*TIDINGS, "stats", "--once", "--interval", "0.2", "--url", b.url, "--user", "ops", "--password", "wrong")
    assert p.returncode == 1
