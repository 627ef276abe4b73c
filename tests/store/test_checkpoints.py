"""Checkpoints of the audit chain's head (``store/checkpoints.py``): the signed line
format, and which contradiction between checkpoints and the log is found first; the
store's side (``audit_head``, ``audit_chain_state``) on each backend."""

from __future__ import annotations

import base64
import datetime as dt
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from estkit.store import SqlStore
from estkit.store.audit_chain import GENESIS
from estkit.store.checkpoints import (
    ChainState,
    Checkpoint,
    CheckpointError,
    SignedCheckpoint,
    check_log,
    key_id,
    read_checkpoints,
    sign_checkpoint,
)
from estkit.store.models import AuditEvent

T0 = dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.UTC)
KEY = Ed25519PrivateKey.generate()
H = {n: f"{n:064x}" for n in range(1, 20)}  # stand-ins for entry hashes


def checkpoint(last_id: int, *, count: int | None = None, head: str | None = None) -> Checkpoint:
    return Checkpoint(
        node="eu-1",
        at=T0 + dt.timedelta(hours=last_id),
        count=last_id if count is None else count,
        last_id=last_id,
        head=H[last_id] if head is None else head,
    )


def read(*lines: str, keys: tuple[Ed25519PrivateKey, ...] = (KEY,)) -> list[SignedCheckpoint]:
    return read_checkpoints(
        "".join(f"{line}\n" for line in lines),
        keys=[k.public_key() for k in keys],
        source="cp.jsonl",
    )


def finding_of(*lines: str, keys: tuple[Ed25519PrivateKey, ...] = (KEY,)) -> tuple[str, str]:
    with pytest.raises(CheckpointError) as caught:
        read(*lines, keys=keys)
    return caught.value.finding.kind, str(caught.value)


# -- the line format -------------------------------------------------------------------


def test_a_signed_line_reads_back_as_the_checkpoint_with_its_key_and_line() -> None:
    lines = [sign_checkpoint(checkpoint(n), KEY) for n in (4, 8)]

    found = read(lines[0], "", lines[1])

    assert [s.checkpoint for s in found] == [checkpoint(4), checkpoint(8)]
    assert [s.where for s in found] == ["cp.jsonl line 1", "cp.jsonl line 3"]
    assert {s.key_id for s in found} == {key_id(KEY.public_key())}


def test_a_line_is_one_canonical_json_object_with_every_field() -> None:
    line = sign_checkpoint(checkpoint(4), KEY)
    fields = json.loads(line)

    assert "\n" not in line
    assert line == json.dumps(fields, sort_keys=True, separators=(",", ":"))
    assert fields | {"sig": "…"} == {
        "v": 1,
        "node": "eu-1",
        "at": "2026-05-01T16:00:00Z",
        "count": 4,
        "last_id": 4,
        "head": H[4],
        "key": key_id(KEY.public_key()),
        "sig": "…",
    }
    assert len(base64.b64decode(fields["sig"])) == 64


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("count", 3),
        ("last_id", 5),
        ("head", H[5]),
        ("at", "2026-05-01T17:00:00Z"),
        ("node", "eu-2"),
    ],
    ids=["fail/count", "fail/last-id", "fail/head", "fail/time", "fail/node"],
)
def test_any_signed_field_changed_fails_the_signature(field: str, value: object) -> None:
    fields = json.loads(sign_checkpoint(checkpoint(4), KEY)) | {field: value}

    assert finding_of(json.dumps(fields)) == (
        "signature",
        "cp.jsonl line 1: signature does not verify (forged or altered)",
    )


def test_a_checkpoint_signed_by_another_key_is_refused_by_its_key_id() -> None:
    other = Ed25519PrivateKey.generate()
    line = sign_checkpoint(checkpoint(4), other)

    kind, text = finding_of(line)

    assert kind == "key"
    assert text == (
        f"cp.jsonl line 1: signed by another audit key ({key_id(other.public_key())[:16]}…), "
        f"not by the given key ({key_id(KEY.public_key())[:16]}…)"
    )
    assert read(line, keys=(KEY, other))[0].key_id == key_id(other.public_key())


def test_another_keys_signature_under_this_keys_id_does_not_verify() -> None:
    fields = json.loads(sign_checkpoint(checkpoint(4), Ed25519PrivateKey.generate()))
    fields["key"] = key_id(KEY.public_key())

    assert finding_of(json.dumps(fields))[0] == "signature"


