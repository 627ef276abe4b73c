"""Values the store reads and writes (immutable)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from enum import StrEnum
from typing import Generic, TypeVar

T = TypeVar("T")


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
class PresentedCertificate:
    """What authenticating a client certificate needs of its record and its device."""

    serial: str
    device_id: str
    ca: str
    status: CertStatus
    der: bytes
    device_status: DeviceStatus | None  # None: the device is not registered


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


class PendingStatus(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    ISSUED = "issued"


@dataclass(frozen=True, slots=True)
class PendingRequest:
    """An enrollment waiting for an operator; the device retries with the same CSR."""

    id: int
    label: str
    device_id: str
    csr_sha256: str
    operation: str  # "simpleenroll" or "simplereenroll"
    requested_by: str
    status: PendingStatus
    created_at: dt.datetime
    decided_at: dt.datetime | None = None
    decided_by: str | None = None
    reason: str | None = None
    serial: str | None = None


@dataclass(frozen=True, slots=True)
class ApiToken:
    """An API client; the token itself is never stored, only its SHA-256."""

    id: int
    name: str
    token_hash: str
    scopes: frozenset[str]
    created_at: dt.datetime
    created_by: str
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None
    last_used_at: dt.datetime | None


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a listing; ``next`` is the cursor of the following page, if any."""

    items: tuple[T, ...]
    next: str | None


@dataclass(frozen=True, slots=True)
class Node:
    """A server node as registered by its heartbeat (``nodes`` table)."""

    name: str
    region: str
    public_url: str
    started_at: dt.datetime
    last_seen: dt.datetime
    version: str

    def stale(self, *, now: dt.datetime, after: dt.timedelta) -> bool:
        """No heartbeat for longer than ``after``: the node is probably gone."""
        return now - self.last_seen > after
