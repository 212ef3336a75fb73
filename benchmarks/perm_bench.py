"""Cost of a permission check per publish: cached, uncached, and allow-all.

Run: python -m benchmarks.perm_bench
The broker calls Permissions.allows("publish", subject) once per published
message, so the cached case is the one that matters; the uncached case is
what a flood of distinct subjects costs (each answer is then computed once).
"""

from __future__ import annotations

import time
import timeit

from tidings.broker.security.permissions import ALLOW_ALL, Permissions

ALLOW = {"publish": ["orders.>", "billing.*.created", "audit.*.*.x", "metrics.>"],
         "subscribe": ["orders.>", "_INBOX.>"]}
DENY = {"publish": ["orders.internal.>", "orders.*.secret"]}


def per_call(fn, number: int) -> float:
    best = min(timeit.repeat(fn, number=number, repeat=5))
    return best / number * 1e9


def main() -> None:
    p = Permissions(ALLOW, DENY)
    subjects = [f"orders.eu{i % 50}.created" for i in range(1000)]
    for s in subjects:
        p.allows("publish", s)
    allows = p.allows
    n = 200_000

    def cached() -> None:
        allows("publish", "orders.eu7.created")

    counter = iter(range(10**9))

    def uncached() -> None:
        Permissions._decide(p, "publish", f"orders.eu{next(counter)}.created")

    def allow_all() -> None:
        ALLOW_ALL.allows("publish", "orders.eu7.created")

    def baseline() -> None:
        pass

    base = per_call(baseline, n)
    rows = [("cached allows()", per_call(cached, n)),
            ("uncached, 4 allow + 2 deny (+ f-string)", per_call(uncached, 50_000)),
            ("ALLOW_ALL.allows() (no cache needed)", per_call(allow_all, n)),
            ("empty call (timeit overhead)", base)]
    for name, ns in rows:
        print(f"{name:40s} {ns:8.0f} ns/check")
    t = time.perf_counter()
    for s in subjects * 100:
        allows("publish", s)
    dt = time.perf_counter() - t
    print(f"{'loop of 100k cached checks':40s} {dt / 100_000 * 1e9:8.0f} ns/check")


if __name__ == "__main__":
    main()
