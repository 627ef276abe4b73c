"""IoT Hub's proof of possession: CN=<code>, signed by the CA named, audited once; a bad
code or a CA whose key is not here is refused and writes nothing."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography.x509.oid import NameOID

from estkit.ca import iothub
from estkit.ca.authority import Authority
from estkit.ca.errors import Code, Refusal
from estkit.pki.certs import serial_hex
from estkit.store import SqlStore

NOW = dt.datetime(2026, 12, 10, 12, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("given", "kept"),
    [("ABC123", "ABC123"), ("  0F1E2D\n", "0F1E2D"), ("x" * 64, "x" * 64)],
    ids=["ok/plain", "ok/stripped", "ok/64-characters"],
)
def test_a_code_is_kept_stripped(given: str, kept: str) -> None:
    assert iothub.check_code(given) == kept


@pytest.mark.parametrize(
    "given",
    ["", "   ", "x" * 65, "AB\x00CD", "AB\nCD"],
    ids=["empty", "blank", "long", "nul", "nl"],
)
def test_a_code_that_cannot_be_a_common_name_is_refused(given: str) -> None:
    with pytest.raises(ValueError, match="1-64 printable characters"):
        iothub.check_code(given)


def test_the_certificate_names_the_code_and_is_signed_by_the_ca(
    authority: Authority[SqlStore],
) -> None:
    cert = iothub.issue_verification(authority, "devices", " 4F3E2D ", actor="ui:ops", now=NOW)
    ca = authority.cas["devices"]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "4F3E2D"
    assert cert.issuer == ca.cert.subject
    cert.verify_directly_issued_by(ca.cert)
    assert cert.not_valid_after_utc - NOW <= iothub.PROFILE.validity
    (entry,) = authority.store.list_audit(action="iothub-verify").items
    assert (entry.actor, entry.outcome) == ("ui:ops", "ok")
    assert entry.detail == (
        f"verification certificate {serial_hex(cert.serial_number)} for CN=4F3E2D, "
        "signed by devices"
    )
    # Its key is thrown away: nothing about it is kept as an issued certificate.
    assert authority.store.get_certificate(serial_hex(cert.serial_number)) is None


@pytest.mark.parametrize(
    ("ca", "code", "refused"),
    [("devices", "", Code.BAD_REQUEST), ("nosuch", "ABC", Code.NOT_FOUND)],
    ids=["fail/empty-code", "fail/unknown-ca"],
)
def test_a_refused_verification_is_not_audited(
    authority: Authority[SqlStore], ca: str, code: str, refused: Code
) -> None:
    with pytest.raises(Refusal) as info:
        iothub.issue_verification(authority, ca, code, actor="ui:ops", now=NOW)
    assert info.value.code is refused
    assert authority.store.list_audit(action="iothub-verify").items == ()
