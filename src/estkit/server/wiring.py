"""Building the authority from a validated config: loaded once, at start."""

from __future__ import annotations

from estkit.ca.authority import Authority, Label
from estkit.ca.signers import load_cas
from estkit.server.config import ServerConfig
from estkit.store import SqlStore


def open_store(config: ServerConfig) -> SqlStore:
    store = SqlStore.open(config.database_url)
    store.check_schema()
    return store


def build_authority(config: ServerConfig, store: SqlStore) -> Authority:
    cas = load_cas({n: (c.signer, c.cert, c.key) for n, c in config.cas.items()})
    labels = {
        name: Label(
            name=name,
            ca=lc.ca,
            profile=config.profiles[lc.profile],
            permitted_san_types=lc.permitted_san_types,
            base64_line_length=lc.base64_line_length,
            csrattrs=lc.csrattrs,
        )
        for name, lc in config.labels.items()
    }
    return Authority(
        cas=cas,
        labels=labels,
        bootstrap_profile=config.profiles["bootstrap"],
        store=store,
        secret_validity=config.secret_validity,
    )
