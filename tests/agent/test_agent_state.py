"""The state directory: versions written completely, ``current`` moved atomically, and
repair of whatever an interruption leaves behind."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from agentca import DeviceCa

from estkit.agent.state import PAUSE_STEPS, StateDirectory
from estkit.pki.keys import generate_key, key_to_pem


def test_install_then_activate_writes_a_complete_private_version(
    state: StateDirectory, device_ca: DeviceCa
) -> None:
    version = device_ca.install(state)
    assert state.current() is None  # written, not yet current
    state.activate(version)
    current = state.current()
    assert current is not None and current.number == 1
    assert current.certificate == version.certificate
    assert current.chain == (device_ca.issuing,)
    assert os.readlink(state.current_link) == "archive/1"
    assert sorted(os.listdir(version.path)) == ["cert.pem", "chain.pem", "fullchain.pem", "key.pem"]
    assert stat.S_IMODE(version.key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(version.cert_path.stat().st_mode) == 0o644
    for directory in (state.root, state.archive, version.path):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert [n for n in os.listdir(state.root) if n.startswith(".")] == []


def test_each_install_is_a_new_number_and_the_swap_is_one_rename(
    state: StateDirectory, device_ca: DeviceCa
) -> None:
    first = device_ca.install(state)
    state.activate(first)
    inode_before = os.lstat(state.current_link).st_ino
    second = device_ca.install(state)
    assert second.number == 2
    state.activate(second)
    assert os.lstat(state.current_link).st_ino != inode_before  # replaced, not edited
    assert state.current_number() == 2


def test_pause_hook_is_called_at_each_step_in_order(tmp_path: Path, device_ca: DeviceCa) -> None:
    reached: list[str] = []
    state = StateDirectory(tmp_path / "s", pause=reached.append)
    version = device_ca.install(state)
    state.activate(version)
    state.prune(confirmed=version.number)
    assert tuple(reached) == PAUSE_STEPS


def _corrupt_key(state: StateDirectory, number: int) -> None:
    key_path = state.archive / str(number) / "key.pem"
    key_path.write_bytes(key_to_pem(generate_key("ec-p256")))


@pytest.mark.parametrize(
    ("damage", "expected_current", "relinked", "rolled_forward"),
    [
        ("none", 2, False, False),
        ("half-written-new-version", 2, False, False),
        ("temporary-link-left", 2, False, False),
        ("current-missing", 2, True, False),
        ("current-dangling", 2, True, False),
        ("current-names-garbage", 2, True, False),
        ("current-version-key-mismatch", 1, True, False),
        ("current-version-file-missing", 1, True, False),
        ("newer-version-not-swapped-in", 3, False, True),
        ("current-is-a-directory", 2, True, False),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_repair_points_current_at_the_newest_valid_version(
    state: StateDirectory,
    device_ca: DeviceCa,
    damage: str,
    expected_current: int,
    relinked: bool,
    rolled_forward: bool,
) -> None:
    state.activate(device_ca.install(state))
    state.activate(device_ca.install(state))
    if damage == "half-written-new-version":
        half = state.archive / ".new-3-abcd"
        half.mkdir()
        (half / "key.pem").write_bytes(b"-----BEGIN PRIV")
    elif damage == "temporary-link-left":
        os.symlink("archive/1", state.root / ".current.1234.tmp")
    elif damage == "current-missing":
        state.current_link.unlink()
    elif damage == "current-dangling":
        state.current_link.unlink()
        os.symlink("archive/7", state.current_link)
    elif damage == "current-names-garbage":
        state.current_link.unlink()
        os.symlink("/etc", state.current_link)
    elif damage == "current-version-key-mismatch":
        _corrupt_key(state, 2)
    elif damage == "current-version-file-missing":
        (state.archive / "2" / "chain.pem").unlink()
    elif damage == "newer-version-not-swapped-in":
        device_ca.install(state)  # crash after writing version 3, before the swap
    elif damage == "current-is-a-directory":
        state.current_link.unlink()
        state.current_link.mkdir()

    report = state.repair()

    assert report.current is not None and report.current.number == expected_current
    assert (report.relinked, report.rolled_forward) == (relinked, rolled_forward)
    current = state.current()
    assert current is not None and current.number == expected_current
    assert [n for n in os.listdir(state.archive) if not n.isdigit()] == []
    assert [n for n in os.listdir(state.root) if n.startswith(".")] == []
    # Invalid versions are gone; valid ones stay.
    assert all(state.load(n) for n in state.numbers())


def test_repair_with_nothing_valid_leaves_no_current(
    state: StateDirectory, device_ca: DeviceCa
) -> None:
    state.activate(device_ca.install(state))
    _corrupt_key(state, 1)
    report = state.repair()
    assert report.current is None and report.relinked
    assert not state.current_link.is_symlink()
    assert state.numbers() == []


def test_repair_of_an_empty_or_missing_directory_creates_it_private(tmp_path: Path) -> None:
    state = StateDirectory(tmp_path / "new" / "state")
    assert state.repair().current is None
    assert stat.S_IMODE(state.root.stat().st_mode) == 0o700


def test_repair_tightens_key_and_directory_modes(
    state: StateDirectory, device_ca: DeviceCa
) -> None:
    version = device_ca.install(state)
    state.activate(version)
    version.key_path.chmod(0o644)
    version.path.chmod(0o755)
    state.root.chmod(0o755)
    state.repair()
    assert stat.S_IMODE(version.key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(version.path.stat().st_mode) == 0o700
    assert stat.S_IMODE(state.root.stat().st_mode) == 0o700


def test_prune_keeps_the_confirmed_version_and_the_one_before(
    state: StateDirectory, device_ca: DeviceCa
) -> None:
    for _ in range(4):
        state.activate(device_ca.install(state))
    assert state.prune(confirmed=4) == [1, 2]
    assert state.numbers() == [3, 4]
    # Nothing older than the confirmed one's predecessor, and never current.
    assert state.prune(confirmed=4) == []
    state.activate(device_ca.install(state))
    assert state.prune(confirmed=4) == []  # 5 is current but not yet confirmed: keep 3 and 4
    assert state.numbers() == [3, 4, 5]


def test_load_rejects_a_version_whose_fullchain_disagrees(
    state: StateDirectory, device_ca: DeviceCa
) -> None:
    version = device_ca.install(state)
    version.fullchain_path.write_bytes(version.chain_path.read_bytes())
    with pytest.raises(Exception, match=r"fullchain\.pem is not cert\.pem"):
        state.load(version.number)


def test_swap_lock_excludes_a_second_holder(state: StateDirectory) -> None:
    from estkit.agent.errors import StateError

    with state.swap_lock(), pytest.raises(StateError, match="kept the state lock"):  # noqa: SIM117
        with state.swap_lock(timeout=0.2):
            pass


def test_a_second_daemon_is_refused(state: StateDirectory) -> None:
    from estkit.agent.errors import AlreadyRunning

    fd = state.hold_instance()
    try:
        # flock locks belong to the open file description: a second open conflicts.
        with pytest.raises(AlreadyRunning, match=str(os.getpid())):
            state.hold_instance()
    finally:
        os.close(fd)
    os.close(state.hold_instance())
