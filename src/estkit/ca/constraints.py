"""What a chain of CAs allows, pure: checked once for the CAs at load, and for the names
of every certificate before it is signed.

At load (``check_chain``), for every certificate of a CA's chain (the CA first, its
root last): basicConstraints cA is TRUE; keyUsage, when present, has keyCertSign (and
cRLSign for the CA itself, whose CRLs estkit signs); the time is within its validity;
its pathLenConstraint allows the CAs below it (RFC 5280 4.2.1.9: with 0, none); its
extensions can be read, and its name constraints use no minimum or maximum (RFC 5280:
they MUST NOT); each CA's own names are within the name constraints of the CAs above
it. ``ValueError`` with one line naming the CA otherwise: a server with such a CA
would issue certificates that no verifier accepts.

Before signing (``leaf_violation``): the leaf's subject and subjectAltNames are within
the nameConstraints of every CA of the chain, root included (RFC 5280 4.2.1.10), as
OpenSSL reads them (crypto/x509/v3_ncons.c, ``check_name_constraints`` in x509_vfy.c),
so that what estkit issues ``openssl verify`` accepts:

- A constraint binds only names of its own form: where a CA has permitted subtrees of
  a form, each name of that form must be within one of them; no name may be within an
  excluded subtree. Constraints on forms estkit never issues (otherName,
  registeredID) bind nothing it signs.
- The subject is a directoryName (when not empty), and each emailAddress attribute in
  it an rfc822Name. When the leaf has no dNSName, each subject CN that looks like a
  host name (letters, digits, ``_``, inner ``-`` and ``.``, two labels at least) is a
  dNSName too: a device id such as ``sensor.plant-7`` is checked as one.
- dNSName: ``devices.example`` permits itself and any name below it
  (``a.devices.example``, not ``otherdevices.example``); ``.devices.example`` only the
  names below it. Case-insensitive (ASCII); the empty constraint matches every name.
  Stricter than OpenSSL in one way: a wildcard (``*.devices.example``) is refused when
  a host it stands for is excluded (``lab.devices.example``).
- rfc822Name: ``user@host`` that address (local part case-sensitive), ``host`` any
  address at exactly that host, ``.host`` any address at a host below it.
- uniformResourceIdentifier: the URI's host against ``host`` (exactly) or ``.host``
  (below it). A URI whose host OpenSSL would read differently from a plain
  ``scheme://host[:port][/path]`` (no ``//``, user info, brackets) is refused.
- iPAddress: the address within the constraint's network; IPv4 never matches IPv6.
- directoryName: the constraint's RDNs are the first RDNs of the name, compared as
  OpenSSL canonicalises them (case-folded ASCII, whitespace collapsed).

A name of a form the chain constrains but estkit cannot check (an otherName against
otherName subtrees) is refused, never guessed.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

from estkit.pki.der import iter_elements, read_tlv
from estkit.pki.errors import DecodeError

__all__ = [
    "CaNameConstraints",
    "chain_name_constraints",
    "check_chain",
    "leaf_violation",
]

# id-on-SmtpUTF8Mailbox (RFC 8398): OpenSSL checks it against rfc822Name constraints.
_SMTP_UTF8_MAILBOX = x509.ObjectIdentifier("1.3.6.1.5.5.7.8.9")
# The ASN.1 string types OpenSSL canonicalises in names (ASN1_MASK_CANON in x_name.c):
# UTF8String, PrintableString, T61String, IA5String, VisibleString, UniversalString,
# BMPString. Others are compared as they are encoded.
_CANONICAL_STRING_TYPES = frozenset({12, 19, 20, 22, 26, 28, 30})
_IA5_STRING = 22
_SPACE = " \t\n\v\f\r"
_SPACES = re.compile(f"[{_SPACE}]+")
_URI_SCHEME = re.compile(rb"[A-Za-z][A-Za-z0-9+.\-]*")
_URI_HOST = re.compile(rb"[A-Za-z0-9._\-]+")
_URI_AFTER_HOST = re.compile(rb"(:[0-9]{1,5})?(/.*)?", re.S)
_NAME_CONSTRAINTS_OID = bytes.fromhex("551d1e")  # 2.5.29.30, as encoded
_SHOWN_BASES = 3


@dataclass(frozen=True, slots=True)
class CaNameConstraints:
    """The nameConstraints of one CA of a chain: ``ca`` is its subject, for reasons."""

    ca: str
    permitted: tuple[x509.GeneralName, ...]
    excluded: tuple[x509.GeneralName, ...]


class _Unchecked(Exception):
    """A name, or a constraint, that estkit cannot compare as OpenSSL would."""


# -- at load ---------------------------------------------------------------------------


def chain_name_constraints(chain: Sequence[x509.Certificate]) -> tuple[CaNameConstraints, ...]:
    """The name constraints of each CA of ``chain`` that has some (the issuing CA first).

    ``ValueError`` when a certificate's extensions cannot be read (``check_chain``
    refuses such a CA at load)."""
    found = []
    for cert in chain:
        constraints = _name_constraints(cert)
        if constraints is not None:
            found.append(constraints)
    return tuple(found)


def check_chain(
    name: str, chain: Sequence[x509.Certificate], *, now: dt.datetime, signs_crls: bool = True
) -> None:
    """CA ``name`` and every CA above it (``chain``: the CA first, its root last) can sign
    what estkit asks of them at ``now`` (module docstring); ``signs_crls``: estkit signs
    this CA's CRLs. ``ValueError`` with one line naming the CA and what is wrong."""
    for depth, cert in enumerate(chain):
        _check_ca_certificate(name, cert, depth=depth, now=now, signs_crls=signs_crls)
    for depth, cert in enumerate(chain):
        pathlen = _basic_constraints(cert).path_length
        below = [c for c in chain[:depth] if not _self_issued(c)]
        if pathlen is not None and len(below) > pathlen:
            allowed = "no CA" if pathlen == 0 else "1 CA" if pathlen == 1 else f"{pathlen} CAs"
            under = ", ".join(repr(c.subject.rfc4514_string()) for c in reversed(below))
            raise ValueError(
                f"CA {name!r}: {_shown(cert)} allows {allowed} below it (pathLenConstraint "
                f"{pathlen}) but has {len(below)} ({under}): what it issues would not verify"
            )
    for depth, cert in enumerate(chain[:-1]):
        if _self_issued(cert):
            continue  # RFC 5280 6.1.4: self-issued CA certificates are not constrained
        problem = _names_violation(
            cert.subject, _sans(cert), chain_name_constraints(chain[depth + 1 :]), host_cn=False
        )
        if problem is not None:
            raise ValueError(f"CA {name!r}: in its chain, {problem}")


