"""The certificate authority and its EST policy (DESIGN.md "Policy").

Every decision, issuance or refusal, is written to the audit log. A
certificate is handed back only after its record is committed: here, or,
inside ``deferred_writes``, by the caller awaiting the commit.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import Any, NoReturn

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from estkit.ca import secrets
from estkit.ca.errors import BadRequest, Conflict, Forbidden, NotFound, Pending, Unauthenticated
from estkit.pki import names
from estkit.pki.certs import is_valid_at, serial_hex
from estkit.pki.csr import CertificationRequest, parse_csr
from estkit.pki.errors import DecodeError, PolicyError
from estkit.pki.keys import PrivateKey
from estkit.pki.names import common_name, names_equal, sans_equal, subject_alt_names
from estkit.pki.profiles import Profile, issue_leaf
from estkit.pki.revocation import REASONS
from estkit.store import (
    AuditEvent,
    CertificateRecord,
    CertStatus,
    DeviceStatus,
    PendingRequest,
    PendingStatus,
    SqlStore,
)
from estkit.store import errors as store_errors

REVOCATION_REASONS = tuple(REASONS)

SAN_TYPES = {
    "dns": x509.DNSName,
    "uri": x509.UniformResourceIdentifier,
    "email": x509.RFC822Name,
    "ip": x509.IPAddress,
}
_SAN_TYPE_NAMES: dict[type, str] = {cls: name for name, cls in SAN_TYPES.items()}


@dataclass(frozen=True, slots=True)
class IssuingCa:
    """A CA held in memory: its certificate, signing key, and chain up to the root."""

    name: str
    cert: x509.Certificate
    key: PrivateKey
    chain: tuple[x509.Certificate, ...]  # this CA's certificate first, the root last


@dataclass(frozen=True, slots=True)
class Label:
    """An EST label: which CA signs, under which profile, with which wire options."""

    name: str
    ca: str
    profile: Profile
    permitted_san_types: frozenset[str] = frozenset({"dns", "uri"})
    base64_line_length: int = 0
    csrattrs: tuple[x509.ObjectIdentifier, ...] = ()
    # Manual approval: requests wait (202 + Retry-After) until an operator decides.
    approval: bool = False
    retry_after: int = 60


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is asking, as authenticated: by a client certificate, a secret, or locally."""

    device_id: str
    actor: str
    cert: x509.Certificate | None = None
    cert_ca: str | None = None  # name of the CA that issued ``cert``
    cert_serial: str | None = None
    secret_id: int | None = None


@dataclass(frozen=True, slots=True)
class Issued:
    certificate: x509.Certificate
    record: CertificateRecord
    chain: tuple[x509.Certificate, ...]  # issuing CA first, root last


RevocationListener = Callable[[Sequence[str], dt.datetime], None]
"""Told which CAs revoked something (after the commit), e.g. to republish their CRLs."""


