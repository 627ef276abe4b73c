"""The EST client (RFC 7030 with RFC 8951): one object per server and label.

    with EstClient("https://est.example:8443/.well-known/est", trust=anchor,
                   auth=ClientCertificate(cert, key)) as est:
        issued = est.simpleenroll(csr)

Requests go through the client core (``estkit.client.http``): every operation
has a deadline (``total_timeout``) across all its attempts, each attempt its
own ``timeout``; transient failures (timeouts, dropped connections,
429/502/503/504) are retried with exponential backoff and full jitter, or
after the server's ``Retry-After``; a 202 to an enrollment is polled after
its ``Retry-After`` until the deadline, then raised as ``EnrollmentPending``;
a circuit breaker (pass one ``CircuitBreaker`` to every client of a server)
fails fast while the server keeps failing. Nothing else is retried. An error
answer's refusal code (the ``Estkit-Refusal-Code`` header) is ``EstHttpError.code``.
"""

from __future__ import annotations

import datetime as dt
import random
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType

import httpx
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding

from estkit.client import tls
from estkit.client.auth import BasicAuth, ClientCertificate
from estkit.client.breaker import CircuitBreaker
from estkit.client.errors import (
    CODE_HEADER,
    EnrollmentPending,
    EstAuthError,
    EstCircuitOpen,
    EstConnectionError,
    EstHttpError,
    EstNotFoundError,
    EstProtocolError,
    one_line,
)
from estkit.client.http import (
    MIN_PENDING_DELAY,
    USER_AGENT,
    BodyFailure,
    CircuitOpen,
    ConnectionFailure,
    HttpCore,
    Response,
    RetryPolicy,
)
from estkit.client.issued import IssuedCertificate, check_issued
from estkit.client.trust import TrustAnchor
from estkit.pki import certs, cms, keys, wire
from estkit.pki.csrattrs import CsrAttribute, decode_csrattrs
from estkit.pki.errors import DecodeError

HEALTH_PATH = "/health/certificate"
__all__ = ["MIN_PENDING_DELAY", "USER_AGENT", "EstClient"]
# An EST code the server may send: a valid token of at most this many characters.
_MAX_CODE = 64