def _check_ca_certificate(
    name: str, cert: x509.Certificate, *, depth: int, now: dt.datetime, signs_crls: bool
) -> None:
    who = f"CA {name!r}: " + (_shown(cert) if depth == 0 else f"{_shown(cert)} above it")
    try:
        extensions = cert.extensions
        _name_constraints(cert)
        bounded = _has_subtree_bounds(cert)
    except (
        ValueError,
        TypeError,
        x509.DuplicateExtension,
        x509.UnsupportedGeneralNameType,
        DecodeError,
    ) as exc:
        raise ValueError(f"{who}: its extensions cannot be read ({exc})") from None
    if bounded:
        raise ValueError(
            f"{who}: its name constraints have a minimum or maximum, which RFC 5280 forbids "
            "and estkit cannot check"
        )
    try:
        basic = extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        basic = None
    if basic is None or not basic.ca:
        raise ValueError(f"{who} is not a CA certificate (basicConstraints cA is not TRUE)")
    try:
        usage: x509.KeyUsage | None = extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and not usage.key_cert_sign:
        raise ValueError(f"{who} may not sign certificates (its keyUsage lacks keyCertSign)")
    if usage is not None and depth == 0 and signs_crls and not usage.crl_sign:
        raise ValueError(f"{who} may not sign CRLs (its keyUsage lacks cRLSign)")
    if now < cert.not_valid_before_utc:
        raise ValueError(f"{who} is not valid before {cert.not_valid_before_utc.isoformat()}")
    if now > cert.not_valid_after_utc:
        raise ValueError(f"{who} expired at {cert.not_valid_after_utc.isoformat()}")