def _fields(**changed: object) -> str:
    fields = json.loads(sign_checkpoint(checkpoint(4), KEY))
    fields.update(changed)
    return json.dumps({k: v for k, v in fields.items() if v is not None})


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "expected the fields at, count, head, key, last_id, node, sig, v"),
        (_fields(extra=1), "expected the fields at, count, head, key, last_id, node, sig, v"),
        (_fields(node=None), "expected the fields at, count, head, key, last_id, node, sig, v"),
        (_fields(v=2), "version 2, expected 1"),
        (_fields(v=True), "version True, expected 1"),
        (_fields(count=-1), "count: expected a whole number"),
        (_fields(count=True), "count: expected a whole number"),
        (_fields(last_id="4"), "last_id: expected a whole number"),
        (_fields(head="ABC"), "head: expected 64 hex digits"),
        (_fields(key="AB" * 32), "key: expected 64 hex digits"),
        (_fields(node=7), "node: expected a string"),
        (_fields(count=5), "count, last_id and head do not fit together"),
        (_fields(at="yesterday"), "at: expected YYYY-MM-DDTHH:MM:SSZ; sig: expected base64"),
        (_fields(sig="not base64!"), "at: expected YYYY-MM-DDTHH:MM:SSZ; sig: expected base64"),
    ],
    ids=[
        "fail/not-json", "fail/not-an-object", "fail/extra-field", "fail/missing-field",
        "fail/version", "fail/version-bool", "fail/negative-count", "fail/bool-count",
        "fail/text-id", "fail/head-not-hex", "fail/key-upper-case", "fail/node-not-text",
        "fail/more-entries-than-ids", "fail/time", "fail/signature-not-base64",
    ],
)  # fmt: skip
def test_a_line_that_is_not_a_checkpoint_is_named(line: str, why: str) -> None:
    good = sign_checkpoint(checkpoint(2), KEY)

    assert finding_of(good, line) == ("format", f"cp.jsonl line 2: not a checkpoint ({why})")


def test_a_signature_of_the_wrong_length_does_not_verify() -> None:
    line = _fields(sig=base64.b64encode(b"x" * 63).decode())

    assert finding_of(line)[0] == "signature"


@pytest.mark.parametrize("text", ["", "\n\n  \n"], ids=["fail/empty", "fail/blank-lines"])
def test_a_file_without_checkpoints_is_a_finding(text: str) -> None:
    with pytest.raises(CheckpointError) as caught:
        read_checkpoints(text, keys=[KEY.public_key()], source="cp.jsonl")

    assert (caught.value.finding.kind, str(caught.value)) == (
        "empty",
        "cp.jsonl: no checkpoints in it",
    )


# -- the log against the checkpoints -----------------------------------------------------

CP4 = "the checkpoint of node eu-1 at 2026-05-01T16:00:00Z (cp.jsonl line 1)"
CP8 = "the checkpoint of node eu-1 at 2026-05-01T20:00:00Z (cp.jsonl line 2)"


def state(
    last: int | None, *, head: int | None = None, changed: frozenset[int] = frozenset()
) -> ChainState:
    """A log of entries 1..last (none: None), its head at ``head`` (default: last), the
    entries in ``changed`` with other hashes."""
    ids = range(1, (last or 0) + 1)
    hashes = {i: ("f" * 64 if i in changed else H[i]) for i in ids}
    head_id = (last or 0) if head is None else head
    return ChainState(
        head_id=head_id,
        head_hash=hashes.get(head_id, GENESIS),
        last_id=last,
        hashes=hashes,
        counts={i: min(i, last or 0) for i in range(1, 20)},
    )


@pytest.mark.parametrize(
    ("log", "kind", "text"),
    [
        (state(10), None, None),
        (state(8), None, None),
        (state(None), "deleted", f"audit log deleted: it has no entries, but {CP4} counts 4 entries up to entry 4"),  # noqa: E501
        (state(6), "cut-short", f"audit log cut short: it ends at entry 6, but {CP8} counts 8 entries up to entry 8"),  # noqa: E501
        (state(3), "cut-short", f"audit log cut short: it ends at entry 3, but {CP4} counts 4 entries up to entry 4"),  # noqa: E501
        (state(10, changed=frozenset({8})), "rewritten", f"audit log rewritten: entry 8 is not the one {CP8} signed; up to entry 4 it holds (cp.jsonl line 1)"),  # noqa: E501
        (state(10, changed=frozenset({4})), "rewritten", f"audit log rewritten: entry 4 is not the one {CP4} signed"),  # noqa: E501
        (state(10, head=6), "head-rewound", f"audit log head rewound: the stored head is entry 6, before entry 8 of {CP8}"),  # noqa: E501
    ],
    ids=[
        "ok/appended-after", "ok/as-checkpointed", "fail/log-deleted", "fail/cut-after-first",
        "fail/cut-before-first", "fail/rewritten-after-first", "fail/rewritten-before-first",
        "fail/head-rewound",
    ],
)  # fmt: skip
def test_the_log_must_hold_every_checkpointed_entry(
    log: ChainState, kind: str | None, text: str | None
) -> None:
    checkpoints = read(sign_checkpoint(checkpoint(4), KEY), sign_checkpoint(checkpoint(8), KEY))

    finding = check_log(checkpoints, log)

    assert (finding and finding.kind, finding and finding.text) == (kind, text)


