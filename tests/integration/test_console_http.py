"""The web console over plain HTTP, without a browser (issue 16, item 2): sign-in and its
cookie, CSRF and Origin checks on every action, permissions (actions refused, names
hidden), audit lines, the live event stream, and the no-users (loopback) mode."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import anyio
import pytest

from tests.brokerproc import BrokerProcess
from tests.integration.consoletools import ConsoleHttp, read_events
from tests.integration.securitytools import PASSWORDS, audit_lines, user, write_config
from tidings.client import connect
from tidings.client import errors as E

WAIT = 15.0


def users_broker(start_broker: Callable[..., BrokerProcess], tmp_path: Path) -> BrokerProcess:
    """admin may do everything; alice only on names under ``a.``."""
    cfg = write_config(tmp_path / "console.toml", users={
        **user("admin", admin=[">"], consume=[">"], publish=[">"], subscribe=[">"]),
        **user("alice", admin=["a.>"], consume=["a.>"], publish=["a.>"], subscribe=["a.>"]),
    })
    return start_broker("--config", str(cfg), "--http-port", "0")


def wait_audit(b: BrokerProcess, pred: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """The first audit line matching ``pred`` (the audit file is written by a thread: poll, bounded)."""
    deadline = time.monotonic() + WAIT
    while True:
        for line in audit_lines(b.data_dir):
            if pred(line):
                return line
        assert time.monotonic() < deadline, f"no such audit line in {audit_lines(b.data_dir)}"
        time.sleep(0.05)


async def fill(url: str, creds: dict[str, str], queue: str, n: int) -> None:
    async with connect(url, **creds) as tc:
        await tc.declare_queue(queue, bind=[queue])
        for i in range(n):
            await tc.publish(queue, f"m{i}", confirm=True)


def test_sign_in_sets_a_strict_httponly_cookie_and_sign_out_ends_it(start_broker, tmp_path: Path) -> None:
    b = users_broker(start_broker, tmp_path)
    v = ConsoleHttp.of(b)
    status, headers, _ = v.request("GET", "/")
    assert status == 303 and headers["location"] == "/console/login"
    assert v.request("GET", "/console/api/session")[0] == 401
    status, headers, body = v.request("GET", "/console/login")
    assert status == 200 and b"<form" in body
    assert headers["content-security-policy"].startswith("default-src 'self'")

    assert v.sign_in("admin", "wrong password") == 401
    assert v.cookie is None
    # sign-in from another origin (a form on a foreign page) is refused before any password check
    assert v.json("POST", "/console/login", {"user": "admin", "password": PASSWORDS["admin"]},
                  origin="http://evil.example", csrf=None)[0] == 403
    assert v.sign_in("admin", PASSWORDS["admin"]) == 200
    flags = [f.strip().lower() for f in (v.set_cookie or "").split(";")]
    assert flags[0].startswith("tidings_session=") and len(flags[0]) > 40
    assert "httponly" in flags and "samesite=strict" in flags and "path=/" in flags
    assert "secure" not in flags  # plain HTTP here; set when the request came over TLS

    status, headers, body = v.request("GET", "/")
    assert status == 200 and b"console.js" in body
    assert v.session()["user"] == "admin"

    assert v.json("POST", "/console/logout", {}, csrf=None)[0] == 403  # sign-out needs the token too
    assert v.json("POST", "/console/logout", {})[0] == 200
    v2 = ConsoleHttp.of(b)
    v2.cookie = v.cookie
    assert v.cookie is None and v.set_cookie is not None
    # the old cookie value no longer works: the session is gone server-side
    old = v.set_cookie
    assert old is not None
    assert v.request("GET", "/console/api/session")[0] == 401
    wait_audit(b, lambda x: x["event"] == "auth_ok" and x["user"] == "admin"
               and x["method"] == "console-password")
    wait_audit(b, lambda x: x["event"] == "auth_failed" and x["user"] == "admin")


def test_ended_session_cookie_is_refused(start_broker, tmp_path: Path) -> None:
    b = users_broker(start_broker, tmp_path)
    v = ConsoleHttp.of(b)
    assert v.sign_in("admin", PASSWORDS["admin"]) == 200
    kept = v.cookie
    assert v.json("POST", "/console/logout", {})[0] == 200
    v.cookie = kept  # a copy of the cookie taken before sign-out
    assert v.request("GET", "/console/api/snapshot")[0] == 401


async def test_actions_need_the_csrf_token_and_the_origin(start_broker, tmp_path: Path) -> None:
    b = users_broker(start_broker, tmp_path)
    await fill(b.url, {"user": "admin", "password": PASSWORDS["admin"]}, "a.jobs", 3)
    v = ConsoleHttp.of(b)
    assert v.sign_in("admin", PASSWORDS["admin"]) == 200
    path = "/console/api/queues/a.jobs/purge"
    status, data = v.json("POST", path, {}, csrf=None)
    assert status == 403 and data["error"] == "PERMISSION_DENIED" and "CSRF" in data["message"]
    assert v.json("POST", path, {}, csrf="not-the-token")[0] == 403
    assert v.json("POST", path, {}, origin=None)[0] == 403
    assert v.json("POST", path, {}, origin="http://evil.example")[0] == 403
    assert v.snapshot()["queues"]["rows"][0]["depth"] == 3  # nothing was purged by the refused ones
    status, data = v.json("POST", path, {})
    assert (status, data) == (200, {"purged": 3})
    line = wait_audit(b, lambda x: x["event"] == "admin" and x["method"] == "queue.purge")
    assert (line["user"], line["target"], line["outcome"]) == ("admin", "a.jobs", "ok")


async def test_names_are_hidden_and_actions_refused_without_permission(start_broker, tmp_path: Path) -> None:
    b = users_broker(start_broker, tmp_path)
    admin = {"user": "admin", "password": PASSWORDS["admin"]}
    await fill(b.url, admin, "a.jobs", 2)
    await fill(b.url, admin, "b.secret", 2)
    async with connect(b.url, **admin) as tc, connect(b.url, user="alice", password=PASSWORDS["alice"]):
        await tc.declare_stream("b.events", partitions=2, bind=["b.events"])
        alice = ConsoleHttp.of(b)
        assert alice.sign_in("alice", PASSWORDS["alice"]) == 200
        snap = alice.snapshot()
        assert [q["name"] for q in snap["queues"]["rows"]] == ["a.jobs", "a.jobs.dlq"]
        assert snap["queues"]["rows"][0]["can_admin"] is True
        assert snap["streams"]["rows"] == []
        assert {c["user"] for c in snap["connections"]["rows"]} == {"alice"}
        assert snap["scope"] == "user" and snap["resources"] is None
        assert "b.secret" not in str(snap) and "b.events" not in str(snap)

        status, data = alice.json("POST", "/console/api/queues/b.secret/purge", {})
        assert status == 403 and data["error"] == "PERMISSION_DENIED"
        assert alice.json("GET", "/console/api/queues/b.secret/messages")[0] == 403
        assert alice.json("POST", "/console/api/queues/b.secret.dlq/redrive", {})[0] == 403
        wait_audit(b, lambda x: x["event"] == "permission_denied" and x["user"] == "alice"
                   and x["name"] == "b.secret" and x["action"] == "admin")

        admin_view = ConsoleHttp.of(b)
        assert admin_view.sign_in("admin", PASSWORDS["admin"]) == 200
        snap = admin_view.snapshot()
        names = [q["name"] for q in snap["queues"]["rows"]]
        assert names == ["a.jobs", "a.jobs.dlq", "b.events.dlq", "b.secret", "b.secret.dlq"]
        assert [s["name"] for s in snap["streams"]["rows"]] == ["b.events"]
        assert {c["user"] for c in snap["connections"]["rows"]} == {"admin", "alice"}
        assert snap["scope"] == "broker" and snap["resources"]["rss"] > 0
        assert admin_view.json("GET", "/console/api/queues/b.secret/messages")[0] == 200


ORDER = {"type": "object", "required": ["id"], "properties": {"id": {"type": "integer"}}}


async def test_schemas_and_bindings_are_listed_to_who_may_see_them(start_broker, tmp_path: Path) -> None:
    """The Schemas page's data: each schema with its versions, mode and counters, each binding
    with what happens to an invalid message; alice sees only the schemas she administers and
    the bindings of patterns she may publish on (names are user input: sent as JSON strings)."""
    b = users_broker(start_broker, tmp_path)
    mine, theirs = 'a.<img/src=x/onerror=alert(1)//"&Order', "b.Secret"  # ">" is not allowed in names
    async with connect(b.url, user="admin", password=PASSWORDS["admin"]) as tc:
        await tc.declare_queue("a.orders", bind=["a.orders"])
        await tc.declare_queue("a.bad")
        assert await tc.register_schema(mine, ORDER) == 1
        relaxed = {k: v for k, v in ORDER.items() if k != "required"}  # backward compatible
        assert await tc.register_schema(mine, relaxed) == 2
        await tc.register_schema(theirs, ORDER, compatibility="full")
        await tc.bind_schema("a.orders", mine, on_invalid="dead_letter", dead_letter_queue="a.bad")
        await tc.bind_schema("b.>", theirs)
        await tc.publish("a.orders", b'{"id": 1}', confirm=True)
        await tc.publish("a.orders", b'{"id": "x"}', confirm=True)  # dead-lettered into a.bad
        with pytest.raises(E.SchemaViolationError):
            await tc.publish("b.x", b"{}", confirm=True)

    admin = ConsoleHttp.of(b)
    assert admin.sign_in("admin", PASSWORDS["admin"]) == 200
    assert admin.session()["schemas"] is True  # the page shows its Schemas tab
    [snap] = await anyio.to_thread.run_sync(read_events, admin, 1)  # what the live page gets
    assert snap["schemas"] == {"total": 2, "rows": [
        {"name": mine, "latest": 2, "versions": 2, "compatibility": "backward", "valid": 1, "invalid": 1,
         "dead_lettered": 1},
        {"name": theirs, "latest": 1, "versions": 1, "compatibility": "full", "valid": 0, "invalid": 1,
         "dead_lettered": 0}]}
    assert snap["bindings"] == {"total": 2, "rows": [
        {"pattern": "a.orders", "schema": mine, "on_invalid": "dead_letter", "dead_letter": "a.bad"},
        {"pattern": "b.>", "schema": theirs, "on_invalid": "reject", "dead_letter": None}]}

    alice = ConsoleHttp.of(b)
    assert alice.sign_in("alice", PASSWORDS["alice"]) == 200
    snap = alice.snapshot()
    assert [s["name"] for s in snap["schemas"]["rows"]] == [mine] and snap["schemas"]["total"] == 1
    assert [x["pattern"] for x in snap["bindings"]["rows"]] == ["a.orders"]
    assert theirs not in str(snap) and "b.>" not in str(snap)


async def test_peek_is_safe_and_non_destructive_and_redrive_moves_a_dlq_back(start_broker,
                                                                            tmp_path: Path) -> None:
    b = users_broker(start_broker, tmp_path)
    async with connect(b.url, user="admin", password=PASSWORDS["admin"]) as tc:
        await tc.declare_queue("a.work", bind=["a.work"], max_deliveries=1)
        await tc.publish("a.work", b"<script>alert(1)</script>", confirm=True)
        await tc.publish("a.work", bytes(range(256)) * 20, confirm=True)
        async with tc.consume("a.work", prefetch=10) as deliveries:
            for _ in range(2):
                d = await deliveries.next(timeout=WAIT)
                await d.reject("bad", wait=True)
        v = ConsoleHttp.of(b)
        assert v.sign_in("admin", PASSWORDS["admin"]) == 200
        for _ in range(2):  # twice: a peek takes nothing
            status, data = v.json("GET", "/console/api/queues/a.work.dlq/messages?limit=10")
            assert status == 200
            text, binary = data["messages"]
            assert text["payload"] == {"kind": "text", "data": "<script>alert(1)</script>", "size": 25,
                                       "truncated": False}
            assert binary["payload"]["kind"] == "hex" and binary["payload"]["truncated"]
            assert binary["payload"]["size"] == 5120 and binary["payload"]["data"].startswith("00 01 02")
            assert text["headers"]["tidings-dlq-source"] == "a.work"
        assert v.json("GET", "/console/api/queues/a.work.dlq/messages?limit=1000")[0] == 400
        status, data = v.json("POST", "/console/api/queues/a.work.dlq/redrive", {})
        assert (status, data) == (200, {"redriven": 2, "skipped": 0})
        status, data = v.json("POST", "/console/api/queues/a.work/redrive", {})
        assert status == 400 and data["error"] == "INVALID_ARGUMENT"  # not a dead-letter queue
        assert v.json("POST", "/console/api/queues/nope/purge", {})[0] == 404
        rows = {q["name"]: q for q in v.snapshot()["queues"]["rows"]}
        assert rows["a.work"]["depth"] == 2 and rows["a.work.dlq"]["depth"] == 0
        line = wait_audit(b, lambda x: x["event"] == "admin" and x["method"] == "dlq.redrive")
        assert (line["target"], line["outcome"]) == ("a.work.dlq", "ok")


async def test_event_stream_sends_a_snapshot_per_tick(start_broker, tmp_path: Path) -> None:
    b = users_broker(start_broker, tmp_path)
    v = ConsoleHttp.of(b)
    assert v.sign_in("admin", PASSWORDS["admin"]) == 200
    await fill(b.url, {"user": "admin", "password": PASSWORDS["admin"]}, "a.jobs", 4)
    snaps = await anyio.to_thread.run_sync(read_events, v, 2)
    assert len(snaps) == 2 and snaps[1]["time"] > snaps[0]["time"]
    assert next((q["name"], q["depth"]) for q in snaps[1]["queues"]["rows"]) == ("a.jobs", 4)
    assert snaps[1]["totals"]["rate_in"] is not None  # the second tick has a previous one to compare with
    stranger = ConsoleHttp.of(b)
    with pytest.raises(AssertionError):
        read_events(stranger, 1)  # no session: 401


def test_without_users_no_sign_in_but_loopback_host_and_csrf(start_broker) -> None:
    b = start_broker("--http-port", "0")
    v = ConsoleHttp.of(b)
    status, headers, body = v.request("GET", "/")
    assert status == 200 and b"console.js" in body
    assert "default-src 'self'" in headers["content-security-policy"]
    info = v.session()
    assert info["auth"] is False and info["user"] is None and info["csrf"]
    assert v.request("GET", "/console/login")[0] == 303
    # a foreign name resolving to 127.0.0.1 (DNS rebinding) is not the console's origin
    assert v.request("GET", "/", headers={"Host": f"evil.example:{v.port}"})[0] == 403
    assert v.json("POST", "/console/api/queues/x/purge", {}, csrf=None)[0] == 403
    assert v.json("POST", "/console/api/queues/x/purge", {}, origin="http://evil.example")[0] == 403
    assert v.json("POST", "/console/api/queues/x/purge", {})[0] == 404  # checks passed: no such queue
    assert len(read_events(v, 1)) == 1


def test_static_files_ship_with_the_security_headers(start_broker) -> None:
    b = start_broker("--http-port", "0")
    v = ConsoleHttp.of(b)
    for name, kind in (("console.js", "javascript"), ("console.css", "text/css"), ("login.js", "javascript")):
        status, headers, body = v.request("GET", f"/console/static/{name}")
        assert status == 200 and kind in headers["content-type"] and body
        assert headers["content-security-policy"].startswith("default-src 'self'")
        assert headers["x-content-type-options"] == "nosniff"
    assert v.request("GET", "/console/static/../web.py")[0] == 404
    assert v.request("GET", "/healthz")[0] == 200 and v.request("GET", "/metrics")[0] == 200


def test_event_stream_ends_when_the_broker_shuts_down(start_broker) -> None:
    import http.client

    b = start_broker("--http-port", "0")
    v = ConsoleHttp.of(b)
    conn = http.client.HTTPConnection(v.host, v.port, timeout=WAIT)
    try:
        conn.request("GET", "/console/events", headers={"Host": f"{v.host}:{v.port}"})
        resp = conn.getresponse()
        assert resp.status == 200
        seen: list[bytes] = []
        for _ in range(100):  # until the first snapshot
            line = resp.readline()
            seen.append(line)
            if line.startswith(b"data: "):
                break
        assert b.terminate() == 0  # the open stream does not hold the shutdown up
        rest = resp.read()  # the broker said goodbye or closed: the stream ends
        assert b"event: end" in rest or rest == b"" or b"event: snapshot" in rest
    finally:
        conn.close()
    assert "Traceback" not in b.stderr()


def test_open_event_streams_are_bounded(start_broker) -> None:
    import socket

    from tidings.broker.http.console.web import MAX_VIEWERS

    b = start_broker("--http-port", "0")
    v = ConsoleHttp.of(b)
    held: list[socket.socket] = []
    try:
        for _ in range(MAX_VIEWERS):
            s = socket.create_connection((v.host, v.port), timeout=WAIT)
            held.append(s)
            s.sendall(f"GET /console/events HTTP/1.1\r\nHost: {v.host}:{v.port}\r\n\r\n".encode())
            got = b""
            while b"event: snapshot" not in got:  # the stream runs: it counts as a viewer
                chunk = s.recv(65536)
                assert chunk, got
                got += chunk
        status, data = v.json("GET", "/console/events")
        assert status == 503 and data["error"] == "OVERLOADED" and data["retriable"]
        assert v.request("GET", "/healthz")[0] == 200
        held.pop().close()
        # a page that left makes room, once the broker has seen it go (a bounded poll)
        deadline = time.monotonic() + WAIT
        while _events_refused(v):
            assert time.monotonic() < deadline, "the closed page's slot was never freed"
            time.sleep(0.05)
    finally:
        for s in held:
            s.close()


def _events_refused(v: ConsoleHttp) -> bool:
    """True if /console/events answers 503 now; else reads one snapshot of it and hangs up."""
    try:
        return not read_events(v, 1)
    except AssertionError as exc:
        if "503" in str(exc):
            return True
        raise
