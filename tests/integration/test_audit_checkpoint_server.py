"""The server appends a signed checkpoint of the audit log's head to ``[audit]
checkpoint_file`` at start and every ``checkpoint_interval``, and they verify."""

from __future__ import annotations

import json
import time
from pathlib import Path

from estserver import EstServer, run_estkit, set_config


def checkpoints(path: Path) -> list[dict[str, object]]:
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text.splitlines()]


def wait_for(path: Path, *, count: int, timeout: float = 20) -> list[dict[str, object]]:
    """The checkpoints of ``path`` once there are ``count`` (bounded wait)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(found := checkpoints(path)) >= count:
            return found
        time.sleep(0.2)
    raise AssertionError(f"{path}: {len(checkpoints(path))} checkpoints after {timeout} s")


def test_the_server_checkpoints_the_audit_log_periodically(
    fresh_server: EstServer, tmp_path: Path
) -> None:
    out = tmp_path / "elsewhere" / "checkpoints.jsonl"
    out.parent.mkdir()
    set_config(fresh_server.data_dir, "audit", "checkpoint_file", json.dumps(str(out)))
    set_config(fresh_server.data_dir, "audit", "checkpoint_interval", '"1s"')
    fresh_server.start()
    first = wait_for(out, count=1)[0]  # written before the server listens
    fresh_server.cli("device", "add", "dev-checkpointed")  # one more entry

    found = wait_for(out, count=3)
    newest = wait_for(out, count=len(found) + 1)[-1]

    assert first["count"] == first["last_id"]
    assert newest["count"] == newest["last_id"] == int(str(first["last_id"])) + 1
    assert {cp["node"] for cp in found} == {first["node"]}
    public_key = tmp_path / "elsewhere" / "audit-key.pem"
    public_key.write_text(fresh_server.cli("audit", "public-key").stdout)
    fresh_server.stop()
    key = (fresh_server.data_dir / "audit" / "checkpoint.key").read_text()
    assert key.splitlines()[1] not in fresh_server.log()  # the key is never logged
    proc = run_estkit(
        "audit", "verify", "--data-dir", fresh_server.data_dir, "--checkpoints", out,
        "--public-key", public_key,
    )  # fmt: skip
    assert proc.stdout.startswith(f"audit log: {newest['count']} entries, hash chain intact, holds")


def test_a_checkpoint_file_that_cannot_be_written_stops_the_start(
    fresh_server: EstServer, tmp_path: Path
) -> None:
    out = tmp_path / "no-such-directory" / "checkpoints.jsonl"
    set_config(fresh_server.data_dir, "audit", "checkpoint_file", json.dumps(str(out)))

    proc = run_estkit("server", "run", "--data-dir", fresh_server.data_dir, check=False, timeout=60)

    assert proc.returncode == 78
    assert proc.stderr.splitlines()[-1] == (
        f"estkit: audit.checkpoint_file: cannot append to {out}: [Errno 2] No such file or "
        f"directory: '{out}'"
    )
