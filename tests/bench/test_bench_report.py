"""benchmarks/report.py (the PNG chart) and benchmarks/_progress.py (progress lines)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from benchmarks import report
from benchmarks._progress import Progress

PUBSUB = [
    {"scenario": "1->1", "published": 500000, "delivered": 500000, "dropped": 0, "seconds": 1.2,
     "publish_rate": 520000, "delivered_per_s": 410000, "p50_us": 850.0, "p99_us": 4200.5},
    {"scenario": "1->4", "published": 500000, "delivered": 2000000, "dropped": 0, "seconds": 4.1,
     "publish_rate": 260000, "delivered_per_s": 480000, "p50_us": 3100.0, "p99_us": 9000.0},
]
DURABLE = [{"scenario": "durable in_flight=1000", "messages": 100000, "consumed": 100000, "seconds": 2.3,
            "end_to_end_per_s": 43000, "confirmed_per_s": 45000, "confirm_p50_ms": 18.2, "confirm_p99_ms": 40.1,
            "commits_per_s": 120, "msgs_per_commit": 370.5, "durability": "full"}]


def write_output(path: Path, rows: list[dict]) -> Path:
    """What `python -m benchmarks.X > file` leaves: the JSON, a blank line, then a table."""
    path.write_text(json.dumps(rows, indent=2) + "\n\nscenario  published ...\n--------  ---------\n")
    return path


def test_reads_benchmark_output_and_picks_the_series(tmp_path: Path) -> None:
    rows = report.load([write_output(tmp_path / "p.json", PUBSUB), write_output(tmp_path / "d.json", DURABLE)])
    assert [report.label(r, i) for i, r in enumerate(rows)] == ["1->1", "1->4", "durable in_flight=1000 (full)"]
    assert report.throughput(rows[0]) == {"publish_rate": 520000.0, "delivered_per_s": 410000.0}
    assert report.throughput(rows[2]) == {"end_to_end_per_s": 43000.0, "confirmed_per_s": 45000.0}
    assert report.latencies(rows[0]) == {"p50": 0.85, "p99": pytest.approx(4.2005)}
    assert report.latencies(rows[2]) == {"confirm p50": 18.2, "confirm p99": 40.1}


def test_rejects_what_is_not_benchmark_output(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("no json here")
    with pytest.raises(ValueError, match="no JSON"):
        report.load([bad])
    assert report.main([str(bad)]) == 2


def test_writes_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")  # the `bench` extra; the test extra does not need it
    out = tmp_path / "chart.png"
    files = [str(write_output(tmp_path / "p.json", PUBSUB)), str(write_output(tmp_path / "d.json", DURABLE))]
    assert report.main([*files, "--png", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert f"wrote {out}" in capsys.readouterr().out


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_is_silent_for_short_runs_then_once_per_interval() -> None:
    clock, out = Clock(), io.StringIO()
    p = Progress("publish", 1000, stream=out, after=3.0, interval=1.0, clock=clock)
    clock.now += 2.0
    p.update(400)
    assert out.getvalue() == ""  # under `after` seconds: nothing
    clock.now += 1.5
    p.update(600)
    clock.now += 0.5
    p.update(700)  # within the interval: no new line
    clock.now += 0.6
    p.update(800)
    p.finish(1000)
    lines = out.getvalue().splitlines()
    assert lines == ["publish: 600/1,000 (60%)  171/s  3.5 s", "publish: 800/1,000 (80%)  174/s  4.6 s",
                     "publish: 1,000/1,000 (100%)  217/s  4.6 s done"]


def test_progress_finish_prints_nothing_when_nothing_was_shown() -> None:
    out = io.StringIO()
    p = Progress("quick", stream=out, clock=Clock())
    p.update(5)
    p.finish(10)
    assert out.getvalue() == ""
