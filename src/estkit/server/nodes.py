"""Nodes of a fleet sharing one database: the heartbeat that registers this one, and
which node's URL each region's devices are given.

Every server process (each uvicorn worker) registers its node on start and moves
its ``last_seen`` every ``heartbeat_interval()`` seconds from a daemon thread; a
node not seen for ``STALE_AFTER_BEATS`` heartbeats is shown as stale.

A node name is one node's: a name registered at another public URL whose heartbeat
is fresh belongs to a running node, and ``claim`` refuses it (``server run`` stops
there, naming ``node.name``); a stale one may be taken over. Workers of one node share
its URL, so they never refuse each other.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Protocol

from estkit.store.errors import Unavailable
from estkit.store.models import Node

# Seconds between heartbeats; tests shorten it to see a killed node go stale.
HEARTBEAT_ENV = "ESTKIT_HEARTBEAT_SECONDS"
DEFAULT_HEARTBEAT = 10.0
STALE_AFTER_BEATS = 3

log = logging.getLogger("estkit.nodes")


class NodeRegistry(Protocol):
    def claim_node(self, node: Node, *, stale_before: dt.datetime) -> Node | None: ...
    def node_seen(self, name: str, *, public_url: str, now: dt.datetime) -> bool: ...


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


def takeover_after(*, shared: bool, interval: float) -> dt.timedelta:
    """How long another node's registration of this node's name must be silent before
    this node takes the name over: ``stale_after(interval)`` on a database nodes share;
    on a database of its own (SQLite) every registration is this node's, from an
    earlier run, whatever URL it had then."""
    return stale_after(interval) if shared else dt.timedelta(0)


class NameTaken(Exception):
    """This node's name is registered by another node that is running."""


def _taken_reason(node: Node, holder: Node, *, now: dt.datetime) -> str:
    """One line: whose the name is, and what to do."""
    seen = max(0, round((now - holder.last_seen).total_seconds()))
    return (
        f"node.name: {node.name!r} is registered by a running node at {holder.public_url} "
        f"(last heartbeat {seen} s ago), not this one's {node.public_url}: give this node "
        "its own name in [node] of estkit.toml (a name whose node stopped may be taken "
        "over once it is stale)"
    )


def claim(registry: NodeRegistry, node: Node, *, now: dt.datetime, takeover: dt.timedelta) -> None:
    """Register ``node``, or ``NameTaken`` when another running node holds its name."""
    holder = registry.claim_node(replace(node, last_seen=now), stale_before=now - takeover)
    if holder is not None:
        raise NameTaken(_taken_reason(node, holder, now=now))


class Heartbeat:
    """Registers ``node`` and keeps its ``last_seen`` fresh until ``stop`` is set.

    A database that cannot be reached costs one log line when it goes away and one
    when it is back; the beats in between are skipped, not queued. So does a name
    held by another running node (``claim``): this node is not listed meanwhile and
    tries again every beat, taking the name once the holder has been silent for
    ``takeover``.
    """

    def __init__(
        self,
        registry: NodeRegistry,
        node: Node,
        *,
        clock: Callable[[], dt.datetime],
        interval: float,
        takeover: dt.timedelta,
        stop: threading.Event,
    ) -> None:
        self._registry = registry
        self._node = node
        self._clock = clock
        self._interval = interval
        self._takeover = takeover
        self._stop = stop
        self._registered = False
        self._failing = False
        self._refused = False

    def beat(self) -> None:
        """One heartbeat: register (first time, or after the row went) or move last_seen."""
        name = self._node.name
        try:
            now = self._clock()
            seen = self._registered and self._registry.node_seen(
                name, public_url=self._node.public_url, now=now
            )
            if not seen:
                self._registered = False
                claim(self._registry, self._node, now=now, takeover=self._takeover)
                self._registered = True
        except Unavailable as exc:
            if not self._failing:
                log.warning("node %s: heartbeat not recorded: %s", name, exc)
            self._failing = True
            return
        except NameTaken as exc:
            if not self._refused:
                log.error("node %s: not registered: %s", name, exc)
            self._refused = True
            return
        if self._failing:
            log.warning("node %s: heartbeat recorded again", name)
        if self._refused:
            log.warning("node %s: registered (the other node's registration was stale)", name)
        self._failing = self._refused = False

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
