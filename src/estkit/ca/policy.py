"""The EST and factory policy, pure: facts in, a grant or a ``Refusal`` out.

No store, no audit, no clock of its own: the authority gathers the facts
(the presented certificate's record, the device's status, the time), asks
here, audits the answer once and writes what it decided. Every refusal has
its code (``ca.errors.Code``); tests/ca/ pins each one without a server.

What an issued certificate says is built here, never copied: the subject is
CN = device id plus the profile's fixed attributes; SANs are the CSR's only
when the label permits their types and names, and at most ``max_sans``; and
all of it within the name constraints of the issuing CA's chain
(``check_name_constraints``, the chain's constraints being facts the authority
passes).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from estkit.ca.constraints import CaNameConstraints, leaf_violation
from estkit.ca.errors import Code, Refusal
from estkit.pki import binding, names
from estkit.pki.csr import CertificationRequest, parse_csr
from estkit.pki.errors import DecodeError, KeyPolicyError, PolicyError
from estkit.pki.profiles import Profile
from estkit.store import CertStatus, DeviceStatus, PresentedCertificate

SAN_TYPES: dict[str, type[x509.GeneralName]] = {
    "dns": x509.DNSName,
    "uri": x509.UniformResourceIdentifier,
    "email": x509.RFC822Name,
    "ip": x509.IPAddress,
}
_SAN_TYPE_NAMES: dict[type, str] = {cls: name for name, cls in SAN_TYPES.items()}
DEFAULT_MAX_SANS = 10
SUBJECT_ATTRIBUTES: dict[str, x509.ObjectIdentifier] = {
    "C": NameOID.COUNTRY_NAME,
    "ST": NameOID.STATE_OR_PROVINCE_NAME,
    "L": NameOID.LOCALITY_NAME,
    "O": NameOID.ORGANIZATION_NAME,
    "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
}
# Key types the server may generate (RFC 7030 4.4); RSA-4096 takes seconds of CPU.
SERVERKEYGEN_KEY_TYPES = ("ec-p256", "ec-p384", "rsa-2048", "rsa-3072")


@dataclass(frozen=True, slots=True)
class Label:
    """An EST label: which CA signs, under which profile, with which wire options."""

    name: str
    ca: str
    profile: Profile
    permitted_san_types: frozenset[str] = frozenset({"dns", "uri"})
    max_sans: int = DEFAULT_MAX_SANS
    dns_wildcards: bool = False
    base64_line_length: int | None = None  # None: per client (server/quirks.py)
    csrattrs: tuple[x509.ObjectIdentifier, ...] = ()
    # Manual approval: requests wait (202 + Retry-After) until an operator decides.
    approval: bool = False
    retry_after: int = 60
    # Server-side key generation (RFC 7030 4.4), of this key type; never with approval
    # (a generated key would have to be kept until an operator decides).
    serverkeygen: bool = False
    serverkeygen_key_type: str = "ec-p256"
    # RFC 7030 3.5: the CSR's challengePassword must carry the TLS channel binding.
    require_channel_binding: bool = False


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is asking, as authenticated: by a client certificate, a secret, or locally."""

    device_id: str
    actor: str
    cert: x509.Certificate | None = None
    cert_ca: str | None = None  # name of the CA that issued ``cert``
    cert_serial: str | None = None
    secret_id: int | None = None


@dataclass(frozen=True, slots=True)
class Grant:
    """What to issue: the names policy built (the key is the CSR's)."""

    request: CertificationRequest
    subject: x509.Name
    sans: x509.SubjectAlternativeName | None
    replaces: str | None = None  # the serial this certificate renews
    # The key to certify when it is not the CSR's (server-side key generation).
    public_key: CertificatePublicKeyTypes | None = None


# -- the request ------------------------------------------------------------------------


