"""The REST API (/api/v1) through a real ``estkit server run`` process.

One server for the module, configured with an OIDC provider whose JWKS file
and tokens the tests make themselves, a second EST label that needs manual
approval, and API tokens of every scope (plus a revoked and an expired one)
made with the operator CLI. Devices are provisioned through the API and then
talk EST over mTLS, as a factory station and the device in the field would.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from jwt.algorithms import ECAlgorithm

from backends import server_database
from estkit.pki.certs import fingerprint, serial_hex
from estkit.pki.keys import PrivateKey
from estkit.server.config import default_node_name
from estserver import EstServer, make_server
from estutil import Identity, csr_der, http, issued_cert, new_key, openssl_verify, post_csr

ISSUER = "https://login.example.test/00000000-aaaa-bbbb-cccc-000000000000/v2.0"
AUDIENCE = "api://estkit"
FACTORY_CLIENT = "11111111-2222-3333-4444-555555555555"  # a service principal: provision
READER_CLIENT = "66666666-7777-8888-9999-000000000000"  # a dashboard: read

ADMIN, READ, PROVISION, REVOKED, EXPIRED = (
    "ops-admin",
    "dashboard",
    "factory-line-1",
    "retired-station",
    "short-lived",
)
GATED = "gated"  # an EST label with manual approval


# -- an identity provider of our own -----------------------------------------------------------


@dataclass(frozen=True)
class Signer:
    """An ES256 key with its kid, as an identity provider holds it."""

    kid: str
    key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )

    def jwk(self) -> dict[str, Any]:
        data: dict[str, Any] = ECAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        return {**data, "kid": self.kid, "use": "sig"}

    def token(self, **overrides: Any) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "exp": now + 600,
            "nbf": now - 10,
            "iat": now - 10,
            "azp": FACTORY_CLIENT,
            "sub": "object-id-of-the-service-principal",
        }
        claims.update(overrides)
        return jwt.encode(claims, self.key, algorithm="ES256", headers={"kid": self.kid})


# Appended to the config `server init` writes: the approval label and the OIDC provider.
EXTRA_CONFIG = f"""
[labels.{GATED}]
ca = "devices"
profile = "operational"
approval = true
approval_retry_after = 5

[api.oidc]
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
jwks_file = "oidc/jwks.json"

