"""The server's TLS as peers see it: stdlib ``ssl`` clients and raw sockets."""

from __future__ import annotations

import http.client
import socket
import ssl

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
        sockets = set()
        for _ in range(3):
            conn.request("GET", "/health/certificate")
            response = conn.getresponse()
            body = response.read()
            assert response.status == 200
            assert x509.load_pem_x509_certificate(body) == bootstrap.cert
            sockets.add(id(conn.sock))
        assert len(sockets) == 1  # one TLS connection served all three
    finally:
        conn.close()


def test_no_tls13_session_is_offered_for_resumption(est_server: EstServer) -> None:
    """Devices renew days apart: no TLS 1.3 tickets (each carries the client certificate
    and costs CPU on every handshake). TLS 1.2 keeps OpenSSL's session-id cache."""
    ctx = _context(est_server)
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3

    def connect(session: ssl.SSLSession | None = None) -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", est_server.port), timeout=10)
        return ctx.wrap_socket(raw, server_hostname="localhost", session=session)

    with connect() as tls:
        assert tls.version() == "TLSv1.3"
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
    assert est_server.log_path is not None
    log = est_server.log_path.read_text()
    assert f"Uvicorn running on https://127.0.0.1:{est_server.port}" in log


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
