"""examples/saga.py: every saga ends exactly once, COMPLETED or COMPENSATED,
with each step and each compensation applied exactly once, through injected
failures and kill -9s of the orchestrator process (issue 12, item 6).

The services and the orchestrator run as subprocesses of the example, as a
user would run them. The test follows the orchestrator's log stream with a
consumer group of its own (it waits on what the log says, never on time):

1. only the inventory service runs: every saga gets its inventory reserved
   (or ends, out of stock) and then waits for payment; the orchestrator is
   killed (-9) there, in the middle of every unfinished saga; every reserve
   command is then delivered once more (a duplicate the service must not
   apply);
2. payment starts, the orchestrator is started again; once it has recorded
   more transitions it is killed again, wherever it is;
3. shipping starts, and a third orchestrator kills itself right after
   recording a transition, before acting on it (the one moment only the
   log knows what to do next);
4. a fourth orchestrator finishes the job.

Then the log and the services' ledger must tell, per saga, exactly the
expected story: one end, the steps done once each, the compensations of the
steps done once each, in reverse order.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import anyio

from tidings.client import connect

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "saga.py"
ORDERS = 30
WAIT = 120.0  # generous: the whole run takes seconds, but 8 helpers share 2 cores


def load_example() -> Any:
    spec = importlib.util.spec_from_file_location("saga_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


saga = load_example()


def expected_story(order: dict[str, Any]) -> tuple[list[str], list[str], str]:
    """(log events, ledger effects, outcome) of one order, from its fields alone."""
    if order["sku"] == "unobtainium":
        return ["started", "failed:reserve", "ended"], ["reserve!"], "COMPENSATED"
    if order["card"] == "declined":
        return (["started", "done:reserve", "failed:charge", "compensated:release", "ended"],
                ["reserve", "charge!", "release"], "COMPENSATED")
    if not order["address"]:
        return (["started", "done:reserve", "done:charge", "failed:ship", "compensated:refund",
                 "compensated:release", "ended"],
                ["reserve", "charge", "ship!", "refund", "release"], "COMPENSATED")
    return (["started", "done:reserve", "done:charge", "done:ship", "ended"],
            ["reserve", "charge", "ship"], "COMPLETED")


class Roles:
    """The example's processes; kills and stops only what it started."""

    def __init__(self, url: str, logdir: Path) -> None:
        self.url = url
        self.logdir = logdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        name = "-".join(a.strip("-") for a in args)
        out = open(self.logdir / f"{name}-{len(self.procs)}.log", "wb")
        p = subprocess.Popen([sys.executable, str(EXAMPLE), *args, "--url", self.url],
                             stdout=out, stderr=subprocess.STDOUT)
        out.close()
        self.procs.append(p)
        return p

    async def kill(self, p: subprocess.Popen[bytes]) -> None:
        p.kill()  # SIGKILL: no shutdown, no acks, nothing flushed
        await anyio.to_thread.run_sync(p.wait)  # a SIGKILLed process ends at once

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(30)

    def output(self) -> str:
        logs = sorted(self.logdir.glob("*.log"))
        return "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')}" for f in logs)


