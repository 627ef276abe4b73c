"""Fixtures of the ca/ tests: an authority on a SQLite store in a temporary directory
(no server, no sockets)."""

from __future__ import annotations

import datetime as dt

import pytest

from caenv import BOOTSTRAP, Cas, label, make_cas
from estkit.ca.authority import Authority
from estkit.pki.keys import PrivateKey, generate_key
from estkit.store import SqlStore


@pytest.fixture(scope="session")
def cas() -> Cas:
    return make_cas()


@pytest.fixture
def authority(cas: Cas, store: SqlStore) -> Authority[SqlStore]:
    return Authority(
        cas={
            "root": cas.root,
            "devices": cas.devices,
            "bootstrap": cas.bootstrap,
            "other": cas.other,
        },
        labels={"devices": label(), "approved": label(name="approved", approval=True)},
        bootstrap_profile=BOOTSTRAP,
        store=store,
        secret_validity=dt.timedelta(days=7),
    )


@pytest.fixture(scope="session")
def key() -> PrivateKey:
    return generate_key("ec-p256")
