"""Portal sign-in with OIDC (authorization code + PKCE S256), in-process, on both
backends, against the stand-in provider of ``oidcstandin`` on 127.0.0.1: the flow as
the provider sees it, the session it makes, and every way the ID token or the callback
is refused (audited, no session)."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from html import unescape
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from backends import server_database
from estkit.server.app import create_app
from estkit.server.config import ConfigError, ServerConfig, load_config
from estkit.server.oidc import OidcVerifier, parse_oidc_config
from estkit.server.portal.oidc_signin import FLOW_COOKIE, OidcSignIn, SignInRefused
from estkit.server.portal.session import SESSION_COOKIE, SessionSigner
from estkit.server.wiring import build_authority, open_store
from estkit.store import CertStatus, SqlStore
from estserver import free_port, run_estkit
from estutil import csr_der, new_key
from oidcstandin import Client, Provider, running
from portalutil import TestClient, csrf_of

PORTAL_CLIENT = "estkit-portal"
# Who may sign in: the people by their subject, and a factory's client (API only).
PEOPLE = {"alice": ["admin"], "bob": ["read"], "factory-station": ["provision"]}


@dataclass
class OidcPortal:
    config: ServerConfig
    store: SqlStore
    provider: Provider
    app: Any

    def client(self) -> TestClient:
        return TestClient(self.app)


def _oidc_table(provider: Provider, **extra: str) -> dict[str, Any]:
    return {
        "issuer": provider.issuer,
        "audience": "api://estkit",
        "jwks_url": f"{provider.issuer}/jwks",
        "portal_client_id": PORTAL_CLIENT,
        "clients": PEOPLE,
        **extra,
    }


@pytest.fixture(scope="module")
def provider() -> Iterator[Provider]:
    with running(Provider.fresh()) as running_provider:
        yield running_provider


@pytest.fixture(scope="module")
def portal(
    request: pytest.FixtureRequest,
    backend: str,
    provider: Provider,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[OidcPortal]:
    data_dir: Path = tmp_path_factory.mktemp("portal-oidc") / "data"
    database = server_database(request, backend)
    database_args = ["--database-url", database] if database else []
    run_estkit("server", "init", "--data-dir", data_dir, *database_args)
    config = replace(load_config(data_dir), api={"oidc": _oidc_table(provider)})
    provider.clients[PORTAL_CLIENT] = Client(
        PORTAL_CLIENT, redirect_uri=f"{config.public_url}/ui/login/oidc/callback"
    )
    store = open_store(config)
    yield OidcPortal(config, store, provider, create_app(config))
    store.close()


@pytest.fixture(autouse=True)
def fresh_provider(provider: Provider) -> Iterator[None]:
    """Each test starts with a provider that behaves."""
    provider.subject, provider.id_token_claims, provider.sign_with, provider.error = (
        "alice", {}, None, None,
    )  # fmt: skip
    provider.authorize_requests.clear()
    provider.token_requests.clear()
    yield


def to_provider(client: TestClient, *, next_path: str = "/ui/") -> httpx.Response:
    """The browser follows the sign-in button to the provider, which consents at once:
    its redirect back to the portal."""
    start = client.get(f"/ui/login/oidc?next={quote(next_path)}", follow_redirects=False)
    assert start.status_code == 303, start.text
    with httpx.Client(trust_env=False, timeout=10) as browser:
        back = browser.get(start.headers["location"], follow_redirects=False)
    assert back.status_code == 302, back.text
    return back


def callback(client: TestClient, back: httpx.Response, **change: str) -> httpx.Response:
    """The provider's redirect as the browser follows it (``change``: a forged query)."""
    location = urlsplit(back.headers["location"])
    query = dict(parse_qsl(location.query)) | change
    return client.get(location.path, params=query, follow_redirects=False)


def sign_in(portal: OidcPortal, subject: str = "alice") -> TestClient:
    portal.provider.subject = subject
    client = portal.client()
    answer = callback(client, to_provider(client))
    assert answer.status_code == 200, answer.text
    return client


def _refusals(portal: OidcPortal) -> list[str]:
    entries = portal.store.list_audit(outcome="refused", limit=1000, newest_first=True).items
    return [f"{e.actor} {e.detail}" for e in entries if "portal sign-in (OIDC)" in e.detail]


def test_the_sign_in_page_offers_the_provider(portal: OidcPortal) -> None:
    page = portal.client().get("/ui/login?next=/ui/devices").text
    assert 'href="/ui/login/oidc?next=%2Fui%2Fdevices">Sign in with 127.0.0.1</a>' in page


