"""Group commit: queued writes share one transaction, and a failing one fails alone."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import pytest

from estkit.store import AuditEvent, CertificateRecord, CertStatus, SqlStore
from estkit.store.errors import Conflict
from estkit.store.writer import GroupCommitter

NOW = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.UTC)


class FakeDb:
    """Transactions as lists: a commit appends the batch's writes, a failure drops them."""

    def __init__(self) -> None:
        self.commits: list[list[str]] = []

    @contextmanager
    def begin(self) -> Iterator[list[str]]:
        tx: list[str] = []
        yield tx  # an exception from a job propagates: nothing is appended
        self.commits.append(tx)


def _held(committer: GroupCommitter) -> threading.Event:
    """Occupy the writer thread until the returned event is set, so later jobs queue up."""
    release, started = threading.Event(), threading.Event()

    def block(tx: list[str]) -> None:
        started.set()
        assert release.wait(10)
        tx.append("first")

    committer.submit(block)
    assert started.wait(10)
    return release


def test_jobs_queued_together_commit_in_one_transaction() -> None:
    db = FakeDb()
    committer = GroupCommitter(db.begin)
    release = _held(committer)
    futures = [committer.submit(lambda tx, i=i: tx.append(f"w{i}") or i) for i in range(5)]
    release.set()
    assert [f.result(10) for f in futures] == list(range(5))
    committer.close()
    assert db.commits == [["first"], ["w0", "w1", "w2", "w3", "w4"]]


def test_a_failing_job_fails_alone_and_the_others_commit() -> None:
    db = FakeDb()
    committer = GroupCommitter(db.begin)
    release = _held(committer)

    def bad(tx: list[str]) -> None:
        tx.append("bad")
        raise Conflict("taken")

    good1 = committer.submit(lambda tx: tx.append("a"))
    failing = committer.submit(bad)
    good2 = committer.submit(lambda tx: tx.append("b"))
    release.set()
    good1.result(10), good2.result(10)
    with pytest.raises(Conflict, match="taken"):
        failing.result(10)
    committer.close()
    # The batch was rolled back, then each job ran in a transaction of its own.
    assert db.commits == [["first"], ["a"], ["b"]]


def test_close_finishes_what_is_queued() -> None:
    db = FakeDb()
    committer = GroupCommitter(db.begin)
    release = _held(committer)
    future = committer.submit(lambda tx: tx.append("late"))
    threading.Timer(0.05, release.set).start()
    committer.close()
    assert future.done() and db.commits[-1] == ["late"]


def _record(serial: int, device: str) -> CertificateRecord:
    return CertificateRecord(
        serial=f"{serial:032X}",
        device_id=device,
        ca="devices",
        label="devices",
        profile="operational",
        subject=f"CN={device}",
        sans=(),
        not_before=NOW,
        not_after=NOW + dt.timedelta(days=30),
        status=CertStatus.VALID,
        requested_via="est-simpleenroll",
        requested_by=f"cert:{serial}",
        issued_at=NOW,
        der=b"\x30\x00",
    )


def _event(device: str, serial: int | None = None) -> AuditEvent:
    return AuditEvent(
        at=NOW,
        actor="test",
        action="est-simpleenroll",
        outcome="ok",
        device_id=device,
        serial=None if serial is None else f"{serial:032X}",
    )


def test_concurrent_writers_keep_every_record_and_one_unbroken_chain(store: SqlStore) -> None:
    def work(thread: int) -> None:
        for i in range(25):
            n = thread * 1000 + i
            store.record_issued(_record(n, f"dev-{thread}"), audit=_event(f"dev-{thread}", n))
            if i % 5 == 0:
                store.audit(_event(f"dev-{thread}"))

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(work, range(16)))
    assert store.count_certificates() == 16 * 25
    assert store.verify_audit_chain() == (16 * 30, None, "")


def test_deferred_writes_are_queued_and_durable_once_their_futures_complete(
    store: SqlStore,
) -> None:
    with store.deferred_writes() as pending:
        store.record_issued(_record(1, "dev-d"), audit=_event("dev-d", 1))
        store.audit(_event("dev-d"))
        # Writes whose result is read back are never deferred.
        store.add_device("dev-e", now=NOW, audit=_event("dev-e"))
    assert len(pending) == 2
    for future in pending:
        future.result(10)
    assert store.get_certificate(f"{1:032X}") is not None
    assert store.verify_audit_chain() == (3, None, "")


def test_a_conflicting_write_in_a_busy_batch_leaves_the_others_committed(
    store: SqlStore,
) -> None:
    store.add_device("dup", now=NOW, audit=_event("dup"))
    results: list[Any] = []

    def add(name: str) -> None:
        try:
            store.add_device(name, now=NOW, audit=_event(name))
            results.append(name)
        except Conflict:
            results.append(f"conflict:{name}")

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(add, ["a", "dup", "b", "c", "dup", "d"]))
    assert sorted(results) == ["a", "b", "c", "conflict:dup", "conflict:dup", "d"]
    assert {d.device_id for d in store.list_devices().items} == {"a", "b", "c", "d", "dup"}
    assert store.verify_audit_chain() == (5, None, "")
