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
from cryptography import x509
from playwright.sync_api import Browser, BrowserContext, ConsoleMessage, Page, sync_playwright

import serverdb
from backends import server_database
from estkit.pki.certs import serial_hex
from estkit.server.errors import CODE_HEADER
from estserver import EstServer, add_label, make_server
from estutil import csr_der, http, issued_cert, new_key, post_csr
from integration.conftest import bootstrap_device, enroll_operational
from oidcstandin import Client, Provider, running

CHROMIUM = "/usr/bin/chromium"
DOCS = Path(__file__).resolve().parents[2] / "docs"
WAIT_MS = 15_000  # every Playwright wait is bounded by this
GATED = "gated"  # an EST label whose enrollments wait for an operator
OIDC_CLIENT = "estkit-portal"  # the portal's client at the stand-in OpenID provider
OIDC_ADMIN = "alice@example.net"  # the ID tokens' sub, an admin in [api.oidc.clients]


@dataclass
class Fleet:
    server: EstServer
    admin: str
    reader: str
    devices: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def provider() -> Iterator[Provider]:
    """An OpenID provider on 127.0.0.1 (``oidcstandin``), the portal's second way in."""
    with running(Provider.fresh(subject=OIDC_ADMIN)) as running_provider:
        yield running_provider


@pytest.fixture(scope="module")
def fleet(
    request: pytest.FixtureRequest,
    backend: str,
    provider: Provider,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Fleet]:
    """A server with a gated label, tokens of both portal scopes, OIDC sign-in through
    ``provider``, and a few devices with operational certificates (something for the
    dashboard to count)."""
    tmp = tmp_path_factory.mktemp("portal")
    server = make_server(tmp, database_url=server_database(request, backend))
    add_label(server.data_dir, GATED, approval=True)
    with (server.data_dir / "estkit.toml").open("a") as config:
        config.write(
            f'\n[api.oidc]\nissuer = "{provider.issuer}"\naudience = "api://estkit"\n'
            f'jwks_url = "{provider.issuer}/jwks"\nportal_client_id = "{OIDC_CLIENT}"\n'
            f'[api.oidc.clients]\n"{OIDC_ADMIN}" = ["admin"]\n'
        )
    provider.clients[OIDC_CLIENT] = Client(
        OIDC_CLIENT, redirect_uri=f"{server.origin}/ui/login/oidc/callback"
    )
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
        "audit-chain": "/ui/audit/chain",
        "tokens": "/ui/tokens",
        "token-revoke-confirm": "/ui/tokens/viewer/revoke",
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
        "SELECT device_id, ca, status, not_before, not_after FROM certificates "
        "WHERE ca NOT LIKE 'bootstrap%'",
    )
    devices = [r[0] for r in serverdb.rows(data_dir, "SELECT device_id FROM devices")]
    week = now + dt.timedelta(days=7)

    def state(device: str) -> str:
        mine = [c for c in certs if c[0] == device]
        valid = [(_utc(c[3]), _utc(c[4])) for c in mine if c[2] == "valid"]
        if not mine or not valid:
            return "never-enrolled" if not mine else "revoked"
        until = max(end for _, end in valid)
        renew_at = max(start + (end - start) * 0.8 for start, end in valid)
        if until <= week:
            return "expired" if until <= now else "expiring"
        return "renewal-due" if renew_at <= now else "valid"

    states = [state(d) for d in devices]
    for name in ("never-enrolled", "valid", "renewal-due", "expiring", "expired", "revoked"):
        assert shown[name] == states.count(name), name
    assert shown["valid"] >= len(fleet.devices)
    issued = serverdb.rows(data_dir, "SELECT issued_at FROM certificates")
    issued_today = sum(_utc(r[0]).date() == now.date() for r in issued)
    table = operator.page.get_by_test_id("issued-table")
    row = table.locator("tr", has_text=now.date().isoformat())
    assert row.locator("td.num").text_content(timeout=WAIT_MS) == str(issued_today)
    refused = serverdb.rows(data_dir, "SELECT at FROM audit_events WHERE outcome = 'refused'")
    refused_today = sum(_utc(r[0]).date() == now.date() for r in refused)
    table = operator.page.get_by_test_id("refusals-table")
    row = table.locator("tr", has_text=now.date().isoformat())
    assert row.locator("td.num").last.text_content(timeout=WAIT_MS) == str(refused_today)
    for chart in ("issued-h", "expiry-h"):
        bars = operator.page.locator(f"section[aria-labelledby={chart}] svg.chart rect.bar")
        assert bars.count() == 30
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