[api.oidc.clients]
"{FACTORY_CLIENT}" = ["provision"]
"{READER_CLIENT}" = ["read"]
"""


@dataclass
class Api:
    server: EstServer
    client: httpx.Client
    tokens: dict[str, str]
    provider: Signer
    stranger: Signer  # same kid, a key the provider never published
    expired_after: float  # time.monotonic() when the short-lived token has surely expired

    def call(
        self,
        method: str,
        path: str,
        *,
        token: str | None,
        json: Any = None,
        params: dict[str, str] | None = None,
    ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        return self.client.request(
            method, f"{self.server.origin}/api/v1{path}", headers=headers, json=json, params=params
        )

    def get(self, path: str, *, token: str | None = None, **params: str) -> Any:
        response = self.call("GET", path, token=token or self.tokens[READ], params=params)
        assert response.status_code == 200, response.text
        return response.json()


@pytest.fixture(scope="module")
def api(
    request: pytest.FixtureRequest, backend: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Api]:
    server = make_server(
        tmp_path_factory.mktemp("api"), database_url=server_database(request, backend)
    )
    provider, stranger = Signer("idp-key-1"), Signer("idp-key-1")
    (server.data_dir / "oidc").mkdir()
    (server.data_dir / "oidc" / "jwks.json").write_text(json.dumps({"keys": [provider.jwk()]}))
    config = server.data_dir / "estkit.toml"
    config.write_text(config.read_text() + EXTRA_CONFIG)

    def create(name: str, scope: str, *extra: str) -> str:
        return server.cli(
            "token", "create", "--name", name, "--scope", scope, *extra
        ).stdout.strip()

    tokens = {
        ADMIN: create(ADMIN, "admin"),
        READ: create(READ, "read"),
        PROVISION: create(PROVISION, "provision"),
        REVOKED: create(REVOKED, "provision"),
        EXPIRED: create(EXPIRED, "read", "--expires", "1s"),
    }
    expired_after = time.monotonic() + 2
    server.cli("token", "revoke", REVOKED)
    server.start()
    try:
        with http(server.root_pem) as client:
            yield Api(server, client, tokens, provider, stranger, expired_after)
    finally:
        server.stop()


# -- helpers -----------------------------------------------------------------------------------


def csr_pem(key: PrivateKey, cn: str) -> str:
    return x509.load_der_x509_csr(csr_der(key, cn)).public_bytes(Encoding.PEM).decode()


def provision(
    api: Api,
    device_id: str,
    *,
    label: str = "bootstrap",
    token: str | None = None,
    key: PrivateKey | None = None,
    **body: Any,
) -> httpx.Response:
    key = key or new_key()
    return api.call(
        "POST",
        f"/cas/{label}/certificates",
        token=token or api.tokens[PROVISION],
        json={"device_id": device_id, "csr": csr_pem(key, device_id), **body},
    )


def provisioned(api: Api, device_id: str, directory: Path, **kwargs: Any) -> Identity:
    """A key and the certificate the API signed for it, on disk for mTLS."""
    key = new_key()
    response = provision(api, device_id, key=key, **kwargs)
    assert response.status_code == 201, response.text
    cert = x509.load_pem_x509_certificate(response.json()["certificate"].encode())
    return Identity.write(directory, key, cert)


def est_enroll(
    api: Api, identity: Identity, device_id: str, *, label: str = "", der: bytes | None = None
) -> httpx.Response:
    url = f"{api.server.url}/{label}/simpleenroll" if label else f"{api.server.url}/simpleenroll"
    with http(api.server.root_pem, identity) as client:
        return post_csr(client, url, der if der is not None else csr_der(new_key(), device_id))


def est_reenroll(api: Api, identity: Identity, device_id: str) -> httpx.Response:
    with http(api.server.root_pem, identity) as client:
        return post_csr(client, f"{api.server.url}/simplereenroll", csr_der(new_key(), device_id))


def operational(api: Api, bootstrap: Identity, device_id: str, directory: Path) -> Identity:
    """The field step: the first operational certificate over EST, with the bootstrap one."""
    key = new_key()
    response = est_enroll(api, bootstrap, device_id, der=csr_der(key, device_id))
    return Identity.write(directory, key, issued_cert(response))


def walk(api: Api, path: str, key: str, **params: str) -> tuple[list[Any], int]:
    """Every item of a paged listing, following ``next``; and the number of pages."""
    items: list[Any] = []
    cursor: str | None = None
    for pages in range(1, 1000):
        page = api.get(path, **params, **({"cursor": cursor} if cursor else {}))
        items += [item[key] for item in page["items"]]
        cursor = page["next"]
        if cursor is None:
            return items, pages
    raise AssertionError(f"{path}: more than 1000 pages")


def one_line_detail(response: httpx.Response) -> str:
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail and "\n" not in detail, response.text
    return detail


def walk_audit(api: Api, **params: str) -> list[dict[str, Any]]:
    """The matching audit entries, oldest first, from every page."""
    entries: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(1000):
        query = {"limit": "1000", **params, **({"cursor": cursor} if cursor else {})}
        page = api.get("/audit", token=api.tokens[ADMIN], **query)
        entries += page["items"]
        cursor = page["next"]
        if cursor is None:
            return entries
    raise AssertionError("audit: more than 1000 pages")


# -- the documentation -------------------------------------------------------------------------


def test_swagger_ui_is_served_from_local_assets_without_internet(api: Api) -> None:
    page = api.client.get(f"{api.server.origin}/api/docs")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert '<script src="/api/static/swagger-ui-bundle.js">' in page.text
    assert "/api/openapi.json" in page.text
    assert "cdn" not in page.text and "https://" not in page.text

    bundle = api.client.get(f"{api.server.origin}/api/static/swagger-ui-bundle.js")
    assert bundle.status_code == 200
    assert "javascript" in bundle.headers["content-type"]
    assert b"SwaggerUIBundle" in bundle.content
    css = api.client.get(f"{api.server.origin}/api/static/swagger-ui.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")


def test_openapi_document_lists_every_route_with_bearer_auth(api: Api) -> None:
    response = api.client.get(f"{api.server.origin}/api/openapi.json")
    assert response.status_code == 200
    document = response.json()
    assert set(document["paths"]) == {
        f"/api/v1{p}"
        for p in (
            "/cas",
            "/cas/{label}/certificates",
            "/devices",
            "/devices/{device_id}",
            "/devices/{device_id}/disable",
            "/devices/{device_id}/enable",
            "/devices/{device_id}/decommission",
            "/certificates",
            "/certificates/{serial}",
            "/certificates/{serial}/revoke",
            "/audit",
            "/pending",
            "/pending/{request_id}/approve",
            "/pending/{request_id}/deny",
            "/nodes",
        )
    }
    schemes = document["components"]["securitySchemes"]
    assert [s["scheme"] for s in schemes.values()] == ["bearer"]


# -- authentication and scopes -----------------------------------------------------------------


def _read(api: Api, token: str | None, device_id: str) -> httpx.Response:
    return api.call("GET", "/cas", token=token)


def _provision(api: Api, token: str | None, device_id: str) -> httpx.Response:
    return api.call(
        "POST",
        "/cas/bootstrap/certificates",
        token=token,
        json={"device_id": device_id, "csr": csr_pem(new_key(), device_id)},
    )


def _revoke(api: Api, token: str | None, device_id: str) -> httpx.Response:
    response = provision(api, device_id, token=api.tokens[ADMIN])
    assert response.status_code == 201, response.text
    serial = response.json()["serial"]
    return api.call(
        "POST", f"/certificates/{serial}/revoke", token=token, json={"reason": "keyCompromise"}
    )


def _bearer(api: Api, kind: str) -> str | None:
    """The bearer token of each kind the table uses."""
    if kind == "expired":
        time.sleep(max(0.0, api.expired_after - time.monotonic()))
    now = int(time.time())
    makers: dict[str, Callable[[], str | None]] = {
        "none": lambda: None,
        "admin": lambda: api.tokens[ADMIN],
        "read": lambda: api.tokens[READ],
        "provision": lambda: api.tokens[PROVISION],
        "revoked": lambda: api.tokens[REVOKED],
        "expired": lambda: api.tokens[EXPIRED],
        "garbage": lambda: "not-a-token",
        "unknown": lambda: "estk_" + secrets.token_urlsafe(32),
        "truncated": lambda: api.tokens[ADMIN][:-4],
        "jwt/factory": lambda: api.provider.token(),
        "jwt/reader": lambda: api.provider.token(azp=READER_CLIENT),
        "jwt/wrong-issuer": lambda: api.provider.token(iss=ISSUER + "/"),
        "jwt/wrong-audience": lambda: api.provider.token(aud="api://someone-else"),
        "jwt/bad-signature": lambda: api.stranger.token(),
        "jwt/expired": lambda: api.provider.token(exp=now - 3600, iat=now - 7200, nbf=now - 7200),
        "jwt/client-not-allowed": lambda: api.provider.token(azp="another-service-principal"),
    }
    return makers[kind]()


Call = Callable[[Api, str | None, str], httpx.Response]
AUTH_CASES: list[tuple[str, str, Call, int]] = [
    ("ok/read-token-reads", "read", _read, 200),
    ("ok/admin-token-reads", "admin", _read, 200),
    ("ok/provision-token-provisions", "provision", _provision, 201),
    ("ok/admin-token-provisions", "admin", _provision, 201),
    ("ok/admin-token-revokes", "admin", _revoke, 200),
    ("ok/jwt-of-provision-client-provisions", "jwt/factory", _provision, 201),
    ("ok/jwt-of-read-client-reads", "jwt/reader", _read, 200),
    ("fail/no-token", "none", _read, 401),
    ("fail/no-token-provisions", "none", _provision, 401),
    ("fail/malformed-token", "garbage", _read, 401),
    ("fail/unknown-token", "unknown", _read, 401),
    ("fail/truncated-token", "truncated", _read, 401),
    ("fail/revoked-token", "revoked", _provision, 401),
    ("fail/expired-token", "expired", _read, 401),
    ("fail/read-token-provisions", "read", _provision, 403),
    ("fail/provision-token-revokes", "provision", _revoke, 403),
    ("fail/read-token-revokes", "read", _revoke, 403),
    ("fail/jwt-of-read-client-provisions", "jwt/reader", _provision, 403),
    ("fail/jwt-wrong-issuer", "jwt/wrong-issuer", _provision, 401),
    ("fail/jwt-wrong-audience", "jwt/wrong-audience", _provision, 401),
    ("fail/jwt-bad-signature", "jwt/bad-signature", _provision, 401),
    ("fail/jwt-expired", "jwt/expired", _provision, 401),
    ("fail/jwt-client-not-allowed", "jwt/client-not-allowed", _provision, 401),
]


@pytest.mark.parametrize(
    ("kind", "call", "status"), [c[1:] for c in AUTH_CASES], ids=[c[0] for c in AUTH_CASES]
)
def test_api_admits_only_valid_tokens_with_the_scope_the_route_needs(
    api: Api, device_id: str, kind: str, call: Call, status: int
) -> None:
    token = _bearer(api, kind)

    response = call(api, token, device_id)

    assert response.status_code == status, response.text
    if status == 401:
        assert response.headers["www-authenticate"] == 'Bearer realm="estkit"'
    if status >= 400:
        detail = one_line_detail(response)
        assert token is None or token not in detail


def test_other_authorization_schemes_are_refused_with_a_bearer_challenge(api: Api) -> None:
    response = api.client.get(
        f"{api.server.origin}/api/v1/cas", headers={"Authorization": "Basic ZGV2OnNlY3JldA=="}
    )
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Bearer realm="estkit"'
    one_line_detail(response)


@pytest.mark.parametrize("body", [b"{not json", b"[]"], ids=["not-json", "json-of-wrong-shape"])
@pytest.mark.parametrize(
    "path",
    [
        "/cas/bootstrap/certificates",
        "/devices",
        "/certificates/7E57AB1E/revoke",
        "/pending/1/approve",
    ],
    ids=["fail/provision", "fail/register-device", "fail/revoke", "fail/approve"],
)
def test_unauthenticated_post_is_401_before_its_body_is_looked_at(
    api: Api, path: str, body: bytes
) -> None:
    response = api.client.post(
        f"{api.server.origin}/api/v1{path}",
        content=body,
        headers={"Content-Type": "application/json"},
    )

    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == 'Bearer realm="estkit"'
    one_line_detail(response)


@pytest.mark.parametrize(
    ("kind", "actor", "outcome", "detail"),
    [
        ("read", f"token:{READ}", "ok", "GET /api/v1/cas"),
        ("revoked", f"token:{REVOKED}", "refused", "API token is revoked"),
        ("expired", f"token:{EXPIRED}", "refused", "API token has expired"),
        ("jwt/reader", f"oidc:{READER_CLIENT}", "ok", "GET /api/v1/cas"),
        ("jwt/wrong-audience", "oidc", "refused", "wrong audience (GET /api/v1/cas)"),
        ("jwt/bad-signature", "oidc", "refused", "bad signature (GET /api/v1/cas)"),
    ],
    ids=[
        "ok/token-use",
        "fail/revoked-token-use",
        "fail/expired-token-use",
        "ok/jwt-use",
        "fail/jwt-wrong-audience",
        "fail/jwt-bad-signature",
    ],
)
def test_every_token_use_and_refusal_is_in_the_audit_log(
    api: Api, kind: str, actor: str, outcome: str, detail: str
) -> None:
    before = {e["id"] for e in walk_audit(api, actor=actor)}

    api.call("GET", "/cas", token=_bearer(api, kind))

    new = [e for e in walk_audit(api, actor=actor) if e["id"] not in before]
    assert [(e["action"], e["outcome"], e["detail"]) for e in new] == [
        ("token-use", outcome, detail)
    ]


def test_scope_refusal_is_audited_with_the_scope_and_route(api: Api, device_id: str) -> None:
    before = {e["id"] for e in walk_audit(api, actor=f"token:{READ}")}

    assert _provision(api, api.tokens[READ], device_id).status_code == 403

    new = [e for e in walk_audit(api, actor=f"token:{READ}") if e["id"] not in before]
    refusals = [e for e in new if e["outcome"] == "refused"]
    assert [e["detail"] for e in refusals] == [
        "scope provision needed for /api/v1/cas/bootstrap/certificates"
    ]


def test_jwt_client_provisions_as_its_oidc_identity(api: Api, device_id: str) -> None:
    response = _provision(api, api.provider.token(), device_id)

    assert response.status_code == 201, response.text
    serial = response.json()["serial"]
    actor = f"oidc:{FACTORY_CLIENT}"
    assert api.get(f"/certificates/{serial}")["requested_by"] == actor
    [issued] = walk_audit(api, device_id=device_id)
    assert (issued["actor"], issued["action"], issued["outcome"], issued["serial"]) == (
        actor,
        "api-provision",
        "ok",
        serial,
    )


# -- CAs and provisioning ----------------------------------------------------------------------


def test_cas_lists_each_ca_with_its_chain_fingerprint_and_est_labels(api: Api) -> None:
    cas = {ca["name"]: ca for ca in api.get("/cas")}

    assert set(cas) == {"root", "devices", "bootstrap"}
    root = x509.load_pem_x509_certificate(api.server.root_pem.read_bytes())
    for name, ca in cas.items():
        cert = x509.load_pem_x509_certificate(
            (api.server.data_dir / "ca" / f"{name}.pem").read_bytes()
        )
        chain = x509.load_pem_x509_certificates(ca["chain"].encode())
        assert chain[0] == cert and chain[-1] == root
        assert ca["fingerprint_sha256"] == fingerprint(cert)
        assert ca["subject"] == cert.subject.rfc4514_string()
        assert dt.datetime.fromisoformat(ca["not_after"]) == cert.not_valid_after_utc
    labels = {label["name"]: label for label in cas["devices"]["labels"]}
    node = default_node_name()  # this one node's, in the default region
    assert labels == {
        "devices": {
            "name": "devices",
            "est_url": f"{api.server.url}/devices",
            "est_urls": [{"region": "default", "node": node, "url": f"{api.server.url}/devices"}],
            "profile": "operational",
            "approval": False,
        },
        GATED: {
            "name": GATED,
            "est_url": f"{api.server.url}/{GATED}",
            "est_urls": [{"region": "default", "node": node, "url": f"{api.server.url}/{GATED}"}],
            "profile": "operational",
            "approval": True,
        },
    }
    assert cas["root"]["labels"] == [] and cas["bootstrap"]["labels"] == []


@pytest.mark.parametrize(
    ("label", "ca", "profile"),
    [("bootstrap", "bootstrap", "bootstrap"), ("devices", "devices", "operational")],
    ids=["ok/bootstrap-label", "ok/est-label"],
)
def test_provision_signs_the_csr_and_returns_a_chain_that_verifies_it(
    api: Api, device_id: str, tmp_path: Path, label: str, ca: str, profile: str
) -> None:
    key = new_key()
    response = provision(api, device_id, label=label, key=key)

    assert response.status_code == 201, response.text
    body = response.json()
    cert = x509.load_pem_x509_certificate(body["certificate"].encode())
    chain = x509.load_pem_x509_certificates(body["chain"].encode())
    assert cert.subject.rfc4514_string() == f"CN={device_id}"
    assert cert.public_key() == key.public_key()
    assert body["serial"] == serial_hex(cert.serial_number)
    assert (body["device_id"], body["ca"]) == (device_id, ca)
    assert dt.datetime.fromisoformat(body["not_after"]) == cert.not_valid_after_utc
    assert dt.datetime.fromisoformat(body["not_before"]) == cert.not_valid_before_utc
    assert chain[0].subject == cert.issuer
    assert chain[-1] == x509.load_pem_x509_certificate(api.server.root_pem.read_bytes())
    (tmp_path / "cert.pem").write_text(body["certificate"])
    (tmp_path / "chain.pem").write_text(body["chain"])
    verified = openssl_verify(api.server.root_pem, tmp_path / "chain.pem", tmp_path / "cert.pem")
    assert verified.returncode == 0, verified.stdout + verified.stderr

    record = api.get(f"/certificates/{body['serial']}")
    assert (record["label"], record["profile"]) == (
        None if label == "bootstrap" else label,
        profile,
    )
    assert (record["requested_via"], record["requested_by"]) == (
        "api-provision",
        f"token:{PROVISION}",
    )


@pytest.mark.parametrize(
    ("label", "validity", "lifetime"),
    [
        ("bootstrap", "2d", dt.timedelta(days=2)),
        ("devices", "12h", dt.timedelta(hours=12)),
        ("bootstrap", None, dt.timedelta(days=3650)),
        ("devices", "400d", dt.timedelta(days=30)),
    ],
    ids=[
        "ok/bootstrap-shortened",
        "ok/operational-shortened",
        "ok/profile-default",
        "ok/longer-than-profile-is-capped",
    ],
)
def test_provision_validity_may_only_shorten_the_profiles(
    api: Api, device_id: str, label: str, validity: str | None, lifetime: dt.timedelta
) -> None:
    body = {"validity": validity} if validity else {}
    asked = dt.datetime.now(dt.UTC).replace(microsecond=0)

    response = provision(api, device_id, label=label, **body)

    assert response.status_code == 201, response.text
    cert = x509.load_pem_x509_certificate(response.json()["certificate"].encode())
    # notBefore may be backdated for clock skew; notAfter counts from the request.
    after = cert.not_valid_after_utc - asked
    assert lifetime <= after <= lifetime + dt.timedelta(seconds=30), after


def test_provision_sans_replace_the_csrs(api: Api, device_id: str) -> None:
    names = [f"{device_id}.factory.test", "line-1.factory.test"]

    response = provision(api, device_id, sans=names)

    assert response.status_code == 201, response.text
    cert = x509.load_pem_x509_certificate(response.json()["certificate"].encode())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == names
    assert api.get(f"/certificates/{response.json()['serial']}")["sans"] == names


def _garbage_csr(device_id: str) -> dict[str, Any]:
    return {"device_id": device_id, "csr": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n"}


def _other_cn(device_id: str) -> dict[str, Any]:
    return {"device_id": device_id, "csr": csr_pem(new_key(), device_id + "-other")}


def _valid(device_id: str, **extra: Any) -> dict[str, Any]:
    return {"device_id": device_id, "csr": csr_pem(new_key(), device_id), **extra}


PROVISION_FAILURES: list[tuple[str, str, Callable[[str], dict[str, Any]], int]] = [
    ("fail/csr-cn-mismatch", "bootstrap", _other_cn, 403),
    ("fail/garbage-csr", "bootstrap", _garbage_csr, 400),
    ("fail/unknown-label", "no-such-label", _valid, 404),
    ("fail/validity-not-a-duration", "bootstrap", lambda d: _valid(d, validity="soon"), 400),
    ("fail/validity-zero", "bootstrap", lambda d: _valid(d, validity="0d"), 400),
]


@pytest.mark.parametrize(
    ("label", "body", "status"),
    [c[1:] for c in PROVISION_FAILURES],
    ids=[c[0] for c in PROVISION_FAILURES],
)
def test_provision_refuses_a_bad_request_with_a_one_line_reason(
    api: Api, device_id: str, label: str, body: Callable[[str], dict[str, Any]], status: int
) -> None:
    response = api.call(
        "POST", f"/cas/{label}/certificates", token=api.tokens[PROVISION], json=body(device_id)
    )

    assert response.status_code == status, response.text
    one_line_detail(response)
    assert api.get("/certificates", device_id=device_id)["items"] == []


@pytest.mark.parametrize(
    "body",
    [
        {"csr": "x"},
        {"device_id": "", "csr": "x"},
        {"device_id": "d" * 65, "csr": "x"},
        {"device_id": "dev", "csr": "x", "sans": "not-a-list"},
    ],
    ids=["fail/no-device-id", "fail/empty-device-id", "fail/device-id-too-long", "fail/sans-type"],
)
def test_provision_validates_the_body(api: Api, body: dict[str, Any]) -> None:
    response = api.call(
        "POST", "/cas/bootstrap/certificates", token=api.tokens[PROVISION], json=body
    )
    assert response.status_code == 422, response.text


def test_factory_bootstrap_from_the_api_then_enrolls_and_renews_over_est(
    api: Api, device_id: str, tmp_path: Path
) -> None:
    bootstrap = provisioned(api, device_id, tmp_path / "bootstrap")

    op = operational(api, bootstrap, device_id, tmp_path / "op")
    renewed = issued_cert(est_reenroll(api, op, device_id))

    devices_ca = x509.load_pem_x509_certificate(
        (api.server.data_dir / "ca" / "devices.pem").read_bytes()
    )
    assert op.cert.issuer == devices_ca.subject == renewed.issuer
    detail = api.get(f"/devices/{device_id}")
    assert detail["status"] == "active"
    by_serial = {c["serial"]: c for c in detail["certificates"]}
    assert set(by_serial) == {
        serial_hex(c.serial_number) for c in (bootstrap.cert, op.cert, renewed)
    }
    assert by_serial[serial_hex(bootstrap.cert.serial_number)]["requested_via"] == "api-provision"
    assert by_serial[serial_hex(renewed.serial_number)]["replaces"] == serial_hex(
        op.cert.serial_number
    )


# -- devices -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exists", "body", "status"),
    [
        (False, {"enrollment_secret": True}, 201),
        (False, {}, 201),
        (True, {}, 409),
        (False, {"device_id": ""}, 422),
        (False, {"device_id": "d" * 65}, 422),
    ],
    ids=[
        "ok/with-enrollment-secret",
        "ok/without-secret",
        "fail/already-registered",
        "fail/empty-id",
        "fail/id-too-long",
    ],
)
def test_register_device(
    api: Api, device_id: str, exists: bool, body: dict[str, Any], status: int
) -> None:
    if exists:
        first = api.call("POST", "/devices", token=api.tokens[ADMIN], json={"device_id": device_id})
        assert first.status_code == 201, first.text

    response = api.call(
        "POST", "/devices", token=api.tokens[PROVISION], json={"device_id": device_id, **body}
    )

    assert response.status_code == status, response.text
    if status != 201:
        return
    created = response.json()
    assert created["device"]["device_id"] == device_id
    assert created["device"]["status"] == "active"
    if body.get("enrollment_secret"):
        assert isinstance(created["enrollment_secret"], str)
        assert len(created["enrollment_secret"]) >= 16
    else:
        assert created["enrollment_secret"] is None
    detail = api.get(f"/devices/{device_id}")
    assert (detail["device_id"], detail["status"], detail["certificates"]) == (
        device_id,
        "active",
        [],
    )


def test_enrollment_secret_from_the_api_enrolls_once_over_est(api: Api, device_id: str) -> None:
    response = api.call(
        "POST",
        "/devices",
        token=api.tokens[PROVISION],
        json={"device_id": device_id, "enrollment_secret": True},
    )
    secret = response.json()["enrollment_secret"]

    with http(api.server.root_pem) as client:
        url = f"{api.server.url}/simpleenroll"
        first = post_csr(client, url, csr_der(new_key(), device_id), auth=(device_id, secret))
        second = post_csr(client, url, csr_der(new_key(), device_id), auth=(device_id, secret))

    assert issued_cert(first).subject.rfc4514_string() == f"CN={device_id}"
    assert second.status_code in (401, 403), second.text


def test_get_unknown_device_is_404(api: Api) -> None:
    response = api.call("GET", "/devices/no-such-device", token=api.tokens[READ])
    assert response.status_code == 404
    assert "no-such-device" in one_line_detail(response)


@pytest.mark.parametrize("action", ["disable", "enable", "decommission"], ids=lambda a: f"fail/{a}")
def test_status_change_of_unknown_device_is_404(api: Api, action: str) -> None:
    response = api.call("POST", f"/devices/no-such-device/{action}", token=api.tokens[ADMIN])
    assert response.status_code == 404
    one_line_detail(response)


@pytest.mark.parametrize(
    "token", [PROVISION, READ], ids=["fail/provision-token", "fail/read-token"]
)
def test_status_change_needs_the_admin_scope(api: Api, device_id: str, token: str) -> None:
    assert provision(api, device_id).status_code == 201
    response = api.call("POST", f"/devices/{device_id}/disable", token=api.tokens[token])
    assert response.status_code == 403
    assert api.get(f"/devices/{device_id}")["status"] == "active"


def test_disabled_device_is_refused_by_est_and_api_until_enabled(
    api: Api, device_id: str, tmp_path: Path
) -> None:
    bootstrap = provisioned(api, device_id, tmp_path / "bootstrap")

    disabled = api.call("POST", f"/devices/{device_id}/disable", token=api.tokens[ADMIN])
    assert disabled.status_code == 200, disabled.text
    assert disabled.json()["device"]["status"] == "disabled"
    assert disabled.json()["revoked"] == []
    assert est_enroll(api, bootstrap, device_id).status_code == 403
    assert provision(api, device_id).status_code == 403
    listed, _ = walk(api, "/devices", "device_id", status="disabled")
    assert device_id in listed

    enabled = api.call("POST", f"/devices/{device_id}/enable", token=api.tokens[ADMIN])
    assert enabled.status_code == 200, enabled.text
    assert enabled.json()["device"]["status"] == "active"
    issued_cert(est_enroll(api, bootstrap, device_id))
    assert api.get(f"/devices/{device_id}")["certificates"][0]["status"] == "valid"


def test_decommission_revokes_every_certificate_and_est_refuses_the_device(
    api: Api, device_id: str, tmp_path: Path
) -> None:
    bootstrap = provisioned(api, device_id, tmp_path / "bootstrap")
    op = operational(api, bootstrap, device_id, tmp_path / "op")
    serials = {serial_hex(i.cert.serial_number) for i in (bootstrap, op)}

    response = api.call("POST", f"/devices/{device_id}/decommission", token=api.tokens[ADMIN])

    assert response.status_code == 200, response.text
    assert response.json()["device"]["status"] == "decommissioned"
    assert set(response.json()["revoked"]) == serials
    detail = api.get(f"/devices/{device_id}")
    assert detail["status"] == "decommissioned"
    assert {(c["serial"], c["status"], c["revocation_reason"]) for c in detail["certificates"]} == {
        (s, "revoked", "cessationOfOperation") for s in serials
    }
    assert est_enroll(api, bootstrap, device_id).status_code == 403
    assert est_reenroll(api, op, device_id).status_code == 403
    assert provision(api, device_id).status_code == 403
    again = api.call("POST", f"/devices/{device_id}/enable", token=api.tokens[ADMIN])
    assert again.status_code == 409
    one_line_detail(again)


# -- certificates ------------------------------------------------------------------------------


@pytest.fixture
def issued(api: Api, device_id: str) -> dict[str, str]:
    """Three certificates of one device: name → serial."""
    serials = {}
    for name, label, validity in (
        ("boot", "bootstrap", None),
        ("short", "devices", "1d"),
        ("revoked", "bootstrap", None),
    ):
        body = {"validity": validity} if validity else {}
        response = provision(api, device_id, label=label, token=api.tokens[ADMIN], **body)
        assert response.status_code == 201, response.text
        serials[name] = response.json()["serial"]
    revoked = api.call(
        "POST",
        f"/certificates/{serials['revoked']}/revoke",
        token=api.tokens[ADMIN],
        json={"reason": "superseded"},
    )
    assert revoked.status_code == 200, revoked.text
    return serials


def _in_days(days: int) -> str:
    return (dt.datetime.now(dt.UTC) + dt.timedelta(days=days)).isoformat()


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, {"boot", "short", "revoked"}),
        ({"status": "revoked"}, {"revoked"}),
        ({"status": "valid"}, {"boot", "short"}),
        ({"ca": "devices"}, {"short"}),
        ({"ca": "bootstrap"}, {"boot", "revoked"}),
        ({"ca": "root"}, set()),
        ({"expires_before": _in_days(2)}, {"short"}),
        ({"expires_before": _in_days(2).replace("+00:00", "Z")}, {"short"}),
        ({"expires_before": _in_days(-1)}, set()),
        ({"expires_after": _in_days(2)}, {"boot", "revoked"}),
        ({"expires_before": _in_days(2), "expires_after": _in_days(-1)}, {"short"}),
        ({"expires_before": _in_days(3), "expires_after": _in_days(2)}, set()),
        ({"status": "valid", "ca": "bootstrap"}, {"boot"}),
    ],
    ids=[
        "ok/device-id",
        "ok/status-revoked",
        "ok/status-valid",
        "ok/ca-devices",
        "ok/ca-bootstrap",
        "ok/ca-without-certificates",
        "ok/expires-before",
        "ok/expires-before-zulu",
        "ok/expires-before-past",
        "ok/expires-after",
        "ok/expiring-soon-window",
        "ok/window-after-its-expiry",
        "ok/status-and-ca",
    ],
)
def test_certificate_filters_select_by_device_status_expiry_and_ca(
    api: Api, device_id: str, issued: dict[str, str], params: dict[str, str], expected: set[str]
) -> None:
    items = api.get("/certificates", device_id=device_id, **params)["items"]

    assert {i["serial"] for i in items} == {issued[name] for name in expected}
    assert all(i["device_id"] == device_id for i in items)


def test_status_revoked_alone_lists_only_revoked_certificates(
    api: Api, issued: dict[str, str]
) -> None:
    items = api.get("/certificates", status="revoked", limit="1000")["items"]

    assert issued["revoked"] in {i["serial"] for i in items}
    assert {i["status"] for i in items} == {"revoked"}
    assert all(i["revoked_at"] and i["revocation_reason"] for i in items)


@pytest.mark.parametrize(
    "form",
    [str.upper, str.lower, lambda s: ":".join(s[i : i + 2] for i in range(0, len(s), 2)).lower()],
    ids=["ok/upper-case", "ok/lower-case", "ok/colon-separated"],
)
def test_certificate_detail_by_serial_in_any_case(
    api: Api, issued: dict[str, str], form: Callable[[str], str]
) -> None:
    serial = issued["boot"]
    assert serial != serial.lower(), "a serial with hex letters makes the case matter"

    detail = api.get(f"/certificates/{form(serial)}")

    assert detail["serial"] == serial
    cert = x509.load_pem_x509_certificate(detail["pem"].encode())
    assert serial_hex(cert.serial_number) == serial
    assert detail["subject"] == cert.subject.rfc4514_string()
    assert (detail["status"], detail["ca"], detail["revoked_at"]) == ("valid", "bootstrap", None)


@pytest.mark.parametrize(
    ("serial", "status"),
    [("00FFFFFFFFFFFFFFFFFFFF", 404), ("not-hex", 400), ("00", 400)],
    ids=["fail/unknown-serial", "fail/not-hex", "fail/zero"],
)
def test_certificate_detail_of_a_bad_serial(api: Api, serial: str, status: int) -> None:
    response = api.call("GET", f"/certificates/{serial}", token=api.tokens[READ])
    assert response.status_code == status, response.text
    one_line_detail(response)


@pytest.mark.parametrize(
    ("which", "body", "status", "reason"),
    [
        ("boot", {"reason": "keyCompromise"}, 200, "keyCompromise"),
        ("boot", None, 200, "unspecified"),
        ("revoked", {"reason": "keyCompromise"}, 409, "superseded"),
        ("unknown", {"reason": "keyCompromise"}, 404, None),
        ("boot", {"reason": "lostIt"}, 422, None),
    ],
    ids=[
        "ok/key-compromise",
        "ok/no-body-is-unspecified",
        "fail/already-revoked",
        "fail/unknown-serial",
        "fail/unknown-reason",
    ],
)
def test_revoke_certificate_records_the_reason_and_the_actor(
    api: Api,
    device_id: str,
    issued: dict[str, str],
    which: str,
    body: dict[str, str] | None,
    status: int,
    reason: str | None,
) -> None:
    serial = issued.get(which, "7E57AB1E")

    response = api.call(
        "POST", f"/certificates/{serial.lower()}/revoke", token=api.tokens[ADMIN], json=body
    )

    assert response.status_code == status, response.text
    if status == 200:
        assert (response.json()["serial"], response.json()["status"]) == (serial, "revoked")
        assert response.json()["revocation_reason"] == reason
        revokes = [e for e in walk_audit(api, actor=f"token:{ADMIN}") if e["action"] == "revoke"]
        assert (revokes[-1]["serial"], revokes[-1]["detail"]) == (serial, reason)
    elif status != 422:
        one_line_detail(response)
    if reason is not None:
        assert api.get(f"/certificates/{serial}")["revocation_reason"] == reason


def test_revoked_operational_certificate_cannot_reenroll(
    api: Api, device_id: str, tmp_path: Path
) -> None:
    bootstrap = provisioned(api, device_id, tmp_path / "bootstrap")
    op = operational(api, bootstrap, device_id, tmp_path / "op")
    serial = serial_hex(op.cert.serial_number)

    response = api.call(
        "POST",
        f"/certificates/{serial}/revoke",
        token=api.tokens[ADMIN],
        json={"reason": "keyCompromise"},
    )

    assert response.status_code == 200, response.text
    assert est_reenroll(api, op, device_id).status_code == 403
    issued_cert(est_enroll(api, bootstrap, device_id))  # the device itself is still active


# -- paging and bad queries --------------------------------------------------------------------


@pytest.fixture(scope="module")
def many(api: Api, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Five more registered devices, and a device with five certificates and three
    enrollments waiting for approval."""
    device_id = f"paged-{os.getpid()}"
    tmp_path = tmp_path_factory.mktemp("paged")
    for n in range(5):
        response = api.call(
            "POST", "/devices", token=api.tokens[ADMIN], json={"device_id": f"{device_id}-{n}"}
        )
        assert response.status_code == 201, response.text
    bootstrap = provisioned(api, device_id, tmp_path / "bootstrap")
    for _ in range(4):
        assert provision(api, device_id).status_code == 201
    for _ in range(3):
        assert est_enroll(api, bootstrap, device_id, label=GATED).status_code == 202
    return device_id


