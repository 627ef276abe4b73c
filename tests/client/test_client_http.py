"""The HTTP client core and its circuit breaker, on fake clocks and scripted transports."""

from __future__ import annotations

import datetime as dt
import random
import ssl
from collections.abc import Callable, Iterator

import httpx
import pytest
from client_fakes import FakeClock

from estkit.client import retry, tls
from estkit.client.breaker import CircuitBreaker, State
from estkit.client.http import (
    MIN_PENDING_DELAY,
    BodyFailure,
    CircuitOpen,
    ConnectionFailure,
    HttpCore,
    RetryPolicy,
)

URL = "https://api.example:7443/op"
WALL = dt.datetime(2025, 3, 1, 12, 0, 0, tzinfo=dt.UTC)

Answer = httpx.Response | Callable[[httpx.Request], httpx.Response]


class Script:
    """Answers from a queue (the last repeats); records each request with its timeout."""

    def __init__(self, *answers: Answer) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return answer if isinstance(answer, httpx.Response) else answer(request)

    def timeouts(self) -> list[float]:
        return [r.extensions["timeout"]["read"] for r in self.requests]


def _status(status: int, **headers: str) -> httpx.Response:
    return httpx.Response(status, text=f"status {status}", headers=headers)


def _refused(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


def _untrusted(request: httpx.Request) -> httpx.Response:
    failure = ssl.SSLCertVerificationError(1, "certificate verify failed")
    failure.verify_message = "unable to get local issuer certificate"
    raise httpx.ConnectError("handshake", request=request) from failure


def _wall(clock: FakeClock) -> Callable[[], dt.datetime]:
    start = clock.now
    return lambda: WALL + dt.timedelta(seconds=clock.now - start)


def _core(
    script: Script,
    clock: FakeClock,
    *,
    breaker: CircuitBreaker | None = None,
    max_body: int = 1 << 20,
    seed: int = 0,
    **policy: float,
) -> tuple[HttpCore, httpx.Client]:
    core = HttpCore(
        RetryPolicy(**policy),  # type: ignore[arg-type]
        breaker=breaker if breaker is not None else CircuitBreaker(clock=clock),
        max_body=max_body,
        transport=httpx.MockTransport(script),
        sleep=clock.sleep,
        clock=clock,
        now=_wall(clock),
        rng=random.Random(seed),
    )
    return core, core.open_client(verify=tls.bootstrap_context())


# -- the breaker on its own ---------------------------------------------------------------

# Events: "f" a transient failure, "s" a success, "+N" N seconds pass, "a" a request
# admitted, "r" a request refused; then the state expected after all of them.
BREAKER_CASES = [
    ("closed/fresh", [], State.CLOSED),
    ("closed/four-failures", ["f"] * 4, State.CLOSED),
    ("open/five-failures", ["f"] * 5, State.OPEN),
    ("closed/success-resets-count", ["f"] * 4 + ["s"] + ["f"] * 4, State.CLOSED),
    ("closed/failures-spread-past-window", ["f", "+30", "f", "+31"] + ["f"] * 3, State.CLOSED),
    ("open/failures-within-window", ["f", "+30", "f", "+29"] + ["f"] * 3, State.OPEN),
    ("open/refuses-while-cooling-down", ["f"] * 5 + ["+29", "r"], State.OPEN),
    ("half-open/after-cooldown", ["f"] * 5 + ["+30"], State.HALF_OPEN),
    ("half-open/one-trial-only", ["f"] * 5 + ["+30", "a", "r"], State.HALF_OPEN),
    ("closed/trial-succeeds", ["f"] * 5 + ["+30", "a", "s", "a", "a"], State.CLOSED),
    ("open/trial-fails", ["f"] * 5 + ["+30", "a", "f", "r"], State.OPEN),
    ("half-open/again-after-failed-trial", ["f"] * 5 + ["+30", "a", "f", "+30"], State.HALF_OPEN),
]


@pytest.mark.parametrize(
    ("events", "state"),
    [(e, s) for _, e, s in BREAKER_CASES],
    ids=[i for i, _, _ in BREAKER_CASES],
)
def test_breaker_states(events: list[str], state: State) -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(threshold=5, window=60, cooldown=30, clock=clock)
    for event in events:
        if event == "f":
            breaker.record_failure("HTTP 503")
        elif event == "s":
            breaker.record_success()
        elif event.startswith("+"):
            clock.now += float(event[1:])
        elif event == "a":
            assert breaker.admit() is None
        elif event == "r":
            assert breaker.admit() is not None
    assert breaker.state is state


def test_open_breaker_says_when_it_will_try_again() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(threshold=2, window=60, cooldown=30, clock=clock)
    breaker.record_failure("connection refused")
    breaker.record_failure("timed out (ReadTimeout)")
    clock.now += 12
    refused = breaker.admit()
    assert refused is not None
    assert (refused.retry_in, refused.failures, refused.last_failure) == (
        18.0,
        2,
        "timed out (ReadTimeout)",
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"threshold": 0}, "threshold"),
        ({"window": 0}, "positive"),
        ({"cooldown": -1}, "positive"),
    ],
    ids=["fail/threshold", "fail/window", "fail/cooldown"],
)
def test_breaker_options_are_checked(options: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CircuitBreaker(**options)  # type: ignore[arg-type]


# -- retries, Retry-After, deadline ---------------------------------------------------------


@pytest.mark.parametrize(
    ("answers", "sleeps", "final"),
    [
        ([_status(429, **{"Retry-After": "7"}), _status(200)], [7.0], 200),
        ([_status(503, **{"Retry-After": "3"}), _status(200)], [3.0], 200),
        (
            [_status(503, **{"Retry-After": "Sat, 01 Mar 2025 12:00:20 GMT"}), _status(200)],
            [20.0],
            200,
        ),
        ([_status(503, **{"Retry-After": "soon"}), _status(200)], ["backoff"], 200),
        ([_status(502, **{"Retry-After": "7"}), _status(200)], ["backoff"], 200),
        ([_status(504), _status(200)], ["backoff"], 200),
        ([_status(500), _status(200)], [], 500),
        ([_status(403), _status(200)], [], 403),
        ([_status(429, **{"Retry-After": "1"})], [1.0, 1.0, 1.0], 429),
        ([_status(503, **{"Retry-After": "120"}), _status(200)], [], 503),
    ],
    ids=[
        "ok/429-retry-after",
        "ok/503-retry-after",
        "ok/503-http-date",
        "ok/503-bad-retry-after-backs-off",
        "ok/502-backs-off",
        "ok/504-backs-off",
        "final/500",
        "final/403",
        "final/retries-run-out",
        "final/retry-after-past-deadline",
    ],
)
def test_transient_statuses_are_retried_after_retry_after_or_backoff(
    answers: list[httpx.Response], sleeps: list[float | str], final: int
) -> None:
    clock = FakeClock()
    script = Script(*answers)
    core, http = _core(script, clock, retries=3, backoff=1.0, max_backoff=30.0)
    with http:
        answer = core.send(http, "GET", URL)
    assert answer.status == final
    assert len(clock.sleeps) == len(sleeps)
    for slept, expected in zip(clock.sleeps, sleeps, strict=True):
        if expected == "backoff":
            assert 0.0 <= slept <= 1.0  # the first backoff: full jitter up to ``backoff``
        else:
            assert slept == expected


def test_final_answer_carries_its_retry_after() -> None:
    clock = FakeClock()
    core, http = _core(Script(_status(503, **{"Retry-After": "120"})), clock)
    with http:
        assert core.send(http, "GET", URL).retry_after == 120.0


@pytest.mark.parametrize("seed", range(5))
def test_backoff_is_full_jitter_under_an_exponential_cap(seed: int) -> None:
    clock = FakeClock()
    script = Script(_status(502))
    breaker = CircuitBreaker(threshold=100, clock=clock)
    core, http = _core(
        script,
        clock,
        breaker=breaker,
        seed=seed,
        retries=6,
        backoff=2.0,
        max_backoff=10.0,
        total_timeout=1e6,
    )
    with http:
        assert core.send(http, "GET", URL).status == 502
    caps = [2.0, 4.0, 8.0, 10.0, 10.0, 10.0]
    assert len(clock.sleeps) == len(caps)
    assert all(0.0 <= s <= cap for s, cap in zip(clock.sleeps, caps, strict=True))
    assert len(set(clock.sleeps)) == len(caps)  # drawn, not a fixed schedule


def test_total_deadline_bounds_the_attempts_and_each_attempt_gets_the_time_left() -> None:
    clock = FakeClock()

    def slow(request: httpx.Request) -> httpx.Response:
        clock.now += 15  # the server takes its time, then fails
        return _status(503, **{"Retry-After": "10"})

    script = Script(slow)
    core, http = _core(script, clock, retries=10, timeout=20, total_timeout=60)
    with http:
        answer = core.send(http, "GET", URL)
    assert answer.status == 503
    # 0: 20 s allowed; at 25: 20; at 50: only 10 left, and after it no time to wait.
    assert script.timeouts() == [20.0, 20.0, 10.0]
    assert clock.sleeps == [10.0, 10.0]


def test_no_attempt_starts_after_the_deadline() -> None:
    clock = FakeClock()
    core, http = _core(Script(_status(200)), clock, total_timeout=5)
    deadline = core.deadline()
    clock.now += 5
    with http, pytest.raises(ConnectionFailure, match=r"no answer within 5 s"):
        core.send(http, "GET", URL, deadline=deadline)


def test_transient_transport_errors_are_retried_and_reported_once() -> None:
    clock = FakeClock()
    script = Script(_refused)
    core, http = _core(script, clock, retries=2)
    with http, pytest.raises(ConnectionFailure) as caught:
        core.send(http, "POST", URL, content=b"x")
    assert str(caught.value) == f"{URL}: connection refused (after 3 attempts)"
    assert isinstance(caught.value.__cause__, httpx.ConnectError)
    assert len(script.requests) == 3


def test_tls_verification_failure_is_final_and_does_not_trip_the_breaker() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(threshold=1, clock=clock)
    script = Script(_untrusted)
    core, http = _core(script, clock, breaker=breaker)
    with http, pytest.raises(ConnectionFailure) as caught:
        core.send(http, "GET", URL)
    assert caught.value.detail == (
        "TLS server certificate not trusted: unable to get local issuer certificate"
    )
    assert len(script.requests) == 1
    assert clock.sleeps == []
    assert breaker.state is State.CLOSED


def test_202_is_polled_after_its_retry_after_until_the_deadline() -> None:
    clock = FakeClock()
    script = Script(_status(202, **{"Retry-After": "0"}), _status(202, **{"Retry-After": "25"}))
    core, http = _core(script, clock, total_timeout=60)
    with http:
        answer = core.send(http, "POST", URL, poll_pending=True)
    assert answer.status == 202
    assert answer.retry_after == 25.0  # the wait that would have passed the deadline
    assert clock.sleeps == [MIN_PENDING_DELAY, 25.0, 25.0]  # at 51 s, 25 more would pass 60


def test_202_is_an_answer_when_not_polling() -> None:
    clock = FakeClock()
    core, http = _core(Script(_status(202, **{"Retry-After": "5"})), clock)
    with http:
        assert core.send(http, "POST", URL).status == 202
    assert clock.sleeps == []


@pytest.mark.parametrize(
    ("size", "ok"), [(100, True), (101, False)], ids=["ok/at-cap", "fail/over-cap"]
)
def test_body_is_capped(size: int, ok: bool) -> None:
    clock = FakeClock()
    core, http = _core(Script(httpx.Response(200, content=b"x" * size)), clock, max_body=100)
    with http:
        if ok:
            assert len(core.send(http, "GET", URL).body) == size
        else:
            with pytest.raises(BodyFailure, match="larger than 100 bytes"):
                core.send(http, "GET", URL)


# -- the breaker in the core ------------------------------------------------------------------


def test_breaker_fails_fast_then_lets_one_trial_through_after_the_cooldown() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(threshold=5, window=60, cooldown=30, clock=clock)
    script = Script(_status(503))
    core, http = _core(script, clock, breaker=breaker, retries=3, backoff=0)
    with http:
        assert core.send(http, "GET", URL).status == 503  # 4 failures
        with pytest.raises(CircuitOpen) as caught:
            core.send(http, "GET", URL)  # the 5th opens it; the retry is refused
        assert len(script.requests) == 5
        assert str(caught.value).startswith(
            f"{URL}: not tried: 5 failures in a row within 60 s (last: HTTP 503); "
            "will try again in 30 s (at 12:00:"
        )
        assert caught.value.retry_in == 30.0
        assert breaker.state is State.OPEN

        clock.now += 10
        with pytest.raises(CircuitOpen, match="will try again in 20 s"):
            core.send(http, "GET", URL)
        assert len(script.requests) == 5  # failing fast: nothing sent

        clock.now += 20
        script.answers = [_status(503)]
        with pytest.raises(CircuitOpen):
            core.send(http, "GET", URL)  # the one trial fails: open again, no retry
        assert len(script.requests) == 6
        assert breaker.state is State.OPEN

        clock.now += 30
        script.answers = [_status(200)]
        assert core.send(http, "GET", URL).status == 200  # the trial succeeds: closed
        assert core.send(http, "GET", URL).status == 200
        assert breaker.state is State.CLOSED


def test_a_refusal_is_an_answer_and_keeps_the_breaker_closed() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(threshold=2, clock=clock)
    core, http = _core(Script(_status(403)), clock, breaker=breaker)
    with http:
        for _ in range(5):
            assert core.send(http, "GET", URL).status == 403
    assert breaker.state is State.CLOSED


def test_one_breaker_is_shared_by_the_cores_of_one_server() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(threshold=2, clock=clock)
    first, http1 = _core(Script(_refused), clock, breaker=breaker, retries=1)
    second, http2 = _core(Script(_status(200)), clock, breaker=breaker)
    with http1, http2:
        with pytest.raises(ConnectionFailure):
            first.send(http1, "GET", URL)
        with pytest.raises(CircuitOpen, match=r"\(last: connection refused\)"):
            second.send(http2, "GET", URL)


@pytest.mark.parametrize(
    "options",
    [{"timeout": 0}, {"total_timeout": -1}, {"retries": -1}, {"backoff": -0.5}],
    ids=["fail/timeout", "fail/total", "fail/retries", "fail/backoff"],
)
def test_retry_policy_is_checked(options: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**options)  # type: ignore[arg-type]


def test_retry_policy_defaults_are_the_resilience_handlers() -> None:
    policy = RetryPolicy()
    assert (policy.timeout, policy.total_timeout) == (20.0, 60.0)
    breaker = CircuitBreaker()
    assert (breaker.threshold, breaker.window, breaker.cooldown) == (5, 60.0, 30.0)


def test_a_body_dribbled_past_the_deadline_is_cut() -> None:
    """httpx bounds each read; the core bounds the whole answer by the operation's deadline."""
    clock = FakeClock()

    def dribble(request: httpx.Request) -> httpx.Response:
        def chunks() -> Iterator[bytes]:
            for _ in range(1000):
                clock.now += 19  # each byte within the read timeout, the whole far beyond
                yield b"x"

        return httpx.Response(200, content=chunks())

    core, http = _core(Script(dribble), clock, retries=0, timeout=20, total_timeout=60)
    start = clock.now
    with http, pytest.raises(ConnectionFailure, match="timed out"):
        core.send(http, "GET", URL)
    assert clock.now - start < 60 + 2 * 19  # cut at the first chunk past the deadline


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        ("\u00b2", None),  # a superscript two: a digit to str.isdigit, not to int()
        ("9" * 400, 86400.0),
        ("9" * 5000, 86400.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
        ("Fri, 31 Dec 9999 23:59:59 GMT", 86400.0),
        ("soon", None),
    ],
    ids=["seconds", "unicode-digit", "huge", "huger", "past-date", "far-date", "garbage"],
)
def test_retry_after_is_parsed_safely_and_capped(value: str, seconds: float | None) -> None:
    now = dt.datetime(2026, 12, 4, tzinfo=dt.UTC)
    assert retry.parse_retry_after(value, now=now) == seconds


def test_429_does_not_open_the_breaker() -> None:
    """A server that asks for patience is up: rate limiting is not an outage."""
    clock = FakeClock()
    breaker = CircuitBreaker(clock=clock, threshold=2)
    script = Script(_status(429, **{"Retry-After": "1"}))
    core, http = _core(script, clock, breaker=breaker, retries=5, total_timeout=60)
    with http:
        assert core.send(http, "GET", URL).status == 429
    assert breaker.state is State.CLOSED
    assert len(script.requests) == 6
