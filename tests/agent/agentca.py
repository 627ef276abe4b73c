"""A small CA for the agent's unit tests: root → devices CA, and device versions from it."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509

from estkit.agent.state import StateDirectory, Version
from estkit.pki.keys import PrivateKey, generate_key, key_to_pem
from estkit.pki.profiles import Kind, Profile, issue_leaf
from testpki import cn_name, make_ca_pair


@dataclass(frozen=True)
class DeviceCa:
    root: x509.Certificate
    issuing: x509.Certificate
    issuing_key: PrivateKey

    def issue(
        self,
        device_id: str = "dev-1",
        *,
        validity: dt.timedelta = dt.timedelta(hours=1),
        now: dt.datetime | None = None,
        key: PrivateKey | None = None,
    ) -> tuple[PrivateKey, x509.Certificate]:
        key = key or generate_key("ec-p256")
        cert = issue_leaf(
            profile=Profile("op", Kind.OPERATIONAL, validity),
            public_key=key.public_key(),
            subject=cn_name(device_id),
            sans=None,
            issuer=self.issuing,
            issuer_key=self.issuing_key,
            now=now or dt.datetime.now(dt.UTC),
        )
        return key, cert

    def install(self, state: StateDirectory, **kwargs: object) -> Version:
        """A new version in ``state`` (not made current)."""
        key, cert = self.issue(**kwargs)  # type: ignore[arg-type]
        return state.install(key_pem=key_to_pem(key), certificate=cert, chain=[self.issuing])


def make_device_ca() -> DeviceCa:
    pair = make_ca_pair(
        "test Root CA",
        "test Devices CA",
        now=dt.datetime.now(dt.UTC),
        root_validity=dt.timedelta(days=30),
        issuing_validity=dt.timedelta(days=30),
    )
    return DeviceCa(root=pair.root, issuing=pair.issuing, issuing_key=pair.issuing_key)
