"""Errors of the EST client: one root, raised at the client's boundary.

EstError
├── EstConnectionError     transport or TLS failure (``url``; ``__cause__`` is the httpx error)
├── EstHttpError           an error status (``status``, ``reason``, ``retry_after``)
│   ├── EstAuthError       401 / 403: credentials missing, refused, revoked, or not allowed
│   └── EstNotFoundError   404: wrong URL, label, or operation not offered
├── EstProtocolError       a success answer that is not what EST says (media type, body)
│   └── IssuedCertificateError  the issued certificate fails the device's own checks
├── TrustAnchorError       trust anchor unusable, or no /cacerts certificate has the fingerprint
├── CredentialError        client certificate or key files unusable
└── EnrollmentPending      202 and the Retry-After would pass the deadline (``retry_after``)
"""

from __future__ import annotations

from http import HTTPStatus

# The server's text/plain reasons are shown to people, so keep them to one short line.
REASON_LIMIT = 200


class EstError(Exception):
    """Root of the EST client's errors."""


class EstConnectionError(EstError):
    """The server could not be reached, or TLS failed (see ``__cause__``)."""

    def __init__(self, url: str, detail: str) -> None:
        super().__init__(f"{url}: {detail}")
        self.url = url
        self.detail = detail


class EstHttpError(EstError):
    """The server answered with an error status; ``reason`` is its one-line text/plain
    explanation (empty when it gave none)."""

    def __init__(
        self,
        *,
        method: str,
        url: str,
        status: int,
        reason: str,
        retry_after: float | None = None,
    ) -> None:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "error"
        suffix = f": {reason}" if reason else ""
        super().__init__(f"{method} {url}: HTTP {status} {phrase}{suffix}")
        self.method = method
        self.url = url
        self.status = status
        self.reason = reason
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


def one_line(text: str, limit: int = REASON_LIMIT) -> str:
    """``text`` as one printable line of at most ``limit`` characters."""
    flat = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
