"""Fixtures for integration tests: devices provisioned against a real server."""

from __future__ import annotations

from pathlib import Path

import pytest

from estserver import EstServer
from estutil import Identity, csr_der, http, issued_cert, new_key, post_csr


def bootstrap_device(server: EstServer, device_id: str, directory: Path) -> Identity:
    """The factory step: a bootstrap key and certificate from the local CLI."""
    server.cli("device", "bootstrap", device_id, "--out", directory)
    return Identity.load(directory)


def enroll_operational(
    server: EstServer, device_id: str, bootstrap: Identity, directory: Path
) -> Identity:
    """The field step: first operational certificate over mTLS with the bootstrap certificate."""
    key = new_key()
    with http(server.root_pem, bootstrap) as client:
        response = post_csr(client, f"{server.url}/simpleenroll", csr_der(key, device_id))
    return Identity.write(directory, key, issued_cert(response))


@pytest.fixture
def bootstrap(est_server: EstServer, device_id: str, tmp_path: Path) -> Identity:
    return bootstrap_device(est_server, device_id, tmp_path / "bootstrap")


@pytest.fixture
def operational(
    est_server: EstServer, device_id: str, bootstrap: Identity, tmp_path: Path
) -> Identity:
    return enroll_operational(est_server, device_id, bootstrap, tmp_path / "operational")
