"""Where the server's processes write their metrics: one directory per ``server run``.

prometheus-client's multiprocess mode: every process that counts (each uvicorn
worker) writes its own files, ``<kind>_<pid>.db``, in the directory that
``PROMETHEUS_MULTIPROC_DIR`` names, and the process that serves the metrics (the
supervisor, ``server/metrics.py``) adds them up at each scrape. prometheus-client
chooses that mode when a process first imports it, so ``serve`` calls ``prepare``
before anything imports ``server/metrics.py``, and the workers, spawned after,
inherit the variable. This module imports nothing of prometheus-client.
"""

from __future__ import annotations

import atexit
import os
import shutil
from collections.abc import MutableMapping
from pathlib import Path

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare(data_dir: Path, *, environ: MutableMapping[str, str], pid: int) -> Path:
    """A new, empty ``run/metrics/<pid>`` in ``data_dir`` for the metric files of this
    run (process ``pid``), named in ``environ``; removed when this process exits.

    A run's files are never read after it (counters start again at zero with the
    process, as Prometheus expects), so the directories of runs whose process is
    gone are removed here; a run still going (another ``server run`` on this data
    directory, about to be refused for its node name) keeps its own.
    """
    parent = data_dir / "run" / "metrics"
    parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    for entry in parent.iterdir():
        if entry.name == str(pid) or (entry.name.isdigit() and not alive(int(entry.name))):
            shutil.rmtree(entry, ignore_errors=True)
    directory = parent / str(pid)
    directory.mkdir(mode=0o700)
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    environ[MULTIPROCESS_ENV] = str(directory)
    return directory


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists (a worker whose files may still change)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


def file_pids(directory: Path) -> set[int]:
    """The processes that wrote metric files in ``directory``."""
    pids = set()
    for path in directory.glob("*.db"):
        pid = path.stem.rpartition("_")[2]
        if pid.isdigit():
            pids.add(int(pid))
    return pids
