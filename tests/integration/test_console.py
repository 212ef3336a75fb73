"""The web console in a real browser (issue 16, item 4): headless Chromium from Debian's
``chromium`` package, driven by playwright (never ``playwright install``: nothing here
downloads a browser).

One broker with users; the page is signed in, watches queues fill and empty through the
tidings client, peeks, purges, redrives a dead-letter queue, shows the rate chart moving
while a publisher runs, lists schemas and bindings, refuses an action the user has no
permission for, and signs out.
Every wait is on the page's state (``wait_for_function`` on the DOM the live updates
write), never a sleep. A screenshot of each page goes to tests/artifacts/ (git-ignored).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.integration.consoletools import http_address
from tests.integration.securitytools import PASSWORDS, user, write_config
from tidings.client import connect

CHROMIUM = "/usr/bin/chromium"
SKIP_REASON = "console browser tests need Debian's chromium: apt-get install chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
WAIT_MS = 30_000  # a page condition may take this long on a loaded 2-core machine
WAIT = 30.0

try:
    from playwright.async_api import Page, async_playwright
except ImportError:  # pragma: no cover - the test extra installs it
    async_playwright = None  # type: ignore[assignment]

pytestmark = pytest.mark.skipif(async_playwright is None or not os.access(CHROMIUM, os.X_OK)
                                or shutil.which(CHROMIUM) is None, reason=SKIP_REASON)


async def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"console-{name}.png"), full_page=True)


async def depth_is(page: Page, queue: str, depth: int) -> None:
    await page.wait_for_function(
        "([q, d]) => { const c = document.querySelector(`tr[data-queue=\"${q}\"] .c-depth`);"
        " return c !== null && c.textContent === String(d); }", arg=[queue, depth], timeout=WAIT_MS)


async def sign_in(page: Page, base: str, name: str) -> None:
    await page.goto(base + "/")
    await page.wait_for_url(base + "/console/login")
    await page.fill("#user", name)
    await page.fill("#password", PASSWORDS[name])
    await page.click("#login-submit")
    await page.wait_for_url(base + "/")
    await page.wait_for_function("(n) => document.getElementById('whoami').textContent === n", arg=name,
                                 timeout=WAIT_MS)


async def confirm(page: Page) -> None:
    await page.wait_for_selector("#confirm[open]", timeout=WAIT_MS)
    await page.click("#confirm-ok")


async def dead_letter(tc: Any, queue: str, n: int) -> None:
    """Publish ``n`` messages to ``queue`` and reject each (max_deliveries=1: into its DLQ)."""
    for i in range(n):
        await tc.publish(queue, f"doomed-{i}", confirm=True)
    async with tc.consume(queue, prefetch=n) as deliveries:
        for _ in range(n):
            d = await deliveries.next(timeout=WAIT)
            await d.reject("poison", wait=True)


async def publisher(tc: Any, stop: anyio.Event) -> None:
    """Pub/sub traffic until ``stop``: what the rate chart should show."""
    while not stop.is_set():
        for _ in range(50):
            await tc.publish("a.rate", b"tick")
        await anyio.sleep(0.02)  # pacing, not synchronisation: leave the loop to the browser driver


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield b
        finally:
            await b.close()


async def test_console_in_a_browser(start_broker, tmp_path: Path, browser: Any) -> None:
    cfg = write_config(tmp_path / "console.toml", users={
        **user("admin", admin=[">"], consume=[">"], publish=[">"], subscribe=[">"]),
        # alice administers a.> but may not publish: redriving into a.work is publishing into it
        **user("alice", admin=["a.>"], consume=["a.>"]),
    })
    b = start_broker("--config", str(cfg), "--http-port", "0")
    host, port = http_address(b.extra_lines)
    base = f"http://{host}:{port}"
    ctx = await browser.new_context(viewport={"width": 1360, "height": 860})
    page = await ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    await page.goto(base + "/")
    await page.wait_for_url(base + "/console/login")
    await shot(page, "login")
    await sign_in(page, base, "admin")

    async with connect(b.url, user="admin", password=PASSWORDS["admin"], name="console-test") as tc:
        # a queue appears with its depth
        await tc.declare_queue("a.work", bind=["a.work"], max_deliveries=1)
        await tc.declare_queue("b.secret", bind=["b.secret"])
        for i in range(5):
            await tc.publish("a.work", f"job-{i}", confirm=True)
        await page.goto(base + "/#/queues")
        await depth_is(page, "a.work", 5)

        # peek: the stored messages, left in place
        await page.click('button[data-action="peek"][data-name="a.work"]')
        await page.wait_for_function("() => document.querySelectorAll('#peek-body .msg').length === 5",
                                     timeout=WAIT_MS)
        assert await page.text_content("#peek-body .msg pre") == "job-0"
        await shot(page, "peek")
        await page.click("#peek-close")
        await depth_is(page, "a.work", 5)

        # purge
        await page.click('button[data-action="purge"][data-name="a.work"]')
        await confirm(page)
        await depth_is(page, "a.work", 0)

        # redrive a dead-letter queue back to its source
        await dead_letter(tc, "a.work", 3)
        await depth_is(page, "a.work.dlq", 3)
        await shot(page, "queues")
        await page.click('button[data-action="redrive"][data-name="a.work.dlq"]')
        await confirm(page)
        await depth_is(page, "a.work.dlq", 0)
        await depth_is(page, "a.work", 3)

        # the rate chart moves while a publisher runs
        await page.goto(base + "/#/overview")
        await page.wait_for_function("() => +document.getElementById('chart-rates').dataset.points >= 1",
                                     timeout=WAIT_MS)
        before = int(await page.get_attribute("#chart-rates", "data-points") or 0)
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(publisher, tc, stop)
            try:
                await page.wait_for_function(
                    "(n) => { const c = document.getElementById('chart-rates');"
                    " return +c.dataset.points >= n + 2 && +c.dataset.lastIn > 0; }", arg=before,
                    timeout=WAIT_MS)
                await shot(page, "overview")
            finally:
                stop.set()
        assert float(await page.get_attribute("#chart-rates", "data-max-in") or 0) > 0

        # streams and connections
        await tc.declare_stream("a.events", partitions=3, bind=["a.events.>"])
        for i in range(6):
            await tc.publish(f"a.events.k{i}", f"e{i}", key=f"k{i}", confirm=True)
        async with tc.stream_consume("a.events", "billing") as _group:
            await page.goto(base + "/#/streams")
            await page.wait_for_function(
                "() => { const g = document.querySelector("
                "'[data-stream=\"a.events\"] tr[data-group=\"billing\"]');"
                " return g !== null && !g.textContent.includes('none'); }", timeout=WAIT_MS)
            await shot(page, "streams")
        await page.goto(base + "/#/connections")
        await page.wait_for_function("() => document.querySelector('#connections tbody').textContent"
                                     ".includes('console-test')", timeout=WAIT_MS)
        await shot(page, "connections")

        # schemas and bindings: a name is user input, shown as text (">" is not allowed in names)
        schema = 'a.<img/src=x/onerror=alert(1)//Order'
        await tc.declare_queue("a.bad")
        await tc.register_schema(schema, {"type": "object", "required": ["id"]})
        await tc.bind_schema("a.orders.>", schema, on_invalid="dead_letter", dead_letter_queue="a.bad")
        await tc.publish("a.orders.new", b'{"id": 1}')
        await page.click('#tabs a[data-page="schemas"]')
        await page.wait_for_function(
            "(n) => { const r = document.querySelector('#schemas tbody tr');"
            " return r !== null && r.dataset.schema === n && r.querySelector('.c-valid').textContent === '1'"
            " && document.querySelector('#bindings tbody').textContent.includes('a.orders.>'); }",
            arg=schema, timeout=WAIT_MS)
        assert await page.text_content("#schemas tbody td.name") == schema
        assert await page.query_selector("#page-schemas img") is None
        await shot(page, "schemas")

        # a second user: names outside its permissions are not shown, and an action it may
        # not do is refused (redriving into a.work needs publish on it)
        await dead_letter(tc, "a.work", 1)
        ctx2 = await browser.new_context(viewport={"width": 1360, "height": 860})
        page2 = await ctx2.new_page()
        await sign_in(page2, base, "alice")
        await page2.goto(base + "/#/queues")
        await depth_is(page2, "a.work.dlq", 1)
        assert await page2.query_selector('tr[data-queue="b.secret"]') is None
        await page2.click('button[data-action="redrive"][data-name="a.work.dlq"]')
        await confirm(page2)
        await page2.wait_for_selector(".toast.toast-error", timeout=WAIT_MS)
        assert "permission denied" in (await page2.text_content(".toast.toast-error") or "")
        await shot(page2, "refused")
        await depth_is(page2, "a.work.dlq", 1)
        await ctx2.close()

    # sign out: back to the sign-in page, and the console is closed to this browser
    await page.click("#signout")
    await page.wait_for_url(base + "/console/login")
    await page.goto(base + "/")
    await page.wait_for_url(base + "/console/login")
    await ctx.close()
    assert errors == []
