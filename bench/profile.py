"""Where the server's CPU goes during one scenario, per request.

    python -m bench.profile --operation simpleenroll --concurrency 32

Starts a fresh server (one worker by default), runs the load generator and
samples the worker with two tools at once, each answering what the other
cannot:

- ``perf record`` (Linux perf, on-CPU samples of every thread) splits the CPU
  by library: ``cryptography``'s bundled OpenSSL (the server's TLS through
  pyOpenSSL, the CSR check, signing, X.509 parsing), the system OpenSSL of the
  ``ssl`` module (only what the stdlib still does there), the SQLite engine,
  the kernel (TCP, scheduling, fsync), and the Python interpreter with its C
  extensions.
- ``py-spy record --gil`` (samples of the thread holding the GIL, i.e. running
  Python) splits the interpreter's share by component: uvicorn/httptools,
  Starlette, asyncio's event loop, estkit's TLS layer, the anyio thread-pool
  hop, SQLAlchemy, the authority's policy code, logging.

Each py-spy sample counts for the innermost frame that matches a component.
Missing tools are skipped: ``perf`` comes from the ``linux-perf`` Debian
package, ``py-spy`` from PyPI (``pip install py-spy`` into any environment;
``--py-spy PATH``). The raw outputs are kept next to the JSON results
(``*.folded``: collapsed stacks for speedscope or flamegraph.pl).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import fleet, loadgen
from bench.procstat import Snapshot
from bench.run import RESULTS

# (component, pattern on one Python frame "function (path:line)"); the innermost match wins,
# and within one frame the last pattern that matches.
COMPONENTS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(pattern))
    for name, pattern in (
        ("thread-pool hop (anyio, threading)", r"anyio/|concurrent/futures|threading\.py"),
        ("event loop (asyncio)", r"asyncio/|selectors\.py|socket\.py"),
        ("TLS layer (estkit/server/tls_openssl.py + pyOpenSSL)", r"tls_openssl\.py|OpenSSL/"),
        ("uvicorn + httptools", r"uvicorn/|httptools"),
        ("Starlette/FastAPI", r"starlette/|fastapi/"),
        ("TLS shim (estkit/server/tls.py)", r"estkit/server/tls\.py"),
        ("EST route glue", r"estkit/server/est\.py|estkit/pki/wire\.py"),
        ("authority policy", r"estkit/ca/|estkit/pki/(certs|names|revocation)\.py"),
        ("CSR parse + check", r"estkit/pki/csr\.py"),
        ("issue + sign", r"estkit/pki/profiles\.py"),
        ("CMS encode", r"estkit/pki/cms\.py"),
        ("store (estkit/store)", r"estkit/store/"),
        ("SQLAlchemy", r"sqlalchemy/"),
        ("audit hash", r"estkit/store/audit_chain\.py"),
        ("logging", r"logging/"),
    )
)
# perf's shared objects, grouped.
LIBRARIES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(pattern))
    for name, pattern in (
        ("system OpenSSL 3.0 (stdlib ssl module)", r"^libssl|^libcrypto|^_ssl\."),
        ("cryptography wheel's OpenSSL: TLS (pyOpenSSL), CSR check, signing", r"^_rust\."),
        ("SQLite engine", r"^libsqlite3|^_sqlite3\."),
        ("kernel (TCP, scheduling, futex, fsync)", r"^\[kernel|^\[vdso"),
        ("Python interpreter + C extensions", r"."),
    )
)
PYTHON = LIBRARIES[-1][0]
# cryptography's Rust code runs holding the GIL, so py-spy --gil sees it under the Python
# frames that called it (CSR check, signing): its perf share joins the Python share. (The
# TLS handshake's OpenSSL calls through pyOpenSSL's cffi release the GIL, so the ms that
# py-spy's shares are scaled to overstate the Python components by up to that much.)
UNDER_GIL = (PYTHON, LIBRARIES[1][0])


def classify(stack: str) -> str:
    found = "other"
    for frame in stack.split(";"):
        for name, pattern in COMPONENTS:
            if pattern.search(frame):
                found = name
    return found


def python_split(folded: Path) -> tuple[Counter[str], int]:
    by_component: Counter[str] = Counter()
    total = 0
    for line in folded.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if stack and count_text.isdigit():
            total += int(count_text)
            by_component[classify(stack)] += int(count_text)
    return by_component, total


def library_split(perf_data: Path, perf: str) -> tuple[dict[str, float], list[tuple[str, float]]]:
    """Shares (percent) per library group, and the kernel's top symbols."""
    report = subprocess.run(
        [perf, "report", "-i", str(perf_data), "--sort", "dso", "--stdio", "-g", "none"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    ).stdout
    groups: dict[str, float] = defaultdict(float)
    for match in re.finditer(r"^\s+([\d.]+)%\s+(\S+)", report, re.M):
        share, dso = float(match.group(1)), match.group(2)
        group = next(name for name, pattern in LIBRARIES if pattern.search(dso))
        groups[group] += share
    kernel = subprocess.run(
        [
            perf,
            "report",
            "-i",
            str(perf_data),
            "--sort",
            "sym",
            "--stdio",
            "-g",
            "none",
            "--dsos",
            "[kernel.kallsyms]",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    ).stdout
    symbols = [
        (m.group(2), float(m.group(1)))
        for m in re.finditer(r"^\s+([\d.]+)%\s+\[k\]\s+(\S+)", kernel, re.M)
    ][:8]
    return groups, symbols


@dataclass
class Samplers:
    perf: subprocess.Popen[bytes] | None = None
    spy: subprocess.Popen[bytes] | None = None

    def stop(self) -> None:
        for proc in (self.perf, self.spy):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in (self.perf, self.spy):
            if proc is not None:
                try:
                    proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    proc.kill()


def _quiet(command: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.profile", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--operation", default="simpleenroll", choices=sorted(loadgen.PATHS))
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--devices", type=int, default=128)
    p.add_argument("--py-spy", default=shutil.which("py-spy"))
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--perf", default=shutil.which("perf"))
    p.add_argument("--server-python", default=sys.executable)
    args = p.parse_args(argv)

    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    base = RESULTS / f"profile-{args.operation}-c{args.concurrency}-w{args.workers}-{stamp}"
    folded, perf_data = base.with_suffix(".folded"), base.with_suffix(".perf.data")
    work = Path(tempfile.mkdtemp(prefix="estkit-profile-"))
    port = fleet.free_port()
    data_dir = work / "server"
    samplers = Samplers()
    marks: dict[str, Snapshot] = {}
    try:
        fleet.init_server(data_dir, port=port, crl_port=fleet.free_port())
        pool = fleet.make_pool(data_dir, work / "devices", args.devices)
        server = fleet.Server(
            data_dir,
            port=port,
            workers=args.workers,
            log=work / "server.log",
            python=args.server_python,
        )
        with server:
            workers = server.worker_pids()
            plan = loadgen.Plan(
                port=port,
                operation=args.operation,
                ca_file=str(server.root_pem),
                devices=pool.bootstrap if args.operation == "simpleenroll" else pool.operational,
                concurrency=args.concurrency,
                processes=min(args.concurrency, 2),
                requests=args.requests,
                seconds=args.seconds,
            )

            def start() -> None:
                if args.perf:
                    pids = ",".join(map(str, workers))
                    command = [args.perf, "record", "-F", "999", "-o", str(perf_data), "-p", pids]
                    samplers.perf = _quiet(command)
                if args.py_spy:
                    command = [args.py_spy, "record", "--pid", str(workers[0]), "--gil"]
                    command += ["--rate", str(args.rate)]
                    command += ["--nonblocking", "--format", "raw", "--output", str(folded)]
                    samplers.spy = _quiet(command)
                time.sleep(1.0)
                marks["start"] = Snapshot.of(server.pid)

            result = loadgen.run(plan, on_start=start)
            marks["end"] = Snapshot.of(server.pid)
            samplers.stop()
    finally:
        samplers.stop()
        shutil.rmtree(work, ignore_errors=True)

    ok = max(result.ok, 1)
    cpu_ms = (marks["end"].cpu - marks["start"].cpu) * 1000 / ok
    print(
        f"{args.operation} c={args.concurrency} w={args.workers}: {result.ok} ok, "
        f"{result.error_count} errors, {result.ok / max(result.wall, 1e-9):.0f} req/s; server CPU "
        f"{cpu_ms:.2f} ms/request while sampled; load generator {result.client_cpu * 1000 / ok:.2f}"
    )
    summary: dict[str, Any] = {"operation": args.operation, "cpu_ms": cpu_ms, "ok": result.ok}
    python_share = 1.0
    if args.perf and perf_data.exists():
        groups, kernel = library_split(perf_data, args.perf)
        total = sum(groups.values()) or 1.0
        print("by library (perf, on-CPU samples of the worker):")
        for name, share in sorted(groups.items(), key=lambda kv: -kv[1]):
            print(f"  {name:<42}{share / total * 100:6.1f} %  ≈ {share / total * cpu_ms:5.2f} ms")
        print("  kernel's top symbols: " + ", ".join(f"{s} {v:.1f}%" for s, v in kernel))
        python_share = sum(groups[g] for g in UNDER_GIL) / total
        summary["libraries_percent"] = {k: round(v / total * 100, 1) for k, v in groups.items()}
        summary["kernel_top"] = kernel
    if args.py_spy and folded.exists():
        by_component, total_samples = python_split(folded)
        scale = python_share * cpu_ms
        print(
            f"the Python + cryptography share ({python_share * 100:.0f} %) by component "
            "(py-spy --gil):"
        )
        for name, count in by_component.most_common():
            share = count / max(total_samples, 1)
            print(f"  {name:<42}{share * 100:6.1f} %  ≈ {share * scale:5.2f} ms")
        summary["python_percent"] = {
            k: round(v / max(total_samples, 1) * 100, 1) for k, v in by_component.items()
        }
    base.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"raw: {folded.name}, {perf_data.name}, {base.with_suffix('.json').name} in {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
