"""CRL numbers and revisions kept in the database, so that several nodes (each with its
own CRL directory) publish one increasing sequence per CA and republish when a
revocation anywhere makes their file stale. On SQLite, then PostgreSQL."""

from __future__ import annotations

import datetime as dt
import logging
import threading
from pathlib import Path
from typing import cast

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from caenv import NOW, Cas, make_csr
from estkit.ca.authority import Authority
from estkit.ca.crl import CrlPublisher
from estkit.pki.crl import build_crl
from estkit.pki.keys import generate_key
from estkit.server.crl_http import start_crl_refresher
from estkit.store import DeviceStatus, SqlStore
from estkit.store.errors import Unavailable

Auth = Authority[SqlStore]
VALIDITY = dt.timedelta(days=1)


def node(authority: Auth, directory: Path) -> CrlPublisher:
    return CrlPublisher(
        cas=authority.cas, store=authority.store, directory=directory, validity=VALIDITY
    )


def number(crl: x509.CertificateRevocationList) -> int:
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def serials(publisher: CrlPublisher, ca: str) -> set[int]:
    crl = x509.load_der_x509_crl(publisher.path(ca).read_bytes())
    return {entry.serial_number for entry in crl}


def issue(authority: Auth, device_id: str) -> str:
    issued = authority.issue_bootstrap(
        make_csr(generate_key("ec-p256"), device_id), device_id=device_id, actor="t", now=NOW
    )
    return issued.record.serial


def test_crl_numbers_increase_across_nodes(authority: Auth, tmp_path: Path) -> None:
    a, b = node(authority, tmp_path / "a"), node(authority, tmp_path / "b")
    numbers = [number(p.publish("devices", now=NOW)) for p in (a, b, a, b, b, a)]
    assert numbers == list(range(1, 7))
    # Each CA has its own sequence.
    assert number(a.publish("bootstrap", now=NOW)) == 1


def test_the_first_number_from_the_database_exceeds_a_file_of_an_earlier_version(
    authority: Auth, cas: Cas, tmp_path: Path
) -> None:
    """Earlier versions numbered CRLs in milliseconds since the epoch."""
    a, b = node(authority, tmp_path / "a"), node(authority, tmp_path / "b")
    millis = int(NOW.timestamp() * 1000)
    old = build_crl(
        issuer=cas.devices.cert, issuer_key=cas.devices.key, revoked=[], now=NOW,
        validity=VALIDITY, number=millis,
    )  # fmt: skip
    a.directory.mkdir()
    a.path("devices").write_bytes(old.public_bytes(Encoding.DER))
    assert number(b.publish("devices", now=NOW)) == 1  # no old file on b
    assert number(a.publish("devices", now=NOW)) == millis + 1
    assert number(b.publish("devices", now=NOW)) == millis + 2


def test_a_revocation_on_one_node_makes_the_other_republish(
    authority: Auth, tmp_path: Path
) -> None:
    a, b = node(authority, tmp_path / "a"), node(authority, tmp_path / "b")
    assert sorted(a.refresh_due(now=NOW)) == sorted(authority.cas)  # nothing published yet
    assert sorted(b.refresh_due(now=NOW)) == sorted(authority.cas)
    assert a.refresh_due(now=NOW) == [] and b.refresh_due(now=NOW) == []
    serial = issue(authority, "dev-1")
    ca = authority.store.get_certificate(serial)
    assert ca is not None
    authority.revoke(serial, reason="keyCompromise", actor="t", now=NOW)  # "on a"
    assert authority.store.crl_revisions()[ca.ca] == 1
    assert b.refresh_due(now=NOW) == [ca.ca]
    assert int(serial, 16) in serials(b, ca.ca)
    assert b.refresh_due(now=NOW) == []
    # Past half the validity, every CRL is republished, as before.
    later = NOW + VALIDITY / 2 + dt.timedelta(seconds=1)
    assert sorted(b.refresh_due(now=later)) == sorted(authority.cas)


def test_disabling_a_device_with_revocation_bumps_the_revision_of_its_cas(
    authority: Auth, tmp_path: Path
) -> None:
    issue(authority, "dev-1")
    before = authority.store.crl_revisions()
    authority.set_device_status("dev-1", DeviceStatus.DECOMMISSIONED, actor="t", now=NOW)
    after = authority.store.crl_revisions()
    assert after["bootstrap"] == before.get("bootstrap", 0) + 1
    assert after.get("devices", 0) == before.get("devices", 0)


def test_the_refresher_logs_an_outage_once_and_carries_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[int] = []
    done = threading.Event()

    class Down:
        def refresh_due(self, *, now: dt.datetime) -> list[str]:
            calls.append(1)
            if len(calls) >= 4:
                done.set()
                return []
            raise Unavailable("database is down")

    stop = threading.Event()
    with caplog.at_level(logging.INFO, logger="estkit.server.crl_http"):
        thread = start_crl_refresher(
            cast(CrlPublisher, Down()), lambda: NOW, stop=stop, interval=0.01
        )
        assert done.wait(10)
        stop.set()
        thread.join(10)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("database unavailable" in m for m in messages) == 1
    assert any("reachable again" in m for m in messages)