class EstClient:
    """EST operations against one base URL (path prefix and label included)."""

    def __init__(
        self,
        base_url: str,
        *,
        trust: TrustAnchor,
        auth: ClientCertificate | BasicAuth | None = None,
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
        url = httpx.URL(base_url)
        if url.scheme != "https" or not url.host:
            raise ValueError(f"EST base URL must be https://host[:port]/path, got {base_url!r}")
        if url.userinfo or url.query or url.fragment:
            raise ValueError("EST base URL must not carry credentials, a query or a fragment")
        policy = RetryPolicy(
            timeout=timeout,
            total_timeout=total_timeout,
            retries=retries,
            backoff=backoff,
            max_backoff=max_backoff,
        )
        self._core = HttpCore(
            policy,
            breaker=breaker,
            transport=transport,
            sleep=sleep,
            clock=clock,
            now=now,
            rng=rng,
        )
        self._base = str(url).rstrip("/")
        self._health_url = str(url.copy_with(raw_path=HEALTH_PATH.encode()))
        self._trust = trust
        self._auth = auth
        self._anchor: TrustAnchor | None = None if trust.needs_bootstrap else trust
        self._http: httpx.Client | None = None

    # -- lifecycle -----------------------------------------------------------

    def __enter__(self) -> EstClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    @property
    def base_url(self) -> str:
        return self._base

    # -- operations ----------------------------------------------------------

    def trust_anchors(self) -> tuple[x509.Certificate, ...]:
        """The explicit trust anchors, bootstrapping them first in fingerprint mode."""
        return self._anchors(self._deadline())

    def cacerts(self) -> list[x509.Certificate]:
        """``GET /cacerts``: the CA certificates, each followed by its issuer when present
        (the CMS carries a SET, whose order means nothing)."""
        deadline = self._deadline()
        answer = self._send(self._client(deadline), "GET", self._url("cacerts"), deadline=deadline)
        return _chain_order(self._certificates(_expect(answer, 200)))

    def verify_issued(
        self,
        returned: Sequence[x509.Certificate],
        *,
        public_key: CertificatePublicKeyTypes,
        now: dt.datetime,
        common_name: str | None = None,
        subject: x509.Name | None = None,
    ) -> IssuedCertificate:
        """``check_issued`` on what ``simpleenroll``/``simplereenroll`` returned, up to the
        trust anchors, completing its path with ``/cacerts`` when the server sent none."""
        leaf, cas = returned[0], list(returned[1:])
        anchors = self.trust_anchors()
        if certs.build_path(leaf, cas, anchors) is None:
            cas.extend(self.cacerts())
        return check_issued(
            leaf,
            public_key=public_key,
            cas=cas,
            anchors=anchors,
            now=now,
            common_name=common_name,
            subject=subject,
        )

    def simpleenroll(self, csr: x509.CertificateSigningRequest) -> list[x509.Certificate]:
        """``POST /simpleenroll``: the issued certificate first, then the others sent with it
        (ordered as ``cacerts``)."""
        return self._enroll("simpleenroll", csr)

    def simplereenroll(self, csr: x509.CertificateSigningRequest) -> list[x509.Certificate]:
        """``POST /simplereenroll``: as ``simpleenroll``, authenticated by the certificate
        being renewed."""
        return self._enroll("simplereenroll", csr)

    def csrattrs(self) -> list[CsrAttribute]:
        """``GET /csrattrs``; empty when the server has none (204, or 404 per RFC 7030 4.5.2)."""
        deadline = self._deadline()
        try:
            answer = self._send(
                self._client(deadline), "GET", self._url("csrattrs"), deadline=deadline
            )
        except EstNotFoundError:
            return []
        if answer.status == 204:
            return []
        _expect(answer, 200)
        if not answer.body.strip():
            return []
        der = _payload(answer, wire.CSRATTRS)
        try:
            return decode_csrattrs(der)
        except DecodeError as exc:
            raise EstProtocolError(f"{answer.where}: {exc}") from exc

    def health(self) -> x509.Certificate:
        """``GET /health/certificate`` at the server root: the client certificate it saw."""
        deadline = self._deadline()
        answer = self._send(self._client(deadline), "GET", self._health_url, deadline=deadline)
        try:
            return certs.load_pem_certificates(_expect(answer, 200).body)[0]
        except DecodeError as exc:
            raise EstProtocolError(f"{answer.where}: {exc}") from exc

    # -- internals -----------------------------------------------------------

    def _url(self, operation: str) -> str:
        return f"{self._base}/{operation}"

    def _deadline(self) -> float:
        return self._core.deadline()

    def _enroll(
        self, operation: str, csr: x509.CertificateSigningRequest
    ) -> list[x509.Certificate]:
        deadline = self._deadline()
        # Wrapped with a final newline: a widely deployed server rejects anything else.
        body = wire.encode_base64_body(csr.public_bytes(Encoding.DER), line_length=64)
        headers = {"Content-Type": wire.PKCS10, "Content-Transfer-Encoding": "base64"}
        answer = self._send(
            self._client(deadline),
            "POST",
            self._url(operation),
            deadline=deadline,
            content=body,
            headers=headers,
            pending=True,
        )
        issued = self._certificates(_expect(answer, 200))
        return _issued_first(issued, csr.public_key(), where=answer.where)

    def _certificates(self, answer: Response) -> list[x509.Certificate]:
        der = _payload(answer, wire.PKCS7_MIME)
        try:
            return cms.decode_certs_only(der)
        except DecodeError as exc:
            raise EstProtocolError(f"{answer.where}: {exc}") from exc

    def _anchors(self, deadline: float) -> tuple[x509.Certificate, ...]:
        if self._anchor is None:
            self._anchor = self._bootstrap(deadline)
        return self._anchor.certificates

    def _bootstrap(self, deadline: float) -> TrustAnchor:
        # RFC 7030 4.1.1: /cacerts over an unverified connection, without credentials;
        # only the certificate with the out-of-band fingerprint is kept.
        url = self._url("cacerts")
        with self._new_http(tls.bootstrap_context(), with_auth=False) as http:
            answer = self._send(http, "GET", url, deadline=deadline)
        candidates = self._certificates(_expect(answer, 200))
        return self._trust.select(candidates, source=url)

    def _client(self, deadline: float) -> httpx.Client:
        if self._http is None:
            client_cert = self._auth if isinstance(self._auth, ClientCertificate) else None
            context = tls.verified_context(self._anchors(deadline), client_cert)
            self._http = self._new_http(context, with_auth=True)
        return self._http

    def _new_http(self, context: ssl.SSLContext, *, with_auth: bool) -> httpx.Client:
        auth = None
        if with_auth and isinstance(self._auth, BasicAuth):
            auth = httpx.BasicAuth(self._auth.username, self._auth.password)
        return self._core.open_client(verify=context, auth=auth)

    def _send(
        self,
        http: httpx.Client,
        method: str,
        url: str,
        *,
        deadline: float,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        pending: bool = False,
    ) -> Response:
        """One request through the core: a 2xx answer, or the EST client's exception."""
        try:
            answer = self._core.send(
                http,
                method,
                url,
                content=content,
                headers=headers,
                deadline=deadline,
                poll_pending=pending,
            )
        except CircuitOpen as exc:
            raise EstCircuitOpen(url, exc.detail, exc.retry_in) from exc
        except ConnectionFailure as exc:
            raise EstConnectionError(url, exc.detail) from exc.__cause__
        except BodyFailure as exc:
            raise EstProtocolError(str(exc)) from exc
        if answer.status == 202 and pending:
            assert answer.retry_after is not None
            raise EnrollmentPending(url, answer.retry_after)
        if 200 <= answer.status < 300:
            return answer
        raise _http_error(answer)


def _expect(answer: Response, status: int) -> Response:
    if answer.status != status:
        raise EstProtocolError(f"{answer.where}: unexpected HTTP {answer.status}")
    return answer


def _payload(answer: Response, media: str) -> bytes:
    """The DER inside a base64 body of media type ``media`` (parameters ignored)."""
    content_type = answer.headers.get("content-type")
    if wire.media_type(content_type) != media:
        raise EstProtocolError(
            f"{answer.where}: expected {media}, got {content_type or 'no Content-Type'}"
        )
    try:
        return wire.decode_base64_body(answer.body)
    except DecodeError as exc:
        raise EstProtocolError(f"{answer.where}: {exc}") from exc


def _issued_first(
    issued: list[x509.Certificate], public_key: CertificatePublicKeyTypes, *, where: str
) -> list[x509.Certificate]:
    # A CMS SET has no order to rely on: the issued certificate is the one for our key.
    leaf = next((c for c in issued if keys.public_keys_match(c.public_key(), public_key)), None)
    if leaf is None:
        raise EstProtocolError(f"{where}: no certificate in the response is for the CSR's key")
    return [leaf, *_chain_order([c for c in issued if c is not leaf])]


def _chain_order(unordered: list[x509.Certificate]) -> list[x509.Certificate]:
    """Each certificate followed by its issuer where the set has it, lowest first."""
    remaining = list(unordered)
    ordered: list[x509.Certificate] = []
    while remaining:
        current: x509.Certificate | None = next(
            (
                c
                for c in remaining
                if not any(o is not c and certs.is_issued_by(o, c) for o in remaining)
            ),
            remaining[0],
        )
        while current is not None:
            ordered.append(current)
            remaining.remove(current)
            issuer = current
            current = next((c for c in remaining if certs.is_issued_by(issuer, c)), None)
    return ordered


def _http_error(answer: Response) -> EstHttpError:
    reason = ""
    if wire.media_type(answer.headers.get("content-type")) == "text/plain":
        reason = one_line(answer.body.decode("utf-8", "replace"))
    cls: type[EstHttpError] = EstHttpError
    if answer.status in (401, 403):
        cls = EstAuthError
    elif answer.status == 404:
        cls = EstNotFoundError
    return cls(
        method=answer.method,
        url=answer.url,
        status=answer.status,
        reason=reason,
        code=refusal_code(answer.headers.get(CODE_HEADER)),
        retry_after=answer.retry_after,
    )


def refusal_code(value: str | None) -> str | None:
    """The refusal code of a header value: one lower-case token, or None when absent or odd."""
    if value is None:
        return None
    code = value.strip().lower()
    if not code or len(code) > _MAX_CODE or not all(c.isalnum() or c == "-" for c in code):
        return None
    return code if code.isascii() else None
