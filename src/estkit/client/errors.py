"""Errors of the client package: one root, raised at each client's boundary.

ClientError
├── EstError                   the EST client
│   ├── EstConnectionError     transport or TLS failure (``url``; ``__cause__`` is the httpx error)
│   │   └── EstCircuitOpen     not tried: the server kept failing (``retry_after`` s to the trial)
│   ├── EstHttpError           an error status (``status``, ``reason``, ``code``, ``retry_after``)
│   │   ├── EstAuthError       401 / 403: credentials missing, refused, revoked, or not allowed
│   │   └── EstNotFoundError   404: wrong URL, label, or operation not offered
│   ├── EstProtocolError       a success answer that is not what EST says (media type, body)
│   │   └── IssuedCertificateError  the issued certificate fails the device's own checks
│   ├── TrustAnchorError       trust anchor unusable, or no /cacerts certificate has the fingerprint
│   ├── CredentialError        client certificate or key files unusable
│   └── EnrollmentPending      202 and the Retry-After would pass the deadline (``retry_after``)
└── ApiError                   the provisioning (REST API) client
    ├── ApiConnectionError     transport or TLS failure, after the retries
    │   └── ApiCircuitOpen     not tried: the server kept failing (``retry_after`` s to the trial)
    ├── ApiHttpError           an error status (``status``, ``detail``, ``code``)
    └── ApiAnswerError         a success answer whose body or certificate is not usable

``code`` is the server's refusal code (``revoked``, ``expired``, …; None from a
server that sends none): act on it, never on the wording of the reason.
"""

from __future__ import annotations

from http import HTTPStatus

# The server's text/plain reasons are shown to people, so keep them to one short line.
REASON_LIMIT = 200
# Where an estkit EST server puts the refusal code beside its one-line reason.
CODE_HEADER = "Estkit-Refusal-Code"
# The reason of an answer without a body (estkit's EST 401).
REASON_HEADER = "Estkit-Refusal-Reason"


class ClientError(Exception):
    """Root of the client package's errors."""


class EstError(ClientError):
    """Root of the EST client's errors."""


class EstConnectionError(EstError):
    """The server could not be reached, or TLS failed (see ``__cause__``)."""

    def __init__(self, url: str, detail: str) -> None:
        super().__init__(f"{url}: {detail}")
        self.url = url
        self.detail = detail


class EstCircuitOpen(EstConnectionError):
    """The server failed too often lately: nothing was sent; the next trial is allowed
    in ``retry_after`` seconds."""

    def __init__(self, url: str, detail: str, retry_after: float) -> None:
        super().__init__(url, detail)
        self.retry_after = retry_after


class EstHttpError(EstError):
    """The server answered with an error status; ``reason`` is its one-line text/plain
    explanation (empty when it gave none), ``code`` its refusal code (None when it sent none);
    ``hint``, the client's own note on what went wrong, is only shown in the message."""

    def __init__(
        self,
        *,
        method: str,
        url: str,
        status: int,
        reason: str,
        code: str | None = None,
        retry_after: float | None = None,
        hint: str = "",
    ) -> None:
        suffix = f": {reason}" if reason else ""
        suffix += f" ({hint})" if hint else ""
        super().__init__(f"{method} {url}: HTTP {status} {_phrase(status)}{suffix}")
        self.method = method
        self.url = url
        self.status = status
        self.reason = reason
        self.code = code
        self.retry_after = retry_after


class EstAuthError(EstHttpError):
    """401 or 403."""


class EstNotFoundError(EstHttpError):
    """404."""


class EstProtocolError(EstError):
    """A response that does not follow RFC 7030 (media type, encoding, content)."""


class IssuedCertificateError(EstProtocolError):
    """The returned certificate is not one this device can use (key, name, chain, dates)."""


class TrustAnchorError(EstError):
    """The trust anchor cannot be loaded, or the fingerprint matched no CA certificate."""


class CredentialError(EstError):
    """The client certificate or its key cannot be loaded."""


class EnrollmentPending(EstError):
    """The server keeps answering 202; ask again after ``retry_after`` seconds (RFC 7030 4.2.3)."""

    def __init__(self, url: str, retry_after: float) -> None:
        super().__init__(f"{url}: enrollment pending, retry after {retry_after:g} s")
        self.url = url
        self.retry_after = retry_after


class ApiError(ClientError):
    """Root of the provisioning API client's errors; ``str`` is one line."""


class ApiConnectionError(ApiError):
    """The API could not be reached, or TLS failed."""


class ApiCircuitOpen(ApiConnectionError):
    """The API failed too often lately: nothing was sent; the next trial is allowed
    in ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ApiHttpError(ApiError):
    """The API answered with an error status: ``detail`` is its one-line reason, ``code``
    its refusal code (RFC 9457 problem details; None from a server that sends none)."""

    def __init__(self, status: int, detail: str, code: str | None = None) -> None:
        super().__init__(f"HTTP {status} {_phrase(status)}" + (f": {detail}" if detail else ""))
        self.status = status
        self.detail = detail
        self.code = code


class ApiAnswerError(ApiError):
    """A success answer that is not what the API promises, or a certificate that fails checks."""


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "error"


def one_line(text: str, limit: int = REASON_LIMIT) -> str:
    """``text`` as one printable line of at most ``limit`` characters."""
    flat = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
