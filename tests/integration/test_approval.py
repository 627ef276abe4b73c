"""Manual approval (RFC 7030 4.2.3), real server: 202 + Retry-After until an operator decides.

The device retries the same CSR; after approval the retry gets the certificate
(and a retry whose answer was lost gets the same one), after denial 403.
strongSwan ``pki --est`` must complete the polling flow on its own.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

import serverdb
from backends import server_database
from estkit.pki.certs import serial_hex
from estserver import EstServer, make_server
from estutil import Identity, csr_der, http, issued_cert, new_key, post_csr
from integration.conftest import bootstrap_device

PKI = "/usr/bin/pki"


@dataclass(frozen=True, slots=True)
class PendingRow:
    """One line of ``estkit pending list``."""

    id: int
    status: str
    label: str
    device_id: str
    operation: str
    created: str
    requested_by: str


def pending_rows(server: EstServer, device_id: str, *, every: bool = False) -> list[PendingRow]:
    out = server.cli("pending", "list", *(["--all"] if every else [])).stdout
    rows = [line.split("\t") for line in out.splitlines() if line]
    assert all(len(r) == 7 for r in rows), out
    return [
        PendingRow(int(r[0]), *r[1:])  # type: ignore[arg-type]
        for r in rows
        if r[3] == device_id
    ]


def operational_serials(server: EstServer, device_id: str) -> list[str]:
    return [
        r[0]
        for r in serverdb.rows(
            server.data_dir,
            "SELECT serial FROM certificates WHERE device_id = :d AND ca = 'devices'",
            d=device_id,
        )
    ]


@pytest.fixture(scope="module")
def approval_server(
    request: pytest.FixtureRequest, backend: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EstServer]:
    """One server whose default label needs approval; each test has its own device."""
    server = make_server(
        tmp_path_factory.mktemp("approval"),
        config={
            ("labels.devices", "approval"): "true",
            ("labels.devices", "approval_retry_after"): "1",
        },
        database_url=server_database(request, backend),
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def boot(approval_server: EstServer, device_id: str, tmp_path: Path) -> Identity:
    return bootstrap_device(approval_server, device_id, tmp_path / "bootstrap")


def enroll(server: EstServer, identity: Identity, der: bytes) -> httpx.Response:
    with http(server.root_pem, identity) as client:
        return post_csr(client, f"{server.url}/simpleenroll", der)


def assert_waiting(response: httpx.Response) -> None:
    assert response.status_code == 202, f"{response.status_code}: {response.text}"
    assert response.headers["retry-after"] == "1"
    assert "approval" in response.text


# -- waiting ------------------------------------------------------------------------------


def test_enroll_on_approval_label_answers_202_with_retry_after_until_decided(
    approval_server: EstServer, device_id: str, boot: Identity
) -> None:
    der = csr_der(new_key(), device_id)

    first = enroll(approval_server, boot, der)
    again = enroll(approval_server, boot, der)

    assert_waiting(first)
    assert_waiting(again)
    (row,) = pending_rows(approval_server, device_id)  # the retry is the same request
    assert (row.status, row.label, row.operation) == ("pending", "devices", "simpleenroll")
    assert row.requested_by == f"cert:{serial_hex(boot.cert.serial_number)}"
    assert operational_serials(approval_server, device_id) == []


# -- deciding --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("decision", "status", "listed_as"),
    [("approve", 200, "issued"), ("deny", 403, "denied")],
    ids=["ok/approved-retry-gets-certificate", "fail/denied-retry-gets-403"],
)
def test_retry_after_decision_gets_certificate_or_403(
    approval_server: EstServer,
    device_id: str,
    boot: Identity,
    decision: str,
    status: int,
    listed_as: str,
) -> None:
    key = new_key()
    der = csr_der(key, device_id)
    assert_waiting(enroll(approval_server, boot, der))
    (row,) = pending_rows(approval_server, device_id)

    out = approval_server.cli("pending", decision, str(row.id), "--reason", "line 7 audit")
    retry = enroll(approval_server, boot, der)

    assert str(row.id) in out.stdout
    assert retry.status_code == status, retry.text
    (decided,) = pending_rows(approval_server, device_id, every=True)
    assert decided.id == row.id and decided.status == listed_as
    if decision == "deny":
        assert "denied" in retry.text and "line 7 audit" in retry.text
        assert operational_serials(approval_server, device_id) == []
        return
    cert = issued_cert(retry)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == device_id
    assert cert.public_key() == key.public_key()
    assert operational_serials(approval_server, device_id) == [serial_hex(cert.serial_number)]


def test_retry_after_lost_answer_gets_the_same_certificate(
    approval_server: EstServer, device_id: str, boot: Identity
) -> None:
    der = csr_der(new_key(), device_id)
    assert_waiting(enroll(approval_server, boot, der))
    (row,) = pending_rows(approval_server, device_id)
    approval_server.cli("pending", "approve", str(row.id))
    first = issued_cert(enroll(approval_server, boot, der))

    again = issued_cert(enroll(approval_server, boot, der))  # the first answer was "lost"

    assert again.public_bytes(Encoding.DER) == first.public_bytes(Encoding.DER)
    assert operational_serials(approval_server, device_id) == [serial_hex(first.serial_number)]


def test_new_csr_after_denial_waits_for_a_new_decision(
    approval_server: EstServer, device_id: str, boot: Identity
) -> None:
    denied_der = csr_der(new_key(), device_id)
    assert_waiting(enroll(approval_server, boot, denied_der))
    (denied,) = pending_rows(approval_server, device_id)
    approval_server.cli("pending", "deny", str(denied.id))
    assert enroll(approval_server, boot, denied_der).status_code == 403

    fresh = enroll(approval_server, boot, csr_der(new_key(), device_id))

    assert_waiting(fresh)
    (waiting,) = pending_rows(approval_server, device_id)  # decided requests leave the list
    assert waiting.id != denied.id and waiting.status == "pending"
    # The denied CSR stays denied.
    assert enroll(approval_server, boot, denied_der).status_code == 403


def test_deciding_twice_or_an_unknown_request_fails(
    approval_server: EstServer, device_id: str, boot: Identity
) -> None:
    assert_waiting(enroll(approval_server, boot, csr_der(new_key(), device_id)))
    (row,) = pending_rows(approval_server, device_id)
    approval_server.cli("pending", "approve", str(row.id))

    twice = approval_server.cli("pending", "deny", str(row.id), check=False)
    unknown = approval_server.cli("pending", "approve", str(row.id + 1000), check=False)

    assert twice.returncode == 1 and len(twice.stderr.strip().splitlines()) == 1
    assert unknown.returncode == 1 and len(unknown.stderr.strip().splitlines()) == 1
    (decided,) = pending_rows(approval_server, device_id, every=True)
    assert decided.status == "approved"


# -- strongSwan pki polls on its own ----------------------------------------------------------


@pytest.mark.parametrize(
    ("decision", "succeeds"),
    [("approve", True), ("deny", False)],
    ids=["ok/pki-polls-until-approved", "fail/pki-polls-until-denied"],
)
def test_pki_est_completes_the_202_polling_flow(
    approval_server: EstServer, device_id: str, tmp_path: Path, decision: str, succeeds: bool
) -> None:
    secret = approval_server.cli("device", "add", device_id).stdout.strip()
    key = new_key()
    csr = tmp_path / "req.der"
    csr.write_bytes(csr_der(key, device_id))
    devices_ca = approval_server.data_dir / "ca" / "devices.pem"
    pki = subprocess.Popen(
        [
            PKI, "--est", "--url", approval_server.origin,
            "--cacert", approval_server.root_pem, "--cacert", devices_ca,
            "--in", csr, "--userpass", f"{device_id}:{secret}",
            "--interval", "1", "--maxpolltime", "60", "--outform", "pem",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        rows: list[PendingRow] = []
        deadline = time.monotonic() + 15
        while not rows and time.monotonic() < deadline and pki.poll() is None:
            time.sleep(0.2)
            rows = pending_rows(approval_server, device_id)
        assert len(rows) == 1, f"no pending request appeared; pki exited {pki.poll()}"
        approval_server.cli("pending", decision, str(rows[0].id))
        stdout, stderr = pki.communicate(timeout=30)
    finally:
        if pki.poll() is None:
            pki.kill()
            pki.wait(timeout=5)

    assert b"EST request pending, polling every 1 seconds" in stderr  # it did see the 202
    if not succeeds:
        assert pki.returncode != 0
        assert b"HTTP 403" in stderr, stderr.decode(errors="replace")
        assert stdout == b""
        assert operational_serials(approval_server, device_id) == []
        return
    assert pki.returncode == 0, stderr.decode(errors="replace")
    (cert,) = x509.load_pem_x509_certificates(stdout)
    assert cert.subject.rfc4514_string() == f"CN={device_id}"
    assert cert.public_key() == key.public_key()
    assert operational_serials(approval_server, device_id) == [serial_hex(cert.serial_number)]
