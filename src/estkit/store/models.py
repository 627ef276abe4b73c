"""Values the store reads and writes (immutable)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from enum import StrEnum


class DeviceStatus(StrEnum):
    ACTIVE = "active"
    DISABLED = "disabled"  # temporarily refused; may be enabled again
    DECOMMISSIONED = "decommissioned"  # permanently refused; its certificates are revoked


class CertStatus(StrEnum):
    VALID = "valid"
    REVOKED = "revoked"


@dataclass(frozen=True, slots=True)
class Device:
    device_id: str
    status: DeviceStatus
    created_at: dt.datetime
    updated_at: dt.datetime


@dataclass(frozen=True, slots=True)
class CertificateRecord:
    serial: str  # upper-case hex, as openssl prints it
    device_id: str
    ca: str  # CA name: "devices", "bootstrap", …
    label: str | None  # EST label it was requested through, if any
    profile: str
    subject: str  # RFC 4514 string, for people; the DER is authoritative
    sans: tuple[str, ...]
    not_before: dt.datetime
    not_after: dt.datetime
    status: CertStatus
    requested_via: str  # "est-simpleenroll", "est-simplereenroll", "cli-bootstrap", …
    requested_by: str  # the authenticated actor
    issued_at: dt.datetime
    der: bytes
    revoked_at: dt.datetime | None = None
    revocation_reason: str | None = None
    replaces: str | None = None  # serial of the certificate this one renewed


@dataclass(frozen=True, slots=True)
class EnrollmentSecret:
    id: int
    device_id: str
    secret_hash: bytes
    expires_at: dt.datetime
    used_at: dt.datetime | None


@dataclass(frozen=True, slots=True)
class AuditEvent:
    at: dt.datetime
    actor: str
    action: str  # "enroll", "reenroll", "revoke", "device-add", …
    outcome: str  # "ok" or "refused"
    device_id: str | None = None
    serial: str | None = None
    detail: str = ""
    id: int | None = None
