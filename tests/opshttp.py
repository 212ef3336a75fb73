"""Helpers for the metrics/health tests: a raw HTTP/1.1 GET and an exposition parser.

Synchronous on purpose: integration tests call them directly; in-process
tests call them through ``anyio.to_thread.run_sync`` (the server they talk
to runs on the test's own event loop).
"""

from __future__ import annotations

import re
import socket
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

METRICS_LINE = re.compile(r"tidings metrics on http://(\[[^\]]+\]|[^:\s]+):(\d+)")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def metrics_address(lines: list[str]) -> tuple[str, int]:
    """(host, port) from the ``tidings metrics on http://HOST:PORT`` line among ``lines``."""
    for line in lines:
        m = METRICS_LINE.search(line)
        if m:
            return m.group(1).strip("[]"), int(m.group(2))
    raise AssertionError(f"no 'tidings metrics on' line in {lines!r}")


def request(host: str, port: int, raw: bytes, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Send ``raw`` bytes, read until the server closes; (status, headers, body)."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        if raw:
            s.sendall(raw)
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    resp = b"".join(chunks)
    head, _, body = resp.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, body


def get(host: str, port: int, path: str, *, method: str = "GET", accept: str | None = None
        ) -> tuple[int, dict[str, str], bytes]:
    extra = f"Accept: {accept}\r\n" if accept else ""
    raw = f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{extra}\r\n".encode()
    return request(host, port, raw)


def scrape(host: str, port: int) -> Samples:
    """Every sample of /metrics, keyed by (name, labels)."""
    status, headers, body = get(host, port, "/metrics")
    assert status == 200, (status, body[:200])
    assert headers["content-type"].startswith("text/plain")
    return parse(body.decode())


def parse(text: str) -> Samples:
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, /, **labels: Any) -> float:
    """One sample's value; KeyError naming the near misses if it is absent."""
    key = (name, frozenset((k, str(v)) for k, v in labels.items()))
    try:
        return samples[key]
    except KeyError:
        near = sorted(str(dict(k[1])) for k in samples if k[0] == name)
        raise KeyError(f"{name}{labels} not scraped; have {near}") from None
