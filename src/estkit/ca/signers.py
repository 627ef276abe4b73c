"""Signer backends, chosen by name in config. Only ``file`` exists yet (PKCS#11 will join it)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from cryptography import x509

from estkit.ca.authority import IssuingCa
from estkit.pki.certs import load_pem_certificates
from estkit.pki.keys import PrivateKey, load_private_key_pem, public_keys_match


def load_file_ca(name: str, cert_path: Path, key_path: Path) -> tuple[x509.Certificate, PrivateKey]:
    """A CA certificate and its PEM key file; the key must belong to the certificate."""
    cert = load_pem_certificates(cert_path.read_bytes())[0]
    key = load_private_key_pem(key_path.read_bytes())
    if not public_keys_match(cert.public_key(), key.public_key()):
        raise ValueError(f"CA {name!r}: key {key_path} does not belong to certificate {cert_path}")
    return cert, key


SIGNERS: dict[str, Callable[[str, Path, Path], tuple[x509.Certificate, PrivateKey]]] = {
    "file": load_file_ca,
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
    specs: dict[str, tuple[str, Path, Path]],
) -> dict[str, IssuingCa]:
    """Load each CA ``name -> (signer, cert, key)`` once, with its chain to the root."""
    loaded: dict[str, tuple[x509.Certificate, PrivateKey]] = {}
    for name, (signer, cert_path, key_path) in specs.items():
        try:
            factory = SIGNERS[signer]
        except KeyError:
            raise ValueError(f"CA {name!r}: unknown signer {signer!r}") from None
        loaded[name] = factory(name, cert_path, key_path)
    certs = {name: cert for name, (cert, _) in loaded.items()}
    return {
        name: IssuingCa(name=name, cert=cert, key=key, chain=chain_to_root(cert, certs))
        for name, (cert, key) in loaded.items()
    }
