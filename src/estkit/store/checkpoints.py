"""Signed checkpoints of the audit chain's head, kept outside the database.

The hash chain (``audit_chain``) shows that no committed entry was changed, but not
that none was cut off its end: whoever can write the database can delete the newest
entries and set the head back to the entry before them, or empty the log, and the
chain still holds. A checkpoint is the head as it was at a moment, signed with the
audit key (Ed25519, a file of its own on each node). Kept away from the database, it
pins every entry up to it: the log must still hold the checkpointed entry with that
hash, as many entries up to it, and a head at or after it.

A checkpoint file holds one JSON object a line::

    {"at":"2026-05-01T12:00:00Z","count":42,"head":"3fa9…","key":"9c1e…","last_id":42,
     "node":"eu-1","sig":"…","v":1}

``sig`` is the base64 Ed25519 signature over ``CONTEXT`` followed by the object
without ``sig`` as canonical JSON (keys sorted, no spaces, ASCII only); ``key`` is
the signing key's id, the SHA-256 of its SubjectPublicKeyInfo in hex.

Pure: text and the database's ``ChainState`` in, one ``Finding`` (or None) out.
Reading the files and the database is the caller's.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from estkit.store.audit_chain import GENESIS

VERSION = 1
CONTEXT = b"estkit audit checkpoint v1\n"
_FIELDS = frozenset({"v", "node", "at", "count", "last_id", "head", "key", "sig"})
_HEX64 = re.compile(r"[0-9a-f]{64}")
_SIGNATURE_BYTES = 64
# How many hex digits of a key id a message shows.
_SHORT_ID = 16


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The audit chain's head at ``at``: ``count`` entries up to entry ``last_id``,
    whose hash is ``head`` (an empty log: 0, 0 and ``GENESIS``)."""

    node: str
    at: dt.datetime
    count: int
    last_id: int
    head: str


@dataclass(frozen=True, slots=True)
class SignedCheckpoint:
    checkpoint: Checkpoint
    key_id: str
    where: str  # "FILE line N", for findings


