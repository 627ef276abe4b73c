"""A throwaway PostgreSQL cluster for the tests: ``initdb`` + ``pg_ctl`` in a temporary
directory on a free loopback port, no system service.

The binaries are Debian's ``postgresql`` package (``make test`` installs it). PostgreSQL
refuses to run as root, so as root (CI) the cluster runs as the package's ``postgres``
user through ``runuser``, in a directory that user owns. The cluster trusts loopback
connections of its one superuser, ``estkit``; it is tuned for speed, not durability
(``fsync=off``): it lives only as long as the test session.

A cluster's directory (``/tmp/estkit-pg-*``) names the process that made it (pid and
start time, in ``creator``). A worker killed hard runs no finalizer and no atexit
hook, so every new cluster first sweeps the directories whose creator is gone:
their postmaster stopped (``-m immediate``), the directory removed.
"""

from __future__ import annotations

import atexit
import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa

from estkit.store import SqlStore

SUPERUSER = "estkit"
TEMPLATE = "estkit_template"
_RUN_AS = "postgres"
_PREFIX = "estkit-pg-"
_CREATOR = "creator"
# A directory without a creator file is being made now, or was made before creator
# files: removed only when older than this and no server runs on it.
_UNCLAIMED_AFTER = 3600.0


def bin_dir() -> Path | None:
    """The newest installed PostgreSQL's binaries (``/usr/lib/postgresql/<major>/bin``)."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
        key=lambda p: int(Path(p).parent.parent.name),
    )
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_cluster_user(*args: str) -> list[str]:
    """The command, through ``runuser`` as the cluster's user when running as root."""
    return ["runuser", "-u", _RUN_AS, "--", *args] if os.geteuid() == 0 else list(args)


def _cluster_uids() -> set[int]:
    """Who owns this user's cluster directories: root's are chowned to ``postgres``."""
    uid = os.geteuid()
    return {uid, pwd.getpwnam(_RUN_AS).pw_uid} if uid == 0 else {uid}


