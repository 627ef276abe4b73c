"""RFC 7030 4.4.2 response encoding: multipart/mixed as a MIME parser reads it, PKCS#8 (not
PKCS#1), EnvelopedData that the recipient's key opens; the channel-binding helpers."""

from __future__ import annotations

import base64
import email
import email.policy

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID

from estkit.pki import binding, serverkeygen
from estkit.pki.errors import DecodeError
from estkit.pki.keys import generate_key
from testpki import cn_name


def self_signed(key: rsa.RSAPrivateKey) -> x509.Certificate:
    import datetime as dt

    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(cn_name("dev-1"))
        .issuer_name(cn_name("dev-1"))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )


def test_the_response_is_multipart_mixed_that_a_mime_parser_splits() -> None:
    key = generate_key("ec-p256")
    key_der = serverkeygen.private_key_der(key)
    certs = b"\x30\x03\x02\x01\x00" * 40
    body = serverkeygen.encode_response((serverkeygen.KEY_PART, key_der), certs)
    assert b"\n" not in body.replace(b"\r\n", b"")  # CRLF line ends only
    assert max(len(line) for line in body.split(b"\r\n")) <= 76
    head = f"Content-Type: {serverkeygen.CONTENT_TYPE}\r\n\r\n".encode()
    message = email.message_from_bytes(head + body, policy=email.policy.HTTP)
    assert message.is_multipart()
    parts = list(message.iter_parts())  # type: ignore[attr-defined]
    assert [p.get_content_type() for p in parts] == ["application/pkcs8", "application/pkcs7-mime"]
    assert parts[1].get_param("smime-type") == "certs-only"
    assert all(p["Content-Transfer-Encoding"] == "base64" for p in parts)
    assert parts[0].get_payload(decode=True) == key_der
    assert parts[1].get_payload(decode=True) == certs
    loaded = serialization.load_der_private_key(key_der, password=None)
    assert loaded.private_numbers() == key.private_numbers()  # type: ignore[union-attr]


def test_the_key_is_pkcs8_not_pkcs1() -> None:
    key = generate_key("rsa-2048")
    der = serverkeygen.private_key_der(key)
    pkcs1 = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    assert der != pkcs1 and pkcs1 in der  # PrivateKeyInfo wraps the PKCS#1 structure


@pytest.mark.parametrize("line_length", [0, 3, 80])
def test_line_lengths_outside_mime_are_refused(line_length: int) -> None:
    with pytest.raises(ValueError, match="line_length"):
        serverkeygen.encode_multipart([("application/pkcs8", b"x")], line_length=line_length)


def test_enveloped_key_opens_with_the_recipient_key_only() -> None:
    recipient_key = generate_key("rsa-2048")
    assert isinstance(recipient_key, rsa.RSAPrivateKey)
    cert = self_signed(recipient_key)
    secret = serverkeygen.private_key_der(generate_key("ec-p256"))
    enveloped = serverkeygen.envelope_key(secret, cert)
    assert secret not in enveloped
    assert pkcs7.pkcs7_decrypt_der(enveloped, cert, recipient_key, []) == secret


def _csr(**attributes: tuple[bytes, _ASN1Type]) -> x509.CertificateSigningRequest:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-1")])
    )
    for value, tag in attributes.values():
        builder = builder.add_attribute(serverkeygen.DECRYPT_KEY_IDENTIFIER, value, _tag=tag)
    return builder.sign(generate_key("ec-p256"), hashes.SHA256())


def test_decrypt_key_identifier() -> None:
    assert serverkeygen.decrypt_key_identifier(_csr()) is None
    ski = _csr(id=(b"\x01\x02\x03", _ASN1Type.OctetString))
    assert serverkeygen.decrypt_key_identifier(ski) == b"\x01\x02\x03"
    with pytest.raises(DecodeError):
        serverkeygen.decrypt_key_identifier(_csr(id=(b"abc", _ASN1Type.UTF8String)))


@pytest.mark.parametrize(
    ("password", "ok"),
    [
        (base64.b64encode(b"binding-bytes"), True),
        (b"\t" + base64.b64encode(b"binding-bytes") + b"\n", True),
        (base64.b64encode(b"binding-byteZ"), False),
        (b"binding-bytes", False),
        (b"", False),
    ],
    ids=["ok/base64", "ok/whitespace", "fail/other", "fail/raw", "fail/empty"],
)
def test_carries_binding(password: bytes, ok: bool) -> None:
    assert binding.carries_binding(password, b"binding-bytes") is ok
    assert binding.encode_binding(b"binding-bytes") == base64.b64encode(b"binding-bytes").decode()
