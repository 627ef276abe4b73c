"""One renewal: which certificate authenticates, the EST call, the device's checks, the swap.

First enrollment uses the bootstrap certificate (``/simpleenroll``); later
renewals the current operational certificate (``/simplereenroll``, same
Subject and SAN). When the operational certificate has expired, or the
server refuses it as expired or unknown, the bootstrap certificate enrolls
again (``bootstrap.fallback``). A revoked or decommissioned answer is final.
These decisions come from the server's refusal code (``classify_refusal``),
never from the wording of its reason, except for a server that sends no code.
The issued certificate is checked (our key, our device id, chains to the
trust anchor, valid now) before it is written as a new version and made
current. The retry maths lives here too, as pure functions; the renewal time is
``estkit.pki.renewal.renewal_time`` of the certificate itself.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import json
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from estkit.agent.config import AgentConfig
from estkit.agent.errors import ClockError, ConfigError, RenewalError, RenewalRefused, StateError
from estkit.agent.state import StateDirectory, Version
from estkit.client import (
    CircuitBreaker,
    ClientCertificate,
    EnrollmentPending,
    EstAuthError,
    EstClient,
    EstConnectionError,
    EstError,
    EstHttpError,
    IssuedCertificate,
    TrustAnchor,
    TrustAnchorError,
)
from estkit.client.breaker import DEFAULT_COOLDOWN
from estkit.fileio import PRIVATE, replace_file
from estkit.pki import certs, keys, names
from estkit.pki.csr import build_csr
from estkit.pki.errors import PkiError

log = logging.getLogger(__name__)

Clock = Callable[[], dt.datetime]
# The EST client's own retries stay short: the agent's backoff spans outages.
CLIENT_RETRIES = 1
CLIENT_BACKOFF = 0.5


# The refusal codes the agent acts on: values of the server's ``estkit.ca.errors.Code``,
# spelt out here because the device side does not import the server's package.
FINAL_CODES = frozenset({"revoked", "decommissioned"})
FALLBACK_CODES = frozenset({"expired", "not-yet-valid", "unknown-certificate", "wrong-ca"})


class Refusal(enum.Enum):
    """What a refusal from the EST server means for the agent."""

    FINAL = "final"  # revoked or decommissioned: stop renewing
    FALLBACK = "fallback"  # this certificate is expired or unknown: try the bootstrap one
    OTHER = "other"  # anything else (disabled, policy): retry slowly


def classify_refusal(code: str | None, reason: str = "") -> Refusal:
    """What the server's refusal ``code`` means. Only an answer without a code (a server
    that is not estkit) is read by the words of its one-line ``reason``."""
    if code is not None:
        if code in FINAL_CODES:
            return Refusal.FINAL
        if code in FALLBACK_CODES:
            return Refusal.FALLBACK
        return Refusal.OTHER
    text = reason.lower()
    if "decommissioned" in text or "revoked" in text:
        return Refusal.FINAL
    if any(
        phrase in text
        for phrase in ("expired", "not yet valid", "unknown to this ca", "not issued by this ca")
    ):
        return Refusal.FALLBACK
    return Refusal.OTHER


def retry_delay(failures: int, *, minimum: float, maximum: float, rng: random.Random) -> float:
    """Seconds before the next attempt after ``failures`` (≥ 1) failures in a row.

    ``minimum * 2**(failures-1)``, capped at ``maximum``, plus up to half of it
    as jitter, and never above ``maximum``: devices that failed together
    (a server outage) do not all come back in the same second.
    """
    if failures < 1:
        raise ValueError(f"failures counts from 1, got {failures}")
    base = min(maximum, minimum * 2.0 ** min(failures - 1, 60))
    return min(maximum, base * (1.0 + 0.5 * rng.random()))


def clock_is_plausible(now: dt.datetime, cert: x509.Certificate, tolerance: float) -> bool:
    """False when ``now`` is before ``cert``'s notBefore by more than ``tolerance`` seconds:
    a clock that early (a device booting without time) must not drive renewals."""
    return now >= cert.not_valid_before_utc - dt.timedelta(seconds=tolerance)


@dataclass(frozen=True, slots=True)
class Credentials:
    """The factory credentials and the trust anchor, checked at start."""

    bootstrap: x509.Certificate
    bootstrap_auth: ClientCertificate
    trust: TrustAnchor


def load_credentials(config: AgentConfig, state: StateDirectory) -> Credentials:
    """Check the files the config names; ``ConfigError`` names the field of a bad one."""
    b = config.bootstrap
    cert_pem = _read(b.cert, "bootstrap.cert")
    key_pem = _read(b.key, "bootstrap.key")
    try:
        leaf = certs.load_pem_certificates(cert_pem)
    except PkiError as exc:
        raise ConfigError("bootstrap.cert", f"{b.cert}: {exc}") from exc
    try:
        key = keys.load_private_key_pem(key_pem)
    except PkiError as exc:
        raise ConfigError("bootstrap.key", f"{b.key}: {exc}") from exc
    if not keys.public_keys_match(leaf[0].public_key(), key.public_key()):
        raise ConfigError("bootstrap.key", f"{b.key} is not the key of {b.cert}")
    if names.common_name(leaf[0].subject) != config.device_id:
        raise ConfigError(
            "bootstrap.cert",
            f"{b.cert} is for {leaf[0].subject.rfc4514_string()!r}, not CN={config.device_id}",
        )
    auth = ClientCertificate(b.cert, b.key)
    if b.chain is not None:
        chain_pem = _read(b.chain, "bootstrap.chain")
        try:
            chain = certs.load_pem_certificates(chain_pem)
        except PkiError as exc:
            raise ConfigError("bootstrap.chain", f"{b.chain}: {exc}") from exc
        # TLS sends what one file holds: the certificate and its chain, together.
        state.prepare()
        combined = state.root / "bootstrap-fullchain.pem"
        try:
            replace_file(combined, certs.certs_to_pem([leaf[0], *chain]), mode=PRIVATE)
        except OSError as exc:
            raise StateError(f"cannot write {combined}: {exc.strerror}") from exc
        auth = ClientCertificate(combined, b.key)
    if config.est.trust_anchor is not None:
        try:
            trust = TrustAnchor.from_file(config.est.trust_anchor)
        except TrustAnchorError as exc:
            raise ConfigError("est.trust_anchor", str(exc)) from exc
    else:
        assert config.est.trust_anchor_fingerprint is not None
        trust = TrustAnchor.from_fingerprint(config.est.trust_anchor_fingerprint)
    if config.hub is not None and config.hub.enabled and config.hub.ca_file is not None:
        try:
            certs.load_pem_certificates(_read(config.hub.ca_file, "hub.ca_file"))
        except PkiError as exc:
            raise ConfigError("hub.ca_file", f"{config.hub.ca_file}: {exc}") from exc
    return Credentials(bootstrap=leaf[0], bootstrap_auth=auth, trust=trust)


@dataclass(frozen=True, slots=True)
class Renewal:
    """A new version, swapped in; ``operation`` says how it was obtained."""

    version: Version
    operation: str  # "simpleenroll" or "simplereenroll"
    authenticated_with: str  # "bootstrap" or "operational"


class Renewer:
    """Renews the device's certificate; the caller holds the state directory's swap lock."""

    def __init__(
        self,
        config: AgentConfig,
        state: StateDirectory,
        credentials: Credentials,
        *,
        clock: Clock,
        breaker: CircuitBreaker | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._config = config
        self._state = state
        self._credentials = credentials
        self._trust = credentials.trust
        self._clock = clock
        self._pending = PendingRequest(state.root / "pending.json")
        # One breaker for the agent's lifetime: every EST client of the server shares it.
        # Its cool-down never exceeds retry_max, the longest the operator wants the agent
        # to go without trying the server.
        if breaker is None:
            cooldown = min(DEFAULT_COOLDOWN, config.renewal.retry_max)
            breaker = CircuitBreaker(cooldown=cooldown)
        self._breaker = breaker
        self._transport = transport  # tests: a scripted EST server

    @property
    def bootstrap_certificate(self) -> x509.Certificate:
        return self._credentials.bootstrap

    def check_clock(self, current: Version | None) -> None:
        """``ClockError`` when the clock is implausibly early for the certificate in use."""
        cert = current.certificate if current is not None else self._credentials.bootstrap
        now = self._clock()
        tolerance = self._config.renewal.clock_tolerance
        if not clock_is_plausible(now, cert, tolerance):
            which = "current" if current is not None else "bootstrap"
            raise ClockError(
                f"clock reads {now.isoformat(timespec='seconds')}, before the {which} "
                f"certificate's notBefore {cert.not_valid_before_utc.isoformat()} minus "
                f"{tolerance:g} s: refusing to act until the clock is right"
            )

    def renew(self, current: Version | None) -> Renewal:
        """Obtain, check and swap in a new version; raise an ``AgentError`` otherwise."""
        self.check_clock(current)
        now = self._clock()
        fallback = self._config.bootstrap.fallback
        if current is not None and now < current.not_after:
            try:
                return self._run(self._reenroll, current)
            except _Refused as refused:
                kind = refused.kind
                if kind is Refusal.FINAL:
                    raise _final(refused) from None
                if kind is Refusal.FALLBACK and fallback:
                    log.warning(
                        "operational certificate refused (%s): enrolling with the bootstrap "
                        "certificate",
                        refused.error.reason,
                    )
                else:
                    raise RenewalError(str(refused.error), slow=True) from None
        elif current is not None:
            if not fallback:
                raise RenewalError(
                    f"operational certificate expired at {current.not_after.isoformat()} and "
                    "bootstrap.fallback is off",
                    slow=True,
                )
            log.warning(
                "operational certificate expired at %s: enrolling with the bootstrap certificate",
                current.not_after.isoformat(),
            )
        try:
            return self._run(self._enroll, current)
        except _Refused as refused:
            if refused.kind is Refusal.FINAL:
                raise _final(refused) from None
            raise RenewalError(str(refused.error), slow=True) from None

    def confirm(self, version: Version) -> bool:
        """True when the EST server sees ``version``'s certificate over mTLS (it works)."""
        try:
            with self._client(ClientCertificate(version.fullchain_path, version.key_path)) as est:
                seen = est.health()
        except EstError as exc:
            log.info("could not confirm version %d with the EST server: %s", version.number, exc)
            return False
        return seen.serial_number == version.certificate.serial_number

    # -- internals -------------------------------------------------------------

    def _run(
        self, operation: Callable[[Version | None], Renewal], current: Version | None
    ) -> Renewal:
        try:
            return operation(current)
        except EstHttpError as exc:
            # Only a refusal of the credentials (401/403) can stop the agent or send it
            # back to its bootstrap certificate: a proxy's 502 page that happens to say
            # "revoked" must not end a device's renewals for good.
            if isinstance(exc, EstAuthError):
                raise _Refused(exc, classify_refusal(exc.code, exc.reason)) from exc
            raise RenewalError(
                str(exc), retry_after=exc.retry_after, slow=exc.status < 500
            ) from exc
        except EnrollmentPending as exc:
            raise RenewalError(str(exc), retry_after=exc.retry_after) from exc
        except (TrustAnchorError, EstConnectionError) as exc:
            raise RenewalError(str(exc)) from exc
        except EstError as exc:
            raise RenewalError(str(exc)) from exc
        except StateError as exc:
            raise RenewalError(str(exc), slow=True) from exc

    def _reenroll(self, current: Version | None) -> Renewal:
        assert current is not None
        cert = current.certificate
        key, csr = self._request(
            "simplereenroll",
            current,
            subject=cert.subject,
            sans=names.subject_alt_names(cert.extensions),
        )
        auth = ClientCertificate(current.fullchain_path, current.key_path)
        with self._pending_kept("simplereenroll", current, key, csr), self._client(auth) as est:
            issued = self._check(
                est, est.simplereenroll(csr), key, subject=cert.subject, current=current
            )
        return Renewal(
            version=self._swap(key, issued),
            operation="simplereenroll",
            authenticated_with="operational",
        )

    def _enroll(self, current: Version | None) -> Renewal:
        bootstrap = self._credentials.bootstrap
        now = self._clock()
        if now > bootstrap.not_valid_after_utc:
            raise RenewalError(
                f"bootstrap certificate expired at {bootstrap.not_valid_after_utc.isoformat()}: "
                "the device needs a new one from the factory",
                slow=True,
            )
        if current is not None:
            # Same identity as before, with the encodings the server issued.
            subject = current.certificate.subject
            sans = names.subject_alt_names(current.certificate.extensions)
        else:
            subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self._config.device_id)])
            sans = None
        key, csr = self._request("simpleenroll", current, subject=subject, sans=sans)
        auth = self._credentials.bootstrap_auth
        with self._pending_kept("simpleenroll", current, key, csr), self._client(auth) as est:
            issued = self._check(est, est.simpleenroll(csr), key, subject=None, current=current)
        return Renewal(
            version=self._swap(key, issued),
            operation="simpleenroll",
            authenticated_with="bootstrap",
        )

    def _request(
        self,
        operation: str,
        current: Version | None,
        *,
        subject: x509.Name,
        sans: x509.SubjectAlternativeName | None,
    ) -> tuple[keys.PrivateKey, x509.CertificateSigningRequest]:
        """The key and CSR to send: the pending request's again when the server is still
        deciding on it (approval is bound to the exact CSR), else new ones."""
        pending = self._pending.load()
        if pending is not None and pending.matches(operation, current):
            log.info("asking again for pending %s request from %s", operation, pending.created)
            return pending.key, pending.csr
        key = self._new_key(current)
        return key, build_csr(key, subject=subject, sans=sans)

    @contextlib.contextmanager
    def _pending_kept(
        self,
        operation: str,
        current: Version | None,
        key: keys.PrivateKey,
        csr: x509.CertificateSigningRequest,
    ) -> Iterator[None]:
        """Remember the request while the server answers 202; forget it once decided."""
        try:
            yield
        except EnrollmentPending:
            self._pending.save(operation, current, key, csr)
            raise
        except EstAuthError:
            self._pending.clear()  # denied or refused: a later attempt starts afresh
            raise
        self._pending.clear()

    def _new_key(self, current: Version | None) -> keys.PrivateKey:
        if current is None or self._config.renewal.rotate_key:
            return keys.generate_key(self._config.renewal.key_type)
        return current.load_key()

    def _client(self, auth: ClientCertificate) -> EstClient:
        est = self._config.est
        return EstClient(
            est.url,
            trust=self._trust,
            auth=auth,
            timeout=est.timeout,
            total_timeout=est.total_timeout,
            retries=CLIENT_RETRIES,
            backoff=CLIENT_BACKOFF,
            breaker=self._breaker,
            transport=self._transport,
        )

    def _check(
        self,
        est: EstClient,
        returned: Sequence[x509.Certificate],
        key: keys.PrivateKey,
        *,
        subject: x509.Name | None,
        current: Version | None,
    ) -> IssuedCertificate:
        anchors = est.trust_anchors()
        if self._trust.needs_bootstrap:
            # Fetched once by fingerprint; later connections use the anchor itself.
            self._trust = TrustAnchor.from_certificates(anchors)
        return est.verify_issued(
            returned,
            public_key=key.public_key(),
            now=self._clock(),
            common_name=self._config.device_id,
            subject=subject,
            known=current.chain if current is not None else (),
        )

    def _swap(self, key: keys.PrivateKey, issued: IssuedCertificate) -> Version:
        version = self._state.install(
            key_pem=keys.key_to_pem(key), certificate=issued.certificate, chain=issued.chain
        )
        self._state.activate(version)
        return version


