"""Writing output files so a reader never sees a half-written or briefly world-readable one."""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

PRIVATE = 0o600
PUBLIC = 0o644


@dataclass(frozen=True, slots=True)
class OutputFile:
    """A file to write: a plain name inside the target directory, its bytes, its exact mode."""

    name: str
    data: bytes
    mode: int = PUBLIC

    def __post_init__(self) -> None:
        if (
            not self.name
            or self.name in (".", "..")
            or "/" in self.name
            or (os.altsep is not None and os.altsep in self.name)
            or os.sep in self.name
        ):
            raise ValueError(f"output file name must be a plain file name, got {self.name!r}")


def write_files_atomically(directory: Path, files: Sequence[OutputFile]) -> list[Path]:
    """Write ``files`` into ``directory`` (created if missing); return their paths.

    Each file is written to a temporary file in the same directory, created
    0600 and only then given its mode, fsynced, and renamed over its name
    (``os.replace``). All are written before any is renamed, so a failure
    while writing leaves the old set untouched and no temporary file behind.
    """
    names = [f.name for f in files]
    if len(set(names)) != len(names):
        raise ValueError(f"output file names must differ, got {names}")
    directory.mkdir(parents=True, exist_ok=True)
    staged: list[tuple[Path, Path]] = []
    try:
        for file in files:
            temp = directory / f".{file.name}.{secrets.token_hex(6)}.tmp"
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, PRIVATE)
            staged.append((temp, directory / file.name))
            with os.fdopen(fd, "wb") as handle:
                os.fchmod(handle.fileno(), file.mode)
                handle.write(file.data)
                handle.flush()
                os.fsync(handle.fileno())
        for temp, final in staged:
            os.replace(temp, final)
    except BaseException:
        for temp, _ in staged:
            temp.unlink(missing_ok=True)
        raise
    _fsync_directory(directory)
    return [final for _, final in staged]


def _fsync_directory(directory: Path) -> None:
    # Makes the renames durable; not every platform lets a directory be opened.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
