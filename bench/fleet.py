"""The server under test and its data: data directory, device pool, a million stored rows.

The server runs as ``estkit server run`` in its own process group, exactly as
an operator starts it. The device pool is made before any clock starts, in
this process through the authority's own API (one ``estkit device
bootstrap`` process per device would take minutes for a few hundred
devices); the bulk rows for the scale run are written straight into SQLite
(``fleet_rows`` makes them; bench/postgres.py writes the same into PostgreSQL).
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
import os
import random
import re
import signal
import socket
import sqlite3
import ssl
import statistics
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from http.client import HTTPSConnection
from pathlib import Path
from types import ModuleType

from bench.loadgen import Device
from bench.procstat import tree

ESTKIT = [sys.executable, "-m", "estkit.cli.main"]
TESTS = Path(__file__).resolve().parents[1] / "tests"
START_TIMEOUT = 60.0
# The enrollment label every pool device uses (the server's default label).
LABEL = "devices"


def estkit(*args: str | Path, timeout: float = 120) -> str:
    """Run the ``estkit`` command; its stdout, or a RuntimeError with its stderr."""
    proc = subprocess.run(
        [*ESTKIT, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"estkit {' '.join(map(str, args))}: {proc.stderr.strip()}")
    return proc.stdout


def tests_module(name: str) -> ModuleType:
    """One of the test suite's helper modules (``tests/pgcluster.py``, ``tests/softhsm.py``).

    tests/ is not a package (pytest puts it on sys.path), so neither mypy nor an import
    statement finds its modules; callers type what they use with a Protocol.
    """
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    return importlib.import_module(name)


def init_server(
    data_dir: Path, *, port: int, crl_port: int, options: Sequence[str | Path] = ()
) -> None:
    """``estkit server init`` with the defaults (P-256 keys) and ``options`` (the signer's)."""
    estkit(
        "server", "init", "--data-dir", data_dir, "--port", str(port),
        "--crl-port", str(crl_port), *options,
    )  # fmt: skip


def enable_serverkeygen(data_dir: Path, label: str = "devices") -> None:
    """``serverkeygen = true`` on ``[labels.<label>]`` (its key type: the default, P-256)."""
    path = data_dir / "estkit.toml"
    text = path.read_text()
    head = f"[labels.{label}]\n"
    start = text.index(head) + len(head)
    path.write_text(text[:start] + "serverkeygen = true\n" + text[start:])


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (the benchmark never listens elsewhere)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def set_crl_port(data_dir: Path, port: int) -> None:
    """Point ``[crl] http_port`` of a copied data directory at a port of its own."""
    path = data_dir / "estkit.toml"
    text = path.read_text()
    start = text.index("[crl]\n")
    end = text.find("\n[", start + 1)
    end = len(text) if end < 0 else end
    section, n = re.subn(r"(?m)^http_port\s*=.*$", f"http_port = {port}", text[start:end])
    if n != 1:
        raise ValueError(f"{path}: no [crl] http_port line")
    path.write_text(text[:start] + section + text[end:])


def count_certificates(db_file: Path) -> int:
    db = sqlite3.connect(f"file:{db_file}?mode=ro", uri=True)
    try:
        return int(db.execute("SELECT count(*) FROM certificates").fetchone()[0])
    finally:
        db.close()


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# -- the device pool ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Pool:
    bootstrap: tuple[Device, ...]  # factory certificates (simpleenroll)
    operational: tuple[Device, ...]  # one enrolled certificate per device (simplereenroll)

    def devices_for(self, operation: str) -> tuple[Device, ...]:
        """The certificates ``operation`` authenticates with: bootstrap for the first
        enrollment (and serverkeygen), operational for the rest."""
        return self.bootstrap if operation in ("simpleenroll", "serverkeygen") else self.operational


def make_pool(data_dir: Path, out: Path, count: int) -> Pool:
    """``count`` devices, each with a bootstrap and an operational certificate on disk."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding
    from cryptography.x509.oid import NameOID

    from estkit.pki.certs import certs_to_pem
    from estkit.pki.csr import build_csr
    from estkit.pki.keys import generate_key, key_to_pem
    from estkit.server.config import load_config
    from estkit.server.wiring import build_authority, open_store

    config = load_config(data_dir)
    store = open_store(config)
    authority = build_authority(config, store)
    bootstrap: list[Device] = []
    operational: list[Device] = []
    try:
        for i in range(count):
            device_id = f"bench-{i:05d}"
            subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
            for kind, label, into in (
                ("bootstrap", "bootstrap", bootstrap),
                ("operational", LABEL, operational),
            ):
                key = generate_key("ec-p256")
                csr = build_csr(key, subject=subject).public_bytes(Encoding.DER)
                issued = authority.provision(
                    label,
                    csr,
                    device_id=device_id,
                    actor="bench",
                    now=_utcnow(),
                    via="cli-bootstrap" if kind == "bootstrap" else "bench",
                )
                directory = out / device_id / kind
                directory.mkdir(parents=True, exist_ok=True)
                key_file, cert_file = directory / "key.pem", directory / "cert.pem"
                key_file.write_bytes(key_to_pem(key))
                key_file.chmod(0o600)
                # What a device sends: its certificate, then the issuing CA (not the root).
                cert_file.write_bytes(certs_to_pem([issued.certificate, *issued.chain[:-1]]))
                into.append(Device(device_id, str(cert_file), str(key_file)))
    finally:
        store.close()
    return Pool(tuple(bootstrap), tuple(operational))


# -- the server process ---------------------------------------------------------------


class Server:
    """``estkit server run`` on a loopback port; ``pid`` is the root of its process tree."""

    def __init__(
        self, data_dir: Path, *, port: int, workers: int, log: Path, python: str = sys.executable
    ) -> None:
        self.data_dir = data_dir
        self.python = python
        self.port = port
        self.workers = workers
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def root_pem(self) -> Path:
        return self.data_dir / "ca" / "root.pem"

    def tls_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.root_pem))

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    self.python,
                    "-m",
                    "estkit.cli.main",
                    "server",
                    "run",
                    "--data-dir",
                    str(self.data_dir),
                    "--port",
                    str(self.port),
                    "--workers",
                    str(self.workers),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}; see {self.log}")
            if self._healthy() and len(self.worker_pids()) >= self.workers:
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not answer /health within {START_TIMEOUT:.0f} s")

    def _healthy(self) -> bool:
        conn = HTTPSConnection("127.0.0.1", self.port, context=self.tls_context(), timeout=2)
        try:
            conn.request("GET", "/health", headers={"Host": f"localhost:{self.port}"})
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def worker_pids(self) -> list[int]:
        """The processes that serve requests: uvicorn's workers, or the one process."""
        if self.workers == 1:
            return [self.pid]
        # uvicorn's supervisor starts its workers through multiprocessing (spawn): the
        # workers are the processes below it whose command line is multiprocessing's.
        pids = [p for p in tree(self.pid) if p != self.pid]
        return [p for p in pids if _is_uvicorn_worker(p)]

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)
        except ProcessLookupError:
            pass
        self.proc = None

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _is_uvicorn_worker(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    # multiprocessing's spawn children run "python -c from multiprocessing.spawn import …";
    # its resource tracker runs "… resource_tracker …".
    return b"multiprocessing.spawn" in cmdline and b"resource_tracker" not in cmdline


# -- a million rows -------------------------------------------------------------------

# The order of the values in ``FleetRows.certificates``.
CERTIFICATE_COLUMNS = (
    "serial", "device_id", "ca", "label", "profile", "subject", "sans", "not_before",
    "not_after", "status", "requested_via", "requested_by", "issued_at", "der", "revoked_at",
    "revocation_reason", "replaces",
)  # fmt: skip
DEVICE_COLUMNS = ("device_id", "status", "created_at", "updated_at")
_INSERT_CERT = (
    "INSERT INTO certificates (serial, device_id, ca, label, profile, subject, sans, "
    "not_before, not_after, status, requested_via, requested_by, issued_at, der, revoked_at, "
    "revocation_reason, replaces) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# Stand-in for the certificate DER in bulk rows: nothing reads it in the queries timed
# here, and 1,000,000 real certificates would cost minutes of signing.
PLACEHOLDER_DER = b"\x30\x00"


def _sqlite_time(value: dt.datetime) -> str:
    """How SQLAlchemy stores a UTC DateTime in SQLite: ``2026-01-02 03:04:05.000000``."""
    return value.isoformat(" ", "microseconds")


@dataclass(frozen=True, slots=True)
class FillReport:
    rows: int
    devices: int
    seconds: float
    db_bytes: int


def fleet_device_id(index: int) -> str:
    """The id of the ``index``-th device that ``fill_store`` writes."""
    return f"fleet-{index:06d}"


@dataclass(frozen=True, slots=True)
class FleetRows:
    """The bulk rows of a scale run; times are naive UTC text (``_sqlite_time``), which
    SQLite stores as is and PostgreSQL reads in a session whose time zone is UTC."""

    devices: list[tuple[str, str, str, str]]  # in DEVICE_COLUMNS order
    certificates: Iterator[list[tuple[object, ...]]]  # batches, in CERTIFICATE_COLUMNS order


def fleet_rows(rows: int, *, now: dt.datetime, seed: int = 5) -> FleetRows:
    """``rows`` certificates of a few thousand devices (the same for the same arguments).

    Each device has a renewal history: a 30-day operational certificate every
    ~24 days (80 % of its lifetime, jittered) going back in time, so ``not_after``
    spreads over years with about one certificate per device expiring in any
    week; about 3 % of certificates are revoked, and the ~1 % decommissioned
    devices have all theirs revoked. Serials are random 127-bit like real ones.
    """
    rng = random.Random(seed)
    now = now.astimezone(dt.UTC).replace(tzinfo=None)
    per_device = 250
    n_devices = max(1, rows // per_device)
    statuses = []
    for d in range(n_devices):
        draw = rng.random()
        status = "decommissioned" if draw < 0.01 else "disabled" if draw < 0.03 else "active"
        statuses.append((fleet_device_id(d), status))
    created = _sqlite_time(now - dt.timedelta(days=per_device * 24 + 30))
    return FleetRows(
        devices=[(d, s, created, _sqlite_time(now)) for d, s in statuses],
        certificates=_cert_rows(rng, statuses, rows, now),
    )


def fill_store(db_file: Path, rows: int, *, now: dt.datetime, seed: int = 5) -> FillReport:
    """Add ``fleet_rows(rows)`` straight into the SQLite file. The server must not be running."""
    fleet = fleet_rows(rows, now=now, seed=seed)
    start = time.monotonic()
    db = sqlite3.connect(db_file, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=DELETE")
        db.execute("PRAGMA synchronous=OFF")
        db.execute("PRAGMA cache_size=-262144")
        indexes = db.execute(
            "SELECT name, sql FROM sqlite_master WHERE type='index' AND tbl_name='certificates' "
            "AND sql IS NOT NULL"
        ).fetchall()
        db.execute("BEGIN")
        for name, _ in indexes:
            db.execute(f'DROP INDEX "{name}"')
        db.executemany(
            "INSERT INTO devices (device_id, status, created_at, updated_at) VALUES (?, ?, ?, ?)",
            fleet.devices,
        )
        written = 0
        for batch in fleet.certificates:
            db.executemany(_INSERT_CERT, batch)
            written += len(batch)
        for _, sql in indexes:
            db.execute(sql)
        db.execute("COMMIT")
        db.execute("PRAGMA journal_mode=WAL")
    finally:
        db.close()
    # Written with synchronous=OFF: flush it now, or the kernel's write-back of
    # ≈ 400 MB competes with the scale run's fsyncs (a real store's rows are old).
    fd = os.open(db_file, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return FillReport(
        rows=written,
        devices=len(fleet.devices),
        seconds=time.monotonic() - start,
        db_bytes=db_file.stat().st_size,
    )


def _cert_rows(
    rng: random.Random, devices: list[tuple[str, str]], rows: int, now: dt.datetime
) -> Iterator[list[tuple[object, ...]]]:
    from estkit.pki.certs import serial_hex
    from estkit.pki.profiles import random_serial

    lifetime = dt.timedelta(days=30)
    batch: list[tuple[object, ...]] = []
    per_device, extra = divmod(rows, len(devices))
    for index, (device_id, device_status) in enumerate(devices):
        count = per_device + (1 if index < extra else 0)
        # The newest certificate was issued up to 24 days ago; older ones every ~24 days before.
        issued = now - dt.timedelta(seconds=rng.uniform(0, 24 * 86400))
        previous: str | None = None
        history = []
        for _ in range(count):
            history.append(issued)
            issued -= dt.timedelta(seconds=rng.gauss(24 * 86400, 86400))
        for issued_at in reversed(history):
            serial = serial_hex(random_serial())
            revoked = device_status == "decommissioned" or rng.random() < 0.03
            revoked_at = issued_at + dt.timedelta(days=rng.uniform(0, 30)) if revoked else None
            batch.append(
                (
                    serial,
                    device_id,
                    "devices",
                    LABEL,
                    "operational",
                    f"CN={device_id}",
                    "[]",
                    _sqlite_time(issued_at - dt.timedelta(minutes=5)),
                    _sqlite_time(issued_at + lifetime),
                    "revoked" if revoked else "valid",
                    "est-simplereenroll" if previous else "est-simpleenroll",
                    f"cert:{previous}" if previous else f"cert:bootstrap-{device_id}",
                    _sqlite_time(issued_at),
                    PLACEHOLDER_DER,
                    _sqlite_time(revoked_at) if revoked_at else None,
                    "superseded" if revoked else None,
                    previous,
                )
            )
            previous = serial
            if len(batch) >= 50_000:
                yield batch
                batch = []
    if batch:
        yield batch


# -- operator queries -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QueryTiming:
    name: str
    via: str  # "store" or "rest"
    median_ms: float
    max_ms: float
    rows: int
    calls: int  # queries (pages) the timed operation made

    @property
    def per_call_ms(self) -> float:
        """The median per query (per page)."""
        return self.median_ms / max(1, self.calls)


def _timed(name: str, via: str, fn: Callable[[], tuple[int, int]], repeat: int) -> QueryTiming:
    """``fn`` returns (rows, queries made)."""
    times, rows, calls = [], 0, 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        rows, calls = fn()
        times.append((time.perf_counter() - t0) * 1000)
    return QueryTiming(name, via, statistics.median(times), max(times), rows, calls)


def store_queries(database_url: str, device_id: str, *, repeat: int = 5) -> list[QueryTiming]:
    """The operator's questions through ``SqlStore`` (a fresh store: cold SQLAlchemy caches
    are warmed by the first of ``repeat`` runs, the median shows the steady state)."""
    from estkit.store import SqlStore

    store = SqlStore.open(database_url)
    now = _utcnow()
    soon = now + dt.timedelta(days=7)

    def by_device() -> tuple[int, int]:
        return len(store.list_certificates(device_id=device_id).items), 1

    def expiring() -> tuple[int, int]:
        return len(store.list_certificates(expires_before=soon, expires_after=now).items), 1

    def paging(pages: int = 10) -> tuple[int, int]:
        after, seen, calls = None, 0, 0
        for _ in range(pages):
            page = store.list_certificates(expires_before=soon, expires_after=now, after=after)
            seen, calls = seen + len(page.items), calls + 1
            after = page.next
            if after is None:
                break
        return seen, calls

    def count() -> tuple[int, int]:
        return store.count_certificates(), 1

    try:
        return [
            _timed("a device's certificates", "store", by_device, repeat),
            _timed("expiring in 7 days, first page", "store", expiring, repeat),
            _timed("expiring in 7 days, 10 pages", "store", paging, repeat),
            _timed("count all", "store", count, repeat),
        ]
    finally:
        store.close()


def rest_queries(
    server: Server, token: str, device_id: str, *, repeat: int = 5
) -> list[QueryTiming]:
    """The same through ``/api/v1/certificates`` on one keep-alive connection (no handshake)."""
    conn = HTTPSConnection("127.0.0.1", server.port, context=server.tls_context(), timeout=60)
    headers = {"Host": f"localhost:{server.port}", "Authorization": f"Bearer {token}"}
    now_iso = _utcnow().isoformat()
    soon = (_utcnow() + dt.timedelta(days=7)).isoformat()

    def get(query: dict[str, str]) -> dict[str, object]:
        conn.request(
            "GET", "/api/v1/certificates?" + urllib.parse.urlencode(query), headers=headers
        )
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"REST query {query}: {response.status} {body[:200]!r}")
        result: dict[str, object] = json.loads(body)
        return result

    def items(page: dict[str, object]) -> int:
        value = page["items"]
        assert isinstance(value, list)
        return len(value)

    def by_device() -> tuple[int, int]:
        return items(get({"device_id": device_id})), 1

    def expiring() -> tuple[int, int]:
        return items(get({"expires_before": soon, "expires_after": now_iso})), 1

    def paging(pages: int = 10) -> tuple[int, int]:
        cursor: object = None
        seen, calls = 0, 0
        for _ in range(pages):
            query = {"expires_before": soon, "expires_after": now_iso}
            if cursor:
                query["cursor"] = str(cursor)
            page = get(query)
            seen, calls = seen + items(page), calls + 1
            cursor = page.get("next")
            if not cursor:
                break
        return seen, calls

    try:
        return [
            _timed("a device's certificates", "rest", by_device, repeat),
            _timed("expiring in 7 days, first page", "rest", expiring, repeat),
            _timed("expiring in 7 days, 10 pages", "rest", paging, repeat),
        ]
    finally:
        conn.close()
