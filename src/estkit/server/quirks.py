"""What real EST clients need on the wire that the RFCs leave open (README, "Interop quirks").

Two decisions, both made per response and costing microseconds:

- **Header names in canonical case.** HTTP field names are case-insensitive
  (RFC 9110 5.1), but Cisco's libest compares ``Content-Type``,
  ``Content-Length`` and ``WWW-Authenticate`` byte for byte, and uvicorn's
  httptools protocol lower-cases every name it writes. ``canonical_head``
  restores the case of a response head as uvicorn wrote it: known names from a
  table, others in Title-Case.
- **Base64 line breaks.** RFC 8951 allows base64 with or without them, yet no
  single form is read by everyone: Debian 12's strongSwan ``pki`` 5.9.8 fails
  on line breaks, while clients built on OpenSSL's base64 BIO (libest;
  ``openssl base64 -d`` without ``-A``) fail on one long line.
  ``base64_line_length`` picks, in this order: the label's explicit
  ``base64_line_length``; one line for a request that looks like strongSwan's
  ``pki``; 64 columns with a final newline for every other client.

How ``pki`` is recognised: its own HTTP code (strongSwan's TLS stack, not
libcurl) sends ``Host`` and, on a POST, ``Authorization`` (with
``--userpass``), ``Content-Type`` and ``Content-Length``: nothing else, no
``User-Agent`` (captured from ``pki --estca`` and ``pki --est`` 5.9.8).
curl, libest, Go's net/http, Java, Python clients and browsers all send a
``User-Agent``, and Bouncy Castle sends ``Connection: close``.
"""

from __future__ import annotations

from collections.abc import Iterable

# Lines this long, LF-terminated with a final newline, for clients that read
# base64 line by line (OpenSSL's BIO reads lines of up to 80 characters).
WRAPPED_LINE_LENGTH = 64
ONE_LINE = 0

# The request header names strongSwan's pki 5.9.8 sends, lower-cased as ASGI has them.
_PKI_HEADERS = frozenset({b"host", b"authorization", b"content-type", b"content-length"})

_CANONICAL: dict[bytes, bytes] = {
    name.lower(): name
    for name in (
        b"Allow",
        b"Cache-Control",
        b"Connection",
        b"Content-Disposition",
        b"Content-Encoding",
        b"Content-Language",
        b"Content-Length",
        b"Content-Location",
        b"Content-Security-Policy",
        b"Content-Transfer-Encoding",
        b"Content-Type",
        b"Date",
        b"ETag",
        b"Estkit-Refusal-Code",
        b"Estkit-Refusal-Reason",
        b"Expires",
        b"Keep-Alive",
        b"Last-Modified",
        b"Location",
        b"Retry-After",
        b"Server",
        b"Set-Cookie",
        b"Strict-Transport-Security",
        b"Transfer-Encoding",
        b"Vary",
        b"WWW-Authenticate",
        b"X-Content-Type-Options",
        b"X-Frame-Options",
    )
}
# Names outside the table are Title-Cased once and remembered (the app's own header
# names: a small, fixed set), up to this many.
_CACHE_LIMIT = 256
_cache: dict[bytes, bytes] = dict(_CANONICAL)


def canonical_name(name: bytes) -> bytes:
    """``name`` as written in the RFCs: ``www-authenticate`` -> ``WWW-Authenticate``;
    names outside the table in Title-Case (``x-request-id`` -> ``X-Request-Id``)."""
    found = _cache.get(name)
    if found is not None:
        return found
    lower = name.lower()
    found = _CANONICAL.get(lower) or b"-".join(part.capitalize() for part in lower.split(b"-"))
    if len(_cache) < _CACHE_LIMIT:
        _cache[name] = found
    return found


def canonical_head(head: bytes) -> bytes:
    """A response head (status line, header lines, blank line) with canonical names.

    Values are left as they are; a line without a colon (the status line, the end)
    is left alone.
    """
    lines = head.split(b"\r\n")
    for i in range(1, len(lines)):
        name, colon, rest = lines[i].partition(b":")
        if colon:
            lines[i] = canonical_name(name) + b":" + rest
    return b"\r\n".join(lines)


def looks_like_strongswan_pki(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether a request's header names (ASGI: lower-case) are exactly what ``pki`` sends."""
    seen_host = False
    for name, _value in headers:
        if name not in _PKI_HEADERS:
            return False
        seen_host = seen_host or name == b"host"
    return seen_host


def base64_line_length(label_setting: int | None, headers: Iterable[tuple[bytes, bytes]]) -> int:
    """The base64 line length of a response body: the label's ``base64_line_length`` when
    the config sets one, else one line for strongSwan's ``pki``, else 64 columns."""
    if label_setting is not None:
        return label_setting
    return ONE_LINE if looks_like_strongswan_pki(headers) else WRAPPED_LINE_LENGTH


__all__ = [
    "ONE_LINE",
    "WRAPPED_LINE_LENGTH",
    "base64_line_length",
    "canonical_head",
    "canonical_name",
    "looks_like_strongswan_pki",
]
