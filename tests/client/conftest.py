"""Fixtures for the client tests (helpers live in client_fakes.py)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

try:
    import estkit  # noqa: F401
except ModuleNotFoundError:  # not installed: run from the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from client_fakes import FakeClock, Pki, Server, make_ca


@pytest.fixture(scope="session")
def ca() -> Pki:
    return make_ca()


@pytest.fixture(scope="session")
def other_ca() -> Pki:
    return make_ca("Other Root")


@pytest.fixture
def server() -> Server:
    return Server()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def transport(server: Server) -> Iterator[httpx.MockTransport]:
    yield httpx.MockTransport(server)
