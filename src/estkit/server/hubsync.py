"""Sending the IoT Hub outbox (``store/outbox.py``) to the hub's identity registry.

``server run`` starts one sender per node, in its supervising process beside the CRL
refresher; nodes sharing a database share the outbox, each row held by one sender at
a time (a lease). Every second the sender looks for due rows (a read) and sends them
one by one (``registry.apply``): a registry that cannot take a change now (429, 5xx,
a timeout) gets it again later, after a backoff that doubles from one second to five
minutes (or the hub's Retry-After); one that refuses it for good (400, 401, 403, no
identity and ``create_identities`` off) leaves the row ``failed`` with the reason,
for ``estkit iothub sync --retry-failed``. ``estkit iothub sync`` uses the same sender.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import logging
import os
import random
import secrets
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from estkit.fileio import read_private
from estkit.server.config import ConfigError, IotHubConfig, ServerConfig
from estkit.server.registry import (
    RegistryClient,
    RegistryError,
    SasPolicy,
    Stale,
    Transient,
    apply,
)
from estkit.store import SqlStore
from estkit.store.errors import Unavailable
from estkit.store.outbox import HubOutbox, OutboxEntry

log = logging.getLogger("estkit.iothub")

# A sender holds a row this long at most: longer than one change can take (at most
# 2 * MAX_ROUNDS requests, each bounded by TIMEOUT per phase), so another node takes a
# row over only from a sender that died while it held it.
LEASE = dt.timedelta(minutes=5)
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 300.0
POLL_INTERVAL = 1.0


def retry_delay(attempts: int, *, retry_after: float | None, rng: random.Random) -> float:
    """Seconds until attempt ``attempts + 1``: a backoff doubling from BACKOFF_FIRST up to
    BACKOFF_MAX, jittered down to half so a fleet's changes spread out, but never before
    the hub's ``retry_after`` (itself capped at BACKOFF_MAX)."""
    backoff = min(BACKOFF_MAX, BACKOFF_FIRST * 2.0 ** max(0, attempts - 1))
    delay = backoff * (0.5 + rng.random() / 2)
    if retry_after is not None:
        delay = max(delay, min(retry_after, BACKOFF_MAX))
    return delay


class Result(StrEnum):
    SENT = "sent"  # the registry has it
    RETRY = "retry"  # pending again, from next_attempt_at
    FAILED = "failed"  # refused for good; kept with the reason
    SKIPPED = "skipped"  # superseded, or its lease lost, while it was sent: not written


@dataclass(frozen=True, slots=True)
class Sent:
    """What became of one outbox row: ``detail`` is the registry's outcome (created,
    updated, unchanged) or the error."""

    entry: OutboxEntry
    result: Result
    detail: str
    next_attempt_at: dt.datetime | None = None


