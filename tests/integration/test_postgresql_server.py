"""A real ``estkit server run`` on PostgreSQL: ``server init --database-url`` writes the
URL and migrates that database, devices enroll with the CLI, the audit chain verifies."""

from __future__ import annotations

import tomllib
from pathlib import Path

from backends import postgresql_only
from estkit.store import SqlStore
from estserver import EstServer, free_ports, run_estkit
from estutil import Identity


@postgresql_only
def test_a_server_on_postgresql_enrolls_and_keeps_a_verified_audit_chain(
    database_url: str, tmp_path: Path
) -> None:
    data_dir = tmp_path / "server"
    port, crl_port = free_ports(2)
    url = database_url.replace("postgresql+psycopg://", "postgresql://")
    init = run_estkit(
        "server", "init", "--data-dir", data_dir, "--port", str(port),
        "--crl-port", str(crl_port), "--database-url", url,
    )  # fmt: skip
    assert "database: schema up to date (postgresql+psycopg)" in init.stdout
    config = tomllib.loads((data_dir / "estkit.toml").read_text())
    assert config["database"]["url"] == url
    assert not (data_dir / "estkit.db").exists()
    server = EstServer(data_dir=data_dir, port=port, crl_port=crl_port)
    server.start()
    try:
        for device_id in ("pg-dev-1", "pg-dev-2"):
            server.cli("device", "bootstrap", device_id, "--out", tmp_path / device_id / "boot")
            bootstrap = Identity.load(tmp_path / device_id / "boot")
            run_estkit(
                "enroll", "--url", server.url, "--device-id", device_id,
                "--trust-anchor", server.root_pem, "--cert", bootstrap.cert_path,
                "--key", bootstrap.key_path, "--out", tmp_path / device_id / "op",
            )  # fmt: skip
            assert (tmp_path / device_id / "op" / "cert.pem").exists()
    finally:
        server.stop()
    verified = server.cli("audit", "verify")  # exits 0 only on an unbroken chain
    assert verified.stdout == "audit log: 4 entries, hash chain intact\n"
    store = SqlStore.open(database_url)
    try:
        assert store.count_certificates() == 4  # two bootstrap, two operational
    finally:
        store.close()
