"""The publish gateway (POST /v1/publish/SUBJECT) of a real broker process: messages
published over HTTP are read back through the client (a subscriber, a queue consumer,
a stream replay); headers and options map as docs/HTTP.md says; errors map to HTTP
statuses with the typed error's name; logins and permissions are the TCP ones; and
the curl examples of docs/HTTP.md run as written."""

from __future__ import annotations

import base64
import http.client
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import anyio
import pytest

from tidings.client import connect
from tests.integration.securitytools import PASSWORDS, TOKENS, audit_lines, user, write_config
from tests.integration.test_http_port import http_address

WAIT = 10.0
DOC = Path(__file__).resolve().parents[2] / "docs" / "HTTP.md"
DOC_URL = "http://127.0.0.1:9421"
ALL = {"publish": [">"], "subscribe": [">"], "consume": [">"], "admin": [">"]}


def post(addr: tuple[str, int], path: str, body: bytes = b"", headers: dict[str, str] | None = None,
         method: str = "POST") -> tuple[int, dict[str, str], Any]:
    """One request with http.client; (status, lower-cased headers, parsed JSON or raw body)."""
    conn = http.client.HTTPConnection(*addr, timeout=WAIT)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        hdrs = {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()
    if hdrs.get("content-type", "").startswith("application/json"):
        return resp.status, hdrs, json.loads(data)
    return resp.status, hdrs, data


async def apost(addr: tuple[str, int], path: str, body: bytes = b"", headers: dict[str, str] | None = None,
                method: str = "POST") -> tuple[int, dict[str, str], Any]:
    return await anyio.to_thread.run_sync(lambda: post(addr, path, body, headers, method))


async def take(it: Any, n: int) -> list[Any]:
    out = []
    with anyio.fail_after(WAIT):
        async for x in it:
            out.append(x)
            if len(out) == n:
                break
    return out


def bearer(token: str = TOKENS["svc"]) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def basic(name: str, password: str | None = None) -> dict[str, str]:
    raw = f"{name}:{PASSWORDS[name] if password is None else password}".encode()
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


@pytest.fixture
def open_broker(start_broker):
    return start_broker("--http-port", "0")


@pytest.fixture
def auth_broker(start_broker, tmp_path: Path):
    cfg = write_config(tmp_path / "gw.toml", users={
        **user("admin", **ALL),
        **user("svc", tokens=[TOKENS["svc"]], publish=["orders.>", "clicks.>", "alerts.>"]),
        **user("alice", publish=["orders.>"], subscribe=["orders.>"])})
    return start_broker("--config", str(cfg), "--http-port", "0")


async def test_publishes_reach_subscribers_queues_and_streams(open_broker) -> None:
    b = open_broker
    addr = http_address(b.extra_lines)
    async with connect(b.url, reconnect=False) as tc:
        await tc.declare_queue("jobs", bind=["jobs.>"])
        await tc.declare_stream("ev", partitions=2, bind=["ev.>"])
        sub = await tc.subscribe("news.>")
        status, _, body = await apost(addr, "/v1/publish/news.today", b"\x00binary\xff",
                                      {"Tidings-Origin": "webhook", "ce-type": "com.example.news",
                                       "Content-Type": "application/octet-stream"})
        assert (status, body) == (202, {"subject": "news.today", "stored": False, "subscribers": 1})
        [m] = await take(sub, 1)
        assert (m.subject, m.payload) == ("news.today", b"\x00binary\xff")
        assert m.headers == {"origin": "webhook", "ce-type": "com.example.news",
                             "content-type": "application/octet-stream"}

        status, _, body = await apost(addr, "/v1/publish/jobs.resize?msg_id=job-1", b"resize 1")
        assert status == 200 and body["stored"] is True and body["queues"] == 1 and body["subscribers"] == 0
        first_id = body["id"]
        status, _, again = await apost(addr, "/v1/publish/jobs.resize", b"resize 1", {"Tidings-Msg-Id": "job-1"})
        assert status == 200 and again["duplicate"] is True and again["id"] == first_id
        async with tc.consume("jobs") as deliveries:
            [d] = await take(deliveries, 1)
            assert (d.subject, d.payload) == ("jobs.resize", b"resize 1")
            await d.ack(wait=True)
        assert (await tc.queue_info("jobs"))["depth"] == 0  # the duplicate was not stored

        offsets = {}
        for i in range(3):
            status, _, body = await apost(addr, "/v1/publish/ev.click", f"click {i}".encode(), {"Tidings-Key": "u-7"})
            assert status == 200 and body["stream"] == "ev" and body["queues"] == 0, body
            offsets[i] = (body["partition"], body["offset"])
        parts = {p for p, _ in offsets.values()}
        assert len(parts) == 1  # one key, one partition
        part = parts.pop()
        assert [o for _, o in offsets.values()] == [0, 1, 2]
        got = await take(tc.read_stream("ev", part), 3)
        assert [(m.payload, m.key) for m in got] == [(f"click {i}".encode(), "u-7") for i in range(3)]


async def test_the_w3c_trace_context_goes_through_the_gateway(open_broker) -> None:
    b = open_broker
    addr = http_address(b.extra_lines)
    trace = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "tracestate": "rojo=1"}
    async with connect(b.url, reconnect=False) as tc:
        sub = await tc.subscribe("traced.>")
        status, _, _ = await apost(addr, "/v1/publish/traced.a", b"", {**trace, "X-Other": "dropped"})
        assert status == 202
        [m] = await take(sub, 1)
        assert m.headers == trace


