"""API clients: scoped bearer tokens, created by operators, stored as digests, revocable."""

from __future__ import annotations

import datetime as dt
import hmac
import re

from estkit.ca.errors import Code, Refusal
from estkit.ca.ports import translated
from estkit.ca.secrets import API_TOKEN_PREFIX, new_api_token, token_digest
from estkit.store import AuditEvent, SqlStore

# provision: the factory station's call; read: look, never touch; admin: everything.
SCOPES = ("provision", "read", "admin")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")


class TokenService:
    def __init__(self, store: SqlStore) -> None:
        self._store = store

    def create(
        self,
        name: str,
        scopes: frozenset[str],
        *,
        actor: str,
        now: dt.datetime,
        expires_at: dt.datetime | None = None,
    ) -> str:
        """A new token, returned once and never stored in the clear."""
        if not _NAME.match(name):
            raise Refusal(Code.BAD_REQUEST, "token name: 1-128 letters, digits, '.', '_', '@', '-'")
        unknown = scopes - set(SCOPES)
        if not scopes or unknown:
            raise Refusal(Code.BAD_REQUEST, f"scopes must be some of {', '.join(SCOPES)}")
        if expires_at is not None and expires_at <= now:
            raise Refusal(Code.BAD_REQUEST, "expiry must be in the future")
        token = new_api_token()
        with translated():
            self._store.add_token(
                name=name,
                token_hash=token_digest(token),
                scopes=scopes,
                created_by=actor,
                now=now,
                expires_at=expires_at,
                audit=AuditEvent(
                    at=now,
                    actor=actor,
                    action="token-create",
                    outcome="ok",
                    detail=f"token {name} scopes={','.join(sorted(scopes))}",
                ),
            )
        return token

    def revoke(self, name: str, *, actor: str, now: dt.datetime) -> None:
        with translated():
            self._store.revoke_token(
                name,
                now=now,
                audit=AuditEvent(
                    at=now, actor=actor, action="token-revoke", outcome="ok", detail=f"token {name}"
                ),
            )

    def audit_use(self, *, actor: str, detail: str, now: dt.datetime) -> None:
        """Record an API call by a caller authenticated elsewhere (an OIDC client)."""
        with translated():
            self._store.audit(
                AuditEvent(at=now, actor=actor, action="token-use", outcome="ok", detail=detail)
            )

    def audit_refusal(self, *, actor: str, detail: str, now: dt.datetime) -> None:
        with translated():
            self._store.audit(
                AuditEvent(
                    at=now, actor=actor, action="token-use", outcome="refused", detail=detail
                )
            )

    def authenticate(self, token: str, *, now: dt.datetime, use: str) -> tuple[str, frozenset[str]]:
        """(actor, scopes) of a valid token, else a ``token-invalid`` refusal; every use audited."""
        if not token.startswith(API_TOKEN_PREFIX):
            raise Refusal(Code.TOKEN_INVALID, "not an estkit API token")
        digest = token_digest(token)
        with translated():
            record = self._store.find_token(digest)
        if record is None or not hmac.compare_digest(record.token_hash, digest):
            raise Refusal(Code.TOKEN_INVALID, "unknown API token")
        actor = f"token:{record.name}"
        refusal = None
        if record.revoked_at is not None:
            refusal = "API token is revoked"
        elif record.expires_at is not None and record.expires_at <= now:
            refusal = "API token has expired"
        with translated():
            self._store.token_used(
                record.id,
                now=now,
                audit=AuditEvent(
                    at=now,
                    actor=actor,
                    action="token-use",
                    outcome="refused" if refusal else "ok",
                    detail=refusal or use,
                ),
            )
        if refusal:
            raise Refusal(Code.TOKEN_INVALID, refusal)
        return actor, record.scopes

    def require_scope(
        self, scopes: frozenset[str], needed: str, *, actor: str, use: str, now: dt.datetime
    ) -> None:
        """Refuse (``scope-missing``, audited) a caller whose scopes do not cover ``needed``;
        ``admin`` covers every scope."""
        if needed in scopes or "admin" in scopes:
            return
        self.audit_refusal(actor=actor, detail=f"scope {needed} needed for {use}", now=now)
        raise Refusal(Code.SCOPE_MISSING, f"this API client lacks the {needed!r} scope")
