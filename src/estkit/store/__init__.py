"""Persistence behind a narrow interface: one SQL implementation (SQLite by default)."""

from estkit.store.errors import StoreError
from estkit.store.models import (
    ApiToken,
    AuditEvent,
    CertificateRecord,
    CertStatus,
    Device,
    DeviceStatus,
    EnrollmentSecret,
    Node,
    Page,
    PendingRequest,
    PendingStatus,
    PresentedCertificate,
)
from estkit.store.sql import SqlStore

__all__ = [
    "ApiToken",
    "AuditEvent",
    "CertStatus",
    "CertificateRecord",
    "Device",
    "DeviceStatus",
    "EnrollmentSecret",
    "Node",
    "Page",
    "PendingRequest",
    "PendingStatus",
    "PresentedCertificate",
    "SqlStore",
    "StoreError",
]
