"""The exact bytes of every EST response, read from a raw TLS socket (README "Interop quirks").

Clients such as Cisco's libest match response header names byte for byte and
cannot read chunked bodies; OpenSSL's base64 BIO needs line breaks; strongSwan's
``pki`` cannot read them; Bouncy Castle closes a 401 unread. Each case sends
one request by hand, reads one response by its ``Content-Length``, then sends
``GET /health`` on the same connection and reads to the end: a stray byte
(a chunk trailer, a body longer than declared) would show up there.
"""

from __future__ import annotations

import base64
import re
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from backends import server_database
from estserver import EstServer, make_server
from estutil import csr_der, new_key

BASE64_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2}")
# What a browser, curl or libest sends and strongSwan's pki does not (server/quirks.py).
USER_AGENT = b"User-Agent: libest client 1.0\r\nAccept: */*\r\n"
HEALTH = b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"


@dataclass(frozen=True, slots=True)
class Answer:
    status_line: bytes
    headers: list[tuple[bytes, bytes]]  # names exactly as on the wire
    body: bytes
    rest: bytes  # what the connection carried after this response

    @property
    def status(self) -> int:
        return int(self.status_line.split(b" ")[1])

    def header(self, name: bytes) -> bytes:
        """The one value of header ``name``, matched byte for byte as libest does."""
        values = [v for n, v in self.headers if n == name]
        assert len(values) == 1, (name, self.headers)
        return values[0]

    def names(self) -> set[bytes]:
        return {n for n, _ in self.headers}


@dataclass(frozen=True, slots=True)
class Peer:
    server: EstServer
    cert: Path
    key: Path
    device_id: str
    secret: str


@pytest.fixture(scope="module")
def peer(
    request: pytest.FixtureRequest, backend: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Peer]:
    """A default server plus one label, ``held``, whose requests wait for approval."""
    server = make_server(
        tmp_path_factory.mktemp("wire"), database_url=server_database(request, backend)
    )
    config = server.data_dir / "estkit.toml"
    config.write_text(
        config.read_text()
        + '\n[labels.held]\nca = "devices"\nprofile = "operational"\napproval = true\n'
    )
    server.start()
    try:
        out = tmp_path_factory.mktemp("wire-bootstrap")
        server.cli("device", "bootstrap", "wire-dev", "--out", out)
        secret = server.cli("device", "add", "wire-basic").stdout.strip()
        yield Peer(server, out / "cert.pem", out / "key.pem", "wire-dev", secret)
    finally:
        server.stop()


def _connect(peer: Peer, *, mtls: bool) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(peer.server.root_pem))
    if mtls:
        ctx.load_cert_chain(str(peer.cert), str(peer.key))
    sock = socket.create_connection(("127.0.0.1", peer.server.port), timeout=30)
    return ctx.wrap_socket(sock, server_hostname="localhost")


def _read_until(tls: ssl.SSLSocket, buf: bytearray, size: int) -> None:
    while len(buf) < size:
        chunk = tls.recv(65536)
        assert chunk, f"connection closed after {len(buf)} of {size} bytes"
        buf += chunk


def exchange(
    peer: Peer, request: bytes, *, mtls: bool = False, head: bool = False, close: bool = False
) -> Answer:
    """Send ``request``; read one response by its Content-Length (none after a HEAD), then
    what follows: ``GET /health`` on the same connection, or (``close``) nothing more."""
    with _connect(peer, mtls=mtls) as tls:
        tls.sendall(request)
        buf = bytearray()
        while b"\r\n\r\n" not in buf:
            chunk = tls.recv(65536)
            assert chunk, f"connection closed mid-head: {bytes(buf)!r}"
            buf += chunk
        raw_head, _, _ = bytes(buf).partition(b"\r\n\r\n")
        end = len(raw_head) + 4
        status_line, *lines = raw_head.split(b"\r\n")
        headers = [(n, v.strip()) for n, _, v in (line.partition(b":") for line in lines)]
        length = [int(v) for n, v in headers if n.lower() == b"content-length"]
        size = end + (0 if head or not length else length[0])
        _read_until(tls, buf, size)
        if not close:
            tls.sendall(HEALTH)
        while chunk := tls.recv(65536):
            buf += chunk
    return Answer(status_line, headers, bytes(buf[end:size]), bytes(buf[size:]))


def request(
    method: bytes,
    path: bytes,
    *,
    extra: bytes = USER_AGENT,
    body: bytes | None = None,
    content_type: bytes = b"application/pkcs10",
) -> bytes:
    head = b"%s %s HTTP/1.1\r\nHost: localhost\r\n%s" % (method, path, extra)
    if body is None:
        return head + b"\r\n"
    return head + b"Content-Type: %s\r\nContent-Length: %d\r\n\r\n%s" % (
        content_type,
        len(body),
        body,
    )


def csr_body(cn: str) -> bytes:
    return base64.encodebytes(csr_der(new_key(), cn))


