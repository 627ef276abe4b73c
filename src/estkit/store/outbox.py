"""The IoT Hub outbox: what the hub's identity registry is to learn, kept until it has.

A row is written by ``enqueue`` inside the transaction of the device change that
causes it (``SqlStore.set_device_status``, ``record_issued``, …), so a change that
committed is never lost, whatever happens to the process or the hub afterwards. A
row names the state the device's identity is to have (``enabled`` or ``disabled``),
not a step: sending it twice is harmless, and a newer row of the same device
supersedes the older ones not sent yet.

A sender (``server/hubsync.py``) claims one row at a time with a lease
(``HubOutbox.claim``): several nodes may send, none sends a row another holds, and
a device's rows go out one after the other. A row ends ``done``, ``failed`` (the
registry refused it for good: kept with its last error until retried) or
``superseded``; a transient failure leaves it ``pending`` with its next attempt
scheduled.

Outside the writer thread, like the node heartbeats: these statements are not
decisions, write no audit entry and are one statement a transaction each.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from estkit.store import schema

_T = schema.hub_outbox
_C = _T.c
# A row's last error is kept to this many characters.
ERROR_MAX = 2000


class HubStatus(StrEnum):
    """A device identity's status in the hub's registry."""

    ENABLED = "enabled"
    DISABLED = "disabled"


class OutboxState(StrEnum):
    PENDING = "pending"  # to be sent (again) at next_attempt_at
    DONE = "done"  # the registry has it
    FAILED = "failed"  # refused for good; kept with its last error until retried
    SUPERSEDED = "superseded"  # a newer change of the same device came before it was sent


# Rows the registry has not taken (yet).
_WAITING = (OutboxState.PENDING.value, OutboxState.FAILED.value)


@dataclass(frozen=True, slots=True)
class HubChange:
    """The state a device's identity is to have in the hub's registry, and why."""

    device_id: str
    status: HubStatus
    cause: str  # the audit action that made it: device-disable, provision, …


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    id: int
    change: HubChange
    state: OutboxState
    created_at: dt.datetime
    attempts: int
    next_attempt_at: dt.datetime
    last_attempt_at: dt.datetime | None
    last_error: str | None
    done_at: dt.datetime | None


@dataclass(frozen=True, slots=True)
class Backlog:
    """What is waiting: the count and oldest of the pending rows, the failed ones (up to
    the limit asked for) and the newest row the registry took."""

    pending: int
    oldest_pending: OutboxEntry | None
    failed: tuple[OutboxEntry, ...]
    failed_count: int
    last_success: OutboxEntry | None


def enqueue(conn: Connection, change: HubChange | None, now: dt.datetime) -> None:
    """Add ``change`` in the caller's transaction (nothing for None); the device's rows
    not sent yet, pending or failed, are superseded by it.

    An identity is never queued ``enabled`` for a device that is not active by the time
    this transaction holds its row: a provisioning that checked the device before a
    disable committed must not supersede that disable (the row lock makes a concurrent
    disable wait, or be seen)."""
    if change is None:
        return
    if change.status is HubStatus.ENABLED:
        d = schema.devices
        status = conn.execute(
            sa.select(d.c.status).where(d.c.device_id == change.device_id).with_for_update()
        ).scalar()
        if status is not None and status != "active":
            change = HubChange(change.device_id, HubStatus.DISABLED, change.cause)
    conn.execute(
        _T.update()
        .where(_C.device_id == change.device_id, _C.state.in_(_WAITING))
        .values(state=OutboxState.SUPERSEDED.value)
    )
    conn.execute(
        _T.insert().values(
            device_id=change.device_id,
            hub_status=change.status.value,
            cause=change.cause,
            state=OutboxState.PENDING.value,
            created_at=now,
            attempts=0,
            next_attempt_at=now,
        )
    )


class HubOutbox:
    """The outbox's rows, for its senders and for ``estkit iothub sync``."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def due(self, *, now: dt.datetime) -> bool:
        """Whether a row is due: a read, so an idle sender takes no write lock."""
        query = sa.select(_C.id).where(
            _C.state == OutboxState.PENDING.value, _C.next_attempt_at <= now
        )
        with self._engine.connect() as conn:
            return conn.execute(query.limit(1)).first() is not None

    def claim(
        self,
        *,
        owner: str,
        now: dt.datetime,
        lease: dt.timedelta,
        due_only: bool = True,
        after: int = 0,
    ) -> OutboxEntry | None:
        """Take the oldest pending row (due at ``now``, unless not ``due_only``; id above
        ``after``) for ``lease``, counting the attempt; None when there is none.

        A row is skipped while another row of its device is held, so a device's changes
        reach the registry in order. One statement: on PostgreSQL the row is chosen
        ``FOR UPDATE SKIP LOCKED``, so nodes claiming at once take different rows; on
        SQLite the statement runs under the database's one write lock.
        """
        # Aliases: a subquery naming the UPDATE's own table would be correlated to it.
        row, held = _T.alias("candidate"), _T.alias("held")
        choice = (
            sa.select(row.c.id)
            .where(
                row.c.state == OutboxState.PENDING.value,
                row.c.id > after,
                sa.or_(row.c.lease_until.is_(None), row.c.lease_until < now),
                ~sa.exists().where(
                    held.c.device_id == row.c.device_id,
                    held.c.id != row.c.id,
                    held.c.lease_until >= now,
                ),
            )
            .order_by(row.c.id)
            .limit(1)
        )
        if due_only:
            choice = choice.where(row.c.next_attempt_at <= now)
        if self._engine.dialect.name == "postgresql":
            choice = choice.with_for_update(skip_locked=True, of=row)
        stmt = (
            _T.update()
            .where(_C.id == choice.scalar_subquery())
            .values(
                lease_until=now + lease,
                lease_owner=owner,
                attempts=_C.attempts + 1,
                last_attempt_at=now,
            )
            .returning(*_T.c)
        )
        with self._engine.begin() as conn:
            claimed = conn.execute(stmt).first()
        return _entry(claimed) if claimed is not None else None

    def sent(self, entry_id: int, *, owner: str, now: dt.datetime) -> bool:
        """The registry took the row ``owner`` holds: ``done`` (a superseded one stays
        superseded). False when the lease was lost meanwhile."""
        return self._release(
            entry_id,
            owner,
            state=_unless_superseded(OutboxState.DONE),
            done_at=now,
        )

    def retry_later(self, entry_id: int, *, owner: str, error: str, at: dt.datetime) -> bool:
        """A transient failure: pending again from ``at``, with its error."""
        return self._release(entry_id, owner, next_attempt_at=at, last_error=error[:ERROR_MAX])

    def failed(self, entry_id: int, *, owner: str, error: str) -> bool:
        """Refused for good: ``failed`` with its error, until ``retry_failed``."""
        return self._release(
            entry_id,
            owner,
            state=_unless_superseded(OutboxState.FAILED),
            last_error=error[:ERROR_MAX],
        )

    def holds(self, entry_id: int, *, owner: str, now: dt.datetime) -> bool:
        """Whether ``owner`` still holds row ``entry_id``, pending and not superseded:
        asked before every write to the registry, so a sender that stalled past its
        lease, or whose change a newer one replaced, writes nothing stale."""
        query = sa.select(_C.id).where(
            _C.id == entry_id,
            _C.lease_owner == owner,
            _C.lease_until > now,
            _C.state == OutboxState.PENDING.value,
        )
        with self._engine.connect() as conn:
            return conn.execute(query).first() is not None

    def let_go(self, entry_id: int, *, owner: str) -> bool:
        """Release the row without a verdict (it was superseded while being sent)."""
        return self._release(entry_id, owner)

    def _release(self, entry_id: int, owner: str, **values: Any) -> bool:
        with self._engine.begin() as conn:
            res = conn.execute(
                _T.update()
                .where(_C.id == entry_id, _C.lease_owner == owner)
                .values(lease_until=None, lease_owner=None, **values)
            )
        return res.rowcount == 1

    def take_back(self, *, owner_prefix: str) -> int:
        """Release the rows held by owners whose name starts with ``owner_prefix``: a node
        that restarts takes back what it held when it stopped, rather than waiting for
        the lease to run out. How many."""
        with self._engine.begin() as conn:
            res = conn.execute(
                _T.update()
                .where(_C.lease_owner.startswith(owner_prefix, autoescape=True))
                .values(lease_until=None, lease_owner=None)
            )
        return int(res.rowcount)

    def retry_failed(self, *, now: dt.datetime) -> int:
        """Every failed row pending again, due at ``now``; how many."""
        with self._engine.begin() as conn:
            res = conn.execute(
                _T.update()
                .where(_C.state == OutboxState.FAILED.value)
                .values(state=OutboxState.PENDING.value, next_attempt_at=now)
            )
        return int(res.rowcount)

    def waiting(self) -> int:
        """How many rows are pending or failed (one count on the state index)."""
        query = sa.select(sa.func.count()).select_from(_T).where(_C.state.in_(_WAITING))
        with self._engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def backlog(self, *, limit: int = 100) -> Backlog:
        """The pending count and oldest, up to ``limit`` failed rows (oldest first), and
        the row most recently sent."""
        pending = _C.state == OutboxState.PENDING.value
        failed = _C.state == OutboxState.FAILED.value
        with self._engine.connect() as conn:
            counts: dict[str, int] = dict(
                conn.execute(
                    sa.select(_C.state, sa.func.count())
                    .where(_C.state.in_(_WAITING))
                    .group_by(_C.state)
                ).all()
            )
            oldest = conn.execute(sa.select(_T).where(pending).order_by(_C.id).limit(1)).first()
            failed_rows = conn.execute(
                sa.select(_T).where(failed).order_by(_C.id).limit(limit)
            ).all()
            last = conn.execute(
                sa.select(_T)
                .where(_C.done_at.is_not(None))
                .order_by(_C.done_at.desc(), _C.id.desc())
                .limit(1)
            ).first()
        return Backlog(
            pending=int(counts.get(OutboxState.PENDING.value, 0)),
            oldest_pending=_entry(oldest) if oldest is not None else None,
            failed=tuple(_entry(r) for r in failed_rows),
            failed_count=int(counts.get(OutboxState.FAILED.value, 0)),
            last_success=_entry(last) if last is not None else None,
        )

    def entries(self, device_id: str) -> list[OutboxEntry]:
        """Every row of one device, oldest first."""
        with self._engine.connect() as conn:
            rows = conn.execute(
                sa.select(_T).where(_C.device_id == device_id).order_by(_C.id)
            ).all()
        return [_entry(r) for r in rows]


def _unless_superseded(state: OutboxState) -> sa.ColumnElement[str]:
    """``state``, but a row superseded while it was being sent stays superseded."""
    superseded = OutboxState.SUPERSEDED.value
    return sa.case((_C.state == superseded, superseded), else_=state.value)


def _entry(row: Any) -> OutboxEntry:
    return OutboxEntry(
        id=int(row.id),
        change=HubChange(row.device_id, HubStatus(row.hub_status), row.cause),
        state=OutboxState(row.state),
        created_at=row.created_at,
        attempts=int(row.attempts),
        next_attempt_at=row.next_attempt_at,
        last_attempt_at=row.last_attempt_at,
        last_error=row.last_error,
        done_at=row.done_at,
    )
