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

An offline root's CRL is signed on the root's own machine (``estkit root crl``) and
imported (``estkit ca import --root-crl``); the publisher never signs it. It copies the
imported file into the directory whenever it changes, if its signature is the root's,
and logs a warning from ``IMPORTED_CRL_WARNING`` before its nextUpdate (or from the
last quarter of its validity, when that is shorter), once a day, and when it has expired.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from estkit.ca.authority import IssuingCa
from estkit.ca.files import write_atomic
from estkit.ca.offline import load_pem_or_der
from estkit.durations import format_duration
from estkit.pki.crl import build_crl
from estkit.store import SqlStore
from estkit.store.errors import Unavailable

log = logging.getLogger("estkit.ca")

# How long before an imported CRL's nextUpdate the server starts warning (at most a
# quarter of the CRL's validity): time enough to hold a root ceremony.
IMPORTED_CRL_WARNING = dt.timedelta(days=30)
# A warning that still holds is logged again after this long.
_WARN_AGAIN = dt.timedelta(days=1)


def load_crl(data: bytes, *, issuer: x509.Certificate) -> x509.CertificateRevocationList:
    """A CRL (DER or PEM) of ``issuer``: its name and signature are checked, and it must
    carry a nextUpdate and a CRL number; ``ValueError`` saying what is wrong."""
    crl = load_pem_or_der(
        data,
        pem=x509.load_pem_x509_crl,
        der=x509.load_der_x509_crl,
        what="a CRL (DER or PEM)",
    )
    who = issuer.subject.rfc4514_string()
    if crl.issuer != issuer.subject:
        raise ValueError(f"issued by {crl.issuer.rfc4514_string()}, not by {who}")
    if not crl.is_signature_valid(issuer.public_key()):  # type: ignore[arg-type]
        raise ValueError(f"its signature is not {who}'s")
    if crl.next_update_utc is None:
        raise ValueError("it has no nextUpdate")
    try:
        crl.extensions.get_extension_for_class(x509.CRLNumber)
    except x509.ExtensionNotFound:
        raise ValueError("it has no CRL number") from None
    return crl


def crl_number(crl: x509.CertificateRevocationList) -> int:
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def imported_crl_warning(
    crl: x509.CertificateRevocationList, *, name: str, now: dt.datetime
) -> str | None:
    """What to warn about an offline CA's CRL at ``now``: expired, or expiring within
    ``IMPORTED_CRL_WARNING`` (or the last quarter of its validity); else None."""
    next_update = crl.next_update_utc
    if next_update is None:
        return None
    renew = (
        f"sign a new one on the {name} CA's machine (`estkit root crl`) and import it "
        "here (`estkit ca import --root-crl`)"
    )
    if now >= next_update:
        return (
            f"the CRL of the offline {name} CA expired at {next_update.isoformat()}: "
            f"relying parties that check it refuse every certificate under it; {renew}"
        )
    ahead = min(IMPORTED_CRL_WARNING, (next_update - crl.last_update_utc) / 4)
    left = next_update - now
    if left > ahead:
        return None
    return (
        f"the CRL of the offline {name} CA expires at {next_update.isoformat()} "
        f"(in {_roughly(left)}); {renew}"
    )


