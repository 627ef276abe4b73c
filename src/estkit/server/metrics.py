"""Prometheus metrics (``[metrics] port``): counted in every worker, served by the supervisor.

Each uvicorn worker counts its requests (``RequestMetrics``, fed by
``server/telemetry.py``) in prometheus-client's multiprocess mode: into files of its
own in this run's directory (``server/metric_files.py``). The supervising process
serves them, added up across the workers (those that died and were replaced
included), over plain HTTP on ``[metrics] host:port``, with the gauges that describe
the service rather than its requests (``ServiceGauges``), computed at scrape time.

Why a port of its own rather than ``/metrics`` on the HTTPS port behind a ``read``
token: every use of an API token is audited, so a scrape every 15 s would write an
audit entry every 15 s forever; the supervisor answers even while every worker is
busy, without a worker's help; and Prometheus needs neither a token nor the estkit
trust anchor. It binds 127.0.0.1 unless configured otherwise, and serves nothing but
counts.

prometheus-client picks its multiprocess mode when it is first imported: import this
module only after ``metric_files.prepare`` (``serve`` does; the workers inherit it).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable
from wsgiref.simple_server import WSGIServer

from cryptography import x509
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client import values as prometheus_values
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from estkit import __version__
from estkit.ca.errors import Code
from estkit.pki.certs import load_pem_certificates
from estkit.server.config import ServerConfig
from estkit.server.metric_files import MULTIPROCESS_ENV, alive, file_pids
from estkit.server.telemetry import ENROLLMENTS, OUTCOMES, Exchange
from estkit.server.wiring import installed_cas
from estkit.store import Page, PendingRequest, PendingStatus
from estkit.store.errors import StoreError

log = logging.getLogger(__name__)

# Gauges read from the database are recomputed at most this often (seconds), however
# often and by however many scrapers the metrics are read.
SCRAPE_CACHE = 10.0
EXPIRING_WITHIN = dt.timedelta(days=7)
# Pending approvals are counted up to this many (a page of the listing, not a table scan).
PENDING_LIMIT = 1000
# An enrollment takes about a millisecond; the API's lists and a Basic secret's check longer.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class RequestMetrics:
    """The request metrics of one process (``telemetry.RequestMetrics``); in multiprocess
    mode its values are the process's files, and its registry is never read."""

    def __init__(self, *, labels: Iterable[str]) -> None:
        if os.environ.get(MULTIPROCESS_ENV) and not getattr(
            prometheus_values.ValueClass, "_multiprocess", False
        ):
            raise RuntimeError(
                f"prometheus_client was imported before {MULTIPROCESS_ENV} was set: "
                "this process's counts would never reach the metrics (server/metric_files.py)"
            )
        # Its own (a process may build its app twice); read in a single process only.
        self.registry = registry = CollectorRegistry()
        self._in_flight = Gauge(
            "estkit_http_requests_in_flight",
            "HTTP requests being served",
            multiprocess_mode="livesum",
            registry=registry,
        )
        self._duration = Histogram(
            "estkit_http_request_duration_seconds",
            "Time from a request's arrival to the end of its response, by route template",
            ["method", "route"],
            buckets=BUCKETS,
            registry=registry,
        )
        self._requests = Counter(
            "estkit_http_requests",
            "HTTP requests answered, by route template and status",
            ["method", "route", "status"],
            registry=registry,
        )
        self._enrollments = Counter(
            "estkit_enrollments",
            "EST simpleenroll, simplereenroll and serverkeygen requests by label and outcome "
            "(ok: issued, pending: waiting for approval, refused: any other answer)",
            ["label", "operation", "outcome"],
            registry=registry,
        )
        self._refusals = Counter(
            "estkit_refusals",
            "Responses that carried a refusal code (Estkit-Refusal-Code), by code",
            ["code"],
            registry=registry,
        )
        self._database_errors = Counter(
            "estkit_database_errors",
            "Requests refused because the database could not take them (503 unavailable)",
            registry=registry,
        )
        # Every series a dashboard sums over exists from the start, at zero.
        for code in Code:
            self._refusals.labels(code.value)
        for label in labels:
            for operation in ENROLLMENTS:
                for outcome in OUTCOMES:
                    self._enrollments.labels(label, operation, outcome)

    def started(self) -> None:
        self._in_flight.inc()

    def finished(self, exchange: Exchange) -> None:
        self._in_flight.dec()
        self._duration.labels(exchange.method, exchange.route).observe(exchange.seconds)
        self._requests.labels(exchange.method, exchange.route, str(exchange.status)).inc()
        if exchange.refusal is not None:
            self._refusals.labels(exchange.refusal).inc()
        if exchange.database_error:
            self._database_errors.inc()
        if (enrollment := exchange.enrollment) is not None:
            self._enrollments.labels(
                enrollment.label, enrollment.operation, enrollment.outcome
            ).inc()


