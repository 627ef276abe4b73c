"""``make bench``: start an estkit server, load it, print a table, write bench/results/<time>.json.

Scenarios: ``cacerts`` (plain TLS), ``simpleenroll`` (bootstrap certificate,
mTLS), ``simplereenroll`` (operational certificate, mTLS) and ``serverkeygen``
(bootstrap certificate, mTLS, the server makes a P-256 key) at each
concurrency, with each number of server workers; then the same enrollment
run with ``--scale`` certificates already stored and the operator queries at
that size; OCSP responses per second per core from the cache; a soak run that
watches the server's RSS across many handshakes;
the device agent's idle cost. With PostgreSQL installed, the same enrollment on
one and two nodes sharing a PostgreSQL database next to SQLite, and the scale
run again on PostgreSQL. With SoftHSM2 installed, enrollment on a server whose CA keys
are in a PKCS#11 token next to the file-key server. Every run is bounded by a request
count and by time.
See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import ssl
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import fleet, hsm, loadgen, ocsp, postgres
from bench.procstat import RssSampler, Snapshot, cpu_seconds, tree

RESULTS = Path(__file__).parent / "results"
OPERATIONS = ("cacerts", "simpleenroll", "simplereenroll", "serverkeygen")
# The steps after ``setup``, in the order they run (``--only`` picks some).
STEPS = ("matrix", "ocsp", "postgresql", "hsm", "soak", "scale", "agent")
# What the SoftHSM2 step compares: the enrollments that sign a certificate.
HSM_OPERATIONS = ("simpleenroll", "simplereenroll")
MB = 1024 * 1024
# The interleaved comparisons' alternating slices per side (see ``measure_interleaved``).
ROUNDS = 6
# A virtualenv with estkit and its device dependencies only (``make bench`` makes it).
DEVICE_PYTHON = Path(__file__).resolve().parent / ".device-venv" / "bin" / "python"
# Issue 12's targets for PostgreSQL.
PG_CPU_RATIO_MAX = 1.5  # CPU per enrollment, estkit + PostgreSQL, over SQLite's
TWO_NODES_SPEEDUP_MIN = 1.7  # two nodes' throughput over one node's ...
TWO_NODES_CORES = 4  # ... on a machine with the cores for two busy nodes, PostgreSQL and the load
SCALE_CHANGE_MAX = 10.0  # per cent of throughput, 1M certificates against the baseline
QUERY_MS_MAX = 50.0


def _loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def wait_for_quiet(threshold: float, max_wait: float) -> tuple[float, bool]:
    """Poll the 1-minute load average until it is under ``threshold`` (at most ``max_wait`` s)."""
    deadline = time.monotonic() + max_wait
    load = _loadavg()
    while load >= threshold and time.monotonic() < deadline:
        print(f"  waiting for a quiet machine: 1-min load {load:.2f} >= {threshold}", flush=True)
        time.sleep(min(15.0, max(0.0, deadline - time.monotonic())))
        load = _loadavg()
    return load, load < threshold


# -- one measured scenario -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Row:
    scenario: str
    database: str  # "sqlite" or "postgresql"
    operation: str
    workers: int  # per node
    nodes: int
    concurrency: int
    store_rows: int
    requests: int  # successful
    errors: int
    error_kinds: dict[str, int]
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    server_cpu_ms: float  # per successful request: estkit's, and PostgreSQL's if it is used
    server_cpu_util: float  # server CPU seconds per wall second (1.0 = one core)
    db_cpu_ms: float  # PostgreSQL's part of server_cpu_ms (0 on SQLite: it is in estkit's)
    client_cpu_ms: float  # per successful request
    client_cpu_util: float
    rss_before_mb: float
    rss_peak_mb: float
    rss_after_mb: float
    other_cpu_util: float  # CPU used by neither server nor load generator (others' jobs)
    load_before: float


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass(frozen=True, slots=True)
class Serving:
    """What answers the load: one or more estkit nodes, and PostgreSQL's processes."""

    nodes: tuple[fleet.Server, ...]
    database_pid: int | None = None  # the postmaster; None: SQLite, inside estkit's processes

    @classmethod
    def of(cls, target: fleet.Server | Serving) -> Serving:
        return target if isinstance(target, Serving) else cls((target,))

    @property
    def workers(self) -> int:
        return self.nodes[0].workers

    @property
    def database(self) -> str:
        return "sqlite" if self.database_pid is None else "postgresql"

    @property
    def roots(self) -> tuple[int, ...]:
        return tuple(node.pid for node in self.nodes)

    def database_cpu(self) -> float:
        """CPU seconds of the postmaster and its backends so far (0 without PostgreSQL)."""
        return 0.0 if self.database_pid is None else cpu_seconds(tree(self.database_pid))


