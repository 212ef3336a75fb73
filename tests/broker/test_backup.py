"""broker/backup.py in-process: argument checks, and a copy of a running broker's store."""

from __future__ import annotations

import functools
import os
import stat
from pathlib import Path

import anyio
import pytest

from tidings.broker.ops.backup import backup_call, backup_handler
from tidings.broker.config import Config
from tidings.broker.app import Broker
from tidings.broker.durable.store import SqliteStore
from tidings.client import connect
from tidings.protocol.errors import ErrorCode, RemoteProtocolError


def make_broker(tmp_path: Path) -> Broker:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    return Broker(Config(port=0, data_dir=str(data)))


@pytest.mark.parametrize(("args", "words"), [
    ({}, "needs 'name'"),
    ({"name": ""}, "needs 'name'"),
    ({"name": 42}, "needs 'name'"),
    ({"path": "/tmp/x.db"}, "takes 'name', not 'path'"),
    ({"name": "x.db", "overwrite": True}, "unknown backup argument"),
    ({"name": "../audit.log"}, "not a path"),
    ({"name": "/etc/passwd"}, "not a path"),
    ({"name": "a\\b"}, "not a path"),
    ({"name": ".."}, "not a path"),
    ({"name": "x\n2026-12-03 INFO forged"}, "control characters"),
    ({"name": "x\u2028y"}, "control characters"),
    ({"name": "x\x00y"}, "control characters"),
    ({"name": ".hidden"}, "bad backup name"),
    ({"name": "a b"}, "bad backup name"),
    ({"name": "x" * 129}, "bad backup name"),
])
async def test_bad_arguments_are_refused_before_any_file_is_touched(tmp_path: Path, args: dict,
                                                                      words: str) -> None:
    broker = make_broker(tmp_path)
    with pytest.raises(RemoteProtocolError, match=words) as info:
        await backup_call(broker, args, 7, running=set())
    assert info.value.code == ErrorCode.INVALID_ARGUMENT and info.value.rid == 7
    assert "\n" not in info.value.message
    assert not (tmp_path / "data" / "backups").exists()


async def test_existing_files_and_symlinks_are_never_replaced(tmp_path: Path) -> None:
    broker = make_broker(tmp_path)
    backups = tmp_path / "data" / "backups"
    backups.mkdir(mode=0o700)
    (backups / "old.db").write_bytes(b"old")
    outside = tmp_path / "outside"
    outside.write_bytes(b"keep")
    (backups / "link.db").symlink_to(outside)
    for name in ("old.db", "link.db"):
        with pytest.raises(RemoteProtocolError, match="already exists") as info:
            await backup_call(broker, {"name": name}, 1, running=set())
        assert info.value.code == ErrorCode.CONFLICT
    with pytest.raises(RemoteProtocolError, match="already running") as info:
        await backup_call(broker, {"name": "new.db"}, 1, running={"other.db"})
    assert info.value.code == ErrorCode.CONFLICT
    assert (backups / "old.db").read_bytes() == b"old" and outside.read_bytes() == b"keep"


@pytest.mark.parametrize("problem", ["data_dir", "group_writable", "other_owner", "file"])
async def test_an_unsafe_backup_directory_is_refused(tmp_path: Path, problem: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    target = tmp_path / "bk"
    if problem == "data_dir":
        target = data
    elif problem == "file":
        target.write_bytes(b"")
    else:
        target.mkdir()
        if problem == "group_writable":
            target.chmod(0o770)
        elif os.geteuid() == 0:
            os.chown(target, 65534, 65534)
        else:
            pytest.skip("chown needs root")
    broker = Broker(Config(port=0, data_dir=str(data), backup_dir=str(target)))
    with pytest.raises(RemoteProtocolError) as info:
        await backup_call(broker, {"name": "x.db"}, 1, running=set())
    assert info.value.code == ErrorCode.STORAGE_ERROR
    assert not (target / "x.db").exists()


async def test_backup_of_a_running_broker(tmp_path: Path) -> None:
    broker = make_broker(tmp_path)
    handler = backup_handler(broker)
    backups = tmp_path / "data" / "backups"
    async with anyio.create_task_group() as tg:
        tg.start_soon(functools.partial(broker.serve, install_signals=False))
        with anyio.fail_after(10):
            await broker.ready.wait()
        assert broker.bound_address is not None
        async with connect(f"tidings://127.0.0.1:{broker.bound_address[1]}", reconnect=False) as tc:
            await tc.declare_queue("q", bind=["q.>"])
            acks = [await tc.publish("q.x", f"m{i}".encode()) for i in range(50)]
        result = await handler({"name": "first.db"}, 1)
        again = await handler({"name": "second.db"}, 2)
        tg.cancel_scope.cancel()
    target = backups / "first.db"
    assert result == {"name": "first.db", "path": str(target), "bytes": target.stat().st_size,
                      "seconds": result["seconds"]}
    assert again["bytes"] > 0 and result["seconds"] >= 0
    assert sorted(p.name for p in backups.iterdir()) == ["first.db", "second.db"]  # no temporary file left
    assert stat.S_IMODE(backups.stat().st_mode) == 0o700
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    copy = SqliteStore(target)
    await copy.open()
    try:
        assert [name for name, _conf, _ms in await copy.load_queues()] == ["q", "q.dlq"]
        assert {m.id for m in await copy.list_messages("q", limit=1000)} == {a.id for a in acks}
    finally:
        await copy.close()
