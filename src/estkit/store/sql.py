"""The SQL store: SQLite by default, PostgreSQL for several server nodes.

Each write is a job of one writer thread (``store/writer.py``), which commits
the jobs queued together in one short transaction; a job that fails reruns
alone. One-time secrets are consumed with a
compare-and-set (``UPDATE … WHERE used_at IS NULL`` and a row-count check) in
the same transaction that records the certificate they paid for.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection

from estkit.store import schema
from estkit.store.audit_chain import GENESIS, entry_hash
from estkit.store.checkpoints import ChainState
from estkit.store.errors import (
    Conflict,
    NotApproved,
    NotFound,
    SchemaError,
    SecretUsed,
    Unavailable,
)
from estkit.store.models import (
    ApiToken,
    AuditEvent,
    CertificateRecord,
    CertStatus,
    Device,
    DeviceStatus,
    EnrollmentSecret,
    Node,
    Page,
    PendingRequest,
    PendingStatus,
    PresentedCertificate,
)
from estkit.store.outbox import HubChange, HubOutbox, enqueue
from estkit.store.prepared import Prepared
from estkit.store.unavailable import translate_unavailable
from estkit.store.writer import GroupCommitter

HEAD_REVISION = "0006"
T = TypeVar("T")


# The statements of an enrollment's transaction and of mTLS authentication: built
# once, and on SQLite run on the DB-API connection (store/prepared.py).
_H = schema.audit_head
# Takes the write lock and reads the head in one statement (RETURNING: SQLite >= 3.35).
_LOCK_AND_READ_HEAD = Prepared(
    _H.update()
    .where(_H.c.id == 1)
    .values(last_id=_H.c.last_id)
    .returning(_H.c.last_id, _H.c.last_hash)
)
_WRITE_HEAD = Prepared(
    _H.update()
    .where(_H.c.id == 1)
    .values(last_id=sa.bindparam("new_id"), last_hash=sa.bindparam("new_hash"))
)
_INSERT_AUDIT = Prepared(
    schema.audit_events.insert(), columns=[c.key for c in schema.audit_events.c]
)
_INSERT_CERT = Prepared(
    schema.certificates.insert(), columns=[c.key for c in schema.certificates.c]
)
_INSERT_DEVICE = Prepared(schema.devices.insert(), columns=[c.key for c in schema.devices.c])
_DEVICE_EXISTS = Prepared(
    sa.select(schema.devices.c.device_id).where(schema.devices.c.device_id == sa.bindparam("dev"))
)
_C = schema.certificates.c
_PRESENTED_CERTIFICATE = Prepared(
    sa.select(_C.serial, _C.device_id, _C.ca, _C.status, _C.der, schema.devices.c.status)
    .select_from(
        schema.certificates.outerjoin(
            schema.devices, schema.devices.c.device_id == schema.certificates.c.device_id
        )
    )
    .where(schema.certificates.c.serial == sa.bindparam("serial"))
)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # WAL lets readers run beside the one writer; FULL keeps a committed
    # certificate record through a power loss, not only a process crash.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _alembic_config(connection: Connection) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    cfg.attributes["connection"] = connection
    return cfg


# -- the PostgreSQL connection pool ----------------------------------------------------

# A pooled connection unused for this long is checked with a round trip before it is
# handed out (``_ping_idle_connections``). Under load a connection goes back to work
# within milliseconds, and a ping on every checkout was a round trip per request.
IDLE_PING_AFTER = 2.0
# A connection is replaced at its first checkout after this age, so none lives for
# hours: not one that a NAT or firewall forgot while it sat idle, nor one to a server
# that a failover moved behind the same name.
RECYCLE_AFTER = 1800
# A request waits at most this long for a pooled connection (all of them busy: a slow
# or partitioned database); then it is answered 503 + Retry-After, not held or failed
# with a 500.
POOL_TIMEOUT = 10.0


class _BoundedPool(sa.pool.QueuePool):
    """A QueuePool whose "every connection busy" is ``Unavailable`` (503), like any
    other state of the database a request cannot wait out."""

    def _do_get(self) -> ConnectionPoolEntry:
        try:
            return super()._do_get()
        except sa.exc.TimeoutError as exc:
            raise Unavailable("every database connection of this process is busy") from exc


_IDLE_SINCE = "estkit_idle_since"


def _postgresql_engine(url: str, *, idle_ping_after: float) -> Engine:
    connect_args: dict[str, Any] = {
        # libpq's TCP keepalives: an idle connection still sends a packet a minute, so
        # a NAT or firewall on the way keeps its state (AWS drops it after 350 s idle,
        # Azure after 240 s), and a peer that vanished is noticed in about 90 s.
        "keepalives": 1,
        "keepalives_idle": 60,
        "keepalives_interval": 10,
        "keepalives_count": 3,
        # A database that cannot be reached is a 503 within seconds, not a request
        # hanging through TCP's SYN retries (2 min) or, mid-statement, its
        # retransmissions (15 min): libpq gives up connecting after 10 s, and on an
        # established connection once sent data stays unacknowledged for 30 s.
        "connect_timeout": 10,
        "tcp_user_timeout": 30_000,
    }
    # Those the URL sets win.
    connect_args = {k: v for k, v in connect_args.items() if k not in sa.make_url(url).query}
    # psycopg prepares a statement once it ran 5 times on a connection; PostgreSQL
    # then skips parsing it and, once it settles on a generic plan, planning it. Reads
    # run in autocommit (SqlStore.__init__), so nothing rolls back and the prepared
    # statements live as long as the connection. Measured (bench.run, simpleenroll,
    # c=32, 8 runs): CPU per enrollment 1.46-1.59x SQLite's, against 1.60-1.76x with
    # prepare_threshold=None (PostgreSQL's share 0.5-0.67 ms against 0.85-1.07 ms)
    # and 1.60-1.69x with plan_cache_mode=force_custom_plan. A schema change under a
    # running node is handled in store/unavailable.py; PgBouncer in transaction mode
    # needs >= 1.21 (max_prepared_statements).
    connect_args["prepare_threshold"] = 5
    # A server process holds a few connections (its event loop, request threads and
    # the writer thread), so many nodes and workers stay within max_connections.
    engine = sa.create_engine(
        url,
        future=True,
        poolclass=_BoundedPool,
        pool_size=5,
        max_overflow=10,
        pool_timeout=POOL_TIMEOUT,
        pool_recycle=RECYCLE_AFTER,
        connect_args=connect_args,
    )
    _ping_idle_connections(engine, idle_after=idle_ping_after)
    return engine


def _ping_idle_connections(engine: Engine, *, idle_after: float) -> None:
    """Check a pooled connection before use when it sat idle ``idle_after`` seconds.

    In place of ``pool_pre_ping``, a round trip on every checkout. A connection that
    fails the ping is replaced, and so is every connection opened before it (the
    database most likely restarted): the caller never sees it. A busier connection
    is not pinged: if the database closed it, its statement fails once, SQLAlchemy
    invalidates the pool, the request is answered 503 + Retry-After
    (``translate_unavailable``), and the next one connects afresh.
    """
    dialect = engine.dialect

    def checkin(dbapi_conn: DBAPIConnection | None, record: ConnectionPoolEntry) -> None:
        if dbapi_conn is not None:  # None: invalidated, it reconnects before its next use
            record.info[_IDLE_SINCE] = time.monotonic()

    def checkout(
        dbapi_conn: DBAPIConnection, record: ConnectionPoolEntry, _proxy: PoolProxiedConnection
    ) -> None:
        # A new connection has no mark: the record's info is cleared when it reconnects.
        since = record.info.get(_IDLE_SINCE)
        if since is None or time.monotonic() - since < idle_after:
            return
        try:
            dialect.do_ping(dbapi_conn)  # psycopg: ";" outside a transaction
        except dialect.loaded_dbapi.Error as exc:
            raise sa.exc.InvalidatePoolError(f"idle connection failed its ping: {exc}") from exc

    sa.event.listen(engine, "checkin", checkin)
    sa.event.listen(engine, "checkout", checkout)


# Set by ``SqlStore.deferred_writes``: the futures of writes queued in this context.
_DEFERRED: ContextVar[list[Future[Any]] | None] = ContextVar("estkit_deferred", default=None)


class SqlStore:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        # One-statement reads. On PostgreSQL they run in autocommit: no BEGIN and
        # ROLLBACK round trips around the SELECT (under READ COMMITTED a statement has
        # a snapshot of its own either way), and no ROLLBACK, on which psycopg drops
        # its prepared statements. On SQLite a statement is a function call, not a
        # round trip: its reads stay as they were.
        self._reader = engine
        if engine.dialect.name == "postgresql":
            self._reader = engine.execution_options(isolation_level="AUTOCOMMIT")
        # Every write goes through one writer thread per process (store/writer.py).
        self._writer = GroupCommitter(self._tx)

    @classmethod
    def open(cls, url: str, *, idle_ping_after: float = IDLE_PING_AFTER) -> SqlStore:
        """Connect; the schema must already be at HEAD_REVISION (see ``migrate``).

        ``idle_ping_after`` (PostgreSQL): seconds a pooled connection may sit unused
        before it is checked with a round trip when it is next taken
        (``_ping_idle_connections``).
        """
        if url.startswith("sqlite"):
            engine = sa.create_engine(url, future=True)
            sa.event.listen(engine, "connect", _sqlite_pragmas)
        else:
            engine = _postgresql_engine(url, idle_ping_after=idle_ping_after)
        sa.event.listen(engine, "handle_error", translate_unavailable)
        return cls(engine)

    def migrate(self) -> None:
        """Bring the schema to the newest revision (idempotent)."""
        from alembic import command

        with self._engine.begin() as conn:
            command.upgrade(_alembic_config(conn), "head")

    def check_schema(self) -> None:
        with self._engine.connect() as conn:
            try:
                rev = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
            # SQLite: "no such table" (OperationalError); PostgreSQL: UndefinedTable.
            except (sa.exc.OperationalError, sa.exc.ProgrammingError) as exc:
                raise SchemaError("no estkit schema: run `estkit server init`") from exc
        if rev != HEAD_REVISION:
            raise SchemaError(f"database schema is at {rev}, this estkit needs {HEAD_REVISION}")

    def close(self) -> None:
        self._writer.close()
        self._engine.dispose()

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        """A write transaction (the writer thread's). Its first statement takes the audit
        head's write lock, so writers of other processes queue up (SQLite: no stale
        snapshot; PostgreSQL: a row lock) and the audit hash chain stays linear.

        The head is read once and written once per transaction, however many
        entries the batch appends (``_insert_audit``).
        """
        with self._engine.begin() as conn:
            # fetchall: a RETURNING statement is finished only once its rows are read.
            rows = _LOCK_AND_READ_HEAD.execute(conn).fetchall()
            if len(rows) != 1:
                raise SchemaError("the audit chain's head row is missing")
            head = _ChainHead(*rows[0])
            conn.info[_CHAIN_HEAD] = head
            try:
                yield conn
                if head.moved:
                    _WRITE_HEAD.execute(conn, {"new_id": head.last_id, "new_hash": head.last_hash})
            finally:
                if not conn.invalidated:  # a lost connection's info is gone with it
                    del conn.info[_CHAIN_HEAD]

    def _write(self, job: Callable[[Connection], T]) -> T:
        """Run ``job`` in a committed transaction (the writer thread's) and return its result."""
        return self._writer.submit(job).result()

    def _write_or_defer(self, job: Callable[[Connection], None]) -> None:
        """``_write``, or inside ``deferred_writes`` only queue it (see there)."""
        future = self._writer.submit(job)
        pending = _DEFERRED.get()
        if pending is None:
            future.result()
        else:
            pending.append(future)

    @contextmanager
    def deferred_writes(self) -> Iterator[list[Future[Any]]]:
        """Queue ``record_issued`` and ``audit`` instead of waiting for their commit.

        For callers on an event loop, which must not wait for an fsync: the
        caller awaits every future in the list before it answers, so nothing is
        reported done before it is durable.
        """
        pending: list[Future[Any]] = []
        token = _DEFERRED.set(pending)
        try:
            yield pending
        finally:
            _DEFERRED.reset(token)

    # -- devices -----------------------------------------------------------

    def get_device(self, device_id: str) -> Device | None:
        with self._reader.connect() as conn:
            row = conn.execute(
                sa.select(schema.devices).where(schema.devices.c.device_id == device_id)
            ).first()
        return _device(row) if row else None

    def list_devices(
        self,
        *,
        status: DeviceStatus | None = None,
        search: str | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> Page[Device]:
        """Devices by id; ``search``: a part of the id, in any case."""
        d = schema.devices.c
        query = sa.select(schema.devices).order_by(d.device_id).limit(limit + 1)
        if status is not None:
            query = query.where(d.status == status.value)
        if search is not None:
            # ILIKE on PostgreSQL, lower() LIKE lower() on SQLite; % and _ match themselves.
            query = query.where(d.device_id.icontains(search, autoescape=True))
        if after is not None:
            query = query.where(d.device_id > after)
        with self._reader.connect() as conn:
            rows = conn.execute(query).all()
        items = tuple(_device(r) for r in rows[:limit])
        return Page(items, items[-1].device_id if len(rows) > limit else None)

    def add_device(
        self,
        device_id: str,
        *,
        now: dt.datetime,
        audit: AuditEvent,
        hub: HubChange | None = None,
    ) -> None:
        """Register a device; ``Conflict`` when it exists. ``hub``: for the IoT Hub
        outbox, in the same transaction (store/outbox.py), as in the methods below."""

        def job(conn: Connection) -> None:
            if not self._ensure_device(conn, device_id, now):
                raise Conflict(f"device {device_id!r} already exists")
            enqueue(conn, hub, now)
            _insert_audit(conn, audit)

        self._write(job)

    def _ensure_device(self, conn: Connection, device_id: str, now: dt.datetime) -> bool:
        """Register ``device_id`` as active unless it exists (inside the caller's transaction)."""
        exists = _DEVICE_EXISTS.execute(conn, {"dev": device_id}).fetchone() is not None
        if not exists:
            _INSERT_DEVICE.execute(
                conn,
                {
                    "device_id": device_id,
                    "status": DeviceStatus.ACTIVE.value,
                    "created_at": now,
                    "updated_at": now,
                },
            )
        return not exists

    def set_device_status(
        self,
        device_id: str,
        status: DeviceStatus,
        *,
        now: dt.datetime,
        audit: AuditEvent,
        revoke_reason: str | None = None,
        hub: HubChange | None = None,
    ) -> list[str]:
        """Change a device's status; with ``revoke_reason``, revoke its valid certificates.

        Returns the serials revoked. One transaction.
        """

        def job(conn: Connection) -> list[str]:
            res = conn.execute(
                schema.devices.update()
                .where(schema.devices.c.device_id == device_id)
                .values(status=status.value, updated_at=now)
            )
            if res.rowcount != 1:
                raise NotFound(f"no device {device_id!r}")
            revoked: list[str] = []
            if revoke_reason is not None:
                c = schema.certificates.c
                rows = conn.execute(
                    sa.select(c.serial, c.ca).where(
                        c.device_id == device_id, c.status == CertStatus.VALID.value
                    )
                ).all()
                revoked = [r.serial for r in rows]
                for ca in sorted({r.ca for r in rows}):  # sorted: one lock order on every node
                    _bump_crl_revision(conn, ca, now)
                conn.execute(
                    schema.certificates.update()
                    .where(c.device_id == device_id, c.status == CertStatus.VALID.value)
                    .values(
                        status=CertStatus.REVOKED.value,
                        revoked_at=now,
                        revocation_reason=revoke_reason,
                    )
                )
            event = audit
            if revoked:
                event = replace(audit, detail=f"revoked ({revoke_reason}): {', '.join(revoked)}")
            enqueue(conn, hub, now)
            _insert_audit(conn, event)
            return revoked

        return self._write(job)

    # -- certificates --------------------------------------------------------

    def record_issued(
        self,
        record: CertificateRecord,
        *,
        audit: AuditEvent,
        consume_secret: int | None = None,
        pending_id: int | None = None,
        hub: HubChange | None = None,
    ) -> None:
        """Commit an issued certificate and its audit event, in one transaction.

        ``consume_secret`` marks that enrollment secret used, compare-and-set:
        ``Conflict`` (and nothing recorded) when it was already used.
        """

        def job(conn: Connection) -> None:
            if consume_secret is not None:
                t = schema.enrollment_secrets
                res = conn.execute(
                    t.update()
                    .where(t.c.id == consume_secret, t.c.used_at.is_(None))
                    .values(used_at=record.issued_at)
                )
                if res.rowcount != 1:
                    raise SecretUsed("enrollment secret already used")
            self._ensure_device(conn, record.device_id, record.issued_at)
            _INSERT_CERT.execute(conn, _cert_row(record))
            if pending_id is not None:
                p = schema.pending_requests
                res = conn.execute(
                    p.update()
                    .where(p.c.id == pending_id, p.c.status == PendingStatus.APPROVED.value)
                    .values(status=PendingStatus.ISSUED.value, serial=record.serial)
                )
                if res.rowcount != 1:
                    raise NotApproved("pending request is no longer approved")
            enqueue(conn, hub, record.issued_at)
            _insert_audit(conn, audit)

        self._write_or_defer(job)

    def get_certificate(self, serial: str) -> CertificateRecord | None:
        with self._reader.connect() as conn:
            row = conn.execute(
                sa.select(schema.certificates).where(schema.certificates.c.serial == serial)
            ).first()
        return _cert(row) if row else None

    def presented_certificate(self, serial: str) -> PresentedCertificate | None:
        """A certificate's record and its device's status, in one query (the mTLS hot path)."""
        with self._reader.connect() as conn:
            row = _PRESENTED_CERTIFICATE.execute(conn, {"serial": serial}).fetchone()
        if row is None:
            return None
        serial, device_id, ca, status, der, device_status = row
        return PresentedCertificate(
            serial=serial,
            device_id=device_id,
            ca=ca,
            status=CertStatus(status),
            der=bytes(der),
            device_status=DeviceStatus(device_status) if device_status else None,
        )

    def certificates_of(self, device_id: str) -> list[CertificateRecord]:
        c = schema.certificates.c
        with self._reader.connect() as conn:
            rows = conn.execute(
                sa.select(schema.certificates)
                .where(c.device_id == device_id)
                .order_by(c.issued_at, c.serial)
            )
            return [_cert(r) for r in rows]

    def count_certificates(self) -> int:
        with self._reader.connect() as conn:
            n = conn.execute(sa.select(sa.func.count()).select_from(schema.certificates)).scalar()
        return int(n or 0)

    def list_certificates(
        self,
        *,
        device_id: str | None = None,
        status: CertStatus | None = None,
        expires_before: dt.datetime | None = None,
        expires_after: dt.datetime | None = None,
        ca: str | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> Page[CertificateRecord]:
        c = schema.certificates.c
        query = sa.select(schema.certificates).order_by(c.serial).limit(limit + 1)
        if device_id is not None:
            query = query.where(c.device_id == device_id)
        if status is not None:
            query = query.where(c.status == status.value)
        if expires_before is not None:
            query = query.where(c.not_after < expires_before)
        if expires_after is not None:
            query = query.where(c.not_after >= expires_after)
        if ca is not None:
            query = query.where(c.ca == ca)
        if after is not None:
            query = query.where(c.serial > after)
        with self._reader.connect() as conn:
            rows = conn.execute(query).all()
        items = tuple(_cert(r) for r in rows[:limit])
        return Page(items, items[-1].serial if len(rows) > limit else None)

    def revoked_certificates(self, ca: str) -> list[tuple[str, dt.datetime, str]]:
        """(serial, revoked at, reason) of every revoked certificate of ``ca``, for its CRL."""
        c = schema.certificates.c
        query = sa.select(c.serial, c.revoked_at, c.revocation_reason).where(
            c.ca == ca, c.status == CertStatus.REVOKED.value
        )
        with self._reader.connect() as conn:
            return [(r.serial, r.revoked_at, r.revocation_reason) for r in conn.execute(query)]

    def revoke_certificate(
        self, serial: str, *, reason: str, now: dt.datetime, audit: AuditEvent
    ) -> CertificateRecord:
        """Revoke one certificate; ``NotFound`` if unknown, ``Conflict`` if already revoked."""
        c = schema.certificates.c

        def job(conn: Connection) -> CertificateRecord:
            res = conn.execute(
                schema.certificates.update()
                .where(c.serial == serial, c.status == CertStatus.VALID.value)
                .values(status=CertStatus.REVOKED.value, revoked_at=now, revocation_reason=reason)
            )
            if res.rowcount != 1:
                row = conn.execute(sa.select(c.status).where(c.serial == serial)).first()
                raise (
                    NotFound(f"no certificate {serial}")
                    if row is None
                    else Conflict(f"certificate {serial} is already revoked")
                )
            row = conn.execute(sa.select(schema.certificates).where(c.serial == serial)).one()
            _bump_crl_revision(conn, row.ca, now)
            _insert_audit(conn, replace(audit, device_id=row.device_id))
            return _cert(row)

        return self._write(job)

    # -- CRL state (shared by every node) -------------------------------------------

    def crl_revisions(self) -> dict[str, int]:
        """Each CA's revocation revision: bumped in the transaction of every revocation."""
        s = schema.crl_state.c
        with self._reader.connect() as conn:
            return {r.ca: r.revision for r in conn.execute(sa.select(s.ca, s.revision))}

    def next_crl(
        self, ca: str, *, floor: int, now: dt.datetime
    ) -> tuple[int, int, list[tuple[str, dt.datetime, str]]]:
        """Take ``ca``'s next CRL number: (number, revision, revoked entries), one transaction.

        The number is ``max(last number, floor) + 1`` in one upsert statement, so it
        increases across nodes (RFC 5280 5.2.3) and never falls below ``floor`` (the
        number this node last published, from before numbers were kept here). The
        upsert holds the CA's row lock, and every revocation bumps that row, so the
        entries read after it are exactly those of the revision returned.
        """

        def job(conn: Connection) -> tuple[int, int, list[tuple[str, dt.datetime, str]]]:
            t = schema.crl_state
            greatest = sa.func.greatest if conn.dialect.name == "postgresql" else sa.func.max
            stmt = _upsert(conn, t).values(ca=ca, revision=0, number=floor + 1, updated_at=now)
            stmt = stmt.on_conflict_do_update(
                index_elements=[t.c.ca],
                set_={"number": greatest(t.c.number, floor) + 1, "updated_at": now},
            ).returning(t.c.number, t.c.revision)
            number, revision = conn.execute(stmt).one()
            c = schema.certificates.c
            entries = conn.execute(
                sa.select(c.serial, c.revoked_at, c.revocation_reason).where(
                    c.ca == ca, c.status == CertStatus.REVOKED.value
                )
            )
            revoked = [(r.serial, r.revoked_at, r.revocation_reason) for r in entries]
            return int(number), int(revision), revoked

        return self._write(job)

    # -- pending requests --------------------------------------------------------

    def find_pending(self, label: str, device_id: str, csr_sha256: str) -> PendingRequest | None:
        """The newest request for this CSR from this device on this label."""
        p = schema.pending_requests.c
        with self._reader.connect() as conn:
            row = conn.execute(
                sa.select(schema.pending_requests)
                .where(p.label == label, p.device_id == device_id, p.csr_sha256 == csr_sha256)
                .order_by(p.id.desc())
                .limit(1)
            ).first()
        return _pending(row) if row else None

    def add_pending(
        self,
        *,
        label: str,
        device_id: str,
        csr_sha256: str,
        operation: str,
        requested_by: str,
        now: dt.datetime,
        audit: AuditEvent,
    ) -> PendingRequest:
        def job(conn: Connection) -> int:
            res = conn.execute(
                schema.pending_requests.insert().values(
                    label=label,
                    device_id=device_id,
                    csr_sha256=csr_sha256,
                    operation=operation,
                    requested_by=requested_by,
                    status=PendingStatus.PENDING.value,
                    created_at=now,
                )
            )
            key = res.inserted_primary_key
            assert key is not None
            _insert_audit(conn, replace(audit, detail=f"pending request {key[0]}"))
            return int(key[0])

        request_id: int = self._write(job)
        return PendingRequest(
            id=request_id,
            label=label,
            device_id=device_id,
            csr_sha256=csr_sha256,
            operation=operation,
            requested_by=requested_by,
            status=PendingStatus.PENDING,
            created_at=now,
        )

    def decide_pending(
        self,
        request_id: int,
        status: PendingStatus,
        *,
        by: str,
        reason: str | None,
        now: dt.datetime,
        audit: AuditEvent,
    ) -> PendingRequest:
        """Approve or deny, compare-and-set on ``pending``: ``NotFound`` / ``Conflict``."""
        p = schema.pending_requests.c

        def job(conn: Connection) -> PendingRequest:
            res = conn.execute(
                schema.pending_requests.update()
                .where(p.id == request_id, p.status == PendingStatus.PENDING.value)
                .values(status=status.value, decided_at=now, decided_by=by, reason=reason)
            )
            row = conn.execute(sa.select(schema.pending_requests).where(p.id == request_id)).first()
            if row is None:
                raise NotFound(f"no pending request {request_id}")
            if res.rowcount != 1:
                raise Conflict(f"request {request_id} is already {row.status}")
            _insert_audit(conn, audit)
            return _pending(row)

        return self._write(job)

    def list_pending(
        self, *, status: PendingStatus | None = None, after: int | None = None, limit: int = 100
    ) -> Page[PendingRequest]:
        p = schema.pending_requests.c
        query = sa.select(schema.pending_requests).order_by(p.id).limit(limit + 1)
        if status is not None:
            query = query.where(p.status == status.value)
        if after is not None:
            query = query.where(p.id > after)
        with self._reader.connect() as conn:
            rows = conn.execute(query).all()
        items = tuple(_pending(r) for r in rows[:limit])
        return Page(items, str(items[-1].id) if len(rows) > limit else None)

    # -- API tokens ------------------------------------------------------------------

    def add_token(
        self,
        *,
        name: str,
        token_hash: str,
        scopes: frozenset[str],
        created_by: str,
        now: dt.datetime,
        expires_at: dt.datetime | None,
        audit: AuditEvent,
    ) -> None:
        t = schema.api_tokens.c

        def job(conn: Connection) -> None:
            if conn.execute(sa.select(t.id).where(t.name == name)).first():
                raise Conflict(f"a token named {name!r} exists")
            conn.execute(
                schema.api_tokens.insert().values(
                    name=name,
                    token_hash=token_hash,
                    scopes=" ".join(sorted(scopes)),
                    created_at=now,
                    created_by=created_by,
                    expires_at=expires_at,
                )
            )
            _insert_audit(conn, audit)

        self._write(job)

    def find_token(self, token_hash: str) -> ApiToken | None:
        t = schema.api_tokens.c
        with self._reader.connect() as conn:
            row = conn.execute(
                sa.select(schema.api_tokens).where(t.token_hash == token_hash)
            ).first()
        return _token(row) if row else None

    def list_tokens(self) -> list[ApiToken]:
        with self._reader.connect() as conn:
            rows = conn.execute(sa.select(schema.api_tokens).order_by(schema.api_tokens.c.name))
            return [_token(r) for r in rows]

    def revoke_token(self, name: str, *, now: dt.datetime, audit: AuditEvent) -> None:
        t = schema.api_tokens.c

        def job(conn: Connection) -> None:
            res = conn.execute(
                schema.api_tokens.update()
                .where(t.name == name, t.revoked_at.is_(None))
                .values(revoked_at=now)
            )
            if res.rowcount != 1:
                exists = conn.execute(sa.select(t.id).where(t.name == name)).first()
                raise (
                    NotFound(f"no token {name!r}")
                    if exists is None
                    else Conflict(f"token {name!r} is already revoked")
                )
            _insert_audit(conn, audit)

        self._write(job)

    def token_used(self, token_id: int, *, now: dt.datetime, audit: AuditEvent) -> None:
        t = schema.api_tokens.c

        def job(conn: Connection) -> None:
            conn.execute(
                schema.api_tokens.update().where(t.id == token_id).values(last_used_at=now)
            )
            _insert_audit(conn, audit)

        self._write(job)

    # -- enrollment secrets ----------------------------------------------------

    def add_secret(
        self,
        device_id: str,
        secret_hash: bytes,
        *,
        now: dt.datetime,
        expires_at: dt.datetime,
        audit: AuditEvent,
        replace: bool = False,
        hub: HubChange | None = None,
    ) -> int:
        """Store a new enrollment secret's hash; ``replace`` expires the device's others."""

        def job(conn: Connection) -> int:
            self._ensure_device(conn, device_id, now)
            enqueue(conn, hub, now)
            if replace:  # the new secret is the only usable one
                t = schema.enrollment_secrets
                conn.execute(
                    t.update()
                    .where(t.c.device_id == device_id, t.c.used_at.is_(None), t.c.expires_at > now)
                    .values(expires_at=now)
                )
            res = conn.execute(
                schema.enrollment_secrets.insert().values(
                    device_id=device_id,
                    secret_hash=secret_hash,
                    created_at=now,
                    expires_at=expires_at,
                )
            )
            _insert_audit(conn, audit)
            key = res.inserted_primary_key
            assert key is not None
            return int(key[0])

        return self._write(job)

    def usable_secrets(self, device_id: str, *, now: dt.datetime) -> list[EnrollmentSecret]:
        t = schema.enrollment_secrets.c
        with self._reader.connect() as conn:
            rows = conn.execute(
                sa.select(schema.enrollment_secrets).where(
                    t.device_id == device_id, t.used_at.is_(None), t.expires_at > now
                )
            )
            return [
                EnrollmentSecret(r.id, r.device_id, r.secret_hash, r.expires_at, r.used_at)
                for r in rows
            ]

    # -- audit -------------------------------------------------------------------

    def audit(self, event: AuditEvent) -> None:
        def job(conn: Connection) -> None:
            _insert_audit(conn, event)

        self._write_or_defer(job)

    def list_audit(
        self,
        *,
        since: dt.datetime | None = None,
        actor: str | None = None,
        device_id: str | None = None,
        serial: str | None = None,
        action: str | None = None,
        outcome: str | None = None,
        after: int | None = None,
        limit: int = 100,
        newest_first: bool = False,
    ) -> Page[AuditEvent]:
        """Entries in id order (``newest_first``: the reverse); ``after`` is the previous
        page's ``next``, the entries past it in that order."""
        a = schema.audit_events.c
        order = a.id.desc() if newest_first else a.id
        query = sa.select(schema.audit_events).order_by(order).limit(limit + 1)
        if since is not None:
            query = query.where(a.at >= since)
        for column, value in (
            (a.actor, actor),
            (a.device_id, device_id),
            (a.serial, serial),
            (a.action, action),
            (a.outcome, outcome),
        ):
            if value is not None:
                query = query.where(column == value)
        if after is not None:
            query = query.where(a.id < after if newest_first else a.id > after)
        with self._reader.connect() as conn:
            rows = conn.execute(query).all()
        items = tuple(_audit(r) for r in rows[:limit])
        return Page(items, str(items[-1].id) if len(rows) > limit else None)

    def verify_audit_chain(self) -> tuple[int, int | None, str]:
        """Recompute the chain: (entries checked, first broken id or None, why).

        The head and the entries are read in one snapshot: an entry another process or
        node commits meanwhile is simply not seen, never mistaken for a cut."""
        a = schema.audit_events.c
        prev, expected_id, checked = GENESIS, 1, 0
        with self._snapshot() as conn:
            head = conn.execute(sa.select(schema.audit_head)).one()
            for row in conn.execute(sa.select(schema.audit_events).order_by(a.id)):
                if row.id != expected_id:
                    return checked, expected_id, f"entry {expected_id} is missing"
                if row.prev_hash != prev:
                    return checked, row.id, "its previous-hash does not match the entry before it"
                if entry_hash(prev, _audit(row), row.id) != row.entry_hash:
                    return checked, row.id, "its content does not match its hash"
                prev, expected_id, checked = row.entry_hash, expected_id + 1, checked + 1
        if head.last_id < checked:
            rewound = f"the stored head was rewound to entry {head.last_id}, but entries go on"
            return head.last_id, head.last_id + 1, f"{rewound} to {checked}"
        if head.last_id != checked or head.last_hash != prev:
            return checked, checked + 1, "entries after the last one present were removed"
        return checked, None, ""

    def audit_head(self) -> tuple[int, int, str]:
        """The chain's head for a checkpoint (``store/checkpoints.py``): (entries up to
        it, its entry's id, its hash), in one statement."""
        h, a = schema.audit_head.c, schema.audit_events.c
        count = sa.select(sa.func.count()).where(a.id <= h.last_id).scalar_subquery()
        with self._reader.connect() as conn:
            row = conn.execute(sa.select(count, h.last_id, h.last_hash)).one()
        return int(row[0]), int(row[1]), str(row[2])

    def audit_chain_state(self, ids: Collection[int]) -> ChainState:
        """The head, the newest entry, and each of ``ids``' hash and count of entries up to
        it, in one snapshot and one pass over the entries' ids and hashes."""
        a = schema.audit_events.c
        wanted = sorted(set(ids))
        hashes: dict[int, str] = {}
        counts: dict[int, int] = {}
        count, last_id, at = 0, None, 0
        with self._snapshot() as conn:
            head = conn.execute(sa.select(schema.audit_head)).one()
            for row in conn.execute(sa.select(a.id, a.entry_hash).order_by(a.id)):
                while at < len(wanted) and wanted[at] < row.id:
                    counts[wanted[at]] = count
                    at += 1
                count, last_id = count + 1, row.id
                if at < len(wanted) and wanted[at] == row.id:
                    hashes[row.id], counts[row.id] = row.entry_hash, count
                    at += 1
        counts.update((i, count) for i in wanted[at:])
        return ChainState(head.last_id, head.last_hash, last_id, hashes, counts)

    @contextmanager
    def _snapshot(self) -> Iterator[Connection]:
        """A connection whose reads all see one snapshot (the audit chain's checks)."""
        with self._engine.connect() as conn:
            if conn.dialect.name == "sqlite":
                conn.exec_driver_sql("BEGIN")  # pysqlite opens no transaction for reads
            else:
                conn.execution_options(isolation_level="REPEATABLE READ")
            yield conn

    # -- the IoT Hub outbox ------------------------------------------------------

    def hub_outbox(self) -> HubOutbox:
        """The IoT Hub registry changes the device changes above left to be sent."""
        return HubOutbox(self._engine)

    def outbox_backlog(self) -> int:
        """How many changes the hub's registry has not taken: pending or failed."""
        return self.hub_outbox().waiting()

    # -- nodes -------------------------------------------------------------------
    # Heartbeats are not decisions: no audit entry, and their own short transaction
    # outside the writer thread, so a slow batch of enrollments never delays one.

    def claim_node(self, node: Node, *, stale_before: dt.datetime) -> Node | None:
        """Register ``node`` under its name, unless another node holds the name; None when
        registered, else the holder.

        A row of the same name is replaced when it has the same public URL (this node
        restarted, or another worker process of it) or when its last heartbeat is before
        ``stale_before`` (a node that stopped may be taken over). One statement, so two
        nodes claiming one name at once cannot both win.
        """
        t = schema.nodes
        values = {f.name: getattr(node, f.name) for f in dataclasses.fields(Node)}
        with self._engine.begin() as conn:
            claimed = conn.execute(
                _upsert(conn, t)
                .values(**values)
                .on_conflict_do_update(
                    index_elements=[t.c.name],
                    set_={k: v for k, v in values.items() if k != "name"},
                    where=sa.or_(t.c.public_url == node.public_url, t.c.last_seen < stale_before),
                )
                .returning(t.c.name)  # no row: the WHERE kept the holder's
            )
            if claimed.first() is not None:
                return None
            row = conn.execute(sa.select(t).where(t.c.name == node.name)).one()
        return _node(row)

    def node_seen(self, name: str, *, public_url: str, now: dt.datetime) -> bool:
        """Move the last_seen of node ``name`` at ``public_url`` to ``now``; False if no
        such row (never registered, or the name was taken over by another node)."""
        t = schema.nodes
        with self._engine.begin() as conn:
            res = conn.execute(
                t.update()
                .where(t.c.name == name, t.c.public_url == public_url)
                .values(last_seen=now)
            )
        return res.rowcount == 1

    def list_nodes(self) -> list[Node]:
        """Every registered node, by region then name."""
        t = schema.nodes
        with self._reader.connect() as conn:
            rows = conn.execute(sa.select(t).order_by(t.c.region, t.c.name)).all()
        return [_node(r) for r in rows]

    # -- the operator portal (server/portal): aggregates, one statement each -----------

    def get_token_by_id(self, token_id: int) -> ApiToken | None:
        """The API token of a portal session, by its primary key."""
        t = schema.api_tokens.c
        with self._reader.connect() as conn:
            row = conn.execute(sa.select(schema.api_tokens).where(t.id == token_id)).first()
        return _token(row) if row else None

    def device_states(
        self,
        *,
        now: dt.datetime,
        soon: dt.datetime,
        exclude_cas: Sequence[str] = (),
        renewal_fraction: float = 1.0,
    ) -> dict[tuple[DeviceStatus, str], int]:
        """Devices counted by (device status, certificate state), in one query.

        The certificate state of a device, from its certificates of CAs other than
        ``exclude_cas`` (the bootstrap CA's, which only authenticate to EST):
        ``never-enrolled`` (none), ``valid`` (one valid past ``soon``, before its
        renewal point), ``renewal-due`` (valid past ``soon``, but every valid one is
        past ``renewal_fraction`` of its lifetime), ``expiring`` (the last valid one
        ends between ``now`` and ``soon``), ``expired`` (valid ones, all ended),
        ``revoked`` (all revoked).

        Only the certificates not yet ended are grouped (the indexed range on
        ``not_after``: about one a device, however long its history); a device with
        none is told apart by two indexed lookups of its own. No row reaches Python.
        """
        c = schema.certificates.c
        d = schema.devices.c
        kept = [c.ca.not_in(list(exclude_cas))] if exclude_cas else []
        with self._reader.connect() as conn:
            begins, ends = _epoch(conn, c.not_before), _epoch(conn, c.not_after)
            renew_at = begins + (ends - begins) * renewal_fraction
            # Materialized first, so that the planner reads them by the range on
            # not_after rather than every certificate in device order for the grouping.
            rows_live = (
                sa.select(
                    c.device_id.label("device_id"),
                    c.not_after.label("not_after"),
                    renew_at.label("renew_at"),
                )
                .where(c.not_after > now, c.status == CertStatus.VALID.value, *kept)
                .cte("live_certificates")
                .prefix_with("MATERIALIZED")
            )
            live = (
                sa.select(
                    rows_live.c.device_id,
                    sa.func.max(rows_live.c.not_after).label("until"),
                    sa.func.max(rows_live.c.renew_at).label("renew_at"),
                )
                .group_by(rows_live.c.device_id)
                .subquery()
            )

            def has(*where: sa.ColumnElement[bool]) -> sa.Exists:
                mine = c.device_id == d.device_id
                return sa.exists(sa.select(1).select_from(schema.certificates).where(mine, *where))

            until = sa.type_coerce(live.c.until, schema.UtcDateTime())
            state = sa.case(
                (until > soon, sa.case((live.c.renew_at <= now.timestamp(), "renewal-due"),
                                       else_="valid")),
                (until.is_not(None), "expiring"),
                (has(c.status == CertStatus.VALID.value, *kept), "expired"),
                (has(*kept), "revoked"),
                else_="never-enrolled",
            ).label("state")  # fmt: skip
            query = (
                sa.select(d.status, state, sa.func.count().label("n"))
                .select_from(schema.devices.outerjoin(live, live.c.device_id == d.device_id))
                .group_by(d.status, state)
            )
            rows = conn.execute(query).all()
        return {(DeviceStatus(r.status), str(r.state)): int(r.n) for r in rows}

    def issued_per_day(self, *, since: dt.datetime, until: dt.datetime) -> dict[dt.date, int]:
        """Certificates issued per UTC day in [since, until), grouped in SQL.

        ``issued_at`` has no index of its own; a certificate issued since ``since`` ends
        after it, so the indexed range ``not_after >= since`` bounds the rows read to the
        certificates alive in the window, not the whole history.
        """
        c = schema.certificates.c
        return self._per_day(
            c.issued_at, c.not_after >= since, c.issued_at >= since, c.issued_at < until
        )

    def expiring_per_day(self, *, since: dt.datetime, until: dt.datetime) -> dict[dt.date, int]:
        """Valid certificates whose validity ends per UTC day in [since, until) (indexed)."""
        c = schema.certificates.c
        return self._per_day(
            c.not_after,
            c.not_after >= since,
            c.not_after < until,
            c.status == CertStatus.VALID.value,
        )

    def refusals_per_day(
        self, *, since: dt.datetime, until: dt.datetime, codes: Collection[str]
    ) -> dict[tuple[dt.date, str], int]:
        """Refused decisions per UTC day in [since, until) and refusal code, grouped in
        SQL. An entry's code is its detail up to the first ``": "`` (the authority writes
        ``"<code>: <reason>"``); a refusal whose detail starts with none of ``codes``
        (a refused API token, a CSRF refusal) counts as ``"other"``. The rows read are
        bounded by the indexed range on ``at``."""
        a = schema.audit_events.c
        with self._reader.connect() as conn:
            if conn.dialect.name == "postgresql":
                prefix: sa.ColumnElement[Any] = sa.func.split_part(a.detail, ": ", 1)
            else:
                prefix = sa.func.substr(a.detail, 1, sa.func.instr(a.detail, ": ") - 1)
            code = sa.case((prefix.in_(sorted(codes)), prefix), else_="other").label("code")
            day = _utc_day(conn, a.at)
            query = (
                sa.select(day, code, sa.func.count().label("n"))
                .where(a.at >= since, a.at < until, a.outcome == "refused")
                .group_by(day, code)
            )
            rows = conn.execute(query).all()
        return {(_as_date(r.day), str(r.code)): int(r.n) for r in rows}

    def _per_day(
        self, column: sa.ColumnElement[dt.datetime], *where: sa.ColumnElement[bool]
    ) -> dict[dt.date, int]:
        with self._reader.connect() as conn:
            day = _utc_day(conn, column)
            query = (
                sa.select(day, sa.func.count().label("n"))
                .select_from(schema.certificates)
                .where(*where)
                .group_by(day)
            )
            rows = conn.execute(query).all()
        return {_as_date(r.day): int(r.n) for r in rows}


def _utc_day(conn: Connection, column: sa.ColumnElement[dt.datetime]) -> sa.ColumnElement[Any]:
    """The UTC day of a timestamp column, as the dialect can say it (labelled ``day``)."""
    if conn.dialect.name == "postgresql":
        return sa.cast(sa.func.timezone("UTC", column), sa.Date).label("day")
    return sa.func.date(column).label("day")  # stored as UTC text: its first ten characters


def _as_date(value: dt.date | str) -> dt.date:
    return value if isinstance(value, dt.date) else dt.date.fromisoformat(value)


def _epoch(conn: Connection, column: sa.ColumnElement[dt.datetime]) -> sa.ColumnElement[float]:
    """A timestamp column in seconds since the epoch, for arithmetic in SQL."""
    if conn.dialect.name == "postgresql":
        return sa.cast(sa.extract("epoch", column), sa.Float)
    # SQLite keeps UTC text, which julianday() reads: days since noon, 4714 BC.
    return (sa.func.julianday(column) - 2440587.5) * 86400.0


@dataclass(slots=True)
class _ChainHead:
    """The audit chain's end inside one write transaction (``SqlStore._tx``)."""

    last_id: int
    last_hash: str
    moved: bool = False


_CHAIN_HEAD = "estkit_audit_head"


def _node(row: Any) -> Node:
    return Node(row.name, row.region, row.public_url, row.started_at, row.last_seen, row.version)


def _upsert(conn: Connection, table: sa.Table) -> Any:
    """``INSERT … ON CONFLICT`` of this connection's dialect (SQLite and PostgreSQL)."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table)
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table)


def _bump_crl_revision(conn: Connection, ca: str, now: dt.datetime) -> None:
    """A revocation of ``ca`` happened in this transaction: every node's CRL poller
    sees the new revision and republishes (server/crl_http.py)."""
    t = schema.crl_state
    conn.execute(
        _upsert(conn, t)
        .values(ca=ca, revision=1, number=0, updated_at=now)
        .on_conflict_do_update(
            index_elements=[t.c.ca], set_={"revision": t.c.revision + 1, "updated_at": now}
        )
    )


def _insert_audit(conn: Connection, event: AuditEvent) -> None:
    """Append one entry to the hash chain (inside ``_tx``, which holds the head lock)."""
    head: _ChainHead = conn.info[_CHAIN_HEAD]
    event = replace(event, at=event.at.astimezone(dt.UTC), detail=event.detail[:2000])
    entry_id = head.last_id + 1
    digest = entry_hash(head.last_hash, event, entry_id)
    _INSERT_AUDIT.execute(
        conn,
        {
            "id": entry_id,
            "at": event.at,
            "actor": event.actor,
            "action": event.action,
            "outcome": event.outcome,
            "device_id": event.device_id,
            "serial": event.serial,
            "detail": event.detail,
            "prev_hash": head.last_hash,
            "entry_hash": digest,
        },
    )
    head.last_id, head.last_hash, head.moved = entry_id, digest, True


def _audit(row: Any) -> AuditEvent:
    return AuditEvent(
        at=row.at,
        actor=row.actor,
        action=row.action,
        outcome=row.outcome,
        device_id=row.device_id,
        serial=row.serial,
        detail=row.detail,
        id=row.id,
    )


def _pending(row: Any) -> PendingRequest:
    return PendingRequest(
        id=row.id,
        label=row.label,
        device_id=row.device_id,
        csr_sha256=row.csr_sha256,
        operation=row.operation,
        requested_by=row.requested_by,
        status=PendingStatus(row.status),
        created_at=row.created_at,
        decided_at=row.decided_at,
        decided_by=row.decided_by,
        reason=row.reason,
        serial=row.serial,
    )


def _token(row: Any) -> ApiToken:
    return ApiToken(
        id=row.id,
        name=row.name,
        token_hash=row.token_hash,
        scopes=frozenset(row.scopes.split()),
        created_at=row.created_at,
        created_by=row.created_by,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
        last_used_at=row.last_used_at,
    )


def _device(row: Any) -> Device:
    return Device(row.device_id, DeviceStatus(row.status), row.created_at, row.updated_at)


# The record's fields are the table's columns; only these differ in how they are stored.
_CERT_FIELDS = tuple(f.name for f in dataclasses.fields(CertificateRecord))


def _cert_row(r: CertificateRecord) -> dict[str, Any]:
    row = {name: getattr(r, name) for name in _CERT_FIELDS}
    row["sans"] = json.dumps(list(r.sans))
    row["status"] = r.status.value
    return row


def _cert(row: Any) -> CertificateRecord:
    values = {name: getattr(row, name) for name in _CERT_FIELDS}
    sans: Sequence[str] = json.loads(row.sans)
    values["sans"] = tuple(sans)
    values["status"] = CertStatus(row.status)
    values["der"] = bytes(row.der)
    return CertificateRecord(**values)
