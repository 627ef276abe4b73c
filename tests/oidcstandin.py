"""A stand-in OpenID provider on 127.0.0.1 (a free port), for the portal's OIDC sign-in.

What a relying party sees of a real provider, per OpenID Connect Core 1.0, Discovery
1.0, RFC 6749 and RFC 7636:

- ``GET /.well-known/openid-configuration``: the discovery document;
- ``GET /authorize``: checks the request (response_type=code, a registered client and
  its exact redirect URI, scope with openid, a PKCE S256 challenge), then consents at
  once for the person ``subject`` and redirects back with ``code`` and ``state``; a bad
  request with a good redirect URI is redirected back with ``error`` (4.1.2.1);
- ``POST /token``: redeems a code once, for the client it was issued to (a
  confidential client authenticates with client_secret_basic), with the same redirect
  URI and the PKCE verifier whose S256 is the challenge; answers the ID token (RS256,
  ``kid``) with ``iss``, ``sub``, ``aud``, ``exp``, ``iat``, ``auth_time``, ``nonce``,
  ``azp``, and ``Cache-Control: no-store``;
- ``GET /jwks``: the public key set.

A test changes what the provider does through the attributes: ``subject``,
``id_token_claims`` (claims put over the ID token's), ``sign_with`` (another key),
``error`` (the authorization endpoint refuses).
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

CODE_LIFETIME = 60.0  # seconds a code may wait to be redeemed


@dataclass
class Client:
    client_id: str
    redirect_uri: str
    secret: str | None = None  # None: a public client


@dataclass
class Grant:
    """An authorization code and what it was issued for."""

    client_id: str
    redirect_uri: str
    nonce: str | None
    challenge: str
    subject: str
    issued: float
    used: bool = False


@dataclass
class Provider:
    clients: dict[str, Client]
    key: rsa.RSAPrivateKey
    kid: str = "standin-1"
    issuer: str = ""
    subject: str = "alice"
    id_token_claims: dict[str, Any] = field(default_factory=dict)
    sign_with: rsa.RSAPrivateKey | None = None
    error: str | None = None
    grants: dict[str, Grant] = field(default_factory=dict)
    token_requests: list[dict[str, str]] = field(default_factory=list)
    authorize_requests: list[dict[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def fresh(cls, **settings: Any) -> Provider:
        """A provider with a new RSA signing key and no clients yet."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return cls(clients={}, key=key, **settings)

    def discovery(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "authorization_endpoint": f"{self.issuer}/authorize",
            "token_endpoint": f"{self.issuer}/token",
            "jwks_uri": f"{self.issuer}/jwks",
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "scopes_supported": ["openid"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "none"],
            "code_challenge_methods_supported": ["S256"],
            "grant_types_supported": ["authorization_code"],
        }

    def jwks(self) -> dict[str, Any]:
        jwk: dict[str, Any] = RSAAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        return {"keys": [{**jwk, "kid": self.kid, "use": "sig", "alg": "RS256"}]}

    # -- the authorization endpoint ------------------------------------------------------

    def authorize(self, query: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        self.authorize_requests.append(query)
        client = self.clients.get(query.get("client_id", ""))
        redirect_uri = query.get("redirect_uri", "")
        if client is None or redirect_uri != client.redirect_uri:
            # Never redirect to an unregistered URI (RFC 6749 4.1.2.1).
            return 400, {"Content-Type": "text/plain"}, b"unknown client or redirect_uri\n"
        state = query.get("state")
        back = {"state": state} if state is not None else {}
        problem = self.error
        if query.get("response_type") != "code":
            problem = "unsupported_response_type"
        elif "openid" not in query.get("scope", "").split():
            problem = "invalid_scope"
        elif query.get("code_challenge_method") != "S256" or not query.get("code_challenge"):
            problem = "invalid_request"  # PKCE is required of every client here
        if problem is not None:
            return 302, {"Location": _with_query(redirect_uri, {"error": problem, **back})}, b""
        code = secrets.token_urlsafe(24)
        with self.lock:
            self.grants[code] = Grant(
                client_id=client.client_id,
                redirect_uri=redirect_uri,
                nonce=query.get("nonce"),
                challenge=query["code_challenge"],
                subject=self.subject,
                issued=time.time(),
            )
        return 302, {"Location": _with_query(redirect_uri, {"code": code, **back})}, b""

    # -- the token endpoint --------------------------------------------------------------

    def token(self, form: dict[str, str], authorization: str | None) -> tuple[int, Any]:
        self.token_requests.append(form)
        client_id, secret = _basic(authorization)
        if client_id is None:
            client_id = form.get("client_id")
        client = self.clients.get(client_id or "")
        if client is None or (client.secret is not None and secret != client.secret):
            return 401, {"error": "invalid_client"}
        if client.secret is None and secret is not None:
            return 401, {"error": "invalid_client"}
        if form.get("grant_type") != "authorization_code":
            return 400, {"error": "unsupported_grant_type"}
        with self.lock:
            grant = self.grants.get(form.get("code", ""))
            if grant is None or grant.used or time.time() - grant.issued > CODE_LIFETIME:
                return 400, {"error": "invalid_grant"}
            grant.used = True
        if grant.client_id != client.client_id or grant.redirect_uri != form.get("redirect_uri"):
            return 400, {"error": "invalid_grant"}
        verifier = form.get("code_verifier", "")
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
        if not 43 <= len(verifier) <= 128 or challenge.rstrip(b"=").decode() != grant.challenge:
            return 400, {"error": "invalid_grant"}
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": grant.subject,
            "aud": client.client_id,
            "azp": client.client_id,
            "exp": now + 300,
            "iat": now,
            "auth_time": now,
        }
        if grant.nonce is not None:
            claims["nonce"] = grant.nonce
        claims = {k: v for k, v in {**claims, **self.id_token_claims}.items() if v is not None}
        id_token = jwt.encode(
            claims, self.sign_with or self.key, algorithm="RS256", headers={"kid": self.kid}
        )
        return 200, {
            "access_token": secrets.token_urlsafe(24),
            "token_type": "Bearer",
            "expires_in": 300,
            "id_token": id_token,
        }


