"""``estkit audit checkpoint``, ``public-key`` and ``verify --checkpoints``: the attacks
the hash chain alone misses, each performed with plain SQL on a copy of a real server's
data directory and database (on each backend), as an attacker with database access
would, and found by the signed checkpoints kept outside it.

The log: entries 1-4, checkpoint (line 1), entries 5-8, checkpoint (line 2), entries
9-10 (after the newest checkpoint: the chain alone protects them).
"""

from __future__ import annotations

import datetime as dt
import json
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import serverdb
from backends import server_database
from estkit.store import AuditEvent, SqlStore
from estkit.store.audit_chain import GENESIS, entry_hash
from estkit.store.checkpoints import Checkpoint, sign_checkpoint
from estserver import make_server, run_estkit

T0 = dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.UTC)


@dataclass(frozen=True, slots=True)
class Anchored:
    data_dir: Path
    checkpoints: Path  # outside the data directory
    public_key: Path
    said: tuple[str, str]  # how findings name the checkpoints of line 1 and 2


def append_entries(data_dir: Path, count: int) -> None:
    """``count`` audit entries, written by the store as the server writes them."""
    store = SqlStore.open(serverdb.database_url(data_dir))
    try:
        for n in range(count):
            store.audit(
                AuditEvent(
                    at=T0, actor="cli:test", action="device-add", outcome="ok", detail=f"{n}"
                )
            )
    finally:
        store.close()


def checkpoint(data_dir: Path, out: Path) -> subprocess.CompletedProcess[str]:
    return run_estkit("audit", "checkpoint", "--data-dir", data_dir, "--out", out)


def verify(data_dir: Path, *extra: str | Path) -> subprocess.CompletedProcess[str]:
    return run_estkit("audit", "verify", "--data-dir", data_dir, *extra, check=False)


@pytest.fixture(scope="module")
def anchored(
    request: pytest.FixtureRequest, backend: str, tmp_path_factory: pytest.TempPathFactory
) -> Anchored:
    tmp = tmp_path_factory.mktemp("anchored")
    data_dir = make_server(tmp, database_url=server_database(request, backend)).data_dir
    out = tmp / "kept-elsewhere" / "checkpoints.jsonl"
    out.parent.mkdir()
    append_entries(data_dir, 4)
    checkpoint(data_dir, out)
    append_entries(data_dir, 4)
    checkpoint(data_dir, out)
    append_entries(data_dir, 2)
    public_key = out.parent / "audit-key.pem"
    public_key.write_text(run_estkit("audit", "public-key", "--data-dir", data_dir).stdout)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    said = tuple(
        f"the checkpoint of node {cp['node']} at {cp['at']} ({out} line {n})"
        for n, cp in enumerate(lines, start=1)
    )
    assert len(said) == 2
    return Anchored(data_dir, out, public_key, (said[0], said[1]))


@pytest.fixture
def copy(request: pytest.FixtureRequest, backend: str, anchored: Anchored, tmp_path: Path) -> Path:
    """The anchored data directory and database copied, for the test to attack."""
    return serverdb.copy_data_dir(
        anchored.data_dir, tmp_path / "copy", server_database(request, backend)
    )


def finding(proc: subprocess.CompletedProcess[str]) -> tuple[int, str]:
    """The exit status and the one line on stderr; nothing on stdout."""
    assert proc.stdout == "", proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    return proc.returncode, lines[0]


def entry_hashes(data_dir: Path) -> dict[int, str]:
    rows = serverdb.rows(data_dir, "SELECT id, entry_hash FROM audit_events")
    return {int(entry_id): str(digest) for entry_id, digest in rows}


def set_head(conn: sa.Connection, last_id: int, last_hash: str) -> None:
    conn.execute(
        sa.text("UPDATE audit_head SET last_id = :id, last_hash = :hash"),
        {"id": last_id, "hash": last_hash},
    )


def cut_back(data_dir: Path, *, to: int) -> None:
    """The issue's two statements: the entries after ``to`` deleted, the head set to it."""
    kept = entry_hashes(data_dir)[to]
    with serverdb.connect(data_dir) as conn:
        conn.execute(sa.text("DELETE FROM audit_events WHERE id > :id"), {"id": to})
        set_head(conn, to, kept)


