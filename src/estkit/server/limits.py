"""Limits for a public endpoint: how much of the server one client can make it spend.

Two kinds live here, both per worker process:

- ``BasicCheckPool``: HTTP Basic enrollment decisions (an scrypt check of ~50 ms
  and 16 MiB each) run on a few threads of their own, never on the shared
  thread pool; when those threads and a short queue are full the answer is
  ``Refusal(UNAVAILABLE)`` (503 + Retry-After) without running scrypt.
- ``FailureLimiter`` / ``BasicLimits``: failed Basic attempts per username and
  per source address in a sliding window; over the limit the answer is
  ``Refusal(RATE_LIMITED)`` (429 + Retry-After), decided before scrypt and
  before the store is asked, so an unknown user and a wrong secret are refused
  alike and equally fast. The limiter only refuses; the authority audits.

The connection-level limits (header count and size, read timeouts, connections
per address) are enforced by the HTTP protocol in ``server/tls.py`` and the TLS
layer in ``server/tls_openssl.py``; their numbers are here so that they can be
read (and later configured) in one place.

The numbers are module constants, not configuration (yet): a deployment that
needs others can have them wired into ``[server]`` later.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import ipaddress
import math
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from estkit.ca.errors import Code, Refusal

T = TypeVar("T")


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# -- HTTP Basic ---------------------------------------------------------------------------

# scrypt threads per worker: half the cores, so that a Basic flood leaves the other
# half to the event loop (TLS handshakes, mTLS enrollment). 16 MiB each at most.
BASIC_THREADS = max(1, _cores() // 2)
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

# Failed Basic attempts (wrong, used or unknown secret) in a sliding window. Five per
# device id is plenty for a device with a typo'd or used secret and nothing for
# guessing a 128-bit secret; twenty per source leaves room for a factory station
# provisioning many devices from one address.
FAILURE_WINDOW = 300.0  # seconds
FAILURES_PER_USERNAME = 5
FAILURES_PER_SOURCE = 20
# Usernames and sources remembered (each): past this the oldest is forgotten, so
# memory stays bounded (≈ 1 KB per entry) whatever an attacker sends.
FAILURE_ENTRIES = 4096
# Usernames are remembered by at most this many characters (device ids have 64).
USERNAME_KEY_LENGTH = 128

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


class FailureLimiter:
    """At most ``limit`` failures per key in any ``window`` seconds, for ``max_entries`` keys.

    Each key keeps the times of its last ``limit`` failures (a sliding window);
    the least recently failed key is forgotten when there are too many.
    """

    def __init__(self, *, limit: int, window: float, max_entries: int) -> None:
        if limit < 1 or window <= 0 or max_entries < 1:
            raise ValueError("limit and max_entries must be >= 1 and window > 0")
        self.limit = limit
        self.window = window
        self.max_entries = max_entries
        self._failures: collections.OrderedDict[str, collections.deque[float]] = (
            collections.OrderedDict()
        )

    def __len__(self) -> int:
        return len(self._failures)

    def retry_after(self, key: str, *, now: float) -> int | None:
        """Whole seconds until ``key`` may try again, or None if it may now."""
        times = self._failures.get(key)
        if times is None or len(times) < self.limit:
            return None
        wait = times[0] + self.window - now
        return max(1, math.ceil(wait)) if wait > 0 else None

    def record(self, key: str, *, now: float) -> None:
        times = self._failures.get(key)
        if times is None:
            times = self._failures[key] = collections.deque(maxlen=self.limit)
            if len(self._failures) > self.max_entries:
                self._failures.popitem(last=False)
        else:
            self._failures.move_to_end(key)
        times.append(now)

    def forget(self, key: str) -> None:
        self._failures.pop(key, None)


def source_key(host: str | None) -> str:
    """What a source address is counted by: the address, or for IPv6 its /64."""
    if not host:
        return "?"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return host


class BasicLimits:
    """Failed Basic attempts per username and per source; used on the event loop only."""

    def __init__(
        self,
        *,
        per_username: int = FAILURES_PER_USERNAME,
        per_source: int = FAILURES_PER_SOURCE,
        window: float = FAILURE_WINDOW,
        max_entries: int = FAILURE_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.usernames = FailureLimiter(limit=per_username, window=window, max_entries=max_entries)
        self.sources = FailureLimiter(limit=per_source, window=window, max_entries=max_entries)
        self._clock = clock

    def check(self, username: str, source: str | None) -> None:
        """``Refusal(RATE_LIMITED)`` if either has failed too often lately."""
        now = self._clock()
        waits = [
            self.usernames.retry_after(_username_key(username), now=now),
            self.sources.retry_after(source_key(source), now=now),
        ]
        wait = max((w for w in waits if w is not None), default=None)
        if wait is not None:
            raise Refusal(
                Code.RATE_LIMITED,
                "too many failed HTTP Basic attempts; retry later",
                retry_after=wait,
            )

    def failed(self, username: str, source: str | None) -> None:
        now = self._clock()
        self.usernames.record(_username_key(username), now=now)
        self.sources.record(source_key(source), now=now)

    def succeeded(self, username: str) -> None:
        self.usernames.forget(_username_key(username))


def _username_key(username: str) -> str:
    return username[:USERNAME_KEY_LENGTH]
