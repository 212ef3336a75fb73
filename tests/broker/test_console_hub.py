"""broker/http/console/snapshot.py in-process: one snapshot per tick however many pages
watch, rates from consecutive ticks, and each user's cut of the shared snapshot."""

from __future__ import annotations

import functools
from pathlib import Path

import anyio

from tidings.broker.app import Broker
from tidings.broker.config import Config
from tidings.broker.http.console.snapshot import STALE_TICKS, Hub, view
from tidings.broker.security.auth import ANONYMOUS, User
from tidings.broker.security.permissions import Permissions
from tidings.client import connect

WAIT = 10.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.25

    def __call__(self) -> float:
        return self.now


async def test_one_snapshot_per_tick_for_every_viewer_and_rates(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    broker = Broker(Config(port=0, data_dir=str(data)))
    async with anyio.create_task_group() as tg:
        tg.start_soon(functools.partial(broker.serve, install_signals=False))
        with anyio.fail_after(WAIT):
            await broker.ready.wait()
        clock = FakeClock()
        hub = Hub(broker, clock=clock)
        host, port = broker.bound_address or ("", 0)
        async with connect(f"tidings://{host}:{port}") as tc:
            await tc.declare_queue("jobs", bind=["jobs"])
            frames: list[bytes] = []

            async def viewer() -> None:
                frames.append(await hub.frame(ANONYMOUS))

            async with anyio.create_task_group() as viewers:  # 20 pages ask in the same tick
                for _ in range(20):
                    viewers.start_soon(viewer)
            assert hub.computed == 1 and len(set(frames)) == 1
            first = hub._snap
            assert first["totals"]["rate_in"] is None  # nothing to compare with yet

            for i in range(7):
                await tc.publish("jobs", f"m{i}", confirm=True)
            clock.now += 1.0
            await hub.frame(ANONYMOUS)
            await hub.frame(ANONYMOUS)
            assert hub.computed == 2
            snap = hub._snap
            (q,) = [r for r in snap["queues"] if r["name"] == "jobs"]
            assert (q["depth"], q["rate_in"]) == (7, 7.0)
            assert snap["totals"]["rate_in"] == 7.0

            clock.now += STALE_TICKS + 1.0  # nobody watched for a while: no average over the gap
            await hub.frame(ANONYMOUS)
            assert hub._snap["totals"]["rate_in"] is None

            # each user's cut: names hidden, marks of what it may do
            alice = User("alice", Permissions({"consume": ["jobs"]}))
            cut = view(hub._snap, alice)
            assert [r["name"] for r in cut["queues"]["rows"]] == ["jobs"]
            assert cut["queues"]["rows"][0]["can_admin"] is False
            assert cut["queues"]["rows"][0]["can_peek"] is True
            assert cut["scope"] == "user" and cut["resources"] is None
            bob = User("bob", Permissions({"admin": ["other.>"]}))
            assert view(hub._snap, bob)["queues"] == {"rows": [], "total": 0}
        tg.cancel_scope.cancel()