def _with_query(url: str, params: dict[str, str]) -> str:
    return f"{url}{'&' if urlsplit(url).query else '?'}{urlencode(params)}"


def _basic(authorization: str | None) -> tuple[str | None, str | None]:
    """client_secret_basic: both parts form-decoded after base64 (RFC 6749 2.3.1)."""
    if not authorization or not authorization.lower().startswith("basic "):
        return None, None
    decoded = base64.b64decode(authorization[6:]).decode()
    user, _, password = decoded.partition(":")
    return unquote(user.replace("+", " ")), unquote(password.replace("+", " "))


@contextmanager
def running(provider: Provider) -> Iterator[Provider]:
    """``provider`` served on 127.0.0.1 (its ``issuer`` set to its URL) until the block
    ends."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            query = dict(parse_qsl(parts.query))
            if parts.path == "/.well-known/openid-configuration":
                self._json(200, provider.discovery())
            elif parts.path == "/jwks":
                self._json(200, provider.jwks())
            elif parts.path == "/authorize":
                status, headers, body = provider.authorize(query)
                self._send(status, headers, body)
            else:
                self._send(404, {"Content-Type": "text/plain"}, b"not found\n")

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length).decode()
            if urlsplit(self.path).path != "/token":
                self._send(404, {"Content-Type": "text/plain"}, b"not found\n")
                return
            if self.headers.get("Content-Type", "").split(";")[0] != (
                "application/x-www-form-urlencoded"
            ):
                self._json(400, {"error": "invalid_request"})
                return
            status, answer = provider.token(
                dict(parse_qsl(body)), self.headers.get("Authorization")
            )
            self._json(status, answer)

        def _json(self, status: int, document: Any) -> None:
            body = json.dumps(document).encode()
            headers = {"Content-Type": "application/json", "Cache-Control": "no-store"}
            self._send(status, headers, body)

        def _send(self, status: int, headers: dict[str, str], body: bytes) -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    provider.issuer = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread.start()
    try:
        yield provider
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)
