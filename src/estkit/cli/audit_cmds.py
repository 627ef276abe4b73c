"""``estkit audit verify|checkpoint|public-key``: the audit log's hash chain, and signed
checkpoints of its head kept outside the database (``store/checkpoints.py``).

``audit list`` is a read command (``read_cmds``). They all read the store only: no CA
key, token or PIN is needed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from estkit.cli.errors import CliError
from estkit.cli.read_cmds import _reading
from estkit.cli.server_cmds import _command, _data_dir_arg, _load, _now

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

EXIT_USAGE = 2  # as argparse's own refusals

VERIFY_DESCRIPTION = (
    "Recompute the audit log's hash chain and name the first entry that breaks it. With "
    "--checkpoints, also check each checkpoint's signature, then that the log still holds "
    "every checkpointed entry with its hash and count and a head at or after the newest: "
    "this finds a log cut short, deleted or rewritten since a checkpoint, which the chain "
    "alone cannot. Entries written after the newest checkpoint are protected by the chain "
    "only. README: Audit checkpoints."
)
VERIFY_EPILOG = (
    "exit status: 0 the chain holds (and every checkpoint is signed by the audit key and "
    "held by the log); 1 a finding, in one line on stderr: an entry changed or missing, "
    "the head rewound, the log cut short, deleted or rewritten since a checkpoint, a "
    "line that is not a checkpoint, is forged or is signed by another key; or the "
    "database cannot be read; 2 bad arguments (--checkpoints or --public-key unreadable, "
    "or no Ed25519 public key); 75 the database is unavailable, try again later; 78 the "
    "config is invalid"
)
CHECKPOINT_EPILOG = (
    "exit status: 0 appended (one line says what); 1 the file cannot be written, or the "
    "database cannot be read; 2 bad arguments; 75 the database is unavailable, try again "
    "later; 78 the config is invalid"
)


def register(audit: Any) -> None:
    """Add ``verify``, ``checkpoint`` and ``public-key`` to the ``audit`` subcommands."""
    p = audit.add_parser(
        "verify",
        help="check the hash chain and, with --checkpoints, that nothing was cut off",
        description=VERIFY_DESCRIPTION,
        epilog=VERIFY_EPILOG,
    )
    _data_dir_arg(p)
    p.add_argument(
        "--checkpoints",
        type=Path,
        metavar="FILE",
        help="a checkpoint file (`audit checkpoint`, [audit] checkpoint_file), best a copy "
        "kept away from the database host",
    )
    p.add_argument(
        "--public-key",
        type=Path,
        action="append",
        default=[],
        metavar="PEM",
        help="the audit key's public key (`audit public-key`) the checkpoints are signed "
        "with, kept away from this host; repeatable (nodes sharing a file; an old key). "
        "Default: this data directory's key",
    )
    _command(p, cmd_audit_verify)
    p = audit.add_parser(
        "checkpoint",
        help="append a signed checkpoint of the log's head to a file",
        description="Sign the audit log's head (entry count, last entry, its hash, the "
        "time, this node's name) with the audit key (made if missing) and append it to "
        "FILE as one line, under an exclusive lock, fsynced.",
        epilog=CHECKPOINT_EPILOG,
    )
    _data_dir_arg(p)
    p.add_argument(
        "--out",
        type=Path,
        metavar="FILE",
        help="the checkpoint file (default: [audit] checkpoint_file of the config)",
    )
    _command(p, cmd_audit_checkpoint)
    p = audit.add_parser(
        "public-key",
        help="print the audit key's public key (PEM), to keep away from this host",
        description="Print the public key that checks this node's checkpoints (PEM); the "
        "audit key is made first if there is none.",
    )
    _data_dir_arg(p)
    _command(p, cmd_audit_public_key)


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from estkit.store.checkpoints import (
        CheckpointError,
        SignedCheckpoint,
        check_log,
        read_checkpoints,
    )

    if args.public_key and args.checkpoints is None:
        raise CliError("--public-key: only with --checkpoints", exit_code=EXIT_USAGE)
    signed: list[SignedCheckpoint] = []
    if args.checkpoints is not None:
        text = _read_text(args.checkpoints, "--checkpoints")
        torn: list[str] = []
        try:
            signed = read_checkpoints(
                text, keys=_public_keys(args), source=str(args.checkpoints), torn=torn
            )
        except CheckpointError as exc:
            raise CliError(str(exc)) from None
        for line in torn:
            print(f"warning: {line}", file=sys.stderr)
    with _reading(args) as store:
        checked, broken, why = store.verify_audit_chain()
        if broken is not None:
            raise CliError(
                f"audit log broken at entry {broken}: {why} ({checked} entries intact before it)"
            )
        if not signed:
            print(f"audit log: {checked} entries, hash chain intact")
            return 0
        state = store.audit_chain_state({s.checkpoint.last_id for s in signed})
    finding = check_log(signed, state)
    if finding is not None:
        raise CliError(str(finding))
    newest = max(signed, key=lambda s: s.checkpoint.last_id).checkpoint
    plural = "s" if len(signed) > 1 else ""
    print(
        f"audit log: {checked} entries, hash chain intact, holds {len(signed)} "
        f"checkpoint{plural} (newest: entry {newest.last_id}, node {newest.node} "
        f"at {newest.at:%Y-%m-%dT%H:%M:%SZ})"
    )
    return 0


def _read_text(path: Path, option: str) -> str:
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except OSError as exc:
        raise CliError(f"{option}: {exc.strerror or exc}: {path}", exit_code=EXIT_USAGE) from None


def _public_keys(args: argparse.Namespace) -> list[Ed25519PublicKey]:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    from estkit.server.audit_checkpoints import audit_key_path, load_audit_key

    keys = []
    for path in args.public_key:
        text = _read_text(path, "--public-key")
        try:
            key = load_pem_public_key(text.encode())
        except ValueError:
            key = None
        if not isinstance(key, Ed25519PublicKey):
            raise CliError(
                f"--public-key: {path}: not an Ed25519 public key in PEM", exit_code=EXIT_USAGE
            )
        keys.append(key)
    if keys:
        return keys
    try:
        return [load_audit_key(_load(args).data_dir).public_key()]
    except FileNotFoundError:
        path = audit_key_path(args.data_dir)
        raise CliError(
            f"no audit key at {path} to check the checkpoints with: give --public-key"
        ) from None


def cmd_audit_checkpoint(args: argparse.Namespace) -> int:
    from estkit.server.audit_checkpoints import append_checkpoint

    config = _load(args)
    out: Path | None = args.out or config.audit.checkpoint_file
    if out is None:
        raise CliError(
            "--out FILE: required (the config sets no [audit] checkpoint_file)",
            exit_code=EXIT_USAGE,
        )
    key = _audit_key(config.data_dir, note=sys.stdout)
    with _reading(args) as store:
        cp = append_checkpoint(out, store, key, node=config.node.name, clock=_now)
    print(
        f"audit checkpoint: {cp.count} entries up to entry {cp.last_id} "
        f"(head {cp.head[:16]}…), appended to {out}"
    )
    return 0


def cmd_audit_public_key(args: argparse.Namespace) -> int:
    from estkit.server.audit_checkpoints import public_key_pem

    key = _audit_key(_load(args).data_dir, note=sys.stderr)
    sys.stdout.write(public_key_pem(key).decode())
    return 0


def make_audit_key(data_dir: Path) -> None:
    """``server init``: the audit key, made when missing (and a line saying so)."""
    _audit_key(data_dir, note=sys.stdout)


def _audit_key(data_dir: Path, *, note: TextIO) -> Ed25519PrivateKey:
    """The audit key of ``data_dir``, made first if missing; a line on ``note`` then."""
    from estkit.server.audit_checkpoints import audit_key_path, load_or_create_audit_key

    try:
        key, created = load_or_create_audit_key(data_dir)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if created:
        print(
            f"audit key: created {audit_key_path(data_dir)} (`estkit audit public-key` "
            "prints its public key: keep a copy away from this host)",
            file=note,
        )
    return key
