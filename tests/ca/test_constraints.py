"""Operator-supplied CAs are honoured: their chains are checked at load (a CA, keyCertSign
and cRLSign, path length, validity, name constraints), and every certificate's names
against the chain's name constraints before it is signed (RFC 5280 4.2.1.10).

estkit and OpenSSL agree both ways: what estkit issues ``openssl verify -x509_strict``
accepts, and what estkit refuses, signed anyway, ``openssl verify`` rejects with a
name-constraint error.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import count
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtensionOID, NameOID

from caenv import BOOTSTRAP, NOW, OPERATIONAL, label, make_csr, refused
from estkit.ca.authority import Authority, IssuingCa
from estkit.ca.constraints import chain_name_constraints, check_chain, leaf_violation
from estkit.ca.errors import Code
from estkit.ca.generations import FIRST, Generation
from estkit.ca.signers import TokenKeyRef, load_cas
from estkit.pki.certs import certs_to_pem
from estkit.pki.der import tlv
from estkit.pki.keys import PrivateKey, generate_key, key_to_pem, signature_hash
from estkit.pki.profiles import authority_key_identifier, issue_leaf, random_serial
from estkit.store import SqlStore
from testpki import cn_name

Auth = Authority[SqlStore]
DNS, IP, EMAIL, URI, DIR = (
    x509.DNSName,
    x509.IPAddress,
    x509.RFC822Name,
    x509.UniformResourceIdentifier,
    x509.DirectoryName,
)
# OpenSSL's name-constraint verify errors: 47 permitted and 48 excluded subtree violation,
# 49 minimum/maximum, 51 unsupported constraint type, 52/53 unsupported syntax.
NAME_CONSTRAINT_ERROR = re.compile(r"error (4[789]|5[123]) at \d+ depth lookup")
CA_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


def org(*pairs: tuple[x509.ObjectIdentifier, str]) -> x509.Name:
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in pairs])


O_ACME = org((NameOID.ORGANIZATION_NAME, "Acme"))


def make_ca(
    subject: str | x509.Name,
    issuer: IssuingCa | None = None,
    *,
    name: str = "devices",
    path_length: int | None = 0,
    constraints: x509.NameConstraints | x509.UnrecognizedExtension | None = None,
    usage: x509.KeyUsage | None = CA_USAGE,
    ca: bool = True,
    not_before: dt.datetime = NOW - dt.timedelta(days=1),
    not_after: dt.datetime = NOW + dt.timedelta(days=3650),
    key: PrivateKey | None = None,
) -> IssuingCa:
    """A CA certificate as an operator's PKI might make it, with what estkit's own never
    has (name constraints) or must refuse (no keyCertSign, a short path length)."""
    key = key or generate_key("ec-p256")
    name_ = subject if isinstance(subject, x509.Name) else cn_name(subject)
    signer = issuer.key if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(name_)
        .issuer_name(issuer.cert.subject if issuer else name_)
        .public_key(key.public_key())
        .serial_number(random_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(authority_key_identifier(issuer.cert if issuer else None, signer), False)
    )
    if usage is not None:
        builder = builder.add_extension(usage, critical=True)
    if constraints is not None:
        builder = builder.add_extension(constraints, critical=True)
    cert = builder.sign(signer, signature_hash(signer))
    return IssuingCa(name=name, cert=cert, key=key, chain=(cert, *(issuer.chain if issuer else ())))


def permitted(*names: x509.GeneralName) -> x509.NameConstraints:
    return x509.NameConstraints(permitted_subtrees=list(names), excluded_subtrees=None)


def excluded(*names: x509.GeneralName) -> x509.NameConstraints:
    return x509.NameConstraints(permitted_subtrees=None, excluded_subtrees=list(names))


def sign_anyway(
    ca: IssuingCa, subject: x509.Name, sans: Sequence[x509.GeneralName] = ()
) -> x509.Certificate:
    """The leaf estkit would issue for these names, signed without asking policy."""
    return issue_leaf(
        profile=OPERATIONAL,
        public_key=generate_key("ec-p256").public_key(),
        subject=subject,
        sans=x509.SubjectAlternativeName(list(sans)) if sans else None,
        issuer=ca.cert,
        issuer_key=ca.key,
        now=NOW,
    )


_files = count()


def openssl_verify(
    tmp: Path, chain: Sequence[x509.Certificate], cert: x509.Certificate, *, at: dt.datetime = NOW
) -> subprocess.CompletedProcess[str]:
    """``openssl verify -x509_strict`` of ``cert`` up to ``chain[-1]`` (the trust anchor),
    at time ``at``."""
    n = next(_files)
    root = tmp / f"root-{n}.pem"
    root.write_bytes(certs_to_pem([chain[-1]]))
    target = tmp / f"leaf-{n}.pem"
    target.write_bytes(certs_to_pem([cert]))
    args = ["openssl", "verify", "-x509_strict", "-attime", str(int(at.timestamp()))]
    args += ["-CAfile", str(root)]
    if len(chain) > 1:
        untrusted = tmp / f"untrusted-{n}.pem"
        untrusted.write_bytes(certs_to_pem(chain[:-1]))
        args += ["-untrusted", str(untrusted)]
    return subprocess.run([*args, str(target)], capture_output=True, text=True, timeout=30)


def assert_openssl_accepts(tmp: Path, ca: IssuingCa, cert: x509.Certificate) -> None:
    result = openssl_verify(tmp, ca.chain, cert)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith(": OK")


def assert_openssl_rejects_names(tmp: Path, ca: IssuingCa, cert: x509.Certificate) -> None:
    result = openssl_verify(tmp, ca.chain, cert)
    assert result.returncode != 0, result.stdout
    assert NAME_CONSTRAINT_ERROR.search(result.stdout + result.stderr), result.stderr


# -- the names of a leaf, against OpenSSL ------------------------------------------------


DEV_1 = cn_name("dev-1")


@dataclass(frozen=True)
class Case:
    on: x509.NameConstraints  # the issuing CA's (``on_root``: the root's)
    sans: tuple[x509.GeneralName, ...] = ()
    subject: x509.Name = DEV_1
    refused: str | None = None  # a fragment of the reason; None: within the constraints
    on_root: bool = False


DEVICES = permitted(DNS(".devices.example"))
CASES = {
    # dNSName: ".devices.example" permits the names below it, not itself.
    "ok/dns-below-dotted": Case(DEVICES, (DNS("a.devices.example"),)),
    "ok/dns-deep-and-upper-case": Case(DEVICES, (DNS("X.Y.Devices.Example"),)),
    "fail/dns-dotted-apex": Case(DEVICES, (DNS("devices.example"),), refused="'devices.example'"),
    "fail/dns-outside": Case(DEVICES, (DNS("a.other.example"),), refused=".devices.example"),
    "fail/dns-one-good-one-bad": Case(
        DEVICES, (DNS("a.devices.example"), DNS("a.other.example")), refused="a.other.example"
    ),
    # "devices.example" permits itself and below, on label boundaries only.
    "ok/dns-apex": Case(permitted(DNS("devices.example")), (DNS("devices.example"),)),
    "ok/dns-below-apex": Case(permitted(DNS("devices.example")), (DNS("a.devices.example"),)),
    "fail/dns-not-a-label-boundary": Case(
        permitted(DNS("devices.example")), (DNS("otherdevices.example"),), refused="permitted"
    ),
    "fail/dns-excluded": Case(
        x509.NameConstraints([DNS(".devices.example")], [DNS("lab.devices.example")]),
        (DNS("x.lab.devices.example"),),
        refused="excluded by",
    ),
    "ok/dns-beside-excluded": Case(
        x509.NameConstraints([DNS(".devices.example")], [DNS("lab.devices.example")]),
        (DNS("x.field.devices.example"),),
    ),
    "ok/dns-only-excluded": Case(excluded(DNS(".lab.example")), (DNS("a.devices.example"),)),
    "fail/dns-on-the-root": Case(
        DEVICES, (DNS("a.other.example"),), refused="a.other", on_root=True
    ),
    "ok/dns-on-the-root": Case(DEVICES, (DNS("a.devices.example"),), on_root=True),
    # A CN that reads as a host name is a dNSName when there is no dNSName.
    "fail/host-cn-outside": Case(DEVICES, subject=cn_name("sensor.plant-7"), refused="CN"),
    "ok/host-cn-inside": Case(DEVICES, subject=cn_name("sensor.devices.example")),
    "ok/host-cn-beside-a-dns-san": Case(
        DEVICES, (DNS("a.devices.example"),), subject=cn_name("sensor.plant-7")
    ),
    "fail/host-cn-beside-an-ip-san": Case(
        DEVICES,
        (IP(ipaddress.ip_address("10.0.0.1")),),
        subject=cn_name("sensor.plant-7"),
        refused="CN",
    ),
    "ok/cn-one-label": Case(DEVICES, subject=cn_name("dev-1")),
    "ok/cn-not-a-host-name": Case(DEVICES, subject=cn_name("dev.1$a")),
    "fail/cn-with-underscore": Case(DEVICES, subject=cn_name("dev_1.plant"), refused="CN"),
    "ok/cn-dot-beside-hyphen": Case(DEVICES, subject=cn_name("dev-.plant")),
    # iPAddress: within the network, IPv4 never within IPv6.
    "ok/ip-inside": Case(
        permitted(IP(ipaddress.ip_network("10.0.0.0/8"))), (IP(ipaddress.ip_address("10.9.8.7")),)
    ),
    "fail/ip-outside": Case(
        permitted(IP(ipaddress.ip_network("10.0.0.0/8"))),
        (IP(ipaddress.ip_address("192.168.1.1")),),
        refused="10.0.0.0/8",
    ),
    "fail/ipv6-under-ipv4-only": Case(
        permitted(IP(ipaddress.ip_network("10.0.0.0/8"))),
        (IP(ipaddress.ip_address("::ffff:10.0.0.1")),),
        refused="permitted",
    ),
    "ok/ipv6-inside": Case(
        permitted(
            IP(ipaddress.ip_network("10.0.0.0/8")), IP(ipaddress.ip_network("2001:db8::/32"))
        ),
        (IP(ipaddress.ip_address("2001:db8::1")),),
    ),
    "fail/ip-excluded": Case(
        excluded(IP(ipaddress.ip_network("10.9.0.0/16"))),
        (IP(ipaddress.ip_address("10.9.1.1")),),
        refused="excluded by",
    ),
    "ok/ip-unconstrained-form": Case(DEVICES, (IP(ipaddress.ip_address("192.168.1.1")),)),
    # directoryName: the constraint's RDNs begin the subject's, compared canonically.
    "ok/dirname-inside": Case(
        permitted(DIR(O_ACME)),
        subject=org((NameOID.ORGANIZATION_NAME, "Acme"), (NameOID.COMMON_NAME, "dev-1")),
    ),
    "ok/dirname-case-and-spaces": Case(
        permitted(DIR(O_ACME)),
        subject=org((NameOID.ORGANIZATION_NAME, "  ACME "), (NameOID.COMMON_NAME, "dev-1")),
    ),
    "fail/dirname-cn-first": Case(
        permitted(DIR(O_ACME)),
        subject=org((NameOID.COMMON_NAME, "dev-1"), (NameOID.ORGANIZATION_NAME, "Acme")),
        refused="directoryName",
    ),
    "fail/dirname-other-org": Case(
        permitted(DIR(O_ACME)),
        subject=org((NameOID.ORGANIZATION_NAME, "Evil"), (NameOID.COMMON_NAME, "dev-1")),
        refused="O=Acme",
    ),
    "fail/dirname-excluded": Case(
        excluded(DIR(O_ACME)),
        subject=org((NameOID.ORGANIZATION_NAME, "acme"), (NameOID.COMMON_NAME, "dev-1")),
        refused="excluded by",
    ),
    # rfc822Name: host, .domain, or one mailbox (local part case-sensitive).
    "ok/email-host": Case(permitted(EMAIL("devices.example")), (EMAIL("a@devices.example"),)),
    "fail/email-host-not-below": Case(
        permitted(EMAIL("devices.example")), (EMAIL("a@x.devices.example"),), refused="permitted"
    ),
    "ok/email-domain": Case(permitted(EMAIL(".devices.example")), (EMAIL("a@x.devices.example"),)),
    "fail/email-mailbox-case": Case(
        permitted(EMAIL("ops@devices.example")), (EMAIL("Ops@devices.example"),), refused="Ops@"
    ),
    # uniformResourceIdentifier: the host of scheme://host[:port][/path].
    "ok/uri-host-below": Case(
        permitted(URI(".devices.example")), (URI("https://a.devices.example:7443/x"),)
    ),
    "fail/uri-host-outside": Case(
        permitted(URI(".devices.example")), (URI("https://devices.example/x"),), refused="URI"
    ),
    "fail/uri-without-host": Case(
        permitted(URI(".devices.example")), (URI("urn:dev:1"),), refused="no scheme://host"
    ),
    "fail/uri-colon-in-path": Case(
        permitted(URI(".devices.example")),
        (URI("https://a.devices.example/p:1"),),
        refused="not plain",
    ),
    # Constraints on forms estkit never issues bind nothing it signs.
    "ok/othername-constraint": Case(
        permitted(x509.OtherName(x509.ObjectIdentifier("1.3.6.1.4.1.311.20.2.3"), b"\x0c\x01x")),
        (DNS("a.other.example"),),
    ),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_leaf_names_within_the_chains_constraints_as_openssl_reads_them(
    tmp_path: Path, case: Case
) -> None:
    root = make_ca("nc root", path_length=1, constraints=case.on if case.on_root else None)
    ca = make_ca("nc devices", root, constraints=None if case.on_root else case.on)
    sans = x509.SubjectAlternativeName(list(case.sans)) if case.sans else None
    problem = leaf_violation(case.subject, sans, chain_name_constraints(ca.chain))
    leaf = sign_anyway(ca, case.subject, case.sans)
    if case.refused is None:
        assert problem is None
        assert_openssl_accepts(tmp_path, ca, leaf)
    else:
        assert problem is not None and case.refused in problem, problem
        assert "\n" not in problem
        assert_openssl_rejects_names(tmp_path, ca, leaf)


def test_a_uri_with_user_info_is_refused_as_openssl_versions_read_its_host_differently() -> None:
    """OpenSSL 3.0 takes ``user@a.devices.example`` for the host, 3.2 ``a.devices.example``:
    estkit cannot know which verifier will read it, so it does not guess."""
    ca = make_ca("nc devices", make_ca("nc root", path_length=1), constraints=permitted(
        URI("a.devices.example")
    ))  # fmt: skip
    sans = x509.SubjectAlternativeName([URI("https://user@a.devices.example/")])
    problem = leaf_violation(cn_name("dev-1"), sans, chain_name_constraints(ca.chain))
    assert problem is not None and "cannot be checked" in problem


def test_a_wildcard_standing_for_an_excluded_host_is_refused(tmp_path: Path) -> None:
    """Stricter than OpenSSL, which compares ``*.devices.example`` as written: a TLS
    client would accept that certificate for ``lab.devices.example``, which is excluded."""
    constraints = x509.NameConstraints([DNS(".devices.example")], [DNS("lab.devices.example")])
    ca = make_ca("nc devices", make_ca("nc root", path_length=1), constraints=constraints)
    chain = chain_name_constraints(ca.chain)
    wildcard = x509.SubjectAlternativeName([DNS("*.devices.example")])
    problem = leaf_violation(DEV_1, wildcard, chain)
    assert problem is not None and "(excluded DNS: lab.devices.example)" in problem
    assert (
        leaf_violation(DEV_1, x509.SubjectAlternativeName([DNS("*.x.devices.example")]), chain)
        is None
    )
    assert_openssl_accepts(tmp_path, ca, sign_anyway(ca, DEV_1, list(wildcard)))


def test_a_chain_without_name_constraints_constrains_nothing() -> None:
    root = make_ca("nc root", path_length=1)
    ca = make_ca("nc devices", root)
    assert chain_name_constraints(ca.chain) == ()
    assert leaf_violation(cn_name("sensor.anywhere"), None, ()) is None


# -- before signing: the authority refuses, audits once, issues nothing ------------------


@dataclass(frozen=True)
class ConstrainedCas:
    root: IssuingCa
    devices: IssuingCa
    bootstrap: IssuingCa
    unconstrained_devices: IssuingCa  # the same CA (key, subject) before its constraints


@pytest.fixture(scope="module")
def constrained_cas() -> ConstrainedCas:
    root = make_ca("nc root", name="root", path_length=1)
    key = generate_key("ec-p256")
    devices = make_ca(
        "Acme Devices CA",
        root,
        key=key,
        constraints=x509.NameConstraints(
            permitted_subtrees=[
                DNS(".devices.example"),
                IP(ipaddress.ip_network("10.0.0.0/8")),
            ],
            excluded_subtrees=[DNS("lab.devices.example")],
        ),
    )
    bootstrap = make_ca(
        "Acme Bootstrap CA", root, name="bootstrap", constraints=excluded(DNS(".lab.example"))
    )
    return ConstrainedCas(root, devices, bootstrap, make_ca("Acme Devices CA", root, key=key))


def authority_over(store: SqlStore, cas: ConstrainedCas, devices: IssuingCa) -> Auth:
    types = frozenset({"dns", "ip", "uri"})
    return Authority(
        cas={"root": cas.root, "devices": devices, "bootstrap": cas.bootstrap},
        labels={
            "devices": label(permitted_san_types=types, serverkeygen=True),
            "approved": label(name="approved", approval=True, permitted_san_types=types),
        },
        bootstrap_profile=BOOTSTRAP,
        store=store,
        secret_validity=dt.timedelta(days=7),
    )


@pytest.fixture
def constrained(store: SqlStore, constrained_cas: ConstrainedCas) -> Auth:
    return authority_over(store, constrained_cas, constrained_cas.devices)


def refusals_since(store: SqlStore, before: int) -> list[tuple[str, str]]:
    return [
        (e.outcome, e.detail.split(":")[0]) for e in store.list_audit(limit=1000).items[before:]
    ]


@pytest.mark.parametrize(
    ("device_id", "sans"),
    [
        ("dev-1", [DNS("a.devices.example")]),
        ("dev-1", [IP(ipaddress.ip_address("10.1.2.3"))]),
        ("dev-1", []),
        ("sensor.plant-7", [DNS("sensor.devices.example")]),
    ],
    ids=["ok/dns", "ok/ip", "ok/no-san", "ok/host-like-id-with-a-dns-san"],
)
def test_enroll_within_the_constraints_issues_what_openssl_verifies(
    constrained: Auth,
    constrained_cas: ConstrainedCas,
    tmp_path: Path,
    device_id: str,
    sans: list[x509.GeneralName],
) -> None:
    secret = constrained.add_device(device_id, actor="t", now=NOW)
    who = constrained.authenticate_secret(device_id, secret, now=NOW)
    issued = constrained.enroll(
        constrained.labels["devices"],
        make_csr(generate_key("ec-p256"), device_id, sans=sans),
        who,
        now=NOW,
    )
    assert_openssl_accepts(tmp_path, constrained_cas.devices, issued.certificate)


@pytest.mark.parametrize(
    ("device_id", "sans", "reason"),
    [
        ("dev-1", [DNS("a.other.example")], "'a.other.example' is outside the name constraints"),
        ("dev-1", [DNS("x.lab.devices.example")], "(excluded DNS: lab.devices.example)"),
        ("dev-1", [IP(ipaddress.ip_address("192.0.2.1"))], "(permitted IP: 10.0.0.0/8)"),
        ("sensor.plant-7", [], "CN 'sensor.plant-7'"),
    ],
    ids=["fail/dns-outside", "fail/dns-excluded", "fail/ip-outside", "fail/host-like-id"],
)
def test_enroll_outside_the_constraints_is_refused_audited_once_and_issues_nothing(
    constrained: Auth,
    constrained_cas: ConstrainedCas,
    store: SqlStore,
    tmp_path: Path,
    device_id: str,
    sans: list[x509.GeneralName],
    reason: str,
) -> None:
    secret = constrained.add_device(device_id, actor="t", now=NOW)
    who = constrained.authenticate_secret(device_id, secret, now=NOW)
    before = len(store.list_audit(limit=1000).items)
    csr = make_csr(generate_key("ec-p256"), device_id, sans=sans)
    refusal = refused(
        Code.NAME_CONSTRAINTS,
        lambda: constrained.enroll(constrained.labels["devices"], csr, who, now=NOW),
    )
    assert reason in refusal.reason and "CN=Acme Devices CA" in refusal.reason
    assert refusals_since(store, before) == [("refused", "name-constraints")]
    assert store.certificates_of(device_id) == []
    # The secret was not spent: the device may ask again with names the CA allows.
    constrained.authenticate_secret(device_id, secret, now=NOW)
    assert_openssl_rejects_names(
        tmp_path,
        constrained_cas.devices,
        sign_anyway(constrained_cas.devices, cn_name(device_id), sans),
    )


def test_provision_serverkeygen_and_approval_refuse_before_anything_is_made(
    constrained: Auth, store: SqlStore
) -> None:
    outside = [DNS("a.other.example")]
    before = len(store.list_audit(limit=1000).items)
    refused(
        Code.NAME_CONSTRAINTS,
        lambda: constrained.provision(
            "devices",
            make_csr(generate_key("ec-p256"), "dev-2"),
            device_id="dev-2",
            actor="api:station",
            now=NOW,
            via="api-provision",
            dns_names=["a.other.example"],
        ),
    )
    secret = constrained.add_device("dev-3", actor="t", now=NOW)
    who = constrained.authenticate_secret("dev-3", secret, now=NOW)
    after_add = len(store.list_audit(limit=1000).items)
    csr = make_csr(generate_key("ec-p256"), "dev-3", sans=outside)
    refused(
        Code.NAME_CONSTRAINTS,
        lambda: constrained.serverkeygen(constrained.labels["devices"], csr, who, now=NOW),
    )
    refused(
        Code.NAME_CONSTRAINTS,
        lambda: constrained.enroll(constrained.labels["approved"], csr, who, now=NOW),
    )
    assert not store.list_pending(limit=100).items  # no operator is asked to approve it
    assert refusals_since(store, before)[:1] == [("refused", "name-constraints")]
    assert refusals_since(store, after_add) == [("refused", "name-constraints")] * 2
    assert store.certificates_of("dev-2") == store.certificates_of("dev-3") == []


def test_cli_bootstrap_is_held_to_the_bootstrap_cas_constraints(
    constrained: Auth, tmp_path: Path, constrained_cas: ConstrainedCas
) -> None:
    issued = constrained.issue_bootstrap(
        make_csr(generate_key("ec-p256"), "sensor.field.example"),
        device_id="sensor.field.example",
        actor="cli",
        now=NOW,
    )
    assert_openssl_accepts(tmp_path, constrained_cas.bootstrap, issued.certificate)
    refusal = refused(
        Code.NAME_CONSTRAINTS,
        lambda: constrained.issue_bootstrap(
            make_csr(generate_key("ec-p256"), "sensor.lab.example"),
            device_id="sensor.lab.example",
            actor="cli",
            now=NOW,
        ),
    )
    assert "(excluded DNS: .lab.example)" in refusal.reason


def test_reenroll_is_refused_once_the_operator_constrains_the_ca(
    store: SqlStore, constrained_cas: ConstrainedCas
) -> None:
    """A certificate issued before the CA certificate carried its constraints cannot be
    renewed under them: the renewal would not verify."""
    before = authority_over(store, constrained_cas, constrained_cas.unconstrained_devices)
    secret = before.add_device("sensor.plant-7", actor="t", now=NOW)
    who = before.authenticate_secret("sensor.plant-7", secret, now=NOW)
    old = before.enroll(
        before.labels["devices"], make_csr(generate_key("ec-p256"), "sensor.plant-7"), who, now=NOW
    )
    after = authority_over(store, constrained_cas, constrained_cas.devices)
    holder = after.authenticate_certificate(old.certificate, now=NOW)
    refused(
        Code.NAME_CONSTRAINTS,
        lambda: after.reenroll(
            after.labels["devices"],
            make_csr(generate_key("ec-p256"), "sensor.plant-7"),
            holder,
            now=NOW,
        ),
    )


# -- at load: a chain that cannot issue stops the server ---------------------------------


@dataclass(frozen=True)
class FileSpec:
    signer: str
    cert: Path
    key_file: Path | None
    token: TokenKeyRef | None = None
    generation: Generation = FIRST


def load(tmp: Path, *cas: IssuingCa, now: dt.datetime = NOW) -> dict[str, IssuingCa]:
    specs = {}
    for ca in cas:
        cert, key = tmp / f"{ca.name}.pem", tmp / f"{ca.name}.key"
        cert.write_bytes(certs_to_pem([ca.cert]))
        key.write_bytes(key_to_pem(ca.key))
        specs[ca.name] = FileSpec(signer="file", cert=cert, key_file=key)
    return load_cas(specs, environ={}, now=now)


def refused_at_load(tmp: Path, *cas: IssuingCa, now: dt.datetime = NOW) -> str:
    with pytest.raises(ValueError) as caught:
        load(tmp, *cas, now=now)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("CA "), message
    return message


def test_an_operator_chain_with_name_constraints_loads(
    tmp_path: Path, constrained_cas: ConstrainedCas
) -> None:
    c = constrained_cas
    loaded = load(tmp_path, c.root, c.devices, c.bootstrap)
    assert loaded["devices"].chain == (c.devices.cert, c.root.cert)


def test_a_ca_below_a_path_length_0_ca_is_refused_at_load_as_openssl_would(
    tmp_path: Path,
) -> None:
    root = make_ca("pl root", name="root", path_length=0)
    devices = make_ca("pl devices", root)
    message = refused_at_load(tmp_path, root, devices)
    assert message.startswith("CA 'devices': ")
    assert "'CN=pl root' allows no CA below it (pathLenConstraint 0) but has 1" in message
    result = openssl_verify(tmp_path, devices.chain, sign_anyway(devices, cn_name("dev-1")))
    assert "path length constraint exceeded" in result.stdout + result.stderr


def test_path_lengths_count_the_cas_below(tmp_path: Path) -> None:
    root = make_ca("pl root", name="root", path_length=None)
    mid = make_ca("pl mid", root, name="mid", path_length=1)
    devices = make_ca("pl devices", mid, path_length=0)
    assert load(tmp_path, root, mid, devices)["devices"].chain == (
        devices.cert,
        mid.cert,
        root.cert,
    )
    short = make_ca("pl root", name="root", path_length=1, key=root.key)
    mid = make_ca("pl mid", short, name="mid", path_length=None, key=mid.key)
    devices = make_ca("pl devices", mid, path_length=0, key=devices.key)
    assert "allows 1 CA below it (pathLenConstraint 1) but has 2" in refused_at_load(
        tmp_path, short, mid, devices
    )


def without(**flags: bool) -> x509.KeyUsage:
    usage = {
        "digital_signature": True,
        "content_commitment": False,
        "key_encipherment": False,
        "data_encipherment": False,
        "key_agreement": False,
        "key_cert_sign": True,
        "crl_sign": True,
        "encipher_only": False,
        "decipher_only": False,
    }
    usage.update(flags)
    return x509.KeyUsage(**usage)


def test_a_ca_whose_key_usage_lacks_keycertsign_is_refused_at_load_as_openssl_would(
    tmp_path: Path,
) -> None:
    root = make_ca("ku root", name="root", path_length=1)
    devices = make_ca("ku devices", root, usage=without(key_cert_sign=False))
    assert "may not sign certificates (its keyUsage lacks keyCertSign)" in refused_at_load(
        tmp_path, root, devices
    )
    result = openssl_verify(tmp_path, devices.chain, sign_anyway(devices, cn_name("dev-1")))
    assert "key usage does not include certificate signing" in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"usage": without(crl_sign=False)}, "may not sign CRLs (its keyUsage lacks cRLSign)"),
        ({"ca": False}, "is not a CA certificate (basicConstraints cA is not TRUE)"),
        ({"not_after": NOW - dt.timedelta(hours=1)}, "expired at"),
        ({"not_before": NOW + dt.timedelta(hours=1)}, "is not valid before"),
        (
            {"constraints": x509.UnrecognizedExtension(
                ExtensionOID.NAME_CONSTRAINTS,
                tlv(0x30, tlv(0xA0, tlv(0x30, tlv(0x82, b".devices.ex") + tlv(0x81, b"\x03")))),
            )},
            "name constraints have a minimum or maximum",
        ),
        (
            {"constraints": x509.UnrecognizedExtension(
                ExtensionOID.NAME_CONSTRAINTS,
                tlv(0x30, tlv(0xA0, tlv(0x30, tlv(0x87, bytes([10, 0, 0, 0, 255, 0, 255, 0]))))),
            )},
            "its extensions cannot be read",
        ),
    ],
    ids=["fail/no-crl-sign", "fail/not-a-ca", "fail/expired", "fail/not-yet-valid",
         "fail/subtree-maximum", "fail/unreadable-constraints"],
)  # fmt: skip
def test_an_issuing_ca_that_cannot_issue_is_refused_at_load(
    tmp_path: Path, change: dict[str, object], message: str
) -> None:
    root = make_ca("ld root", name="root", path_length=1)
    devices = make_ca("ld devices", root, **change)  # type: ignore[arg-type]
    refusal = refused_at_load(tmp_path, root, devices)
    assert refusal.startswith("CA 'devices': certificate 'CN=ld devices'") and message in refusal


def test_an_expired_root_is_named_as_above_the_ca(tmp_path: Path) -> None:
    root = make_ca("ld root", name="root", path_length=1, not_after=NOW + dt.timedelta(days=1))
    devices = make_ca("ld devices", root)
    later = NOW + dt.timedelta(days=2)
    message = refused_at_load(tmp_path, root, devices, now=later)
    assert "certificate 'CN=ld root'" in message and "expired at" in message


def test_a_ca_outside_the_name_constraints_above_it_is_refused_at_load(tmp_path: Path) -> None:
    root = make_ca("Acme Root", name="root", path_length=1, constraints=permitted(DIR(O_ACME)))
    devices = make_ca("Acme Devices CA", root)  # CN=…, not under O=Acme
    message = refused_at_load(tmp_path, root, devices)
    assert message.startswith("CA 'devices': in its chain, subject 'CN=Acme Devices CA' is ")
    assert (
        "outside the name constraints of CA 'CN=Acme Root' (permitted directoryName: O=Acme)"
        in message
    )
    assert_openssl_rejects_names(tmp_path, devices, sign_anyway(devices, cn_name("dev-1")))
    inside = make_ca(org((NameOID.ORGANIZATION_NAME, "Acme"), (NameOID.COMMON_NAME, "D")), root)
    check_chain("devices", inside.chain, now=NOW)


def test_load_checks_every_ca_it_returns(tmp_path: Path) -> None:
    root = make_ca("ld root", name="root", path_length=1)
    bootstrap = make_ca("ld bootstrap", root, name="bootstrap", usage=without(crl_sign=False))
    devices = make_ca("ld devices", root)
    assert refused_at_load(tmp_path, root, devices, bootstrap).startswith("CA 'bootstrap': ")
