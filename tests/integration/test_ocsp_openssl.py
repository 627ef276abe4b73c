"""OCSP end to end: ``openssl ocsp`` against a real server's plain-HTTP listener.

Statuses are read from what ``openssl ocsp`` prints after it has verified the
response (signature by the CA, chain to the root, CertID, nonce), not from estkit's
own code. The server is the session's (``est_server``) unless a test changes it; each
test runs on SQLite and on PostgreSQL, but for the two nodes on one PostgreSQL database.
"""

from __future__ import annotations

import base64
import datetime as dt
import re
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from http.client import HTTPConnection
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID

from backends import server_database, sqlite_only
from estkit.pki.keys import generate_key, load_private_key_pem
from estkit.pki.profiles import Kind, Profile, issue_leaf
from estserver import EstServer, make_server, node_pair, run_estkit
from estutil import Identity, csr_der, http, issued_cert, new_key, post_csr
from integration.conftest import bootstrap_device, enroll_operational
from pgcluster import PgCluster
from softhsm import make_softhsm
from testpki import cn_name


def ocsp_url(server: EstServer) -> str:
    return f"http://127.0.0.1:{server.crl_port}/ocsp"


def ca_pem(server: EstServer, ca: str) -> Path:
    return server.data_dir / "ca" / f"{ca}.pem"


@dataclass(frozen=True, slots=True)
class Checked:
    """What ``openssl ocsp`` printed about one certificate."""

    status: str  # "good", "revoked", "unknown"
    reason: str | None
    revoked_at: str | None
    text: str  # the whole output, -resp_text included


def openssl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", *map(str, args)], capture_output=True, text=True, timeout=30, check=False
    )


def openssl_ocsp(
    server: EstServer, issuer: str, cert: Path, *extra: str | Path, digest: str = "-sha1"
) -> Checked:
    """``openssl ocsp -issuer <ca.pem> -cert <cert> -url … -CAfile <root.pem> -resp_text``:
    the response must verify; its status for ``cert``."""
    out = openssl(
        "ocsp", "-issuer", ca_pem(server, issuer), digest, "-cert", cert,
        "-url", ocsp_url(server), "-CAfile", server.root_pem, "-resp_text", *extra,
    )  # fmt: skip
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "Response verify OK" in text, text
    assert "WARNING" not in text, text  # e.g. "no nonce in response"
    found = re.search(rf"^{re.escape(str(cert))}: (\w+)$", out.stdout, re.M)
    assert found, text
    reason = re.search(r"^\s+Reason: (\S+)$", out.stdout, re.M)
    revoked_at = re.search(r"^\s+Revocation Time: (.+)$", out.stdout, re.M)
    return Checked(
        status=found.group(1),
        reason=reason.group(1) if reason else None,
        revoked_at=revoked_at.group(1) if revoked_at else None,
        text=text,
    )


def revoke(server: EstServer, cert: x509.Certificate, reason: str = "keyCompromise") -> None:
    server.cli("cert", "revoke", f"{cert.serial_number:X}", "--reason", reason)


def never_issued(server: EstServer, ca: str, directory: Path) -> Path:
    """A certificate signed with ``ca``'s own key that the server never issued nor recorded."""
    key = load_private_key_pem((server.data_dir / "ca" / f"{ca}.key").read_bytes())
    cert = issue_leaf(
        profile=Profile(name="t", kind=Kind.OPERATIONAL, validity=dt.timedelta(days=1)),
        public_key=generate_key("ec-p256").public_key(),
        subject=cn_name("never-issued"),
        sans=None,
        issuer=x509.load_pem_x509_certificate(ca_pem(server, ca).read_bytes()),
        issuer_key=key,
        now=dt.datetime.now(dt.UTC),
    )
    path = directory / "never-issued.pem"
    path.write_bytes(cert.public_bytes(Encoding.PEM))
    return path


# -- the AIA extension -----------------------------------------------------------------------


def test_issued_certificates_name_the_ocsp_url_in_their_aia(
    est_server: EstServer, bootstrap: Identity, operational: Identity
) -> None:
    for cert in (bootstrap.cert, operational.cert):
        aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
        assert [(d.access_method, d.access_location.value) for d in aia] == [
            (AuthorityInformationAccessOID.OCSP, f"http://localhost:{est_server.crl_port}/ocsp")
        ]


# -- good, revoked, unknown --------------------------------------------------------------------


