"""Proof-of-possession linking (RFC 7030 3.5), real server: on a label with
``require_channel_binding``, a CSR's challengePassword must be base64 of the TLS
channel binding of the connection it is sent on.

TLS 1.2: ``tls-unique`` (RFC 5929), taken on the client with Python's
``ssl.SSLSocket.get_channel_binding`` on the same connection as the request.
TLS 1.3: ``tls-exporter`` (RFC 9266); Python's ``ssl`` cannot export keying
material, so the client there is pyOpenSSL. A binding from another connection,
or none, is refused with ``channel-binding-mismatch``; labels that do not
require it need none.
"""

from __future__ import annotations

import base64
import http.client
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import AttributeOID, NameOID
from OpenSSL import SSL

from backends import server_database
from estkit.pki.binding import CHALLENGE_PASSWORD, EXPORTER_LABEL, EXPORTER_LENGTH
from estkit.pki.csrattrs import decode_csrattrs
from estkit.pki.keys import generate_key
from estserver import EstServer, make_server
from estutil import Identity
from integration.conftest import bootstrap_device, enroll_operational
from testpki import cn_name

BOUND = "bound"


@pytest.fixture(scope="module")
def server(
    request: pytest.FixtureRequest, backend: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EstServer]:
    server = make_server(
        tmp_path_factory.mktemp("binding"), database_url=server_database(request, backend)
    )
    with (server.data_dir / "estkit.toml").open("a") as config:
        config.write(
            f'\n[labels.{BOUND}]\nca = "devices"\nprofile = "operational"\n'
            "require_channel_binding = true\nserverkeygen = true\n"
        )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def csr_body(device_id: str, password: bytes | None) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(cn_name(device_id))
    if password is not None:
        builder = builder.add_attribute(AttributeOID.CHALLENGE_PASSWORD, password)
    csr = builder.sign(generate_key("ec-p256"), hashes.SHA256())
    return base64.encodebytes(csr.public_bytes(Encoding.DER))


def device_of(identity: Identity) -> str:
    return identity.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value  # type: ignore[return-value]


def request_bytes(path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/pkcs10\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


@dataclass
class Answer:
    status: int
    code: str | None
    body: bytes


# -- TLS 1.2 with the stdlib ---------------------------------------------------------------


class Tls12:
    """One TLS 1.2 connection (Python's ssl) with a client certificate, kept open."""

    def __init__(self, server: EstServer, identity: Identity) -> None:
        ctx = ssl.create_default_context(cafile=str(server.root_pem))
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(identity.cert_path), str(identity.key_path))
        raw = socket.create_connection(("localhost", server.port), timeout=30)
        self.sock = ctx.wrap_socket(raw, server_hostname="localhost")
        assert self.sock.version() == "TLSv1.2"

    @property
    def binding(self) -> bytes:
        value = self.sock.get_channel_binding("tls-unique")
        assert value
        return value

    def post(self, path: str, body: bytes) -> Answer:
        self.sock.sendall(request_bytes(path, body))
        response = http.client.HTTPResponse(self.sock)  # type: ignore[arg-type]
        response.begin()
        data = response.read()
        return Answer(response.status, response.getheader("Estkit-Refusal-Code"), data)

    def close(self) -> None:
        self.sock.close()


# -- TLS 1.3 with pyOpenSSL ------------------------------------------------------------------


class Tls13:
    """One TLS 1.3 connection (pyOpenSSL, which can export keying material)."""

    def __init__(self, server: EstServer, identity: Identity) -> None:
        ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
        ctx.load_verify_locations(str(server.root_pem))
        ctx.set_verify(SSL.VERIFY_PEER, None)
        ctx.use_certificate_chain_file(str(identity.cert_path))
        ctx.use_privatekey_file(str(identity.key_path))
        raw = socket.create_connection(("localhost", server.port), timeout=30)
        raw.settimeout(None)  # pyOpenSSL wants a blocking socket (pytest-timeout bounds the test)
        self.conn = SSL.Connection(ctx, raw)
        self.conn.set_tlsext_host_name(b"localhost")
        self.conn.set_connect_state()
        self.conn.do_handshake()
        assert self.conn.get_protocol_version_name() == "TLSv1.3"

    @property
    def binding(self) -> bytes:
        return self.conn.export_keying_material(EXPORTER_LABEL, EXPORTER_LENGTH, None)

    def post(self, path: str, body: bytes) -> Answer:
        self.conn.sendall(request_bytes(path, body))
        data = b""
        while True:
            try:
                chunk = self.conn.recv(65536)
            except (SSL.ZeroReturnError, SSL.SysCallError):
                break
            if not chunk:
                break
            data += chunk
        head, _, content = data.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])
        }
        return Answer(int(lines[0].split()[1]), headers.get("estkit-refusal-code"), content)

    def close(self) -> None:
        self.conn.close()