def _basic_constraints(cert: x509.Certificate) -> x509.BasicConstraints:
    return cert.extensions.get_extension_for_class(x509.BasicConstraints).value


def _self_issued(cert: x509.Certificate) -> bool:
    return _canonical_name(cert.subject) == _canonical_name(cert.issuer)


def _shown(cert: x509.Certificate) -> str:
    return f"certificate {cert.subject.rfc4514_string()!r}"


def _name_constraints(cert: x509.Certificate) -> CaNameConstraints | None:
    try:
        value = cert.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return None
    return CaNameConstraints(
        ca=cert.subject.rfc4514_string(),
        permitted=tuple(value.permitted_subtrees or ()),
        excluded=tuple(value.excluded_subtrees or ()),
    )


def _has_subtree_bounds(cert: x509.Certificate) -> bool:
    """Whether a GeneralSubtree of the certificate's nameConstraints has a maximum or a
    minimum other than 0 (``cryptography`` drops both when it parses the extension)."""
    _, tbs, _ = read_tlv(cert.tbs_certificate_bytes)
    for tag, content in iter_elements(tbs):
        if tag != 0xA3:  # [3] extensions
            continue
        _, extensions, _ = read_tlv(content)
        for _, extension in iter_elements(extensions):
            parts = list(iter_elements(extension))
            if parts[0][1] != _NAME_CONSTRAINTS_OID:
                continue
            _, value, _ = read_tlv(parts[-1][1])
            for _, subtrees in iter_elements(value):
                for _, subtree in iter_elements(subtrees):
                    for bound_tag, bound in list(iter_elements(subtree))[1:]:
                        if bound_tag != 0x80 or any(bound):  # [1] maximum, or minimum != 0
                            return True
    return False


# -- before signing --------------------------------------------------------------------


def leaf_violation(
    subject: x509.Name,
    sans: x509.SubjectAlternativeName | None,
    chain: Sequence[CaNameConstraints],
) -> str | None:
    """Why a leaf with ``subject`` and ``sans`` would break the name constraints of
    ``chain`` (``chain_name_constraints``), in one line naming the name and the
    constraint; None when it would not."""
    return _names_violation(subject, list(sans or ()), chain, host_cn=True)


def _sans(cert: x509.Certificate) -> list[x509.GeneralName]:
    try:
        return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return []


_Named = tuple[str, x509.GeneralName]  # (how a reason shows the name, the name)


def _names(
    subject: x509.Name, sans: Sequence[x509.GeneralName], *, host_cn: bool
) -> Iterator[_Named]:
    """The names a verifier constrains, as OpenSSL's NAME_CONSTRAINTS_check(_CN) finds
    them; ``host_cn``: the certificate is the leaf (its CN may be a host name)."""
    if len(subject):
        yield f"subject {subject.rfc4514_string()!r}", x509.DirectoryName(subject)
        for attribute in subject.get_attributes_for_oid(NameOID.EMAIL_ADDRESS):
            value = attribute.value
            if attribute._type.value != _IA5_STRING or not isinstance(value, str):
                raise _Unchecked(f"subject emailAddress {value!r} is not an IA5String")
            yield f"subject emailAddress {value!r}", x509.RFC822Name(value)
    for san in sans:
        yield f"subjectAltName {_form(san)} {_value_shown(san)!r}", san
    if host_cn and not any(isinstance(san, x509.DNSName) for san in sans):
        for attribute in subject.get_attributes_for_oid(NameOID.COMMON_NAME):
            value = attribute.value
            if isinstance(value, str) and _looks_like_host(value):
                yield f"CN {value!r} (a host name to verifiers: no dNSName)", x509.DNSName(value)


def _looks_like_host(cn: str) -> bool:
    """OpenSSL's ``cn2dnsid``: letters, digits and ``_``; ``-`` and ``.`` inside only,
    no ``.`` beside another ``.`` or a ``-``; at least one ``.``."""
    data = cn.encode("utf-8").rstrip(b"\0")
    host = False
    for i, c in enumerate(data):
        if chr(c).isascii() and (chr(c).isalnum() or c == ord("_")):
            continue
        if 0 < i < len(data) - 1:
            if c == ord("-"):
                continue
            if c == ord(".") and data[i + 1] not in b".-" and data[i - 1] != ord("-"):
                host = True
                continue
        return False
    return host