class Authority:
    def __init__(
        self,
        *,
        cas: Mapping[str, IssuingCa],
        labels: Mapping[str, Label],
        bootstrap_profile: Profile,
        store: SqlStore,
        secret_validity: dt.timedelta,
        crl_urls: Mapping[str, str] | None = None,
        on_revocation: RevocationListener | None = None,
    ) -> None:
        for label in labels.values():
            if label.ca not in cas:
                raise ValueError(f"label {label.name!r} names unknown CA {label.ca!r}")
        if "bootstrap" not in cas or "root" not in cas:
            raise ValueError("the CAs 'root' and 'bootstrap' must be configured")
        self.cas = dict(cas)
        self.labels = dict(labels)
        self.bootstrap_profile = bootstrap_profile
        self.store = store
        self.secret_validity = secret_validity
        self.crl_urls = dict(crl_urls or {})
        self.on_revocation = on_revocation
        # CAs whose certificates may authenticate a device: the bootstrap CA and
        # every CA an EST label issues from.
        self._client_cas = frozenset({"bootstrap", *(lb.ca for lb in labels.values())})

    # -- lookups -------------------------------------------------------------

    def label(self, name: str) -> Label:
        try:
            return self.labels[name]
        except KeyError:
            raise NotFound(f"unknown EST label {name!r}") from None

    def chain_for(self, label: Label) -> tuple[x509.Certificate, ...]:
        return self.cas[label.ca].chain

    def deferred_writes(self) -> AbstractContextManager[list[Future[Any]]]:
        """Decide without waiting for the database: for a caller on an event loop.

        Inside this block the writes of a decision (the issued certificate's
        record, a refusal's audit entry) are queued, and the caller awaits the
        futures in the list before it answers. Only for decisions whose writes
        nobody reads back: a client certificate on a label without approval.
        """
        return self.store.deferred_writes()

    # -- authentication --------------------------------------------------------

    def authenticate_certificate(self, cert: x509.Certificate, *, now: dt.datetime) -> Principal:
        """Accept a client certificate of one of this authority's CAs, valid and unrevoked."""
        serial = serial_hex(cert.serial_number)
        # Which CA issued it follows from its record below: a certificate is accepted
        # only if it equals, byte for byte, one this authority issued and recorded,
        # so checking its signature again (the TLS handshake did) would add nothing.
        device_id = common_name(cert.subject)
        actor = f"cert:{serial}"
        if device_id is None:
            self._refuse(
                actor, "authenticate", device_id, serial, "client certificate has no single CN", now
            )
        if not is_valid_at(cert, now):
            self._refuse(
                actor,
                "authenticate",
                device_id,
                serial,
                "client certificate is expired or not yet valid",
                now,
            )
        # One query for the certificate's record and its device's status.
        record = self.store.presented_certificate(serial)
        if record is None or record.der != cert.public_bytes(Encoding.DER):
            self._refuse(
                actor,
                "authenticate",
                device_id,
                serial,
                "client certificate unknown to this CA",
                now,
            )
        assert record is not None and device_id is not None
        if record.ca not in self._client_cas:
            self._refuse(
                actor,
                "authenticate",
                device_id,
                serial,
                "client certificate not issued by this CA",
                now,
            )
        # The device's state first: "decommissioned" tells an operator more than "revoked".
        # (A record of another device than the CN names cannot vouch for this one.)
        status = record.device_status if record.device_id == device_id else None
        self._check_device_active(actor, device_id, serial, status, now)
        if record.status is not CertStatus.VALID:
            self._refuse(
                actor, "authenticate", device_id, serial, "client certificate is revoked", now
            )
        return Principal(
            device_id=device_id, actor=actor, cert=cert, cert_ca=record.ca, cert_serial=serial
        )

    def authenticate_secret(self, device_id: str, secret: str, *, now: dt.datetime) -> Principal:
        """Accept a device's one-time enrollment secret (HTTP Basic); constant-time."""
        candidates = self.store.usable_secrets(device_id, now=now)
        match = None
        for candidate in candidates:
            if secrets.verify_secret(secret, candidate.secret_hash):
                match = candidate
        if not candidates:
            secrets.verify_secret(secret, secrets.dummy_hash())
        actor = f"secret:{device_id}"
        if match is None:
            self._audit(
                actor,
                "authenticate",
                "refused",
                device_id,
                None,
                "wrong, used or expired enrollment secret",
                now,
            )
            raise Unauthenticated("enrollment secret not valid for this device")
        device = self.store.get_device(device_id)
        status = device.status if device is not None else None
        self._check_device_active(actor, device_id, None, status, now)
        return Principal(device_id=device_id, actor=actor, secret_id=match.id)

    # -- enrollment --------------------------------------------------------------

    def enroll(self, label: Label, csr_der: bytes, who: Principal, *, now: dt.datetime) -> Issued:
        """RFC 7030 simpleenroll: CN must be the authenticated device id."""
        request = self._parse(csr_der, who, "enroll", now)
        if who.cert is not None and who.cert_ca not in ("bootstrap", label.ca):
            self._refuse(
                who.actor,
                "enroll",
                who.device_id,
                None,
                "client certificate not accepted on this label",
                now,
            )
        if request.common_name != who.device_id:
            self._refuse(
                who.actor,
                "enroll",
                who.device_id,
                None,
                f"CSR CN {request.common_name!r} is not the authenticated device id "
                f"{who.device_id!r}",
                now,
            )
        self._check_sans(label, request, who, "enroll", now)
        gate = self._approval_gate(label, who, csr_der, "simpleenroll", now)
        if isinstance(gate, Issued):
            return gate
        return self._issue(
            pending_id=gate,
            label=label,
            request=request,
            who=who,
            subject=request.subject,
            sans=request.sans,
            via="est-simpleenroll",
            est_label=label.name,
            now=now,
            replaces=who.cert_serial if who.cert_ca == label.ca else None,
        )

    def reenroll(self, label: Label, csr_der: bytes, who: Principal, *, now: dt.datetime) -> Issued:
        """RFC 7030 simplereenroll: renew the operational certificate that authenticated."""
        request = self._parse(csr_der, who, "reenroll", now)
        if who.cert is None or who.cert_ca != label.ca:
            self._refuse(
                who.actor,
                "reenroll",
                who.device_id,
                None,
                "re-enroll needs an operational certificate of this label's CA",
                now,
            )
        assert who.cert is not None and who.cert_serial is not None
        current_sans = subject_alt_names(who.cert.extensions)
        if not names_equal(request.subject, who.cert.subject):
            self._refuse(
                who.actor,
                "reenroll",
                who.device_id,
                who.cert_serial,
                "CSR subject differs from the certificate being renewed",
                now,
            )
        if not sans_equal(request.sans, current_sans):
            self._refuse(
                who.actor,
                "reenroll",
                who.device_id,
                who.cert_serial,
                "CSR subjectAltName differs from the certificate being renewed",
                now,
            )
        gate = self._approval_gate(label, who, csr_der, "simplereenroll", now)
        if isinstance(gate, Issued):
            return gate
        # The new certificate carries the names as the first certificate had them.
        return self._issue(
            pending_id=gate,
            label=label,
            request=request,
            who=who,
            subject=who.cert.subject,
            sans=current_sans,
            via="est-simplereenroll",
            est_label=label.name,
            now=now,
            replaces=who.cert_serial,
        )

    def issue_bootstrap(
        self, csr_der: bytes, *, device_id: str, actor: str, now: dt.datetime
    ) -> Issued:
        """The local factory path (``estkit device bootstrap``)."""
        return self.provision(
            "bootstrap", csr_der, device_id=device_id, actor=actor, now=now, via="cli-bootstrap"
        )

    def provision(
        self,
        label_name: str,
        csr_der: bytes,
        *,
        device_id: str,
        actor: str,
        now: dt.datetime,
        via: str,
        validity: dt.timedelta | None = None,
        dns_names: Sequence[str] | None = None,
    ) -> Issued:
        """The factory path: a certificate for ``device_id`` from a station, not the device.

        Label ``bootstrap`` gives a bootstrap certificate; an EST label gives that
        label's certificate. Same CSR policy as EST; ``validity`` may only shorten
        the profile's; ``dns_names``, when given, are the SANs (else the CSR's).
        """
        check_device_id(device_id)
        if label_name == "bootstrap":
            label = Label(name="bootstrap", ca="bootstrap", profile=self.bootstrap_profile)
        else:
            label = self.label(label_name)
        who = Principal(device_id=device_id, actor=actor)
        request = self._parse(csr_der, who, via, now)
        if request.common_name != device_id:
            self._refuse(
                actor,
                via,
                device_id,
                None,
                f"CSR CN {request.common_name!r} is not the device id {device_id!r}",
                now,
            )
        device = self.store.get_device(device_id)
        if device is not None and device.status is not DeviceStatus.ACTIVE:
            self._refuse(actor, via, device_id, None, f"device is {device.status.value}", now)
        sans = request.sans
        if dns_names is not None:
            sans = x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]) or None
        self._check_sans(label, replace(request, sans=sans), who, via, now)
        return self._issue(
            label=label,
            request=request,
            who=who,
            subject=request.subject,
            sans=sans,
            via=via,
            now=now,
            replaces=None,
            est_label=None if label_name == "bootstrap" else label.name,
            not_after=now + validity if validity is not None else None,
        )

    # -- device lifecycle ------------------------------------------------------------

    def add_device(self, device_id: str, *, actor: str, now: dt.datetime) -> str:
        """Register a device (or reuse an active one); return a new one-time enrollment secret."""
        check_device_id(device_id)
        device = self.store.get_device(device_id)
        if device is not None and device.status is not DeviceStatus.ACTIVE:
            raise Conflict(f"device {device_id!r} is {device.status.value}")
        secret = secrets.new_secret()
        self.store.add_secret(
            device_id,
            secrets.hash_secret(secret),
            now=now,
            expires_at=now + self.secret_validity,
            audit=AuditEvent(
                at=now,
                actor=actor,
                action="device-add",
                outcome="ok",
                device_id=device_id,
                detail=f"enrollment secret valid until {(now + self.secret_validity).isoformat()}",
            ),
        )
        return secret

    def register_device(
        self, device_id: str, *, actor: str, now: dt.datetime, with_secret: bool
    ) -> str | None:
        """Register a device; with ``with_secret`` also (or, if it exists, only) a new secret."""
        if with_secret:
            return self.add_device(device_id, actor=actor, now=now)
        check_device_id(device_id)
        try:
            self.store.add_device(
                device_id,
                now=now,
                audit=AuditEvent(
                    at=now, actor=actor, action="device-add", outcome="ok", device_id=device_id
                ),
            )
        except store_errors.Conflict as exc:
            raise Conflict(str(exc)) from None
        return None

    def set_device_status(
        self, device_id: str, status: DeviceStatus, *, actor: str, now: dt.datetime
    ) -> list[str]:
        """Disable, enable or decommission a device; decommission revokes its certificates."""
        action = {
            DeviceStatus.ACTIVE: "device-enable",
            DeviceStatus.DISABLED: "device-disable",
            DeviceStatus.DECOMMISSIONED: "device-decommission",
        }[status]
        device = self.store.get_device(device_id)
        if device is None:
            raise NotFound(f"no device {device_id!r}")
        if (
            device.status is DeviceStatus.DECOMMISSIONED
            and status is not DeviceStatus.DECOMMISSIONED
        ):
            raise Conflict(f"device {device_id!r} is decommissioned")
        reason = "cessationOfOperation" if status is DeviceStatus.DECOMMISSIONED else None
        revoked = self.store.set_device_status(
            device_id,
            status,
            now=now,
            revoke_reason=reason,
            audit=AuditEvent(at=now, actor=actor, action=action, outcome="ok", device_id=device_id),
        )
        if revoked and self.on_revocation is not None:
            self.on_revocation(list(self.cas), now)
        return revoked

    def revoke(
        self, serial: str, *, reason: str, actor: str, now: dt.datetime
    ) -> CertificateRecord:
        if reason not in REVOCATION_REASONS:
            raise BadRequest(
                f"unknown revocation reason {reason!r}; one of {', '.join(REVOCATION_REASONS)}"
            )
        try:
            record = self.store.revoke_certificate(
                serial,
                reason=reason,
                now=now,
                audit=AuditEvent(
                    at=now, actor=actor, action="revoke", outcome="ok", serial=serial, detail=reason
                ),
            )
        except store_errors.NotFound as exc:
            raise NotFound(str(exc)) from None
        except store_errors.Conflict as exc:
            raise Conflict(str(exc)) from None
        if self.on_revocation is not None:
            self.on_revocation([record.ca], now)
        return record

    # -- internals ----------------------------------------------------------------------

    def _parse(
        self, csr_der: bytes, who: Principal, action: str, now: dt.datetime
    ) -> CertificationRequest:
        try:
            return parse_csr(csr_der)
        except (DecodeError, PolicyError) as exc:
            self._audit(who.actor, action, "refused", who.device_id, None, str(exc), now)
            raise BadRequest(str(exc)) from None

    def _check_sans(
        self,
        label: Label,
        request: CertificationRequest,
        who: Principal,
        action: str,
        now: dt.datetime,
    ) -> None:
        for name in request.sans or ():
            kind = _SAN_TYPE_NAMES.get(type(name))
            if kind is None or kind not in label.permitted_san_types:
                self._refuse(
                    who.actor,
                    action,
                    who.device_id,
                    None,
                    f"subjectAltName type {kind or type(name).__name__} not permitted "
                    f"on label {label.name!r}",
                    now,
                )

    def _approval_gate(
        self, label: Label, who: Principal, csr_der: bytes, operation: str, now: dt.datetime
    ) -> Issued | int | None:
        """Manual approval (RFC 7030 4.2.3): the device retries the same CSR until decided.

        Returns None when the label needs no approval, the id of an approved
        request to issue against, or the certificate already issued for this
        request (a retry whose answer was lost gets the same certificate).
        """
        if not label.approval:
            return None
        digest = hashlib.sha256(csr_der).hexdigest()
        pending = self.store.find_pending(label.name, who.device_id, digest)
        if pending is None:
            self.store.add_pending(
                label=label.name,
                device_id=who.device_id,
                csr_sha256=digest,
                operation=operation,
                requested_by=who.actor,
                now=now,
                audit=AuditEvent(
                    at=now,
                    actor=who.actor,
                    action=operation,
                    outcome="pending",
                    device_id=who.device_id,
                ),
            )
            raise Pending("request is waiting for approval", retry_after=label.retry_after)
        if pending.status is PendingStatus.PENDING:
            raise Pending("request is waiting for approval", retry_after=label.retry_after)
        if pending.status is PendingStatus.DENIED:
            self._refuse(
                who.actor,
                operation,
                who.device_id,
                None,
                f"request {pending.id} was denied"
                + (f": {pending.reason}" if pending.reason else ""),
                now,
            )
        if pending.status is PendingStatus.ISSUED and pending.serial is not None:
            record = self.store.get_certificate(pending.serial)
            if record is not None and record.status is CertStatus.VALID:
                cert = x509.load_der_x509_certificate(record.der)
                return Issued(certificate=cert, record=record, chain=self.cas[record.ca].chain)
            self._refuse(
                who.actor,
                operation,
                who.device_id,
                pending.serial,
                "the certificate issued for this request is revoked",
                now,
            )
        return pending.id

    # -- approval (operators) ------------------------------------------------------

    def decide(
        self,
        request_id: int,
        *,
        approve: bool,
        actor: str,
        now: dt.datetime,
        reason: str | None = None,
    ) -> PendingRequest:
        status = PendingStatus.APPROVED if approve else PendingStatus.DENIED
        try:
            return self.store.decide_pending(
                request_id,
                status,
                by=actor,
                reason=reason,
                now=now,
                audit=AuditEvent(
                    at=now,
                    actor=actor,
                    action="approve" if approve else "deny",
                    outcome="ok",
                    detail=f"pending request {request_id}" + (f": {reason}" if reason else ""),
                ),
            )
        except store_errors.NotFound as exc:
            raise NotFound(str(exc)) from None
        except store_errors.Conflict as exc:
            raise Conflict(str(exc)) from None

    def _check_device_active(
        self,
        actor: str,
        device_id: str,
        serial: str | None,
        status: DeviceStatus | None,
        now: dt.datetime,
    ) -> None:
        """Refuse (and audit) unless the device's ``status`` is active; None: not registered."""
        if status is not DeviceStatus.ACTIVE:
            state = status.value if status is not None else "not registered"
            self._refuse(actor, "authenticate", device_id, serial, f"device is {state}", now)

    def _issue(
        self,
        *,
        label: Label,
        request: CertificationRequest,
        who: Principal,
        subject: x509.Name,
        sans: x509.SubjectAlternativeName | None,
        via: str,
        now: dt.datetime,
        replaces: str | None,
        est_label: str | None,
        pending_id: int | None = None,
        not_after: dt.datetime | None = None,
    ) -> Issued:
        ca = self.cas[label.ca]
        crl_url = self.crl_urls.get(ca.name)
        cert = issue_leaf(
            profile=label.profile,
            public_key=request.csr.public_key(),
            subject=subject,
            sans=sans,
            issuer=ca.cert,
            issuer_key=ca.key,
            now=now,
            not_after=not_after,
            crl_urls=[crl_url] if crl_url else (),
        )
        serial = serial_hex(cert.serial_number)
        record = CertificateRecord(
            serial=serial,
            device_id=who.device_id,
            ca=ca.name,
            label=est_label,
            profile=label.profile.name,
            subject=cert.subject.rfc4514_string(),
            sans=tuple(str(getattr(n, "value", n)) for n in sans or ()),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            status=CertStatus.VALID,
            requested_via=via,
            requested_by=who.actor,
            issued_at=now,
            der=cert.public_bytes(Encoding.DER),
            replaces=replaces,
        )
        audit = AuditEvent(
            at=now,
            actor=who.actor,
            action=via,
            outcome="ok",
            device_id=who.device_id,
            serial=serial,
            detail=f"ca={ca.name} profile={label.profile.name}",
        )
        try:
            self.store.record_issued(
                record, audit=audit, consume_secret=who.secret_id, pending_id=pending_id
            )
        except store_errors.Conflict as exc:
            self._audit(who.actor, via, "refused", who.device_id, None, str(exc), now)
            if "secret" in str(exc):
                raise Unauthenticated(str(exc)) from None
            raise Conflict(str(exc)) from None
        return Issued(certificate=cert, record=record, chain=ca.chain)

    def _audit(
        self,
        actor: str,
        action: str,
        outcome: str,
        device_id: str | None,
        serial: str | None,
        detail: str,
        now: dt.datetime,
    ) -> None:
        self.store.audit(
            AuditEvent(
                at=now,
                actor=actor,
                action=action,
                outcome=outcome,
                device_id=device_id,
                serial=serial,
                detail=detail,
            )
        )

    def _refuse(
        self,
        actor: str,
        action: str,
        device_id: str | None,
        serial: str | None,
        reason: str,
        now: dt.datetime,
    ) -> NoReturn:
        self._audit(actor, action, "refused", device_id, serial, reason, now)
        raise Forbidden(reason)


def check_device_id(device_id: str) -> None:
    """``pki.names.check_device_id`` as a ``BadRequest``."""
    try:
        names.check_device_id(device_id)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
