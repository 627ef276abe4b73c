"""``curl`` and ``openssl`` as the EST client, the way a person following the README would.

Every request goes through the real ``curl`` binary (``-sS -D headers -o body
-w '%{http_code}'``); the cacerts pipeline and every enrollment response also
go through the real ``openssl`` (``pkcs7 -print_certs``, ``verify``, ``x509
-text``). Base64 is done in Python only where the encoding variant is the
point of the case.
"""

from __future__ import annotations

import base64
import itertools
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from estutil import openssl_verify

BASE64_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2}")
CHALLENGE = 'Basic realm="estkit"'
_names = itertools.count()


@dataclass(frozen=True, slots=True)
class Trust:
    root: Path  # the trust anchor: root CA, also the TLS server certificate's issuer
    devices_chain: Path  # devices CA + root, as `estkit ca chain --ca devices` prints it


@dataclass(frozen=True, slots=True)
class Identity:
    device_id: str
    key: Path
    cert: Path


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    headers: dict[str, list[str]]  # lower-case names, of the final response
    body: bytes

    def header(self, name: str) -> str:
        values = self.headers.get(name.lower(), [])
        assert len(values) == 1, f"{name}: expected one header, got {values}"
        return values[0]


def run(cmd: list[str | Path], *, data: bytes | None = None) -> bytes:
    proc = subprocess.run(
        [str(c) for c in cmd], input=data, capture_output=True, timeout=30, check=False
    )
    assert proc.returncode == 0, f"{cmd}: exit {proc.returncode}: {proc.stderr.decode()}"
    return proc.stdout


