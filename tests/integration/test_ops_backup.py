"""Online backup of a real broker under load, restored into a second broker."""

from __future__ import annotations

import shutil
import stat
from pathlib import Path
from typing import Any

import anyio
import pytest

from tidings.client import connect
from tidings.client.errors import TidingsError
from tidings.protocol.errors import ErrorCode
from tests.integration.securitytools import audit_lines

WAIT = 20.0
ENOUGH = 3_000  # confirmed publishes before the backup starts


async def queue_payloads(tc: Any, queue: str) -> set[bytes]:
    """Every message payload of ``queue`` (dlq.list pages any queue without consuming it)."""
    out: set[bytes] = set()
    offset = 0
    while True:
        page = await tc.dlq_list(queue, limit=10_000, offset=offset)
        out.update(m["payload"] for m in page)
        if len(page) < 10_000:
            return out
        offset += len(page)


async def test_backup_during_load_restores_every_confirmed_message(start_broker, tmp_path: Path) -> None:
    b = start_broker()
    copy = b.data_dir / "backups" / "tidings.db"
    confirmed: list[bytes] = []
    async with connect(b.url, reconnect=False) as tc:
        await tc.declare_queue("orders", bind=["orders.>"])
        await tc.declare_stream("events", partitions=2, bind=["events.>"])
        for i in range(40):
            await tc.publish("events.e", f"e{i}".encode(), key=f"k{i % 5}")
        async with tc.stream_consume("events", "projector", window=100) as msgs:
            with anyio.fail_after(WAIT):
                n = 0
                async for m in msgs:
                    await m.ack(wait=True)
                    n += 1
                    if n == 25:
                        break
        events_before = await tc.stream_info("events")

        enough = anyio.Event()
        goal = ENOUGH
        stop = anyio.Event()

        async def publisher(lane: int) -> None:
            i = 0
            while not stop.is_set():
                batch = []
                for _ in range(100):
                    payload = f"{lane}-{i}".encode()
                    batch.append((payload, tc.publish_nowait("orders.new", payload, confirm=True)))
                    i += 1
                for payload, c in batch:
                    await c
                    confirmed.append(payload)
                if len(confirmed) >= goal:
                    enough.set()

        async with anyio.create_task_group() as tg:
            for lane in range(4):
                tg.start_soon(publisher, lane)
            with anyio.fail_after(WAIT):
                await enough.wait()
            before = set(confirmed)
            result = await tc.call("backup", {"name": "tidings.db"}, timeout=WAIT)
            goal, enough = len(confirmed) + 500, anyio.Event()
            with anyio.fail_after(WAIT):  # the load goes on after the copy too
                await enough.wait()
            stop.set()
        assert result["path"] == str(copy) and result["bytes"] == copy.stat().st_size > 0
        assert result["seconds"] >= 0
        live_total = len(await queue_payloads(tc, "orders"))

    restored_dir = tmp_path / "restored"
    restored_dir.mkdir()
    shutil.copy(copy, restored_dir / "tidings.db")
    r = start_broker(data_dir=restored_dir)
    async with connect(r.url, reconnect=False) as tc:
        payloads = await queue_payloads(tc, "orders")
        missing = before - payloads
        assert not missing, f"{len(missing)} messages confirmed before the backup are missing"
        assert len(payloads) <= live_total
        events = await tc.stream_info("events")
        assert [p["next"] for p in events["partitions"]] == [p["next"] for p in events_before["partitions"]]
        committed = {p["partition"]: p["committed"] for p in events["groups"]["projector"]["partitions"]}
        committed_before = {p["partition"]: p["committed"] for p in
                            events_before["groups"]["projector"]["partitions"]}
        assert committed == committed_before
        assert sum(committed.values()) == 25
        names = {q["name"] for q in await tc.list_queues()}
        assert {"orders", "orders.dlq", "events.dlq"} <= names


async def wait_for_audit(data_dir: Path, n: int) -> list[dict[str, Any]]:
    """The audit log's backup lines, once there are ``n`` (the writer thread appends them)."""
    with anyio.fail_after(WAIT):
        while True:
            lines = [x for x in audit_lines(data_dir) if x.get("method") == "backup"]
            if len(lines) >= n:
                return lines
            await anyio.sleep(0.05)  # bounded poll of a file another thread writes


