"""Store errors, raised by the store alone; ``ca/`` translates them once.

StoreError
├── NotFound         no such row
├── Conflict         a row that must be unique exists, or a compare-and-set lost
│   ├── SecretUsed       the one-time enrollment secret was consumed meanwhile
│   └── NotApproved      the approved request was decided otherwise meanwhile
├── Unavailable      the database cannot take the request now: disk full, read-only,
│                    locked, I/O error, connection lost (nothing was written)
└── SchemaError      the database schema is not at the version this code expects
"""


class StoreError(Exception):
    """Root of the store package's errors."""


class NotFound(StoreError):
    pass


class Conflict(StoreError):
    pass


class SecretUsed(Conflict):
    pass


class NotApproved(Conflict):
    pass


class Unavailable(StoreError):
    """Transient from the caller's view: retry later; the operator must act (disk, locks)."""


class SchemaError(StoreError):
    pass
