"""The agent: repair the state directory, renew on schedule, swap, run hooks, keep the hub
connection on the current certificate; until stopped, or refused for good.

Timeline of one renewal: at ``renewal_time`` of the current certificate (its
own dates, fraction minus jitter) the renewer gets and checks a new
certificate and swaps it in; hooks run; the hub connection reconnects with
it; once the new version has worked (the hub accepted it, or the EST server
saw it on ``/health/certificate``) the versions before the previous one are
pruned. A failed attempt keeps the current certificate and is retried after
an exponential backoff with jitter; a 202 after the server's Retry-After.
A final refusal (revoked, decommissioned) is logged at ERROR, written to the
status file, and ends ``run`` with ``EXIT_REFUSED``.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import queue
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from estkit.agent import status as st
from estkit.agent.config import AgentConfig, HubSettings
from estkit.agent.errors import ClockError, RenewalError, RenewalRefused
from estkit.agent.hooks import hook_environment, run_hooks
from estkit.agent.memory import release_free_memory
from estkit.agent.renewal import Renewal, Renewer, load_credentials, retry_delay
from estkit.agent.state import Pause, StateDirectory, Version
from estkit.agent.status import StatusFile, iso
from estkit.pki.renewal import renewal_time

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_REFUSED = 77  # EX_NOPERM: the server refused the device for good; do not restart
# The daemon wakes at least this often to notice a swap made by `estkit agent renew`.
POLL = 5.0
# A clock that is too early is checked again this often (NTP may fix it).
CLOCK_RECHECK = 30.0

Clock = Callable[[], dt.datetime]


class Hub(Protocol):
    """What the daemon needs of the IoT Hub connection (``estkit.agent.hub``)."""

    def start(self, version: Version | None) -> None: ...

    def use(self, version: Version) -> None: ...

    def stop(self) -> None: ...


HubFactory = Callable[..., Hub]


def mqtt_hub(settings: HubSettings, **options: Any) -> Hub:
    """The MQTT hub connection. Imported here, not at the top: paho-mqtt costs about
    1 MB of the agent's resident memory, which a device without ``[hub]`` never needs."""
    from estkit.agent.hub import HubConnection

    return HubConnection(settings, **options)


def _no_pause(step: str) -> None:
    return None


@dataclass(frozen=True, slots=True)
class RenewOnce:
    """What ``Agent.renew_once`` did: ``renewal`` is None when nothing was due."""

    renewal: Renewal | None
    current: Version | None
    due: dt.datetime | None


