"""Bouncy Castle 1.72's EST client (Debian's ``libbcpkix-java``) against a real estkit server.

``bc/EstBc.java`` is a few lines of Java driving ``org.bouncycastle.est.ESTService``
the way a Java or Android device stack would: ``JsseESTServiceBuilder`` with the
estkit root as the only trust anchor (``JcaJceUtils.getCertPathTrustManager``),
``getCACerts``, ``simpleEnroll`` with ``JcaHttpAuthBuilder`` or a client
certificate from a JSSE key manager, ``simpleEnroll(true, …)`` to re-enroll and
``simpleEnrollWithServersideCreation``. The test compiles it with ``javac``.

What the peer does (FIELD-NOTES "EST peers"): it sends Basic credentials only
after a 401 challenge, and closes that 401 unread (a body of more than one byte
fails the exchange: "Stream closed before limit fully read"); it needs a
Content-Length on every response and ``application/pkcs7-mime`` on cacerts; it
base64-decodes a whole response body when ``Content-Transfer-Encoding: base64``
says so, so a serverkeygen ``multipart/mixed`` answer must not say it: BC's MIME
parser decodes each part by the part's own header; it makes its CSRs itself, CN
as a UTF8String. Its certification-path trust manager needs the "BC" JCA
provider registered. On failure ``EstBc`` prints ``HTTP status: <n>`` on stderr,
which the tests read.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
)

from backends import server_database
from estserver import EstServer, add_label, make_server
from estutil import openssl_verify

SOURCE = Path(__file__).parent / "bc" / "EstBc.java"
BC_JARS = [Path("/usr/share/java") / f"{name}.jar" for name in ("bcprov", "bcpkix", "bcutil")]
_STATUS = re.compile(r"^HTTP status: (\d+)$", re.M)
_ACCESS = re.compile(r'"(GET|POST) (\S+) HTTP/1\.1" (\d{3})')
# Labels of this module's server with serverkeygen on: key type, and the key's
# algorithm OID and size as BC and cryptography see them.
KEYGEN_LABELS = {
    "keygen": ("ec-p256", "1.2.840.10045.2.1", 256),
    "keygen-rsa": ("rsa-2048", "1.2.840.113549.1.1.1", 2048),
}


@dataclass(frozen=True, slots=True)
class Trust:
    root: Path  # the trust anchor: root CA, also the TLS server certificate's issuer
    devices_chain: Path  # devices CA + root, as `estkit ca chain --ca devices` prints it


@dataclass(frozen=True, slots=True)
class Bc:
    """One run of ``EstBc``: its exit status, "name: value" results and stderr."""

    returncode: int
    results: dict[str, str]
    stderr: str

    @property
    def refused_with(self) -> int | None:
        m = _STATUS.search(self.stderr)
        return int(m.group(1)) if m else None


@dataclass(frozen=True, slots=True)
class Enrolled:
    key: Path  # PKCS#8 PEM: the key BC made for its CSR, or the one the server made
    cert: Path  # the certificates of the response, in its order

    @property
    def certificates(self) -> list[x509.Certificate]:
        return x509.load_pem_x509_certificates(self.cert.read_bytes())


Run = Callable[..., Bc]


@pytest.fixture(scope="module")
def est_server(
    request: pytest.FixtureRequest, backend: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EstServer]:
    """This module's own server (the ``bootstrap`` fixture uses it too), access log on:
    it shows the 401 challenge BC answers. Two labels do serverkeygen."""
    server = make_server(
        tmp_path_factory.mktemp("bc-est"),
        config={("server", "access_log"): "true"},
        database_url=server_database(request, backend),
    )
    for name, (key_type, _, _) in KEYGEN_LABELS.items():
        add_label(server.data_dir, name, serverkeygen=True, serverkeygen_key_type=key_type)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def classpath(tmp_path_factory: pytest.TempPathFactory) -> str:
    """``EstBc.java`` compiled against Debian's Bouncy Castle jars."""
    missing = [str(jar) for jar in BC_JARS if not jar.exists()]
    assert not missing, f"{missing}: install libbcprov-java libbcpkix-java libbcutil-java"
    classes = tmp_path_factory.mktemp("bc-classes")
    jars = ":".join(map(str, BC_JARS))
    proc = subprocess.run(
        ["javac", "-d", str(classes), "-cp", jars, str(SOURCE)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return f"{classes}:{jars}"


@pytest.fixture(scope="module")
def bc(est_server: EstServer, classpath: str) -> Run:
    """``bc(op, out_dir, *args)``: EstBc against this module's server, the root as trust anchor."""

    def run(op: str, out: Path, *args: str | Path) -> Bc:
        cmd = [
            "java", "-cp", classpath, "EstBc", op, f"localhost:{est_server.port}",
            est_server.root_pem, out, *args,
        ]  # fmt: skip
        proc = subprocess.run(
            [str(c) for c in cmd],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        results = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
        return Bc(proc.returncode, results, proc.stderr)

    return run


@pytest.fixture(scope="module")
def trust(est_server: EstServer, tmp_path_factory: pytest.TempPathFactory) -> Trust:
    chain = tmp_path_factory.mktemp("bc-trust") / "devices-chain.pem"
    chain.write_text(est_server.cli("ca", "chain", "--ca", "devices").stdout)
    return Trust(est_server.root_pem, chain)


def bc_ok(bc: Run, op: str, out: Path, *args: str | Path) -> Bc:
    result = bc(op, out, *args)
    assert result.returncode == 0, f"EstBc {op} {' '.join(map(str, args))}: {result.stderr}"
    return result


def bc_enroll(bc: Run, op: str, out: Path, device: str, *args: str | Path) -> Enrolled:
    bc_ok(bc, op, out, device, *args)
    return Enrolled(out / "key.pem", out / "cert.pem")


def public_key_der(key_pem: Path) -> bytes:
    key = load_pem_private_key(key_pem.read_bytes(), password=None)
    return key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def assert_operational_certificate(trust: Trust, enrolled: Enrolled, device: str) -> None:
    """One certificate for the device id, issued by the devices CA, for the key beside it."""
    (cert,) = enrolled.certificates
    assert cert.subject.rfc4514_string() == f"CN={device}"
    (devices_ca, _root) = x509.load_pem_x509_certificates(trust.devices_chain.read_bytes())
    assert cert.issuer == devices_ca.subject
    proc = openssl_verify(trust.root, trust.devices_chain, enrolled.cert)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == f"{enrolled.cert}: OK"
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    assert spki == public_key_der(enrolled.key)


def est_requests(server: EstServer, since: int, count: int) -> list[tuple[str, str, int]]:
    """The EST requests of the access log after byte ``since``: (method, path, status).

    Another process writes the log, so the wait for ``count`` lines is bounded, not assumed.
    """
    assert server.log_path is not None
    deadline = time.monotonic() + 10
    while True:
        text = server.log_path.read_bytes()[since:].decode(errors="replace")
        found = [
            (method, path, int(status))
            for method, path, status in _ACCESS.findall(text)
            if path.startswith("/.well-known/est/")
        ]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def log_size(server: EstServer) -> int:
    assert server.log_path is not None
    return server.log_path.stat().st_size


# -- cacerts ----------------------------------------------------------------------------


@pytest.mark.parametrize("label", [None, "devices"], ids=["ok/default-label", "ok/devices-label"])
def test_bc_cacerts_returns_devices_ca_and_root(bc, trust, tmp_path, label):
    result = bc_ok(bc, "cacerts", tmp_path, *(("--label", label) if label else ()))

    assert result.results == {"certificates": "2", "trusted": "true"}
    got = x509.load_pem_x509_certificates((tmp_path / "cacerts.pem").read_bytes())
    expected = x509.load_pem_x509_certificates(trust.devices_chain.read_bytes())
    assert {c.public_bytes(Encoding.DER) for c in got} == {
        c.public_bytes(Encoding.DER) for c in expected
    }


# -- simpleenroll with HTTP Basic, answering the 401 challenge ----------------------------


@pytest.mark.parametrize(
    ("credentials", "status"),
    [("secret", 200), ("wrong-secret", 401), ("used-secret", 401)],
    ids=["ok/one-time-secret", "fail/wrong-secret", "fail/secret-used-twice"],
)
def test_bc_basic_enroll_answers_the_401_challenge_with_the_enrollment_secret(
    est_server, bc, trust, device_id, tmp_path, credentials, status
):
    secret = est_server.cli("device", "add", device_id).stdout.strip()
    if credentials == "used-secret":
        bc_enroll(bc, "enroll", tmp_path / "first", device_id, "--basic", device_id, secret)
    password = secret[::-1] + "x" if credentials == "wrong-secret" else secret
    since = log_size(est_server)

    result = bc("enroll", tmp_path / "bc", device_id, "--basic", device_id, password)

    # BC asks without credentials, reads the challenge, asks again with Basic.
    enroll = "/.well-known/est/simpleenroll"
    assert est_requests(est_server, since, 2) == [("POST", enroll, 401), ("POST", enroll, status)]
    if status != 200:
        assert result.returncode == 1
        assert result.refused_with == status, result.stderr
        return
    assert result.returncode == 0, result.stderr
    enrolled = Enrolled(tmp_path / "bc" / "key.pem", tmp_path / "bc" / "cert.pem")
    assert_operational_certificate(trust, enrolled, device_id)


# -- simpleenroll with the bootstrap certificate, simplereenroll with the operational one --


def test_bc_mtls_enroll_with_the_bootstrap_certificate(bc, trust, bootstrap, device_id, tmp_path):
    enrolled = bc_enroll(
        bc, "enroll", tmp_path, device_id, "--tls", bootstrap.key_path, bootstrap.cert_path
    )

    assert_operational_certificate(trust, enrolled, device_id)


def test_bc_reenroll_with_the_operational_certificate_renews_with_a_new_key(
    bc, trust, bootstrap, device_id, tmp_path
):
    tls = ("--tls", bootstrap.key_path, bootstrap.cert_path)
    first = bc_enroll(bc, "enroll", tmp_path / "first", device_id, *tls)

    renewed = bc_enroll(
        bc, "reenroll", tmp_path / "renewed", device_id, "--tls", first.key, first.cert
    )

    assert_operational_certificate(trust, renewed, device_id)
    (old,), (new,) = first.certificates, renewed.certificates
    assert new.serial_number != old.serial_number
    assert public_key_der(renewed.key) != public_key_der(first.key)


def test_bc_reenroll_is_refused_with_the_bootstrap_certificate(bc, bootstrap, device_id, tmp_path):
    result = bc("reenroll", tmp_path, device_id, "--tls", bootstrap.key_path, bootstrap.cert_path)

    assert result.returncode == 1
    assert result.refused_with == 403, result.stderr


# -- serverkeygen -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("label", "auth"),
    [("keygen", "tls"), ("keygen", "basic"), ("keygen-rsa", "tls")],
    ids=["ok/ec-p256-bootstrap-cert", "ok/ec-p256-basic", "ok/rsa-2048-bootstrap-cert"],
)
def test_bc_serverkeygen_returns_the_key_the_certificate_was_issued_for(
    request, est_server, bc, trust, device_id, tmp_path, label, auth
):
    if auth == "tls":
        bootstrap = request.getfixturevalue("bootstrap")
        args: tuple[str | Path, ...] = ("--tls", bootstrap.key_path, bootstrap.cert_path)
    else:
        secret = est_server.cli("device", "add", device_id).stdout.strip()
        args = ("--basic", device_id, secret)

    result = bc_ok(bc, "serverkeygen", tmp_path, device_id, "--label", label, *args)

    enrolled = Enrolled(tmp_path / "key.pem", tmp_path / "cert.pem")
    assert_operational_certificate(trust, enrolled, device_id)
    _, oid, size = KEYGEN_LABELS[label]
    assert result.results["key-algorithm"] == oid
    key = load_pem_private_key(enrolled.key.read_bytes(), password=None)
    assert isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey))
    assert key.key_size == size


def test_bc_serverkeygen_is_not_found_on_a_label_without_it(bc, bootstrap, device_id, tmp_path):
    result = bc(
        "serverkeygen", tmp_path, device_id, "--tls", bootstrap.key_path, bootstrap.cert_path
    )

    assert result.returncode == 1
    assert result.refused_with == 404, result.stderr