def test_a_person_signs_in_with_code_and_pkce_and_gets_their_scopes(portal: OidcPortal) -> None:
    client = portal.client()
    start = client.get("/ui/login/oidc?next=/ui/devices", follow_redirects=False)
    flow_cookie = next(
        c for c in start.headers.get_list("set-cookie") if c.startswith(f"{FLOW_COOKIE}=")
    )
    attributes = {a.strip().lower() for a in flow_cookie.split(";")[1:]}
    assert {"httponly", "secure", "samesite=lax", "path=/ui", "max-age=600"} <= attributes
    asked = dict(parse_qsl(urlsplit(start.headers["location"]).query))
    assert start.headers["location"].startswith(f"{portal.provider.issuer}/authorize?")
    assert asked["response_type"] == "code" and asked["scope"] == "openid"
    assert asked["client_id"] == PORTAL_CLIENT and asked["code_challenge_method"] == "S256"
    assert asked["redirect_uri"] == f"{portal.config.public_url}/ui/login/oidc/callback"
    assert len(asked["state"]) >= 43 and len(asked["nonce"]) >= 43
    with httpx.Client(trust_env=False, timeout=10) as browser:
        back = browser.get(start.headers["location"], follow_redirects=False)

    answer = callback(client, back)

    assert answer.status_code == 200
    assert '<meta http-equiv="refresh" content="0;url=/ui/devices">' in answer.text
    assert "Signed in as oidc:alice" in answer.text
    cookies = answer.headers.get_list("set-cookie")
    session = next(c for c in cookies if c.startswith(f"{SESSION_COOKIE}="))
    assert "samesite=strict" in session.lower() and "httponly" in session.lower()
    assert any(c.startswith(f'{FLOW_COOKIE}=""') and "Max-Age=0" in c for c in cookies)
    (redeemed,) = portal.provider.token_requests
    verifier = redeemed["code_verifier"]
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
    assert challenge.rstrip(b"=").decode() == asked["code_challenge"]
    assert redeemed["client_id"] == PORTAL_CLIENT and "client_secret" not in redeemed
    assert verifier not in start.headers["location"]  # only its challenge went out
    page = client.get("/ui/devices")
    assert page.status_code == 200
    identity = re.search(r'data-testid="identity">([^<]*)<small>\(([^)]*)\)', page.text)
    assert identity is not None and (identity[1].strip(), identity[2]) == ("oidc:alice", "admin")
    used = portal.store.list_audit(actor="oidc:alice", action="token-use", limit=1000).items
    assert used[-1].detail == "portal sign-in (OIDC)" and used[-1].outcome == "ok"


def test_an_oidc_admin_acts_as_ui_oidc_subject_and_a_reader_sees_no_action(
    portal: OidcPortal, device_id: str
) -> None:
    authority = build_authority(portal.config, portal.store)
    issued = authority.provision(
        "devices", csr_der(new_key(), device_id), device_id=device_id, actor="test",
        now=dt.datetime.now(dt.UTC), via="test",
    )  # fmt: skip
    serial = issued.record.serial
    reader = sign_in(portal, "bob")
    assert ">Revoke…<" not in reader.get(f"/ui/certificates/{serial}").text
    forged = reader.post(
        f"/ui/certificates/{serial}/revoke", data={"csrf": csrf_of(reader, "/ui/")}
    )
    assert forged.status_code == 403
    admin = sign_in(portal, "alice")
    answer = admin.post(
        f"/ui/certificates/{serial}/revoke",
        data={"csrf": csrf_of(admin, f"/ui/certificates/{serial}/revoke"), "reason": "superseded"},
        follow_redirects=False,
    )
    assert answer.status_code == 303
    record = portal.store.get_certificate(serial)
    assert record is not None and record.status is CertStatus.REVOKED
    (entry,) = portal.store.list_audit(serial=serial, action="revoke").items
    assert entry.actor == "ui:oidc:alice"


def _expired() -> dict[str, Any]:
    return {"exp": int(time.time()) - 3600, "iat": int(time.time()) - 7200}


