"""Event sourcing and CQRS on a tidings stream: bank accounts.

    python examples/event_sourcing.py --url tidings://127.0.0.1:7421

What it does, printing each step:

1. Declares the stream ``example-bank`` (4 partitions, bound to ``example-bank.>``). The
   account id is the message key, so one account's events stay in order in
   one partition.
2. Rebuilds every balance by replaying the whole stream (``read_stream``
   from "earliest" over all partitions): the write side's state is nothing
   but its events. On a second run the history of the first is replayed too.
3. Handles commands against that state: opens accounts, deposits, and
   withdraws only what the balance allows, appending one event per decision
   (confirmed publishes: an event is history once the broker confirms it).
4. Replays again and checks the rebuilt balances equal the write side's.
5. Runs the query side: a read model (balances plus activity per account)
   kept up to date by a consumer group. It starts from the beginning of the
   stream, then follows while live events keep arriving, skips redeliveries
   it has already applied (at-least-once delivery, idempotent projection),
   and acks each event so the group's committed offset moves on.
6. Checks the read model against a final replay and exits.

Each run uses its own consumer group, because this demo's read model lives
in memory and so must be built from the start of the stream; a real read
model would store its per-partition positions next to its data and keep
one group name. ``--reset`` deletes the stream first.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import anyio

from tidings.client import Client, connect
from tidings.client.errors import NotFoundError, TidingsError

DEFAULT_URL = "tidings://127.0.0.1:7421"
PARTITIONS = 4


# ------------------------------------------------------------ the domain


def apply(balances: dict[str, int], event: dict[str, Any]) -> None:
    """The one place that says what an event does to an account's balance."""
    kind, acct = event["type"], event["account"]
    if kind == "AccountOpened":
        balances.setdefault(acct, 0)
    elif kind == "Deposited":
        balances[acct] += event["amount"]
    elif kind == "Withdrawn":
        balances[acct] -= event["amount"]
    else:
        raise ValueError(f"unknown event type {kind!r}")


def decide(balances: dict[str, int], command: tuple[str, str, int]) -> dict[str, Any] | None:
    """A command -> the event it causes, or None if the current state refuses it."""
    kind, acct, amount = command
    if kind == "open":
        return None if acct in balances else {"type": "AccountOpened", "account": acct}
    if acct not in balances:
        return None
    if kind == "deposit":
        return {"type": "Deposited", "account": acct, "amount": amount}
    if kind == "withdraw" and amount <= balances[acct]:
        return {"type": "Withdrawn", "account": acct, "amount": amount}
    return None


async def append(tc: Client, stream: str, event: dict[str, Any]) -> tuple[int, int]:
    """Append one event; returns where it was stored (partition, offset)."""
    ack = await tc.publish(f"{stream}.{event['type'].lower()}", json.dumps(event).encode(),
                           key=event["account"], headers={"type": event["type"], "schema": 1})
    assert ack is not None and ack.partition is not None and ack.offset is not None
    return ack.partition, ack.offset


async def replay(tc: Client, stream: str) -> tuple[dict[str, int], list[int], int]:
    """Rebuild balances from the whole stream: (balances, next offset per partition, events read)."""
    balances: dict[str, int] = {}
    positions = []
    n = 0
    info = await tc.stream_info(stream)
    for p in range(len(info["partitions"])):
        nxt = info["partitions"][p]["first"]
        async for m in tc.read_stream(stream, p, "earliest"):
            apply(balances, json.loads(m.payload))
            nxt = m.offset + 1
            n += 1
        positions.append(nxt)
    return balances, positions, n


# ---------------------------------------------------------- query side


@dataclass
class ReadModel:
    """What the query side serves: balances and activity per account, and per
    partition the next offset it has to apply (so redeliveries are skipped)."""

    balances: dict[str, int] = field(default_factory=dict)
    activity: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    position: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    applied: int = 0
    skipped: int = 0
    changed: anyio.Event = field(default_factory=anyio.Event)

    def on_event(self, partition: int, offset: int, event: dict[str, Any]) -> bool:
        if offset < self.position[partition]:
            self.skipped += 1  # applied already (a redelivery): at-least-once, idempotent here
            return False
        apply(self.balances, event)
        self.activity[event["account"]] += 1
        self.position[partition] = offset + 1
        self.applied += 1
        ev, self.changed = self.changed, anyio.Event()
        ev.set()
        return True

    def caught_up(self, targets: list[int]) -> bool:
        return all(self.position[p] >= t for p, t in enumerate(targets))


async def project(tc: Client, stream: str, group: str, model: ReadModel, verbose: anyio.Event) -> None:
    async with tc.stream_consume(stream, group, window=200, start="earliest") as msgs:
        async for m in msgs:
            event = json.loads(m.payload)
            if model.on_event(m.partition, m.offset, event) and verbose.is_set():
                amount = event.get("amount", "")
                sign = {"Deposited": "+", "Withdrawn": "-"}.get(event["type"], "")
                print(f"  [read model] p{m.partition}@{m.offset:<5} {event['type']:<13} {event['account']:<8} "
                      f"{sign}{amount!s:<5} balance {model.balances[event['account']]}", flush=True)
            await m.ack()


# ----------------------------------------------------------------- demo


def show(balances: dict[str, int], limit: int = 8) -> str:
    items = sorted(balances.items())
    text = ", ".join(f"{a}={b}" for a, b in items[:limit])
    return text + (f", ... ({len(items)} accounts)" if len(items) > limit else "")


