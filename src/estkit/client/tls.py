"""TLS contexts: verify against the trust anchor only, never the system store."""

from __future__ import annotations

import ssl
from collections.abc import Sequence

from cryptography import x509

from estkit.client.auth import ClientCertificate
from estkit.client.errors import CredentialError, TrustAnchorError
from estkit.pki.certs import certs_to_pem


def _base_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def verified_context(
    anchors: Sequence[x509.Certificate],
    client_cert: ClientCertificate | None = None,
    *,
    tls12_only: bool = False,
) -> ssl.SSLContext:
    """Hostname checked, chain verified up to one of ``anchors`` (which may be intermediates).

    ``tls12_only`` caps the version at TLS 1.2: the one a channel binding can be made on
    here (``tls-unique``; Python's ssl cannot export the keying material TLS 1.3's
    ``tls-exporter`` needs)."""
    context = _base_context()
    if tls12_only:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    # The anchor is whatever the operator trusts, root or not: OpenSSL must stop there.
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    try:
        context.load_verify_locations(cadata=certs_to_pem(anchors).decode("ascii"))
    except ssl.SSLError as exc:
        raise TrustAnchorError(f"trust anchor rejected by TLS: {exc}") from exc
    if client_cert is not None:
        load_client_certificate(context, client_cert)
    return context


def bootstrap_context() -> ssl.SSLContext:
    """No verification at all: only for fetching /cacerts to match a fingerprint."""
    context = _base_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class _EncryptedKey(Exception):
    pass


def _no_passphrase() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
    raise _EncryptedKey


def load_client_certificate(context: ssl.SSLContext, client_cert: ClientCertificate) -> None:
    """Load the certificate file (leaf then chain, all sent) and its key into ``context``."""
    try:
        context.load_cert_chain(
            str(client_cert.cert_path), str(client_cert.key_path), password=_no_passphrase
        )
    except _EncryptedKey:
        raise CredentialError(
            f"private key {client_cert.key_path} is encrypted; only unencrypted keys are supported"
        ) from None
    except OSError as exc:  # ssl.SSLError is an OSError too
        detail = exc.strerror or str(exc)
        raise CredentialError(
            f"cannot use client certificate {client_cert.cert_path} "
            f"with key {client_cert.key_path}: {detail}"
        ) from exc
