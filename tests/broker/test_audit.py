"""Audit log: line format, no secrets, flood control with summaries, the file writer."""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
from typing import Any

import anyio
import pytest

from tidings.broker.security.audit import MAX_DISTINCT, AuditFile, AuditLog, logger_sink


class Clocks:
    def __init__(self) -> None:
        self.mono = 500.0
        self.wall = 1_700_000_000.25  # 2023-11-14T22:13:20.250Z

    def advance(self, dt: float) -> None:
        self.mono += dt
        self.wall += dt


class Sink(list):
    """Collects raw lines; ``docs()`` parses them (every line must be one JSON document)."""

    def docs(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self]


def make(**kw: Any) -> tuple[AuditLog, Sink, Clocks]:
    sink = Sink()
    c = Clocks()
    return AuditLog(sink.append, clock=lambda: c.mono, wall=lambda: c.wall, **kw), sink, c


def test_event_lines() -> None:
    a, sink, _ = make()
    a.auth_ok("alice", "10.0.0.1:5000", "password", connection=7)
    a.auth_failed("bob", "10.0.0.2:5001", "token", "bad_token")
    a.admin("alice", "10.0.0.1:5000", "queue.purge", "jobs", "ok")
    a.limit_refused("alice", "10.0.0.1:5002", "user.max_connections", max=2)
    out = sink.docs()
    assert out[0] == {"ts": "2023-11-14T22:13:20.250Z", "event": "auth_ok", "user": "alice",
                      "peer": "10.0.0.1:5000", "method": "password", "connection": 7}
    assert out[1]["event"] == "auth_failed" and out[1]["reason"] == "bad_token" and out[1]["user"] == "bob"
    assert out[2]["method"] == "queue.purge" and out[2]["target"] == "jobs" and out[2]["outcome"] == "ok"
    assert out[3]["limit"] == "user.max_connections" and out[3]["max"] == 2


def test_no_secrets_or_payloads() -> None:
    raw: list[str] = []
    a = AuditLog(raw.append)
    a.event("admin", "alice", "p", password="hunter2", Token="t0ps3cret", payload=b"card=4111111111111111",
            args={"name": "q", "auth": {"password": "hunter2"}}, blob=b"\x00" * 10)
    line = raw[0]
    for secret in ("hunter2", "t0ps3cret", "4111111111111111"):
        assert secret not in line
    doc = json.loads(line)
    assert doc["password"] == doc["Token"] == doc["payload"] == "[redacted]"
    assert doc["args"] == {"name": "q", "auth": "[redacted]"}
    assert doc["blob"] == "<10 bytes>"


def test_hostile_strings_cannot_forge_lines() -> None:
    raw: list[str] = []
    a = AuditLog(raw.append)
    a.auth_failed('x\n{"event": "auth_ok"}' + "y" * 500, "p", "password", "unknown_user")
    assert len(raw) == 1 and "\n" not in raw[0]
    assert len(json.loads(raw[0])["user"]) == 64  # claimed names are cut short


def test_every_line_separator_is_escaped() -> None:
    """U+2028 & co. in a claimed name must not split the line for readers using splitlines()."""
    raw: list[str] = []
    a = AuditLog(raw.append)
    seps = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
    name = "a" + seps + '{"event": "auth_ok"}'
    a.auth_failed(name, "p" + seps, "password", "unknown_user")
    a.permission_denied("u" + seps, "p", "publish", "n" + seps)
    for line in raw:
        assert line.splitlines() == [line]
        assert not any(c in line for c in seps)
    assert json.loads(raw[0])["user"] == name[:64] and json.loads(raw[0])["peer"] == "p" + seps
    assert json.loads(raw[1])["name"] == "n" + seps


A_MANY = 100


