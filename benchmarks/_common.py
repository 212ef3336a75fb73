"""Helpers shared by the benchmarks: start a broker, run worker processes, report."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from typing import Any, Iterator

READY = re.compile(rb"tidings listening on (\S+):(\d+)")


@dataclasses.dataclass(frozen=True)
class RunningBroker:
    """A broker started by :func:`broker_process`: where to connect, its pid
    (for /proc/PID/status) and its data directory."""

    url: str
    pid: int
    data_dir: str


@contextlib.contextmanager
def broker_process(*extra: str, env: dict[str, str] | None = None) -> Iterator[RunningBroker]:
    """Start `python -m tidings serve --port 0` in a temp data dir; yield it; SIGTERM it after."""
    with tempfile.TemporaryDirectory(prefix="tidings-bench-") as data:
        cmd = [sys.executable, "-m", "tidings", "serve", "--port", "0", "--data-dir", data,
               "--log-level", "warning", *extra]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})})
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            m = READY.search(line)
            if not m:
                raise RuntimeError(f"broker did not start: {line!r}")
            yield RunningBroker(f"tidings://{m.group(1).decode()}:{m.group(2).decode()}", proc.pid, data)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def broker(*extra: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """Start `python -m tidings serve --port 0` in a temp data dir; yield its URL."""
    with broker_process(*extra, env=env) as b:
        yield b.url


def proc_status_kib(pid: int, field: str) -> int:
    """A ``kB`` field of /proc/PID/status (e.g. VmRSS, VmHWM), in KiB (Linux only)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def spawn(module: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", module, *args], stdout=subprocess.PIPE, stdin=subprocess.PIPE)


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, int(round(p / 100 * (len(sorted_values) - 1)))))
    return sorted_values[k]


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    head = "  ".join(c.ljust(widths[c]) for c in columns)
    lines = [head, "  ".join("-" * widths[c] for c in columns)]
    for r in rows:
        lines.append("  ".join(_fmt(r.get(c)).rjust(widths[c]) for c in columns))
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def emit(results: list[dict[str, Any]], columns: list[str], as_json_only: bool = False) -> None:
    print(json.dumps(results, indent=2))
    if not as_json_only:
        print()
        print(table(results, columns))