Connection = Tls12 | Tls13
TRANSPORTS = {"tls1.2-tls-unique": Tls12, "tls1.3-tls-exporter": Tls13}


@pytest.fixture
def bootstrap(server: EstServer, device_id: str, tmp_path: Path) -> Identity:
    return bootstrap_device(server, device_id, tmp_path / "bootstrap")


def send(
    transport: type[Connection],
    server: EstServer,
    identity: Identity,
    op: str,
    password: str,
    label: str = BOUND,
) -> Answer:
    """``op`` on ``label`` over a new connection, the CSR's challengePassword as ``password``
    says: "this" connection's binding, "other" (one of an earlier connection), "none"."""
    other = transport(server, identity)
    other_binding = other.binding
    other.close()
    conn = transport(server, identity)
    try:
        value = {"this": conn.binding, "other": other_binding, "none": None}[password]
        assert value != conn.binding or password == "this"
        encoded = base64.b64encode(value) if value is not None else None
        return conn.post(f"/.well-known/est/{label}/{op}", csr_body(device_of(identity), encoded))
    finally:
        conn.close()


@pytest.mark.parametrize("transport", list(TRANSPORTS.values()), ids=list(TRANSPORTS))
@pytest.mark.parametrize(
    ("password", "status"),
    [("this", 200), ("other", 403), ("none", 403)],
    ids=["ok/this-connection", "fail/relayed-from-another-connection", "fail/no-binding"],
)
def test_simpleenroll_needs_this_connections_binding(
    server: EstServer,
    bootstrap: Identity,
    transport: type[Connection],
    password: str,
    status: int,
) -> None:
    answer = send(transport, server, bootstrap, "simpleenroll", password)
    assert answer.status == status, answer.body
    if status == 403:
        assert answer.code == "channel-binding-mismatch"


@pytest.mark.parametrize("transport", list(TRANSPORTS.values()), ids=list(TRANSPORTS))
def test_simplereenroll_and_serverkeygen_check_the_binding_too(
    server: EstServer, bootstrap: Identity, transport: type[Connection], tmp_path: Path
) -> None:
    # The operational certificate of the default label's CA also renews on the bound label.
    operational = enroll_operational(server, device_of(bootstrap), bootstrap, tmp_path / "op")
    assert send(transport, server, operational, "simplereenroll", "this").status == 200
    refused = send(transport, server, operational, "simplereenroll", "other")
    assert (refused.status, refused.code) == (403, "channel-binding-mismatch")
    made = send(transport, server, bootstrap, "serverkeygen", "this")
    assert made.status == 200 and b"application/pkcs8" in made.body
    refused = send(transport, server, bootstrap, "serverkeygen", "none")
    assert (refused.status, refused.code) == (403, "channel-binding-mismatch")


def test_tls_unique_sent_over_tls13_is_not_the_exporter_binding(
    server: EstServer, bootstrap: Identity
) -> None:
    """CPython returns a "tls-unique" on TLS 1.3 too (cpython#95341); it is not RFC 9266's
    binding, and the server does not take it."""
    ctx = ssl.create_default_context(cafile=str(server.root_pem))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(str(bootstrap.cert_path), str(bootstrap.key_path))
    raw = socket.create_connection(("localhost", server.port), timeout=30)
    with ctx.wrap_socket(raw, server_hostname="localhost") as sock:
        unique = sock.get_channel_binding("tls-unique")
        assert unique
        body = csr_body(device_of(bootstrap), base64.b64encode(unique))
        sock.sendall(request_bytes(f"/.well-known/est/{BOUND}/simpleenroll", body))
        response = http.client.HTTPResponse(sock)  # type: ignore[arg-type]
        response.begin()
        response.read()
    assert response.status == 403
    assert response.getheader("Estkit-Refusal-Code") == "channel-binding-mismatch"


@pytest.mark.parametrize("transport", list(TRANSPORTS.values()), ids=list(TRANSPORTS))
def test_labels_that_do_not_require_it_need_no_binding(
    server: EstServer, bootstrap: Identity, transport: type[Connection]
) -> None:
    assert send(transport, server, bootstrap, "simpleenroll", "none", label="devices").status == 200


def test_csrattrs_asks_for_challenge_password_where_binding_is_required(
    server: EstServer,
) -> None:
    ctx = ssl.create_default_context(cafile=str(server.root_pem))
    oids = {}
    for label in (BOUND, "devices"):
        conn = http.client.HTTPSConnection("localhost", server.port, context=ctx, timeout=30)
        conn.request("GET", f"/.well-known/est/{label}/csrattrs")
        response = conn.getresponse()
        assert response.status == 200
        der = base64.b64decode(b"".join(response.read().split()))
        oids[label] = [a.oid for a in decode_csrattrs(der)]
        conn.close()
    assert CHALLENGE_PASSWORD in oids[BOUND]
    assert CHALLENGE_PASSWORD not in oids["devices"]