async def test_saga_with_failures_and_orchestrator_kills(broker: Any, tmp_path: Path) -> None:
    orders = saga.make_orders(ORDERS, "o")
    expected = {o["saga"]: expected_story(o) for o in orders}
    kinds = Counter(out for _e, _f, out in expected.values())
    assert kinds["COMPLETED"] >= 5 and kinds["COMPENSATED"] >= 10  # every kind of failure is in the mix
    roles = Roles(broker.url, tmp_path)
    log: dict[str, list[dict[str, Any]]] = {o["saga"]: [] for o in orders}
    seen = 0

    async with connect(broker.url) as tc:
        await saga.declare(tc)

        async with tc.stream_consume(saga.LOG_STREAM, "test-observer", start="earliest") as events:

            async def observe_until(done: Any) -> None:
                """Read log events as they are committed until done() holds."""
                nonlocal seen
                with anyio.fail_after(WAIT):
                    while not done():
                        m = await events.next(timeout=WAIT)
                        e = m.json()
                        log[e["saga"]].append(e)
                        seen += 1
                        await m.ack()

            def kinds_of(s: str) -> set[str]:
                return {f"{e['event']}:{e.get('step', '')}" for e in log[s]}

            try:
                # 1. inventory only: every saga reserves (or ends), then waits for payment
                roles.start("services", "--only", "inventory")
                orchestrator = roles.start("orchestrator")
                await saga.place(tc, orders)
                await observe_until(lambda: all("done:reserve" in kinds_of(s) or "ended:" in kinds_of(s)
                                                for s in log))
                await roles.kill(orchestrator)
                unfinished = [s for s in log if "ended:" not in kinds_of(s)]
                assert len(unfinished) == sum(1 for o in orders if o["sku"] != "unobtainium")

                # a reserve command delivered twice (a new msg_id, so the broker stores it): the
                # inventory service must answer it from its records, not reserve again
                by_id = {o["saga"]: o for o in orders}
                for s in unfinished:
                    await tc.publish(f"{saga.PREFIX}.inventory.reserve", msg_id=f"{s}.reserve.again",
                                     json={"saga": s, "action": "reserve", "order": by_id[s]})

                # 2. payment comes up; a new orchestrator resumes and is killed wherever it is (there
                # are at least 24 charges, 6 releases and 6 ends to record, so 10 more events come)
                roles.start("services", "--only", "payment")
                orchestrator = roles.start("orchestrator")
                second = len(roles.procs) - 1
                target = seen + 10
                await observe_until(lambda: seen >= target)
                await roles.kill(orchestrator)

                # 3. shipping comes up (18 sagas still need it: this orchestrator has work for
                # sure) and the next orchestrator dies at the worst moment: right after recording
                # a transition, before acting on it (it kills itself, -9, after its 5th); the one
                # after that must act on it from the log
                roles.start("services", "--only", "shipping")
                suicidal = roles.start("orchestrator", "--crash-after", "5")
                with anyio.fail_after(WAIT):
                    await anyio.to_thread.run_sync(suicidal.wait)
                assert suicidal.returncode == -9
                roles.start("orchestrator")
                await observe_until(lambda: all("ended:" in kinds_of(s) for s in log))

                # let every duplicate in flight settle: the work queues drain
                with anyio.fail_after(WAIT):
                    while True:
                        infos = [await tc.queue_info(f"{saga.PREFIX}-{q}")
                                 for q in (*saga.SERVICES, "orders", "replies")]
                        if all(i["depth"] == 0 and i["in_flight"] == 0 for i in infos):
                            break
                        await anyio.sleep(0.05)
                await tc.flush()
            except BaseException:
                roles.stop_all()
                print(roles.output())
                raise
            roles.stop_all()
            resumed = (tmp_path / f"orchestrator-{second}.log").read_text()
            assert f"resuming {len(unfinished)}" in resumed, resumed  # it did take over the unfinished sagas

        # the stored log, not only what the observer saw
        stored = saga.summarize(await saga.replay(tc, saga.LOG_STREAM),
                                await saga.replay(tc, saga.LEDGER_STREAM))
        dlqs = [await tc.queue_info(f"{saga.PREFIX}-{q}.dlq") for q in (*saga.SERVICES, "orders", "replies")]

    assert set(stored) == set(expected)
    for sid, (events, effects, outcome) in expected.items():
        got = stored[sid]
        assert got["ends"] == [outcome], (sid, got["ends"])  # ended exactly once, the right way
        story = [f"{e['event']}:{e['step']}" if "step" in e else e["event"] for e in got["events"]]
        assert story == events, (sid, story)  # each step and compensation recorded once, in order
        assert [e["seq"] for e in got["events"]] == list(range(len(events)))
        assert got["effects"] == effects, (sid, got["effects"])  # applied once each, compensations in reverse
    assert all(d["depth"] == 0 for d in dlqs)
    effects = Counter(eff for s in stored.values() for eff in s["effects"])
    declined, no_address = kinds_of_failure(orders)
    assert effects["release"] == declined + no_address and effects["refund"] == no_address


def kinds_of_failure(orders: list[dict[str, Any]]) -> tuple[int, int]:
    declined = sum(1 for o in orders if o["sku"] != "unobtainium" and o["card"] == "declined")
    no_address = sum(1 for o in orders if o["sku"] != "unobtainium" and o["card"] != "declined"
                     and not o["address"])
    return declined, no_address
