"""`make demo-fleet`: two regions on one database and one revocation state, as a readable timeline.

A throwaway PostgreSQL cluster (tests/pgcluster.py), node A (westeurope) made
on it with ``server init --database-url``, node B (eastus) joined from A's data
directory with ``server init --join``; both serve on free loopback ports. The
REST API lists the nodes and each region's EST URL, and each of two devices,
bootstrapped at the "factory", gets its region's URL: agent 1 renews through
node A, agent 2 through node B, with short-lived operational certificates.
Then an operator revokes agent 2's certificate through node A's API; node B
refuses it at once (403 with its refusal code, to a probe and then to the
agent, which stops) and B's CRL lists the serial under a higher CRL number
within 2 s. Everything runs on loopback in a temporary directory, removed at
the end (``--keep`` keeps it). The whole run is bounded in time.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import os
import re
import signal
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from estkit.pki.certs import serial_hex
from estkit.pki.csr import build_csr
from estkit.pki.keys import generate_key

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the server and PostgreSQL helpers

from demolib import AgentRun, Timeline, agent_config, run_in_workdir, short  # noqa: E402

from estserver import EstServer, free_ports, run_estkit, set_config  # noqa: E402
from pgcluster import bin_dir, running_cluster  # noqa: E402

LABEL = "devices"
VALIDITY = 30  # seconds of operational certificate lifetime (--validity)
CRL_WITHIN = 2.0  # seconds: every node serves a revocation made anywhere by then


def time_allowed(validity: int) -> float:
    """Seconds for the whole demo: start-up, then two renewal periods with room to spare."""
    return 60 + 6 * validity


_timeline = Timeline(source_width=9)
say = _timeline.say


class DemoFailed(Exception):
    """A step went wrong or did not happen before the deadline; the message says which."""


@dataclass(frozen=True, slots=True)
class Site:
    """A region of the fleet: its node and the device that lives there."""

    node: str
    region: str
    device_id: str


SITE_A = Site("weu-1", "westeurope", "fleet-sensor-weu")
SITE_B = Site("eus-1", "eastus", "fleet-sensor-eus")


@dataclass(frozen=True, slots=True)
class Node:
    site: Site
    server: EstServer

    @property
    def name(self) -> str:
        return self.site.node

    @property
    def region(self) -> str:
        return self.site.region

    @property
    def crl(self) -> str:
        return f"{self.server.crl_url}/{LABEL}.crl"


class Agent(AgentRun):
    """``estkit agent run`` for one device, echoing its log lines and noting its renewals."""

    _RENEWED = re.compile(r"^renewed: (\w+) ")

    def __init__(self, name: str, device_id: str, config: Path, log_path: Path) -> None:
        self.device_id = device_id
        self.state_dir = config.parent / "state"
        self.operations: list[str] = []  # of each renewal: simpleenroll, simplereenroll
        super().__init__(_timeline, name, config, log_path)

    def heard(self, part: str, text: str) -> bool:
        renewed = self._RENEWED.match(text)
        if renewed is not None:
            self.operations.append(renewed.group(1))
        return True

    def reenrollments(self) -> int:
        return self.operations.count("simplereenroll")

    def current(self) -> x509.Certificate:
        """The operational certificate the device uses now (its ``current`` link)."""
        return x509.load_pem_x509_certificate(
            (self.state_dir / "current" / "cert.pem").read_bytes()
        )


def wait_for(what: str, condition: Callable[[], bool], *, deadline: float) -> None:
    """Poll ``condition`` every 0.2 s until it holds; ``DemoFailed`` at ``deadline``."""
    while not condition():
        if time.monotonic() > deadline:
            raise DemoFailed(f"timed out waiting for {what}")
        time.sleep(0.2)


def fetch_crl(node: Node) -> x509.CertificateRevocationList:
    response = httpx.get(node.crl, timeout=10)  # plain HTTP, as relying parties fetch it
    response.raise_for_status()
    return x509.load_der_x509_crl(response.content)


def crl_number(crl: x509.CertificateRevocationList) -> int:
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def stop_node(node: Node) -> None:
    try:
        node.server.stop()
    except ProcessLookupError:  # it exited by itself (a failed start): nothing left to stop
        node.server.proc = None


def make_nodes(workdir: Path, database_url: str, validity: int) -> tuple[Node, Node]:
    """Node A made on the database, node B joined from A's data directory (not started)."""
    a_dir, b_dir = workdir / "node-a", workdir / "node-b"
    port_a, crl_a, port_b, crl_b = free_ports(4)
    url = database_url.replace("postgresql+psycopg://", "postgresql://")
    run_estkit(
        "server", "init", "--data-dir", a_dir, "--database-url", url,
        "--region", SITE_A.region, "--node-name", SITE_A.node,
        "--public-url", f"https://localhost:{port_a}",
        "--port", str(port_a), "--crl-port", str(crl_a),
    )  # fmt: skip
    # Before the join, so that B's copy of the config says the same.
    set_config(a_dir, "profiles.operational", "validity", f'"{validity}s"')
    set_config(a_dir, "server", "access_log", "true")  # node-*/server.log: who served what
    say(
        SITE_A.node,
        f"server init --database-url {url} --region {SITE_A.region} "
        f"--node-name {SITE_A.node}: CAs made, schema migrated; "
        f"operational certificates last {validity} s",
    )
    joined = run_estkit(
        "server", "init", "--data-dir", b_dir, "--join", a_dir,
        "--region", SITE_B.region, "--node-name", SITE_B.node,
        "--public-url", f"https://localhost:{port_b}",
        "--port", str(port_b), "--crl-port", str(crl_b),
    )  # fmt: skip
    copied = next(
        (line for line in joined.stdout.splitlines() if line.startswith("copied")), "joined"
    )
    say(
        SITE_B.node,
        f"server init --join node-a --region {SITE_B.region} --node-name {SITE_B.node}: "
        + copied.replace(str(a_dir), "node-a"),
    )
    return (
        Node(SITE_A, EstServer(data_dir=a_dir, port=port_a, crl_port=crl_a)),
        Node(SITE_B, EstServer(data_dir=b_dir, port=port_b, crl_port=crl_b)),
    )


