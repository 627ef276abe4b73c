"""What the tests of ca/ share: in-memory CAs, labels, CSRs."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from estkit.ca.authority import IssuingCa
from estkit.ca.errors import Code, Refusal
from estkit.ca.policy import Label
from estkit.pki.keys import PrivateKey, generate_key
from estkit.pki.profiles import Kind, Profile, issue_ca
from testpki import cn_name

NOW = dt.datetime(2026, 12, 4, 12, 0, tzinfo=dt.UTC)
OPERATIONAL = Profile(name="operational", kind=Kind.OPERATIONAL, validity=dt.timedelta(days=30))
BOOTSTRAP = Profile(name="bootstrap", kind=Kind.BOOTSTRAP, validity=dt.timedelta(days=3650))


def make_csr(
    key: PrivateKey,
    cn: str | None = "dev-1",
    *,
    sans: Sequence[x509.GeneralName] = (),
    extra: Sequence[tuple[x509.ObjectIdentifier, str]] = (),
    ca: bool = False,
) -> bytes:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn is not None else []
    attributes += [x509.NameAttribute(oid, value) for oid, value in extra]
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attributes))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
    return builder.sign(key, hashes.SHA256()).public_bytes(Encoding.DER)


def _ca(name: str, issuer: IssuingCa | None) -> IssuingCa:
    key = generate_key("ec-p256")
    cert = issue_ca(
        subject=cn_name(f"test {name}"),
        public_key=key.public_key(),
        issuer=issuer.cert if issuer else None,
        issuer_key=issuer.key if issuer else key,
        validity=dt.timedelta(days=3650),
        now=NOW - dt.timedelta(days=1),
        path_length=1 if issuer is None else 0,
    )
    chain = (cert, *(issuer.chain if issuer else ()))
    return IssuingCa(name=name, cert=cert, key=key, chain=chain)


@dataclass
class Cas:
    root: IssuingCa
    devices: IssuingCa
    bootstrap: IssuingCa
    other: IssuingCa  # a CA the authority knows but no label issues from


def make_cas() -> Cas:
    root = _ca("root", None)
    return Cas(root, _ca("devices", root), _ca("bootstrap", root), _ca("other", root))


def label(**changes: object) -> Label:
    fields: dict[str, object] = {"name": "devices", "ca": "devices", "profile": OPERATIONAL}
    fields.update(changes)
    return Label(**fields)  # type: ignore[arg-type]


def refused(code: Code, call: Callable[[], object]) -> Refusal:
    """The refusal ``call`` raises, after checking its code and one-line reason."""
    with pytest.raises(Refusal) as caught:
        call()
    assert caught.value.code is code, caught.value
    assert caught.value.reason and "\n" not in caught.value.reason
    return caught.value