@dataclass(frozen=True, slots=True)
class ChainState:
    """The audit log in the database, read in one snapshot: the stored head, the newest
    entry present (None: no entry), and for each id asked about, its entry's hash (when
    present) and how many entries there are up to it."""

    head_id: int
    head_hash: str
    last_id: int | None
    hashes: Mapping[int, str] = field(default_factory=dict)
    counts: Mapping[int, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Finding:
    """What does not hold, in one line; ``kind`` names it for callers: ``format``,
    ``key``, ``signature``, ``empty``, ``deleted``, ``cut-short``, ``rewritten``,
    ``count``, ``head-rewound``."""

    kind: str
    text: str

    def __str__(self) -> str:
        return self.text


class CheckpointError(ValueError):
    """A checkpoint file that cannot be trusted; ``finding`` says where and why."""

    def __init__(self, finding: Finding) -> None:
        super().__init__(finding.text)
        self.finding = finding


def key_id(public_key: Ed25519PublicKey) -> str:
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


def _canonical(fields: Mapping[str, Any]) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _signed_fields(checkpoint: Checkpoint, signer: str) -> dict[str, Any]:
    return {
        "v": VERSION,
        "node": checkpoint.node,
        "at": checkpoint.at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "count": checkpoint.count,
        "last_id": checkpoint.last_id,
        "head": checkpoint.head,
        "key": signer,
    }


def sign_checkpoint(checkpoint: Checkpoint, key: Ed25519PrivateKey) -> str:
    """``checkpoint`` as one line of a checkpoint file (without its newline)."""
    fields = _signed_fields(checkpoint, key_id(key.public_key()))
    signature = key.sign(CONTEXT + _canonical(fields))
    return _canonical({**fields, "sig": base64.b64encode(signature).decode()}).decode()


def read_checkpoints(
    text: str,
    *,
    keys: Iterable[Ed25519PublicKey],
    source: str,
    torn: list[str] | None = None,
) -> list[SignedCheckpoint]:
    """Every checkpoint of a file's ``text``, each signature verified with the one of
    ``keys`` its key id names; ``CheckpointError`` at the first line that is not a
    checkpoint, names another key or does not verify, and for a file with none.
    Blank lines are skipped. Times are whole seconds (the signed text has no more).

    A line cut short (no JSON object at all: what a crash or a full disk leaves in the
    middle of an append; the next append starts on a line of its own) is not a
    checkpoint and signs nothing: it is skipped, and said in ``torn`` when given;
    without ``torn`` it is an error like any other."""
    by_id = {key_id(k): k for k in keys}
    found: list[SignedCheckpoint] = []
    for number, line in enumerate(text.splitlines(), start=1):
        where = f"{source} line {number}"
        if not line.strip():
            continue
        if torn is not None and _cut_short(line):
            torn.append(f"{where}: cut short (an append that did not finish), skipped")
            continue
        found.append(_read_line(line, by_id, where))
    if not found:
        raise CheckpointError(Finding("empty", f"{source}: no checkpoints in it"))
    return found


def _cut_short(line: str) -> bool:
    """A line that starts as a checkpoint does and is not JSON: an unfinished append."""
    if not line.startswith("{"):
        return False
    try:
        json.loads(line)
    except ValueError:
        return True
    return False


def _read_line(line: str, keys: Mapping[str, Ed25519PublicKey], where: str) -> SignedCheckpoint:
    def bad(why: str) -> CheckpointError:
        return CheckpointError(Finding("format", f"{where}: not a checkpoint ({why})"))

    try:
        fields = json.loads(line)
    except ValueError:
        raise bad("not JSON") from None
    if not isinstance(fields, dict) or set(fields) != _FIELDS:
        raise bad(f"expected the fields {', '.join(sorted(_FIELDS))}")
    if fields["v"] != VERSION or isinstance(fields["v"], bool):
        raise bad(f"version {fields['v']!r}, expected {VERSION}")
    for name in ("count", "last_id"):
        if type(fields[name]) is not int or fields[name] < 0:
            raise bad(f"{name}: expected a whole number")
    for name in ("head", "key"):
        if not (isinstance(fields[name], str) and _HEX64.fullmatch(fields[name])):
            raise bad(f"{name}: expected 64 hex digits")
    if not isinstance(fields["node"], str):
        raise bad("node: expected a string")
    if fields["count"] > fields["last_id"] or (
        fields["last_id"] == 0 and fields["head"] != GENESIS
    ):
        raise bad("count, last_id and head do not fit together")
    try:
        at = dt.datetime.strptime(fields["at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
        signature = base64.b64decode(fields["sig"], validate=True)
    except (TypeError, ValueError, binascii.Error):
        raise bad("at: expected YYYY-MM-DDTHH:MM:SSZ; sig: expected base64") from None
    signer = keys.get(fields["key"])
    if signer is None:
        raise CheckpointError(
            Finding(
                "key",
                f"{where}: signed by another audit key ({fields['key'][:_SHORT_ID]}…), "
                f"not by {_key_list(keys)}",
            )
        )
    signed = {name: value for name, value in fields.items() if name != "sig"}
    try:
        if len(signature) != _SIGNATURE_BYTES:
            raise InvalidSignature
        signer.verify(signature, CONTEXT + _canonical(signed))
    except InvalidSignature:
        raise CheckpointError(
            Finding("signature", f"{where}: signature does not verify (forged or altered)")
        ) from None
    checkpoint = Checkpoint(
        node=fields["node"],
        at=at,
        count=fields["count"],
        last_id=fields["last_id"],
        head=fields["head"],
    )
    return SignedCheckpoint(checkpoint, fields["key"], where)


def _key_list(keys: Mapping[str, Ed25519PublicKey]) -> str:
    shown = ", ".join(f"{k[:_SHORT_ID]}…" for k in sorted(keys))
    return f"the given key ({shown})" if len(keys) == 1 else f"any of the given keys ({shown})"


def check_log(checkpoints: Iterable[SignedCheckpoint], state: ChainState) -> Finding | None:
    """The first way the log in ``state`` contradicts one of ``checkpoints``, oldest
    checkpoint first, or None when it holds every checkpointed entry.

    Entries are only ever appended, so each checkpoint must still hold: its entry there
    with its hash, as many entries up to it, and the head at or after the newest one.
    Entries after the newest checkpoint are protected by the hash chain alone.
    """
    ordered = sorted(checkpoints, key=lambda s: (s.checkpoint.last_id, s.where))
    holds: SignedCheckpoint | None = None
    for signed in ordered:
        cp = signed.checkpoint
        if cp.last_id == 0:  # the empty log: nothing to hold yet
            continue
        said = (
            f"the checkpoint of {_described(signed)} counts {cp.count} entries "
            f"up to entry {cp.last_id}"
        )
        if state.last_id is None:
            return Finding("deleted", f"audit log deleted: it has no entries, but {said}")
        if cp.last_id > state.last_id:
            return Finding(
                "cut-short", f"audit log cut short: it ends at entry {state.last_id}, but {said}"
            )
        stored = state.hashes.get(cp.last_id)
        if stored != cp.head:
            signed_by = f"the checkpoint of {_described(signed)} signed"
            what = (
                f"{cp.last_id}, which {signed_by}, is gone"
                if stored is None
                else f"{cp.last_id} is not the one {signed_by}"
            )
            since = (
                f"; up to entry {holds.checkpoint.last_id} it holds ({holds.where})"
                if holds is not None
                else ""
            )
            return Finding("rewritten", f"audit log rewritten: entry {what}{since}")
        if state.counts.get(cp.last_id) != cp.count:
            return Finding(
                "count",
                f"audit log altered: {state.counts.get(cp.last_id, 0)} entries up to entry "
                f"{cp.last_id}, but {said}",
            )
        holds = signed
    if holds is not None and state.head_id < holds.checkpoint.last_id:
        return Finding(
            "head-rewound",
            f"audit log head rewound: the stored head is entry {state.head_id}, before "
            f"entry {holds.checkpoint.last_id} of the checkpoint of {_described(holds)}",
        )
    return None


def _described(signed: SignedCheckpoint) -> str:
    cp = signed.checkpoint
    return f"node {cp.node} at {cp.at:%Y-%m-%dT%H:%M:%SZ} ({signed.where})"
