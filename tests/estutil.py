"""Helpers the tests share: keys, CSRs, and raw EST requests over mTLS or Basic."""

from __future__ import annotations

import base64
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

import serverdb
from estkit.pki.cms import decode_certs_only
from estkit.pki.keys import PrivateKey, generate_key, key_to_pem
from testpki import cn_name


def csr_der(
    key: PrivateKey,
    cn: str,
    *,
    sans: list[x509.GeneralName] | None = None,
    ca: bool | None = None,
    subject: x509.Name | None = None,
) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject or cn_name(cn))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if ca is not None:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=ca, path_length=None), critical=True
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(Encoding.DER)


@dataclass
class Identity:
    """A key and certificate on disk, for mTLS."""

    key: PrivateKey
    cert: x509.Certificate
    key_path: Path
    cert_path: Path

    @classmethod
    def write(cls, directory: Path, key: PrivateKey, cert: x509.Certificate) -> Identity:
        directory.mkdir(parents=True, exist_ok=True)
        key_path, cert_path = directory / "key.pem", directory / "cert.pem"
        key_path.write_bytes(key_to_pem(key))
        key_path.chmod(0o600)
        cert_path.write_bytes(cert.public_bytes(Encoding.PEM))
        return cls(key, cert, key_path, cert_path)

    @classmethod
    def load(cls, directory: Path) -> Identity:
        from estkit.pki.keys import load_private_key_pem

        key = load_private_key_pem((directory / "key.pem").read_bytes())
        cert = x509.load_pem_x509_certificate((directory / "cert.pem").read_bytes())
        return cls(key, cert, directory / "key.pem", directory / "cert.pem")


def http(root_pem: Path, identity: Identity | None = None) -> httpx.Client:
    ctx = ssl.create_default_context(cafile=str(root_pem))
    if identity is not None:
        ctx.load_cert_chain(str(identity.cert_path), str(identity.key_path))
    return httpx.Client(verify=ctx, timeout=30)


def post_csr(
    client: httpx.Client,
    url: str,
    der: bytes,
    *,
    auth: tuple[str, str] | None = None,
    content_type: str = "application/pkcs10",
    body: bytes | None = None,
) -> httpx.Response:
    payload = body if body is not None else base64.encodebytes(der)
    return client.post(url, content=payload, headers={"Content-Type": content_type}, auth=auth)


def issued_cert(response: httpx.Response) -> x509.Certificate:
    assert response.status_code == 200, f"{response.status_code}: {response.text}"
    certs = decode_certs_only(base64.b64decode(response.content))
    assert len(certs) == 1
    return certs[0]


def count_certificates(data_dir: Path) -> int:
    return int(serverdb.rows(data_dir, "SELECT count(*) FROM certificates")[0][0])


def audit_rows(data_dir: Path, device_id: str) -> list[tuple[str, str, str]]:
    return [
        (r[0], r[1], r[2])
        for r in serverdb.rows(
            data_dir,
            "SELECT action, outcome, detail FROM audit_events WHERE device_id = :d ORDER BY id",
            d=device_id,
        )
    ]


def new_key() -> PrivateKey:
    return generate_key("ec-p256")


def openssl_verify(anchor: Path, untrusted: Path, cert: Path) -> subprocess.CompletedProcess[str]:
    """``openssl verify`` of ``cert`` up to ``anchor``, intermediates taken from ``untrusted``."""
    return subprocess.run(
        ["openssl", "verify", "-CAfile", anchor, "-untrusted", untrusted, cert],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def assert_openssl_verifies(anchor: Path, directory: Path) -> None:
    """``cert.pem`` with ``chain.pem`` in ``directory`` verifies up to ``anchor``."""
    proc = openssl_verify(anchor, directory / "chain.pem", directory / "cert.pem")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith(": OK")
