"""The ``estkit`` entry point: every group in the help, only its own group per command."""

from __future__ import annotations

import subprocess
import sys

from estserver import run_estkit


def test_help_lists_every_command_group() -> None:
    out = run_estkit("--help").stdout
    for word in ("cacerts", "enroll", "factory", "server", "device", "token", "agent"):
        assert word in out


def test_a_command_loads_only_its_own_group() -> None:
    """The agent daemon runs for months: its process holds neither server nor factory code."""
    probe = (
        "import sys\n"
        "from estkit.cli import main\n"
        "status = main.main(['agent', 'status', '--config', '/nonexistent/agent.toml'])\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('estkit.cli.') and 'cmds' in m)\n"
        "print(status, ' '.join(loaded))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    status, loaded = proc.stdout.split(maxsplit=1)
    assert status != "0"  # no such config: a refusal, one line on stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert loaded.split() == ["estkit.cli.agent_cmds"]


def test_an_unknown_command_is_named_in_the_error_and_exits_non_zero() -> None:
    proc = run_estkit("nosuchcommand", check=False)
    assert proc.returncode != 0
    assert "nosuchcommand" in proc.stderr
