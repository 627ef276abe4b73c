"""Portal sessions: an HMAC-signed cookie naming the API token that signed in, or the
OIDC subject (``portal/oidc_signin.py``).

Nothing is stored server-side, so every worker process of a node accepts the
cookie (they share the key file in the data directory) and no migration is
needed. The cookie says which token signed in, until when, and a random nonce;
its MAC covers those and the token's stored digest, and every request looks the
token up again: a token revoked or expired ends its sessions at once. An OIDC
session names the person's ``sub`` instead, looked up in ``[api.oidc.clients]``
on every request.

CSRF: the token of a session's forms is derived from its nonce (session-bound,
nothing to store); the sign-in form, which has no session yet, is bound the
same way to a short-lived pre-session cookie (login CSRF).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from estkit.store import ApiToken

KEY_FILE = "portal-session.key"
SESSION_COOKIE = "estkit_session"
LOGIN_COOKIE = "estkit_signin"
SESSION_LIFETIME = dt.timedelta(hours=8)
LOGIN_LIFETIME = dt.timedelta(hours=1)
COOKIE_PATH = "/ui"
_VERSION = "v1"
_OIDC_VERSION = "o1"
MAX_SUBJECT = 255  # OIDC Core 2: a sub is at most 255 ASCII characters


def load_or_create_key(data_dir: Path) -> bytes:
    """The session key of this data directory (``portal-session.key``, 0600), made on
    first use. Made whole beside it and linked into place, so worker processes starting
    together all end up with the one key."""
    path = data_dir / KEY_FILE
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    temp = path.with_name(f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secrets.token_hex(32).encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(temp, path)  # fails if another process linked its key first: use that one
    except FileExistsError:
        pass
    finally:
        temp.unlink()
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    text = path.read_text().strip()
    if len(text) < 64:
        raise ValueError(f"{path}: expected 64 hex digits; remove it to make a new key")
    return bytes.fromhex(text)


@dataclass(frozen=True, slots=True)
class Session:
    token_id: int | None  # the API token that signed in, or None
    expires_at: dt.datetime
    nonce: str
    subject: str | None = None  # the OIDC subject that signed in, or None


class SessionSigner:
    """Makes and checks session cookies and CSRF tokens with one key."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 32:
            raise ValueError("session key: at least 32 bytes")
        self._key = key

    def _mac(self, *parts: str) -> str:
        digest = hmac.new(self._key, "\x00".join(parts).encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def issue(self, token: ApiToken, *, now: dt.datetime) -> tuple[str, Session]:
        """A new session of ``token``: (cookie value, session)."""
        session = Session(
            token_id=token.id,
            expires_at=(now + SESSION_LIFETIME).replace(microsecond=0),
            nonce=secrets.token_urlsafe(18),
        )
        payload = f"{_VERSION}.{token.id}.{int(session.expires_at.timestamp())}.{session.nonce}"
        return f"{payload}.{self._mac('session', payload, token.token_hash)}", session

    def issue_subject(self, subject: str, *, now: dt.datetime) -> tuple[str, Session]:
        """A new session of the OIDC subject ``subject``: (cookie value, session)."""
        if not 0 < len(subject) <= MAX_SUBJECT:
            raise ValueError(f"an OIDC subject of 1-{MAX_SUBJECT} characters, got {subject!r}")
        session = Session(
            token_id=None,
            expires_at=(now + SESSION_LIFETIME).replace(microsecond=0),
            nonce=secrets.token_urlsafe(18),
            subject=subject,
        )
        name = base64.urlsafe_b64encode(subject.encode()).rstrip(b"=").decode()
        payload = f"{_OIDC_VERSION}.{name}.{int(session.expires_at.timestamp())}.{session.nonce}"
        return f"{payload}.{self._mac('oidc-session', payload)}", session

    def parse(self, value: str, *, now: dt.datetime) -> Session | None:
        """The session a cookie claims (MAC not yet checked: ``verify`` or
        ``verify_subject``), or None when it is malformed or expired."""
        parts = value.split(".")
        if len(parts) != 5 or parts[0] not in (_VERSION, _OIDC_VERSION):
            return None
        version, who, expires, nonce, _mac = parts
        if not expires.isdigit() or len(expires) > 12:
            return None
        expires_at = dt.datetime.fromtimestamp(int(expires), dt.UTC)
        if expires_at <= now:
            return None
        if version == _OIDC_VERSION:
            subject = _unb64(who)
            if subject is None or not 0 < len(subject) <= MAX_SUBJECT:
                return None
            return Session(token_id=None, expires_at=expires_at, nonce=nonce, subject=subject)
        if not who.isdigit() or len(who) > 18:
            return None
        return Session(token_id=int(who), expires_at=expires_at, nonce=nonce)

    def verify(self, value: str, token: ApiToken) -> bool:
        """The cookie's MAC is right for ``token`` (its id and stored digest)."""
        payload, _, mac = value.rpartition(".")
        if not payload.startswith(f"{_VERSION}."):
            return False
        expected = self._mac("session", payload, token.token_hash)
        return hmac.compare_digest(mac, expected)

    def verify_subject(self, value: str) -> bool:
        """The MAC of an OIDC session's cookie is right."""
        payload, _, mac = value.rpartition(".")
        if not payload.startswith(f"{_OIDC_VERSION}."):
            return False
        return hmac.compare_digest(mac, self._mac("oidc-session", payload))

    def derive(self, purpose: str, *values: str) -> str:
        """A value only this key makes from ``values`` (43 URL-safe characters), for
        ``purpose``: e.g. an OIDC sign-in's state, nonce and PKCE verifier."""
        return self._mac(f"derive:{purpose}", *values)

    def csrf(self, session: Session) -> str:
        return self._mac("csrf", session.nonce)

    def login_nonce(self) -> str:
        return secrets.token_urlsafe(18)

    def login_csrf(self, nonce: str) -> str:
        return self._mac("signin", nonce)

    @staticmethod
    def same(given: str | None, expected: str) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def _unb64(text: str) -> str | None:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        return None
