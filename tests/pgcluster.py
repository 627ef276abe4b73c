"""A throwaway PostgreSQL cluster for the tests: ``initdb`` + ``pg_ctl`` in a temporary
directory on a free loopback port, no system service.

The binaries are Debian's ``postgresql`` package (``make test`` installs it). PostgreSQL
refuses to run as root, so as root (CI) the cluster runs as the package's ``postgres``
user through ``runuser``, in a directory that user owns. The cluster trusts loopback
connections of its one superuser, ``estkit``; it is tuned for speed, not durability
(``fsync=off``): it lives only as long as the test session.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa

from estkit.store import SqlStore

SUPERUSER = "estkit"
TEMPLATE = "estkit_template"
_RUN_AS = "postgres"


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


class PgCluster:
    """One running cluster; ``database()`` hands out fresh, migrated databases."""

    def __init__(self, bindir: Path) -> None:
        self._bindir = bindir
        self._owner = pwd.getpwnam(_RUN_AS) if os.geteuid() == 0 else None
        # Not under pytest's base temp: its parents are private to the running user.
        self.dir = Path(tempfile.mkdtemp(prefix="estkit-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgresql.log"
        self.port = 0
        self._options = ""
        self._names = itertools.count()
        if self._owner is not None:
            os.chown(self.dir, self._owner.pw_uid, self._owner.pw_gid)

    def _run(self, *args: str) -> None:
        prefix = ["runuser", "-u", _RUN_AS, "--"] if self._owner is not None else []
        result = subprocess.run(
            [*prefix, *args], capture_output=True, text=True, timeout=60, check=False
        )
        if result.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{args[0]} failed: {result.stdout}{result.stderr}{log}")

    def start(self) -> None:
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
            )
            self._options = options
            try:
                self.resume()
                break
            except RuntimeError:
                if "Address already in use" not in self.log.read_text():
                    raise
        else:
            raise RuntimeError("no free port for PostgreSQL")
        self._admin(f'CREATE DATABASE "{TEMPLATE}"')
        template = SqlStore.open(self.url(TEMPLATE))
        try:
            template.migrate()
        finally:
            template.close()

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
        try:
            if self.data.exists():
                self._run(str(self._bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
                          "-w", "stop")  # fmt: skip
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

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
def running_cluster() -> Iterator[PgCluster]:
    bindir = bin_dir()
    if bindir is None:
        raise RuntimeError("PostgreSQL is not installed: scripts/install-test-debs.sh postgresql")
    cluster = PgCluster(bindir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
