"""PostgreSQL restarted under load: a real ``estkit server run`` node on a cluster of
this test's own keeps taking enrollments from several threads while PostgreSQL is
stopped (``pg_ctl stop -m fast``) for a couple of seconds and started again on the
same port.

During the outage the node answers 503 + ``Retry-After`` (never a 500, never a dropped
connection); afterwards it serves again by itself; every certificate a client received
is recorded, and the audit chain still verifies.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from estkit.pki.certs import serial_hex
from estkit.store import SqlStore
from estserver import EstServer, free_ports, run_estkit
from estutil import Identity, csr_der, http, issued_cert, new_key, post_csr
from integration.conftest import bootstrap_device
from pgcluster import PgCluster, running_cluster

UNIT = Path(__file__).parents[2] / "deploy" / "estkit-server.service"
WORKERS = 3
OUTAGE_SECONDS = 2.0


@dataclass
class Node:
    server: EstServer
    cluster: PgCluster
    database_url: str


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Node]:
    # Heartbeats every second, so the heartbeat also meets the outage.
    monkeypatch.setenv("ESTKIT_HEARTBEAT_SECONDS", "1")
    # A cluster of its own: this test stops it, which other tests on the worker's
    # shared cluster would not survive.
    with running_cluster() as cluster, cluster.database() as database_url:
        port, crl_port = free_ports(2)
        data_dir = tmp_path / "node"
        run_estkit(
            "server", "init", "--data-dir", data_dir, "--port", str(port),
            "--crl-port", str(crl_port),
            "--database-url", database_url.replace("postgresql+psycopg://", "postgresql://"),
        )  # fmt: skip
        server = EstServer(data_dir=data_dir, port=port, crl_port=crl_port)
        server.start()
        try:
            yield Node(server, cluster, database_url)
        finally:
            server.stop()


@dataclass
class Outcomes:
    """What the clients saw, in the order they saw it (shared by the threads)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    seen: list[tuple[float, int, dict[str, str]]] = field(default_factory=list)
    serials: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def add(self, response: httpx.Response) -> None:
        with self.lock:
            self.seen.append((time.monotonic(), response.status_code, dict(response.headers)))
            if response.status_code == 200:
                self.serials.append(issued_cert(response).serial_number)

    def oks_since(self, moment: float) -> int:
        with self.lock:
            return sum(1 for t, status, _ in self.seen if t > moment and status == 200)


def enroll_loop(
    server: EstServer, identity: Identity, device_id: str, out: Outcomes, done: threading.Event
) -> None:
    with http(server.root_pem, identity) as client:
        for _ in range(5000):  # bounded; the test sets ``done`` long before
            if done.is_set():
                return
            try:
                response = post_csr(
                    client, f"{server.url}/simpleenroll", csr_der(new_key(), device_id)
                )
            except httpx.HTTPError as exc:
                with out.lock:
                    out.errors.append(repr(exc))
                time.sleep(0.1)
                continue
            out.add(response)
            if response.status_code == 503:
                time.sleep(0.05)  # a device would wait Retry-After; the test polls faster


def wait_until(check: Callable[[], bool], timeout: float) -> bool:
    """Poll ``check`` every 0.1 s for at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


def test_postgresql_restarted_under_load(node: Node, device_id: str, tmp_path: Path) -> None:
    server = node.server
    devices = [f"{device_id}-{i}" for i in range(WORKERS)]
    boots = {d: bootstrap_device(server, d, tmp_path / d) for d in devices}
    out, done = Outcomes(), threading.Event()
    threads = [
        threading.Thread(target=enroll_loop, args=(server, boots[d], d, out, done), daemon=True)
        for d in devices
    ]
    for thread in threads:
        thread.start()
    try:
        assert wait_until(lambda: out.oks_since(0) >= 2 * WORKERS, 20), "no load before the outage"
        node.cluster.halt()
        halted = time.monotonic()
        assert wait_until(lambda: any(s == 503 for _, s, _ in out.seen[-50:]), 10), (
            "no 503 while PostgreSQL was down"
        )
        time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - halted)))
        node.cluster.resume()
        resumed = time.monotonic()
        assert wait_until(lambda: out.oks_since(resumed) >= WORKERS, 20), (
            "the node did not serve again after PostgreSQL came back"
        )
    finally:
        done.set()
        for thread in threads:
            thread.join(timeout=30)

    statuses = Counter(status for _, status, _ in out.seen)
    print(f"outcomes: {dict(statuses)}, transport errors: {len(out.errors)}")
    assert not out.errors, out.errors[:5]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses[503] > 0
    refusals = [headers for _, status, headers in out.seen if status == 503]
    assert all(h.get("estkit-refusal-code") == "unavailable" for h in refusals), refusals[:3]
    assert all(int(h["retry-after"]) > 0 for h in refusals), refusals[:3]

    assert len(set(out.serials)) == len(out.serials)
    store = SqlStore.open(node.database_url)
    try:
        unrecorded = [s for s in out.serials if store.get_certificate(serial_hex(s)) is None]
    finally:
        store.close()
    assert not unrecorded, f"{len(unrecorded)} certificates a client received are unrecorded"
    assert "hash chain intact" in server.cli("audit", "verify").stdout
    assert server.log_path is not None
    log = server.log_path.read_text()
    assert "Traceback" not in log, log[log.index("Traceback") - 2000 :][:6000]


def test_the_systemd_unit_runs_the_server_hardened(tmp_path: Path) -> None:
    """The unit's key directives, and ``systemd-analyze verify`` where it is installed
    (with a stand-in binary: it insists that ``ExecStart`` exists)."""
    text = UNIT.read_text()
    directives = {
        line.split("=", 1)[0]: line.split("=", 1)[1]
        for line in text.splitlines()
        if "=" in line and not line.startswith("#")
    }
    assert directives["ExecStart"].endswith("estkit server run --data-dir /var/lib/estkit")
    assert directives["StateDirectory"] == "estkit"
    assert directives["User"] == "estkit"
    assert directives["ProtectSystem"] == "strict"
    assert directives["CapabilityBoundingSet"] == ""
    assert directives["RestrictAddressFamilies"] == "AF_INET AF_INET6 AF_UNIX"
    assert directives["SystemCallFilter"] == "@system-service"
    assert directives["Restart"] == "on-failure"
    assert directives["LimitNOFILE"] == "65536"
    for flag in ("ProtectHome", "PrivateTmp", "NoNewPrivileges"):
        assert directives[flag] in ("yes", "true"), flag
    analyze, stand_in = shutil.which("systemd-analyze"), shutil.which("true")
    if analyze is None or stand_in is None:
        return
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace("/usr/local/bin/estkit", stand_in))
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
