"""Prometheus metrics of a real server with two workers (README "Metrics and logs"):
scraped from ``[metrics] port`` and read with Prometheus' own text parser, the
counters move by exactly what a test's requests did, whichever worker served them,
including a worker that died and was replaced; the gauges match the CA
certificates, the CRLs and the database."""

from __future__ import annotations

import base64
import datetime as dt
import os
import signal
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from backends import server_database
from estkit.pki.certs import load_pem_certificates
from estkit.server.metric_files import alive
from estserver import EstServer, free_port, make_server
from estutil import Identity, csr_der, http, issued_cert, new_key, post_csr
from integration.conftest import bootstrap_device

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

HISTOGRAM = "estkit_http_request_duration_seconds"
BUCKETS = ("0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5")
BUCKETS += ("1.0", "2.5", "5.0", "10.0", "+Inf")
ENROLL = "/.well-known/est/simpleenroll"
LABELED_ENROLL = "/.well-known/est/{label}/simpleenroll"
# A label whose requests wait for approval, and one whose certificates expire in 2 days.
EXTRA_CONFIG = """
[labels.held]
ca = "devices"
profile = "operational"
approval = true

[profiles.short]
kind = "operational"
validity = "2d"

[labels.short]
ca = "devices"
profile = "short"
"""


class Observed:
    """A started server with metrics on ``metrics_port``, and its scrapes."""

    def __init__(self, server: EstServer, metrics_port: int) -> None:
        self.server = server
        self.metrics_port = metrics_port

    def scrape(self) -> Samples:
        answer = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10)
        assert answer.status_code == 200, answer.text
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(answer.text)
            for sample in family.samples
        }

    def scrape_when(self, ready: Callable[[Samples], bool]) -> Samples:
        """A scrape that ``ready`` accepts: a worker counts a request just after its
        response went out, so a scrape right after it may be a moment early. Bounded."""
        deadline = time.monotonic() + 20
        while True:
            samples = self.scrape()
            if ready(samples) or time.monotonic() > deadline:
                return samples
            time.sleep(0.1)

    @property
    def files(self) -> Path:
        """This run's metric files (``server/metric_files.py``)."""
        assert self.server.proc is not None
        return self.server.data_dir / "run" / "metrics" / str(self.server.proc.pid)

    def worker_pids(self) -> set[int]:
        """The workers running now that have made their metric files."""
        assert self.server.proc is not None
        pids = {int(p.stem.rpartition("_")[2]) for p in self.files.glob("*.db")}
        return {pid for pid in pids - {self.server.proc.pid} if alive(pid)}

    def wait_for_workers(self, count: int, *, besides: set[int] = frozenset()) -> set[int]:
        """``count`` running workers, none of ``besides`` (bounded: a worker that starts
        slowly on a busy machine is replaced by uvicorn, and so is a killed one)."""
        deadline = time.monotonic() + 60
        while len(workers := self.worker_pids() - besides) < count:
            assert time.monotonic() < deadline, f"workers: {workers}; {self.server.log()}"
            time.sleep(0.2)
        return workers


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 for a series not (yet) in the scrape."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def moved(before: Samples, after: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    """The series of ``name`` whose value changed, and by how much."""
    keys = {k for k in (*before, *after) if k[0] == name}
    deltas = {k[1]: after.get(k, 0.0) - before.get(k, 0.0) for k in keys}
    return {labels: d for labels, d in deltas.items() if d}


@pytest.fixture
def observed(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> Iterator[Observed]:
    server = make_server(
        tmp_path,
        config={("server", "workers"): "2"},
        database_url=server_database(request, backend),
    )
    metrics_port = free_port()
    while metrics_port in (server.port, server.crl_port):
        metrics_port = free_port()
    config = server.data_dir / "estkit.toml"
    text = config.read_text().replace("\nport = 0\n", f"\nport = {metrics_port}\n")
    config.write_text(text + EXTRA_CONFIG)
    server.start()
    try:
        yield Observed(server, metrics_port)
    finally:
        server.stop()


def _labels(**labels: str) -> frozenset[tuple[str, str]]:
    return frozenset(labels.items())


def test_counters_move_by_exactly_the_requests_made_whichever_worker_served_them(
    observed: Observed, device_id: str, tmp_path: Path
) -> None:
    server = observed.server
    boot = bootstrap_device(server, device_id, tmp_path / "bootstrap")
    secret = server.cli("device", "add", f"{device_id}-basic").stdout.strip()
    held_secret = server.cli("device", "add", f"{device_id}-held").stdout.strip()
    before = observed.scrape()

    with http(server.root_pem) as client:  # Basic: ok, then pending on the approval label
        issued_cert(
            post_csr(client, server.url + "/simpleenroll", csr_der(new_key(), f"{device_id}-basic"),
                     auth=(f"{device_id}-basic", secret))
        )  # fmt: skip
        held = post_csr(
            client,
            server.url + "/held/simpleenroll",
            csr_der(new_key(), f"{device_id}-held"),
            auth=(f"{device_id}-held", held_secret),
        )
        assert held.status_code == 202, held.text
        unknown = post_csr(client, server.url + "/nope/simpleenroll", csr_der(new_key(), "x"))
        assert unknown.status_code == 404, unknown.text
        api = client.get(f"{server.origin}/api/v1/devices")
        assert api.status_code == 401, api.text
    with http(server.root_pem, boot) as client:  # mTLS: ok, a refusal, then a renewal
        key = new_key()
        operational = Identity.write(
            tmp_path / "operational",
            key,
            issued_cert(post_csr(client, server.url + "/simpleenroll", csr_der(key, device_id))),
        )
        mismatch = post_csr(client, server.url + "/simpleenroll", csr_der(new_key(), "someone"))
        assert mismatch.status_code == 403, mismatch.text
        assert mismatch.headers["estkit-refusal-code"] == "name-mismatch"
    with http(server.root_pem, operational) as client:
        issued_cert(post_csr(client, server.url + "/simplereenroll", csr_der(new_key(), device_id)))
    made = 7

    requests = "estkit_http_requests_total"
    after = observed.scrape_when(lambda s: total(s, requests) - total(before, requests) >= made)

    assert total(after, requests) - total(before, requests) == made
    assert moved(before, after, "estkit_enrollments_total") == {
        _labels(label="devices", operation="simpleenroll", outcome="ok"): 2,
        _labels(label="devices", operation="simpleenroll", outcome="refused"): 1,
        _labels(label="devices", operation="simplereenroll", outcome="ok"): 1,
        _labels(label="held", operation="simpleenroll", outcome="pending"): 1,
    }
    assert moved(before, after, "estkit_refusals_total") == {
        _labels(code="name-mismatch"): 1,
        _labels(code="approval-pending"): 1,
        _labels(code="not-found"): 1,  # the unknown label: a refusal, no enrollment series
        _labels(code="token-invalid"): 1,
    }
    assert moved(before, after, requests) == {
        _labels(method="POST", route=ENROLL, status="200"): 2,
        _labels(method="POST", route=ENROLL, status="403"): 1,
        _labels(method="POST", route=LABELED_ENROLL, status="202"): 1,
        _labels(method="POST", route=LABELED_ENROLL, status="404"): 1,
        _labels(method="POST", route="/.well-known/est/simplereenroll", status="200"): 1,
        _labels(method="GET", route="/api/v1/devices", status="401"): 1,
    }
    assert value(after, "estkit_database_errors_total") == value(
        before, "estkit_database_errors_total"
    )
    # The latency histogram of a route: every bucket, cumulative, +Inf is the count.
    route = {"method": "POST", "route": ENROLL}
    counts = [value(after, f"{HISTOGRAM}_bucket", le=le, **route) for le in BUCKETS]
    assert all(((f"{HISTOGRAM}_bucket"), _labels(le=le, **route)) in after for le in BUCKETS)
    assert counts == sorted(counts)
    assert counts[-1] == value(after, f"{HISTOGRAM}_count", **route)
    assert counts[-1] - value(before, f"{HISTOGRAM}_count", **route) == 3
    assert value(after, f"{HISTOGRAM}_sum", **route) > value(before, f"{HISTOGRAM}_sum", **route)
    assert value(after, "estkit_http_requests_in_flight") == 0


def _crl_next_update(server: EstServer, ca: str) -> dt.datetime:
    crl = x509.load_der_x509_crl((server.data_dir / "crl" / f"{ca}.crl").read_bytes())
    assert crl.next_update_utc is not None
    return crl.next_update_utc


def test_gauges_match_the_ca_certificates_the_crls_and_the_database(
    observed: Observed, device_id: str, tmp_path: Path
) -> None:
    server = observed.server
    boot = bootstrap_device(server, device_id, tmp_path / "bootstrap")
    with http(server.root_pem, boot) as client:  # one certificate valid for 2 days
        issued_cert(
            post_csr(client, server.url + "/short/simpleenroll", csr_der(new_key(), device_id))
        )
        held = post_csr(client, server.url + "/held/simpleenroll", csr_der(new_key(), device_id))
        assert held.status_code == 202, held.text
    cas = ("bootstrap", "devices", "root")
    crls = {ca: _crl_next_update(server, ca) for ca in cas}

    start = dt.datetime.now(dt.UTC)
    samples = observed.scrape()
    end = dt.datetime.now(dt.UTC)

    for ca in cas:
        not_after = load_pem_certificates((server.data_dir / "ca" / f"{ca}.pem").read_bytes())[
            0
        ].not_valid_after_utc
        left = value(samples, "estkit_ca_expiry_seconds", ca=ca)
        assert (not_after - end).total_seconds() <= left <= (not_after - start).total_seconds()
        assert crls[ca] == _crl_next_update(server, ca)  # not republished meanwhile
        left = value(samples, "estkit_crl_next_update_seconds", ca=ca)
        assert (crls[ca] - end).total_seconds() <= left <= (crls[ca] - start).total_seconds()
    assert value(samples, "estkit_certificates_expiring_7d") == 1
    assert value(samples, "estkit_pending_approvals") == 1
    # No [iothub]: nothing waits for the hub.
    assert ("estkit_iothub_outbox_backlog", frozenset()) in samples
    assert value(samples, "estkit_iothub_outbox_backlog") == 0
    info = [labels for (name, labels) in samples if name == "estkit_build_info"]
    assert len(info) == 1 and ("region", "default") in info[0]


def _hanging_request(server: EstServer) -> ssl.SSLSocket:
    """A request whose body never comes: in flight until its worker goes."""
    ctx = ssl.create_default_context(cafile=str(server.root_pem))
    tls = ctx.wrap_socket(
        socket.create_connection(("127.0.0.1", server.port), timeout=30),
        server_hostname="localhost",
    )
    basic = base64.b64encode(b"nobody:nothing").decode()
    tls.sendall(
        f"POST {ENROLL} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/pkcs10\r\n"
        f"Authorization: Basic {basic}\r\nContent-Length: 1000\r\n\r\n".encode()
    )
    return tls


def _get_cacerts(observed: Observed, times: int, *, since: Samples) -> Samples:
    """``times`` GET cacerts, and the scrape that counts them: exactly ``times`` more
    than ``since`` counted."""
    server = observed.server
    with http(server.root_pem) as client:
        for _ in range(times):
            assert client.get(server.url + "/cacerts").status_code == 200
    name = "estkit_http_requests_total"
    cacerts = {"method": "GET", "route": "/.well-known/est/cacerts", "status": "200"}
    expected = value(since, name, **cacerts) + times
    samples = observed.scrape_when(lambda s: value(s, name, **cacerts) >= expected)
    assert value(samples, name, **cacerts) == expected
    return samples


def test_counts_of_a_killed_worker_stay_and_its_requests_in_flight_go(
    observed: Observed,
) -> None:
    """uvicorn replaces a worker that died; what it counted stays in the sums (counters
    never go back), and the requests it had in flight are no longer counted
    (``mark_process_dead``)."""
    server = observed.server
    before = observed.scrape()
    counted = _get_cacerts(observed, 3, since=before)
    workers = observed.wait_for_workers(2)
    hanging = _hanging_request(server)
    try:
        busy = observed.scrape_when(lambda s: value(s, "estkit_http_requests_in_flight") == 1)
        assert value(busy, "estkit_http_requests_in_flight") == 1
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        observed.wait_for_workers(2, besides=workers)
    finally:
        hanging.close()

    after = _get_cacerts(observed, 2, since=counted)  # the dead workers' 3 are still there
    assert value(after, "estkit_http_requests_in_flight") == 0
    assert [p for pid in workers for p in observed.files.glob(f"gauge_livesum_{pid}.db")] == []
