"""``estkit server run`` starts in order: the whole configuration is checked before any
port is bound, and a port that cannot be bound is named with the setting it comes from.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from backends import server_database
from estserver import (
    DEFAULT_PORTS,
    EstServer,
    hold_port,
    is_listening,
    make_server,
    run_estkit,
    set_config,
)


@pytest.fixture
def taken() -> Iterator[list[socket.socket]]:
    """Listening sockets the test opens to make ports busy; closed afterwards."""
    held: list[socket.socket] = []
    yield held
    for sock in held:
        sock.close()


def take(held: list[socket.socket], port: int) -> None:
    sock = hold_port(port)
    assert sock is not None, f"port {port} was meant to be free"
    held.append(sock)


def run_server(data_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """``server run`` that is expected to refuse: bounded, never left serving."""
    return run_estkit("server", "run", "--data-dir", data_dir, *extra, check=False, timeout=60)


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_a_bad_tls_key_is_reported_even_while_the_crl_port_is_busy(
    fresh_server: EstServer, taken: list[socket.socket]
) -> None:
    take(taken, fresh_server.crl_port)
    set_config(fresh_server.data_dir, "tls", "key", '"ca/devices.key"')
    proc = run_server(fresh_server.data_dir)
    assert proc.returncode == 78
    line = one_line(proc)
    assert "tls.key" in line and "key values mismatch" in line
    assert str(fresh_server.crl_port) not in line and "in use" not in line


@pytest.mark.parametrize(
    ("busy", "args", "setting"),
    [
        ("port", (), "server.port"),
        ("port", ("--port", "{port}"), "--port"),
        ("crl_port", (), "crl.http_port"),
    ],
    ids=["fail/main-port", "fail/port-option", "fail/crl-port"],
)
def test_a_busy_port_is_named_with_its_address_and_setting(
    fresh_server: EstServer,
    taken: list[socket.socket],
    busy: str,
    args: tuple[str, ...],
    setting: str,
) -> None:
    port = getattr(fresh_server, busy)
    take(taken, port)
    proc = run_server(fresh_server.data_dir, *(a.format(port=port) for a in args))
    assert proc.returncode == 71
    assert one_line(proc) == (
        f"estkit: cannot listen on 127.0.0.1:{port} ({setting}): "
        "address already in use by another process"
    )
    # Nothing was left listening on the other port either.
    other = fresh_server.crl_port if busy == "port" else fresh_server.port
    assert not is_listening(other)


def test_init_with_the_default_port_busy_works_and_run_names_the_port(
    tmp_path: Path, taken: list[socket.socket]
) -> None:
    """As on a machine where `make run` already serves: init binds nothing; run says why."""
    port = DEFAULT_PORTS[0]
    if (sock := hold_port(port)) is not None:  # else the session (or `make run`) holds it
        taken.append(sock)
    assert is_listening(port)
    data_dir = tmp_path / "data"
    run_estkit("server", "init", "--data-dir", data_dir)
    assert f"port = {port}\n" in (data_dir / "estkit.toml").read_text()
    proc = run_server(data_dir)
    assert proc.returncode == 71
    assert f"cannot listen on 127.0.0.1:{port} (server.port)" in one_line(proc)


def test_the_server_serves_on_the_socket_it_bound_itself(
    request: pytest.FixtureRequest, backend: str, tmp_path: Path
) -> None:
    """The start-up line people and scripts wait for still names https, host and port."""
    server = make_server(tmp_path, database_url=server_database(request, backend))
    server.start()
    try:
        assert f"Uvicorn running on https://127.0.0.1:{server.port}" in server.log()
        assert is_listening(server.crl_port)
    finally:
        server.stop()
    assert not is_listening(server.port)


def test_the_default_ports_are_taken_while_the_suite_runs() -> None:
    """tests/conftest.py holds 8443 and 8444 for the run (or `make run` does): every test
    here passes with them taken, so none can depend on them."""
    for port in DEFAULT_PORTS:
        sock = hold_port(port)
        if sock is not None:
            sock.close()
        assert sock is None, f"port {port} was free during the run"
