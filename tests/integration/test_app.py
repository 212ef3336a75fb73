"""tidings.App: handlers declared with decorators, typed payloads, hooks, and
the `tidings run MODULE:APP` runner's graceful shutdown on SIGTERM.

The runner tests start `python -m tidings run` as a subprocess on an app
module written to tmp_path; its handlers report through the broker (they
publish to `app.started` / `app.done`), so every wait is on a message.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import anyio
import pytest
from queuetools import WAIT, declare, headers_of

import tidings
from tidings.client import Client, Message
from tidings.client.consumer import Delivery
from tidings.client.errors import NotFoundError

EXIT_WAIT = 60.0  # seconds for the runner to exit: a bound for hangs on a busy machine


class Quote:
    """Stands in for a pydantic model: what the App looks for is model_validate_json / model_dump_json."""

    def __init__(self, sku: str) -> None:
        self.sku = sku

    @classmethod
    def model_validate_json(cls, data: bytes) -> Quote:
        return cls(json.loads(data)["sku"])

    def model_dump_json(self) -> str:
        return json.dumps({"sku": self.sku, "price": 42})


async def test_app_routes_typed_payloads_and_hooks(broker) -> None:
    app = tidings.App(broker.url)
    seen: dict[str, Any] = {}
    events: list[str] = []
    consumed, subscribed = anyio.Event(), anyio.Event()

    @app.on_startup
    async def hello() -> None:
        await declare(app.client, "app-orders")
        events.append("startup")

    @app.on_shutdown
    async def bye() -> None:
        events.append("shutdown")

    @app.consumer("app-orders", concurrency=2)
    async def order(body: dict) -> None:  # type: ignore[type-arg]
        seen["order"] = body
        consumed.set()

    @app.subscriber("app-events.>")
    async def event(text: str) -> None:
        seen["event"] = text
        subscribed.set()

    @app.subscriber("app-raw")
    async def raw(msg: Message) -> None:
        seen["raw"] = msg

    @app.responder("app-quote")
    async def quote(q: Quote) -> Quote:
        return Quote(q.sku.upper())

    @app.responder("app-fail")
    async def fail(body: bytes) -> bytes:
        raise ValueError("no price for that")

    async with anyio.create_task_group() as tg:
        tg.start_soon(app.run)
        async with tidings.connect(broker.url) as tc:
            await _until_serving(tc, "app-quote")
            await tc.publish("app-orders.eu", json.dumps({"id": 7}))
            await tc.publish("app-events.x", "héllo")
            reply = await tc.request("app-quote", json.dumps({"sku": "ab"}), timeout=WAIT)
            assert json.loads(reply.payload) == {"sku": "AB", "price": 42}
            assert reply.headers == {"content-type": "application/json"}
            err = await tc.request("app-fail", b"", timeout=WAIT)
            assert (err.payload, err.headers) == (b"", {"error": "ValueError: no price for that"})
            with anyio.fail_after(WAIT):
                await consumed.wait()
                await subscribed.wait()
        app.stop()
    assert seen["order"] == {"id": 7} and seen["event"] == "héllo"
    assert events == ["startup", "shutdown"]
    with pytest.raises(RuntimeError, match="while app.run"):
        app.client


async def _until_serving(tc: Client, subject: str) -> None:
    """The app has subscribed once a request to ``subject`` finds a responder."""
    with anyio.fail_after(WAIT):
        while True:
            try:
                await tc.request(subject, json.dumps({"sku": "probe"}), timeout=WAIT)
                return
            except tidings.NoRespondersError:
                await anyio.sleep(0.05)


async def test_undecodable_payload_is_dead_lettered_at_once(broker) -> None:
    app = tidings.App(broker.url)

    @app.consumer("app-typed")
    async def order(body: dict) -> None:  # type: ignore[type-arg]
        raise AssertionError("never called")

    async with tidings.connect(broker.url) as tc:
        await declare(tc, "app-typed", max_deliveries=5)
        await tc.publish("app-typed.a", b"{not json")
        async with anyio.create_task_group() as tg:
            tg.start_soon(app.run)
            async with tc.consume("app-typed.dlq") as dead:
                d: Delivery = await dead.next(timeout=WAIT)
            app.stop()
    h = headers_of(d)
    assert (h["tidings-dlq-reason"], h["tidings-delivery-count"]) == ("rejected", 1)
    assert h["tidings-last-error"].startswith("cannot decode the payload: JSONDecodeError: ")


async def test_a_missing_queue_fails_run_with_its_error(broker) -> None:
    app = tidings.App(broker.url)
    shut: list[bool] = []

    @app.consumer("app-nowhere")
    async def order(d: Delivery) -> None: ...

    @app.on_shutdown
    async def bye() -> None:
        shut.append(True)

    with anyio.fail_after(WAIT), pytest.raises(NotFoundError):
        await app.run()
    assert shut == [True]


def test_unsupported_annotation_is_refused_when_declared() -> None:
    app = tidings.App()
    with pytest.raises(TypeError, match="cannot decode a payload as"):
        @app.subscriber("x")
        async def h(n: int) -> None: ...


# ------------------------------------------------------------- the runner

APP_MODULE = """
import tidings

