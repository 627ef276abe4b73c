"""One-time enrollment secrets and API tokens: generated here, stored only as digests.

Both are 192 or more random bits made by this module, never chosen by a person,
so a salted SHA-256 cannot be brute-forced back into them (the same reasoning as
NIST SP 800-63B for high-entropy authenticators). A slow hash (scrypt, 50 ms and
16 MiB per check) bought nothing for such secrets and made every HTTP Basic
attempt an amplifier (issue 10); hashes stored by earlier versions in scrypt
still verify until they expire.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import secrets as _secrets

_SHA256 = b"sha256$"  # salt (16) + SHA-256(salt + secret) (32)
_SCRYPT = b"scrypt1$"  # earlier versions: salt (16) + scrypt(secret, N=2^14, r=8, p=1) (32)
_N, _R, _P = 2**14, 8, 1


def new_secret() -> str:
    """A random secret of 192 bits, URL-safe so it can travel in Basic auth."""
    return _secrets.token_urlsafe(24)


def hash_secret(secret: str) -> bytes:
    salt = os.urandom(16)
    return _SHA256 + salt + hashlib.sha256(salt + secret.encode()).digest()


def verify_secret(secret: str, stored: bytes) -> bool:
    """Constant-time check of ``secret`` against a stored digest (either scheme)."""
    for prefix, digest in ((_SHA256, _sha256), (_SCRYPT, _scrypt)):
        if stored.startswith(prefix) and len(stored) == len(prefix) + 48:
            salt = stored[len(prefix) : len(prefix) + 16]
            return hmac.compare_digest(digest(secret, salt), stored[len(prefix) + 16 :])
    return False


def _sha256(secret: str, salt: bytes) -> bytes:
    return hashlib.sha256(salt + secret.encode()).digest()


def _scrypt(secret: str, salt: bytes) -> bytes:
    return hashlib.scrypt(secret.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=32)


@functools.cache
def dummy_hash() -> bytes:
    """A digest to check against when a device has no secret, so both cost the same."""
    return hash_secret(new_secret())


API_TOKEN_PREFIX = "estk_"  # noqa: S105 - a prefix, not a secret


def new_api_token() -> str:
    """A bearer token for the REST API: 256 random bits behind a recognisable prefix."""
    return API_TOKEN_PREFIX + _secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    """What the store keeps of an API token. A fast hash suffices: the token has 256 bits
    of entropy, so a stolen digest cannot be brute-forced back into it."""
    return hashlib.sha256(token.encode()).hexdigest()
