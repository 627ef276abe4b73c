"""Two real ``estkit server run`` nodes in two regions on one PostgreSQL: each lists
both, ``/api/v1/cas`` gives an EST URL per region, and a node killed with SIGKILL
turns stale while the other keeps serving."""

from __future__ import annotations

import json
import os
import signal
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from backends import postgresql_only
from estserver import EstServer, free_ports, run_estkit

# Short heartbeats, so a killed node is stale within seconds (stale: 3 heartbeats).
HEARTBEAT_SECONDS = "1"


def _wait_for(check: Any, *, timeout: float = 30) -> Any:
    """Poll ``check`` until it returns something true; bounded."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.2)


@pytest.fixture
def two_nodes(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[EstServer, EstServer]]:
    monkeypatch.setenv("ESTKIT_HEARTBEAT_SECONDS", HEARTBEAT_SECONDS)
    eu_port, eu_crl, us_port, us_crl = free_ports(4)
    eu_dir, us_dir = tmp_path / "eu-1", tmp_path / "us-1"
    run_estkit(
        "server", "init", "--data-dir", eu_dir, "--port", str(eu_port),
        "--crl-port", str(eu_crl), "--region", "eu", "--node-name", "eu-1",
        "--database-url", database_url.replace("postgresql+psycopg://", "postgresql://"),
    )  # fmt: skip
    run_estkit(
        "server", "init", "--data-dir", us_dir, "--join", eu_dir, "--region", "us",
        "--node-name", "us-1", "--public-url", f"https://localhost:{us_port}",
        "--port", str(us_port), "--crl-port", str(us_crl),
    )  # fmt: skip
    eu = EstServer(data_dir=eu_dir, port=eu_port, crl_port=eu_crl)
    us = EstServer(data_dir=us_dir, port=us_port, crl_port=us_crl)
    try:
        eu.start()
        us.start()
        yield eu, us
    finally:
        us.stop()
        eu.stop()


@postgresql_only
def test_nodes_in_two_regions_list_each_other_and_a_killed_one_goes_stale(
    two_nodes: tuple[EstServer, EstServer],
) -> None:
    eu, us = two_nodes
    token = eu.cli("token", "create", "--name", "reader", "--scope", "read").stdout.strip()
    context = ssl.create_default_context(cafile=str(eu.root_pem))
    with httpx.Client(verify=context, headers={"Authorization": f"Bearer {token}"}) as client:

        def get(server: EstServer, path: str) -> Any:
            response = client.get(f"{server.origin}/api/v1{path}", timeout=10)
            assert response.status_code == 200, response.text
            return response.json()

        for server in (eu, us):  # the token, made through eu, works on us: one database
            nodes = {n["name"]: n for n in get(server, "/nodes")}
            assert {name: n["region"] for name, n in nodes.items()} == {"eu-1": "eu", "us-1": "us"}
            assert nodes["us-1"]["est_url"] == f"{us.origin}/.well-known/est"
            assert not any(n["stale"] for n in nodes.values())

        (devices,) = [
            label for ca in get(us, "/cas") for label in ca["labels"] if label["name"] == "devices"
        ]
        assert devices["est_url"] == f"{us.origin}/.well-known/est/devices"
        assert devices["est_urls"] == [
            {"region": "eu", "node": "eu-1", "url": f"{eu.origin}/.well-known/est/devices"},
            {"region": "us", "node": "us-1", "url": f"{us.origin}/.well-known/est/devices"},
        ]
        listed = json.loads(us.cli("ca", "list", "--json").stdout)
        (cli_devices,) = [label for label in listed["labels"] if label["name"] == "devices"]
        assert cli_devices["est_urls"] == devices["est_urls"]

        assert us.proc is not None
        os.killpg(us.proc.pid, signal.SIGKILL)
        us.proc.wait(timeout=10)
        us.proc = None

        def us_stale() -> dict[str, Any] | None:
            nodes = {n["name"]: n for n in get(eu, "/nodes")}
            return nodes if nodes["us-1"]["stale"] else None

        nodes = _wait_for(us_stale)
        assert nodes, "us-1 did not turn stale within 30 s"
        assert not nodes["eu-1"]["stale"]
        assert client.get(f"{eu.origin}/health", timeout=10).status_code == 200
