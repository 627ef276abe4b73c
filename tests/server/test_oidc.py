"""OIDC bearer tokens: what is accepted, what is refused and why, and where the keys come from.

Every key, JWKS and token here is made by the test; the JWKS URL is a real
HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from estkit.server.oidc import (
    MAX_JWKS_AGE,
    REFRESH_INTERVAL,
    InvalidToken,
    JwksUnavailable,
    OidcConfig,
    OidcVerifier,
    parse_oidc_config,
)

NOW = 1_800_000_000.0
TENANT = "00000000-aaaa-bbbb-cccc-000000000000"
ISSUER = f"https://login.microsoftonline.com/{TENANT}/v2.0"
AUDIENCE = "api://estkit"
CLIENT = "11111111-2222-3333-4444-555555555555"
READER = "66666666-7777-8888-9999-000000000000"

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class Signer:
    """A private key with its kid, and the JWK the provider publishes for it."""

    kid: str
    key: PrivateKey

    def jwk(self, **extra: Any) -> dict[str, Any]:
        public = self.key.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            data: dict[str, Any] = RSAAlgorithm.to_jwk(public, as_dict=True)
        else:
            data = ECAlgorithm.to_jwk(public, as_dict=True)
        return {**data, "kid": self.kid, "use": "sig", **extra}

    def token(
        self, *, alg: str | None = None, headers: dict[str, Any] | None = None, **claims: Any
    ) -> str:
        if alg is None:
            alg = "RS256" if isinstance(self.key, rsa.RSAPrivateKey) else "ES256"
        header = {k: v for k, v in {"kid": self.kid, **(headers or {})}.items() if v is not None}
        return jwt.encode(_claims(**claims), self.key, algorithm=alg, headers=header)


def _claims(**overrides: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "exp": int(NOW) + 3600,
        "nbf": int(NOW) - 10,
        "iat": int(NOW) - 10,
        "azp": CLIENT,
        "sub": "object-id-of-the-service-principal",
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unsigned(
    header: dict[str, Any], claims: dict[str, Any], sign: Callable[[bytes], bytes]
) -> str:
    """A compact JWS with any header, signed by ``sign`` (for tokens PyJWT refuses to make)."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    return f"{signing_input}.{_b64(sign(signing_input.encode()))}"


def _jwks(*jwks: dict[str, Any]) -> bytes:
    return json.dumps({"keys": list(jwks)}).encode()


@pytest.fixture(scope="module")
def rsa_signer() -> Signer:
    return Signer("rsa-1", rsa.generate_private_key(public_exponent=65537, key_size=2048))


@pytest.fixture(scope="module")
def ec_signer() -> Signer:
    return Signer("ec-1", ec.generate_private_key(ec.SECP256R1()))


@pytest.fixture(scope="module")
def stranger() -> Signer:
    """A key the provider never published."""
    return Signer("rsa-1", rsa.generate_private_key(public_exponent=65537, key_size=2048))


def _config(**overrides: Any) -> OidcConfig:
    values: dict[str, Any] = {
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "jwks_url": "https://idp.invalid/keys",
        "jwks_file": None,
        "client_scopes": {CLIENT: frozenset({"provision"}), READER: frozenset({"read"})},
    }
    values.update(overrides)
    return OidcConfig(**values)


@pytest.fixture
def jwks_file(tmp_path: Path, rsa_signer: Signer, ec_signer: Signer) -> Path:
    path = tmp_path / "jwks.json"
    path.write_bytes(_jwks(rsa_signer.jwk(), ec_signer.jwk()))
    return path


@pytest.fixture
def verifier(jwks_file: Path) -> OidcVerifier:
    return OidcVerifier(_config(jwks_url=None, jwks_file=jwks_file), clock=lambda: NOW)


# -- what a token must be --------------------------------------------------------------------


def _hs256_with_public_key(rsa_signer: Signer, _: Signer, __: Signer) -> str:
    # The classic confusion: the verifier's RSA public key (PEM) used as an HMAC secret.
    secret = rsa_signer.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return _unsigned(
        {"alg": "HS256", "typ": "JWT", "kid": rsa_signer.kid},
        _claims(),
        lambda data: hmac.new(secret, data, hashlib.sha256).digest(),
    )


