"""``estkit factory provision`` against a real server, then the devices enroll over EST.

The factory station makes each key where it runs, sends only the CSR to the
REST API with a ``provision`` token, and writes key.pem, cert.pem and
chain.pem; the device later uses that bootstrap certificate for mTLS with
``estkit enroll``. Everything runs as the commands a factory and a device
would run, and ``openssl`` checks the files.
"""

from __future__ import annotations

import csv
import io
import os
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

from estkit.pki.certs import serial_hex
from estkit.pki.keys import load_private_key_pem
from estserver import EstServer, run_estkit
from estutil import assert_openssl_verifies, http

_names = iter(range(1_000_000))


@dataclass(frozen=True)
class Tokens:
    provision: str
    read: str


@pytest.fixture(scope="module")
def tokens(est_server: EstServer) -> Tokens:
    def create(role: str, scope: str) -> str:
        name = f"factory-e2e-{role}-{os.getpid()}-{next(_names)}"
        return est_server.cli("token", "create", "--name", name, "--scope", scope).stdout.strip()

    return Tokens(provision=create("station", "provision"), read=create("viewer", "read"))


def factory(server: EstServer, token: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return run_estkit(
        "factory",
        "provision",
        "--api",
        server.origin,
        "--token",
        token,
        "--trust-anchor",
        server.root_pem,
        *args,
        check=False,
    )


def check_bootstrap_files(server: EstServer, directory: Path, device_id: str) -> x509.Certificate:
    """key.pem (0600), cert.pem and chain.pem of a bootstrap certificate for ``device_id``."""
    key_path = directory / "key.pem"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    key = load_private_key_pem(key_path.read_bytes())
    cert = x509.load_pem_x509_certificate((directory / "cert.pem").read_bytes())
    chain = x509.load_pem_x509_certificates((directory / "chain.pem").read_bytes())
    bootstrap_ca = x509.load_pem_x509_certificate(
        (server.data_dir / "ca" / "bootstrap.pem").read_bytes()
    )
    assert cert.subject.rfc4514_string() == f"CN={device_id}"
    assert cert.public_key() == key.public_key()
    assert cert.issuer == bootstrap_ca.subject
    assert chain[0] == bootstrap_ca
    assert_openssl_verifies(server.root_pem, directory)
    return cert


def certificates_of(server: EstServer, token: str, device_id: str) -> list[dict[str, str]]:
    with http(server.root_pem) as client:
        response = client.get(
            f"{server.origin}/api/v1/certificates",
            params={"device_id": device_id},
            headers={"Authorization": f"Bearer {token}"},
        )
    assert response.status_code == 200, response.text
    items: list[dict[str, str]] = response.json()["items"]
    return items


def est_enroll(server: EstServer, bootstrap: Path, device_id: str, out: Path) -> x509.Certificate:
    """The device in the field: ``estkit enroll`` over mTLS with its bootstrap certificate."""
    run_estkit(
        "enroll",
        "--url",
        server.url,
        "--device-id",
        device_id,
        "--trust-anchor",
        server.root_pem,
        "--cert",
        bootstrap / "cert.pem",
        "--key",
        bootstrap / "key.pem",
        "--out",
        out,
    )
    assert_openssl_verifies(server.root_pem, out)
    return x509.load_pem_x509_certificate((out / "cert.pem").read_bytes())


def read_results(path: Path) -> dict[str, dict[str, str]]:
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    assert list(rows[0]) == ["device_id", "status", "serial", "not_after", "error"]
    return {row["device_id"]: row for row in rows}


# -- one device ----------------------------------------------------------------------------------


def test_single_device_gets_key_cert_and_chain_that_verify_and_enroll_over_est(
    est_server: EstServer, tokens: Tokens, device_id: str, tmp_path: Path
) -> None:
    out = tmp_path / "station" / device_id  # --out DIR writes DIR/<device id>/

    station = tmp_path / "station"
    proc = factory(est_server, tokens.provision, "--device-id", device_id, "--out", station)

    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["cert.pem", "chain.pem", "key.pem"]
    cert = check_bootstrap_files(est_server, out, device_id)
    serial = serial_hex(cert.serial_number)
    assert proc.stdout.startswith(f"{device_id}: serial {serial}, not after ")
    assert proc.stdout.count("\n") == 1
    [record] = certificates_of(est_server, tokens.read, device_id)
    assert (record["serial"], record["ca"], record["requested_via"]) == (
        serial,
        "bootstrap",
        "api-provision",
    )

    operational = est_enroll(est_server, out, device_id, tmp_path / "device")

    devices_ca = x509.load_pem_x509_certificate(
        (est_server.data_dir / "ca" / "devices.pem").read_bytes()
    )
    assert operational.subject == cert.subject
    assert operational.issuer == devices_ca.subject


def test_single_device_run_again_is_idempotent(
    est_server: EstServer, tokens: Tokens, device_id: str, tmp_path: Path
) -> None:
    out = tmp_path / device_id
    first = factory(est_server, tokens.provision, "--device-id", device_id, "--out", tmp_path)
    assert first.returncode == 0, first.stderr
    files = {p.name: p.read_bytes() for p in out.iterdir()}

    again = factory(est_server, tokens.provision, "--device-id", device_id, "--out", tmp_path)

    assert again.returncode == 0, again.stderr
    assert "exists" in again.stdout and "nothing done" in again.stdout
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files
    assert len(certificates_of(est_server, tokens.read, device_id)) == 1


@pytest.mark.parametrize(
    ("which", "message"),
    [
        ("read", "HTTP 403 Forbidden: this API client lacks the 'provision' scope"),
        ("unknown", "HTTP 401 Unauthorized: unknown API token"),
        ("malformed", "HTTP 401 Unauthorized"),
    ],
    ids=["fail/token-without-provision-scope", "fail/unknown-token", "fail/not-a-token"],
)
def test_token_that_may_not_provision_fails_with_one_line_and_writes_nothing(
    est_server: EstServer, tokens: Tokens, device_id: str, tmp_path: Path, which: str, message: str
) -> None:
    token = {
        "read": tokens.read,
        "unknown": "estk_" + "A" * 43,
        "malformed": "not-an-estkit-token",
    }[which]
    out = tmp_path / device_id

    proc = factory(est_server, token, "--device-id", device_id, "--out", out)

    assert proc.returncode != 0
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert message in proc.stderr and device_id in proc.stderr
    assert token not in proc.stderr
    assert not out.exists()
    assert certificates_of(est_server, tokens.read, device_id) == []


# -- a production line -----------------------------------------------------------------------


@dataclass(frozen=True)
class Line:
    good: list[str]
    decommissioned: str
    invalid: str
    batch: Path
    out: Path


@pytest.fixture
def line(est_server: EstServer, device_id: str, tmp_path: Path) -> Line:
    """A batch of five: three good devices (one with a DNS name), one decommissioned
    with the operator CLI beforehand, and one whose id is not a valid device id."""
    good = [f"{device_id}-a", f"{device_id}-b", f"{device_id}-c"]
    decommissioned = f"{device_id}-gone"
    est_server.cli("device", "add", decommissioned)
    est_server.cli("device", "revoke", decommissioned)
    invalid = f"{device_id}/bad"
    batch = tmp_path / "devices.csv"
    batch.write_text(
        "device_id,dns,line\n"
        f"{good[0]},{good[0]}.factory.test,1\n"
        f"{decommissioned},,1\n"
        f"{good[1]},,1\n"
        f"{invalid},,1\n"
        f"{good[2]},,1\n"
    )
    return Line(good, decommissioned, invalid, batch, tmp_path / "out")


def test_batch_provisions_the_good_devices_and_reports_the_bad_ones(
    est_server: EstServer, tokens: Tokens, line: Line, tmp_path: Path
) -> None:
    proc = factory(est_server, tokens.provision, "--batch", line.batch, "--out", line.out)

    assert proc.returncode == 1, proc.stderr
    results = read_results(line.out / "results.csv")
    assert list(results) == [line.good[0], line.decommissioned, line.good[1], line.invalid,
                             line.good[2]]  # fmt: skip
    assert proc.stdout.strip() == f"3 ok, 2 failed, 0 exists; results in {line.out / 'results.csv'}"
    for device in line.good:
        cert = check_bootstrap_files(est_server, line.out / device, device)
        row = results[device]
        assert (row["status"], row["serial"], row["error"]) == (
            "ok",
            serial_hex(cert.serial_number),
            "",
        )
        assert row["not_after"] == cert.not_valid_after_utc.isoformat()
    sans = x509.load_pem_x509_certificate(
        (line.out / line.good[0] / "cert.pem").read_bytes()
    ).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert sans.value.get_values_for_type(x509.DNSName) == [f"{line.good[0]}.factory.test"]

    gone = results[line.decommissioned]
    assert (gone["status"], gone["serial"]) == ("failed", "")
    assert "HTTP 403" in gone["error"] and "decommissioned" in gone["error"]
    bad = results[line.invalid]
    assert bad["status"] == "failed" and bad["error"].startswith("line 5: ")
    assert not (line.out / line.decommissioned).exists()
    assert not (line.out / line.invalid.split("/")[0]).exists()
    progress = proc.stderr.splitlines()
    assert [p.split("]")[0] for p in progress] == [f"[{n}/5" for n in range(1, 6)]
    assert f"{line.decommissioned}: failed: HTTP 403" in progress[1]

    # The station's bootstrap certificate is what the device enrolls with in the field.
    est_enroll(est_server, line.out / line.good[1], line.good[1], tmp_path / "field")


def test_batch_run_again_skips_what_exists_and_issues_nothing_new(
    est_server: EstServer, tokens: Tokens, line: Line
) -> None:
    first = factory(est_server, tokens.provision, "--batch", line.batch, "--out", line.out)
    assert first.returncode == 1, first.stderr
    before = read_results(line.out / "results.csv")
    files = {d: (line.out / d / "cert.pem").read_bytes() for d in line.good}

    again = factory(est_server, tokens.provision, "--batch", line.batch, "--out", line.out)

    assert again.returncode == 1, again.stderr
    assert again.stdout.startswith("0 ok, 2 failed, 3 exists; ")
    after = read_results(line.out / "results.csv")
    for device in line.good:
        assert after[device]["status"] == "exists"
        assert after[device]["serial"] == before[device]["serial"]
        assert (line.out / device / "cert.pem").read_bytes() == files[device]
        assert len(certificates_of(est_server, tokens.read, device)) == 1
    assert after[line.decommissioned]["status"] == after[line.invalid]["status"] == "failed"


def test_batch_of_only_good_devices_exits_zero_and_again_all_exist(
    est_server: EstServer, tokens: Tokens, line: Line
) -> None:
    batch = line.batch.with_name("good.csv")
    batch.write_text("device_id\n" + "".join(f"{d}\n" for d in line.good))

    first = factory(est_server, tokens.provision, "--batch", batch, "--out", line.out)
    again = factory(est_server, tokens.provision, "--batch", batch, "--out", line.out)

    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("3 ok, 0 failed, 0 exists; ")
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("0 ok, 0 failed, 3 exists; ")
    assert {r["status"] for r in read_results(line.out / "results.csv").values()} == {"exists"}


def test_batch_with_a_token_without_provision_scope_fails_every_device(
    est_server: EstServer, tokens: Tokens, line: Line
) -> None:
    proc = factory(est_server, tokens.read, "--batch", line.batch, "--out", line.out)

    assert proc.returncode != 0
    results = read_results(line.out / "results.csv")
    assert {r["status"] for r in results.values()} == {"failed"}
    for device in line.good:
        assert "lacks the 'provision' scope" in results[device]["error"]
        assert not (line.out / device).exists()
    assert tokens.read not in proc.stdout + proc.stderr + (line.out / "results.csv").read_text()
