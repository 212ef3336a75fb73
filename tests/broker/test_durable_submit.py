"""broker/durable.py: a publish whose store submission fails synchronously
(nothing reached the store) leaves no trace: its stream offsets are handed
out again instead of becoming gaps committed out of order, and its msg_id is
not remembered as published. A real Broker served in-process, so the test
can make one submission fail."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from tidings.broker.config import Config
from tidings.broker.app import Broker
from tidings.broker.durable.store.base import StorageError
from tidings.client import connect
from tidings.client import errors as E

WAIT = 10.0


@contextlib.asynccontextmanager
async def served(tmp_path: Path) -> AsyncIterator[Broker]:
    """A broker served in this process (as in test_limits.py)."""
    data = tmp_path / "data"
    data.mkdir()
    broker = Broker(Config(port=0, data_dir=str(data), min_free_disk=0))
    async with anyio.create_task_group() as tg:
        tg.start_soon(functools.partial(broker.serve, install_signals=False))
        with anyio.fail_after(WAIT):
            await broker.ready.wait()
        yield broker
        tg.cancel_scope.cancel()


def url(broker: Broker) -> str:
    assert broker.bound_address is not None
    return f"tidings://127.0.0.1:{broker.bound_address[1]}"


async def test_a_failed_submit_gives_its_offsets_back_and_forgets_its_msg_id(tmp_path: Path,
                                                                             monkeypatch: Any) -> None:
    async with served(tmp_path) as broker, connect(url(broker)) as tc:
        await tc.declare_stream("ev", bind=["ev.>"])
        assert (await tc.publish("ev.x", b"zero")).offset == 0
        store = broker.durable.store
        real = store.submit_nowait
        calls = []

        def failing(op: Any) -> None:
            calls.append(op)
            if len(calls) == 1:
                raise StorageError("refused for the test")
            real(op)

        monkeypatch.setattr(store, "submit_nowait", failing)
        with pytest.raises(E.StorageError):
            await tc.publish("ev.x", b"lost", msg_id="m-1")
        part = broker.durable.streams.streams["ev"].partitions[0]
        assert (part.next, part.hwm) == (1, 1)
        ack = await tc.publish("ev.x", b"again", msg_id="m-1")
        assert not ack.duplicate and ack.offset == 1
        async with tc.stream_consume("ev", "g") as msgs:
            with anyio.fail_after(WAIT):
                got = [(await msgs.next()).payload for _ in range(2)]
        assert got == [b"zero", b"again"]
