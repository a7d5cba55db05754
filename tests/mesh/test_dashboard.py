"""The mesh dashboard (mesh/dashboard.html) in headless Chromium.

Driven by the PyPI ``playwright`` package against Debian's ``chromium`` (found on PATH, no
browser download). The server behind the page is the ``dashboard_server`` fixture, which offers
``.url``, ``.token``, ``.connect(instance_id, agent_type)`` and ``.disconnect(instance_id)``:

* ``mesh``: the real ``svantic mesh`` in a process of its own on 127.0.0.1 (one per module, a
  tenant of its own per test), and real agents (agent_process.py) that register, connect, and
  go away when their stdin closes. Chromium trusts the mesh's certificate by its SPKI pin.
* ``stub``: dashboard_stub.py, for what only a stand-in can stage (a stream that drops).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Protocol
from urllib.parse import urlsplit

import httpx
import pytest

pytest.importorskip("playwright.sync_api", reason="playwright not installed (dev extra)")

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from dashboard_stub import DashboardStub
from playwright.sync_api import (
    Browser,
    Locator,
    Page,
    Playwright,
    Request,
    expect,
    sync_playwright,
)

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
START_S = 30.0  # a process (mesh or agent) says it is ready within this
STOP_S = 15.0
# Live markup without whitespace (the real control plane refuses it in an instance id): after a
# quoted value a "/" separates attributes; after an unquoted one it would be part of the value.
HOSTILE = '<img/src="x"/onerror=window.__xss=1>'
CANARY = HOSTILE.replace("__xss", "__canary")

HERE = Path(__file__).resolve().parent
SIGNING = "dashboard-dispatch-auth-secret-" + secrets.token_hex(16)
MESH_READY = re.compile(r"svantic mesh listening on (https://\S+) \(dashboard: (\S+)\)")
AGENT_READY = re.compile(r"^ready$")
TENANTS = 8  # API clients of the module's mesh: one per test, so each fleet starts empty


class DashboardServer(Protocol):
    url: str
    token: str

    def connect(self, instance_id: str, agent_type: str = "echo") -> None: ...

    def disconnect(self, instance_id: str) -> None: ...


# -- the real mesh -------------------------------------------------------------------------


def _env() -> dict[str, str]:
    # The mesh and its agents share the dispatch-auth secret (agents verify envelopes with it).
    return {**os.environ, "SVANTIC_SIGNING_SECRET": SIGNING, "PYTHONUNBUFFERED": "1"}


def _wait_for_line(proc: subprocess.Popen[str], pattern: re.Pattern[str],
                   timeout: float) -> tuple[re.Match[str] | None, list[str]]:
    """Read `proc`'s stdout until a line matches, EOF or `timeout` (a reader thread)."""
    seen: list[str] = []
    found: list[re.Match[str]] = []
    done = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            match = pattern.search(line)
            if match:
                found.append(match)
                break
        done.set()

    threading.Thread(target=read, daemon=True).start()
    done.wait(timeout)
    return (found[0] if found else None), seen


def _stop(proc: subprocess.Popen[str], *, interrupt: bool, within: float = STOP_S) -> None:
    if interrupt and proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(within)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def spki_sha256(cert_pem: bytes) -> str:
    """Base64 SHA-256 of the first certificate's SubjectPublicKeyInfo (Chromium's pin form)."""
    spki = x509.load_pem_x509_certificate(cert_pem).public_key().public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


