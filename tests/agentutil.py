"""Helpers for agent tests: a config file, the agent as a real process, reading its state.

Waiting loops are bounded in count and time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509

from estkit.pki import keys
from estserver import ESTKIT, EstServer, run_estkit
from hubstandin import HubStandIn


@dataclass
class AgentSetup:
    """One device: its bootstrap files, config file and state directory."""

    device_id: str
    directory: Path
    config: Path
    state_dir: Path

    def renew(
        self, *args: str, env: dict[str, str] | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return _run_agent_cmd("renew", self.config, *args, env=env, check=check)

    def status(self, *, check: bool = False) -> dict[str, Any]:
        proc = _run_agent_cmd("status", self.config, "--json", check=check)
        data: dict[str, Any] = json.loads(proc.stdout)
        return data

    def current(self) -> tuple[x509.Certificate, keys.PrivateKey]:
        """What a consumer of ``current/`` reads; asserts key and certificate belong together."""
        current = self.state_dir / "current"
        cert = x509.load_pem_x509_certificate((current / "cert.pem").read_bytes())
        key = keys.load_private_key_pem((current / "key.pem").read_bytes())
        assert keys.public_keys_match(cert.public_key(), key.public_key()), "key/cert mismatch"
        full = x509.load_pem_x509_certificates((current / "fullchain.pem").read_bytes())
        assert full[0] == cert
        return cert, key

    def versions(self) -> list[str]:
        return sorted(os.listdir(self.state_dir / "archive"))


def setup_agent(
    server: EstServer,
    device_id: str,
    directory: Path,
    *,
    hub: HubStandIn | None = None,
    renewal: dict[str, str] | None = None,
    bootstrap: dict[str, str] | None = None,
    hooks: list[list[str]] | None = None,
    telemetry_interval: str = "0.5s",
    est_timeout: str = "5s",
    trust_fingerprint: str | None = None,
) -> AgentSetup:
    """Make the device's bootstrap certificate at the "factory" and write its agent config."""
    boot = directory / "bootstrap"
    server.cli("device", "bootstrap", device_id, "--out", boot)
    state_dir = directory / "state"
    renewal_values = {"retry_min": '"0.5s"', "retry_max": '"2s"', **(renewal or {})}
    lines = [
        f'device_id = "{device_id}"',
        f'state_dir = "{state_dir}"',
        "",
        "[est]",
        f'url = "{server.url}"',
        f'trust_anchor_fingerprint = "{trust_fingerprint}"'
        if trust_fingerprint
        else f'trust_anchor = "{server.root_pem}"',
        f'timeout = "{est_timeout}"',
        "",
        "[bootstrap]",
        f'cert = "{boot / "cert.pem"}"',
        f'key = "{boot / "key.pem"}"',
        f'chain = "{boot / "chain.pem"}"',
        *(f"{k} = {v}" for k, v in (bootstrap or {}).items()),
        "",
        "[renewal]",
        *(f"{k} = {v}" for k, v in renewal_values.items()),
    ]
    if hooks:
        lines += ["", "[hooks]", f"commands = {json.dumps(hooks)}", 'timeout = "10s"']
    if hub is not None:
        lines += [
            "",
            "[hub]",
            'host = "localhost"',
            f"port = {hub.port}",
            'hub_name = "standin.azure-devices.net"',
            f'ca_file = "{hub.ca_file}"',
            f'telemetry_interval = "{telemetry_interval}"',
            'reconnect_max = "2s"',
        ]
    config = directory / "agent.toml"
    config.write_text("\n".join(lines) + "\n")
    return AgentSetup(device_id=device_id, directory=directory, config=config, state_dir=state_dir)


@dataclass
class AgentProcess:
    """``estkit agent run`` (or another ``command``) as a child process, output in a log."""

    setup: AgentSetup
    env: dict[str, str] = field(default_factory=dict)
    command: tuple[str, ...] = ("run",)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    def start(self) -> AgentProcess:
        self.log_path = self.setup.directory / f"agent-{int(time.time() * 1000)}.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    *ESTKIT,
                    "agent",
                    self.command[0],
                    "--config",
                    self.setup.config,
                    *self.command[1:],
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env},
            )
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM, and the exit status (SIGKILL after ``timeout``)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
            raise AssertionError(f"agent ignored SIGTERM for {timeout} s:\n{self.log()}") from None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"agent still running after {timeout} s:\n{self.log()}") from None

    def wait_stopped_by_signal(self, timeout: float) -> None:
        """Until the process is stopped (SIGSTOP: state T in /proc)."""
        assert self.proc is not None
        stat_path = Path(f"/proc/{self.proc.pid}/stat")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited {self.proc.returncode}:\n{self.log()}")
            state = stat_path.read_text().rpartition(")")[2].split()[0]
            if state == "T":
                return
            time.sleep(0.05)
        raise AssertionError(f"agent did not stop itself within {timeout} s:\n{self.log()}")

    def ensure_stopped(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def wait_until(
    condition: Callable[[], Any], *, timeout: float, interval: float = 0.2, what: str = ""
) -> Any:
    """Poll ``condition`` until it returns something true; its value, or AssertionError."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(interval)


def _run_agent_cmd(
    action: str, config: Path, *args: str, env: dict[str, str] | None = None, check: bool
) -> subprocess.CompletedProcess[str]:
    if env is None:
        return run_estkit("agent", action, "--config", config, *args, check=check)
    proc = subprocess.run(
        [*ESTKIT, "agent", action, "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **env},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"estkit agent {action} exited {proc.returncode}: {proc.stderr}")
    return proc
