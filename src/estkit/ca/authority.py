"""The certificate authority: it gathers the facts, asks the policy, audits, and issues.

Every decision, issuance or refusal, is written to the audit log once, with
its refusal code. A certificate is handed back only after its record is
committed: here, or, inside ``deferred_writes``, by the caller awaiting the
commit. Storage is reached through ``ca.ports.AuthorityStore``; its errors
become refusals in one place (``ports.translated``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from dataclasses import replace as replace_issued
from typing import Any, Generic, NoReturn, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from estkit.ca import policy, secrets
from estkit.ca.constraints import CaNameConstraints, chain_name_constraints
from estkit.ca.errors import Code, Refusal
from estkit.ca.generations import FIRST, Generation, Lineage, lineages
from estkit.ca.hubsync import HubSync
from estkit.ca.policy import SAN_TYPES, Grant, Label, Principal, check_device_id
from estkit.ca.ports import AuthorityStore, translated, translated_future
from estkit.pki.certs import serial_hex
from estkit.pki.csr import CertificationRequest
from estkit.pki.errors import DecodeError
from estkit.pki.keys import PrivateKey, generate_key
from estkit.pki.names import common_name
from estkit.pki.profiles import Profile, issue_leaf
from estkit.pki.revocation import REASONS
from estkit.pki.serverkeygen import decrypt_key_identifier
from estkit.store import (
    AuditEvent,
    CertificateRecord,
    CertStatus,
    DeviceStatus,
    PendingRequest,
    PendingStatus,
)
from estkit.store.outbox import HubChange

__all__ = [
    "REVOCATION_REASONS",
    "SAN_TYPES",
    "Authority",
    "Issued",
    "IssuingCa",
    "Label",
    "Principal",
    "ServerGenerated",
    "check_device_id",
]

REVOCATION_REASONS = tuple(REASONS)

T = TypeVar("T")
StoreT = TypeVar("StoreT", bound=AuthorityStore)


@dataclass(frozen=True, slots=True)
class IssuingCa:
    """A CA held in memory: its certificate, signing key, and chain up to the root."""

    name: str
    cert: x509.Certificate
    key: PrivateKey
    chain: tuple[x509.Certificate, ...]  # this CA's certificate first, the root last
    # Its place among its CA's generations (``ca/generations.py``): whom it replaces, from when.
    generation: Generation = FIRST


@dataclass(frozen=True, slots=True)
class Issued:
    certificate: x509.Certificate
    record: CertificateRecord
    chain: tuple[x509.Certificate, ...]  # issuing CA first, root last
    # Valid certificates this one is to replace (``Authority.supersede`` revokes them).
    replaces_serials: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ServerGenerated:
    """Server-side key generation's result: the key is handed to the caller, never kept."""

    issued: Issued
    key: PrivateKey = field(repr=False)
    # The device's certificate whose key the private key is to be encrypted to (RFC 7030
    # 4.4.1.2), or None: returned unencrypted, inside TLS.
    encrypt_to: x509.Certificate | None = None


RevocationListener = Callable[[Sequence[str], dt.datetime], None]
"""Told which CAs revoked something (after the commit), e.g. to republish their CRLs."""


