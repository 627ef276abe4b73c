"""A flood of wrong HTTP Basic credentials, and what it does to mTLS devices (issue 10).

Starts ``estkit server run`` (one worker) on a loopback port, then:

1. idle: mTLS ``simpleenroll`` with bootstrap certificates, one at a time, each on
   a new connection (``loadgen``); its p50, and the server's RSS after it;
2. flood: ``--threads`` threads (default 48) post ``simpleenroll`` with
   ``Authorization: Basic base64("nobody:x")`` for ``--seconds`` (default 20),
   each on a keep-alive connection (``--new-connections``: one per request),
   while the same mTLS enrollment runs again; the server's peak RSS is sampled
   every 100 ms and its RSS read again after;
3. reports whether the peak RSS stayed within +20 % of idle and the mTLS p50
   within 3x of idle (``--rss-limit``, ``--p50-limit``); exit status 1 if not.

The flood comes from other loopback addresses than the devices (127.0.0.2 and
up, ``--sources``): the server caps connections per address, so a flood from
the devices' own address would also refuse the devices' connections, which is
what the cap is for. ``--random-usernames`` sends a new username each time, so
that the per-username failure limit does not stop it and, with enough
``--sources``, neither does the per-source one: the Basic pool's bound (503) is
what is left.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import secrets
import shutil
import ssl
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import fleet, loadgen
from bench.procstat import RssSampler, rss_bytes, tree
from bench.run import machine

MB = 1024 * 1024
ENROLL = loadgen.PATHS["simpleenroll"]
# Time the flood runs before the mTLS enrollments under it are measured.
FLOOD_LEAD = 2.0


def flood_sources(count: int) -> list[str]:
    """Loopback addresses other than the devices' 127.0.0.1: 127.0.0.2, 127.0.0.3, ..."""
    if not 1 <= count <= 250:
        raise ValueError(f"sources must be 1-250, got {count}")
    return [f"127.0.0.{2 + i}" for i in range(count)]


def basic_authorization(username: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{secret}".encode()).decode()


@dataclass(slots=True)
class FloodResult:
    statuses: Counter[str] = field(default_factory=Counter)  # "401", "429", "OSError", ...
    requests: int = 0
    seconds: float = 0.0

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


class Flood:
    """``threads`` threads posting wrong Basic credentials to ``simpleenroll`` until stopped."""

    def __init__(
        self,
        *,
        port: int,
        ca_file: str,
        threads: int,
        sources: list[str],
        random_usernames: bool = False,
        new_connections: bool = False,
    ) -> None:
        self.port = port
        self.threads = threads
        self.sources = sources
        self.random_usernames = random_usernames
        self.new_connections = new_connections
        self._context = ssl.create_default_context(cafile=ca_file)
        self._body = loadgen._csr_body("nobody")  # what a device would send
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers: list[threading.Thread] = []
        self.result = FloodResult()
        self._started = 0.0

    def start(self) -> None:
        self._started = time.monotonic()
        for i in range(self.threads):
            source = self.sources[i % len(self.sources)]
            worker = threading.Thread(target=self._run, args=(source,), daemon=True)
            worker.start()
            self._workers.append(worker)

    def stop(self) -> FloodResult:
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout=35)
        self.result.seconds = time.monotonic() - self._started
        return self.result

    def _connection(self, source: str) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(
            loadgen.HOST,
            self.port,
            context=self._context,
            timeout=30,
            source_address=(source, 0),
        )

    def _run(self, source: str) -> None:
        seen: Counter[str] = Counter()
        conn = self._connection(source)
        headers = {
            "Host": f"{loadgen.SERVER_NAME}:{self.port}",
            "Content-Type": "application/pkcs10",
        }
        if self.new_connections:
            headers["Connection"] = "close"
        try:
            while not self._stop.is_set():
                username = secrets.token_hex(6) if self.random_usernames else "nobody"
                headers["Authorization"] = basic_authorization(username, "x")
                try:
                    conn.request("POST", ENROLL, body=self._body, headers=headers)
                    response = conn.getresponse()
                    response.read()
                    seen[str(response.status)] += 1
                    if response.will_close:
                        conn.close()  # the next request opens a new connection
                except (OSError, http.client.HTTPException) as exc:
                    seen[type(exc).__name__] += 1
                    conn.close()
                    conn = self._connection(source)
                    self._stop.wait(0.01)  # refused at the cap: do not spin
        finally:
            conn.close()
            with self._lock:
                self.result.statuses.update(seen)
                self.result.requests += sum(seen.values())


def warm_up_basic(flood: Flood) -> int:
    """One wrong-Basic request before the idle figures, from the flood's last source: a
    server in service has run the Basic path before (its imports, statement caches and
    thread are one-time costs, not the flood's). The HTTP status."""
    conn = flood._connection(flood.sources[-1])
    try:
        conn.request(
            "POST",
            ENROLL,
            body=flood._body,
            headers={
                "Content-Type": "application/pkcs10",
                "Authorization": basic_authorization("warm-up", "x"),
            },
        )
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


@dataclass(frozen=True, slots=True)
class Enrollments:
    p50_ms: float
    ok: int
    errors: dict[str, int]


def enroll_p50(plan: loadgen.Plan, *, on_start: Any = lambda: None) -> Enrollments:
    result = loadgen.run(plan, on_start=on_start)
    p50 = statistics.median(result.latencies) * 1000 if result.latencies else float("nan")
    return Enrollments(round(p50, 2), result.ok, dict(result.errors))


