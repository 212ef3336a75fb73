"""The HTTP port of a real broker process (`--http-port 0`): uvicorn in the broker's loop.

Settings and their old names, idle and slow clients that must not starve the
health checks, and the login /metrics needs once users are configured.
"""

from __future__ import annotations

import base64
import contextlib
import resource
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.securitytools import PASSWORDS, TOKENS, user, write_config
from tests.opshttp import get, metrics_address, request, scrape, value

WAIT = 10.0
IDLE = 500  # the bar: 500 idle HTTP connections and /healthz still answers


def http_address(lines: list[str]) -> tuple[str, int]:
    """(host, port) from the ``tidings http on http://HOST:PORT`` line."""
    for line in lines:
        if line.startswith("tidings http on http://"):
            hostport = line.split("http://", 1)[1].strip()
            host, _, port = hostport.rpartition(":")
            return host.strip("[]"), int(port)
    raise AssertionError(f"no 'tidings http on' line in {lines!r}")


@contextlib.contextmanager
def descriptors(n: int) -> Iterator[None]:
    """Raise this process's soft RLIMIT_NOFILE to at least ``n`` (the broker started inside
    inherits it), or skip when the hard limit does not allow it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < n:
        if hard != resource.RLIM_INFINITY and hard < n:
            pytest.skip(f"needs {n} open files, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_http_port_flag_env_and_the_old_names(start_broker) -> None:
    b = start_broker("--http-port", "0")
    host, port = http_address(b.extra_lines)
    assert (host, port) == metrics_address(b.extra_lines)  # the older line names the same port
    assert get(host, port, "/healthz")[:3:2] == (200, b"ok\n")
    assert "deprecated" not in b.stderr()

    b2 = start_broker(env={"TIDINGS_HTTP_PORT": "0"})
    assert get(*http_address(b2.extra_lines), "/readyz")[0] == 200

    b3 = start_broker("--metrics-port", "0")  # the old name keeps working, with a warning
    assert get(*http_address(b3.extra_lines), "/healthz")[0] == 200
    assert "metrics_port is deprecated: it is now http_port" in b3.stderr()


def test_http_on_a_network_address_needs_users(start_broker) -> None:
    with pytest.raises(RuntimeError, match="refusing to serve metrics on '0.0.0.0' with no users"):
        start_broker("--http-port", "0", "--http-host", "0.0.0.0")


def test_500_idle_connections_do_not_starve_healthz(start_broker) -> None:
    """Issue 16: 500 idle sockets (more than http_max_connections) and /healthz still answers
    at once: the oldest idle connections are closed to make room."""
    with descriptors(4 * IDLE):
        b = start_broker("--http-port", "0")
        host, port = http_address(b.extra_lines)
        held: list[socket.socket] = []
        try:
            for _ in range(IDLE):
                held.append(socket.create_connection((host, port), timeout=WAIT))
            for _ in range(3):
                assert get(host, port, "/healthz")[:3:2] == (200, b"ok\n")
            assert get(host, port, "/readyz")[0] == 200
            first = held[0]
            first.settimeout(WAIT)
            data = first.recv(65536)
            assert data == b"" or data.startswith(b"HTTP/1.1 408"), data[:80]  # evicted, not holding a slot
            s = scrape(host, port)
            assert value(s, "tidings_http_evicted_total") >= IDLE - 256  # http_max_connections' default
            assert 1 <= value(s, "tidings_http_connections") <= 256
        finally:
            for s in held:
                s.close()
        assert b.alive()


def test_a_slow_loris_gets_408_and_never_blocks_others(start_broker) -> None:
    """A client sending its request head a byte at a time is answered 408 once
    http_header_timeout has passed since its head began, however steadily it drips;
    others are answered meanwhile."""
    b = start_broker("--http-port", "0", env={"TIDINGS_HTTP_HEADER_TIMEOUT": "2"})
    host, port = http_address(b.extra_lines)
    head = b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 4000
    answered = 0
    got = b""
    with socket.create_connection((host, port), timeout=WAIT) as loris:
        for i, byte in enumerate(head):  # bounded: the head is never finished
            loris.setblocking(False)
            try:
                got = loris.recv(65536)  # the answer, read before the next byte could meet a closed socket
            except BlockingIOError:
                pass
            finally:
                loris.setblocking(True)
                loris.settimeout(WAIT)
            if got:
                break
            loris.sendall(bytes([byte]))
            if i % 50 == 0:  # others are served while the loris drips (and this paces it)
                assert get(host, port, "/healthz")[0] == 200
                answered += 1
        else:
            got = loris.recv(65536)
    assert got.startswith(b"HTTP/1.1 408"), got[:80]
    assert answered >= 1
    assert get(host, port, "/healthz")[0] == 200
    assert value(scrape(host, port), "tidings_http_header_timeouts_total") >= 1


def _auth_broker(start_broker, tmp_path: Path, **settings: object):
    cfg = write_config(tmp_path / "http.toml", users={
        **user("admin", tokens=[TOKENS["svc"]], admin=[">"], publish=[">"], subscribe=[">"], consume=[">"]),
        **user("alice", publish=["orders.>"])}, settings=settings)
    return start_broker("--config", str(cfg), "--http-port", "0")


def _get(host: str, port: int, path: str, auth: str | None) -> tuple[int, dict[str, str], bytes]:
    extra = f"Authorization: {auth}\r\n" if auth else ""
    return request(host, port, f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())


def _basic(name: str) -> str:
    return "Basic " + base64.b64encode(f"{name}:{PASSWORDS[name]}".encode()).decode()


def test_metrics_need_a_login_when_users_are_configured(start_broker, tmp_path: Path) -> None:
    b = _auth_broker(start_broker, tmp_path)
    host, port = http_address(b.extra_lines)
    status, headers, body = _get(host, port, "/metrics", None)
    assert status == 401 and b'"AUTH_FAILED"' in body and "bearer" in headers["www-authenticate"].lower()
    assert _get(host, port, "/metrics", "Bearer wrong-token")[0] == 401
    assert _get(host, port, "/metrics", "Basic " + base64.b64encode(b"admin:nope").decode())[0] == 401
    status, _, body = _get(host, port, "/metrics", f"Bearer {TOKENS['svc']}")
    assert status == 200 and b"tidings_ready" in body
    assert _get(host, port, "/metrics", _basic("admin"))[0] == 200
    status, _, body = _get(host, port, "/metrics", _basic("alice"))  # no admin on every name
    assert status == 403 and b'"PERMISSION_DENIED"' in body
    # probes need no login
    assert _get(host, port, "/healthz", None)[0] == 200
    assert _get(host, port, "/readyz", None)[0] == 200


def test_metrics_public_serves_them_without_a_login(start_broker, tmp_path: Path) -> None:
    b = _auth_broker(start_broker, tmp_path, metrics_public=True)
    host, port = http_address(b.extra_lines)
    status, _, body = _get(host, port, "/metrics", None)
    assert status == 200 and b"tidings_ready" in body