def rechain(data_dir: Path, since: int) -> None:
    """What an attacker who knows the scheme does after editing entry ``since``: every
    hash from there on recomputed, each entry linked to the one before, the head moved."""
    store = SqlStore.open(serverdb.database_url(data_dir))
    try:
        events = store.list_audit(limit=1000).items
    finally:
        store.close()
    prev = entry_hashes(data_dir).get(since - 1, GENESIS)
    with serverdb.connect(data_dir) as conn:
        for event in events:
            assert event.id is not None
            if event.id >= since:
                digest = entry_hash(prev, event, event.id)
                conn.execute(
                    sa.text(
                        "UPDATE audit_events SET prev_hash = :p, entry_hash = :h WHERE id = :id"
                    ),
                    {"p": prev, "h": digest, "id": event.id},
                )
                prev = digest
        set_head(conn, events[-1].id or 0, prev)


# -- a log that holds ------------------------------------------------------------------


def test_a_log_that_holds_its_checkpoints_verifies(anchored: Anchored) -> None:
    node_at = json.loads(anchored.checkpoints.read_text().splitlines()[1])

    proc = verify(
        anchored.data_dir, "--checkpoints", anchored.checkpoints,
        "--public-key", anchored.public_key,
    )  # fmt: skip

    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout == (
        "audit log: 10 entries, hash chain intact, holds 2 checkpoints (newest: entry 8, "
        f"node {node_at['node']} at {node_at['at']})\n"
    )
    # Without --public-key, the data directory's own key checks them.
    assert verify(anchored.data_dir, "--checkpoints", anchored.checkpoints).stdout == proc.stdout


def test_checkpoint_appends_one_line_and_says_what(anchored: Anchored, copy: Path) -> None:
    out = anchored.checkpoints.parent / "more" / "cp.jsonl"
    out.parent.mkdir()
    out.write_bytes(anchored.checkpoints.read_bytes())
    head = entry_hashes(copy)[10]

    proc = checkpoint(copy, out)

    assert proc.stdout == (
        f"audit checkpoint: 10 entries up to entry 10 (head {head[:16]}…), appended to {out}\n"
    )
    lines = out.read_text().splitlines()
    assert lines[:2] == anchored.checkpoints.read_text().splitlines()
    assert [json.loads(line)["last_id"] for line in lines] == [4, 8, 10]
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert verify(copy, "--checkpoints", out).returncode == 0


def test_the_audit_key_is_private_and_its_public_key_checks_the_checkpoints(
    anchored: Anchored,
) -> None:
    key = anchored.data_dir / "audit" / "checkpoint.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    assert anchored.public_key.read_text().startswith("-----BEGIN PUBLIC KEY-----\n")
    assert key.read_text() not in anchored.checkpoints.read_text()


# -- the attacks -----------------------------------------------------------------------


def truncate_tail(data_dir: Path) -> None:
    cut_back(data_dir, to=6)


def rewind_head(data_dir: Path) -> None:
    sixth = entry_hashes(data_dir)[6]
    with serverdb.connect(data_dir) as conn:
        set_head(conn, 6, sixth)


def rewind_and_write_past(data_dir: Path) -> None:
    """Cut back to entry 6, then the server goes on writing: the log is as long as it
    was, its head after every checkpoint, and the chain holds; entry 8 is another."""
    cut_back(data_dir, to=6)
    append_entries(data_dir, 4)


def delete_log(data_dir: Path) -> None:
    with serverdb.connect(data_dir) as conn:
        conn.execute(sa.text("DELETE FROM audit_events"))
        set_head(conn, 0, GENESIS)


def rewrite_history(data_dir: Path) -> None:
    with serverdb.connect(data_dir) as conn:
        conn.execute(sa.text("UPDATE audit_events SET detail = 'nothing to see' WHERE id = 6"))
    rechain(data_dir, since=6)


REWRITTEN = (
    "audit log rewritten: entry 8 is not the one {said[1]} signed; up to entry 4 it holds "
    "({file} line 1)"
)


