"""A device-only install (``pip install estkit``, no ``[server]`` extra).

Server commands say in one line what to install and exit 69; the device's
commands work as ever. The install is simulated by a meta-path finder that
refuses the server extra's modules, in a fresh interpreter.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

# The server extra's modules (pyproject.toml), refused as if not installed.
BLOCKED = ("sqlalchemy", "alembic", "fastapi", "starlette", "uvicorn", "OpenSSL", "jwt")

DEVICE_ONLY = f"""
import sys

class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, NotInstalled())
sys.argv[0] = "estkit"
from estkit.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def device_only(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", DEVICE_ONLY, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    "args",
    [
        ("server", "init"),
        ("server", "run"),
        ("server", "info"),
        ("ca", "list"),
        ("ca", "chain"),
        ("ca", "iothub-verify", "--code", "ABC", "--out", "verify.pem"),
        ("device", "add", "dev-1"),
        ("device", "bootstrap", "dev-1", "--out", "boot"),
        ("device", "disable", "dev-1"),
        ("cert", "revoke", "ABCDEF"),
        ("token", "list"),
        ("token", "create", "--name", "line-1", "--scope", "provision"),
        ("audit", "verify"),
        ("pending", "list"),
        ("pending", "approve", "1"),
    ],
    ids=lambda args: "fail/" + "-".join(args[:2]),
)
def test_server_commands_say_what_to_install(tmp_path: Path, args: tuple[str, ...]) -> None:
    data_dir = tmp_path / "data"
    group, action, *rest = args
    proc = device_only(group, action, "--data-dir", data_dir, *rest)
    assert proc.returncode == 69, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"estkit: estkit {group} {action} needs the server side")
    assert proc.stderr.rstrip().endswith("pip install 'estkit[server]'")
    assert not data_dir.exists()  # refused before touching anything


def test_help_and_client_commands_still_work() -> None:
    assert "server" in device_only("--help").stdout
    proc = device_only("enroll", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "--device-id" in proc.stdout


def test_the_agent_still_runs_its_own_checks(tmp_path: Path) -> None:
    proc = device_only("agent", "status", "--config", tmp_path / "agent.toml")
    assert proc.returncode not in (0, 69)
    assert "Traceback" not in proc.stderr and "estkit[server]" not in proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr


def test_the_simulation_really_blocks_the_server_side() -> None:
    probe = DEVICE_ONLY.replace(
        "from estkit.cli.main import main\nsys.exit(main(sys.argv[1:]))",
        "import sqlalchemy",
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "No module named 'sqlalchemy'" in proc.stderr
