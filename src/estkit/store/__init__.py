"""Persistence behind a narrow interface: one SQL implementation (SQLite by default)."""

from estkit.store.errors import StoreError
from estkit.store.models import (
    AuditEvent,
    CertificateRecord,
    CertStatus,
    Device,
    DeviceStatus,
    EnrollmentSecret,
)
from estkit.store.sql import SqlStore

__all__ = [
    "AuditEvent",
    "CertStatus",
    "CertificateRecord",
    "Device",
    "DeviceStatus",
    "EnrollmentSecret",
    "SqlStore",
    "StoreError",
]
