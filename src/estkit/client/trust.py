"""Trust anchors: the CA certificates a device trusts for TLS and for what it is issued.

Either given explicitly (a PEM bundle), or bootstrapped from a SHA-256
fingerprint obtained out of band (RFC 7030 4.1.1): the client fetches
``/cacerts`` without TLS verification, and a certificate is trusted only when
its fingerprint matches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from estkit.client.errors import TrustAnchorError
from estkit.pki import certs
from estkit.pki.errors import DecodeError


@dataclass(frozen=True, slots=True)
class TrustAnchor:
    """Explicit anchor certificates, or the fingerprint of one still to be fetched.

    Exactly one of ``certificates`` and ``fingerprint`` is set.
    """

    certificates: tuple[x509.Certificate, ...] = ()
    fingerprint: str | None = None

    def __post_init__(self) -> None:
        if bool(self.certificates) == (self.fingerprint is not None):
            raise ValueError("a trust anchor needs certificates or a fingerprint, not both")

    @classmethod
    def from_certificates(cls, certificates: Sequence[x509.Certificate]) -> TrustAnchor:
        if not certificates:
            raise TrustAnchorError("a trust anchor needs at least one certificate")
        return cls(certificates=tuple(certificates))

    @classmethod
    def from_pem(cls, data: bytes) -> TrustAnchor:
        try:
            return cls.from_certificates(certs.load_pem_certificates(data))
        except DecodeError as exc:
            raise TrustAnchorError(f"trust anchor: {exc}") from exc

    @classmethod
    def from_file(cls, path: str | Path) -> TrustAnchor:
        """The CA certificate(s) in a PEM file."""
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise TrustAnchorError(f"cannot read trust anchor {path}: {exc.strerror}") from exc
        try:
            return cls.from_certificates(certs.load_pem_certificates(data))
        except DecodeError as exc:
            raise TrustAnchorError(f"trust anchor {path}: {exc}") from exc

    @classmethod
    def from_fingerprint(cls, fingerprint: str) -> TrustAnchor:
        """A SHA-256 fingerprint, colons optional, any case (``SHA256=`` prefix allowed)."""
        try:
            return cls(fingerprint=certs.normalize_fingerprint(fingerprint))
        except ValueError as exc:
            raise TrustAnchorError(f"trust anchor fingerprint: {exc}") from exc

    @property
    def needs_bootstrap(self) -> bool:
        return self.fingerprint is not None

    def select(self, candidates: Sequence[x509.Certificate], *, source: str) -> TrustAnchor:
        """The explicit anchor for the candidate whose fingerprint matches this one's.

        ``candidates`` came over an unverified connection; only the matching
        certificate is kept, nothing else from them.
        """
        if self.fingerprint is None:
            return self
        for cert in candidates:
            if certs.fingerprint(cert) == self.fingerprint:
                return TrustAnchor(certificates=(cert,))
        raise TrustAnchorError(
            f"none of the {len(candidates)} certificates from {source} has "
            f"SHA-256 fingerprint {self.fingerprint}"
        )
