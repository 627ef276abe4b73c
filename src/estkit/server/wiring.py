"""Building the authority from a validated config: loaded once, at start."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from cryptography import x509

from estkit.ca.authority import Authority, IssuingCa, Label
from estkit.ca.crl import CrlPublisher, ImportedCrl
from estkit.ca.hubsync import HubSync
from estkit.ca.ocsp import OcspResponder
from estkit.ca.signers import load_cas
from estkit.pki.binding import CHALLENGE_PASSWORD
from estkit.pki.certs import load_pem_certificates
from estkit.server.config import CaConfig, ConfigError, LabelConfig, ServerConfig
from estkit.store import SqlStore


def open_store(config: ServerConfig) -> SqlStore:
    store = SqlStore.open(config.database_url)
    store.check_schema()
    return store


def build_authority(
    config: ServerConfig, store: SqlStore, *, environ: Mapping[str, str] | None = None
) -> Authority[SqlStore]:
    """The authority, with CRLs republished after every revocation it makes.

    ``environ``: where ``pin_env`` token PINs are read (the caller's environment; none
    given, no ``pin_env`` PIN can be read). A CA whose key cannot be used (wrong token,
    key or PIN, a key that is not its certificate's) is a ``ConfigError`` naming the CA;
    so is an offline root whose certificates are not imported yet
    (``offline_root_pending``).
    """
    if (pending := offline_root_pending(config)) is not None:
        raise ConfigError(pending)
    try:
        cas = load_cas(installed_cas(config), environ=environ)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
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
        ocsp_urls={n: config.ocsp.url for n in cas} if config.ocsp.url else None,
        on_revocation=lambda names, now: crl.publish_all(now=now, names=names),
        hub_sync=HubSync(create_identities=config.iothub.create_identities)
        if config.iothub is not None
        else None,
    )


def _announced(label: LabelConfig) -> tuple[x509.ObjectIdentifier, ...]:
    """csrattrs of a label: its OIDs, and challengePassword where the channel binding
    goes in it (RFC 7030 3.5)."""
    if label.require_channel_binding and CHALLENGE_PASSWORD not in label.csrattrs:
        return (*label.csrattrs, CHALLENGE_PASSWORD)
    return label.csrattrs


def crl_publisher(config: ServerConfig, authority: Authority[SqlStore]) -> CrlPublisher:
    return _crl_publisher(config, authority.cas, authority.store)


def ocsp_responder(
    config: ServerConfig, authority: Authority[SqlStore], publisher: CrlPublisher
) -> OcspResponder:
    """The OCSP responder of every CA signing here. A revocation on this node reaches its
    cache at once through ``publisher``'s state files, which ``on_revocation`` rewrites
    before a revocation returns (``ca/ocsp.py``)."""
    return OcspResponder(
        cas=authority.cas,
        store=authority.store,
        validity=config.ocsp.validity,
        local_revision=publisher.published_revision,
    )


def _crl_publisher(
    config: ServerConfig, cas: Mapping[str, IssuingCa], store: SqlStore
) -> CrlPublisher:
    imported = [
        ImportedCrl(name=name, cert=load_pem_certificates(ca.cert.read_bytes())[0], source=ca.crl)
        for name, ca in config.cas.items()
        if ca.offline and ca.crl is not None
    ]
    return CrlPublisher(
        cas=cas,
        store=store,
        directory=config.crl.directory,
        validity=config.crl.validity,
        imported=imported,
    )


def installed_cas(config: ServerConfig) -> dict[str, CaConfig]:
    """The configured CAs, but for a rotation (``estkit ca rotate`` under an offline root)
    whose certificate ``estkit ca import`` has not installed yet: until it has, the CA it
    replaces goes on issuing, whatever its ``issues_from`` says. With a root whose key is
    here, a rotated CA without its certificate is a config error like any other."""
    offline = config.cas["root"].offline if "root" in config.cas else False
    return {
        name: ca
        for name, ca in config.cas.items()
        if not offline or ca.generation.replaces is None or ca.cert.exists()
    }


def awaiting_import(config: ServerConfig) -> list[str]:
    """One line per rotated CA whose certificate is not installed yet (``installed_cas``)."""
    return [
        f"CA {name}: its certificate {shown_path(ca.cert, config.data_dir)} is not imported yet "
        f"(sign {shown_path(ca.cert.with_suffix('.csr'), config.data_dir)} on the root's machine, "
        f"then `estkit ca import --cert {name}=FILE`): {ca.generation.replaces} goes on issuing"
        for name, ca in config.cas.items()
        if name not in installed_cas(config)
    ]


def offline_root_pending(config: ServerConfig) -> str | None:
    """With an offline root, what ``estkit ca import`` has not installed yet and what to
    do, in one line; None when nothing is missing (or the root is not offline)."""
    offline = [ca for ca in config.cas.values() if ca.offline]
    if not offline:
        return None
    wanted = [ca.cert for ca in installed_cas(config).values()]
    wanted += [ca.crl for ca in offline if ca.crl is not None]
    wanted.append(config.tls_cert)
    missing = [path for path in wanted if not path.exists()]
    if not missing:
        return None
    csrs = [
        shown_path(csr, config.data_dir)
        for ca in config.cas.values()
        if not ca.offline and not ca.cert.exists() and (csr := ca.cert.with_suffix(".csr")).exists()
    ]
    sign = (
        f"sign {' and '.join(csrs)} on the root's machine (`estkit root sign-ca`), then "
        if csrs
        else ""
    )
    shown = ", ".join(shown_path(path, config.data_dir) for path in missing)
    return (
        f"offline root: not imported yet: {shown}; "
        f"{sign}install them with `estkit ca import --data-dir {config.data_dir}` "
        f"(`estkit server init --data-dir {config.data_dir}` prints the steps)"
    )


def shown_path(path: Path, data_dir: Path) -> str:
    """``path`` relative to the data directory when it is inside it."""
    try:
        return str(path.relative_to(data_dir))
    except ValueError:
        return str(path)
