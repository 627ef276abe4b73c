"""Building the authority from a validated config: loaded once, at start."""

from __future__ import annotations

from collections.abc import Mapping

from cryptography import x509

from estkit.ca.authority import Authority, IssuingCa, Label
from estkit.ca.crl import CrlPublisher
from estkit.ca.signers import load_cas
from estkit.pki.binding import CHALLENGE_PASSWORD
from estkit.server.config import LabelConfig, ServerConfig
from estkit.store import SqlStore


def open_store(config: ServerConfig) -> SqlStore:
    store = SqlStore.open(config.database_url)
    store.check_schema()
    return store


def build_authority(config: ServerConfig, store: SqlStore) -> Authority[SqlStore]:
    """The authority, with CRLs republished after every revocation it makes."""
    cas = load_cas({n: (c.signer, c.cert, c.key) for n, c in config.cas.items()})
    crl = _crl_publisher(config, cas, store)
    labels = {
        name: Label(
            name=name,
            ca=lc.ca,
            profile=config.profiles[lc.profile],
            permitted_san_types=lc.permitted_san_types,
            max_sans=lc.max_sans,
            dns_wildcards=lc.dns_wildcards,
            base64_line_length=lc.base64_line_length,
            csrattrs=_announced(lc),
            approval=lc.approval,
            retry_after=lc.retry_after,
            serverkeygen=lc.serverkeygen,
            serverkeygen_key_type=lc.serverkeygen_key_type,
            require_channel_binding=lc.require_channel_binding,
        )
        for name, lc in config.labels.items()
    }
    return Authority(
        cas=cas,
        labels=labels,
        bootstrap_profile=config.profiles["bootstrap"],
        store=store,
        secret_validity=config.secret_validity,
        crl_urls={n: f"{config.crl.url}/{n}.crl" for n in cas} if config.crl.url else None,
        on_revocation=lambda names, now: crl.publish_all(now=now, names=names),
    )


def _announced(label: LabelConfig) -> tuple[x509.ObjectIdentifier, ...]:
    """csrattrs of a label: its OIDs, and challengePassword where the channel binding
    goes in it (RFC 7030 3.5)."""
    if label.require_channel_binding and CHALLENGE_PASSWORD not in label.csrattrs:
        return (*label.csrattrs, CHALLENGE_PASSWORD)
    return label.csrattrs


def crl_publisher(config: ServerConfig, authority: Authority[SqlStore]) -> CrlPublisher:
    return _crl_publisher(config, authority.cas, authority.store)


def _crl_publisher(
    config: ServerConfig, cas: Mapping[str, IssuingCa], store: SqlStore
) -> CrlPublisher:
    return CrlPublisher(
        cas=cas, store=store, directory=config.crl.directory, validity=config.crl.validity
    )
