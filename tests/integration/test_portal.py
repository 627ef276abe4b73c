"""The operator portal in a real browser: Debian's Chromium, headless, driven by
Playwright, against a real ``estkit server run`` on each backend.

Flows of issue 14: sign in with a token; the dashboard's numbers equal the store's;
copy a CA's EST URL; revoke a certificate and see the device refused at
simplereenroll; approve a waiting request and see the device's retry get its
certificate; a read user sees no action and a forged POST is refused; an action
without its CSRF token is refused; no console error on any page. Every page is
screenshotted into ``test-artifacts/`` under pytest's temporary directory
(``ESTKIT_PORTAL_DOCS=1`` also refreshes the README's two, in ``docs/``).
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, ConsoleMessage, Page, sync_playwright

import serverdb
from backends import server_database
from estkit.pki.certs import serial_hex
from estkit.server.errors import CODE_HEADER
from estserver import EstServer, add_label, make_server
from estutil import csr_der, http, issued_cert, new_key, post_csr
from integration.conftest import bootstrap_device, enroll_operational

CHROMIUM = "/usr/bin/chromium"
DOCS = Path(__file__).resolve().parents[2] / "docs"
WAIT_MS = 15_000  # every Playwright wait is bounded by this
GATED = "gated"  # an EST label whose enrollments wait for an operator


@dataclass
class Fleet:
    server: EstServer
    admin: str
    reader: str
    devices: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def fleet(
    request: pytest.FixtureRequest, backend: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    """A server with a gated label, tokens of both portal scopes, and a few devices with
    operational certificates (something for the dashboard to count)."""
    tmp = tmp_path_factory.mktemp("portal")
    server = make_server(tmp, database_url=server_database(request, backend))
    add_label(server.data_dir, GATED, approval=True)
    server.start()
    try:
        admin = server.cli("token", "create", "--name", "ops", "--scope", "admin").stdout.strip()
        reader = server.cli("token", "create", "--name", "viewer", "--scope", "read")
        fleet = Fleet(server, admin=admin, reader=reader.stdout.strip())
        for n in range(3):
            device = f"portal-{backend}-{n}"
            boot = bootstrap_device(server, device, tmp / device / "bootstrap")
            enroll_operational(server, device, boot, tmp / device / "op")
            fleet.devices.append(device)
        yield fleet
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
        )
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.getbasetemp() / "test-artifacts"
    path.mkdir(exist_ok=True)
    return path


class Console:
    """Errors the pages wrote to the console or threw."""

    def __init__(self, page: Page) -> None:
        self.errors: list[str] = []
        page.on("console", self._message)
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))

    def _message(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(f"{message.location.get('url')}: {message.text}")


@dataclass
class Operator:
    page: Page
    console: Console
    origin: str

    def go(self, path: str) -> None:
        answer = self.page.goto(self.origin + path)
        assert answer is not None and answer.status == 200, f"{path}: {answer and answer.status}"

    def shot(self, directory: Path, name: str) -> Path:
        path = directory / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


def _context(browser: Browser, origin: str) -> BrowserContext:
    # The server's certificate chains to estkit's own root, which Chromium does not know.
    context = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 900})
    context.set_default_timeout(WAIT_MS)
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=origin)
    return context


@pytest.fixture
def sign_in(browser: Browser, fleet: Fleet) -> Iterator[object]:
    contexts: list[BrowserContext] = []

    def signed_in(token: str) -> Operator:
        context = _context(browser, fleet.server.origin)
        contexts.append(context)
        page = context.new_page()
        operator = Operator(page, Console(page), fleet.server.origin)
        operator.go("/ui/")  # sent to the sign-in page first
        assert page.url.startswith(f"{fleet.server.origin}/ui/login?next=")
        page.get_by_label("API token").fill(token)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(f"{fleet.server.origin}/ui/")
        return operator

    yield signed_in
    for context in contexts:
        context.close()


def _counts(page: Page) -> dict[str, int]:
    cells = page.locator("[data-count]")
    return {
        cells.nth(i).get_attribute("data-count") or "": int(cells.nth(i).inner_text())
        for i in range(cells.count())
    }


def test_every_page_renders_without_console_errors_and_is_screenshotted(
    sign_in, fleet: Fleet, artifacts: Path, backend: str
) -> None:
    operator: Operator = sign_in(fleet.admin)
    page = operator.page
    device = fleet.devices[0]
    serial = serverdb.rows(
        fleet.server.data_dir,
        "SELECT serial FROM certificates WHERE device_id = :d AND ca = 'devices'",
        d=device,
    )[0][0]
    pages = {
        "dashboard": "/ui/",
        "cas": "/ui/cas",
        "ca-devices": "/ui/cas/devices",
        "ca-root": "/ui/cas/root",
        "certificates": "/ui/certificates",
        "certificate": f"/ui/certificates/{serial}",
        "revoke-confirm": f"/ui/certificates/{serial}/revoke",
        "devices": "/ui/devices",
        "device": f"/ui/devices/{device}",
        "decommission-confirm": f"/ui/devices/{device}/decommission",
        "approvals": "/ui/approvals",
        "audit": f"/ui/audit?device={device}",
        "refused": "/ui/certificates?status=lost",
    }
    shots = {}
    for name, path in pages.items():
        if name == "refused":
            answer = page.goto(operator.origin + path)
            assert answer is not None and answer.status == 400
        else:
            operator.go(path)
        shots[name] = operator.shot(artifacts, f"{backend}-{name}")
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url(f"{operator.origin}/ui/login")
    operator.shot(artifacts, f"{backend}-signed-out")
    # A 400 page's own console line is the browser reporting the status, not a script error.
    errors = [e for e in operator.console.errors if "status of 400" not in e]
    assert errors == []
    if os.environ.get("ESTKIT_PORTAL_DOCS") == "1" and backend == "sqlite":
        shutil.copyfile(shots["dashboard"], DOCS / "portal-dashboard.png")
        shutil.copyfile(shots["ca-devices"], DOCS / "portal-ca.png")


def test_the_dashboard_numbers_equal_the_stores(sign_in, fleet: Fleet) -> None:
    operator: Operator = sign_in(fleet.reader)
    shown = _counts(operator.page)
    data_dir = fleet.server.data_dir
    statuses = dict(serverdb.rows(data_dir, "SELECT status, count(*) FROM devices GROUP BY status"))
    for status in ("active", "disabled", "decommissioned"):
        assert shown[status] == statuses.get(status, 0), status
    now = dt.datetime.now(dt.UTC)
    certs = serverdb.rows(
        data_dir,
        "SELECT device_id, ca, status, not_after FROM certificates WHERE ca NOT LIKE 'bootstrap%'",
    )
    devices = [r[0] for r in serverdb.rows(data_dir, "SELECT device_id FROM devices")]

    def valid_until(device: str) -> dt.datetime | None:
        ends = [_utc(c[3]) for c in certs if c[0] == device and c[2] == "valid"]
        return max(ends, default=None)

    week = now + dt.timedelta(days=7)
    enrolled = {c[0] for c in certs}
    assert shown["never-enrolled"] == sum(d not in enrolled for d in devices)
    assert shown["valid"] == sum((u := valid_until(d)) is not None and u > week for d in devices)
    assert shown["valid"] >= len(fleet.devices)
    issued = serverdb.rows(data_dir, "SELECT issued_at FROM certificates")
    issued_today = sum(_utc(r[0]).date() == now.date() for r in issued)
    table = operator.page.get_by_test_id("issued-table")
    row = table.locator("tr", has_text=now.date().isoformat())
    assert row.locator("td.num").text_content(timeout=WAIT_MS) == str(issued_today)
    assert operator.page.locator("svg.chart rect.bar").count() == 60
    assert operator.console.errors == []


def _utc(value: object) -> dt.datetime:
    if isinstance(value, str):  # SQLite: text without a zone, UTC
        value = dt.datetime.fromisoformat(value)
    assert isinstance(value, dt.datetime)
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value


def test_a_cas_est_url_is_copied_with_its_button(sign_in, fleet: Fleet) -> None:
    operator: Operator = sign_in(fleet.reader)
    page = operator.page
    page.get_by_role("link", name="Certificate authorities").click()
    page.get_by_role("row", name=re.compile(r"^devices ")).get_by_role(
        "link", name="View details"
    ).click()
    page.wait_for_url(f"{operator.origin}/ui/cas/devices")
    label = page.get_by_role("region", name="Label devices")
    field = label.get_by_label("this node", exact=True)
    expected = f"{fleet.server.url}/devices"
    assert field.input_value() == expected
    copy = page.locator(f'button.copy[data-copy-from="{field.get_attribute("id")}"]')
    copy.click()
    page.get_by_role("button", name="Copied").wait_for()
    assert page.evaluate("navigator.clipboard.readText()") == expected
    region = label.get_by_label(re.compile(r"^region "))
    assert region.first.input_value() == expected  # this node is its region's only one
    assert operator.console.errors == []


def test_a_certificate_revoked_in_the_portal_is_refused_at_simplereenroll(
    sign_in, fleet: Fleet, device_id: str, tmp_path: Path
) -> None:
    server = fleet.server
    boot = bootstrap_device(server, device_id, tmp_path / "bootstrap")
    op = enroll_operational(server, device_id, boot, tmp_path / "op")
    serial = serial_hex(op.cert.serial_number)
    operator: Operator = sign_in(fleet.admin)
    page = operator.page
    operator.go(f"/ui/devices/{device_id}")
    page.get_by_role("link", name=serial).click()
    page.get_by_role("link", name="Revoke…").click()
    page.get_by_label("Reason").select_option("keyCompromise")
    page.get_by_role("button", name="Revoke").click()
    page.wait_for_url(f"{operator.origin}/ui/certificates/{serial}?done=revoked")
    assert "revoked" in page.get_by_test_id("status").inner_text()
    assert page.get_by_role("status").inner_text() == "The certificate is revoked."

    with http(server.root_pem, op) as client:
        answer = post_csr(client, f"{server.url}/simplereenroll", csr_der(new_key(), device_id))
    assert answer.status_code == 403
    assert answer.headers[CODE_HEADER] == "revoked"
    actors = serverdb.rows(
        server.data_dir,
        "SELECT actor FROM audit_events WHERE serial = :s AND action = 'revoke'",
        s=serial,
    )
    assert actors == [("ui:ops",)]
    assert operator.console.errors == []


def test_an_approved_request_lets_the_waiting_device_finish(
    sign_in, fleet: Fleet, device_id: str, tmp_path: Path
) -> None:
    server = fleet.server
    boot = bootstrap_device(server, device_id, tmp_path / "bootstrap")
    body = csr_der(new_key(), device_id)
    url = f"{server.url}/{GATED}/simpleenroll"
    with http(server.root_pem, boot) as client:
        waiting = post_csr(client, url, body)
        assert waiting.status_code == 202, waiting.text
        operator: Operator = sign_in(fleet.admin)
        page = operator.page
        page.get_by_role("link", name=re.compile("waiting for approval")).click()
        row = page.get_by_role("row", name=re.compile(re.escape(device_id)))
        row.get_by_role("button", name="Approve").click()
        page.wait_for_url(f"{operator.origin}/ui/approvals?done=approve")
        issued = issued_cert(post_csr(client, url, body))  # the device's retry
    assert issued.subject.rfc4514_string() == f"CN={device_id}"
    decided = serverdb.rows(
        server.data_dir,
        "SELECT decided_by, status FROM pending_requests WHERE device_id = :d",
        d=device_id,
    )
    assert decided == [("ui:ops", "issued")]
    assert operator.console.errors == []


def test_a_read_user_sees_no_action_and_a_forged_post_is_refused(sign_in, fleet: Fleet) -> None:
    operator: Operator = sign_in(fleet.reader)
    page = operator.page
    device = fleet.devices[1]
    operator.go(f"/ui/devices/{device}")
    assert page.get_by_role("link", name=re.compile("Disable|Decommission")).count() == 0
    page.get_by_role("link", name=re.compile("^[0-9A-F]+$")).last.click()
    assert page.get_by_role("link", name="Revoke…").count() == 0
    serial = page.url.rsplit("/", 1)[1]
    csrf = page.locator("input[name=csrf]").first.input_value()
    forged = page.request.post(
        f"{operator.origin}/ui/certificates/{serial}/revoke",
        form={"csrf": csrf, "reason": "keyCompromise"},
        max_redirects=0,
    )
    assert forged.status == 403
    assert "admin" in forged.text()
    status = serverdb.rows(
        fleet.server.data_dir, "SELECT status FROM certificates WHERE serial = :s", s=serial
    )
    assert status == [("valid",)]
    assert operator.console.errors == []


def test_an_admin_action_without_the_csrf_token_is_refused(sign_in, fleet: Fleet) -> None:
    operator: Operator = sign_in(fleet.admin)
    device = fleet.devices[2]
    forged = operator.page.request.post(
        f"{operator.origin}/ui/devices/{device}/decommission", form={}, max_redirects=0
    )
    assert forged.status == 403
    assert "CSRF" in forged.text()
    status = serverdb.rows(
        fleet.server.data_dir, "SELECT status FROM devices WHERE device_id = :d", d=device
    )
    assert status == [("active",)]
