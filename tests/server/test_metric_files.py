"""Where the workers' metric files go (``server/metric_files.py``): a new directory per
``server run``, those of ended runs removed, and prometheus-client imported only after
the directory is named (it picks its multiprocess mode when first imported)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from estkit.server.metric_files import MULTIPROCESS_ENV, file_pids, prepare


def _ended_pid() -> int:
    """The pid of a process that has ended."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return int(proc.stdout)


def test_a_run_gets_a_new_directory_and_those_of_ended_runs_go(tmp_path: Path) -> None:
    parent = tmp_path / "run" / "metrics"
    ended = parent / str(_ended_pid())
    running = parent / str(os.getppid())  # a process that is still there
    mine = parent / "4242"
    for directory in (ended, running, mine):
        directory.mkdir(parents=True)
        (directory / "counter_1.db").write_bytes(b"old")
    environ: dict[str, str] = {}

    made = prepare(tmp_path, environ=environ, pid=4242)

    assert made == mine and list(made.iterdir()) == []
    assert environ == {MULTIPROCESS_ENV: str(made)}
    assert not ended.exists()
    assert (running / "counter_1.db").exists()
    assert made.stat().st_mode & 0o777 == 0o700


def test_the_pids_of_the_files_are_read_from_their_names(tmp_path: Path) -> None:
    for name in ("counter_11.db", "gauge_livesum_12.db", "histogram_11.db", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert file_pids(tmp_path) == {11, 12}


def test_the_server_imports_prometheus_client_only_once_serve_has_named_the_directory() -> None:
    code = (
        "import sys, estkit.server.app, estkit.cli.server_cmds\n"
        "assert 'prometheus_client' not in sys.modules, 'imported too early'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
