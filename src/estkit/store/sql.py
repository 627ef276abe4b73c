"""The SQL store: SQLite by default, PostgreSQL for several server nodes.

One short transaction per decision. One-time secrets are consumed with a
compare-and-set (``UPDATE … WHERE used_at IS NULL`` and a row-count check) in
the same transaction that records the certificate they paid for.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from estkit.store import schema
from estkit.store.errors import Conflict, NotFound, SchemaError
from estkit.store.models import (
    AuditEvent,
    CertificateRecord,
    CertStatus,
    Device,
    DeviceStatus,
    EnrollmentSecret,
)

HEAD_REVISION = "0001"


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


class SqlStore:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @classmethod
    def open(cls, url: str) -> SqlStore:
        """Connect; the schema must already be at HEAD_REVISION (see ``migrate``)."""
        engine = sa.create_engine(url, future=True, pool_pre_ping=not url.startswith("sqlite"))
        if engine.dialect.name == "sqlite":
            sa.event.listen(engine, "connect", _sqlite_pragmas)
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
            except sa.exc.OperationalError as exc:
                raise SchemaError("no estkit schema: run `estkit server init`") from exc
        if rev != HEAD_REVISION:
            raise SchemaError(f"database schema is at {rev}, this estkit needs {HEAD_REVISION}")

    def close(self) -> None:
        self._engine.dispose()

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        with self._engine.begin() as conn:
            yield conn

    # -- devices -----------------------------------------------------------

    def get_device(self, device_id: str) -> Device | None:
        with self._engine.connect() as conn:
            row = conn.execute(
                sa.select(schema.devices).where(schema.devices.c.device_id == device_id)
            ).first()
        return _device(row) if row else None

    def list_devices(self) -> list[Device]:
        with self._engine.connect() as conn:
            rows = conn.execute(sa.select(schema.devices).order_by(schema.devices.c.device_id))
            return [_device(r) for r in rows]

    def _ensure_device(self, conn: Connection, device_id: str, now: dt.datetime) -> None:
        """Register ``device_id`` as active unless it exists (inside the caller's transaction)."""
        exists = conn.execute(
            sa.select(schema.devices.c.device_id).where(schema.devices.c.device_id == device_id)
        ).first()
        if not exists:
            conn.execute(
                schema.devices.insert().values(
                    device_id=device_id,
                    status=DeviceStatus.ACTIVE.value,
                    created_at=now,
                    updated_at=now,
                )
            )

    def set_device_status(
        self,
        device_id: str,
        status: DeviceStatus,
        *,
        now: dt.datetime,
        audit: AuditEvent,
        revoke_reason: str | None = None,
    ) -> list[str]:
        """Change a device's status; with ``revoke_reason``, revoke its valid certificates.

        Returns the serials revoked. One transaction.
        """
        with self._tx() as conn:
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
                revoked = list(
                    conn.execute(
                        sa.select(c.serial).where(
                            c.device_id == device_id, c.status == CertStatus.VALID.value
                        )
                    ).scalars()
                )
                conn.execute(
                    schema.certificates.update()
                    .where(c.device_id == device_id, c.status == CertStatus.VALID.value)
                    .values(
                        status=CertStatus.REVOKED.value,
                        revoked_at=now,
                        revocation_reason=revoke_reason,
                    )
                )
            _insert_audit(conn, audit)
        return revoked

    # -- certificates --------------------------------------------------------

    def record_issued(
        self,
        record: CertificateRecord,
        *,
        audit: AuditEvent,
        consume_secret: int | None = None,
    ) -> None:
        """Commit an issued certificate and its audit event, in one transaction.

        ``consume_secret`` marks that enrollment secret used, compare-and-set:
        ``Conflict`` (and nothing recorded) when it was already used.
        """
        with self._tx() as conn:
            if consume_secret is not None:
                t = schema.enrollment_secrets
                res = conn.execute(
                    t.update()
                    .where(t.c.id == consume_secret, t.c.used_at.is_(None))
                    .values(used_at=record.issued_at)
                )
                if res.rowcount != 1:
                    raise Conflict("enrollment secret already used")
            self._ensure_device(conn, record.device_id, record.issued_at)
            conn.execute(schema.certificates.insert().values(**_cert_row(record)))
            _insert_audit(conn, audit)

    def get_certificate(self, serial: str) -> CertificateRecord | None:
        with self._engine.connect() as conn:
            row = conn.execute(
                sa.select(schema.certificates).where(schema.certificates.c.serial == serial)
            ).first()
        return _cert(row) if row else None

    def certificates_of(self, device_id: str) -> list[CertificateRecord]:
        c = schema.certificates.c
        with self._engine.connect() as conn:
            rows = conn.execute(
                sa.select(schema.certificates)
                .where(c.device_id == device_id)
                .order_by(c.issued_at, c.serial)
            )
            return [_cert(r) for r in rows]

    def count_certificates(self) -> int:
        with self._engine.connect() as conn:
            n = conn.execute(sa.select(sa.func.count()).select_from(schema.certificates)).scalar()
        return int(n or 0)

    def revoke_certificate(
        self, serial: str, *, reason: str, now: dt.datetime, audit: AuditEvent
    ) -> CertificateRecord:
        """Revoke one certificate; ``NotFound`` if unknown, ``Conflict`` if already revoked."""
        c = schema.certificates.c
        with self._tx() as conn:
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
            _insert_audit(conn, audit)
            row = conn.execute(sa.select(schema.certificates).where(c.serial == serial)).one()
        return _cert(row)

    # -- enrollment secrets ----------------------------------------------------

    def add_secret(
        self,
        device_id: str,
        secret_hash: bytes,
        *,
        now: dt.datetime,
        expires_at: dt.datetime,
        audit: AuditEvent,
    ) -> int:
        with self._tx() as conn:
            self._ensure_device(conn, device_id, now)
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

    def usable_secrets(self, device_id: str, *, now: dt.datetime) -> list[EnrollmentSecret]:
        t = schema.enrollment_secrets.c
        with self._engine.connect() as conn:
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
        with self._tx() as conn:
            _insert_audit(conn, event)

    def audit_events(self, *, device_id: str | None = None) -> list[AuditEvent]:
        a = schema.audit_events.c
        query = sa.select(schema.audit_events).order_by(a.id)
        if device_id is not None:
            query = query.where(a.device_id == device_id)
        with self._engine.connect() as conn:
            return [
                AuditEvent(
                    at=r.at,
                    actor=r.actor,
                    action=r.action,
                    outcome=r.outcome,
                    device_id=r.device_id,
                    serial=r.serial,
                    detail=r.detail,
                    id=r.id,
                )
                for r in conn.execute(query)
            ]


def _insert_audit(conn: Connection, event: AuditEvent) -> None:
    conn.execute(
        schema.audit_events.insert().values(
            at=event.at,
            actor=event.actor,
            action=event.action,
            outcome=event.outcome,
            device_id=event.device_id,
            serial=event.serial,
            detail=event.detail[:2000],
        )
    )


def _device(row: Any) -> Device:
    return Device(row.device_id, DeviceStatus(row.status), row.created_at, row.updated_at)


def _cert_row(r: CertificateRecord) -> dict[str, Any]:
    return {
        "serial": r.serial,
        "device_id": r.device_id,
        "ca": r.ca,
        "label": r.label,
        "profile": r.profile,
        "subject": r.subject,
        "sans": json.dumps(list(r.sans)),
        "not_before": r.not_before,
        "not_after": r.not_after,
        "status": r.status.value,
        "requested_via": r.requested_via,
        "requested_by": r.requested_by,
        "issued_at": r.issued_at,
        "der": r.der,
        "revoked_at": r.revoked_at,
        "revocation_reason": r.revocation_reason,
        "replaces": r.replaces,
    }


def _cert(row: Any) -> CertificateRecord:
    sans: Sequence[str] = json.loads(row.sans)
    return CertificateRecord(
        serial=row.serial,
        device_id=row.device_id,
        ca=row.ca,
        label=row.label,
        profile=row.profile,
        subject=row.subject,
        sans=tuple(sans),
        not_before=row.not_before,
        not_after=row.not_after,
        status=CertStatus(row.status),
        requested_via=row.requested_via,
        requested_by=row.requested_by,
        issued_at=row.issued_at,
        der=bytes(row.der),
        revoked_at=row.revoked_at,
        revocation_reason=row.revocation_reason,
        replaces=row.replaces,
    )