def test_openssl_reports_good_then_revoked_with_reason_and_time_at_once_after_cert_revoke(
    est_server: EstServer, operational: Identity
) -> None:
    assert openssl_ocsp(est_server, "devices", operational.cert_path).status == "good"
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)

    revoke(est_server, operational.cert, "keyCompromise")
    # At once: no waiting, no retry (the revoking node's cache is invalidated before
    # `cert revoke` returns).
    checked = openssl_ocsp(est_server, "devices", operational.cert_path)

    assert (checked.status, checked.reason) == ("revoked", "keyCompromise"), checked.text
    assert checked.revoked_at is not None
    revoked_at = dt.datetime.strptime(checked.revoked_at, "%b %d %H:%M:%S %Y GMT")
    assert before <= revoked_at.replace(tzinfo=dt.UTC) <= dt.datetime.now(dt.UTC)


def test_a_revoked_bootstrap_certificate_is_revoked_at_the_bootstrap_ca(
    est_server: EstServer, bootstrap: Identity
) -> None:
    revoke(est_server, bootstrap.cert, "cessationOfOperation")
    checked = openssl_ocsp(est_server, "bootstrap", bootstrap.cert_path)
    assert (checked.status, checked.reason) == ("revoked", "cessationOfOperation")


def test_a_certificate_of_the_right_issuer_never_issued_is_unknown(
    est_server: EstServer, tmp_path: Path
) -> None:
    cert = never_issued(est_server, "devices", tmp_path)
    assert openssl_ocsp(est_server, "devices", cert).status == "unknown"


def test_an_issuer_that_is_not_one_of_ours_is_unauthorized(
    est_server: EstServer, tmp_path: Path, operational: Identity
) -> None:
    other = tmp_path / "other"
    run_estkit("server", "init", "--data-dir", other, "--port", "1", "--crl-port", "2")
    out = openssl(
        "ocsp", "-issuer", other / "ca" / "devices.pem", "-cert", operational.cert_path,
        "-url", ocsp_url(est_server), "-CAfile", est_server.root_pem,
    )  # fmt: skip
    assert "unauthorized" in (out.stdout + out.stderr).lower(), out.stdout + out.stderr


# -- nonce, SHA-256, GET and POST --------------------------------------------------------------


@pytest.mark.parametrize("nonce", [True, False], ids=["ok/nonce-echoed", "ok/no-nonce"])
def test_the_nonce_is_echoed_when_sent(
    est_server: EstServer, operational: Identity, tmp_path: Path, nonce: bool
) -> None:
    request, response = tmp_path / "req.der", tmp_path / "resp.der"
    extra = ["-reqout", request, "-respout", response] + ([] if nonce else ["-no_nonce"])

    assert openssl_ocsp(est_server, "devices", operational.cert_path, *extra).status == "good"

    asked = ocsp.load_der_ocsp_request(request.read_bytes()).extensions
    answered = ocsp.load_der_ocsp_response(response.read_bytes()).extensions
    sent = [e.value.nonce for e in asked if isinstance(e.value, x509.OCSPNonce)]
    echoed = [e.value.nonce for e in answered if isinstance(e.value, x509.OCSPNonce)]
    assert echoed == sent and len(sent) == int(nonce)


def test_a_sha256_cert_id_is_answered_in_sha256(
    est_server: EstServer, operational: Identity
) -> None:
    checked = openssl_ocsp(est_server, "devices", operational.cert_path, digest="-sha256")
    assert checked.status == "good"
    assert "Hash Algorithm: sha256" in checked.text


def _status_of_response(server: EstServer, response: bytes, cert: Path, directory: Path) -> str:
    """``openssl ocsp`` reading a response fetched by hand: verified, and its status for
    ``cert`` (``-cert`` with ``-reqin`` would make a new request, with a nonce of its own)."""
    (directory / "fetched.der").write_bytes(response)
    out = openssl(
        "ocsp", "-respin", directory / "fetched.der", "-no_nonce",
        "-issuer", ca_pem(server, "devices"), "-cert", cert, "-CAfile", server.root_pem,
    )  # fmt: skip
    assert out.returncode == 0 and "Response verify OK" in out.stderr, out.stdout + out.stderr
    found = re.search(rf"^{re.escape(str(cert))}: (\w+)$", out.stdout, re.M)
    assert found, out.stdout
    return found.group(1)