@dataclass(slots=True)
class Tally:
    """One or more load slices on one server, added up into one ``Row``."""

    load_before: float
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    wall: float = 0.0
    client_cpu: float = 0.0
    server_cpu: float = 0.0  # estkit's processes
    db_cpu: float = 0.0  # PostgreSQL's
    machine_busy: float = 0.0
    rss_before: int | None = None
    rss_peak: int = 0
    rss_after: int = 0

    def add(
        self,
        target: fleet.Server | Serving,
        plan: loadgen.Plan,
        rss_trace: list[tuple[float, int]] | None = None,
    ) -> None:
        serving = Serving.of(target)
        marks: dict[str, tuple[Snapshot, float]] = {}

        def mark() -> tuple[Snapshot, float]:
            return Snapshot.of(*serving.roots), serving.database_cpu()

        # RSS is estkit's only: PostgreSQL's shared buffers would count once per backend.
        with RssSampler(*serving.roots) as sampler:
            result = loadgen.run(plan, on_start=lambda: marks.setdefault("start", mark()))
            end, db_end = mark()
        time.sleep(0.5)  # let the server settle before "after"
        after = Snapshot.of(*serving.roots)
        start, db_start = marks["start"]
        if rss_trace is not None:
            rss_trace.extend(sampler.samples)
        for kind, sample in result.error_samples.items():
            print(f"    error {kind}: {sample}", flush=True)
        self.ok += result.ok
        self.errors.update(result.errors)
        self.latencies += result.latencies
        self.wall += result.wall
        self.client_cpu += result.client_cpu
        self.server_cpu += end.cpu - start.cpu
        self.db_cpu += db_end - db_start
        self.machine_busy += end.machine - start.machine
        if self.rss_before is None:
            self.rss_before = start.rss
        self.rss_peak = max(self.rss_peak, sampler.peak, start.rss, end.rss)
        self.rss_after = after.rss

    def row(
        self,
        *,
        scenario: str,
        server: fleet.Server | Serving,
        plan: loadgen.Plan,
        store_rows: int,
    ) -> Row:
        serving = Serving.of(server)
        ok = max(self.ok, 1)
        wall = max(self.wall, 1e-9)
        total_cpu = self.server_cpu + self.db_cpu
        return Row(
            scenario=scenario,
            database=serving.database,
            operation=plan.operation,
            workers=serving.workers,
            nodes=len(serving.nodes),
            concurrency=plan.concurrency,
            store_rows=store_rows,
            requests=self.ok,
            errors=sum(self.errors.values()),
            error_kinds=dict(self.errors),
            seconds=round(self.wall, 3),
            rps=round(self.ok / wall, 1),
            p50_ms=round(_percentile(self.latencies, 0.50) * 1000, 1),
            p99_ms=round(_percentile(self.latencies, 0.99) * 1000, 1),
            server_cpu_ms=round(total_cpu * 1000 / ok, 3),
            server_cpu_util=round(total_cpu / wall, 2),
            db_cpu_ms=round(self.db_cpu * 1000 / ok, 3),
            client_cpu_ms=round(self.client_cpu * 1000 / ok, 3),
            client_cpu_util=round(self.client_cpu / wall, 2),
            rss_before_mb=round((self.rss_before or 0) / MB, 1),
            rss_peak_mb=round(self.rss_peak / MB, 1),
            rss_after_mb=round(self.rss_after / MB, 1),
            other_cpu_util=round(
                max(0.0, self.machine_busy - total_cpu - self.client_cpu) / wall, 2
            ),
            load_before=self.load_before,
        )


def measure(
    server: fleet.Server | Serving,
    plan: loadgen.Plan,
    *,
    scenario: str,
    store_rows: int,
    rss_trace: list[tuple[float, int]] | None = None,
) -> Row:
    tally = Tally(load_before=_loadavg())
    tally.add(server, plan, rss_trace)
    return tally.row(scenario=scenario, server=server, plan=plan, store_rows=store_rows)


@dataclass(frozen=True, slots=True)
class Arm:
    """One side of an interleaved comparison."""

    scenario: str
    server: fleet.Server | Serving
    plan: loadgen.Plan
    store_rows: int


