"""Signer backends, chosen by name in config: where a CA's private key lives.

``file``: a PEM key file (0600) beside the certificate. ``pkcs11``: a key inside a
PKCS#11 token (``ca/hsm.py``, the ``estkit[hsm]`` extra), found by token and key label
or id, logged in with a PIN read from a file (0600 or 0400) or an environment variable,
never from the config (``ca/keyrefs.py``). Either way the rest of estkit sees a
``cryptography`` private key. ``offline``: no key on this server at all (an offline
root): the CA is only a certificate, the end of its issuing CAs' chains.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

from cryptography import x509

from estkit.ca.authority import IssuingCa
from estkit.ca.constraints import check_chain
from estkit.ca.generations import Generation
from estkit.ca.keyrefs import TokenKeyRef, read_pin, token_key_spec
from estkit.pki.certs import load_pem_certificates
from estkit.pki.keys import PrivateKey, load_private_key_pem, public_keys_match

__all__ = [
    "OFFLINE",
    "SIGNERS",
    "CaSpec",
    "TokenKeyRef",
    "chain_to_root",
    "load_cas",
    "load_file_ca",
    "read_pin",
    "token_key_spec",
]

log = logging.getLogger("estkit.ca")

# The signer of a CA whose key is not on this server (an offline root): its certificate
# is a trust anchor and a chain's end here, and its CRL is imported, never signed.
OFFLINE = "offline"


class CaSpec(Protocol):
    """What ``load_cas`` reads of a CA's settings (``server.config.CaConfig`` has it)."""

    @property
    def signer(self) -> str: ...
    @property
    def cert(self) -> Path: ...
    @property
    def key_file(self) -> Path | None: ...
    @property
    def token(self) -> TokenKeyRef | None: ...
    @property
    def generation(self) -> Generation: ...


def load_file_ca(name: str, cert_path: Path, key_path: Path) -> tuple[x509.Certificate, PrivateKey]:
    """A CA certificate and its PEM key file; the key must belong to the certificate."""
    cert = load_pem_certificates(cert_path.read_bytes())[0]
    return cert, _file_key(name, cert_path, cert, key_path)


def _file_key(name: str, cert_path: Path, cert: x509.Certificate, key_path: Path) -> PrivateKey:
    key = load_private_key_pem(key_path.read_bytes())
    if not public_keys_match(cert.public_key(), key.public_key()):
        raise ValueError(f"CA {name!r}: key {key_path} does not belong to certificate {cert_path}")
    return key


def _load_file(
    name: str, spec: CaSpec, cert: x509.Certificate, environ: Mapping[str, str]
) -> PrivateKey:
    if spec.key_file is None:
        raise ValueError(f"CA {name!r}: signer 'file' needs a key file")
    return _file_key(name, spec.cert, cert, spec.key_file)


def _load_pkcs11(
    name: str, spec: CaSpec, cert: x509.Certificate, environ: Mapping[str, str]
) -> PrivateKey:
    ref = spec.token
    if ref is None:
        raise ValueError(f"CA {name!r}: signer 'pkcs11' needs the token's settings")
    # token_key_spec first: it says in one line that python-pkcs11 is missing.
    key_spec = token_key_spec(name, ref, environ)
    from estkit.ca import hsm

    return hsm.open_token_key(name, key_spec, cert.public_key())


SIGNERS: Mapping[str, Callable[[str, CaSpec, x509.Certificate, Mapping[str, str]], PrivateKey]] = {
    "file": _load_file,
    "pkcs11": _load_pkcs11,
}


def chain_to_root(
    cert: x509.Certificate, cas: dict[str, x509.Certificate]
) -> tuple[x509.Certificate, ...]:
    """The chain from ``cert`` up to its self-signed root among ``cas``."""
    chain = [cert]
    current = cert
    for _ in range(len(cas) + 1):
        if current.issuer == current.subject:
            return tuple(chain)
        parent = next(
            (c for c in cas.values() if c.subject == current.issuer and c != current), None
        )
        if parent is None:
            raise ValueError(f"no issuer for {current.subject.rfc4514_string()} among the CAs")
        chain.append(parent)
        current = parent
    raise ValueError("CA chain loops")


def load_cas(
    specs: Mapping[str, CaSpec],
    *,
    environ: Mapping[str, str] | None = None,
    now: dt.datetime | None = None,
) -> dict[str, IssuingCa]:
    """Load each CA that signs here once, with its key (``SIGNERS[spec.signer]``) and its
    chain to the root. An ``offline`` CA's certificate ends the chains of the CAs below
    it, and it is not among the CAs returned: nothing here can sign with it.

    Each chain must be able to issue at ``now`` (default: the current time): every CA in
    it a CA, allowed to sign certificates (and CRLs), valid, within its path length and
    name constraints (``constraints.check_chain``); ``ValueError`` naming the CA if not.
    A CA that has expired and whose successor issues already (``ca/generations.py``) is
    left out, with a warning: every certificate it issued has expired with it.

    ``environ``: where ``pin_env`` PINs are read, given by the caller (cli/, server/app:
    the only parts that read the process environment); none given, none can be read.
    """
    env = {} if environ is None else environ
    at = dt.datetime.now(dt.UTC) if now is None else now
    certs = {name: load_pem_certificates(spec.cert.read_bytes())[0] for name, spec in specs.items()}
    keys: dict[str, PrivateKey] = {}
    for name, spec in specs.items():
        factory = SIGNERS.get(spec.signer)
        if factory is None and spec.signer != OFFLINE:
            raise ValueError(f"CA {name!r}: unknown signer {spec.signer!r}")
        if _retired(name, certs[name], specs, at):
            log.warning(
                "CA %s expired on %s and is replaced: not loaded, its CRL no longer "
                "published (keep its [cas.%s] table: its successors name their family by it)",
                name,
                certs[name].not_valid_after_utc.isoformat(),
                name,
            )
            continue
        if factory is not None:
            keys[name] = factory(name, spec, certs[name], env)
    cas = {
        name: IssuingCa(
            name=name,
            cert=certs[name],
            key=key,
            chain=chain_to_root(certs[name], certs),
            generation=specs[name].generation,
        )
        for name, key in keys.items()
    }
    for ca in cas.values():
        check_chain(ca.name, ca.chain, now=at)
    return cas


def _retired(
    name: str, cert: x509.Certificate, specs: Mapping[str, CaSpec], now: dt.datetime
) -> bool:
    """Whether CA ``name`` has expired and a successor issues in its place at ``now``."""
    if cert.not_valid_after_utc > now:
        return False
    return any(
        spec.generation.replaces == name
        and (spec.generation.issues_from is None or spec.generation.issues_from <= now)
        for spec in specs.values()
    )