@pytest.mark.parametrize("method", ["GET", "POST"], ids=lambda m: f"ok/{m}")
def test_get_and_post_give_the_same_answer_over_one_kept_alive_connection(
    est_server: EstServer, operational: Identity, tmp_path: Path, method: str
) -> None:
    request = tmp_path / "req.der"
    out = openssl(
        "ocsp", "-issuer", ca_pem(est_server, "devices"), "-cert", operational.cert_path,
        "-reqout", request,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    der = request.read_bytes()
    encoded = urllib.parse.quote(base64.b64encode(der).decode(), safe="")
    conn = HTTPConnection("127.0.0.1", est_server.crl_port, timeout=10)
    try:
        answers = []
        for _ in range(2):  # one connection: HTTP/1.1 keep-alive
            if method == "GET":
                conn.request("GET", f"/ocsp/{encoded}")
            else:
                conn.request(
                    "POST", "/ocsp", body=der, headers={"Content-Type": "application/ocsp-request"}
                )
            reply = conn.getresponse()
            assert (reply.status, reply.getheader("Content-Type")) == (
                200,
                "application/ocsp-response",
            )
            answers.append(reply.read())
    finally:
        conn.close()

    nonce = ocsp.load_der_ocsp_request(der).extensions.get_extension_for_class(x509.OCSPNonce)
    for answer in answers:
        echoed = ocsp.load_der_ocsp_response(answer).extensions
        assert echoed.get_extension_for_class(x509.OCSPNonce).value == nonce.value
    assert _status_of_response(est_server, answers[1], operational.cert_path, tmp_path) == "good"


# -- what is not an OCSP request ------------------------------------------------------------------


def _exchange(
    server: EstServer, method: str, path: str, body: bytes | None = None, **headers: str
) -> tuple[int, str | None, bytes]:
    conn = HTTPConnection("127.0.0.1", server.crl_port, timeout=10)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name.replace("_", "-"), value)
        if (
            body is not None
            and "Content_Length" not in headers
            and "Transfer_Encoding" not in headers
        ):
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders()
        if body is not None:
            conn.send(body)
        reply = conn.getresponse()
        return reply.status, reply.getheader("Content-Type"), reply.read()
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/ocsp", b"not an OCSP request"),
        ("POST", "/ocsp", b""),
        ("POST", "/ocsp/", b"\x30\x03\x02\x01\x01"),
        ("GET", "/ocsp/%%%%", None),
        ("GET", "/ocsp/", None),
        ("GET", "/ocsp", None),
        ("GET", "/ocsp/" + base64.b64encode(b"\x30\x80" * 40).decode(), None),
    ],
    ids=[
        "fail/post-garbage",
        "fail/post-empty",
        "fail/post-bad-der",
        "fail/get-not-base64",
        "fail/get-nothing",
        "fail/get-no-slash",
        "fail/get-bad-der",
    ],
)
def test_a_malformed_request_gets_malformed_request_not_a_traceback(
    est_server: EstServer, method: str, path: str, body: bytes | None
) -> None:
    status, media_type, answer = _exchange(est_server, method, path, body)

    assert (status, media_type) == (200, "application/ocsp-response")
    response = ocsp.load_der_ocsp_response(answer)
    assert response.response_status is ocsp.OCSPResponseStatus.MALFORMED_REQUEST


@pytest.mark.parametrize(
    ("headers", "body", "status"),
    [
        ({"Content_Length": str(16 * 1024 + 1)}, b"x" * 100, 413),
        ({"Transfer_Encoding": "chunked"}, b"5\r\nhello\r\n0\r\n\r\n", 411),
        ({"Content_Length": "many"}, b"x", 411),
    ],
    ids=["fail/too-large", "fail/chunked", "fail/bad-length"],
)
def test_a_body_out_of_bounds_is_refused_before_it_is_read(
    est_server: EstServer, headers: dict[str, str], body: bytes, status: int
) -> None:
    answered, media_type, text = _exchange(est_server, "POST", "/ocsp", body, **headers)
    assert (answered, media_type) == (status, "text/plain; charset=utf-8")
    assert b"Traceback" not in text and len(text) < 100


def test_the_listener_still_serves_crls_next_to_ocsp(est_server: EstServer) -> None:
    status, media_type, der = _exchange(est_server, "GET", "/crl/devices.crl")
    assert (status, media_type) == (200, "application/pkix-crl")
    x509.load_der_x509_crl(der)


# -- a new CA generation ------------------------------------------------------------------------


