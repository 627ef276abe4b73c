"""OCSP over plain HTTP (RFC 6960 appendix A), on the CRL listener (``crl_http``).

``GET /ocsp/<URL-encoded base64 of the DER request>`` and ``POST /ocsp`` with an
``application/ocsp-request`` body; the answer is ``application/ocsp-response``, an
OCSP error status (``malformedRequest``, ``unauthorized``, ``tryLater``) included:
nothing a client sends gets a traceback or an HTML page.

Bounds: a POST body of at most ``MAX_REQUEST_BYTES`` with a Content-Length, read
within ``BODY_TIMEOUT``; the answers that cost a signature or a database read (a
response not cached yet, a nonce) at most ``SIGNED_PER_SECOND`` a second per source
(with bursts of ``SIGNED_BURST``), ``tryLater`` beyond. Answers from the cache cost
neither and are not counted. Connections per source and in all: ``crl_http``.
"""

from __future__ import annotations

import collections
import datetime as dt
import threading
import time
from collections.abc import Callable
from typing import Final, Protocol

from estkit.ca.limits import source_key
from estkit.ca.ocsp import MALFORMED
from estkit.pki.ocsp import MalformedRequest, request_from_path

__all__ = ["MAX_REQUEST_BYTES", "OCSP_PATH", "OcspEndpoint", "Responder", "SourceBudget"]

OCSP_PATH: Final = "/ocsp"
# An OCSP request is ~80-120 bytes; a signed one with its certificates a few KB.
MAX_REQUEST_BYTES: Final = 16 * 1024
# A POST body must arrive whole within this many seconds.
BODY_TIMEOUT: Final = 10.0
SIGNED_PER_SECOND: Final = 50.0
SIGNED_BURST: Final = 200.0
# Sources whose budget is remembered; past this the least recently seen is forgotten.
BUDGET_SOURCES: Final = 4096


class Responder(Protocol):
    """What the endpoint needs of ``ca.ocsp.OcspResponder``."""

    def respond(
        self, request: bytes, *, now: dt.datetime, admit: Callable[[], bool] = ...
    ) -> bytes: ...


class SourceBudget:
    """A token bucket per source: ``rate`` a second, at most ``burst`` saved up; at most
    ``max_sources`` sources remembered. Thread-safe (the listener's threads share it)."""

    def __init__(
        self,
        *,
        rate: float = SIGNED_PER_SECOND,
        burst: float = SIGNED_BURST,
        max_sources: int = BUDGET_SOURCES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0 or burst < 1 or max_sources < 1:
            raise ValueError("rate must be > 0, burst >= 1 and max_sources >= 1")
        self.rate = rate
        self.burst = burst
        self.max_sources = max_sources
        self._clock = clock
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def take(self, source: str) -> bool:
        """Spend one token of ``source``'s; False when it has none left."""
        now = self._clock()
        with self._lock:
            tokens, since = self._buckets.pop(source, (self.burst, now))
            tokens = min(self.burst, tokens + (now - since) * self.rate)
            allowed = tokens >= 1
            self._buckets[source] = (tokens - 1 if allowed else tokens, now)
            if len(self._buckets) > self.max_sources:
                self._buckets.popitem(last=False)
        return allowed


class OcspEndpoint:
    """Requests in, DER responses out; the HTTP framing is the listener's."""

    def __init__(
        self,
        responder: Responder,
        clock: Callable[[], dt.datetime],
        *,
        budget: SourceBudget | None = None,
    ) -> None:
        self._responder = responder
        self._clock = clock
        self._budget = budget if budget is not None else SourceBudget()

    def answer_get(self, encoded: str, *, source: str | None) -> bytes:
        """The response to a GET request: ``encoded`` is the path after ``/ocsp/``."""
        try:
            request = request_from_path(encoded)
        except MalformedRequest:
            return MALFORMED
        return self.answer(request, source=source)

    def answer(self, request: bytes, *, source: str | None) -> bytes:
        """The response to a DER request from the address ``source``."""
        key = source_key(source)
        return self._responder.respond(
            request, now=self._clock(), admit=lambda: self._budget.take(key)
        )
