"""A CA's next generation (``estkit ca rotate``): its name, subject and certificate.

The new generation gets a new key and a new subject (``… G2``, ``… G3``): two CAs of
one name with different keys make CRLs and certificate paths ambiguous to relying
parties (which CRL is whose, which CA certificate a chain goes through), so each
generation is told apart by its name, not by its key identifier alone. It is signed
by the same root, for as long as the one it replaces was valid (never beyond the
root), and takes over issuing at ``issues_from`` (``ca/generations.py``).
"""

from __future__ import annotations

import datetime as dt
import re

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import NameOID

from estkit.pki.keys import PrivateKey, signature_hash
from estkit.pki.profiles import BACKDATE, issue_ca

__all__ = ["check_switch", "issue_successor", "successor_subject"]

_GENERATION_MARK = re.compile(r"\s+G\d+$")


def successor_subject(old: x509.Name, generation: int) -> x509.Name:
    """``old`` with its CN marked as generation ``generation`` (``estkit Device Issuing
    CA`` → ``… G2``; ``… G2`` → ``… G3``); a name without a CN gets one."""
    attributes = list(old)
    for i, attribute in enumerate(attributes):
        if attribute.oid == NameOID.COMMON_NAME:
            base = _GENERATION_MARK.sub("", str(attribute.value))
            attributes[i] = x509.NameAttribute(NameOID.COMMON_NAME, f"{base} G{generation}")
            return x509.Name(attributes)
    return x509.Name([*attributes, x509.NameAttribute(NameOID.COMMON_NAME, f"G{generation}")])


def issue_successor(
    *,
    replaced: x509.Certificate,
    subject: x509.Name,
    public_key: CertificatePublicKeyTypes,
    root: x509.Certificate,
    root_key: PrivateKey,
    now: dt.datetime,
) -> x509.Certificate:
    """The next generation's certificate, signed by ``root``: valid as long as
    ``replaced`` was (capped at the root's end), a CA of path length 0 like it, and
    with its name constraints, if it had any."""
    if replaced.issuer != root.subject:
        raise ValueError(
            f"{replaced.subject.rfc4514_string()} is not issued by the root "
            f"{root.subject.rfc4514_string()}"
        )
    # issue_ca backdates notBefore: the same span from notBefore to notAfter as the old one.
    lifetime = replaced.not_valid_after_utc - replaced.not_valid_before_utc - BACKDATE
    cert = issue_ca(
        subject=subject,
        public_key=public_key,
        issuer=root,
        issuer_key=root_key,
        validity=lifetime,
        now=now,
        path_length=0,
    )
    try:
        constraints = replaced.extensions.get_extension_for_class(x509.NameConstraints)
    except x509.ExtensionNotFound:
        return cert
    # issue_ca has no place for them; rebuild with the same fields plus the constraints.
    builder = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.issuer)
        .public_key(public_key)
        .serial_number(cert.serial_number)
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
    )
    for extension in cert.extensions:
        builder = builder.add_extension(extension.value, critical=extension.critical)
    builder = builder.add_extension(constraints.value, critical=constraints.critical)
    return builder.sign(root_key, signature_hash(root_key))


def check_switch(replaced: x509.Certificate, issues_from: dt.datetime, *, now: dt.datetime) -> None:
    """``ValueError`` unless the generation being replaced still issues until the switch:
    valid at ``issues_from`` (a device renewing before it must get a certificate)."""
    if replaced.not_valid_after_utc <= max(issues_from, now):
        raise ValueError(
            f"{replaced.subject.rfc4514_string()} expires on "
            f"{replaced.not_valid_after_utc.isoformat()}, before the switch at "
            f"{issues_from.isoformat()}: choose an earlier --issues-from"
        )