@dataclass(frozen=True, slots=True)
class Report:
    idle_rss_mb: float
    flood_peak_rss_mb: float
    after_rss_mb: float
    idle: Enrollments
    under_flood: Enrollments
    flood_requests: int
    flood_rps: float
    flood_statuses: dict[str, int]
    rss_limit: float
    p50_limit: float

    @property
    def rss_growth(self) -> float:
        return self.flood_peak_rss_mb / self.idle_rss_mb - 1

    @property
    def p50_ratio(self) -> float:
        return self.under_flood.p50_ms / self.idle.p50_ms

    @property
    def passed(self) -> bool:
        return self.rss_growth <= self.rss_limit and self.p50_ratio <= self.p50_limit

    def lines(self) -> list[str]:
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(self.flood_statuses.items()))
        return [
            f"idle:         RSS {self.idle_rss_mb:.0f} MB, mTLS enrollment p50 "
            f"{self.idle.p50_ms:.1f} ms ({self.idle.ok} ok)",
            f"flood:        {self.flood_requests} wrong-Basic requests, "
            f"{self.flood_rps:.0f}/s ({statuses})",
            f"under flood:  RSS peak {self.flood_peak_rss_mb:.0f} MB "
            f"({self.rss_growth * 100:+.1f} %, limit +{self.rss_limit * 100:.0f} %), "
            f"mTLS p50 {self.under_flood.p50_ms:.1f} ms ({self.p50_ratio:.2f}x, "
            f"limit {self.p50_limit:g}x; {self.under_flood.ok} ok, "
            f"errors {self.under_flood.errors or 0})",
            f"after:        RSS {self.after_rss_mb:.0f} MB",
            f"verdict:      {'PASS' if self.passed else 'FAIL'}",
        ]


def measure(args: argparse.Namespace, work: Path) -> Report:
    data_dir = work / "server"
    port = fleet.free_port()
    fleet.init_server(data_dir, port=port, crl_port=fleet.free_port())
    pool = fleet.make_pool(data_dir, work / "devices", args.devices)
    ca_file = str(data_dir / "ca" / "root.pem")
    plan = loadgen.Plan(
        port=port,
        operation="simpleenroll",
        ca_file=ca_file,
        devices=pool.bootstrap,
        concurrency=1,
        processes=1,
        requests=args.enrollments,
        seconds=args.seconds - FLOOD_LEAD,
        warmup=3,
    )
    server = fleet.Server(data_dir, port=port, workers=1, log=work / "server.log")
    with server:
        flood = Flood(
            port=port,
            ca_file=ca_file,
            threads=args.threads,
            sources=flood_sources(args.sources),
            random_usernames=args.random_usernames,
            new_connections=args.new_connections,
        )
        warm_up_basic(flood)
        idle = enroll_p50(plan)
        idle_rss = rss_bytes(tree(server.pid))

        def start_flood() -> None:
            flood.start()
            time.sleep(FLOOD_LEAD)

        with RssSampler(server.pid) as sampler:
            try:
                # The load generator forks its workers first, then starts the flood.
                under = enroll_p50(plan, on_start=start_flood)
            finally:
                flooded = flood.stop()
        after_rss = rss_bytes(tree(server.pid))
    return Report(
        idle_rss_mb=round(idle_rss / MB, 1),
        flood_peak_rss_mb=round(max(sampler.peak, idle_rss) / MB, 1),
        after_rss_mb=round(after_rss / MB, 1),
        idle=idle,
        under_flood=under,
        flood_requests=flooded.requests,
        flood_rps=round(flooded.rps, 1),
        flood_statuses=dict(flooded.statuses),
        rss_limit=args.rss_limit,
        p50_limit=args.p50_limit,
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    assert __doc__ is not None
    p = argparse.ArgumentParser(
        prog="python -m bench.basic_flood", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--threads", type=int, default=48, help="flood threads (default 48)")
    p.add_argument("--seconds", type=float, default=20.0, help="flood duration (default 20)")
    p.add_argument("--enrollments", type=int, default=2000, help="mTLS enrollments per phase")
    p.add_argument("--devices", type=int, default=8, help="bootstrap certificates (default 8)")
    p.add_argument("--sources", type=int, default=1, help="flood source addresses (default 1)")
    p.add_argument("--random-usernames", action="store_true", help="a new username each time")
    p.add_argument("--new-connections", action="store_true", help="one connection per request")
    p.add_argument("--rss-limit", type=float, default=0.20, help="peak RSS growth (default 0.20)")
    p.add_argument("--p50-limit", type=float, default=3.0, help="p50 ratio (default 3)")
    p.add_argument("--output", type=Path, default=None, help="write the report as JSON here")
    args = p.parse_args(argv)
    if args.seconds <= FLOOD_LEAD or args.threads < 1:
        p.error(f"--seconds must be over {FLOOD_LEAD} and --threads at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    m = machine()
    print(
        f"machine: {m['nproc']} x {m['cpu_model']}, {m['memory_mb']} MB, Python {m['python']}",
        flush=True,
    )
    work = Path(tempfile.mkdtemp(prefix="estkit-flood-"))
    try:
        report = measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for line in report.lines():
        print(line, flush=True)
    if args.output is not None:
        data = {
            "machine": m,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            **asdict(report),
            "rss_growth": round(report.rss_growth, 3),
            "p50_ratio": round(report.p50_ratio, 2),
            "passed": report.passed,
        }
        args.output.write_text(json.dumps(data, indent=2) + "\n")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