class MeshProcess:
    """`svantic mesh --port 0` with a tmp db and TENANTS clients; its log goes to a file."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._clients = [(f"dash-{n}", secrets.token_urlsafe(18), f"tenant-{n}")
                         for n in range(TENANTS)]
        db = folder / "mesh.db"
        self.log_path = folder / "mesh.log"
        self._log: IO[str] = self.log_path.open("w")
        argv = [sys.executable, "-m", "svantic_mesh.cli", "mesh", "--db", str(db),
                "--port", "0", "--adapter", "asyncio", "--grace", "2"]
        for client in self._clients:
            argv += ["--client", ":".join(client)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     env=_env())
        match, seen = _wait_for_line(self.proc, MESH_READY, START_S)
        if match is None:
            _stop(self.proc, interrupt=False, within=0)
            self._log.close()
            raise AssertionError(f"the mesh did not start: {seen}\n{self.log_path.read_text()}")
        self.url = match.group(1)
        self.ca = next(line.split(": ", 1)[1].strip() for line in seen if "local CA" in line)
        # The certificate the mesh serves lies beside its db (and its CA): <stem>.cert.pem.
        self.spki = spki_sha256((folder / f"{db.stem}.cert.pem").read_bytes())

    def take_client(self) -> tuple[str, str, str]:
        assert self._clients, f"more than {TENANTS} tests on one mesh: raise TENANTS"
        return self._clients.pop(0)

    def close(self) -> None:
        _stop(self.proc, interrupt=True)
        self._log.close()
        log = self.log_path.read_text()
        assert "Traceback" not in log, log


class MeshDashboard:
    """A `dashboard_server` on the real mesh: a tenant of its own, real agents."""

    def __init__(self, mesh: MeshProcess) -> None:
        self.mesh = mesh
        self.url = mesh.url
        self.client_id, self._secret, self.tenant_id = mesh.take_client()
        self.agents: dict[str, subprocess.Popen[str]] = {}
        self._logs: list[IO[str]] = []
        context = ssl.create_default_context(cafile=mesh.ca)
        with httpx.Client(base_url=mesh.url, verify=context, trust_env=False,
                          timeout=10) as client:
            answer = client.post("/auth/token", json={"client_id": self.client_id,
                                                      "client_secret": self._secret})
            self.token = str(answer.raise_for_status().json()["access_token"])

    def connect(self, instance_id: str, agent_type: str = "echo") -> None:
        """Start an agent process; back once it has registered and connected."""
        log = (self.mesh.folder / f"agent-{self.tenant_id}-{len(self._logs)}.log").open("w")
        self._logs.append(log)
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "agent_process.py"), self.url, self.mesh.ca,
             self.client_id, self._secret, instance_id, agent_type, "asyncio"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, env=_env())
        self.agents[instance_id] = proc
        match, seen = _wait_for_line(proc, AGENT_READY, START_S)
        if match is None:
            _stop(proc, interrupt=False, within=0)
            raise AssertionError(f"agent {instance_id!r} not ready: {seen}\n"
                                 f"{Path(log.name).read_text()}")

    def disconnect(self, instance_id: str) -> None:
        """Close the agent's stdin: it closes its socket and exits. Not waited for, so a
        test's bound covers the agent's going away as well as the mesh and the page."""
        stdin = self.agents[instance_id].stdin
        assert stdin is not None
        stdin.close()

    def close(self) -> None:
        for proc in self.agents.values():
            if proc.stdin is not None and not proc.stdin.closed:
                proc.stdin.close()
        for proc in self.agents.values():
            _stop(proc, interrupt=False)
        for log in self._logs:
            log.close()
        codes = {name: proc.returncode for name, proc in self.agents.items()}
        assert all(code == 0 for code in codes.values()), codes


@pytest.fixture(scope="module")
def mesh_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshProcess]:
    mesh = MeshProcess(tmp_path_factory.mktemp("mesh"))
    try:
        yield mesh
    finally:
        mesh.close()


# -- browsers and pages --------------------------------------------------------------------


@pytest.fixture(params=["mesh", "stub"])
def dashboard_server(request: pytest.FixtureRequest) -> Iterator[DashboardServer]:
    server: MeshDashboard | DashboardStub
    if request.param == "mesh":
        server = MeshDashboard(request.getfixturevalue("mesh_process"))
    else:
        server = DashboardStub()
    try:
        yield server
    finally:
        server.close()


stub_only = pytest.mark.parametrize("dashboard_server", ["stub"], indirect=True)


@pytest.fixture(scope="module")
def pw() -> Iterator[Playwright]:
    with sync_playwright() as api:
        yield api


def _launch(pw: Playwright, *extra: str) -> Browser:
    return pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=[*CHROMIUM_ARGS, *extra])


@pytest.fixture(scope="module")
def stub_browser(pw: Playwright) -> Iterator[Browser]:
    browser = _launch(pw)
    try:
        yield browser
    finally:
        browser.close()


@pytest.fixture(scope="module")
def mesh_browser(pw: Playwright, mesh_process: MeshProcess) -> Iterator[Browser]:
    # Trust exactly the mesh's certificate (its key's pin), not every certificate: the page
    # then runs as a user's browser runs it once the local CA is trusted.
    browser = _launch(pw, f"--ignore-certificate-errors-spki-list={mesh_process.spki}")
    try:
        yield browser
    finally:
        browser.close()


class Watched:
    """A page plus what it complained about (uncaught errors, CSP refusals) and requested."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.errors: list[str] = []
        self.csp: list[str] = []
        self.requests: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on("console", self._console)
        page.on("request", self._request)

    def _console(self, msg: object) -> None:
        text = getattr(msg, "text", "")
        if "Content Security Policy" in text:
            self.csp.append(text)

    def _request(self, request: Request) -> None:
        parts = urlsplit(request.url)  # the fragment never leaves the browser
        self.requests.append(parts.path + "?" + parts.query)

    def assert_clean(self) -> None:
        assert self.errors == []
        assert self.csp == []