class Authority(Generic[StoreT]):
    """The CA; ``store`` is whatever satisfies ``AuthorityStore`` (the SQL store in service)."""

    def __init__(
        self,
        *,
        cas: Mapping[str, IssuingCa],
        labels: Mapping[str, Label],
        bootstrap_profile: Profile,
        store: StoreT,
        secret_validity: dt.timedelta,
        crl_urls: Mapping[str, str] | None = None,
        ocsp_urls: Mapping[str, str] | None = None,
        on_revocation: RevocationListener | None = None,
        hub_sync: HubSync | None = None,
    ) -> None:
        # Each CA's family (``ca/generations.py``): labels and refusal checks name the
        # family, issuance goes to the generation issuing at the time.
        self._lineages: dict[str, Lineage[IssuingCa]] = lineages(
            cas, {n: ca.generation for n, ca in cas.items()}
        )
        self._family = {n: ln.family for ln in self._lineages.values() for n in ln.names}
        labels = {
            name: label
            if label.ca not in self._family
            else replace_issued(label, ca=self._family[label.ca])
            for name, label in labels.items()
        }
        for label in labels.values():
            if label.ca not in self._lineages:
                raise ValueError(f"label {label.name!r} names unknown CA {label.ca!r}")
            if label.serverkeygen and label.approval:
                raise ValueError(
                    f"label {label.name!r}: serverkeygen with approval would keep a generated "
                    "key until an operator decides"
                )
        # The root is here only when its key is (an offline root ends the chains).
        if "bootstrap" not in self._lineages:
            raise ValueError("the CA 'bootstrap' must be configured")
        self.cas = dict(cas)
        self.labels = dict(labels)
        self.bootstrap_profile = bootstrap_profile
        self.store = store
        self.secret_validity = secret_validity
        self.crl_urls = dict(crl_urls or {})
        self.ocsp_urls = dict(ocsp_urls or {})
        self.on_revocation = on_revocation
        # IoT Hub registry sync (``[iothub]``): device changes the hub is to learn.
        self.hub_sync = hub_sync
        # CAs whose certificates may authenticate a device: every generation of the
        # bootstrap CA and of every CA an EST label issues from.
        self._client_cas = frozenset(
            name
            for family in {"bootstrap", *(lb.ca for lb in labels.values())}
            for name in self._lineages[family].names
        )
        self._bootstrap_label = Label(name="bootstrap", ca="bootstrap", profile=bootstrap_profile)
        # Facts policy checks every grant against: the name constraints of each CA's chain.
        self._name_constraints = {n: chain_name_constraints(ca.chain) for n, ca in cas.items()}

    # -- lookups -------------------------------------------------------------

    def label(self, name: str) -> Label:
        try:
            return self.labels[name]
        except KeyError:
            raise Refusal(Code.NOT_FOUND, f"unknown EST label {name!r}") from None

    def issuing_ca(self, label: Label, *, now: dt.datetime) -> IssuingCa:
        """The generation of the label's CA that issues at ``now``."""
        return self._lineages[label.ca].issuing(now)[1]

    def chain_for(self, label: Label, *, now: dt.datetime) -> tuple[x509.Certificate, ...]:
        """The chain ``cacerts`` answers: that of the generation issuing at ``now``."""
        return self.issuing_ca(label, now=now).chain

    def family(self, ca: str) -> str:
        """The family (first generation's name) of CA ``ca``: what labels name."""
        return self._family.get(ca, ca)

    @contextmanager
    def deferred_writes(self) -> Iterator[list[Future[Any]]]:
        """Decide without waiting for the database: for a caller on an event loop.

        Inside this block the writes of a decision (the issued certificate's
        record, a refusal's audit entry) are queued, and the caller awaits the
        futures in the list before it answers; a failed write raises its
        refusal (e.g. ``unavailable``) there. Only for decisions whose writes
        nobody reads back: a client certificate on a label without approval.
        """
        waiting: list[Future[Any]] = []
        with self.store.deferred_writes() as queued:
            yield waiting
            waiting.extend(translated_future(f) for f in queued)

    # -- authentication --------------------------------------------------------

    def authenticate_certificate(self, cert: x509.Certificate, *, now: dt.datetime) -> Principal:
        """Accept a client certificate of one of this authority's CAs, valid and unrevoked."""
        serial = serial_hex(cert.serial_number)
        actor = f"cert:{serial}"
        with translated():
            record = self.store.presented_certificate(serial)
        device_id = self._decided(
            actor,
            "authenticate",
            now,
            lambda: policy.client_certificate_device(
                cert, record, client_cas=self._client_cas, now=now
            ),
            device_id=policy_device(cert),
            serial=serial,
        )
        assert record is not None
        return Principal(
            device_id=device_id,
            actor=actor,
            cert=cert,
            cert_ca=self.family(record.ca),
            cert_serial=serial,
        )

    def authenticate_secret(self, device_id: str, secret: str, *, now: dt.datetime) -> Principal:
        """Accept a device's one-time enrollment secret (HTTP Basic); constant-time.

        Unknown devices, wrong secrets and used ones cost one digest check each and get the
        same refusal, so neither the answer nor its timing tells them apart.
        """
        if not _valid_id(device_id):
            # Not a device id: nothing to look up and no check to spend; the audit keeps
            # no attacker-chosen name (it may be kilobytes long).
            self._refuse(
                "secret:?",
                "authenticate",
                Refusal(Code.SECRET_INVALID, "enrollment secret not valid for this device"),
                now,
                detail="Basic username is not a device id",
            )
        with translated():
            candidates = self.store.usable_secrets(device_id, now=now)
        match = None
        for candidate in candidates:
            if secrets.verify_secret(secret, candidate.secret_hash):
                match = candidate
        if not candidates:
            secrets.verify_secret(secret, secrets.dummy_hash())
        actor = f"secret:{device_id}"
        if match is None:
            self._refuse(
                actor,
                "authenticate",
                Refusal(Code.SECRET_INVALID, "enrollment secret not valid for this device"),
                now,
                device_id=device_id,
                detail="wrong, used or expired enrollment secret",
            )
        with translated():
            device = self.store.get_device(device_id)
        status = device.status if device is not None else None
        self._decided(
            actor,
            "authenticate",
            now,
            lambda: policy.check_device_status(device_id, status),
            device_id=device_id,
        )
        assert match is not None
        return Principal(device_id=device_id, actor=actor, secret_id=match.id)

    def audit_rate_limit(
        self, engaged: Sequence[str], *, actor: str, window: float, now: dt.datetime
    ) -> None:
        """Audit that failed attempts put a username or a source under its limit: once
        when it engages, not per refused attempt (a flood must not write per request)."""
        refusal = Refusal(
            Code.RATE_LIMITED,
            f"too many failed attempts from {', '.join(engaged)}; "
            f"further attempts refused for up to {window:g} s",
        )
        self._audit_refusal(actor, "authenticate", refusal, now)

    # -- enrollment --------------------------------------------------------------

    def enroll(
        self,
        label: Label,
        csr_der: bytes,
        who: Principal,
        *,
        now: dt.datetime,
        channel_binding: bytes | None = None,
    ) -> Issued:
        """RFC 7030 simpleenroll (``policy.decide_enroll``). ``channel_binding``: the TLS
        connection's binding, checked on labels that require it (RFC 7030 3.5)."""
        grant = self._decided(
            who.actor,
            "enroll",
            now,
            lambda: policy.check_name_constraints(
                policy.decide_enroll(label, _bound_request(label, csr_der, channel_binding), who),
                self._constraints_of(label, now),
            ),
            device_id=who.device_id,
        )
        return self._gate_and_issue(label, grant, who, csr_der, "simpleenroll", now)

    def reenroll(
        self,
        label: Label,
        csr_der: bytes,
        who: Principal,
        *,
        now: dt.datetime,
        channel_binding: bytes | None = None,
    ) -> Issued:
        """RFC 7030 simplereenroll (``policy.decide_reenroll``)."""
        grant = self._decided(
            who.actor,
            "reenroll",
            now,
            lambda: policy.check_name_constraints(
                policy.decide_reenroll(label, _bound_request(label, csr_der, channel_binding), who),
                self._constraints_of(label, now),
            ),
            device_id=who.device_id,
            serial=who.cert_serial,
        )
        return self._gate_and_issue(label, grant, who, csr_der, "simplereenroll", now)

    def serverkeygen(
        self,
        label: Label,
        csr_der: bytes,
        who: Principal,
        *,
        now: dt.datetime,
        channel_binding: bytes | None = None,
    ) -> ServerGenerated:
        """RFC 7030 serverkeygen (``policy.decide_serverkeygen``): the label's key type is
        generated here once the request is granted, certified, recorded and audited
        (``est-serverkeygen``) like any issuance, and handed back, not stored.

        A CSR with an ``AsymmetricDecryptKeyIdentifier`` gets the key encrypted to the
        device's valid certificate whose SubjectKeyIdentifier it names (RSA keys only);
        any other identifier is refused (``bad-request``).
        """
        request = self._decided(
            who.actor,
            "serverkeygen",
            now,
            lambda: _bound_request(label, csr_der, channel_binding),
            device_id=who.device_id,
        )
        grant = self._decided(
            who.actor,
            "serverkeygen",
            now,
            lambda: policy.check_name_constraints(
                policy.decide_serverkeygen(label, request, who),
                self._constraints_of(label, now),
            ),
            device_id=who.device_id,
        )
        recipient = self._key_recipient(request, who, now)
        key = generate_key(label.serverkeygen_key_type)
        issued = self._issue(
            label=label,
            grant=replace_issued(grant, public_key=key.public_key()),
            who=who,
            via="est-serverkeygen",
            est_label=label.name,
            now=now,
        )
        return ServerGenerated(issued=issued, key=key, encrypt_to=recipient)

    def _key_recipient(
        self, request: CertificationRequest, who: Principal, now: dt.datetime
    ) -> x509.Certificate | None:
        def identifier() -> bytes | None:
            try:
                return decrypt_key_identifier(request.csr)
            except DecodeError as exc:
                raise Refusal(Code.BAD_CSR, str(exc)) from None

        wanted = self._decided(who.actor, "serverkeygen", now, identifier, device_id=who.device_id)
        if wanted is None:
            return None
        candidates = [who.cert] if who.cert is not None else []
        candidates += [
            x509.load_der_x509_certificate(r.der)
            for r in self._certificates_of(who.device_id)
            if r.status is CertStatus.VALID and r.not_before <= now <= r.not_after
        ]
        return self._decided(
            who.actor,
            "serverkeygen",
            now,
            lambda: policy.key_recipient(wanted, candidates),
            device_id=who.device_id,
        )

    def _gate_and_issue(
        self,
        label: Label,
        grant: Grant,
        who: Principal,
        csr_der: bytes,
        operation: str,
        now: dt.datetime,
    ) -> Issued:
        gate = self._approval_gate(label, who, csr_der, operation, now)
        if isinstance(gate, Issued):
            return gate
        return self._issue(
            label=label,
            grant=grant,
            who=who,
            via=f"est-{operation}",
            est_label=label.name,
            now=now,
            pending_id=gate,
        )

    def issue_bootstrap(
        self,
        csr_der: bytes,
        *,
        device_id: str,
        actor: str,
        now: dt.datetime,
        replace: bool = False,
    ) -> Issued:
        """The local factory path (``estkit device bootstrap``).

        A device keeps one bootstrap certificate: while it has a valid one, a new one
        is refused unless ``replace``. The replaced ones stay valid until the caller has
        stored the new key and certificate and calls ``supersede`` with
        ``issued.replaces_serials``: a failed write must not leave the device with a
        revoked certificate and a lost key.
        """
        existing = tuple(
            r.serial
            for r in self._certificates_of(device_id)
            if self.family(r.ca) == "bootstrap"
            and r.status is CertStatus.VALID
            and r.not_after > now
        )
        if existing and not replace:
            self._refuse(
                actor,
                "cli-bootstrap",
                Refusal(
                    Code.CONFLICT,
                    f"device {device_id} already has a valid bootstrap certificate "
                    f"(serial {existing[0]}); replacing it revokes it",
                ),
                now,
                device_id=device_id,
            )
        issued = self.provision(
            "bootstrap", csr_der, device_id=device_id, actor=actor, now=now, via="cli-bootstrap"
        )
        return replace_issued(issued, replaces_serials=existing)

    def supersede(self, serials: Sequence[str], *, actor: str, now: dt.datetime) -> None:
        """Revoke (``superseded``) the certificates a new one replaces, once it is in place."""
        for serial in serials:
            self.revoke(serial, reason="superseded", actor=actor, now=now)

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
        label = self._bootstrap_label if label_name == "bootstrap" else self.label(label_name)
        who = Principal(device_id=device_id, actor=actor)
        with translated():
            device = self.store.get_device(device_id) if _valid_id(device_id) else None
        grant = self._decided(
            actor,
            via,
            now,
            lambda: policy.check_name_constraints(
                policy.decide_provision(
                    label,
                    policy.parse_request(csr_der),
                    device_id=device_id,
                    device_status=device.status if device is not None else None,
                    dns_names=dns_names,
                ),
                self._constraints_of(label, now),
            ),
            device_id=device_id if _valid_id(device_id) else None,
        )
        return self._issue(
            label=label,
            grant=grant,
            who=who,
            via=via,
            now=now,
            est_label=None if label_name == "bootstrap" else label.name,
            not_after=now + validity if validity is not None else None,
            hub=self.hub_sync.new_identity(device_id, cause=via) if self.hub_sync else None,
        )

    # -- device lifecycle ------------------------------------------------------------

    def add_device(
        self, device_id: str, *, actor: str, now: dt.datetime, rotate_secret: bool = False
    ) -> str:
        """Register a device with a one-time enrollment secret, returned once.

        An existing device is refused unless ``rotate_secret``: then it gets a new
        secret and its unused ones stop working (it must be active).
        """
        self._decided(actor, "device-add", now, lambda: policy.check_device_id(device_id))
        with translated():
            device = self.store.get_device(device_id)
        if device is not None and not rotate_secret:
            self._refuse(
                actor,
                "device-add",
                Refusal(
                    Code.CONFLICT,
                    f"device {device_id} already exists; rotating its enrollment secret "
                    "replaces the unused one",
                ),
                now,
                device_id=device_id,
            )
        if device is not None:
            status = device.status
            self._decided(
                actor,
                "device-add",
                now,
                lambda: policy.check_device_status(device_id, status),
                device_id=device_id,
            )
        secret = secrets.new_secret()
        until = now + self.secret_validity
        with translated():
            self.store.add_secret(
                device_id,
                secrets.hash_secret(secret),
                now=now,
                expires_at=until,
                replace=device is not None,
                hub=self.hub_sync.new_identity(device_id, cause="device-add")
                if self.hub_sync and device is None
                else None,
                audit=AuditEvent(
                    at=now,
                    actor=actor,
                    action="device-secret-rotate" if device is not None else "device-add",
                    outcome="ok",
                    device_id=device_id,
                    detail=f"enrollment secret valid until {until.isoformat()}",
                ),
            )
        return secret

    def register_device(
        self,
        device_id: str,
        *,
        actor: str,
        now: dt.datetime,
        with_secret: bool,
        rotate_secret: bool = False,
    ) -> str | None:
        """Register a device; with ``with_secret`` also a one-time secret (see ``add_device``)."""
        if with_secret or rotate_secret:
            return self.add_device(device_id, actor=actor, now=now, rotate_secret=rotate_secret)
        self._decided(actor, "device-add", now, lambda: policy.check_device_id(device_id))
        with translated():
            self.store.add_device(
                device_id,
                now=now,
                hub=self.hub_sync.new_identity(device_id, cause="device-add")
                if self.hub_sync
                else None,
                audit=AuditEvent(
                    at=now, actor=actor, action="device-add", outcome="ok", device_id=device_id
                ),
            )
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
        with translated():
            device = self.store.get_device(device_id)
        if device is None:
            raise Refusal(Code.NOT_FOUND, f"no device {device_id!r}")
        if (
            device.status is DeviceStatus.DECOMMISSIONED
            and status is not DeviceStatus.DECOMMISSIONED
        ):
            self._refuse(
                actor,
                action,
                Refusal(Code.CONFLICT, f"device {device_id!r} is decommissioned"),
                now,
                device_id=device_id,
            )
        reason = "cessationOfOperation" if status is DeviceStatus.DECOMMISSIONED else None
        with translated():
            revoked = self.store.set_device_status(
                device_id,
                status,
                now=now,
                revoke_reason=reason,
                hub=self.hub_sync.status_change(device_id, status, cause=action)
                if self.hub_sync
                else None,
                audit=AuditEvent(
                    at=now, actor=actor, action=action, outcome="ok", device_id=device_id
                ),
            )
        if revoked and self.on_revocation is not None:
            self.on_revocation(list(self.cas), now)
        return revoked

    def revoke(
        self, serial: str, *, reason: str, actor: str, now: dt.datetime
    ) -> CertificateRecord:
        if reason not in REVOCATION_REASONS:
            raise Refusal(
                Code.BAD_REQUEST,
                f"unknown revocation reason {reason!r}; one of {', '.join(REVOCATION_REASONS)}",
            )
        with translated():
            record = self.store.revoke_certificate(
                serial,
                reason=reason,
                now=now,
                audit=AuditEvent(
                    at=now, actor=actor, action="revoke", outcome="ok", serial=serial, detail=reason
                ),
            )
        if self.on_revocation is not None:
            self.on_revocation([record.ca], now)
        return record

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
        with translated():
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

    # -- internals ----------------------------------------------------------------------

    def _constraints_of(self, label: Label, now: dt.datetime) -> tuple[CaNameConstraints, ...]:
        return self._name_constraints[self.issuing_ca(label, now=now).name]

    def _certificates_of(self, device_id: str) -> list[CertificateRecord]:
        with translated():
            return self.store.certificates_of(device_id)

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
        waiting = Refusal(
            Code.APPROVAL_PENDING, "request is waiting for approval", retry_after=label.retry_after
        )
        with translated():
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
                raise waiting
        if pending.status is PendingStatus.PENDING:
            raise waiting
        if pending.status is PendingStatus.DENIED:
            self._refuse(
                who.actor,
                operation,
                Refusal(
                    Code.APPROVAL_DENIED,
                    f"request {pending.id} was denied"
                    + (f": {pending.reason}" if pending.reason else ""),
                ),
                now,
                device_id=who.device_id,
            )
        if pending.status is PendingStatus.ISSUED and pending.serial is not None:
            with translated():
                record = self.store.get_certificate(pending.serial)
            if record is not None and record.status is CertStatus.VALID and record.ca in self.cas:
                cert = x509.load_der_x509_certificate(record.der)
                return Issued(certificate=cert, record=record, chain=self.cas[record.ca].chain)
            self._refuse(
                who.actor,
                operation,
                # Not "revoked": that code tells a device its own credentials are gone for
                # good; here only this request is spent, and a new one may be made.
                Refusal(
                    Code.CONFLICT,
                    f"the certificate issued for request {pending.id} was revoked; "
                    "send a new request",
                ),
                now,
                device_id=who.device_id,
                serial=pending.serial,
            )
        return pending.id

    def _issue(
        self,
        *,
        label: Label,
        grant: Grant,
        who: Principal,
        via: str,
        now: dt.datetime,
        est_label: str | None,
        pending_id: int | None = None,
        not_after: dt.datetime | None = None,
        hub: HubChange | None = None,
    ) -> Issued:
        ca = self.issuing_ca(label, now=now)
        if now >= ca.cert.not_valid_after_utc:
            # Its certificates would end before they begin: an operator must rotate it.
            self._refuse(
                who.actor,
                via,
                Refusal(
                    Code.UNAVAILABLE,
                    f"the issuing CA {ca.name} expired at "
                    f"{ca.cert.not_valid_after_utc.isoformat()}; nothing can be issued from it "
                    "until an operator rotates it (estkit ca rotate)",
                    retry_after=3600,
                ),
                now,
                device_id=who.device_id,
            )
        crl_url = self.crl_urls.get(ca.name)
        ocsp_url = self.ocsp_urls.get(ca.name)
        cert = issue_leaf(
            profile=label.profile,
            public_key=grant.public_key or grant.request.csr.public_key(),
            subject=grant.subject,
            sans=grant.sans,
            issuer=ca.cert,
            issuer_key=ca.key,
            now=now,
            not_after=not_after,
            crl_urls=[crl_url] if crl_url else (),
            ocsp_urls=[ocsp_url] if ocsp_url else (),
        )
        serial = serial_hex(cert.serial_number)
        record = CertificateRecord(
            serial=serial,
            device_id=who.device_id,
            ca=ca.name,
            label=est_label,
            profile=label.profile.name,
            subject=cert.subject.rfc4514_string(),
            sans=tuple(str(getattr(n, "value", n)) for n in grant.sans or ()),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            status=CertStatus.VALID,
            requested_via=via,
            requested_by=who.actor,
            issued_at=now,
            der=cert.public_bytes(Encoding.DER),
            replaces=grant.replaces,
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
            with translated():
                self.store.record_issued(
                    record,
                    audit=audit,
                    consume_secret=who.secret_id,
                    pending_id=pending_id,
                    hub=hub,
                )
        except Refusal as refusal:
            if refusal.code is not Code.UNAVAILABLE:
                self._audit_refusal(who.actor, via, refusal, now, device_id=who.device_id)
            raise
        return Issued(certificate=cert, record=record, chain=ca.chain)

    def _decided(
        self,
        actor: str,
        action: str,
        now: dt.datetime,
        decide: Callable[[], T],
        *,
        device_id: str | None = None,
        serial: str | None = None,
    ) -> T:
        """``decide()`` (a policy question); a refusal is audited once, then raised."""
        try:
            return decide()
        except Refusal as refusal:
            self._refuse(actor, action, refusal, now, device_id=device_id, serial=serial)

    def _refuse(
        self,
        actor: str,
        action: str,
        refusal: Refusal,
        now: dt.datetime,
        *,
        device_id: str | None = None,
        serial: str | None = None,
        detail: str | None = None,
    ) -> NoReturn:
        self._audit_refusal(actor, action, refusal, now, device_id, serial, detail)
        raise refusal

    def _audit_refusal(
        self,
        actor: str,
        action: str,
        refusal: Refusal,
        now: dt.datetime,
        device_id: str | None = None,
        serial: str | None = None,
        detail: str | None = None,
    ) -> None:
        """The audit entry of a refusal: its code first, so entries can be counted by code."""
        with translated():
            self.store.audit(
                AuditEvent(
                    at=now,
                    actor=actor,
                    action=action,
                    outcome="refused",
                    device_id=device_id,
                    serial=serial,
                    detail=f"{refusal.code.value}: {detail or refusal.reason}",
                )
            )


def _bound_request(
    label: Label, csr_der: bytes, channel_binding: bytes | None
) -> CertificationRequest:
    """The CSR, checked (``policy.parse_request``), and its channel binding where required."""
    request = policy.parse_request(csr_der)
    policy.check_channel_binding(label, request, channel_binding)
    return request


def policy_device(cert: x509.Certificate) -> str | None:
    """The device id a client certificate claims (for the audit entry of its refusal)."""
    return common_name(cert.subject)


def _valid_id(device_id: str) -> bool:
    try:
        policy.check_device_id(device_id)
    except Refusal:
        return False
    return True
