"""Key and certificate files of the CA: new file, fsync, rename; keys 0600 from the first byte."""

from __future__ import annotations

from pathlib import Path

from estkit.fileio import replace_file


def write_atomic(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` (its directory created if missing) via ``fileio``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_file(path, data, mode=mode)
