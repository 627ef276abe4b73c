"""server/limits.py on its own: the failure windows, the Basic pool, connections per address."""

from __future__ import annotations

import asyncio
import threading

import pytest

from estkit.ca.errors import Code, Refusal
from estkit.server.limits import (
    AddressSlots,
    BasicCheckPool,
    BasicLimits,
    FailureLimiter,
    source_key,
)


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


def test_basic_limits_refuse_a_username_or_a_source_with_retry_after() -> None:
    clock = Clock()
    limits = BasicLimits(per_username=2, per_source=3, window=300, clock=clock)
    limits.failed("dev-1", "192.0.2.1")
    limits.failed("dev-1", "192.0.2.1")
    with pytest.raises(Refusal) as refused:
        limits.check("dev-1", "192.0.2.99")  # the username, from anywhere
    assert refused.value.code is Code.RATE_LIMITED and refused.value.retry_after == 300
    limits.check("dev-2", "192.0.2.99")
    limits.failed("dev-2", "192.0.2.1")
    clock.now += 100
    with pytest.raises(Refusal) as refused:
        limits.check("dev-3", "192.0.2.1")  # the source, whatever the username
    assert refused.value.code is Code.RATE_LIMITED and refused.value.retry_after == 200
    clock.now += 200
    limits.check("dev-3", "192.0.2.1")
    limits.check("dev-1", "192.0.2.1")


def test_a_success_clears_the_usernames_failures() -> None:
    limits = BasicLimits(per_username=2, per_source=100, window=300, clock=Clock())
    limits.failed("dev-1", "192.0.2.1")
    limits.succeeded("dev-1")
    limits.failed("dev-1", "192.0.2.1")
    limits.check("dev-1", "192.0.2.1")


def test_basic_pool_refuses_at_once_when_threads_and_queue_are_full() -> None:
    pool = BasicCheckPool(threads=1, queue=1, retry_after=3)
    release = threading.Event()
    ran: list[str] = []

    def slow(name: str) -> str:
        ran.append(name)
        release.wait(10)
        return name

    async def main() -> tuple[list[str], Refusal]:
        first = asyncio.ensure_future(pool.run(lambda: slow("a")))
        second = asyncio.ensure_future(pool.run(lambda: slow("b")))
        await asyncio.sleep(0)
        assert pool.in_flight == 2
        try:
            await pool.run(lambda: slow("c"))
        except Refusal as exc:
            refusal = exc
        else:
            raise AssertionError("a third decision was accepted")
        release.set()
        return [await first, await second], refusal

    try:
        done, refusal = asyncio.run(main())
    finally:
        release.set()
        pool.shutdown()
    assert done == ["a", "b"]
    assert refusal.code is Code.UNAVAILABLE and refusal.retry_after == 3
    assert "c" not in ran  # refused without running
    assert pool.in_flight == 0


def test_basic_pool_frees_its_place_when_the_thread_is_done_not_when_the_caller_leaves() -> None:
    pool = BasicCheckPool(threads=1, queue=0)
    release = threading.Event()
    finished = threading.Event()

    def slow() -> None:
        release.wait(10)
        finished.set()

    async def main() -> int:
        waiting = asyncio.ensure_future(pool.run(slow))
        await asyncio.sleep(0.05)
        waiting.cancel()  # the client went away
        await asyncio.sleep(0)
        return pool.in_flight

    try:
        assert asyncio.run(main()) == 1  # scrypt is still running
        release.set()
        assert finished.wait(10)
    finally:
        release.set()
        pool.shutdown(wait=True)
    assert pool.in_flight == 0


def test_address_slots_count_open_connections_per_address() -> None:
    slots = AddressSlots(2)
    assert slots.acquire("192.0.2.1") and slots.acquire("192.0.2.1")
    assert not slots.acquire("192.0.2.1")
    assert slots.acquire("192.0.2.2")
    slots.release("192.0.2.1")
    assert slots.open("192.0.2.1") == 1
    assert slots.acquire("192.0.2.1")
    for _ in range(2):
        slots.release("192.0.2.1")
    slots.release("192.0.2.2")
    assert len(slots) == 0  # nothing kept for addresses with no connection
