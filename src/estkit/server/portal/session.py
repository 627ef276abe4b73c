"""Portal sessions: an HMAC-signed cookie naming the API token that signed in.

Nothing is stored server-side, so every worker process of a node accepts the
cookie (they share the key file in the data directory) and no migration is
needed. The cookie says which token signed in, until when, and a random nonce;
its MAC covers those and the token's stored digest, and every request looks the
token up again: a token revoked or expired ends its sessions at once.

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
    token_id: int
    expires_at: dt.datetime
    nonce: str


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

    def parse(self, value: str, *, now: dt.datetime) -> Session | None:
        """The session a cookie claims (MAC not yet checked: ``verify``), or None when
        it is malformed or expired."""
        parts = value.split(".")
        if len(parts) != 5 or parts[0] != _VERSION:
            return None
        _, token_id, expires, nonce, _mac = parts
        if not (token_id.isdigit() and expires.isdigit()) or len(token_id) > 18:
            return None
        expires_at = dt.datetime.fromtimestamp(int(expires), dt.UTC)
        if expires_at <= now:
            return None
        return Session(token_id=int(token_id), expires_at=expires_at, nonce=nonce)

    def verify(self, value: str, token: ApiToken) -> bool:
        """The cookie's MAC is right for ``token`` (its id and stored digest)."""
        payload, _, mac = value.rpartition(".")
        expected = self._mac("session", payload, token.token_hash)
        return hmac.compare_digest(mac, expected)

    def csrf(self, session: Session) -> str:
        return self._mac("csrf", session.nonce)

    def login_nonce(self) -> str:
        return secrets.token_urlsafe(18)

    def login_csrf(self, nonce: str) -> str:
        return self._mac("signin", nonce)

    @staticmethod
    def same(given: str | None, expected: str) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), expected.encode())
