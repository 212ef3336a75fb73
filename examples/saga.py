"""An order saga on tidings: inventory, payment and shipping as separate
services, an orchestrator whose state is an event-sourced stream, and
compensations in reverse order when a step fails.

    python examples/saga.py demo --orders 20          # everything in one process
    python examples/saga.py services                  # the three services (Apps)
    python examples/saga.py orchestrator              # the orchestrator (an App)
    python examples/saga.py place --orders 20         # place orders
    python examples/saga.py report                    # what the streams say happened

Every role takes ``--url`` (default ``$TIDINGS_URL`` or tidings://127.0.0.1:7421).

The saga of one order: reserve inventory -> charge payment -> ship. When a
step fails, the steps already done are compensated in reverse (refund the
payment, then release the inventory) and the saga ends COMPENSATED;
otherwise it ends COMPLETED. Failures are injected by the order itself: a
sku in ``OUT_OF_STOCK``, a ``"declined"`` card, an empty address.

Where each guarantee comes from:

- **Durable queues.** Each service consumes its own queue
  (``example-saga-inventory``, ...), the orchestrator consumes the orders
  queue and the replies queue; a message is acked only after its handler
  finished, so a crash redelivers it.
- **Idempotent steps.** Every command, reply and log event carries a
  ``msg_id`` derived from the saga id and the step (``o-7.charge``,
  ``o-7.charge.reply``, ``o-7.log.3``): the broker stores a re-publish
  with the same id only once. Services also de-duplicate by it: a command
  they have already applied is answered with the recorded outcome and not
  applied again (their effects are in the ``example-saga-ledger`` stream,
  replayed on start, so this survives their restarts too).
- **The orchestrator's state is a stream.** Each saga's transitions
  (started, done, failed, compensated, ended) are appended to
  ``example-saga-log`` with the saga id as key (one saga's events stay in
  order in one partition). The orchestrator records a transition before it
  acts on it and acks a reply only after recording it. On start it replays
  the stream, rebuilds every saga and re-issues the next command of each
  unfinished one (the broker and the service de-duplicate it), so killing
  it (kill -9) at any moment and starting it again finishes or compensates
  every saga exactly once. tests/integration/test_saga.py does that.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import anyio

import tidings
from tidings.client import Client

DEFAULT_URL = "tidings://127.0.0.1:7421"
PREFIX = "example-saga"
LOG_STREAM = f"{PREFIX}-log"            # the orchestrator's event-sourced state
LEDGER_STREAM = f"{PREFIX}-ledger"      # every effect the services applied
ORDERS_QUEUE = f"{PREFIX}-orders"
REPLIES_QUEUE = f"{PREFIX}-replies"
SERVICES = ("inventory", "payment", "shipping")
PARTITIONS = 4
OUT_OF_STOCK = {"unobtainium"}

# (forward action, service, its compensation or None), in saga order
STEPS = [("reserve", "inventory", "release"), ("charge", "payment", "refund"), ("ship", "shipping", None)]
SERVICE_OF = {"reserve": "inventory", "release": "inventory", "charge": "payment", "refund": "payment",
              "ship": "shipping"}
COMPENSATION_OF = {step: comp for step, _svc, comp in STEPS}


async def declare(tc: Client) -> None:
    """Declare every queue and stream the saga uses (idempotent)."""
    for svc in SERVICES:
        await tc.declare_queue(f"{PREFIX}-{svc}", bind=[f"{PREFIX}.{svc}.>"], backoff_initial=0.1)
    await tc.declare_queue(ORDERS_QUEUE, bind=[f"{PREFIX}.order.>"], backoff_initial=0.1)
    await tc.declare_queue(REPLIES_QUEUE, bind=[f"{PREFIX}.reply.>"], backoff_initial=0.1)
    await tc.declare_stream(LOG_STREAM, partitions=PARTITIONS, bind=[f"{PREFIX}.log.>"])
    await tc.declare_stream(LEDGER_STREAM, partitions=PARTITIONS, bind=[f"{PREFIX}.ledger.>"])


async def replay(tc: Client, stream: str) -> list[dict[str, Any]]:
    """Every event of ``stream``, each partition in order."""
    events = []
    info = await tc.stream_info(stream)
    for p in range(len(info["partitions"])):
        async for m in tc.read_stream(stream, p, "earliest"):
            events.append(m.json())
    return events


# ------------------------------------------------------------ the services


def decide(action: str, order: dict[str, Any]) -> tuple[bool, str]:
    """A service's business rule: (ok, reason). Compensations always succeed."""
    if action == "reserve" and order["sku"] in OUT_OF_STOCK:
        return False, f"{order['sku']} is out of stock"
    if action == "charge" and order["card"] == "declined":
        return False, "card declined"
    if action == "ship" and not order["address"]:
        return False, "no shipping address"
    return True, ""


