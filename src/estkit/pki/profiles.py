"""Certificate profiles: what an issued certificate carries is decided here, not by the CSR."""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificatePublicKeyTypes,
)
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID

from estkit.pki.keys import signature_hash

# A little back-dating absorbs clock skew between the CA and devices.
BACKDATE = dt.timedelta(minutes=5)


class Kind(Enum):
    OPERATIONAL = "operational"  # device client certificate for IoT Hub and EST renewal
    BOOTSTRAP = "bootstrap"  # factory certificate, EST authentication only
    TLS_SERVER = "tls-server"  # the EST server's own certificate


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    kind: Kind
    validity: dt.timedelta
    # Fixed subject attributes after the CN, as (short name, value): ("O", "Contoso").
    # The issued subject is CN = device id plus these; nothing is copied from a CSR.
    subject: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.validity <= dt.timedelta(0):
            raise ValueError(f"profile {self.name!r}: validity must be positive")


def random_serial() -> int:
    """A positive serial with 127 bits of entropy (RFC 5280: at most 20 octets)."""
    return secrets.randbits(127) | 1 << 126


def authority_key_identifier(
    issuer: x509.Certificate | None, issuer_key: CertificateIssuerPrivateKeyTypes
) -> x509.AuthorityKeyIdentifier:
    """The issuer's own subjectKeyIdentifier, when its certificate has one.

    Path building matches a certificate's AKI against its issuer's SKI
    (RFC 5280 4.2.1.1/4.2.1.2), whatever method made that SKI: an
    operator-supplied CA may use another than the SHA-1 of its key. Without
    an issuer certificate (a root signing itself), or without an SKI in it,
    the SHA-1 of the issuer's key, as estkit's own CAs have it.
    """
    if issuer is not None:
        try:
            ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        except x509.ExtensionNotFound:
            pass
        else:
            return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key())


def _leaf_key_usage(public_key: CertificatePublicKeyTypes, kind: Kind) -> x509.KeyUsage:
    rsa_key = isinstance(public_key, rsa.RSAPublicKey)
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=rsa_key,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


_EKU = {
    Kind.OPERATIONAL: [ExtendedKeyUsageOID.CLIENT_AUTH],
    Kind.BOOTSTRAP: [ExtendedKeyUsageOID.CLIENT_AUTH],
    Kind.TLS_SERVER: [ExtendedKeyUsageOID.SERVER_AUTH],
}


def issue_leaf(
    *,
    profile: Profile,
    public_key: CertificatePublicKeyTypes,
    subject: x509.Name,
    sans: x509.SubjectAlternativeName | None,
    issuer: x509.Certificate,
    issuer_key: CertificateIssuerPrivateKeyTypes,
    now: dt.datetime,
    serial: int | None = None,
    not_after: dt.datetime | None = None,
    crl_urls: Sequence[str] = (),
    ocsp_urls: Sequence[str] = (),
) -> x509.Certificate:
    """Sign an end-entity certificate under ``profile``.

    ``not_after`` may shorten the profile's validity; the certificate never
    outlives its issuer. ``crl_urls`` become its CRL distribution points,
    ``ocsp_urls`` its Authority Information Access (id-ad-ocsp).
    """
    not_before = now - min(BACKDATE, profile.validity / 10)
    end = now + profile.validity
    if not_after is not None:
        end = min(end, not_after)
    end = min(end, issuer.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject)
        .public_key(public_key)
        .serial_number(serial if serial is not None else random_serial())
        .not_valid_before(not_before)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_leaf_key_usage(public_key, profile.kind), critical=True)
        .add_extension(x509.ExtendedKeyUsage(_EKU[profile.kind]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(authority_key_identifier(issuer, issuer_key), critical=False)
    )
    if sans is not None and len(sans):
        builder = builder.add_extension(sans, critical=False)
    if crl_urls:
        points = [
            x509.DistributionPoint(
                full_name=[x509.UniformResourceIdentifier(u)],
                relative_name=None,
                reasons=None,
                crl_issuer=None,
            )
            for u in crl_urls
        ]
        builder = builder.add_extension(x509.CRLDistributionPoints(points), critical=False)
    if ocsp_urls:
        access = [
            x509.AccessDescription(
                AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(u)
            )
            for u in ocsp_urls
        ]
        builder = builder.add_extension(x509.AuthorityInformationAccess(access), critical=False)
    return builder.sign(issuer_key, signature_hash(issuer_key))


def issue_ca(
    *,
    subject: x509.Name,
    public_key: CertificatePublicKeyTypes,
    issuer: x509.Certificate | None,
    issuer_key: CertificateIssuerPrivateKeyTypes,
    validity: dt.timedelta,
    now: dt.datetime,
    path_length: int | None,
) -> x509.Certificate:
    """A CA certificate: self-signed root when ``issuer`` is None, else an intermediate."""
    issuer_name = subject if issuer is None else issuer.subject
    end = now + validity
    if issuer is not None:
        end = min(end, issuer.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(public_key)
        .serial_number(random_serial())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(authority_key_identifier(issuer, issuer_key), critical=False)
    )
    return builder.sign(issuer_key, signature_hash(issuer_key))
