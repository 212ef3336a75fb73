"""One broker on SQLite, one on PostgreSQL, and 2 and 3 brokers on one PostgreSQL
database (cluster mode), in one run (issue 13 item 5; docs/SCALING.md).

    python -m benchmarks.cluster [--messages 100000] [--pubsub-messages 200000]
                                 [--in-flight 1000] [--brokers 1 2 3] [--no-sqlite]

Two scenarios per row, as in the single-broker benchmarks they reuse:

- **queue**: durable queue throughput end to end, one producer keeping ``--in-flight``
  confirms outstanding, one consumer acking (benchmarks/durable.py), 128-byte payloads,
  ``durability = full``; with the confirm latency of a durable publish (p50/p99).
- **pubsub**: one publisher, one subscriber (benchmarks/pubsub.py via
  benchmarks/peers.py's scenario_pubsub), 128-byte payloads.

Every row has the brokers' CPU per message (all of the row's brokers together: the
cost of a message to the service) and, on PostgreSQL, the database server's.

PostgreSQL is a throwaway server from Debian's ``postgresql`` package (tests/pgserver.py,
fsync on), one fresh database per row; without the package its rows are skipped with
the install command.

The 2- and 3-broker rows run the cross-broker scenarios of ``benchmarks/cluster_queue.py``
(publisher on one broker, consumer on another) and ``benchmarks/cluster_pubsub.py``
(publisher on broker A, subscriber on B), written with the shared queues and the pub/sub
mesh. Each is called as ``run(urls, messages, **options)`` (``urls``: the brokers'
``tidings://`` URLs, the keywords it does not take are left out) and returns a dict (a
row's numbers); a module that is not there yet gives a row saying "not available yet".

This machine has 2 cores for the clients, every broker and PostgreSQL together: more
brokers here cannot add throughput, they show the per-message cost of spreading one
service over several processes (docs/SCALING.md says how it scales with real cores).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

from . import durable
from ._common import RunningBroker, broker_process, emit, table
from .durable import cpu_seconds

COLUMNS = ["brokers", "store", "scenario", "msgs_per_s", "confirm_p50_ms", "confirm_p99_ms",
           "broker_cpu_us_per_msg", "db_cpu_us_per_msg", "load1", "note"]
NOT_YET = "not available yet"


@contextlib.contextmanager
def pg_server() -> Iterator[Any]:
    """A throwaway PostgreSQL (tests/pgserver.py) for the run, or None (with the install
    hint printed) when Debian's postgresql package is absent."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests.pgserver import SKIP_REASON, PgServer, find_bin_dir

    bin_dir = find_bin_dir()
    if bin_dir is None:
        print(f"skipping the PostgreSQL rows: {SKIP_REASON}", file=sys.stderr)
        yield None
        return
    server = PgServer(bin_dir)
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@contextlib.contextmanager
def brokers(n: int, *args: str) -> Iterator[list[RunningBroker]]:
    """``n`` brokers started with ``args`` (and durability full), stopped at the end."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(broker_process("--durability", "full", *args)) for _ in range(n)]


def _row(n: int, store: str, scenario: str, **numbers: Any) -> dict[str, Any]:
    row = {c: None for c in COLUMNS} | {"brokers": n, "store": store, "scenario": scenario, **numbers}
    row["load1"] = round(os.getloadavg()[0], 2)  # the machine's load: messages/s move with it
    return row


def single(store: str, extra: list[str], db_pids: Callable[[], list[int]] | None, ns: argparse.Namespace,
           ) -> list[dict[str, Any]]:
    """The queue and pub/sub rows of one broker on ``store``."""
    from .peers import Server, scenario_pubsub

    rows = []
    with brokers(1, *extra) as (b,):
        q = durable.run(b.url, ns.messages, 128, ns.in_flight, ns.in_flight, b.pid, db_pids)
        rows.append(_row(1, store, "queue", msgs_per_s=q["end_to_end_per_s"], confirm_p50_ms=q["confirm_p50_ms"],
                         confirm_p99_ms=q["confirm_p99_ms"], broker_cpu_us_per_msg=q["broker_cpu_us_per_msg"],
                         db_cpu_us_per_msg=q["db_cpu_us_per_msg"]))
        p = scenario_pubsub(Server("tidings", b.url, b.pid), 1, ns.pubsub_messages)
        rows.append(_row(1, store, "pubsub", msgs_per_s=p["msgs_per_s"],
                         broker_cpu_us_per_msg=p["broker_cpu_us_per_msg"], note=f"p50 {p['p50_ms']} ms"))
    return rows


def _scenario(module: str) -> Callable[..., dict[str, Any]] | None:
    """``benchmarks.<module>.run``, or None while that module is not written yet."""
    try:
        mod = importlib.import_module(f"benchmarks.{module}")
    except ImportError:
        return None
    fn = getattr(mod, "run", None)
    return fn if callable(fn) else None


def several(n: int, server: Any, ns: argparse.Namespace) -> list[dict[str, Any]]:
    """The rows of ``n`` brokers in cluster mode on one fresh database of ``server``."""
    rows = []
    for scenario, module, messages in (("queue", "cluster_queue", ns.messages),
                                       ("pubsub", "cluster_pubsub", ns.pubsub_messages)):
        own = getattr(importlib.import_module("benchmarks.cluster_queue"), "run_cluster", None) \
            if module == "cluster_queue" else None
        if own is not None:  # it starts its own brokers (publishers and consumers on every one)
            r = own(server.new_database(), n, messages, in_flight=ns.in_flight, db_pids=server.pids)
            rows.append(_row(n, "postgresql", scenario, msgs_per_s=r.get("end_to_end_per_s"),
                             confirm_p50_ms=r.get("confirm_p50_ms"), confirm_p99_ms=r.get("confirm_p99_ms"),
                             broker_cpu_us_per_msg=r.get("broker_cpu_us_per_msg"),
                             db_cpu_us_per_msg=r.get("db_cpu_us_per_msg"), note=r.get("scenario", "")))
            continue
        fn = _scenario(module)
        if fn is None:
            rows.append(_row(n, "postgresql", scenario, note=f"benchmarks/{module}.py: {NOT_YET}"))
            continue
        with brokers(n, "--store", server.new_database(), "--cluster") as bs:
            options = {"in_flight": ns.in_flight, "pids": [b.pid for b in bs], "db_pids": server.pids}
            takes = inspect.signature(fn).parameters
            kwargs = {k: v for k, v in options.items() if k in takes}
            pids = [b.pid for b in bs]
            cpu0, db0 = cpu_seconds(pids), cpu_seconds(server.pids())
            try:
                r = fn([b.url for b in bs], messages, **kwargs)
            except Exception as exc:  # another helper's scenario: report it, keep the run going
                rows.append(_row(n, "postgresql", scenario, note=f"{module} failed: {exc!r}"[:120]))
                continue
            cpu, db = cpu_seconds(pids) - cpu0, cpu_seconds(server.pids()) - db0
        done = r.get("received") or r.get("delivered") or r.get("consumed") or messages
        rate = r.get("msgs_per_s") or r.get("end_to_end_per_s") or r.get("delivered_per_s")
        rows.append(_row(n, "postgresql", scenario, msgs_per_s=rate, confirm_p50_ms=r.get("confirm_p50_ms"),
                         confirm_p99_ms=r.get("confirm_p99_ms"),
                         # measured here around the whole call (set-up included): an upper bound
                         broker_cpu_us_per_msg=round(cpu * 1e6 / done, 1),
                         db_cpu_us_per_msg=round(db * 1e6 / done, 1), note=r.get("note", "")))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=100_000, help="durable messages per queue row")
    ap.add_argument("--pubsub-messages", type=int, default=200_000, help="messages per pub/sub row")
    ap.add_argument("--in-flight", type=int, default=1000, help="confirms the producer keeps outstanding")
    ap.add_argument("--brokers", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3],
                    help="PostgreSQL rows to run (1: one broker; 2, 3: cluster mode)")
    ap.add_argument("--no-sqlite", action="store_true", help="leave out the one-broker SQLite row")
    ns = ap.parse_args(argv)
    rows: list[dict[str, Any]] = []
    if not ns.no_sqlite:
        rows += single("sqlite", [], None, ns)
    with pg_server() as server:
        if server is None:
            rows.append(_row(1, "postgresql", "-", note="skipped: apt-get install postgresql"))
        else:
            for n in ns.brokers:
                if n == 1:
                    rows += single("postgresql", ["--store", server.new_database()], server.pids, ns)
                else:
                    rows += several(n, server, ns)
    emit(rows, COLUMNS, as_json_only=True)
    print()
    print(table([{k: ("" if v is None else v) for k, v in r.items()} for r in rows], COLUMNS))


if __name__ == "__main__":
    main()
