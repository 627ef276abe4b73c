"""``python -m bench.portal``: the server time of every portal page on a store of
1,000,000 certificates, the slowest page and the slowest query.

A fresh data directory (``estkit server init``, SQLite) is filled as the scale step of
``bench.run`` fills it (``fleet.fill_store``: devices with a renewal history of 30-day
certificates), plus the audit log such a fleet leaves: one entry per certificate at
its issuance, and refusals over the last 30 days, in one valid hash chain. The portal
is then served in-process (its routes, the authority and the store exactly as
``estkit server run`` builds them) and each page is asked for ``--repeat`` times by a
signed-in admin over ASGI: the time from request to the last byte of the answer is the
server's time, without TLS or network. Every SQL statement a page runs is timed too
(SQLAlchemy's cursor events). The figures go to stdout and to
``bench/results/portal-<UTC time>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import random
import re
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.routing import Mount, Router

from bench import fleet

RESULTS = Path(__file__).parent / "results"
PAGE_MS_MAX = 300.0  # issue 14: every page within 300 ms of server time at 1M certificates
# Refusals per day in the last 30 days, and the codes they are spread over.
REFUSALS_PER_DAY = 400
REFUSAL_CODES = (
    "revoked", "expired", "name-mismatch", "rate-limited", "unknown-certificate",
    "secret-invalid", "subject-changed", "disabled",
)  # fmt: skip
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@dataclass(frozen=True, slots=True)
class PageTiming:
    name: str
    path: str
    status: int
    median_ms: float
    max_ms: float
    queries: int  # SQL statements per request
    slowest_query_ms: float  # the median time of its slowest statement
    slowest_query: str


@dataclass
class Statements:
    """Every SQL statement run while ``recording``: (text, seconds)."""

    recording: bool = False
    seen: list[tuple[str, float]] = field(default_factory=list)
    _started: dict[int, float] = field(default_factory=dict)

    def before(self, conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        self._started[id(cursor)] = time.perf_counter()

    def after(self, conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        started = self._started.pop(id(cursor), None)
        if self.recording and started is not None:
            self.seen.append((" ".join(statement.split()), time.perf_counter() - started))

    @contextmanager
    def record(self) -> Iterator[list[tuple[str, float]]]:
        self.seen = []
        self.recording = True
        try:
            yield self.seen
        finally:
            self.recording = False


# -- the store ----------------------------------------------------------------------------


def fill_audit(db_file: Path, *, now: dt.datetime, seed: int = 7) -> int:
    """The audit log of the certificates in ``db_file``: an ``enroll``/``reenroll`` entry
    per certificate at its issuance, and ``REFUSALS_PER_DAY`` refusals a day over the last
    30 days, in time order, chained from the log's head as the store chains them."""
    from estkit.store import AuditEvent
    from estkit.store.audit_chain import entry_hash

    rng = random.Random(seed)
    db = sqlite3.connect(db_file, isolation_level=None)
    try:
        db.execute("PRAGMA synchronous=OFF")
        last_id, last_hash = db.execute("SELECT last_id, last_hash FROM audit_head").fetchone()
        issued = db.execute(
            "SELECT issued_at, device_id, serial, requested_via, requested_by FROM certificates "
            "WHERE der = ?",  # the bulk rows: the pool's certificates are audited already
            (fleet.PLACEHOLDER_DER,),
        ).fetchall()
        events: list[tuple[str, str, str, str, str | None, str | None, str]] = [
            (at, by, "reenroll" if via.endswith("reenroll") else "enroll", "ok", dev, ser, "")
            for at, dev, ser, via, by in issued
        ]
        start = now - dt.timedelta(days=30)
        for n in range(REFUSALS_PER_DAY * 30):
            at = start + dt.timedelta(seconds=rng.uniform(0, 30 * 86400))
            code = rng.choice(REFUSAL_CODES)
            device = fleet.fleet_device_id(rng.randrange(max(1, len(issued) // 250)))
            events.append(
                (
                    fleet._sqlite_time(at.astimezone(dt.UTC).replace(tzinfo=None)),
                    f"cert:{n:032X}",
                    "reenroll",
                    "refused",
                    device,
                    None,
                    f"{code}: refused by the bench",
                )
            )
        events.sort(key=lambda e: e[0])
        db.execute("BEGIN")
        rows = []
        for at_text, actor, action, outcome, device_id, serial, detail in events:
            last_id += 1
            at = dt.datetime.fromisoformat(at_text).replace(tzinfo=dt.UTC)
            event = AuditEvent(at, actor, action, outcome, device_id, serial, detail)
            digest = entry_hash(last_hash, event, last_id)
            rows.append((last_id, at_text, actor, action, outcome, device_id, serial, detail,
                         last_hash, digest))  # fmt: skip
            last_hash = digest
            if len(rows) >= 50_000:
                _insert_audit(db, rows)
                rows = []
        _insert_audit(db, rows)
        db.execute("UPDATE audit_head SET last_id = ?, last_hash = ?", (last_id, last_hash))
        db.execute("COMMIT")
    finally:
        db.close()
    return len(events)


def _insert_audit(db: sqlite3.Connection, rows: Sequence[tuple[object, ...]]) -> None:
    db.executemany(
        "INSERT INTO audit_events (id, at, actor, action, outcome, device_id, serial, detail, "
        "prev_hash, entry_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        rows,
    )


def analyze(db_file: Path) -> None:
    """``ANALYZE``, as a long-running store has statistics for its planner."""
    db = sqlite3.connect(db_file, isolation_level=None)
    try:
        db.execute("ANALYZE")
    finally:
        db.close()


# -- the portal ---------------------------------------------------------------------------


class Browser:
    """A signed-in admin over ASGI (https base URL, so the Secure cookies come back)."""

    def __init__(self, app: Any) -> None:
        self._transport = httpx.ASGITransport(app=app)
        self._cookies = httpx.Cookies()

    def request(self, method: str, path: str, **kwargs: Any) -> tuple[httpx.Response, float]:
        async def call() -> tuple[httpx.Response, float]:
            async with httpx.AsyncClient(
                transport=self._transport, base_url="https://bench.test", cookies=self._cookies
            ) as client:
                started = time.perf_counter()
                answer = await client.request(method, path, **kwargs)
                await answer.aread()
                elapsed = time.perf_counter() - started
                self._cookies = client.cookies
                return answer, elapsed

        return asyncio.run(call())

    def sign_in(self, token: str) -> None:
        form, _ = self.request("GET", "/ui/login")
        csrf = _CSRF.search(form.text)
        assert csrf is not None
        answer, _ = self.request(
            "POST", "/ui/login", data={"csrf": csrf[1], "token": token, "next": "/ui/"}
        )
        if answer.status_code != 303:
            raise RuntimeError(f"sign-in: {answer.status_code} {answer.text[:200]}")


def portal_app(data_dir: Path) -> Starlette:
    """The portal's routes over the store, as ``server/app.py`` mounts them."""
    from estkit.ca.tokens import TokenService
    from estkit.server.config import load_config
    from estkit.server.nodes import stale_after
    from estkit.server.portal import PORTAL_PATH, Portal, SessionSigner, load_or_create_key
    from estkit.server.wiring import build_authority, open_store

    config = load_config(data_dir)
    store = open_store(config)
    portal = Portal(
        authority=build_authority(config, store),
        store=store,
        config=config,
        tokens=TokenService(store),
        signer=SessionSigner(load_or_create_key(config.data_dir)),
        clock=lambda: dt.datetime.now(dt.UTC),
        stale_after=stale_after(10.0),
    )
    return Starlette(routes=[Mount(PORTAL_PATH, app=Router(portal.routes()))])


def pages(data_dir: Path) -> dict[str, str]:
    """Every page, with a device, a certificate and a filter each of the list pages takes."""
    db = sqlite3.connect(data_dir / "estkit.db")
    try:
        (fleet_devices,) = db.execute(
            "SELECT count(*) FROM devices WHERE device_id LIKE 'fleet-%'"
        ).fetchone()
        device = fleet.fleet_device_id(min(42, fleet_devices - 1))  # as bench.run's scale step
        # A certificate the pool's device was really issued (bulk rows hold a placeholder).
        (serial,) = db.execute(
            "SELECT serial FROM certificates WHERE der != ? AND label = ? LIMIT 1",
            (fleet.PLACEHOLDER_DER, fleet.LABEL),
        ).fetchone()
        (total,) = db.execute("SELECT count(*) FROM certificates").fetchone()
        (cursor,) = db.execute(
            "SELECT serial FROM certificates ORDER BY serial LIMIT 1 OFFSET ?", (total // 2,)
        ).fetchone()
    finally:
        db.close()
    since = (dt.datetime.now(dt.UTC) - dt.timedelta(days=1)).date().isoformat()
    return {
        "dashboard": "/ui/",
        "CAs": "/ui/cas",
        "CA devices": "/ui/cas/devices",
        "certificates": "/ui/certificates",
        "certificates, a page deep": f"/ui/certificates?after={cursor}",
        "certificates of a device": f"/ui/certificates?device={device}",
        "certificates, valid": "/ui/certificates?status=valid",
        "certificates, revoked": "/ui/certificates?status=revoked",
        "certificates, expiring in 7 d": "/ui/certificates?expiring_within=7",
        "certificates, of a CA": "/ui/certificates?ca=devices",
        "certificate": f"/ui/certificates/{serial}",
        "certificate PEM": f"/ui/certificates/{serial}/cert.pem",
        "revoke (confirm)": f"/ui/certificates/{serial}/revoke",
        "devices": "/ui/devices",
        "devices, search": f"/ui/devices?search={device[:-2]}",
        "devices, disabled": "/ui/devices?status=disabled",
        "device": f"/ui/devices/{device}",
        "decommission (confirm)": f"/ui/devices/{device}/decommission",
        "approvals": "/ui/approvals",
        "audit (newest first)": "/ui/audit",
        "audit, oldest first": "/ui/audit?order=oldest",
        "audit, refused": "/ui/audit?outcome=refused",
        "audit, of a device": f"/ui/audit?device={device}",
        "audit, of an actor": "/ui/audit?actor=ui:nobody",
        "audit, of a serial": f"/ui/audit?serial={serial}",
        "audit, since yesterday": f"/ui/audit?since={since}",
        "audit, refused since yesterday": f"/ui/audit?outcome=refused&since={since}",
        "API tokens": "/ui/tokens",
        "sign-in page": "/ui/login",
    }


def time_pages(
    browser: Browser, statements: Statements, targets: dict[str, str], repeat: int
) -> list[PageTiming]:
    timings = []
    for name, path in targets.items():
        times: list[float] = []
        per_statement: dict[str, list[float]] = defaultdict(list)
        status, queries = 0, 0
        for _ in range(repeat):
            with statements.record() as seen:
                answer, elapsed = browser.request("GET", path)
            status = answer.status_code
            times.append(elapsed * 1000)
            queries = len(seen)
            for text, seconds in seen:
                per_statement[text].append(seconds * 1000)
        slowest = max(per_statement.items(), key=lambda kv: statistics.median(kv[1]), default=None)
        timings.append(
            PageTiming(
                name=name,
                path=path,
                status=status,
                median_ms=statistics.median(times),
                max_ms=max(times),
                queries=queries,
                slowest_query_ms=statistics.median(slowest[1]) if slowest else 0.0,
                slowest_query=slowest[0] if slowest else "",
            )
        )
        print(
            f"{name:32} {status:4} {statistics.median(times):9.1f} {max(times):9.1f} "
            f"{queries:4} {timings[-1].slowest_query_ms:9.1f}",
            flush=True,
        )
    return timings


def query_plans(db_file: Path, timings: list[PageTiming]) -> dict[str, list[str]]:
    """SQLite's plan of each page's slowest statement (literal parameters are not in the
    text; the plan is of the statement as prepared)."""
    db = sqlite3.connect(db_file)
    plans: dict[str, list[str]] = {}
    try:
        for t in timings:
            if not t.slowest_query or t.slowest_query in plans:
                continue
            params = [None] * t.slowest_query.count("?")
            try:
                rows = db.execute(f"EXPLAIN QUERY PLAN {t.slowest_query}", params).fetchall()
            except sqlite3.Error as exc:
                plans[t.slowest_query] = [f"(no plan: {exc})"]
                continue
            plans[t.slowest_query] = [str(r[-1]) for r in rows]
    finally:
        db.close()
    return plans


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.portal", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="certificates (default 1,000,000)")
    p.add_argument("--repeat", type=int, default=5, help="requests per page (default 5)")
    p.add_argument("--output", type=Path, default=None, help="JSON path (default bench/results/)")
    p.add_argument("--keep", action="store_true", help="keep the data directory")
    p.add_argument(
        "--chain",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the audit chain's verification (/ui/audit/chain)",
    )
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="estkit-bench-portal-"))
    data_dir = work / "server"
    started = time.monotonic()
    try:
        fleet.init_server(data_dir, port=fleet.free_port(), crl_port=fleet.free_port())
        fleet.make_pool(data_dir, work / "devices", 2)  # certificates with real DER
        db_file = data_dir / "estkit.db"
        now = dt.datetime.now(dt.UTC)
        print(f"portal: writing {args.rows:,} certificates into {db_file} ...", flush=True)
        fill = fleet.fill_store(db_file, args.rows, now=now)
        audit = fill_audit(db_file, now=now)
        analyze(db_file)
        print(
            f"portal: {fill.rows:,} certificates of {fill.devices:,} devices and {audit:,} "
            f"audit entries written in {time.monotonic() - started:.0f} s "
            f"(database {db_file.stat().st_size / 2**20:.0f} MB)",
            flush=True,
        )
        token = fleet.estkit(
            "token", "create", "--data-dir", data_dir, "--name", "bench", "--scope", "admin"
        ).split()[-1]
        statements = Statements()
        sa.event.listen(sa.engine.Engine, "before_cursor_execute", statements.before)
        sa.event.listen(sa.engine.Engine, "after_cursor_execute", statements.after)
        browser = Browser(portal_app(data_dir))
        browser.sign_in(token)
        targets = pages(data_dir)
        print(f"{'page':32} {'HTTP':>4} {'median ms':>9} {'max ms':>9} {'SQL':>4} {'slowest':>9}")
        browser.request("GET", "/ui/")  # the first request's template compilation aside
        timings = time_pages(browser, statements, targets, args.repeat)
        chain: dict[str, object] | None = None
        if args.chain:  # once: it reads every entry
            answer, elapsed = browser.request("GET", "/ui/audit/chain")
            status = re.search(r'data-testid="chain-status">([^<]*)<', answer.text)
            chain = {
                "status": answer.status_code,
                "ms": round(elapsed * 1000, 1),
                "says": " ".join(status[1].split()) if status else "",
            }
            print(f"{'audit chain (on request)':32} {answer.status_code:4} {elapsed * 1000:9.1f}")
            print(f"portal: {chain['says']}", flush=True)
        bad = [t for t in timings if t.status != 200]
        slowest = max(timings, key=lambda t: t.median_ms)
        slowest_query = max(timings, key=lambda t: t.slowest_query_ms)
        over = [t for t in timings if t.median_ms > PAGE_MS_MAX]
        print(
            f"portal: slowest page {slowest.name} {slowest.median_ms:.1f} ms; slowest query "
            f"{slowest_query.slowest_query_ms:.1f} ms ({slowest_query.name}); "
            f"{len(over)} page(s) over {PAGE_MS_MAX:.0f} ms",
            flush=True,
        )
        plans = query_plans(db_file, [t for t in timings if t.slowest_query_ms >= 10.0])
        for statement, plan in plans.items():
            print(f"plan of {statement[:160]}{'…' if len(statement) > 160 else ''}")
            for line in plan:
                print(f"    {line}")
        report = {
            "rows": fill.rows,
            "devices": fill.devices,
            "audit_entries": audit,
            "repeat": args.repeat,
            "pages": [asdict(t) for t in timings],
            "audit_chain": chain,
            "slowest_page": slowest.name,
            "slowest_query": {"page": slowest_query.name, "sql": slowest_query.slowest_query},
            "over_limit": [t.name for t in over],
            "plans": plans,
            "python": sys.version.split()[0],
            "total_seconds": round(time.monotonic() - started, 1),
        }
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        output = args.output or RESULTS / f"portal-{stamp}.json"
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=2) + "\n")
        print(f"portal: results in {output}")
        if bad:
            print(f"portal: pages that did not answer 200: {[t.name for t in bad]}")
            return 1
        return 0
    finally:
        if args.keep:
            print(f"portal: data directory kept in {data_dir}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
