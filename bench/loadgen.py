"""A multi-process EST load generator: one fresh TCP + TLS connection per request.

Each worker process runs a share of the concurrent connections as threads
(OpenSSL releases the GIL during the handshake and socket IO, so a handful
of threads per process keeps Python out of the way). Everything a request
needs is made before the clock starts: TLS contexts with the device's
certificate and key, and for enrollment one fresh P-256 key and CSR per
request. A request is written by hand as HTTP/1.1 with ``Connection: close``
and its response read up to Content-Length, the least client work an EST
exchange allows.

A run is bounded by a request count and by time, whichever comes first;
it connects to 127.0.0.1 only. Several servers (nodes) share one run's
connection slots round-robin, as a load balancer in front of them would.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from estkit.pki import wire
from estkit.pki.csr import build_csr
from estkit.pki.keys import generate_key

HOST = "127.0.0.1"
SERVER_NAME = "localhost"
PATHS = {
    "cacerts": "/.well-known/est/cacerts",
    "simpleenroll": "/.well-known/est/simpleenroll",
    "simplereenroll": "/.well-known/est/simplereenroll",
    "serverkeygen": "/.well-known/est/serverkeygen",
    "health": "/health/certificate",
}
# Operations that send a CSR; all but ``cacerts`` present a client certificate.
WITH_CSR = frozenset({"simpleenroll", "simplereenroll", "serverkeygen"})
READY_TIMEOUT = 120.0


@dataclass(frozen=True, slots=True)
class Device:
    """A simulated device: its id and the PEM files it authenticates with."""

    device_id: str
    cert_file: str  # leaf first, then the chain the device sends
    key_file: str


@dataclass(frozen=True, slots=True)
class Plan:
    port: int
    operation: str  # a key of PATHS
    ca_file: str  # trust anchor for the server certificate
    devices: tuple[Device, ...]  # ignored for cacerts
    concurrency: int
    processes: int
    requests: int
    seconds: float
    warmup: int = 1  # requests per connection slot before the clock, not counted
    verify_server: bool = True
    tls_max: str = "1.3"  # "1.2" to force TLS 1.2
    spread_to: tuple[int, ...] = ()  # more servers' ports: slot k connects to ports[k % n]

    @property
    def ports(self) -> tuple[int, ...]:
        return (self.port, *self.spread_to)

    def __post_init__(self) -> None:
        if self.operation not in PATHS:
            raise ValueError(f"operation must be one of {', '.join(PATHS)}, got {self.operation!r}")
        if self.operation != "cacerts" and not self.devices:
            raise ValueError(f"{self.operation} needs devices with client certificates")
        if not 1 <= self.processes <= self.concurrency:
            raise ValueError("processes must be between 1 and the concurrency")


@dataclass(slots=True)
class Result:
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    error_samples: dict[str, str] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)  # seconds, successful requests
    wall: float = 0.0  # seconds from the start signal to the last response
    client_cpu: float = 0.0  # seconds of CPU of all load-generator processes
    started_at: float = 0.0  # time.monotonic() of the start signal

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def run(plan: Plan, *, on_start: Callable[[], object] = lambda: None) -> Result:
    """Start the workers, wait until each is ready, call ``on_start``, release them, collect."""
    ctx = mp.get_context("fork")
    go = ctx.Event()
    ready: mp.Queue[int] = ctx.Queue()
    results: mp.Queue[Result] = ctx.Queue()
    shares = _split(plan.concurrency, plan.processes)
    workers = []
    first_slot = 0
    for index, slots in enumerate(shares):
        proc = ctx.Process(
            target=_worker,
            args=(plan, index, first_slot, slots, go, ready, results),
            name=f"loadgen-{index}",
            daemon=True,
        )
        proc.start()
        workers.append(proc)
        first_slot += slots
    try:
        for _ in workers:
            ready.get(timeout=READY_TIMEOUT)
        on_start()
        started = time.monotonic()
        go.set()
        total = Result(started_at=started)
        ends: list[float] = []
        for _ in workers:
            part = results.get(timeout=plan.seconds + 120)
            total.ok += part.ok
            total.errors.update(part.errors)
            for kind, sample in part.error_samples.items():
                total.error_samples.setdefault(kind, sample)
            total.latencies.extend(part.latencies)
            total.client_cpu += part.client_cpu
            ends.append(part.wall)
        total.wall = max(ends) - started
        return total
    finally:
        for proc in workers:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


# -- inside a worker process ---------------------------------------------------------


def _worker(
    plan: Plan,
    index: int,
    first_slot: int,
    slots: int,
    go: mp.synchronize.Event,
    ready: mp.Queue[int],
    results: mp.Queue[Result],
) -> None:
    per_slot = _split(plan.requests, plan.concurrency)[first_slot : first_slot + slots]
    jobs = [
        _Slot(plan, slot, count)
        for slot, count in zip(range(first_slot, first_slot + slots), per_slot, strict=True)
    ]
    for job in jobs:
        job.warm_up()
    local_go = threading.Event()
    threads = [threading.Thread(target=job.loop, args=(local_go,), daemon=True) for job in jobs]
    for t in threads:
        t.start()
    ready.put(index)
    go.wait()
    deadline = time.monotonic() + plan.seconds
    for job in jobs:
        job.deadline = deadline
    cpu0 = _cpu()
    local_go.set()
    for t in threads:
        t.join()
    part = Result(client_cpu=_cpu() - cpu0, wall=max(job.finished for job in jobs))
    for job in jobs:
        part.ok += job.ok
        part.errors.update(job.errors)
        for kind, sample in job.error_samples.items():
            part.error_samples.setdefault(kind, sample)
        part.latencies.extend(job.latencies)
    results.put(part)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class _Slot:
    """One connection slot: requests one after another, each on a new connection."""

    def __init__(self, plan: Plan, slot: int, count: int) -> None:
        self.plan = plan
        self.deadline = float("inf")
        self.finished = 0.0
        self.ok = 0
        self.errors: Counter[str] = Counter()
        self.error_samples: dict[str, str] = {}
        self.latencies: list[float] = []
        path = PATHS[plan.operation]
        self.port = plan.ports[slot % len(plan.ports)]
        host = f"{SERVER_NAME}:{self.port}"
        if plan.operation == "cacerts":
            contexts = [_context(plan, None)]
            devices: list[Device | None] = [None]
        else:
            # Devices are dealt out to slots round-robin: no two slots share one.
            mine = list(plan.devices[slot :: plan.concurrency]) or [
                plan.devices[slot % len(plan.devices)]
            ]
            devices = list(mine)
            contexts = [_context(plan, d) for d in mine]
        self.requests: list[tuple[ssl.SSLContext, bytes]] = []
        for i in range(count + plan.warmup):
            k = i % len(contexts)
            device = devices[k]
            if plan.operation in WITH_CSR:
                assert device is not None
                body = _csr_body(device.device_id)
                head = (
                    f"POST {path} HTTP/1.1\r\nHost: {host}\r\n"
                    "Content-Type: application/pkcs10\r\n"
                    "Content-Transfer-Encoding: base64\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                )
                self.requests.append((contexts[k], head.encode() + body))
            else:
                head = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
                self.requests.append((contexts[k], head.encode()))

    def warm_up(self) -> None:
        for _ in range(self.plan.warmup):
            context, request = self.requests.pop()
            _exchange(self.port, context, request)

    def loop(self, go: threading.Event) -> None:
        go.wait()
        for context, request in self.requests:
            if time.monotonic() >= self.deadline:
                break
            start = time.perf_counter()
            try:
                status = _exchange(self.port, context, request)
            except (OSError, ValueError) as exc:
                kind = type(exc).__name__
                self.errors[kind] += 1
                self.error_samples.setdefault(kind, str(exc)[:200])
                continue
            elapsed = time.perf_counter() - start
            if status == 200:
                self.ok += 1
                self.latencies.append(elapsed)
            else:
                self.errors[f"HTTP {status}"] += 1
        self.finished = time.monotonic()


def _context(plan: Plan, device: Device | None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if plan.tls_max == "1.2":
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    if plan.verify_server:
        context.load_verify_locations(plan.ca_file)
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if device is not None:
        context.load_cert_chain(device.cert_file, device.key_file)
    return context


def _csr_body(device_id: str) -> bytes:
    """A new P-256 key's CSR for ``device_id``, base64 at 64 columns as the estkit client sends."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
    csr = build_csr(generate_key("ec-p256"), subject=subject)
    return wire.encode_base64_body(csr.public_bytes(Encoding.DER), line_length=64)


def _exchange(port: int, context: ssl.SSLContext, request: bytes) -> int:
    """One request on a new connection; the HTTP status (the body is read, not checked)."""
    with socket.create_connection((HOST, port), timeout=30) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with context.wrap_socket(raw, server_hostname=SERVER_NAME) as tls:
            tls.sendall(request)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = tls.recv(65536)
                if not chunk:
                    raise ValueError("connection closed before the response headers")
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            status = int(lines[0].split(b" ", 2)[1])
            length = next(
                (
                    int(v)
                    for k, _, v in (h.partition(b":") for h in lines[1:])
                    if k.lower() == b"content-length"
                ),
                None,
            )
            if length is None:
                raise ValueError("response without Content-Length")
            while len(body) < length:
                chunk = tls.recv(65536)
                if not chunk:
                    raise ValueError("connection closed inside the response body")
                body += chunk
            return status
