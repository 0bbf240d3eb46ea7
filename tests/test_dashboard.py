"""The auditor's dashboard in headless Chromium (Debian's chromium + chromium-driver, via selenium):
it loads its bundled chart library (no CDN), draws the charts, and shows the numbers the API gives."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from devtools.traffic import EventFactory
from devtools.webhook import WebhookReceiver
from tests.helpers import post, tenant_block, wait_for
from tests.test_auditor import audit_summary


def chromium() -> webdriver.Chrome:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not binary or not driver:
        pytest.fail("chromium and chromium-driver are needed (make system-deps installs them)")
    options = Options()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


def shown(browser: webdriver.Chrome, table: str, key: str, testid: str) -> str:
    """The cell's text, read in one script: the page redraws its tables every refresh, so an element found
    in one call can be gone (stale) by the next."""
    cell = f'#{table} tr[data-key="{key}"] td[data-testid="{testid}"]'
    text = browser.execute_script("const c = document.querySelector(arguments[0]); return c && c.innerText", cell)
    assert text is not None, f"no cell {cell}"
    return text.strip()


def pct(value: float | None) -> str:
    return "\u2013" if value is None else f"{value * 100:.2f}%"  # the page shows an en dash for "none yet"


async def test_dashboard_shows_what_the_api_says(tmp_path, namespace, port_base, settings_for, start_pipeline):
    hooks = {name: WebhookReceiver(port=port_base + 18 + i) for i, name in enumerate(("hook", "slow"))}
    for hook in hooks.values():
        await hook.start()
    hooks["slow"].delay_s = 1.2  # past the 1 s SLA: this sink misses it
    config = tmp_path / "hifi.yaml"
    config.write_text(
        "tenants:\n"
        + tenant_block("acme", "k", ["hook", "slow"])
        + "sinks:\n"
        + "".join(f'  {n}: {{type: webhook, url: "http://127.0.0.1:{h.port}/in"}}\n' for n, h in hooks.items())
        + "audit: {bucket_s: 2, settle_s: 4, canary_interval_s: 0}\n"
    )
    pipeline = await start_pipeline(settings_for(config), auditor=True)
    browser = await asyncio.to_thread(chromium)
    try:
        factory = EventFactory(producer_id=namespace)
        for _ in range(5):
            assert (await post(pipeline.collector_url, "k", [factory.make() for _ in range(20)]))[0] == 200
        await wait_for(lambda: all(len(h.received) >= 100 for h in hooks.values()), 60, "delivery", pipeline)

        def settled() -> bool:
            sinks = audit_summary(pipeline)["sinks"]
            return all(sinks.get(s, {}).get("acme", {}).get("delivered") == 100 for s in hooks)

        await wait_for(settled, 30, "receipts of both sinks", pipeline)
        api = await asyncio.to_thread(audit_summary, pipeline)

        url = pipeline.services["auditor"].url("/dashboard")
        await asyncio.to_thread(browser.get, url)
        deadline = time.monotonic() + 20
        while browser.execute_script("return document.body.dataset.loaded") != "true":
            assert time.monotonic() < deadline, browser.page_source[:2000]
            await asyncio.sleep(0.2)
        await asyncio.sleep(2.5)  # a second refresh, so the charts have two points
        # The chart library was served by the auditor itself, and drew both charts.
        assert browser.execute_script("return typeof uPlot") == "function"
        assert len(browser.find_elements(By.CSS_SELECTOR, ".uplot canvas")) == 2
        rendered: dict[str, Any] = browser.execute_script("return window.lastSummary")
        for sink in hooks:
            mine, theirs = rendered["sinks"][sink]["acme"], api["sinks"][sink]["acme"]
            for field in ("delivered", "lost", "on_time_5m", "lag_1m"):
                assert mine[field] == theirs[field], (sink, field, mine[field], theirs[field])
            key = f"{sink}/acme"
            assert shown(browser, "sinks", key, "delivered") == str(theirs["delivered"])
            assert shown(browser, "sinks", key, "p50") == str(theirs["lag_1m"]["p50_ms"])
            assert shown(browser, "sinks", key, "p95") == str(theirs["lag_1m"]["p95_ms"])
            assert shown(browser, "sinks", key, "p99") == str(theirs["lag_1m"]["p99_ms"])
            assert shown(browser, "sinks", key, "ontime-5m") == pct(theirs["on_time_5m"])
            assert shown(browser, "sinks", key, "lost") == str(theirs["lost"])
        assert api["sinks"]["slow"]["acme"]["on_time_5m"] == 0.0  # every event 1.2 s late
        slow_cell = '#sinks tr[data-key="slow/acme"] td[data-testid="ontime-5m"]'
        assert "bad" in browser.execute_script("return document.querySelector(arguments[0]).className", slow_cell)
        for stage, size in api["dlq"].items():
            assert shown(browser, "dlq", stage, "dlq") == str(size)
        screenshot = Path(os.environ.get("HIFI_DASHBOARD_SCREENSHOT", tmp_path / "dashboard.png"))
        await asyncio.to_thread(browser.save_screenshot, str(screenshot))
        assert await asyncio.to_thread(os.path.getsize, screenshot) > 10_000
        assert set(rendered["sinks"]) == set(api["sinks"]) == set(hooks)  # it drew every sink the API has
    finally:
        await asyncio.to_thread(browser.quit)
        for hook in hooks.values():
            await hook.stop()
