"""A stand-in EST server: real TLS on a free loopback port, in a thread, HTTP/1.1 kept alive.

It behaves like servers estkit's own does not: it demands Basic from clients that
have a certificate (as libest's server does), and checks the TLS channel binding
in the CSR's challengePassword against the connection the CSR came over.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from client_fakes import NOW, Pki, certs_body
from cryptography import x509
from cryptography.x509.oid import NameOID

from estkit.pki import binding, certs, cms, csrattrs, keys, profiles, wire
from estkit.pki.serverkeygen import KEY_PART, encode_response, private_key_der

PREFIX = "/.well-known/est"


@dataclass
class Seen:
    """One request as the stand-in saw it."""

    method: str
    path: str
    authorization: str | None
    client_cert: bool
    tls_version: str
    tls_unique: bytes | None
    csr: x509.CertificateSigningRequest | None = None


@dataclass
class StandIn:
    """What the stand-in demands; ``seen`` records every request."""

    ca: Pki
    basic: tuple[str, str] = ("dev-1", "s3cret")
    demand_basic: bool = True  # from every client, certificate or not
    accept_basic: bool = True  # False: keeps answering 401
    announce_binding: bool = False  # csrattrs lists challengePassword
    close_first_csrattrs: bool = False  # the first csrattrs answer ends its connection
    max_version: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED
    seen: list[Seen] = field(default_factory=list)
    url: str = ""

    def expected_authorization(self) -> str:
        token = base64.b64encode(":".join(self.basic).encode()).decode()
        return f"Basic {token}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # kept alive: the binding is of one connection
    server: _Server
    timeout = 10

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._record(None)
        standin = self.server.standin
        if self.path == f"{PREFIX}/csrattrs" and standin.announce_binding:
            der = csrattrs.encode_csrattrs([binding.CHALLENGE_PASSWORD])
            first = sum(s.path.endswith("/csrattrs") for s in standin.seen) == 1
            close = standin.close_first_csrattrs and first
            self._answer(200, wire.encode_base64_body(der), wire.CSRATTRS, close=close)
        elif self.path == f"{PREFIX}/csrattrs":
            self._answer(204, b"", None)
        else:
            self._answer(404, b"no such operation", "text/plain")

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        csr = x509.load_der_x509_csr(wire.decode_base64_body(body))
        seen = self._record(csr)
        standin = self.server.standin
        if standin.demand_basic and (
            not standin.accept_basic or seen.authorization != standin.expected_authorization()
        ):
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="standin"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if standin.announce_binding:
            password = binding.challenge_password(csr)
            if (
                password is None
                or seen.tls_unique is None
                or not binding.carries_binding(password, seen.tls_unique)
            ):
                self._answer(
                    403,
                    b"CSR not bound to this TLS connection",
                    "text/plain",
                    code="channel-binding-mismatch",
                )
                return
        if self.path == f"{PREFIX}/simpleenroll":
            leaf = standin.ca.issue(csr.public_key(), subject=csr.subject)
            self._answer(200, certs_body([leaf, standin.ca.issuing]), wire.ENROLL_CONTENT_TYPE)
        elif self.path == f"{PREFIX}/serverkeygen":
            key = keys.generate_key("ec-p256")
            leaf = standin.ca.issue(key.public_key(), subject=csr.subject)
            multipart = encode_response(
                (KEY_PART, private_key_der(key)), cms.encode_certs_only([leaf, standin.ca.issuing])
            )
            self._answer(200, multipart, "multipart/mixed; boundary=estkit-serverkeygen-boundary")
        else:
            self._answer(404, b"no such operation", "text/plain")

    def _record(self, csr: x509.CertificateSigningRequest | None) -> Seen:
        tls = self.connection
        assert isinstance(tls, ssl.SSLSocket)
        version = tls.version() or ""
        seen = Seen(
            method=self.command,
            path=self.path,
            authorization=self.headers.get("Authorization"),
            client_cert=tls.getpeercert() is not None and tls.getpeercert() != {},
            tls_version=version,
            tls_unique=tls.get_channel_binding("tls-unique") if version == "TLSv1.2" else None,
            csr=csr,
        )
        self.server.standin.seen.append(seen)
        return seen

    def _answer(
        self,
        status: int,
        body: bytes,
        content_type: str | None,
        *,
        close: bool = False,
        code: str | None = None,
    ) -> None:
        self.send_response(status)
        if content_type is not None:
            self.send_header("Content-Type", content_type)
        if code is not None:
            self.send_header("Estkit-Refusal-Code", code)
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    standin: StandIn


def _server_context(tmp_path: Path, standin: StandIn) -> ssl.SSLContext:
    ca = standin.ca
    key = keys.generate_key("ec-p256")
    cert = profiles.issue_leaf(
        profile=profiles.Profile("tls", profiles.Kind.TLS_SERVER, dt.timedelta(days=30)),
        public_key=key.public_key(),
        subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]),
        sans=x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
        issuer=ca.issuing,
        issuer_key=ca.issuing_key,
        now=NOW,
    )
    (tmp_path / "standin.pem").write_bytes(certs.certs_to_pem([cert, ca.issuing]))
    (tmp_path / "standin.key").write_bytes(keys.key_to_pem(key))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.maximum_version = standin.max_version
    context.load_cert_chain(tmp_path / "standin.pem", tmp_path / "standin.key")
    context.verify_mode = ssl.CERT_OPTIONAL
    context.load_verify_locations(cadata=certs.certs_to_pem([ca.root]).decode())
    return context


@contextmanager
def serving(standin: StandIn, tmp_path: Path) -> Iterator[StandIn]:
    """Run ``standin`` until the block ends; its ``url`` is the EST base URL."""
    server = _Server(("127.0.0.1", 0), _Handler)
    server.standin = standin
    server.socket = _server_context(tmp_path, standin).wrap_socket(server.socket, server_side=True)
    standin.url = f"https://127.0.0.1:{server.server_address[1]}{PREFIX}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield standin
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
