"""Publishing CRLs: one file per CA, rewritten after every revocation and before it expires.

Files are written atomically to ``<dir>/<ca>.crl`` (DER); any web server, and
estkit's own plain-HTTP listener, serves them at the URL issued certificates
carry as their CRL distribution point.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from estkit.ca.authority import IssuingCa
from estkit.ca.files import write_atomic
from estkit.pki.crl import build_crl
from estkit.store import SqlStore


class CrlPublisher:
    def __init__(
        self,
        *,
        cas: Mapping[str, IssuingCa],
        store: SqlStore,
        directory: Path,
        validity: dt.timedelta,
    ) -> None:
        self._cas = dict(cas)
        self._store = store
        self.directory = directory
        self.validity = validity

    def path(self, ca: str) -> Path:
        return self.directory / f"{ca}.crl"

    def publish(self, ca: str, *, now: dt.datetime) -> x509.CertificateRevocationList:
        issuing = self._cas[ca]
        crl = build_crl(
            issuer=issuing.cert,
            issuer_key=issuing.key,
            revoked=self._store.revoked_certificates(ca),
            now=now,
            validity=self.validity,
            # Milliseconds since the epoch: increases across restarts and server nodes.
            number=int(now.timestamp() * 1000),
        )
        write_atomic(self.path(ca), crl.public_bytes(Encoding.DER))
        return crl

    def publish_all(self, *, now: dt.datetime, names: Iterable[str] | None = None) -> None:
        for name in names if names is not None else self._cas:
            self.publish(name, now=now)

    def refresh_due(self, *, now: dt.datetime) -> list[str]:
        """Republish each CRL that is missing or past half its validity; return their names."""
        due = []
        for name in self._cas:
            try:
                crl = x509.load_der_x509_crl(self.path(name).read_bytes())
                next_update = crl.next_update_utc
                fresh = next_update is not None and next_update - now > self.validity / 2
            except (OSError, ValueError):
                fresh = False
            if not fresh:
                self.publish(name, now=now)
                due.append(name)
        return due
