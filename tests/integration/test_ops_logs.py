"""Logs: JSON lines with --log-format json, one line per connection open/close, no payloads."""

from __future__ import annotations

import json

from tidings.client import connect

SECRET = "payload-that-must-never-be-logged-7f3a"


async def test_json_logs_connection_lines_and_no_payloads(start_broker) -> None:
    b = start_broker("--log-format", "json")  # the fixture runs at --log-level debug
    async with connect(b.url, name="log-test", reconnect=False) as tc:
        await tc.declare_queue("logq", bind=["logq.>"])
        await tc.publish("logq.x", SECRET.encode(), headers={"h": SECRET})
        sub = await tc.subscribe("plain.>")
        await tc.publish("plain.x", SECRET.encode())
        await sub.next(timeout=5)
    assert b.terminate() == 0
    lines = [line for line in b.stderr().splitlines() if line.strip()]
    docs = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"ts", "level", "logger", "msg"} <= d.keys() for d in docs)
    assert {d["level"] for d in docs} <= {"debug", "info", "warning", "error", "critical"}
    msgs = [d["msg"] for d in docs]
    assert any("connection" in m and "open" in m and "log-test" in m for m in msgs), msgs
    assert any("connection" in m and "closed" in m for m in msgs), msgs
    assert not any(SECRET in line for line in lines)


async def test_text_logs_at_info_have_no_connection_chatter(start_broker) -> None:
    b = start_broker("--log-level", "info")  # later flags win over the fixture's debug
    async with connect(b.url, reconnect=False) as tc:
        await tc.publish("plain.x", SECRET.encode())
        await tc.flush()
    assert b.terminate() == 0
    text = b.stderr()
    assert " INFO " in text and "listening on" in text
    assert " DEBUG " not in text
    assert SECRET not in text
    for line in text.splitlines():
        if line.strip():
            json_like = line.lstrip().startswith("{")
            assert not json_like
