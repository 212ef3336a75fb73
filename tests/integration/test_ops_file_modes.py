"""Issue 10.12: the data directory and its files are private to the broker's OS user,
and a lock file another user owns is a clear start-up error (it could be held to stop restarts)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tidings.client import connect

OTHER_UID = 65534  # "nobody": any uid but ours


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


async def test_data_directory_and_its_files_are_private(start_broker, tmp_path: Path) -> None:
    data = tmp_path / "data"
    b = start_broker(data_dir=data)
    async with connect(b.url, reconnect=False) as tc:
        await tc.declare_queue("q", bind=["q.>"])
        await tc.publish("q.x", b"secret payload")  # durable: the WAL holds it now
        names = {"tidings.db", "tidings.db-wal", "tidings.db-shm", "tidings.db.lock", "audit.log"}
        assert names <= {p.name for p in data.iterdir()}
        assert mode(data) == 0o700
        assert {p.name: oct(mode(p)) for p in data.iterdir() if p.is_file()} == \
            {p.name: "0o600" for p in data.iterdir() if p.is_file()}


def test_modes_left_by_an_older_version_are_restricted_and_logged(start_broker, tmp_path: Path) -> None:
    data = tmp_path / "data"
    b = start_broker(data_dir=data)
    assert b.terminate() == 0
    data.chmod(0o755)
    for p in data.iterdir():
        p.chmod(0o644)
    b.restart()
    assert mode(data) == 0o700
    for name in ("tidings.db", "tidings.db.lock", "audit.log"):
        assert mode(data / name) == 0o600, name
    err = b.stderr()
    assert f"data directory {data} was mode 755" in err
    assert f"database file {data / 'tidings.db'} was mode 644" in err
    assert f"lock file {data / 'tidings.db.lock'} was mode 644" in err
    assert f"data file {data / 'audit.log'} was mode 644" in err


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_lock_file_owned_by_another_user_is_a_clear_error(start_broker, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    lock = data / "tidings.db.lock"
    lock.touch(mode=0o644)
    os.chown(lock, OTHER_UID, OTHER_UID)
    with pytest.raises(RuntimeError, match="exited with 1") as info:
        # at the default log level, as an operator runs it (debug logs the traceback too, for us)
        start_broker("--log-level", "info", data_dir=data)
    err = str(info.value)
    want = (f"tidings: cannot open the store: lock file {lock} belongs to uid {OTHER_UID}, not to this "
            f"broker's user (uid 0)")
    lines = [line for line in err.splitlines() if "cannot open the store" in line]
    assert len(lines) == 1 and lines[0].startswith(want), err
    assert "Traceback" not in err
    assert lock.stat().st_uid == OTHER_UID  # left alone for the operator to look at
