"""Server-side key generation's response (RFC 7030 4.4.2): ``multipart/mixed`` of two parts.

Part one is the private key: PKCS#8 DER as ``application/pkcs8`` (never
PKCS#1: Bouncy Castle refuses it), or, when the CSR named a key to encrypt it
to (``AsymmetricDecryptKeyIdentifier``, RFC 7030 4.4.1.2), CMS EnvelopedData
holding that PKCS#8 as ``application/pkcs7-mime; smime-type=server-generated-key``.
Part two is the certs-only CMS of the new certificate. Each part is base64
with ``Content-Transfer-Encoding: base64``, lines of at most 76 characters
(MIME, RFC 2045) ending in CRLF.

The boundary is fixed: base64 never contains ``-``, so no part can hold it.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.ciphers import algorithms

from estkit.pki.errors import DecodeError
from estkit.pki.keys import PrivateKey

DECRYPT_KEY_IDENTIFIER = x509.ObjectIdentifier("1.2.840.113549.1.9.16.2.54")
# id-aa-decryptKeyID: encrypt to a symmetric key both sides hold (not supported).
SYMMETRIC_DECRYPT_KEY_IDENTIFIER = x509.ObjectIdentifier("1.2.840.113549.1.9.16.2.37")
BOUNDARY = "estkit-serverkeygen-boundary"
CONTENT_TYPE = f"multipart/mixed; boundary={BOUNDARY}"
KEY_PART = "application/pkcs8"
ENCRYPTED_KEY_PART = "application/pkcs7-mime; smime-type=server-generated-key"
CERT_PART = "application/pkcs7-mime; smime-type=certs-only"
# MIME's line limit is 76; 64 is what OpenSSL's base64 BIO and PEM write.
DEFAULT_LINE_LENGTH = 64
_OCTET_STRING = 4


def private_key_der(key: PrivateKey) -> bytes:
    """The key as unencrypted PKCS#8 DER (``PrivateKeyInfo``)."""
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def decrypt_key_identifier(csr: x509.CertificateSigningRequest) -> bytes | None:
    """The CSR's ``AsymmetricDecryptKeyIdentifier`` (an OCTET STRING), None when absent.
    A ``DecryptKeyIdentifier`` (a symmetric key, RFC 7030 4.4.1.1) cannot be honoured:
    ``DecodeError`` rather than sending the key unencrypted to a client that asked."""
    try:
        csr.attributes.get_attribute_for_oid(SYMMETRIC_DECRYPT_KEY_IDENTIFIER)
    except x509.AttributeNotFound:
        pass
    else:
        raise DecodeError("DecryptKeyIdentifier (symmetric key encryption) is not supported")
    try:
        attribute = csr.attributes.get_attribute_for_oid(DECRYPT_KEY_IDENTIFIER)
    except x509.AttributeNotFound:
        return None
    if attribute._type != _OCTET_STRING or not attribute.value:  # no public accessor of the tag
        raise DecodeError("AsymmetricDecryptKeyIdentifier must be a non-empty OCTET STRING")
    return attribute.value


def envelope_key(key_der: bytes, recipient: x509.Certificate) -> bytes:
    """DER CMS EnvelopedData of ``key_der`` to ``recipient``'s RSA key (key transport,
    AES-256-CBC). ``cryptography`` builds RSA recipients only."""
    from cryptography.hazmat.primitives.serialization import pkcs7

    builder = (
        pkcs7.PKCS7EnvelopeBuilder()
        .set_data(key_der)
        .set_content_encryption_algorithm(algorithms.AES256)
        .add_recipient(recipient)
    )
    return builder.encrypt(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary])


def encode_multipart(
    parts: Sequence[tuple[str, bytes]], *, line_length: int = DEFAULT_LINE_LENGTH
) -> bytes:
    """``multipart/mixed`` body (boundary ``BOUNDARY``) of (content type, DER) parts, each
    base64 in lines of ``line_length`` (a positive multiple of 4, at most 76), CRLF."""
    if not 0 < line_length <= 76 or line_length % 4:
        raise ValueError(f"line_length must be a multiple of 4 in 4-76, got {line_length}")
    out: list[bytes] = []
    for content_type, der in parts:
        text = base64.b64encode(der)
        lines = [text[i : i + line_length] for i in range(0, len(text), line_length)]
        out.append(
            b"--%s\r\nContent-Type: %s\r\nContent-Transfer-Encoding: base64\r\n\r\n%s\r\n"
            % (BOUNDARY.encode(), content_type.encode(), b"\r\n".join(lines))
        )
    out.append(b"--%s--\r\n" % BOUNDARY.encode())
    return b"".join(out)


def encode_response(
    key_part: tuple[str, bytes], certs_only: bytes, *, line_length: int = DEFAULT_LINE_LENGTH
) -> bytes:
    """The serverkeygen body: the key part (``KEY_PART`` or ``ENCRYPTED_KEY_PART`` with its
    DER), then the certs-only CMS."""
    return encode_multipart([key_part, (CERT_PART, certs_only)], line_length=line_length)