def service_app(url: str, service: str) -> tidings.App:
    """One service: consumes ``example-saga-<service>``, applies each command
    at most once (de-duplicated by its msg_id), records the effect in the
    ledger, and replies to the orchestrator."""
    app = tidings.App(url, name=f"saga-{service}")
    applied: dict[str, dict[str, Any]] = {}  # command msg_id -> the recorded effect
    locks: defaultdict[str, anyio.Lock] = defaultdict(anyio.Lock)

    @app.on_startup
    async def rebuild() -> None:
        await declare(app.client)
        for effect in await replay(app.client, LEDGER_STREAM):
            if effect["service"] == service:
                applied[effect["msg_id"]] = effect

    @app.consumer(f"{PREFIX}-{service}", concurrency=8)
    async def handle(command: dict) -> None:
        msg_id = f"{command['saga']}.{command['action']}"
        async with locks[msg_id]:
            effect = applied.get(msg_id)
            if effect is None:  # new: apply it, and record that we did before replying
                ok, reason = decide(command["action"], command["order"])
                effect = {"service": service, "saga": command["saga"], "action": command["action"],
                          "msg_id": msg_id, "ok": ok, "reason": reason}
                # no msg_id here on purpose: the ledger shows every application, so a test can count
                # them. A real service would write the effect and this record in one transaction.
                await app.client.publish(f"{PREFIX}.ledger.{service}", json=effect, key=command["saga"])
                applied[msg_id] = effect
            reply = {"saga": command["saga"], "action": command["action"], "ok": effect["ok"],
                     "reason": effect["reason"]}
            await app.client.publish(f"{PREFIX}.reply.{service}", json=reply, msg_id=f"{msg_id}.reply")

    return app


# -------------------------------------------------------- the orchestrator


@dataclass
class Saga:
    """One saga as its log tells it."""

    id: str
    order: dict[str, Any]
    seq: int = 0                                   # events recorded so far
    done: list[str] = field(default_factory=list)  # forward steps done, in order
    failed: str | None = None                      # the step that failed
    compensated: list[str] = field(default_factory=list)
    outcome: str | None = None                     # COMPLETED or COMPENSATED, once ended

    def apply(self, event: dict[str, Any]) -> None:
        """The one place that says what a log event does to a saga."""
        kind = event["event"]
        if kind == "done":
            self.done.append(event["step"])
        elif kind == "failed":
            self.failed = event["step"]
        elif kind == "compensated":
            self.compensated.append(event["step"])
        elif kind == "ended":
            self.outcome = event["outcome"]
        self.seq = event["seq"] + 1

    def next_action(self) -> tuple[str, str] | None:
        """("command", action) or ("end", outcome), or None once ended."""
        if self.outcome is not None:
            return None
        if self.failed is None:
            if len(self.done) < len(STEPS):
                return "command", STEPS[len(self.done)][0]
            return "end", "COMPLETED"
        for step in reversed(self.done):  # undo what was done, last first
            comp = COMPENSATION_OF[step]
            if comp is not None and comp not in self.compensated:
                return "command", comp
        return "end", "COMPENSATED"


