"""Creating the PKI once: root, the issuing CAs, and the EST server's TLS certificate.

With an offline root (``prepare_offline_pki``) the root is made on its own machine
(``ca/offline.py``): here the issuing CAs get their keys and certification requests, the
TLS server its key and request, and ``issue_tls`` makes its certificate from the bootstrap
CA once ``estkit ca import`` has installed the CA certificates the root signed.

Existing files are never touched, nor existing token keys replaced; each step says what
it did or found. A CA's key is kept where its ``CaKeyStore`` says: a PEM file
(``FileKeyStore``) or a PKCS#11 token, inside which it is made (``TokenKeyStore``). The TLS
server's key is always a file: the TLS layer needs it in memory.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from estkit.ca.files import write_atomic
from estkit.pki.certs import certs_to_pem, load_pem_certificates
from estkit.pki.keys import (
    PrivateKey,
    generate_key,
    key_to_pem,
    load_private_key_pem,
    public_keys_match,
    signature_hash,
)
from estkit.pki.profiles import Kind, Profile, issue_ca, issue_leaf

if TYPE_CHECKING:
    from estkit.ca.hsm import TokenKeySpec

ROOT_VALIDITY = dt.timedelta(days=20 * 365)
ISSUING_VALIDITY = dt.timedelta(days=15 * 365)
TLS_VALIDITY = dt.timedelta(days=825)

_CA_SUBJECTS = {
    "root": "estkit Root CA",
    "devices": "estkit Device Issuing CA",
    "bootstrap": "estkit Bootstrap CA",
}


class CaKeyStore(Protocol):
    """Where ``create_pki`` and ``prepare_offline_pki`` find or make a CA's private key."""

    def load(self, ca: str, cert: x509.Certificate) -> PrivateKey:
        """The key of the existing CA certificate ``cert`` (``ValueError`` if not its key)."""
        ...

    def new(self, ca: str, key_type: str) -> tuple[PrivateKey, str]:
        """A key for a CA certificate about to be made, and what was done for it."""
        ...

    def keep(self, key: PrivateKey) -> None:
        """Store ``key``, once its certificate has been made."""
        ...

    def pending(self, ca: str) -> PrivateKey | None:
        """The key made for a CA whose certificate is not there yet (an offline root has
        still to sign it), or None when there is none."""
        ...


@dataclass(frozen=True, slots=True)
class FileKeyStore:
    """A PEM key file (0600), written beside the new certificate."""

    path: Path

    def load(self, ca: str, cert: x509.Certificate) -> PrivateKey:
        key = load_private_key_pem(self.path.read_bytes())
        if not public_keys_match(cert.public_key(), key.public_key()):
            raise ValueError(f"CA {ca!r}: key {self.path} does not belong to its certificate")
        return key

    def new(self, ca: str, key_type: str) -> tuple[PrivateKey, str]:
        if self.path.exists():
            raise ValueError(
                f"CA {ca!r}: {self.path} exists without its certificate; estkit does not "
                "replace a key: restore the certificate or move the key away"
            )
        return generate_key(key_type), f"key {self.path}"

    def keep(self, key: PrivateKey) -> None:
        write_atomic(self.path, key_to_pem(key), mode=0o600)

    def pending(self, ca: str) -> PrivateKey | None:
        return load_private_key_pem(self.path.read_bytes()) if self.path.exists() else None


@dataclass(frozen=True, slots=True)
class TokenKeyStore:
    """A key in a PKCS#11 token: one already there under the spec's label and/or id is
    used, else one is made inside the token (sensitive, never extractable); either way
    nothing is written to disk for it."""

    spec: TokenKeySpec

    def load(self, ca: str, cert: x509.Certificate) -> PrivateKey:
        from estkit.ca.hsm import open_token_key

        return open_token_key(ca, self.spec, cert.public_key())

    def new(self, ca: str, key_type: str) -> tuple[PrivateKey, str]:
        from estkit.ca.hsm import existing_token_key, generate_token_key

        existing = existing_token_key(ca, self.spec)
        if existing is not None:
            return existing, f"existing {self.spec.describe()}"
        # A key found by its id alone in the config is labelled with the CA's name.
        spec = self.spec if self.spec.key_label else replace(self.spec, key_label=ca)
        return generate_token_key(ca, spec, key_type), f"new {spec.describe()}"

    def keep(self, key: PrivateKey) -> None:
        pass  # in the token since it was made

    def pending(self, ca: str) -> PrivateKey | None:
        from estkit.ca.hsm import existing_token_key

        return existing_token_key(ca, self.spec)


