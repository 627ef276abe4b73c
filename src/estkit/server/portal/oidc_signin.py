"""Portal sign-in with the OpenID provider of ``[api.oidc]``: the authorization code
flow with PKCE (S256), OIDC Core 3.1, for the client ``portal_client_id``.

    POST /ui/login/oidc  ──303──►  the provider's authorization endpoint
                                   (response_type=code, scope=openid, state, nonce,
                                   code_challenge, code_challenge_method=S256)
    the person signs in there; the provider sends the browser back:
    GET /ui/login/oidc/callback?code&state
        the state must be this browser's; the code is redeemed at the token endpoint
        with the PKCE verifier (and the client secret, for a confidential client);
        the ID token must be signed by the provider's keys (JWKS), for this client,
        unexpired, with the nonce sent (``OidcVerifier.verify_id_token``)
    ──► a session of the person's ``sub``, whose scopes ``[api.oidc.clients]`` lists.

The endpoints come from the provider's discovery document
(``<issuer>/.well-known/openid-configuration``), fetched on first use and kept.

Nothing of a sign-in in progress is stored on the server: the pre-session cookie
(``estkit_oidc``, ten minutes) carries a random flow id, the page to return to and a
MAC; the state, nonce and code verifier are derived from the flow id with the
session key, so only this server can make them and a browser can finish only the
sign-in it started. The cookie is ``SameSite=Lax``: the provider's redirect back is a
cross-site navigation, which a Strict cookie need not come with. For the same reason
the callback answers a page of the portal's own that moves on to the portal, rather
than a redirect that would still be part of the cross-site chain.

Errors: ``SignInRefused`` (a one-line reason for the person, never a secret) and its
child ``ProviderUnavailable`` (the provider could not be reached or answered
nonsense: a 503 rather than a 403).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx

from estkit.fileio import read_private
from estkit.server.config import ConfigError, ServerConfig
from estkit.server.oidc import (
    FETCH_TIMEOUT,
    MAX_JWKS_AGE,
    REFRESH_INTERVAL,
    InvalidToken,
    OidcConfig,
    OidcVerifier,
    fetch_url,
)
from estkit.server.portal.session import SessionSigner

FLOW_COOKIE = "estkit_oidc"
FLOW_LIFETIME = dt.timedelta(minutes=10)
CALLBACK_PATH = "/ui/login/oidc/callback"
MAX_TOKEN_RESPONSE = 1 << 20
_LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


class SignInRefused(Exception):
    """The sign-in did not succeed; ``str(exc)`` is a one-line reason to show."""


class ProviderUnavailable(SignInRefused):
    """The provider's discovery document or token endpoint could not be used."""


@dataclass(frozen=True, slots=True)
class Endpoints:
    authorization: str
    token: str


@dataclass(frozen=True, slots=True)
class Flow:
    """A sign-in in progress, as its pre-session cookie says."""

    flow_id: str
    expires_at: dt.datetime
    next_path: str


