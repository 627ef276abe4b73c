"""Writing output files so a reader never sees a half-written or briefly world-readable one."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from estkit.fileio import PUBLIC, fsync_directory, temp_name, write_new


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
            final = directory / file.name
            temp = temp_name(final)
            staged.append((temp, final))
            write_new(temp, file.data, mode=file.mode)
        for temp, final in staged:
            os.replace(temp, final)
    except BaseException:
        for temp, _ in staged:
            temp.unlink(missing_ok=True)
        raise
    fsync_directory(directory)
    return [final for _, final in staged]
