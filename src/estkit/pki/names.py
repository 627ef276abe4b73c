"""Names and their comparison.

EST re-enrollment compares the CSR's Subject and SubjectAltName with the
certificate being renewed (RFC 7030 4.2.2). Clients differ in how they encode
the same name (UTF8String vs PrintableString), so estkit accepts a CSR whose
name is byte-equal, or equal under RFC 5280 7.1 comparison (attribute types
in the same order, string values compared after case folding and collapsing
insignificant whitespace, RFC 4518).
"""

from __future__ import annotations

from cryptography import x509
from cryptography.x509.oid import NameOID

MAX_DEVICE_ID = 64  # ub-common-name (RFC 5280): device ids become CNs


def check_device_id(device_id: str) -> None:
    """Device ids become certificate CNs, MQTT client ids and topic levels: printable,
    at most 64 characters, no spaces, '/', '\\', '#' or '+'. ``ValueError`` otherwise."""
    if not device_id or len(device_id) > MAX_DEVICE_ID:
        raise ValueError(f"device id must be 1-{MAX_DEVICE_ID} characters")
    if not device_id.isprintable() or any(c in device_id for c in "/#+ \\"):
        raise ValueError("device id may not contain spaces, '/', '\\', '#' or '+'")


def common_name(name: x509.Name) -> str | None:
    """The single CN of a name, or None when it has none or several."""
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(attrs) != 1:
        return None
    value = attrs[0].value
    return value if isinstance(value, str) else None


def _prepared(value: str | bytes) -> str | bytes:
    if isinstance(value, bytes):
        return value
    return " ".join(value.split()).casefold()


def _rdn_key(rdn: x509.RelativeDistinguishedName) -> frozenset[tuple[str, str | bytes]]:
    return frozenset((a.oid.dotted_string, _prepared(a.value)) for a in rdn)


def names_equal(a: x509.Name, b: x509.Name) -> bool:
    """RFC 5280 7.1 name equality (byte-equal names are always equal)."""
    if a.public_bytes() == b.public_bytes():
        return True
    rdns_a, rdns_b = a.rdns, b.rdns
    return len(rdns_a) == len(rdns_b) and all(
        _rdn_key(x) == _rdn_key(y) for x, y in zip(rdns_a, rdns_b, strict=True)
    )


def _general_name_key(gn: x509.GeneralName) -> tuple[str, object]:
    if isinstance(gn, x509.DNSName | x509.RFC822Name):
        return (type(gn).__name__, gn.value.casefold())
    if isinstance(gn, x509.DirectoryName):
        return ("DirectoryName", tuple(_rdn_key(r) for r in gn.value.rdns))
    if isinstance(gn, x509.OtherName):
        return ("OtherName", (gn.type_id.dotted_string, gn.value))
    return (type(gn).__name__, gn.value)


def sans_equal(
    a: x509.SubjectAlternativeName | None, b: x509.SubjectAlternativeName | None
) -> bool:
    """SubjectAltName equality: same names in the same order (absent == absent == empty).

    An empty extension counts as absent: ``profiles.issue_leaf`` drops it, so a
    certificate issued from such a CSR has none and its re-enrollment must match.
    """
    if not a or not b:
        return not a and not b
    return [_general_name_key(g) for g in a] == [_general_name_key(g) for g in b]


def subject_alt_names(
    extensions: x509.Extensions,
) -> x509.SubjectAlternativeName | None:
    """The SubjectAltName extension value of a certificate or CSR, if any."""
    try:
        return extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
