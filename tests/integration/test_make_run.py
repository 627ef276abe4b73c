"""The README's first command: ``make run`` initialises, prints what a user needs, and serves."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

from estserver import free_ports, run_estkit
from estutil import Identity

REPO = Path(__file__).resolve().parents[2]


def test_make_run_serves_and_its_printed_commands_enroll_a_device(tmp_path: Path) -> None:
    """Also on a second run with other ports: PORT and CRL_PORT are honoured every time."""
    data_dir = tmp_path / "var" / "estkit"
    first, port, crl_port = free_ports(3)
    run_estkit("server", "init", "--data-dir", data_dir, "--port", str(first))
    log = tmp_path / "make-run.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                "make",
                "--no-print-directory",
                "run",
                f"DATA_DIR={data_dir}",
                f"PORT={port}",
                f"CRL_PORT={crl_port}",
            ],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while "Uvicorn running" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.2)
        text = log.read_text()
        assert f"https://localhost:{port}/.well-known/est" in text
        assert f"Uvicorn running on https://127.0.0.1:{port}" in text
        assert "trust anchor SHA-256:" in text
        commands = [
            line.strip() for line in text.splitlines() if line.startswith("  .venv/bin/estkit ")
        ]
        assert [c.split()[1] for c in commands] == ["device", "enroll"]
        for command in commands:
            done = subprocess.run(
                shlex.split(command), cwd=REPO, capture_output=True, text=True, timeout=60
            )
            assert done.returncode == 0, done.stderr
        operational = Identity.load(tmp_path / "var" / "demo-1" / "operational")
        assert operational.cert.subject.rfc4514_string() == "CN=demo-1"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