def _names_violation(
    subject: x509.Name,
    sans: Sequence[x509.GeneralName],
    chain: Sequence[CaNameConstraints],
    *,
    host_cn: bool,
) -> str | None:
    if not chain:
        return None
    try:
        names = list(_names(subject, sans, host_cn=host_cn))
    except _Unchecked as exc:
        return f"{exc}, so the name constraints of CA {chain[0].ca!r} cannot be checked"
    for constraints in chain:
        for shown, name in names:
            problem = _violation(shown, name, constraints)
            if problem is not None:
                return problem
    return None


def _violation(shown: str, name: x509.GeneralName, constraints: CaNameConstraints) -> str | None:
    form = _form(name)
    permitted = [b for b in constraints.permitted if _form(b) == form]
    excluded = [b for b in constraints.excluded if _form(b) == form]
    if not permitted and not excluded:
        return None
    ca = f"CA {constraints.ca!r}"
    match = _MATCHERS.get(form)
    if match is None:
        return f"{shown}: {ca} constrains {form} names, which estkit cannot check"
    try:
        if permitted and not any(match(name, base) for base in permitted):
            bases = ", ".join(_value_shown(b) for b in permitted[:_SHOWN_BASES])
            more = ", ..." if len(permitted) > _SHOWN_BASES else ""
            return (
                f"{shown} is outside the name constraints of {ca} (permitted {form}: {bases}{more})"
            )
        for base in excluded:
            if match(name, base) or _wildcard_covers(name, base):
                return (
                    f"{shown} is excluded by the name constraints of {ca} "
                    f"(excluded {form}: {_value_shown(base)})"
                )
    except _Unchecked as exc:
        return f"{shown}: {exc}, so {ca}'s {form} constraints cannot be checked"
    return None


def _form(name: x509.GeneralName) -> str:
    if isinstance(name, x509.OtherName) and name.type_id == _SMTP_UTF8_MAILBOX:
        return "email"  # RFC 8398 9: constrained by rfc822Name subtrees
    return _FORMS.get(type(name), type(name).__name__)


def _value_shown(name: x509.GeneralName) -> str:
    if isinstance(name, x509.DirectoryName):
        return name.value.rfc4514_string()
    return str(name.value)


def _dns(name: x509.GeneralName, base: x509.GeneralName) -> bool:
    """v3_ncons.c ``nc_dns``: the constraint is a suffix of the name at a label boundary
    (or the constraint starts with '.'); the empty constraint matches every name."""
    host, suffix = _ia5(name), _ia5(base)
    if not suffix:
        return True
    if len(host) < len(suffix):
        return False
    if (
        len(host) > len(suffix)
        and not suffix.startswith(b".")
        and host[len(host) - len(suffix) - 1] != ord(".")
    ):
        return False
    return host[len(host) - len(suffix) :].lower() == suffix.lower()


def _wildcard_covers(name: x509.GeneralName, base: x509.GeneralName) -> bool:
    """Whether a wildcard dNSName stands for a host an excluded constraint names:
    ``*.devices.example`` for ``lab.devices.example``. Verifiers compare the wildcard as
    written and let it pass, but a TLS client would accept it for the excluded host."""
    if not isinstance(name, x509.DNSName) or not isinstance(base, x509.DNSName):
        return False
    host, excluded = _ia5(name).lower(), _ia5(base).lower()
    if not host.startswith(b"*."):
        return False
    label, dot, parent = excluded.partition(b".")
    return bool(label and dot) and parent == host[2:]


def _email(name: x509.GeneralName, base: x509.GeneralName) -> bool:
    """v3_ncons.c ``nc_email``."""
    if not isinstance(name, x509.RFC822Name):
        raise _Unchecked("an internationalised address (SmtpUTF8Mailbox)")
    address, constraint = _ia5(name), _ia5(base)
    at = address.rfind(b"@")
    if at < 0:
        raise _Unchecked("the address has no '@'")
    constraint_at = constraint.rfind(b"@")
    if constraint_at < 0 and constraint.startswith(b"."):
        return (
            len(address) > len(constraint)
            and address[-len(constraint) :].lower() == constraint.lower()
        )
    if constraint_at >= 0:
        if constraint_at > 0 and constraint[:constraint_at] != address[:at]:
            return False  # the local part, case-sensitive
        constraint = constraint[constraint_at + 1 :]
    return address[at + 1 :].lower() == constraint.lower()


