"""The portal's aggregates (``device_states``, ``issued_per_day``, ``expiring_per_day``):
counted in SQL, on both backends, equal to counting the rows one by one."""

from __future__ import annotations

import datetime as dt
import itertools

import pytest

from estkit.store import AuditEvent, CertificateRecord, CertStatus, DeviceStatus, SqlStore

NOW = dt.datetime(2026, 12, 10, 15, 30, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)
_serials = itertools.count(0x1000)


def record(
    store: SqlStore,
    device_id: str,
    *,
    issued: dt.datetime,
    lifetime: dt.timedelta,
    ca: str = "devices",
    status: CertStatus = CertStatus.VALID,
) -> CertificateRecord:
    r = CertificateRecord(
        serial=f"{next(_serials):X}",
        device_id=device_id,
        ca=ca,
        label=None if ca == "bootstrap" else "devices",
        profile="operational",
        subject=f"CN={device_id}",
        sans=(),
        not_before=issued,
        not_after=issued + lifetime,
        status=status,
        requested_via="test",
        requested_by="test",
        issued_at=issued,
        der=b"not a certificate",
    )
    store.record_issued(r, audit=AuditEvent(at=issued, actor="test", action="enroll", outcome="ok"))
    return r


def test_device_states_count_each_device_once_by_its_latest_valid_certificate(
    store: SqlStore,
) -> None:
    week = dt.timedelta(days=7)
    # valid: an old one expired, a new one valid for 30 days
    record(store, "renewed", issued=NOW - 40 * DAY, lifetime=30 * DAY)
    record(store, "renewed", issued=NOW - DAY, lifetime=30 * DAY)
    record(store, "due", issued=NOW - 28 * DAY, lifetime=30 * DAY)  # ends in 2 days
    record(store, "lapsed", issued=NOW - 40 * DAY, lifetime=30 * DAY)
    record(store, "cut-off", issued=NOW - DAY, lifetime=30 * DAY, status=CertStatus.REVOKED)
    # a bootstrap certificate alone is not an enrollment
    record(store, "factory-only", issued=NOW - DAY, lifetime=3650 * DAY, ca="bootstrap")
    store.add_device(
        "registered", now=NOW, audit=AuditEvent(at=NOW, actor="t", action="add", outcome="ok")
    )
    store.set_device_status(
        "cut-off",
        DeviceStatus.DECOMMISSIONED,
        now=NOW,
        audit=AuditEvent(at=NOW, actor="t", action="x", outcome="ok"),
    )
    states = store.device_states(now=NOW, soon=NOW + week, exclude_cas=["bootstrap"])
    assert states == {
        (DeviceStatus.ACTIVE, "valid"): 1,
        (DeviceStatus.ACTIVE, "expiring"): 1,
        (DeviceStatus.ACTIVE, "expired"): 1,
        (DeviceStatus.DECOMMISSIONED, "revoked"): 1,
        (DeviceStatus.ACTIVE, "never-enrolled"): 2,
    }


def test_issued_and_expiring_per_day_are_grouped_by_utc_day_within_the_window(
    store: SqlStore,
) -> None:
    day0 = NOW.replace(hour=0, minute=0, second=0, microsecond=0)
    issued = [
        (day0 - 3 * DAY + dt.timedelta(hours=1), 10 * DAY),
        (day0 - 3 * DAY + dt.timedelta(hours=23, minutes=59), 10 * DAY),
        (day0 - DAY, 2 * DAY),
        (day0 + dt.timedelta(hours=2), 5 * DAY),
        (day0 - 40 * DAY, 365 * DAY),  # before the window
    ]
    for n, (at, lifetime) in enumerate(issued):
        record(store, f"d{n}", issued=at, lifetime=lifetime)
    record(store, "gone", issued=day0 - DAY, lifetime=3 * DAY, status=CertStatus.REVOKED)

    per_day = store.issued_per_day(since=day0 - 29 * DAY, until=day0 + DAY)
    assert per_day == {
        (day0 - 3 * DAY).date(): 2,
        (day0 - DAY).date(): 2,
        day0.date(): 1,
    }
    expiring = store.expiring_per_day(since=NOW, until=day0 + 30 * DAY)
    assert expiring == {
        (day0 + DAY).date(): 1,  # issued yesterday for 2 days; the revoked one is not counted
        (day0 + 5 * DAY).date(): 1,
        (day0 + 7 * DAY).date(): 2,
    }


@pytest.mark.parametrize("known", [True, False], ids=["ok/known", "ok/unknown-is-none"])
def test_a_token_is_found_by_its_id(store: SqlStore, known: bool) -> None:
    store.add_token(
        name="ops",
        token_hash="ab" * 32,
        scopes=frozenset({"read"}),
        created_by="test",
        now=NOW,
        expires_at=None,
        audit=AuditEvent(at=NOW, actor="t", action="token-create", outcome="ok"),
    )
    (token,) = store.list_tokens()
    found = store.get_token_by_id(token.id if known else token.id + 1)
    assert found == (token if known else None)