def parse_request(csr_der: bytes) -> CertificationRequest:
    """The CSR, decoded and checked (signature, key type, no CA:TRUE)."""
    try:
        return parse_csr(csr_der)
    except KeyPolicyError as exc:
        raise Refusal(Code.KEY_NOT_PERMITTED, str(exc)) from None
    except (DecodeError, PolicyError) as exc:
        raise Refusal(Code.BAD_CSR, str(exc)) from None


def check_channel_binding(
    label: Label, request: CertificationRequest, channel_binding: bytes | None
) -> None:
    """RFC 7030 3.5 on labels that require it: the CSR's challengePassword is base64 of the
    binding of the TLS connection it came over (``channel_binding``; None: that connection
    has none, e.g. not TLS 1.2 or 1.3). A CSR made on another connection is refused."""
    if not label.require_channel_binding:
        return
    if channel_binding is None:
        raise Refusal(
            Code.CHANNEL_BINDING_MISMATCH,
            f"label {label.name!r} needs TLS channel binding; this connection has none",
        )
    password = binding.challenge_password(request.csr)
    if password is None:
        raise Refusal(
            Code.CHANNEL_BINDING_MISMATCH,
            f"label {label.name!r} needs the TLS channel binding in the CSR's challengePassword",
        )
    if not binding.carries_binding(password, channel_binding):
        raise Refusal(
            Code.CHANNEL_BINDING_MISMATCH,
            "CSR challengePassword is not this TLS connection's channel binding",
        )


def check_device_id(device_id: str) -> None:
    """The one device-id rule (``pki.names.check_device_id``) as a refusal."""
    try:
        names.check_device_id(device_id)
    except ValueError as exc:
        raise Refusal(Code.BAD_REQUEST, str(exc)) from None


# -- who is asking ----------------------------------------------------------------------


def check_device_status(device_id: str, status: DeviceStatus | None) -> None:
    """Only an active, registered device is served; None means not registered."""
    if status is DeviceStatus.ACTIVE:
        return
    if status is None:
        raise Refusal(Code.NOT_REGISTERED, f"device {device_id} is not registered")
    code = Code.DECOMMISSIONED if status is DeviceStatus.DECOMMISSIONED else Code.DISABLED
    raise Refusal(code, f"device {device_id} is {status.value}")


def client_certificate_device(
    cert: x509.Certificate,
    record: PresentedCertificate | None,
    *,
    client_cas: frozenset[str],
    now: dt.datetime,
) -> str:
    """The device a client certificate speaks for, if this authority accepts it.

    It must name one device (one CN), be within its validity, equal byte for
    byte a certificate this authority issued (so its signature need not be
    checked again: the TLS handshake did, and the record vouches for the rest),
    come from a CA that authenticates devices, belong to an active device, and
    not be revoked. The device's state is checked before the certificate's:
    "decommissioned" tells an operator more than "revoked".
    """
    device_id = names.common_name(cert.subject)
    if device_id is None:
        raise Refusal(Code.UNKNOWN_CERTIFICATE, "client certificate has no single CN")
    if now < cert.not_valid_before_utc:
        raise Refusal(Code.NOT_YET_VALID, "client certificate is not yet valid")
    if now > cert.not_valid_after_utc:
        raise Refusal(Code.EXPIRED, "client certificate is expired")
    if record is None or record.der != cert.public_bytes(Encoding.DER):
        raise Refusal(Code.UNKNOWN_CERTIFICATE, "client certificate unknown to this CA")
    if record.ca not in client_cas:
        raise Refusal(Code.WRONG_CA, "client certificate not issued by a CA that enrolls devices")
    if record.device_id != device_id:
        # A record of another device than the CN names cannot vouch for this one.
        raise Refusal(Code.UNKNOWN_CERTIFICATE, "client certificate unknown to this CA")
    check_device_status(device_id, record.device_status)
    if record.status is not CertStatus.VALID:
        raise Refusal(Code.REVOKED, "client certificate is revoked")
    return device_id