def code_challenge(verifier: str) -> str:
    """PKCE's S256 challenge of ``verifier`` (RFC 7636 4.2)."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _secure_url(value: object, what: str) -> str:
    """An endpoint URL: https, or http on this host (a provider for tests)."""
    if not isinstance(value, str):
        raise ProviderUnavailable(f"the provider's discovery document has no {what}")
    parts = urlsplit(value)
    if not parts.hostname or not (
        parts.scheme == "https" or (parts.scheme == "http" and parts.hostname in _LOOPBACK)
    ):
        raise ProviderUnavailable(f"the provider's {what} is not an https URL")
    return value


class OidcSignIn:
    """Starts and finishes sign-ins; safe to share between threads."""

    def __init__(
        self,
        *,
        config: OidcConfig,
        verifier: OidcVerifier,
        signer: SessionSigner,
        redirect_uri: str,
        fetch: Callable[[str], bytes] = fetch_url,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if config.portal_client_id is None:
            raise ValueError("OIDC sign-in needs api.oidc.portal_client_id")
        self.client_id = config.portal_client_id
        self._config = config
        self._secret: str | None = None
        if config.portal_client_secret_file is not None:
            self._secret = (
                read_private(
                    config.portal_client_secret_file,
                    where="api.oidc.portal_client_secret_file",
                    what="a client secret",
                )
                .decode()
                .strip()
            )
            if not self._secret:
                raise ValueError(f"{config.portal_client_secret_file} is empty")
        self._verifier = verifier
        self._signer = signer
        self.redirect_uri = redirect_uri
        self._fetch = fetch
        self._clock = clock
        self._lock = threading.Lock()
        self._endpoints: Endpoints | None = None
        self._loaded_at = 0.0
        self._last_attempt: float | None = None

    def scopes(self, subject: str) -> frozenset[str]:
        """What ``[api.oidc.clients]`` grants the person ``subject`` (none: nothing)."""
        return self._config.client_scopes.get(subject, frozenset())

    @property
    def provider(self) -> str:
        """The provider as the sign-in button names it: its issuer's host."""
        return urlsplit(self._config.issuer).hostname or self._config.issuer

    # -- the provider's endpoints --------------------------------------------------------

    def endpoints(self) -> Endpoints:
        """From the discovery document, fetched on first use and again once a day; a
        failed fetch is not repeated within ``REFRESH_INTERVAL``."""
        with self._lock:
            now = self._clock()
            fresh = self._endpoints is not None and now - self._loaded_at < MAX_JWKS_AGE
            may_try = self._last_attempt is None or now - self._last_attempt >= REFRESH_INTERVAL
            if fresh or not may_try:
                if self._endpoints is None:
                    raise ProviderUnavailable("the identity provider cannot be reached")
                return self._endpoints
            self._last_attempt = now
            try:
                self._endpoints = self._discover()
                self._loaded_at = now
            except ProviderUnavailable:
                if self._endpoints is None:
                    raise
            return self._endpoints

    def _discover(self) -> Endpoints:
        url = self._config.issuer.rstrip("/") + "/.well-known/openid-configuration"
        try:
            document = json.loads(self._fetch(url))
        except Exception:  # network, HTTP status, size or JSON: the provider is unusable
            raise ProviderUnavailable("the identity provider cannot be reached") from None
        if not isinstance(document, dict):
            raise ProviderUnavailable("the provider's discovery document is not an object")
        # OIDC Discovery 4.3: the document must name the very issuer it was fetched for.
        if document.get("issuer") != self._config.issuer:
            raise ProviderUnavailable("the provider's discovery document names another issuer")
        methods = document.get("code_challenge_methods_supported")
        if isinstance(methods, list) and "S256" not in methods:
            raise ProviderUnavailable("the provider does not support PKCE with S256")
        return Endpoints(
            authorization=_secure_url(
                document.get("authorization_endpoint"), "authorization endpoint"
            ),
            token=_secure_url(document.get("token_endpoint"), "token endpoint"),
        )

    # -- the flow ------------------------------------------------------------------------

    def _derived(self, flow_id: str) -> tuple[str, str, str]:
        """(state, nonce, PKCE verifier) of a flow: 43 URL-safe characters each."""
        return (
            self._signer.derive("oidc-state", flow_id),
            self._signer.derive("oidc-nonce", flow_id),
            self._signer.derive("oidc-verifier", flow_id),
        )

    def start(self, next_path: str, *, now: dt.datetime) -> tuple[str, str]:
        """(the authorization URL to send the browser to, the pre-session cookie)."""
        endpoint = self.endpoints().authorization
        flow_id = secrets.token_urlsafe(24)
        state, nonce, verifier = self._derived(flow_id)
        expires = int((now + FLOW_LIFETIME).timestamp())
        target = base64.urlsafe_b64encode(next_path.encode()).rstrip(b"=").decode()
        payload = f"{flow_id}.{expires}.{target}"
        cookie = f"{payload}.{self._signer.derive('oidc-flow', payload)}"
        query = {
            "response_type": "code",
            "client_id": self.client_id,
            "redirect_uri": self.redirect_uri,
            "scope": "openid",
            "state": state,
            "nonce": nonce,
            "code_challenge": code_challenge(verifier),
            "code_challenge_method": "S256",
        }
        parts = urlsplit(endpoint)
        kept = [(k, v) for k, v in parse_qsl(parts.query) if k not in query]
        url = urlunsplit(parts._replace(query=urlencode([*kept, *query.items()])))
        return url, cookie

    def flow(self, cookie: str | None, *, now: dt.datetime) -> Flow:
        """The sign-in this browser started, from its pre-session cookie."""
        if not cookie:
            raise SignInRefused("no sign-in was started in this browser, or it took too long")
        payload, _, mac = cookie.rpartition(".")
        parts = payload.split(".")
        if len(parts) != 3 or not self._signer.same(mac, self._signer.derive("oidc-flow", payload)):
            raise SignInRefused("the sign-in cookie is not this server's")
        flow_id, expires, target = parts
        if not expires.isdigit() or int(expires) <= now.timestamp():
            raise SignInRefused("the sign-in took too long: start again")
        next_path = base64.urlsafe_b64decode(target + "=" * (-len(target) % 4)).decode()
        return Flow(flow_id, dt.datetime.fromtimestamp(int(expires), dt.UTC), next_path)

    def finish(self, flow: Flow, params: Mapping[str, str]) -> Mapping[str, Any]:
        """The ID token's claims of a finished sign-in: the callback's ``params`` checked
        against ``flow``, the code redeemed, the ID token validated."""
        state, nonce, verifier = self._derived(flow.flow_id)
        if not self._signer.same(params.get("state"), state):
            raise SignInRefused("the sign-in's state does not match this browser's")
        if "error" in params:
            error = params["error"][:64]
            description = params.get("error_description", "")[:200]
            said = f": {description}" if description.isprintable() and description else ""
            raise SignInRefused(f"the identity provider refused the sign-in ({error}){said}")
        code = params.get("code")
        if not code:
            raise SignInRefused("the identity provider sent no authorization code")
        id_token = self._redeem(code, verifier)
        try:
            return self._verifier.verify_id_token(id_token, client_id=self.client_id, nonce=nonce)
        except InvalidToken as exc:
            raise SignInRefused(f"the ID token is refused: {exc}") from None

    def _redeem(self, code: str, verifier: str) -> str:
        """The ID token the token endpoint gives for ``code`` (RFC 6749 4.1.3)."""
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self.redirect_uri,
            "code_verifier": verifier,
        }
        auth: httpx.BasicAuth | None = None
        if self._secret is None:
            form["client_id"] = self.client_id  # a public client names itself
        else:  # client_secret_basic (RFC 6749 2.3.1): both form-encoded first
            auth = httpx.BasicAuth(_form_encoded(self.client_id), _form_encoded(self._secret))
        try:
            with (
                httpx.Client(
                    timeout=FETCH_TIMEOUT, follow_redirects=False, trust_env=False
                ) as client,
                client.stream(
                    "POST",
                    self.endpoints().token,
                    data=form,
                    auth=auth,
                    headers={"Accept": "application/json"},
                ) as response,
            ):
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > MAX_TOKEN_RESPONSE:
                        raise ProviderUnavailable("the token endpoint's answer is too large")
                status = response.status_code
        except httpx.HTTPError:
            raise ProviderUnavailable(
                "the identity provider's token endpoint cannot be reached"
            ) from None
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise ProviderUnavailable("the token endpoint did not answer JSON")
        if status != 200:
            error = str(answer.get("error", f"HTTP {status}"))[:64]
            raise SignInRefused(f"the identity provider did not redeem the code ({error})")
        id_token = answer.get("id_token")
        if not isinstance(id_token, str) or not id_token:
            raise SignInRefused("the token endpoint gave no ID token")
        return id_token


def _form_encoded(value: str) -> str:
    return urlencode({"": value})[1:]


def oidc_sign_in(
    config: ServerConfig, verifier: OidcVerifier | None, signer: SessionSigner
) -> OidcSignIn | None:
    """The portal's OIDC sign-in when ``[api.oidc]`` names ``portal_client_id``; its
    callback is under the node's public URL (register it with the provider)."""
    if verifier is None or verifier.config.portal_client_id is None:
        return None
    try:
        return OidcSignIn(
            config=verifier.config,
            verifier=verifier,
            signer=signer,
            redirect_uri=config.public_url.rstrip("/") + CALLBACK_PATH,
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(f"api.oidc.portal_client_secret_file: {exc}") from None
