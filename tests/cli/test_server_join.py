"""``estkit server init --join``: another node's data directory from an existing node's."""

from __future__ import annotations

import datetime as dt
import stat
import tomllib
from pathlib import Path

from backends import postgresql_only
from estkit.store import Node, SqlStore
from estserver import free_ports, run_estkit


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _first_node(tmp_path: Path, database_url: str) -> Path:
    data_dir = tmp_path / "eu-1"
    port, crl_port = free_ports(2)
    run_estkit(
        "server", "init", "--data-dir", data_dir, "--port", str(port),
        "--crl-port", str(crl_port), "--database-url",
        database_url.replace("postgresql+psycopg://", "postgresql://"),
        "--region", "eu", "--node-name", "eu-1",
    )  # fmt: skip
    return data_dir


def test_join_refuses_a_node_on_sqlite(tmp_path: Path) -> None:
    source = tmp_path / "one"
    run_estkit("server", "init", "--data-dir", source, "--port", str(free_ports(1)[0]))
    joined = run_estkit(
        "server", "init", "--data-dir", tmp_path / "two", "--join", source,
        "--region", "us", "--port", str(free_ports(1)[0]), check=False,
    )  # fmt: skip
    assert joined.returncode == 78
    assert "uses SQLite; nodes need one shared PostgreSQL database" in joined.stderr
    assert len(joined.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "two" / "estkit.toml").exists()


@postgresql_only
def test_join_copies_the_cas_and_tls_material_and_writes_the_nodes_own_config(
    database_url: str, tmp_path: Path
) -> None:
    source = _first_node(tmp_path, database_url)
    target = tmp_path / "us-1"
    port, crl_port = free_ports(2)
    out = run_estkit(
        "server", "init", "--data-dir", target, "--join", source, "--region", "us",
        "--public-url", f"https://us.example:{port}", "--port", str(port),
        "--crl-port", str(crl_port), "--node-name", "us-1",
    ).stdout  # fmt: skip
    assert "database: shared with the joined node, not migrated" in out
    for name in ("root", "devices", "bootstrap"):
        for suffix in (".pem", ".key"):
            copy = target / "ca" / f"{name}{suffix}"
            assert copy.read_bytes() == (source / "ca" / f"{name}{suffix}").read_bytes()
        assert _mode(target / "ca" / f"{name}.key") == 0o600
    assert _mode(target / "tls" / "server.key") == 0o600
    assert (target / "tls" / "server.pem").read_bytes() == (
        source / "tls" / "server.pem"
    ).read_bytes()
    config = tomllib.loads((target / "estkit.toml").read_text())
    first = tomllib.loads((source / "estkit.toml").read_text())
    assert config["database"]["url"] == first["database"]["url"]
    assert config["node"] == {"name": "us-1", "region": "us"}
    assert config["server"]["port"] == port
    assert config["server"]["public_url"] == f"https://us.example:{port}"
    assert config["crl"]["http_port"] == crl_port
    assert first["node"] == {"name": "eu-1", "region": "eu"}
    assert not (target / "estkit.db").exists()


@postgresql_only
def test_join_refuses_a_node_name_registered_already(database_url: str, tmp_path: Path) -> None:
    source = _first_node(tmp_path, database_url)
    store = SqlStore.open(database_url)
    now = dt.datetime.now(dt.UTC)
    try:
        store.register_node(Node("taken", "us", "https://taken.example", now, now, "1.0"))
    finally:
        store.close()
    joined = run_estkit(
        "server", "init", "--data-dir", tmp_path / "two", "--join", source,
        "--region", "us", "--port", str(free_ports(1)[0]), "--node-name", "taken", check=False,
    )  # fmt: skip
    assert joined.returncode == 78
    assert "a node named 'taken' is registered in the database already" in joined.stderr
    assert not (tmp_path / "two" / "estkit.toml").exists()
