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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the server and hub stand-in helpers

from demolib import AgentRun, Timeline, agent_config, run_in_workdir, short  # noqa: E402

from estserver import ESTKIT, EstServer, make_server, set_config  # noqa: E402
from hubstandin import HubStandIn, Observer, make_hub_standin  # noqa: E402

DEVICE = "demo-sensor-1"
VALIDITY = 30  # seconds of operational certificate lifetime
TELEMETRY = 4  # seconds between heartbeats
DEADLINE = 300  # seconds for the whole demo
RENEWALS = 2

_timeline = Timeline(source_width=8)
say = _timeline.say


class AgentWatcher(AgentRun):
    """Runs `estkit agent run`, echoing its log lines and counting renewals."""

    _SERIAL = re.compile(r"\b([0-9A-F]{32})\b")

    def __init__(self, config: Path, log_path: Path) -> None:
        self.renewals = 0
        super().__init__(_timeline, "agent", config, log_path)

    def heard(self, part: str, text: str) -> bool:
        if "renewed:" in text:
            self.renewals += 1
        return not (part == "hub" and text.startswith("connecting"))  # "connected" says it


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
            agent_config(
                device_id=DEVICE,
                state_dir=workdir / "device" / "state",
                est_url=server.url,
                trust_anchor=server.root_pem,
                bootstrap=boot,
                extra=f"""[hub]
host = "localhost"
port = {hub.port}
hub_name = "demo-hub.azure-devices.net"
ca_file = "{hub.ca_file}"
telemetry_interval = "{TELEMETRY}s"
reconnect_max = "5s"
""",
            )
        )
        say("device", "agent starts: bootstrap certificate, EST URL and trust anchor, nothing else")
        agent = AgentWatcher(config, workdir / "device" / "agent.log")
        seen = 0
        deadline = _timeline.start + DEADLINE
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
    return run_in_workdir(_timeline, run, prefix="estkit-demo-", keep=args.keep)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
