"""The mesh dashboard (mesh/dashboard.html) in headless Chromium.

Driven by the PyPI ``playwright`` package against Debian's ``chromium`` (found on PATH, no
browser download). The server behind the page is the ``dashboard_server`` fixture: for now the
stub in dashboard_stub.py; it only has to offer ``.url``, ``.token``, ``.connect(instance_id,
agent_type)`` and ``.disconnect(instance_id)``, so the real mesh with a real agent can replace it.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator

import pytest

pytest.importorskip("playwright.sync_api", reason="playwright not installed (dev extra)")

from dashboard_stub import DashboardStub
from playwright.sync_api import Browser, Locator, Page, expect, sync_playwright

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no `chromium` on PATH (CI installs Debian's chromium package)"
)

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
UPDATE_MS = 1000  # an event must be on screen within this
LOAD_MS = 5000  # first load and stream set-up
HOSTILE = "<img src=x onerror=window.__xss=1>"


@pytest.fixture
def dashboard_server() -> Iterator[DashboardStub]:
    stub = DashboardStub()
    try:
        yield stub
    finally:
        stub.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


class Watched:
    """A page plus what it complained about (uncaught errors, CSP refusals)."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.errors: list[str] = []
        self.csp: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on("console", self._console)

    def _console(self, msg: object) -> None:
        text = getattr(msg, "text", "")
        if "Content Security Policy" in text:
            self.csp.append(text)

    def assert_clean(self) -> None:
        assert self.errors == []
        assert self.csp == []


@pytest.fixture
def watched(browser: Browser, dashboard_server: DashboardStub) -> Iterator[Watched]:
    context = browser.new_context()
    context.set_default_timeout(LOAD_MS)
    try:
        yield Watched(context.new_page())
    finally:
        context.close()


def open_dashboard(w: Watched, server: DashboardStub, token: str | None = None) -> Page:
    page = w.page
    page.goto(f"{server.url}/dashboard#token={token or server.token}")
    return page


def expect_live(page: Page) -> None:
    expect(page.locator("#status-line")).to_have_text("live", timeout=LOAD_MS)


def row(page: Page, instance_id: str) -> Locator:
    return page.locator("#instances-body tr[data-instance-id]").filter(
        has=page.get_by_role("cell", name=instance_id, exact=True)
    )


def test_connect_and_disconnect_show_within_a_second(
    watched: Watched, dashboard_server: DashboardStub
) -> None:
    page = open_dashboard(watched, dashboard_server)
    expect_live(page)
    # The token left the address bar and lives in sessionStorage only.
    assert "token" not in page.url
    stored = page.evaluate("() => sessionStorage.getItem('svantic.dashboard.token')")
    assert stored == dashboard_server.token

    dashboard_server.connect("i-1", "echo")
    r = page.locator('#instances-body tr[data-instance-id="i-1"]')
    status = r.locator('td[data-col="connection_status"]')
    expect(status).to_have_text("online", timeout=UPDATE_MS)
    expect(status).to_have_class(re.compile(r"\bstatus-online\b"))
    expect(r.locator('td[data-col="agent_type"]')).to_have_text("echo")
    expect(r.locator('td[data-col="routing_status"]')).to_have_text("available")

    dashboard_server.disconnect("i-1")
    expect(status).to_have_text("offline", timeout=UPDATE_MS)
    expect(status).to_have_class(re.compile(r"\bstatus-offline\b"))

    events = page.locator("#events li")
    expect(events.first).to_have_attribute("data-event-type", "agent.disconnected")
    expect(events).to_have_count(2)
    assert all("token" not in p for p in dashboard_server.request_paths)
    watched.assert_clean()


