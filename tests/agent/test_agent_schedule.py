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
def test_server_refusals_are_read_by_their_reason(reason: str, meaning: Refusal) -> None:
    assert classify_refusal(reason) is meaning


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
