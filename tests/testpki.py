"""A root and an issuing CA under it, in memory, for unit tests.

The integration tests use the CAs of a real ``estkit server init`` instead.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

from estkit.pki.keys import PrivateKey, generate_key
from estkit.pki.profiles import issue_ca


def cn_name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@dataclass(frozen=True, slots=True)
class CaPair:
    root: x509.Certificate
    root_key: PrivateKey
    issuing: x509.Certificate
    issuing_key: PrivateKey


def make_ca_pair(
    root_cn: str,
    issuing_cn: str,
    *,
    now: dt.datetime,
    root_key_type: str = "ec-p256",
    root_validity: dt.timedelta = dt.timedelta(days=3650),
    issuing_validity: dt.timedelta = dt.timedelta(days=365),
) -> CaPair:
    """Root (path length 1) → issuing CA (path length 0, P-256), both valid from ``now``."""
    root_key = generate_key(root_key_type)
    root = issue_ca(
        subject=cn_name(root_cn),
        public_key=root_key.public_key(),
        issuer=None,
        issuer_key=root_key,
        validity=root_validity,
        now=now,
        path_length=1,
    )
    issuing_key = generate_key("ec-p256")
    issuing = issue_ca(
        subject=cn_name(issuing_cn),
        public_key=issuing_key.public_key(),
        issuer=root,
        issuer_key=root_key,
        validity=issuing_validity,
        now=now,
        path_length=0,
    )
    return CaPair(root, root_key, issuing, issuing_key)
