"""The provisioning client: the factory's call of the estkit REST API.

    with ProvisioningApi("https://est.example:8443", token=token, trust=anchor) as api:
        answer = api.issue("bootstrap", device_id="dev-1", csr=csr, validity="3650d")

Bearer auth, and the client core (``estkit.client.http``) for timeouts,
retries (connect errors, timeouts, 429/502/503/504, after ``Retry-After``
where given), the body cap and the circuit breaker; a 4xx is never retried. A
retry after a timeout may get a second certificate for the same device:
harmless, the device only ever has the key of the one that was written.
Error answers are RFC 9457 problem details: ``ApiHttpError.detail`` is the
one-line reason, ``ApiHttpError.code`` the refusal code. Errors: see
``estkit.client.errors`` (``ApiError``).
"""

from __future__ import annotations

import datetime as dt
import json
import random
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from estkit.client import tls
from estkit.client.breaker import CircuitBreaker
from estkit.client.errors import (
    ApiAnswerError,
    ApiCircuitOpen,
    ApiConnectionError,
    ApiHttpError,
    one_line,
)
from estkit.client.http import (
    BodyFailure,
    CircuitOpen,
    ConnectionFailure,
    HttpCore,
    RetryPolicy,
)
from estkit.client.trust import TrustAnchor
from estkit.pki import certs
from estkit.pki.errors import PkiError

__all__ = ["IssuedAnswer", "ProvisioningApi", "api_origin", "check_token"]


@dataclass(frozen=True, slots=True)
class IssuedAnswer:
    """The API's 201 body, certificates decoded (not yet checked)."""

    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    serial: str | None


class ProvisioningApi:
    """The factory call of the estkit REST API (see the module docstring)."""

    def __init__(
        self,
        api: str,
        *,
        token: str,
        trust: TrustAnchor | None,
        timeout: float = 20.0,
        total_timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        breaker: CircuitBreaker | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], dt.datetime] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.origin = api_origin(api)
        check_token(token)
        policy = RetryPolicy(
            timeout=timeout,
            total_timeout=total_timeout,
            retries=retries,
            backoff=backoff,
            max_backoff=max_backoff,
        )
        if trust is not None:
            context = tls.verified_context(trust.certificates)
        else:
            context = ssl.create_default_context()  # the system store
            context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._core = HttpCore(
            policy,
            breaker=breaker,
            transport=transport,
            sleep=sleep,
            clock=clock,
            now=now,
            rng=rng,
        )
        self._http = self._core.open_client(
            verify=context,
            headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
        )

    def __enter__(self) -> ProvisioningApi:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def certificates_url(self, label: str) -> str:
        return f"{self.origin}/api/v1/cas/{quote(label, safe='')}/certificates"

    def issue(
        self,
        label: str,
        *,
        device_id: str,
        csr: x509.CertificateSigningRequest,
        validity: str | None = None,
        sans: Sequence[str] = (),
    ) -> IssuedAnswer:
        """``POST /api/v1/cas/{label}/certificates``: the certificate the CA signed for ``csr``."""
        body: dict[str, Any] = {
            "device_id": device_id,
            "csr": csr.public_bytes(Encoding.PEM).decode("ascii"),
        }
        if validity is not None:
            body["validity"] = validity
        if sans:
            body["sans"] = list(sans)
        status, answer = self._post(self.certificates_url(label), body)
        if status != 201:
            raise ApiAnswerError(f"unexpected HTTP {status} (expected 201)")
        return _issued_answer(answer)

    def _post(self, url: str, body: Mapping[str, Any]) -> tuple[int, bytes]:
        content = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        try:
            answer = self._core.send(self._http, "POST", url, content=content, headers=headers)
        except CircuitOpen as exc:
            raise ApiCircuitOpen(str(exc), exc.retry_in) from exc
        except ConnectionFailure as exc:
            raise ApiConnectionError(str(exc)) from exc.__cause__
        except BodyFailure as exc:
            raise ApiAnswerError(f"answer unusable: {exc}") from exc
        if 200 <= answer.status < 300:
            return answer.status, answer.body
        detail, code = problem(answer.headers, answer.body)
        raise ApiHttpError(answer.status, detail, code)


def api_origin(api: str) -> str:
    """``https://host[:port]`` from ``--api`` (a trailing slash allowed); ``ValueError`` else."""
    try:
        url = httpx.URL(api.strip())
    except httpx.InvalidURL as exc:
        raise ValueError(f"not a URL: {api!r}") from exc
    if url.scheme != "https" or not url.host:
        raise ValueError(f"expected the server origin https://host[:port], got {api!r}")
    if url.userinfo or url.query or url.fragment or url.path not in ("", "/"):
        raise ValueError(f"expected only the origin https://host[:port], got {api!r}")
    return str(url.copy_with(path="/")).rstrip("/")


def check_token(token: str) -> None:
    """A bearer token is one word of printable ASCII (it goes into a header)."""
    if not token:
        raise ValueError("the API token is empty")
    if not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
        raise ValueError("the API token must be one word of printable ASCII")


def problem(headers: httpx.Headers, body: bytes) -> tuple[str, str | None]:
    """The one-line reason and the refusal code of an error answer: RFC 9457 problem
    details (``detail``, ``code``), an older server's ``{"detail": ...}`` (FastAPI's
    validation list too), or plain text."""
    content_type = headers.get("content-type", "")
    text = body.decode("utf-8", "replace")
    if "json" not in content_type:
        return (one_line(text) if content_type.startswith("text/plain") else ""), None
    try:
        answer = json.loads(text)
    except (ValueError, RecursionError):
        return "", None
    if not isinstance(answer, dict):
        return "", None
    code = answer.get("code")
    code = one_line(code, 64) if isinstance(code, str) and code.strip() else None
    detail = answer.get("detail")
    if isinstance(detail, list):  # a validation error: [{"loc": [...], "msg": "..."}]
        parts = [
            f"{'.'.join(str(p) for p in d.get('loc', []))}: {d.get('msg', '')}"
            if isinstance(d, dict)
            else str(d)
            for d in detail
        ]
        return one_line("; ".join(parts)), code
    if not isinstance(detail, str):
        title = answer.get("title")
        detail = title if isinstance(title, str) else ""
    return one_line(detail), code


def _issued_answer(body: bytes) -> IssuedAnswer:
    try:
        answer = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise ApiAnswerError("answer is not JSON") from exc
    if not isinstance(answer, dict):
        raise ApiAnswerError("answer is not a JSON object")
    pem, chain_pem, serial = (
        answer.get("certificate"),
        answer.get("chain", ""),
        answer.get("serial"),
    )
    if not isinstance(pem, str) or not pem.strip():
        raise ApiAnswerError("answer has no certificate")
    if not isinstance(chain_pem, str):
        raise ApiAnswerError("answer's chain is not a PEM string")
    if serial is not None and not isinstance(serial, str):
        raise ApiAnswerError("answer's serial is not a string")
    try:
        leaf, *extra = certs.load_pem_certificates(pem.encode())
        chain = certs.load_pem_certificates(chain_pem.encode()) if chain_pem.strip() else []
    except PkiError as exc:
        raise ApiAnswerError(f"answer: {exc}") from exc
    return IssuedAnswer(certificate=leaf, chain=(*extra, *chain), serial=serial)
