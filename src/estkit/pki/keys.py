"""Key types estkit makes and accepts."""

from __future__ import annotations

from typing import Final

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificatePublicKeyTypes,
    PrivateKeyTypes,
)

from estkit.pki.errors import DecodeError, KeyPolicyError

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

KEY_TYPES: Final = ("ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096")
_CURVES: Final = {"ec-p256": ec.SECP256R1, "ec-p384": ec.SECP384R1}
_ACCEPTED_CURVES: Final = {"secp256r1": "ec-p256", "secp384r1": "ec-p384"}
RSA_MIN_BITS: Final = 2048
RSA_MAX_BITS: Final = 4096


def generate_key(key_type: str) -> PrivateKey:
    """A new private key of a named type (one of ``KEY_TYPES``)."""
    if key_type in _CURVES:
        return ec.generate_private_key(_CURVES[key_type]())
    if key_type.startswith("rsa-") and key_type in KEY_TYPES:
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[4:]))
    raise ValueError(f"unknown key type {key_type!r}, expected one of {', '.join(KEY_TYPES)}")


def key_type_of(public_key: CertificatePublicKeyTypes) -> str:
    """Name the type of a public key, or raise ``PolicyError`` when it is not accepted."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        name = _ACCEPTED_CURVES.get(public_key.curve.name)
        if name is None:
            raise KeyPolicyError(f"EC curve {public_key.curve.name} not allowed (P-256, P-384)")
        return name
    if isinstance(public_key, rsa.RSAPublicKey):
        bits = public_key.key_size
        if not RSA_MIN_BITS <= bits <= RSA_MAX_BITS:
            raise KeyPolicyError(f"RSA key of {bits} bits not allowed (2048-4096)")
        return f"rsa-{bits}"
    raise KeyPolicyError(f"key type {type(public_key).__name__} not allowed (EC P-256/P-384, RSA)")


def signature_hash(key: CertificateIssuerPrivateKeyTypes) -> hashes.SHA256 | hashes.SHA384:
    """The digest to sign with for an issuer key: SHA-384 for P-384, SHA-256 otherwise."""
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


def key_to_pem(key: PrivateKeyTypes) -> bytes:
    """Unencrypted PKCS#8 PEM (files holding it must be 0600)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_private_key_pem(data: bytes) -> PrivateKey:
    """Load an unencrypted PEM private key of an accepted type."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise DecodeError("not an unencrypted PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise KeyPolicyError(f"private key type {type(key).__name__} not supported")
    key_type_of(key.public_key())
    return key


def public_keys_match(a: CertificatePublicKeyTypes, b: CertificatePublicKeyTypes) -> bool:
    """True when two public keys are the same key."""
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    return a.public_bytes(enc, fmt) == b.public_bytes(enc, fmt)