def openssl_base64_decode(body: bytes) -> bytes:
    """``openssl base64 -d`` without ``-A``: OpenSSL's base64 BIO, as libest reads."""
    proc = subprocess.run(
        ["openssl", "base64", "-d"], input=body, capture_output=True, timeout=30, check=True
    )
    return proc.stdout


def assert_framed(answer: Answer, *, follow_up: bool = True) -> None:
    """Canonical names, Content-Length and no chunking; the connection carries exactly
    the next response (or nothing) after this one."""
    for name in answer.names():
        assert name[:1].isupper() and name != name.lower(), answer.headers
    assert b"Content-Length" in answer.names()
    assert b"Transfer-Encoding" not in answer.names()
    assert all(n.lower() != b"transfer-encoding" for n in answer.names())
    if follow_up:
        assert answer.rest.startswith(b"HTTP/1.1 200 OK\r\n"), answer.rest[:200]
        assert answer.rest.endswith(b"\r\n\r\nok\n"), answer.rest[-200:]
    else:
        assert answer.rest == b""


def assert_wrapped_base64(body: bytes) -> bytes:
    """64-column lines, LF, a final newline; decoded by OpenSSL's BIO. Returns the DER."""
    assert body.endswith(b"\n"), body[-80:]
    lines = body[:-1].split(b"\n")
    assert all(len(line) == 64 for line in lines[:-1])
    assert 0 < len(lines[-1]) <= 64
    assert all(BASE64_LINE.fullmatch(line) for line in lines)
    der = openssl_base64_decode(body)
    assert der == base64.b64decode(body)
    return der


def assert_text_refusal(answer: Answer, status: int) -> None:
    assert answer.status == status, answer.body
    assert answer.header(b"Content-Type") == b"text/plain; charset=utf-8"
    assert int(answer.header(b"Content-Length")) == len(answer.body)
    assert answer.body.endswith(b"\n") and answer.body.count(b"\n") == 1
    assert answer.body.strip()


# -- 200: base64 bodies ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        (b"/.well-known/est/cacerts", b"application/pkcs7-mime"),
        (b"/.well-known/est/devices/cacerts", b"application/pkcs7-mime"),
        (b"/.well-known/est/csrattrs", b"application/csrattrs"),
    ],
    ids=["ok/cacerts", "ok/cacerts-devices-label", "ok/csrattrs"],
)
def test_get_answers_canonical_headers_and_base64_openssl_reads(peer, path, content_type):
    answer = exchange(peer, request(b"GET", path))

    assert answer.status_line == b"HTTP/1.1 200 OK"
    assert_framed(answer)
    assert answer.header(b"Content-Type") == content_type
    assert answer.header(b"Content-Transfer-Encoding") == b"base64"
    assert int(answer.header(b"Content-Length")) == len(answer.body)
    assert_wrapped_base64(answer.body)


def test_head_of_cacerts_declares_the_get_length_and_sends_no_body(peer):
    got = exchange(peer, request(b"GET", b"/.well-known/est/cacerts"))
    head = exchange(peer, request(b"HEAD", b"/.well-known/est/cacerts"), head=True)

    assert head.status == 200
    assert_framed(head)
    assert head.header(b"Content-Length") == got.header(b"Content-Length")
    assert head.body == b""


