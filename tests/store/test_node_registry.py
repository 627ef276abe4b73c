"""The node registry: a heartbeat registers a node and moves its last_seen; on both backends."""

from __future__ import annotations

import datetime as dt

from estkit.store import Node, SqlStore

T0 = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)


def _node(name: str, region: str, *, at: dt.datetime = T0) -> Node:
    return Node(
        name=name,
        region=region,
        public_url=f"https://{name}.example:8443",
        started_at=at,
        last_seen=at,
        version="1.0",
    )


def test_registered_nodes_are_listed_by_region_then_name(store: SqlStore) -> None:
    for node in (_node("us-1", "us"), _node("eu-2", "eu"), _node("eu-1", "eu")):
        store.register_node(node)
    assert [(n.region, n.name) for n in store.list_nodes()] == [
        ("eu", "eu-1"),
        ("eu", "eu-2"),
        ("us", "us-1"),
    ]
    assert store.list_nodes()[0] == _node("eu-1", "eu")


def test_registering_again_replaces_the_nodes_row(store: SqlStore) -> None:
    store.register_node(_node("n1", "eu"))
    later = T0 + dt.timedelta(hours=1)
    store.register_node(_node("n1", "us", at=later))
    assert store.list_nodes() == [_node("n1", "us", at=later)]


def test_node_seen_moves_last_seen_only(store: SqlStore) -> None:
    store.register_node(_node("n1", "eu"))
    seen = T0 + dt.timedelta(seconds=10)
    assert store.node_seen("n1", now=seen) is True
    (node,) = store.list_nodes()
    assert (node.started_at, node.last_seen) == (T0, seen)


def test_node_seen_of_an_unregistered_node_says_so(store: SqlStore) -> None:
    assert store.node_seen("ghost", now=T0) is False
    assert store.list_nodes() == []
