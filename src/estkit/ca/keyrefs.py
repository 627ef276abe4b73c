"""Where a CA key in a PKCS#11 token is, and where its PIN is read (never the config).

A leaf of ``ca/`` (``cryptography``-free, no store): the server's signers and the
offline root's commands, which run on a machine with only ``pip install estkit``, share it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from estkit.fileio import read_private

if TYPE_CHECKING:
    from estkit.ca.hsm import TokenKeySpec


@dataclass(frozen=True, slots=True)
class TokenKeyRef:
    """A CA key in a PKCS#11 token, and where its user PIN comes from (never the PIN).

    ``field`` is the config table it came from (``cas.devices``), for error messages.
    """

    module: Path
    token_label: str
    key_label: str | None = None
    key_id: bytes | None = None
    pin_file: Path | None = None
    pin_env: str | None = None
    field: str = "pkcs11"


def read_pin(ref: TokenKeyRef, environ: Mapping[str, str]) -> str:
    """The token's user PIN from ``ref.pin_file`` (refused unless only its owner may read
    it: 0600 or 0400) or the environment variable ``ref.pin_env``."""
    if ref.pin_file is not None:
        where = f"{ref.field}.pin_file"
        content = read_private(ref.pin_file, where=where, what="a PIN file")
        pin = content.decode("utf-8", "replace").rstrip("\r\n")
        if not pin:
            raise ValueError(f"{where}: {ref.pin_file} is empty")
        return pin
    if ref.pin_env is not None:
        pin = environ.get(ref.pin_env, "")
        if not pin:
            raise ValueError(f"{ref.field}.pin_env: environment variable {ref.pin_env} is not set")
        return pin
    raise ValueError(f"{ref.field}: pin_file or pin_env required")


def token_key_spec(name: str, ref: TokenKeyRef, environ: Mapping[str, str]) -> TokenKeySpec:
    """Where CA ``name``'s key is in its token, with the PIN read (``read_pin``);
    ``ValueError`` when the PIN cannot be read or python-pkcs11 is not installed."""
    try:
        from estkit.ca import hsm
    except ImportError:
        raise ValueError(
            f"CA {name!r}: signer 'pkcs11' needs python-pkcs11 (pip install 'estkit[hsm]')"
        ) from None
    return hsm.TokenKeySpec(
        module=ref.module,
        token_label=ref.token_label,
        key_label=ref.key_label,
        key_id=ref.key_id,
        pin=read_pin(ref, environ),
    )
