"""The web console in a real browser: Debian's Chromium, driven by Playwright.

One scenario on a fresh PostgreSQL database filled by the demo, with ``sagactl console``
run as an operator runs it: search by a business key and land on that saga, whose
timeline shows its steps and then their compensations in reverse order; follow a
running saga until it completes, with no reload; see an input holding markup shown as
text, with no element made of it and no dialog. Every wait is on a condition.

With ``SAGA_SCREENSHOT=1`` it saves the compensated saga's page as
docs/console-saga.png (the README's picture; CI leaves the tree alone).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from playwright.async_api import Dialog, Page, async_playwright, expect
from rich.console import Console

from engine.cli.demo import example_system, load_scenario, run_demo
from engine.embedded import EmbeddedSystem
from engine.settings import load_settings
from engine.states import SagaStatus
from tests.e2e import fresh_database, service_url
from workers import ledger
from workers.demo import UNDELIVERABLE

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "docs" / "console-saga.png"
#: Headless, with the network closed: nothing reaches out, a fresh profile (Playwright
#: makes one per launch).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
#: Generous bounds for a busy 2-core machine; only failure limits.
WAIT_MS = 30_000
TRACE_URL = "http://traces.invalid/trace/{trace_id}"

#: The business key the operator searches by: one saga has it.
KEY = "ada-4711"
XSS = "<img src=x onerror=alert(1)><script>alert(2)</script>"


def order(customer: str, address: str = "1 Main Street, Springfield") -> dict[str, object]:
    return {
        "customer_id": customer,
        "sku": "widget",
        "quantity": 1,
        "amount_cents": 500,
        "address": address,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def tail(log: Path) -> str:
    """The end of the console's output, to explain a failure."""
    return log.read_text(errors="replace")[-4000:]


@contextlib.asynccontextmanager
async def console(database_url: str, log: Path) -> AsyncIterator[str]:
    """``sagactl console`` on a free port of the loopback, until the block ends; yields
    its base URL once it answers."""
    port = free_port()
    env = {
        **os.environ,
        "SAGA_DATABASE_URL": database_url,
        "SAGA_CONSOLE_TRACE_URL": TRACE_URL,
    }
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "engine.cli",
            "console",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=out,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient() as http:
            deadline = asyncio.get_running_loop().time() + WAIT_MS / 1000
            while True:
                assert proc.returncode is None, f"sagactl console exited: {tail(log)}"
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get(f"{base}/sagas", timeout=5)).status_code == 200:
                        break
                assert asyncio.get_running_loop().time() < deadline, tail(log)
                await asyncio.sleep(0.1)
        yield base
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def elements_made_of_markup(page: Page) -> int:
    """How many elements on the page the test's markup (``XSS``) made."""
    made: int = await page.evaluate(
        """() => document.querySelectorAll('img[src="x"]').length
            + [...document.scripts].filter(s => s.textContent.includes("alert(")).length"""
    )
    return made


async def timeline(page: Page) -> list[tuple[str, str]]:
    """The saga page's bars in order, as (kind, step)."""
    bars: list[list[str]] = await page.locator("#timeline .bar").evaluate_all(
        "bars => bars.map(b => [b.dataset.kind, b.dataset.step])"
    )
    return [(kind, step) for kind, step in bars]


@contextlib.asynccontextmanager
async def example(url: str) -> AsyncIterator[EmbeddedSystem]:
    """The database at ``url`` filled by the demo, then the example running on it (traced,
    as the daemons are) for the sagas the test starts."""
    settings = load_settings(database_url=url)
    demo = await run_demo(
        settings, orders=20, seed=13, timeout=60, console=Console(quiet=True), quiet=True
    )
    assert demo.ok, demo
    system = example_system(settings, load_scenario())
    with system.wiring.traced("test-console-browser"):
        async with system:
            yield system


@contextlib.asynccontextmanager
async def chromium_page(executable: str) -> AsyncIterator[tuple[Page, list[str]]]:
    """A page of a fresh headless Chromium at a fixed size, and the messages of every
    dialog a script on it opened (each dismissed)."""
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1200, "height": 800})
            page.set_default_timeout(WAIT_MS)
            expect.set_options(timeout=WAIT_MS)
            dialogs: list[str] = []

            async def refuse(dialog: Dialog) -> None:
                dialogs.append(dialog.message)
                await dialog.dismiss()

            page.on("dialog", refuse)
            yield page, dialogs
        finally:
            await browser.close()


