"""benchmarks/cluster.py: a tiny run as a user does it; the rows it prints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pgserver import SKIP_REASON, find_bin_dir

ROOT = Path(__file__).resolve().parents[2]


def test_a_tiny_run_has_every_row() -> None:
    if find_bin_dir() is None:
        pytest.skip(SKIP_REASON)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.cluster", "--messages", "300",
                           "--pubsub-messages", "500", "--in-flight", "50", "--brokers", "1", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=280,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows, _ = json.JSONDecoder().raw_decode(proc.stdout)
    got = {(r["brokers"], r["store"], r["scenario"]): r for r in rows}
    assert set(got) == {(1, "sqlite", "queue"), (1, "sqlite", "pubsub"), (1, "postgresql", "queue"),
                        (1, "postgresql", "pubsub"), (2, "postgresql", "queue"), (2, "postgresql", "pubsub")}
    for key, r in got.items():
        if key[0] == 1:
            # CPU is counted in clock ticks (10 ms): a tiny run may see none
            assert r["msgs_per_s"] > 0 and r["broker_cpu_us_per_msg"] >= 0, r
        else:  # another helper's scenario: its numbers, or a row that says it is not there yet
            assert (r["msgs_per_s"] or 0) > 0 or "not available yet" in r["note"], r
    assert got[(1, "postgresql", "queue")]["db_cpu_us_per_msg"] is not None
    assert got[(1, "sqlite", "queue")]["confirm_p50_ms"] > 0
    assert "brokers  store" in proc.stdout  # the table after the JSON
