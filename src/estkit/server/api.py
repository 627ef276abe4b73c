"""The provisioning and operations REST API, under /api/v1 (OpenAPI at /api/openapi.json).

Thin adapters: each route authenticates (estkit bearer token or an OIDC JWT),
checks the scope it needs, and calls the authority or reads the store. Every
decision is audited where it is made (token use here, the rest in ``ca/``).
Routes are plain ``def``: FastAPI runs them in its thread pool, so database
and signing work never blocks the event loop.
"""

import datetime as dt
from collections.abc import Callable
from typing import Annotated, Literal

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from fastapi import APIRouter, Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from estkit.ca.authority import Authority, Issued
from estkit.ca.errors import Code, Refusal
from estkit.ca.secrets import API_TOKEN_PREFIX
from estkit.ca.tokens import TokenService
from estkit.durations import parse_duration
from estkit.pki.certs import certs_to_pem, fingerprint, parse_serial, serial_hex
from estkit.pki.revocation import REASONS
from estkit.server.config import ServerConfig
from estkit.server.errors import refusal_response
from estkit.server.nodes import DEFAULT_STALE_AFTER, est_url, region_urls
from estkit.server.oidc import InvalidToken, OidcVerifier
from estkit.store import (
    AuditEvent,
    CertificateRecord,
    CertStatus,
    Device,
    DeviceStatus,
    PendingRequest,
    PendingStatus,
    SqlStore,
)

RevocationReason = Literal[
    "unspecified",
    "keyCompromise",
    "cACompromise",
    "affiliationChanged",
    "superseded",
    "cessationOfOperation",
    "certificateHold",
    "privilegeWithdrawn",
    "aACompromise",
]
assert set(RevocationReason.__args__) == set(REASONS)  # type: ignore[attr-defined]

API_PREFIX = "/api/v1"
_CALLER = "api_caller"

DeviceId = Annotated[str, Field(min_length=1, max_length=64, examples=["dev-0001"])]
Limit = Annotated[int, Query(ge=1, le=1000, description="page size")]
Cursor = Annotated[str | None, Query(max_length=128, description="`next` of the previous page")]


# -- models -------------------------------------------------------------------------


class RegionEstUrl(BaseModel):
    region: str
    node: str = Field(description="the region's most recently seen node")
    url: str


class LabelOut(BaseModel):
    name: str
    est_url: str = Field(description="this node's EST URL of the label")
    est_urls: list[RegionEstUrl] = Field(
        default_factory=list, description="the label's EST URL in each region, by region"
    )
    profile: str
    approval: bool


class NodeOut(BaseModel):
    name: str
    region: str
    public_url: str
    est_url: str
    started_at: dt.datetime
    last_seen: dt.datetime
    stale: bool = Field(description="no heartbeat for three heartbeat intervals")
    version: str


class CaOut(BaseModel):
    name: str
    subject: str
    fingerprint_sha256: str
    not_after: dt.datetime
    chain: str = Field(description="PEM: this CA first, the root last")
    labels: list[LabelOut] = Field(description="EST labels issuing from this CA now")
    replaces: str | None = Field(
        default=None, description="the CA generation this one replaces (`estkit ca rotate`)"
    )
    issues_from: dt.datetime | None = Field(
        default=None, description="when this generation takes over issuing from `replaces`"
    )


class ProvisionIn(BaseModel):
    device_id: DeviceId
    csr: str = Field(max_length=32768, description="PEM PKCS#10 CSR, CN = device_id")
    validity: str | None = Field(
        default=None, max_length=16, description="may shorten the profile's, e.g. 365d"
    )
    sans: list[Annotated[str, Field(min_length=1, max_length=253)]] | None = Field(
        default=None,
        max_length=100,
        description="DNS names (default: the CSR's SANs); at most the label's max_sans",
    )


class ProvisionOut(BaseModel):
    serial: str
    device_id: str
    ca: str
    certificate: str
    chain: str = Field(description="PEM: the issuing CA first, the root last")
    not_before: dt.datetime
    not_after: dt.datetime


