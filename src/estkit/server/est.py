"""EST routes (RFC 7030 section 4, RFC 8951), served under /.well-known/est[/<label>]/.

Wire rules (DESIGN.md): request bodies are decoded whatever their line
breaks and Content-Transfer-Encoding; responses carry Content-Length, never
chunked, ``Content-Transfer-Encoding: base64``, and base64 in lines the client
can read: the label's ``base64_line_length`` when set, else one line for
strongSwan's ``pki`` and 64 columns for everyone else (``quirks.py``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager
from typing import Any, Protocol, TypeVar

from cryptography import x509
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from estkit.ca.authority import Issued, IssuingCa, Label, Principal, ServerGenerated
from estkit.ca.errors import CaError, Code, Refusal
from estkit.ca.policy import check_serverkeygen
from estkit.pki import serverkeygen as keygen
from estkit.pki import wire
from estkit.pki.binding import ChannelBinding
from estkit.pki.certs import certs_to_pem
from estkit.pki.cms import encode_certs_only
from estkit.pki.csrattrs import encode_csrattrs
from estkit.pki.errors import DecodeError
from estkit.server import quirks
from estkit.server.errors import RequestError, ca_error, request_error, text_response
from estkit.server.limits import BASIC_REFUSAL_DELAY, BasicCheckPool, BasicLimits

log = logging.getLogger(__name__)
# Basic refusals answered after ``refusal_delay`` (limits.BASIC_REFUSAL_DELAY).
_SLOWED = frozenset({Code.RATE_LIMITED, Code.UNAVAILABLE})

PREFIX = "/.well-known/est"
Handler = Callable[[Request, str | None], Awaitable[Response]]
T = TypeVar("T")


class EstAuthority(Protocol):
    """What the EST front-end needs from the authority, and nothing more."""

    def label(self, name: str) -> Label: ...
    def issuing_ca(self, label: Label, *, now: dt.datetime) -> IssuingCa: ...
    def deferred_writes(self) -> AbstractContextManager[list[Future[Any]]]: ...
    def authenticate_certificate(
        self, cert: x509.Certificate, *, now: dt.datetime
    ) -> Principal: ...
    def authenticate_secret(
        self, device_id: str, secret: str, *, now: dt.datetime
    ) -> Principal: ...
    def audit_rate_limit(
        self, engaged: Sequence[str], *, actor: str, window: float, now: dt.datetime
    ) -> None: ...
    def enroll(
        self,
        label: Label,
        csr_der: bytes,
        who: Principal,
        *,
        now: dt.datetime,
        channel_binding: bytes | None = None,
    ) -> Issued: ...
    def reenroll(
        self,
        label: Label,
        csr_der: bytes,
        who: Principal,
        *,
        now: dt.datetime,
        channel_binding: bytes | None = None,
    ) -> Issued: ...
    def serverkeygen(
        self,
        label: Label,
        csr_der: bytes,
        who: Principal,
        *,
        now: dt.datetime,
        channel_binding: bytes | None = None,
    ) -> ServerGenerated: ...


def client_certificate(request: Request) -> x509.Certificate | None:
    """The client certificate the TLS handshake saw (ASGI TLS extension), if any."""
    tls = request.scope.get("extensions", {}).get("tls") or {}
    chain = tls.get("client_cert_chain") or []
    return x509.load_pem_x509_certificate(chain[0].encode()) if chain else None


def channel_binding(request: Request) -> bytes | None:
    """This connection's TLS channel binding (``tls-unique`` or ``tls-exporter``), if any."""
    tls = request.scope.get("extensions", {}).get("tls") or {}
    found = tls.get("estkit.channel_binding")
    return found.data if isinstance(found, ChannelBinding) else None


def basic_credentials(request: Request) -> tuple[str, str] | None:
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        raise Refusal(
            Code.AUTHENTICATION_REQUIRED, "only HTTP Basic or a client certificate are accepted"
        )
    try:
        user, sep, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        raise Refusal(Code.AUTHENTICATION_REQUIRED, "malformed Basic credentials") from None
    if not sep or not user:
        raise Refusal(Code.AUTHENTICATION_REQUIRED, "malformed Basic credentials")
    return user, password


