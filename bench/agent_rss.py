"""The agent's idle RSS alone, and where it goes: a quick loop for memory work.

    python -m bench.agent_rss [--seconds 10] [--renew-in-daemon] [--agent-python PY] [--keep DIR]

Sets up what ``bench.device.measure_agent`` does (a real server, a bootstrap
certificate, the agent configured from ``deploy/agent.example.toml`` without
hub or hooks, one forced renewal), then runs ``estkit agent run`` idle and
prints its median RSS, the anonymous/file-backed split and the mappings that
hold the most resident memory. ``bench.run`` stays the measurement of record.

``--renew-in-daemon`` leaves the enrollment to the daemon itself, so the idle
figure is that of a daemon that has renewed (a device in the field), not one
that has only started. ``--agent-python`` runs the agent with another
interpreter, e.g. a virtualenv holding only estkit's device dependencies
(``PYTHONPATH=src`` is set for it).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import device, fleet
from bench.procstat import RssSampler

MB = 1024 * 1024
SRC = Path(__file__).resolve().parent.parent / "src"
START_SECONDS = 5.0  # as measure_agent: interpreter, imports, state check


def _rollup(pid: int) -> dict[str, int]:
    """``/proc/<pid>/smaps_rollup`` in kB."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1])
    return fields


def _mappings(pid: int) -> dict[str, int]:
    """Resident kB per mapped file (``[heap]``, ``[anon]`` for the unnamed ones)."""
    totals: dict[str, int] = {}
    name = "[anon]"
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()
            if not head:
                continue
            if "-" in head[0] and ":" not in head[0]:  # a mapping's header line
                name = head[5] if len(head) > 5 else "[anon]"
            elif head[0] == "Rss:":
                totals[name] = totals.get(name, 0) + int(head[1])
    return totals


def measure(
    work: Path, *, seconds: float, top: int, renew_in_daemon: bool, agent_python: str | None
) -> float:
    server_dir = work / "server"
    port = fleet.free_port()
    fleet.init_server(server_dir, port=port, crl_port=fleet.free_port())
    device_id = "bench-agent"
    agent_dir = work / device_id
    with fleet.Server(server_dir, port=port, workers=1, log=work / "server.log") as server:
        fleet.estkit(
            "device",
            "bootstrap",
            "--data-dir",
            server_dir,
            device_id,
            "--out",
            agent_dir / "bootstrap",
        )
        data, source = device.agent_config(server, agent_dir, device_id)
        config = work / "agent.toml"
        config.write_text(device.to_toml(data))
        if not renew_in_daemon:
            fleet.estkit("agent", "renew", "--force", "--config", config)
        estkit = fleet.ESTKIT if agent_python is None else [agent_python, *fleet.ESTKIT[1:]]
        env = None if agent_python is None else {**os.environ, "PYTHONPATH": str(SRC)}
        log = (work / "agent.log").open("ab")
        daemon = subprocess.Popen(
            [*estkit, "agent", "run", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        log.close()
        try:
            time.sleep(START_SECONDS)
            if daemon.poll() is not None:
                raise RuntimeError(f"agent exited {daemon.returncode}; see {work / 'agent.log'}")
            with RssSampler(daemon.pid, interval=0.5) as sampler:
                time.sleep(seconds)
            rollup = _rollup(daemon.pid)
            mappings = _mappings(daemon.pid)
        finally:
            daemon.terminate()
            try:
                daemon.wait(timeout=20)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait(timeout=5)
    idle = statistics.median(r for _, r in sampler.samples) / MB
    how = "renewed in the daemon" if renew_in_daemon else "renewed by `agent renew`"
    if agent_python is not None:
        how += f", run by {agent_python}"
    print(f"agent ({source}; {how}): idle RSS {idle:.1f} MB over {seconds:g} s")
    print(
        f"  anonymous {rollup.get('Anonymous', 0) / 1024:.1f} MB, file-backed "
        f"{(rollup.get('Rss', 0) - rollup.get('Anonymous', 0)) / 1024:.1f} MB"
    )
    for name, kb in sorted(mappings.items(), key=lambda item: -item[1])[:top]:
        print(f"  {kb / 1024:6.1f} MB  {name}")
    return idle


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=10.0, help="idle time sampled")
    p.add_argument("--top", type=int, default=12, help="mappings listed")
    p.add_argument("--keep", type=Path, default=None, help="work here and keep it")
    p.add_argument(
        "--renew-in-daemon", action="store_true", help="let `agent run` enroll, then idle"
    )
    p.add_argument("--agent-python", default=None, help="interpreter that runs `agent run`")
    args = p.parse_args(argv)
    run = functools.partial(
        measure,
        seconds=args.seconds,
        top=args.top,
        renew_in_daemon=args.renew_in_daemon,
        agent_python=args.agent_python,
    )
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        run(args.keep)
        return 0
    with tempfile.TemporaryDirectory(prefix="agent-rss-") as tmp:
        run(Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
