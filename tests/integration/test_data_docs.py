"""GX Data Docs as a reviewer opens them after `ftpipe run`, with no network: headless
Chromium (Debian's package, driven by Playwright) refuses every request that is not a local
file. The index lists both suites' validations of the run, styled by the vendored Bootstrap,
and a validation page four folders down finds the same assets."""
from __future__ import annotations

import shutil

import pytest


sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(CHROMIUM is None, reason="no chromium browser on PATH (apt-get install chromium)")]


def test_data_docs_work_offline_and_list_both_validations(trained):
    project = trained.project                     # after its first `ftpipe run` (read here, not changed)

    refused: list[str] = []
    errors: list[str] = []

    def offline(route) -> None:
        if route.request.url.startswith("file://"):
            route.continue_()
        else:
            refused.append(route.request.url)
            route.abort()

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.route("**/*", offline)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto((project / "data/reports/docs/index.html").as_uri(), wait_until="load")
        # the validation list is a bootstrap-table filled in by its script: one row per suite
        rows = page.locator(".tab-pane.active tbody tr")
        sync_api.expect(rows).to_have_count(2)
        suites = sorted(rows.nth(i).locator("td").last.inner_text().strip() for i in range(2))
        assert suites == ["cleaned", "raw_snapshot"]
        # Bootstrap's CSS applied: its .navbar is a flex box (a plain <nav> is a block)
        assert page.evaluate("getComputedStyle(document.querySelector('nav.navbar')).display") == "flex"
        # a click on its row opens the raw_snapshot validation, four folders down, styled as well
        page.locator(".tab-pane.active tbody tr", has_text="raw_snapshot").locator("td").nth(1).click()
        page.wait_for_url("**/validations/raw_snapshot/**", wait_until="load")
        sync_api.expect(page.locator("text=Evaluated Expectations")).to_be_visible()
        assert page.evaluate("getComputedStyle(document.querySelector('nav.navbar')).display") == "flex"
        browser.close()
    assert refused == [], f"Data Docs asked the network for {refused}"
    assert errors == []
