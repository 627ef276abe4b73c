"""The node registry: a node claims its name and its heartbeat moves its last_seen; a
name another node holds with a fresh heartbeat is refused; on both backends."""

from __future__ import annotations

import datetime as dt

import pytest

from estkit.store import Node, SqlStore

T0 = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
STALE = dt.timedelta(seconds=30)


def _node(name: str, region: str, *, at: dt.datetime = T0, url: str | None = None) -> Node:
    return Node(
        name=name,
        region=region,
        public_url=url or f"https://{name}.example:7443",
        started_at=at,
        last_seen=at,
        version="1.0",
    )


def _claim(store: SqlStore, node: Node) -> Node | None:
    return store.claim_node(node, stale_before=node.last_seen - STALE)


def test_claimed_nodes_are_listed_by_region_then_name(store: SqlStore) -> None:
    for node in (_node("us-1", "us"), _node("eu-2", "eu"), _node("eu-1", "eu")):
        assert _claim(store, node) is None
    assert [(n.region, n.name) for n in store.list_nodes()] == [
        ("eu", "eu-1"),
        ("eu", "eu-2"),
        ("us", "us-1"),
    ]
    assert store.list_nodes()[0] == _node("eu-1", "eu")


@pytest.mark.parametrize(
    ("url", "after", "taken_over"),
    [
        ("https://n1.example:7443", dt.timedelta(seconds=1), True),
        ("https://other.example:9443", dt.timedelta(seconds=31), True),
        ("https://other.example:9443", dt.timedelta(seconds=29), False),
    ],
    ids=["ok/same-url-restarted", "ok/other-url-stale-taken-over", "fail/other-url-fresh"],
)
def test_a_name_is_claimed_unless_another_running_node_holds_it(
    store: SqlStore, url: str, after: dt.timedelta, taken_over: bool
) -> None:
    holder = _node("n1", "eu")
    _claim(store, holder)
    claimant = _node("n1", "us", at=T0 + after, url=url)
    assert _claim(store, claimant) == (None if taken_over else holder)
    assert store.list_nodes() == [claimant if taken_over else holder]


def test_node_seen_moves_last_seen_only(store: SqlStore) -> None:
    _claim(store, _node("n1", "eu"))
    seen = T0 + dt.timedelta(seconds=10)
    assert store.node_seen("n1", public_url="https://n1.example:7443", now=seen) is True
    (node,) = store.list_nodes()
    assert (node.started_at, node.last_seen) == (T0, seen)


def test_node_seen_of_an_unregistered_node_says_so(store: SqlStore) -> None:
    assert store.node_seen("ghost", public_url="https://ghost.example", now=T0) is False
    assert store.list_nodes() == []


def test_node_seen_of_a_name_taken_over_by_another_node_says_so(store: SqlStore) -> None:
    _claim(store, _node("n1", "eu"))
    taker = _node("n1", "eu", at=T0 + dt.timedelta(minutes=5), url="https://other.example")
    _claim(store, taker)
    later = T0 + dt.timedelta(minutes=6)
    assert store.node_seen("n1", public_url="https://n1.example:7443", now=later) is False
    assert store.list_nodes() == [taker]