# -- what is asked for ------------------------------------------------------------------


def build_subject(device_id: str, profile: Profile) -> x509.Name:
    """CN = device id, then the profile's fixed attributes, in that order."""
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, device_id)]
    for short, value in profile.subject:
        attributes.append(x509.NameAttribute(SUBJECT_ATTRIBUTES[short], value))
    return x509.Name(attributes)


def check_sans(label: Label, sans: x509.SubjectAlternativeName | None) -> None:
    """SAN types the label permits, well-formed names, at most ``label.max_sans``."""
    entries = list(sans or ())
    if len(entries) > label.max_sans:
        raise Refusal(
            Code.SAN_NOT_PERMITTED,
            f"{len(entries)} subjectAltNames; label {label.name!r} allows {label.max_sans}",
        )
    for entry in entries:
        kind = _SAN_TYPE_NAMES.get(type(entry))
        if kind is None or kind not in label.permitted_san_types:
            raise Refusal(
                Code.SAN_NOT_PERMITTED,
                f"subjectAltName type {kind or type(entry).__name__} not permitted "
                f"on label {label.name!r}",
            )
        problem = _san_problem(kind, entry, wildcard=label.dns_wildcards)
        if problem is not None:
            raise Refusal(Code.SAN_NOT_PERMITTED, problem)


def _san_problem(kind: str, entry: x509.GeneralName, *, wildcard: bool) -> str | None:
    value = entry.value
    if kind == "dns":
        try:
            names.check_dns_name(value, wildcard=wildcard)
        except ValueError as exc:
            return str(exc)
        return None
    if kind in ("uri", "email"):
        text = str(value)
        if not text.isascii() or not text.isprintable() or " " in text or len(text) > 1024:
            return f"subjectAltName {kind} {ascii(text)[:80]}: printable ASCII without spaces"
        if kind == "uri" and ":" not in text:
            return f"subjectAltName uri {ascii(text)[:80]}: an absolute URI is needed"
        if kind == "email" and text.count("@") != 1:
            return f"subjectAltName email {ascii(text)[:80]}: one '@' is needed"
        return None
    if kind == "ip" and not isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return "subjectAltName ip: a single address is needed, not a network"
    return None


def check_name_constraints(grant: Grant, chain: Sequence[CaNameConstraints]) -> Grant:
    """The grant, when the names it certifies (its subject, SANs, and a CN that reads as a
    host name) are within the nameConstraints of the issuing CA's ``chain``
    (``ca.constraints``: RFC 5280 4.2.1.10 as OpenSSL reads it); refused otherwise: a
    certificate outside them would fail every verifier."""
    problem = leaf_violation(grant.subject, grant.sans, chain)
    if problem is not None:
        raise Refusal(Code.NAME_CONSTRAINTS, problem)
    return grant


def _same_names(request: CertificationRequest, cert: x509.Certificate) -> None:
    """RFC 7030 4.2.2: a renewal asks for the Subject and SAN of the certificate it renews."""
    if not names.names_equal(request.subject, cert.subject):
        raise Refusal(
            Code.SUBJECT_CHANGED, "CSR subject differs from the certificate being renewed"
        )
    if not names.sans_equal(request.sans, names.subject_alt_names(cert.extensions)):
        raise Refusal(
            Code.SUBJECT_CHANGED, "CSR subjectAltName differs from the certificate being renewed"
        )


def _own_name(request: CertificationRequest, device_id: str) -> None:
    if request.common_name != device_id:
        raise Refusal(
            Code.NAME_MISMATCH,
            f"CSR CN {request.common_name!r} is not the authenticated device id {device_id!r}",
        )


