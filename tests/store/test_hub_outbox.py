"""The IoT Hub outbox: rows written in the transaction of the device change, claimed with a
lease one sender at a time, a device's changes in order, none dropped; on both backends."""

from __future__ import annotations

import datetime as dt
import threading

import pytest

from backends import postgresql_only
from estkit.store import AuditEvent, DeviceStatus, SqlStore
from estkit.store.errors import NotFound
from estkit.store.outbox import HubChange, HubOutbox, HubStatus, OutboxEntry, OutboxState

T0 = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
LEASE = dt.timedelta(seconds=60)


def _audit(action: str, device_id: str) -> AuditEvent:
    return AuditEvent(at=T0, actor="test", action=action, outcome="ok", device_id=device_id)


def _set(store: SqlStore, device_id: str, status: DeviceStatus) -> None:
    action = "device-enable" if status is DeviceStatus.ACTIVE else "device-disable"
    hub = HubStatus.ENABLED if status is DeviceStatus.ACTIVE else HubStatus.DISABLED
    store.set_device_status(
        device_id,
        status,
        now=T0,
        audit=_audit(action, device_id),
        hub=HubChange(device_id, hub, action),
    )


def _disable(store: SqlStore, device_id: str) -> None:
    _set(store, device_id, DeviceStatus.DISABLED)


def _enable(store: SqlStore, device_id: str) -> None:
    _set(store, device_id, DeviceStatus.ACTIVE)


def _add(store: SqlStore, device_id: str, *, hub: bool = False) -> None:
    change = HubChange(device_id, HubStatus.ENABLED, "device-add") if hub else None
    store.add_device(device_id, now=T0, audit=_audit("device-add", device_id), hub=change)


def _held_disable(store: SqlStore, device_id: str = "dev-1") -> tuple[HubOutbox, OutboxEntry]:
    """A registered device disabled, its outbox row claimed by owner "a" at T0."""
    _add(store, device_id)
    _disable(store, device_id)
    outbox = store.hub_outbox()
    entry = outbox.claim(owner="a", now=T0, lease=LEASE)
    assert entry is not None and entry.change.device_id == device_id
    return outbox, entry


def test_a_status_change_and_its_outbox_row_commit_together(store: SqlStore) -> None:
    _add(store, "dev-1", hub=True)
    _disable(store, "dev-1")
    outbox = store.hub_outbox()
    rows = outbox.entries("dev-1")
    assert [(r.change.status, r.change.cause, r.state) for r in rows] == [
        (HubStatus.ENABLED, "device-add", OutboxState.SUPERSEDED),
        (HubStatus.DISABLED, "device-disable", OutboxState.PENDING),
    ]
    assert rows[1].next_attempt_at == T0
    assert rows[1].attempts == 0


def test_a_change_that_does_not_commit_leaves_no_row(store: SqlStore) -> None:
    with pytest.raises(NotFound):
        _disable(store, "no-such-device")
    assert store.hub_outbox().entries("no-such-device") == []
    assert store.hub_outbox().backlog().pending == 0


def test_without_a_hub_change_nothing_is_queued(store: SqlStore) -> None:
    _add(store, "dev-1")
    store.set_device_status(
        "dev-1", DeviceStatus.DISABLED, now=T0, audit=_audit("device-disable", "dev-1")
    )
    assert store.hub_outbox().entries("dev-1") == []


def test_a_claimed_row_is_held_until_its_lease_ends(store: SqlStore) -> None:
    outbox, first = _held_disable(store)
    assert first.attempts == 1
    assert outbox.claim(owner="b", now=T0 + dt.timedelta(seconds=59), lease=LEASE) is None
    again = outbox.claim(owner="b", now=T0 + dt.timedelta(seconds=61), lease=LEASE)
    assert again is not None and again.id == first.id and again.attempts == 2
    # The first holder lost it: its outcome is not recorded over the new holder's.
    assert not outbox.sent(first.id, owner="a", now=T0)
    assert outbox.sent(first.id, owner="b", now=T0 + dt.timedelta(seconds=62))
    assert outbox.entries("dev-1")[0].state is OutboxState.DONE


def test_a_newer_change_waits_while_the_older_one_is_being_sent(store: SqlStore) -> None:
    _add(store, "dev-1")
    _add(store, "dev-2")
    _disable(store, "dev-1")
    outbox = store.hub_outbox()
    held = outbox.claim(owner="a", now=T0, lease=LEASE)
    assert held is not None and held.change.device_id == "dev-1"
    _enable(store, "dev-1")  # supersedes the row in flight; must not overtake it
    _disable(store, "dev-2")
    other = outbox.claim(owner="b", now=T0, lease=LEASE)
    assert other is not None and other.change.device_id == "dev-2"
    assert outbox.claim(owner="b", now=T0, lease=LEASE) is None
    assert outbox.sent(held.id, owner="a", now=T0)
    assert outbox.entries("dev-1")[0].state is OutboxState.SUPERSEDED
    newer = outbox.claim(owner="b", now=T0, lease=LEASE)
    assert newer is not None and newer.change == HubChange(
        "dev-1", HubStatus.ENABLED, "device-enable"
    )


