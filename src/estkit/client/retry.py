"""When to try again: transient failures, exponential backoff with full jitter, Retry-After."""

from __future__ import annotations

import datetime as dt
import email.utils
import random
import ssl

import httpx

# 202 is handled apart: it is the server saying "pending", not a failure.
TRANSIENT_STATUSES = frozenset({429, 502, 503, 504})
RETRY_AFTER_STATUSES = frozenset({202, 429, 503})


def backoff_delay(attempt: int, *, base: float, cap: float, rng: random.Random) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**attempt)] (``attempt`` counts from 0)."""
    return rng.uniform(0.0, min(cap, base * 2.0 ** min(attempt, 32)))


# A Retry-After longer than this is taken as this: a server's typo or a hostile peer
# must not park a device for years.
MAX_RETRY_AFTER = 86400.0


def parse_retry_after(value: str | None, *, now: dt.datetime) -> float | None:
    """Seconds to wait from a Retry-After value (delta-seconds or HTTP-date), at most
    ``MAX_RETRY_AFTER``; None if unusable."""
    if value is None:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():
        return min(MAX_RETRY_AFTER, float(int(text[:12])))
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000" in the date: RFC 5322 says UTC
        when = when.replace(tzinfo=dt.UTC)
    return min(MAX_RETRY_AFTER, max(0.0, (when - now).total_seconds()))


def tls_failure(exc: BaseException) -> ssl.SSLError | None:
    """The TLS error behind an httpx error, if any (verification, handshake, alerts)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def is_transient_error(exc: httpx.TransportError) -> bool:
    """Timeouts and dropped connections; never TLS failures (a retry would fail the same way)."""
    if not isinstance(exc, httpx.TimeoutException | httpx.NetworkError | httpx.RemoteProtocolError):
        return False
    failure = tls_failure(exc)
    # A connection closed mid-handshake is a network hiccup, not a TLS verdict.
    return failure is None or isinstance(failure, ssl.SSLEOFError)