def orchestrator_app(url: str, verbose: bool = True, crash_after: int = 0) -> tidings.App:
    """The orchestrator: takes orders, drives each saga, and keeps its state
    only in ``example-saga-log``. ``crash_after`` > 0 (for tests) kills the
    process (SIGKILL) right after its n-th recorded transition, before it
    acts on it: the worst moment to die."""
    app = tidings.App(url, name="saga-orchestrator")
    sagas: dict[str, Saga] = {}
    locks: defaultdict[str, anyio.Lock] = defaultdict(anyio.Lock)
    recorded = 0

    async def record(saga: Saga, event: dict[str, Any]) -> None:
        """Append one transition (committed when this returns), then apply it.

        The msg_id makes the append safe when a killed predecessor's last append
        commits only after this process replayed the log: the event at a given
        seq is the same whoever computes it, and the broker stores it once."""
        event = {"saga": saga.id, "seq": saga.seq, **event}
        await app.client.publish(f"{PREFIX}.log.{event['event']}", json=event, key=saga.id,
                                 msg_id=f"{saga.id}.log.{saga.seq}")
        saga.apply(event)
        nonlocal recorded
        recorded += 1
        if recorded == crash_after:
            print(f"orchestrator: kill -9 of myself after {recorded} transitions", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    async def advance(saga: Saga) -> None:
        """Act on the saga's state: send its next command, or record its end."""
        nxt = saga.next_action()
        if nxt is None:
            return
        kind, what = nxt
        if kind == "end":
            await record(saga, {"event": "ended", "outcome": what})
            if verbose:
                print(f"saga {saga.id} {what}", flush=True)
            return
        command = {"saga": saga.id, "action": what, "order": saga.order}
        await app.client.publish(f"{PREFIX}.{SERVICE_OF[what]}.{what}", json=command,
                                 msg_id=f"{saga.id}.{what}")

    @app.on_startup
    async def resume() -> None:
        await declare(app.client)
        for event in sorted(await replay(app.client, LOG_STREAM), key=lambda e: (e["saga"], e["seq"])):
            if event["event"] == "started":
                sagas[event["saga"]] = Saga(event["saga"], event["order"])
            sagas[event["saga"]].apply(event)
        unfinished = [s for s in sagas.values() if s.outcome is None]
        print(f"orchestrator: replayed {len(sagas)} sagas, resuming {len(unfinished)}", flush=True)
        for saga in unfinished:  # re-issue each next command: the broker and the services de-duplicate
            await advance(saga)

    @app.consumer(ORDERS_QUEUE, concurrency=8)
    async def on_order(order: dict) -> None:
        async with locks[order["saga"]]:
            if order["saga"] in sagas:
                return  # a redelivered order: that saga is under way already
            saga = sagas[order["saga"]] = Saga(order["saga"], order)
            await record(saga, {"event": "started", "order": order})
            await advance(saga)

    @app.consumer(REPLIES_QUEUE, concurrency=8)
    async def on_reply(reply: dict) -> None:
        async with locks[reply["saga"]]:
            saga = sagas.get(reply["saga"])
            if saga is None or saga.next_action() != ("command", reply["action"]):
                return  # a duplicate of a reply already recorded
            if reply["action"] in COMPENSATION_OF:
                event = ({"event": "done", "step": reply["action"]} if reply["ok"]
                         else {"event": "failed", "step": reply["action"], "reason": reply["reason"]})
            else:  # a compensation; they do not fail in this example
                event = {"event": "compensated", "step": reply["action"]}
            await record(saga, event)
            await advance(saga)
            # the reply is acked when this returns: after its transition is in the log

    return app


# ------------------------------------------------------------- the drivers


def make_orders(n: int, run: str) -> list[dict[str, Any]]:
    """n orders, every fifth out of stock, every fifth (another) declined,
    every seventh without an address: all three kinds of failure."""
    orders = []
    for i in range(n):
        orders.append({"saga": f"{run}-{i}", "sku": "unobtainium" if i % 5 == 1 else f"sku-{i % 3}",
                       "card": "declined" if i % 5 == 2 else "4242", "amount": 10 + i,
                       "address": "" if i % 7 == 3 else f"{i} Main Street"})
    return orders


async def place(tc: Client, orders: list[dict[str, Any]]) -> None:
    for order in orders:
        await tc.publish(f"{PREFIX}.order.placed", json=order, msg_id=f"{order['saga']}.order")


def summarize(log: list[dict[str, Any]], ledger: list[dict[str, Any]]) -> dict[str, Any]:
    """Per saga: its log events, its end(s) and the effects the services applied."""
    sagas: dict[str, dict[str, Any]] = defaultdict(lambda: {"events": [], "ends": [], "effects": []})
    for e in log:
        sagas[e["saga"]]["events"].append(e)
        if e["event"] == "ended":
            sagas[e["saga"]]["ends"].append(e["outcome"])
    for e in ledger:
        sagas[e["saga"]]["effects"].append(e["action"] + ("" if e["ok"] else "!"))
    return dict(sagas)


async def report(tc: Client) -> dict[str, Any]:
    summary = summarize(await replay(tc, LOG_STREAM), await replay(tc, LEDGER_STREAM))
    for saga, s in sorted(summary.items()):
        print(f"{saga:<14} {'/'.join(s['ends']) or 'RUNNING':<12} effects: {', '.join(s['effects'])}")
    return summary


async def demo(url: str, n: int) -> int:
    run = secrets.token_hex(3)
    orders = make_orders(n, run)
    apps = [service_app(url, svc) for svc in SERVICES] + [orchestrator_app(url)]
    async with tidings.connect(url) as tc:
        await declare(tc)
        ended = 0
        async with tc.stream_consume(LOG_STREAM, f"demo-{run}", start="latest") as log:
            async with anyio.create_task_group() as tg:
                for app in apps:
                    tg.start_soon(app.run)
                await place(tc, orders)
                with anyio.fail_after(60):
                    while ended < n:
                        m = await log.next(timeout=60)
                        e = m.json()
                        ended += e["event"] == "ended" and e["saga"].startswith(f"{run}-")
                        await m.ack()
                for app in apps:
                    app.stop()
        await tc.delete_group(LOG_STREAM, f"demo-{run}", force=True)
        summary = await report(tc)
    mine = {k: v for k, v in summary.items() if k.startswith(f"{run}-")}
    outcomes = [v["ends"][0] for v in mine.values()]
    print(f"{outcomes.count('COMPLETED')} completed, {outcomes.count('COMPENSATED')} compensated")
    return 0 if all(len(v["ends"]) == 1 for v in mine.values()) else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("role", choices=["demo", "services", "orchestrator", "place", "report"])
    ap.add_argument("--url", default=os.environ.get("TIDINGS_URL", DEFAULT_URL))
    ap.add_argument("--orders", type=int, default=20, help="orders to place (demo, place)")
    ap.add_argument("--run", default=None, help="saga id prefix for place (default: random)")
    ap.add_argument("--only", default=",".join(SERVICES), help="services to run (comma-separated)")
    ap.add_argument("--crash-after", type=int, default=0,
                    help="orchestrator, for tests: kill -9 itself after recording N transitions")
    ns = ap.parse_args(argv)

    async def go() -> int:
        if ns.role == "demo":
            return await demo(ns.url, ns.orders)
        if ns.role in ("services", "orchestrator"):
            apps = ([service_app(ns.url, s) for s in ns.only.split(",")] if ns.role == "services"
                    else [orchestrator_app(ns.url, crash_after=ns.crash_after)])
            print(f"{ns.role} running (stop with Ctrl-C)", flush=True)
            async with anyio.create_task_group() as tg:
                for app in apps:
                    tg.start_soon(app.run)
            return 0
        async with tidings.connect(ns.url) as tc:
            await declare(tc)
            if ns.role == "place":
                await place(tc, make_orders(ns.orders, ns.run or secrets.token_hex(3)))
                print(f"placed {ns.orders} orders")
            else:
                await report(tc)
        return 0

    return anyio.run(go)


if __name__ == "__main__":
    sys.exit(main())
