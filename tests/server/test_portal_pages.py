"""The operator portal (/ui) in-process, on both backends: sign-in and its cookie,
what a read user may see and not do, CSRF, actions through the authority (audited as
``ui:<token name>``), and the dashboard's numbers against the store's records."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from dataclasses import dataclass
from html import unescape
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

import serverdb
from backends import server_database
from estkit.ca.authority import Authority
from estkit.ca.tokens import TokenService
from estkit.server.app import create_app
from estkit.server.config import ServerConfig, load_config
from estkit.server.portal.session import LOGIN_COOKIE, SESSION_COOKIE
from estkit.server.wiring import build_authority, open_store
from estkit.store import AuditEvent, CertStatus, DeviceStatus, PendingStatus, SqlStore
from estserver import run_estkit
from estutil import csr_der, new_key
from portalutil import TestClient, csrf_of, sign_in


@dataclass
class Portal:
    config: ServerConfig
    store: SqlStore
    authority: Authority[SqlStore]
    tokens: dict[str, str]  # token name -> token
    app: object

    def client(self) -> TestClient:
        return TestClient(self.app)

    def signed_in(self, name: str) -> TestClient:
        client = self.client()
        answer = sign_in(client, self.tokens[name])
        assert answer.status_code == 303, answer.text
        return client

    def certificate(self, device_id: str) -> str:
        key = new_key()
        issued = self.authority.provision(
            "devices", csr_der(key, device_id), device_id=device_id, actor="test",
            now=dt.datetime.now(dt.UTC), via="test",
        )  # fmt: skip
        return issued.record.serial


@pytest.fixture(scope="module")
def portal(
    request: pytest.FixtureRequest, backend: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Portal]:
    data_dir: Path = tmp_path_factory.mktemp("portal") / "data"
    database = server_database(request, backend)
    database_args = ["--database-url", database] if database else []
    run_estkit("server", "init", "--data-dir", data_dir, *database_args)
    config = load_config(data_dir)
    store = open_store(config)
    service = TokenService(store)
    now = dt.datetime.now(dt.UTC)
    tokens = {
        name: service.create(name, frozenset(scopes), actor="test", now=now)
        for name, scopes in (
            ("ops", {"admin"}),
            ("viewer", {"read"}),
            ("station", {"provision"}),
            ("retired", {"admin"}),
        )
    }
    service.revoke("retired", actor="test", now=now)
    yield Portal(config, store, build_authority(config, store), tokens, create_app(config))
    store.close()


def test_a_page_without_a_session_sends_the_browser_to_sign_in_and_back(portal: Portal) -> None:
    client = portal.client()
    answer = client.get("/ui/devices?status=active", follow_redirects=False)
    assert answer.status_code == 303
    assert answer.headers["location"] == "/ui/login?next=%2Fui%2Fdevices%3Fstatus%3Dactive"
    signed = sign_in(client, portal.tokens["viewer"], next_path="/ui/devices?status=active")
    assert signed.headers["location"] == "/ui/devices?status=active"


def test_sign_in_sets_a_strict_secure_httponly_session_cookie_for_ui_only(portal: Portal) -> None:
    answer = sign_in(portal.client(), portal.tokens["ops"])
    assert answer.status_code == 303
    cookies = answer.headers.get_list("set-cookie")
    session = next(c for c in cookies if c.startswith(f"{SESSION_COOKIE}="))
    attributes = {a.strip().lower() for a in session.split(";")[1:]}
    assert {"httponly", "secure", "samesite=strict", "path=/ui", "max-age=28800"} <= attributes
    assert any(c.startswith(f'{LOGIN_COOKIE}=""') and "Max-Age=0" in c for c in cookies)


@pytest.mark.parametrize(
    ("token", "status", "says"),
    [
        ("estk_unknown", 401, "unknown API token"),
        ("station", 403, "lacks the 'read' scope"),
        ("retired", 401, "revoked"),
        ("", 401, "not an estkit API token"),
    ],
    ids=["fail/unknown", "fail/provision-scope", "fail/revoked", "fail/empty"],
)
def test_sign_in_is_refused_for_a_token_that_cannot_read(
    portal: Portal, token: str, status: int, says: str
) -> None:
    client = portal.client()
    answer = sign_in(client, portal.tokens.get(token, token))
    assert answer.status_code == status
    assert says in unescape(answer.text)
    assert SESSION_COOKIE not in answer.cookies


def test_sign_in_without_the_sign_in_form_cookie_is_refused(portal: Portal) -> None:
    client = portal.client()
    csrf = csrf_of(client, "/ui/login")
    client.cookies.clear()
    answer = client.post(
        "/ui/login", data={"csrf": csrf, "token": portal.tokens["ops"]}, follow_redirects=False
    )
    assert answer.status_code == 403
    assert SESSION_COOKIE not in answer.cookies


def test_a_session_ends_when_its_token_is_revoked_or_its_cookie_is_changed(
    portal: Portal,
) -> None:
    service = TokenService(portal.store)
    now = dt.datetime.now(dt.UTC)
    token = service.create("short", frozenset({"read"}), actor="test", now=now)
    client = portal.client()
    sign_in(client, token)
    assert client.get("/ui/").status_code == 200
    cookie = client.cookies[SESSION_COOKIE]
    client.cookies.set(SESSION_COOKIE, cookie[:-3] + "AAA", domain="est.test", path="/ui")
    assert client.get("/ui/", follow_redirects=False).status_code == 303
    client.cookies.set(SESSION_COOKIE, cookie, domain="est.test", path="/ui")
    assert client.get("/ui/").status_code == 200
    service.revoke("short", actor="test", now=now)
    assert client.get("/ui/", follow_redirects=False).status_code == 303


def test_sign_out_clears_the_cookie_and_needs_the_csrf_token(portal: Portal) -> None:
    client = portal.signed_in("viewer")
    assert client.post("/ui/logout", data={}, follow_redirects=False).status_code == 403
    answer = client.post(
        "/ui/logout", data={"csrf": csrf_of(client, "/ui/")}, follow_redirects=False
    )
    assert answer.status_code == 303 and answer.headers["location"] == "/ui/login"
    assert client.get("/ui/", follow_redirects=False).status_code == 303


def _pages(portal: Portal, device_id: str, serial: str) -> list[str]:
    return [
        "/ui/",
        "/ui/cas",
        *(f"/ui/cas/{name}" for name in portal.config.cas),
        "/ui/certificates",
        f"/ui/certificates?device={device_id}&status=valid&expiring_within=400&ca=devices",
        f"/ui/certificates/{serial}",
        "/ui/devices",
        f"/ui/devices?search={device_id[:6]}&status=active",
        f"/ui/devices/{device_id}",
        "/ui/approvals",
        "/ui/approvals?status=approved",
        "/ui/audit",
        f"/ui/audit?device={device_id}&outcome=ok&since=2020-01-01",
    ]


def test_a_read_user_sees_every_page_and_no_action(portal: Portal, device_id: str) -> None:
    serial = portal.certificate(device_id)
    client = portal.signed_in("viewer")
    for path in _pages(portal, device_id, serial):
        page = client.get(path)
        assert page.status_code == 200, f"{path}: {page.text}"
        assert page.headers["content-security-policy"].startswith("default-src 'none'")
        assert page.headers["x-frame-options"] == "DENY"
        # The only form that posts is sign-out.
        assert re.findall(r'<form method="post" action="([^"]+)"', page.text) == ["/ui/logout"]
        for action in ("Revoke", "Decommission", "Disable", "Approve"):
            assert f">{action}" not in page.text, f"{path} offers {action}"


@pytest.mark.parametrize(
    "path",
    ["/ui/certificates/{serial}/revoke", "/ui/devices/{device}/decommission"],
    ids=["fail/revoke", "fail/decommission"],
)
def test_a_read_users_forged_action_is_403_audited_and_changes_nothing(
    portal: Portal, device_id: str, path: str
) -> None:
    serial = portal.certificate(device_id)
    client = portal.signed_in("viewer")
    csrf = csrf_of(client, "/ui/")
    target = path.format(serial=serial, device=device_id)
    assert client.get(target).status_code == 403
    answer = client.post(target, data={"csrf": csrf, "reason": "keyCompromise"})
    assert answer.status_code == 403
    assert "lacks the 'admin' scope" in unescape(answer.text)
    record = portal.store.get_certificate(serial)
    assert record is not None and record.status is CertStatus.VALID
    refusals = portal.store.list_audit(actor="ui:viewer", outcome="refused", limit=1000).items
    assert any(target in e.detail for e in refusals)


@pytest.mark.parametrize(
    "csrf", [None, "", "forged"], ids=["fail/missing", "fail/empty", "fail/wrong"]
)
def test_an_action_without_the_sessions_csrf_token_is_403(
    portal: Portal, device_id: str, csrf: str | None
) -> None:
    serial = portal.certificate(device_id)
    client = portal.signed_in("ops")
    other = portal.signed_in("ops")  # another session's token is no good either
    data = {"reason": "superseded"} | ({} if csrf is None else {"csrf": csrf})
    if csrf == "forged":
        data["csrf"] = csrf_of(other, "/ui/")
    answer = client.post(f"/ui/certificates/{serial}/revoke", data=data)
    assert answer.status_code == 403 and "CSRF" in answer.text
    record = portal.store.get_certificate(serial)
    assert record is not None and record.status is CertStatus.VALID


def test_an_admin_revokes_a_certificate_after_confirming_and_it_is_audited(
    portal: Portal, device_id: str
) -> None:
    serial = portal.certificate(device_id)
    client = portal.signed_in("ops")
    detail = client.get(f"/ui/certificates/{serial}")
    assert f'href="/ui/certificates/{serial}/revoke"' in detail.text
    csrf = csrf_of(client, f"/ui/certificates/{serial}/revoke")
    answer = client.post(
        f"/ui/certificates/{serial}/revoke",
        data={"csrf": csrf, "reason": "keyCompromise"},
        follow_redirects=False,
    )
    assert answer.status_code == 303
    assert answer.headers["location"] == f"/ui/certificates/{serial}?done=revoked"
    record = portal.store.get_certificate(serial)
    assert record is not None and record.status is CertStatus.REVOKED
    assert record.revocation_reason == "keyCompromise"
    (entry,) = portal.store.list_audit(serial=serial, action="revoke").items
    assert (entry.actor, entry.outcome, entry.device_id) == ("ui:ops", "ok", device_id)
    again = client.post(f"/ui/certificates/{serial}/revoke", data={"csrf": csrf})
    assert again.status_code == 409 and "already revoked" in again.text


@pytest.mark.parametrize(
    ("actions", "status", "revoked"),
    [
        (["disable"], DeviceStatus.DISABLED, False),
        (["disable", "enable"], DeviceStatus.ACTIVE, False),
        (["decommission"], DeviceStatus.DECOMMISSIONED, True),
    ],
    ids=["ok/disable", "ok/enable-again", "ok/decommission"],
)
def test_device_actions_say_what_they_do_then_do_it(
    portal: Portal, device_id: str, actions: list[str], status: DeviceStatus, revoked: bool
) -> None:
    serial = portal.certificate(device_id)
    client = portal.signed_in("ops")
    for action in actions:
        confirm = client.get(f"/ui/devices/{device_id}/{action}")
        assert confirm.status_code == 200
        if action == "decommission":
            assert "cannot be enabled again" in confirm.text and serial in confirm.text
        answer = client.post(
            f"/ui/devices/{device_id}/{action}",
            data={"csrf": csrf_of(client, "/ui/")},
            follow_redirects=False,
        )
        assert answer.status_code == 303, answer.text
    device = portal.store.get_device(device_id)
    assert device is not None and device.status is status
    record = portal.store.get_certificate(serial)
    assert record is not None and (record.status is CertStatus.REVOKED) is revoked
    actors = {e.actor for e in portal.store.list_audit(device_id=device_id).items}
    assert "ui:ops" in actors


@pytest.mark.parametrize("approve", [True, False], ids=["ok/approve", "ok/deny"])
def test_an_admin_decides_a_pending_request(portal: Portal, device_id: str, approve: bool) -> None:
    now = dt.datetime.now(dt.UTC)
    pending = portal.store.add_pending(
        label="devices", device_id=device_id, csr_sha256="00" * 32, operation="simpleenroll",
        requested_by="test", now=now,
        audit=AuditEvent(at=now, actor="test", action="pending", outcome="ok"),
    )  # fmt: skip
    client = portal.signed_in("ops")
    listed = client.get("/ui/approvals")
    assert f'action="/ui/approvals/{pending.id}/approve"' in listed.text
    decision = "approve" if approve else "deny"
    answer = client.post(
        f"/ui/approvals/{pending.id}/{decision}",
        data={"csrf": csrf_of(client, "/ui/approvals"), "reason": "checked the serial label"},
        follow_redirects=False,
    )
    assert answer.status_code == 303
    (decided,) = [
        p for p in portal.store.list_pending(status=None, limit=1000).items if p.id == pending.id
    ]
    assert decided.status is (PendingStatus.APPROVED if approve else PendingStatus.DENIED)
    assert decided.decided_by == "ui:ops"


def test_the_dashboard_counts_equal_the_stores_records(portal: Portal, device_id: str) -> None:
    for n in range(3):
        portal.certificate(f"{device_id}-{n}")
    client = portal.signed_in("viewer")
    page = client.get("/ui/").text
    shown = {k: int(v) for k, v in re.findall(r'data-count="([a-z-]+)">(\d+)<', page)}
    devices = portal.store.list_devices(limit=1000).items
    assert shown["active"] == sum(d.status is DeviceStatus.ACTIVE for d in devices)
    assert shown["decommissioned"] == sum(d.status is DeviceStatus.DECOMMISSIONED for d in devices)
    now = dt.datetime.now(dt.UTC)
    certs = portal.store.list_certificates(limit=1000).items
    ops = [c for c in certs if not c.ca.startswith("bootstrap")]
    valid = [c for c in ops if c.status is CertStatus.VALID]
    valid_until = {
        d.device_id: max((c.not_after for c in valid if c.device_id == d.device_id), default=None)
        for d in devices
    }
    assert shown["valid"] == sum(u is not None and u > now for u in valid_until.values())
    enrolled = {c.device_id for c in ops}
    assert shown["never-enrolled"] == sum(d.device_id not in enrolled for d in devices)
    today = now.date().isoformat()
    issued_today = sum(c.issued_at.date() == now.date() for c in certs)
    assert f'<td>{today}</td><td class="num">{issued_today}</td>' in page


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/ui/cas/nope", 404),
        ("/ui/certificates/ABCDEF0123", 404),
        ("/ui/certificates/not-hex", 400),
        ("/ui/devices/no-such-device", 404),
        ("/ui/certificates?status=lost", 400),
        ("/ui/certificates?expiring_within=0", 400),
        ("/ui/audit?since=yesterday", 400),
        ("/ui/devices/x/explode", 404),
    ],
)
def test_unknown_things_and_bad_filters_are_refused_in_a_page(
    portal: Portal, path: str, status: int
) -> None:
    answer = portal.signed_in("ops").get(path)
    assert answer.status_code == status
    assert answer.headers["content-type"].startswith("text/html")


def test_the_ca_page_offers_its_chain_and_its_est_urls(portal: Portal) -> None:
    client = portal.signed_in("viewer")
    page = client.get("/ui/cas/devices").text
    assert f'value="{portal.config.est_url}/devices"' in page
    assert 'class="copy" data-copy-from=' in page
    chain = client.get("/ui/cas/devices/chain.pem")
    assert chain.status_code == 200
    assert chain.headers["content-disposition"] == 'attachment; filename="devices-chain.pem"'
    ca = portal.authority.cas["devices"]
    assert chain.content == b"".join(c.public_bytes(Encoding.PEM) for c in ca.chain)


# -- API tokens ---------------------------------------------------------------------------


def _create_token(client: TestClient, **form: str) -> httpx.Response:
    csrf = csrf_of(client, "/ui/tokens")
    return client.post("/ui/tokens", data={"csrf": csrf, **form}, follow_redirects=False)


def test_an_admin_creates_a_token_that_is_shown_once_and_works(
    portal: Portal, device_id: str
) -> None:
    client = portal.signed_in("ops")
    name = f"station-{device_id}"
    answer = _create_token(client, name=name, scope="provision", expires="30d")
    assert answer.status_code == 200, answer.text
    assert answer.headers["cache-control"] == "no-store"
    shown = re.findall(r'data-testid="new-token"', answer.text)
    token = re.search(r'id="new-token" type="text" readonly value="([^"]+)"', answer.text)
    assert shown and token is not None
    now = dt.datetime.now(dt.UTC)
    assert TokenService(portal.store).authenticate(token[1], now=now, use="test") == (
        f"token:{name}",
        frozenset({"provision"}),
    )
    listed = client.get("/ui/tokens").text
    assert token[1] not in listed
    row = re.search(rf"<tr>\s*<td>{re.escape(name)}</td>(.*?)</tr>", listed, re.S)
    assert row is not None
    assert "provision" in row[1] and ">active<" in row[1] and "by ui:ops" in row[1]
    expiry = (now + dt.timedelta(days=30)).strftime("%Y-%m-%d")
    assert expiry in row[1]
    (entry,) = portal.store.list_audit(action="token-create", actor="ui:ops", limit=1000).items[-1:]
    assert entry.detail == f"token {name} scopes=provision"
    assert all(token[1] not in e.detail for e in portal.store.list_audit(limit=1000).items)


@pytest.mark.parametrize(
    ("form", "status", "says"),
    [
        ({"name": "bad name", "scope": "read"}, 400, "token name"),
        ({"name": "ops", "scope": "read"}, 409, "a token named 'ops' exists"),
        ({"name": "fresh", "scope": "root"}, 400, "scope: one of provision, read, admin"),
        ({"name": "fresh", "scope": "read", "expires": "soon"}, 400, "expires: expected"),
    ],
    ids=["fail/name", "fail/exists", "fail/scope", "fail/expiry"],
)
def test_a_token_that_cannot_be_created_says_why_and_keeps_the_form(
    portal: Portal, form: dict[str, str], status: int, says: str
) -> None:
    client = portal.signed_in("ops")
    answer = _create_token(client, **form)
    assert answer.status_code == status
    assert says in unescape(answer.text)
    assert f'value="{form["name"]}"' in answer.text
    assert 'data-testid="new-token"' not in answer.text
    assert "fresh" not in {t.name for t in portal.store.list_tokens()}


def test_an_admin_revokes_a_token_after_confirming_and_it_is_audited(
    portal: Portal, device_id: str
) -> None:
    name = f"old-{device_id}"
    token = TokenService(portal.store).create(
        name, frozenset({"read"}), actor="test", now=dt.datetime.now(dt.UTC)
    )
    client = portal.signed_in("ops")
    assert f'href="/ui/tokens/{name}/revoke"' in client.get("/ui/tokens").text
    confirm = client.get(f"/ui/tokens/{name}/revoke")
    assert "is refused from now on" in confirm.text and "signed out" not in confirm.text
    answer = client.post(
        f"/ui/tokens/{name}/revoke",
        data={"csrf": csrf_of(client, "/ui/tokens")},
        follow_redirects=False,
    )
    assert (
        answer.status_code == 303 and answer.headers["location"] == "/ui/tokens?done=token-revoked"
    )
    (record,) = [t for t in portal.store.list_tokens() if t.name == name]
    assert record.revoked_at is not None
    entries = portal.store.list_audit(action="token-revoke", limit=1000).items
    assert (entries[-1].actor, entries[-1].detail) == ("ui:ops", f"token {name}")
    assert sign_in(portal.client(), token).status_code == 401
    listed = client.get("/ui/tokens").text
    assert f'href="/ui/tokens/{name}/revoke"' not in listed


def test_revoking_the_token_of_ones_own_session_signs_out(portal: Portal, device_id: str) -> None:
    name = f"self-{device_id}"
    token = TokenService(portal.store).create(
        name, frozenset({"admin"}), actor="test", now=dt.datetime.now(dt.UTC)
    )
    client = portal.client()
    sign_in(client, token)
    assert "you will be signed out" in client.get(f"/ui/tokens/{name}/revoke").text
    client.post(f"/ui/tokens/{name}/revoke", data={"csrf": csrf_of(client, "/ui/")})
    assert client.get("/ui/tokens", follow_redirects=False).status_code == 303


def test_a_read_user_has_no_tokens_page(portal: Portal) -> None:
    client = portal.signed_in("viewer")
    assert 'href="/ui/tokens"' not in client.get("/ui/").text
    assert client.get("/ui/tokens").status_code == 403
    forged = client.post(
        "/ui/tokens", data={"csrf": csrf_of(client, "/ui/"), "name": "mine", "scope": "admin"}
    )
    assert forged.status_code == 403
    assert "mine" not in {t.name for t in portal.store.list_tokens()}


# -- IoT Hub verification certificate ------------------------------------------------------


def test_an_admin_gets_the_iothub_verification_certificate_as_a_download(portal: Portal) -> None:
    client = portal.signed_in("ops")
    page = client.get("/ui/cas/devices").text
    assert 'action="/ui/cas/devices/iothub-verify"' in page
    answer = client.post(
        "/ui/cas/devices/iothub-verify",
        data={"csrf": csrf_of(client, "/ui/cas/devices"), "code": "5A7B9C"},
        follow_redirects=False,
    )
    assert answer.status_code == 200
    assert answer.headers["content-disposition"] == (
        'attachment; filename="devices-iothub-verification.pem"'
    )
    (cert,) = x509.load_pem_x509_certificates(answer.content)
    assert cert.subject.rfc4514_string() == "CN=5A7B9C"
    cert.verify_directly_issued_by(portal.authority.cas["devices"].cert)
    entry = portal.store.list_audit(action="iothub-verify", limit=1000).items[-1]
    assert entry.actor == "ui:ops" and entry.detail.endswith("for CN=5A7B9C, signed by devices")


@pytest.mark.parametrize(
    ("code", "status", "says"),
    [("", 400, "1-64 printable characters"), ("A" * 65, 400, "1-64 printable characters")],
    ids=["fail/empty", "fail/too-long"],
)
def test_a_bad_verification_code_is_refused_on_the_ca_page(
    portal: Portal, code: str, status: int, says: str
) -> None:
    client = portal.signed_in("ops")
    answer = client.post(
        "/ui/cas/devices/iothub-verify",
        data={"csrf": csrf_of(client, "/ui/cas/devices"), "code": code},
    )
    assert answer.status_code == status
    assert answer.headers["content-type"].startswith("text/html")
    assert says in unescape(answer.text) and 'id="iothub-code"' in answer.text


def test_a_read_user_sees_no_verification_form_and_cannot_forge_one(portal: Portal) -> None:
    client = portal.signed_in("viewer")
    assert "iothub-verify" not in client.get("/ui/cas/devices").text
    before = len(portal.store.list_audit(action="iothub-verify", limit=1000).items)
    forged = client.post(
        "/ui/cas/devices/iothub-verify", data={"csrf": csrf_of(client, "/ui/"), "code": "X1"}
    )
    assert forged.status_code == 403 and b"CERTIFICATE" not in forged.content
    assert len(portal.store.list_audit(action="iothub-verify", limit=1000).items) == before


# -- dashboard: renewal due, refusals; audit: order and chain ------------------------------


def test_the_dashboard_counts_refusals_per_day_by_code(portal: Portal, device_id: str) -> None:
    now = dt.datetime.now(dt.UTC)
    before = _refusals_today(portal.signed_in("viewer").get("/ui/").text)
    for detail in ("revoked: certificate 0A is revoked", "revoked: again", "API token is revoked"):
        portal.store.audit(
            AuditEvent(at=now, actor="t", action="enroll", outcome="refused", detail=detail)
        )
    page = portal.signed_in("viewer").get("/ui/").text
    after = _refusals_today(page)
    assert after.get("revoked", 0) - before.get("revoked", 0) == 2
    assert after.get("other", 0) - before.get("other", 0) == 1
    assert 'aria-label="Refusals per day by refusal code"' in page
    assert re.search(r'<li><span class="swatch s\d"></span>revoked</li>', page)
    assert re.search(rf'<rect class="bar s\d"[^>]*><title>[^<]*revoked {after["revoked"]}\b', page)


def _refusals_today(page: str) -> dict[str, int]:
    table = page[page.index('data-testid="refusals-table"') :]
    today = dt.datetime.now(dt.UTC).date().isoformat()
    row = table[table.index(f"<td>{today}</td>") :].split("</tr>")[0]
    return {c: int(n) for c, n in re.findall(r'data-code="([a-z-]+)">(\d+)<', row)}


def test_the_dashboard_shows_devices_whose_renewal_is_due(portal: Portal, device_id: str) -> None:
    page = portal.signed_in("viewer").get("/ui/").text
    shown = int(re.findall(r'data-count="renewal-due">(\d+)<', page)[0])
    states = portal.store.device_states(
        now=dt.datetime.now(dt.UTC),
        soon=dt.datetime.now(dt.UTC) + dt.timedelta(days=7),
        exclude_cas=["bootstrap"],
        renewal_fraction=0.8,
    )
    assert shown == sum(n for (_, state), n in states.items() if state == "renewal-due")
    assert "renewal due (past 80% of its lifetime)" in page


def test_the_audit_page_is_newest_first_unless_asked_otherwise(portal: Portal) -> None:
    client = portal.signed_in("viewer")
    ids = [int(i) for i in re.findall(r"<tr><td>(\d+)</td>", client.get("/ui/audit").text)]
    assert ids == sorted(ids, reverse=True) and len(ids) > 1
    oldest = client.get("/ui/audit?order=oldest").text
    assert [int(i) for i in re.findall(r"<tr><td>(\d+)</td>", oldest)][:2] == [1, 2]
    assert client.get("/ui/audit?order=sideways").status_code == 400


def test_the_audit_chain_is_verified_on_request_and_shown_on_the_audit_page(
    portal: Portal,
) -> None:
    client = portal.signed_in("viewer")
    checked = client.get("/ui/audit/chain")
    assert checked.status_code == 200
    status = re.search(r'data-testid="chain-status">([^<]*)<', checked.text)
    assert status is not None and status[1].startswith("Hash chain intact: ")
    entries = int(status[1].split(": ")[1].split()[0])
    assert entries == portal.store.verify_audit_chain()[0]
    assert status[1] in client.get("/ui/audit").text


def test_a_broken_audit_chain_is_shown_with_the_first_broken_entry(portal: Portal) -> None:
    client = portal.signed_in("viewer")
    data_dir = portal.config.data_dir
    with serverdb.connect(data_dir) as conn:
        (detail,) = conn.execute(sa.text("SELECT detail FROM audit_events WHERE id = 2")).one()
        conn.execute(sa.text("UPDATE audit_events SET detail = 'edited' WHERE id = 2"))
    try:
        page = client.get("/ui/audit/chain").text
    finally:
        with serverdb.connect(data_dir) as conn:
            conn.execute(sa.text("UPDATE audit_events SET detail = :d WHERE id = 2"), {"d": detail})
    assert 'role="alert" data-testid="chain-status">Hash chain broken at entry 2: ' in page
    assert "its content does not match its hash" in page
