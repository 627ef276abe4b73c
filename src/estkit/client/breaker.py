"""A circuit breaker: stop calling a server that keeps failing, try again after a cool-down.

    closed ──(``threshold`` transient failures in a row, all within ``window`` s)──► open
    open ──(``cooldown`` s passed; the next request is the one trial)──► half-open
    half-open ──(trial succeeds)──► closed
    half-open ──(trial fails)──► open (for another ``cooldown``)

Only transient failures count (timeouts, dropped connections, 429/502/503/504);
any other answer, a refusal included, shows that the server is up and resets
the count. The breaker is a value shared by every client of one server (the
agent keeps one for its lifetime), so it is thread-safe; the clock is injected.
"""

from __future__ import annotations

import enum
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_THRESHOLD = 5
DEFAULT_WINDOW = 60.0
DEFAULT_COOLDOWN = 30.0


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


@dataclass(frozen=True, slots=True)
class Refused:
    """Why the breaker lets no request through now: ``retry_in`` seconds until the trial."""

    retry_in: float
    failures: int
    last_failure: str


class CircuitBreaker:
    """Counts transient failures of one server; ``admit()`` says whether to send a request."""

    def __init__(
        self,
        *,
        threshold: int = DEFAULT_THRESHOLD,
        window: float = DEFAULT_WINDOW,
        cooldown: float = DEFAULT_COOLDOWN,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if threshold < 1:
            raise ValueError(f"threshold must be at least 1, got {threshold}")
        if not window > 0 or not cooldown > 0:
            raise ValueError("window and cooldown must be positive")
        self.threshold = threshold
        self.window = window
        self.cooldown = cooldown
        self._clock = clock
        self._lock = threading.Lock()
        self._failures: deque[float] = deque()
        self._last_failure = ""
        self._opened_at: float | None = None
        self._trial_running = False

    @property
    def state(self) -> State:
        with self._lock:
            return self._state(self._clock())

    def _state(self, now: float) -> State:
        if self._opened_at is None:
            return State.CLOSED
        if self._trial_running or now >= self._opened_at + self.cooldown:
            return State.HALF_OPEN
        return State.OPEN

    def admit(self) -> Refused | None:
        """None when a request may go (in half-open state: the one trial), else why not."""
        with self._lock:
            now = self._clock()
            state = self._state(now)
            if state is State.CLOSED:
                return None
            assert self._opened_at is not None
            if state is State.HALF_OPEN and not self._trial_running:
                self._trial_running = True
                return None
            # Open, or half-open with the trial still out: fail fast.
            retry_in = max(0.0, self._opened_at + self.cooldown - now)
            return Refused(retry_in, len(self._failures), self._last_failure)

    def record_success(self) -> None:
        """The server answered (anything but a transient failure): close."""
        with self._lock:
            self._failures.clear()
            self._opened_at = None
            self._trial_running = False

    def record_failure(self, detail: str) -> None:
        """A transient failure (``detail`` is shown when the breaker refuses later)."""
        with self._lock:
            now = self._clock()
            self._last_failure = detail
            if self._trial_running or self._opened_at is not None:
                # The trial failed (or a request admitted before opening): open again.
                self._opened_at = now
                self._trial_running = False
                return
            self._failures.append(now)
            while self._failures and self._failures[0] < now - self.window:
                self._failures.popleft()
            if len(self._failures) >= self.threshold:
                self._opened_at = now

    def release(self) -> None:
        """The admitted request ended without a verdict on the server (a local error):
        let the next request be the trial."""
        with self._lock:
            self._trial_running = False