def decide_enroll(label: Label, request: CertificationRequest, who: Principal) -> Grant:
    """RFC 7030 simpleenroll. A bootstrap certificate or a secret: CN = device id, the
    CSR's SANs within the label's policy. An operational certificate of the label's CA
    (renewal through simpleenroll, as some clients do): the rule of ``decide_reenroll``."""
    if who.cert is not None and who.cert_ca not in ("bootstrap", label.ca):
        raise Refusal(Code.WRONG_CA, f"client certificate not accepted on label {label.name!r}")
    if who.cert is not None and who.cert_ca == label.ca:
        return decide_reenroll(label, request, who)
    _own_name(request, who.device_id)
    check_sans(label, request.sans)
    return Grant(
        request=request, subject=build_subject(who.device_id, label.profile), sans=request.sans
    )


def decide_reenroll(label: Label, request: CertificationRequest, who: Principal) -> Grant:
    """RFC 7030 simplereenroll: the operational certificate of the label's CA renews itself,
    with the same Subject and SAN (byte-equal or equal under RFC 5280 7.1); rekey allowed."""
    if who.cert is None:
        raise Refusal(
            Code.CERTIFICATE_REQUIRED, "re-enroll needs the client certificate being renewed"
        )
    if who.cert_ca != label.ca:
        raise Refusal(
            Code.WRONG_CA, "re-enroll needs an operational certificate of this label's CA"
        )
    _same_names(request, who.cert)
    _own_name(request, who.device_id)
    current = names.subject_alt_names(who.cert.extensions)
    return Grant(
        request=request,
        subject=build_subject(who.device_id, label.profile),
        sans=current or None,
        replaces=who.cert_serial,
    )


def decide_provision(
    label: Label,
    request: CertificationRequest,
    *,
    device_id: str,
    device_status: DeviceStatus | None,
    dns_names: Sequence[str] | None,
) -> Grant:
    """The factory path: a station asks for ``device_id``'s certificate. The device may be
    new (None) but not disabled or decommissioned; ``dns_names`` replace the CSR's SANs."""
    check_device_id(device_id)
    _own_name(request, device_id)
    if device_status is not None:
        check_device_status(device_id, device_status)
    sans = request.sans
    if dns_names is not None:
        sans = x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]) or None
    check_sans(label, sans)
    return Grant(request=request, subject=build_subject(device_id, label.profile), sans=sans)


# -- server-side key generation (RFC 7030 4.4) ------------------------------------------


def check_serverkeygen(label: Label) -> None:
    """Server-side key generation only on labels that enable it."""
    if not label.serverkeygen:
        raise Refusal(Code.NOT_FOUND, f"serverkeygen is not enabled on label {label.name!r}")


def decide_serverkeygen(label: Label, request: CertificationRequest, who: Principal) -> Grant:
    """RFC 7030 serverkeygen: the rule of ``decide_enroll`` for the CSR's names (its key is
    ignored, its signature was checked). The authority generates the key after this grant
    (a refused request costs no key) and sets it as the grant's ``public_key``."""
    check_serverkeygen(label)
    return decide_enroll(label, request, who)


def key_recipient(identifier: bytes, candidates: Sequence[x509.Certificate]) -> x509.Certificate:
    """The certificate whose key a generated key is to be encrypted to (RFC 7030 4.4.1.2):
    the one among ``candidates`` (the device's valid certificates) whose
    SubjectKeyIdentifier is ``identifier``, with an RSA key (CMS key transport)."""
    for cert in candidates:
        if _key_identifier(cert) == identifier:
            if not isinstance(cert.public_key(), rsa.RSAPublicKey):
                raise Refusal(
                    Code.BAD_REQUEST,
                    "key encryption is supported to RSA keys only "
                    f"(the key named by AsymmetricDecryptKeyIdentifier {identifier.hex()} is not)",
                )
            return cert
    raise Refusal(
        Code.BAD_REQUEST,
        "key encryption to an unknown key is not supported: AsymmetricDecryptKeyIdentifier "
        f"{identifier.hex()[:64]} names no valid certificate of this device",
    )


def _key_identifier(cert: x509.Certificate) -> bytes:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        return x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest
