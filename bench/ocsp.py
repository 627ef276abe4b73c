"""OCSP from the cache: responses per second per core of the plain-HTTP listener.

The server answers OCSP on its CRL listener (``estkit server run``, the listener in
its main process). The load: ``--connections`` keep-alive connections, each sending
pre-built POST requests (SHA-1 CertIDs, no nonce: what caches can answer) for the
operational certificates of the pool's devices in turn, one request at a time, from
threads of this process over raw sockets (a client far cheaper than the server).
Every certificate is asked once before the clock starts, so what is measured is
the cache; each answer's status is checked (``successful``), and the first one of
each certificate is read in full (its serial, known to the server).

*Per core* is responses per second of the server's own CPU time (its whole process
tree): the figure does not depend on how much of the machine the client takes.

Standalone: ``python -m bench.ocsp`` makes its own server and devices;
``bench/run.py`` runs ``measure`` on its server as the ``ocsp`` step.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import fleet
from bench.procstat import Snapshot

# Issue 15's target: answers from the cache per second of one core.
PER_CORE_TARGET = 2000.0
# An OCSPResponse whose responseStatus is successful begins SEQUENCE (30 81 xx or 30 82 xx xx),
# then ENUMERATED 0.
_SUCCESSFUL = b"\x0a\x01\x00"


@dataclass(frozen=True, slots=True)
class OcspResult:
    connections: int
    certificates: int
    responses: int
    errors: int
    seconds: float
    rps: float
    server_cpu_s: float
    per_core: float  # responses per second of server CPU: the figure against the target
    server_cpu_util: float  # server CPU seconds per wall second (1.0 = one core)
    client_cpu_util: float
    other_cpu_util: float  # CPU used by neither server nor client (others' jobs)
    p50_ms: float
    p99_ms: float
    target: float = PER_CORE_TARGET

    @property
    def met(self) -> bool:
        return self.per_core >= self.target


def ocsp_port(data_dir: Path) -> int:
    from estkit.server.config import load_config

    port = load_config(data_dir).crl.http_port
    if not port:
        raise RuntimeError(f"{data_dir}: crl.http_port is 0: no listener serves OCSP")
    return port


def requests_for(data_dir: Path, certificates: Sequence[Path]) -> list[tuple[int, bytes]]:
    """(serial, DER OCSP request) of each certificate file, asked of the CA that issued it."""
    from cryptography.hazmat.primitives.serialization import Encoding
    from cryptography.x509 import ocsp

    from estkit.pki.certs import load_pem_certificates
    from estkit.pki.ocsp import HASHES

    cas = [load_pem_certificates(p.read_bytes())[0] for p in (data_dir / "ca").glob("*.pem")]
    made = []
    for path in certificates:
        cert = load_pem_certificates(path.read_bytes())[0]
        issuer = next(c for c in cas if c.subject == cert.issuer)
        request = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, HASHES["sha1"]())
        made.append((cert.serial_number, request.build().public_bytes(Encoding.DER)))
    return made


def _post(port: int, body: bytes) -> bytes:
    return (
        f"POST /ocsp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/ocsp-request\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


class _Connection:
    """One keep-alive connection: a request out, its response's body in."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def exchange(self, request: bytes) -> bytes:
        self.sock.sendall(request)
        while b"\r\n\r\n" not in self.buffer:
            self._read()
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200 "):
            raise RuntimeError(head.split(b"\r\n", 1)[0].decode(errors="replace"))
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        while len(rest) < length:
            self.buffer = rest
            self._read()
            rest = self.buffer
        self.buffer = rest[length:]
        return rest[:length]

    def _read(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed by the server")
        self.buffer += chunk

    def close(self) -> None:
        self.sock.close()


def warm(port: int, requests: Sequence[tuple[int, bytes]]) -> None:
    """Ask for every certificate once (this fills the cache) and check each answer in full:
    signed, about that serial, and known (good, or revoked since)."""
    from cryptography.x509 import ocsp

    conn = _Connection(port)
    try:
        for serial, der in requests:
            response = ocsp.load_der_ocsp_response(conn.exchange(_post(port, der)))
            if response.response_status is not ocsp.OCSPResponseStatus.SUCCESSFUL:
                raise RuntimeError(f"serial {serial:X}: {response.response_status.name}")
            if response.certificate_status is ocsp.OCSPCertStatus.UNKNOWN:
                raise RuntimeError(f"serial {serial:X}: {response.certificate_status.name}")
            if response.serial_number != serial:
                raise RuntimeError(f"asked {serial:X}, answered {response.serial_number:X}")
    finally:
        conn.close()


def measure(
    *,
    port: int,
    server_pid: int,
    requests: Sequence[tuple[int, bytes]],
    connections: int = 8,
    count: int = 40_000,
    seconds: float = 15.0,
) -> OcspResult:
    """``count`` requests or ``seconds``, whichever ends first, over ``connections``
    keep-alive connections; the cache warmed first."""
    warm(port, requests)
    wires = [_post(port, der) for _, der in requests]
    lock = threading.Lock()
    sent = 0
    stop = threading.Event()
    latencies: list[list[float]] = [[] for _ in range(connections)]
    errors = [0] * connections
    ready = threading.Barrier(connections + 1)

    def run(index: int) -> None:
        nonlocal sent
        conn = _Connection(port)
        mine = latencies[index]
        n = index
        try:
            ready.wait()
            while not stop.is_set():
                with lock:
                    if sent >= count:
                        return
                    sent += 1
                t0 = time.perf_counter()
                try:
                    body = conn.exchange(wires[n % len(wires)])
                except (OSError, RuntimeError, StopIteration):
                    errors[index] += 1
                    conn.close()
                    conn = _Connection(port)
                    continue
                mine.append(time.perf_counter() - t0)
                if _SUCCESSFUL not in body[:8]:
                    errors[index] += 1
                n += connections
        finally:
            conn.close()

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(connections)]
    for thread in threads:
        thread.start()
    ready.wait()
    start, client_start, wall_start = Snapshot.of(server_pid), time.process_time(), time.monotonic()
    deadline = wall_start + seconds
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    stop.set()
    for thread in threads:
        thread.join(10)
    wall = time.monotonic() - wall_start
    end, client = Snapshot.of(server_pid), time.process_time() - client_start
    all_latencies = sorted(x for per in latencies for x in per)
    ok = len(all_latencies) - sum(errors)
    server_cpu = end.cpu - start.cpu
    other = (end.machine - start.machine) - server_cpu - client

    def percentile(q: float) -> float:
        if not all_latencies:
            return float("nan")
        return 1000 * all_latencies[min(len(all_latencies) - 1, int(q * len(all_latencies)))]

    return OcspResult(
        connections=connections,
        certificates=len(requests),
        responses=ok,
        errors=sum(errors),
        seconds=round(wall, 3),
        rps=round(ok / wall, 1) if wall else 0.0,
        server_cpu_s=round(server_cpu, 3),
        per_core=round(ok / server_cpu, 1) if server_cpu > 0 else 0.0,
        server_cpu_util=round(server_cpu / wall, 3) if wall else 0.0,
        client_cpu_util=round(client / wall, 3) if wall else 0.0,
        other_cpu_util=round(max(0.0, other) / wall, 3) if wall else 0.0,
        p50_ms=round(percentile(0.5), 3),
        p99_ms=round(percentile(0.99), 3),
    )


