"""The console's live numbers: one snapshot per tick, shared by every open page.

    hub = Hub(host)
    data = await hub.frame(user)      # JSON bytes of this tick's snapshot as ``user`` may see it
    await hub.next_tick(last)         # sleep until the tick after ``last`` has begun

There is no background task: the first page to ask for a tick computes it
(under a lock; the others wait for it and reuse it), so N open consoles cost
one snapshot per tick, not N, and a broker nobody watches computes nothing.
What one user may see is cut from the shared snapshot and encoded once per
user and tick (viewers signed in as the same user share the bytes).

Reading the broker is the same plain attribute walk as /metrics (ops/metrics.py
``BrokerCollector.snapshot``: on the event loop, no await in between, so one
consistent instant): ``Stats.snapshot()``, ``Durable.list_queues()``, each
stream's ``info()`` and the schema registry's schemas and bindings. The process's
memory and the database's size on disk are read in a worker thread. Rates are differences between two consecutive snapshots,
per second; after a gap longer than ``STALE_TICKS`` ticks (nobody was watching)
a rate is unknown (null) for one tick rather than an average over the gap.

Every table is cut to ``MAX_ROWS`` rows per viewer (with the total), so a broker
with 100,000 queues sends each page a bounded frame.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import TYPE_CHECKING, Any, Callable, Final

import anyio

from tidings.protocol import frames as F

from tidings.broker.ops.limits import read_rss
from tidings.broker.ops.metrics import readiness
from tidings.broker.security.permissions import ALL_NAMES

if TYPE_CHECKING:
    from tidings.broker.http.ports import HttpHost
    from tidings.broker.schemas.registry import SchemaRegistry
    from tidings.broker.security.auth import User
    from tidings.broker.security.permissions import Permissions

#: Seconds between two snapshots: the pages' refresh rate.
TICK_SECONDS: Final = 1.0
#: A previous snapshot older than this many ticks is not used for rates.
STALE_TICKS: Final = 5
#: Rows of each table (queues, streams, connections, schemas, bindings) sent to one page;
#: the rest are counted.
MAX_ROWS: Final = 500
#: Subscription patterns listed per connection (the count is always given).
MAX_SUBS_SHOWN: Final = 20


def _rate(now: float, prev: float | None, dt: float | None) -> float | None:
    if prev is None or dt is None:
        return None
    return max(now - prev, 0) / dt


def _disk(data_dir: str, db_path: str) -> dict[str, int | None]:
    """Memory and disk figures (file system calls: run in a worker thread)."""
    out: dict[str, int | None] = {"rss": read_rss(), "disk_free": None, "db_bytes": None, "wal_bytes": None}
    try:
        out["disk_free"] = shutil.disk_usage(data_dir).free
    except OSError:
        pass
    for key, suffix in (("db_bytes", ""), ("wal_bytes", "-wal")):
        try:
            out[key] = os.stat(db_path + suffix).st_size
        except OSError:
            pass
    return out


class Hub:
    """Computes the console snapshot at most once per tick and hands each viewer its view."""

    def __init__(self, host: HttpHost, *, interval: float = TICK_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.host = host
        self.interval = interval
        self.clock = clock
        self.viewers = 0  # open event streams now
        self.computed = 0  # snapshots computed since start (tests: N viewers, one per tick)
        self._tick = -1
        self._lock = anyio.Lock()
        self._snap: dict[str, Any] = {}
        self._views: dict[str, bytes] = {}  # user name -> encoded view of the current tick
        # counters of the previous snapshot, for rates
        self._prev_at: float | None = None
        self._prev: dict[str, Any] = {}

    def until_next_tick(self) -> float:
        return self.interval - (self.clock() % self.interval)

    async def next_tick(self, last: int) -> int:
        """Sleep until a tick after ``last`` has begun; its number. (A timer may fire a
        little early, within the clock's resolution: then it sleeps the rest.)"""
        for _ in range(100):  # bounded: each round sleeps until the boundary
            tick = self.tick()
            if tick > last:
                return tick
            await anyio.sleep(self.until_next_tick())
        return self.tick()

    def tick(self) -> int:
        """The number of the current tick."""
        return int(self.clock() // self.interval)

    async def frame(self, user: User) -> bytes:
        """This tick's snapshot as ``user`` may see it, JSON-encoded."""
        tick = self.tick()
        if tick != self._tick:
            async with self._lock:
                if tick != self._tick:
                    await self._compute()
                    self._tick = tick
        data = self._views.get(user.name)
        if data is None:
            data = self._views[user.name] = json.dumps(
                view(self._snap, user), separators=(",", ":"), default=str).encode()
        return data

    async def _compute(self) -> None:
        snap = self._read()  # on the loop, no await: one consistent instant
        host = self.host
        snap["resources"] = await anyio.to_thread.run_sync(_disk, host.config.data_dir,
                                                           host.durable.store.path)
        self._snap = snap
        self._views = {}
        self.computed += 1

    def _read(self) -> dict[str, Any]:
        host = self.host
        cfg = host.config
        now = self.clock()
        dt = now - self._prev_at if self._prev_at is not None else None
        if dt is not None and (dt <= 0 or dt > STALE_TICKS * self.interval):
            dt = None
        prev = self._prev if dt is not None else {}
        stats = host.stats.snapshot()
        durable = host.durable
        cur: dict[str, Any] = {"published": stats["published"], "queues": {}, "streams": {}, "groups": {},
                               "conns": {}}
        out_total = 0.0
        queues = []
        for q in durable.list_queues():
            name = q["name"]
            cur["queues"][name] = (q["published"], q["delivered"])
            pq = prev.get("queues", {}).get(name)
            rin = _rate(q["published"], pq[0] if pq else None, dt)
            rout = _rate(q["delivered"], pq[1] if pq else None, dt)
            out_total += rout or 0.0
            queues.append({"name": name, "depth": q["depth"], "in_flight": q["in_flight"],
                           "consumers": q["consumers"], "dead_letter": q["dead_letter"],
                           "is_dlq": q["is_dlq"],
                           "dlq_depth": q["dlq_depth"], "bind": q["bind"], "published": q["published"],
                           "delivered": q["delivered"], "acked": q["acked"], "redelivered": q["redelivered"],
                           "dead_lettered": q["dead_lettered"], "rate_in": rin, "rate_out": rout})
        streams = []
        for st in sorted(durable.streams.streams.values(), key=lambda s: s.name):
            info = st.info()
            name = info["name"]
            cur["streams"][name] = info["published"]
            rin = _rate(info["published"], prev.get("streams", {}).get(name), dt)
            groups = []
            for gname, g in sorted(info["groups"].items()):
                cur["groups"][(name, gname)] = g["delivered"]
                rout = _rate(g["delivered"], prev.get("groups", {}).get((name, gname)), dt)
                out_total += rout or 0.0
                groups.append({"name": gname, "generation": g["generation"], "members": g["members"],
                               "lag": sum(p["lag"] for p in g["partitions"]), "partitions": g["partitions"],
                               "delivered": g["delivered"], "redelivered": g["redelivered"],
                               "rate_out": rout})
            conf = info["config"]
            streams.append({"name": name, "partitions": info["partitions"], "bind": info["bind"],
                            "messages": sum(p["messages"] for p in info["partitions"]),
                            "retention": {k: conf.get(k) for k in ("max_age", "max_messages", "max_bytes")},
                            "published": info["published"], "dead_lettered": info["dead_lettered"],
                            "trimmed": info["trimmed"], "readers": info["readers"], "groups": groups,
                            "rate_in": rin})
        conns = []
        prev_conns = prev.get("conns", {})
        for number, c in list(host.connections.items()):
            if not c.admitted:
                continue
            cur["conns"][number] = (c.msgs_in, c.msgs_out)
            pc = prev_conns.get(number)
            rout = _rate(c.msgs_out, pc[1] if pc else None, dt)
            out_total += rout or 0.0
            subs = list(c.subs.values())
            conns.append({"id": number, "name": c.name, "peer": c.peer, "user": c.user.name,
                          "subscriptions": len(subs), "consumers": len(c.consumers),
                          "patterns": [s.pattern + (f" ({s.group})" if s.group else "")
                                       for s in subs[:MAX_SUBS_SHOWN]],
                          "pending_bytes": c.pending_bytes, "msgs_in": c.msgs_in, "msgs_out": c.msgs_out,
                          "rate_in": _rate(c.msgs_in, pc[0] if pc else None, dt), "rate_out": rout,
                          "opened": c.opened})
        self._prev, self._prev_at = cur, now
        schemas, bindings = _registry(host.schemas)
        tls = cfg.security.tls is not None
        bound = host.bound_address
        return {
            "time": time.time(),
            "broker": {"server_name": cfg.server_name, "durability": cfg.durability,
                       "version": F.PROTOCOL_VERSION,
                       "pid": os.getpid(), "uptime": stats["uptime"], "auth": host.users is not None,
                       "tls": tls, "address": "%s:%d" % bound if bound else None,
                       "ready": readiness(host)["ready"]},
            "totals": {"rate_in": _rate(stats["published"], prev.get("published"), dt),
                       "rate_out": out_total if dt is not None else None,
                       "published": stats["published"], "connections": len(conns),
                       "subscriptions": host.subscription_count, "queues": len(queues), "streams": len(streams),
                       "confirmed": durable.confirmed, "dropped": stats["dropped"],
                       "slow_disconnects": stats["slow_disconnects"],
                       "store_pending": durable.store.pending_messages},
            "limits": host.monitor.snapshot(),
            "queues": queues, "streams": streams, "connections": conns,
            "schemas": schemas, "bindings": bindings,
        }


def _registry(reg: SchemaRegistry) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The schema registry's schemas and bindings, sorted by name and pattern (in memory:
    a walk of two dicts, like ``schema.list`` and ``schema.bindings`` without their checks)."""
    schemas = [{"name": s.name, "latest": s.latest.version, "versions": len(s.versions),
                "compatibility": s.compatibility, "valid": s.valid, "invalid": s.invalid,
                "dead_lettered": s.dead_lettered}
               for _n, s in sorted(reg.schemas.items()) if s.versions]
    bindings = [{"pattern": b.pattern, "schema": b.schema, "on_invalid": b.on_invalid,
                 "dead_letter": b.dead_letter} for _p, b in sorted(reg.bindings.items())]
    return schemas, bindings


def _sees_all(perms: Permissions) -> bool:
    """Admin on every name: what `stats` and /metrics need; such a user sees the whole broker."""
    return perms.unrestricted or perms.allows("admin", ALL_NAMES)


def _cut(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"rows": rows[:MAX_ROWS], "total": len(rows)}


def view(snap: dict[str, Any], user: User) -> dict[str, Any]:
    """What ``user`` may see of ``snap``: the queues and streams it may consume or
    administer (each marked with what it may do there), its own connections, the
    schemas it administers and the bindings of patterns it may publish on, and
    broker-wide figures only with admin on every name."""
    perms = user.permissions
    everything = _sees_all(perms)

    def mark(row: dict[str, Any]) -> dict[str, Any] | None:
        name = row["name"]
        admin = perms.allows("admin", name)
        consume = perms.allows("consume", name)
        if not (admin or consume or everything):
            return None
        return {**row, "can_admin": admin, "can_peek": consume}

    queues = [r for r in map(mark, snap["queues"]) if r is not None]
    streams = [r for r in map(mark, snap["streams"]) if r is not None]
    # As the schema.* calls check them (security/permissions.py): a schema is read with admin
    # on its name; a binding governs what may be published on its pattern.
    schemas = [r for r in snap["schemas"] if everything or perms.allows("admin", r["name"])]
    bindings = [r for r in snap["bindings"] if everything or perms.allows("publish", r["pattern"])]
    if everything:
        conns = snap["connections"]
        totals, limits, resources = snap["totals"], snap["limits"], snap["resources"]
    else:
        conns = [c for c in snap["connections"] if c["user"] == user.name]
        rin = [r["rate_in"] for r in queues + streams if r["rate_in"] is not None]
        rout = [r["rate_out"] for r in queues if r["rate_out"] is not None] + \
            [g["rate_out"] for s in streams for g in s["groups"] if g["rate_out"] is not None]
        known = snap["totals"]["rate_in"] is not None
        totals = {"rate_in": sum(rin) if known else None, "rate_out": sum(rout) if known else None,
                  "connections": len(conns), "queues": len(queues), "streams": len(streams)}
        limits, resources = None, None
    return {"time": snap["time"], "broker": snap["broker"], "scope": "broker" if everything else "user",
            "user": user.name, "totals": totals, "limits": limits, "resources": resources,
            "queues": _cut(queues), "streams": _cut(streams), "connections": _cut(conns),
            "schemas": _cut(schemas), "bindings": _cut(bindings)}