def test_summaries_keep_the_suppressed_peers_and_names() -> None:
    """A flood's suppressed lines are counted per address and per name, so who
    was behind it (and what else was denied) is not lost; bounded per window."""
    a, sink, c = make(limit=1, window=1.0)
    for i in range(5):
        a.auth_failed("admin", f"10.0.0.{i % 2}:{1000 + i}", "password", "bad_password")
    for i in range(A_MANY):
        a.permission_denied("bob", "p", "publish", f"secret.{i % (MAX_DISTINCT + 2)}")
    c.advance(1.0)
    a.flush()
    summaries = {d["of"]: d for d in sink.docs() if d["event"] == "suppressed"}
    failed = summaries["auth_failed"]
    assert failed["suppressed"] == 4
    assert failed["peers"] == [["10.0.0.1:1001", 1], ["10.0.0.0:1002", 1], ["10.0.0.1:1003", 1],
                               ["10.0.0.0:1004", 1]]
    assert failed["reasons"] == [["bad_password", 4]] and "names" not in failed
    denied = summaries["permission_denied"]
    assert denied["suppressed"] == A_MANY - 1
    assert len(denied["names"]) == MAX_DISTINCT
    assert sum(n for _, n in denied["names"]) + denied["others"]["names"] == A_MANY - 1
    assert denied["peers"] == [["p", A_MANY - 1]]


def test_denials_are_rate_limited_with_a_summary() -> None:
    a, sink, c = make(limit=3, window=1.0)
    for i in range(10):
        a.permission_denied("bob", "p", "publish", f"x.{i}")
    a.permission_denied("bob", "p", "subscribe", "y")  # another key: its own budget
    a.permission_denied("eve", "p", "publish", "z")
    out = sink.docs()
    assert [(d["user"], d["action"]) for d in out] == [("bob", "publish")] * 3 + [("bob", "subscribe"),
                                                                                 ("eve", "publish")]
    c.advance(0.5)
    assert a.flush() == 0  # the window is still open
    a.permission_denied("bob", "p", "publish", "x.late")  # still suppressed
    c.advance(0.6)
    a.permission_denied("bob", "p", "publish", "x.next")  # new window: summary first, then the line
    out = sink.docs()
    assert out[5] == {"ts": out[5]["ts"], "event": "suppressed", "user": "bob", "peer": "",
                      "of": "permission_denied", "action": "publish", "suppressed": 7 + 1, "window_s": 1.0,
                      "peers": [["p", 8]], "names": [[f"x.{i}", 1] for i in range(3, 10)] + [["x.late", 1]]}
    assert out[6]["name"] == "x.next"
    assert len(out) == 7


def test_flush_reports_ended_windows_only() -> None:
    a, sink, c = make(limit=1, window=1.0)
    a.permission_denied("bob", "p", "publish", "a")
    a.permission_denied("bob", "p", "publish", "b")
    c.advance(0.9)
    a.permission_denied("eve", "p", "publish", "a")
    a.permission_denied("eve", "p", "publish", "b")
    a.permission_denied("eve", "p", "publish", "c")
    c.advance(0.2)
    assert a.flush() == 1  # bob's window ended; eve's did not
    last = sink.docs()[-1]
    assert last["event"] == "suppressed" and last["user"] == "bob" and last["suppressed"] == 1
    c.advance(1.0)
    assert a.flush() == 1
    last = sink.docs()[-1]
    assert last["user"] == "eve" and last["suppressed"] == 2
    assert a.flush() == 0 and a._windows == {}


def test_auth_failures_and_refusals_are_limited_too() -> None:
    a, sink, _ = make(limit=2)
    for _ in range(5):
        a.auth_failed("admin", "1.2.3.4:1", "password", "bad_password")
        a.auth_throttled("1.2.3.4:1", 10.0)
        a.limit_refused("", "1.2.3.4:1", "max_connections")
    for _ in range(5):
        a.auth_ok("alice", "p", "token")  # successes and admin ops are never dropped
        a.admin("alice", "p", "queue.purge", "q")
    assert len(sink) == 2 * 3 + 10


