"""Helpers for the web console tests (test_console*.py): a small HTTP client that
keeps the session cookie and the CSRF token like the console page does, and
reads the live event stream.

Synchronous (http.client): the broker is a separate process, and these calls
are short; an async test that also drives the tidings client calls them
through ``anyio.to_thread.run_sync`` where they may wait.
"""

from __future__ import annotations

import http.client
import json
from typing import Any, Final

WAIT: Final = 15.0  # seconds a console answer or a snapshot may take on a busy machine


def http_address(lines: list[str]) -> tuple[str, int]:
    """(host, port) from the broker's ``tidings http on http://HOST:PORT`` line."""
    for line in lines:
        if line.startswith("tidings http on http://"):
            host, _, port = line.split("http://", 1)[1].strip().rpartition(":")
            return host.strip("[]"), int(port)
    raise AssertionError(f"no 'tidings http on' line in {lines!r}")


class ConsoleHttp:
    """One browser-like visitor of the console at ``host:port``."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.origin = f"http://{host}:{port}"
        self.cookie: str | None = None
        self.set_cookie: str | None = None  # the last Set-Cookie header seen
        self.csrf: str | None = None

    @classmethod
    def of(cls, broker: Any) -> ConsoleHttp:
        return cls(*http_address(broker.extra_lines))

    def request(self, method: str, path: str, body: Any = None, *, origin: str | None = "",
                csrf: str | None = "", headers: dict[str, str] | None = None
                ) -> tuple[int, dict[str, str], bytes]:
        """``origin``/``csrf`` "" = this visitor's own; None = leave the header out."""
        h = {"Host": f"{self.host}:{self.port}", **(headers or {})}
        if self.cookie:
            h["Cookie"] = self.cookie
        if method != "GET":
            if origin is not None:
                h["Origin"] = origin or self.origin
            token = self.csrf if csrf == "" else csrf
            if token is not None:
                h["X-CSRF-Token"] = token
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            h["Content-Type"] = "application/json"
        conn = http.client.HTTPConnection(self.host, self.port, timeout=WAIT)
        try:
            conn.request(method, path, body=data, headers=h)
            resp = conn.getresponse()
            payload = resp.read()
            got = {k.lower(): v for k, v in resp.getheaders()}
        finally:
            conn.close()
        if "set-cookie" in got:
            self.set_cookie = got["set-cookie"]
            value = got["set-cookie"].split(";", 1)[0]
            self.cookie = None if value.endswith(("=", '=""')) else value
        return resp.status, got, payload

    def json(self, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        status, _h, payload = self.request(method, path, body, **kw)
        return status, json.loads(payload) if payload else None

    def sign_in(self, user: str, password: str) -> int:
        status, data = self.json("POST", "/console/login", {"user": user, "password": password}, csrf=None)
        if status == 200:
            self.csrf = data["csrf"]
        return status

    def session(self) -> dict[str, Any]:
        status, data = self.json("GET", "/console/api/session")
        assert status == 200, (status, data)
        self.csrf = data["csrf"]
        return data  # type: ignore[no-any-return]

    def snapshot(self) -> dict[str, Any]:
        status, data = self.json("GET", "/console/api/snapshot")
        assert status == 200, (status, data)
        return data  # type: ignore[no-any-return]


def read_events(visitor: ConsoleHttp, count: int) -> list[dict[str, Any]]:
    """Open /console/events and return its first ``count`` snapshots, then hang up."""
    conn = http.client.HTTPConnection(visitor.host, visitor.port, timeout=WAIT)
    try:
        h = {"Host": f"{visitor.host}:{visitor.port}", "Accept": "text/event-stream"}
        if visitor.cookie:
            h["Cookie"] = visitor.cookie
        conn.request("GET", "/console/events", headers=h)
        resp = conn.getresponse()
        assert resp.status == 200, (resp.status, resp.read())
        assert resp.getheader("content-type", "").startswith("text/event-stream")
        out: list[dict[str, Any]] = []
        event = None
        for _ in range(10_000):  # bounded: each line is one of a few fields
            line = resp.readline()
            if not line:
                break
            text = line.decode().rstrip("\n")
            if text.startswith("event: "):
                event = text[7:]
            elif text.startswith("data: ") and event == "snapshot":
                out.append(json.loads(text[6:]))
                if len(out) >= count:
                    break
        return out
    finally:
        conn.close()