class PendingRequest:
    """A request the server answered 202 to, kept (0600) so retries send the same CSR,
    across restarts too: ``{"operation", "based_on", "created", "key", "csr"}``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @dataclass(frozen=True, slots=True)
    class Saved:
        operation: str
        based_on: int | None
        created: str
        key: keys.PrivateKey
        csr: x509.CertificateSigningRequest

        def matches(self, operation: str, current: Version | None) -> bool:
            return self.operation == operation and self.based_on == (
                current.number if current is not None else None
            )

    def load(self) -> PendingRequest.Saved | None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return PendingRequest.Saved(
                operation=str(data["operation"]),
                based_on=None if data["based_on"] is None else int(data["based_on"]),
                created=str(data["created"]),
                key=keys.load_private_key_pem(data["key"].encode("ascii")),
                csr=x509.load_pem_x509_csr(data["csr"].encode("ascii")),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("ignoring unreadable %s: %s", self.path, exc)
            return None

    def save(
        self,
        operation: str,
        current: Version | None,
        key: keys.PrivateKey,
        csr: x509.CertificateSigningRequest,
    ) -> None:
        record = {
            "operation": operation,
            "based_on": current.number if current is not None else None,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "key": keys.key_to_pem(key).decode("ascii"),
            "csr": csr.public_bytes(Encoding.PEM).decode("ascii"),
        }
        try:
            replace_file(self.path, json.dumps(record).encode("utf-8"), mode=PRIVATE)
        except OSError as exc:
            log.warning("cannot keep the pending request in %s: %s", self.path, exc)

    def clear(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class _Refused(Exception):
    def __init__(self, error: EstHttpError, kind: Refusal) -> None:
        super().__init__(str(error))
        self.error = error
        self.kind = kind


def _final(refused: _Refused) -> RenewalRefused:
    return RenewalRefused(refused.error.reason or str(refused.error), refused.error.code)


def _read(path: Path, field: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(field, f"cannot read {path}: {exc.strerror or exc}") from exc
