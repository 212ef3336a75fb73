"""`tidings queues` and `tidings dlq` as an operator runs them, against a real broker."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import anyio
import pytest

from tidings.client import connect
from queuetools import WAIT, collect, declare, holds

CLI = [sys.executable, "-m", "tidings"]
TEXT = '{"id": 1, "name": "Zoë"}'  # a UTF-8 payload


async def tidings(*args: str, url: str | None = None, check: bool = True) -> Any:
    """Run the CLI; returns the CompletedProcess (stdout/stderr as text)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
    if url is not None:
        env["TIDINGS_URL"] = url
    with anyio.fail_after(30):
        r = await anyio.run_process([*CLI, *args], env=env, check=False)
    r.stdout, r.stderr = r.stdout.decode(), r.stderr.decode()
    if check:
        assert r.returncode == 0, r.stderr
    return r


async def tidings_json(*args: str, url: str) -> Any:
    return json.loads((await tidings(*args, "--json", url=url)).stdout)


async def test_help_names_the_queue_commands() -> None:
    top = (await tidings("--help")).stdout
    assert "queues" in top and "dlq" in top
    q = (await tidings("queues", "--help")).stdout
    for word in ("declare", "info", "purge", "delete", "--json", "--url", "TIDINGS_URL"):
        assert word in q, word
    d = (await tidings("queues", "declare", "--help")).stdout
    for word in ("--bind", "--max-deliveries", "--ack-deadline", "--backoff-schedule", "--max-length",
                 "--overflow", "--message-ttl", "--dead-letter"):
        assert word in d, word
    for sub in ("ls", "redrive", "purge"):
        assert "--json" in (await tidings("dlq", sub, "--help")).stdout
    assert "--limit" in (await tidings("dlq", "ls", "--help")).stdout
    r = (await tidings("dlq", "redrive", "--help")).stdout
    assert "--count" in r and "--to" in r


async def test_declare_and_list(broker) -> None:
    url = broker.url
    assert (await tidings("queues", url=url)).stdout.strip() == "no queues"
    r = await tidings("queues", "declare", "orders", "--bind", "orders.>", "--bind", "refunds.*",
                      "--max-deliveries", "3", "--ack-deadline", "600", "--backoff-schedule", "1,5,30",
                      "--max-length", "1000", "--overflow", "dead_letter_oldest", url=url)
    assert "created" in r.stdout and "orders.dlq" in r.stdout
    # --json before or after the subcommand, --url instead of TIDINGS_URL
    again = await tidings_json("queues", "declare", "orders", "--bind", "orders.>", "--bind", "refunds.*",
                               "--max-deliveries", "3", "--ack-deadline", "600",
                               "--backoff-schedule", "1,5,30", "--max-length", "1000",
                               "--overflow", "dead_letter_oldest", url=url)
    assert again["created"] is False
    assert again["config"] == {**again["config"], "bind": ["orders.>", "refunds.*"], "max_deliveries": 3,
                               "ack_deadline": 600.0, "backoff_schedule": [1.0, 5.0, 30.0],
                               "max_length": 1000,
                               "overflow": "dead_letter_oldest"}
    r = await tidings("queues", "--json", "declare", "orders", "--bind", "orders.>", "--max-deliveries", "4",
                      "--url", url, check=False)
    assert r.returncode == 1 and r.stdout == ""
    assert "exists with different settings" in r.stderr and "max_deliveries" in r.stderr
    assert "Traceback" not in r.stderr

    async with connect(url) as tc:
        for i in range(3):
            await tc.publish("orders.eu", f"o{i}")
        async with tc.consume("orders", prefetch=2) as deliveries:
            held = await collect(deliveries, 2)
            await held[0].reject("nope", wait=True)
            held.append(await deliveries.next(timeout=WAIT))  # the freed prefetch slot takes the third
            await holds(tc, "orders.dlq", 1)

            table = (await tidings("queues", url=url)).stdout.splitlines()
            assert table[0].split() == ["NAME", "DEPTH", "IN-FLIGHT", "CONSUMERS", "DLQ", "DEPTH"]
            rows = {line.split()[0]: line.split()[1:] for line in table[1:]}
            assert rows == {"orders": ["2", "2", "1", "1"], "orders.dlq": ["1", "0", "0", "-"]}
            listed = await tidings_json("queues", "ls", url=url)
            columns = [(q["name"], q["depth"], q["in_flight"], q["consumers"], q["dlq_depth"])
                       for q in listed]
            assert columns == [("orders", 2, 2, 1, 1), ("orders.dlq", 1, 0, 0, None)]
            info = await tidings_json("queues", "info", "orders", url=url)
            assert info["rejected"] == 1 and info["config"]["max_length"] == 1000
    assert (await tidings_json("queues", "purge", "orders", url=url)) == {"queue": "orders", "purged": 2}
    r = await tidings("queues", "delete", "orders.dlq", url=url, check=False)
    assert r.returncode == 1 and "dead-letter queue of orders" in r.stderr
    assert "deleted queue orders" in (await tidings("queues", "delete", "orders", url=url)).stdout


async def _dead_letter(url: str) -> None:
    """jobs.dlq gets: a text message with headers, a binary one, and a long one."""
    async with connect(url) as tc:
        await declare(tc, "jobs")
        await declare(tc, "retry", "retry.none")
        await tc.publish("jobs.a", TEXT, headers={"type": "JobCreated"}, msg_id="job-1")
        await tc.publish("jobs.b", b"\xff\xfe\x00binary", headers={"raw": b"\xff", "ctl": "\x1b[2J"})
        await tc.publish("jobs.c", "x" * 3000)
        async with tc.consume("jobs", prefetch=3) as deliveries:
            for d in await collect(deliveries, 3):
                await d.reject(f"bad {d.subject}", wait=True)
        await holds(tc, "jobs.dlq", 3)