async def test_request_errors_map_to_statuses(start_broker) -> None:
    b = start_broker("--http-port", "0", env={"TIDINGS_HTTP_MAX_BODY": "64"})
    addr = http_address(b.extra_lines)
    async with connect(b.url, reconnect=False) as tc:
        await tc.declare_queue("tight", bind=["tight.>"], max_length=1, overflow="reject")

        status, _, body = await apost(addr, "/v1/publish/bad..subject", b"x")
        assert (status, body["error"], body["code"]) == (400, "INVALID_SUBJECT", 6)
        status, _, body = await apost(addr, "/v1/publish/a.*", b"x")
        assert (status, body["error"]) == (400, "INVALID_SUBJECT")
        status, _, body = await apost(addr, "/v1/publish/tight.x", b"x", {"Tidings-Tidings-Dlq-Reason": "forged"})
        assert (status, body["error"]) == (400, "INVALID_ARGUMENT") and "reserved" in body["message"]
        status, _, body = await apost(addr, "/v1/publish/tight.x?msg_id=a&msg_id=b", b"x")
        assert (status, body["error"]) == (400, "INVALID_ARGUMENT")
        status, _, body = await apost(addr, "/v1/publish/tight.x?msgid=a", b"x")
        assert (status, body["error"]) == (400, "INVALID_ARGUMENT") and "msgid" in body["message"]
        status, _, body = await apost(addr, "/v1/publish/tight.x", b"x", {"Tidings-Key": "k" * 300})
        assert (status, body["error"]) == (400, "INVALID_ARGUMENT")

        status, _, body = await apost(addr, "/v1/publish/nobody.listens", b"x")
        assert (status, body["error"], body["retriable"]) == (404, "NO_ROUTE", False)
        status, headers, _ = await apost(addr, "/v1/publish/tight.x", method="GET")
        assert status == 405 and headers["allow"] == "POST"

        status, _, body = await apost(addr, "/v1/publish/tight.x", b"y" * 65)  # Content-Length says too much
        assert (status, body["error"]) == (413, "LIMIT_EXCEEDED")
        chunked = await anyio.to_thread.run_sync(_chunked, addr, "/v1/publish/tight.x", [b"y" * 40, b"y" * 40])
        assert chunked[0] == 413 and b"LIMIT_EXCEEDED" in chunked[1]  # no length declared: counted as it comes
        assert (await apost(addr, "/v1/publish/tight.x", b"y" * 64))[0] == 200  # at the limit: fine

        status, headers, body = await apost(addr, "/v1/publish/tight.x", b"one too many")
        assert (status, body["error"], body["retriable"]) == (503, "QUEUE_FULL", True)
        assert headers["retry-after"] == "1"
        assert (await tc.queue_info("tight"))["depth"] == 1


