"""Names and their comparison.

EST re-enrollment compares the CSR's Subject and SubjectAltName with the
certificate being renewed (RFC 7030 4.2.2). Clients differ in how they encode
the same name (UTF8String vs PrintableString), so estkit accepts a CSR whose
name is byte-equal, or equal under RFC 5280 7.1 comparison (attribute types
in the same order, string values compared after case folding and collapsing
insignificant whitespace, RFC 4518).
"""

from __future__ import annotations

import re
import unicodedata

from cryptography import x509
from cryptography.x509.oid import NameOID

MAX_DEVICE_ID = 64  # ub-common-name (RFC 5280): device ids become CNs
# Azure IoT Hub's device-id characters (ASCII letters, digits and - . % _ * ? ! ( ) , = @ $ '),
# without ':', which ends the username of HTTP Basic (RFC 7617) and so could never
# use an enrollment secret.
DEVICE_ID_CHARACTERS = "letters, digits and - . % _ * ? ! ( ) , = @ $ '"
_DEVICE_ID = re.compile(rf"[A-Za-z0-9\-.%_*?!(),=@$']{{1,{MAX_DEVICE_ID}}}")


def check_device_id(device_id: str) -> None:
    """The one device-id rule: ASCII, 1-64 characters of Azure IoT Hub's device-id set
    without ':', and not '.' or '..' (ids name directories). ``ValueError`` otherwise.

    Device ids become certificate CNs, Basic usernames, MQTT client ids, topic
    levels and directory names; non-ASCII look-alikes (fullwidth letters, accents) are refused.
    """
    if not 1 <= len(device_id) <= MAX_DEVICE_ID:
        raise ValueError(f"device id must be 1-{MAX_DEVICE_ID} characters, got {len(device_id)}")
    if not _DEVICE_ID.fullmatch(device_id):
        raise ValueError(f"device id {device_id!r} may only hold ASCII {DEVICE_ID_CHARACTERS}")
    if device_id in (".", ".."):
        raise ValueError(f"device id may not be {device_id!r}")


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


_LDH_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
MAX_DNS_NAME = 253


def check_dns_name(name: str, *, wildcard: bool = False) -> None:
    """A host name a certificate may carry as a dNSName (RFC 5280 4.2.1.6, RFC 1123,
    RFC 5890): ASCII LDH labels or IDNA A-labels, at least two labels, no trailing dot,
    not an IP address, at most 253 characters; ``*`` as the whole leftmost label only when
    ``wildcard``, and then with at least two labels after it. ``ValueError`` otherwise.
    """
    shown = ascii(name)
    if not name or len(name) > MAX_DNS_NAME or not name.isascii():
        raise ValueError(f"DNS name {shown}: 1-{MAX_DNS_NAME} ASCII characters")
    labels = name.split(".")
    if labels[0] == "*":
        if not wildcard:
            raise ValueError(f"DNS name {shown}: wildcards are not permitted on this label")
        labels = labels[1:]
        if len(labels) < 2:
            raise ValueError(f"DNS name {shown}: a wildcard needs two labels after it")
    if len(labels) < 2:
        raise ValueError(f"DNS name {shown}: a fully qualified name is needed (one dot at least)")
    for label in labels:
        if not _LDH_LABEL.fullmatch(label):
            raise ValueError(
                f"DNS name {shown}: label {label!a} is not 1-63 letters, digits or inner hyphens"
            )
        if label[2:4] == "--":
            _check_a_label(label, shown)
    if labels[-1].isdigit():
        raise ValueError(f"DNS name {shown}: looks like an IP address (use an IP SAN)")


def _check_a_label(label: str, shown: str) -> None:
    """'??--' labels are reserved (RFC 5890 2.3.1); only IDNA A-labels ('xn--') may use
    them, and only those that decode to a U-label which encodes back to the same A-label
    (Python's IDNA codec, RFC 3490 with Nameprep): that refuses control and zero-width
    characters, label separators such as '。', unassigned code points and labels that
    do not round-trip."""
    if label[:4].lower() != "xn--":
        raise ValueError(f"DNS name {shown}: label {label!r} uses the reserved '--' form")
    try:
        decoded = label[4:].encode("ascii").decode("punycode")
        again = decoded.encode("idna").decode("ascii") if not decoded.isascii() else ""
    except UnicodeError:
        again, decoded = "", ""
    # IDNA2008 (RFC 5892) leaves letters, marks and digits valid; symbols (emoji),
    # punctuation and the rest are disallowed.
    disallowed = any(c != "-" and unicodedata.category(c)[0] not in "LMN" for c in decoded)
    if again.lower() != label.lower() or disallowed:
        raise ValueError(f"DNS name {shown}: label {label!r} is not a valid IDNA A-label")
