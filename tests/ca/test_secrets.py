"""Enrollment secrets are stored as salted digests; those of earlier versions (scrypt)
still verify."""

from __future__ import annotations

import hashlib
import os

import pytest

from estkit.ca import secrets


def test_a_secret_verifies_against_its_digest_and_nothing_else() -> None:
    secret = secrets.new_secret()
    stored = secrets.hash_secret(secret)
    assert secrets.verify_secret(secret, stored)
    assert not secrets.verify_secret(secret + "x", stored)
    assert not secrets.verify_secret(secret, secrets.hash_secret(secrets.new_secret()))
    assert stored != secrets.hash_secret(secret)  # salted
    assert secret.encode() not in stored


def test_a_digest_stored_by_an_earlier_version_still_verifies() -> None:
    salt = os.urandom(16)
    legacy = b"scrypt1$" + salt + hashlib.scrypt(b"old", salt=salt, n=2**14, r=8, p=1, dklen=32)
    assert secrets.verify_secret("old", legacy)
    assert not secrets.verify_secret("new", legacy)


@pytest.mark.parametrize(
    "stored",
    [b"", b"sha256$", b"sha256$" + b"\0" * 47, b"md5$" + b"\0" * 48],
    ids=["empty", "prefix-only", "short", "unknown-scheme"],
)
def test_malformed_digests_never_verify(stored: bytes) -> None:
    assert not secrets.verify_secret("anything", stored)
