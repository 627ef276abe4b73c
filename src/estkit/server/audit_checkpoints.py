"""The audit key and the checkpoint file: signed checkpoints of the audit log's head,
made on demand (``estkit audit checkpoint``) and periodically by the server
(``[audit] checkpoint_file``, ``checkpoint_interval``).

The key is this node's own (``audit/checkpoint.key`` in the data directory, Ed25519,
0600), made by ``server init`` or on first use, never logged. A checkpoint is read
from the database, signed and appended while holding an exclusive ``flock`` on the
file, so writers (the server's thread, the command, other nodes sharing the file)
take turns and the file stays in the order the heads were read. The format and its
verification are ``store/checkpoints.py``.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import logging
import os
import secrets
import threading
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from estkit.fileio import PRIVATE, PRIVATE_DIR, PUBLIC, fsync_directory, write_new
from estkit.server.config import ConfigError, ServerConfig
from estkit.store import SqlStore
from estkit.store.checkpoints import Checkpoint, sign_checkpoint
from estkit.store.errors import Unavailable

log = logging.getLogger(__name__)

KEY_FILE = Path("audit") / "checkpoint.key"


def audit_key_path(data_dir: Path) -> Path:
    return data_dir / KEY_FILE


def load_audit_key(data_dir: Path) -> Ed25519PrivateKey:
    """The audit key of ``data_dir``; ``FileNotFoundError`` when there is none yet,
    ``ValueError`` naming the file when it holds no Ed25519 key."""
    path = audit_key_path(data_dir)
    pem = path.read_bytes()
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (TypeError, ValueError):
        key = None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key in PEM (the audit key)")
    return key


def load_or_create_audit_key(data_dir: Path) -> tuple[Ed25519PrivateKey, bool]:
    """The audit key of ``data_dir``, made first if there is none (and whether it was).

    Written whole beside its place and linked there, so processes starting together
    (workers, the command beside the server) all end up with the one key."""
    path = audit_key_path(data_dir)
    try:
        return load_audit_key(data_dir), False
    except FileNotFoundError:
        pass
    path.parent.mkdir(mode=PRIVATE_DIR, exist_ok=True)
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    write_new(temp, pem, mode=PRIVATE)
    try:
        os.link(temp, path)  # fails if another process linked its key first: use that one
        created = True
    except FileExistsError:
        created = False
    finally:
        temp.unlink()
    fsync_directory(path.parent)
    return load_audit_key(data_dir), created


def public_key_pem(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def append_checkpoint(
    path: Path,
    store: SqlStore,
    key: Ed25519PrivateKey,
    *,
    node: str,
    clock: Callable[[], dt.datetime],
) -> Checkpoint:
    """Read the head, sign it and append it to ``path`` (made 0644 if missing), all
    under an exclusive lock on the file; fsynced before it returns."""
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, PUBLIC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        count, last_id, head = store.audit_head()
        checkpoint = Checkpoint(node=node, at=clock(), count=count, last_id=last_id, head=head)
        line = sign_checkpoint(checkpoint, key).encode() + b"\n"
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line  # a torn last line stays one line of its own
        _write_all(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)  # and the lock with it
    if not size:
        fsync_directory(path.parent)
    return checkpoint


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def start_audit_checkpoints(
    config: ServerConfig,
    store: SqlStore,
    *,
    clock: Callable[[], dt.datetime],
    stop: threading.Event,
) -> threading.Thread | None:
    """With ``[audit] checkpoint_file`` set: the audit key (made if missing) and a
    first checkpoint now, a ``ConfigError`` naming the setting when either fails; then
    one every ``checkpoint_interval`` from a daemon thread. None when not configured."""
    path = config.audit.checkpoint_file
    if path is None:
        return None
    try:
        key, created = load_or_create_audit_key(config.data_dir)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"audit.checkpoint_file: the audit key: {exc}") from None
    if created:
        log.info("made the audit key %s", audit_key_path(config.data_dir))

    def write() -> None:
        cp = append_checkpoint(path, store, key, node=config.node.name, clock=clock)
        log.info("audit checkpoint: %d entries up to entry %d, in %s", cp.count, cp.last_id, path)

    try:
        write()
    except OSError as exc:
        raise ConfigError(f"audit.checkpoint_file: cannot append to {path}: {exc}") from None

    def run() -> None:
        # A missed checkpoint is worth a line each round: rounds are far apart.
        while not stop.wait(config.audit.checkpoint_interval.total_seconds()):
            try:
                write()
            except (Unavailable, OSError) as exc:
                log.warning("audit checkpoint not written (%s); trying again next round", exc)
            except Exception:  # keep checkpointing; the next round may succeed
                log.exception("audit checkpoint failed")

    thread = threading.Thread(target=run, name="audit-checkpoint", daemon=True)
    thread.start()
    return thread
