"""OIDC/JWT bearer tokens from an external identity provider (Entra ID, Keycloak, ...).

An API client such as an Entra ID service principal or managed identity gets
an access token from its identity provider and sends it as
``Authorization: Bearer <JWT>``. ``OidcVerifier.verify`` checks it against the
provider's published keys (JWKS) and the configuration, and names the actor
and the scopes the configuration grants that client:

    verifier = OidcVerifier(parse_oidc_config(api_table["oidc"], data_dir))
    actor, scopes = verifier.verify(token)        # ("oidc:<client id>", {"provision"})

The portal's OIDC sign-in (``server/portal/oidc_signin.py``) checks the provider's ID
tokens with the same keys: ``verify_id_token`` takes the portal's client id as the
audience and the nonce it sent, and the person's ``sub`` is looked up in the same
``clients`` table.

Checks: the header's ``alg`` is on the asymmetric allow-list (never ``none``,
never HMAC: a public key must not become a shared secret); the key is the
JWKS key named by ``kid`` and fits that algorithm; the signature verifies;
``iss`` equals the issuer exactly; ``aud`` contains the audience; ``exp`` is
present and not passed, ``nbf`` and ``iat`` not in the future (all with
leeway, against the injected clock); the client id (``azp``, else ``appid``,
else ``client_id``, else ``sub``) is one the configuration lists.

The JWKS is cached in memory. A token naming an unknown ``kid`` (the provider
rotated its keys) makes the verifier fetch it again, at most once per
``REFRESH_INTERVAL`` seconds, so forged kids cannot turn it into a request
amplifier (nor is a failed load retried sooner); a cache older than
``MAX_JWKS_AGE`` is refreshed on use, and kept if that fails. ``verify`` may
block on that fetch (``FETCH_TIMEOUT``): call it from a worker thread, not on an event loop.

Errors:

InvalidToken            the token is refused; the message is a one-line reason
│                       safe to return to the caller (it never echoes the token)
└── JwksUnavailable     the signing keys could not be loaded (a server-side
                        problem: the caller may answer 503 instead of 401)
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import httpx
import jwt

log = logging.getLogger(__name__)

SCOPES: Final = frozenset({"provision", "read", "admin"})
# Asymmetric JWS algorithms only (RFC 7518): HS* and "none" can never be allowed.
ASYMMETRIC_ALGORITHMS: Final = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
DEFAULT_ALGORITHMS: Final = ("RS256", "ES256", "PS256")
# Which JWK a JWS algorithm can verify with: (kty, crv or None).
_KEY_KIND: Final[Mapping[str, tuple[str, str | None]]] = {
    **{f"{p}{n}": ("RSA", None) for p in ("RS", "PS") for n in (256, 384, 512)},
    "ES256": ("EC", "P-256"),
    "ES384": ("EC", "P-384"),
    "ES512": ("EC", "P-521"),
    "EdDSA": ("OKP", "Ed25519"),
}
# Client id claims in order of preference: Entra v2 (azp), Entra v1 (appid), RFC 9068, subject.
CLIENT_ID_CLAIMS: Final = ("azp", "appid", "client_id", "sub")

REFRESH_INTERVAL: Final = 60.0
MAX_JWKS_AGE: Final = 24 * 3600.0
FETCH_TIMEOUT: Final = 5.0
MAX_JWKS_BYTES: Final = 1 << 20
MAX_TOKEN_CHARS: Final = 16 * 1024

_CONFIG_FIELDS: Final = frozenset(
    {
        "issuer",
        "audience",
        "jwks_url",
        "jwks_file",
        "clients",
        "leeway_seconds",
        "algorithms",
        "portal_client_id",
        "portal_client_secret_file",
    }
)
# Known so that they are refused with their own reason, not as a typo.
_SECRET_FIELDS: Final = frozenset({"portal_client_secret", "client_secret"})


class InvalidToken(Exception):
    """The bearer token is refused; ``str(exc)`` is a one-line reason for the caller."""


class JwksUnavailable(InvalidToken):
    """The provider's signing keys could not be loaded (network, file, or content)."""


