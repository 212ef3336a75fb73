"""Metrics and health endpoints of a real broker process (`--metrics-port 0`)."""

from __future__ import annotations

import socket

import anyio
import pytest

from tidings.client import connect
from tests.opshttp import get, metrics_address, parse, scrape, value

WAIT = 10.0


async def ascrape(host: str, port: int) -> dict:
    return await anyio.to_thread.run_sync(scrape, host, port)


async def test_metrics_change_as_a_known_workload_says(start_broker) -> None:
    b = start_broker("--metrics-port", "0")
    host, port = metrics_address(b.extra_lines)
    assert host == "127.0.0.1"  # loopback by default
    before = await ascrape(host, port)
    assert value(before, "tidings_ready") == 1
    async with connect(b.url, reconnect=False) as tc:
        await tc.declare_queue("work", bind=["work.>"], max_deliveries=2, ack_deadline=30)
        for i in range(20):
            await tc.publish("work.item", f"{i}".encode())
        async with tc.consume("work", prefetch=50) as deliveries:
            got = []
            with anyio.fail_after(WAIT):
                async for d in deliveries:
                    got.append(d)
                    if len(got) == 20:
                        break
            for d in got[:15]:
                await d.ack(wait=True)
            for d in got[15:]:
                await d.nack(0, wait=True)
            again = []
            with anyio.fail_after(WAIT):
                async for d in deliveries:
                    again.append(d)
                    if len(again) == 5:
                        break
            for d in again:
                await d.reject("no", wait=True)
        async with tc.consume("work.dlq") as dead:  # the dead-letter moves have committed once these arrive
            with anyio.fail_after(WAIT):
                n = 0
                async for d in dead:
                    n += 1
                    if n == 5:
                        break
            s = await ascrape(host, port)
        assert value(s, "tidings_connections") == 1
    q = {"queue": "work"}
    assert value(s, "tidings_queue_published_total", **q) == 20
    assert value(s, "tidings_queue_delivered_total", **q) == 25
    assert value(s, "tidings_queue_redelivered_total", **q) == 5
    assert value(s, "tidings_queue_acked_total", **q) == 15
    assert value(s, "tidings_queue_nacked_total", **q) == 5
    assert value(s, "tidings_queue_rejected_total", **q) == 5
    assert value(s, "tidings_queue_dead_lettered_total", **q) == 5
    assert value(s, "tidings_queue_depth", **q) == 0
    assert value(s, "tidings_queue_in_flight", queue="work.dlq") == 5
    assert value(s, "tidings_queue_consumers", queue="work.dlq") == 1
    assert value(s, "tidings_publish_confirmed_total") - value(before, "tidings_publish_confirmed_total") == 20
    assert 1 <= value(s, "tidings_publish_confirm_seconds_count") <= 20
    assert value(s, "tidings_store_commit_seconds_count") == value(s, "tidings_store_commits_total")
    assert value(s, "tidings_process_resident_memory_bytes") > 0


def test_health_endpoints_of_a_running_broker(start_broker) -> None:
    b = start_broker("--metrics-port", "0")
    host, port = metrics_address(b.extra_lines)
    assert get(host, port, "/healthz")[0] == 200
    status, headers, body = get(host, port, "/readyz")
    assert status == 200, body
    assert headers["connection"] == "close"
    assert get(host, port, "/nope")[0] == 404
    assert value(parse(get(host, port, "/metrics")[2].decode()), "tidings_ready") == 1
    assert b.terminate() == 0
    with pytest.raises(OSError):  # gone with the broker
        socket.create_connection((host, port), timeout=2).close()


def test_metrics_off_by_default(start_broker) -> None:
    b = start_broker()
    assert not any("tidings metrics on" in line for line in b.extra_lines)


def test_metrics_port_in_use_is_a_clear_startup_error(start_broker) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match="exited"):
            start_broker("--metrics-port", str(port))


def test_metrics_address_line_parsing() -> None:
    assert metrics_address(["x\n", "tidings metrics on http://127.0.0.1:9100\n"]) == ("127.0.0.1", 9100)
    assert metrics_address(["tidings metrics on http://[::1]:9100\n"]) == ("::1", 9100)
    with pytest.raises(AssertionError):
        metrics_address([])


@pytest.mark.parametrize("idle", [32, 500])
def test_idle_and_slow_http_clients_cannot_block_health_checks(start_broker, idle: int) -> None:
    """Issue 10.5: 32 silent sockets used to fill the listener's 32 slots, so /healthz got nothing.
    Silent sockets, slow-loris senders (a request head that never ends) and clients that
    never read their answer are now closed oldest-first to make room."""
    b = start_broker("--metrics-port", "0")
    host, port = metrics_address(b.extra_lines)
    held: list[socket.socket] = []
    try:
        for i in range(idle + 16 + 8):
            s = socket.create_connection((host, port), timeout=WAIT)
            held.append(s)
            if i >= idle + 16:  # asks, then never reads the answer
                s.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
            elif i >= idle:  # slow loris: a head that never ends
                s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        for _ in range(3):
            status, _, body = get(host, port, "/healthz")
            assert (status, body) == (200, b"ok\n")
        assert get(host, port, "/readyz")[0] == 200
        # the oldest silent client was closed (or answered 408), not left holding a slot
        first = held[0]
        first.settimeout(WAIT)
        data = first.recv(65536)
        assert data == b"" or data.startswith(b"HTTP/1.1 408"), data[:80]
    finally:
        for s in held:
            s.close()
    assert b.alive()


def test_metrics_on_a_network_address_needs_users(start_broker) -> None:
    """Issues 10.5 and 10.14: with no users /metrics (every queue name) stays on loopback."""
    with pytest.raises(RuntimeError, match="refusing to serve metrics on '0.0.0.0' with no users"):
        start_broker("--metrics-port", "0", "--metrics-host", "0.0.0.0")
    with pytest.raises(RuntimeError, match="refusing to serve metrics on '::' with no users"):
        start_broker("--metrics-port", "0", env={"TIDINGS_METRICS_HOST": "::"})
    b = start_broker("--metrics-port", "0", "--metrics-host", "127.0.0.1")  # loopback: fine
    host, port = metrics_address(b.extra_lines)
    assert host == "127.0.0.1" and get(host, port, "/healthz")[0] == 200