class HubSender:
    """Claims outbox rows and sends them, one at a time."""

    def __init__(
        self,
        outbox: HubOutbox,
        client: RegistryClient,
        *,
        create_identities: bool,
        owner: str,
        clock: Callable[[], dt.datetime],
        rng: random.Random | None = None,
        lease: dt.timedelta = LEASE,
        take_back: str | None = None,
    ) -> None:
        self.outbox = outbox
        self.client = client
        self._create = create_identities
        self._owner = owner
        self._clock = clock
        self._rng = rng or random.Random()
        self._lease = lease
        self._take_back = take_back
        self._hub_down = False

    def send_next(self, *, due_only: bool = True, after: int = 0) -> Sent | None:
        """Claim the next row (due now, unless not ``due_only``; id above ``after``) and
        send it; None when there is none to claim."""
        entry = self.outbox.claim(
            owner=self._owner, now=self._clock(), lease=self._lease, due_only=due_only, after=after
        )
        return self._send(entry) if entry is not None else None

    def _send(self, entry: OutboxEntry) -> Sent:
        # A write must come well inside the lease, from a sender that still holds the row.
        deadline = self._clock() + self._lease * 0.8

        def may_write() -> bool:
            now = self._clock()
            return now < deadline and self.outbox.holds(entry.id, owner=self._owner, now=now)

        try:
            outcome, _ = apply(
                self.client, entry.change, create_identities=self._create, may_write=may_write
            )
        except Stale as exc:
            self.outbox.let_go(entry.id, owner=self._owner)
            return Sent(entry, Result.SKIPPED, str(exc))
        except Transient as exc:
            delay = retry_delay(entry.attempts, retry_after=exc.retry_after, rng=self._rng)
            at = self._clock() + dt.timedelta(seconds=delay)
            self._released(
                self.outbox.retry_later(entry.id, owner=self._owner, error=str(exc), at=at), entry
            )
            return Sent(entry, Result.RETRY, str(exc), at)
        except RegistryError as exc:
            self._released(self.outbox.failed(entry.id, owner=self._owner, error=str(exc)), entry)
            return Sent(entry, Result.FAILED, str(exc))
        self._released(self.outbox.sent(entry.id, owner=self._owner, now=self._clock()), entry)
        return Sent(entry, Result.SENT, outcome.value)

    def _released(self, held: bool, entry: OutboxEntry) -> None:
        if not held:
            log.warning(
                "IoT Hub outbox row %d (%s): its lease ran out while it was sent; another "
                "sender may send it again",
                entry.id,
                entry.change.device_id,
            )

    def drain(self, stop: threading.Event) -> None:
        """Send every due row, until none is due or ``stop`` is set."""
        while not stop.is_set() and self.outbox.due(now=self._clock()):
            sent = self.send_next()
            if sent is None:  # held by another sender, or taken meanwhile
                return
            self._log(sent)

    def _log(self, sent: Sent) -> None:
        change = sent.entry.change
        what = f"{change.device_id} {change.status.value} ({change.cause})"
        if sent.result is Result.SENT:
            log.info("IoT Hub: %s: %s", what, sent.detail)
            if self._hub_down:
                log.warning("IoT Hub registry reachable again")
            self._hub_down = False
        elif sent.result is Result.FAILED:
            log.error("IoT Hub: %s refused for good: %s", what, sent.detail)
        elif sent.result is Result.SKIPPED:
            log.warning("IoT Hub: %s not written: %s", what, sent.detail)
        elif not self._hub_down:  # one line per outage, not one per row and attempt
            log.warning("IoT Hub: %s not sent, retrying with backoff: %s", what, sent.detail)
            self._hub_down = True

    def run(self, stop: threading.Event, *, interval: float = POLL_INTERVAL) -> None:
        """Drain now and then every ``interval`` seconds until ``stop`` is set."""
        store_down = False
        while True:
            try:
                self.drain(stop)
            except Unavailable as exc:
                if not store_down:
                    log.warning("IoT Hub outbox: database unavailable (%s); retrying", exc)
                store_down = True
            except Exception:  # keep sending; a row held meanwhile is taken up after its lease
                log.exception("IoT Hub outbox: sending failed")
            else:
                store_down = False
            if stop.wait(interval):
                return

    def start(self, stop: threading.Event) -> threading.Thread:
        """Send from a daemon thread until ``stop`` is set; first release the rows held by
        owners named ``take_back…`` (this node's sender before it restarted)."""
        take_back = self._take_back
        if take_back is not None and (n := self.outbox.take_back(owner_prefix=take_back)):
            log.info("IoT Hub outbox: took back %d row(s) this node held when it stopped", n)
        thread = threading.Thread(target=self.run, args=(stop,), name="iothub-sync", daemon=True)
        thread.start()
        return thread


def read_policy_key(path: Path) -> bytes:
    """The policy's key from ``path``: base64, in a file only its owner may read (0600 or
    0400); ``ConfigError`` naming ``iothub.policy_key_file`` otherwise."""
    where = "iothub.policy_key_file"
    try:
        text = read_private(path, where=where, what="a key file").strip()
        key = base64.b64decode(text, validate=True)
    except binascii.Error:
        key = b""
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not key:
        raise ConfigError(
            f"{where}: {path}: expected the policy's key, in base64 as Azure shows it"
        )
    return key


def registry_client(config: IotHubConfig, *, clock: Callable[[], dt.datetime]) -> RegistryClient:
    """The registry client of ``[iothub]``, its key read and its trust anchor loaded now."""
    verify: ssl.SSLContext | bool = True
    if config.ca_file is not None:
        try:
            verify = ssl.create_default_context(cafile=str(config.ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"iothub.ca_file: {config.ca_file}: {exc}") from None
    return RegistryClient(
        host=config.host,
        policy=SasPolicy(config.policy_name, read_policy_key(config.policy_key_file)),
        clock=clock,
        endpoint=config.endpoint,
        api_version=config.api_version,
        verify=verify,
    )


def hub_sender(
    config: ServerConfig, store: SqlStore, *, clock: Callable[[], dt.datetime]
) -> HubSender | None:
    """The sender of this node, or None without ``[iothub]``; ``ConfigError`` when its
    key or trust anchor cannot be read (before the server listens)."""
    if config.iothub is None:
        return None
    # One sender per node, whose name no other running node holds (``server/nodes.py``):
    # what an owner of this name holds is this node's from before it restarted.
    node = f"node:{config.node.name}:"
    return HubSender(
        store.hub_outbox(),
        registry_client(config.iothub, clock=clock),
        create_identities=config.iothub.create_identities,
        owner=f"{node}{os.getpid()}:{secrets.token_hex(4)}",
        clock=clock,
        take_back=node,
    )
