"""The offline root: its directory on its own machine, and the checks of what it signed.

The root's directory (``estkit root init --dir R``) is never a server's data directory::

    R/root.toml           where the root's key is: signer = "file" (R/root.key, 0600) or
                          "pkcs11" (module, token, key label, where the PIN is read)
    R/root.pem            the self-signed root certificate: the devices' trust anchor
    R/root.key            its key, with signer = "file"
    R/state.json          the last CRL number, the revocations every later CRL lists, and
                          the name each signed CA certificate was signed for
    R/issued/<serial>.pem every CA certificate the root signed

The root signs only two things: issuing CA certificates, from a certification request,
with the profile estkit gives its own CAs (``sign_ca``: CA:TRUE pathlen 0, keyCertSign
and cRLSign, SKI/AKI, never outliving the root), and its CRL, whose numbers only increase.
Nothing here needs the server's extra: the root's machine needs ``pip install estkit``
(and ``estkit[hsm]`` for a key in a token).

The server checks what is carried back (``check_root``, ``check_issuing_ca``) before
``estkit ca import`` installs it.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509

from estkit.ca.files import write_atomic
from estkit.ca.keyrefs import TokenKeyRef, token_key_spec
from estkit.pki.certs import certs_to_pem, is_issued_by, load_pem_certificates, serial_hex
from estkit.pki.crl import build_crl
from estkit.pki.keys import PrivateKey, key_type_of, load_private_key_pem, public_keys_match
from estkit.pki.profiles import issue_ca

SETTINGS = "root.toml"
CERT = "root.pem"
KEY = "root.key"
STATE = "state.json"
ISSUED = "issued"
# What marks a server's data directory (``server.config.CONFIG_NAME``), which the root's
# directory must never be.
SERVER_CONFIG = "estkit.toml"


_Loaded = TypeVar("_Loaded")


def load_pem_or_der(
    data: bytes, *, pem: Callable[[bytes], _Loaded], der: Callable[[bytes], _Loaded], what: str
) -> _Loaded:
    """``data`` as what is carried between the root's machine and the server may be: PEM
    (read by ``pem``) when it starts so, else DER (``der``); ``ValueError`` "not ``what``"
    when it is neither."""
    try:
        return pem(data) if data.lstrip().startswith(b"-----BEGIN") else der(data)
    except ValueError:
        raise ValueError(f"not {what}") from None


# -- what the root signs --------------------------------------------------------------


def load_request(data: bytes) -> x509.CertificateSigningRequest:
    """A certification request (PEM or DER) whose signature verifies and whose key is of
    a type estkit accepts; ``ValueError`` saying what is wrong. Its extensions are
    ignored: the profile decides what the certificate carries."""
    csr = load_pem_or_der(
        data,
        pem=x509.load_pem_x509_csr,
        der=x509.load_der_x509_csr,
        what="a certification request (PKCS#10, PEM or DER)",
    )
    try:
        key_type_of(csr.public_key())
    except ValueError as exc:  # pki's KeyPolicyError
        raise ValueError(f"its key is not accepted: {exc}") from None
    if not csr.is_signature_valid:
        raise ValueError("its signature does not verify (not signed by its own key)")
    if len(csr.subject) == 0:
        raise ValueError("its subject is empty; a CA needs a name")
    return csr


def sign_ca(
    csr: x509.CertificateSigningRequest,
    *,
    root: x509.Certificate,
    root_key: PrivateKey,
    validity: dt.timedelta,
    now: dt.datetime,
) -> x509.Certificate:
    """An issuing CA certificate for ``csr``'s subject and key, signed by the root: the
    profile of estkit's own issuing CAs, valid for ``validity`` but never past the root."""
    if public_keys_match(csr.public_key(), root.public_key()):
        raise ValueError("it is a request for the root's own key")
    if csr.subject == root.subject:
        raise ValueError(f"its subject is the root's ({root.subject.rfc4514_string()})")
    if root.not_valid_after_utc <= now:
        raise ValueError(f"the root expired at {root.not_valid_after_utc.isoformat()}")
    return issue_ca(
        subject=csr.subject,
        public_key=csr.public_key(),
        issuer=root,
        issuer_key=root_key,
        validity=validity,
        now=now,
        path_length=0,
    )