def _chunked(addr: tuple[str, int], path: str, chunks: list[bytes]) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(*addr, timeout=WAIT)
    try:
        conn.request("POST", path, body=iter(chunks), encode_chunked=True,
                     headers={"Transfer-Encoding": "chunked"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


async def test_logins_and_permissions_are_the_tcp_ones(auth_broker) -> None:
    b = auth_broker
    addr = http_address(b.extra_lines)
    async with connect(b.url, user="admin", password=PASSWORDS["admin"], reconnect=False) as tc:
        await tc.declare_queue("orders", bind=["orders.>"])
        status, headers, body = await apost(addr, "/v1/publish/orders.new", b"x")
        assert (status, body["error"]) == (401, "AUTH_FAILED") and "Basic" in headers["www-authenticate"]
        assert (await apost(addr, "/v1/publish/orders.new", b"x", bearer("not-a-token")))[0] == 401
        assert (await apost(addr, "/v1/publish/orders.new", b"x", basic("alice", "wrong")))[0] == 401
        assert (await apost(addr, "/v1/publish/orders.new", b"x", {"Authorization": "Digest x"}))[0] == 401
        assert (await apost(addr, "/v1/publish/orders.new", b"x", {"Authorization": "Basic !!"}))[0] == 401

        status, _, body = await apost(addr, "/v1/publish/payments.refund", b"x", basic("alice"))
        assert (status, body["error"]) == (403, "PERMISSION_DENIED")
        status, _, body = await apost(addr, "/v1/publish/orders.new", b"by alice", basic("alice"))
        assert status == 200 and body["queues"] == 1
        status, _, body = await apost(addr, "/v1/publish/orders.new", b"by svc", bearer())
        assert status == 200 and body["queues"] == 1
        # msg_id is scoped per user, as over TCP: svc's "o-1" does not answer alice's
        first = (await apost(addr, "/v1/publish/orders.new?msg_id=o-1", b"a", basic("alice")))[2]
        other = (await apost(addr, "/v1/publish/orders.new?msg_id=o-1", b"s", bearer()))[2]
        assert "duplicate" not in other and other["id"] != first["id"]
        async with tc.consume("orders") as deliveries:
            got = await take(deliveries, 4)
            assert [d.payload for d in got] == [b"by alice", b"by svc", b"a", b"s"]
            for d in got:
                await d.ack(wait=True)
    denials = [x for x in audit_lines(b.data_dir) if x["event"] == "permission_denied"]
    assert [(x["user"], x["action"], x["name"]) for x in denials] == [("alice", "publish", "payments.refund")]
    logins = [x for x in audit_lines(b.data_dir) if x["event"] == "auth_ok" and x["method"].startswith("http-")]
    assert {(x["user"], x["method"]) for x in logins} == {("alice", "http-password"), ("svc", "http-token")}
    assert len(logins) == 2  # a login is remembered, not audited per request
    failed = [x for x in audit_lines(b.data_dir) if x["event"] == "auth_failed"]
    assert len(failed) >= 3


# ------------------------------------------------------------- docs/HTTP.md

EXAMPLE = re.compile(r"^```sh\n(.*?)^```\n\n```json\n(.*?)^```$", re.DOTALL | re.MULTILINE)


def doc_examples() -> list[tuple[str, dict[str, Any]]]:
    text = DOC.read_text(encoding="utf-8")
    return [(m.group(1), json.loads(m.group(2))) for m in EXAMPLE.finditer(text)]


def test_the_doc_has_examples() -> None:
    assert len(doc_examples()) >= 6


async def test_the_curl_examples_answer_as_documented(auth_broker) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed: apt-get install curl")
    b = auth_broker
    host, port = http_address(b.extra_lines)
    async with connect(b.url, user="admin", password=PASSWORDS["admin"], reconnect=False) as tc:
        await tc.declare_queue("orders", bind=["orders.>"])
        await tc.declare_stream("clicks", partitions=4, bind=["clicks.>"])
        await tc.subscribe("alerts.>")
        await tc.flush()
        for command, expected in doc_examples():
            assert DOC_URL in command
            cmd = command.replace(DOC_URL, f"http://{host}:{port}")
            r = await anyio.to_thread.run_sync(lambda: subprocess.run(
                ["bash", "-c", cmd], capture_output=True, timeout=WAIT * 3,
                env={"PATH": "/usr/bin:/bin", "TIDINGS_TOKEN": TOKENS["svc"]}))
            assert r.returncode == 0, (command, r.stderr)
            assert json.loads(r.stdout) == expected, command
        async with tc.consume("orders") as deliveries:
            got = await take(deliveries, 2)
        shipped = got[1]
        assert shipped.subject == "orders.shipped"
        assert shipped.headers == {"ce-specversion": "1.0", "ce-type": "com.example.order.shipped",
                                   "ce-source": "/warehouse/7", "ce-id": "5a1c",
                                   "content-type": "application/json", "trace-id": "4bf92f35"}


async def test_below_min_free_disk_a_durable_publish_is_refused_but_pubsub_flows(start_broker) -> None:
    b = start_broker("--http-port", "0", env={"TIDINGS_MIN_FREE_DISK": str(2**62)})
    addr = http_address(b.extra_lines)
    async with connect(b.url, reconnect=False) as tc:
        await tc.declare_queue("jobs", bind=["jobs.>"])
        sub = await tc.subscribe("news.>")
        with anyio.fail_after(WAIT):
            while True:  # the resource monitor's first check may not have run yet
                status, headers, body = await apost(addr, "/v1/publish/jobs.x", b"x")
                if status != 200:
                    break
                await tc.purge_queue("jobs")
        assert (status, body["error"], headers["retry-after"]) == (503, "STORAGE_FULL", "1")
        assert (await apost(addr, "/v1/publish/news.x", b"still flows"))[0] == 202
        assert (await take(sub, 1))[0].payload == b"still flows"


def test_a_body_that_never_arrives_is_answered_408(start_broker) -> None:
    """http_body_timeout: a sender that declares a body and stops is answered and closed."""
    import socket

    b = start_broker("--http-port", "0", env={"TIDINGS_HTTP_BODY_TIMEOUT": "1"})
    host, port = http_address(b.extra_lines)
    with socket.create_connection((host, port), timeout=WAIT * 3) as s:
        s.sendall(b"POST /v1/publish/jobs.x HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly ten b")
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    assert data.startswith(b"HTTP/1.1 408"), data[:80]
    assert b.alive()


ORDER = {"type": "object", "required": ["order_id", "amount"],
         "properties": {"order_id": {"type": "string"}, "amount": {"type": "number", "minimum": 0}}}


async def test_a_schema_bound_subject_is_validated_at_the_gateway(open_broker) -> None:
    """Issue 12's validation at the door holds for HTTP publishes too: an invalid body is
    refused (422, with the pointer) and reaches no subscriber or queue; a valid one passes;
    a dead_letter binding stores the invalid one in its queue."""
    b = open_broker
    addr = http_address(b.extra_lines)
    async with connect(b.url, reconnect=False) as tc:
        await tc.register_schema("GwOrder", ORDER)
        await tc.declare_queue("gw-orders", bind=["gw.orders.>"])
        await tc.bind_schema("gw.orders.>", "GwOrder")
        sub = await tc.subscribe("gw.orders.>")
        status, _, body = await apost(addr, "/v1/publish/gw.orders.placed", b'{"order_id": "o1", "amount": -5}',
                                      {"Content-Type": "application/json"})
        assert (status, body["error"]) == (422, "SCHEMA_VIOLATION"), body
        assert "/amount" in body["message"]
        status, _, body = await apost(addr, "/v1/publish/gw.orders.placed", b'{"order_id": "o2", "amount": 5}',
                                      {"Content-Type": "application/json", "Tidings-Schema-Version": "1"})
        assert status == 200 and body["stored"] is True, body
        [m] = await take(sub, 1)  # the valid one only: the invalid one never left the broker
        assert m.json() == {"order_id": "o2", "amount": 5}
        assert (await tc.queue_info("gw-orders"))["depth"] == 1

        await tc.declare_queue("gw-invalid")
        await tc.bind_schema("gw.orders.>", "GwOrder", on_invalid="dead_letter", dead_letter_queue="gw-invalid")
        status, _, body = await apost(addr, "/v1/publish/gw.orders.placed", b'{"order_id": 3}',
                                      {"Content-Type": "application/json"})
        assert status == 202 and body["stored"] is True and "violation" in body, body
        assert (await tc.queue_info("gw-invalid"))["depth"] == 1
        assert (await tc.queue_info("gw-orders"))["depth"] == 1