def show_fleet(api: httpx.Client, a: Node, b: Node) -> dict[str, str]:
    """Print the nodes and the EST URLs per region as the API gives them; the URLs."""
    nodes = api.get(f"{b.server.origin}/api/v1/nodes")
    nodes.raise_for_status()
    say("api", f"GET {b.name} /api/v1/nodes (token made on {a.name}: one database)")
    now = dt.datetime.now(dt.UTC)
    for n in nodes.json():
        seen = (now - dt.datetime.fromisoformat(n["last_seen"])).total_seconds()
        say(
            "api",
            f"  {n['name']:<6} region {n['region']:<10} {n['public_url']}  "
            f"last heartbeat {max(seen, 0):.1f} s ago{'  STALE' if n['stale'] else ''}",
        )
    cas = api.get(f"{a.server.origin}/api/v1/cas")
    cas.raise_for_status()
    (label,) = [lb for ca in cas.json() for lb in ca["labels"] if lb["name"] == LABEL]
    say("api", f"GET {a.name} /api/v1/cas: label {LABEL!r}, EST URL per region")
    urls: dict[str, str] = {}
    for entry in label["est_urls"]:
        urls[entry["region"]] = entry["url"]
        say("api", f"  {entry['region']:<10} {entry['url']}  (node {entry['node']})")
    return urls


def start_agent(node: Node, est_url: str, number: int, workdir: Path) -> Agent:
    """The factory step for the device of ``node``'s region, then its agent on ``est_url``."""
    device_id = node.site.device_id
    directory = workdir / f"device-{number}"
    boot = directory / "bootstrap"
    factory = node.server.cli("device", "bootstrap", device_id, "--out", boot)
    serial = factory.stdout.split("serial ")[1].split(",")[0]
    say("factory", f"bootstrap certificate for {device_id}: serial {short(serial)}")
    config = directory / "agent.toml"
    config.write_text(
        agent_config(
            device_id=device_id,
            state_dir=directory / "state",
            est_url=est_url,
            trust_anchor=node.server.root_pem,
            bootstrap=boot,
            est_extra='timeout = "5s"\n',
        )
    )
    say("demo", f"agent {number} ({device_id}) starts with the {node.region} EST URL, no hub")
    return Agent(f"agent {number}", device_id, config, directory / "agent.log")


def probe_reenroll(agent: Agent, node: Node, est_url: str) -> httpx.Response:
    """What the device would send next: simplereenroll over mTLS with its current
    certificate, a new key, the same subject."""
    current = agent.state_dir / "current"
    cert = x509.load_pem_x509_certificate((current / "cert.pem").read_bytes())
    csr = build_csr(generate_key("ec-p256"), subject=cert.subject)
    context = ssl.create_default_context(cafile=str(node.server.root_pem))
    context.load_cert_chain(str(current / "fullchain.pem"), str(current / "key.pem"))
    with httpx.Client(verify=context, timeout=10) as client:
        return client.post(
            f"{est_url}/simplereenroll",
            content=base64.encodebytes(csr.public_bytes(Encoding.DER)),
            headers={"Content-Type": "application/pkcs10"},
        )