async def test_dlq_ls(broker) -> None:
    url = broker.url
    await _dead_letter(url)
    out = (await tidings("dlq", "ls", "jobs", url=url)).stdout
    assert out.startswith("jobs.dlq: 3 messages")
    assert f"payload: {TEXT}" in out
    assert "reason rejected  source jobs  deliveries 1" in out
    assert "last error: bad jobs.a" in out and "msg_id job-1" in out and "type=JobCreated" in out
    assert "payload: base64://4AYmluYXJ5" in out and "raw=base64:/w==" in out
    assert "ctl=\\x1b[2J" in out and "\x1b" not in out  # control characters are shown, not obeyed
    assert "(3000 bytes; --json shows all)" in out
    # the DLQ's own name works the same; --limit/--offset page
    page = (await tidings("dlq", "ls", "jobs.dlq", "--limit", "1", "--offset", "1", url=url)).stdout
    assert "showing 1 from #2" in page and "jobs.b" in page and "jobs.a" not in page

    full = await tidings_json("dlq", "ls", "jobs", "--limit", "10", url=url)
    assert full["dlq"] == "jobs.dlq"
    m1, m2, m3 = full["messages"]
    assert (m1["payload"], m1["payload_encoding"], m1["msg_id"]) == (TEXT, "utf-8", "job-1")
    assert (m2["payload"], m2["payload_encoding"]) == ("//4AYmluYXJ5", "base64")
    assert (m3["payload"], m3["payload_encoding"]) == ("x" * 3000, "utf-8")
    assert m1["headers"]["type"] == "JobCreated"
    assert m1["headers"]["tidings-dlq-reason"] == "rejected"
    assert m1["headers"]["tidings-last-error"] == "bad jobs.a"
    assert {"id", "subject", "published_ms", "deliveries"} <= set(m1)


async def test_dlq_redrive_and_purge(broker) -> None:
    url = broker.url
    await _dead_letter(url)
    r = await tidings("dlq", "redrive", "jobs", "--count", "1", url=url)
    assert "redrove 1 messages from jobs.dlq" in r.stdout
    res = await tidings_json("dlq", "redrive", "jobs.dlq", "--count", "1", "--to", "retry", url=url)
    assert res == {"dlq": "jobs.dlq", "redriven": 1, "skipped": 0}
    async with connect(url) as tc:
        assert [(await tc.queue_info(q))["depth"] for q in ("jobs", "jobs.dlq", "retry")] == [1, 1, 1]
        async with tc.consume("jobs") as deliveries:
            d = await deliveries.next(timeout=WAIT)
            assert (d.msg_id, d.delivery_count) == ("job-1", 1)
            await d.ack()
    assert (await tidings_json("dlq", "purge", "jobs", url=url)) == {"dlq": "jobs.dlq", "purged": 1}
    assert "purged 0 messages from jobs.dlq" in (await tidings("dlq", "purge", "jobs.dlq", url=url)).stdout


@pytest.mark.parametrize("args, code, words", [
    (["dlq", "ls", "nope"], 1, ["no queue named 'nope'"]),
    (["dlq", "ls", "jobs", "--limit", "0"], 1, ["limit"]),
    (["dlq", "redrive", "jobs", "--to", "nope"], 1, ["no queue named 'nope'"]),
    (["queues", "declare", "x", "--overflow", "drop"], 2, ["invalid choice"]),
    (["queues", "--url", "http://x"], 1, ["unsupported URL scheme"]),
])
async def test_errors_are_one_line(broker, args: list[str], code: int, words: list[str]) -> None:
    async with connect(broker.url) as tc:
        await declare(tc, "jobs")
    r = await tidings(*args, url=broker.url, check=False)
    assert r.returncode == code, r.stderr
    for w in words:
        assert w in r.stderr
    assert "Traceback" not in r.stderr


async def test_no_broker_is_a_clear_error(start_broker) -> None:
    b = start_broker()
    url = b.url
    b.terminate()
    r = await tidings("queues", url=url, check=False)
    assert r.returncode == 1
    assert r.stderr.startswith("tidings: cannot connect to") and "Traceback" not in r.stderr


async def test_declare_with_a_content_filter_and_info_shows_it(broker) -> None:
    flt = '{"region": [{"prefix": "eu-"}]}'
    await tidings("queues", "declare", "eu-orders", "--bind", "audit.>", "--bind-match", "orders.*", flt,
                  url=broker.url)
    info = await tidings_json("queues", "info", "eu-orders", url=broker.url)
    assert info["config"]["bind"] == ["audit.>", {"subject": "orders.*", "match": json.loads(flt)}]
    assert "prefix" in (await tidings("queues", "info", "eu-orders", url=broker.url)).stdout
    await tidings("streams", "declare", "eu-log", "--bind-match", "orders.*", flt, url=broker.url)
    assert (await tidings_json("streams", "info", "eu-log", url=broker.url))["config"]["bind"] == [
        {"subject": "orders.*", "match": json.loads(flt)}]
    bad = await tidings("queues", "declare", "bad", "--bind-match", "orders.*", '{"region": "eu"}',
                        url=broker.url, check=False)
    assert bad.returncode == 1 and "'region'" in bad.stderr
    notjson = await tidings("queues", "declare", "bad", "--bind-match", "orders.*", "{region", url=broker.url,
                            check=False)
    assert notjson.returncode == 1 and "not JSON" in notjson.stderr
