"""One-time enrollment secrets: generated here, stored only as a slow hash (scrypt)."""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import secrets as _secrets

_N, _R, _P = 2**14, 8, 1
_PREFIX = b"scrypt1$"


def new_secret() -> str:
    """A random secret of 192 bits, URL-safe so it can travel in Basic auth."""
    return _secrets.token_urlsafe(24)


def hash_secret(secret: str) -> bytes:
    salt = os.urandom(16)
    digest = hashlib.scrypt(secret.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=32)
    return _PREFIX + salt + digest


def verify_secret(secret: str, stored: bytes) -> bool:
    """Constant-time check of ``secret`` against a stored hash."""
    if not stored.startswith(_PREFIX) or len(stored) != len(_PREFIX) + 48:
        return False
    salt = stored[len(_PREFIX) : len(_PREFIX) + 16]
    digest = hashlib.scrypt(secret.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=32)
    return hmac.compare_digest(digest, stored[len(_PREFIX) + 16 :])


@functools.cache
def dummy_hash() -> bytes:
    """A hash to check against when a device has no secret, so both cost the same."""
    return hash_secret(new_secret())


API_TOKEN_PREFIX = "estk_"  # noqa: S105 - a prefix, not a secret


def new_api_token() -> str:
    """A bearer token for the REST API: 256 random bits behind a recognisable prefix."""
    return API_TOKEN_PREFIX + _secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    """What the store keeps of an API token. A fast hash suffices: the token has 256 bits
    of entropy, so a stolen digest cannot be brute-forced back into it."""
    return hashlib.sha256(token.encode()).hexdigest()
