"""The device's checks on an issued certificate."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from client_fakes import NOW, Pki

from estkit.client import IssuedCertificateError, check_issued
from estkit.pki import keys
from testpki import cn_name

KEY = keys.generate_key("ec-p256")


@pytest.mark.parametrize(
    ("case", "expected_chain"),
    [
        ({}, "issuing"),
        ({"cas": "with-root"}, "issuing"),
        ({"anchors": "issuing"}, ""),
        ({"subject": cn_name("DEV-1")}, "issuing"),
    ],
    ids=[
        "ok/via-intermediate",
        "ok/root-in-cas",
        "ok/intermediate-anchor",
        "ok/subject-rfc5280-equal",
    ],
)
def test_check_issued_accepts_and_returns_chain_without_anchor(
    ca: Pki, case: dict[str, Any], expected_chain: str
) -> None:
    cert = ca.issue(KEY.public_key())
    cas = [ca.issuing, ca.root] if case.get("cas") == "with-root" else [ca.issuing]
    anchors = [ca.issuing] if case.get("anchors") == "issuing" else [ca.root]
    issued = check_issued(
        cert,
        public_key=KEY.public_key(),
        cas=cas,
        anchors=anchors,
        now=NOW,
        common_name="dev-1",
        subject=case.get("subject"),
    )
    expected = (ca.issuing,) if expected_chain else ()
    assert issued.chain == expected
    assert issued.anchor == anchors[0]
    assert issued.fullchain == (cert, *expected)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        ({"public_key": keys.generate_key("ec-p256").public_key()}, "not for the requested key"),
        ({"common_name": "dev-2"}, "does not have CN=dev-2"),
        ({"subject": cn_name("dev-2")}, "differs from"),
        ({"cas": []}, "does not chain"),
        ({"anchors": "other"}, "does not chain"),
        ({"now": NOW + dt.timedelta(days=31)}, "not valid at"),
        ({"now": NOW - dt.timedelta(hours=1)}, "not valid at"),  # back-dated 5 min only
    ],
    ids=[
        "fail/other-key",
        "fail/cn-mismatch",
        "fail/subject-mismatch",
        "fail/no-intermediate",
        "fail/other-anchor",
        "fail/expired",
        "fail/not-yet-valid",
    ],
)
def test_check_issued_refuses(ca: Pki, other_ca: Pki, mutate: dict[str, Any], message: str) -> None:
    kwargs: dict[str, Any] = {
        "public_key": KEY.public_key(),
        "cas": [ca.issuing],
        "anchors": [ca.root],
        "now": NOW,
        "common_name": "dev-1",
    }
    kwargs.update(mutate)
    if kwargs["anchors"] == "other":
        kwargs["anchors"] = [other_ca.root]
    with pytest.raises(IssuedCertificateError, match=message):
        check_issued(ca.issue(KEY.public_key()), **kwargs)


def test_check_issued_refuses_the_anchor_itself(ca: Pki) -> None:
    with pytest.raises(IssuedCertificateError, match="does not chain"):
        check_issued(ca.root, public_key=ca.root.public_key(), cas=[], anchors=[ca.root], now=NOW)
