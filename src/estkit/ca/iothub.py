"""Azure IoT Hub's proof of possession of a CA: a certificate whose subject is
CN=<the verification code IoT Hub shows>, signed by that CA.

IoT Hub checks only the CA's signature over the code, so the certificate's key is
made, used for nothing and thrown away. ``estkit ca iothub-verify`` and the portal's
form on a CA's page both call ``issue_verification``, which audits it once.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from estkit.ca.authority import Authority, IssuingCa
from estkit.ca.errors import Code, Refusal
from estkit.ca.ports import translated
from estkit.pki.certs import serial_hex
from estkit.pki.keys import generate_key
from estkit.pki.profiles import Kind, Profile, issue_leaf
from estkit.store import AuditEvent

PROFILE = Profile("iothub-verification", Kind.OPERATIONAL, dt.timedelta(days=30))
MAX_CODE = 64  # the upper bound of a common name (RFC 5280 ub-common-name)


def check_code(code: str) -> str:
    """The verification code, stripped; ``ValueError`` unless it is 1-64 printable
    characters."""
    code = code.strip()
    if not code or len(code) > MAX_CODE or not code.isprintable():
        raise ValueError(f"the verification code IoT Hub shows (1-{MAX_CODE} printable characters)")
    return code


def verification_certificate(ca: IssuingCa, code: str, *, now: dt.datetime) -> x509.Certificate:
    """A certificate for CN=``code`` signed by ``ca`` (its key thrown away)."""
    key = generate_key("ec-p256")
    return issue_leaf(
        profile=PROFILE,
        public_key=key.public_key(),
        subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, check_code(code))]),
        sans=None,
        issuer=ca.cert,
        issuer_key=ca.key,
        now=now,
    )


def issue_verification(
    authority: Authority[Any], ca_name: str, code: str, *, actor: str, now: dt.datetime
) -> x509.Certificate:
    """The verification certificate of CA ``ca_name`` for ``code``, audited
    (``iothub-verify``); a ``bad-request`` or ``not-found`` refusal otherwise."""
    try:
        code = check_code(code)
    except ValueError as exc:
        raise Refusal(Code.BAD_REQUEST, f"code: {exc}") from None
    ca = authority.cas.get(ca_name)
    if ca is None:
        raise Refusal(
            Code.NOT_FOUND,
            f"no CA {ca_name!r} with its key on this server; "
            f"these can sign: {', '.join(authority.cas)}",
        )
    cert = verification_certificate(ca, code, now=now)
    with translated():
        authority.store.audit(
            AuditEvent(
                at=now,
                actor=actor,
                action="iothub-verify",
                outcome="ok",
                detail=(
                    f"verification certificate {serial_hex(cert.serial_number)} "
                    f"for CN={code}, signed by {ca_name}"
                ),
            )
        )
    return cert
