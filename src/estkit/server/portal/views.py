"""The operator portal's pages under ``/ui``: server-rendered HTML, JavaScript only
for copy buttons.

Reading needs a session of an API token with scope ``read`` or ``admin``; every
action needs ``admin`` and the session's CSRF token, and goes through the
authority's own methods, which audit it with the actor ``ui:<token name>``.
Handlers are plain functions run in the thread pool (database and signing work
never blocks the event loop), as the REST API's are.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote, urlencode

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from estkit.ca import iothub
from estkit.ca.authority import REVOCATION_REASONS, Authority
from estkit.ca.errors import Code, Refusal
from estkit.ca.ports import translated
from estkit.ca.secrets import token_digest
from estkit.ca.signers import chain_to_root
from estkit.ca.tokens import SCOPES, TokenService
from estkit.durations import EXAMPLES, parse_duration
from estkit.pki.certs import (
    certs_to_pem,
    fingerprint,
    load_pem_certificates,
    parse_serial,
    serial_hex,
)
from estkit.server.config import ServerConfig
from estkit.server.errors import STATUS
from estkit.server.nodes import est_url, region_urls
from estkit.server.portal import charts
from estkit.server.portal.oidc_signin import (
    FLOW_COOKIE,
    FLOW_LIFETIME,
    OidcSignIn,
    ProviderUnavailable,
    SignInRefused,
)
from estkit.server.portal.session import (
    LOGIN_COOKIE,
    LOGIN_LIFETIME,
    SESSION_COOKIE,
    SESSION_LIFETIME,
    SessionSigner,
)
from estkit.server.portal.web import (
    STATIC_DIR,
    FormTooLarge,
    clear_cookie,
    download,
    html,
    local_path,
    read_form,
    see_other,
    set_cookie,
    templates,
)
from estkit.server.wiring import installed_cas
from estkit.store import (
    ApiToken,
    CertificateRecord,
    CertStatus,
    Device,
    DeviceStatus,
    PendingStatus,
    SqlStore,
)

PAGE_SIZE = 50
EXPIRING_SOON = dt.timedelta(days=7)
# A device is "renewal due" once its operational certificate is past the point of its
# lifetime where the agent renews by default (``renewal.fraction``, agent/config.py).
RENEWAL_DUE = 0.8
CHART_DAYS = 30
READ_SCOPES = frozenset({"read", "admin"})

Need = Literal["public", "read", "admin"]

# What a device action does, said on its confirmation page before it is done.
DEVICE_ACTIONS: dict[str, tuple[DeviceStatus, str]] = {
    "disable": (
        DeviceStatus.DISABLED,
        "EST refuses the device (enroll, re-enroll, server-side keygen) until it is "
        "enabled again. Its certificates are not revoked.",
    ),
    "enable": (DeviceStatus.ACTIVE, "EST accepts the device again."),
    "decommission": (
        DeviceStatus.DECOMMISSIONED,
        "Every valid certificate of the device is revoked (reason cessationOfOperation) "
        "and the CRLs are republished; EST refuses the device for good: a decommissioned "
        "device cannot be enabled again.",
    ),
}
# Messages after an action's redirect (``?done=``): fixed texts, nothing echoed.
DONE = {
    "revoked": "The certificate is revoked.",
    "disable": "The device is disabled.",
    "enable": "The device is enabled.",
    "decommission": "The device is decommissioned.",
    "approve": "The request is approved: the device gets its certificate at its next retry.",
    "deny": "The request is denied.",
    "token-revoked": "The token is revoked: API calls with it are refused, its sessions ended.",
}
LIFECYCLE = (
    ("valid", "with a valid certificate"),
    ("renewal-due", f"renewal due (past {RENEWAL_DUE:.0%} of its lifetime)"),
    ("expiring", f"expiring within {EXPIRING_SOON.days} days"),
    ("expired", "expired"),
    ("revoked", "revoked"),
    ("never-enrolled", "never enrolled"),
)


@dataclass(frozen=True, slots=True)
class SignedIn:
    name: str  # the API token's name, or oidc:<sub>
    admin: bool
    csrf: str

    @property
    def actor(self) -> str:
        return f"ui:{self.name}"


@dataclass(frozen=True, slots=True)
class Call:
    """One request as a handler sees it."""

    request: Request
    form: Mapping[str, str]
    who: SignedIn | None
    now: dt.datetime

    def param(self, name: str) -> str:
        return str(self.request.path_params[name])

    def query(self, name: str, *, max_length: int = 128) -> str | None:
        value = self.request.query_params.get(name, "").strip()
        if len(value) > max_length:
            raise Refusal(Code.BAD_REQUEST, f"{name}: at most {max_length} characters")
        return value or None


@dataclass(frozen=True, slots=True)
class CaFacts:
    """What a CA's page shows that never changes while the server runs."""

    name: str
    signer: str
    subject: str
    issuer: str
    not_before: dt.datetime
    not_after: dt.datetime
    key_type: str
    fingerprint: str
    chain_pem: bytes
    replaces: str | None
    issues_from: dt.datetime | None
    replaced_by: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ChainCheck:
    """One verification of the audit log's hash chain (``SqlStore.verify_audit_chain``)."""

    at: dt.datetime  # when it finished
    checked: int  # entries intact (before the broken one, if any)
    broken: int | None  # the first entry that breaks the chain
    why: str


