"""The authority on a real store (SQLite, then PostgreSQL), no server: the refusals that
need stored facts, one audit entry per decision with its code, and store errors
translated once."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography import x509

from backends import sqlite_only
from caenv import NOW, Cas, make_csr, refused
from estkit.ca.authority import Authority
from estkit.ca.errors import Code, Refusal
from estkit.ca.policy import Principal
from estkit.ca.tokens import TokenService
from estkit.pki.keys import PrivateKey, generate_key
from estkit.store import CertStatus, DeviceStatus, SqlStore

Auth = Authority[SqlStore]


def last_audit(store: SqlStore) -> tuple[str, str]:
    entry = store.list_audit(limit=1000).items[-1]
    return entry.outcome, entry.detail


def bootstrap(authority: Auth, device_id: str = "dev-1") -> tuple[x509.Certificate, Principal]:
    """A bootstrap certificate issued locally, then presented as a client certificate."""
    issued = authority.issue_bootstrap(
        make_csr(generate_key("ec-p256"), device_id), device_id=device_id, actor="t", now=NOW
    )
    who = authority.authenticate_certificate(issued.certificate, now=NOW)
    return issued.certificate, who


def test_a_refusal_is_audited_once_with_its_code(authority: Auth, store: SqlStore) -> None:
    _, who = bootstrap(authority)
    before = len(store.list_audit(limit=1000).items)
    refused(
        Code.NAME_MISMATCH,
        lambda: authority.enroll(
            authority.labels["devices"], make_csr(generate_key("ec-p256"), "dev-2"), who, now=NOW
        ),
    )
    entries = store.list_audit(limit=1000).items[before:]
    assert [(e.outcome, e.detail.split(":")[0]) for e in entries] == [("refused", "name-mismatch")]


def test_secret_invalid_for_wrong_unknown_and_used_secrets(
    authority: Auth, key: PrivateKey
) -> None:
    secret = authority.add_device("dev-1", actor="t", now=NOW)
    refused(Code.SECRET_INVALID, lambda: authority.authenticate_secret("dev-1", "x", now=NOW))
    refused(Code.SECRET_INVALID, lambda: authority.authenticate_secret("nobody", "x", now=NOW))
    who = authority.authenticate_secret("dev-1", secret, now=NOW)
    label = authority.labels["devices"]
    authority.enroll(label, make_csr(key), who, now=NOW)
    # The same principal again: the one-time secret was consumed (compare-and-set).
    refused(Code.SECRET_INVALID, lambda: authority.enroll(label, make_csr(key), who, now=NOW))
    refused(Code.SECRET_INVALID, lambda: authority.authenticate_secret("dev-1", secret, now=NOW))


def test_a_basic_username_that_is_no_device_id_is_refused_without_being_stored(
    authority: Auth, store: SqlStore
) -> None:
    long_name = "x" * 30_000
    refused(Code.SECRET_INVALID, lambda: authority.authenticate_secret(long_name, "s", now=NOW))
    entry = store.list_audit(limit=1000).items[-1]
    assert (entry.actor, entry.device_id, entry.outcome) == ("secret:?", None, "refused")
    assert long_name not in entry.detail


@pytest.mark.parametrize(
    ("status", "code"),
    [(DeviceStatus.DISABLED, Code.DISABLED), (DeviceStatus.DECOMMISSIONED, Code.DECOMMISSIONED)],
    ids=["disabled", "decommissioned"],
)
def test_lifecycle_refusals_of_a_presented_certificate(
    authority: Auth, status: DeviceStatus, code: Code
) -> None:
    cert, _ = bootstrap(authority)
    authority.set_device_status("dev-1", status, actor="t", now=NOW)
    refused(code, lambda: authority.authenticate_certificate(cert, now=NOW))


def test_revoked_certificate(authority: Auth) -> None:
    cert, who = bootstrap(authority)
    assert who.cert_serial is not None
    authority.revoke(who.cert_serial, reason="keyCompromise", actor="t", now=NOW)
    refused(Code.REVOKED, lambda: authority.authenticate_certificate(cert, now=NOW))
    # Revoking twice: the state does not allow it.
    refused(
        Code.CONFLICT,
        lambda: authority.revoke(who.cert_serial or "", reason="unspecified", actor="t", now=NOW),
    )


def test_not_found(authority: Auth) -> None:
    refused(Code.NOT_FOUND, lambda: authority.label("nope"))
    refused(
        Code.NOT_FOUND,
        lambda: authority.set_device_status("ghost", DeviceStatus.DISABLED, actor="t", now=NOW),
    )
    refused(
        Code.NOT_FOUND,
        lambda: authority.revoke("0A0B", reason="unspecified", actor="t", now=NOW),
    )
    refused(Code.BAD_REQUEST, lambda: authority.revoke("0A", reason="nope", actor="t", now=NOW))


def test_add_device_twice_needs_rotate_secret(authority: Auth, store: SqlStore) -> None:
    first = authority.add_device("dev-1", actor="t", now=NOW)
    refused(Code.CONFLICT, lambda: authority.add_device("dev-1", actor="t", now=NOW))
    second = authority.add_device("dev-1", actor="t", now=NOW, rotate_secret=True)
    assert second != first
    # The rotated-out secret no longer works; the new one does.
    refused(Code.SECRET_INVALID, lambda: authority.authenticate_secret("dev-1", first, now=NOW))
    assert authority.authenticate_secret("dev-1", second, now=NOW).device_id == "dev-1"
    refused(Code.BAD_REQUEST, lambda: authority.add_device("c:d", actor="t", now=NOW))


def test_bootstrap_twice_needs_replace_and_the_old_is_superseded_after(
    authority: Auth, store: SqlStore
) -> None:
    old, _ = bootstrap(authority)
    csr = make_csr(generate_key("ec-p256"))
    refused(
        Code.CONFLICT,
        lambda: authority.issue_bootstrap(csr, device_id="dev-1", actor="t", now=NOW),
    )
    new = authority.issue_bootstrap(csr, device_id="dev-1", actor="t", now=NOW, replace=True)
    assert new.replaces_serials == (f"{old.serial_number:X}",)
    # Still valid until the caller has stored the new key and certificate.
    authority.authenticate_certificate(old, now=NOW)
    authority.supersede(new.replaces_serials, actor="t", now=NOW)
    old_record = store.get_certificate(f"{old.serial_number:X}")
    assert old_record is not None and old_record.status is CertStatus.REVOKED
    assert old_record.revocation_reason == "superseded"
    assert new.record.status is CertStatus.VALID
    refused(Code.REVOKED, lambda: authority.authenticate_certificate(old, now=NOW))


def test_approval_pending_then_denied(authority: Auth, key: PrivateKey) -> None:
    _, who = bootstrap(authority)
    label = authority.labels["approved"]
    csr = make_csr(key)
    pending = refused(Code.APPROVAL_PENDING, lambda: authority.enroll(label, csr, who, now=NOW))
    assert pending.retry_after == label.retry_after
    refused(Code.APPROVAL_PENDING, lambda: authority.enroll(label, csr, who, now=NOW))
    request = authority.store.list_pending().items[0]
    authority.decide(request.id, approve=False, actor="op", now=NOW, reason="unknown device")
    denied = refused(Code.APPROVAL_DENIED, lambda: authority.enroll(label, csr, who, now=NOW))
    assert "unknown device" in denied.reason
    refused(
        Code.CONFLICT,
        lambda: authority.decide(request.id, approve=True, actor="op", now=NOW),
    )


def test_approved_certificate_revoked_before_pickup(authority: Auth, key: PrivateKey) -> None:
    _, who = bootstrap(authority)
    label = authority.labels["approved"]
    csr = make_csr(key)
    refused(Code.APPROVAL_PENDING, lambda: authority.enroll(label, csr, who, now=NOW))
    request = authority.store.list_pending().items[0]
    authority.decide(request.id, approve=True, actor="op", now=NOW)
    issued = authority.enroll(label, csr, who, now=NOW)
    assert authority.enroll(label, csr, who, now=NOW).record.serial == issued.record.serial
    authority.revoke(issued.record.serial, reason="unspecified", actor="op", now=NOW)
    # Only this request is spent (conflict), not the device's credentials (revoked).
    refused(Code.CONFLICT, lambda: authority.enroll(label, csr, who, now=NOW))
    other = make_csr(generate_key("ec-p256"))
    refused(Code.APPROVAL_PENDING, lambda: authority.enroll(label, other, who, now=NOW))


def test_tokens_refuse_with_codes(store: SqlStore) -> None:
    tokens = TokenService(store)
    refused(Code.TOKEN_INVALID, lambda: tokens.authenticate("estk_nope", now=NOW, use="GET /"))
    refused(Code.TOKEN_INVALID, lambda: tokens.authenticate("nope", now=NOW, use="GET /"))
    token = tokens.create("line-1", frozenset({"provision"}), actor="op", now=NOW)
    actor, scopes = tokens.authenticate(token, now=NOW, use="GET /")
    refused(
        Code.SCOPE_MISSING,
        lambda: tokens.require_scope(scopes, "admin", actor=actor, use="GET /", now=NOW),
    )
    assert last_audit(store) == ("refused", "scope admin needed for GET /")
    tokens.require_scope(scopes, "provision", actor=actor, use="POST /", now=NOW)
    refused(
        Code.CONFLICT,
        lambda: tokens.create("line-1", frozenset({"read"}), actor="op", now=NOW),
    )
    refused(
        Code.BAD_REQUEST,
        lambda: tokens.create("line-2", frozenset({"root"}), actor="op", now=NOW),
    )


# -- storage that cannot take the request -----------------------------------------------


def _on_every_connection(store: SqlStore, statement: str) -> None:
    """Make every new connection of the store run ``statement`` (the pool is emptied first)."""
    engine: sa.Engine = store._engine

    def apply(dbapi_conn: Any, _record: Any) -> None:
        cursor = dbapi_conn.cursor()
        cursor.execute(statement)
        cursor.close()
        if engine.dialect.name != "sqlite":
            dbapi_conn.commit()  # psycopg opened a transaction for the SET

    sa.event.listen(engine, "connect", apply)
    engine.dispose()


def _make_read_only(store: SqlStore) -> None:
    if store._engine.dialect.name == "sqlite":
        _on_every_connection(store, "PRAGMA query_only = 1")
    else:
        _on_every_connection(store, "SET default_transaction_read_only = on")


def _make_disk_full(store: SqlStore) -> None:
    with store._engine.connect() as conn:
        pages = int(conn.exec_driver_sql("PRAGMA page_count").scalar_one())
    _on_every_connection(store, f"PRAGMA max_page_count = {pages}")


def test_a_read_only_database_refuses_unavailable_and_writes_nothing(
    authority: Auth, store: SqlStore, key: PrivateKey, caplog: pytest.LogCaptureFixture
) -> None:
    _refuses_unavailable_and_writes_nothing(authority, store, key, _make_read_only, caplog)


@sqlite_only
def test_a_full_disk_refuses_unavailable_and_writes_nothing(
    authority: Auth, store: SqlStore, key: PrivateKey, caplog: pytest.LogCaptureFixture
) -> None:
    """SQLite only: its page limit stands in for a full disk."""
    _refuses_unavailable_and_writes_nothing(authority, store, key, _make_disk_full, caplog)


def _refuses_unavailable_and_writes_nothing(
    authority: Auth,
    store: SqlStore,
    key: PrivateKey,
    make_unavailable: Callable[[SqlStore], None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, who = bootstrap(authority)
    label = authority.labels["devices"]
    make_unavailable(store)

    def enroll() -> object:
        return authority.enroll(label, make_csr(key, sans=_many_names()), who, now=NOW)

    for _ in range(200):  # a full disk refuses once the free pages are used up
        try:
            enroll()
        except Refusal as refusal:
            assert refusal.code is Code.UNAVAILABLE
            break
    else:
        pytest.fail("the database never filled up")
    certificates = store.count_certificates()
    audit_entries = len(store.list_audit(limit=1000).items)
    caplog.clear()
    caplog.set_level("WARNING", logger="estkit.ca")
    for _ in range(3):
        refusal = refused(Code.UNAVAILABLE, enroll)
        assert refusal.retry_after is not None and refusal.retry_after > 0
    assert store.count_certificates() == certificates
    assert len(store.list_audit(limit=1000).items) == audit_entries
    assert len(caplog.records) == 3  # one line per refused request, no traceback
    assert all(r.exc_info is None and "\n" not in r.getMessage() for r in caplog.records)


def _many_names() -> list[x509.GeneralName]:
    return [x509.DNSName(f"name-{i:04d}.sensors.example.com") for i in range(10)]


def test_a_deferred_write_that_fails_answers_unavailable(
    authority: Auth, store: SqlStore, key: PrivateKey
) -> None:
    """The mTLS hot path queues its writes; their failure reaches the caller as a refusal."""
    _, who = bootstrap(authority)
    _make_read_only(store)
    with authority.deferred_writes() as writes:
        authority.enroll(authority.labels["devices"], make_csr(key), who, now=NOW)
    assert writes

    async def wait() -> None:
        for future in writes:
            await asyncio.wrap_future(future)

    with pytest.raises(Refusal) as caught:
        asyncio.run(wait())
    assert caught.value.code is Code.UNAVAILABLE


def test_unknown_device_id_in_provision_is_refused_not_stored(
    authority: Auth, store: SqlStore
) -> None:
    csr = make_csr(generate_key("ec-p256"), "c:d")
    refused(
        Code.BAD_REQUEST,
        lambda: authority.provision("devices", csr, device_id="c:d", actor="t", now=NOW, via="t"),
    )
    assert store.get_device("c:d") is None
    outcome, detail = last_audit(store)
    assert outcome == "refused" and detail.startswith("bad-request: ")


def test_every_issued_certificate_is_on_record(authority: Auth, cas: Cas) -> None:
    cert, who = bootstrap(authority)
    issued = authority.enroll(
        authority.labels["devices"], make_csr(generate_key("ec-p256")), who, now=NOW
    )
    assert issued.certificate.issuer == cas.devices.cert.subject
    record = authority.store.get_certificate(issued.record.serial)
    assert record == issued.record
    assert dt.timedelta(days=29) < record.not_after - NOW <= dt.timedelta(days=30)
    assert cert.issuer == cas.bootstrap.cert.subject
