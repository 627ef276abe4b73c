"""ca/limits.py: failed authentication attempts in sliding windows, per username and per
source; ``rate-limited`` with a Retry-After, in bounded memory. No server."""

from __future__ import annotations

import pytest

from caenv import NOW
from estkit.ca.authority import Authority
from estkit.ca.errors import Code, Refusal
from estkit.ca.limits import BasicLimits, FailureLimiter, source_key
from estkit.store import SqlStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_failures_are_limited_in_a_sliding_window() -> None:
    limiter = FailureLimiter(limit=3, window=60, max_entries=10)
    for t in (0.0, 10.0, 20.0):
        assert limiter.retry_after("dev-1", now=t) is None
        limiter.record("dev-1", now=t)
    # The third failure fills the window: free again when the first one leaves it.
    assert limiter.retry_after("dev-1", now=20.0) == 40
    assert limiter.retry_after("dev-1", now=59.5) == 1
    assert limiter.retry_after("dev-1", now=60.0) is None
    limiter.record("dev-1", now=60.0)  # 10, 20, 60 are now in the window
    assert limiter.retry_after("dev-1", now=60.0) == 10
    assert limiter.retry_after("dev-2", now=60.0) is None  # keys are apart


def test_failure_memory_is_bounded_and_forgets_the_oldest_key_first() -> None:
    limiter = FailureLimiter(limit=2, window=300, max_entries=100)
    limiter.record("kept", now=0.0)
    limiter.record("kept", now=0.0)
    for i in range(1000):
        if i == 50:
            limiter.record("kept", now=1.0)  # a failure counts as use
        limiter.record(f"user-{i}", now=1.0)
        assert len(limiter) <= 100
    assert limiter.retry_after("user-999", now=2.0) is None  # remembered, one failure
    assert limiter.retry_after("kept", now=2.0) is None  # forgotten after 99 newer keys
    assert limiter.retry_after("user-0", now=2.0) is None


@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        (None, "?"),
    ],
    ids=["ipv4", "ipv6-64", "ipv6-same-64", "ipv4-mapped", "none"],
)
def test_sources_are_counted_by_address_or_ipv6_slash_64(host: str | None, key: str) -> None:
    assert source_key(host) == key


def _limited(limits: BasicLimits, username: str, source: str) -> int | None:
    try:
        limits.check(username, source)
    except Refusal as refused:
        assert refused.code is Code.RATE_LIMITED
        return refused.retry_after
    return None


def test_basic_limits_per_pair_username_and_source_with_retry_after() -> None:
    clock = Clock()
    limits = BasicLimits(
        per_username_and_source=2, per_username=3, per_source=4, window=300, clock=clock
    )
    limits.failed("dev-1", "192.0.2.1")
    limits.failed("dev-1", "192.0.2.1")
    assert _limited(limits, "dev-1", "192.0.2.1") == 300  # this device from this source
    assert _limited(limits, "dev-1", "192.0.2.99") is None  # a stranger cannot lock it out
    limits.failed("dev-1", "192.0.2.2")
    assert _limited(limits, "dev-1", "192.0.2.99") == 300  # but guessing from many is capped
    clock.now += 100
    limits.failed("dev-2", "192.0.2.3")
    limits.failed("dev-3", "192.0.2.3")
    limits.failed("dev-4", "192.0.2.3")
    assert _limited(limits, "dev-5", "192.0.2.3") is None
    limits.failed("dev-6", "192.0.2.3")
    assert _limited(limits, "dev-7", "192.0.2.3") == 300  # the source, whatever the username
    clock.now += 200
    assert _limited(limits, "dev-1", "192.0.2.1") is None  # the first failures left the window
    assert _limited(limits, "dev-7", "192.0.2.3") == 100


def test_a_success_clears_the_devices_failures_from_its_source() -> None:
    limits = BasicLimits(per_username_and_source=2, window=300, clock=Clock())
    limits.failed("dev-1", "192.0.2.1")
    limits.succeeded("dev-1", "192.0.2.1")
    limits.failed("dev-1", "192.0.2.1")
    assert _limited(limits, "dev-1", "192.0.2.1") is None


def test_failed_says_once_which_limit_engaged() -> None:
    """One audit entry when a limit engages, not one per refused attempt."""
    limits = BasicLimits(
        per_username_and_source=2, per_username=3, per_source=4, window=300, clock=Clock()
    )
    assert limits.failed("dev-1", "192.0.2.1") == ()
    assert limits.failed("dev-1", "192.0.2.1") == ("username dev-1 from 192.0.2.1",)
    assert limits.failed("dev-1", "192.0.2.1") == ("username dev-1",)
    assert limits.failed("dev-1", "192.0.2.1") == ("source 192.0.2.1",)
    assert limits.failed("dev-1", "192.0.2.1") == ()


def test_the_authority_audits_an_engaged_limit_with_its_code(
    authority: Authority[SqlStore], store: SqlStore
) -> None:
    authority.audit_rate_limit(("username dev-1",), actor="secret:dev-1", window=300, now=NOW)
    entry = store.list_audit(limit=10).items[-1]
    assert (entry.actor, entry.action, entry.outcome) == ("secret:dev-1", "authenticate", "refused")
    assert entry.detail.startswith("rate-limited: too many failed attempts from username dev-1")