@pytest.mark.parametrize(
    ("subject", "claims", "says"),
    [
        ("mallory", {}, "mallory may not use the portal"),
        ("factory-station", {}, "factory-station may not use the portal"),
        ("alice", {"nonce": "another-sign-in"}, "the ID token is refused: wrong nonce"),
        ("alice", {"nonce": None}, "the ID token is refused: token has no nonce claim"),
        ("alice", {"aud": "someone-else", "azp": None}, "wrong audience"),
        ("alice", {"aud": [PORTAL_CLIENT, "other"], "azp": "other"}, "another party (azp)"),
        ("alice", {"aud": [PORTAL_CLIENT, "other"], "azp": None}, "names no authorized party"),
        ("alice", {"iss": "https://idp.invalid"}, "wrong issuer"),
        ("alice", _expired(), "token expired"),
        ("alice", {"iat": None}, "token has no iat claim"),
        ("alice", {"sub": None}, "token has no sub claim"),
    ],
    ids=[
        "fail/subject-not-listed",
        "fail/subject-may-only-provision",
        "fail/wrong-nonce",
        "fail/no-nonce",
        "fail/wrong-audience",
        "fail/authorized-party-is-another",
        "fail/several-audiences-without-azp",
        "fail/wrong-issuer",
        "fail/expired",
        "fail/no-iat",
        "fail/no-sub",
    ],
)
def test_a_sign_in_whose_id_token_or_subject_is_refused_makes_no_session(
    portal: OidcPortal, subject: str, claims: dict[str, Any], says: str
) -> None:
    portal.provider.subject = subject
    portal.provider.id_token_claims = claims
    client = portal.client()
    answer = callback(client, to_provider(client))
    assert answer.status_code == 403
    assert says in unescape(answer.text)
    assert SESSION_COOKIE not in answer.cookies
    assert client.get("/ui/", follow_redirects=False).status_code == 303
    assert says in _refusals(portal)[0]


def test_an_id_token_signed_by_another_key_is_refused(portal: OidcPortal) -> None:
    portal.provider.sign_with = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    client = portal.client()
    answer = callback(client, to_provider(client))
    assert answer.status_code == 403 and "bad signature" in answer.text
    assert SESSION_COOKIE not in answer.cookies


def test_the_providers_refusal_is_shown_and_audited(portal: OidcPortal) -> None:
    portal.provider.error = "access_denied"
    client = portal.client()
    answer = callback(client, to_provider(client))
    assert answer.status_code == 403
    assert "the identity provider refused the sign-in (access_denied)" in answer.text
    assert portal.provider.token_requests == []
    assert "access_denied" in _refusals(portal)[0]


def test_a_callback_must_come_back_to_the_browser_that_started_the_sign_in(
    portal: OidcPortal,
) -> None:
    victim = portal.client()
    back = to_provider(victim)
    # Another browser (an attacker's page making the victim's browser, or the other way
    # round) without the flow's cookie:
    stranger = portal.client()
    answer = callback(stranger, back)
    assert answer.status_code == 403 and "no sign-in was started in this browser" in answer.text
    assert portal.provider.token_requests == []
    # The right browser with a forged state:
    answer = callback(victim, back, state="A" * 43)
    assert answer.status_code == 403 and "state does not match" in answer.text
    assert portal.provider.token_requests == []


def test_a_code_from_another_sign_in_fails_pkce_at_the_provider(portal: OidcPortal) -> None:
    """A code stolen from one sign-in, replayed in the attacker's own sign-in (whose
    state is right): the attacker's verifier does not match the victim's challenge."""
    victim, attacker = portal.client(), portal.client()
    stolen = dict(parse_qsl(urlsplit(to_provider(victim).headers["location"]).query))["code"]
    answer = callback(attacker, to_provider(attacker), code=stolen)
    assert answer.status_code == 403
    assert "did not redeem the code (invalid_grant)" in answer.text
    assert SESSION_COOKIE not in answer.cookies


def test_a_code_is_redeemed_once(portal: OidcPortal) -> None:
    client = portal.client()
    back = to_provider(client)
    assert callback(client, back).status_code == 200
    again = portal.client()
    flow = to_provider(again)  # a flow cookie of its own, to reach the redemption
    old_code = dict(parse_qsl(urlsplit(back.headers["location"]).query))["code"]
    answer = callback(again, flow, code=old_code)
    assert answer.status_code == 403 and "invalid_grant" in answer.text


def test_a_confidential_client_authenticates_with_its_secret_file(
    portal: OidcPortal, tmp_path: Path
) -> None:
    secret = tmp_path / "portal-client.secret"
    secret.write_text("s3cret with spaces & symbols\n")
    secret.chmod(0o600)
    confidential = "estkit-portal-web"
    portal.provider.clients[confidential] = Client(
        confidential,
        redirect_uri=f"{portal.config.public_url}/ui/login/oidc/callback",
        secret="s3cret with spaces & symbols",
    )
    table = _oidc_table(
        portal.provider, portal_client_id=confidential, portal_client_secret_file=str(secret)
    )
    app = create_app(replace(portal.config, api={"oidc": table}))
    portal.provider.id_token_claims = {}
    client = TestClient(app)
    answer = callback(client, to_provider(client))
    assert answer.status_code == 200, answer.text
    (redeemed,) = portal.provider.token_requests
    assert "client_id" not in redeemed  # it authenticated with Basic instead
    assert client.get("/ui/").status_code == 200