PAGED = [
    ("ok/devices", "/devices", "device_id", {}),
    ("ok/certificates-of-a-device", "/certificates", "serial", {"device_id": "*"}),
    ("ok/certificates-by-ca", "/certificates", "serial", {"device_id": "*", "ca": "bootstrap"}),
    ("ok/audit-of-a-device", "/audit", "id", {"device_id": "*"}),
    ("ok/audit-by-actor", "/audit", "id", {"device_id": "*", "actor": f"token:{PROVISION}"}),
    ("ok/pending", "/pending", "id", {"status": "pending"}),
]


@pytest.mark.parametrize(
    ("path", "key", "params"), [c[1:] for c in PAGED], ids=[c[0] for c in PAGED]
)
@pytest.mark.parametrize("limit", [1, 2], ids=lambda n: f"limit-{n}")
def test_paging_follows_next_to_every_item_exactly_once(
    api: Api, many: str, path: str, key: str, params: dict[str, str], limit: int
) -> None:
    params = {k: many if v == "*" else v for k, v in params.items()}
    everything = [i[key] for i in api.get(path, limit="1000", **params)["items"]]
    assert len(everything) >= 3 > limit

    paged, pages = walk(api, path, key, limit=str(limit), **params)

    assert paged == everything
    assert len(set(paged)) == len(paged)
    assert pages == -(-len(everything) // limit)
    if path == "/devices":
        assert {f"{many}-{n}" for n in range(5)} <= set(paged)


@pytest.mark.parametrize(
    ("path", "params", "status"),
    [
        ("/certificates", {"status": "lost"}, 422),
        ("/certificates", {"expires_before": "tomorrow"}, 422),
        ("/certificates", {"limit": "0"}, 422),
        ("/certificates", {"limit": "1001"}, 422),
        ("/certificates", {"cursor": "not-hex"}, 400),
        ("/devices", {"status": "gone"}, 422),
        ("/audit", {"since": "yesterday"}, 422),
        ("/audit", {"cursor": "abc"}, 400),
        ("/audit", {"cursor": "-1"}, 400),
        ("/pending", {"status": "maybe"}, 422),
        ("/pending", {"cursor": "1e3"}, 400),
    ],
    ids=[
        "fail/certificates-unknown-status",
        "fail/certificates-expires-before-not-a-time",
        "fail/certificates-limit-zero",
        "fail/certificates-limit-too-large",
        "fail/certificates-cursor-not-hex",
        "fail/devices-unknown-status",
        "fail/audit-since-not-a-time",
        "fail/audit-cursor-not-a-number",
        "fail/audit-cursor-negative",
        "fail/pending-unknown-status",
        "fail/pending-cursor-not-a-number",
    ],
)
def test_listing_refuses_a_bad_query(
    api: Api, path: str, params: dict[str, str], status: int
) -> None:
    response = api.call("GET", path, token=api.tokens[READ], params=params)
    assert response.status_code == status, response.text
    if status == 400:
        one_line_detail(response)


# -- audit -------------------------------------------------------------------------------------


def test_audit_filters_by_device_actor_and_since(api: Api, device_id: str) -> None:
    assert provision(api, device_id).status_code == 201
    assert provision(api, device_id, token=api.tokens[ADMIN]).status_code == 201

    of_device = walk_audit(api, device_id=device_id)
    assert [(e["action"], e["outcome"], e["actor"]) for e in of_device] == [
        ("api-provision", "ok", f"token:{PROVISION}"),
        ("api-provision", "ok", f"token:{ADMIN}"),
    ]
    assert all(e["serial"] for e in of_device)

    by_actor = walk_audit(api, device_id=device_id, actor=f"token:{ADMIN}")
    assert by_actor == of_device[1:]
    assert all(
        e["actor"] == f"token:{PROVISION}" for e in walk_audit(api, actor=f"token:{PROVISION}")
    )

    since = walk_audit(api, device_id=device_id, since=of_device[1]["at"])
    assert since == of_device[1:]
    later = (dt.datetime.fromisoformat(of_device[1]["at"]) + dt.timedelta(seconds=1)).isoformat()
    assert walk_audit(api, device_id=device_id, since=later) == []
    all_since = walk_audit(api, since=of_device[1]["at"])
    assert of_device[0] not in all_since and of_device[1] in all_since
    assert all(e["at"] >= of_device[1]["at"] for e in all_since)


def test_audit_is_oldest_first_with_increasing_ids(api: Api) -> None:
    entries = walk_audit(api)
    ids = [e["id"] for e in entries]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert entries[0]["action"] == "token-create"


# -- manual approval ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "decided", "retry_status", "listed_as"),
    [("approve", "approved", 200, "issued"), ("deny", "denied", 403, "denied")],
    ids=["ok/approve-then-retry-gets-certificate", "fail/deny-then-retry-is-403"],
)
def test_pending_request_is_decided_through_the_api(
    api: Api,
    device_id: str,
    tmp_path: Path,
    action: str,
    decided: str,
    retry_status: int,
    listed_as: str,
) -> None:
    bootstrap = provisioned(api, device_id, tmp_path / "bootstrap")
    der = csr_der(new_key(), device_id)

    waiting = est_enroll(api, bootstrap, device_id, label=GATED, der=der)
    assert waiting.status_code == 202, waiting.text
    assert waiting.headers["retry-after"] == "5"
    pending = [p for p in api.get("/pending")["items"] if p["device_id"] == device_id]
    assert [(p["label"], p["operation"], p["status"]) for p in pending] == [
        (GATED, "simpleenroll", "pending")
    ]
    request_id = pending[0]["id"]
    assert est_enroll(api, bootstrap, device_id, label=GATED, der=der).status_code == 202

    response = api.call(
        "POST",
        f"/pending/{request_id}/{action}",
        token=api.tokens[ADMIN],
        json={"reason": "checked by the line supervisor"},
    )

    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["id"], body["status"], body["decided_by"]) == (
        request_id,
        decided,
        f"token:{ADMIN}",
    )
    assert body["reason"] == "checked by the line supervisor"
    retry = est_enroll(api, bootstrap, device_id, label=GATED, der=der)
    assert retry.status_code == retry_status, retry.text
    listed = [p for p in api.get("/pending", status=listed_as)["items"] if p["id"] == request_id]
    assert len(listed) == 1
    if retry_status == 200:
        assert listed[0]["serial"] == serial_hex(issued_cert(retry).serial_number)
    again = api.call("POST", f"/pending/{request_id}/{action}", token=api.tokens[ADMIN])
    assert again.status_code == 409, again.text
    one_line_detail(again)