class CertificateOut(BaseModel):
    serial: str
    device_id: str
    ca: str
    label: str | None
    profile: str
    subject: str
    sans: list[str]
    not_before: dt.datetime
    not_after: dt.datetime
    status: CertStatus
    revoked_at: dt.datetime | None
    revocation_reason: str | None
    requested_via: str
    requested_by: str
    issued_at: dt.datetime
    replaces: str | None


class CertificateDetail(CertificateOut):
    pem: str


class CertificatePage(BaseModel):
    items: list[CertificateOut]
    next: str | None


class DeviceOut(BaseModel):
    device_id: str
    status: DeviceStatus
    created_at: dt.datetime
    updated_at: dt.datetime


class DeviceDetail(DeviceOut):
    certificates: list[CertificateOut]


class DevicePage(BaseModel):
    items: list[DeviceOut]
    next: str | None


class DeviceIn(BaseModel):
    device_id: DeviceId
    enrollment_secret: bool = Field(
        default=False, description="also return a one-time EST enrollment secret (HTTP Basic)"
    )
    rotate_secret: bool = Field(
        default=False,
        description="the device exists: give it a new enrollment secret; its unused one stops "
        "working (without this, an existing device is a 409)",
    )


class DeviceCreated(BaseModel):
    device: DeviceOut
    enrollment_secret: str | None = Field(description="shown once; stored only as a hash")


class StatusChange(BaseModel):
    device: DeviceOut
    revoked: list[str]


class RevokeIn(BaseModel):
    reason: RevocationReason = "unspecified"


class AuditOut(BaseModel):
    id: int
    at: dt.datetime
    actor: str
    action: str
    outcome: str
    device_id: str | None
    serial: str | None
    detail: str


class AuditPage(BaseModel):
    items: list[AuditOut]
    next: str | None


class PendingOut(BaseModel):
    id: int
    label: str
    device_id: str
    operation: str
    requested_by: str
    status: PendingStatus
    created_at: dt.datetime
    decided_at: dt.datetime | None
    decided_by: str | None
    reason: str | None
    serial: str | None


class PendingPage(BaseModel):
    items: list[PendingOut]
    next: str | None


class DecisionIn(BaseModel):
    reason: str | None = Field(default=None, max_length=500)


def _cert_out(r: CertificateRecord) -> CertificateOut:
    # CertificateOut's fields are CertificateRecord's but the DER (a test pins that).
    return CertificateOut(**{name: getattr(r, name) for name in CertificateOut.model_fields})


def _device_out(d: Device) -> DeviceOut:
    return DeviceOut(
        device_id=d.device_id, status=d.status, created_at=d.created_at, updated_at=d.updated_at
    )


def _audit_out(e: AuditEvent) -> AuditOut:
    assert e.id is not None
    return AuditOut(
        id=e.id,
        at=e.at,
        actor=e.actor,
        action=e.action,
        outcome=e.outcome,
        device_id=e.device_id,
        serial=e.serial,
        detail=e.detail,
    )


def _pending_out(p: PendingRequest) -> PendingOut:
    return PendingOut(
        id=p.id,
        label=p.label,
        device_id=p.device_id,
        operation=p.operation,
        requested_by=p.requested_by,
        status=p.status,
        created_at=p.created_at,
        decided_at=p.decided_at,
        decided_by=p.decided_by,
        reason=p.reason,
        serial=p.serial,
    )


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def _serial(text: str) -> str:
    try:
        return serial_hex(parse_serial(text))
    except ValueError as exc:
        raise Refusal(Code.BAD_REQUEST, str(exc)) from None


def _int_cursor(cursor: str | None) -> int | None:
    if cursor is None:
        return None
    if not cursor.isdigit() or len(cursor) > 18:
        raise Refusal(Code.BAD_REQUEST, "cursor: use the `next` value of the previous page")
    return int(cursor)


# -- authentication -------------------------------------------------------------------


class ApiCaller(BaseModel):
    actor: str
    scopes: frozenset[str]


_bearer = HTTPBearer(auto_error=False, description="estkit API token or OIDC access token")