# -- what the server checks before it installs -------------------------------------


def _constraints(cert: x509.Certificate) -> tuple[bool, x509.KeyUsage | None]:
    try:
        ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        ca = False
    try:
        usage: x509.KeyUsage | None = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    return ca, usage


def _check_validity(cert: x509.Certificate, now: dt.datetime) -> None:
    if cert.not_valid_after_utc <= now:
        raise ValueError(f"it expired at {cert.not_valid_after_utc.isoformat()}")
    if cert.not_valid_before_utc > now:
        raise ValueError(f"it is not valid before {cert.not_valid_before_utc.isoformat()}")


def check_root(cert: x509.Certificate, *, now: dt.datetime) -> None:
    """``cert`` can be the trust anchor: self-signed, a CA that may sign certificates
    and CRLs, valid at ``now``; else ``ValueError``."""
    if cert.issuer != cert.subject or not is_issued_by(cert, cert):
        raise ValueError(f"{cert.subject.rfc4514_string()} is not a self-signed root")
    ca, usage = _constraints(cert)
    if not ca:
        raise ValueError("it is not a CA certificate (basicConstraints CA:TRUE)")
    if usage is not None and not (usage.key_cert_sign and usage.crl_sign):
        raise ValueError("its keyUsage does not allow signing certificates and CRLs")
    _check_validity(cert, now)


def check_issuing_ca(cert: x509.Certificate, *, root: x509.Certificate, now: dt.datetime) -> None:
    """``cert`` can be an issuing CA of this server under ``root``: a CA certificate that
    may sign certificates and CRLs, signed by ``root``, valid at ``now``; else
    ``ValueError``."""
    if cert == root or public_keys_match(cert.public_key(), root.public_key()):
        raise ValueError("it is the root's own certificate")
    ca, usage = _constraints(cert)
    if not ca:
        raise ValueError("it is not a CA certificate (basicConstraints CA:TRUE)")
    if usage is None or not (usage.key_cert_sign and usage.crl_sign):
        raise ValueError("its keyUsage does not allow signing certificates and CRLs")
    if not is_issued_by(cert, root):
        raise ValueError(
            f"it does not chain to the root {root.subject.rfc4514_string()} "
            f"(issuer {cert.issuer.rfc4514_string()}, signature not the root's)"
        )
    _check_validity(cert, now)


# -- the root's directory -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RootSettings:
    """Where the root's key is: a PEM file (``key_file``) or a token (``token``)."""

    signer: str
    key_file: Path | None = None
    token: TokenKeyRef | None = None

    def describe(self) -> str:
        if self.token is not None:
            return f"key {self.token.key_label!r} in token {self.token.token_label!r}"
        return f"key file {self.key_file}"

    def to_toml(self, directory: Path) -> str:
        lines = [
            "# The offline root of estkit, written by `estkit root init`. Keep this directory",
            "# on the root's machine (and its backups); carry out only root.pem, the CA",
            "# certificates the root signs and its CRLs.",
            "[root]",
            f"cert = {json.dumps(CERT)}",
            f"signer = {json.dumps(self.signer)}",
        ]
        if self.key_file is not None:
            shown = self.key_file.name if self.key_file.parent == directory else self.key_file
            lines.append(f"key = {json.dumps(str(shown))}")
        if self.token is not None:
            ref = self.token
            lines += [
                f"module = {json.dumps(str(ref.module))}",
                f"token_label = {json.dumps(ref.token_label)}",
                f"key_label = {json.dumps(ref.key_label)}",
            ]
            if ref.key_id is not None:
                lines.append(f"key_id = {json.dumps(ref.key_id.hex())}")
            if ref.pin_file is not None:
                lines.append(f"pin_file = {json.dumps(str(ref.pin_file))}")
            if ref.pin_env is not None:
                lines.append(f"pin_env = {json.dumps(ref.pin_env)}")
        return "\n".join(lines) + "\n"