def _parse_headers(raw: str) -> dict[str, list[str]]:
    # -D holds every response of the exchange (a "100 Continue" first, maybe): keep the last.
    blocks = [b for b in re.split(r"\r?\n\r?\n", raw) if b.startswith("HTTP/")]
    headers: dict[str, list[str]] = {}
    for line in blocks[-1].splitlines()[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return headers


def curl(tmp: Path, trust: Trust, url: str, *args: str | Path) -> Reply:
    n = next(_names)
    head, body = tmp / f"curl-{n}.headers", tmp / f"curl-{n}.body"
    fetch = ["curl", "-sS", "--max-time", "30", "--cacert", trust.root]
    out = run([*fetch, "-D", head, "-o", body, "-w", "%{http_code}", *args, url])
    return Reply(int(out), _parse_headers(head.read_text()), body.read_bytes())


def post_csr(
    tmp: Path,
    trust: Trust,
    url: str,
    body: bytes,
    *args: str | Path,
    content_type: str = "application/pkcs10",
) -> Reply:
    """``curl --data-binary @file``: the body goes out byte for byte."""
    path = tmp / f"request-{next(_names)}.b64"
    path.write_bytes(body)
    ctype = ("-H", f"Content-Type: {content_type}")
    return curl(tmp, trust, url, *ctype, "--data-binary", f"@{path}", *args)


def openssl_csr(tmp: Path, cn: str) -> tuple[Path, bytes]:
    """``openssl req -new -newkey ec … -outform DER``: a new key file and the DER CSR."""
    key = tmp / f"key-{next(_names)}.pem"
    new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", key]
    der = run(["openssl", "req", "-new", *new_key, "-subj", f"/CN={cn}", "-outform", "DER"])
    return key, der


def wrap(der: bytes, width: int, newline: bytes) -> bytes:
    text = base64.b64encode(der)
    return newline.join(text[i : i + width] for i in range(0, len(text), width)) + newline


def assert_est_base64_response(reply: Reply, media_type: str) -> None:
    """Wire rules: exact media type, CTE base64, Content-Length, not chunked, 64-column
    lines that ``openssl base64 -d`` (no ``-A``: OpenSSL's base64 BIO) reads."""
    assert reply.header("Content-Type").startswith(media_type)
    assert reply.header("Content-Transfer-Encoding").lower() == "base64"
    assert int(reply.header("Content-Length")) == len(reply.body)
    assert "transfer-encoding" not in reply.headers
    assert_wrapped_at_64(reply.body)
    assert openssl_base64_decode(reply.body) == base64.b64decode(reply.body)


def assert_wrapped_at_64(body: bytes) -> None:
    """curl is not strongSwan's pki: at defaults it gets 64-column lines, LF, and a final
    newline (server/quirks.py), as OpenSSL's base64 BIO needs."""
    assert body.endswith(b"\n"), body[-80:]
    lines = body[:-1].split(b"\n")
    assert all(len(line) == 64 for line in lines[:-1]), body[:200]
    assert 0 < len(lines[-1]) <= 64
    assert all(BASE64_LINE.fullmatch(line) for line in lines), body[:200]


def openssl_base64_decode(body: bytes) -> bytes:
    """``openssl base64 -d`` without ``-A``: what clients built on OpenSSL's BIO read."""
    der = run(["openssl", "base64", "-d"], data=body)
    assert der, "openssl base64 -d decoded nothing (one line too long for the BIO?)"
    return der


def assert_one_line_text_error(reply: Reply, status: int) -> None:
    """A refusal: a one-line text/plain reason; a 401 an empty body, the reason in a
    header (Bouncy Castle cannot skip a 401's body) and the challenge."""
    assert reply.status == status, reply.body
    assert int(reply.header("Content-Length")) == len(reply.body)
    if status == 401:  # RFC 9110 11.6.1: every 401 carries a challenge
        assert reply.header("WWW-Authenticate") == CHALLENGE
        assert reply.body == b""
        assert reply.header("Estkit-Refusal-Reason").strip()
        assert reply.header("Estkit-Refusal-Code")
        return
    assert reply.header("Content-Type").split(";")[0] == "text/plain"
    text = reply.body.decode()
    assert text.endswith("\n") and text.count("\n") == 1 and text.strip(), text


def openssl_certs(tmp: Path, reply_body: bytes) -> list[x509.Certificate]:
    """The certificates of a certs-only response, as ``openssl base64 -d | openssl pkcs7
    -print_certs`` see them."""
    der = openssl_base64_decode(reply_body)
    pem = run(["openssl", "pkcs7", "-inform", "DER", "-print_certs"], data=der)
    return x509.load_pem_x509_certificates(pem)


def verified(trust: Trust, cert: Path) -> str:
    proc = openssl_verify(trust.root, trust.devices_chain, cert)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.strip()


def same_public_key(cert: Path, key: Path) -> bool:
    from_cert = run(["openssl", "x509", "-in", cert, "-noout", "-pubkey"])
    return from_cert == run(["openssl", "pkey", "-in", key, "-pubout"])


@pytest.fixture(scope="module")
def trust(est_server, tmp_path_factory: pytest.TempPathFactory) -> Trust:
    d = tmp_path_factory.mktemp("curl-trust")
    chain = d / "devices-chain.pem"
    chain.write_text(est_server.cli("ca", "chain", "--ca", "devices").stdout)
    return Trust(est_server.root_pem, chain)


@pytest.fixture(scope="module")
def bootstrap(est_server, tmp_path_factory: pytest.TempPathFactory) -> Identity:
    """One factory-issued bootstrap identity; it may enroll any number of times."""
    d = tmp_path_factory.mktemp("curl-bootstrap")
    device = f"curl-bootstrap-{os.getpid()}"
    est_server.cli("device", "bootstrap", device, "--out", d)
    return Identity(device, d / "key.pem", d / "cert.pem")


def enroll_with_bootstrap(est_server, trust: Trust, bootstrap: Identity, tmp: Path) -> Identity:
    key, der = openssl_csr(tmp, bootstrap.device_id)
    reply = post_csr(
        tmp, trust, f"{est_server.url}/simpleenroll", wrap(der, 64, b"\n"),
        "--cert", bootstrap.cert, "--key", bootstrap.key,
    )  # fmt: skip
    assert reply.status == 200, reply.body
    (cert,) = openssl_certs(tmp, reply.body)
    path = tmp / f"operational-{next(_names)}.pem"
    path.write_bytes(cert.public_bytes(Encoding.PEM))
    return Identity(bootstrap.device_id, key, path)


# -- cacerts ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "decoder"),
    [
        ("/.well-known/est/cacerts", ("base64", "-d")),
        ("/.well-known/est/devices/cacerts", ("base64", "-d")),
        # OpenSSL's base64 BIO, as libest reads it: fails on one long line.
        ("/.well-known/est/cacerts", ("openssl", "base64", "-d")),
    ],
    ids=["ok/default-label", "ok/devices-label", "ok/openssl-base64-bio"],
)
def test_cacerts_piped_through_base64_and_openssl_shows_devices_ca_and_root(
    est_server, trust, path, decoder
):
    # curl --cacert ROOT URL | base64 -d | openssl pkcs7 -inform DER -print_certs
    b64 = run(["curl", "-sS", "--max-time", "30", "--cacert", trust.root, est_server.origin + path])
    der = run(list(decoder), data=b64)
    printed = run(["openssl", "pkcs7", "-inform", "DER", "-print_certs"], data=der).decode()

    subjects = re.findall(r"^subject=(.*)$", printed, re.M)
    assert sorted(subjects) == [
        "O = estkit, CN = estkit Device Issuing CA",
        "O = estkit, CN = estkit Root CA",
    ]
    expected = x509.load_pem_x509_certificates(trust.devices_chain.read_bytes())
    assert {
        c.public_bytes(Encoding.DER) for c in x509.load_pem_x509_certificates(printed.encode())
    } == {c.public_bytes(Encoding.DER) for c in expected}


