"""Nodes of a fleet sharing one database: the heartbeat that registers this one, and
which node's URL each region's devices are given.

Every server process (each uvicorn worker) registers its node on start and moves
its ``last_seen`` every ``heartbeat_interval()`` seconds from a daemon thread; a
node not seen for ``STALE_AFTER_BEATS`` heartbeats is shown as stale.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from estkit.store.errors import Unavailable
from estkit.store.models import Node

# Seconds between heartbeats; tests shorten it to see a killed node go stale.
HEARTBEAT_ENV = "ESTKIT_HEARTBEAT_SECONDS"
DEFAULT_HEARTBEAT = 10.0
STALE_AFTER_BEATS = 3

log = logging.getLogger("estkit.nodes")


class NodeRegistry(Protocol):
    def register_node(self, node: Node) -> None: ...
    def node_seen(self, name: str, *, now: dt.datetime) -> bool: ...


def heartbeat_interval(environ: dict[str, str] | None = None) -> float:
    """The heartbeat interval: ``ESTKIT_HEARTBEAT_SECONDS`` (0.1-3600), else 10 s."""
    value = (os.environ if environ is None else environ).get(HEARTBEAT_ENV)
    if value is None:
        return DEFAULT_HEARTBEAT
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{HEARTBEAT_ENV}: expected seconds, got {value!r}") from None
    if not 0.1 <= seconds <= 3600:
        raise ValueError(f"{HEARTBEAT_ENV}: 0.1-3600 seconds, got {value!r}")
    return seconds


def stale_after(interval: float) -> dt.timedelta:
    return dt.timedelta(seconds=STALE_AFTER_BEATS * interval)


DEFAULT_STALE_AFTER = stale_after(DEFAULT_HEARTBEAT)


class Heartbeat:
    """Registers ``node`` and keeps its ``last_seen`` fresh until ``stop`` is set.

    A database that cannot be reached costs one log line when it goes away and one
    when it is back; the beats in between are skipped, not queued.
    """

    def __init__(
        self,
        registry: NodeRegistry,
        node: Node,
        *,
        clock: Callable[[], dt.datetime],
        interval: float,
        stop: threading.Event,
    ) -> None:
        self._registry = registry
        self._node = node
        self._clock = clock
        self._interval = interval
        self._stop = stop
        self._registered = False
        self._failing = False

    def beat(self) -> None:
        """One heartbeat: register (first time, or after the row went) or move last_seen."""
        try:
            now = self._clock()
            if not (self._registered and self._registry.node_seen(self._node.name, now=now)):
                self._registry.register_node(
                    Node(
                        name=self._node.name,
                        region=self._node.region,
                        public_url=self._node.public_url,
                        started_at=self._node.started_at,
                        last_seen=now,
                        version=self._node.version,
                    )
                )
                self._registered = True
        except Unavailable as exc:
            if not self._failing:
                log.warning("node %s: heartbeat not recorded: %s", self._node.name, exc)
            self._failing = True
            return
        if self._failing:
            log.warning("node %s: heartbeat recorded again", self._node.name)
        self._failing = False

    def start(self) -> threading.Thread:
        """The first beat now (the node is listed as soon as it serves), then a daemon thread."""
        self.beat()
        thread = threading.Thread(target=self._loop, name="estkit-heartbeat", daemon=True)
        thread.start()
        return thread

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.beat()
            except Exception:  # the heartbeat must outlive any one failure
                log.exception("heartbeat failed; trying again in %g s", self._interval)


@dataclass(frozen=True, slots=True)
class RegionUrl:
    region: str
    node: str
    public_url: str


def region_urls(nodes: Iterable[Node]) -> list[RegionUrl]:
    """Per region, the public URL of its most recently seen node, by region."""
    freshest: dict[str, Node] = {}
    for node in nodes:
        seen = freshest.get(node.region)
        if seen is None or (node.last_seen, node.name) > (seen.last_seen, seen.name):
            freshest[node.region] = node
    return [
        RegionUrl(region, node.name, node.public_url) for region, node in sorted(freshest.items())
    ]


def est_url(public_url: str, label: str | None = None) -> str:
    base = f"{public_url.rstrip('/')}/.well-known/est"
    return f"{base}/{label}" if label else base
