"""The ``estkit`` client commands against a real server process, as a device would run them."""

from __future__ import annotations

import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from backends import server_database
from estkit.pki.certs import fingerprint
from estserver import EstServer, make_server, run_estkit
from estutil import Identity, assert_openssl_verifies


def _root_fingerprint(server: EstServer) -> str:
    return fingerprint(x509.load_pem_x509_certificate(server.root_pem.read_bytes()))


@pytest.mark.parametrize("path", ["", "/devices"], ids=["ok/default-label", "ok/label-in-url"])
def test_cacerts_with_fingerprint_bootstraps_trust(est_server: EstServer, path: str) -> None:
    out = run_estkit(
        "cacerts", "--url", est_server.url + path, "--fingerprint", _root_fingerprint(est_server)
    ).stdout
    subjects = {c.subject.rfc4514_string() for c in x509.load_pem_x509_certificates(out.encode())}
    assert subjects == {"CN=estkit Root CA,O=estkit", "CN=estkit Device Issuing CA,O=estkit"}


def test_cacerts_with_wrong_fingerprint_trusts_nothing(est_server: EstServer) -> None:
    wrong = "AB" * 32
    proc = run_estkit("cacerts", "--url", est_server.url, "--fingerprint", wrong, check=False)
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert "fingerprint" in proc.stderr.lower() and proc.stderr.count("\n") == 1


def test_enroll_renew_and_health_with_the_cli(
    est_server: EstServer, device_id: str, bootstrap: Identity, tmp_path: Path
) -> None:
    op = tmp_path / "op"
    run_estkit(
        "enroll",
        "--url",
        est_server.url,
        "--device-id",
        device_id,
        "--trust-anchor",
        est_server.root_pem,
        "--cert",
        bootstrap.cert_path,
        "--key",
        bootstrap.key_path,
        "--out",
        op,
        "--pfx",
    )
    for name in ("key.pem", "cert.pem", "chain.pem", "fullchain.pem", "cert.pfx"):
        assert (op / name).exists(), name
    assert stat.S_IMODE((op / "key.pem").stat().st_mode) == 0o600
    first = Identity.load(op)
    assert first.cert.subject.rfc4514_string() == f"CN={device_id}"
    assert_openssl_verifies(est_server.root_pem, op)
    pfx = subprocess.run(
        ["openssl", "pkcs12", "-in", str(op / "cert.pfx"), "-nokeys", "-passin", "pass:"],
        capture_output=True,
        text=True,
    )
    assert pfx.returncode == 0 and device_id in pfx.stdout

    run_estkit(
        "reenroll",
        "--url",
        est_server.url,
        "--trust-anchor",
        est_server.root_pem,
        "--cert",
        op / "cert.pem",
        "--key",
        op / "key.pem",
        "--out",
        op,
    )
    second = Identity.load(op)
    assert second.cert.serial_number != first.cert.serial_number
    assert second.cert.public_key() != first.cert.public_key()  # rekey by default
    assert second.cert.subject == first.cert.subject
    assert_openssl_verifies(est_server.root_pem, op)

    run_estkit(
        "reenroll",
        "--url",
        est_server.url,
        "--trust-anchor",
        est_server.root_pem,
        "--cert",
        op / "cert.pem",
        "--key",
        op / "key.pem",
        "--out",
        op,
        "--keep-key",
    )
    third = Identity.load(op)
    assert third.cert.public_key() == second.cert.public_key()
    assert third.cert.serial_number != second.cert.serial_number

    seen = run_estkit(
        "health",
        "--url",
        est_server.url,
        "--trust-anchor",
        est_server.root_pem,
        "--cert",
        op / "cert.pem",
        "--key",
        op / "key.pem",
    ).stdout
    assert x509.load_pem_x509_certificate(seen.encode()) == third.cert


