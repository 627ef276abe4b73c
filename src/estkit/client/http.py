"""The HTTP client core under the EST and provisioning clients: one request, made resilient.

    core = HttpCore(RetryPolicy(timeout=20, total_timeout=60), breaker=CircuitBreaker())
    with core.open_client(verify=context, headers={...}) as http:
        response = core.send(http, "POST", url, content=body)

``send`` gives every operation a deadline (``total_timeout``) across all its
attempts, and each attempt the smaller of ``timeout`` and the time left.
Transient failures (timeouts, dropped connections, 429/502/503/504) are tried
again up to ``retries`` times, after the server's ``Retry-After`` on 429/503
(delta-seconds or HTTP-date) or else an exponential backoff with full
jitter; a wait that would pass the deadline is not started. With
``poll_pending`` a 202 is asked again after its ``Retry-After`` until the
deadline. TLS verification failures and every other status are final. The
answer's body is read up to ``max_body`` bytes. A ``CircuitBreaker`` shared
by the callers of one server stops the attempts while that server keeps
failing.

``send`` returns the last answer, whatever its status: the clients turn
statuses into their own errors. The core's own failures, translated by each
client into its error tree:

HttpFailure
├── ConnectionFailure   transport or TLS failure, or no answer by the deadline (``url``, ``detail``)
│   └── CircuitOpen     not tried: the breaker is open (``retry_in`` seconds until its trial)
└── BodyFailure         the answer's body is too large or its Content-Encoding is broken
"""

from __future__ import annotations

import datetime as dt
import random
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import httpx

from estkit import __version__
from estkit.client import retry
from estkit.client.breaker import CircuitBreaker
from estkit.client.errors import one_line

USER_AGENT = f"estkit/{__version__}"
# EST and API answers are a few kilobytes; a peer is not trusted to be sane.
MAX_BODY = 1 << 20
# A 202 with "Retry-After: 0" must not turn polling into a busy loop.
MIN_PENDING_DELAY = 1.0

__all__ = [
    "MAX_BODY",
    "USER_AGENT",
    "BodyFailure",
    "CircuitOpen",
    "ConnectionFailure",
    "HttpCore",
    "HttpFailure",
    "Response",
    "RetryPolicy",
    "TlsSession",
    "connection_detail",
    "tls_session",
]


class HttpFailure(Exception):
    """Root of the core's own failures; each client translates them once."""


class ConnectionFailure(HttpFailure):
    """No usable answer from ``url``; ``detail`` says why in one line."""

    def __init__(self, url: str, detail: str) -> None:
        super().__init__(f"{url}: {detail}")
        self.url = url
        self.detail = detail


class CircuitOpen(ConnectionFailure):
    """The breaker is open: nothing was sent; the trial is allowed in ``retry_in`` seconds."""

    def __init__(self, url: str, detail: str, retry_in: float) -> None:
        super().__init__(url, detail)
        self.retry_in = retry_in


class BodyFailure(HttpFailure):
    """The answer's body could not be read as sent (too large, broken encoding)."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Timeouts and retries of one operation (seconds). The defaults are the seed's
    resilience handler: 20 s per attempt, 60 s for the whole operation."""

    timeout: float = 20.0
    total_timeout: float = 60.0
    retries: int = 3
    backoff: float = 1.0
    max_backoff: float = 30.0

    def __post_init__(self) -> None:
        if not self.timeout > 0 or not self.total_timeout > 0:
            raise ValueError("timeouts must be positive")
        if self.retries < 0 or self.backoff < 0 or self.max_backoff < 0:
            raise ValueError("retries and backoff must not be negative")


@dataclass(frozen=True, slots=True)
class TlsSession:
    """The TLS connection an answer came over: its protocol version (``"TLSv1.2"``, …) and
    its ``tls-unique`` channel binding (RFC 5929; defined for TLS 1.2 and earlier only)."""

    version: str
    tls_unique: bytes | None


@dataclass(frozen=True, slots=True)
class Response:
    """One answer, read in full; ``retry_after`` is its Retry-After in seconds, if usable;
    ``tls`` the connection it came over (None when the transport does not tell)."""

    method: str
    url: str
    status: int
    headers: httpx.Headers
    body: bytes
    retry_after: float | None = None
    tls: TlsSession | None = None

    @property
    def where(self) -> str:
        return f"{self.method} {self.url}"


