"""The heartbeat and the per-region EST URLs (server/nodes.py), without a database."""

from __future__ import annotations

import datetime as dt
import logging
import threading

import pytest

from estkit.server.nodes import Heartbeat, heartbeat_interval, region_urls
from estkit.store import Node
from estkit.store.errors import Unavailable

T0 = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)


def _node(name: str, region: str, seen_after: int = 0) -> Node:
    seen = T0 + dt.timedelta(seconds=seen_after)
    return Node(name, region, f"https://{name}.example", T0, seen, "1.0")


class Registry:
    def __init__(self) -> None:
        self.rows: dict[str, Node] = {}
        self.down = False

    def register_node(self, node: Node) -> None:
        if self.down:
            raise Unavailable("connection lost")
        self.rows[node.name] = node

    def node_seen(self, name: str, *, now: dt.datetime) -> bool:
        if self.down:
            raise Unavailable("connection lost")
        if name not in self.rows:
            return False
        old = self.rows[name]
        self.rows[name] = Node(old.name, old.region, old.public_url, old.started_at, now, "1.0")
        return True


def _heartbeat(registry: Registry, clock: list[dt.datetime]) -> Heartbeat:
    return Heartbeat(
        registry,
        _node("eu-1", "eu"),
        clock=lambda: clock[0],
        interval=10,
        stop=threading.Event(),
    )


def test_heartbeat_registers_then_moves_last_seen() -> None:
    registry, clock = Registry(), [T0]
    beat = _heartbeat(registry, clock)
    beat.beat()
    assert registry.rows["eu-1"].last_seen == T0
    clock[0] = T0 + dt.timedelta(seconds=10)
    beat.beat()
    assert registry.rows["eu-1"].last_seen == clock[0]
    assert registry.rows["eu-1"].started_at == T0


def test_heartbeat_registers_again_when_its_row_is_gone() -> None:
    registry, clock = Registry(), [T0]
    beat = _heartbeat(registry, clock)
    beat.beat()
    registry.rows.clear()
    beat.beat()
    assert "eu-1" in registry.rows


def test_heartbeat_logs_one_line_per_outage_and_carries_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry, clock = Registry(), [T0]
    beat = _heartbeat(registry, clock)
    registry.down = True
    with caplog.at_level(logging.WARNING, logger="estkit.nodes"):
        beat.beat()
        beat.beat()
        registry.down = False
        beat.beat()
    assert [r.getMessage() for r in caplog.records] == [
        "node eu-1: heartbeat not recorded: connection lost",
        "node eu-1: heartbeat recorded again",
    ]
    assert "eu-1" in registry.rows


def test_region_urls_take_each_regions_freshest_node() -> None:
    nodes = [_node("eu-1", "eu", 5), _node("eu-2", "eu", 9), _node("us-1", "us", 1)]
    assert [(r.region, r.node, r.public_url) for r in region_urls(nodes)] == [
        ("eu", "eu-2", "https://eu-2.example"),
        ("us", "us-1", "https://us-1.example"),
    ]


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(None, 10.0), ("0.5", 0.5), ("bad", None), ("0", None)],
    ids=["ok/default", "ok/set", "fail/not-a-number", "fail/too-short"],
)
def test_heartbeat_interval_comes_from_the_environment(
    value: str | None, seconds: float | None
) -> None:
    environ = {} if value is None else {"ESTKIT_HEARTBEAT_SECONDS": value}
    if seconds is None:
        with pytest.raises(ValueError, match="ESTKIT_HEARTBEAT_SECONDS"):
            heartbeat_interval(environ)
    else:
        assert heartbeat_interval(environ) == seconds