def measure_interleaved(arms: Sequence[Arm], *, rounds: int) -> list[Row]:
    """The arms in ``rounds`` slices, in turn and back (A B C, C B A, A B C, ...), each
    slice a ``rounds``-th of its plan's requests and time.

    Two runs one after the other differ by the machine's drift as much as by what
    is compared (this VM's speed moves by 20-30 % within minutes); slices taken
    turn about see the same machine.
    """
    load = _loadavg()
    tallies = [Tally(load_before=load) for _ in arms]
    order = list(range(len(arms)))
    for i in range(rounds):
        for side in order if i % 2 == 0 else order[::-1]:
            arm = arms[side]
            plan = replace(
                arm.plan,
                requests=max(1, arm.plan.requests // rounds),
                seconds=arm.plan.seconds / rounds,
            )
            tallies[side].add(arm.server, plan)
    return [
        t.row(scenario=a.scenario, server=a.server, plan=a.plan, store_rows=a.store_rows)
        for t, a in zip(tallies, arms, strict=True)
    ]


HEADER = (
    f"{'scenario':<16}{'db':<7}{'op':<15}{'w':>2}{'n':>2}{'c':>4}{'stored':>9}{'ok':>7}"
    f"{'err':>5}{'req/s':>8}{'p50ms':>8}{'p99ms':>8}{'srvCPUms':>9}{'srvCPU':>7}{'dbCPUms':>8}"
    f"{'cliCPUms':>9}{'cliCPU':>7}{'RSS MB before/peak/after':>26}{'other':>6}"
)


def format_row(r: Row) -> str:
    rss = f"{r.rss_before_mb:.0f}/{r.rss_peak_mb:.0f}/{r.rss_after_mb:.0f}"
    db = "pg" if r.database == "postgresql" else r.database
    db_cpu = f"{r.db_cpu_ms:>8.2f}" if r.database == "postgresql" else f"{'-':>8}"
    return (
        f"{r.scenario:<16}{db:<7}{r.operation:<15}{r.workers:>2}{r.nodes:>2}{r.concurrency:>4}"
        f"{r.store_rows:>9}{r.requests:>7}{r.errors:>5}{r.rps:>8.1f}{r.p50_ms:>8.1f}"
        f"{r.p99_ms:>8.1f}{r.server_cpu_ms:>9.2f}{r.server_cpu_util:>7.2f}{db_cpu}"
        f"{r.client_cpu_ms:>9.2f}{r.client_cpu_util:>7.2f}{rss:>26}{r.other_cpu_util:>6.2f}"
    )


# -- the whole benchmark ---------------------------------------------------------------


def machine() -> dict[str, Any]:
    from cryptography.hazmat.backends.openssl.backend import backend

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    versions: dict[str, str | None] = {}
    for dist in (
        "estkit",
        "cryptography",
        "uvicorn",
        "httptools",
        "pyopenssl",
        "fastapi",
        "starlette",
        "sqlalchemy",
        "psycopg",
        "python-pkcs11",
    ):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "openssl_python_ssl": ssl.OPENSSL_VERSION,
        "openssl_cryptography": backend.openssl_version_text(),
        "sqlite": __import__("sqlite3").sqlite_version,
        "memory_mb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // MB,
        "packages": versions,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--operations", nargs="+", default=list(OPERATIONS), choices=OPERATIONS)
    p.add_argument("--concurrency", nargs="+", type=int, default=[8, 32])
    p.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    p.add_argument("--requests", type=int, default=3000, help="per scenario (default 3000)")
    p.add_argument("--seconds", type=float, default=20.0, help="per scenario (default 20)")
    p.add_argument("--devices", type=int, default=256, help="simulated devices (default 256)")
    p.add_argument(
        "--processes", type=int, default=0, help="load-generator processes (default: nproc, ≤ c)"
    )
    p.add_argument(
        "--scale",
        type=int,
        default=1_000_000,
        help="certificates stored for the scale run; 0 skips it (default 1,000,000)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=ROUNDS,
        help="slices per side of the interleaved comparisons (scale, backends, signers; "
        f"default {ROUNDS})",
    )
    p.add_argument(
        "--soak", type=int, default=20_000, help="handshakes in the RSS soak run; 0 skips it"
    )
    p.add_argument("--soak-seconds", type=float, default=150.0, help="time bound of the soak")
    p.add_argument(
        "--soak-operation",
        default="health",
        choices=sorted(loadgen.PATHS),
        help="health: mTLS handshake + /health/certificate (default)",
    )
    p.add_argument("--no-agent", action="store_true", help="skip the device agent measurement")
    p.add_argument(
        "--postgresql",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="simpleenroll on 1 and 2 nodes on PostgreSQL next to SQLite, and the scale run on "
        "PostgreSQL (default: when PostgreSQL is installed)",
    )
    p.add_argument(
        "--hsm",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="simpleenroll and simplereenroll on a server whose CA keys are in a SoftHSM2 "
        "token next to the file-key server (default: when softhsm2 and python-pkcs11 are "
        "installed)",
    )
    p.add_argument(
        "--ocsp",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="OCSP responses per second per core from the cache, over keep-alive connections "
        "to the plain-HTTP listener (default: on)",
    )
    p.add_argument(
        "--only",
        nargs="+",
        choices=STEPS,
        default=None,
        help="run setup and these steps only (default: all; each step's own switches still "
        "apply), e.g. --only hsm",
    )
    p.add_argument("--tls-max", default="1.3", choices=["1.2", "1.3"])
    p.add_argument("--no-verify-server", action="store_true", help="client skips server checks")
    p.add_argument("--quiet-load", type=float, default=0.5, help="1-min load to wait for")
    p.add_argument(
        "--quiet-wait", type=float, default=60.0, help="wait at most this long for it (s)"
    )
    p.add_argument(
        "--server-python",
        default=sys.executable,
        help="interpreter that runs the server (another environment to compare)",
    )
    p.add_argument(
        "--agent-python",
        default=str(DEVICE_PYTHON) if DEVICE_PYTHON.exists() else sys.executable,
        help="interpreter that runs the agent (default: bench/.device-venv, estkit's device "
        "dependencies only, made by `make bench`; else this one)",
    )
    p.add_argument("--keep", action="store_true", help="keep the server data directory")
    p.add_argument("--output", type=Path, default=None, help="JSON path (default bench/results/)")
    args = p.parse_args(argv)
    if min(args.concurrency) < 1 or min(args.workers) < 1 or args.rounds < 1:
        p.error("concurrency, workers and rounds must be at least 1")
    if args.postgresql and not postgres.installed():
        p.error(f"--postgresql: PostgreSQL is not installed ({postgres.INSTALL_HINT})")
    if args.hsm and (lacking := hsm.missing()):
        p.error(f"--hsm: SoftHSM2 is not installed ({lacking})")
    return args


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.data_dir = work / "server"
        self.port = fleet.free_port()
        self.rows: list[Row] = []
        self.report: dict[str, Any] = {}
        self.pool: fleet.Pool | None = None

    def server(self, workers: int) -> fleet.Server:
        return fleet.Server(
            self.data_dir,
            port=self.port,
            workers=workers,
            log=self.work / "server.log",
            python=self.args.server_python,
        )

    def plan(
        self,
        operation: str,
        concurrency: int,
        requests: int,
        seconds: float,
        *,
        server: fleet.Server | None = None,
        pool: fleet.Pool | None = None,
    ) -> loadgen.Plan:
        """``operation`` on ``server`` by ``pool``'s devices (default: this bench's own)."""
        pool = pool or self.pool
        assert pool is not None
        port, data_dir = (server.port, server.data_dir) if server else (self.port, self.data_dir)
        procs = self.args.processes or os.cpu_count() or 1
        return loadgen.Plan(
            port=port,
            operation=operation,
            ca_file=str(data_dir / "ca" / "root.pem"),
            devices=pool.devices_for(operation),
            concurrency=concurrency,
            processes=max(1, min(procs, concurrency)),
            requests=requests,
            seconds=seconds,
            verify_server=not self.args.no_verify_server,
            tls_max=self.args.tls_max,
        )

    def record(self, row: Row) -> None:
        self.rows.append(row)
        print(format_row(row), flush=True)

    def setup(self) -> None:
        t0 = time.monotonic()
        fleet.init_server(self.data_dir, port=self.port, crl_port=fleet.free_port())
        fleet.enable_serverkeygen(self.data_dir)
        self.pool = fleet.make_pool(self.data_dir, self.work / "devices", self.args.devices)
        print(
            f"setup: server data and {self.args.devices} devices (bootstrap + operational "
            f"certificates) in {time.monotonic() - t0:.1f} s",
            flush=True,
        )

    def matrix(self) -> None:
        a = self.args
        print(HEADER, flush=True)
        for workers in a.workers:
            with self.server(workers) as server:
                for operation in a.operations:
                    for c in a.concurrency:
                        plan = self.plan(operation, c, a.requests, a.seconds)
                        self.record(measure(server, plan, scenario="empty store", store_rows=0))
        self.serverkeygen_summary()

    def serverkeygen_summary(self) -> None:
        """Server CPU per request of serverkeygen next to simpleenroll's, per (w, c)."""
        rows = {(r.operation, r.workers, r.concurrency): r for r in self.rows}
        pairs = []
        for (operation, workers, c), keygen in rows.items():
            enroll = rows.get(("simpleenroll", workers, c))
            if operation != "serverkeygen" or enroll is None:
                continue
            pairs.append(
                {
                    "workers": workers,
                    "concurrency": c,
                    "simpleenroll_server_cpu_ms": enroll.server_cpu_ms,
                    "serverkeygen_server_cpu_ms": keygen.server_cpu_ms,
                    "difference_ms": round(keygen.server_cpu_ms - enroll.server_cpu_ms, 3),
                }
            )
            print(
                f"serverkeygen vs simpleenroll (w={workers}, c={c}): server CPU "
                f"{keygen.server_cpu_ms:.2f} vs {enroll.server_cpu_ms:.2f} ms per request "
                f"({keygen.server_cpu_ms - enroll.server_cpu_ms:+.2f} ms)",
                flush=True,
            )
        if pairs:
            self.report["serverkeygen"] = pairs

    def soak(self) -> None:
        """RSS across many handshakes on one server: growth after warm-up (the first 10 %)."""
        a = self.args
        n = a.soak
        trace: list[tuple[float, int]] = []
        workers = max(a.workers)
        with self.server(workers) as server:
            plan = self.plan(a.soak_operation, max(a.concurrency), n, seconds=a.soak_seconds)
            row = measure(server, plan, scenario="soak", store_rows=0, rss_trace=trace)
            self.record(row)
        if len(trace) >= 10:
            warm = trace[len(trace) // 10][1]
            final = statistics.median(r for _, r in trace[-5:])
            growth = (final - warm) / warm * 100
            self.report["soak"] = {
                "operation": a.soak_operation,
                "workers": workers,
                "handshakes": row.requests,
                "rss_after_warmup_mb": round(warm / MB, 1),
                "rss_end_mb": round(final / MB, 1),
                "growth_percent": round(growth, 1),
                "trace_mb": [
                    (round(t, 1), round(r / MB, 1)) for t, r in trace[:: max(1, len(trace) // 60)]
                ],
            }
            print(
                f"soak: RSS {warm / MB:.1f} MB after warm-up -> {final / MB:.1f} MB after "
                f"{row.requests} handshakes ({growth:+.1f} %)",
                flush=True,
            )

    def scale(self) -> None:
        """Enrollment with ``--scale`` certificates stored, against a copy of the store
        without them, in interleaved slices; then the operator queries at that size."""
        a = self.args
        db_file = self.data_dir / "estkit.db"
        # The baseline: this server's data as it is now (its CAs, the pool's devices and
        # the matrix's enrollments), on its own ports.
        baseline_dir = self.work / "server-baseline"
        shutil.copytree(self.data_dir, baseline_dir)
        fleet.set_crl_port(baseline_dir, fleet.free_port())
        baseline_rows = fleet.count_certificates(baseline_dir / "estkit.db")
        print(f"scale: writing {a.scale:,} certificates into {db_file} ...", flush=True)
        fill = fleet.fill_store(db_file, a.scale, now=dt.datetime.now(dt.UTC))
        print(
            f"scale: {fill.rows:,} certificates of {fill.devices:,} devices written in "
            f"{fill.seconds:.1f} s (database {fill.db_bytes / MB:.0f} MB; the der column "
            f"holds a {len(fleet.PLACEHOLDER_DER)}-byte placeholder in bulk rows)",
            flush=True,
        )
        stored = fleet.count_certificates(db_file)
        url = f"sqlite:///{db_file}"
        sample_device = fleet.fleet_device_id(min(42, fill.devices - 1))
        queries = fleet.store_queries(url, sample_device)
        token = fleet.estkit(
            "token", "create", "--data-dir", self.data_dir, "--name", "bench", "--scope", "read"
        ).split()[-1]
        rounds = a.rounds
        print(
            f"scale: simpleenroll on {baseline_rows:,} vs {stored:,} stored certificates, "
            f"{rounds} interleaved slices each",
            flush=True,
        )
        print(HEADER, flush=True)
        workers = max(a.workers)
        concurrency = max(a.concurrency)
        baseline_server = fleet.Server(
            baseline_dir,
            port=fleet.free_port(),
            workers=workers,
            log=self.work / "server-baseline.log",
            python=a.server_python,
        )
        with self.server(workers) as server, baseline_server as baseline:
            plan = self.plan("simpleenroll", concurrency, a.requests, a.seconds)
            base, scaled = measure_interleaved(
                [
                    Arm(
                        "scale baseline", baseline, replace(plan, port=baseline.port), baseline_rows
                    ),
                    Arm("scale", server, plan, stored),
                ],
                rounds=rounds,
            )
            self.record(base)
            self.record(scaled)
            queries += fleet.rest_queries(server, token, sample_device)
        _print_queries(queries)
        change = (scaled.rps - base.rps) / base.rps * 100 if base.rps else float("nan")
        print(
            f"scale: throughput {scaled.rps:.1f} vs {base.rps:.1f} req/s ({change:+.1f} %), "
            f"server CPU {scaled.server_cpu_ms:.2f} vs {base.server_cpu_ms:.2f} ms per enrollment",
            flush=True,
        )
        self.report["scale"] = {
            "fill": asdict(fill),
            "placeholder_der_bytes": len(fleet.PLACEHOLDER_DER),
            "queries": [asdict(q) for q in queries],
            "interleaved_rounds": rounds,
            "baseline_rows": baseline_rows,
            "enroll_rps_baseline": base.rps,
            "enroll_rps_scaled": scaled.rps,
            "throughput_change_percent": round(change, 1),
        }

    def postgresql(self) -> None:
        """The PostgreSQL rows: ``pg_compare``, then ``pg_scale``, on a throwaway cluster
        that lives for these steps only (its idle processes stay out of the others)."""
        t0 = time.monotonic()
        report: dict[str, Any] = {"settings": postgres.DURABLE}
        self.report["postgresql"] = report
        with postgres.durable_cluster() as cluster, cluster.database() as database_url:
            report["server_version"] = postgres.server_version(database_url)
            print(
                f"postgresql: {report['server_version']} on 127.0.0.1:{cluster.port}, "
                f"{', '.join(f'{k}={v}' for k, v in postgres.DURABLE.items())} (as durable as "
                f"SQLite's synchronous=FULL), started in {time.monotonic() - t0:.1f} s",
                flush=True,
            )
            node = self.pg_compare(cluster, database_url)
            if self.args.scale:
                self.pg_scale(cluster, database_url, node)
            else:
                print("scale (postgresql): skipped (--scale 0)", flush=True)
        report["seconds"] = round(time.monotonic() - t0, 1)

    def pg_compare(self, cluster: postgres.Cluster, database_url: str) -> Path:
        """simpleenroll at the highest concurrency on one SQLite node, one PostgreSQL node
        and two PostgreSQL nodes (1 worker each), in interleaved slices. The PostgreSQL
        database starts as a copy of the SQLite store (same CAs, devices, certificates);
        the second node is made with ``server init --join`` and takes every other
        connection. Returns the first node's data directory."""
        a = self.args
        t0 = time.monotonic()
        copied = postgres.copy_store(f"sqlite:///{self.data_dir / 'estkit.db'}", database_url)
        dir_a, dir_b = self.work / "pg-node-a", self.work / "pg-node-b"
        port_a, port_b = fleet.free_port(), fleet.free_port()
        postgres.init_node(
            dir_a,
            source=self.data_dir,
            database_url=database_url,
            port=port_a,
            crl_port=fleet.free_port(),
        )
        postgres.join_node(
            dir_b, joined=dir_a, region="bench-b", port=port_b, crl_port=fleet.free_port()
        )
        print(
            f"postgresql: the SQLite store copied ({copied:,} rows) and two nodes made "
            f"in {time.monotonic() - t0:.1f} s",
            flush=True,
        )
        concurrency = max(a.concurrency)
        sqlite_rows = fleet.count_certificates(self.data_dir / "estkit.db")
        pg_rows = postgres.count_certificates(database_url)
        pid = postgres.postmaster_pid(cluster)
        node_a, node_b = (
            fleet.Server(
                d, port=port, workers=1, log=self.work / f"{d.name}.log", python=a.server_python
            )
            for d, port in ((dir_a, port_a), (dir_b, port_b))
        )
        print(
            f"postgresql: simpleenroll c={concurrency} on SQLite, 1 node and 2 nodes on "
            f"PostgreSQL (1 worker each; the CPU columns count PostgreSQL's processes), "
            f"{a.rounds} interleaved slices each",
            flush=True,
        )
        print(HEADER, flush=True)
        with self.server(1) as sqlite, node_a, node_b:
            plan = self.plan("simpleenroll", concurrency, a.requests, a.seconds)
            rows = measure_interleaved(
                [
                    Arm("backends", sqlite, plan, sqlite_rows),
                    Arm("backends", Serving((node_a,), pid), replace(plan, port=port_a), pg_rows),
                    Arm(
                        "backends",
                        Serving((node_a, node_b), pid),
                        replace(plan, port=port_a, spread_to=(port_b,)),
                        pg_rows,
                    ),
                ],
                rounds=a.rounds,
            )
        for row in rows:
            self.record(row)
        self.report["postgresql"]["compare"] = self.pg_compare_summary(*rows)
        return dir_a

    def pg_compare_summary(self, sqlite: Row, one: Row, two: Row) -> dict[str, Any]:
        """Issue 12's targets for the ``backends`` rows, printed and as a report."""
        cpu_ratio = one.server_cpu_ms / sqlite.server_cpu_ms if sqlite.server_cpu_ms else 0.0
        matrix = next(
            (
                r
                for r in self.rows
                if (r.scenario, r.operation, r.workers, r.concurrency)
                == ("empty store", "simpleenroll", 1, one.concurrency)
            ),
            None,
        )
        print(
            f"postgresql: CPU per enrollment {one.server_cpu_ms:.2f} ms (estkit "
            f"{one.server_cpu_ms - one.db_cpu_ms:.2f} + PostgreSQL {one.db_cpu_ms:.2f}) = "
            f"{cpu_ratio:.2f}x SQLite's {sqlite.server_cpu_ms:.2f} ms in the same slices "
            f"(target <= {PG_CPU_RATIO_MAX}x: {_verdict(cpu_ratio <= PG_CPU_RATIO_MAX)})"
            + (
                f"; the matrix's SQLite row (w=1, c={matrix.concurrency}, measured earlier): "
                f"{matrix.server_cpu_ms:.2f} ms"
                if matrix
                else ""
            ),
            flush=True,
        )
        nproc = os.cpu_count() or 1
        speedup = two.rps / one.rps if one.rps else 0.0
        cpu_per_request = two.server_cpu_ms / one.server_cpu_ms if one.server_cpu_ms else 0.0
        cores_enough = nproc >= TWO_NODES_CORES
        if cores_enough:
            print(
                f"postgresql: 2 nodes {two.rps:.1f} vs 1 node {one.rps:.1f} req/s = "
                f"{speedup:.2f}x (target >= {TWO_NODES_SPEEDUP_MIN}x: "
                f"{_verdict(speedup >= TWO_NODES_SPEEDUP_MIN)}); CPU per request "
                f"{two.server_cpu_ms:.2f} vs {one.server_cpu_ms:.2f} ms",
                flush=True,
            )
        else:
            print(
                f"postgresql: 2 nodes on {nproc} cores: CPU per request "
                f"{two.server_cpu_ms:.2f} vs {one.server_cpu_ms:.2f} ms for 1 node "
                f"({cpu_per_request:.2f}x); the throughput ({two.rps:.1f} vs {one.rps:.1f} "
                f"req/s, {speedup:.2f}x) is bounded by the cores here: the >= "
                f"{TWO_NODES_SPEEDUP_MIN}x target needs >= {TWO_NODES_CORES}",
                flush=True,
            )
        return {
            "concurrency": one.concurrency,
            "sqlite_server_cpu_ms": sqlite.server_cpu_ms,
            "postgresql_server_cpu_ms": one.server_cpu_ms,
            "postgresql_db_cpu_ms": one.db_cpu_ms,
            "cpu_ratio": round(cpu_ratio, 3),
            "cpu_ratio_target": PG_CPU_RATIO_MAX,
            "cpu_ratio_met": cpu_ratio <= PG_CPU_RATIO_MAX,
            "matrix_sqlite_server_cpu_ms": matrix.server_cpu_ms if matrix else None,
            "two_nodes_rps": two.rps,
            "one_node_rps": one.rps,
            "two_nodes_speedup": round(speedup, 3),
            "two_nodes_cpu_per_request_ratio": round(cpu_per_request, 3),
            "nproc": nproc,
            # On fewer cores the speedup says how many cores there are, not how the
            # nodes share the database: the CPU per request is what is reported.
            "speedup_target": TWO_NODES_SPEEDUP_MIN if cores_enough else None,
            "speedup_met": speedup >= TWO_NODES_SPEEDUP_MIN if cores_enough else None,
        }

    def pg_scale(self, cluster: postgres.Cluster, base_url: str, node: Path) -> None:
        """The scale run on PostgreSQL: the ``pg_compare`` database as the baseline, and
        a copy of it with ``--scale`` certificates added by COPY, served by two servers
        at once (node ``node``'s data directory, and a copy of it on the filled
        database), in interleaved slices; then the operator queries at that size."""
        a = self.args
        scaled_url = postgres.clone_database(cluster, source_url=base_url, name="estkit_scaled")
        print(f"scale (postgresql): writing {a.scale:,} certificates with COPY ...", flush=True)
        fill = postgres.fill(
            scaled_url,
            a.scale,
            now=dt.datetime.now(dt.UTC),
            progress=lambda n: print(f"  {n:,} rows", flush=True),
        )
        postgres.analyze(base_url)
        print(
            f"scale (postgresql): {fill.rows:,} certificates of {fill.devices:,} devices "
            f"written, indexed and analyzed in {fill.seconds:.1f} s (database "
            f"{fill.db_bytes / MB:.0f} MB)",
            flush=True,
        )
        scaled_dir = self.work / "pg-scaled"
        postgres.repoint_node(
            scaled_dir,
            source=node,
            database_url=scaled_url,
            port=fleet.free_port(),
            crl_port=fleet.free_port(),
        )
        baseline_rows = postgres.count_certificates(base_url)
        stored = postgres.count_certificates(scaled_url)
        sample_device = fleet.fleet_device_id(min(42, fill.devices - 1))
        queries = fleet.store_queries(scaled_url, sample_device)
        token = fleet.estkit(
            "token", "create", "--data-dir", scaled_dir, "--name", "bench-pg", "--scope", "read"
        ).split()[-1]
        print(
            f"scale (postgresql): simpleenroll on {baseline_rows:,} vs {stored:,} stored "
            f"certificates, {a.rounds} interleaved slices each",
            flush=True,
        )
        print(HEADER, flush=True)
        workers, concurrency = max(a.workers), max(a.concurrency)
        pid = postgres.postmaster_pid(cluster)
        baseline_server, scaled_server = (
            fleet.Server(
                d,
                port=fleet.free_port(),
                workers=workers,
                log=self.work / f"{d.name}-scale.log",
                python=a.server_python,
            )
            for d in (node, scaled_dir)
        )
        with baseline_server as baseline, scaled_server as server:
            plan = self.plan("simpleenroll", concurrency, a.requests, a.seconds)
            base, scaled = measure_interleaved(
                [
                    Arm(
                        "scale baseline",
                        Serving((baseline,), pid),
                        replace(plan, port=baseline.port),
                        baseline_rows,
                    ),
                    Arm("scale", Serving((server,), pid), replace(plan, port=server.port), stored),
                ],
                rounds=a.rounds,
            )
            self.record(base)
            self.record(scaled)
            queries += fleet.rest_queries(server, token, sample_device)
        _print_queries(queries)
        change = (scaled.rps - base.rps) / base.rps * 100 if base.rps else float("nan")
        slowest = max(queries, key=lambda q: q.per_call_ms)
        print(
            f"scale (postgresql): throughput {scaled.rps:.1f} vs {base.rps:.1f} req/s "
            f"({change:+.1f} %; target within {SCALE_CHANGE_MAX:.0f} %: "
            f"{_verdict(abs(change) <= SCALE_CHANGE_MAX)}), server CPU (estkit + PostgreSQL) "
            f"{scaled.server_cpu_ms:.2f} vs {base.server_cpu_ms:.2f} ms per enrollment; "
            f"slowest query {slowest.per_call_ms:.1f} ms per page ({slowest.via}: "
            f"{slowest.name}; target <= {QUERY_MS_MAX:.0f} ms: "
            f"{_verdict(slowest.per_call_ms <= QUERY_MS_MAX)})",
            flush=True,
        )
        self.report["postgresql"]["scale"] = {
            "fill": asdict(fill),
            "placeholder_der_bytes": len(fleet.PLACEHOLDER_DER),
            "queries": [asdict(q) | {"per_call_ms": round(q.per_call_ms, 2)} for q in queries],
            "slowest_query_ms": round(slowest.per_call_ms, 2),
            "queries_met": slowest.per_call_ms <= QUERY_MS_MAX,
            "interleaved_rounds": a.rounds,
            "baseline_rows": baseline_rows,
            "enroll_rps_baseline": base.rps,
            "enroll_rps_scaled": scaled.rps,
            "throughput_change_percent": round(change, 1),
            "throughput_met": abs(change) <= SCALE_CHANGE_MAX,
        }

    def hsm_compare(self) -> None:
        """simpleenroll and simplereenroll on a server whose CA keys are in a SoftHSM2
        token next to this server (file keys): 1 worker each at the highest concurrency,
        in interleaved slices (file, token, token, file, ...). The token's server is made
        with ``server init --signer pkcs11`` (P-256, as this one) and gets its own device
        pool, made as ``setup`` makes this one."""
        a = self.args
        t0 = time.monotonic()
        data_dir = self.work / "server-hsm"
        concurrency = max(a.concurrency)
        report: dict[str, Any] = hsm.versions()
        with hsm.token(self.work / "softhsm") as token:
            port = fleet.free_port()
            hsm.init_server(data_dir, token=token, port=port, crl_port=fleet.free_port())
            fleet.enable_serverkeygen(data_dir)  # the same config as this server's but the signer
            pool = fleet.make_pool(data_dir, self.work / "hsm-devices", a.devices)
            key_types = {
                "file": hsm.ca_key_type(self.data_dir),
                "pkcs11": hsm.ca_key_type(data_dir),
            }
            report |= {"module": str(token.module), "ca_key_types": key_types}
            print(
                f"softhsm2: {report['softhsm2']} (python-pkcs11 {report['python_pkcs11']}), "
                f"a server with its CA keys ({key_types['pkcs11']}; the file server's: "
                f"{key_types['file']}) in token {token.label} and {a.devices} devices in "
                f"{time.monotonic() - t0:.1f} s",
                flush=True,
            )
            print(
                f"softhsm2: {' and '.join(HSM_OPERATIONS)} c={concurrency}, 1 worker, the file "
                f"signer and the SoftHSM2 signer, {a.rounds} interleaved slices each",
                flush=True,
            )
            print(HEADER, flush=True)
            token_server = fleet.Server(
                data_dir,
                port=port,
                workers=1,
                log=self.work / "server-hsm.log",
                python=a.server_python,
            )
            pairs = []
            with self.server(1) as file_server, token_server:
                for operation in HSM_OPERATIONS:
                    plan = self.plan(operation, concurrency, a.requests, a.seconds)
                    token_plan = self.plan(
                        operation,
                        concurrency,
                        a.requests,
                        a.seconds,
                        server=token_server,
                        pool=pool,
                    )
                    file_row, token_row = measure_interleaved(
                        [
                            Arm("file signer", file_server, plan, 0),
                            Arm("softhsm2 signer", token_server, token_plan, 0),
                        ],
                        rounds=a.rounds,
                    )
                    self.record(file_row)
                    self.record(token_row)
                    pairs.append((file_row, token_row))
        report["workers"] = 1
        report["concurrency"] = concurrency
        report["interleaved_rounds"] = a.rounds
        report["compare"] = [_hsm_summary(f, t) for f, t in pairs]
        report["seconds"] = round(time.monotonic() - t0, 1)
        self.report["hsm"] = report

    def ocsp(self) -> None:
        """bench/ocsp.py on this server (1 worker): the pool's first 64 operational
        certificates, ten times ``--requests`` responses or ``--seconds``."""
        assert self.pool is not None
        certs = [Path(d.cert_file) for d in self.pool.operational[:64]]
        with self.server(1) as server:
            result = ocsp.measure(
                port=ocsp.ocsp_port(self.data_dir),
                server_pid=server.pid,
                requests=ocsp.requests_for(self.data_dir, certs),
                count=10 * self.args.requests,
                seconds=self.args.seconds,
            )
        print(ocsp.report(result), flush=True)
        self.report["ocsp"] = ocsp.summary(result)

    def agent(self) -> None:
        from bench import device

        with self.server(1) as server:
            self.report["agent"] = device.measure_agent(
                server=server, work=self.work / "agent", python=self.args.agent_python
            )

    def write(self, path: Path) -> None:
        self.report["rows"] = [asdict(r) for r in self.rows]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.report, indent=2) + "\n")


def _hsm_summary(file: Row, token: Row) -> dict[str, Any]:
    """Server CPU per enrollment of the SoftHSM2 signer next to the file signer's, printed
    and as a report."""
    ratio = token.server_cpu_ms / file.server_cpu_ms if file.server_cpu_ms else 0.0
    other = max(file.other_cpu_util, token.other_cpu_util)
    print(
        f"softhsm2: {file.operation} server CPU {token.server_cpu_ms:.2f} ms per enrollment "
        f"with the SoftHSM2 signer vs {file.server_cpu_ms:.2f} ms with the file signer "
        f"({token.server_cpu_ms - file.server_cpu_ms:+.2f} ms, {ratio:.2f}x); "
        f"{token.rps:.1f} vs {file.rps:.1f} req/s; other CPU up to {other:.2f}",
        flush=True,
    )
    return {
        "operation": file.operation,
        "file_server_cpu_ms": file.server_cpu_ms,
        "softhsm2_server_cpu_ms": token.server_cpu_ms,
        "difference_ms": round(token.server_cpu_ms - file.server_cpu_ms, 3),
        "cpu_ratio": round(ratio, 3),
        "file_rps": file.rps,
        "softhsm2_rps": token.rps,
        "file_errors": file.errors,
        "softhsm2_errors": token.errors,
        "other_cpu_util": other,
    }


def _verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def _print_queries(queries: list[fleet.QueryTiming]) -> None:
    for q in queries:
        per_page = f"  ({q.per_call_ms:.1f} ms per page)" if q.calls > 1 else ""
        print(
            f"  query via {q.via:<5} {q.name:<32} median {q.median_ms:8.1f} ms  "
            f"max {q.max_ms:8.1f} ms  rows {q.rows}{per_page}",
            flush=True,
        )


def run_steps(bench: Bench, steps: Sequence[str]) -> None:
    """The steps after setup that ``steps`` names, in ``STEPS``' order; each one's own
    switch (``--no-postgresql``, ``--no-hsm``, ``--soak 0`` ...) still applies."""
    args = bench.args
    if "matrix" in steps:
        bench.matrix()
    if "ocsp" in steps:
        if args.ocsp:
            bench.ocsp()
        else:
            print("ocsp: skipped (--no-ocsp)", flush=True)
            bench.report["ocsp"] = {"skipped": "--no-ocsp"}
    if "postgresql" in steps:
        if args.postgresql is False:
            print("PostgreSQL: skipped (--no-postgresql)", flush=True)
            bench.report["postgresql"] = {"skipped": "--no-postgresql"}
        elif not postgres.installed():
            print(f"PostgreSQL: not installed ({postgres.INSTALL_HINT})", flush=True)
            bench.report["postgresql"] = {"skipped": "not installed"}
        else:
            bench.postgresql()
    if "hsm" in steps:
        if args.hsm is False:
            print("SoftHSM2: skipped (--no-hsm)", flush=True)
            bench.report["hsm"] = {"skipped": "--no-hsm"}
        elif lacking := hsm.missing():
            print(f"SoftHSM2: not installed ({lacking})", flush=True)
            bench.report["hsm"] = {"skipped": "not installed"}
        else:
            bench.hsm_compare()
    if "soak" in steps and args.soak:
        bench.soak()
    if "scale" in steps:
        if args.scale:
            bench.scale()
        else:
            print("scale: skipped (--scale 0)", flush=True)
    if "agent" in steps:
        if args.no_agent:
            print("agent: skipped (--no-agent)", flush=True)
        else:
            bench.agent()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = dt.datetime.now(dt.UTC)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    output = args.output or RESULTS / f"{stamp}.json"
    load, quiet = wait_for_quiet(args.quiet_load, args.quiet_wait)
    if not quiet:
        print(f"note: machine not quiet (1-min load {load:.2f}); measuring anyway", flush=True)
    work = Path(tempfile.mkdtemp(prefix="estkit-bench-"))
    bench = Bench(args, work)
    bench.report.update(
        {
            "started": started.isoformat(),
            "machine": machine(),
            "load_at_start": load,
            "quiet": quiet,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        }
    )
    t0 = time.monotonic()
    try:
        m = bench.report["machine"]
        print(
            f"machine: {m['nproc']} x {m['cpu_model']}, Python {m['python']}, "
            f"{m['openssl_python_ssl']} (ssl), {m['openssl_cryptography']} (cryptography)",
            flush=True,
        )
        bench.setup()
        run_steps(bench, args.only or STEPS)
    finally:
        bench.report["total_seconds"] = round(time.monotonic() - t0, 1)
        bench.write(output)
        if args.keep:
            print(f"server data kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"total {bench.report['total_seconds']:.0f} s; results in {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