def _settings_from(table: Mapping[str, Any], directory: Path) -> RootSettings:
    where = f"{directory / SETTINGS}: root"

    def text(key: str) -> str | None:
        value = table.get(key)
        if value is not None and not (isinstance(value, str) and value):
            raise ValueError(f"{where}.{key}: expected a non-empty string, got {value!r}")
        return value

    def path(key: str) -> Path | None:
        value = text(key)
        return None if value is None else directory / value

    signer = text("signer")
    if signer == "file":
        key = path("key")
        if key is None:
            raise ValueError(f"{where}.key: required with signer = 'file'")
        return RootSettings(signer=signer, key_file=key)
    if signer == "pkcs11":
        module, token_label = text("module"), text("token_label")
        if module is None or token_label is None:
            raise ValueError(f"{where}: module and token_label required with signer = 'pkcs11'")
        key_id = text("key_id")
        ref = TokenKeyRef(
            module=Path(module),
            token_label=token_label,
            key_label=text("key_label"),
            key_id=bytes.fromhex(key_id) if key_id else None,
            pin_file=path("pin_file"),
            pin_env=text("pin_env"),
            field=where,
        )
        return RootSettings(signer=signer, token=ref)
    raise ValueError(f"{where}.signer: 'file' or 'pkcs11', got {signer!r}")


@dataclass(frozen=True, slots=True)
class Revocation:
    serial: str  # hex, as ``serial_hex`` writes it
    revoked_at: dt.datetime
    reason: str


