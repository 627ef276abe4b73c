"""SoftHSM2 for the benchmark: a throwaway token, and an estkit server whose CA keys are in it.

The token is the tests' (``tests/softhsm.py``: a token directory of its own with its
own ``softhsm2.conf``, a user PIN in a 0600 file). SoftHSM reads ``SOFTHSM2_CONF``
when the library is initialised, so it is set in this process's environment while
the token is in use: ``estkit server init`` and ``estkit server run`` inherit it,
and ``fleet.make_pool`` signs the pool's certificates in the token from this process.

The server is made as an operator makes one (``server init --signer pkcs11``): the
root, devices and bootstrap CA keys are made inside the token with the same key type
as the file-key server's (P-256, the default), no CA key file is written, and
every certificate it issues is signed inside the token, in the server's process,
so its CPU counts in the server's.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, cast

from bench import fleet

if TYPE_CHECKING:
    import pytest

INSTALL_HINT = "scripts/install-test-debs.sh softhsm2"
PKCS11_HINT = "python-pkcs11: pip install 'estkit[hsm]'"
CA_NAMES = ("root", "devices", "bootstrap")


class Token(Protocol):
    """What the benchmark needs of ``tests/softhsm.SoftHsm``."""

    module: Path  # the PKCS#11 library
    label: str

    @property
    def pin_file(self) -> Path: ...


class _SoftHsmModule(Protocol):
    MODULE_CANDIDATES: tuple[str, ...]

    def make_softhsm(
        self, directory: Path, monkeypatch: pytest.MonkeyPatch, *, label: str | None = None
    ) -> Token: ...


def _softhsm() -> _SoftHsmModule:
    return cast(_SoftHsmModule, fleet.tests_module("softhsm"))


def missing() -> str | None:
    """What the SoftHSM2 step lacks here (Debian's ``softhsm2``, python-pkcs11), or None."""
    module = any(Path(c).exists() for c in _softhsm().MODULE_CANDIDATES)
    if not module or shutil.which("softhsm2-util") is None:
        return f"softhsm2: {INSTALL_HINT}"
    if importlib.util.find_spec("pkcs11") is None:
        return PKCS11_HINT
    return None


def versions() -> dict[str, str]:
    """SoftHSM2's and python-pkcs11's versions."""
    util = subprocess.run(
        ["softhsm2-util", "--version"], capture_output=True, text=True, check=False
    )
    return {
        "softhsm2": util.stdout.strip() or "?",
        "python_pkcs11": metadata.version("python-pkcs11"),
    }


@contextmanager
def token(directory: Path) -> Iterator[Token]:
    """A fresh SoftHSM2 token in ``directory``, ``SOFTHSM2_CONF`` pointing at it in this
    process's environment (and the processes it starts) until exit."""
    import pytest

    with pytest.MonkeyPatch.context() as env:
        yield _softhsm().make_softhsm(directory, env)


def init_server(data_dir: Path, *, token: Token, port: int, crl_port: int) -> None:
    """A server whose CA keys are made inside ``token``; no CA key file may be left."""
    fleet.init_server(
        data_dir,
        port=port,
        crl_port=crl_port,
        options=(
            "--signer", "pkcs11", "--pkcs11-module", token.module,
            "--token-label", token.label, "--pin-file", token.pin_file,
        ),
    )  # fmt: skip
    key_files = sorted(str(p) for p in (data_dir / "ca").glob("*.key"))
    if key_files:
        raise RuntimeError(f"server init --signer pkcs11 left CA key files: {key_files}")
    cas = tomllib.loads((data_dir / "estkit.toml").read_text())["cas"]
    others = [name for name in CA_NAMES if cas[name].get("signer") != "pkcs11"]
    if others:
        raise RuntimeError(f"{data_dir}: CAs {others} are not signer = pkcs11")


def ca_key_type(data_dir: Path, ca: str = "devices") -> str:
    """The key type of a server's CA certificate: ``ec-secp256r1``, ``rsa-2048``, ..."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    key = x509.load_pem_x509_certificate((data_dir / "ca" / f"{ca}.pem").read_bytes()).public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"ec-{key.curve.name}"
    if isinstance(key, rsa.RSAPublicKey):
        return f"rsa-{key.key_size}"
    return type(key).__name__