async def demo(ns: argparse.Namespace) -> int:
    rng = random.Random(ns.seed)
    stream = ns.stream
    async with connect(ns.url, name="event-sourcing-demo", reconnect=False) as tc:
        if ns.reset:
            try:
                await tc.delete_stream(stream)
                print(f"deleted stream {stream!r} (--reset)")
            except NotFoundError:
                pass
        info = await tc.declare_stream(stream, partitions=PARTITIONS, bind=[f"{stream}.>"])
        history = sum(p["messages"] for p in info["partitions"])
        print(f"declared stream {stream!r}: {len(info['partitions'])} partitions, bound to {stream}.>, "
              f"{'new' if info['created'] else 'existing'}, {history} events stored")

        # 1. the write side's state is its history
        t0 = time.perf_counter()
        balances, _pos, n = await replay(tc, stream)
        print(f"replayed {n} events in {time.perf_counter() - t0:.3f}s: {len(balances)} accounts")

        # 2. commands -> events, decided against that state
        accounts = [f"acct-{i}" for i in range(ns.accounts)]
        appended = refused = 0
        for acct in accounts:
            ev = decide(balances, ("open", acct, 0))
            if ev is not None:
                await append(tc, stream, ev)
                apply(balances, ev)
                appended += 1
        for _ in range(ns.events):
            cmd = (rng.choice(["deposit", "deposit", "withdraw"]), rng.choice(accounts), rng.randint(1, 100))
            ev = decide(balances, cmd)
            if ev is None:
                refused += 1
                continue
            await append(tc, stream, ev)
            apply(balances, ev)
            appended += 1
        print(f"appended {appended} events ({refused} withdrawals refused: not enough money)")

        # 3. anyone can rebuild the same state from the stream
        t0 = time.perf_counter()
        rebuilt, positions, n = await replay(tc, stream)
        ok = rebuilt == balances
        print(f"rebuilt balances by replaying {n} events from offsets {positions} in "
              f"{time.perf_counter() - t0:.3f}s: {show(rebuilt)}")
        print("replayed state matches the write side" if ok else "MISMATCH between replay and write side")
        if not ok:
            return 1

        # 4. the query side: a consumer group keeps a read model up to date, live
        group = f"balances-{secrets.token_hex(3)}"
        model = ReadModel()
        verbose = anyio.Event()
        live_since = time.time()
        print(f"read model: consumer group {group!r} from the start of the stream, then following")
        async with connect(ns.url, name="read-model", reconnect=False) as qc:
            async with anyio.create_task_group() as tg:
                tg.start_soon(project, qc, stream, group, model, verbose)
                with anyio.fail_after(ns.timeout):
                    while not model.caught_up(positions):
                        await model.changed.wait()
                print(f"read model caught up with history: {model.applied} events applied")
                verbose.set()
                print(f"publishing {ns.live} live events while the read model follows:")
                targets = list(positions)
                for _ in range(ns.live):
                    cmd = (rng.choice(["deposit", "withdraw"]), rng.choice(accounts), rng.randint(1, 50))
                    ev = decide(balances, cmd) or decide(balances, ("deposit", cmd[1], cmd[2]))
                    assert ev is not None
                    p, o = await append(tc, stream, ev)
                    apply(balances, ev)
                    targets[p] = max(targets[p], o + 1)
                    await anyio.sleep(ns.pace)
                with anyio.fail_after(ns.timeout):
                    while not model.caught_up(targets):
                        await model.changed.wait()
                await qc.flush()  # the acks have reached the broker
                tg.cancel_scope.cancel()

            group_info = (await tc.stream_info(stream))["groups"][group]
            lag = sum(p["lag"] for p in group_info["partitions"])
        print(f"read model up to date: {model.applied} events applied, {model.skipped} redeliveries skipped, "
              f"group lag {lag}")

        # 5. the two sides agree, and the stream still holds the whole story
        final, _positions, n = await replay(tc, stream)
        ok = final == model.balances == balances
        print(f"read model balances: {show(model.balances)}")
        busiest = max(model.activity.items(), key=lambda kv: kv[1])
        print(f"busiest account: {busiest[0]} with {busiest[1]} events")
        audit = 0
        for p in range(PARTITIONS):
            async for _m in tc.read_stream(stream, p, {"time_ms": int(live_since * 1000)}):
                audit += 1
        print(f"audit: {audit} events since the read model started (replay from a timestamp)")
        print("read model matches the replayed stream" if ok else "MISMATCH between read model and stream")
        return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=os.environ.get("TIDINGS_URL", DEFAULT_URL),
                    help=f"broker URL (default: $TIDINGS_URL or {DEFAULT_URL})")
    ap.add_argument("--stream", default="example-bank", help="stream name (default example-bank)")
    ap.add_argument("--accounts", type=int, default=12, help="accounts to open (default 12)")
    ap.add_argument("--events", type=int, default=300, help="commands to handle before the replay (default 300)")
    ap.add_argument("--live", type=int, default=20, help="events published while the read model follows")
    ap.add_argument("--pace", type=float, default=0.05, help="seconds between live events (default 0.05)")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    ap.add_argument("--timeout", type=float, default=30.0, help="give up waiting for the read model after S s")
    ap.add_argument("--reset", action="store_true", help="delete the stream first")
    ns = ap.parse_args(argv)
    try:
        return anyio.run(demo, ns)
    except TidingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as eg:  # `async with connect()` wraps what failed inside it
        err = eg
        while isinstance(err, BaseExceptionGroup) and len(err.exceptions) == 1:
            err = err.exceptions[0]
        if isinstance(err, (TidingsError, TimeoutError)):
            print(f"error: {err}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