async def test_backup_attacks_of_issue_10_11_are_refused_and_audited(start_broker, tmp_path: Path) -> None:
    """Each attack that worked through `backup` before: overwrite the live audit log or the
    broker's config, forge a log line with a newline, probe whether /etc/shadow exists,
    drop attacker-chosen content (an SSH key) anywhere the broker's user can write."""
    config = tmp_path / "tidings.toml"
    config.write_text('server_name = "victim"\n')
    config_text = config.read_text()
    b = start_broker("--config", str(config))
    audit = b.data_dir / "audit.log"
    ssh = tmp_path / "home" / ".ssh"
    ssh.mkdir(parents=True)
    key = b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAttackerKey attacker@evil"
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"keep")
    backups = b.data_dir / "backups"
    backups.mkdir(mode=0o700)
    (backups / "planted.db").symlink_to(outside)
    refused: list[tuple[dict[str, Any], int, str]] = []
    async with connect(b.url, reconnect=False) as tc:
        await tc.declare_queue("keys", bind=["keys.>"])
        await tc.publish("keys.x", b"\n" + key + b"\n")
        audit_before = audit.read_bytes()
        attacks: list[dict[str, Any]] = [
            {"path": str(audit), "overwrite": True}, {"name": "../audit.log"},
            {"path": str(config), "overwrite": True}, {"name": f"../../{config.name}"},
            {"name": "x.db\n2026-12-03 10:00:00,000 INFO broker.backup: forged line"},
            {"path": "/etc/shadow"}, {"path": "/etc/no-such-file-here"},
            {"name": "/etc/shadow"}, {"name": "/etc/no-such-file-here"},
            {"path": str(ssh / "authorized_keys")}, {"name": str(ssh / "authorized_keys")},
            {"name": "planted.db"},
        ]
        for args in attacks:
            with pytest.raises(TidingsError) as info:
                await tc.call("backup", args)
            refused.append((args, info.value.code, str(info.value)))
        ok = await tc.call("backup", {"name": "authorized_keys"})  # a name: lands in the backup directory
    codes = {code for _, code, _ in refused}
    assert codes <= {ErrorCode.INVALID_ARGUMENT, ErrorCode.CONFLICT}
    assert refused[-1][1] == ErrorCode.CONFLICT  # a planted symlink is an existing file: never followed
    # Whether /etc/shadow exists changes nothing in the answer.
    assert refused[5][1:] == refused[6][1:] and refused[7][1:] == refused[8][1:]
    assert audit.read_bytes().startswith(audit_before)  # appended to, never replaced
    assert config.read_text() == config_text
    assert outside.read_bytes() == b"keep"
    assert not (ssh / "authorized_keys").exists()
    assert ok["path"] == str(backups / "authorized_keys")
    assert stat.S_IMODE((backups / "authorized_keys").stat().st_mode) == 0o600
    assert not any(line.startswith("2026-12-03 10:00:00,000 INFO broker.backup: forged")
                   for line in b.stderr().splitlines())
    lines = await wait_for_audit(b.data_dir, len(attacks) + 1)
    assert [x["outcome"] for x in lines] == [ErrorCode(code).name for _, code, _ in refused] + ["ok"]
    assert lines[-1]["target"] == "authorized_keys"
    assert b.terminate() == 0
    b.restart()  # the config and the audit log still work
    assert "victim" in (await server_name(b.url))


async def server_name(url: str) -> str:
    async with connect(url, reconnect=False) as tc:
        return str((await tc.call("server.info"))["server_name"])


async def test_backups_go_to_the_configured_directory_and_never_replace(start_broker, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere" / "backups"
    b = start_broker(env={"TIDINGS_BACKUP_DIR": str(target)})
    async with connect(b.url, reconnect=False) as tc:
        result = await tc.call("backup", {"name": "one.db"})
        assert result["path"] == str(target / "one.db") and result["name"] == "one.db"
        first = (target / "one.db").read_bytes()
        with pytest.raises(TidingsError, match="already exists") as info:
            await tc.call("backup", {"name": "one.db"})
        assert info.value.code == ErrorCode.CONFLICT
    assert (target / "one.db").read_bytes() == first
    assert first[:16] == b"SQLite format 3\x00"
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    assert sorted(p.name for p in target.iterdir()) == ["one.db"]
