"""``[audit]`` in the config, the audit key file and appending to a checkpoint file
(``server/audit_checkpoints.py``), on a real store."""

from __future__ import annotations

import datetime as dt
import re
import stat
import threading
import tomllib
from pathlib import Path
from typing import Any

import pytest

from estkit.server.audit_checkpoints import (
    append_checkpoint,
    load_audit_key,
    load_or_create_audit_key,
)
from estkit.server.config import DEFAULT_CONFIG, ConfigError, parse_config
from estkit.store import AuditEvent, SqlStore
from estkit.store.checkpoints import read_checkpoints

DATA_DIR = Path("/srv/estkit")
T0 = dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.UTC)


def config_with(audit: dict[str, Any]) -> Any:
    data = tomllib.loads(DEFAULT_CONFIG.format(port=7443, public_host="localhost", crl_port=7444))
    return parse_config(data | {"audit": audit}, DATA_DIR)


def test_the_templates_commented_audit_settings_parse() -> None:
    text = DEFAULT_CONFIG.format(port=7443, public_host="localhost", crl_port=7444)
    uncommented = re.sub(r"^# (checkpoint_\w+ = .*)$", r"\1", text, flags=re.M)
    assert uncommented.count("\ncheckpoint_") == 2

    audit = parse_config(tomllib.loads(uncommented.replace("{{", "{")), DATA_DIR).audit

    assert audit.checkpoint_file == Path("/var/log/estkit/audit-checkpoints.jsonl")
    assert audit.checkpoint_interval == dt.timedelta(hours=1)


def test_no_checkpoint_file_by_default_and_relative_paths_are_in_the_data_dir() -> None:
    assert config_with({}).audit.checkpoint_file is None
    relative = config_with({"checkpoint_file": "cp.jsonl", "checkpoint_interval": "90s"}).audit
    assert relative.checkpoint_file == DATA_DIR / "cp.jsonl"
    assert relative.checkpoint_interval == dt.timedelta(seconds=90)


@pytest.mark.parametrize(
    ("audit", "message"),
    [
        ({"checkpoint_interval": "0.5s"}, "audit.checkpoint_interval: at least 1s"),
        ({"checkpoint_interval": "often"}, "audit.checkpoint_interval: expected a duration"),
        ({"checkpoint_file": 7}, "audit.checkpoint_file: expected str, got 7"),
        ({"checkpoint_files": "x"}, "unknown key audit.checkpoint_files (did you mean"),
    ],
    ids=[
        "fail/interval-too-short",
        "fail/interval-not-a-duration",
        "fail/file-not-text",
        "fail/typo",
    ],
)
def test_bad_audit_settings_are_refused_naming_the_field(
    audit: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_with(audit)


def test_the_audit_key_is_made_once_0600_in_a_0700_directory(tmp_path: Path) -> None:
    key, created = load_or_create_audit_key(tmp_path)
    again, created_again = load_or_create_audit_key(tmp_path)

    path = tmp_path / "audit" / "checkpoint.key"
    assert (created, created_again) == (True, False)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert again.private_bytes_raw() == key.private_bytes_raw()
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.key"]


def test_processes_starting_together_end_up_with_one_key(tmp_path: Path) -> None:
    keys: list[bytes] = []
    barrier = threading.Barrier(4)

    def make() -> None:
        barrier.wait()
        keys.append(load_or_create_audit_key(tmp_path)[0].private_bytes_raw())

    threads = [threading.Thread(target=make) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)

    assert len(keys) == 4 and len(set(keys)) == 1


def test_a_file_that_is_not_an_ed25519_key_is_named(tmp_path: Path) -> None:
    (tmp_path / "audit").mkdir()
    (tmp_path / "audit" / "checkpoint.key").write_text("not a key\n")

    with pytest.raises(ValueError, match=r"audit/checkpoint\.key: not an Ed25519 private key"):
        load_audit_key(tmp_path)


def test_appending_keeps_every_line_whole_even_after_a_torn_one(
    store: SqlStore, tmp_path: Path
) -> None:
    key, _ = load_or_create_audit_key(tmp_path)
    out = tmp_path / "cp.jsonl"
    store.audit(AuditEvent(at=T0, actor="test", action="device-add", outcome="ok"))
    append_checkpoint(out, store, key, node="eu-1", clock=lambda: T0)
    with out.open("a") as f:
        f.write('{"at":"2026-')  # a write cut off (disk full, power loss)

    cp = append_checkpoint(out, store, key, node="eu-1", clock=lambda: T0)

    lines = out.read_text().splitlines()
    assert len(lines) == 3 and lines[1] == '{"at":"2026-'
    assert (cp.count, cp.last_id) == (1, 1)
    found = read_checkpoints(lines[2], keys=[key.public_key()], source="cp")
    assert found[0].checkpoint == cp
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
