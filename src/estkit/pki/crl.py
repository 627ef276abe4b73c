"""Certificate revocation lists (RFC 5280 section 5), built from values: no clock, no files."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes

from estkit.pki.certs import parse_serial
from estkit.pki.keys import signature_hash
from estkit.pki.profiles import authority_key_identifier
from estkit.pki.revocation import REASONS


def build_crl(
    *,
    issuer: x509.Certificate,
    issuer_key: CertificateIssuerPrivateKeyTypes,
    revoked: Iterable[tuple[str, dt.datetime, str | None]],
    now: dt.datetime,
    validity: dt.timedelta,
    number: int,
) -> x509.CertificateRevocationList:
    """A CRL listing ``revoked`` (hex serial, revocation time, RFC 5280 reason name)."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(now)
        .next_update(now + validity)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(authority_key_identifier(issuer, issuer_key), critical=False)
    )
    for serial, revoked_at, reason in revoked:
        entry = x509.RevokedCertificateBuilder().serial_number(parse_serial(serial))
        entry = entry.revocation_date(revoked_at)
        flag = REASONS.get(reason or "unspecified", x509.ReasonFlags.unspecified)
        if flag is not x509.ReasonFlags.unspecified:
            entry = entry.add_extension(x509.CRLReason(flag), critical=False)
        builder = builder.add_revoked_certificate(entry.build())
    return builder.sign(issuer_key, signature_hash(issuer_key))