@dataclass(frozen=True, slots=True)
class RootState:
    """What the root's CRLs and records need to remember (``R/state.json``)."""

    crl_number: int = 0
    revoked: tuple[Revocation, ...] = ()
    # serial (hex) -> the name the CA certificate was signed for (``--name``)
    names: Mapping[str, str] | None = None

    def to_json(self) -> bytes:
        data = {
            "crl_number": self.crl_number,
            "revoked": [
                {"serial": r.serial, "revoked_at": r.revoked_at.isoformat(), "reason": r.reason}
                for r in self.revoked
            ],
            "issued": dict(self.names or {}),
        }
        return (json.dumps(data, indent=2) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> RootState:
        raw = json.loads(data)
        return cls(
            crl_number=int(raw["crl_number"]),
            revoked=tuple(
                Revocation(
                    serial=str(r["serial"]),
                    revoked_at=dt.datetime.fromisoformat(r["revoked_at"]),
                    reason=str(r["reason"]),
                )
                for r in raw["revoked"]
            ),
            names={str(k): str(v) for k, v in raw.get("issued", {}).items()},
        )


@dataclass(frozen=True, slots=True)
class SignedCa:
    """A CA certificate the root signed, and the name it was signed for."""

    name: str
    cert: x509.Certificate
    revoked: Revocation | None


class RootDirectory:
    """The offline root's directory: its settings, certificate, key, state and records."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def cert_path(self) -> Path:
        return self.path / CERT

    @property
    def settings_path(self) -> Path:
        return self.path / SETTINGS

    def check_not_a_server(self) -> None:
        if (self.path / SERVER_CONFIG).exists():
            raise ValueError(
                f"{self.path} is an estkit server's data directory ({SERVER_CONFIG}); the "
                "offline root keeps a directory of its own, on a machine of its own"
            )

    def settings(self) -> RootSettings:
        try:
            data = tomllib.loads(self.settings_path.read_text())
        except FileNotFoundError:
            raise ValueError(
                f"{self.settings_path}: not found; `estkit root init --dir {self.path}` makes "
                "the root"
            ) from None
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{self.settings_path}: {exc}") from None
        table = data.get("root")
        if not isinstance(table, Mapping):
            raise ValueError(f"{self.settings_path}: [root] table required")
        return _settings_from(table, self.path)

    def cert(self) -> x509.Certificate:
        return load_pem_certificates(self.cert_path.read_bytes())[0]

    def key(self, environ: Mapping[str, str]) -> PrivateKey:
        """The root's private key, checked to be its certificate's (file or token)."""
        settings, cert = self.settings(), self.cert()
        if settings.token is not None:
            from estkit.ca import hsm

            spec = token_key_spec("root", settings.token, environ)
            return hsm.open_token_key("root", spec, cert.public_key())
        assert settings.key_file is not None
        key = load_private_key_pem(settings.key_file.read_bytes())
        if not public_keys_match(key.public_key(), cert.public_key()):
            raise ValueError(f"{settings.key_file} is not the key of {self.cert_path}")
        return key

    def state(self) -> RootState:
        try:
            return RootState.from_json((self.path / STATE).read_bytes())
        except FileNotFoundError:
            return RootState()
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{self.path / STATE}: unreadable ({exc})") from None

    def save_state(self, state: RootState) -> None:
        write_atomic(self.path / STATE, state.to_json(), mode=0o600)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """One command at a time changes the root's state (CRL numbers, records)."""
        fd = os.open(self.path / ".lock", os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def record(self, name: str, cert: x509.Certificate) -> Path:
        """Keep a copy of a CA certificate the root signed, and the name it was for."""
        serial = serial_hex(cert.serial_number)
        path = self.path / ISSUED / f"{serial}.pem"
        with self.locked():
            write_atomic(path, certs_to_pem([cert]))
            state = self.state()
            self.save_state(
                RootState(
                    crl_number=state.crl_number,
                    revoked=state.revoked,
                    names={**(state.names or {}), serial: name},
                )
            )
        return path

    def signed(self) -> list[SignedCa]:
        """Every CA certificate the root signed, oldest first."""
        state = self.state()
        revoked = {r.serial: r for r in state.revoked}
        found = []
        for path in sorted((self.path / ISSUED).glob("*.pem")):
            cert = load_pem_certificates(path.read_bytes())[0]
            serial = serial_hex(cert.serial_number)
            name = (state.names or {}).get(serial, "")
            found.append(SignedCa(name=name, cert=cert, revoked=revoked.get(serial)))
        return sorted(found, key=lambda s: s.cert.not_valid_before_utc)

    def sign_crl(
        self,
        *,
        key: PrivateKey,
        revoke: Sequence[tuple[str, str]],
        validity: dt.timedelta,
        now: dt.datetime,
    ) -> x509.CertificateRevocationList:
        """The root's next CRL: every revocation so far and ``revoke`` (serial, reason) —
        serials of CA certificates it signed — with the next CRL number, kept before the
        CRL is handed out so that a number is never used twice."""
        with self.locked():
            state = self.state()
            signed = {serial_hex(s.cert.serial_number) for s in self.signed()}
            revoked = list(state.revoked)
            known = {r.serial for r in revoked}
            for serial, reason in revoke:
                if serial not in signed:
                    raise ValueError(
                        f"serial {serial}: not a CA certificate this root signed "
                        f"({self.path / ISSUED})"
                    )
                if serial not in known:
                    revoked.append(Revocation(serial=serial, revoked_at=now, reason=reason))
                    known.add(serial)
            number = state.crl_number + 1
            crl = build_crl(
                issuer=self.cert(),
                issuer_key=key,
                revoked=[(r.serial, r.revoked_at, r.reason) for r in revoked],
                now=now,
                validity=validity,
                number=number,
            )
            self.save_state(RootState(crl_number=number, revoked=tuple(revoked), names=state.names))
        return crl
