"""Server-side key generation (RFC 7030 4.4) with ``curl`` and ``openssl`` as the client.

The server makes the key of the label's type and answers ``multipart/mixed``:
the PKCS#8 key (``application/pkcs8``) and the certs-only CMS. The test splits
the body itself, decodes each part with ``openssl base64 -d`` (no ``-A``: wrapped
lines), reads the key with ``openssl pkcs8``/``openssl pkey`` and checks that it
is the certificate's. Off by default (404, ``not-found``); the key is neither
stored nor logged; the issuance is audited.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography import x509

import serverdb
from backends import server_database
from estkit.pki.certs import serial_hex
from estserver import EstServer, add_label, make_server
from estutil import audit_rows
from integration.test_interop_curl import Reply, Trust, openssl_csr, post_csr, run, wrap

LABELS = {"keygen": "ec-p256", "keygen-p384": "ec-p384", "keygen-rsa": "rsa-2048"}
# What `openssl pkey -text -noout` says of each key type.
KEY_TEXT = {"ec-p256": "NIST CURVE: P-256", "ec-p384": "NIST CURVE: P-384", "rsa-2048": "(2048 bit"}
MIME_LINE = re.compile(rb"[A-Za-z0-9+/]{1,76}={0,2}")


@pytest.fixture(scope="module")
def server(
    request: pytest.FixtureRequest, backend: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EstServer]:
    server = make_server(
        tmp_path_factory.mktemp("serverkeygen"), database_url=server_database(request, backend)
    )
    for name, key_type in LABELS.items():
        add_label(server.data_dir, name, serverkeygen=True, serverkeygen_key_type=key_type)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def trust(server: EstServer, tmp_path_factory: pytest.TempPathFactory) -> Trust:
    chain = tmp_path_factory.mktemp("keygen-trust") / "devices-chain.pem"
    chain.write_text(server.cli("ca", "chain", "--ca", "devices").stdout)
    return Trust(server.root_pem, chain)


def bootstrapped(server: EstServer, device_id: str, tmp: Path) -> tuple[Path, Path]:
    server.cli("device", "bootstrap", device_id, "--out", tmp / "bootstrap")
    return tmp / "bootstrap" / "cert.pem", tmp / "bootstrap" / "key.pem"


def split_multipart(reply: Reply) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a ``multipart/mixed`` body: (headers with lower-case names, content)."""
    media, _, params = reply.header("Content-Type").partition(";")
    assert media.strip() == "multipart/mixed"
    boundary = dict(p.strip().split("=", 1) for p in params.split(";") if "=" in p)["boundary"]
    body = reply.body
    assert body.endswith(f"--{boundary}--\r\n".encode()), body[-80:]
    chunks = body.split(f"--{boundary}".encode())
    assert chunks[0] == b"" and chunks[-1] == b"--\r\n", chunks[0][:80]
    parts = []
    for chunk in chunks[1:-1]:
        assert chunk.startswith(b"\r\n") and chunk.endswith(b"\r\n")
        head, sep, content = chunk[2:-2].partition(b"\r\n\r\n")
        assert sep, chunk[:200]
        headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in head.decode().split("\r\n"))
        }
        parts.append((headers, content))
    return parts


def decoded(content: bytes) -> bytes:
    """One part's base64, as ``openssl base64 -d`` (no ``-A``) reads it: CRLF lines of at most
    76 characters, as MIME has them."""
    lines = content.split(b"\r\n")
    assert all(MIME_LINE.fullmatch(line) for line in lines), content[:200]
    der = run(["openssl", "base64", "-d"], data=content.replace(b"\r\n", b"\n") + b"\n")
    assert der
    return der


def serverkeygen(
    server: EstServer, trust: Trust, tmp: Path, label: str | None, device_id: str, *auth: str | Path
) -> Reply:
    _, csr = openssl_csr(tmp, device_id)  # its key is ignored; its signature must verify
    path = f"{label}/serverkeygen" if label else "serverkeygen"
    return post_csr(tmp, trust, f"{server.url}/{path}", wrap(csr, 64, b"\n"), *auth)


def read_response(reply: Reply, tmp: Path) -> tuple[Path, Path, str]:
    """key.pem (via ``openssl pkcs8``), cert.pem (via ``openssl pkcs7``), and the key's text."""
    assert reply.status == 200, reply.body
    assert int(reply.header("Content-Length")) == len(reply.body)
    assert "transfer-encoding" not in reply.headers
    (key_headers, key_b64), (cert_headers, cert_b64) = split_multipart(reply)
    assert key_headers == {
        "content-type": "application/pkcs8",
        "content-transfer-encoding": "base64",
    }
    assert cert_headers == {
        "content-type": "application/pkcs7-mime; smime-type=certs-only",
        "content-transfer-encoding": "base64",
    }
    key_der = tmp / "key.der"
    key_der.write_bytes(decoded(key_b64))
    key_pem = tmp / "key.pem"
    # `openssl pkcs8 -nocrypt -inform DER` reads PrivateKeyInfo only: PKCS#1 would fail here.
    run(["openssl", "pkcs8", "-nocrypt", "-inform", "DER", "-in", key_der, "-out", key_pem])
    text = run(["openssl", "pkey", "-in", key_pem, "-text", "-noout"]).decode()
    cert_pem = tmp / "cert.pem"
    certs = run(["openssl", "pkcs7", "-inform", "DER", "-print_certs"], data=decoded(cert_b64))
    cert_pem.write_bytes(certs)
    return key_pem, cert_pem, text


