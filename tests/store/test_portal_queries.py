"""The portal's aggregates (``device_states``, ``issued_per_day``, ``expiring_per_day``,
``refusals_per_day``) and the audit log newest first: counted in SQL, on both backends,
equal to counting the rows one by one."""

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
    # past 80 % of 100 days, 15 days left: renewal due; 79 % of 100 days: valid still
    record(store, "renewing", issued=NOW - 85 * DAY, lifetime=100 * DAY)
    record(store, "early", issued=NOW - 79 * DAY, lifetime=100 * DAY)
    # renewed early: the new one is before its renewal point, so the device is not due
    record(store, "renewed-early", issued=NOW - 85 * DAY, lifetime=100 * DAY)
    record(store, "renewed-early", issued=NOW - DAY, lifetime=100 * DAY)
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
    states = store.device_states(
        now=NOW, soon=NOW + week, exclude_cas=["bootstrap"], renewal_fraction=0.8
    )
    assert states == {
        (DeviceStatus.ACTIVE, "valid"): 3,
        (DeviceStatus.ACTIVE, "renewal-due"): 1,
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


def test_without_a_renewal_point_no_device_is_renewal_due(store: SqlStore) -> None:
    record(store, "old", issued=NOW - 95 * DAY, lifetime=100 * DAY)
    states = store.device_states(now=NOW, soon=NOW + dt.timedelta(days=1))
    assert states == {(DeviceStatus.ACTIVE, "valid"): 1}


def _refused(store: SqlStore, at: dt.datetime, detail: str, outcome: str = "refused") -> None:
    store.audit(AuditEvent(at=at, actor="cert:01", action="enroll", outcome=outcome, detail=detail))


def test_refusals_are_counted_per_utc_day_and_code_within_the_window(store: SqlStore) -> None:
    day0 = NOW.replace(hour=0, minute=0, second=0, microsecond=0)
    codes = ["revoked", "name-mismatch", "rate-limited"]
    _refused(store, day0 + dt.timedelta(minutes=1), "revoked: certificate 0A is revoked")
    _refused(store, day0 + dt.timedelta(hours=23), "revoked: certificate 0B is revoked")
    _refused(store, day0 - DAY, "name-mismatch: CSR CN 'x' is not the device id 'y'")
    _refused(store, day0 - DAY, "rate-limited: 6 attempts in 60 s")
    _refused(store, day0 - DAY, "API token is revoked")  # no code: other
    _refused(store, day0 - DAY, "CSRF token missing or wrong (POST /ui/x: y)")  # other, too
    _refused(store, day0 - DAY, "revoked: ok entries are not refusals", outcome="ok")
    _refused(store, day0 - 31 * DAY, "revoked: before the window")
    _refused(store, day0 + DAY, "revoked: after the window")
    counts = store.refusals_per_day(since=day0 - 29 * DAY, until=day0 + DAY, codes=codes)
    assert counts == {
        (day0.date(), "revoked"): 2,
        ((day0 - DAY).date(), "name-mismatch"): 1,
        ((day0 - DAY).date(), "rate-limited"): 1,
        ((day0 - DAY).date(), "other"): 2,
    }


def test_the_audit_log_pages_newest_first(store: SqlStore) -> None:
    for n in range(5):
        store.audit(AuditEvent(at=NOW, actor="t", action="x", outcome="ok", detail=str(n)))
    first = store.list_audit(limit=2, newest_first=True)
    assert [e.detail for e in first.items] == ["4", "3"] and first.next is not None
    second = store.list_audit(limit=2, newest_first=True, after=int(first.next))
    assert [e.detail for e in second.items] == ["2", "1"] and second.next is not None
    last = store.list_audit(limit=2, newest_first=True, after=int(second.next))
    assert [e.detail for e in last.items] == ["0"] and last.next is None
    oldest = store.list_audit(limit=2)
    assert [e.detail for e in oldest.items] == ["0", "1"]
