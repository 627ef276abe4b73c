"""Limits for a public endpoint: how much of the server one client can make it spend.

Two kinds live here, both per worker process:

- ``BasicCheckPool``: HTTP Basic enrollment decisions (a digest check, a store
  lookup and the enrollment; an scrypt check of ~50 ms and 16 MiB for secrets
  stored by earlier versions) run on a few threads of their own, never on the
  shared thread pool; when those threads and a short queue are full the answer
  is ``Refusal(UNAVAILABLE)`` (503 + Retry-After) without checking anything.
- ``BasicLimits`` (from ``ca/limits.py``, where the policy lives): failed Basic
  attempts per username and per source address in a sliding window; over the
  limit the answer is ``Refusal(RATE_LIMITED)`` (429 + Retry-After), decided
  before the secret is checked and before the store is asked, so an unknown user and a wrong
  secret are refused alike and equally fast.

The connection-level limits (header count and size, read timeouts, connections
per address) are enforced by the HTTP protocol in ``server/tls.py`` and the TLS
layer in ``server/tls_openssl.py``; their numbers are here so that they can be
read (and later configured) in one place.

The numbers are module constants, not configuration (yet): a deployment that
needs others can have them wired into ``[server]`` later.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from estkit.ca.errors import Code, Refusal
from estkit.ca.limits import BasicLimits, FailureLimiter, source_key

__all__ = [
    "BASIC_BUSY_RETRY_AFTER",
    "BASIC_REFUSAL_DELAY",
    "BasicCheckPool",
    "BasicLimits",
    "FailureLimiter",
    "source_key",
]

T = TypeVar("T")


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# -- HTTP Basic ---------------------------------------------------------------------------

# scrypt threads of the whole server: half the cores, so that a Basic flood leaves the
# other half to the event loops (TLS handshakes, mTLS enrollment). 16 MiB each at most.
# Each of W workers gets its share (``basic_threads``), at least one.
BASIC_THREADS = max(1, _cores() // 2)


def basic_threads(workers: int) -> int:
    """One worker's share of ``BASIC_THREADS`` (at least 1)."""
    return max(1, BASIC_THREADS // max(1, workers))


# A Basic request refused as rate-limited or busy is answered after this many seconds:
# a client that waits for its answer (one request at a time per connection, and
# at most MAX_CONNECTIONS_PER_ADDRESS connections) sends one such request per
# second per connection instead of thousands. A coroutine sleeps; no thread waits.
BASIC_REFUSAL_DELAY = 1.0
# Basic decisions waiting for a thread; beyond threads + queue the answer is 503. A
# waiting decision holds no scrypt memory, and 4 per thread is 200 ms of waiting.
BASIC_QUEUE = 4 * BASIC_THREADS
# Retry-After of that 503: a few checks' time, plus room for the others waiting.
BASIC_BUSY_RETRY_AFTER = 2

# Failed Basic attempts per username and source: ca/limits.py (a policy, pure).

# -- HTTP, per connection (server/tls.py and server/tls_openssl.py) ------------------------

# Request line plus header fields. nginx allows 4 x 8 KiB by default; an API bearer
# token (an OIDC JWT with its claims) is the largest header a client sends here.
MAX_HEADER_BYTES = 32 * 1024
# Apache's LimitRequestFields default; EST clients send fewer than 15.
MAX_HEADER_COUNT = 100
# After the TLS handshake the request head must arrive within HEAD_TIMEOUT and its
# body within BODY_TIMEOUT after the head (an EST body is a few KB). Idle keep-alive
# between requests is uvicorn's own timeout.
HEAD_TIMEOUT = 10.0
BODY_TIMEOUT = 30.0
# Open connections from one address, per worker; beyond it a connection is reset
# before its handshake. A site of devices behind one NAT renews days apart.
MAX_CONNECTIONS_PER_ADDRESS = 32


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """What the HTTP protocol (``server/tls.py``) allows one connection."""

    max_header_bytes: int = MAX_HEADER_BYTES
    max_header_count: int = MAX_HEADER_COUNT
    head_timeout: float = HEAD_TIMEOUT
    body_timeout: float = BODY_TIMEOUT


class AddressSlots:
    """Open connections per source address, at most ``limit`` each (one worker process).

    Only counts: no reference to a connection is kept, so a closed one is freed
    by reference counting (``tls_openssl``'s ``connection_lost``).
    """

    def __init__(self, limit: int = MAX_CONNECTIONS_PER_ADDRESS) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.limit = limit
        self._open: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._open)

    def open(self, address: str) -> int:
        return self._open.get(address, 0)

    def acquire(self, address: str) -> bool:
        """Count one more connection from ``address``; False (not counted) if it has ``limit``."""
        count = self._open.get(address, 0)
        if count >= self.limit:
            return False
        self._open[address] = count + 1
        return True

    def release(self, address: str) -> None:
        count = self._open.get(address, 0) - 1
        if count > 0:
            self._open[address] = count
        else:
            self._open.pop(address, None)


class BasicCheckPool:
    """A few threads for Basic-authenticated decisions, and a short queue in front of them.

    ``run`` answers ``Refusal(UNAVAILABLE)`` at once, without queueing, when
    ``threads + queue`` decisions are already running or waiting.
    """

    def __init__(
        self,
        *,
        threads: int = BASIC_THREADS,
        queue: int = BASIC_QUEUE,
        retry_after: int = BASIC_BUSY_RETRY_AFTER,
    ) -> None:
        if threads < 1 or queue < 0:
            raise ValueError(f"threads must be >= 1 and queue >= 0, got {threads} and {queue}")
        self.capacity = threads + queue
        self._retry_after = retry_after
        unmap_large_allocations()
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="estkit-basic")
        self._lock = threading.Lock()
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        """Decisions running or waiting now."""
        return self._in_flight

    async def run(self, fn: Callable[[], T]) -> T:
        with self._lock:
            if self._in_flight >= self.capacity:
                raise Refusal(
                    Code.UNAVAILABLE,
                    "too many HTTP Basic authentications in progress; retry later",
                    retry_after=self._retry_after,
                )
            self._in_flight += 1
        try:
            future = self._executor.submit(fn)
        except BaseException:
            self._done(None)
            raise
        # Counted down when the thread is done, not when the caller stops waiting: a
        # client that goes away does not free a thread that is still running scrypt.
        future.add_done_callback(self._done)
        return await asyncio.wrap_future(future)

    def _done(self, _future: Future[T] | None) -> None:
        with self._lock:
            self._in_flight -= 1

    def shutdown(self, *, wait: bool = False) -> None:
        self._executor.shutdown(wait=wait, cancel_futures=True)


# glibc's M_MMAP_THRESHOLD (mallopt's parameter number) and the value set.
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 4 * 1024 * 1024


def unmap_large_allocations() -> None:
    """Give scrypt's 16 MiB back to the system after each check (glibc only).

    glibc raises its mmap threshold to the size of each large block freed, up to
    32 MiB: after the first check every scrypt buffer came from the heap of its
    thread and stayed resident (the flood of finding 2 left the server 500 MB
    larger). A threshold set once stays where it is: blocks from 4 MiB up are
    mapped and unmapped each time, which costs microseconds against scrypt's 50 ms.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
    except (OSError, AttributeError):  # not glibc: its own policy stands
        pass