class ChainChecks:
    """Runs the chain verification one at a time in this process and remembers the last
    result for the audit page. A request that arrives while a run goes on gets that
    run's result: a pass over every entry is not started again and again."""

    def __init__(self, store: SqlStore, clock: Callable[[], dt.datetime]) -> None:
        self._store = store
        self._clock = clock
        self._lock = threading.Lock()
        self.last: ChainCheck | None = None

    def verify(self, asked_at: dt.datetime) -> ChainCheck:
        with self._lock:
            if self.last is not None and self.last.at >= asked_at:
                return self.last  # finished while this request waited for the lock
            with translated():
                checked, broken, why = self._store.verify_audit_chain()
            self.last = ChainCheck(at=self._clock(), checked=checked, broken=broken, why=why)
            return self.last


def key_type(cert: x509.Certificate) -> str:
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        curves = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
        return f"EC {curves.get(key.curve.name, key.curve.name)}"
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    if isinstance(key, ed448.Ed448PublicKey):
        return "Ed448"
    return type(key).__name__


def ca_facts(config: ServerConfig) -> dict[str, CaFacts]:
    cas = installed_cas(config)
    certs = {n: load_pem_certificates(c.cert.read_bytes())[0] for n, c in cas.items()}
    facts = {
        name: CaFacts(
            name=name,
            signer=ca.signer,
            subject=certs[name].subject.rfc4514_string(),
            issuer=certs[name].issuer.rfc4514_string(),
            not_before=certs[name].not_valid_before_utc,
            not_after=certs[name].not_valid_after_utc,
            key_type=key_type(certs[name]),
            fingerprint=fingerprint(certs[name]),
            chain_pem=certs_to_pem(chain_to_root(certs[name], certs)),
            replaces=ca.generation.replaces,
            issues_from=ca.generation.issues_from,
        )
        for name, ca in cas.items()
    }
    for fact in facts.values():
        if fact.replaces in facts:
            facts[fact.replaces].replaced_by.append(fact.name)
    return facts


def _serial(text: str) -> str:
    try:
        return serial_hex(parse_serial(text))
    except ValueError as exc:
        raise Refusal(Code.BAD_REQUEST, str(exc)) from None


def _day_start(now: dt.datetime) -> dt.datetime:
    return now.astimezone(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)


