"""examples/event_sourcing.py runs against a real broker and says what it did."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import anyio

from tidings.client import connect

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "event_sourcing.py"


async def run_example(url: str, *args: str) -> str:
    with anyio.fail_after(60):
        r = await anyio.run_process([sys.executable, str(EXAMPLE), "--url", url, *args], check=False)
    out, err = r.stdout.decode(), r.stderr.decode()
    assert r.returncode == 0, out + err
    return out


async def test_event_sourcing_example(broker) -> None:
    args = ("--events", "200", "--live", "10", "--pace", "0.01", "--seed", "7")
    out = await run_example(broker.url, *args)
    assert "declared stream 'example-bank': 4 partitions" in out and ", new, 0 events stored" in out
    assert "replayed 0 events" in out
    m = re.search(r"appended (\d+) events", out)
    assert m is not None
    appended = int(m.group(1))
    assert 12 < appended <= 212
    assert f"rebuilt balances by replaying {appended} events" in out
    assert "replayed state matches the write side" in out
    assert f"read model caught up with history: {appended} events applied" in out
    assert len(re.findall(r"\[read model\] p\d@\d+", out)) == 10  # each live event, as it arrived
    assert f"read model up to date: {appended + 10} events applied" in out and "group lag 0" in out
    assert out.rstrip().endswith("read model matches the replayed stream")

    # a second run starts from the first one's history, by replaying it
    out2 = await run_example(broker.url, *args)
    assert f"existing, {appended + 10} events stored" in out2
    assert f"replayed {appended + 10} events" in out2
    assert "replayed state matches the write side" in out2
    assert out2.rstrip().endswith("read model matches the replayed stream")

    appended2 = int(re.search(r"appended (\d+) events", out2).group(1))  # type: ignore[union-attr]
    async with connect(broker.url) as tc:
        info = await tc.stream_info("example-bank")
    # one read-model group per run; each had caught up with everything when its run ended
    lags = sorted(sum(p["lag"] for p in g["partitions"]) for g in info["groups"].values())
    assert lags == [0, appended2 + 10]
