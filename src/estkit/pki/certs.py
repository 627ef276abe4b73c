"""Loading certificates, fingerprints, and chain checks against CA objects in memory."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding

from estkit.pki.errors import DecodeError


def load_pem_certificates(data: bytes) -> list[x509.Certificate]:
    """All certificates in a PEM bundle (at least one)."""
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise DecodeError("not a PEM certificate bundle") from exc
    return certs


def certs_to_pem(certs: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(Encoding.PEM) for c in certs)


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint as upper-case hex pairs joined by colons (as openssl prints it)."""
    digest = hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def normalize_fingerprint(text: str) -> str:
    """A SHA-256 fingerprint given with or without colons, any case, in ``fingerprint`` form."""
    compact = text.strip().replace(":", "").replace(" ", "").upper()
    if compact.startswith("SHA256="):
        compact = compact[7:]
    if len(compact) != 64 or any(c not in "0123456789ABCDEF" for c in compact):
        raise ValueError("expected a SHA-256 fingerprint: 64 hex digits, colons optional")
    return ":".join(compact[i : i + 2] for i in range(0, 64, 2))


def serial_hex(serial: int) -> str:
    """A serial as ``openssl x509 -serial`` prints it: upper-case hex, even length."""
    text = f"{serial:X}"
    return text if len(text) % 2 == 0 else "0" + text


def parse_serial(text: str) -> int:
    """A serial given as hex (colons and a 0x prefix allowed, any case)."""
    compact = text.strip().replace(":", "").lower().removeprefix("0x")
    try:
        value = int(compact, 16)
    except ValueError as exc:
        raise ValueError(f"serial must be hexadecimal, got {text!r}") from exc
    if value <= 0:
        raise ValueError("serial must be positive")
    return value


def is_issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """True when ``issuer``'s key signed ``cert`` and the names chain."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def is_valid_at(cert: x509.Certificate, now: dt.datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def build_path(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    anchors: Sequence[x509.Certificate],
) -> list[x509.Certificate] | None:
    """The path leaf → … → anchor by signature, or None when there is none.

    Validity dates are the caller's to check (it owns the clock).
    """
    path = [leaf]
    pool = list(intermediates)
    current = leaf
    for _ in range(len(pool) + 1):
        for anchor in anchors:
            if current == anchor:
                return path
            if is_issued_by(current, anchor):
                return [*path, anchor]
        nxt = next((c for c in pool if c != current and is_issued_by(current, c)), None)
        if nxt is None:
            return None
        pool.remove(nxt)
        path.append(nxt)
        current = nxt
    return None