@dataclass(frozen=True, slots=True)
class OidcConfig:
    """Which tokens to accept and what each client may do.

    Exactly one of ``jwks_url`` and ``jwks_file`` is set.
    """

    issuer: str
    audience: str
    jwks_url: str | None
    jwks_file: Path | None
    client_scopes: Mapping[str, frozenset[str]] = field(repr=False)
    leeway_seconds: int = 60
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    # The portal's own client at the provider (OIDC sign-in at /ui/login): the audience
    # of its ID tokens, and the file of its client secret when it is a confidential one.
    portal_client_id: str | None = None
    portal_client_secret_file: Path | None = None

    def __post_init__(self) -> None:
        if not self.issuer or not self.audience:
            raise ValueError("OIDC issuer and audience must not be empty")
        if (self.jwks_url is None) == (self.jwks_file is None):
            raise ValueError("OIDC needs jwks_url or jwks_file, not both")
        if not self.algorithms:
            raise ValueError("OIDC algorithms must not be empty")
        for alg in self.algorithms:
            if alg not in ASYMMETRIC_ALGORITHMS:
                raise ValueError(
                    f"OIDC algorithm {alg!r} not allowed, expected some of "
                    f"{', '.join(sorted(ASYMMETRIC_ALGORITHMS))}"
                )
        if self.leeway_seconds < 0:
            raise ValueError("OIDC leeway_seconds must not be negative")
        for client, scopes in self.client_scopes.items():
            if unknown := scopes - SCOPES:
                raise ValueError(f"OIDC client {client!r}: unknown scope(s) {sorted(unknown)}")
        # A read-only view: the dataclass is frozen, its mapping should be too.
        object.__setattr__(self, "client_scopes", MappingProxyType(dict(self.client_scopes)))


def parse_oidc_config(
    table: Mapping[str, Any] | None, base_dir: Path, *, section: str = "api.oidc"
) -> OidcConfig | None:
    """The ``[api.oidc]`` table (its contents), or None when it is absent or empty.

    A relative ``jwks_file`` is taken from ``base_dir``. Raises ``ValueError``
    naming the field (``api.oidc.audience: ...``) on a bad value.
    """
    if table is None or (isinstance(table, Mapping) and not table):
        return None
    if not isinstance(table, Mapping):
        raise ValueError(f"{section}: expected a table")
    for key in table:
        if key in _SECRET_FIELDS:
            raise ValueError(
                f"{section}.{key}: a client secret is never written in the config; use "
                "portal_client_secret_file (a file only its owner can read)"
            )
        if key not in _CONFIG_FIELDS:
            raise ValueError(
                f"{section}.{key}: unknown field (known: {', '.join(sorted(_CONFIG_FIELDS))})"
            )

    def text(key: str, *, required: bool) -> str | None:
        value = table.get(key)
        if value is None:
            if required:
                raise ValueError(f"{section}.{key}: required")
            return None
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{section}.{key}: expected a non-empty string, got {value!r}")
        return value.strip()

    issuer = text("issuer", required=True)
    audience = text("audience", required=True)
    assert issuer is not None and audience is not None
    jwks_url = text("jwks_url", required=False)
    jwks_name = text("jwks_file", required=False)
    if (jwks_url is None) == (jwks_name is None):
        raise ValueError(f"{section}.jwks_url: give jwks_url or jwks_file (exactly one)")
    jwks_file: Path | None = None
    if jwks_url is not None:
        url = httpx.URL(jwks_url) if "://" in jwks_url else None
        if url is None or url.scheme not in ("https", "http") or not url.host:
            raise ValueError(
                f"{section}.jwks_url: expected an https:// (or http://) URL, got {jwks_url!r}"
            )
    if jwks_name is not None:
        jwks_file = Path(jwks_name)
        if not jwks_file.is_absolute():
            jwks_file = base_dir / jwks_file
        if not jwks_file.is_file():
            raise ValueError(f"{section}.jwks_file: {jwks_file} not found")

    portal_client_id = text("portal_client_id", required=False)
    secret_name = text("portal_client_secret_file", required=False)
    secret_file: Path | None = None
    if secret_name is not None:
        if portal_client_id is None:
            raise ValueError(f"{section}.portal_client_secret_file: without portal_client_id")
        secret_file = Path(secret_name)
        if not secret_file.is_absolute():
            secret_file = base_dir / secret_file
        if not secret_file.is_file():
            raise ValueError(f"{section}.portal_client_secret_file: {secret_file} not found")

    leeway = table.get("leeway_seconds", 60)
    if isinstance(leeway, bool) or not isinstance(leeway, int) or not 0 <= leeway <= 3600:
        raise ValueError(f"{section}.leeway_seconds: expected 0-3600 seconds, got {leeway!r}")

    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    if "algorithms" in table:
        raw = table["algorithms"]
        if not isinstance(raw, list) or not raw:
            raise ValueError(f"{section}.algorithms: expected a non-empty list, got {raw!r}")
        for alg in raw:
            if alg not in ASYMMETRIC_ALGORITHMS:
                raise ValueError(
                    f"{section}.algorithms: {alg!r} not allowed, expected some of "
                    f"{', '.join(sorted(ASYMMETRIC_ALGORITHMS))}"
                )
        algorithms = tuple(raw)

    clients = table.get("clients")
    if not isinstance(clients, Mapping) or not clients:
        raise ValueError(
            f"{section}.clients: expected a table of client id = [scopes], with at least one"
        )
    client_scopes: dict[str, frozenset[str]] = {}
    for client, scopes in clients.items():
        where = f'{section}.clients."{client}"'
        if not client.strip():
            raise ValueError(f"{section}.clients: client id must not be empty")
        if not isinstance(scopes, list) or not scopes:
            raise ValueError(f"{where}: expected a non-empty list of scopes, got {scopes!r}")
        for scope in scopes:
            if scope not in SCOPES:
                raise ValueError(
                    f"{where}: unknown scope {scope!r}, "
                    f"expected some of {', '.join(sorted(SCOPES))}"
                )
        client_scopes[client] = frozenset(scopes)

    return OidcConfig(
        issuer=issuer,
        audience=audience,
        jwks_url=jwks_url,
        jwks_file=jwks_file,
        client_scopes=client_scopes,
        leeway_seconds=leeway,
        algorithms=algorithms,
        portal_client_id=portal_client_id,
        portal_client_secret_file=secret_file,
    )