class Portal:
    """The pages, each a plain function of a ``Call``; ``routes()`` mounts them under
    ``/ui`` with the scope each needs."""

    def __init__(
        self,
        *,
        authority: Authority[SqlStore],
        store: SqlStore,
        config: ServerConfig,
        tokens: TokenService,
        signer: SessionSigner,
        clock: Callable[[], dt.datetime],
        stale_after: dt.timedelta,
        oidc: OidcSignIn | None = None,
    ) -> None:
        self._authority = authority
        self._oidc = oidc
        self._store = store
        self._config = config
        self._tokens = tokens
        self._signer = signer
        self._clock = clock
        self._stale_after = stale_after
        self._env = templates()
        self._cas = ca_facts(config)
        self._chain = ChainChecks(store, clock)

    # -- routing, authentication, CSRF ------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        pages: list[tuple[str, Callable[[Call], Response], Need, list[str]]] = [
            ("/login", self.login_page, "public", ["GET"]),
            ("/login", self.login, "public", ["POST"]),
            ("/login/oidc", self.oidc_start, "public", ["GET"]),
            ("/login/oidc/callback", self.oidc_callback, "public", ["GET"]),
            ("/logout", self.logout, "read", ["POST"]),
            ("/", self.dashboard, "read", ["GET"]),
            ("/cas", self.cas, "read", ["GET"]),
            ("/cas/{name}", self.ca, "read", ["GET"]),
            ("/cas/{name}/chain.pem", self.ca_chain, "read", ["GET"]),
            ("/cas/{name}/iothub-verify", self.iothub_verify, "admin", ["POST"]),
            ("/certificates", self.certificates, "read", ["GET"]),
            ("/certificates/{serial}", self.certificate, "read", ["GET"]),
            ("/certificates/{serial}/cert.pem", self.certificate_pem, "read", ["GET"]),
            ("/certificates/{serial}/revoke", self.revoke_page, "admin", ["GET"]),
            ("/certificates/{serial}/revoke", self.revoke, "admin", ["POST"]),
            ("/devices", self.devices, "read", ["GET"]),
            ("/devices/{device_id}", self.device, "read", ["GET"]),
            ("/devices/{device_id}/{action}", self.device_action_page, "admin", ["GET"]),
            ("/devices/{device_id}/{action}", self.device_action, "admin", ["POST"]),
            ("/approvals", self.approvals, "read", ["GET"]),
            ("/approvals/{request_id:int}/{decision}", self.decide, "admin", ["POST"]),
            ("/audit", self.audit, "read", ["GET"]),
            ("/audit/chain", self.audit_chain, "read", ["GET"]),
            ("/tokens", self.tokens, "admin", ["GET"]),
            ("/tokens", self.token_create, "admin", ["POST"]),
            ("/tokens/{name}/revoke", self.token_revoke_page, "admin", ["GET"]),
            ("/tokens/{name}/revoke", self.token_revoke, "admin", ["POST"]),
        ]
        routes: list[BaseRoute] = [
            Route(path, self._endpoint(view, need), methods=methods)
            for path, view, need, methods in pages
        ]
        routes.append(Mount("/static", StaticFiles(directory=STATIC_DIR), name="portal-static"))
        return routes

    def _endpoint(
        self, view: Callable[[Call], Response], need: Need
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            form: dict[str, str] = {}
            if request.method == "POST":
                try:
                    form = await read_form(request)
                except FormTooLarge:
                    return PlainTextResponse("form too large\n", status_code=413)
            return await run_in_threadpool(self._serve, view, need, request, form)

        return endpoint

    def _serve(
        self, view: Callable[[Call], Response], need: Need, request: Request, form: dict[str, str]
    ) -> Response:
        now = self._clock()
        who: SignedIn | None = None
        try:
            if need != "public":
                who = self._signed_in(request, now)
                if who is None:
                    return self._signed_out(request)
            if who is not None and (refused := self._refused(who, need, request, form, now)):
                return refused
            return view(Call(request=request, form=form, who=who, now=now))
        except Refusal as refusal:
            return self._error(who, STATUS[refusal.code], refusal.reason)

    def _signed_out(self, request: Request) -> Response:
        """A page asks to sign in first (and comes back); an action is refused."""
        if request.method != "GET":
            return self._error(None, 403, "not signed in (or the session ended): sign in again")
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return see_other("/ui/login?" + urlencode({"next": target}))

    def _refused(
        self, who: SignedIn, need: Need, request: Request, form: dict[str, str], now: dt.datetime
    ) -> Response | None:
        """A POST without the session's CSRF token, or an action of a ``read`` user:
        403, audited. ``require_scope`` raises the scope refusal."""
        use = f"{request.method} {request.url.path}"
        if request.method == "POST" and not self._signer.same(form.get("csrf"), who.csrf):
            self._tokens.audit_refusal(
                actor=who.actor, detail=f"CSRF token missing or wrong ({use})", now=now
            )
            return self._error(who, 403, "the form's CSRF token is missing or wrong")
        if need == "admin" and not who.admin:
            self._tokens.require_scope(
                frozenset({"read"}), "admin", actor=who.actor, use=use, now=now
            )
        return None

    def _signed_in(self, request: Request, now: dt.datetime) -> SignedIn | None:
        value = request.cookies.get(SESSION_COOKIE)
        session = self._signer.parse(value, now=now) if value else None
        if value is None or session is None:
            return None
        if session.subject is not None:
            if self._oidc is None or not self._signer.verify_subject(value):
                return None
            scopes = self._oidc.scopes(session.subject)
            if not scopes & READ_SCOPES:
                return None
            return SignedIn(
                name=f"oidc:{session.subject}",
                admin="admin" in scopes,
                csrf=self._signer.csrf(session),
            )
        if session.token_id is None:
            return None
        with translated():
            token = self._store.get_token_by_id(session.token_id)
        if token is None or not self._signer.verify(value, token):
            return None
        if token.revoked_at is not None or (
            token.expires_at is not None and token.expires_at <= now
        ):
            return None
        if not token.scopes & READ_SCOPES:
            return None
        return SignedIn(
            name=token.name, admin="admin" in token.scopes, csrf=self._signer.csrf(session)
        )

    def _render(
        self, template: str, who: SignedIn | None, *, http_status: int = 200, **context: Any
    ) -> Response:
        page = self._env.get_template(template).render(who=who, **context)
        return html(page, status=http_status)

    def _error(self, who: SignedIn | None, status: int, reason: str) -> Response:
        return self._render(
            "error.html",
            who,
            http_status=status,
            title="Refused",
            reason=reason,
            status_code=status,
        )

    # -- sign-in ----------------------------------------------------------------------

    def login_page(self, call: Call, *, status: int = 200, reason: str | None = None) -> Response:
        nonce = self._signer.login_nonce()
        response = self._render(
            "login.html",
            None,
            http_status=status,
            title="Sign in",
            csrf=self._signer.login_csrf(nonce),
            next=local_path(call.query("next", max_length=512) or call.form.get("next")),
            reason=reason,
            oidc=self._oidc.provider if self._oidc is not None else None,
        )
        set_cookie(response, LOGIN_COOKIE, nonce, max_age=LOGIN_LIFETIME)
        return response

    def login(self, call: Call) -> Response:
        nonce = call.request.cookies.get(LOGIN_COOKIE)
        if nonce is None or not self._signer.same(
            call.form.get("csrf"), self._signer.login_csrf(nonce)
        ):
            return self.login_page(call, status=403, reason="the sign-in form expired: try again")
        token = call.form.get("token", "").strip()
        try:
            actor, scopes = self._tokens.authenticate(
                token, now=call.now, use="portal sign-in (POST /ui/login)"
            )
            if not scopes & READ_SCOPES:
                self._tokens.require_scope(
                    scopes, "read", actor=actor, use="portal sign-in", now=call.now
                )
            with translated():
                record = self._store.find_token(token_digest(token))
        except Refusal as refusal:
            return self.login_page(call, status=STATUS[refusal.code], reason=refusal.reason)
        assert record is not None
        cookie, _ = self._signer.issue(record, now=call.now)
        response = see_other(local_path(call.form.get("next")))
        set_cookie(response, SESSION_COOKIE, cookie, max_age=SESSION_LIFETIME)
        clear_cookie(response, LOGIN_COOKIE)
        return response

    def oidc_start(self, call: Call) -> Response:
        """To the identity provider, with this browser's pre-session cookie (a link, not
        a form: the CSP's form-action would stop a form's redirect to another site)."""
        if self._oidc is None:
            raise Refusal(Code.NOT_FOUND, "OIDC sign-in is not configured")
        try:
            url, cookie = self._oidc.start(
                local_path(call.query("next", max_length=512)), now=call.now
            )
        except SignInRefused as refused:
            return self.login_page(call, status=503, reason=str(refused))
        response = see_other(url)
        set_cookie(response, FLOW_COOKIE, cookie, max_age=FLOW_LIFETIME, samesite="lax")
        return response

    def oidc_callback(self, call: Call) -> Response:
        """Back from the identity provider: the ID token's ``sub`` signs in with the
        scopes ``[api.oidc.clients]`` grants it; a refusal is audited and shown."""
        if self._oidc is None:
            raise Refusal(Code.NOT_FOUND, "OIDC sign-in is not configured")
        actor, use = "oidc", "portal sign-in (OIDC)"
        try:
            flow = self._oidc.flow(call.request.cookies.get(FLOW_COOKIE), now=call.now)
            claims = self._oidc.finish(flow, dict(call.request.query_params))
            subject = str(claims["sub"])
            actor = f"oidc:{subject}"
            if not self._oidc.scopes(subject) & READ_SCOPES:
                raise SignInRefused(
                    f"{subject} may not use the portal: [api.oidc.clients] grants it "
                    "no read or admin scope"
                )
        except SignInRefused as refused:
            self._tokens.audit_refusal(actor=actor, detail=f"{use}: {refused}", now=call.now)
            status = 503 if isinstance(refused, ProviderUnavailable) else 403
            response = self.login_page(call, status=status, reason=str(refused))
            clear_cookie(response, FLOW_COOKIE)
            return response
        self._tokens.audit_use(actor=actor, detail=use, now=call.now)
        cookie, _ = self._signer.issue_subject(subject, now=call.now)
        # A page of ours moves on to the portal, not a redirect: a browser that judges
        # SameSite by the whole redirect chain (through the provider's site) would not
        # send the Strict session cookie with the redirect's next request.
        response = self._render(
            "signed_in.html", None, title="Signed in", name=actor, next=flow.next_path
        )
        set_cookie(response, SESSION_COOKIE, cookie, max_age=SESSION_LIFETIME)
        clear_cookie(response, FLOW_COOKIE)
        return response

    def logout(self, call: Call) -> Response:
        response = see_other("/ui/login")
        clear_cookie(response, SESSION_COOKIE)
        return response

    # -- dashboard --------------------------------------------------------------------

    def dashboard(self, call: Call) -> Response:
        now = call.now
        today = _day_start(now)
        bootstrap = [n for n in self._cas if self._authority.family(n) == "bootstrap"]
        with translated():
            states = self._store.device_states(
                now=now,
                soon=now + EXPIRING_SOON,
                exclude_cas=bootstrap,
                renewal_fraction=RENEWAL_DUE,
            )
            since = today - dt.timedelta(days=CHART_DAYS - 1)
            issued = self._store.issued_per_day(since=since, until=today + dt.timedelta(1))
            refused = self._store.refusals_per_day(
                since=since, until=today + dt.timedelta(1), codes=[c.value for c in Code]
            )
            expiring = self._store.expiring_per_day(
                since=now, until=today + dt.timedelta(days=CHART_DAYS)
            )
            nodes = self._store.list_nodes()
            waiting = self._store.list_pending(status=PendingStatus.PENDING, limit=100)
        by_status = {s.value: 0 for s in DeviceStatus}
        by_state = {state: 0 for state, _ in LIFECYCLE}
        for (status, state), n in states.items():
            by_status[status.value] += n
            by_state[state] = by_state.get(state, 0) + n
        past = charts.days(today.date() - dt.timedelta(days=CHART_DAYS - 1), CHART_DAYS)
        ahead = charts.days(today.date(), CHART_DAYS)
        issued_bars = charts.daily_bars(issued, past)
        expiry_bars = charts.daily_bars(expiring, ahead)
        codes, refusal_columns = charts.stack_series(refused, past)
        return self._render(
            "dashboard.html",
            call.who,
            title="Dashboard",
            by_status=by_status,
            by_state=by_state,
            lifecycle=LIFECYCLE,
            devices=sum(by_status.values()),
            issued_chart=charts.bar_chart(issued_bars, title="Certificates issued per day"),
            expiry_chart=charts.bar_chart(expiry_bars, title="Certificates expiring per day"),
            issued_rows=list(zip(past, (b.value for b in issued_bars), strict=True)),
            expiry_rows=list(zip(ahead, (b.value for b in expiry_bars), strict=True)),
            refusal_chart=charts.stacked_chart(
                refusal_columns, title="Refusals per day by refusal code"
            ),
            refusal_codes=codes,
            refusal_table=sorted({code for _, code in refused}),
            refusal_rows=[
                (day, {c: n for (d, c), n in refused.items() if d == day}) for day in past
            ],
            nodes=[(n, n.stale(now=now, after=self._stale_after)) for n in nodes],
            waiting=len(waiting.items),
            waiting_more=waiting.next is not None,
        )

    # -- certificate authorities --------------------------------------------------------

    def _fact(self, call: Call) -> CaFacts:
        fact = self._cas.get(call.param("name"))
        if fact is None:
            raise Refusal(Code.NOT_FOUND, f"no CA {call.param('name')!r}")
        return fact

    def cas(self, call: Call) -> Response:
        return self._render(
            "cas.html",
            call.who,
            title="Certificate authorities",
            cas=list(self._cas.values()),
            current={n for n in self._cas if self._current(n, call.now)},
        )

    def _current(self, name: str, now: dt.datetime) -> bool:
        """The CA is the generation of its family in use at ``now``: its moment has come
        and no generation replacing it has had its moment (``ca/generations.py``)."""

        def started(fact: CaFacts) -> bool:
            return fact.issues_from is None or fact.issues_from <= now

        fact = self._cas[name]
        return started(fact) and not any(started(self._cas[n]) for n in fact.replaced_by)

    def ca(self, call: Call, *, http_status: int = 200, reason: str | None = None) -> Response:
        fact = self._fact(call)
        family = self._authority.family(fact.name)
        with translated():
            regions = region_urls(self._store.list_nodes())
        labels = []
        for label in self._authority.labels.values():
            if label.ca != family:
                continue
            urls = [("this node", f"{self._config.est_url}/{label.name}")]
            if label.name == self._config.default_label:
                urls.append(("this node, default label", self._config.est_url))
            urls += [
                (f"region {r.region} (node {r.node})", est_url(r.public_url, label.name))
                for r in regions
            ]
            issuer = self._authority.issuing_ca(label, now=call.now).name
            labels.append({"label": label, "urls": urls, "issuer": issuer})
        crl_urls = []
        if self._config.crl.url:
            crl_urls.append(f"{self._config.crl.url}/{fact.name}.crl")
        crl_urls.append(f"{self._config.public_url.rstrip('/')}/crl/{fact.name}.crl")
        return self._render(
            "ca.html",
            call.who,
            http_status=http_status,
            reason=reason,
            code=call.form.get("code", ""),
            can_sign=fact.name in self._authority.cas,
            title=f"CA {fact.name}",
            ca=fact,
            labels=labels,
            crl_urls=crl_urls,
            family=family,
            current=self._current(fact.name, call.now),
        )

    def ca_chain(self, call: Call) -> Response:
        fact = self._fact(call)
        return download(
            fact.chain_pem,
            filename=f"{fact.name}-chain.pem",
            media_type="application/pem-certificate-chain",
        )

    def iothub_verify(self, call: Call) -> Response:
        """IoT Hub's proof of possession: the code in, the certificate out as a download
        (``ca/iothub.py``, as ``estkit ca iothub-verify``), audited."""
        fact = self._fact(call)
        assert call.who is not None
        try:
            cert = iothub.issue_verification(
                self._authority, fact.name, call.form.get("code", ""), actor=call.who.actor,
                now=call.now,
            )  # fmt: skip
        except Refusal as refusal:
            return self.ca(call, http_status=STATUS[refusal.code], reason=refusal.reason)
        return download(
            certs_to_pem([cert]),
            filename=f"{fact.name}-iothub-verification.pem",
            media_type="application/x-pem-file",
        )

    # -- certificates -----------------------------------------------------------------

    def certificates(self, call: Call) -> Response:
        device = call.query("device", max_length=128)
        ca = call.query("ca", max_length=64)
        status_text = call.query("status", max_length=16)
        within = call.query("expiring_within", max_length=5)
        after = call.query("after", max_length=64)
        status = None
        if status_text is not None:
            try:
                status = CertStatus(status_text)
            except ValueError:
                raise Refusal(Code.BAD_REQUEST, "status: valid or revoked") from None
        expires_before = expires_after = None
        if within is not None:
            if not within.isdigit() or not 1 <= int(within) <= 3650:
                raise Refusal(Code.BAD_REQUEST, "expiring within: 1 to 3650 days")
            expires_after, expires_before = call.now, call.now + dt.timedelta(days=int(within))
            status = status or CertStatus.VALID
        with translated():
            page = self._store.list_certificates(
                device_id=device,
                status=status,
                expires_before=expires_before,
                expires_after=expires_after,
                ca=ca,
                after=_serial(after) if after else None,
                limit=PAGE_SIZE,
            )
        filters = {"device": device, "ca": ca, "status": status_text, "expiring_within": within}
        return self._render(
            "certificates.html",
            call.who,
            title="Certificates",
            page=page,
            filters=filters,
            ca_names=list(self._cas),
            now=call.now,
        )

    def _record(self, call: Call) -> CertificateRecord:
        serial = _serial(call.param("serial"))
        with translated():
            record = self._store.get_certificate(serial)
        if record is None:
            raise Refusal(Code.NOT_FOUND, f"no certificate {serial}")
        return record

    def certificate(self, call: Call) -> Response:
        record = self._record(call)
        pem = x509.load_der_x509_certificate(record.der).public_bytes(Encoding.PEM).decode()
        return self._render(
            "certificate.html",
            call.who,
            title=f"Certificate {record.serial}",
            cert=record,
            pem=pem,
            now=call.now,
            done=DONE.get(call.query("done") or ""),
        )

    def certificate_pem(self, call: Call) -> Response:
        record = self._record(call)
        pem = x509.load_der_x509_certificate(record.der).public_bytes(Encoding.PEM)
        return download(pem, filename=f"{record.serial}.pem", media_type="application/x-pem-file")

    def revoke_page(self, call: Call) -> Response:
        record = self._record(call)
        return self._render(
            "revoke.html",
            call.who,
            title=f"Revoke {record.serial}",
            cert=record,
            reasons=REVOCATION_REASONS,
        )

    def revoke(self, call: Call) -> Response:
        serial = _serial(call.param("serial"))
        reason = call.form.get("reason", "unspecified")
        assert call.who is not None
        self._authority.revoke(serial, reason=reason, actor=call.who.actor, now=call.now)
        return see_other(f"/ui/certificates/{serial}?done=revoked")

    # -- devices ----------------------------------------------------------------------

    def devices(self, call: Call) -> Response:
        search = call.query("search", max_length=128)
        status_text = call.query("status", max_length=16)
        after = call.query("after", max_length=128)
        try:
            status = DeviceStatus(status_text) if status_text else None
        except ValueError:
            raise Refusal(Code.BAD_REQUEST, "status: active, disabled or decommissioned") from None
        with translated():
            page = self._store.list_devices(
                status=status, search=search, after=after, limit=PAGE_SIZE
            )
        filters = {"search": search, "status": status_text}
        return self._render(
            "devices.html",
            call.who,
            title="Devices",
            page=page,
            filters=filters,
            statuses=[s.value for s in DeviceStatus],
        )

    def _device(self, call: Call) -> Device:
        device_id = call.param("device_id")
        with translated():
            device = self._store.get_device(device_id)
        if device is None:
            raise Refusal(Code.NOT_FOUND, f"no device {device_id!r}")
        return device

    def device(self, call: Call) -> Response:
        device = self._device(call)
        with translated():
            certs = self._store.certificates_of(device.device_id)
        return self._render(
            "device.html",
            call.who,
            title=f"Device {device.device_id}",
            device=device,
            certs=list(reversed(certs)),
            now=call.now,
            actions=_device_actions(device.status),
            done=DONE.get(call.query("done") or ""),
        )

    def _action(self, call: Call) -> tuple[str, DeviceStatus, str]:
        action = call.param("action")
        if action not in DEVICE_ACTIONS:
            raise Refusal(Code.NOT_FOUND, f"no device action {action!r}")
        status, effect = DEVICE_ACTIONS[action]
        return action, status, effect

    def device_action_page(self, call: Call) -> Response:
        device = self._device(call)
        action, _, effect = self._action(call)
        with translated():
            certs = self._store.certificates_of(device.device_id)
        valid = [c for c in certs if c.status is CertStatus.VALID and c.not_after > call.now]
        return self._render(
            "device_action.html",
            call.who,
            title=f"{action} {device.device_id}",
            device=device,
            action=action,
            effect=effect,
            valid=valid,
        )

    def device_action(self, call: Call) -> Response:
        device_id = call.param("device_id")
        action, status, _ = self._action(call)
        assert call.who is not None
        self._authority.set_device_status(device_id, status, actor=call.who.actor, now=call.now)
        return see_other(f"/ui/devices/{_path(device_id)}?done={action}")

    # -- approvals and audit ------------------------------------------------------------

    def approvals(self, call: Call) -> Response:
        status_text = call.query("status", max_length=16) or PendingStatus.PENDING.value
        after = call.query("after", max_length=18)
        try:
            status = PendingStatus(status_text)
        except ValueError:
            raise Refusal(Code.BAD_REQUEST, "status: pending, approved, denied or issued") from None
        if after is not None and not after.isdigit():
            raise Refusal(Code.BAD_REQUEST, "after: a request id")
        with translated():
            page = self._store.list_pending(
                status=status, after=int(after) if after else None, limit=PAGE_SIZE
            )
        return self._render(
            "approvals.html",
            call.who,
            title="Approvals",
            page=page,
            status=status.value,
            statuses=[s.value for s in PendingStatus],
            done=DONE.get(call.query("done") or ""),
        )

    def decide(self, call: Call) -> Response:
        decision = call.param("decision")
        if decision not in ("approve", "deny"):
            raise Refusal(Code.NOT_FOUND, f"no decision {decision!r}")
        request_id = int(call.request.path_params["request_id"])
        if not 1 <= request_id < 2**62:
            raise Refusal(Code.NOT_FOUND, f"no pending request {request_id}")
        reason = call.form.get("reason", "").strip()[:500] or None
        assert call.who is not None
        self._authority.decide(
            request_id,
            approve=decision == "approve",
            actor=call.who.actor,
            now=call.now,
            reason=reason,
        )
        return see_other(f"/ui/approvals?done={decision}")

    def audit(self, call: Call) -> Response:
        filters = {
            name: call.query(name, max_length=256)
            for name in ("actor", "device", "serial", "action", "outcome", "since", "order")
        }
        if filters["order"] not in (None, "newest", "oldest"):
            raise Refusal(Code.BAD_REQUEST, "order: newest or oldest")
        since_text = filters["since"]
        since = None
        if since_text is not None:
            try:
                since = dt.datetime.fromisoformat(since_text)
            except ValueError:
                raise Refusal(Code.BAD_REQUEST, "since: a date or time (ISO 8601)") from None
            since = since.replace(tzinfo=dt.UTC) if since.tzinfo is None else since
        after = call.query("after", max_length=18)
        if after is not None and not (after.isdigit() and len(after) <= 18):
            raise Refusal(Code.BAD_REQUEST, "after: an entry id")
        with translated():
            page = self._store.list_audit(
                since=since,
                actor=filters["actor"],
                device_id=filters["device"],
                serial=_serial(filters["serial"]) if filters["serial"] else None,
                action=filters["action"],
                outcome=filters["outcome"],
                after=int(after) if after else None,
                limit=PAGE_SIZE,
                newest_first=filters["order"] != "oldest",
            )
        return self._render(
            "audit.html",
            call.who,
            title="Audit log",
            page=page,
            filters=filters,
            chain=self._chain.last,
        )

    def audit_chain(self, call: Call) -> Response:
        """Verify the audit log's hash chain now (``estkit audit verify``): a pass over
        every entry, so on request, not on every audit page."""
        return self._render(
            "audit_chain.html", call.who, title="Audit chain", chain=self._chain.verify(call.now)
        )

    # -- API tokens ---------------------------------------------------------------------

    def tokens(
        self,
        call: Call,
        *,
        http_status: int = 200,
        reason: str | None = None,
        form: Mapping[str, str] | None = None,
    ) -> Response:
        with translated():
            listed = self._store.list_tokens()
        return self._render(
            "tokens.html",
            call.who,
            http_status=http_status,
            title="API tokens",
            tokens=[(t, _token_state(t, call.now)) for t in listed],
            scopes=SCOPES,
            examples=EXAMPLES,
            form=form or {"scope": "read"},
            reason=reason,
            done=DONE.get(call.query("done") or ""),
        )

    def token_create(self, call: Call) -> Response:
        """The new token in the answer to the POST itself, never in a URL or a log:
        shown this once (``Cache-Control: no-store``), only its digest is kept."""
        assert call.who is not None
        name = call.form.get("name", "").strip()
        scope = call.form.get("scope", "")
        expires = call.form.get("expires", "").strip()
        kept = {"name": name, "scope": scope, "expires": expires}
        try:
            if scope not in SCOPES:
                raise Refusal(Code.BAD_REQUEST, f"scope: one of {', '.join(SCOPES)}")
            try:
                lifetime = parse_duration(expires) if expires else None
            except ValueError as exc:
                raise Refusal(Code.BAD_REQUEST, f"expires: {exc}") from None
            expires_at = call.now + lifetime if lifetime is not None else None
            token = self._tokens.create(
                name, frozenset({scope}), actor=call.who.actor, now=call.now, expires_at=expires_at
            )
        except Refusal as refusal:
            return self.tokens(
                call, http_status=STATUS[refusal.code], reason=refusal.reason, form=kept
            )
        return self._render(
            "token_created.html",
            call.who,
            title=f"Token {name}",
            name=name,
            scope=scope,
            expires_at=expires_at,
            token=token,
        )

    def _token(self, call: Call) -> ApiToken:
        name = call.param("name")
        with translated():
            found = [t for t in self._store.list_tokens() if t.name == name]
        if not found:
            raise Refusal(Code.NOT_FOUND, f"no token {name!r}")
        return found[0]

    def token_revoke_page(self, call: Call) -> Response:
        token = self._token(call)
        assert call.who is not None
        return self._render(
            "token_revoke.html",
            call.who,
            title=f"Revoke token {token.name}",
            token=token,
            state=_token_state(token, call.now),
            own=token.name == call.who.name,
        )

    def token_revoke(self, call: Call) -> Response:
        assert call.who is not None
        self._tokens.revoke(call.param("name"), actor=call.who.actor, now=call.now)
        # Revoking the token this session signed in with ends the session: the next
        # page asks to sign in again.
        return see_other("/ui/tokens?done=token-revoked")


def _device_actions(status: DeviceStatus) -> list[str]:
    if status is DeviceStatus.DECOMMISSIONED:
        return []
    if status is DeviceStatus.DISABLED:
        return ["enable", "decommission"]
    return ["disable", "decommission"]


def _token_state(token: ApiToken, now: dt.datetime) -> str:
    if token.revoked_at is not None:
        return "revoked"
    if token.expires_at is not None and token.expires_at <= now:
        return "expired"
    return "active"


def _path(segment: str) -> str:
    return quote(segment, safe="")
