"""SoftHSM2 tokens for tests: each in its own directory, with its own softhsm2.conf.

SoftHSM reads ``SOFTHSM2_CONF`` when the library is initialised, and lists its
tokens only then; estkit re-initialises the library when a token it is asked for
is not there, so each test's token is found although one process runs many tests.
Debian's ``softhsm2`` package (``make test`` installs it) brings the module and
``softhsm2-util``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
)
CONF_ENV = "SOFTHSM2_CONF"


def softhsm_module() -> Path:
    """The SoftHSM2 PKCS#11 module; a test that needs it fails without ``softhsm2``
    (never skipped: ``make test`` installs it)."""
    for candidate in MODULE_CANDIDATES:
        if Path(candidate).exists() and shutil.which("softhsm2-util"):
            return Path(candidate)
    pytest.fail("SoftHSM2 is not installed: scripts/install-test-debs.sh softhsm2 opensc")


@dataclass
class SoftHsm:
    """One initialised token in ``directory``: its label, user PIN and a PIN file (0600)."""

    module: Path
    directory: Path
    label: str
    pin: str
    so_pin: str

    @property
    def conf(self) -> Path:
        return self.directory / "softhsm2.conf"

    @property
    def tokens(self) -> Path:
        return self.directory / "tokens"

    @property
    def pin_file(self) -> Path:
        return self.directory / "token.pin"

    @property
    def signer_args(self) -> list[str]:
        """The ``estkit server init`` options that make the CA keys in this token."""
        return [
            "--signer", "pkcs11", "--pkcs11-module", str(self.module),
            "--token-label", self.label, "--pin-file", str(self.pin_file),
        ]  # fmt: skip

    def remove(self) -> Path:
        """Take the token away (its files move out of SoftHSM's sight), as an unplugged
        HSM; returns where they went."""
        away = self.directory / "tokens.away"
        self.tokens.rename(away)
        self.tokens.mkdir()
        return away

    def put_back(self, away: Path) -> None:
        self.tokens.rmdir()
        away.rename(self.tokens)


def make_softhsm(
    directory: Path, monkeypatch: pytest.MonkeyPatch, *, label: str | None = None
) -> SoftHsm:
    """A fresh SoftHSM2 token in ``directory``, with ``SOFTHSM2_CONF`` pointing at it.

    Its label is new too (unless given): the library stays loaded for the whole test
    process, with a session on every token it was asked for.
    """
    module = softhsm_module()
    label = label or f"estkit-{secrets.token_hex(4)}"
    directory.mkdir(parents=True, exist_ok=True)
    hsm = SoftHsm(
        module=module, directory=directory, label=label, pin="4711-user", so_pin="so-0815"
    )
    hsm.tokens.mkdir()
    hsm.conf.write_text(
        f"directories.tokendir = {hsm.tokens}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n"
    )
    monkeypatch.setenv(CONF_ENV, str(hsm.conf))
    subprocess.run(
        [
            "softhsm2-util",
            "--init-token",
            "--free",
            "--label",
            label,
            "--pin",
            hsm.pin,
            "--so-pin",
            hsm.so_pin,
        ],
        check=True,
        capture_output=True,
        env={**os.environ, CONF_ENV: str(hsm.conf)},
    )
    fd = os.open(hsm.pin_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(hsm.pin + "\n")
    return hsm