def revoke_on_a_seen_by_b(
    api: httpx.Client, a: Node, b: Node, agent: Agent, est_url: str, *, deadline: float
) -> bool:
    """Revoke ``agent``'s current certificate through A; B refuses it and lists it."""
    cert = agent.current()
    serial = serial_hex(cert.serial_number)
    before = {node.name: crl_number(fetch_crl(node)) for node in (a, b)}
    say("crl", "before: " + ", ".join(f"{name} CRL number {n}" for name, n in before.items()))
    response = api.post(
        f"{a.server.origin}/api/v1/certificates/{serial}/revoke",
        json={"reason": "keyCompromise"},
    )
    response.raise_for_status()
    revoked_at = time.monotonic()
    say(
        "operator",
        f"POST {a.name} /api/v1/certificates/{serial}/revoke (keyCompromise): "
        f"{response.status_code}, status {response.json()['status']}",
    )
    refused = probe_reenroll(agent, b, est_url)
    code = refused.headers.get("Estkit-Refusal-Code", "none")
    say(
        "probe",
        f"POST {b.name} simplereenroll with {agent.device_id}'s current certificate: "
        f"HTTP {refused.status_code}, Estkit-Refusal-Code: {code} ({refused.text.strip()!r})",
    )
    ok = refused.status_code == 403 and code == "revoked"
    for node in (b, a):
        while True:
            crl = fetch_crl(node)
            listed = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
            if listed is not None or time.monotonic() > min(deadline, revoked_at + 10):
                break
            time.sleep(0.1)
        after = time.monotonic() - revoked_at
        if listed is None:
            say(
                "crl",
                f"{node.name} {node.crl}: serial {short(serial)} NOT listed after {after:.1f} s",
            )
            return False
        say(
            "crl",
            f"{node.name} {node.crl}: CRL number {before[node.name]} → {crl_number(crl)}, "
            f"lists {serial} (revoked {listed.revocation_date_utc:%H:%M:%S} UTC), "
            f"{after:.1f} s after the revocation on {a.name}",
        )
        ok = ok and crl_number(crl) > before[node.name] and after <= CRL_WITHIN
    return ok


def fleet(
    a: Node, b: Node, agents: list[Agent], workdir: Path, *, validity: int, deadline: float
) -> int:
    """The timeline from the two nodes' start to agent 2's refusal; 0 when all went as told.
    Started agents are added to ``agents`` (the caller stops them)."""
    for node in (a, b):
        node.server.start()
        say(node.name, f"{node.region}: EST {node.server.url}, CRLs {node.server.crl_url}")
    token = a.server.cli(
        "token", "create", "--name", "fleet-operator", "--scope", "admin"
    ).stdout.strip()
    say("operator", f"estkit token create --name fleet-operator --scope admin (on {a.name})")
    context = ssl.create_default_context(cafile=str(a.server.root_pem))
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(verify=context, headers=headers, timeout=10) as api:
        urls = show_fleet(api, a, b)
        for number, node in enumerate((a, b), start=1):
            agents.append(start_agent(node, urls[node.region], number, workdir))
        one, two = agents

        def renewed_through_each_node() -> bool:
            for agent in agents:
                if agent.exit_status() is not None:
                    raise DemoFailed(f"{agent.name} exited {agent.exit_status()} early")
            return all(agent.reenrollments() >= 1 for agent in agents)

        say("demo", f"waiting for a renewal through each node (~{validity * 0.8:.0f} s)")
        wait_for("a renewal through each node", renewed_through_each_node, deadline=deadline)
        say("demo", f"renewed through {a.name} and through {b.name}")
        if not revoke_on_a_seen_by_b(api, a, b, two, urls[b.region], deadline=deadline):
            say("demo", f"{b.name} did not honour the revocation made on {a.name} in time")
            return 1
    say("demo", f"agent 2 learns it at its next renewal through {b.name}")
    wait_for("agent 2 to stop", lambda: two.exit_status() is not None, deadline=deadline)
    status = two.exit_status()
    meaning = " (refused for good: do not restart)" if status == 77 else ""
    say("demo", f"agent 2 exited with status {status}{meaning}")
    if status != 77 or one.exit_status() is not None:
        return 1
    say("demo", f"agent 1 still running, renewing through {a.name}")
    return 0


def run(workdir: Path, *, validity: int) -> int:
    deadline = _timeline.start + time_allowed(validity)
    say("demo", f"working directory {workdir}")
    with running_cluster() as cluster, cluster.database() as database_url:
        say("postgres", f"throwaway cluster on 127.0.0.1:{cluster.port} (initdb + pg_ctl)")
        nodes: list[Node] = []
        agents: list[Agent] = []
        try:
            nodes += make_nodes(workdir, database_url, validity)
            a, b = nodes
            return fleet(a, b, agents, workdir, validity=validity, deadline=deadline)
        except (DemoFailed, AssertionError, httpx.HTTPError) as exc:  # AssertionError: tests/
            say("demo", f"failed: {exc}")
            return 1
        finally:
            say("demo", "stopping the agents, the nodes and PostgreSQL")
            for agent in agents:
                agent.stop()
            for node in reversed(nodes):
                stop_node(node)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    parser.add_argument(
        "--validity",
        type=int,
        default=VALIDITY,
        help=f"operational certificate lifetime in seconds (default {VALIDITY}; 10-60)",
    )
    args = parser.parse_args()
    if not 10 <= args.validity <= 60:
        parser.error("--validity: 10-60 seconds")
    # `kill` (or a test's timeout) stops the demo the way Ctrl-C does: everything it
    # started is stopped and its directory removed on the way out.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(143))
    if bin_dir() is None:
        print("demo-fleet: needs PostgreSQL (Debian package 'postgresql')", file=sys.stderr)
        return 1
    return run_in_workdir(
        _timeline,
        lambda workdir: run(workdir, validity=args.validity),
        prefix="estkit-fleet-",
        keep=args.keep,
    )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