class HttpCore:
    """Sends requests as the module docstring says; every source of time and chance injectable."""

    def __init__(
        self,
        policy: RetryPolicy | None = None,
        *,
        breaker: CircuitBreaker | None = None,
        max_body: int = MAX_BODY,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], dt.datetime] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.policy = policy if policy is not None else RetryPolicy()
        self.breaker = breaker if breaker is not None else CircuitBreaker(clock=clock)
        self._max_body = max_body
        self._transport = transport
        self._sleep = sleep
        self._clock = clock
        self._now = now if now is not None else _utc_now
        self._rng = rng if rng is not None else random.Random()

    def open_client(
        self,
        *,
        verify: ssl.SSLContext,
        auth: httpx.Auth | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Client:
        """An httpx client for ``send``: the core's transport, no environment, no redirects."""
        return httpx.Client(
            verify=verify,
            auth=auth,
            transport=self._transport,
            trust_env=False,  # no proxies or .netrc credentials picked up behind our back
            follow_redirects=False,  # a redirect must not carry credentials elsewhere
            headers={"User-Agent": USER_AGENT, **(headers or {})},
        )

    def deadline(self) -> float:
        """The deadline of an operation starting now (on the core's clock)."""
        return self._clock() + self.policy.total_timeout

    def send(
        self,
        http: httpx.Client,
        method: str,
        url: str,
        *,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        deadline: float | None = None,
        poll_pending: bool = False,
    ) -> Response:
        """The final answer to one request (any status), or a ``HttpFailure``."""
        if deadline is None:
            deadline = self.deadline()
        failures = 0
        polls = 0
        while True:
            remaining = deadline - self._clock()
            if remaining <= 0:
                total = self.policy.total_timeout
                raise ConnectionFailure(url, f"no answer within {total:g} s")
            self._admit(url)
            try:
                answer = self._attempt(
                    http,
                    method,
                    url,
                    content,
                    headers,
                    timeout=min(self.policy.timeout, remaining),
                    deadline=deadline,
                )
            except httpx.TransportError as exc:
                detail = connection_detail(exc)
                if not retry.is_transient_error(exc):
                    self.breaker.release()
                    raise ConnectionFailure(url, detail) from exc
                self.breaker.record_failure(detail)
                if failures >= self.policy.retries or not self._wait(
                    self._backoff(failures), deadline
                ):
                    raise ConnectionFailure(url, _attempts(detail, failures + 1)) from exc
                failures += 1
                continue
            except BaseException:
                self.breaker.release()
                raise
            # A 429 comes from a server that is up and asks for patience (its Retry-After
            # is honoured below): it does not count towards opening the breaker.
            if answer.status in retry.TRANSIENT_STATUSES and answer.status != 429:
                self.breaker.record_failure(f"HTTP {answer.status}")
            else:
                self.breaker.record_success()
            if answer.status == 202 and poll_pending:
                delay = answer.retry_after
                delay = max(MIN_PENDING_DELAY, delay if delay is not None else self._backoff(polls))
                polls += 1
                if not self._wait(delay, deadline):
                    return _with_retry_after(answer, delay)
                continue
            if answer.status not in retry.TRANSIENT_STATUSES or failures >= self.policy.retries:
                return answer
            delay = answer.retry_after
            if delay is None or answer.status not in retry.RETRY_AFTER_STATUSES:
                delay = self._backoff(failures)
            if not self._wait(delay, deadline):
                return answer
            failures += 1

    # -- internals -------------------------------------------------------------------

    def _admit(self, url: str) -> None:
        refused = self.breaker.admit()
        if refused is None:
            return
        when = self._now() + dt.timedelta(seconds=refused.retry_in)
        last = f" (last: {refused.last_failure})" if refused.last_failure else ""
        raise CircuitOpen(
            url,
            f"not tried: {refused.failures} failures in a row within "
            f"{self.breaker.window:g} s{last}; will try again in {refused.retry_in:.0f} s "
            f"(at {when.strftime('%H:%M:%S')} UTC)",
            refused.retry_in,
        )

    def _attempt(
        self,
        http: httpx.Client,
        method: str,
        url: str,
        content: bytes | None,
        headers: Mapping[str, str] | None,
        *,
        timeout: float,
        deadline: float,
    ) -> Response:
        request = http.build_request(
            method, url, content=content, headers=headers, timeout=httpx.Timeout(timeout)
        )
        response = http.send(request, stream=True)
        session = tls_session(response)  # before close: the stream may be gone after it
        try:
            body = bytearray()
            for chunk in response.iter_bytes():
                # httpx's timeout bounds each read, not the whole body: a peer that sends a
                # byte now and then would otherwise hold the operation far past its deadline.
                if body and self._clock() >= deadline:
                    raise httpx.ReadTimeout("answer not complete by the deadline", request=request)
                body += chunk
                if len(body) > self._max_body:
                    raise BodyFailure(
                        f"{method} {url}: response larger than {self._max_body} bytes"
                    )
        except httpx.DecodingError as exc:  # a broken Content-Encoding
            raise BodyFailure(f"{method} {url}: {exc}") from exc
        finally:
            response.close()
        retry_after = retry.parse_retry_after(response.headers.get("retry-after"), now=self._now())
        return Response(
            method,
            url,
            response.status_code,
            response.headers,
            bytes(body),
            retry_after,
            session,
        )

    def _backoff(self, attempt: int) -> float:
        p = self.policy
        return retry.backoff_delay(attempt, base=p.backoff, cap=p.max_backoff, rng=self._rng)

    def _wait(self, delay: float, deadline: float) -> bool:
        """Sleep ``delay`` unless that leaves no time before ``deadline`` (then False)."""
        if self._clock() + delay >= deadline:
            return False
        self._sleep(delay)
        return True


def connection_detail(exc: httpx.TransportError) -> str:
    """One line on why a request got no answer: the one wording of TLS and network failures."""
    failure = retry.tls_failure(exc)
    if isinstance(failure, ssl.SSLCertVerificationError):
        why = getattr(failure, "verify_message", None) or getattr(failure, "reason", None)
        why = why or str(failure)
        return f"TLS server certificate not trusted: {why}"
    if failure is not None:
        return f"TLS failed: {failure.reason or failure}"
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({type(exc).__name__})"
    return one_line(str(exc)) or type(exc).__name__


def tls_session(response: httpx.Response) -> TlsSession | None:
    """The TLS connection ``response`` came over, from httpcore's network stream."""
    stream = response.extensions.get("network_stream")
    tls = stream.get_extra_info("ssl_object") if stream is not None else None
    if tls is None:
        return None
    version = tls.version() or ""
    binding = tls.get_channel_binding("tls-unique") if version != "TLSv1.3" else None
    return TlsSession(version, binding)


def _attempts(detail: str, attempts: int) -> str:
    return f"{detail} (after {attempts} attempts)" if attempts > 1 else detail


def _with_retry_after(answer: Response, delay: float) -> Response:
    return replace(answer, retry_after=delay)


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