def _process_identity(pid: int) -> str | None:
    """``"<pid> <start time>"`` of a running process (Linux ``/proc``, as the Debian
    binaries), None if there is none: a pid given to another process since has
    another start time."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return f"{pid} {fields[19]}"  # field 22, starttime; the fields after comm start at 3


def _pg_ctl(bindir: Path, data: Path, *args: str) -> int:
    command = _as_cluster_user(str(bindir / "pg_ctl"), "-D", str(data), *args)
    return subprocess.run(command, capture_output=True, timeout=60, check=False).returncode


def _not_running(bindir: Path, data: Path) -> bool:
    # pg_ctl status: 3 no server running, 4 no data directory (initdb never ran)
    return _pg_ctl(bindir, data, "status") in (3, 4)


def _leaked(bindir: Path, directory: Path) -> bool:
    """Whether ``directory``'s creator is gone and no server runs on it any more (its
    server is stopped here, ``-m immediate``: nobody needs its data)."""
    data = directory / "data"
    try:
        creator = (directory / _CREATOR).read_text().strip()
    except FileNotFoundError:
        age = time.time() - directory.stat().st_mtime
        return age > _UNCLAIMED_AFTER and _not_running(bindir, data)
    pid = creator.partition(" ")[0]
    if pid.isdigit() and _process_identity(int(pid)) == creator:
        return False
    return _pg_ctl(bindir, data, "-m", "immediate", "-w", "stop") == 0 or _not_running(bindir, data)


def sweep_stale_clusters(bindir: Path, *, under: Path | None = None) -> list[Path]:
    """Stop and remove the clusters in ``under`` (the temporary directory) whose
    creating process is gone; the directories removed. Clusters of live processes,
    and those of other users, are left alone."""
    removed: list[Path] = []
    uids = _cluster_uids()
    for directory in Path(under or tempfile.gettempdir()).glob(f"{_PREFIX}*"):
        try:
            if directory.lstat().st_uid not in uids or not directory.is_dir():
                continue
            if not _leaked(bindir, directory):
                continue
        except OSError:  # swept meanwhile by another worker
            continue
        shutil.rmtree(directory, ignore_errors=True)
        removed.append(directory)
    return removed


class PgCluster:
    """One running cluster; ``database()`` hands out fresh, migrated databases."""

    def __init__(self, bindir: Path, *, settings: Mapping[str, str] | None = None) -> None:
        """``settings``: server settings (``-c name=value``) over the defaults below; the
        benchmark turns durability back on with them."""
        self._bindir = bindir
        self._settings = dict(settings or {})
        self._owner = pwd.getpwnam(_RUN_AS) if os.geteuid() == 0 else None
        # Not under pytest's base temp: its parents are private to the running user.
        self.dir = Path(tempfile.mkdtemp(prefix=_PREFIX))
        (self.dir / _CREATOR).write_text(f"{_process_identity(os.getpid())}\n")
        atexit.register(self.stop)  # when the session ends without its finalizer
        self.data = self.dir / "data"
        self.log = self.dir / "postgresql.log"
        self.port = 0
        self._options = ""
        self._names = itertools.count()
        if self._owner is not None:
            os.chown(self.dir, self._owner.pw_uid, self._owner.pw_gid)

    def _run(self, *args: str) -> None:
        result = subprocess.run(
            _as_cluster_user(*args), capture_output=True, text=True, timeout=60, check=False
        )
        if result.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{args[0]} failed: {result.stdout}{result.stderr}{log}")

    def start(self) -> None:
        sweep_stale_clusters(self._bindir)
        self._run(
            str(self._bindir / "initdb"),
            "-D", str(self.data), "-U", SUPERUSER, "--auth=trust",
            "-E", "UTF8", "--locale=C", "--no-sync",
        )  # fmt: skip
        for _ in range(5):  # the port may be taken between choosing and binding it
            self.port = _free_port()
            options = (
                f"-k {self.dir} -p {self.port} -c listen_addresses=127.0.0.1"
                " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
                " -c max_connections=200"
            ) + "".join(f" -c {name}={value}" for name, value in self._settings.items())
            self._options = options
            logged = self.log.stat().st_size if self.log.exists() else 0
            try:
                self.resume()
                break
            except RuntimeError:
                if "Address already in use" not in self._log_since(logged):
                    raise
        else:
            raise RuntimeError("no free port for PostgreSQL")
        self._admin(f'CREATE DATABASE "{TEMPLATE}"')
        template = SqlStore.open(self.url(TEMPLATE))
        try:
            template.migrate()
        finally:
            template.close()

    def _log_since(self, offset: int) -> str:
        """What the server logged after ``offset`` bytes: this attempt's lines only."""
        try:
            with self.log.open("rb") as log:
                log.seek(offset)
                return log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def resume(self) -> None:
        """Start the (initialised or halted) cluster on its port; waits until it accepts."""
        self._run(
            str(self._bindir / "pg_ctl"),
            "-D", str(self.data), "-l", str(self.log), "-w", "-t", "30",
            "-o", self._options, "start",
        )  # fmt: skip

    def halt(self) -> None:
        """Stop the cluster as an operator would (``-m fast``), keeping its data."""
        self._run(str(self._bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def stop(self) -> None:
        """Stop the cluster and remove its directory (again: nothing to do)."""
        try:
            if self.data.exists():
                self._run(str(self._bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
                          "-w", "stop")  # fmt: skip
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
            atexit.unregister(self.stop)

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def _admin(self, sql: str) -> None:
        engine = sa.create_engine(self.url("postgres"), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql(sql)
        finally:
            engine.dispose()

    @contextmanager
    def database(self) -> Iterator[str]:
        """The URL of a new database at the newest schema (a copy of the template),
        dropped afterwards."""
        name = f"test_{next(self._names)}"
        self._admin(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE}" STRATEGY FILE_COPY')
        try:
            yield self.url(name)
        finally:
            self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def running_cluster(*, settings: Mapping[str, str] | None = None) -> Iterator[PgCluster]:
    bindir = bin_dir()
    if bindir is None:
        raise RuntimeError("PostgreSQL is not installed: scripts/install-test-debs.sh postgresql")
    cluster = PgCluster(bindir, settings=settings)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
