"""The OCSP responder (RFC 6960): the status of each certificate a CA here issued, signed
by that CA's own key (a file or PKCS#11 key alike).

What it answers:

- ``good`` or ``revoked`` (time, reason) from the certificate's record; the certificate
  of a CA loaded here, asked of the CA here that issued it, is ``good``;
- ``unknown``: a serial that CA never issued (no record of it under that CA: a serial of
  another generation, ``devices-2`` asked of ``devices``, is unknown there too);
- ``unauthorized`` (RFC 6960 2.3): an issuer, by its name and key hashes, that is not
  a CA signing here; ``malformedRequest``; ``tryLater`` while the database is
  unavailable or the caller's ``admit`` refuses; ``internalError``, logged.

Cache: a response without a nonce is kept per (CA, serial, hash algorithm) and served
as it is until half its validity has passed or the CA's revocation revision moves, so
what is served always has at least half its validity ahead. The revision is the
database's (``crl_state``, bumped in the transaction of every revocation, on any node):
``poll`` reads it, once a second from the CRL refresher's thread, so a revocation made
on another node reaches this cache within about a second. ``local_revision`` is the
revision this node's CRL of a CA was last published from: a revocation made on this node
(by one of its workers or by ``estkit cert revoke``: the authority's ``on_revocation``)
republishes that CRL before it returns, so it reaches this cache at once. A request
with a nonce is signed for itself, from the cached status while that is current.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from dataclasses import replace as replaced
from typing import Final, Protocol

from cryptography import x509
from cryptography.x509 import ocsp

from estkit.ca.authority import IssuingCa
from estkit.ca.errors import SignerUnavailable
from estkit.pki.certs import serial_hex
from estkit.pki.ocsp import (
    GOOD,
    HASHES,
    UNKNOWN,
    CertState,
    MalformedRequest,
    build_response,
    issuer_hashes,
    parse_request,
    unsuccessful,
)
from estkit.pki.revocation import REASONS
from estkit.store import CertificateRecord, CertStatus
from estkit.store.errors import Unavailable

__all__ = ["CACHE_ENTRIES", "OcspResponder", "OcspStore"]

log = logging.getLogger("estkit.ca")

# Responses kept (about 0.5 KB each); past this the older half is dropped.
CACHE_ENTRIES: Final = 65_536

MALFORMED: Final = unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
UNAUTHORIZED: Final = unsuccessful(ocsp.OCSPResponseStatus.UNAUTHORIZED)
TRY_LATER: Final = unsuccessful(ocsp.OCSPResponseStatus.TRY_LATER)
INTERNAL_ERROR: Final = unsuccessful(ocsp.OCSPResponseStatus.INTERNAL_ERROR)


class OcspStore(Protocol):
    """What the responder reads (``SqlStore`` satisfies it)."""

    def get_certificate(self, serial: str) -> CertificateRecord | None: ...
    def crl_revisions(self) -> dict[str, int]: ...


@dataclass(frozen=True, slots=True)
class _Issuer:
    ca: IssuingCa
    # Serials of the certificates of CAs loaded here that this CA issued.
    ca_serials: frozenset[int]


@dataclass(frozen=True, slots=True)
class _Entry:
    revision: int
    this_update: dt.datetime
    state: CertState
    der: bytes | None  # None: only the status is known (made for a request with a nonce)


def _admit_all() -> bool:
    return True


class OcspResponder:
    def __init__(
        self,
        *,
        cas: Mapping[str, IssuingCa],
        store: OcspStore,
        validity: dt.timedelta,
        local_revision: Callable[[str], int | None] | None = None,
        max_entries: int = CACHE_ENTRIES,
    ) -> None:
        if validity <= dt.timedelta(0):
            raise ValueError(f"validity must be positive, got {validity}")
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.validity = validity
        self._store = store
        self._local_revision = local_revision
        self._max_entries = max_entries
        self._issuers: dict[tuple[str, bytes, bytes], _Issuer] = {}
        for ca in cas.values():
            issued = frozenset(
                other.cert.serial_number
                for other in cas.values()
                if len(other.chain) > 1 and other.chain[1] == ca.cert
            )
            for algorithm in HASHES:
                name_hash, key_hash = issuer_hashes(ca.cert, algorithm)
                self._issuers[(algorithm, name_hash, key_hash)] = _Issuer(ca, issued)
        self._polled: dict[str, int] = {}
        self._cache: dict[tuple[str, int, str], _Entry] = {}
        self._lock = threading.Lock()

    def poll(self) -> None:
        """Read each CA's revocation revision from the database (``Unavailable`` when it
        is down: the revisions known stay)."""
        self._polled = self._store.crl_revisions()

    def revision(self, ca: str) -> int:
        """The newest revocation revision of ``ca`` known here."""
        local = self._local_revision(ca) if self._local_revision is not None else None
        return max(self._polled.get(ca, 0), local or 0)

    def __len__(self) -> int:
        return len(self._cache)

    def respond(
        self, request: bytes, *, now: dt.datetime, admit: Callable[[], bool] = _admit_all
    ) -> bytes:
        """The DER OCSPResponse to a DER OCSPRequest; never raises. ``admit`` is asked
        before anything is signed or read from the database (not for a cached
        response): False answers ``tryLater``."""
        try:
            query = parse_request(request)
        except MalformedRequest:
            return MALFORMED
        cert_id = query.cert_id
        issuer = self._issuers.get(
            (cert_id.algorithm, cert_id.issuer_name_hash, cert_id.issuer_key_hash)
        )
        if issuer is None:
            return UNAUTHORIZED
        ca = issuer.ca
        key = (ca.name, cert_id.serial, cert_id.algorithm)
        revision = self.revision(ca.name)
        entry = self._cache.get(key)
        current = (
            entry is not None
            and entry.revision == revision
            and entry.this_update <= now < entry.this_update + self.validity / 2
        )
        if current and query.nonce is None and entry is not None and entry.der is not None:
            return entry.der
        if not admit():
            return TRY_LATER
        try:
            if entry is None or not current:
                entry = _Entry(revision, now, self._state(issuer, cert_id.serial, now), None)
            der = build_response(
                cert_id=cert_id,
                state=entry.state,
                issuer=ca.cert,
                issuer_key=ca.key,
                this_update=entry.this_update,
                next_update=entry.this_update + self.validity,
                nonce=query.nonce,
            )
        except Unavailable as exc:
            log.debug("OCSP: database unavailable (%s): tryLater", exc)
            return TRY_LATER
        except SignerUnavailable as exc:
            # The token is away: the signer logs the outage once; no traceback per request.
            log.debug("OCSP: CA %s cannot sign now (%s): tryLater", ca.name, exc.reason)
            return TRY_LATER
        except Exception:
            log.exception("OCSP: no response for serial %X of CA %s", cert_id.serial, ca.name)
            return INTERNAL_ERROR
        if query.nonce is None:
            self._keep(key, replaced(entry, der=der))
        elif not current:
            self._keep(key, entry)
        return der

    def _state(self, issuer: _Issuer, serial: int, now: dt.datetime) -> CertState:
        record = self._store.get_certificate(serial_hex(serial))
        if record is None or record.ca != issuer.ca.name:
            return GOOD if serial in issuer.ca_serials else UNKNOWN
        if record.status is not CertStatus.REVOKED:
            return GOOD
        reason = REASONS.get(record.revocation_reason or "", x509.ReasonFlags.unspecified)
        return CertState(
            ocsp.OCSPCertStatus.REVOKED,
            revoked_at=record.revoked_at or now,
            # As in the CRL: no reasonCode rather than "unspecified" (RFC 5280 5.3.1).
            reason=None if reason is x509.ReasonFlags.unspecified else reason,
        )

    def _keep(self, key: tuple[str, int, str], entry: _Entry) -> None:
        with self._lock:
            self._cache.pop(key, None)  # to the end: the older half is dropped first
            self._cache[key] = entry
            if len(self._cache) > self._max_entries:
                for old in list(itertools.islice(self._cache, len(self._cache) // 2)):
                    del self._cache[old]