def test_an_admin_creates_a_token_sees_it_once_and_it_signs_in(
    sign_in, fleet: Fleet, device_id: str
) -> None:
    operator: Operator = sign_in(fleet.admin)
    page = operator.page
    page.get_by_role("link", name="API tokens").click()
    page.wait_for_url(f"{operator.origin}/ui/tokens")
    name = f"noc-{device_id}"[:128]
    page.get_by_label("Name").fill(name)
    page.get_by_label("Scope").select_option("read")
    page.get_by_label("Expires after").fill("90d")
    page.get_by_role("button", name="Create token").click()
    token = page.get_by_test_id("new-token").input_value()
    assert token.startswith("estk_")
    page.get_by_role("link", name="Back to the API tokens").click()
    row = page.get_by_role("row", name=re.compile(re.escape(name)))
    assert "read" in row.inner_text() and "active" in row.inner_text()
    assert token not in page.content()
    assert token not in fleet.server.log()
    reader: Operator = sign_in(token)
    assert reader.page.get_by_test_id("identity").inner_text().startswith(name)
    assert operator.console.errors == [] and reader.console.errors == []


def test_an_admin_downloads_the_iothub_verification_certificate(sign_in, fleet: Fleet) -> None:
    operator: Operator = sign_in(fleet.admin)
    page = operator.page
    operator.go("/ui/cas/devices")
    page.get_by_label("Verification code").fill("3F2A9B1C")
    with page.expect_download() as info:
        page.get_by_role("button", name="Download the verification certificate").click()
    download = info.value
    assert download.suggested_filename == "devices-iothub-verification.pem"
    (cert,) = x509.load_pem_x509_certificates(Path(download.path()).read_bytes())
    assert cert.subject.rfc4514_string() == "CN=3F2A9B1C"
    devices_ca = x509.load_pem_x509_certificate(
        (fleet.server.data_dir / "ca" / "devices.pem").read_bytes()
    )
    cert.verify_directly_issued_by(devices_ca)
    actors = serverdb.rows(
        fleet.server.data_dir,
        "SELECT actor FROM audit_events WHERE action = 'iothub-verify' AND detail LIKE :d",
        d="%CN=3F2A9B1C,%",
    )
    assert actors == [("ui:ops",)]
    assert operator.console.errors == []


# -- the keyboard alone ------------------------------------------------------------------

# The focused element as the keyboard user sees it: what it is, and whether the focus
# ring shows (``:focus-visible`` with an outline of at least 2 px).
_FOCUSED = """() => {
  const e = document.activeElement;
  if (!e || e === document.body) return null;
  const style = getComputedStyle(e);
  return {
    tag: e.tagName.toLowerCase(),
    name: ((e.labels && e.labels.length ? e.labels[0].innerText : e.innerText)
      || e.getAttribute("aria-label") || "").trim(),
    ring: e.matches(":focus-visible") && style.outlineStyle !== "none"
      && parseFloat(style.outlineWidth) >= 2,
  };
}"""
TAB_LIMIT = 200  # presses before a control counts as unreachable


@dataclass
class Keyboard:
    page: Page
    visited: list[dict[str, object]] = field(default_factory=list)

    def tab_to(self, name: str, tag: str = "a") -> None:
        """Press Tab until the control ``name`` has the focus."""
        for _ in range(TAB_LIMIT):
            self.page.keyboard.press("Tab")
            focused = self.page.evaluate(_FOCUSED)
            if focused is None:
                continue
            self.visited.append(focused)
            if focused["tag"] == tag and focused["name"] == name:
                return
        raise AssertionError(f"{name!r} ({tag}) not reached with {TAB_LIMIT} Tabs")

    def enter(self, url: str | re.Pattern[str]) -> None:
        self.page.keyboard.press("Enter")
        self.page.wait_for_url(url)

    def open_device(self, origin: str, device_id: str) -> None:
        """From the devices page: search for the device, then follow its link."""
        self.tab_to("Search", "input")
        self.page.keyboard.type(device_id)
        self.enter(re.compile(r".*/ui/devices\?search=.*"))
        self.tab_to(device_id)
        self.enter(f"{origin}/ui/devices/{device_id}")


