"""Decisions the authority returns as exceptions; ``server/`` maps each to one HTTP status.

CaError
├── BadRequest        malformed input (not a CSR, bad signature, bad key type)   → 400
├── Unauthenticated   no or wrong credentials                                      → 401
├── Forbidden         authenticated, but the policy refuses                        → 403
├── NotFound          unknown label, device or certificate                         → 404
├── Conflict          state does not allow it (already revoked, device exists)     → 409
└── Pending           accepted, waiting for approval; retry after N seconds       → 202
"""

from __future__ import annotations


class CaError(Exception):
    """Root of the ca package's errors; the message is a one-line reason for the client."""


class BadRequest(CaError):
    pass


class Unauthenticated(CaError):
    pass


class Forbidden(CaError):
    pass


class NotFound(CaError):
    pass


class Conflict(CaError):
    pass


class Pending(CaError):
    def __init__(self, reason: str, *, retry_after: int) -> None:
        super().__init__(reason)
        self.retry_after = retry_after
