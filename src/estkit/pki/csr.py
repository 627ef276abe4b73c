"""PKCS#10 certification requests: build on the device, parse and check on the server."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import AttributeOID

from estkit.pki.errors import DecodeError, KeyPolicyError, PolicyError
from estkit.pki.keys import PrivateKey, key_type_of
from estkit.pki.names import common_name, subject_alt_names


def build_csr(
    key: PrivateKey,
    *,
    subject: x509.Name,
    sans: x509.SubjectAlternativeName | None = None,
    challenge_password: str | None = None,
) -> x509.CertificateSigningRequest:
    """A CSR for ``subject`` (and ``sans``) signed with ``key``.

    The Name object is used as given, so a subject taken from a certificate
    keeps its string encodings (what re-enrollment needs). ``challenge_password``
    (a UTF8String) carries the TLS channel binding where the server asks (RFC 7030 3.5).
    """
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    if sans is not None:
        builder = builder.add_extension(sans, critical=False)
    if challenge_password is not None:
        builder = builder.add_attribute(
            AttributeOID.CHALLENGE_PASSWORD, challenge_password.encode("utf-8")
        )
    return builder.sign(key, hashes.SHA256())


@dataclass(frozen=True, slots=True)
class CertificationRequest:
    """A CSR whose signature verified and whose key type is allowed."""

    csr: x509.CertificateSigningRequest
    key_type: str
    common_name: str | None
    sans: x509.SubjectAlternativeName | None

    @property
    def subject(self) -> x509.Name:
        return self.csr.subject


def parse_csr(der: bytes) -> CertificationRequest:
    """Decode and check a DER CSR: signature, key type, and no request for a CA.

    Other requested extensions are ignored here: the certificate profile,
    not the CSR, decides what an issued certificate carries.
    """
    try:
        csr = x509.load_der_x509_csr(der)
    except ValueError as exc:
        raise DecodeError("body is not a DER PKCS#10 certification request") from exc
    try:
        public_key = csr.public_key()
    except (ValueError, x509.UnsupportedGeneralNameType) as exc:
        raise KeyPolicyError("CSR public key is not supported") from exc
    key_type = key_type_of(public_key)
    if not csr.is_signature_valid:
        raise PolicyError("CSR signature does not verify")
    try:
        extensions = csr.extensions
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        raise DecodeError(f"CSR extensions cannot be decoded: {exc}") from exc
    try:
        csr.attributes  # noqa: B018 - decoded here once, so later readers cannot fail
    except ValueError as exc:  # e.g. an attribute with several values
        raise DecodeError(f"CSR attributes cannot be decoded: {exc}") from exc
    sans = subject_alt_names(extensions)
    try:
        constraints: x509.BasicConstraints | None = extensions.get_extension_for_class(
            x509.BasicConstraints
        ).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is not None and constraints.ca:
        raise PolicyError("CSR requests a CA certificate (basicConstraints CA:TRUE)")
    return CertificationRequest(
        csr=csr, key_type=key_type, common_name=common_name(csr.subject), sans=sans
    )
