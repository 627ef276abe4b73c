"""The EST client (RFC 7030 with RFC 8951): one object per server and label.

    with EstClient("https://est.example:8443/.well-known/est", trust=anchor,
                   auth=ClientCertificate(cert, key)) as est:
        issued = est.simpleenroll(csr)

``auth`` is a ``ClientCertificate``, a ``BasicAuth``, or ``Credentials`` holding both
(then Basic is sent only once the server challenges for it; see ``estkit.client.auth``).

Channel binding (RFC 7030 3.5): give ``simpleenroll``, ``simplereenroll`` or
``serverkeygen`` a ``CsrFactory`` instead of a CSR and the client first asks
``/csrattrs``; when the server lists challengePassword, the factory is called
with the challengePassword value that binds the CSR to the TLS connection
(base64 of its ``tls-unique``, RFC 5929), else with None, and the request goes
over that same kept-alive connection. ``tls-unique`` exists on TLS 1.2 only,
and Python's ``ssl`` cannot export the keying material TLS 1.3's ``tls-exporter``
(RFC 9266) needs: when the server asks for a binding over a TLS 1.3 connection,
the client reconnects with TLS 1.2 as its highest version (a server that
refuses TLS 1.2 cannot be bound to).

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
from estkit.client.auth import (
    BasicAuth,
    BasicChallengeFlow,
    ClientCertificate,
    Credentials,
    asks_for_basic,
)
from estkit.client.breaker import CircuitBreaker
from estkit.client.errors import (
    CODE_HEADER,
    REASON_HEADER,
    EnrollmentPending,
    EstAuthError,
    EstCircuitOpen,
    EstConnectionError,
    EstError,
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
from estkit.pki import binding, certs, cms, keys, multipart, wire
from estkit.pki.csrattrs import CsrAttribute, decode_csrattrs
from estkit.pki.errors import DecodeError, PkiError

HEALTH_PATH = "/health/certificate"
# The server's refusal code for a CSR bound to another TLS connection (RFC 7030 3.5).
BINDING_MISMATCH = "channel-binding-mismatch"
__all__ = ["MIN_PENDING_DELAY", "USER_AGENT", "CsrFactory", "EstClient"]
# An EST code the server may send: a valid token of at most this many characters.
_MAX_CODE = 64

# Makes the CSR once the client knows the challengePassword value that binds it to the
# connection (RFC 7030 3.5), or None when the server asks for no binding.
CsrFactory = Callable[[str | None], x509.CertificateSigningRequest]


class EstClient:
    """EST operations against one base URL (path prefix and label included).

    One thread at a time: its connection (which a channel binding belongs to) and its
    Basic-challenge state are not shared safely; give each thread its own client (they
    may share a ``CircuitBreaker``)."""

    def __init__(
        self,
        base_url: str,
        *,
        trust: TrustAnchor,
        auth: ClientCertificate | BasicAuth | Credentials | None = None,
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
        self._credentials = Credentials.of(auth)
        basic = self._credentials.basic
        # Basic beside a certificate waits for the server's challenge (RFC 7030 3.2.3).
        self._basic_flow = (
            BasicChallengeFlow(basic, up_front=self._credentials.certificate is None)
            if basic is not None
            else None
        )
        self._tls12_only = False
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
        known: Sequence[x509.Certificate] = (),
    ) -> IssuedCertificate:
        """``check_issued`` on what ``simpleenroll``/``simplereenroll`` returned, up to the
        trust anchors, completing its path with ``/cacerts`` when the server sent none,
        and then with ``known`` CA certificates (the chain the device holds): a CA
        rollover can switch ``/cacerts`` to the new CA between the enrollment and the
        request for ``/cacerts``, and the certificate is still the old CA's."""
        leaf, cas = returned[0], list(returned[1:])
        anchors = self.trust_anchors()
        if certs.build_path(leaf, cas, anchors) is None:
            cas.extend(self.cacerts())
        if known and certs.build_path(leaf, cas, anchors) is None:
            cas.extend(known)
        return check_issued(
            leaf,
            public_key=public_key,
            cas=cas,
            anchors=anchors,
            now=now,
            common_name=common_name,
            subject=subject,
        )

    def simpleenroll(
        self, csr: x509.CertificateSigningRequest | CsrFactory
    ) -> list[x509.Certificate]:
        """``POST /simpleenroll``: the issued certificate first, then the others sent with it
        (ordered as ``cacerts``). A ``CsrFactory`` binds the CSR to the connection where
        the server asks for it (module docstring)."""
        return self._enroll("simpleenroll", csr)

    def simplereenroll(
        self, csr: x509.CertificateSigningRequest | CsrFactory
    ) -> list[x509.Certificate]:
        """``POST /simplereenroll``: as ``simpleenroll``, authenticated by the certificate
        being renewed."""
        return self._enroll("simplereenroll", csr)

    def serverkeygen(
        self, csr: x509.CertificateSigningRequest | CsrFactory
    ) -> tuple[keys.PrivateKey, list[x509.Certificate]]:
        """``POST /serverkeygen`` (RFC 7030 4.4): the private key the server made, and the
        certificates, the one for that key first (then ordered as ``cacerts``). The server
        ignores the CSR's key, but the CSR must be signed; the key must come unencrypted
        (PKCS#8: this client names no key to encrypt it to)."""
        deadline = self._deadline()
        answer = _expect(self._submit("serverkeygen", csr, deadline)[1], 200)
        try:
            generated = multipart.decode_serverkeygen(
                answer.body, answer.headers.get("content-type", "")
            )
        except PkiError as exc:
            raise EstProtocolError(f"{answer.where}: {exc}") from exc
        public_key = generated.private_key.public_key()
        issued = _issued_first(
            list(generated.certificates), public_key, whose="the key sent", where=answer.where
        )
        return generated.private_key, issued

    def csrattrs(self) -> list[CsrAttribute]:
        """``GET /csrattrs``; empty when the server has none (204, or 404 per RFC 7030 4.5.2)."""
        return self._csrattrs(self._deadline())[0]

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
        self, operation: str, request: x509.CertificateSigningRequest | CsrFactory
    ) -> list[x509.Certificate]:
        deadline = self._deadline()
        csr, answer = self._submit(operation, request, deadline)
        issued = self._certificates(_expect(answer, 200))
        return _issued_first(issued, csr.public_key(), whose="the CSR's key", where=answer.where)

    def _post(
        self, operation: str, csr: x509.CertificateSigningRequest, deadline: float
    ) -> Response:
        # Wrapped with a final newline: a widely deployed server rejects anything else.
        body = wire.encode_base64_body(csr.public_bytes(Encoding.DER), line_length=64)
        headers = {"Content-Type": wire.PKCS10, "Content-Transfer-Encoding": "base64"}
        return self._send(
            self._client(deadline),
            "POST",
            self._url(operation),
            deadline=deadline,
            content=body,
            headers=headers,
            pending=True,
        )

    def _csrattrs(self, deadline: float) -> tuple[list[CsrAttribute], Response | None]:
        """The CSR attributes, and the answer they came in (None after a 404)."""
        try:
            answer = self._send(
                self._client(deadline), "GET", self._url("csrattrs"), deadline=deadline
            )
        except EstNotFoundError:
            return [], None
        if answer.status == 204:
            return [], answer
        _expect(answer, 200)
        if not answer.body.strip():
            return [], answer
        der = _payload(answer, wire.CSRATTRS)
        try:
            return decode_csrattrs(der), answer
        except DecodeError as exc:
            raise EstProtocolError(f"{answer.where}: {exc}") from exc

    def _csr(
        self, request: x509.CertificateSigningRequest | CsrFactory, deadline: float
    ) -> tuple[x509.CertificateSigningRequest, bool]:
        """The CSR to send, and whether it is bound to the current connection: ``request``
        itself, or what the factory makes once ``/csrattrs`` said whether to bind it, on
        the connection that will carry it."""
        if isinstance(request, x509.CertificateSigningRequest):
            return request, False
        try:
            attributes, answer = self._csrattrs(deadline)
        except EstCircuitOpen:
            raise
        except (EstHttpError, EstProtocolError, EstConnectionError):
            # No usable attributes for us: the request itself will say what is wrong.
            return request(None), False
        if not any(a.oid == binding.CHALLENGE_PASSWORD for a in attributes):
            return request(None), False
        session = answer.tls if answer is not None else None
        if session is not None and session.tls_unique is None and not self._tls12_only:
            # No tls-exporter from Python's ssl (module docstring): bind over TLS 1.2.
            self._tls12_only = True
            self.close()
            try:
                _, answer = self._csrattrs(deadline)
            except EstError as exc:
                self._tls12_only = False  # this client's other calls keep TLS 1.3
                self.close()
                raise EstProtocolError(
                    f"{self._url('csrattrs')}: the server asks for the TLS channel binding "
                    "(RFC 7030 3.5), which this client can make over TLS 1.2 only, and TLS "
                    f"1.2 failed: {exc}"
                ) from exc
        session = answer.tls if answer is not None else None
        if session is None or session.tls_unique is None:
            where = answer.where if answer is not None else self._url("csrattrs")
            over = f"over {session.version}" if session is not None else "here"
            raise EstProtocolError(
                f"{where}: the server asks for the TLS channel binding (challengePassword, "
                f"RFC 7030 3.5), but the connection has no tls-unique {over} (a server that "
                "closes every connection cannot be bound to)"
            )
        return request(binding.encode_binding(session.tls_unique)), True

    def _submit(
        self,
        operation: str,
        request: x509.CertificateSigningRequest | CsrFactory,
        deadline: float,
    ) -> tuple[x509.CertificateSigningRequest, Response]:
        """POST the CSR. A bound CSR that reached the server on another connection than
        the one it was bound to (a retry, a reconnect) is refused with
        ``channel-binding-mismatch``: it is made and sent again once, freshly bound."""
        csr, bound = self._csr(request, deadline)
        try:
            return csr, self._post(operation, csr, deadline)
        except EstHttpError as exc:
            if not bound or exc.code != BINDING_MISMATCH:
                raise
        self.close()  # a new connection, a new binding
        csr, _ = self._csr(request, deadline)
        return csr, self._post(operation, csr, deadline)

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
            context = tls.verified_context(
                self._anchors(deadline),
                self._credentials.certificate,
                tls12_only=self._tls12_only,
            )
            self._http = self._new_http(context, with_auth=True)
        return self._http

    def _new_http(self, context: ssl.SSLContext, *, with_auth: bool) -> httpx.Client:
        return self._core.open_client(verify=context, auth=self._basic_flow if with_auth else None)

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
        raise _http_error(
            answer, sent_basic=self._basic_flow is not None and self._basic_flow.up_front
        )


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
    issued: list[x509.Certificate],
    public_key: CertificatePublicKeyTypes,
    *,
    whose: str,
    where: str,
) -> list[x509.Certificate]:
    # A CMS SET has no order to rely on: the issued certificate is the one for our key.
    leaf = next((c for c in issued if keys.public_keys_match(c.public_key(), public_key)), None)
    if leaf is None:
        raise EstProtocolError(f"{where}: no certificate in the response is for {whose}")
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


def _http_error(answer: Response, *, sent_basic: bool) -> EstHttpError:
    """The error of an error answer; ``sent_basic``: Basic went with the request (up front,
    or in answer to a challenge), so a 401 means it was refused."""
    reason = ""
    if wire.media_type(answer.headers.get("content-type")) == "text/plain":
        reason = one_line(answer.body.decode("utf-8", "replace"))
    if not reason:
        # estkit's 401 has an empty body (clients that leave it unread break otherwise)
        # and its reason in a header.
        reason = one_line(answer.headers.get(REASON_HEADER, ""))
    hint = ""
    if answer.status == 401 and sent_basic:
        hint = "the server refused the Basic credentials"
    elif asks_for_basic(answer.status, answer.headers):
        hint = "the server asks for HTTP Basic: a user name and password"
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
        hint=hint,
    )


def refusal_code(value: str | None) -> str | None:
    """The refusal code of a header value: one lower-case token, or None when absent or odd."""
    if value is None:
        return None
    code = value.strip().lower()
    if not code or len(code) > _MAX_CODE or not all(c.isalnum() or c == "-" for c in code):
        return None
    return code if code.isascii() else None
