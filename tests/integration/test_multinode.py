"""One state, whichever node answers: two real ``estkit server run`` processes on one
PostgreSQL database, each with its own data directory, ports and CRL directory.

Node B's data directory is a copy of node A's (same CAs, same database URL) with
its own ports and node name. A device may use either node; what one node decides,
the other honours on the next request.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from estkit.pki.certs import serial_hex
from estkit.store import SqlStore
from estserver import EstServer, add_label, node_pair
from estutil import Identity, csr_der, http, issued_cert, new_key, post_csr
from integration.conftest import bootstrap_device
from pgcluster import PgCluster


@dataclass(frozen=True, slots=True)
class Fleet:
    a: EstServer
    b: EstServer
    database_url: str

    @property
    def nodes(self) -> tuple[EstServer, EstServer]:
        return self.a, self.b


@pytest.fixture(scope="module")
def fleet(pg_cluster: PgCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    def approved_label(data_dir: Path) -> None:
        add_label(data_dir, "approved", approval=True, approval_retry_after=1)

    tmp = tmp_path_factory.mktemp("multinode")
    with (
        pg_cluster.database() as database_url,
        node_pair(database_url, tmp, prepare=approved_label) as (a, b),
    ):
        yield Fleet(a, b, database_url)


def enroll(
    node: EstServer, identity: Identity | None, device_id: str, *, label: str = ""
) -> httpx.Response:
    path = f"/{label}" if label else ""
    with http(node.root_pem, identity) as client:
        return post_csr(client, f"{node.url}{path}/simpleenroll", csr_der(new_key(), device_id))


def fetch_crl(node: EstServer, ca: str) -> x509.CertificateRevocationList:
    with urllib.request.urlopen(f"{node.crl_url}/{ca}.crl", timeout=10) as response:
        return x509.load_der_x509_crl(response.read())


def crl_number(crl: x509.CertificateRevocationList) -> int:
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def crl_with(node: EstServer, ca: str, serial: int) -> x509.CertificateRevocationList | None:
    """The node's CRL once it lists ``serial``: polled every 0.1 s for at most 2 s."""
    deadline = time.monotonic() + 2
    while True:
        crl = fetch_crl(node, ca)
        if crl.get_revoked_certificate_by_serial_number(serial) is not None:
            return crl
        if time.monotonic() > deadline:
            return None
        time.sleep(0.1)


def test_concurrent_enrollment_on_both_nodes_gives_unique_recorded_serials_and_one_chain(
    fleet: Fleet, device_id: str, tmp_path: Path
) -> None:
    devices = [f"{device_id}-{i}" for i in range(4)]
    boots = {d: bootstrap_device(fleet.a, d, tmp_path / d) for d in devices}
    jobs = [(fleet.nodes[i % 2], devices[i % 4]) for i in range(20)]
    with ThreadPoolExecutor(max_workers=20) as pool:
        responses = list(pool.map(lambda job: enroll(job[0], boots[job[1]], job[1]), jobs))
    serials = [issued_cert(r).serial_number for r in responses]
    assert len(set(serials)) == 20
    store = SqlStore.open(fleet.database_url)
    try:
        assert all(store.get_certificate(serial_hex(s)) is not None for s in serials)
    finally:
        store.close()
    for node in fleet.nodes:  # one chain, whichever node's data directory asks
        assert "hash chain intact" in node.cli("audit", "verify").stdout


def test_a_revocation_on_a_is_refused_by_b_and_in_every_nodes_crl(
    fleet: Fleet, device_id: str, tmp_path: Path
) -> None:
    boot = bootstrap_device(fleet.a, device_id, tmp_path / "boot")
    op_key = new_key()
    with http(fleet.b.root_pem, boot) as client:
        cert = issued_cert(
            post_csr(client, f"{fleet.b.url}/simpleenroll", csr_der(op_key, device_id))
        )
    before = [crl_number(fetch_crl(node, "devices")) for node in fleet.nodes]

    fleet.a.cli("cert", "revoke", f"{cert.serial_number:x}", "--reason", "keyCompromise")

    op = Identity.write(tmp_path / "op", op_key, cert)
    with http(fleet.b.root_pem, op) as client:
        refused = post_csr(client, f"{fleet.b.url}/simplereenroll", csr_der(new_key(), device_id))
    assert refused.status_code == 403, refused.text
    after = [crl_with(node, "devices", cert.serial_number) for node in fleet.nodes]
    assert None not in after, "a node did not serve the new CRL within 2 s"
    numbers = [crl_number(crl) for crl in after if crl is not None]
    assert min(numbers) > max(before)
    assert numbers[0] != numbers[1]  # each CRL has its own number, from one sequence


def test_a_device_disabled_on_a_is_refused_by_b(
    fleet: Fleet, device_id: str, tmp_path: Path
) -> None:
    boot = bootstrap_device(fleet.a, device_id, tmp_path / "boot")
    issued_cert(enroll(fleet.b, boot, device_id))
    fleet.a.cli("device", "disable", device_id)
    refused = enroll(fleet.b, boot, device_id)
    assert refused.status_code == 403, refused.text


def test_a_one_time_secret_is_consumed_once_across_nodes(fleet: Fleet, device_id: str) -> None:
    secret = fleet.a.cli("device", "add", device_id).stdout.strip()
    with http(fleet.a.root_pem) as client:
        issued_cert(
            post_csr(
                client, f"{fleet.a.url}/simpleenroll", csr_der(new_key(), device_id),
                auth=(device_id, secret),
            )
        )  # fmt: skip
    with http(fleet.b.root_pem) as client:
        again = post_csr(
            client, f"{fleet.b.url}/simpleenroll", csr_der(new_key(), device_id),
            auth=(device_id, secret),
        )  # fmt: skip
    assert again.status_code == 401
    assert again.headers["estkit-refusal-code"] == "secret-invalid"


def test_an_approval_on_a_releases_the_device_waiting_on_b(
    fleet: Fleet, device_id: str, tmp_path: Path
) -> None:
    boot = bootstrap_device(fleet.a, device_id, tmp_path / "boot")
    der = csr_der(new_key(), device_id)
    url = f"{fleet.b.url}/approved/simpleenroll"
    with http(fleet.b.root_pem, boot) as client:
        waiting = post_csr(client, url, der)
        assert waiting.status_code == 202, waiting.text
        rows = [
            line.split("\t")
            for line in fleet.a.cli("pending", "list").stdout.splitlines()
            if device_id in line
        ]
        assert len(rows) == 1
        fleet.a.cli("pending", "approve", rows[0][0])
        issued_cert(post_csr(client, url, der))
