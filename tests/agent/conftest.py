"""Fixtures for the agent's unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from agentca import DeviceCa, make_device_ca

from estkit.agent.state import StateDirectory


@pytest.fixture(scope="session")
def device_ca() -> DeviceCa:
    return make_device_ca()


@pytest.fixture
def state(tmp_path: Path) -> StateDirectory:
    return StateDirectory(tmp_path / "state")
