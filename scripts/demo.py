"""`make demo`: one device's life in about a minute and a half, as a readable timeline.

A fresh estkit server issuing operational certificates that last 30 seconds,
an IoT Hub stand-in (Mosquitto, configured as tests/hubstandin.py describes),
a device provisioned at the "factory" with its bootstrap certificate, and the
agent: first enrollment, telemetry arriving at the hub, two renewals with
reconnects, then the operator decommissions the device and the agent stops.
Everything runs on loopback in a temporary directory, removed at the end
(``--keep`` keeps it). The whole run is bounded in time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the server and hub stand-in helpers

from estserver import ESTKIT, EstServer, make_server, set_config  # noqa: E402
from hubstandin import HubStandIn, Observer, make_hub_standin  # noqa: E402

DEVICE = "demo-sensor-1"
VALIDITY = 30  # seconds of operational certificate lifetime
TELEMETRY = 4  # seconds between heartbeats
DEADLINE = 300  # seconds for the whole demo
RENEWALS = 2

_start = time.monotonic()
_print_lock = threading.Lock()


def say(source: str, text: str) -> None:
    with _print_lock:
        print(f"[{time.monotonic() - _start:6.1f}s] {source:<8}| {text}", flush=True)


def short(serial: str) -> str:
    return serial[:8] + "…"


class AgentWatcher:
    """Runs `estkit agent run`, echoing its log lines and counting renewals."""

    _PREFIX = re.compile(r"^(INFO|WARNING|ERROR) estkit\.agent\.(\w+): ")

    def __init__(self, config: Path, log_path: Path) -> None:
        self.renewals = 0
        self.log_path = log_path
        self.proc = subprocess.Popen(
            [*ESTKIT, "agent", "run", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with self.log_path.open("w") as log:
            for line in self.proc.stdout:
                log.write(line)
                line = line.rstrip()
                match = self._PREFIX.match(line)
                if match is None:
                    continue
                level, part = match.groups()
                text = line[match.end() :]
                if "renewed:" in text:
                    self.renewals += 1
                if part == "hub" and text.startswith("connecting"):
                    continue  # "connected" says it
                text = re.sub(r"\b([0-9A-F]{32})\b", lambda m: short(m.group(1)), text)
                say("agent", f"{'' if level == 'INFO' else level + ': '}{text}")

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._thread.join(timeout=5)


def show_hub_traffic(observer: Observer, seen: int) -> int:
    """Print what reached the hub since message number ``seen``."""
    messages = observer.messages[seen:]
    for m in messages:
        if m.device_id == DEVICE and "/messages/events/" in m.topic:
            body = m.json()
            serial = m.properties.get("certSerial", "?")
            say("hub", f"telemetry #{body['seq']} from {DEVICE} (connection cert {short(serial)})")
        elif m.topic.startswith("$iothub/twin/PATCH/properties/reported/"):
            cert = json.loads(m.payload)["estkit"]["certificate"]
            say(
                "hub",
                f"reported properties: certificate {short(cert['serial'])} "
                f"valid until {cert['notAfter'][11:19]}",
            )
    return seen + len(messages)


def run(workdir: Path) -> int:
    say("demo", f"working directory {workdir}")
    server: EstServer = make_server(workdir)
    set_config(server.data_dir, "profiles.operational", "validity", f'"{VALIDITY}s"')
    server.start()
    say("server", f"EST at {server.url}; operational certificates last {VALIDITY} s")
    hub: HubStandIn = make_hub_standin(workdir / "hub", server_data_dir=server.data_dir)
    hub.start()
    say("hub", f"stand-in on localhost:{hub.port}: trusts only the devices CA, ACL by CN")
    observer = hub.observer()
    agent: AgentWatcher | None = None
    try:
        boot = workdir / "device" / "bootstrap"
        factory = server.cli("device", "bootstrap", DEVICE, "--out", boot)
        say("factory", factory.stdout.strip().split(", files in")[0])
        config = workdir / "device" / "agent.toml"
        config.write_text(
            f"""device_id = "{DEVICE}"
state_dir = "{workdir / "device" / "state"}"
[est]
url = "{server.url}"
trust_anchor = "{server.root_pem}"
[bootstrap]
cert = "{boot / "cert.pem"}"
key = "{boot / "key.pem"}"
chain = "{boot / "chain.pem"}"
[renewal]
retry_min = "1s"
retry_max = "5s"
[hub]
host = "localhost"
port = {hub.port}
hub_name = "demo-hub.azure-devices.net"
ca_file = "{hub.ca_file}"
telemetry_interval = "{TELEMETRY}s"
reconnect_max = "5s"
"""
        )
        say("device", "agent starts: bootstrap certificate, EST URL and trust anchor, nothing else")
        agent = AgentWatcher(config, workdir / "device" / "agent.log")
        seen = 0
        deadline = _start + DEADLINE
        # First enrollment, then RENEWALS renewals, then a little more telemetry.
        while agent.renewals < RENEWALS + 1 and time.monotonic() < deadline:
            seen = show_hub_traffic(observer, seen)
            if agent.wait(0.5) is not None:
                say("demo", f"agent exited early ({agent.proc.returncode}); see the log above")
                return 1
        settle = time.monotonic() + TELEMETRY * 2 + 1
        while time.monotonic() < min(settle, deadline):
            seen = show_hub_traffic(observer, seen)
            time.sleep(0.5)
        if agent.renewals < RENEWALS + 1:
            say("demo", "timed out waiting for the renewals")
            return 1
        result = server.cli("device", "decommission", DEVICE)
        say("operator", f"estkit device decommission {DEVICE}: {result.stdout.strip()}")
        say("demo", "the agent learns it at its next renewal, at the latest in ~25 s")
        status = None
        while status is None and time.monotonic() < deadline:
            seen = show_hub_traffic(observer, seen)
            status = agent.wait(0.5)
        show_hub_traffic(observer, seen)
        if status is None:
            say("demo", "timed out waiting for the agent to stop")
            return 1
        say("demo", f"agent exited with status {status} (77: refused for good, do not restart)")
        report = subprocess.run(
            [*ESTKIT, "agent", "status", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        for line in report.stdout.splitlines():
            say("status", line)
        return 0 if status == 77 else 1
    finally:
        if agent is not None:
            agent.stop()
        observer.close()
        hub.stop()
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    args = parser.parse_args()
    if shutil.which("mosquitto") is None:
        print("demo: needs mosquitto (Debian package 'mosquitto')", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="estkit-demo-"))
    try:
        code = run(workdir)
    finally:
        if args.keep:
            say("demo", f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    say("demo", "done" if code == 0 else "FAILED")
    return code


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
