"""A real ``estkit server run`` process on a free loopback port, in its own data directory.

Waiting loops are bounded in count and time.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ESTKIT = [sys.executable, "-m", "estkit.cli.main"]
# The ports `estkit server init` writes by default (HTTPS, CRL): `make run` may be
# serving on them while the suite runs, so no test may need them.
DEFAULT_PORTS = (8443, 8444)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports (bound together, so none is handed out twice)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def hold_port(port: int, host: str = "127.0.0.1") -> socket.socket | None:
    """A socket listening on ``host:port`` (never accepting), or None when it is taken."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((host, port))
        sock.listen()
    except OSError:
        sock.close()
        return None
    return sock


def is_listening(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def run_estkit(
    *args: str | Path, check: bool = True, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run the ``estkit`` command as a user would, capturing its output."""
    proc = subprocess.run(
        [*ESTKIT, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"estkit {' '.join(map(str, args))} exited {proc.returncode}: {proc.stderr.strip()}"
        )
    return proc


def set_config(data_dir: Path, section: str, key: str, value: str) -> None:
    """Replace ``key = …`` inside ``[section]`` of the server's config (a TOML literal)."""
    path = data_dir / "estkit.toml"
    text = path.read_text()
    head = f"[{section}]\n"
    start = text.index(head) + len(head)
    end = text.find("\n[", start)
    end = len(text) if end < 0 else end
    body = text[start:end]
    pattern = re.compile(rf"^{re.escape(key)}\s*=.*$", re.M)
    body = (
        pattern.sub(f"{key} = {value}", body)
        if pattern.search(body)
        else body + f"{key} = {value}\n"
    )
    path.write_text(text[:start] + body + text[end:])


def add_label(data_dir: Path, name: str, **settings: str | bool | int) -> None:
    """Append ``[labels.<name>]`` issuing from the devices CA under the operational profile,
    with ``settings`` as TOML values."""

    def toml(value: str | bool | int) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        return str(value) if isinstance(value, int) else f'"{value}"'

    lines = [f"[labels.{name}]", 'ca = "devices"', 'profile = "operational"']
    lines += [f"{key} = {toml(value)}" for key, value in settings.items()]
    with (data_dir / "estkit.toml").open("a") as config:
        config.write("\n" + "\n".join(lines) + "\n")


@dataclass
class EstServer:
    data_dir: Path
    port: int
    crl_port: int
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def origin(self) -> str:
        return f"https://localhost:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.origin}/.well-known/est"

    @property
    def crl_url(self) -> str:
        return f"http://localhost:{self.crl_port}/crl"

    @property
    def root_pem(self) -> Path:
        return self.data_dir / "ca" / "root.pem"

    def cli(self, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        """An operator command against this server's data directory."""
        group, action, *rest = args
        return run_estkit(group, action, "--data-dir", self.data_dir, *rest, check=check)

    def start(self, *extra: str) -> None:
        assert self.proc is None
        self.log_path = self.data_dir / "server.log"
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                *ESTKIT,
                "server",
                "run",
                "--data-dir",
                str(self.data_dir),
                "--port",
                str(self.port),
                *extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        ctx = ssl.create_default_context(cafile=str(self.root_pem))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {self.log()}")
            try:
                with urllib.request.urlopen(f"{self.origin}/health", context=ctx, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"server did not start within 30 s: {self.log()}")

    def stop(self) -> None:
        """SIGTERM to the server's process group (its workers too); SIGKILL after 15 s.
        A server that already exited (a failed start) is only reaped."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=15)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=5)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        return self.log_path.read_text()[-4000:] if self.log_path and self.log_path.exists() else ""


def make_server(
    tmp: Path,
    *,
    config: dict[tuple[str, str], str] | None = None,
    database_url: str | None = None,
    init_args: Sequence[str | Path] = (),
) -> EstServer:
    """``estkit server init`` in ``tmp/server`` on free ports; on its own SQLite file, or
    on ``database_url`` (see ``backends.server_database``); ``init_args``: more options
    of ``server init`` (``--signer pkcs11 ...``)."""
    data_dir = tmp / "server"
    port, crl_port = free_port(), free_port()
    database = ["--database-url", database_url] if database_url else []
    run_estkit(
        "server", "init", "--data-dir", data_dir, "--port", str(port),
        "--crl-port", str(crl_port), *database, *init_args,
    )  # fmt: skip
    for (section, key), value in (config or {}).items():
        set_config(data_dir, section, key, value)
    return EstServer(data_dir=data_dir, port=port, crl_port=crl_port)


@contextmanager
def node_pair(
    database_url: str, tmp: Path, *, prepare: Callable[[Path], None] | None = None
) -> Iterator[tuple[EstServer, EstServer]]:
    """Two running nodes on one (PostgreSQL) database: ``tmp/node-a`` made by ``server
    init`` (then ``prepare``d), ``tmp/node-b`` a copy of it (same CAs and database URL)
    with its own ports and node name. Stopped, B first, at the end."""
    a_dir, b_dir = tmp / "node-a", tmp / "node-b"
    port_a, crl_a, port_b, crl_b = free_ports(4)
    url = database_url.replace("postgresql+psycopg://", "postgresql://")
    run_estkit(
        "server", "init", "--data-dir", a_dir, "--port", str(port_a),
        "--crl-port", str(crl_a), "--database-url", url,
    )  # fmt: skip
    if prepare is not None:
        prepare(a_dir)
    shutil.copytree(a_dir, b_dir)
    set_config(b_dir, "server", "port", str(port_b))
    set_config(b_dir, "server", "public_url", f'"https://localhost:{port_b}"')
    set_config(b_dir, "crl", "http_port", str(crl_b))
    set_config(b_dir, "node", "name", '"node-b"')  # a copy keeps A's; one name, one node
    a = EstServer(data_dir=a_dir, port=port_a, crl_port=crl_a)
    b = EstServer(data_dir=b_dir, port=port_b, crl_port=crl_b)
    a.start()
    try:
        b.start()
        try:
            yield a, b
        finally:
            b.stop()
    finally:
        a.stop()
