"""The operator commands: ``server init`` once and idempotent, ``ca``, ``device``, ``cert``."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from estkit.pki.certs import build_path, fingerprint
from estserver import run_estkit, set_config


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("init") / "data"
    run_estkit("server", "init", "--data-dir", d, "--hostname", "est.example.net")
    return d


def test_init_creates_private_keys_config_and_database(data_dir: Path) -> None:
    for name in ("root", "devices", "bootstrap"):
        assert _mode(data_dir / "ca" / f"{name}.key") == 0o600
        assert (data_dir / "ca" / f"{name}.pem").exists()
    assert _mode(data_dir / "tls" / "server.key") == 0o600
    assert _mode(data_dir / "estkit.db") == 0o600
    assert _mode(data_dir) == 0o700
    assert "[labels.devices]" in (data_dir / "estkit.toml").read_text()


def test_init_twice_changes_nothing_and_says_so(data_dir: Path) -> None:
    files = sorted(
        p for p in data_dir.rglob("*") if p.is_file() and p.suffix in (".pem", ".key", ".toml")
    )
    before = {p: p.read_bytes() for p in files}
    out = run_estkit("server", "init", "--data-dir", data_dir).stdout
    assert out.count("unchanged") == 5  # config, three CAs, TLS certificate
    assert {p: p.read_bytes() for p in files} == before


def test_one_root_verifies_issuing_cas_and_tls_certificate(data_dir: Path) -> None:
    root = x509.load_pem_x509_certificate((data_dir / "ca" / "root.pem").read_bytes())
    tls = x509.load_pem_x509_certificate((data_dir / "tls" / "server.pem").read_bytes())
    names = tls.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "est.example.net" in names.get_values_for_type(x509.DNSName)
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    assert build_path(tls, [], [root]) == [tls, root]
    for name in ("devices", "bootstrap"):
        ca = x509.load_pem_x509_certificate((data_dir / "ca" / f"{name}.pem").read_bytes())
        assert build_path(ca, [], [root]) == [ca, root]
        assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_ca_list_prints_fingerprints_and_est_urls(data_dir: Path) -> None:
    out = run_estkit("ca", "list", "--data-dir", data_dir).stdout
    root = x509.load_pem_x509_certificate((data_dir / "ca" / "root.pem").read_bytes())
    assert fingerprint(root) in out
    assert "/.well-known/est/devices" in out


@pytest.mark.parametrize(
    ("ca", "length"),
    [("root", 1), ("devices", 2), ("bootstrap", 2)],
    ids=["ok/root", "ok/devices", "ok/bootstrap"],
)
def test_ca_chain_prints_chain_up_to_root(
    data_dir: Path, tmp_path: Path, ca: str, length: int
) -> None:
    pem = run_estkit("ca", "chain", "--data-dir", data_dir, "--ca", ca).stdout.encode()
    certs = x509.load_pem_x509_certificates(pem)
    assert len(certs) == length
    assert certs[-1].subject == certs[-1].issuer  # ends at the self-signed root
    first = tmp_path / "first.pem"
    first.write_bytes(certs[0].public_bytes(Encoding.PEM))
    verified = subprocess.run(
        ["openssl", "verify", "-CAfile", str(data_dir / "ca" / "root.pem"), str(first)],
        capture_output=True,
    )
    assert verified.returncode == 0, verified.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ca", "chain", "--ca", "nosuch"], "unknown CA"),
        (["cert", "revoke", "zz-not-hex"], "hexadecimal"),
        (["cert", "revoke", "ABCDEF"], "no certificate"),
        (["device", "disable", "never-registered"], "no device"),
        (["device", "bootstrap", "has/slash", "--out", "/tmp/never"], "device id"),
    ],
    ids=[
        "fail/unknown-ca",
        "fail/serial-not-hex",
        "fail/unknown-serial",
        "fail/unknown-device",
        "fail/bad-device-id",
    ],
)
def test_operator_errors_are_one_line_and_nonzero(
    data_dir: Path, args: list[str], message: str
) -> None:
    group, action, *rest = args
    proc = run_estkit(group, action, "--data-dir", data_dir, *rest, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr


def test_device_add_prints_only_the_secret_and_stores_a_hash(data_dir: Path) -> None:
    import sqlite3

    out = run_estkit("device", "add", "--data-dir", data_dir, "dev-secret").stdout
    secret = out.strip()
    assert out == secret + "\n" and len(secret) >= 32
    with sqlite3.connect(data_dir / "estkit.db") as db:
        stored = [bytes(r[0]) for r in db.execute("SELECT secret_hash FROM enrollment_secrets")]
    assert stored and all(secret.encode() not in h for h in stored)


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("profiles.operational", "validity", '"soon"'),
        ("server", "access_log", '"yes"'),
        ("tls", "key", '"ca/devices.key"'),  # a key that is not the certificate's
    ],
)
def test_bad_config_fails_at_start_naming_the_field(
    tmp_path: Path, section: str, key: str, value: str
) -> None:
    d = tmp_path / "data"
    run_estkit("server", "init", "--data-dir", d)
    set_config(d, section, key, value)
    proc = run_estkit("server", "run", "--data-dir", d, "--port", "1", check=False, timeout=30)
    assert proc.returncode != 0
    assert f"{section}.{key}" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_device_add_refuses_an_existing_device_unless_rotate_secret(data_dir: Path) -> None:
    first = run_estkit("device", "add", "--data-dir", data_dir, "dev-twice").stdout.strip()
    again = run_estkit("device", "add", "--data-dir", data_dir, "dev-twice", check=False)
    assert again.returncode == 1
    assert again.stdout == ""
    assert again.stderr.count("\n") == 1 and "Traceback" not in again.stderr
    assert "dev-twice" in again.stderr and "--rotate-secret" in again.stderr
    rotated = run_estkit(
        "device", "add", "--data-dir", data_dir, "dev-twice", "--rotate-secret"
    ).stdout.strip()
    assert len(rotated) >= 32 and rotated != first


def _bootstrap_certificates(data_dir: Path, device_id: str) -> dict[str, str]:
    """Serial -> status of the device's bootstrap certificates, from the store."""
    from estkit.server.config import load_config
    from estkit.server.wiring import open_store

    store = open_store(load_config(data_dir))
    try:
        return {
            r.serial: r.status.value
            for r in store.certificates_of(device_id)
            if r.ca == "bootstrap"
        }
    finally:
        store.close()