def fetch_url(url: str, *, timeout: float = FETCH_TIMEOUT) -> bytes:
    """GET ``url`` (system trust store, no redirects, no proxies from the environment);
    the body of a 200 of at most ``MAX_JWKS_BYTES``. Raises ``OSError`` or ``httpx.HTTPError``."""
    with (
        httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client,
        client.stream("GET", url, headers={"Accept": "application/json"}) as response,
    ):
        if response.status_code != 200:
            raise OSError(f"HTTP {response.status_code}")
        body = bytearray()
        for chunk in response.iter_bytes():
            body += chunk
            if len(body) > MAX_JWKS_BYTES:
                raise OSError(f"larger than {MAX_JWKS_BYTES} bytes")
        return bytes(body)


@dataclass(frozen=True, slots=True)
class _KeySet:
    keys: Mapping[str, Mapping[str, Any]]  # kid -> JWK
    loaded_at: float


class OidcVerifier:
    """Verifies bearer JWTs against one ``OidcConfig``; safe to share between threads."""

    def __init__(
        self,
        config: OidcConfig,
        *,
        clock: Callable[[], float] = time.time,
        fetch: Callable[[str], bytes] | None = None,
    ) -> None:
        self._config = config
        self._clock = clock
        self._fetch = fetch if fetch is not None else fetch_url
        self._lock = threading.Lock()
        self._keys: _KeySet | None = None
        self._last_attempt: float | None = None
        self._prepared: dict[tuple[str, str], jwt.PyJWK] = {}

    @property
    def config(self) -> OidcConfig:
        return self._config

    def load_keys(self) -> int:
        """Load the JWKS now (a server calls this at start to fail early); the number of
        usable signing keys. Raises ``JwksUnavailable``."""
        with self._lock:
            return len(self._reload().keys)

    def verify(self, token: str) -> tuple[str, frozenset[str]]:
        """Return (actor, scopes); actor like 'oidc:<client id>'. Raises InvalidToken."""
        claims = self._verified(token, audience=self._config.audience)
        client = _client_id(claims)
        scopes = self._config.client_scopes.get(client)
        if scopes is None:
            raise InvalidToken("client not allowed")
        return f"oidc:{client}", scopes

    def verify_id_token(self, token: str, *, client_id: str, nonce: str) -> Mapping[str, Any]:
        """The claims of an ID token for the relying party ``client_id`` (OIDC Core
        3.1.3.7): signed by the provider's keys, ``iss`` the issuer, ``aud`` containing
        ``client_id`` (with ``azp`` equal to it when present, required with several
        audiences), ``exp`` not passed, ``iat`` present, ``nonce`` the one sent, and a
        ``sub``. Raises InvalidToken."""
        claims = self._verified(
            token, audience=client_id, required=("exp", "iss", "aud", "iat", "sub", "nonce")
        )
        audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        azp = claims.get("azp")
        if azp is not None and azp != client_id:
            raise InvalidToken("token authorized for another party (azp)")
        if azp is None and len(audiences) > 1:
            raise InvalidToken("token for several audiences names no authorized party (azp)")
        given = claims["nonce"]
        if not isinstance(given, str) or not hmac.compare_digest(given.encode(), nonce.encode()):
            raise InvalidToken("wrong nonce")
        subject = claims["sub"]
        if not isinstance(subject, str) or not 0 < len(subject) <= 255:
            raise InvalidToken("token claim sub is not a subject")
        return claims

    def _verified(
        self, token: str, *, audience: str, required: tuple[str, ...] = ("exp", "iss", "aud")
    ) -> dict[str, Any]:
        """The claims of ``token`` once its header, key, signature, issuer, audience and
        times are checked."""
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_CHARS:
            raise InvalidToken("malformed token")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidToken("malformed token") from None
        alg = header.get("alg")
        # Checked before any key is looked at: the header is the attacker's to choose.
        if not isinstance(alg, str) or alg not in self._config.algorithms:
            raise InvalidToken(
                f"token algorithm not allowed (accepted: {', '.join(self._config.algorithms)})"
            )
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise InvalidToken("token has no key id (kid)")
        key = self._key(kid, alg)
        claims = self._decode(token, key, alg, audience=audience, required=required)
        self._check_times(claims)
        return claims

    # -- claims ----------------------------------------------------------------

    def _decode(
        self, token: str, key: jwt.PyJWK, alg: str, *, audience: str, required: tuple[str, ...]
    ) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                audience=audience,
                issuer=self._config.issuer,
                options={
                    "require": list(required),
                    # Times are checked in _check_times against the injected clock.
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "enforce_minimum_key_length": True,
                },
            )
        except jwt.MissingRequiredClaimError as exc:
            raise InvalidToken(f"token has no {exc.claim} claim") from None
        except jwt.InvalidIssuerError:
            raise InvalidToken("wrong issuer") from None
        except jwt.InvalidAudienceError:
            raise InvalidToken("wrong audience") from None
        except jwt.InvalidSignatureError:
            raise InvalidToken("bad signature") from None
        except jwt.InvalidAlgorithmError:
            raise InvalidToken("token algorithm does not fit its key") from None
        except jwt.InvalidKeyError:
            raise InvalidToken("signing key not acceptable") from None
        except jwt.PyJWTError:
            raise InvalidToken("malformed token") from None
        return claims

    def _check_times(self, claims: Mapping[str, Any]) -> None:
        now = self._clock()
        leeway = self._config.leeway_seconds
        exp = _numeric_claim(claims, "exp")
        if exp is None:
            raise InvalidToken("token has no exp claim")
        if exp <= now - leeway:
            raise InvalidToken("token expired")
        nbf = _numeric_claim(claims, "nbf")
        if nbf is not None and nbf > now + leeway:
            raise InvalidToken("token not yet valid")
        iat = _numeric_claim(claims, "iat")
        if iat is not None and iat > now + leeway:
            raise InvalidToken("token issued in the future")

    # -- keys ------------------------------------------------------------------

    def _key(self, kid: str, alg: str) -> jwt.PyJWK:
        with self._lock:
            keys = self._current()
            jwk = keys.keys.get(kid)
            if jwk is None and self._may_refresh():
                # An unknown kid usually means the provider rotated its keys.
                log.info("OIDC: unknown kid %r, fetching the JWKS again", kid[:64])
                jwk = self._reload().keys.get(kid)
            if jwk is None:
                raise InvalidToken("unknown signing key (kid)")
            prepared = self._prepared.get((kid, alg))
            if prepared is None:
                prepared = _prepare(jwk, alg)
                self._prepared[(kid, alg)] = prepared
            return prepared

    def _current(self) -> _KeySet:
        if self._keys is None:
            if not self._may_refresh():
                # The last attempt failed moments ago: do not queue every request behind
                # another fetch from a provider that is down.
                raise JwksUnavailable("signing keys unavailable")
            return self._reload()
        if self._clock() - self._keys.loaded_at > MAX_JWKS_AGE and self._may_refresh():
            try:
                return self._reload()
            except JwksUnavailable as exc:
                # Keys a day old beat no keys: the provider rotates with overlap.
                log.warning("OIDC: keeping the cached JWKS: %s", exc)
        return self._keys

    def _may_refresh(self) -> bool:
        return self._last_attempt is None or self._clock() - self._last_attempt >= REFRESH_INTERVAL

    def _reload(self) -> _KeySet:
        self._last_attempt = self._clock()
        source = self._config.jwks_url or str(self._config.jwks_file)
        try:
            if self._config.jwks_url is not None:
                data = self._fetch(self._config.jwks_url)
            else:
                assert self._config.jwks_file is not None
                data = self._config.jwks_file.read_bytes()
        except Exception as exc:  # any failure to fetch or read means: no keys now
            log.warning("OIDC: cannot load the JWKS from %s: %s", source, exc)
            raise JwksUnavailable("signing keys unavailable") from exc
        try:
            keys = _parse_jwks(data)
        except ValueError as exc:
            log.warning("OIDC: JWKS from %s unusable: %s", source, exc)
            raise JwksUnavailable("signing keys unavailable") from exc
        self._keys = _KeySet(keys=keys, loaded_at=self._last_attempt)
        self._prepared.clear()
        log.info("OIDC: loaded %d signing key(s) from %s", len(keys), source)
        return self._keys