@pytest.mark.parametrize(
    "path",
    ["/.well-known/est/cacerts", "/.well-known/est/devices/cacerts"],
    ids=["ok/default-label", "ok/devices-label"],
)
def test_cacerts_response_follows_the_wire_rules(est_server, trust, tmp_path, path):
    reply = curl(tmp_path, trust, est_server.origin + path)

    assert reply.status == 200
    assert reply.header("Content-Type") == "application/pkcs7-mime"
    assert_est_base64_response(reply, "application/pkcs7-mime")
    assert len(openssl_certs(tmp_path, reply.body)) == 2


# -- simpleenroll with the bootstrap certificate (mTLS) -----------------------------------


def body_openssl_base64(der: bytes) -> bytes:
    out = run(["openssl", "base64"], data=der)
    assert out.endswith(b"\n") and max(map(len, out.splitlines())) == 64
    return out


def body_coreutils_base64(der: bytes) -> bytes:
    out = run(["base64"], data=der)
    assert out.endswith(b"\n") and max(map(len, out.splitlines())) == 76
    return out


@pytest.mark.parametrize(
    ("path", "encode", "headers"),
    [
        ("simpleenroll", body_openssl_base64, ()),
        ("simpleenroll", body_coreutils_base64, ()),
        ("simpleenroll", lambda der: base64.b64encode(der), ()),
        # curl sends a chunked body when told so by this header (as Go clients always do).
        ("simpleenroll", lambda der: wrap(der, 64, b"\n"), ("Transfer-Encoding: chunked",)),
        (
            "simpleenroll",
            lambda der: wrap(der, 76, b"\r\n"),
            ("Content-Transfer-Encoding: base64",),
        ),
        ("devices/simpleenroll", body_openssl_base64, ()),
    ],
    ids=[
        "ok/openssl-base64-64-columns",
        "ok/coreutils-base64-76-columns",
        "ok/one-line-no-final-newline",
        "ok/chunked-request-body",
        "ok/crlf-76-columns-with-content-transfer-encoding",
        "ok/devices-label-path",
    ],
)
def test_bootstrap_mtls_enroll_returns_a_verifiable_client_certificate(
    est_server, trust, bootstrap, tmp_path, path, encode, headers
):
    key, der = openssl_csr(tmp_path, bootstrap.device_id)
    extra = [arg for h in headers for arg in ("-H", h)]

    reply = post_csr(
        tmp_path, trust, f"{est_server.url}/{path}", encode(der),
        "--cert", bootstrap.cert, "--key", bootstrap.key, *extra,
    )  # fmt: skip

    assert reply.status == 200, reply.body
    assert_est_base64_response(reply, "application/pkcs7-mime")
    (cert,) = openssl_certs(tmp_path, reply.body)
    cert_path = tmp_path / "cert.pem"
    cert_path.write_bytes(cert.public_bytes(Encoding.PEM))
    assert verified(trust, cert_path) == f"{cert_path}: OK"
    text = run(["openssl", "x509", "-in", cert_path, "-noout", "-text"]).decode()
    assert f"Subject: CN = {bootstrap.device_id}\n" in text
    assert "Issuer: O = estkit, CN = estkit Device Issuing CA\n" in text
    assert re.search(r"X509v3 Key Usage: critical\n\s+Digital Signature\n", text), text
    assert re.search(r"X509v3 Extended Key Usage: ?\n\s+TLS Web Client Authentication\n", text)
    assert re.search(r"Basic Constraints: critical\n\s+CA:FALSE\n", text)
    assert same_public_key(cert_path, key)


