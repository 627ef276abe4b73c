"""Publishing CRLs: one file per CA, rewritten after every revocation and before it expires.

Files are written atomically to ``<dir>/<ca>.crl`` (DER); any web server, and
estkit's own plain-HTTP listener, serves them at the URL issued certificates
carry as their CRL distribution point.

Several nodes share one database, each with its own CRL directory. The
database keeps, per CA, a revision (bumped by every revocation) and the last
CRL number handed out: each CRL takes the next number there, so a CA's numbers
increase across all nodes (RFC 5280 5.2.3), and ``<dir>/<ca>.state`` records
the revision and number a node's file was built from, so ``refresh_due``
republishes a file the moment the database has moved past it.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from estkit.ca.authority import IssuingCa
from estkit.ca.files import write_atomic
from estkit.pki.crl import build_crl
from estkit.store import SqlStore
from estkit.store.errors import Unavailable

log = logging.getLogger("estkit.ca")


@dataclass(frozen=True, slots=True)
class PublishedCrl:
    """What a node's CRL file was built from (``<ca>.state``)."""

    revision: int
    number: int
    next_update: dt.datetime


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

    def _state_path(self, ca: str) -> Path:
        return self.directory / f"{ca}.state"

    def published(self, ca: str) -> PublishedCrl | None:
        """The state this node's CRL of ``ca`` was built from; None when unknown."""
        try:
            raw = json.loads(self._state_path(ca).read_text())
            return PublishedCrl(
                revision=int(raw["revision"]),
                number=int(raw["number"]),
                next_update=dt.datetime.fromisoformat(raw["next_update"]),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _last_number(self, ca: str) -> int:
        """The CRL number this node last published (from before the database kept
        numbers: milliseconds since the epoch), or 0."""
        state = self.published(ca)
        numbers = [state.number] if state is not None else []
        try:
            crl = x509.load_der_x509_crl(self.path(ca).read_bytes())
            ext = crl.extensions.get_extension_for_class(x509.CRLNumber)
            numbers.append(ext.value.crl_number)
        except (OSError, ValueError, x509.ExtensionNotFound):
            pass
        return max(numbers, default=0)

    @contextmanager
    def _locked(self, ca: str) -> Iterator[None]:
        """One publisher of ``ca`` at a time on this node (its workers and its refresher),
        so a file never goes back to a lower number."""
        self.directory.mkdir(parents=True, exist_ok=True)
        # Read-only and 0666 (less the umask): flock needs no write access, so a lock file
        # an operator's command created as another user never blocks the server.
        fd = os.open(
            self.directory / f".{ca}.lock", os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW, 0o666
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def publish(self, ca: str, *, now: dt.datetime) -> x509.CertificateRevocationList:
        issuing = self._cas[ca]
        with self._locked(ca):
            number, revision, revoked = self._store.next_crl(
                ca, floor=self._last_number(ca), now=now
            )
            crl = build_crl(
                issuer=issuing.cert,
                issuer_key=issuing.key,
                revoked=revoked,
                now=now,
                validity=self.validity,
                number=number,
            )
            write_atomic(self.path(ca), crl.public_bytes(Encoding.DER))
            state = {
                "revision": revision,
                "number": number,
                "next_update": (now + self.validity).isoformat(),
            }
            write_atomic(self._state_path(ca), json.dumps(state).encode())
        return crl

    def publish_all(self, *, now: dt.datetime, names: Iterable[str] | None = None) -> None:
        for name in names if names is not None else self._cas:
            self.publish(name, now=now)

    def refresh_due(self, *, now: dt.datetime) -> list[str]:
        """Republish each CRL that is missing, past half its validity, or built from an
        older revision than the database's (a revocation on any node); return their names.

        One small query (``Unavailable`` when the database is down) and one small
        file per CA: cheap enough to run every second.
        """
        revisions = self._store.crl_revisions()
        due = []
        for name in self._cas:
            state = self.published(name)
            fresh = (
                state is not None
                and self.path(name).exists()
                and state.next_update - now > self.validity / 2
                and state.revision == revisions.get(name, 0)
            )
            if not fresh:
                try:
                    self.publish(name, now=now)
                except Unavailable:
                    raise  # the database: the caller logs the outage once
                except Exception as exc:  # one CA's trouble (key, disk) keeps no other stale
                    log.warning("cannot publish the CRL of CA %s: %s", name, exc)
                    continue
                due.append(name)
        return due
