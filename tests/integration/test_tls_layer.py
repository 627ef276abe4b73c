"""The server's own TLS layer (server/tls_openssl.py) as peers see it: stdlib ``ssl``,
``openssl s_client``, raw sockets."""

from __future__ import annotations

import http.client
import socket
import ssl
import subprocess
from pathlib import Path

import pytest
from cryptography import x509

from estserver import EstServer
from estutil import Identity


def _context(server: EstServer, identity: Identity | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(server.root_pem))
    if identity is not None:
        ctx.load_cert_chain(str(identity.cert_path), str(identity.key_path))
    return ctx


def test_keep_alive_requests_share_one_connection_and_its_client_certificate(
    est_server: EstServer, bootstrap: Identity
) -> None:
    conn = http.client.HTTPSConnection(
        "localhost", est_server.port, context=_context(est_server, bootstrap), timeout=10
    )
    try:
        first = None
        for _ in range(3):
            conn.request("GET", "/health/certificate")
            response = conn.getresponse()
            body = response.read()
            assert response.status == 200
            assert x509.load_pem_x509_certificate(body) == bootstrap.cert
            first = first or conn.sock  # held, so a new socket cannot reuse its id
            assert conn.sock is first  # one TLS connection served all three
    finally:
        conn.close()


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_a_session_offered_back_is_not_resumed(
    est_server: EstServer, version: ssl.TLSVersion
) -> None:
    """Devices renew days apart: no session is ever resumed. (OpenSSL still sends two
    stateful TLS 1.3 tickets, which pyOpenSSL cannot turn off; offered back, they fail.)"""
    ctx = _context(est_server)
    ctx.minimum_version = ctx.maximum_version = version

    def connect(session: ssl.SSLSession | None = None) -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", est_server.port), timeout=10)
        return ctx.wrap_socket(raw, server_hostname="localhost", session=session)

    with connect() as tls:
        assert tls.version() == version.name.replace("_", ".")
        tls.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        reply = b""
        while chunk := tls.recv(4096):  # reading also takes in any post-handshake ticket
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"ok\n")
        session = tls.session
    assert session is not None  # what the client took from this connection, ticket or id
    with connect(session) as again:  # offered back, it gets a full handshake
        again.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        assert again.recv(4096).startswith(b"HTTP/1.1 200")
        assert not again.session_reused


def test_certificate_request_names_the_ca_that_may_authenticate_clients(
    est_server: EstServer,
) -> None:
    proc = subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{est_server.port}",
            "-servername",
            "localhost",
            "-CAfile",
            str(est_server.root_pem),
            "-tls1_2",
        ],
        input="",
        capture_output=True,
        text=True,
        timeout=20,
    )
    out = proc.stdout
    assert "Verify return code: 0 (ok)" in out
    names = out.split("Acceptable client certificate CA names", 1)[1].split("---", 1)[0]
    for ca in ("bootstrap", "devices"):
        cert = x509.load_pem_x509_certificate(
            (est_server.data_dir / "ca" / f"{ca}.pem").read_bytes()
        )
        cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
        assert f"CN = {cn!s}\n" in names, names


def test_plaintext_and_cut_handshakes_are_dropped_and_the_server_keeps_serving(
    est_server: EstServer,
) -> None:
    with socket.create_connection(("127.0.0.1", est_server.port), timeout=10) as raw:
        raw.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = raw.recv(4096)
        # At most a TLS alert record (content type 21), never an HTTP answer.
        assert reply == b"" or reply[:1] == b"\x15"
    with socket.create_connection(("127.0.0.1", est_server.port), timeout=10) as raw:
        raw.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # the start of a ClientHello
    conn = http.client.HTTPSConnection(
        "localhost", est_server.port, context=_context(est_server), timeout=10
    )
    try:
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
    finally:
        conn.close()


def test_startup_line_names_https(est_server: EstServer) -> None:
    assert f"Uvicorn running on https://127.0.0.1:{est_server.port}" in _full_log(est_server)


def _full_log(server: EstServer) -> str:
    assert server.log_path is not None
    return server.log_path.read_text()


def test_a_large_response_arrives_whole(est_server: EstServer) -> None:
    """Over a megabyte through the TLS layer: many records, write buffering, back-pressure."""
    from estkit.server.app import SWAGGER_STATIC

    expected = (SWAGGER_STATIC / "swagger-ui-bundle.js").read_bytes()
    assert len(expected) > 1_000_000
    conn = http.client.HTTPSConnection(
        "localhost", est_server.port, context=_context(est_server), timeout=30
    )
    try:
        for _ in range(2):  # and the connection stays usable after it
            conn.request("GET", "/api/static/swagger-ui-bundle.js")
            response = conn.getresponse()
            assert response.status == 200
            assert response.read() == expected
    finally:
        conn.close()


def test_spawned_workers_serve_mtls_with_the_context_they_build(
    fresh_server: EstServer, tmp_path: Path
) -> None:
    """With --workers 2 every connection is served by a spawned worker, which builds
    its TLS context from the environment (``app.https_from_env``)."""
    fresh_server.start("--workers", "2")
    fresh_server.cli("device", "bootstrap", "dev-workers", "--out", tmp_path / "bootstrap")
    bootstrap = Identity.load(tmp_path / "bootstrap")
    ctx = _context(fresh_server, bootstrap)
    for _ in range(8):  # fresh connections, spread over the workers by the kernel
        conn = http.client.HTTPSConnection("localhost", fresh_server.port, context=ctx, timeout=10)
        try:
            conn.request("GET", "/health/certificate")
            response = conn.getresponse()
            assert response.status == 200
            assert x509.load_pem_x509_certificate(response.read()) == bootstrap.cert
        finally:
            conn.close()