def report(result: OcspResult) -> str:
    verdict = "met" if result.met else "MISSED"
    return (
        f"ocsp: {result.per_core:,.0f} responses per second per core from the cache "
        f"(target {result.target:,.0f}: {verdict}); {result.rps:,.0f}/s over "
        f"{result.connections} keep-alive connections, server CPU {result.server_cpu_util:.2f} "
        f"cores, client {result.client_cpu_util:.2f}, other {result.other_cpu_util:.2f}; "
        f"p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms; "
        f"{result.responses} responses, {result.errors} errors, {result.certificates} certificates"
    )


def summary(result: OcspResult) -> dict[str, object]:
    return asdict(result) | {"met": result.met}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ocsp", description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=64, help="certificates asked about (default 64)")
    p.add_argument("--connections", type=int, default=8, help="keep-alive connections (8)")
    p.add_argument("--requests", type=int, default=40_000, help="at most (default 40,000)")
    p.add_argument("--seconds", type=float, default=15.0, help="at most (default 15)")
    p.add_argument("--workers", type=int, default=1, help="server workers (default 1)")
    p.add_argument("--output", type=Path, default=None, help="write the result as JSON here")
    p.add_argument("--keep", action="store_true", help="keep the server data directory")
    args = p.parse_args(argv)
    if min(args.devices, args.connections, args.requests, args.workers) < 1:
        p.error("devices, connections, requests and workers must be at least 1")
    work = Path(tempfile.mkdtemp(prefix="estkit-bench-ocsp-"))
    try:
        data_dir = work / "server"
        port = fleet.free_port()
        fleet.init_server(data_dir, port=port, crl_port=fleet.free_port())
        pool = fleet.make_pool(data_dir, work / "devices", args.devices)
        requests = requests_for(data_dir, [Path(d.cert_file) for d in pool.operational])
        with fleet.Server(
            data_dir, port=port, workers=args.workers, log=work / "server.log"
        ) as server:
            result = measure(
                port=ocsp_port(data_dir),
                server_pid=server.pid,
                requests=requests,
                connections=args.connections,
                count=args.requests,
                seconds=args.seconds,
            )
        print(report(result), flush=True)
        if args.output is not None:
            args.output.write_text(json.dumps(summary(result), indent=2) + "\n")
    finally:
        if args.keep:
            print(f"server data kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if result.errors == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