TokenMaker = Callable[[Signer, Signer, Signer], str]
CASES: list[tuple[str, TokenMaker, str | None]] = [
    ("ok/rs256", lambda r, e, s: r.token(), None),
    ("ok/es256", lambda r, e, s: e.token(), None),
    ("ok/ps256", lambda r, e, s: r.token(alg="PS256"), None),
    ("ok/audience-in-list", lambda r, e, s: r.token(aud=["other", AUDIENCE]), None),
    ("ok/entra-v1-appid", lambda r, e, s: r.token(azp=None, appid=CLIENT), None),
    ("ok/client-id-claim", lambda r, e, s: r.token(azp=None, client_id=CLIENT), None),
    ("ok/expired-within-leeway", lambda r, e, s: r.token(exp=int(NOW) - 30), None),
    ("ok/nbf-within-leeway", lambda r, e, s: r.token(nbf=int(NOW) + 30), None),
    ("fail/wrong-issuer", lambda r, e, s: r.token(iss=ISSUER + "/"), "wrong issuer"),
    ("fail/no-issuer", lambda r, e, s: r.token(iss=None), "token has no iss claim"),
    ("fail/wrong-audience", lambda r, e, s: r.token(aud="api://other"), "wrong audience"),
    ("fail/no-audience", lambda r, e, s: r.token(aud=None), "token has no aud claim"),
    ("fail/expired", lambda r, e, s: r.token(exp=int(NOW) - 61), "token expired"),
    ("fail/missing-exp", lambda r, e, s: r.token(exp=None), "token has no exp claim"),
    ("fail/exp-not-a-number", lambda r, e, s: r.token(exp="soon"), "token claim exp is not"),
    ("fail/not-yet-valid", lambda r, e, s: r.token(nbf=int(NOW) + 300), "token not yet valid"),
    ("fail/issued-in-future", lambda r, e, s: r.token(iat=int(NOW) + 300), "issued in the future"),
    ("fail/bad-signature", lambda r, e, s: s.token(), "bad signature"),
    (
        "fail/tampered-claims",
        lambda r, e, s: ".".join(
            [
                r.token().split(".")[0],
                _b64(json.dumps(_claims(azp=READER)).encode()),
                r.token().split(".")[2],
            ]
        ),
        "bad signature",
    ),
    ("fail/unknown-kid", lambda r, e, s: r.token(headers={"kid": "rsa-2"}), "unknown signing key"),
    ("fail/no-kid", lambda r, e, s: r.token(headers={"kid": None}), "no key id"),
    (
        "fail/alg-none",
        lambda r, e, s: _unsigned({"alg": "none", "kid": r.kid}, _claims(), lambda _: b""),
        "algorithm not allowed",
    ),
    ("fail/alg-hs256-public-key-as-secret", _hs256_with_public_key, "algorithm not allowed"),
    ("fail/alg-not-configured", lambda r, e, s: r.token(alg="RS512"), "algorithm not allowed"),
    (
        "fail/alg-does-not-fit-key",
        lambda r, e, s: e.token(headers={"kid": r.kid}),
        "does not fit its key",
    ),
    ("fail/client-not-allowed", lambda r, e, s: r.token(azp="someone-else"), "client not allowed"),
    (
        "fail/no-client",
        lambda r, e, s: r.token(azp=None, sub=None),
        "token names no client",
    ),
    ("fail/not-a-jwt", lambda r, e, s: "not-a-jwt", "malformed token"),
    ("fail/empty", lambda r, e, s: "", "malformed token"),
]