def test_enroll_with_enrollment_secret_and_fingerprint(
    est_server: EstServer, device_id: str, tmp_path: Path
) -> None:
    secret = est_server.cli("device", "add", device_id).stdout.strip()
    out = tmp_path / "op"
    run_estkit(
        "enroll",
        "--url",
        est_server.url,
        "--device-id",
        device_id,
        "--fingerprint",
        _root_fingerprint(est_server),
        "--user",
        device_id,
        "--password",
        secret,
        "--out",
        out,
        "--key-type",
        "ec-p384",
    )
    cert = Identity.load(out).cert
    assert cert.public_key().curve.name == "secp384r1"  # type: ignore[union-attr]
    again = run_estkit(
        "enroll",
        "--url",
        est_server.url,
        "--device-id",
        device_id,
        "--trust-anchor",
        est_server.root_pem,
        "--user",
        device_id,
        "--password",
        secret,
        "--out",
        tmp_path / "again",
        check=False,
    )
    assert again.returncode != 0 and "401" in again.stderr
    assert not (tmp_path / "again" / "key.pem").exists()


def test_enroll_for_another_device_is_refused_and_writes_nothing(
    est_server: EstServer, device_id: str, bootstrap: Identity, tmp_path: Path
) -> None:
    out = tmp_path / "op"
    proc = run_estkit(
        "enroll",
        "--url",
        est_server.url,
        "--device-id",
        f"{device_id}-x",
        "--trust-anchor",
        est_server.root_pem,
        "--cert",
        bootstrap.cert_path,
        "--key",
        bootstrap.key_path,
        "--out",
        out,
        check=False,
    )
    assert proc.returncode != 0
    assert "403" in proc.stderr and "device id" in proc.stderr
    assert proc.stderr.count("\n") == 1
    assert not out.exists() or not any(out.iterdir())


def test_csrattrs_lists_what_the_server_asks_for(est_server: EstServer) -> None:
    out = run_estkit(
        "csrattrs", "--url", est_server.url, "--trust-anchor", est_server.root_pem
    ).stdout
    assert "1.2.840.10045.4.3.2" in out and "ecdsa-with-SHA256" in out


def test_unreachable_server_fails_with_one_line(tmp_path: Path, est_server: EstServer) -> None:
    from estserver import free_port

    proc = run_estkit(
        "cacerts",
        "--url",
        f"https://localhost:{free_port()}/.well-known/est",
        "--trust-anchor",
        est_server.root_pem,
        "--retries",
        "1",
        "--total-timeout",
        "5",
        check=False,
    )
    assert proc.returncode != 0
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def bound_server(
    request: pytest.FixtureRequest, backend: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EstServer]:
    """A server whose ``bound`` label requires channel binding and offers serverkeygen."""
    server = make_server(
        tmp_path_factory.mktemp("client-bound"), database_url=server_database(request, backend)
    )
    with (server.data_dir / "estkit.toml").open("a") as config:
        config.write(
            '\n[labels.bound]\nca = "devices"\nprofile = "operational"\n'
            "require_channel_binding = true\nserverkeygen = true\n"
        )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_enroll_reenroll_and_serverkeygen_bind_their_csrs_where_the_label_requires_it(
    bound_server: EstServer, tmp_path: Path
) -> None:
    device_id = "dev-bound-1"
    bound_server.cli("device", "bootstrap", device_id, "--out", tmp_path / "bootstrap")
    url = f"{bound_server.url}/bound"
    anchor = ("--trust-anchor", bound_server.root_pem)
    bootstrap = ("--cert", tmp_path / "bootstrap" / "cert.pem")
    bootstrap += ("--key", tmp_path / "bootstrap" / "key.pem")
    op, keygen = tmp_path / "op", tmp_path / "keygen"
    run_estkit("enroll", "--url", url, *anchor, "--device-id", device_id, *bootstrap, "--out", op)
    run_estkit(
        "reenroll", "--url", url, *anchor, "--cert", op / "cert.pem", "--key", op / "key.pem",
        "--out", op,
    )  # fmt: skip
    run_estkit(
        "serverkeygen", "--url", url, *anchor, "--device-id", device_id, *bootstrap,
        "--out", keygen,
    )  # fmt: skip
    assert stat.S_IMODE((keygen / "key.pem").stat().st_mode) == 0o600
    issued = Identity.load(keygen)
    assert issued.cert.subject.rfc4514_string() == f"CN={device_id}"
    assert_openssl_verifies(bound_server.root_pem, keygen)
