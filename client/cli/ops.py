"""`tidings stats` and `tidings backup`: a live view of a running broker, and online backup.

    tidings stats [--once] [--interval S] [--count N] [--json]
        rates (published, confirmed, delivered, acked, nacked, redelivered,
        dead-lettered, expired, dropped, errors per second), connections,
        and per queue / per stream depths, in-flight, consumers and lag,
        refreshed every --interval seconds until Ctrl-C (or --count frames;
        --once = one frame). Rates need two samples, so even --once waits
        one interval. --json prints one JSON object per frame (a line each).
    tidings backup NAME [--json]
        ask the broker for a consistent copy of its store, written as the
        file NAME in its backup directory (setting backup_dir) on the
        broker's machine; never over an existing file (see
        tidings.broker.ops.backup).

Both talk to a running broker through the client library with the options,
runner and exit statuses of common.py: ``--url`` (default ``$TIDINGS_URL``
or the client's default URL) and, when the broker has users,
``--user``/``--password`` or ``--token`` (default ``$TIDINGS_USER``,
``$TIDINGS_PASSWORD``, ``$TIDINGS_TOKEN``; prefer the environment to
flags, which other local users can see in the process list). Errors go to
stderr with exit status 1 (2 for usage errors); Ctrl-C, which ends the live
view, exits 0. :func:`register` adds them to the `tidings` parser (main.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any, Final

from tidings.cli.common import add_options, runner, table

JSON_HELP: Final = "print JSON (for scripts)"
BACKUP_TIMEOUT: Final = 600.0  # seconds: copying a large store takes a while
CLEAR: Final = "\x1b[H\x1b[2J"  # cursor home + clear screen, for the live view on a terminal

#: Broker-wide totals that `stats` turns into rates: name -> how to read it from a sample.
_TOTALS: Final[tuple[tuple[str, Callable[[dict[str, Any]], float]], ...]] = (
    ("published", lambda s: s["stats"].get("published", 0)),
    ("confirmed", lambda s: s["stats"].get("confirmed", 0)),
    ("delivered", lambda s: sum(q.get("delivered", 0) for q in s["queues"])
     + sum(g.get("delivered", 0) for st in s["streams"] for g in (st.get("groups") or {}).values())),
    ("acked", lambda s: sum(q.get("acked", 0) for q in s["queues"])),
    ("nacked", lambda s: sum(q.get("nacked", 0) for q in s["queues"])),
    ("redelivered", lambda s: sum(q.get("redelivered", 0) for q in s["queues"])
     + sum(g.get("redelivered", 0) for st in s["streams"] for g in (st.get("groups") or {}).values())),
    ("dead_lettered", lambda s: sum(q.get("dead_lettered", 0) for q in s["queues"])
     + sum(st.get("dead_lettered", 0) for st in s["streams"])),
    ("expired", lambda s: sum(q.get("expired", 0) for q in s["queues"])),
    ("dropped", lambda s: s["stats"].get("dropped", 0)),
    ("errors", lambda s: sum((s["stats"].get("errors") or {}).values())),
    ("commits", lambda s: (s["stats"].get("store") or {}).get("commits", 0)),
)


# ------------------------------------------------------------------ stats

async def _sample(tc: Any) -> dict[str, Any]:
    stats = await tc.call("stats")
    queues = await tc.call("queue.list")
    streams = await tc.call("stream.list")
    return {"stats": stats, "queues": queues, "streams": streams, "mono": time.monotonic()}


def _elapsed(prev: dict[str, Any], cur: dict[str, Any]) -> float:
    """Seconds between two samples, by the broker's clock where it moved forward."""
    dt = float(cur["stats"].get("uptime", 0)) - float(prev["stats"].get("uptime", 0))
    if dt <= 0:
        dt = cur["mono"] - prev["mono"]
    return max(dt, 1e-6)


def frame(prev: dict[str, Any], cur: dict[str, Any]) -> dict[str, Any]:
    """One frame of `tidings stats` (what --json prints) from two samples."""
    dt = _elapsed(prev, cur)
    rates = {name: round(max(0.0, (get(cur) - get(prev)) / dt), 1) for name, get in _TOTALS}
    totals = {name: get(cur) for name, get in _TOTALS}
    before_q = {q["name"]: q for q in prev["queues"]}
    queues = []
    for q in cur["queues"]:
        p = before_q.get(q["name"])

        def rate(key: str, q: dict[str, Any] = q, p: dict[str, Any] | None = p) -> float | None:
            return None if p is None else round(max(0.0, (q.get(key, 0) - p.get(key, 0)) / dt), 1)

        queues.append({"name": q["name"], "depth": q.get("depth", 0), "in_flight": q.get("in_flight", 0),
                       "consumers": q.get("consumers", 0), "dlq_depth": q.get("dlq_depth"),
                       "is_dlq": bool(q.get("is_dlq")),
                       "rates": {"published": rate("published"), "delivered": rate("delivered"),
                                 "acked": rate("acked")}})
    before_s = {st["name"]: st for st in prev["streams"]}
    streams = []
    for st in cur["streams"]:
        p = before_s.get(st["name"])
        groups = {}
        for gname, g in sorted((st.get("groups") or {}).items()):
            groups[gname] = {"members": len(g.get("members") or []),
                             "lag": sum(part.get("lag", 0) for part in g.get("partitions") or [])}
        pub = None if p is None else round(max(0.0, (st.get("published", 0) - p.get("published", 0)) / dt), 1)
        streams.append({"name": st["name"], "partitions": len(st.get("partitions") or []),
                        "messages": sum(part.get("messages", 0) for part in st.get("partitions") or []),
                        "readers": st.get("readers", 0), "groups": groups, "rates": {"published": pub}})
    s = cur["stats"]
    return {"interval": round(dt, 3), "uptime": round(float(s.get("uptime", 0)), 1),
            "connections": s.get("connections", 0), "subscriptions": s.get("subscriptions", 0),
            "rates": rates, "totals": totals, "queues": queues, "streams": streams,
            "store": s.get("store") or {}}