def test_tracked_keys_are_bounded() -> None:
    a, sink, _ = make(limit=1, max_keys=2)
    for user in ("u1", "u1", "u2", "u3"):
        a.permission_denied(user, "p", "publish", "x")
    assert len(a._windows) == 2
    summary = [d for d in sink.docs() if d["event"] == "suppressed"]
    assert summary == [{"ts": summary[0]["ts"], "event": "suppressed", "user": "u1", "peer": "",
                        "of": "permission_denied", "action": "publish", "suppressed": 1, "window_s": 1.0,
                        "peers": [["p", 1]], "names": [["x", 1]]}]


async def test_run_flusher_flushes_each_window() -> None:
    got = anyio.Event()
    lines: list[str] = []

    def sink(line: str) -> None:
        lines.append(line)
        if '"suppressed"' in line:
            got.set()

    now = [0.0]  # both denials in one window however slow the machine, then the window is over
    a = AuditLog(sink, limit=1, window=0.01, clock=lambda: now[0])
    a.permission_denied("bob", "p", "publish", "x")
    a.permission_denied("bob", "p", "publish", "y")
    now[0] = 1.0
    with anyio.fail_after(60):  # generous: a loaded machine may starve the loop for seconds
        async with anyio.create_task_group() as tg:
            await tg.start(a.run_flusher)
            await got.wait()
            tg.cancel_scope.cancel()
    assert json.loads(lines[-1])["suppressed"] == 1


def test_logger_sink(caplog: pytest.LogCaptureFixture) -> None:
    a = AuditLog(logger_sink())
    with caplog.at_level(logging.INFO, logger="tidings.audit"):
        a.auth_ok("alice", "p", "password")
    assert [r.name for r in caplog.records] == ["tidings.audit"]
    assert json.loads(caplog.records[0].getMessage())["event"] == "auth_ok"


# -------------------------------------------------------------- AuditFile


def test_audit_file_appends_private_lines(tmp_path: Any) -> None:
    path = tmp_path / "audit.log"
    path.write_text('{"event": "old"}\n')
    os.chmod(path, 0o600)
    with AuditFile(str(path)) as f:
        a = AuditLog(f)
        a.auth_ok("alice", "p", "password")
        a.auth_failed("bob", "p", "password", "bad_password")
    docs = [json.loads(x) for x in path.read_text().splitlines()]
    assert [d["event"] for d in docs] == ["old", "auth_ok", "auth_failed"]
    new = tmp_path / "new.log"
    AuditFile(str(new)).close()
    assert stat.S_IMODE(new.stat().st_mode) == 0o600  # user names and addresses are not for everyone


def test_audit_file_drops_and_counts_when_full(tmp_path: Any) -> None:
    path = tmp_path / "audit.log"
    f = AuditFile(str(path), max_queue=2)
    entered = threading.Event()
    gate = threading.Event()
    real = f._fh

    class Slow:
        def write(self, s: str) -> int:
            entered.set()
            assert gate.wait(10)
            return real.write(s)

        def flush(self) -> None:
            real.flush()

        def close(self) -> None:
            real.close()

    f._fh = Slow()  # type: ignore[assignment]
    assert f.write("line1")
    assert entered.wait(10)  # the writer holds line1 and is stuck in write()
    assert f.write("line2") and f.write("line3")  # fills the queue of 2
    assert [f.write(f"lost{i}") for i in range(3)] == [False, False, False]
    assert f.dropped_total == 3
    gate.set()
    f.close()
    lines = path.read_text().splitlines()
    assert lines[:3] == ["line1", "line2", "line3"]
    assert json.loads(lines[3])["event"] == "audit_dropped" and json.loads(lines[3])["dropped"] == 3
    assert not f.write("after close")


def test_audit_file_open_error(tmp_path: Any) -> None:
    with pytest.raises(OSError):
        AuditFile(str(tmp_path / "no" / "such" / "dir.log"))


async def test_audit_file_aclose(tmp_path: Any) -> None:
    f = AuditFile(str(tmp_path / "a.log"))
    f.write("x")
    await f.aclose()
    assert (tmp_path / "a.log").read_text() == "x\n"