class Agent:
    """One device's agent; ``run`` is the daemon, ``renew_once`` the one-shot command."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        clock: Clock,
        rng: random.Random | None = None,
        pause: Pause = _no_pause,
        hub_factory: HubFactory = mqtt_hub,
    ) -> None:
        self.config = config
        self.state = StateDirectory(config.state_dir, pause=pause)
        self.status = StatusFile(self.state.status_path)
        self._clock = clock
        self._rng = rng or random.Random()
        self._hub_factory = hub_factory
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._used: queue.SimpleQueue[Version] = queue.SimpleQueue()
        self._confirmed: int | None = None
        self._hub: Hub | None = None

    def request_stop(self) -> None:
        """Ask ``run`` to return soon (from a signal handler or another thread)."""
        self._stop.set()
        self._wake.set()

    # -- the daemon ------------------------------------------------------------------

    def run(self) -> int:
        """Run until ``request_stop`` (``EXIT_OK``) or a final refusal (``EXIT_REFUSED``)."""
        lock_fd = self.state.hold_instance()
        try:
            return self._run()
        finally:
            os.close(lock_fd)

    def _run(self) -> int:
        renewer = Renewer(
            self.config,
            self.state,
            load_credentials(self.config, self.state),
            clock=self._clock,
        )
        with self.state.swap_lock():
            report = self.state.repair()
        current = report.current
        refused_before = self.status.get("state") == st.REFUSED
        confirmed = self.status.get("confirmed_version")
        self._confirmed = confirmed if isinstance(confirmed, int) else None
        self.status.update(
            device_id=self.config.device_id,
            state=st.RUNNING,
            pid=os.getpid(),
            started_at=iso(self._clock()),
            **_certificate_fields(current),
        )
        log.info(
            "agent for %s started; %s",
            self.config.device_id,
            f"current certificate {current.serial} (version {current.number}), valid until "
            f"{current.not_after.isoformat()}"
            if current
            else "no certificate yet: enrolling with the bootstrap certificate",
        )
        if report.rolled_forward and current is not None:
            self._hooks(current)
        self._hub = self._start_hub(current)
        # Start-up frees about 1 MB of heap that glibc would otherwise keep for good. (After
        # a renewal there is little to return: what it adds stays in use, e.g. OpenSSL's caches.)
        release_free_memory()
        try:
            return self._loop(renewer, current, urgent=refused_before)
        finally:
            if self._hub is not None:
                self._hub.stop()
                self._hub = None
            if self.status.get("state") != st.REFUSED:
                self.status.update(state=st.STOPPED, pid=None, stopped_at=iso(self._clock()))
            log.info("agent stopped")

    def _loop(self, renewer: Renewer, current: Version | None, *, urgent: bool) -> int:
        failures = 0
        retry_at: dt.datetime | None = None
        due_by_version: dict[int, dt.datetime] = {}
        clock_refused = False
        retry = self.config.renewal
        while not self._stop.is_set():
            self._prune_used()
            if self.state.current_number() != (current.number if current else None):
                # `estkit agent renew` swapped a version in while we slept.
                current = self.state.current()
                if current is not None:
                    log.info("certificate swapped by another process: version %d", current.number)
                    self.status.update(**_certificate_fields(current))
                    if self._hub is None:
                        self._hub = self._start_hub(current)
                    else:
                        self._hub.use(current)
            try:
                renewer.check_clock(current)
            except ClockError as exc:
                if not clock_refused:
                    log.error("%s", exc)
                    self.status.update(state=st.CLOCK, last_error=_error(exc, self._clock()))
                clock_refused = True
                self._sleep(CLOCK_RECHECK)
                continue
            if clock_refused:
                log.info("clock is plausible again")
                self.status.update(state=st.RUNNING, last_error=None)
                clock_refused = False
            now = self._clock()
            if current is None:
                due = now
            else:
                if current.number not in due_by_version:
                    due_by_version[current.number] = renewal_time(
                        current.certificate,
                        fraction=retry.fraction,
                        jitter=retry.jitter,
                        rng=self._rng,
                    )
                    self.status.update(next_renewal=iso(due_by_version[current.number]))
                due = due_by_version[current.number]
            when = retry_at if retry_at is not None else due
            if urgent or now >= when:
                urgent = False
                try:
                    renewal = self._renew(renewer, current)
                except RenewalRefused as exc:
                    self._refused(exc)
                    return EXIT_REFUSED
                except ClockError:
                    continue  # reported on the next turn
                except RenewalError as exc:
                    failures += 1
                    delay = _retry_after(exc, failures, self.config, self._rng)
                    retry_at = now + dt.timedelta(seconds=delay)
                    keeping = (
                        f"keeping certificate {current.serial}" if current else "no certificate yet"
                    )
                    if exc.retry_after is not None:
                        log.info("%s; %s, asking again in %.1f s", exc, keeping, delay)
                    else:
                        log.warning(
                            "renewal failed (%d in a row): %s; %s, next attempt in %.1f s",
                            failures,
                            exc,
                            keeping,
                            delay,
                        )
                    self.status.update(
                        last_error=_error(exc, now),
                        failures=failures,
                        next_renewal=iso(retry_at),
                    )
                    continue
                if renewal is None:
                    continue  # another process swapped first; look again
                failures = 0
                retry_at = None
                current = renewal.version
                if self._hub is None:
                    self._hub = self._start_hub(current)
                self._after_swap(renewal, renewer, self._hub, daemon=True)
                continue
            self._sleep((when - now).total_seconds())
        return EXIT_OK

    def _renew(self, renewer: Renewer, current: Version | None) -> Renewal | None:
        with self.state.swap_lock():
            if self.state.current_number() != (current.number if current else None):
                return None
            return renewer.renew(current)

    def _refused(self, exc: RenewalRefused) -> None:
        now = self._clock()
        log.error(
            "EST server refused device %s for good (%s): %s. Renewals stopped until an "
            "operator acts",
            self.config.device_id,
            exc.code or "no refusal code",
            exc.reason,
        )
        self.status.update(
            state=st.REFUSED,
            refused={"at": iso(now), "code": exc.code, "reason": exc.reason},
            last_error=_error(exc, now),
            next_renewal=None,
            pid=None,
        )

    def _start_hub(self, current: Version | None) -> Hub | None:
        hub_settings = self.config.hub
        if hub_settings is None or not hub_settings.enabled or current is None:
            return None
        if self._clock() > current.not_after:
            return None  # the hub would refuse it; connect after the renewal
        hub = self._hub_factory(
            hub_settings,
            device_id=self.config.device_id,
            status=self.status,
            on_connected=self._used_successfully,
            rng=self._rng,
        )
        hub.start(current)
        return hub

    def _used_successfully(self, version: Version) -> None:
        # Called on the hub thread: hand over to the main loop, which owns the archive.
        self._used.put(version)
        self._wake.set()

    def _prune_used(self) -> None:
        while True:
            try:
                version = self._used.get_nowait()
            except queue.Empty:
                return
            self._confirm(version)

    def _sleep(self, seconds: float) -> None:
        self._wake.wait(max(0.05, min(seconds, POLL)))
        self._wake.clear()

    # -- shared with renew_once --------------------------------------------------------

    def _after_swap(
        self, renewal: Renewal, renewer: Renewer, hub: Hub | None, *, daemon: bool
    ) -> None:
        version = renewal.version
        log.info(
            "renewed: %s with the %s certificate; version %d, serial %s, valid until %s",
            renewal.operation,
            renewal.authenticated_with,
            version.number,
            version.serial,
            version.not_after.isoformat(),
        )
        renewals = self.status.get("renewals")
        state = self.status.get("state")
        if daemon:
            state = st.RUNNING
        elif state == st.REFUSED:
            state = st.STOPPED  # the refusal is over; no daemon is running it yet
        self.status.update(
            state=state,
            last_renewal={
                "at": iso(self._clock()),
                "operation": renewal.operation,
                "authenticated_with": renewal.authenticated_with,
                "serial": version.serial,
            },
            renewals=(renewals if isinstance(renewals, int) else 0) + 1,
            last_error=None,
            refused=None,
            failures=0,
            **_certificate_fields(version),
        )
        self._hooks(version)
        if hub is not None:
            hub.use(version)
        if renewer.confirm(version):
            self._confirm(version)

    def _confirm(self, version: Version) -> None:
        """``version`` worked: prune the versions before the one it replaced."""
        if self._confirmed is not None and self._confirmed >= version.number:
            return
        with self.state.swap_lock():
            removed = self.state.prune(confirmed=version.number)
        self._confirmed = version.number
        if removed:
            log.info(
                "version %d works; removed old version(s) %s",
                version.number,
                ", ".join(map(str, removed)),
            )
        self.status.update(confirmed_version=version.number)

    def _hooks(self, version: Version) -> None:
        if not self.config.hooks.commands:
            return
        env = hook_environment(
            device_id=self.config.device_id,
            version=version,
            current_dir=self.state.current_link,
        )
        results = run_hooks(self.config.hooks.commands, env=env, timeout=self.config.hooks.timeout)
        failed = [r for r in results if not r.ok]
        self.status.update(
            last_hooks={
                "at": iso(self._clock()),
                "ok": len(results) - len(failed),
                "failed": [f"{' '.join(r.command)}: {r.detail}" for r in failed],
            }
        )

    # -- the one-shot command ------------------------------------------------------------

    def renew_once(self, *, force: bool) -> RenewOnce:
        """Renew now if due (or ``force``); errors are raised, as ``AgentError``s."""
        renewer = Renewer(
            self.config,
            self.state,
            load_credentials(self.config, self.state),
            clock=self._clock,
        )
        confirmed = self.status.get("confirmed_version")
        self._confirmed = confirmed if isinstance(confirmed, int) else None
        with self.state.swap_lock():
            current = self.state.repair().current
            renewer.check_clock(current)
            due = None
            if current is not None:
                # The latest point of the schedule: no jitter for a person's command.
                due = renewal_time(
                    current.certificate,
                    fraction=self.config.renewal.fraction,
                    jitter=0.0,
                    rng=self._rng,
                )
                if not force and self._clock() < due and self._clock() < current.not_after:
                    return RenewOnce(renewal=None, current=current, due=due)
            try:
                renewal = renewer.renew(current)
            except RenewalRefused as exc:
                self._refused(exc)
                raise
            except RenewalError as exc:
                self.status.update(last_error=_error(exc, self._clock()))
                raise
        self._after_swap(renewal, renewer, None, daemon=False)
        return RenewOnce(renewal=renewal, current=renewal.version, due=None)


RETRY_AFTER_CAP = 3600.0


def _retry_after(
    exc: RenewalError, failures: int, config: AgentConfig, rng: random.Random
) -> float:
    r = config.renewal
    if exc.retry_after is not None:
        # The server's Retry-After, but never longer than an hour or retry_max: a wrong
        # or hostile value must not keep a device from renewing for long.
        return min(max(1.0, exc.retry_after), max(r.retry_max, RETRY_AFTER_CAP))
    if exc.slow:
        return r.retry_max
    return retry_delay(failures, minimum=r.retry_min, maximum=r.retry_max, rng=rng)


def _certificate_fields(version: Version | None) -> dict[str, Any]:
    if version is None:
        return {"certificate": None}
    return {
        "certificate": {
            "version": version.number,
            "serial": version.serial,
            "subject": version.certificate.subject.rfc4514_string(),
            "not_before": iso(version.not_before),
            "not_after": iso(version.not_after),
        }
    }


def _error(exc: BaseException, now: dt.datetime) -> dict[str, Any]:
    return {"at": iso(now), "message": str(exc)}