def test_a_transient_failure_is_retried_at_its_time_with_its_error(store: SqlStore) -> None:
    outbox, entry = _held_disable(store)
    later = T0 + dt.timedelta(seconds=4)
    assert outbox.retry_later(entry.id, owner="a", error="503 Service Unavailable", at=later)
    assert not outbox.due(now=T0 + dt.timedelta(seconds=3))
    assert outbox.claim(owner="a", now=T0 + dt.timedelta(seconds=3), lease=LEASE) is None
    # Not due yet, but `iothub sync` sends it now.
    now = outbox.claim(owner="cli", now=T0, lease=LEASE, due_only=False)
    assert now is not None and now.last_error == "503 Service Unavailable"
    assert outbox.retry_later(now.id, owner="cli", error="503 again", at=later)
    assert outbox.due(now=later)
    backlog = outbox.backlog()
    assert backlog.pending == 1
    assert backlog.oldest_pending is not None
    assert backlog.oldest_pending.last_error == "503 again"


def test_a_permanent_failure_is_kept_until_retried(store: SqlStore) -> None:
    outbox, entry = _held_disable(store)
    assert outbox.failed(entry.id, owner="a", error="401 Unauthorized")
    assert outbox.claim(owner="a", now=T0 + dt.timedelta(days=1), lease=LEASE) is None
    backlog = outbox.backlog()
    assert (backlog.pending, backlog.failed_count) == (0, 1)
    assert backlog.failed[0].last_error == "401 Unauthorized"
    assert store.outbox_backlog() == 1  # the metrics' gauge: not taken by the hub
    assert outbox.retry_failed(now=T0) == 1
    retried = outbox.claim(owner="a", now=T0, lease=LEASE)
    assert retried is not None and retried.id == entry.id and retried.attempts == 2
    assert outbox.sent(retried.id, owner="a", now=T0)
    assert store.outbox_backlog() == 0


def test_a_newer_change_supersedes_a_failed_one(store: SqlStore) -> None:
    outbox, entry = _held_disable(store)
    outbox.failed(entry.id, owner="a", error="403 Forbidden")
    _enable(store, "dev-1")
    assert outbox.retry_failed(now=T0) == 0  # the old change is moot: never sent after the new
    rows = outbox.entries("dev-1")
    assert [r.state for r in rows] == [OutboxState.SUPERSEDED, OutboxState.PENDING]
    assert rows[0].last_error == "403 Forbidden"


def test_the_backlog_names_the_last_success(store: SqlStore) -> None:
    outbox = store.hub_outbox()
    assert outbox.backlog().last_success is None
    for n, device_id in enumerate(("dev-1", "dev-2")):
        _, entry = _held_disable(store, device_id)
        outbox.sent(entry.id, owner="a", now=T0 + dt.timedelta(minutes=n))
    last = outbox.backlog().last_success
    assert last is not None and last.change.device_id == "dev-2"
    assert last.done_at == T0 + dt.timedelta(minutes=1)


@postgresql_only
def test_senders_claiming_at_once_take_different_rows(store: SqlStore) -> None:
    """Several nodes on one PostgreSQL: SKIP LOCKED hands each claimer its own row."""
    devices = [f"dev-{n}" for n in range(40)]
    for device_id in devices:
        _add(store, device_id)
        _disable(store, device_id)
    outbox: HubOutbox = store.hub_outbox()
    claimed: list[str] = []
    lock = threading.Lock()

    def sender(owner: str) -> None:
        while (entry := outbox.claim(owner=owner, now=T0, lease=LEASE)) is not None:
            with lock:
                claimed.append(entry.change.device_id)

    threads = [threading.Thread(target=sender, args=(f"node-{n}",)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(claimed) == sorted(devices)


def test_a_restarted_node_takes_back_only_the_rows_it_held(store: SqlStore) -> None:
    outbox = store.hub_outbox()
    held: dict[str, int] = {}
    for device_id, owner in (("dev-1", "node:n_1:41:a"), ("dev-2", "node:nx1:42:b")):
        _add(store, device_id)
        _disable(store, device_id)
        entry = outbox.claim(owner=owner, now=T0, lease=LEASE)
        assert entry is not None and entry.change.device_id == device_id
        held[device_id] = entry.id
    # Node n_1 restarts: "_" is no wildcard, node nx1's row stays held.
    assert outbox.take_back(owner_prefix="node:n_1:") == 1
    again = outbox.claim(owner="node:n_1:43:c", now=T0, lease=LEASE)
    assert again is not None and again.id == held["dev-1"]
    assert outbox.claim(owner="node:n_1:43:c", now=T0, lease=LEASE) is None
