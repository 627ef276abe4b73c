"""Creating the PKI once: root, the issuing CAs, and the EST server's TLS certificate.

Existing files are never touched; each step says what it did or found.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from estkit.ca.files import write_atomic
from estkit.ca.signers import load_file_ca
from estkit.pki.certs import certs_to_pem
from estkit.pki.keys import PrivateKey, generate_key, key_to_pem
from estkit.pki.profiles import Kind, Profile, issue_ca, issue_leaf

ROOT_VALIDITY = dt.timedelta(days=20 * 365)
ISSUING_VALIDITY = dt.timedelta(days=15 * 365)
TLS_VALIDITY = dt.timedelta(days=825)

_CA_SUBJECTS = {
    "root": "estkit Root CA",
    "devices": "estkit Device Issuing CA",
    "bootstrap": "estkit Bootstrap CA",
}


def _name(cn: str, organization: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _write_pair(cert: x509.Certificate, key: PrivateKey, cert_path: Path, key_path: Path) -> None:
    write_atomic(key_path, key_to_pem(key), mode=0o600)
    write_atomic(cert_path, certs_to_pem([cert]))


def create_pki(
    *,
    ca_paths: dict[str, tuple[Path, Path]],
    tls_cert: Path,
    tls_key: Path,
    hostnames: Sequence[str],
    key_type: str,
    organization: str,
    now: dt.datetime,
) -> list[str]:
    """Create whatever of root, devices, bootstrap CA and TLS certificate is missing."""
    report: list[str] = []
    root_cert_path, root_key_path = ca_paths["root"]
    if root_cert_path.exists() or root_key_path.exists():
        root_cert, root_key = load_file_ca("root", root_cert_path, root_key_path)
        report.append(f"root CA: exists ({root_cert_path}), unchanged")
    else:
        root_key = generate_key(key_type)
        root_cert = issue_ca(
            subject=_name(_CA_SUBJECTS["root"], organization),
            public_key=root_key.public_key(),
            issuer=None,
            issuer_key=root_key,
            validity=ROOT_VALIDITY,
            now=now,
            path_length=1,
        )
        _write_pair(root_cert, root_key, root_cert_path, root_key_path)
        report.append(f"root CA: created {root_cert_path}")
    for name in ("devices", "bootstrap"):
        cert_path, key_path = ca_paths[name]
        if cert_path.exists() or key_path.exists():
            load_file_ca(name, cert_path, key_path)
            report.append(f"{name} CA: exists ({cert_path}), unchanged")
            continue
        key = generate_key(key_type)
        cert = issue_ca(
            subject=_name(_CA_SUBJECTS[name], organization),
            public_key=key.public_key(),
            issuer=root_cert,
            issuer_key=root_key,
            validity=ISSUING_VALIDITY,
            now=now,
            path_length=0,
        )
        _write_pair(cert, key, cert_path, key_path)
        report.append(f"{name} CA: created {cert_path}")
    if tls_cert.exists() or tls_key.exists():
        report.append(f"TLS certificate: exists ({tls_cert}), unchanged")
        return report
    names = list(dict.fromkeys([*hostnames, "localhost", "127.0.0.1", "::1"]))
    general: list[x509.GeneralName] = []
    for host in names:
        try:
            general.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            general.append(x509.DNSName(host))
    tls_key_obj = generate_key(key_type)
    tls = issue_leaf(
        profile=Profile(name="tls-server", kind=Kind.TLS_SERVER, validity=TLS_VALIDITY),
        public_key=tls_key_obj.public_key(),
        subject=_name(names[0], organization),
        sans=x509.SubjectAlternativeName(general),
        issuer=root_cert,
        issuer_key=root_key,
        now=now,
    )
    _write_pair(tls, tls_key_obj, tls_cert, tls_key)
    report.append(f"TLS certificate: created {tls_cert} for {', '.join(names)}")
    return report
