"""When to renew: a pure function of the certificate's own dates (DESIGN: ~80 %, jittered)."""

from __future__ import annotations

import datetime as dt
import math
import random

import pytest

from estkit.pki.profiles import Kind, Profile
from estkit.pki.renewal import renewal_time


@pytest.fixture(scope="module")
def cert(ca):
    return ca.leaf(
        profile=Profile(name="op", kind=Kind.OPERATIONAL, validity=dt.timedelta(days=30))
    )


def lifetime(cert) -> dt.timedelta:
    return cert.not_valid_after_utc - cert.not_valid_before_utc


@pytest.mark.parametrize(
    "fraction",
    [0.5, 2 / 3, 0.8, 0.01, 0.99],
    ids=["ok/half", "ok/two-thirds", "ok/80-percent", "ok/1-percent", "ok/99-percent"],
)
def test_renewal_time_without_jitter_is_not_before_plus_fraction_of_lifetime(cert, fraction):
    expected = cert.not_valid_before_utc + lifetime(cert) * fraction
    for seed in range(5):
        assert renewal_time(cert, fraction=fraction, jitter=0, rng=random.Random(seed)) == expected


@pytest.mark.parametrize(
    ("fraction", "jitter"),
    [(0.8, 0.05), (2 / 3, 0.1), (0.5, 0.49), (0.8, 0.0001)],
    ids=["ok/80-percent-5", "ok/two-thirds-10", "ok/half-almost-all", "ok/tiny-jitter"],
)
def test_renewal_time_with_jitter_only_moves_earlier_within_jitter(cert, fraction, jitter):
    start, life = cert.not_valid_before_utc, lifetime(cert)
    earliest, latest = start + life * (fraction - jitter), start + life * fraction
    times = [
        renewal_time(cert, fraction=fraction, jitter=jitter, rng=random.Random(seed))
        for seed in range(500)
    ]
    assert all(earliest <= t <= latest for t in times)
    assert len(set(times)) > 400  # a fleet issued together spreads out


def test_renewal_time_is_reproducible_for_one_seed(cert):
    first, second = (
        renewal_time(cert, fraction=0.8, jitter=0.05, rng=random.Random(42)) for _ in range(2)
    )
    assert first == second


def test_renewal_time_is_timezone_aware_utc(cert):
    when = renewal_time(cert, fraction=0.8, jitter=0.05, rng=random.Random(1))
    assert when.utcoffset() == dt.timedelta(0)


@pytest.mark.parametrize(
    "fraction",
    [0, 1, -0.1, 1.5, math.nan, math.inf],
    ids=["fail/zero", "fail/one", "fail/negative", "fail/above-one", "fail/nan", "fail/inf"],
)
def test_renewal_time_rejects_fraction_outside_open_unit_interval(cert, fraction):
    with pytest.raises(ValueError, match="fraction"):
        renewal_time(cert, fraction=fraction, jitter=0, rng=random.Random(0))


@pytest.mark.parametrize(
    "jitter",
    [-0.01, 0.8, 0.9, math.nan],
    ids=["fail/negative", "fail/equal-to-fraction", "fail/above-fraction", "fail/nan"],
)
def test_renewal_time_rejects_jitter_outside_zero_to_fraction(cert, jitter):
    with pytest.raises(ValueError, match="jitter"):
        renewal_time(cert, fraction=0.8, jitter=jitter, rng=random.Random(0))
