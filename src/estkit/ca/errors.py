"""The authority's decisions in codes: one exception, ``Refusal(code, reason)``.

``Code`` is the contract: a small, stable set that servers put on the wire
(EST: a response header beside the one-line reason; the REST API: RFC 9457
problem details) and that clients and the agent act on. The reason is for
people and may be reworded at any time; a code never changes meaning.

CaError
└── Refusal        ``code`` (``Code``), a one-line ``reason``, ``retry_after`` seconds or None
    ├── SignerUnavailable   ``unavailable``: a CA key's token cannot sign right now
    └── StoreUnavailable    ``unavailable``: the database cannot take the request now

``server/errors.py`` is the one place that maps a code to an HTTP status.
"""

from __future__ import annotations

from enum import StrEnum


class Code(StrEnum):
    """Why a request was not granted (or not yet)."""

    # The request itself.
    BAD_CSR = "bad-csr"  # not a CSR, bad signature, CA:TRUE asked for
    KEY_NOT_PERMITTED = "key-not-permitted"  # key type or size outside policy
    BAD_REQUEST = "bad-request"  # other malformed input (device id, serial, reason, ...)
    # Who is asking.
    AUTHENTICATION_REQUIRED = "authentication-required"  # no credentials where needed
    SECRET_INVALID = "secret-invalid"  # noqa: S105 - wrong, used or expired enrollment secret
    TOKEN_INVALID = "token-invalid"  # noqa: S105 - API token or OIDC token not valid
    CERTIFICATE_REQUIRED = "certificate-required"  # only a client certificate will do here
    UNKNOWN_CERTIFICATE = "unknown-certificate"  # client certificate not issued here
    WRONG_CA = "wrong-ca"  # issued here, but by a CA not accepted for this
    EXPIRED = "expired"  # client certificate expired
    NOT_YET_VALID = "not-yet-valid"  # client certificate not yet valid
    REVOKED = "revoked"  # client certificate (or the one an approval issued) revoked
    # The device's lifecycle.
    NOT_REGISTERED = "not-registered"
    DISABLED = "disabled"
    DECOMMISSIONED = "decommissioned"
    # What is asked for.
    NAME_MISMATCH = "name-mismatch"  # CSR CN is not the authenticated device id
    SUBJECT_CHANGED = "subject-changed"  # renewal CSR's Subject or SAN differs
    SAN_NOT_PERMITTED = "san-not-permitted"  # SAN type, name or count outside policy
    # The subject or a SAN is outside the nameConstraints of the issuing CA's chain.
    NAME_CONSTRAINTS = "name-constraints"
    # The CSR's challengePassword is not this TLS connection's channel binding (RFC 7030 3.5).
    CHANNEL_BINDING_MISMATCH = "channel-binding-mismatch"
    SCOPE_MISSING = "scope-missing"  # API caller lacks the scope
    APPROVAL_PENDING = "approval-pending"  # waiting for an operator (202)
    APPROVAL_DENIED = "approval-denied"
    # State of the service.
    NOT_FOUND = "not-found"  # unknown label, device, certificate, token, request
    CONFLICT = "conflict"  # state does not allow it (exists, already revoked, ...)
    RATE_LIMITED = "rate-limited"  # too many attempts; retry after
    UNAVAILABLE = "unavailable"  # storage full, read-only or locked, or busy; retry after


# A device should not retry a refusal with these codes with the same credentials:
# the answer will not change until an operator acts.
FINAL = frozenset({Code.REVOKED, Code.DECOMMISSIONED})


class CaError(Exception):
    """Root of the ca package's errors."""


class Refusal(CaError):
    """A decision not to grant a request: a stable ``code`` and a one-line ``reason``."""

    def __init__(self, code: Code, reason: str, *, retry_after: int | None = None) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return f"Refusal({self.code.value!r}, {self.reason!r})"


# How long a client should wait when a CA's token cannot sign: a token put back, an HSM
# failing over or a network HSM reconnecting takes seconds, not minutes.
SIGNER_RETRY_AFTER = 10


class SignerUnavailable(Refusal):
    """A CA's key cannot sign now (its PKCS#11 token was removed, lost its session, or
    failed); nothing was issued. Raised by the key itself, so every signature (certificate,
    CRL) refuses the same way; ``cause`` is for the operator's log, never for the client."""

    def __init__(self, ca: str, cause: str) -> None:
        super().__init__(
            Code.UNAVAILABLE,
            f"the signing key of CA {ca} is unavailable; retry later",
            retry_after=SIGNER_RETRY_AFTER,
        )
        self.ca = ca
        self.cause = cause


class StoreUnavailable(Refusal):
    """The database cannot take the request now (``store.errors.Unavailable``: disk full,
    read-only, locked, connection lost); nothing was written. Its own class so that the
    server can count database errors apart from other ``unavailable`` refusals."""