def _name(cn: str, organization: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _ca(
    name: str,
    cert_path: Path,
    keys: CaKeyStore,
    *,
    issuer: tuple[x509.Certificate, PrivateKey] | None,
    key_type: str,
    organization: str,
    now: dt.datetime,
) -> tuple[x509.Certificate, PrivateKey, str]:
    """CA ``name``'s certificate and key: loaded if its certificate exists, else made
    (self-signed without ``issuer``); and the line that says which."""
    if cert_path.exists():
        cert = load_pem_certificates(cert_path.read_bytes())[0]
        return cert, keys.load(name, cert), f"{name} CA: exists ({cert_path}), unchanged"
    key, where = keys.new(name, key_type)
    cert = issue_ca(
        subject=_name(_CA_SUBJECTS[name], organization),
        public_key=key.public_key(),
        issuer=None if issuer is None else issuer[0],
        issuer_key=key if issuer is None else issuer[1],
        validity=ROOT_VALIDITY if issuer is None else ISSUING_VALIDITY,
        now=now,
        path_length=1 if issuer is None else 0,
    )
    keys.keep(key)
    write_atomic(cert_path, certs_to_pem([cert]))
    return cert, key, f"{name} CA: created {cert_path} ({where})"


def create_pki(
    *,
    cas: Mapping[str, tuple[Path, CaKeyStore]],
    tls_cert: Path,
    tls_key: Path,
    hostnames: Sequence[str],
    key_type: str,
    organization: str,
    now: dt.datetime,
) -> list[str]:
    """Create whatever of root, devices, bootstrap CA and TLS certificate is missing.

    ``cas``: each CA's certificate file and where its key is kept.
    """
    report: list[str] = []
    root_cert, root_key, line = _ca(
        "root", *cas["root"], issuer=None, key_type=key_type, organization=organization, now=now
    )
    report.append(line)
    for name in ("devices", "bootstrap"):
        *_, line = _ca(
            name,
            *cas[name],
            issuer=(root_cert, root_key),
            key_type=key_type,
            organization=organization,
            now=now,
        )
        report.append(line)
    if tls_cert.exists() or tls_key.exists():
        report.append(f"TLS certificate: exists ({tls_cert}), unchanged")
        return report
    names, sans = _tls_names(hostnames)
    tls_key_obj = generate_key(key_type)
    tls = issue_leaf(
        profile=TLS_PROFILE,
        public_key=tls_key_obj.public_key(),
        subject=_name(names[0], organization),
        sans=sans,
        issuer=root_cert,
        issuer_key=root_key,
        now=now,
    )
    write_atomic(tls_key, key_to_pem(tls_key_obj), mode=0o600)
    write_atomic(tls_cert, certs_to_pem([tls]))
    report.append(f"TLS certificate: created {tls_cert} for {', '.join(names)}")
    return report


TLS_PROFILE = Profile(name="tls-server", kind=Kind.TLS_SERVER, validity=TLS_VALIDITY)


def _tls_names(hostnames: Sequence[str]) -> tuple[list[str], x509.SubjectAlternativeName]:
    """The TLS server's names: ``hostnames`` and the loopback ones, as subjectAltNames."""
    names = list(dict.fromkeys([*hostnames, "localhost", "127.0.0.1", "::1"]))
    general: list[x509.GeneralName] = []
    for host in names:
        try:
            general.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            general.append(x509.DNSName(host))
    return names, x509.SubjectAlternativeName(general)


def request_path(cert: Path) -> Path:
    """Where the certification request of the certificate file ``cert`` is kept."""
    return cert.with_suffix(".csr")


def _request(
    key: PrivateKey, subject: x509.Name, sans: x509.SubjectAlternativeName | None = None
) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    if sans is not None:
        builder = builder.add_extension(sans, critical=False)
    return builder.sign(key, signature_hash(key)).public_bytes(Encoding.PEM)


def _request_matches(path: Path, key: PrivateKey) -> bool:
    try:
        csr = x509.load_pem_x509_csr(path.read_bytes())
        return public_keys_match(csr.public_key(), key.public_key())
    except (OSError, ValueError):
        return False


def prepare_offline_pki(
    *,
    cas: Mapping[str, tuple[Path, CaKeyStore]],
    tls_cert: Path,
    tls_key: Path,
    hostnames: Sequence[str],
    key_type: str,
    organization: str,
) -> list[str]:
    """The issuing CAs' keys and certification requests for an offline root to sign, and
    the TLS server's key and request; whatever of them is missing.

    ``cas``: each issuing CA's certificate file and where its key is kept; its request is
    written beside the certificate (``request_path``). A CA whose certificate is there
    (imported) is left as it is, once its key is found to be the certificate's.
    """
    report: list[str] = []
    for name, (cert_path, keys) in cas.items():
        csr_path = request_path(cert_path)
        if cert_path.exists():
            cert = load_pem_certificates(cert_path.read_bytes())[0]
            keys.load(name, cert)
            report.append(f"{name} CA: exists ({cert_path}), unchanged")
            continue
        key = keys.pending(name)
        if key is None:
            key, where = keys.new(name, key_type)
            keys.keep(key)
            where = f"created {where}"
        else:
            where = "its key is there"
        if _request_matches(csr_path, key):
            report.append(f"{name} CA: {where}, request {csr_path} unchanged, to be signed")
            continue
        subject = _name(_CA_SUBJECTS.get(name, f"estkit {name} CA"), organization)
        write_atomic(csr_path, _request(key, subject))
        report.append(f"{name} CA: {where}, request {csr_path} created, to be signed")
    tls_csr = request_path(tls_cert)
    if tls_cert.exists():
        report.append(f"TLS certificate: exists ({tls_cert}), unchanged")
    elif tls_key.exists() and tls_csr.exists():
        report.append(
            f"TLS certificate: made by `estkit ca import` (key {tls_key}, request {tls_csr})"
        )
    else:
        names, sans = _tls_names(hostnames)
        key = (
            load_private_key_pem(tls_key.read_bytes())
            if tls_key.exists()
            else generate_key(key_type)
        )
        write_atomic(tls_key, key_to_pem(key), mode=0o600)
        write_atomic(tls_csr, _request(key, _name(names[0], organization), sans))
        report.append(
            f"TLS certificate: key {tls_key} and request {tls_csr} for {', '.join(names)}; "
            "the certificate is made by `estkit ca import`"
        )
    return report


def issue_tls(
    *,
    tls_cert: Path,
    tls_key: Path,
    issuer: x509.Certificate,
    issuer_key: PrivateKey,
    issuer_name: str,
    now: dt.datetime,
) -> str:
    """The TLS server's certificate from ``issuer`` (the bootstrap CA, under an offline
    root), for the key and names of the request ``prepare_offline_pki`` made
    (``request_path``); ``tls_cert`` holds it and ``issuer``'s certificate, the chain a
    device checks up to its trust anchor, the root. Returns the line that says so."""
    csr_path = request_path(tls_cert)
    try:
        key = load_private_key_pem(tls_key.read_bytes())
        csr = x509.load_pem_x509_csr(csr_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"TLS certificate: cannot read its key {tls_key} and request {csr_path} ({exc}); "
            "`estkit server init` makes them"
        ) from None
    if not csr.is_signature_valid or not public_keys_match(csr.public_key(), key.public_key()):
        raise ValueError(f"TLS certificate: {csr_path} is not a request of the key {tls_key}")
    try:
        sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        sans = None
    cert = issue_leaf(
        profile=TLS_PROFILE,
        public_key=key.public_key(),
        subject=csr.subject,
        sans=sans,
        issuer=issuer,
        issuer_key=issuer_key,
        now=now,
    )
    write_atomic(tls_cert, certs_to_pem([cert, issuer]))
    names = ", ".join(str(n.value) for n in sans) if sans else csr.subject.rfc4514_string()
    return f"TLS certificate: created {tls_cert} for {names}, issued by the {issuer_name} CA"