def _parse_jwks(data: bytes) -> dict[str, Mapping[str, Any]]:
    """The signing keys of a JWKS document by kid; symmetric and encryption keys are dropped."""
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ValueError("not JSON") from exc
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError('not a JWKS (no "keys" list)')
    keys: dict[str, Mapping[str, Any]] = {}
    for jwk in document["keys"]:
        if not isinstance(jwk, dict):
            continue
        kid, kty, use = jwk.get("kid"), jwk.get("kty"), jwk.get("use", "sig")
        if not isinstance(kid, str) or not kid or use != "sig":
            continue
        if kty not in ("RSA", "EC", "OKP"):  # never "oct": a shared secret is no public key
            continue
        keys.setdefault(kid, jwk)
    if not keys:
        raise ValueError("no signing keys with a kid")
    return keys


def _prepare(jwk: Mapping[str, Any], alg: str) -> jwt.PyJWK:
    """The JWK as a key bound to ``alg``, when it is a key for that algorithm."""
    kty, crv = _KEY_KIND[alg]
    declared = jwk.get("alg")
    if jwk.get("kty") != kty or (crv is not None and jwk.get("crv") != crv):
        raise InvalidToken("token algorithm does not fit its key")
    if declared is not None and declared != alg:
        raise InvalidToken("token algorithm does not fit its key")
    try:
        return jwt.PyJWK(dict(jwk), algorithm=alg)
    except jwt.PyJWTError:
        raise InvalidToken("signing key not usable") from None


def _numeric_claim(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidToken(f"token claim {name} is not a number")
    return float(value)


def _client_id(claims: Mapping[str, Any]) -> str:
    for name in CLIENT_ID_CLAIMS:
        value = claims.get(name)
        if value is None:
            continue
        if not isinstance(value, str) or not value:
            raise InvalidToken(f"token claim {name} is not a string")
        return value
    raise InvalidToken("token names no client (azp, appid, client_id or sub)")
