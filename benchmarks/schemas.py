"""The cost of schema validation at the door, on durable publishes.

    python -m benchmarks.schemas [--messages 40000] [--rounds 3] [--in-flight 1000]

One broker, two durable queues: ``bench.plain`` (no schema) and
``bench.orders`` (its subject bound to the ``OrderPlaced`` schema, a realistic
10-field event with nested items, enums, bounds and a pattern). One client
process publishes the same JSON event with confirms (``--in-flight``
outstanding) to each in turn, rounds alternating (plain, schema, plain, ...)
after an uncounted warm-up, and reports confirmed publishes/s per side
(medians) and the ratio: what validation costs of durable throughput (the
issue's bar: at most 25%), and the broker process's own CPU time per
message on each side (less sensitive to other load on the machine).

It also times the validator libraries on the same event in this process
(jsonschema-rs, the one the broker uses; fastjsonschema and jsonschema when
installed), which is how the validator was chosen.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import timeit
from collections import deque
from typing import Any

from ._common import broker_process, emit

ORDER_PLACED: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "OrderPlaced",
    "type": "object",
    "required": ["order_id", "customer_id", "amount", "currency", "region", "items", "placed_at", "channel",
                 "priority", "coupon"],
    "additionalProperties": False,
    "properties": {
        "order_id": {"type": "string", "minLength": 1, "maxLength": 64},
        "customer_id": {"type": "string", "minLength": 1},
        "amount": {"type": "number", "minimum": 0},
        "currency": {"enum": ["EUR", "USD", "GBP"]},
        "region": {"type": "string", "pattern": "^[a-z]{2}-[a-z]+$"},
        "items": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["sku", "qty"], "additionalProperties": False,
            "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1},
                           "price": {"type": "number", "minimum": 0}}}},
        "placed_at": {"type": "string", "format": "date-time"},
        "channel": {"enum": ["web", "app", "store"]},
        "priority": {"type": "integer", "minimum": 0, "maximum": 9},
        "coupon": {"type": ["string", "null"]},
    },
}
EVENT: dict[str, Any] = {
    "order_id": "o-2026-000123456", "customer_id": "c-000042", "amount": 123.45, "currency": "EUR",
    "region": "eu-west", "items": [{"sku": "A-100", "qty": 2, "price": 40.0}, {"sku": "B-7", "qty": 1, "price": 43.45}],
    "placed_at": "2026-12-03T16:00:00Z", "channel": "web", "priority": 3, "coupon": None,
}
HEADERS = {"content-type": "application/json"}


async def _publish(url: str, subject: str, count: int, in_flight: int) -> float:
    """Confirmed publishes/s of ``count`` events to ``subject``."""
    from tidings.client import connect

    payload = json.dumps(EVENT).encode()
    async with connect(url, name="bench-schemas") as tc:
        pending: deque[Any] = deque()
        pub = tc.publish_nowait
        start = time.perf_counter()
        for _ in range(count):
            if len(pending) >= in_flight:
                await pending.popleft()
            pending.append(pub(subject, payload, headers=dict(HEADERS), confirm=True))
        while pending:
            await pending.popleft()
        return count / (time.perf_counter() - start)


async def _setup(url: str) -> None:
    from tidings.client import connect

    async with connect(url) as tc:
        await tc.declare_queue("bench.plain", bind=["bench.plain.>"])
        await tc.declare_queue("bench.orders", bind=["bench.orders.>"])
        await tc.register_schema("OrderPlaced", ORDER_PLACED)
        await tc.bind_schema("bench.orders.placed", "OrderPlaced")


async def _counts(url: str) -> dict[str, Any]:
    from tidings.client import connect

    async with connect(url) as tc:
        return {s["name"]: s for s in await tc.list_schemas()}


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc)."""
    import os

    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def validators(number: int = 20_000) -> list[dict[str, Any]]:
    """Microseconds per validation of EVENT by each installed library (compiled once)."""
    rows: list[dict[str, Any]] = []
    doc = {k: v for k, v in ORDER_PLACED.items() if k != "$schema"}
    candidates: list[tuple[str, Any]] = []
    try:
        import jsonschema_rs
        v_rs = jsonschema_rs.Draft202012Validator(ORDER_PLACED)
        candidates.append(("jsonschema-rs (draft 2020-12; the broker's)", lambda: v_rs.is_valid(EVENT)))
    except ImportError:
        pass
    try:
        import fastjsonschema
        v_fast = fastjsonschema.compile(doc)  # draft 7 at most: the $schema of 2020-12 is refused
        candidates.append(("fastjsonschema (draft 7)", lambda: v_fast(EVENT)))
    except ImportError:
        pass
    try:
        import jsonschema
        v_py = jsonschema.Draft202012Validator(ORDER_PLACED)
        candidates.append(("jsonschema (draft 2020-12, pure Python)", lambda: v_py.is_valid(EVENT)))
    except ImportError:
        pass
    raw = json.dumps(EVENT).encode()
    candidates.append(("json.loads of the event (for scale)", lambda: json.loads(raw)))
    for name, fn in candidates:
        n = number if "pure Python" not in name else max(200, number // 100)
        best = min(timeit.repeat(fn, number=n, repeat=3)) / n
        rows.append({"validator": name, "us_per_event": round(best * 1e6, 2)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=40_000, help="events per round")
    ap.add_argument("--rounds", type=int, default=3, help="counted rounds per side")
    ap.add_argument("--in-flight", type=int, default=1000)
    ap.add_argument("--durability", choices=["full", "normal"], default="full")
    ns = ap.parse_args()
    from tidings.broker.serve import run_loop

    plain: list[float] = []
    bound: list[float] = []
    cpu: dict[str, list[float]] = {"plain": [], "schema": []}
    with broker_process("--durability", ns.durability) as b:
        url = b.url
        run_loop(_setup, url)
        run_loop(_publish, url, "bench.plain.placed", ns.messages // 4, ns.in_flight)  # warm-up
        run_loop(_publish, url, "bench.orders.placed", ns.messages // 4, ns.in_flight)
        sides = [("plain", "bench.plain.placed", plain), ("schema", "bench.orders.placed", bound)]
        for i in range(ns.rounds):
            for side, subject, out in (sides if i % 2 == 0 else sides[::-1]):
                c0 = _cpu_seconds(b.pid)
                out.append(run_loop(_publish, url, subject, ns.messages, ns.in_flight))
                cpu[side].append((_cpu_seconds(b.pid) - c0) / ns.messages * 1e6)
        counts = run_loop(_counts, url)["OrderPlaced"]
    p, q = statistics.median(plain), statistics.median(bound)
    cp, cq = statistics.median(cpu["plain"]), statistics.median(cpu["schema"])
    row = {"scenario": f"durable publish, {ns.in_flight} in flight, durability={ns.durability}",
           "events_per_round": ns.messages, "rounds": len(plain),
           "plain_per_s": round(p), "schema_per_s": round(q),
           "ratio": round(q / p, 3), "cost_pct": round((1 - q / p) * 100, 1),
           "broker_cpu_us_plain": round(cp, 1), "broker_cpu_us_schema": round(cq, 1),
           "cpu_cost_pct": round((cq / cp - 1) * 100, 1),
           "validated": counts["valid"], "invalid": counts["invalid"]}
    emit([row], list(row))
    print()
    vrows = validators()
    print(json.dumps(vrows, indent=2))
    from ._common import table
    print(table(vrows, ["validator", "us_per_event"]))


if __name__ == "__main__":
    main()
