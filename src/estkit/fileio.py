"""Durable small-file writes (temporary file, fsync, rename, fsync the directory), and
reading the files of secrets only their owner may read.

A leaf module (stdlib only) shared by ``ca/``, ``agent/`` and ``cli/``: keys,
certificates and state files are written one way everywhere.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

PRIVATE = 0o600
PUBLIC = 0o644
PRIVATE_DIR = 0o700


def write_new(path: Path, data: bytes, *, mode: int) -> None:
    """Create ``path`` (which must not exist) with ``data`` and ``mode``, fsynced.

    The file is created 0600 and only then given ``mode``, so a key is never
    readable by others, even for a moment.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, PRIVATE)
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(handle.fileno(), mode)
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def temp_name(path: Path) -> Path:
    """A fresh temporary name beside ``path`` (same directory, so rename is atomic)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")


def replace_file(path: Path, data: bytes, *, mode: int = PUBLIC) -> None:
    """Atomically replace ``path`` with ``data``: readers see the old or the new file."""
    temp = temp_name(path)
    try:
        write_new(temp, data, mode=mode)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    """Make renames and new entries in ``directory`` durable."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_private(path: Path, *, where: str, what: str) -> bytes:
    """The content of ``path``, a file only its owner may read (0600 or 0400) that holds
    a secret (``what``: "a PIN file", "a key file"), read without following a link.
    ``ValueError`` naming ``where`` (the setting that names the file) otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ValueError(f"{where}: {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise ValueError(f"{where}: {path}: not a regular file")
        if mode & 0o077:
            raise ValueError(
                f"{where}: {path} has mode {stat.S_IMODE(mode):04o}; only its owner may read "
                f"{what} (chmod 600 {path})"
            )
        return f.read()
