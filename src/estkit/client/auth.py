"""How the client authenticates: a TLS client certificate, or HTTP Basic."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True, slots=True)
class ClientCertificate:
    """mTLS with a certificate (its file may hold the chain after it) and its private key."""

    cert_path: Path
    key_path: Path


@dataclass(frozen=True, slots=True)
class BasicAuth:
    """HTTP Basic, sent with every request (some servers never send a challenge first)."""

    username: str
    password: str = field(repr=False)

    def __post_init__(self) -> None:
        if ":" in self.username:
            raise ValueError("a Basic user name cannot contain ':'")