class MetricsStore(Protocol):
    """What the scrape-time gauges read from the store (``SqlStore`` satisfies it)."""

    def expiring_per_day(self, *, since: dt.datetime, until: dt.datetime) -> dict[dt.date, int]: ...
    def list_pending(
        self, *, status: PendingStatus | None = None, after: int | None = None, limit: int = 100
    ) -> Page[PendingRequest]: ...


@runtime_checkable
class OutboxBacklog(Protocol):
    """The IoT Hub outbox's backlog: changes the hub's registry has not taken yet.

    TODO(hub sync): ``SqlStore`` gets ``outbox_backlog()`` with the outbox (its count of
    rows not sent yet, a bounded query); until it has it, the gauge reads 0.
    """

    def outbox_backlog(self) -> int: ...


@dataclass(frozen=True, slots=True)
class _Counts:
    expiring: int
    pending: int
    outbox_backlog: int


class ServiceGauges(Collector):
    """Gauges computed when the metrics are read: CA and CRL expiry (from the files, on
    every scrape), and, from the store, certificates expiring soon, pending approvals and
    the IoT Hub outbox's backlog (at most once per ``cache_for`` seconds; left out while
    the database cannot answer)."""

    def __init__(
        self,
        *,
        cas: Mapping[str, x509.Certificate],
        crl_directory: Path,
        store: MetricsStore,
        clock: Callable[[], dt.datetime],
        node: str,
        region: str,
        cache_for: float = SCRAPE_CACHE,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._not_after = {name: cert.not_valid_after_utc for name, cert in cas.items()}
        self._crl_directory = crl_directory
        self._store = store
        self._clock = clock
        self._node = node
        self._region = region
        self._cache_for = cache_for
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._counts: tuple[float, _Counts | None] | None = None
        self._crls: dict[str, tuple[tuple[int, int], dt.datetime | None]] = {}
        self._database_down = False

    def collect(self) -> Iterator[Metric]:
        now = self._clock()
        info = GaugeMetricFamily(
            "estkit_build_info", "This node's estkit version", labels=["version", "node", "region"]
        )
        info.add_metric([__version__, self._node, self._region], 1)
        yield info
        expiry = GaugeMetricFamily(
            "estkit_ca_expiry_seconds",
            "Seconds until each CA certificate's notAfter (negative: expired)",
            labels=["ca"],
        )
        for name, not_after in sorted(self._not_after.items()):
            expiry.add_metric([name], (not_after - now).total_seconds())
        yield expiry
        crl = GaugeMetricFamily(
            "estkit_crl_next_update_seconds",
            "Seconds until the nextUpdate of each CA's CRL as this node serves it",
            labels=["ca"],
        )
        with self._lock:
            for name, next_update in self._next_updates():
                crl.add_metric([name], (next_update - now).total_seconds())
            counts = self._cached_counts(now)
        yield crl
        if counts is None:
            return
        yield GaugeMetricFamily(
            "estkit_certificates_expiring_7d",
            "Valid certificates whose notAfter is within the next 7 days",
            value=counts.expiring,
        )
        yield GaugeMetricFamily(
            "estkit_pending_approvals",
            f"Requests waiting for an operator's approval (counted up to {PENDING_LIMIT})",
            value=counts.pending,
        )
        yield GaugeMetricFamily(
            "estkit_iothub_outbox_backlog",
            "IoT Hub registry changes not yet taken by the hub",
            value=counts.outbox_backlog,
        )

    def _next_updates(self) -> Iterator[tuple[str, dt.datetime]]:
        """Each CA's CRL file's nextUpdate, parsed again only when the file changed."""
        for name in sorted(self._not_after):
            path = self._crl_directory / f"{name}.crl"
            try:
                stat = path.stat()
            except OSError:
                continue
            seen = (stat.st_mtime_ns, stat.st_size)
            known = self._crls.get(name)
            if known is None or known[0] != seen:
                known = self._crls[name] = (seen, _next_update(path))
            if known[1] is not None:
                yield name, known[1]

    def _cached_counts(self, now: dt.datetime) -> _Counts | None:
        tick = self._monotonic()
        if self._counts is not None and tick - self._counts[0] < self._cache_for:
            return self._counts[1]
        try:
            counts: _Counts | None = self._read_counts(now)
        except StoreError as exc:
            if not self._database_down:
                log.warning("metrics: the database cannot answer (%s); its gauges left out", exc)
            self._database_down = True
            counts = None
        else:
            self._database_down = False
        self._counts = (tick, counts)
        return counts

    def _read_counts(self, now: dt.datetime) -> _Counts:
        expiring = self._store.expiring_per_day(since=now, until=now + EXPIRING_WITHIN)
        pending = self._store.list_pending(status=PendingStatus.PENDING, limit=PENDING_LIMIT)
        store = self._store
        return _Counts(
            expiring=sum(expiring.values()),
            pending=len(pending.items),
            outbox_backlog=store.outbox_backlog() if isinstance(store, OutboxBacklog) else 0,
        )


def _next_update(path: Path) -> dt.datetime | None:
    try:
        data = path.read_bytes()
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_crl(data).next_update_utc
        return x509.load_der_x509_crl(data).next_update_utc
    except (OSError, ValueError):
        return None


class WorkerFiles(Collector):
    """The workers' counts, added up from their files; the live gauges of workers that
    are gone (``mark_process_dead``) are dropped first, so that a replaced worker's
    requests in flight are not counted forever."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._files = MultiProcessCollector(None, path=str(directory))  # type: ignore[no-untyped-call]
        self._lock = threading.Lock()
        self._dead: set[int] = set()

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            for pid in file_pids(self._directory) - self._dead:
                if pid != os.getpid() and not alive(pid):
                    mark_process_dead(pid, path=str(self._directory))  # type: ignore[no-untyped-call]
                    self._dead.add(pid)
        return self._files.collect()  # type: ignore[no-untyped-call,no-any-return]


def start_metrics(
    config: ServerConfig,
    *,
    directory: Path,
    store: MetricsStore,
    clock: Callable[[], dt.datetime],
) -> WSGIServer:
    """Serve the metrics of the workers whose files are in ``directory``, and the service's
    gauges, on ``[metrics] host:port`` (plain HTTP; any path, ``/metrics`` by convention)
    from a daemon thread; ``OSError`` when it cannot listen."""
    cas = {
        name: load_pem_certificates(ca.cert.read_bytes())[0]
        for name, ca in installed_cas(config).items()
    }
    registry = CollectorRegistry()
    registry.register(WorkerFiles(directory))
    registry.register(
        ServiceGauges(
            cas=cas,
            crl_directory=config.crl.directory,
            store=store,
            clock=clock,
            node=config.node.name,
            region=config.node.region,
        )
    )
    server, _ = start_http_server(config.metrics.port, addr=config.metrics.host, registry=registry)
    return server
