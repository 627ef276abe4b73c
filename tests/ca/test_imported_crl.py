"""The CRL of an offline root: signed on the root's machine, imported, served, never
signed by the server; and the warnings before its nextUpdate.

SQLite only: the store is asked only for the signing CAs' revisions, the same either way.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

from backends import sqlite_only
from caenv import NOW, Cas
from estkit.ca.crl import CrlPublisher, ImportedCrl, imported_crl_warning, load_crl
from estkit.pki.crl import build_crl
from estkit.pki.keys import generate_key
from estkit.store import SqlStore

DAY = dt.timedelta(days=1)


def root_crl(
    cas: Cas, *, number: int, validity: dt.timedelta = 365 * DAY, at: dt.datetime = NOW
) -> x509.CertificateRevocationList:
    return build_crl(
        issuer=cas.root.cert, issuer_key=cas.root.key, revoked=[], now=at,
        validity=validity, number=number,
    )  # fmt: skip


def publisher(cas: Cas, store: SqlStore, tmp_path: Path) -> CrlPublisher:
    """The devices CA signs here; the root is offline, its CRL imported at ca/root.crl."""
    return CrlPublisher(
        cas={"devices": cas.devices},
        store=store,
        directory=tmp_path / "crl",
        validity=7 * DAY,
        imported=[ImportedCrl(name="root", cert=cas.root.cert, source=tmp_path / "root.crl")],
    )


def put(tmp_path: Path, crl: x509.CertificateRevocationList, *, pem: bool = False) -> None:
    (tmp_path / "root.crl").write_bytes(crl.public_bytes(Encoding.PEM if pem else Encoding.DER))


@sqlite_only
def test_the_imported_crl_is_served_as_signed_and_never_signed_here(
    cas: Cas, store: SqlStore, tmp_path: Path
) -> None:
    served = publisher(cas, store, tmp_path)
    first = root_crl(cas, number=1)
    put(tmp_path, first, pem=True)  # PEM as carried; served as DER
    assert served.refresh_due(now=NOW) == ["devices", "root"]
    assert served.path("root").read_bytes() == first.public_bytes(Encoding.DER)
    assert served.refresh_due(now=NOW) == []
    with pytest.raises(ValueError, match="CA 'root' is offline"):
        served.publish("root", now=NOW)

    newer = root_crl(cas, number=2)
    put(tmp_path, newer)
    assert served.refresh_due(now=NOW) == ["root"]
    assert served.path("root").read_bytes() == newer.public_bytes(Encoding.DER)


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda cas: root_crl(cas, number=1), "CRL number 1 is older than the one served (5)"),
        (
            lambda cas: build_crl(
                issuer=cas.root.cert,
                issuer_key=generate_key("ec-p256"),
                revoked=[],
                now=NOW,
                validity=DAY,
                number=9,
            ),
            "its signature is not CN=test root's",
        ),
        (
            lambda cas: build_crl(
                issuer=cas.devices.cert,
                issuer_key=cas.devices.key,
                revoked=[],
                now=NOW,
                validity=DAY,
                number=9,
            ),
            "issued by CN=test devices, not by CN=test root",
        ),
    ],
    ids=["fail/older", "fail/not-the-roots-signature", "fail/another-issuer"],
)
@sqlite_only
def test_a_crl_that_is_not_the_roots_newest_is_not_served(
    cas: Cas,
    store: SqlStore,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    make,
    why: str,  # type: ignore[no-untyped-def]
) -> None:
    served = publisher(cas, store, tmp_path)
    current = root_crl(cas, number=5)
    put(tmp_path, current)
    served.refresh_due(now=NOW)
    put(tmp_path, make(cas))
    with caplog.at_level(logging.WARNING, logger="estkit.ca"):
        assert "root" not in served.refresh_due(now=NOW)
        served.refresh_due(now=NOW + dt.timedelta(seconds=1))
    assert served.path("root").read_bytes() == current.public_bytes(Encoding.DER)
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'root.crl'}: not served: {why}"
    ]


@pytest.mark.parametrize(
    ("validity", "left", "warned"),
    [
        (365 * DAY, 31 * DAY, None),
        (365 * DAY, 29 * DAY, "expires at"),
        (8 * dt.timedelta(hours=1), dt.timedelta(hours=3), None),  # a quarter: 2 h
        (8 * dt.timedelta(hours=1), dt.timedelta(hours=1), "expires at"),
        (365 * DAY, -DAY, "expired at"),
    ],
    ids=[
        "ok/a-year-31d-left",
        "warn/a-year-29d-left",
        "ok/8h-3h-left",
        "warn/8h-1h-left",
        "warn/expired",
    ],
)
def test_warning_from_30_days_or_the_last_quarter_before_next_update(
    cas: Cas, validity: dt.timedelta, left: dt.timedelta, warned: str | None
) -> None:
    crl = root_crl(cas, number=1, validity=validity)
    assert crl.next_update_utc is not None
    warning = imported_crl_warning(crl, name="root", now=crl.next_update_utc - left)
    if warned is None:
        assert warning is None
    else:
        assert warning is not None and warning.startswith(
            f"the CRL of the offline root CA {warned}"
        )
        assert "sign a new one on the root CA's machine (`estkit root crl`)" in warning


@sqlite_only
def test_the_expiry_warning_is_logged_once_a_day(
    cas: Cas, store: SqlStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    served = publisher(cas, store, tmp_path)
    put(tmp_path, root_crl(cas, number=1, validity=100 * DAY))  # warned from 25 days before
    soon = NOW + 80 * DAY
    with caplog.at_level(logging.WARNING, logger="estkit.ca"):
        for seconds in range(5):  # the refresher's ticks
            served.refresh_due(now=soon + dt.timedelta(seconds=seconds))
        served.refresh_due(now=soon + DAY + dt.timedelta(seconds=5))
        served.refresh_due(now=NOW + 101 * DAY)  # expired: said at once
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3, messages
    assert messages[0].startswith("the CRL of the offline root CA expires at ")
    assert "(in 20d)" in messages[0] and "(in 18d)" in messages[1]
    assert messages[2].startswith("the CRL of the offline root CA expired at ")


def test_load_crl_wants_a_next_update_and_a_number(cas: Cas) -> None:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(cas.root.cert.subject)
        .last_update(NOW)
        .next_update(NOW + DAY)
    )
    crl = builder.sign(cas.root.key, hashes.SHA256())
    with pytest.raises(ValueError, match="it has no CRL number"):
        load_crl(crl.public_bytes(Encoding.DER), issuer=cas.root.cert)