class EstRoutes:
    def __init__(
        self,
        authority: EstAuthority,
        *,
        default_label: str,
        max_request_bytes: int,
        clock: Callable[[], dt.datetime],
        basic_pool: BasicCheckPool | None = None,
        basic_limits: BasicLimits | None = None,
        refusal_delay: float = BASIC_REFUSAL_DELAY,
    ) -> None:
        """``basic_pool``, ``basic_limits`` and ``refusal_delay`` (``server/limits.py``):
        the defaults there unless given."""
        self._authority = authority
        self._default_label = default_label
        self._max = max_request_bytes
        self._clock = clock
        self._basic_pool = basic_pool if basic_pool is not None else BasicCheckPool()
        self._basic_limits = basic_limits if basic_limits is not None else BasicLimits()
        self._refusal_delay = refusal_delay
        # Per-label response bodies as DER, encoded on first use (labels are fixed at
        # start), and as base64 per line length (``quirks.base64_line_length``).
        # Per label and CA generation: a rollover switches the answer at its moment.
        self._cacerts: dict[tuple[str, str], bytes] = {}
        self._csrattrs: dict[str, bytes] = {}
        self._base64: dict[tuple[bytes, int], bytes] = {}
        self._ops: dict[str, tuple[Handler, str]] = {
            "cacerts": (self.cacerts, "GET"),
            "simpleenroll": (self.simpleenroll, "POST"),
            "simplereenroll": (self.simplereenroll, "POST"),
            "serverkeygen": (self.serverkeygen, "POST"),
            "csrattrs": (self.csrattrs, "GET"),
        }
        self._health: dict[str, tuple[Handler, str]] = {
            "/health/certificate": (self.health_certificate, "GET"),
            "/health": (self.health, "GET"),
        }

    def resolve(self, path: str) -> tuple[Handler, str, str | None] | None:
        """The handler for ``path``, the method it answers, and the EST label named in it.

        ``/.well-known/est/<op>`` or ``/.well-known/est/<label>/<op>``, and the two
        health checks; None for every other path.
        """
        if path.startswith(PREFIX + "/"):
            label, sep, op = path[len(PREFIX) + 1 :].rpartition("/")
            found = self._ops.get(op)
            if found is None or (sep and not label) or "/" in label:
                return None
            return (*found, label or None)
        found = self._health.get(path)
        return (*found, None) if found else None

    def _label(self, name: str | None) -> Label:
        return self._authority.label(name or self._default_label)

    async def cacerts(self, request: Request, label_name: str | None) -> Response:
        label = self._label(label_name)
        ca = self._authority.issuing_ca(label, now=self._clock())
        der = self._cacerts.get((label.name, ca.name))
        if der is None:
            der = self._cacerts[(label.name, ca.name)] = encode_certs_only(ca.chain)
        return self._base64_response(request, label, der, wire.CACERTS_CONTENT_TYPE, cache=True)

    async def csrattrs(self, request: Request, label_name: str | None) -> Response:
        label = self._label(label_name)
        if not label.csrattrs:
            return Response(status_code=204)
        der = self._csrattrs.get(label.name)
        if der is None:
            der = self._csrattrs[label.name] = encode_csrattrs(label.csrattrs)
        return self._base64_response(request, label, der, wire.CSRATTRS, cache=True)

    async def simpleenroll(self, request: Request, label_name: str | None) -> Response:
        return await self._enroll(request, label_name, reenroll=False)

    async def simplereenroll(self, request: Request, label_name: str | None) -> Response:
        return await self._enroll(request, label_name, reenroll=True)

    async def _enroll(
        self, request: Request, label_name: str | None, *, reenroll: bool
    ) -> Response:
        label = self._label(label_name)
        cert, basic, csr_der = await self._csr_request(request, reenroll=reenroll)
        now = self._clock()
        binding = channel_binding(request)
        operation = self._authority.reenroll if reenroll else self._authority.enroll

        def act(who: Principal) -> Issued:
            return operation(label, csr_der, who, now=now, channel_binding=binding)

        # The approval bookkeeping reads back what it writes: on a worker thread.
        issued = await self._decide_as(request, cert, basic, now, act, on_loop=not label.approval)
        der = encode_certs_only([issued.certificate])
        return self._base64_response(request, label, der, wire.ENROLL_CONTENT_TYPE)

    def _base64_response(
        self, request: Request, label: Label, der: bytes, content_type: str, *, cache: bool = False
    ) -> Response:
        """200 with ``der`` in base64, in lines the client can read
        (``quirks.base64_line_length``); ``cache``: ``der`` is a fixed per-label body."""
        line_length = quirks.base64_line_length(label.base64_line_length, request.scope["headers"])
        body = self._base64.get((der, line_length)) if cache else None
        if body is None:
            body = wire.encode_base64_body(der, line_length=line_length)
            if cache:
                self._base64[der, line_length] = body
        return _base64_response(body, content_type)

    async def serverkeygen(self, request: Request, label_name: str | None) -> Response:
        """RFC 7030 4.4: the server makes the key; ``multipart/mixed`` of the PKCS#8 key
        (or EnvelopedData of it) and the certs-only CMS. Labels without ``serverkeygen``
        answer 404 (``not-found``) before any authentication."""
        label = self._label(label_name)
        check_serverkeygen(label)
        cert, basic, csr_der = await self._csr_request(request, reenroll=False)
        now = self._clock()
        binding = channel_binding(request)

        def act(who: Principal) -> ServerGenerated:
            return self._authority.serverkeygen(
                label, csr_der, who, now=now, channel_binding=binding
            )

        # An EC key costs tens of microseconds: on the loop, like an enrollment; an RSA
        # key tens to hundreds of milliseconds: on a worker thread.
        on_loop = label.serverkeygen_key_type.startswith("ec-")
        made = await self._decide_as(request, cert, basic, now, act, on_loop=on_loop)
        key_der = keygen.private_key_der(made.key)
        if made.encrypt_to is not None:
            key_part = (keygen.ENCRYPTED_KEY_PART, keygen.envelope_key(key_der, made.encrypt_to))
        else:
            key_part = (keygen.KEY_PART, key_der)
        line = label.base64_line_length or 0  # MIME parts: 64 unless the label sets 4-76
        body = keygen.encode_response(
            key_part,
            encode_certs_only([made.issued.certificate]),
            line_length=line if 0 < line <= 76 else keygen.DEFAULT_LINE_LENGTH,
        )
        return Response(body, status_code=200, headers={"Content-Type": keygen.CONTENT_TYPE})

    async def _csr_request(
        self, request: Request, *, reenroll: bool
    ) -> tuple[x509.Certificate | None, tuple[str, str] | None, bytes]:
        """The credentials (client certificate, else Basic) and the DER CSR of an
        enrollment-like request, the cheap checks done before any secret is checked."""
        cert = client_certificate(request)
        basic = None if cert is not None else basic_credentials(request)
        if cert is None and basic is None:
            raise Refusal(
                Code.AUTHENTICATION_REQUIRED,
                "authentication required: client certificate or HTTP Basic",
            )
        if basic is not None and reenroll:
            raise Refusal(
                Code.CERTIFICATE_REQUIRED, "re-enroll needs the client certificate being renewed"
            )
        # Everything cheap is checked before a Basic secret is looked up and checked.
        if wire.media_type(request.headers.get("content-type")) != wire.PKCS10:
            raise RequestError(415, "expected Content-Type application/pkcs10")
        body = await self._read_body(request)
        try:
            csr_der = wire.decode_base64_body(body)
        except DecodeError as exc:
            raise Refusal(Code.BAD_CSR, str(exc)) from None
        return cert, basic, csr_der

    async def _decide_as(
        self,
        request: Request,
        cert: x509.Certificate | None,
        basic: tuple[str, str] | None,
        now: dt.datetime,
        act: Callable[[Principal], T],
        *,
        on_loop: bool,
    ) -> T:
        """Authenticate, then ``act`` as who was authenticated: Basic on its pool; a client
        certificate on the loop when ``on_loop``, else on a worker thread."""
        if basic is not None:
            return await self._decide_basic(request, basic, now, act)
        assert cert is not None
        if on_loop:
            return await self._decide_on_loop(cert, now, act)
        return await run_in_threadpool(self._decide, cert, None, now, act)

    async def _decide_basic(
        self,
        request: Request,
        basic: tuple[str, str],
        now: dt.datetime,
        act: Callable[[Principal], T],
    ) -> T:
        """A secret's check and the enrollment, on the Basic pool (bounded);
        refused before it when the username or the source failed too often lately, or
        when the pool is full (``server/limits.py``)."""
        username = basic[0]
        source = request.client.host if request.client else None
        try:
            self._basic_limits.check(username, source)
            issued = await self._basic_pool.run(lambda: self._decide(None, basic, now, act))
        except Refusal as refusal:
            if refusal.code is Code.SECRET_INVALID:
                engaged = self._basic_limits.failed(username, source)
                if engaged:
                    await run_in_threadpool(
                        functools.partial(
                            self._authority.audit_rate_limit,
                            engaged,
                            actor=f"secret:{username}",
                            window=self._basic_limits.window,
                            now=now,
                        )
                    )
            elif refusal.code in _SLOWED and self._refusal_delay > 0:
                await asyncio.sleep(self._refusal_delay)
            raise
        self._basic_limits.succeeded(username, source)
        return issued

    def _decide(
        self,
        cert: x509.Certificate | None,
        basic: tuple[str, str] | None,
        now: dt.datetime,
        act: Callable[[Principal], T],
    ) -> T:
        """Authenticate and issue (signature, database): on a worker thread (the Basic
        pool, or the shared one for approval), or on the loop inside ``deferred_writes``."""
        authority = self._authority
        if cert is not None:
            who = authority.authenticate_certificate(cert, now=now)
        else:
            assert basic is not None
            who = authority.authenticate_secret(basic[0], basic[1], now=now)
        return act(who)

    async def _decide_on_loop(
        self, cert: x509.Certificate, now: dt.datetime, act: Callable[[Principal], T]
    ) -> T:
        """The mTLS hot path: decide and sign here (≈ 0.5 ms of CPU, no hop to a
        thread), then await the commit of what the decision wrote."""
        issued: T | None = None
        refusal: Exception | None = None
        with self._authority.deferred_writes() as writes:
            try:
                issued = self._decide(cert, None, now, act)
            except Exception as exc:  # answered after its audit entry is committed
                refusal = exc
        for future in writes:
            await asyncio.wrap_future(future)  # a failed commit fails the request
        if refusal is not None:
            raise refusal
        assert issued is not None
        return issued

    async def _read_body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self._max:
            raise RequestError(413, f"request body over {self._max} bytes")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self._max:
                raise RequestError(413, f"request body over {self._max} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def health_certificate(self, request: Request, _label: str | None) -> Response:
        cert = client_certificate(request)
        if cert is None:
            raise Refusal(Code.AUTHENTICATION_REQUIRED, "no client certificate was presented")
        return Response(certs_to_pem([cert]), media_type="application/x-pem-file")

    async def health(self, _request: Request, _label: str | None) -> Response:
        return PlainTextResponse("ok\n")


class EstApp:
    """EST and the health checks, answered ahead of the API's framework.

    Every device request is one of these few paths, so they skip FastAPI's
    middleware stack and router (bench/README.md measured the difference);
    every other path goes on to ``api``.
    """

    def __init__(self, routes: EstRoutes, api: ASGIApp) -> None:
        self.routes = routes
        self.api = api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._serve(scope, receive, send)
        except ClientDisconnect:
            # Nobody is left to answer; one line instead of uvicorn's traceback (the
            # API's framework re-raises it too, after its 500 went nowhere).
            log.warning(
                "%s disconnected before sending the whole request (%s %s)",
                _client_name(scope),
                scope.get("method", "?"),
                scope.get("path", "?"),
            )

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        target = self.routes.resolve(scope["path"]) if scope["type"] == "http" else None
        if target is None:
            await self.api(scope, receive, send)
            return
        handler, method, label = target
        request = Request(scope, receive)
        response: Response
        if scope["method"] != method and not (method == "GET" and scope["method"] == "HEAD"):
            response = text_response(405, "method not allowed", {"Allow": method})
        else:
            try:
                response = await handler(request, label)
            except CaError as exc:
                response = await ca_error(request, exc)
            except RequestError as exc:
                response = await request_error(request, exc)
        await response(scope, receive, send)


def _client_name(scope: Scope) -> str:
    client = scope.get("client")
    return f"client {client[0]}:{client[1]}" if client else "a client"


def _base64_response(body: bytes, content_type: str) -> Response:
    return Response(
        body,
        status_code=200,
        media_type=content_type,
        headers={"Content-Transfer-Encoding": "base64"},
    )