def test_a_rotated_generation_answers_for_its_certificates_after_a_restart(
    fresh_server: EstServer, device_id: str, tmp_path: Path
) -> None:
    server = fresh_server
    server.start()
    boot = bootstrap_device(server, device_id, tmp_path / "boot")
    old = enroll_operational(server, device_id, boot, tmp_path / "old")
    server.cli("ca", "rotate", "devices", "--issues-from", "now")
    server.restart()

    new = enroll_operational(server, device_id, boot, tmp_path / "new")

    new_ca = x509.load_pem_x509_certificate(ca_pem(server, "devices-2").read_bytes())
    assert new.cert.issuer == new_ca.subject
    assert openssl_ocsp(server, "devices-2", new.cert_path).status == "good"
    assert openssl_ocsp(server, "devices", old.cert_path).status == "good"
    # Each generation answers for its own certificates only.
    out = openssl(
        "ocsp", "-issuer", ca_pem(server, "devices-2"), "-serial", f"0x{old.cert.serial_number:X}",
        "-url", ocsp_url(server), "-CAfile", server.root_pem,
    )  # fmt: skip
    assert re.search(r": unknown$", out.stdout, re.M), out.stdout + out.stderr

    revoke(server, new.cert, "superseded")
    checked = openssl_ocsp(server, "devices-2", new.cert_path)
    assert (checked.status, checked.reason) == ("revoked", "superseded")


# -- CA keys in a token ---------------------------------------------------------------------------


@sqlite_only
def test_responses_are_signed_in_the_token_when_the_ca_keys_are_there(
    request: pytest.FixtureRequest,
    backend: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    device_id: str,
) -> None:
    """SQLite only: the token is what is under test. Two workers: the answers are signed
    in the main process, the revocation is made by the operator command."""
    hsm = make_softhsm(tmp_path / "softhsm", monkeypatch)
    server = make_server(
        tmp_path, database_url=server_database(request, backend), init_args=hsm.signer_args
    )
    request.addfinalizer(server.stop)
    assert not list((server.data_dir / "ca").glob("*.key"))
    server.start("--workers", "2")
    boot = bootstrap_device(server, device_id, tmp_path / "boot")
    operational = enroll_operational(server, device_id, boot, tmp_path / "op")

    assert openssl_ocsp(server, "devices", operational.cert_path).status == "good"
    revoke(server, operational.cert)
    checked = openssl_ocsp(server, "devices", operational.cert_path)
    assert (checked.status, checked.reason) == ("revoked", "keyCompromise")
    assert openssl_ocsp(server, "bootstrap", boot.cert_path, "-no_nonce").status == "good"


# -- two nodes -----------------------------------------------------------------------------------


@pytest.fixture
def two_nodes(pg_cluster: PgCluster, tmp_path: Path) -> Iterator[tuple[EstServer, EstServer]]:
    """Two nodes on one PostgreSQL database (what only PostgreSQL can show: the test runs
    once), B's data directory a copy of A's."""
    with pg_cluster.database() as database_url, node_pair(database_url, tmp_path) as nodes:
        yield nodes


def test_a_revocation_on_one_node_is_answered_by_the_other_within_about_a_second(
    two_nodes: tuple[EstServer, EstServer], device_id: str, tmp_path: Path
) -> None:
    a, b = two_nodes
    boot = bootstrap_device(a, device_id, tmp_path / "boot")
    with http(b.root_pem, boot) as client:
        cert = issued_cert(post_csr(client, f"{b.url}/simpleenroll", csr_der(new_key(), device_id)))
    leaf = tmp_path / "leaf.pem"
    leaf.write_bytes(cert.public_bytes(Encoding.PEM))
    # Both nodes have answered (and cached) "good".
    assert openssl_ocsp(a, "devices", leaf, "-no_nonce").status == "good"
    assert openssl_ocsp(b, "devices", leaf, "-no_nonce").status == "good"

    revoke(a, cert)
    revoked = time.monotonic()
    assert openssl_ocsp(a, "devices", leaf, "-no_nonce").status == "revoked"  # at once on A
    seen = None
    while time.monotonic() - revoked < 5:
        if openssl_ocsp(b, "devices", leaf, "-no_nonce").status == "revoked":
            seen = time.monotonic() - revoked
            break
        time.sleep(0.05)

    assert seen is not None and seen < 2.5, f"node B answered revoked after {seen} s"
