"""Store errors.

StoreError
├── NotFound         no such row
├── Conflict         a row that must be unique exists, or a compare-and-set lost
└── SchemaError      the database schema is not at the version this code expects
"""


class StoreError(Exception):
    """Root of the store package's errors."""


class NotFound(StoreError):
    pass


class Conflict(StoreError):
    pass


class SchemaError(StoreError):
    pass
