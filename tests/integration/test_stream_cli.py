"""`tidings streams` (client/cli/streams.py) as an operator runs it, against a real broker.

The commands run in a subprocess as `python -m tidings streams ...`.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import anyio

from tidings.client import connect
from tidings.protocol.partition import partition_for

WAIT = 5.0


async def tidings(*args: str, url: str | None = None, check: bool = True) -> Any:
    """Run `tidings ARGS`; stdout/stderr as text."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
    if url is not None:
        env["TIDINGS_URL"] = url
    cmd = [sys.executable, "-m", "tidings"]
    with anyio.fail_after(30):
        r = await anyio.run_process([*cmd, *args], env=env, check=False)
    r.stdout, r.stderr = r.stdout.decode(), r.stderr.decode()
    if check:
        assert r.returncode == 0, r.stderr
    return r


def rows(text: str, head: str, column: str = "") -> list[list[str]]:
    """The rows of the table whose header line starts with ``head`` (and names ``column``)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(head) and (not column or column in line.split()))
    out = []
    for line in lines[start + 1:]:
        if not line.strip():
            break
        out.append(line.split())
    return out


async def test_help_names_the_commands_and_options() -> None:
    h = (await tidings("streams", "--help")).stdout
    for word in ("declare", "info", "trim", "delete", "--json", "--url", "TIDINGS_URL", "lag", "committed"):
        assert word in h, word
    d = (await tidings("streams", "declare", "--help")).stdout
    for word in ("--partitions", "--bind", "--max-age", "--max-messages", "--max-bytes", "--max-deliveries",
                 "--ack-deadline", "--dead-letter"):
        assert word in d, word


async def test_declare_list_and_groups(broker) -> None:
    url = broker.url
    assert (await tidings("streams", url=url)).stdout.strip() == "no streams"
    r = await tidings("streams", "declare", "orders", "--partitions", "3", "--bind", "orders.>", "--bind",
                      "refunds.*", "--max-age", "86400", "--max-messages", "1000", "--max-bytes", "1048576",
                      url=url)
    assert "created" in r.stdout and "3 partitions" in r.stdout and "orders.dlq" in r.stdout
    again = json.loads((await tidings("streams", "declare", "orders", "-p", "3", "--bind", "orders.>",
                                      "--bind", "refunds.*", "--max-age", "86400", "--max-messages", "1000",
                                      "--max-bytes", "1048576", "--json", "--url", url)).stdout)
    assert again["created"] is False
    assert {k: again["config"][k] for k in ("partitions", "bind", "max_age", "max_messages", "max_bytes")} == \
        {"partitions": 3, "bind": ["orders.>", "refunds.*"], "max_age": 86400.0, "max_messages": 1000,
         "max_bytes": 1048576}
    bad = await tidings("streams", "declare", "orders", "--partitions", "4", "--bind", "orders.>", url=url,
                        check=False)
    assert bad.returncode == 1 and "different settings" in bad.stderr and "Traceback" not in bad.stderr

    async with connect(url, name="projector") as tc:
        keys = ["a", "b", "c", "d", "e", "f", "g"]
        for i in range(20):
            await tc.publish("orders.x", f"{i}", key=keys[i % len(keys)])
        per_part = [sum(1 for i in range(20) if partition_for(keys[i % len(keys)], 3) == p) for p in range(3)]
        async with tc.stream_consume("orders", "billing", window=100) as msgs:
            got = [await msgs.next(timeout=WAIT) for _ in range(20)]
            done = [m for m in got if m.partition == 0][:2]
            for m in done:
                await m.ack()
            await tc.flush()
            text = (await tidings("streams", url=url)).stdout
            parts = rows(text, "STREAM ")
            assert parts == [["orders", str(p), "0", str(per_part[p]), str(per_part[p])] for p in range(3)]
            groups = rows(text, "STREAM/GROUP", "GENERATION")
            assert len(groups) == 3
            for p, row in enumerate(groups):
                committed = len(done) if p == 0 else 0
                # STREAM/GROUP GENERATION MEMBERS PARTITION ASSIGNED-TO COMMITTED LAG IN-FLIGHT
                assert row[0] == "orders/billing" and row[2] == "1" and row[3] == str(p)
                assert row[4].startswith("projector#")
                assert row[5:] == [str(committed), str(per_part[p] - committed), str(per_part[p] - committed)]
            members = rows(text, "STREAM/GROUP", "MEMBER")
            assert len(members) == 1 and members[0][0] == "orders/billing" and members[0][2] == "0,1,2"
            js = json.loads((await tidings("streams", "--json", url=url)).stdout)
            assert js[0]["groups"]["billing"]["partitions"][0]["committed"] == len(done)
            info = (await tidings("streams", "info", "orders", url=url)).stdout
            assert "orders/billing" in info and "max_messages: 1000" in info


async def test_trim_and_delete(broker) -> None:
    url = broker.url
    await tidings("streams", "declare", "logs", "--bind", "logs.>", "--max-messages", "5", url=url)
    async with connect(url) as tc:
        for i in range(12):
            await tc.publish("logs.x", f"{i}")
    r = await tidings("streams", "trim", "logs", url=url)
    assert "removed 7" in r.stdout
    assert rows((await tidings("streams", url=url)).stdout, "STREAM ") == [["logs", "0", "7", "12", "5"]]
    r = await tidings("streams", "delete", "logs", url=url)
    assert "deleted stream logs" in r.stdout
    missing = await tidings("streams", "info", "logs", url=url, check=False)
    assert missing.returncode == 1 and "no stream" in missing.stderr


async def test_unreachable_broker_is_a_clean_error() -> None:
    r = await tidings("streams", "--url", "tidings://127.0.0.1:1", "--timeout", "2", check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr and r.stderr.startswith("tidings:")

