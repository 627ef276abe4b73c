"""The device's own checks on a certificate it was issued, before it writes it anywhere."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from estkit.client.errors import IssuedCertificateError
from estkit.pki import certs, keys, names


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    """A checked certificate with its path: ``chain`` runs from its issuer up to,
    but excluding, the trust ``anchor``."""

    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    anchor: x509.Certificate

    @property
    def fullchain(self) -> tuple[x509.Certificate, ...]:
        """What a TLS client presents: the certificate, then the chain."""
        return (self.certificate, *self.chain)


def check_issued(
    certificate: x509.Certificate,
    *,
    public_key: CertificatePublicKeyTypes,
    cas: Sequence[x509.Certificate],
    anchors: Sequence[x509.Certificate],
    now: dt.datetime,
    common_name: str | None = None,
    subject: x509.Name | None = None,
) -> IssuedCertificate:
    """Check ``certificate`` is for ``public_key``, names what was asked, chains to an anchor
    through ``cas`` and is valid at ``now``; raise ``IssuedCertificateError`` otherwise."""
    if not keys.public_keys_match(certificate.public_key(), public_key):
        raise IssuedCertificateError("issued certificate is not for the requested key")
    if common_name is not None and names.common_name(certificate.subject) != common_name:
        raise IssuedCertificateError(
            f"issued certificate subject {certificate.subject.rfc4514_string()!r} "
            f"does not have CN={common_name}"
        )
    if subject is not None and not names.names_equal(certificate.subject, subject):
        raise IssuedCertificateError(
            f"issued certificate subject {certificate.subject.rfc4514_string()!r} "
            f"differs from {subject.rfc4514_string()!r}"
        )
    path = certs.build_path(certificate, cas, anchors)
    if path is None or len(path) < 2:
        raise IssuedCertificateError(
            f"issued certificate (issuer {certificate.issuer.rfc4514_string()!r}) "
            "does not chain to the trust anchor"
        )
    for cert in path:
        if not certs.is_valid_at(cert, now):
            start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
            raise IssuedCertificateError(
                f"certificate {cert.subject.rfc4514_string()!r} is not valid at "
                f"{now.isoformat(timespec='seconds')} (valid {start.isoformat()} to "
                f"{end.isoformat()})"
            )
    return IssuedCertificate(certificate=certificate, chain=tuple(path[1:-1]), anchor=path[-1])