@pytest.fixture
def watched(request: pytest.FixtureRequest, dashboard_server: DashboardServer) -> Iterator[Watched]:
    mesh = isinstance(dashboard_server, MeshDashboard)
    browser: Browser = request.getfixturevalue("mesh_browser" if mesh else "stub_browser")
    context = browser.new_context()
    context.set_default_timeout(LOAD_MS)
    try:
        yield Watched(context.new_page())
    finally:
        context.close()


def open_dashboard(w: Watched, server: DashboardServer, token: str | None = None) -> Page:
    page = w.page
    page.goto(f"{server.url}/dashboard#token={token or server.token}")
    return page


def expect_live(page: Page) -> None:
    expect(page.locator("#status-line")).to_have_text("live", timeout=LOAD_MS)


def row(page: Page, instance_id: str) -> Locator:
    return page.locator("#instances-body tr[data-instance-id]").filter(
        has=page.get_by_role("cell", name=instance_id, exact=True)
    )


def assert_token_never_sent_in_urls(w: Watched, server: DashboardServer) -> None:
    assert w.requests and all("token" not in r for r in w.requests), w.requests
    if isinstance(server, DashboardStub):
        assert all("token" not in p for p in server.request_paths)


def test_connect_and_disconnect_show_within_a_second(
    watched: Watched, dashboard_server: DashboardServer
) -> None:
    page = open_dashboard(watched, dashboard_server)
    expect_live(page)
    # The token left the address bar and lives in sessionStorage only.
    assert "token" not in page.url
    stored = page.evaluate("() => sessionStorage.getItem('svantic.dashboard.token')")
    assert stored == dashboard_server.token

    dashboard_server.connect("i-1", "echo")  # back once the agent is connected
    r = page.locator('#instances-body tr[data-instance-id="i-1"]')
    status = r.locator('td[data-col="connection_status"]')
    expect(status).to_have_text("online", timeout=UPDATE_MS)
    expect(status).to_have_class(re.compile(r"\bstatus-online\b"))
    expect(r.locator('td[data-col="agent_type"]')).to_have_text("echo")
    expect(r.locator('td[data-col="routing_status"]')).to_have_text("available")

    dashboard_server.disconnect("i-1")  # the agent is told to go; the clock starts
    expect(status).to_have_text("offline", timeout=UPDATE_MS)
    expect(status).to_have_class(re.compile(r"\bstatus-offline\b"))

    # Newest first; the real mesh also reports the registration and the first health change.
    events = page.locator("#events li")
    expect(events.first).to_have_attribute("data-event-type", "agent.disconnected")
    for kind in ("agent.connected", "agent.disconnected"):
        expect(page.locator(f'#events li[data-event-type="{kind}"]')).to_have_count(1)
    assert_token_never_sent_in_urls(watched, dashboard_server)
    watched.assert_clean()


def test_totals_follow_the_fleet(watched: Watched, dashboard_server: DashboardServer) -> None:
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
    watched: Watched, dashboard_server: DashboardServer
) -> None:
    page = open_dashboard(watched, dashboard_server)
    expect_live(page)
    dashboard_server.connect(HOSTILE, "<b>echo</b>")

    r = page.locator("#instances-body tr[data-instance-id]")
    expect(r).to_have_count(1, timeout=UPDATE_MS)
    expect(r).to_have_attribute("data-instance-id", HOSTILE)
    expect(r.locator('td[data-col="instance_id"]')).to_have_text(HOSTILE)
    expect(r.locator('td[data-col="agent_type"]')).to_have_text("<b>echo</b>")
    expect(page.locator('#events li[data-event-type="agent.connected"]')).to_contain_text(HOSTILE)
    assert page.locator("img, b").count() == 0

    # Positive control, for a bounded wait instead of a sleep: the same markup put through
    # innerHTML now does fire (CSP allows inline handlers) — so had the page rendered it
    # earlier, its handler would have run by the time this one has.
    page.evaluate("(html) => { document.createElement('div').innerHTML = html; }", CANARY)
    page.wait_for_function("() => window.__canary === 1", timeout=LOAD_MS)
    assert page.evaluate("() => typeof window.__xss") == "undefined"
    assert watched.errors == []


@stub_only  # the page's side of a bad token does not need a mesh
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
    assert_token_never_sent_in_urls(watched, dashboard_server)
    watched.assert_clean()


@stub_only  # the real mesh ends the stream on restart; here the stub hangs up
def test_stream_reconnects_after_it_ends(watched: Watched, dashboard_server: DashboardStub) -> None:
    page = open_dashboard(watched, dashboard_server)
    expect_live(page)
    dashboard_server.drop_streams()
    expect(page.locator("#status-line")).to_contain_text("reconnecting", timeout=LOAD_MS)
    expect_live(page)  # first retry after 1 s
    dashboard_server.connect("i-late", "echo")
    expect(row(page, "i-late")).to_have_count(1, timeout=UPDATE_MS)
    watched.assert_clean()