@pytest.mark.parametrize(
    ("path", "body", "content_type", "status"),
    [
        ("simpleenroll", "csr-other-cn", "application/pkcs10", 403),
        ("simpleenroll", "csr-own-cn", "text/plain", 415),
        ("simpleenroll", "not-base64", "application/pkcs10", 400),
        ("nosuch/simpleenroll", "csr-own-cn", "application/pkcs10", 404),
        ("nosuch/cacerts", None, None, 404),
    ],
    ids=[
        "fail/csr-cn-not-the-bootstrap-device",
        "fail/content-type-not-pkcs10",
        "fail/body-not-base64",
        "fail/unknown-label-simpleenroll",
        "fail/unknown-label-cacerts",
    ],
)
def test_refusals_are_one_line_text_plain(
    est_server, trust, bootstrap, tmp_path, path, body, content_type, status
):
    url = f"{est_server.url}/{path}"
    if body is None:
        reply = curl(tmp_path, trust, url)
    else:
        cn = f"{bootstrap.device_id}-other" if body == "csr-other-cn" else bootstrap.device_id
        _, der = openssl_csr(tmp_path, cn)
        data = b"not base64!\n" if body == "not-base64" else wrap(der, 64, b"\n")
        reply = post_csr(
            tmp_path, trust, url, data, "--cert", bootstrap.cert, "--key", bootstrap.key,
            content_type=content_type,
        )  # fmt: skip

    assert_one_line_text_error(reply, status)
    if status == 404:
        assert reply.body == b"unknown EST label 'nosuch'\n"


# -- /health/certificate ------------------------------------------------------------------


@pytest.mark.parametrize(
    "presented",
    ["bootstrap", "operational", "none"],
    ids=["ok/bootstrap-cert", "ok/operational-cert", "fail/no-client-cert"],
)
def test_health_certificate_returns_exactly_the_presented_certificate(
    est_server, trust, bootstrap, tmp_path, presented
):
    identity = None
    if presented == "bootstrap":
        identity = bootstrap
    elif presented == "operational":
        identity = enroll_with_bootstrap(est_server, trust, bootstrap, tmp_path)
    args = ("--cert", identity.cert, "--key", identity.key) if identity else ()

    reply = curl(tmp_path, trust, f"{est_server.origin}/health/certificate", *args)

    if identity is None:
        assert_one_line_text_error(reply, 401)
        return
    assert reply.status == 200
    (got,) = x509.load_pem_x509_certificates(reply.body)
    assert got == x509.load_pem_x509_certificate(identity.cert.read_bytes())
    assert reply.body == identity.cert.read_bytes()


# -- simpleenroll with HTTP Basic and a one-time enrollment secret -------------------------


@pytest.mark.parametrize(
    ("credentials", "status"),
    [("secret", 200), ("none", 401), ("wrong-secret", 401), ("used-secret", 401)],
    ids=[
        "ok/one-time-secret",
        "fail/no-credentials",
        "fail/wrong-secret",
        "fail/secret-used-twice",
    ],
)
def test_basic_enroll_with_curl_needs_a_fresh_enrollment_secret(
    est_server, trust, device_id, tmp_path, credentials, status
):
    url = f"{est_server.url}/simpleenroll"
    secret = est_server.cli("device", "add", device_id).stdout.strip()
    key, der = openssl_csr(tmp_path, device_id)
    body = wrap(der, 64, b"\n")
    if credentials == "used-secret":
        first = post_csr(tmp_path, trust, url, body, "-u", f"{device_id}:{secret}")
        assert first.status == 200, first.body
    auth = {
        "secret": ("-u", f"{device_id}:{secret}"),
        "used-secret": ("-u", f"{device_id}:{secret}"),
        "wrong-secret": ("-u", f"{device_id}:{secret[::-1]}x"),
        "none": (),
    }[credentials]

    reply = post_csr(tmp_path, trust, url, body, *auth)

    if status != 200:
        assert_one_line_text_error(reply, status)
        return
    assert reply.status == 200, reply.body
    assert reply.header("Content-Type").startswith("application/pkcs7-mime")
    assert_est_base64_response(reply, "application/pkcs7-mime")
    (cert,) = openssl_certs(tmp_path, reply.body)
    cert_path = tmp_path / "cert.pem"
    cert_path.write_bytes(cert.public_bytes(Encoding.PEM))
    assert verified(trust, cert_path) == f"{cert_path}: OK"
    assert cert.subject.rfc4514_string() == f"CN={device_id}"
    assert same_public_key(cert_path, key)
