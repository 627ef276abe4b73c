"""Atomic writing of output files."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest

from estkit.cli import files
from estkit.cli.files import OutputFile, write_files_atomically


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_writes_files_with_exact_modes_and_leaves_no_temp_files(tmp_path: Path) -> None:
    out = tmp_path / "new" / "dir"
    old_umask = os.umask(0)
    try:
        written = write_files_atomically(
            out, [OutputFile("key.pem", b"KEY", 0o600), OutputFile("cert.pem", b"CERT")]
        )
    finally:
        os.umask(old_umask)
    assert written == [out / "key.pem", out / "cert.pem"]
    assert (out / "key.pem").read_bytes() == b"KEY"
    assert _mode(out / "key.pem") == 0o600
    assert _mode(out / "cert.pem") == 0o644
    assert sorted(p.name for p in out.iterdir()) == ["cert.pem", "key.pem"]


def test_replaces_existing_files(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_bytes(b"OLD")
    (tmp_path / "cert.pem").chmod(0o666)
    write_files_atomically(tmp_path, [OutputFile("cert.pem", b"NEW")])
    assert (tmp_path / "cert.pem").read_bytes() == b"NEW"
    assert _mode(tmp_path / "cert.pem") == 0o644


def test_key_file_is_created_private_never_world_readable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    created: list[tuple[str, int]] = []
    real_open = os.open

    def spy(path: Any, flags: int, mode: int = 0o777, **kwargs: Any) -> int:
        if flags & os.O_CREAT:
            created.append((os.fspath(path), mode))
        return real_open(path, flags, mode, **kwargs)

    monkeypatch.setattr(files.os, "open", spy)
    write_files_atomically(tmp_path, [OutputFile("key.pem", b"KEY", 0o600)])
    ((path, mode),) = created
    assert Path(path).parent == tmp_path and Path(path).name != "key.pem"
    assert mode == 0o600


def test_failure_leaves_old_files_and_no_temp_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "key.pem").write_bytes(b"OLD KEY")

    def failing_replace(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space"):
        write_files_atomically(
            tmp_path, [OutputFile("key.pem", b"NEW", 0o600), OutputFile("cert.pem", b"C")]
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key.pem"]
    assert (tmp_path / "key.pem").read_bytes() == b"OLD KEY"


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../key.pem"])
def test_rejects_names_that_are_not_plain_file_names(name: str) -> None:
    with pytest.raises(ValueError, match="plain file name"):
        OutputFile(name, b"")


def test_rejects_duplicate_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must differ"):
        write_files_atomically(tmp_path, [OutputFile("a", b"1"), OutputFile("a", b"2")])