def _roughly(left: dt.timedelta) -> str:
    """``left`` rounded down to whole days, hours or minutes: ``19d``, ``5h``, ``12m``."""
    for unit in (dt.timedelta(days=1), dt.timedelta(hours=1), dt.timedelta(minutes=1)):
        if left >= unit:
            return format_duration(unit * (left // unit))
    return format_duration(dt.timedelta(seconds=max(1, int(left.total_seconds()))))


@dataclass(frozen=True, slots=True)
class ImportedCrl:
    """An offline CA (the root): its certificate, and where ``estkit ca import`` keeps its
    CRL, signed on its own machine. Served, never signed, here."""

    name: str
    cert: x509.Certificate
    source: Path


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
        imported: Sequence[ImportedCrl] = (),
    ) -> None:
        self._cas = dict(cas)
        self._store = store
        self.directory = directory
        self.validity = validity
        self._imported = {i.name: i for i in imported}
        # Per imported CRL: the bytes last installed (or refused) and what was last logged
        # about it, and when, so a file checked every second is logged about rarely.
        self._seen: dict[str, bytes] = {}
        self._current_crl: dict[str, x509.CertificateRevocationList] = {}
        self._logged: dict[str, tuple[str, dt.datetime]] = {}
        # Per CA: the state file last read by ``published_revision`` (inode, mtime, size)
        # and the revision in it.
        self._revision_seen: dict[str, tuple[tuple[int, int, int], int | None]] = {}

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

    def published_revision(self, ca: str) -> int | None:
        """The revision of ``published(ca)``, read again only when its file changed: one
        ``stat`` per call, cheap enough for every OCSP request. A revocation on this node
        republishes before it returns (``on_revocation``), so it shows here at once."""
        try:
            st = os.stat(self._state_path(ca))
        except OSError:
            return None
        mark = (st.st_ino, st.st_mtime_ns, st.st_size)
        seen = self._revision_seen.get(ca)
        if seen is not None and seen[0] == mark:
            return seen[1]
        # Read after the stat: files are replaced whole, so what is read is as new as the
        # mark or newer (and a newer file has another mark: it is read again).
        state = self.published(ca)
        revision = state.revision if state is not None else None
        self._revision_seen[ca] = (mark, revision)
        return revision

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
        if ca in self._imported:
            raise ValueError(f"CA {ca!r} is offline: its CRL is signed on its own machine")
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
        """Republish the CRLs of ``names`` (default: every CA signing here). A name this
        node does not sign for (a CA generation it has not loaded yet: restarted later
        than the node that issued from it) is logged and left to the nodes that do."""
        for name in names if names is not None else self._cas:
            if name not in self._cas:
                log.warning(
                    "CRL of CA %s not republished here: this node has not loaded it "
                    "(restart it with the CA's table, certificate and key)",
                    name,
                )
                continue
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
        for imported in self._imported.values():
            if self._install(imported, now=now):
                due.append(imported.name)
        return due

    def _install(self, imported: ImportedCrl, *, now: dt.datetime) -> bool:
        """Serve the imported CRL of an offline CA if it changed; warn about its nextUpdate.
        True when a new file was installed."""
        name = imported.name
        try:
            data = imported.source.read_bytes()
        except OSError as exc:
            why = f"{imported.source}: {exc.strerror or exc}"
            self._log_once(name, "missing", f"no CRL of the offline {name} CA to serve: {why}", now)
            return False
        installed = False
        if data != self._seen.get(name):
            self._seen[name] = data
            self._current_crl.pop(name, None)
            try:
                crl = load_crl(data, issuer=imported.cert)
            except ValueError as exc:
                self._log_once(name, "refused", f"{imported.source}: not served: {exc}", now)
                return False
            served = self._last_number(name)
            if crl_number(crl) < served:
                why = f"CRL number {crl_number(crl)} is older than the one served ({served})"
                self._log_once(name, "older", f"{imported.source}: not served: {why}", now)
                return False
            der = crl.public_bytes(Encoding.DER)
            path = self.path(name)
            installed = not path.exists() or path.read_bytes() != der
            if installed:
                write_atomic(path, der)
            self._current_crl[name] = crl
        current = self._current_crl.get(name)
        if current is not None and (warning := imported_crl_warning(current, name=name, now=now)):
            next_update = current.next_update_utc
            expired = next_update is not None and now >= next_update
            self._log_once(
                name, f"{'expired' if expired else 'expiring'} {next_update}", warning, now
            )
        return installed

    def _log_once(self, name: str, what: str, message: str, now: dt.datetime) -> None:
        """Log ``message`` unless ``what`` was logged about ``name`` within a day."""
        last = self._logged.get(name)
        if last is not None and last[0] == what and now - last[1] < _WARN_AGAIN:
            return
        self._logged[name] = (what, now)
        log.warning("%s", message)
