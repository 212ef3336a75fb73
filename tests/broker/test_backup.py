"""broker/backup.py in-process: argument checks, and a copy of a running broker's store."""

from __future__ import annotations

import functools
from pathlib import Path

import anyio
import pytest

from broker.backup import backup_call, backup_handler
from broker.config import Config
from broker.server import Broker
from broker.store import SqliteStore
from client import connect
from protocol.errors import ErrorCode, RemoteProtocolError


def make_broker(tmp_path: Path) -> Broker:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    return Broker(Config(port=0, data_dir=str(data)))


@pytest.mark.parametrize(("args", "code", "words"), [
    ({}, ErrorCode.INVALID_ARGUMENT, "needs 'path'"),
    ({"path": ""}, ErrorCode.INVALID_ARGUMENT, "needs 'path'"),
    ({"path": 42}, ErrorCode.INVALID_ARGUMENT, "needs 'path'"),
    ({"path": "copy.db"}, ErrorCode.INVALID_ARGUMENT, "relative"),
    ({"path": "/tmp/x.db", "overwrite": "yes"}, ErrorCode.INVALID_ARGUMENT, "overwrite"),
    ({"path": "/nonexistent-dir-for-tidings/x.db"}, ErrorCode.NOT_FOUND, "does not exist"),
])
async def test_bad_arguments_are_refused(tmp_path: Path, args: dict, code: ErrorCode, words: str) -> None:
    broker = make_broker(tmp_path)
    with pytest.raises(RemoteProtocolError, match=words) as info:
        await backup_call(broker, args, 7, running=set())
    assert info.value.code == code and info.value.rid == 7


async def test_existing_files_directories_and_the_live_database_are_refused(tmp_path: Path) -> None:
    broker = make_broker(tmp_path)
    existing = tmp_path / "old.db"
    existing.write_bytes(b"old")
    with pytest.raises(RemoteProtocolError, match="already exists") as info:
        await backup_call(broker, {"path": str(existing)}, 1, running=set())
    assert info.value.code == ErrorCode.CONFLICT
    with pytest.raises(RemoteProtocolError, match="is a directory"):
        await backup_call(broker, {"path": str(tmp_path), "overwrite": True}, 1, running=set())
    live = Path(broker.durable.store.path)
    for target in (live, Path(f"{live}-wal"), live.parent / ".." / live.parent.name / live.name):
        with pytest.raises(RemoteProtocolError, match="live database"):
            await backup_call(broker, {"path": str(target), "overwrite": True}, 1, running=set())
    with pytest.raises(RemoteProtocolError, match="already running") as info:
        await backup_call(broker, {"path": str(tmp_path / "new.db")}, 1, running={"/elsewhere.db"})
    assert info.value.code == ErrorCode.CONFLICT
    assert existing.read_bytes() == b"old"


async def test_backup_of_a_running_broker(tmp_path: Path) -> None:
    broker = make_broker(tmp_path)
    handler = backup_handler(broker)
    target = tmp_path / "copies" / "tidings.db"
    target.parent.mkdir()
    async with anyio.create_task_group() as tg:
        tg.start_soon(functools.partial(broker.serve, install_signals=False))
        with anyio.fail_after(10):
            await broker.ready.wait()
        assert broker.bound_address is not None
        async with connect(f"tidings://127.0.0.1:{broker.bound_address[1]}", reconnect=False) as tc:
            await tc.declare_queue("q", bind=["q.>"])
            acks = [await tc.publish("q.x", f"m{i}".encode()) for i in range(50)]
        result = await handler({"path": str(target)}, 1)
        again = await handler({"path": str(target), "overwrite": True}, 2)
        tg.cancel_scope.cancel()
    assert result["path"] == str(target) and result["bytes"] == target.stat().st_size
    assert again["bytes"] > 0 and result["seconds"] >= 0
    assert list(target.parent.iterdir()) == [target]  # no temporary file left beside it
    copy = SqliteStore(target)
    await copy.open()
    try:
        assert [name for name, _conf, _ms in await copy.load_queues()] == ["q", "q.dlq"]
        assert {m.id for m in await copy.list_messages("q", limit=1000)} == {a.id for a in acks}
    finally:
        await copy.close()
