"""Renewal scheduling maths: when to renew, how long to back off, what a refusal means,
and which clocks are too early to act on. All pure functions."""

from __future__ import annotations

import datetime as dt
import random

import pytest
from agentca import DeviceCa

from estkit.agent.renewal import Refusal, classify_refusal, clock_is_plausible, retry_delay
from estkit.pki.renewal import renewal_time


@pytest.mark.parametrize(
    ("failures", "low", "high"),
    [
        (1, 10, 15),
        (2, 20, 30),
        (3, 40, 60),
        (5, 160, 240),
        (7, 640, 900),
        (8, 900, 900),
        (100, 900, 900),
        (10_000, 900, 900),
    ],
    ids=["1st", "2nd", "3rd", "5th", "7th-capped-jitter", "8th-at-cap", "100th", "huge"],
)
def test_backoff_doubles_with_up_to_half_jitter_and_never_passes_the_cap(
    failures: int, low: float, high: float
) -> None:
    delays = [
        retry_delay(failures, minimum=10, maximum=900, rng=random.Random(seed))
        for seed in range(200)
    ]
    assert all(low <= d <= high for d in delays), (min(delays), max(delays))
    if high > low:
        assert len(set(delays)) > 100  # jittered: a fleet does not retry in lockstep


def test_backoff_counts_failures_from_one() -> None:
    with pytest.raises(ValueError, match="counts from 1"):
        retry_delay(0, minimum=1, maximum=2, rng=random.Random(0))


# Every refusal code of the contract (estkit.ca.errors.Code) and what the agent does on it.
CODE_MEANINGS = {
    "revoked": Refusal.FINAL,
    "decommissioned": Refusal.FINAL,
    "expired": Refusal.FALLBACK,
    "not-yet-valid": Refusal.FALLBACK,
    "unknown-certificate": Refusal.FALLBACK,
    "wrong-ca": Refusal.FALLBACK,
    "bad-csr": Refusal.OTHER,
    "key-not-permitted": Refusal.OTHER,
    "bad-request": Refusal.OTHER,
    "authentication-required": Refusal.OTHER,
    "secret-invalid": Refusal.OTHER,
    "token-invalid": Refusal.OTHER,
    "certificate-required": Refusal.OTHER,
    "not-registered": Refusal.OTHER,
    "disabled": Refusal.OTHER,
    "name-mismatch": Refusal.OTHER,
    "subject-changed": Refusal.OTHER,
    "san-not-permitted": Refusal.OTHER,
    "name-constraints": Refusal.OTHER,  # retried later: the operator may mend the CA
    "channel-binding-mismatch": Refusal.OTHER,  # retried: a new connection, a new binding
    "scope-missing": Refusal.OTHER,
    "approval-pending": Refusal.OTHER,
    "approval-denied": Refusal.OTHER,
    "not-found": Refusal.OTHER,
    "conflict": Refusal.OTHER,
    "rate-limited": Refusal.OTHER,
    "unavailable": Refusal.OTHER,
}


@pytest.mark.parametrize(
    ("code", "meaning"),
    list(CODE_MEANINGS.items()),
    ids=[f"{meaning.value}/{code}" for code, meaning in CODE_MEANINGS.items()],
)
def test_server_refusals_are_decided_by_their_code(code: str, meaning: Refusal) -> None:
    # The reason says something else on purpose: only the code counts.
    assert classify_refusal(code, "client certificate is revoked and expired") is meaning
    assert classify_refusal(code, "") is meaning


def test_every_refusal_code_of_the_server_has_a_decision() -> None:
    from estkit.ca.errors import FINAL, Code

    assert set(CODE_MEANINGS) == {c.value for c in Code}
    assert {c.value for c in FINAL} == {c for c, m in CODE_MEANINGS.items() if m is Refusal.FINAL}


@pytest.mark.parametrize(
    ("code", "reason", "meaning"),
    [
        ("revoked", "this device's certificate was withdrawn", Refusal.FINAL),
        ("decommissioned", "device retired on 2025-03-01", Refusal.FINAL),
        ("expired", "certificate past its date", Refusal.FALLBACK),
        ("unknown-certificate", "who are you?", Refusal.FALLBACK),
        ("disabled", "device is revoked", Refusal.OTHER),
        ("name-mismatch", "client certificate expired", Refusal.OTHER),
    ],
    ids=[
        "final/revoked-reworded",
        "final/decommissioned-reworded",
        "fallback/expired-reworded",
        "fallback/unknown-reworded",
        "other/disabled-says-revoked",
        "other/policy-says-expired",
    ],
)
def test_a_reworded_reason_with_a_code_decides_the_same(
    code: str, reason: str, meaning: Refusal
) -> None:
    assert classify_refusal(code, reason) is meaning


@pytest.mark.parametrize(
    ("reason", "meaning"),
    [
        ("device is decommissioned", Refusal.FINAL),
        ("client certificate is revoked", Refusal.FINAL),
        ("client certificate is expired or not yet valid", Refusal.FALLBACK),
        ("client certificate unknown to this CA", Refusal.FALLBACK),
        ("client certificate not issued by this CA", Refusal.FALLBACK),
        ("device is disabled", Refusal.OTHER),
        ("device is not registered", Refusal.OTHER),
        ("CSR CN 'x' is not the authenticated device id 'y'", Refusal.OTHER),
        ("", Refusal.OTHER),
    ],
    ids=[
        "final/decommissioned",
        "final/revoked",
        "fallback/expired",
        "fallback/unknown",
        "fallback/other-ca",
        "other/disabled",
        "other/unregistered",
        "other/policy",
        "other/no-reason",
    ],
)
def test_a_reply_without_a_code_is_read_by_its_reason(reason: str, meaning: Refusal) -> None:
    # A server that is not estkit sends no code: the words are all there is.
    assert classify_refusal(None, reason) is meaning


@pytest.mark.parametrize(
    ("offset", "plausible"),
    [
        (dt.timedelta(0), True),
        (dt.timedelta(minutes=-4), True),
        (dt.timedelta(minutes=-6), False),
        (dt.timedelta(days=-365), False),
        (dt.timedelta(days=400), True),
    ],
    ids=["at-notBefore", "within-tolerance", "beyond-tolerance", "a-year-early", "late-is-fine"],
)
def test_clock_before_not_before_minus_tolerance_is_implausible(
    device_ca: DeviceCa, offset: dt.timedelta, plausible: bool
) -> None:
    _, cert = device_ca.issue(validity=dt.timedelta(hours=1))
    now = cert.not_valid_before_utc + offset
    assert clock_is_plausible(now, cert, tolerance=300) is plausible


def test_renewal_is_scheduled_from_the_certificates_own_dates(device_ca: DeviceCa) -> None:
    """The same certificate gets the same schedule whatever the clock says when asked."""
    issued_at = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    _, cert = device_ca.issue(validity=dt.timedelta(days=10), now=issued_at)
    due = renewal_time(cert, fraction=0.8, jitter=0.0, rng=random.Random(1))
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert due == cert.not_valid_before_utc + lifetime * 0.8
    jittered = {
        renewal_time(cert, fraction=0.8, jitter=0.05, rng=random.Random(s)) for s in range(50)
    }
    assert all(
        cert.not_valid_before_utc + lifetime * 0.75 <= d <= due for d in jittered
    )  # jitter only ever moves renewal earlier
    assert len(jittered) > 40