def test_an_unreachable_provider_is_a_503_on_the_sign_in_page(portal: OidcPortal) -> None:
    nobody = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    table = _oidc_table(portal.provider) | {"issuer": nobody, "jwks_url": f"{nobody}/jwks"}
    app = create_app(replace(portal.config, api={"oidc": table}))
    answer = TestClient(app).get("/ui/login/oidc", follow_redirects=False)
    assert answer.status_code == 503
    assert "the identity provider cannot be reached" in answer.text


# -- the pre-session cookie, pure ---------------------------------------------------------


def _sign_in_flow(provider: Provider) -> OidcSignIn:
    config = parse_oidc_config(_oidc_table(provider), Path("/"))
    assert config is not None

    def fetch(url: str) -> bytes:
        assert url == f"{provider.issuer}/.well-known/openid-configuration"
        return json.dumps(provider.discovery()).encode()

    return OidcSignIn(
        config=config,
        verifier=OidcVerifier(config),
        signer=SessionSigner(b"k" * 32),
        redirect_uri="https://est.test/ui/login/oidc/callback",
        fetch=fetch,
    )


NOW = dt.datetime(2026, 12, 10, 12, 0, tzinfo=dt.UTC)


def test_a_flow_cookie_names_its_return_page_until_it_expires(provider: Provider) -> None:
    sign_in_flow = _sign_in_flow(provider)
    _, cookie = sign_in_flow.start("/ui/devices?status=active", now=NOW)
    flow = sign_in_flow.flow(cookie, now=NOW + dt.timedelta(minutes=9))
    assert flow.next_path == "/ui/devices?status=active"
    with pytest.raises(SignInRefused, match="took too long"):
        sign_in_flow.flow(cookie, now=NOW + dt.timedelta(minutes=10))


@pytest.mark.parametrize(
    "forge",
    [
        lambda c: c[:-2] + ("AA" if not c.endswith("AA") else "BB"),
        lambda c: "x" + c,
        lambda c: c.replace(".", "..", 1),
        lambda c: "",
    ],
    ids=["fail/other-mac", "fail/other-flow", "fail/malformed", "fail/empty"],
)
def test_a_changed_flow_cookie_is_refused(provider: Provider, forge: Any) -> None:
    sign_in_flow = _sign_in_flow(provider)
    _, cookie = sign_in_flow.start("/ui/", now=NOW)
    with pytest.raises(SignInRefused):
        sign_in_flow.flow(forge(cookie), now=NOW)


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"issuer": "https://other.example"}, "names another issuer"),
        ({"token_endpoint": "http://idp.example/token"}, "token endpoint is not an https URL"),
        ({"authorization_endpoint": None}, "has no authorization endpoint"),
        ({"code_challenge_methods_supported": ["plain"]}, "does not support PKCE with S256"),
    ],
    ids=["fail/issuer", "fail/plain-http", "fail/no-endpoint", "fail/no-s256"],
)
def test_a_discovery_document_that_cannot_be_trusted_is_refused(
    provider: Provider, change: dict[str, Any], says: str
) -> None:
    config = parse_oidc_config(_oidc_table(provider), Path("/"))
    assert config is not None
    document = {k: v for k, v in (provider.discovery() | change).items() if v is not None}

    sign_in_flow = OidcSignIn(
        config=config,
        verifier=OidcVerifier(config),
        signer=SessionSigner(b"k" * 32),
        redirect_uri="https://est.test/ui/login/oidc/callback",
        fetch=lambda _url: json.dumps(document).encode(),
    )
    with pytest.raises(SignInRefused, match=says):
        sign_in_flow.start("/ui/", now=NOW)


def test_a_client_secret_file_that_is_empty_fails_at_start(
    portal: OidcPortal, tmp_path: Path
) -> None:
    secret = tmp_path / "empty.secret"
    secret.write_text("\n")
    table = _oidc_table(portal.provider, portal_client_secret_file=str(secret))
    # A secret others may read is refused before its content is looked at.
    secret.chmod(0o644)
    with pytest.raises(ConfigError, match=r"has mode 0644; only its owner may read"):
        create_app(replace(portal.config, api={"oidc": table}))
    secret.chmod(0o600)
    with pytest.raises(ConfigError, match=r"api\.oidc\.portal_client_secret_file: .* is empty"):
        create_app(replace(portal.config, api={"oidc": table}))