def test_totals_follow_the_fleet(watched: Watched, dashboard_server: DashboardStub) -> None:
    page = open_dashboard(watched, dashboard_server)
    expect_live(page)

    def stat(key: str) -> Locator:
        return page.locator(f'#totals [data-stat="{key}"]')

    expect(stat("total")).to_have_text("0")
    dashboard_server.connect("i-a", "echo")
    dashboard_server.connect("i-b", "billing")
    expect(stat("total")).to_have_text("2", timeout=UPDATE_MS)
    expect(stat("by_connection_status.online")).to_have_text("2", timeout=UPDATE_MS)
    expect(stat("by_deployment_mode.connected")).to_have_text("2")
    expect(stat("by_deployment_mode.hosted")).to_have_text("0")
    expect(stat("by_transport.ws")).to_have_text("2")

    dashboard_server.disconnect("i-b")
    expect(stat("by_connection_status.offline")).to_have_text("1", timeout=UPDATE_MS)
    expect(stat("by_connection_status.online")).to_have_text("1")
    expect(stat("total")).to_have_text("2")
    expect(page.locator("#instances-body tr[data-instance-id]")).to_have_count(2)
    watched.assert_clean()


def test_tenant_strings_are_text_not_markup(
    watched: Watched, dashboard_server: DashboardStub
) -> None:
    page = open_dashboard(watched, dashboard_server)
    expect_live(page)
    dashboard_server.connect(HOSTILE, "<b>echo</b>")

    r = page.locator("#instances-body tr[data-instance-id]")
    expect(r).to_have_count(1, timeout=UPDATE_MS)
    expect(r).to_have_attribute("data-instance-id", HOSTILE)
    expect(r.locator('td[data-col="instance_id"]')).to_have_text(HOSTILE)
    expect(r.locator('td[data-col="agent_type"]')).to_have_text("<b>echo</b>")
    expect(page.locator("#events li").first).to_contain_text(HOSTILE)
    assert page.locator("img, b").count() == 0

    # Positive control, for a bounded wait instead of a sleep: the same markup put through
    # innerHTML now does fire (CSP allows inline handlers) — so had the page rendered it
    # earlier, its handler would have run by the time this one has.
    page.evaluate(
        "() => { document.createElement('div').innerHTML ="
        " '<img src=x onerror=window.__canary=1>'; }"
    )
    page.wait_for_function("() => window.__canary === 1", timeout=LOAD_MS)
    assert page.evaluate("() => typeof window.__xss") == "undefined"
    assert watched.errors == []


def test_bad_token_is_rejected_and_the_form_recovers(
    watched: Watched, dashboard_server: DashboardStub
) -> None:
    page = open_dashboard(watched, dashboard_server, token="not-the-token")
    expect(page.locator("#token-message")).to_have_text("token rejected")
    expect(page.locator("#status-line")).to_have_text("token rejected")
    expect(page.locator("#token-form")).to_be_visible()
    expect(page.locator("#main")).to_be_hidden()
    assert "token" not in page.url
    assert page.evaluate("() => sessionStorage.getItem('svantic.dashboard.token')") is None

    page.locator("#token-input").fill(dashboard_server.token)
    page.locator("#token-form button[type=submit]").click()
    expect_live(page)
    expect(page.locator("#token-form")).to_be_hidden()
    expect(page.locator("#instances-body td.empty")).to_have_text("no instances")
    dashboard_server.connect("i-9", "echo")
    expect(row(page, "i-9")).to_have_count(1, timeout=UPDATE_MS)
    assert all("token" not in p for p in dashboard_server.request_paths)
    watched.assert_clean()


def test_stream_reconnects_after_it_ends(watched: Watched, dashboard_server: DashboardStub) -> None:
    # Stub-only: the real mesh ends the stream on restart; here the stub hangs up.
    page = open_dashboard(watched, dashboard_server)
    expect_live(page)
    dashboard_server.drop_streams()
    expect(page.locator("#status-line")).to_contain_text("reconnecting", timeout=LOAD_MS)
    expect_live(page)  # first retry after 1 s
    dashboard_server.connect("i-late", "echo")
    expect(row(page, "i-late")).to_have_count(1, timeout=UPDATE_MS)
    watched.assert_clean()
