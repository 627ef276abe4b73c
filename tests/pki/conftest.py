"""Shared fixtures for the pure PKI tests: keys made once a session and a small CA.

The CA is root (P-384) → issuing CA (P-256), both issued with ``profiles.issue_ca``
at a fixed ``NOW``, so dates are deterministic; ``openssl verify`` gets the same
instant through ``-attime``.
"""

from __future__ import annotations

import datetime as dt
import functools
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography import x509

from estkit.pki.keys import PrivateKey, generate_key
from estkit.pki.profiles import Kind, Profile, issue_leaf
from testpki import cn_name, make_ca_pair

NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
OPERATIONAL = Profile(name="operational", kind=Kind.OPERATIONAL, validity=dt.timedelta(days=30))


@dataclass(frozen=True, slots=True)
class Ca:
    root: x509.Certificate
    root_key: PrivateKey
    issuing: x509.Certificate
    issuing_key: PrivateKey

    def leaf(self, cn: str = "dev-1", **kwargs: Any) -> x509.Certificate:
        """An operational certificate for ``cn`` from the issuing CA (kwargs go to issue_leaf)."""
        args: dict[str, Any] = {
            "profile": OPERATIONAL,
            "public_key": generate_key("ec-p256").public_key(),
            "subject": cn_name(cn),
            "sans": None,
            "issuer": self.issuing,
            "issuer_key": self.issuing_key,
            "now": NOW,
        }
        return issue_leaf(**(args | kwargs))


def make_ca(prefix: str, *, now: dt.datetime = NOW) -> Ca:
    pair = make_ca_pair(
        f"{prefix} Root CA", f"{prefix} Issuing CA", now=now, root_key_type="ec-p384"
    )
    return Ca(
        root=pair.root, root_key=pair.root_key, issuing=pair.issuing, issuing_key=pair.issuing_key
    )


@pytest.fixture(scope="session")
def now() -> dt.datetime:
    """The instant the session CA was made; tests issue and verify at it."""
    return NOW


@pytest.fixture(scope="session")
def key_of() -> Callable[[str], PrivateKey]:
    """One key per key type for the whole session (RSA generation is slow)."""
    return functools.cache(generate_key)


@pytest.fixture(scope="session")
def ca() -> Ca:
    return make_ca("estkit Test")


@pytest.fixture(scope="session")
def foreign_ca() -> Ca:
    """A second CA with the same names as ``ca`` but other keys."""
    return make_ca("estkit Test")


@pytest.fixture(scope="session")
def openssl() -> Callable[..., str]:
    """Run the ``openssl`` command and return its output; ``ok`` is the exit status expected."""

    def run(*args: str, stdin: bytes | None = None, ok: bool = True) -> str:
        done = subprocess.run(
            ["/usr/bin/openssl", *args], input=stdin, capture_output=True, check=False
        )
        output = (done.stdout + done.stderr).decode(errors="replace")
        assert (done.returncode == 0) is ok, output
        return done.stdout.decode() if ok else output

    return run
