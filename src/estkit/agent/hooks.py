"""Commands run after a successful swap, told about the new files through the environment.

    ESTKIT_DEVICE_ID  ESTKIT_SERIAL  ESTKIT_VERSION  ESTKIT_NOT_AFTER
    ESTKIT_CERT  ESTKIT_KEY  ESTKIT_CHAIN  ESTKIT_FULLCHAIN   (paths under state_dir/current/)

No shell is involved; a command that fails, cannot start or outlives its
timeout is logged and the agent carries on: the new certificate is in
place whatever a hook does.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from estkit.agent.state import Version

log = logging.getLogger(__name__)
OUTPUT_LIMIT = 400


@dataclass(frozen=True, slots=True)
class HookResult:
    command: tuple[str, ...]
    ok: bool
    detail: str


def hook_environment(*, device_id: str, version: Version, current_dir: Path) -> dict[str, str]:
    """The variables a hook gets, naming the stable ``current/`` paths."""
    return {
        "ESTKIT_DEVICE_ID": device_id,
        "ESTKIT_SERIAL": version.serial,
        "ESTKIT_VERSION": str(version.number),
        "ESTKIT_NOT_AFTER": version.not_after.isoformat(),
        "ESTKIT_CERT": str(current_dir / "cert.pem"),
        "ESTKIT_KEY": str(current_dir / "key.pem"),
        "ESTKIT_CHAIN": str(current_dir / "chain.pem"),
        "ESTKIT_FULLCHAIN": str(current_dir / "fullchain.pem"),
    }


def run_hooks(
    commands: Sequence[tuple[str, ...]], *, env: dict[str, str], timeout: float
) -> list[HookResult]:
    """Run each command in turn; never raises for a failing command."""
    results = []
    for command in commands:
        result = _run(command, env=env, timeout=timeout)
        if result.ok:
            log.info("hook %s: ok", command[0])
        else:
            log.error("hook %s failed: %s", command[0], result.detail)
        results.append(result)
    return results


def _run(command: tuple[str, ...], *, env: dict[str, str], timeout: float) -> HookResult:
    try:
        proc = subprocess.run(
            command,
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return HookResult(command, False, f"killed after {timeout:g} s")
    except OSError as exc:
        return HookResult(command, False, f"cannot run: {exc.strerror or exc}")
    if proc.returncode != 0:
        output = (proc.stderr or proc.stdout).decode("utf-8", "replace").strip()
        tail = " ".join(output.split())[-OUTPUT_LIMIT:]
        return HookResult(command, False, f"exit status {proc.returncode}: {tail}".rstrip(": "))
    return HookResult(command, True, "")
