"""Fixtures for the client tests (helpers live in client_fakes.py)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
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
