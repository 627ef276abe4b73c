"""Hooks run after a swap with the new files in their environment; failures are reported,
never raised. Also the hub connector's topic encoding (pure)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from agentca import DeviceCa

from estkit.agent.hooks import hook_environment, run_hooks
from estkit.agent.hub import reported_properties, telemetry_topic
from estkit.agent.state import StateDirectory


def test_hook_gets_the_new_files_and_serial(
    state: StateDirectory, device_ca: DeviceCa, tmp_path: Path
) -> None:
    version = device_ca.install(state)
    state.activate(version)
    env = hook_environment(device_id="dev-1", version=version, current_dir=state.current_link)
    out = tmp_path / "env.txt"
    script = (
        'printf "%s\\n" "$ESTKIT_DEVICE_ID" "$ESTKIT_SERIAL" "$ESTKIT_VERSION" '
        f'"$ESTKIT_CERT" "$ESTKIT_KEY" "$ESTKIT_CHAIN" "$ESTKIT_FULLCHAIN" > {out}'
    )
    [result] = run_hooks([("sh", "-c", script)], env=env, timeout=10)
    assert result.ok
    device, serial, number, cert, key, chain, full = out.read_text().split("\n")[:7]
    assert (device, serial, number) == ("dev-1", version.serial, "1")
    current = state.current_link
    assert (cert, key, chain, full) == tuple(
        str(current / n) for n in ("cert.pem", "key.pem", "chain.pem", "fullchain.pem")
    )
    # The stable current/ paths resolve to this version's files.
    assert Path(cert).read_bytes() == version.cert_path.read_bytes()


@pytest.mark.parametrize(
    ("command", "detail"),
    [
        (("sh", "-c", "echo broken >&2; exit 3"), "exit status 3: broken"),
        (("/nonexistent/hook",), "cannot run"),
        (("sleep", "5"), "killed after 0.3 s"),
    ],
    ids=["fail/exit-status", "fail/not-found", "fail/timeout"],
)
def test_failing_hook_is_logged_and_the_next_one_still_runs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, command: tuple[str, ...], detail: str
) -> None:
    marker = tmp_path / "ran"
    with caplog.at_level(logging.INFO, logger="estkit.agent.hooks"):
        results = run_hooks(
            [command, ("touch", str(marker))], env={"ESTKIT_SERIAL": "01"}, timeout=0.3
        )
    assert [r.ok for r in results] == [False, True]
    assert results[0].detail.startswith(detail)
    assert marker.exists()
    assert any(r.levelname == "ERROR" and detail in r.getMessage() for r in caplog.records)


def test_telemetry_topic_carries_url_encoded_properties() -> None:
    topic = telemetry_topic(
        "dev-1", {"$.ct": "application/json", "$.ce": "utf-8", "certSerial": "0A1B"}
    )
    assert topic == (
        "devices/dev-1/messages/events/$.ct=application%2Fjson&$.ce=utf-8&certSerial=0A1B"
    )


def test_reported_properties_carry_the_certificate_validity(
    state: StateDirectory, device_ca: DeviceCa
) -> None:
    version = device_ca.install(state)
    reported = reported_properties(version)["estkit"]["certificate"]
    assert reported["serial"] == version.serial and reported["version"] == 1
    assert reported["notAfter"] == version.not_after.isoformat(timespec="seconds")
