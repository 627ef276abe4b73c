"""The store backends the tests run on, and marks that pick one of them.

``database_url`` (tests/conftest.py) is parametrized over ``BACKENDS``, and so is
every fixture built on it (``store``, ``authority``). A test that needs one backend
only says so with a mark, and the reason in its docstring.
"""

from __future__ import annotations

import pytest

BACKENDS = ("sqlite", "postgresql")

# For tests of SQLite itself: its DB-API fast path, its PRAGMAs.
sqlite_only = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
postgresql_only = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