def test_the_portal_works_with_the_keyboard_alone_and_shows_where_the_focus_is(
    browser: Browser, fleet: Fleet, device_id: str, tmp_path: Path
) -> None:
    server = fleet.server
    boot = bootstrap_device(server, device_id, tmp_path / "bootstrap")
    op = enroll_operational(server, device_id, boot, tmp_path / "op")
    serial = serial_hex(op.cert.serial_number)
    origin = server.origin
    context = _context(browser, origin)
    try:
        page = context.new_page()
        console = Console(page)
        keys = Keyboard(page)
        page.goto(f"{origin}/ui/")
        assert page.evaluate("document.activeElement.id") == "token"  # autofocus
        page.keyboard.type(fleet.admin)
        keys.tab_to("Sign in", "button")
        keys.enter(f"{origin}/ui/")
        for name, path in (
            ("Certificate authorities", "/ui/cas"),
            ("Certificates", "/ui/certificates"),
            ("Approvals", "/ui/approvals"),
            ("Audit", "/ui/audit"),
            ("API tokens", "/ui/tokens"),
            ("Devices", "/ui/devices"),
        ):
            keys.tab_to(name)
            keys.enter(f"{origin}{path}")
        keys.open_device(origin, device_id)
        keys.tab_to(serial)
        keys.enter(f"{origin}/ui/certificates/{serial}")
        keys.tab_to("Revoke…")
        keys.enter(f"{origin}/ui/certificates/{serial}/revoke")
        keys.tab_to("Revoke", "button")
        keys.tab_to("Dashboard")
        keys.enter(f"{origin}/ui/")
        keys.tab_to("Certificate authorities")
        keys.enter(f"{origin}/ui/cas")
        keys.tab_to("devices")
        keys.enter(f"{origin}/ui/cas/devices")
        keys.tab_to("Download the verification certificate", "button")
        keys.tab_to("Copy", "button")
        keys.tab_to("Devices")
        keys.enter(f"{origin}/ui/devices")
        keys.open_device(origin, device_id)
        keys.tab_to("Disable…")
        keys.enter(f"{origin}/ui/devices/{device_id}/disable")
        keys.tab_to("Disable", "button")
        keys.enter(f"{origin}/ui/devices/{device_id}?done=disable")
        keys.tab_to("Sign out", "button")
        reached = {(f["tag"], f["name"]) for f in keys.visited}
        nav = ("Dashboard", "Certificate authorities", "Devices", "Certificates", "Approvals")
        assert {("a", name) for name in (*nav, "Audit", "API tokens")} <= reached
        hidden = sorted({(str(f["tag"]), str(f["name"])) for f in keys.visited if not f["ring"]})
        assert hidden == [], f"focused without a visible focus ring: {hidden}"
        status = serverdb.rows(
            server.data_dir, "SELECT status FROM devices WHERE device_id = :d", d=device_id
        )
        assert status == [("disabled",)]
        assert console.errors == []
    finally:
        context.close()


def test_a_person_signs_in_with_the_identity_provider(browser: Browser, fleet: Fleet) -> None:
    """Through the provider's consent and back (a cross-site redirect): the pre-session
    cookie comes back (SameSite=Lax) and the session works once the portal's own page
    moves on (SameSite=Strict)."""
    origin = fleet.server.origin
    context = _context(browser, origin)
    try:
        page = context.new_page()
        console = Console(page)
        page.goto(f"{origin}/ui/devices")
        page.get_by_role("link", name="Sign in with 127.0.0.1").click()
        page.wait_for_url(f"{origin}/ui/devices")
        assert page.get_by_test_id("identity").inner_text() == f"oidc:{OIDC_ADMIN} (admin)"
        page.get_by_role("link", name="API tokens").click()  # an admin's page
        page.wait_for_url(f"{origin}/ui/tokens")
        actors = serverdb.rows(
            fleet.server.data_dir,
            "SELECT outcome FROM audit_events WHERE actor = :a AND detail = :d",
            a=f"oidc:{OIDC_ADMIN}",
            d="portal sign-in (OIDC)",
        )
        assert ("ok",) in actors
        assert console.errors == []
    finally:
        context.close()
