"""server/limits.py on its own: the Basic pool, connections per address (the failure
windows are ca/limits.py, tested in tests/ca/test_attempt_limits.py)."""

from __future__ import annotations

import asyncio
import threading

from estkit.ca.errors import Code, Refusal
from estkit.server.limits import AddressSlots, BasicCheckPool


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
