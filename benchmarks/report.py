"""Draw benchmark results as a PNG: throughput per scenario and latency percentiles.

    python -m benchmarks.pubsub  > pubsub.json
    python -m benchmarks.durable > durable.json
    python -m benchmarks.report pubsub.json durable.json --png results.png

Reads what the benchmarks print: a JSON list of result rows (the table the
benchmarks print after it is ignored). Each row becomes one scenario, named
by its ``scenario`` (or ``phase``) and ``durability`` fields. Throughput is
every field ending in ``_per_s`` or ``_rate`` (messages per second; commit
rates are left out), latency every ``p<N>_us`` / ``p<N>_ms`` field, with
any prefix (``confirm_p99_ms``), drawn in milliseconds.

Needs matplotlib: ``pip install 'tidings[bench]'``. Without ``--png`` it
prints the rows it would draw, which needs nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

LATENCY: Final = re.compile(r"^(?:(?P<prefix>.+)_)?p(?P<pct>\d+(?:\.\d+)?)_(?P<unit>us|ms)$")
COMMIT_RATES: Final = ("commits_per_s",)  # storage commits, not messages: a different axis altogether


def load(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Result rows from benchmark output files (a JSON list or object, maybe followed by text)."""
    rows: list[dict[str, Any]] = []
    decoder = json.JSONDecoder()
    for path in paths:
        text = Path(path).read_text()
        start = min((i for i in (text.find("["), text.find("{")) if i >= 0), default=-1)
        if start < 0:
            raise ValueError(f"{path}: no JSON results in it")
        try:
            value, _end = decoder.raw_decode(text, start)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not benchmark JSON: {exc}") from exc
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(r, dict) for r in items):
            raise ValueError(f"{path}: expected a list of result objects")
        rows.extend(items)
    return rows


def label(row: dict[str, Any], index: int) -> str:
    name = str(row.get("scenario") or row.get("phase") or f"run {index + 1}")
    if row.get("durability"):
        name += f" ({row['durability']})"
    return name


def throughput(row: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if k.endswith(("_per_s", "_rate")) and k not in COMMIT_RATES
            and isinstance(v, (int, float)) and not isinstance(v, bool)}


def latencies(row: dict[str, Any]) -> dict[str, float]:
    """``{"p50": ms, "confirm p99": ms, ...}`` of one row."""
    out = {}
    for k, v in row.items():
        m = LATENCY.match(k)
        if m is None or not isinstance(v, (int, float)) or isinstance(v, bool) or math.isnan(v):  # NaN: no samples
            continue
        ms = float(v) / 1000.0 if m.group("unit") == "us" else float(v)
        name = f"p{m.group('pct')}"
        out[f"{m.group('prefix').replace('_', ' ')} {name}" if m.group("prefix") else name] = ms
    return out


def draw(rows: list[dict[str, Any]], png: str | Path, *, title: str = "tidings benchmarks") -> None:
    """Write the chart. Raises ImportError (with the install hint) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError as exc:
        raise ImportError("the PNG report needs matplotlib: pip install 'tidings[bench]'") from exc

    labels = [label(r, i) for i, r in enumerate(rows)]
    tp = [throughput(r) for r in rows]
    lat = [latencies(r) for r in rows]
    has_lat = any(lat)
    fig, axes = plt.subplots(1, 2 if has_lat else 1, figsize=(14 if has_lat else 8, 2.2 + 0.9 * len(rows)),
                             squeeze=False)
    ax = axes[0][0]
    series = sorted({k for t in tp for k in t})
    height = 0.8 / max(1, len(series))
    for j, key in enumerate(series):
        ys = [i + j * height for i in range(len(rows))]
        vals = [t.get(key, 0.0) for t in tp]
        bars = ax.barh(ys, vals, height=height, label=key.replace("_", " "))
        ax.bar_label(bars, labels=[f"{v:,.0f}" if v else "" for v in vals], padding=3, fontsize=8)
    ax.set_yticks([i + height * (len(series) - 1) / 2 for i in range(len(rows))], labels)
    ax.invert_yaxis()
    ax.set_xlabel("messages per second")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v / 1000:,.0f}k" if v else "0"))
    ax.set_title("throughput")
    ax.margins(x=0.2)
    if series:
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=min(4, len(series)))
    if has_lat:
        ax = axes[0][1]
        pcts = sorted({k for d in lat for k in d}, key=lambda k: (k.split(" ")[:-1], float(k.split("p")[-1])))
        height = 0.8 / max(1, len(pcts))
        for j, key in enumerate(pcts):
            ys = [i + j * height for i in range(len(rows))]
            vals = [d.get(key, 0.0) for d in lat]
            bars = ax.barh(ys, vals, height=height, label=key)
            ax.bar_label(bars, labels=[f"{v:.2f}" if v else "" for v in vals], padding=3, fontsize=8)
        ax.set_yticks([i + height * (len(pcts) - 1) / 2 for i in range(len(rows))], labels)
        ax.invert_yaxis()
        ax.set_xscale("log")
        top = max((v for d in lat for v in d.values()), default=1.0)
        ax.set_xlim(right=top * 4)  # room for the value labels
        ax.set_xlabel("milliseconds (log scale)")
        ax.set_title("latency percentiles")
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=min(4, len(pcts)))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="files holding a benchmark's JSON output")
    ap.add_argument("--png", help="write the chart to this PNG file")
    ap.add_argument("--title", default="tidings benchmarks")
    ns = ap.parse_args(argv)
    try:
        rows = load(ns.results)
    except (OSError, ValueError) as exc:
        print(f"report: {exc}", file=sys.stderr)
        return 2
    for i, r in enumerate(rows):
        print(f"{label(r, i)}: throughput {throughput(r)}; latency ms {latencies(r)}")
    if ns.png:
        try:
            draw(rows, ns.png, title=ns.title)
        except ImportError as exc:
            print(f"report: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {ns.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
