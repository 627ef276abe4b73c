"""The heartbeat, the claim of a node's name and the per-region EST URLs
(server/nodes.py), without a database."""

from __future__ import annotations

import datetime as dt
import logging
import threading

import pytest

from estkit.server.nodes import (
    Heartbeat,
    NameTaken,
    claim,
    heartbeat_interval,
    region_urls,
    takeover_after,
)
from estkit.store import Node
from estkit.store.errors import Unavailable

T0 = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
TAKEOVER = dt.timedelta(seconds=30)


def _node(name: str, region: str, seen_after: int = 0) -> Node:
    seen = T0 + dt.timedelta(seconds=seen_after)
    return Node(name, region, f"https://{name}.example", T0, seen, "1.0")


class Registry:
    def __init__(self) -> None:
        self.rows: dict[str, Node] = {}
        self.down = False

    def claim_node(self, node: Node, *, stale_before: dt.datetime) -> Node | None:
        if self.down:
            raise Unavailable("connection lost")
        held = self.rows.get(node.name)
        if held and held.public_url != node.public_url and held.last_seen >= stale_before:
            return held
        self.rows[node.name] = node
        return None

    def node_seen(self, name: str, *, public_url: str, now: dt.datetime) -> bool:
        if self.down:
            raise Unavailable("connection lost")
        old = self.rows.get(name)
        if old is None or old.public_url != public_url:
            return False
        self.rows[name] = Node(old.name, old.region, old.public_url, old.started_at, now, "1.0")
        return True


def _heartbeat(registry: Registry, clock: list[dt.datetime]) -> Heartbeat:
    return Heartbeat(
        registry,
        _node("eu-1", "eu"),
        clock=lambda: clock[0],
        interval=10,
        takeover=TAKEOVER,
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


def test_heartbeat_of_a_name_another_running_node_holds_logs_once_and_takes_it_when_stale(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry, clock = Registry(), [T0]
    other = Node("eu-1", "eu", "https://copy.example", T0, T0, "1.0")
    registry.rows["eu-1"] = other
    beat = _heartbeat(registry, clock)
    with caplog.at_level(logging.WARNING, logger="estkit.nodes"):
        beat.beat()
        clock[0] = T0 + dt.timedelta(seconds=20)
        beat.beat()
        assert registry.rows["eu-1"] == other
        clock[0] = T0 + dt.timedelta(seconds=31)
        beat.beat()
    assert registry.rows["eu-1"].public_url == "https://eu-1.example"
    assert [r.getMessage() for r in caplog.records] == [
        "node eu-1: not registered: node.name: 'eu-1' is registered by a running node at "
        "https://copy.example (last heartbeat 0 s ago), not this one's https://eu-1.example: "
        "give this node its own name in [node] of estkit.toml (a name whose node stopped may "
        "be taken over once it is stale)",
        "node eu-1: registered (the other node's registration was stale)",
    ]


def test_heartbeat_claims_again_when_another_node_took_its_name_over() -> None:
    registry, clock = Registry(), [T0]
    beat = _heartbeat(registry, clock)
    beat.beat()
    taker = Node("eu-1", "eu", "https://copy.example", T0, T0, "1.0")
    registry.rows["eu-1"] = taker
    clock[0] = T0 + dt.timedelta(seconds=10)
    beat.beat()  # not seen under its own URL; claiming is refused while the taker is fresh
    assert registry.rows["eu-1"] == taker


@pytest.mark.parametrize(
    ("holder_url", "seen_ago", "refused"),
    [
        (None, 0, False),
        ("https://eu-1.example", 0, False),
        ("https://copy.example", 31, False),
        ("https://copy.example", 30, True),
    ],
    ids=["ok/free", "ok/same-url", "ok/stale-taken-over", "fail/fresh-other-url"],
)
def test_claim_refuses_a_name_another_running_node_holds(
    holder_url: str | None, seen_ago: int, refused: bool
) -> None:
    registry = Registry()
    now = T0 + dt.timedelta(seconds=seen_ago)
    if holder_url is not None:
        registry.rows["eu-1"] = Node("eu-1", "eu", holder_url, T0, T0, "1.0")
    if refused:
        with pytest.raises(NameTaken, match=r"^node\.name: 'eu-1' is registered by a running"):
            claim(registry, _node("eu-1", "eu"), now=now, takeover=TAKEOVER)
    else:
        claim(registry, _node("eu-1", "eu"), now=now, takeover=TAKEOVER)
        assert registry.rows["eu-1"].public_url == "https://eu-1.example"
        assert registry.rows["eu-1"].last_seen == now


@pytest.mark.parametrize(
    ("shared", "takeover"),
    [(True, dt.timedelta(seconds=30)), (False, dt.timedelta(0))],
    ids=["postgresql/three-beats", "sqlite/always-this-nodes"],
)
def test_takeover_waits_three_heartbeats_on_a_shared_database_only(
    shared: bool, takeover: dt.timedelta
) -> None:
    assert takeover_after(shared=shared, interval=10) == takeover


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