class ApiAuthentication:
    """Who calls /api/v1: authenticated before anything else looks at the request.

    An ASGI middleware, so a caller without a valid token gets 401 whatever its
    body holds (FastAPI would otherwise validate the body first). The caller is
    left in ``scope["state"]``; each route then checks the scope it needs.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        tokens: TokenService,
        oidc: OidcVerifier | None,
        clock: Callable[[], dt.datetime],
    ) -> None:
        self.app = app
        self._tokens = tokens
        self._oidc = oidc
        self._clock = clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(API_PREFIX + "/"):
            request = Request(scope)
            try:
                caller = await run_in_threadpool(self._authenticate, request)
            except Refusal as refusal:
                await refusal_response(request, refusal)(scope, receive, send)
                return
            scope.setdefault("state", {})[_CALLER] = caller
        await self.app(scope, receive, send)

    def _authenticate(self, request: Request) -> ApiCaller:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Refusal(Code.TOKEN_INVALID, "bearer token required")
        use = f"{request.method} {request.url.path}"
        now = self._clock()
        if token.startswith(API_TOKEN_PREFIX) or self._oidc is None:
            actor, scopes = self._tokens.authenticate(token, now=now, use=use)
        else:
            try:
                actor, scopes = self._oidc.verify(token)
            except InvalidToken as exc:
                self._tokens.audit_refusal(actor="oidc", detail=f"{exc} ({use})", now=now)
                raise Refusal(Code.TOKEN_INVALID, str(exc)) from None
            self._tokens.audit_use(actor=actor, detail=use, now=now)
        return ApiCaller(actor=actor, scopes=scopes)


def make_auth(
    tokens: TokenService, clock: Callable[[], dt.datetime]
) -> Callable[[str], Callable[..., ApiCaller]]:
    """``Depends(auth("read"))``: the authenticated caller, if it has the scope, else 403."""

    def auth(scope: str) -> Callable[..., ApiCaller]:
        def dependency(
            request: Request,
            # Only documents the scheme in OpenAPI; ApiAuthentication did the work.
            _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
        ) -> ApiCaller:
            caller: ApiCaller | None = getattr(request.state, _CALLER, None)
            if caller is None:  # only if the middleware is missing: fail closed
                raise Refusal(Code.TOKEN_INVALID, "bearer token required")
            tokens.require_scope(
                caller.scopes, scope, actor=caller.actor, use=request.url.path, now=clock()
            )
            return caller

        return dependency

    return auth


# -- routes -----------------------------------------------------------------------------


def api_router(
    *,
    authority: Authority[SqlStore],
    store: SqlStore,
    config: ServerConfig,
    tokens: TokenService,
    clock: Callable[[], dt.datetime],
    stale_after: dt.timedelta = DEFAULT_STALE_AFTER,
) -> APIRouter:
    auth = make_auth(tokens, clock)
    Reader = Annotated[ApiCaller, Depends(auth("read"))]
    Provisioner = Annotated[ApiCaller, Depends(auth("provision"))]
    Admin = Annotated[ApiCaller, Depends(auth("admin"))]
    router = APIRouter(prefix=API_PREFIX)

    @router.get("/cas", tags=["CAs"], summary="CAs and EST labels with chains and fingerprints")
    def list_cas(_: Reader) -> list[CaOut]:
        out = []
        regions = region_urls(store.list_nodes())
        now = clock()
        for name, ca in authority.cas.items():
            labels = [
                LabelOut(
                    name=label.name,
                    est_url=f"{config.est_url}/{label.name}",
                    est_urls=[
                        RegionEstUrl(
                            region=r.region, node=r.node, url=est_url(r.public_url, label.name)
                        )
                        for r in regions
                    ],
                    profile=label.profile.name,
                    approval=label.approval,
                )
                for label in authority.labels.values()
                if authority.issuing_ca(label, now=now).name == name
            ]
            out.append(
                CaOut(
                    name=name,
                    subject=ca.cert.subject.rfc4514_string(),
                    fingerprint_sha256=fingerprint(ca.cert),
                    not_after=ca.cert.not_valid_after_utc,
                    chain=certs_to_pem(ca.chain).decode(),
                    labels=labels,
                    replaces=ca.generation.replaces,
                    issues_from=ca.generation.issues_from,
                )
            )
        return out

    @router.get("/nodes", tags=["nodes"], summary="Server nodes sharing this database")
    def list_nodes(_: Reader) -> list[NodeOut]:
        now = clock()
        return [
            NodeOut(
                name=n.name,
                region=n.region,
                public_url=n.public_url,
                est_url=est_url(n.public_url),
                started_at=n.started_at,
                last_seen=n.last_seen,
                stale=n.stale(now=now, after=stale_after),
                version=n.version,
            )
            for n in store.list_nodes()
        ]

    @router.post(
        "/cas/{label}/certificates",
        status_code=201,
        tags=["CAs"],
        summary="Factory: sign a device's CSR (label `bootstrap` for bootstrap certificates)",
        responses={400: {}, 401: {}, 403: {}, 404: {}},
    )
    def provision(label: str, body: ProvisionIn, caller: Provisioner) -> ProvisionOut:
        try:
            csr = x509.load_pem_x509_csr(body.csr.encode())
        except ValueError:
            raise Refusal(Code.BAD_CSR, "csr: not a PEM PKCS#10 certification request") from None
        try:
            validity = parse_duration(body.validity) if body.validity else None
        except ValueError as exc:
            raise Refusal(Code.BAD_REQUEST, f"validity: {exc}") from None
        if label != "bootstrap":
            authority.label(label)
        issued: Issued = authority.provision(
            label,
            csr.public_bytes(Encoding.DER),
            device_id=body.device_id,
            actor=caller.actor,
            now=clock(),
            via="api-provision",
            validity=validity,
            dns_names=body.sans,
        )
        return ProvisionOut(
            serial=issued.record.serial,
            device_id=issued.record.device_id,
            ca=issued.record.ca,
            certificate=certs_to_pem([issued.certificate]).decode(),
            chain=certs_to_pem(issued.chain).decode(),
            not_before=issued.record.not_before,
            not_after=issued.record.not_after,
        )

    @router.get("/devices", tags=["devices"], summary="Devices, by id")
    def list_devices(
        _: Reader,
        status: DeviceStatus | None = None,
        limit: Limit = 100,
        cursor: Cursor = None,
    ) -> DevicePage:
        page = store.list_devices(status=status, after=cursor, limit=limit)
        return DevicePage(items=[_device_out(d) for d in page.items], next=page.next)

    @router.post(
        "/devices",
        status_code=201,
        tags=["devices"],
        summary="Register a device",
        responses={400: {}, 409: {}},
    )
    def add_device(body: DeviceIn, caller: Provisioner) -> DeviceCreated:
        secret = authority.register_device(
            body.device_id,
            actor=caller.actor,
            now=clock(),
            with_secret=body.enrollment_secret,
            rotate_secret=body.rotate_secret,
        )
        device = store.get_device(body.device_id)
        assert device is not None
        return DeviceCreated(device=_device_out(device), enrollment_secret=secret)

    @router.get("/devices/{device_id}", tags=["devices"], responses={404: {}})
    def get_device(device_id: str, _: Reader) -> DeviceDetail:
        device = store.get_device(device_id)
        if device is None:
            raise Refusal(Code.NOT_FOUND, f"no device {device_id!r}")
        certs = [_cert_out(c) for c in store.certificates_of(device_id)]
        return DeviceDetail(**_device_out(device).model_dump(), certificates=certs)

    def _status_route(status: DeviceStatus) -> Callable[[str, ApiCaller], StatusChange]:
        def change(device_id: str, caller: Admin) -> StatusChange:
            revoked = authority.set_device_status(
                device_id, status, actor=caller.actor, now=clock()
            )
            device = store.get_device(device_id)
            assert device is not None
            return StatusChange(device=_device_out(device), revoked=revoked)

        return change

    for action, status, text in (
        ("disable", DeviceStatus.DISABLED, "Refuse the device until enabled again"),
        ("enable", DeviceStatus.ACTIVE, "Accept a disabled device again"),
        ("decommission", DeviceStatus.DECOMMISSIONED, "Revoke all its certificates; refuse it"),
    ):
        router.add_api_route(
            f"/devices/{{device_id}}/{action}",
            _status_route(status),
            methods=["POST"],
            tags=["devices"],
            summary=text,
            responses={404: {}, 409: {}},
        )

    @router.get("/certificates", tags=["certificates"], summary="Issued certificates")
    def list_certificates(
        _: Reader,
        device_id: Annotated[str | None, Query(max_length=64)] = None,
        status: CertStatus | None = None,
        expires_before: dt.datetime | None = None,
        expires_after: Annotated[
            dt.datetime | None,
            Query(description="with expires_before: 'expiring soon' = not yet expired"),
        ] = None,
        ca: Annotated[str | None, Query(max_length=64)] = None,
        limit: Limit = 100,
        cursor: Cursor = None,
    ) -> CertificatePage:
        after = _serial(cursor) if cursor else None
        page = store.list_certificates(
            device_id=device_id,
            status=status,
            expires_before=_utc(expires_before),
            expires_after=_utc(expires_after),
            ca=ca,
            after=after,
            limit=limit,
        )
        return CertificatePage(items=[_cert_out(c) for c in page.items], next=page.next)

    @router.get("/certificates/{serial}", tags=["certificates"], responses={400: {}, 404: {}})
    def get_certificate(serial: str, _: Reader) -> CertificateDetail:
        record = store.get_certificate(_serial(serial))
        if record is None:
            raise Refusal(Code.NOT_FOUND, f"no certificate {serial}")
        pem = x509.load_der_x509_certificate(record.der).public_bytes(Encoding.PEM).decode()
        return CertificateDetail(**_cert_out(record).model_dump(), pem=pem)

    @router.post(
        "/certificates/{serial}/revoke",
        tags=["certificates"],
        responses={400: {}, 404: {}, 409: {}},
    )
    def revoke_certificate(
        serial: str, caller: Admin, body: RevokeIn | None = None
    ) -> CertificateOut:
        reason = (body or RevokeIn()).reason
        record = authority.revoke(_serial(serial), reason=reason, actor=caller.actor, now=clock())
        return _cert_out(record)

    @router.get("/audit", tags=["audit"], summary="The audit log, oldest first")
    def list_audit(
        _: Reader,
        since: dt.datetime | None = None,
        actor: Annotated[str | None, Query(max_length=256)] = None,
        device_id: Annotated[str | None, Query(max_length=64)] = None,
        limit: Limit = 100,
        cursor: Cursor = None,
    ) -> AuditPage:
        page = store.list_audit(
            since=_utc(since),
            actor=actor,
            device_id=device_id,
            after=_int_cursor(cursor),
            limit=limit,
        )
        return AuditPage(items=[_audit_out(e) for e in page.items], next=page.next)

    @router.get("/pending", tags=["approval"], summary="Enrollments waiting for approval")
    def list_pending(
        _: Reader,
        status: PendingStatus | None = PendingStatus.PENDING,
        limit: Limit = 100,
        cursor: Cursor = None,
    ) -> PendingPage:
        page = store.list_pending(status=status, after=_int_cursor(cursor), limit=limit)
        return PendingPage(items=[_pending_out(p) for p in page.items], next=page.next)

    def _decision_route(approve: bool) -> Callable[..., PendingOut]:
        def decide(request_id: int, caller: Admin, body: DecisionIn | None = None) -> PendingOut:
            if not 1 <= request_id < 2**62:
                raise Refusal(Code.NOT_FOUND, f"no pending request {request_id}")
            request = authority.decide(
                request_id,
                approve=approve,
                actor=caller.actor,
                now=clock(),
                reason=body.reason if body else None,
            )
            return _pending_out(request)

        return decide

    for action, approve in (("approve", True), ("deny", False)):
        router.add_api_route(
            f"/pending/{{request_id}}/{action}",
            _decision_route(approve),
            methods=["POST"],
            tags=["approval"],
            summary=f"{action.capitalize()} a waiting request",
            responses={404: {}, 409: {}},
        )

    return router