@pytest.mark.parametrize(
    ("path", "token", "status"),
    [
        ("/pending/999999/approve", ADMIN, 404),
        ("/pending/999999/deny", ADMIN, 404),
        ("/pending/0/approve", ADMIN, 404),
        ("/pending/abc/approve", ADMIN, 422),
        ("/pending/1/approve", PROVISION, 403),
        ("/pending/1/deny", READ, 403),
    ],
    ids=[
        "fail/approve-unknown",
        "fail/deny-unknown",
        "fail/approve-zero",
        "fail/approve-not-a-number",
        "fail/approve-with-provision-token",
        "fail/deny-with-read-token",
    ],
)
def test_pending_decision_refusals(api: Api, path: str, token: str, status: int) -> None:
    response = api.call("POST", path, token=api.tokens[token])
    assert response.status_code == status, response.text


# -- refusal codes, device ids, SAN policy (issue 10) -------------------------------------------


def problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """An RFC 9457 problem with the refusal code, as every API error is."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert (body["status"], body["code"], body["type"]) == (
        status,
        code,
        f"urn:estkit:refusal:{code}",
    )
    one_line_detail(response)
    return dict(body)


@pytest.mark.parametrize(
    "device_id",
    ["c:d", "\uff44\uff45\uff56-a", "d\u00e9v-1", "a b"],
    ids=["colon", "fullwidth-lookalike", "accent", "space"],
)
def test_one_device_id_rule_on_the_api(api: Api, device_id: str) -> None:
    """Finding 8: ids a Basic username or IoT Hub cannot carry are refused, not stored."""
    response = api.call(
        "POST",
        "/devices",
        token=api.tokens[PROVISION],
        json={"device_id": device_id, "enrollment_secret": True},
    )
    problem(response, 400, "bad-request")
    problem(provision(api, device_id), 400, "bad-request")
    listed = api.get("/devices", limit="1000")["items"]
    assert device_id not in [d["device_id"] for d in listed]


def test_api_refusals_carry_codes(api: Api, device_id: str) -> None:
    problem(api.call("GET", "/devices", token=None), 401, "token-invalid")
    problem(api.call("GET", "/devices", token="estk_unknown"), 401, "token-invalid")
    problem(provision(api, device_id, token=api.tokens[READ]), 403, "scope-missing")
    problem(api.call("GET", "/devices/no-such-device", token=api.tokens[READ]), 404, "not-found")
    problem(provision(api, device_id, label="nosuch"), 404, "not-found")


def test_adding_an_existing_device_needs_rotate_secret(api: Api, device_id: str) -> None:
    """Finding 12: a second `add` does not silently hand out another secret."""

    def add(**extra: Any) -> httpx.Response:
        body = {"device_id": device_id, "enrollment_secret": True, **extra}
        return api.call("POST", "/devices", token=api.tokens[PROVISION], json=body)

    first = add()
    assert first.status_code == 201, first.text
    problem(add(), 409, "conflict")
    rotated = add(rotate_secret=True)
    assert rotated.status_code == 201, rotated.text
    old, new = first.json()["enrollment_secret"], rotated.json()["enrollment_secret"]
    assert old and new and old != new
    with http(api.server.root_pem) as client:
        refused = post_csr(
            client,
            f"{api.server.url}/simpleenroll",
            csr_der(new_key(), device_id),
            auth=(device_id, old),
        )
        assert refused.status_code == 401
        assert refused.headers["estkit-refusal-code"] == "secret-invalid"
        issued_cert(
            post_csr(
                client,
                f"{api.server.url}/simpleenroll",
                csr_der(new_key(), device_id),
                auth=(device_id, new),
            )
        )


@pytest.mark.parametrize(
    "sans",
    [
        ["localhost"],
        ["*.example.com"],
        ["good.com\x00.evil"],
        [f"d{i}.example.com" for i in range(11)],
    ],
    ids=["single-label", "wildcard", "nul", "over-the-cap"],
)
def test_api_provision_applies_the_san_policy(api: Api, device_id: str, sans: list[str]) -> None:
    """Finding 5, REST side: the label's SAN policy and cap (10), as on EST."""
    problem(provision(api, device_id, sans=sans), 403, "san-not-permitted")
    assert api.get("/certificates", device_id=device_id)["items"] == []


def test_api_provision_builds_the_subject(api: Api, device_id: str) -> None:
    """Finding 4, REST side: only CN = device id reaches the certificate."""
    key = new_key()
    subject = x509.Name.from_rfc4514_string(
        f"2.5.4.5=dev-b,OU=admins,O=x,CN={device_id}"  # serialNumber=dev-b
    )
    pem = x509.load_der_x509_csr(csr_der(key, device_id, subject=subject)).public_bytes(
        Encoding.PEM
    )
    response = api.call(
        "POST",
        "/cas/bootstrap/certificates",
        token=api.tokens[PROVISION],
        json={"device_id": device_id, "csr": pem.decode(), "sans": ["dev.example.com"]},
    )
    assert response.status_code == 201, response.text
    cert = x509.load_pem_x509_certificate(response.json()["certificate"].encode())
    assert cert.subject.rfc4514_string() == f"CN={device_id}"
