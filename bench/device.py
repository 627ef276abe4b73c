"""The device side: the estkit agent's idle memory and CPU, and the CPU of one renewal.

The agent is configured from ``deploy/agent.example.toml`` when that file
exists (its renewal settings kept; EST URL, trust anchor, bootstrap files
and state directory pointed at the bench server; no IoT Hub connection and
no hooks, which the bench has no use for), else from the minimal set of keys
the agent's config loader requires.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import time
import tomllib
from pathlib import Path
from typing import Any

from bench import fleet
from bench.procstat import RssSampler, Snapshot

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = REPO / "deploy" / "agent.example.toml"
IDLE_SECONDS = 20.0
START_SECONDS = 5.0
RENEWALS = 5
MB = 1024 * 1024

# Run in a fresh interpreter: one renewal's CPU, without interpreter start and imports.
_RENEW_SNIPPET = """
import datetime as dt, json, resource, sys, time
from pathlib import Path
from estkit.agent import Agent, load_config

def cpu():
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime

agent = Agent(load_config(Path(sys.argv[1])), clock=lambda: dt.datetime.now(dt.UTC))
agent.renew_once(force=True)  # the first enrollment, with the bootstrap certificate
runs = []
for _ in range(int(sys.argv[2])):
    c0, t0 = cpu(), time.perf_counter()
    agent.renew_once(force=True)
    runs.append((cpu() - c0, time.perf_counter() - t0))
u = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"runs": runs, "maxrss_kb": u.ru_maxrss}))
"""


def available() -> str | None:
    """None when ``estkit agent`` can run here, else why not."""
    try:
        import estkit.agent  # noqa: F401
    except ImportError as exc:
        return f"estkit.agent does not import ({exc})"
    proc = subprocess.run(
        [*fleet.ESTKIT, "agent", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    if proc.returncode != 0:
        return "`estkit agent` is not a command"
    return None


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def to_toml(data: dict[str, Any]) -> str:
    """Top-level keys and one level of tables: all an agent config has."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for name, table in data.items():
        if isinstance(table, dict):
            lines += ["", f"[{name}]"]
            lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def agent_config(server: fleet.Server, device: Path, device_id: str) -> tuple[dict[str, Any], str]:
    if TEMPLATE.exists():
        data: dict[str, Any] = tomllib.loads(TEMPLATE.read_text())
        source = str(TEMPLATE.relative_to(REPO))
    else:
        data = {}
        source = "minimal (deploy/agent.example.toml not found)"
    data.pop("hub", None)
    data.pop("hooks", None)
    data["device_id"] = device_id
    data["state_dir"] = str(device / "state")
    est = data.setdefault("est", {})
    est.pop("trust_anchor_fingerprint", None)
    est.update(
        url=f"https://localhost:{server.port}/.well-known/est", trust_anchor=str(server.root_pem)
    )
    data["bootstrap"] = {
        **data.get("bootstrap", {}),
        "cert": str(device / "bootstrap" / "cert.pem"),
        "key": str(device / "bootstrap" / "key.pem"),
        "chain": str(device / "bootstrap" / "chain.pem"),
    }
    return data, source


def measure_agent(*, server: fleet.Server, work: Path, python: str) -> dict[str, Any]:
    """One renewal's CPU, then the idle daemon twice: started on a fresh certificate, and
    after it renewed itself (what runs in the field for months).

    ``python`` runs the agent: by default (``make bench``) a virtualenv holding only
    estkit's device dependencies, as on a device; the development environment also
    holds the server and test extras, and httpx then loads its command-line tool
    (click, rich, pygments: ≈ 5 MB) that no device has.
    """
    why = available()
    if why is not None:
        print(f"agent: not available ({why})", flush=True)
        return {"available": False, "reason": why}
    estkit = [python, *fleet.ESTKIT[1:]]
    configs = {}
    for name in ("bench-agent", "bench-agent-self"):
        device = work / name
        fleet.estkit(
            "device",
            "bootstrap",
            "--data-dir",
            server.data_dir,
            name,
            "--out",
            device / "bootstrap",
        )
        data, source = agent_config(server, device, name)
        configs[name] = work / f"{name}.toml"
        configs[name].write_text(to_toml(data))

    # One renewal's CPU, in its own interpreter.
    proc = subprocess.run(
        [python, "-c", _RENEW_SNIPPET, str(configs["bench-agent"]), str(RENEWALS)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"agent: renewal failed ({reason})", flush=True)
        return {"available": True, "config": source, "error": reason}
    renew = json.loads(proc.stdout)
    cpu_ms = statistics.median(c for c, _ in renew["runs"]) * 1000
    wall_ms = statistics.median(w for _, w in renew["runs"]) * 1000
    result: dict[str, Any] = {
        "available": True,
        "config": source,
        "python": python,
        "renewal_cpu_ms": round(cpu_ms, 1),
        "renewal_wall_ms": round(wall_ms, 1),
        "renewals_measured": len(renew["runs"]),
        "idle_seconds": IDLE_SECONDS,
    }
    # "started": its certificate is fresh, so it only waits. "renewed": it starts with the
    # bootstrap certificate only, enrolls at once, then waits.
    for phase, name in (("started", "bench-agent"), ("renewed", "bench-agent-self")):
        idle = _idle_daemon(estkit, configs[name], work / f"{name}.log")
        if "error" in idle:
            print(f"agent: {idle['error']}", flush=True)
            return {**result, "error": idle["error"]}
        result[phase] = idle
    started, renewed = result["started"], result["renewed"]
    print(
        f"agent ({source}, {python}): one renewal {cpu_ms:.0f} ms CPU ({wall_ms:.0f} ms wall); "
        f"idle RSS {started['idle_rss_mb']:.1f} MB after start, {renewed['idle_rss_mb']:.1f} MB "
        f"after renewing itself; idle CPU {renewed['idle_cpu_ms_per_minute']} ms/min",
        flush=True,
    )
    return result


def _idle_daemon(estkit: list[str], config: Path, log_path: Path) -> dict[str, Any]:
    log = log_path.open("ab")
    daemon = subprocess.Popen(
        [*estkit, "agent", "run", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    log.close()
    try:
        time.sleep(START_SECONDS)  # interpreter, imports, state check (and enrollment)
        if daemon.poll() is not None:
            return {"error": f"`estkit agent run` exited {daemon.returncode}; see {log_path}"}
        start = Snapshot.of(daemon.pid)
        with RssSampler(daemon.pid, interval=0.5) as sampler:
            time.sleep(IDLE_SECONDS)
        end = Snapshot.of(daemon.pid)
    finally:
        daemon.terminate()
        try:
            daemon.wait(timeout=20)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(timeout=5)
    return {
        "idle_cpu_ms_per_minute": round((end.cpu - start.cpu) * 1000 * 60 / IDLE_SECONDS, 1),
        "idle_rss_mb": round(statistics.median(r for _, r in sampler.samples) / MB, 1),
        "idle_rss_peak_mb": round(sampler.peak / MB, 1),
    }