def _uri(name: x509.GeneralName, base: x509.GeneralName) -> bool:
    """v3_ncons.c ``nc_uri``: the URI's host against the constraint."""
    host, constraint = _uri_host(_ia5(name)), _ia5(base)
    if constraint.startswith(b"."):
        return len(host) > len(constraint) and host[-len(constraint) :].lower() == (
            constraint.lower()
        )
    return host.lower() == constraint.lower()


def _uri_host(uri: bytes) -> bytes:
    """The host of ``scheme://host[:port][/path]``, where OpenSSL 3.0 (up to the first
    ':' after ``//``, else the first '/') and later versions (a URL parser) agree."""
    scheme, colon, rest = uri.partition(b":")
    if not colon or not _URI_SCHEME.fullmatch(scheme) or not rest.startswith(b"//"):
        raise _Unchecked("the URI has no scheme://host")
    rest = rest[2:]
    end = rest.find(b":")
    if end < 0:
        end = rest.find(b"/")
    host, after = (rest, b"") if end < 0 else (rest[:end], rest[end:])
    if not _URI_HOST.fullmatch(host) or not _URI_AFTER_HOST.fullmatch(after):
        raise _Unchecked("the URI's host is not plain (user info, brackets, a query)")
    return host


def _ip(name: x509.GeneralName, base: x509.GeneralName) -> bool:
    """v3_ncons.c ``nc_ip``: within the network; one IP version never matches the other."""
    address, network = name.value, base.value
    if not isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address):
        raise _Unchecked("it is a network, not one address")
    if not isinstance(network, ipaddress.IPv4Network | ipaddress.IPv6Network):
        raise _Unchecked("the constraint is one address, not a network")
    return address.version == network.version and address in network


def _directory(name: x509.GeneralName, base: x509.GeneralName) -> bool:
    """v3_ncons.c ``nc_dn``: the constraint's RDNs, canonical, begin the name's."""
    assert isinstance(name, x509.DirectoryName) and isinstance(base, x509.DirectoryName)
    rdns, prefix = _canonical_name(name.value), _canonical_name(base.value)
    return rdns[: len(prefix)] == prefix


_CanonicalRdn = tuple[tuple[str, int, bytes], ...]


def _canonical_name(name: x509.Name) -> tuple[_CanonicalRdn, ...]:
    """A name as OpenSSL compares names (``x509_name_canon``): per RDN its attributes,
    string values case-folded (ASCII) with whitespace trimmed and collapsed."""
    return tuple(
        tuple(sorted(_canonical_attribute(attribute) for attribute in rdn)) for rdn in name.rdns
    )


def _canonical_attribute(attribute: x509.NameAttribute[str | bytes]) -> tuple[str, int, bytes]:
    oid = attribute.oid.dotted_string
    value = attribute.value
    kind = attribute._type.value  # the ASN.1 string type; cryptography keeps it private
    if isinstance(value, bytes):
        return oid, kind, value
    if kind not in _CANONICAL_STRING_TYPES:
        return oid, kind, value.encode("utf-8")
    text = _SPACES.sub(" ", value.strip(_SPACE))
    folded = "".join(c.lower() if "A" <= c <= "Z" else c for c in text)
    return oid, 0, folded.encode("utf-8")


def _ia5(name: x509.GeneralName) -> bytes:
    value = name.value
    if not isinstance(value, str):
        raise _Unchecked("it is not a text name")
    return value.encode("utf-8")


_FORMS: dict[type, str] = {
    x509.DNSName: "DNS",
    x509.RFC822Name: "email",
    x509.UniformResourceIdentifier: "URI",
    x509.IPAddress: "IP",
    x509.DirectoryName: "directoryName",
    x509.OtherName: "otherName",
    x509.RegisteredID: "registeredID",
}
_MATCHERS: dict[str, Callable[[x509.GeneralName, x509.GeneralName], bool]] = {
    "DNS": _dns,
    "email": _email,
    "URI": _uri,
    "IP": _ip,
    "directoryName": _directory,
}