app = tidings.App({url!r})

@app.consumer("app-jobs", concurrency=2)
async def job(body: bytes) -> None:
    tc = app.client
    release = await tc.subscribe("app.release")
    await tc.publish("app.started", body)
    if body == b"forever":
        await release.next()  # no release comes: cut short by the grace period
    else:
        await release.next(timeout=120)
    await tc.publish("app.done", body)
"""


def _start_runner(broker: Any, tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    (tmp_path / "jobsapp.py").write_text(textwrap.dedent(APP_MODULE.format(url=broker.url)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    return subprocess.Popen([sys.executable, "-m", "tidings", "run", "jobsapp:app", *args], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _reap(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def _lines_until(proc: subprocess.Popen[str], text: str) -> str:
    """stderr up to and including the first line holding ``text`` (the runner's own notice)."""
    assert proc.stderr is not None
    seen = ""
    for line in proc.stderr:
        seen += line
        if text in line:
            return seen
    raise AssertionError(f"the runner ended without saying {text!r}:\n{seen}")


async def _exit_of(proc: subprocess.Popen[str]) -> tuple[int, str]:
    code = await anyio.to_thread.run_sync(lambda: proc.wait(EXIT_WAIT))
    assert proc.stderr is not None
    return code, proc.stderr.read()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_signal_lets_the_running_handler_finish_and_exits_0(broker, tmp_path: Path, sig: int) -> None:
    async with tidings.connect(broker.url) as tc:
        await declare(tc, "app-jobs")
        started = await tc.subscribe("app.started")
        done = await tc.subscribe("app.done")
        proc = _start_runner(broker, tmp_path)
        try:
            await tc.publish("app-jobs.a", b"job-1")
            assert (await started.next(timeout=EXIT_WAIT)).payload == b"job-1"
            proc.send_signal(sig)
            # Let the signal be handled while the handler is in flight: the runner says so on stderr.
            before = await anyio.to_thread.run_sync(_lines_until, proc, f"{signal.Signals(sig).name}: stopping")
            await tc.publish("app.release", b"go")
            assert (await done.next(timeout=WAIT)).payload == b"job-1"
            code, err = await _exit_of(proc)
            err = before + err
        finally:
            _reap(proc)
        assert code == 0, err
        assert "Traceback" not in err, err
        info = await tc.queue_info("app-jobs")
        assert (info["depth"], info["in_flight"]) == (0, 0)


async def test_sigterm_past_the_grace_period_nacks_the_rest(broker, tmp_path: Path) -> None:
    async with tidings.connect(broker.url) as tc:
        await declare(tc, "app-jobs")
        started = await tc.subscribe("app.started")
        proc = _start_runner(broker, tmp_path, "--grace", "0.2")
        try:
            await tc.publish("app-jobs.a", b"forever")
            assert (await started.next(timeout=EXIT_WAIT)).payload == b"forever"
            proc.send_signal(signal.SIGTERM)
            code, err = await _exit_of(proc)
        finally:
            _reap(proc)
        assert code == 0, err
        assert "Traceback" not in err, err
        async with tc.consume("app-jobs") as again:
            d = await again.next(timeout=WAIT)
            assert (d.payload, d.delivery_count) == (b"forever", 2)
            assert d.redelivered
            await d.ack()


def test_run_help_names_the_apps_default_grace() -> None:
    """`tidings run --help` spells out --grace's default without importing the client library
    (cli/run.py GRACE_HELP); it must stay App.run's DEFAULT_GRACE."""
    from tidings.cli.run import GRACE_HELP
    from tidings.client.app import DEFAULT_GRACE

    assert GRACE_HELP.endswith(f"(default {DEFAULT_GRACE:g})")


def test_run_with_a_bad_target_is_one_line(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "tidings", "run", "no_such_module_xyz:app"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=EXIT_WAIT)
    assert out.returncode == 2
    assert out.stderr.strip().startswith("tidings: cannot import 'no_such_module_xyz'"), out.stderr
    assert "Traceback" not in out.stderr


def test_run_against_no_broker_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "emptyapp.py").write_text("import tidings\napp = tidings.App('tidings://127.0.0.1:1')\n")
    out = subprocess.run([sys.executable, "-m", "tidings", "run", "emptyapp"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=EXIT_WAIT)
    assert out.returncode == 1, out.stderr
    assert out.stderr.strip().startswith("tidings: "), out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
