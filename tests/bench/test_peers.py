"""benchmarks/peers.py: a tiny run against tidings (and the peers when installed), output shape."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks import peers

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--queue-messages", "300", "--partition-messages", "300", "--latency-messages", "100",
        "--latency-rate", "1000", "--pubsub-messages", "500", "--timeout", "120"]
ROW_KEYS = {"scenario", "system", "messages", "received", "seconds", "msgs_per_s", "broker_cpu_us_per_msg", "load1"}
SCENARIOS = {"queue", "partitions", "latency", "pubsub 1->1", "pubsub 1->4"}


def run_peers(*systems: str) -> tuple[list[dict[str, Any]], dict[str, Any], str]:
    """Run the benchmark as a user does; return its rows, its comparison document and stdout."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.peers", "--systems", *systems, *TINY],
                          cwd=ROOT, capture_output=True, text=True, timeout=280,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    dec = json.JSONDecoder()
    out = proc.stdout
    rows, end = dec.raw_decode(out)
    rest = out[end:]
    comp, _ = dec.raw_decode(rest[rest.index("{"):])
    return rows, comp, out


def check_rows(rows: list[dict[str, Any]], system: str, scenarios: set[str]) -> None:
    mine = {r["scenario"]: r for r in rows if r["system"] == system}
    assert set(mine) == scenarios
    for r in mine.values():
        assert ROW_KEYS <= set(r)
        assert r["msgs_per_s"] > 0 and r["broker_cpu_us_per_msg"] >= 0
    for name in ("queue", "partitions", "latency"):
        assert mine[name]["received"] == mine[name]["messages"]
    assert mine["partitions"]["order_violations"] == 0 and mine["partitions"]["gaps"] == 0
    assert mine["latency"]["p50_ms"] <= mine["latency"]["p99_ms"]
    if "pubsub 1->4" in mine:
        assert mine["pubsub 1->4"]["messages"] == 4 * mine["pubsub 1->1"]["messages"]


def test_tidings_alone_prints_rows_comparison_and_load() -> None:
    rows, comp, out = run_peers("tidings")
    check_rows(rows, "tidings", SCENARIOS)
    assert {"comparison", "skipped", "loadavg_before", "loadavg_after", "fdatasync_ms_p50_p99_before"} <= set(comp)
    metrics = {c["metric"]: c for c in comp["comparison"]}
    assert metrics["durable queue msg/s"]["tidings"] > 0
    assert "load average (1/5/15 min) before:" in out and "fdatasync of a 4 KiB append" in out


def _peer_missing() -> str | None:
    for system in ("redis", "nats"):
        why = peers.missing(system)
        if why:
            return why
    return None


@pytest.mark.skipif(_peer_missing() is not None,
                    reason=f"peers not runnable here: {_peer_missing()} "
                           "(apt-get install redis-server nats-server; pip install -e '.[bench]')")
def test_with_the_peers_every_scenario_and_ratio() -> None:
    rows, comp, _ = run_peers("tidings", "redis", "nats")
    check_rows(rows, "tidings", SCENARIOS)
    check_rows(rows, "nats", SCENARIOS)
    check_rows(rows, "redis", {"queue", "partitions", "latency"})  # pub/sub is compared with NATS core
    metrics = {c["metric"]: c for c in comp["comparison"]}
    assert metrics["durable queue msg/s"]["tidings/redis"] > 0
    assert metrics["latency p99 ms"]["tidings/nats"] > 0


def test_a_missing_server_or_client_library_is_named_with_its_install_command(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peers, "REDIS_SERVER", "/nonexistent/redis-server")
    monkeypatch.setattr(peers.shutil, "which", lambda name: None)
    assert peers.missing("redis") == "redis-server not installed: apt-get install redis-server"
    assert peers.missing("tidings") is None
    if importlib.util.find_spec("nats") is None or not os.path.exists(peers.NATS_SERVER):
        return
    monkeypatch.setitem(sys.modules, "nats", None)  # import nats -> ImportError
    why = peers.missing("nats")
    assert why is not None and "pip install nats-py" in why