def test_device_bootstrap_refuses_a_second_certificate_unless_forced(
    data_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "bootstrap"
    run_estkit("device", "bootstrap", "--data-dir", data_dir, "dev-reboot", "--out", out)
    (old,) = _bootstrap_certificates(data_dir, "dev-reboot")
    key = (out / "key.pem").read_bytes()

    again = run_estkit(
        "device", "bootstrap", "--data-dir", data_dir, "dev-reboot", "--out", out, check=False
    )
    assert again.returncode == 1
    assert again.stderr.count("\n") == 1 and "Traceback" not in again.stderr
    assert "dev-reboot" in again.stderr and "--force" in again.stderr
    assert (out / "key.pem").read_bytes() == key  # the device's key is untouched
    assert _bootstrap_certificates(data_dir, "dev-reboot") == {old: "valid"}

    forced = run_estkit(
        "device", "bootstrap", "--data-dir", data_dir, "dev-reboot", "--out", out, "--force"
    )
    assert f"revoked the bootstrap certificate(s) it replaces (superseded): {old}" in forced.stdout
    certificates = _bootstrap_certificates(data_dir, "dev-reboot")
    assert certificates.pop(old) == "revoked"
    assert list(certificates.values()) == ["valid"]
    new = x509.load_pem_x509_certificate((out / "cert.pem").read_bytes())
    assert f"{new.serial_number:X}" in certificates
    assert (out / "key.pem").read_bytes() != key


def test_device_bootstrap_force_that_cannot_write_keeps_the_old_certificate(
    data_dir: Path, tmp_path: Path
) -> None:
    """The old certificate is revoked only once the new key and certificate are on disk."""
    out = tmp_path / "bootstrap"
    run_estkit("device", "bootstrap", "--data-dir", data_dir, "dev-nowrite", "--out", out)
    (old,) = _bootstrap_certificates(data_dir, "dev-nowrite")
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    failed = run_estkit(
        "device", "bootstrap", "--data-dir", data_dir, "dev-nowrite", "--force",
        "--out", blocked / "sub", check=False,
    )  # fmt: skip
    assert failed.returncode == 1
    assert failed.stderr.count("\n") == 1 and "Traceback" not in failed.stderr
    assert "the old one is unchanged" in failed.stderr
    certificates = _bootstrap_certificates(data_dir, "dev-nowrite")
    assert certificates.pop(old) == "valid"
    assert list(certificates.values()) == ["revoked"]  # the one whose key was lost


def _ports(data_dir: Path) -> tuple[int, str, int, str]:
    import tomllib

    config = tomllib.loads((data_dir / "estkit.toml").read_text())
    server, crl = config["server"], config["crl"]
    return server["port"], server["public_url"], crl["http_port"], crl["url"]


@pytest.mark.parametrize(
    ("args", "expected", "said"),
    [
        (
            ("--port", "9443"),
            (9443, "https://localhost:9443", 9444, "http://localhost:9444/crl"),
            "config: port 17443 -> 9443, CRL port 17444 -> 9444",
        ),
        (
            ("--crl-port", "9080"),
            (17443, "https://localhost:17443", 9080, "http://localhost:9080/crl"),
            "config: CRL port 17444 -> 9080",
        ),
        (
            ("--port", "9443", "--crl-port", "9080"),
            (9443, "https://localhost:9443", 9080, "http://localhost:9080/crl"),
            "config: port 17443 -> 9443, CRL port 17444 -> 9080",
        ),
        (
            ("--port", "17443"),
            (17443, "https://localhost:17443", 17444, "http://localhost:17444/crl"),
            "config: exists",
        ),
        (
            (),
            (17443, "https://localhost:17443", 17444, "http://localhost:17444/crl"),
            "config: exists",
        ),
    ],
    ids=["ok/port", "ok/crl-port", "ok/both", "ok/same-port", "ok/no-port"],
)
def test_init_on_an_existing_config_moves_it_to_the_given_ports(
    tmp_path: Path, args: tuple[str, ...], expected: tuple[int, str, int, str], said: str
) -> None:
    """`make run` passes PORT on every run: the config, and what `server info` prints, follow."""
    d = tmp_path / "data"
    run_estkit("server", "init", "--data-dir", d, "--port", "17443")
    out = run_estkit("server", "init", "--data-dir", d, *args).stdout
    assert out.splitlines()[0].startswith(said)
    assert _ports(d) == expected
    info = run_estkit("server", "info", "--data-dir", d).stdout
    assert f"{expected[1]}/.well-known/est" in info


def test_init_keeps_an_operator_chosen_public_url_and_crl_port(tmp_path: Path) -> None:
    d = tmp_path / "data"
    run_estkit("server", "init", "--data-dir", d, "--port", "17443")
    set_config(d, "server", "public_url", '"https://est.example.net"')
    set_config(d, "crl", "http_port", "8080")
    run_estkit("server", "init", "--data-dir", d, "--port", "9443")
    assert _ports(d) == (9443, "https://est.example.net", 8080, "http://localhost:17444/crl")


@pytest.mark.parametrize(
    "port", ["0", "65536", "https"], ids=["fail/zero", "fail/big", "fail/word"]
)
def test_a_bad_port_is_a_usage_error(tmp_path: Path, port: str) -> None:
    proc = run_estkit("server", "init", "--data-dir", tmp_path / "d", "--port", port, check=False)
    assert proc.returncode == 2
    assert "--port" in proc.stderr
    assert not (tmp_path / "d").exists()