def test_an_entry_gone_inside_the_log_and_a_count_that_differs_are_named() -> None:
    checkpoints = read(sign_checkpoint(checkpoint(4), KEY))
    gone = ChainState(head_id=10, head_hash=H[10], last_id=10, hashes={}, counts={4: 3})
    fewer = ChainState(head_id=10, head_hash=H[10], last_id=10, hashes={4: H[4]}, counts={4: 3})

    assert str(check_log(checkpoints, gone)) == (
        f"audit log rewritten: entry 4, which {CP4} signed, is gone"
    )
    finding = check_log(checkpoints, fewer)
    assert finding is not None
    assert (finding.kind, finding.text) == (
        "count",
        f"audit log altered: 3 entries up to entry 4, but {CP4} counts 4 entries up to entry 4",
    )


def test_the_oldest_checkpoint_that_fails_is_named_whatever_the_order_of_lines() -> None:
    checkpoints = read(sign_checkpoint(checkpoint(8), KEY), sign_checkpoint(checkpoint(4), KEY))

    finding = check_log(checkpoints, state(3))

    assert finding is not None
    assert "(cp.jsonl line 2) counts 4 entries up to entry 4" in finding.text


def test_a_checkpoint_of_the_empty_log_holds_for_any_log() -> None:
    empty = Checkpoint(node="eu-1", at=T0, count=0, last_id=0, head=GENESIS)
    checkpoints = read(sign_checkpoint(empty, KEY))

    assert check_log(checkpoints, state(None)) is None
    assert check_log(checkpoints, state(5)) is None


# -- the store's side, on each backend ------------------------------------------------


def _audit(store: SqlStore, n: int) -> None:
    store.audit(AuditEvent(at=T0, actor="test", action="device-add", outcome="ok", detail=str(n)))


def test_the_store_reads_the_head_and_the_checkpointed_entries(store: SqlStore) -> None:
    assert store.audit_head() == (0, 0, GENESIS)
    for n in range(5):
        _audit(store, n)
    assert [e.id for e in store.list_audit().items] == [1, 2, 3, 4, 5]

    count, last_id, head = store.audit_head()
    chain = store.audit_chain_state({0, 2, 5, 7})

    assert (count, last_id) == (5, 5)
    assert (chain.head_id, chain.head_hash, chain.last_id) == (5, head, 5)
    assert set(chain.hashes) == {2, 5}
    assert chain.hashes[5] == head
    assert chain.counts == {0: 0, 2: 2, 5: 5, 7: 5}
    assert store.verify_audit_chain() == (5, None, "")


def test_a_line_cut_short_by_a_crash_is_skipped_and_said_when_asked() -> None:
    first, second = sign_checkpoint(checkpoint(2), KEY), sign_checkpoint(checkpoint(5), KEY)
    text = f"{first}\n{second[: len(second) // 2]}\n{second}\n"
    torn: list[str] = []
    found = read_checkpoints(text, keys=[KEY.public_key()], source="cp.jsonl", torn=torn)
    assert [s.checkpoint.last_id for s in found] == [2, 5]
    assert torn == ["cp.jsonl line 2: cut short (an append that did not finish), skipped"]
    # Without the list (a caller that does not say warnings), it stays an error; and a
    # line that is JSON but no checkpoint is never taken for a torn one.
    with pytest.raises(CheckpointError, match="line 2: not a checkpoint"):
        read_checkpoints(text, keys=[KEY.public_key()], source="cp.jsonl")
    with pytest.raises(CheckpointError, match="line 2: not a checkpoint"):
        read_checkpoints(
            f'{first}\n{{"v": 1}}\n', keys=[KEY.public_key()], source="cp.jsonl", torn=[]
        )
