"""Failed authentication attempts, limited per username and per source address.

Pure like the rest of the policy: the clock is injected, nothing is stored
(the counts live in the memory of one server process, bounded). The server
asks ``check`` before it spends a secret check and reports each
outcome; a limited attempt is refused with ``rate-limited`` and a
``Retry-After`` whether or not its username exists, so the answer and its
timing tell nothing about which device ids exist.
"""

from __future__ import annotations

import collections
import ipaddress
import math
import time
from collections.abc import Callable

from estkit.ca.errors import Code, Refusal

# Failed Basic attempts (wrong, used or unknown secret) in a sliding window, counted
# three ways. Five per device id from one source is plenty for a device with a typo'd
# or used secret and nothing for guessing a 192-bit secret; counting per (device id,
# source) means a stranger elsewhere cannot lock a device out with five guesses.
# Fifty per device id from anywhere caps a guess spread over many addresses, and
# twenty per source caps one address trying many device ids.
FAILURE_WINDOW = 300.0  # seconds
FAILURES_PER_USERNAME_AND_SOURCE = 5
FAILURES_PER_USERNAME = 50
FAILURES_PER_SOURCE = 20
# Usernames and sources remembered (each): past this the oldest is forgotten, so
# memory stays bounded (≈ 1 KB per entry) whatever an attacker sends.
FAILURE_ENTRIES = 4096
# Usernames are remembered by at most this many characters (device ids have 64).
USERNAME_KEY_LENGTH = 128


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
    """Failed Basic attempts per (username, source), per username and per source;
    used on the event loop only."""

    def __init__(
        self,
        *,
        per_username_and_source: int = FAILURES_PER_USERNAME_AND_SOURCE,
        per_username: int = FAILURES_PER_USERNAME,
        per_source: int = FAILURES_PER_SOURCE,
        window: float = FAILURE_WINDOW,
        max_entries: int = FAILURE_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        def limiter(limit: int) -> FailureLimiter:
            return FailureLimiter(limit=limit, window=window, max_entries=max_entries)

        self.pairs = limiter(per_username_and_source)
        self.usernames = limiter(per_username)
        self.sources = limiter(per_source)
        self.window = window
        self._clock = clock

    def _keys(
        self, username: str, source: str | None
    ) -> tuple[tuple[FailureLimiter, str, str], ...]:
        user, src = _username_key(username), source_key(source)
        return (
            (self.pairs, f"{user} {src}", f"username {user} from {src}"),
            (self.usernames, user, f"username {user}"),
            (self.sources, src, f"source {src}"),
        )

    def check(self, username: str, source: str | None) -> None:
        """``Refusal(RATE_LIMITED)`` if any of the three has failed too often lately."""
        now = self._clock()
        waits = [
            limiter.retry_after(key, now=now) for limiter, key, _ in self._keys(username, source)
        ]
        wait = max((w for w in waits if w is not None), default=None)
        if wait is not None:
            raise Refusal(
                Code.RATE_LIMITED,
                "too many failed HTTP Basic attempts; retry later",
                retry_after=wait,
            )

    def failed(self, username: str, source: str | None) -> tuple[str, ...]:
        """Count a failure; returns what this failure put under the limit
        (``"username dev-1 from 192.0.2.7"``, ``"source 192.0.2.7"``), for one audit
        entry each time a limit engages rather than one per refused attempt."""
        now = self._clock()
        engaged: list[str] = []
        for limiter, key, name in self._keys(username, source):
            limited = limiter.retry_after(key, now=now) is not None
            limiter.record(key, now=now)
            if not limited and limiter.retry_after(key, now=now) is not None:
                engaged.append(name)
        return tuple(engaged)

    def succeeded(self, username: str, source: str | None) -> None:
        """A device that got in: its own failures from there are forgotten."""
        self.pairs.forget(f"{_username_key(username)} {source_key(source)}")


def _username_key(username: str) -> str:
    return username[:USERNAME_KEY_LENGTH]