@pytest.mark.parametrize(("make", "refusal"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_verify_accepts_only_a_valid_token_of_an_allowed_client(
    verifier: OidcVerifier,
    rsa_signer: Signer,
    ec_signer: Signer,
    stranger: Signer,
    make: TokenMaker,
    refusal: str | None,
) -> None:
    token = make(rsa_signer, ec_signer, stranger)
    if refusal is None:
        assert verifier.verify(token) == (f"oidc:{CLIENT}", frozenset({"provision"}))
        return
    with pytest.raises(InvalidToken) as info:
        verifier.verify(token)
    message = str(info.value)
    assert refusal in message
    assert "\n" not in message
    if token:
        assert token not in message


def test_verify_grants_each_client_its_configured_scopes(
    verifier: OidcVerifier, rsa_signer: Signer
) -> None:
    assert verifier.verify(rsa_signer.token(azp=READER)) == (f"oidc:{READER}", frozenset({"read"}))


def test_symmetric_and_encryption_keys_in_the_jwks_are_never_used(
    tmp_path: Path, rsa_signer: Signer
) -> None:
    secret = b"0123456789abcdef0123456789abcdef"
    oct_jwk = {"kty": "oct", "kid": "shared", "k": _b64(secret)}
    enc_jwk = rsa_signer.jwk(kid="enc", use="enc")
    path = tmp_path / "jwks.json"
    path.write_bytes(_jwks(oct_jwk, enc_jwk, rsa_signer.jwk()))
    config = _config(jwks_url=None, jwks_file=path, algorithms=("RS256", "ES256"))
    verifier = OidcVerifier(config, clock=lambda: NOW)
    assert verifier.load_keys() == 1
    for kid in ("shared", "enc"):
        header = {"alg": "RS256", "kid": kid}
        token = rsa_signer.token(headers=header)
        with pytest.raises(InvalidToken, match="unknown signing key"):
            verifier.verify(token)


# -- where the keys come from ----------------------------------------------------------------


@dataclass
class JwksServer:
    """A JWKS endpoint on 127.0.0.1 whose document the test can change."""

    document: bytes
    status: int = 200
    requests: list[str] = field(default_factory=list)
    url: str = ""


@pytest.fixture
def jwks_server(rsa_signer: Signer) -> Iterator[JwksServer]:
    state = JwksServer(_jwks(rsa_signer.jwk()))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.requests.append(self.path)
            self.send_response(state.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(state.document)))
            self.end_headers()
            self.wfile.write(state.document)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/discovery/v2.0/keys"
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@dataclass
class Clock:
    now: float = NOW

    def __call__(self) -> float:
        return self.now


def test_jwks_url_is_fetched_once_and_cached(jwks_server: JwksServer, rsa_signer: Signer) -> None:
    verifier = OidcVerifier(_config(jwks_url=jwks_server.url), clock=lambda: NOW)
    for _ in range(3):
        assert verifier.verify(rsa_signer.token())[0] == f"oidc:{CLIENT}"
    assert jwks_server.requests == ["/discovery/v2.0/keys"]


def test_key_rotation_new_kid_is_fetched_at_most_once_a_minute(
    jwks_server: JwksServer, rsa_signer: Signer, ec_signer: Signer
) -> None:
    clock = Clock()
    verifier = OidcVerifier(_config(jwks_url=jwks_server.url), clock=clock)
    assert verifier.verify(rsa_signer.token())
    # The provider publishes a new key; a token signed with it arrives within the minute.
    jwks_server.document = _jwks(rsa_signer.jwk(), ec_signer.jwk())
    clock.now += 1
    with pytest.raises(InvalidToken, match="unknown signing key"):
        verifier.verify(ec_signer.token())
    assert len(jwks_server.requests) == 1
    clock.now += REFRESH_INTERVAL
    assert verifier.verify(ec_signer.token()) == (f"oidc:{CLIENT}", frozenset({"provision"}))
    assert len(jwks_server.requests) == 2
    # Forged kids do not make it fetch again within the minute.
    for n in range(5):
        with pytest.raises(InvalidToken, match="unknown signing key"):
            verifier.verify(rsa_signer.token(headers={"kid": f"forged-{n}"}))
    assert len(jwks_server.requests) == 2


def test_key_removed_from_jwks_is_dropped_when_the_cache_expires(
    jwks_server: JwksServer, rsa_signer: Signer, ec_signer: Signer
) -> None:
    clock = Clock()
    jwks_server.document = _jwks(rsa_signer.jwk(), ec_signer.jwk())
    verifier = OidcVerifier(_config(jwks_url=jwks_server.url), clock=clock)
    assert verifier.verify(ec_signer.token())
    jwks_server.document = _jwks(rsa_signer.jwk())
    clock.now += MAX_JWKS_AGE + 1
    token = ec_signer.token(exp=int(clock.now) + 600)
    with pytest.raises(InvalidToken, match="unknown signing key"):
        verifier.verify(token)


def test_stale_cache_is_kept_when_the_refresh_fails(
    jwks_server: JwksServer, rsa_signer: Signer
) -> None:
    clock = Clock()
    verifier = OidcVerifier(_config(jwks_url=jwks_server.url), clock=clock)
    assert verifier.verify(rsa_signer.token())
    jwks_server.status = 500
    clock.now += MAX_JWKS_AGE + 1
    assert verifier.verify(rsa_signer.token(exp=int(clock.now) + 600))
    assert len(jwks_server.requests) == 2


@pytest.mark.parametrize(
    ("status", "document"),
    [(500, b"{}"), (200, b"<html>"), (200, b'{"keys": []}'), (200, b'{"keys": "x"}')],
    ids=["fail/http-500", "fail/not-json", "fail/no-keys", "fail/keys-not-a-list"],
)
def test_unusable_jwks_url_is_unavailable_not_a_crash(
    jwks_server: JwksServer, rsa_signer: Signer, status: int, document: bytes
) -> None:
    jwks_server.status, jwks_server.document = status, document
    clock = Clock()
    verifier = OidcVerifier(_config(jwks_url=jwks_server.url), clock=clock)
    with pytest.raises(JwksUnavailable, match=r"^signing keys unavailable$"):
        verifier.verify(rsa_signer.token())


def test_unreachable_jwks_url_is_tried_at_most_once_a_minute(rsa_signer: Signer) -> None:
    calls: list[str] = []
    document: bytes | None = None

    def fetch(url: str) -> bytes:
        calls.append(url)
        if document is None:
            raise OSError("connection refused")
        return document

    clock = Clock()
    verifier = OidcVerifier(_config(), clock=clock, fetch=fetch)
    for _ in range(3):
        with pytest.raises(JwksUnavailable, match=r"^signing keys unavailable$"):
            verifier.verify(rsa_signer.token())
    assert len(calls) == 1
    document = _jwks(rsa_signer.jwk())
    clock.now += REFRESH_INTERVAL
    assert verifier.verify(rsa_signer.token())
    assert calls == ["https://idp.invalid/keys"] * 2


def test_jwks_file_is_reread_on_rotation(
    jwks_file: Path, rsa_signer: Signer, ec_signer: Signer
) -> None:
    jwks_file.write_bytes(_jwks(rsa_signer.jwk()))
    clock = Clock()
    verifier = OidcVerifier(_config(jwks_url=None, jwks_file=jwks_file), clock=clock)
    assert verifier.verify(rsa_signer.token())
    jwks_file.write_bytes(_jwks(rsa_signer.jwk(), ec_signer.jwk()))
    clock.now += REFRESH_INTERVAL
    assert verifier.verify(ec_signer.token())


def test_missing_jwks_file_is_unavailable(tmp_path: Path, rsa_signer: Signer) -> None:
    verifier = OidcVerifier(_config(jwks_url=None, jwks_file=tmp_path / "gone.json"))
    with pytest.raises(JwksUnavailable):
        verifier.load_keys()


def test_real_clock_is_the_default(jwks_file: Path, rsa_signer: Signer) -> None:
    verifier = OidcVerifier(_config(jwks_url=None, jwks_file=jwks_file))
    with pytest.raises(InvalidToken, match=r"token (expired|not yet valid|issued in the future)"):
        verifier.verify(rsa_signer.token(exp=1_000_000_000, nbf=None, iat=None))


# -- configuration ---------------------------------------------------------------------------


def test_parse_config_reads_the_documented_section(tmp_path: Path) -> None:
    (tmp_path / "oidc").mkdir()
    (tmp_path / "oidc" / "jwks.json").write_text('{"keys": []}')
    config = parse_oidc_config(
        {
            "issuer": ISSUER,
            "audience": AUDIENCE,
            "jwks_file": "oidc/jwks.json",
            "clients": {CLIENT: ["provision"], READER: ["read", "admin"]},
        },
        tmp_path,
    )
    assert config is not None
    assert config.jwks_file == tmp_path / "oidc" / "jwks.json"
    assert config.jwks_url is None
    assert dict(config.client_scopes) == {
        CLIENT: frozenset({"provision"}),
        READER: frozenset({"read", "admin"}),
    }
    assert config.leeway_seconds == 60
    assert config.algorithms == ("RS256", "ES256", "PS256")


def test_parse_config_without_the_section_is_none(tmp_path: Path) -> None:
    assert parse_oidc_config(None, tmp_path) is None
    assert parse_oidc_config({}, tmp_path) is None


_GOOD: dict[str, Any] = {
    "issuer": ISSUER,
    "audience": AUDIENCE,
    "jwks_url": f"https://login.microsoftonline.com/{TENANT}/discovery/v2.0/keys",
    "clients": {CLIENT: ["provision"]},
}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"issuer": None}, "api.oidc.issuer: required"),
        ({"issuer": ""}, "api.oidc.issuer"),
        ({"audience": 5}, "api.oidc.audience"),
        ({"jwks_url": None}, "api.oidc.jwks_url"),
        ({"jwks_file": "jwks.json"}, "api.oidc.jwks_url"),
        ({"jwks_url": "ftp://idp/keys"}, "api.oidc.jwks_url"),
        ({"jwks_url": "login.microsoftonline.com/keys"}, "api.oidc.jwks_url"),
        ({"jwks_url": None, "jwks_file": "missing.json"}, "api.oidc.jwks_file"),
        ({"clients": None}, "api.oidc.clients"),
        ({"clients": {}}, "api.oidc.clients"),
        ({"clients": {CLIENT: "provision"}}, f'api.oidc.clients."{CLIENT}"'),
        ({"clients": {CLIENT: []}}, f'api.oidc.clients."{CLIENT}"'),
        ({"clients": {CLIENT: ["root"]}}, f'api.oidc.clients."{CLIENT}"'),
        ({"leeway_seconds": -1}, "api.oidc.leeway_seconds"),
        ({"leeway_seconds": True}, "api.oidc.leeway_seconds"),
        ({"algorithms": ["HS256"]}, "api.oidc.algorithms"),
        ({"algorithms": ["none"]}, "api.oidc.algorithms"),
        ({"algorithms": []}, "api.oidc.algorithms"),
        ({"jwks_uri": "https://idp/keys"}, "api.oidc.jwks_uri: unknown field"),
        ({"portal_client_secret": "s"}, "api.oidc.portal_client_secret: a client secret is never"),
        ({"client_secret": "s"}, "api.oidc.client_secret: a client secret is never written"),
        ({"portal_client_id": ""}, "api.oidc.portal_client_id"),
        ({"portal_client_secret_file": "s.txt"}, "api.oidc.portal_client_secret_file: without"),
        (
            {"portal_client_id": "p", "portal_client_secret_file": "missing.txt"},
            "api.oidc.portal_client_secret_file: ",
        ),
    ],
    ids=[
        "fail/no-issuer",
        "fail/empty-issuer",
        "fail/audience-not-a-string",
        "fail/no-jwks",
        "fail/both-jwks",
        "fail/jwks-url-scheme",
        "fail/jwks-url-no-scheme",
        "fail/jwks-file-missing",
        "fail/no-clients",
        "fail/empty-clients",
        "fail/scopes-not-a-list",
        "fail/no-scopes",
        "fail/unknown-scope",
        "fail/negative-leeway",
        "fail/leeway-bool",
        "fail/hmac-algorithm",
        "fail/none-algorithm",
        "fail/no-algorithms",
        "fail/typo-field",
        "fail/portal-secret-in-config",
        "fail/client-secret-in-config",
        "fail/empty-portal-client-id",
        "fail/portal-secret-file-without-client",
        "fail/portal-secret-file-missing",
    ],
)
def test_parse_config_names_the_bad_field(
    tmp_path: Path, change: dict[str, Any], field: str
) -> None:
    table = {k: v for k, v in {**_GOOD, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=f"^{re.escape(field)}"):
        parse_oidc_config(table, tmp_path)


def test_config_refuses_symmetric_algorithms_even_when_built_directly() -> None:
    with pytest.raises(ValueError, match="HS256"):
        _config(algorithms=("RS256", "HS256"))


def test_parse_config_reads_the_portals_client(tmp_path: Path) -> None:
    (tmp_path / "portal.secret").write_text("s3cret\n")
    config = parse_oidc_config(
        {
            **_GOOD,
            "portal_client_id": "estkit-portal",
            "portal_client_secret_file": "portal.secret",
        },
        tmp_path,
    )
    assert config is not None
    assert config.portal_client_id == "estkit-portal"
    assert config.portal_client_secret_file == tmp_path / "portal.secret"
    plain = parse_oidc_config(_GOOD, tmp_path)
    assert plain is not None and plain.portal_client_id is None


# -- ID tokens (the portal's OIDC sign-in) ---------------------------------------------------

PORTAL = "estkit-portal"


def _id_claims(**overrides: Any) -> dict[str, Any]:
    """Overrides of ``_claims`` for an ID token (None: the claim is left out)."""
    return {"aud": PORTAL, "azp": PORTAL, "sub": "alice", "nonce": "n-1", **overrides}


@pytest.mark.parametrize(
    ("claims", "refusal"),
    [
        ({}, None),
        ({"azp": None}, None),
        ({"aud": [PORTAL, "other"]}, None),
        ({"nonce": "n-2"}, "wrong nonce"),
        ({"nonce": 7}, "wrong nonce"),
        ({"nonce": None}, "token has no nonce claim"),
        ({"aud": AUDIENCE, "azp": None}, "wrong audience"),
        ({"azp": CLIENT}, "another party (azp)"),
        ({"aud": [PORTAL, "other"], "azp": None}, "names no authorized party"),
        ({"iat": None}, "token has no iat claim"),
        ({"sub": None}, "token has no sub claim"),
        ({"sub": "x" * 256}, "sub is not a subject"),
        ({"exp": int(NOW) - 61}, "token expired"),
    ],
    ids=[
        "ok/aud-and-azp",
        "ok/no-azp",
        "ok/several-audiences-with-azp",
        "fail/other-nonce",
        "fail/nonce-not-a-string",
        "fail/no-nonce",
        "fail/the-apis-audience",
        "fail/azp-another-client",
        "fail/several-audiences-no-azp",
        "fail/no-iat",
        "fail/no-sub",
        "fail/sub-too-long",
        "fail/expired",
    ],
)
def test_an_id_token_is_accepted_only_for_this_client_and_nonce(
    verifier: OidcVerifier, rsa_signer: Signer, claims: dict[str, Any], refusal: str | None
) -> None:
    token = rsa_signer.token(**_id_claims(**claims))
    if refusal is None:
        assert verifier.verify_id_token(token, client_id=PORTAL, nonce="n-1")["sub"] == "alice"
        return
    with pytest.raises(InvalidToken, match=re.escape(refusal)):
        verifier.verify_id_token(token, client_id=PORTAL, nonce="n-1")


def test_an_id_token_is_no_api_token(verifier: OidcVerifier, rsa_signer: Signer) -> None:
    """Its audience is the portal's client, not the API's: the API refuses it."""
    with pytest.raises(InvalidToken, match="wrong audience"):
        verifier.verify(rsa_signer.token(**_id_claims()))