async def test_console_in_chromium(tmp_path: Path) -> None:
    chromium = service_url("SAGA_TEST_CHROMIUM")
    postgres = service_url("SAGA_TEST_POSTGRES_URL")
    async with fresh_database(postgres) as url, example(url) as system:
        client = system.client
        await ledger.restock(system.database, stock_by_sku={}, balances={KEY: 10**6})
        # Charged, then undeliverable: refunded, then released.
        undone = await client.start("place_order", order(KEY, UNDELIVERABLE))
        # Markup in the input and, quoted by the failure, in the history.
        xss = await client.start("place_order", order("bob", f"{XSS} {UNDELIVERABLE}"))
        # Waits for a manager's approval: the test gives it.
        running = await client.start("large_order", order("alice"))
        undone_detail = await client.wait(undone, timeout=60)
        assert undone_detail.status is SagaStatus.COMPENSATED
        assert undone_detail.trace_id
        assert (await client.wait(xss, timeout=60)).status is SagaStatus.COMPENSATED

        async with (
            console(url, tmp_path / "console.log") as base,
            chromium_page(chromium) as (page, dialogs),
        ):
            await search_by_key(page, base, undone)
            await compensated_timeline(page, undone_detail.trace_id)
            await follow_running(page, base, running, system)
            await markup_shown_as_text(page, base, xss)
            assert dialogs == [], f"a page ran script from a saga: {dialogs}"


async def search_by_key(page: Page, base: str, saga_id: str) -> None:
    """From the list, the search form finds the one saga with the key."""
    await page.goto(base)
    await expect(page).to_have_url(re.compile(r"/sagas\b"))
    await page.locator("form#search input[name=q]").fill(f"customer_id={KEY}")
    await page.locator("form#search input[name=q]").press("Enter")
    saga_page = re.compile(rf"/sagas/{saga_id}$")
    await page.wait_for_url(re.compile(rf"/sagas/{saga_id}$|[?&]q="))
    if not saga_page.search(page.url):
        # A list of matches: exactly the one saga, which opens it.
        rows = page.locator("tr[data-saga-id]")
        await expect(rows).to_have_count(1)
        await expect(page.locator(f'tr[data-saga-id="{saga_id}"]')).to_have_count(1)
        await page.locator(f'tr[data-saga-id="{saga_id}"] a').first.click()
    await expect(page).to_have_url(saga_page)


async def compensated_timeline(page: Page, trace_id: str) -> None:
    """The steps as they ran, then the compensations of the completed ones, in reverse."""
    await expect(page.locator("#status")).to_have_text("compensated")
    assert await timeline(page) == [
        ("forward", "reserve_inventory"),
        ("forward", "charge_payment"),
        ("forward", "create_shipment"),
        ("compensation", "charge_payment"),
        ("compensation", "reserve_inventory"),
    ]
    assert await page.locator("#timeline .bar.pivot").count() == 0  # the order has no pivot
    await expect(page.locator("a#trace")).to_have_attribute(
        "href", TRACE_URL.format(trace_id=trace_id)
    )
    if os.environ.get("SAGA_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(exist_ok=True)
        await page.screenshot(path=SCREENSHOT)


async def follow_running(page: Page, base: str, saga_id: str, system: EmbeddedSystem) -> None:
    """A running saga's page follows it to its end by itself."""
    await page.goto(f"{base}/sagas/{saga_id}")
    await expect(page.locator("#status")).to_have_text("running")
    await expect(page.locator('#timeline .bar[data-step="create_shipment"]')).to_have_count(0)
    await page.evaluate("window.notReloaded = true")

    await system.client.signal(
        saga_id, "manager_approval", {"approved": True, "by": "dana"}, actor="test"
    )

    await expect(page.locator("#status")).to_have_text("completed")
    await expect(page.locator('#timeline .bar[data-step="create_shipment"]')).to_have_count(1)
    assert await page.evaluate("window.notReloaded === true"), "the page was reloaded"


async def markup_shown_as_text(page: Page, base: str, saga_id: str) -> None:
    """Markup from a saga is text: shown literally, no element made of it."""
    # In the list of the newest sagas, whose last errors quote it.
    await page.goto(f"{base}/sagas")
    await expect(page.locator(f'tr[data-saga-id="{saga_id}"]')).to_contain_text(XSS)
    assert await elements_made_of_markup(page) == 0

    await page.goto(f"{base}/sagas/{saga_id}")
    await expect(page.locator("#status")).to_have_text("compensated")
    await expect(page.locator("#input")).to_contain_text(XSS)
    await expect(page.locator("#history")).to_contain_text(XSS)
    assert await elements_made_of_markup(page) == 0