@pytest.mark.parametrize("label", list(LABELS))
def test_serverkeygen_returns_a_pkcs8_key_of_the_label_type_matching_its_certificate(
    server: EstServer, trust: Trust, device_id: str, tmp_path: Path, label: str
) -> None:
    cert, key = bootstrapped(server, device_id, tmp_path)
    reply = serverkeygen(server, trust, tmp_path, label, device_id, "--cert", cert, "--key", key)
    key_pem, cert_pem, text = read_response(reply, tmp_path)
    assert KEY_TEXT[LABELS[label]] in text
    from_cert = run(["openssl", "x509", "-in", cert_pem, "-noout", "-pubkey"])
    assert from_cert == run(["openssl", "pkey", "-in", key_pem, "-pubout"])
    verify = run(
        ["openssl", "verify", "-CAfile", trust.root, "-untrusted", trust.devices_chain, cert_pem]
    )
    assert verify.strip().endswith(b": OK")
    issued = x509.load_pem_x509_certificate(cert_pem.read_bytes())
    assert issued.subject.rfc4514_string() == f"CN={device_id}"


def test_serverkeygen_with_a_basic_enrollment_secret(
    server: EstServer, trust: Trust, device_id: str, tmp_path: Path
) -> None:
    secret = server.cli("device", "add", device_id).stdout.strip()
    reply = serverkeygen(
        server, trust, tmp_path, "keygen", device_id, "-u", f"{device_id}:{secret}"
    )
    key_pem, cert_pem, _ = read_response(reply, tmp_path)
    from_cert = run(["openssl", "x509", "-in", cert_pem, "-noout", "-pubkey"])
    assert from_cert == run(["openssl", "pkey", "-in", key_pem, "-pubout"])
    again = serverkeygen(
        server, trust, tmp_path, "keygen", device_id, "-u", f"{device_id}:{secret}"
    )
    assert again.status == 401  # one-time, as for simpleenroll


@pytest.mark.parametrize("label", [None, "devices"], ids=["default-label", "named-label"])
def test_serverkeygen_is_off_by_default(
    server: EstServer, trust: Trust, device_id: str, tmp_path: Path, label: str | None
) -> None:
    cert, key = bootstrapped(server, device_id, tmp_path)
    reply = serverkeygen(server, trust, tmp_path, label, device_id, "--cert", cert, "--key", key)
    assert reply.status == 404, reply.body
    assert reply.header("Estkit-Refusal-Code") == "not-found"
    assert b"serverkeygen is not enabled" in reply.body


def test_serverkeygen_refuses_another_device_name(
    server: EstServer, trust: Trust, device_id: str, tmp_path: Path
) -> None:
    cert, key = bootstrapped(server, device_id, tmp_path)
    reply = serverkeygen(
        server, trust, tmp_path, "keygen", "someone-else", "--cert", cert, "--key", key
    )
    assert reply.status == 403
    assert reply.header("Estkit-Refusal-Code") == "name-mismatch"


def test_the_generated_key_is_audited_but_neither_stored_nor_logged(
    server: EstServer, trust: Trust, device_id: str, tmp_path: Path
) -> None:
    cert, key = bootstrapped(server, device_id, tmp_path)
    reply = serverkeygen(server, trust, tmp_path, "keygen", device_id, "--cert", cert, "--key", key)
    key_pem, cert_pem, _ = read_response(reply, tmp_path)
    issued = x509.load_pem_x509_certificate(cert_pem.read_bytes())
    actions = [(action, outcome) for action, outcome, _ in audit_rows(server.data_dir, device_id)]
    assert ("est-serverkeygen", "ok") in actions
    key_der = (tmp_path / "key.der").read_bytes()
    with serverdb.connect(server.data_dir) as conn:
        schema = sa.inspect(conn)
        for table in schema.get_table_names():
            columns = [c["name"] for c in schema.get_columns(table)]
            assert not [c for c in columns if "private" in c or c == "key"], (table, columns)
    via = serverdb.rows(
        server.data_dir,
        "SELECT serial, requested_via FROM certificates WHERE device_id = :d AND ca = 'devices'",
        d=device_id,
    )
    assert via == [(serial_hex(issued.serial_number), "est-serverkeygen")]
    database = serverdb.dump(server.data_dir)
    assert key_der.hex().encode() not in database  # how pg_dump writes bytea
    assert key_der not in database
    logged = server.log_path.read_bytes() if server.log_path else b""
    assert b"PRIVATE KEY" not in logged
    assert key_pem.read_bytes().splitlines()[1] not in logged