@pytest.mark.parametrize(
    "chunked", [False, True], ids=["ok/content-length-request", "ok/chunked-request"]
)
def test_simpleenroll_200_is_canonical_and_openssl_decodes_it(peer, chunked):
    body = csr_body(peer.device_id)
    if chunked:  # as Go EST clients always send it
        req = (
            b"POST /.well-known/est/simpleenroll HTTP/1.1\r\nHost: localhost\r\n" + USER_AGENT
            + b"Content-Type: application/pkcs10\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        )  # fmt: skip
    else:
        req = request(b"POST", b"/.well-known/est/simpleenroll", body=body)

    answer = exchange(peer, req, mtls=True)

    assert answer.status_line == b"HTTP/1.1 200 OK"
    assert_framed(answer)
    assert answer.header(b"Content-Type") == b"application/pkcs7-mime; smime-type=certs-only"
    assert answer.header(b"Content-Transfer-Encoding") == b"base64"
    der = assert_wrapped_base64(answer.body)
    printed = subprocess.run(
        ["openssl", "pkcs7", "-inform", "DER", "-print_certs", "-noout"],
        input=der, capture_output=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    assert f"subject=CN = {peer.device_id}".encode() in printed


# -- strongSwan's pki gets one line -------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "one_line"),
    [
        (b"", True),
        (b"Authorization: Basic eDp5\r\n", True),
        (USER_AGENT, False),
        (b"User-Agent: curl/7.88.1\r\nAccept: */*\r\n", False),
        (b"Connection: keep-alive\r\n", False),
    ],
    ids=[
        "pki/only-host",
        "pki/host-and-basic",
        "other/libest",
        "other/curl",
        "other/host-and-another-header",
    ],
)
def test_only_a_request_shaped_like_strongswan_pki_gets_one_base64_line(peer, extra, one_line):
    # pki 5.9.8 sends Host, Authorization with --userpass, and on a POST Content-Type and
    # Content-Length: nothing else (captured; server/quirks.py).
    answer = exchange(peer, request(b"GET", b"/.well-known/est/cacerts", extra=extra))

    assert answer.status == 200
    assert_framed(answer)
    if one_line:
        assert BASE64_LINE.fullmatch(answer.body), answer.body[:200]
    else:
        assert_wrapped_base64(answer.body)


# -- refusals --------------------------------------------------------------------------


def test_202_pending_carries_retry_after_in_canonical_case(peer):
    body = csr_body(peer.device_id)
    answer = exchange(
        peer, request(b"POST", b"/.well-known/est/held/simpleenroll", body=body), mtls=True
    )

    assert_text_refusal(answer, 202)
    assert_framed(answer)
    assert answer.header(b"Retry-After") == b"60"
    assert answer.header(b"Estkit-Refusal-Code") == b"approval-pending"


@pytest.mark.parametrize(
    ("extra", "code"),
    [
        (USER_AGENT, b"authentication-required"),
        (USER_AGENT + b"Authorization: Basic d2lyZS1iYXNpYzp3cm9uZw==\r\n", b"secret-invalid"),
    ],
    ids=["fail/no-credentials", "fail/wrong-secret"],
)
def test_401_has_an_empty_body_and_the_reason_and_code_in_headers(peer, extra, code):
    # Bouncy Castle closes a 401 unread before answering the challenge, and fails when
    # more than one body byte is left; libest needs WWW-Authenticate byte for byte.
    body = csr_body("wire-basic")
    answer = exchange(
        peer, request(b"POST", b"/.well-known/est/simpleenroll", extra=extra, body=body)
    )

    assert answer.status_line == b"HTTP/1.1 401 Unauthorized"
    assert_framed(answer)
    assert answer.header(b"WWW-Authenticate") == b'Basic realm="estkit"'
    assert answer.header(b"Content-Length") == b"0"
    assert answer.body == b""
    assert answer.header(b"Estkit-Refusal-Code") == code
    reason = answer.header(b"Estkit-Refusal-Reason")
    assert reason.strip() and reason.isascii() and len(reason) <= 200


@pytest.mark.parametrize(
    ("req", "mtls", "status", "extra_header"),
    [
        (
            request(
                b"POST", b"/.well-known/est/simplereenroll", body=csr_body("wire-dev")
            ),
            True,
            403,
            (b"Estkit-Refusal-Code", b"wrong-ca"),  # bootstrap CA, not the issuing CA
        ),
        (request(b"GET", b"/.well-known/est/nosuch/cacerts"), False, 404, None),
        (request(b"GET", b"/.well-known/est/simpleenroll"), False, 405, (b"Allow", b"POST")),
        (
            request(
                b"POST", b"/.well-known/est/simpleenroll", body=b"x",
                content_type=b"text/plain",
            ),
            True,
            415,
            None,
        ),
    ],
    ids=["fail/403-bootstrap-cannot-reenroll", "fail/404", "fail/405", "fail/415"],
)  # fmt: skip
def test_refusals_are_one_text_line_with_canonical_headers(peer, req, mtls, status, extra_header):
    answer = exchange(peer, req, mtls=mtls)

    assert_text_refusal(answer, status)
    assert_framed(answer)
    if extra_header is not None:
        name, value = extra_header
        assert answer.header(name) == value


def test_413_is_canonical_and_closes_without_reading_the_body(peer):
    declared = 70000  # over the default max_request_bytes (65536); never sent
    req = (
        b"POST /.well-known/est/simpleenroll HTTP/1.1\r\nHost: localhost\r\n" + USER_AGENT
        + b"Content-Type: application/pkcs10\r\nConnection: close\r\n"
        + b"Content-Length: %d\r\n\r\n" % declared
    )  # fmt: skip

    answer = exchange(peer, req, mtls=True, close=True)

    assert_text_refusal(answer, 413)
    assert_framed(answer, follow_up=False)
    assert answer.header(b"Connection") == b"close"


# -- outside EST: the same casing ----------------------------------------------------------


def test_api_and_unparsable_requests_answer_in_canonical_case_too(peer):
    api = exchange(peer, request(b"GET", b"/api/v1/devices"))
    assert api.status == 401
    assert_framed(api)
    assert api.header(b"Content-Type") == b"application/problem+json"
    assert api.header(b"WWW-Authenticate").startswith(b"Bearer")

    bad = exchange(peer, b"NOT AN HTTP REQUEST\r\n\r\n", close=True)
    assert bad.status == 400
    assert_framed(bad, follow_up=False)
    assert bad.header(b"Connection") == b"close"
