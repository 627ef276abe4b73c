from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from estkit.store import SqlStore


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlStore]:
    """A migrated SQLite store in ``tmp_path / "estkit.db"``."""
    s = SqlStore.open(f"sqlite:///{tmp_path / 'estkit.db'}")
    s.migrate()
    yield s
    s.close()