def _n(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.0f}" if v >= 10 or v == 0 else f"{v:,.1f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s // 60 % 60:02d}m"
    return f"{s // 86400}d{s // 3600 % 24:02d}h{s // 60 % 60:02d}m"


def render(f: dict[str, Any], url: str) -> str:
    """The text view of one frame."""
    r = f["rates"]
    out = [(f"tidings stats  {url}  uptime {_duration(f['uptime'])}  connections {_n(f['connections'])}  "
            f"subscriptions {_n(f['subscriptions'])}  (rates over {f['interval']:.1f} s)"), ""]
    keys = ("published", "confirmed", "delivered", "acked", "nacked", "redelivered", "dead_lettered", "expired",
            "dropped", "errors")
    out.append(table([["per second", *(_n(r[k]) for k in keys)]],
                      ["MESSAGES", *(k.upper().replace("_", "-") for k in keys)]))
    out.append("")
    if f["queues"]:
        rows = [[q["name"], _n(q["depth"]), _n(q["in_flight"]), _n(q["consumers"]), _n(q["rates"]["published"]),
                 _n(q["rates"]["delivered"]), _n(q["rates"]["acked"]), _n(q["dlq_depth"])] for q in f["queues"]]
        out.append(table(rows, ["QUEUE", "DEPTH", "IN-FLIGHT", "CONSUMERS", "IN/S", "OUT/S", "ACK/S",
                                 "DLQ DEPTH"]))
    else:
        out.append("no queues")
    out.append("")
    if f["streams"]:
        rows = []
        for st in f["streams"]:
            groups = st["groups"]
            lag = max((g["lag"] for g in groups.values()), default=None)
            rows.append([st["name"], _n(st["partitions"]), _n(st["messages"]), _n(st["rates"]["published"]),
                         _n(len(groups)), _n(lag), _n(st["readers"])])
        out.append(table(rows, ["STREAM", "PARTITIONS", "MESSAGES", "IN/S", "GROUPS", "MAX GROUP LAG",
                                 "READERS"]))
    else:
        out.append("no streams")
    store = f["store"]
    if store:
        out.append("")
        out.append(f"storage: {_n(f['rates']['commits'])} commits/s, last commit "
                   f"{float(store.get('last_commit_seconds', 0)) * 1000:.2f} ms")
    return "\n".join(out)


async def _stats(tc: Any, ns: argparse.Namespace) -> None:
    import anyio

    frames = 1 if ns.once else ns.count
    live = not ns.json and frames != 1 and sys.stdout.isatty()
    prev = await _sample(tc)
    shown = 0
    while not frames or shown < frames:
        await anyio.sleep(ns.interval)
        cur = await _sample(tc)
        f = frame(prev, cur)
        prev = cur
        if ns.json:
            print(json.dumps(f, sort_keys=True), flush=True)
        else:
            text = render(f, ns.url)
            print(CLEAR + text if live else text + ("\n" if frames != 1 else ""), flush=True)
        shown += 1


# ----------------------------------------------------------------- backup

async def _backup(tc: Any, ns: argparse.Namespace) -> None:
    result = await tc.call("backup", {"name": ns.name}, timeout=ns.timeout)
    if ns.json:
        print(json.dumps(result, sort_keys=True))
        return
    size = int(result.get("bytes", 0))
    print(f"backed up to {result.get('path')} on the broker's machine: {size:,} bytes "
          f"({size / 1024 / 1024:.1f} MiB) in {float(result.get('seconds', 0)):.2f} s")


# --------------------------------------------------------------- register

def _positive(text: str) -> float:
    v = float(text)
    if not v > 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return v


def register(sp: Any) -> None:
    """Add `stats` and `backup` to the `tidings` subparsers ``sp``."""
    s = sp.add_parser("stats", help="live view of rates, depths and connections",
                      description="A live, refreshing view of a running broker: message rates, connections, "
                      "and per queue and stream depths, in-flight, consumers and lag. Rates are computed "
                      "from two samples --interval apart, so every frame (even --once) takes that long.")
    s.add_argument("--once", action="store_true", help="print one frame and exit")
    s.add_argument("--count", type=int, default=0, help="exit after this many frames (default: run until Ctrl-C)")
    s.add_argument("--interval", type=_positive, default=1.0, help="seconds between frames (default 1)")
    add_options(s, json_help=JSON_HELP)
    s.set_defaults(fn=runner(_stats, interrupted=0))

    b = sp.add_parser("backup", help="copy the running broker's store (online, consistent)",
                      description="Ask the running broker for a consistent copy of its store while it keeps "
                      "serving (SQLite's online backup). The copy is written as the file NAME in the "
                      "broker's backup directory (setting backup_dir, default <data_dir>/backups) on the "
                      "broker's machine, mode 0600, and never replaces an existing file. It holds every "
                      "message confirmed before the command started. Start a broker on a data directory "
                      "holding the copy, named tidings.db, to restore it.")
    b.add_argument("name", metavar="NAME", help="file name of the copy in the broker's backup directory "
                   "(A-Z a-z 0-9 . _ -, no path)")
    add_options(b, timeout=BACKUP_TIMEOUT, json_help=JSON_HELP)
    b.set_defaults(fn=runner(_backup, interrupted=0))