@pytest.mark.parametrize(
    ("attack", "chain_alone", "found"),
    [
        (truncate_tail, "audit log: 6 entries, hash chain intact", "audit log cut short: it ends at entry 6, but {said[1]} counts 8 entries up to entry 8"),  # noqa: E501
        (rewind_head, None, "audit log broken at entry 7: the stored head was rewound to entry 6, but entries go on to 10 (6 entries intact before it)"),  # noqa: E501
        (rewind_and_write_past, "audit log: 10 entries, hash chain intact", REWRITTEN),
        (delete_log, "audit log: 0 entries, hash chain intact", "audit log deleted: it has no entries, but {said[0]} counts 4 entries up to entry 4"),  # noqa: E501
        (rewrite_history, "audit log: 10 entries, hash chain intact", REWRITTEN),
    ],
    ids=[
        "fail/tail-truncated", "fail/head-rewound", "fail/head-rewound-and-written-past",
        "fail/log-deleted", "fail/history-rewritten",
    ],
)  # fmt: skip
def test_an_attack_the_chain_alone_misses_is_found_by_the_checkpoints(
    anchored: Anchored,
    copy: Path,
    attack: Callable[[Path], None],
    chain_alone: str | None,
    found: str,
) -> None:
    attack(copy)
    if chain_alone is not None:  # what `audit verify` says without checkpoints
        assert verify(copy).stdout == f"{chain_alone}\n"

    proc = verify(copy, "--checkpoints", anchored.checkpoints, "--public-key", anchored.public_key)

    assert finding(proc) == (
        1,
        "estkit: " + found.format(said=anchored.said, file=anchored.checkpoints),
    )


def test_a_forged_checkpoint_is_found(anchored: Anchored, tmp_path: Path) -> None:
    # Lowering the count of the newest checkpoint would hide a cut back to entry 4.
    lines = anchored.checkpoints.read_text().splitlines()
    fields = json.loads(lines[1]) | {"count": 4, "last_id": 4}
    forged = tmp_path / "forged.jsonl"
    forged.write_text(f"{lines[0]}\n{json.dumps(fields)}\n")

    proc = verify(anchored.data_dir, "--checkpoints", forged, "--public-key", anchored.public_key)

    assert finding(proc) == (
        1,
        f"estkit: {forged} line 2: signature does not verify (forged or altered)",
    )


def test_a_checkpoint_signed_with_the_attackers_key_is_found(
    anchored: Anchored, tmp_path: Path
) -> None:
    attacker = Ed25519PrivateKey.generate()
    cp = Checkpoint(node="eu-1", at=T0, count=4, last_id=4, head=entry_hashes(anchored.data_dir)[4])
    forged = tmp_path / "forged.jsonl"
    forged.write_text(sign_checkpoint(cp, attacker) + "\n")

    code, line = finding(
        verify(anchored.data_dir, "--checkpoints", forged, "--public-key", anchored.public_key)
    )

    assert code == 1
    assert line.startswith(f"estkit: {forged} line 1: signed by another audit key (")


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--public-key", "{key}"], "estkit: --public-key: only with --checkpoints"),
        (["--checkpoints", "{missing}"], "estkit: --checkpoints: No such file or directory: {missing}"),  # noqa: E501
        (["--checkpoints", "{cp}", "--public-key", "{cp}"], "estkit: --public-key: {cp}: not an Ed25519 public key in PEM"),  # noqa: E501
    ],
    ids=["fail/public-key-alone", "fail/no-such-file", "fail/not-a-public-key"],
)  # fmt: skip
def test_bad_arguments_exit_2_in_one_line(
    anchored: Anchored, tmp_path: Path, args: list[str], line: str
) -> None:
    names = {"key": anchored.public_key, "cp": anchored.checkpoints, "missing": tmp_path / "no"}

    proc = verify(anchored.data_dir, *(a.format(**names) for a in args))

    assert finding(proc) == (2, line.format(**names))


def test_checkpoint_without_out_or_config_file_exits_2(anchored: Anchored) -> None:
    proc = run_estkit("audit", "checkpoint", "--data-dir", anchored.data_dir, check=False)

    assert finding(proc) == (
        2,
        "estkit: --out FILE: required (the config sets no [audit] checkpoint_file)",
    )


def test_init_makes_the_audit_key_once(tmp_path: Path) -> None:
    data_dir = tmp_path / "d"
    first = run_estkit("server", "init", "--data-dir", data_dir).stdout
    key = (data_dir / "audit" / "checkpoint.key").read_bytes()

    again = run_estkit("server", "init", "--data-dir", data_dir).stdout

    assert f"audit key: created {data_dir}/audit/checkpoint.key" in first
    assert "audit key" not in again
    assert (data_dir / "audit" / "checkpoint.key").read_bytes() == key
