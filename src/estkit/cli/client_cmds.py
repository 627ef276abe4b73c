"""Client commands: ``cacerts``, ``enroll``, ``reenroll``, ``serverkeygen``, ``csrattrs``,
``health``.

A certificate and Basic credentials may be given together: mTLS, and Basic once the
server asks for it (a 401 challenge). The CSRs of ``enroll``, ``reenroll`` and
``serverkeygen`` carry the TLS channel binding when ``/csrattrs`` asks for it.

Every failure becomes a ``CliError`` here (one line on stderr): exit status 1,
or 75 (EX_TEMPFAIL) when the server still has the enrollment pending.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import NoEncryption, pkcs12
from cryptography.x509.oid import NameOID

from estkit.cli.args import add_retry_options
from estkit.cli.errors import CliError
from estkit.cli.files import OutputFile, write_files_atomically
from estkit.client import (
    BasicAuth,
    ClientCertificate,
    Credentials,
    CsrFactory,
    EnrollmentPending,
    EstClient,
    EstError,
    IssuedCertificate,
    TrustAnchor,
)
from estkit.fileio import PRIVATE
from estkit.pki import certs, keys, names
from estkit.pki.csr import build_csr
from estkit.pki.errors import PkiError

EXIT_PENDING = 75  # EX_TEMPFAIL: try again later

Handler = Callable[[argparse.Namespace], int]

# Names for the OIDs servers commonly ask for in csrattrs (RFC 7030 4.5, RFC 8295).
_OID_NAMES = {
    "1.2.840.113549.1.9.7": "challengePassword",
    "1.2.840.113549.1.9.14": "extensionRequest",
    "1.2.840.10045.2.1": "id-ecPublicKey",
    "1.2.840.10045.3.1.7": "secp256r1",
    "1.3.132.0.34": "secp384r1",
    "1.3.132.0.35": "secp521r1",
    "1.2.840.10045.4.3.2": "ecdsa-with-SHA256",
    "1.2.840.10045.4.3.3": "ecdsa-with-SHA384",
    "1.2.840.10045.4.3.4": "ecdsa-with-SHA512",
    "1.2.840.113549.1.1.1": "rsaEncryption",
    "1.2.840.113549.1.1.10": "RSASSA-PSS",
    "1.2.840.113549.1.1.11": "sha256WithRSAEncryption",
    "1.2.840.113549.1.1.12": "sha384WithRSAEncryption",
    "1.2.840.113549.1.1.13": "sha512WithRSAEncryption",
    "1.3.6.1.1.1.1.22": "macAddress",
    "2.5.4.3": "commonName",
    "2.5.4.5": "serialNumber",
    "2.5.29.17": "subjectAltName",
    "2.5.29.37": "extKeyUsage",
}


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    server = _server_options()
    auth = _auth_options()
    mtls = _mtls_options()
    mtls_basic = _mtls_options(basic=True)
    output = _output_options()

    p = subparsers.add_parser(
        "cacerts", parents=[server], help="fetch the CA certificates (PEM) from an EST server"
    )
    p.add_argument("--out", type=Path, metavar="FILE", help="write the PEM here, not to stdout")
    p.set_defaults(handler=_cacerts)

    p = subparsers.add_parser(
        "enroll",
        parents=[server, auth, output],
        help="make a key, enroll it (simpleenroll), and write key and certificates",
    )
    p.add_argument("--device-id", required=True, help="device id: the CN of the CSR")
    p.add_argument(
        "--key-type", choices=keys.KEY_TYPES, default="ec-p256", help="default: %(default)s"
    )
    p.add_argument(
        "--san-dns", action="append", default=[], metavar="NAME", help="DNS SAN (repeatable)"
    )
    p.set_defaults(handler=_enroll)

    p = subparsers.add_parser(
        "reenroll",
        parents=[server, mtls_basic, output],
        help="renew the certificate given with --cert/--key (simplereenroll)",
    )
    p.add_argument(
        "--keep-key", action="store_true", help="reuse the current key instead of a new one"
    )
    p.add_argument(
        "--key-type", choices=keys.KEY_TYPES, help="type of the new key (default: as now)"
    )
    p.set_defaults(handler=_reenroll)

    p = subparsers.add_parser(
        "serverkeygen",
        parents=[server, auth, output],
        help="enroll with a key the server makes (serverkeygen), and write key and certificates",
    )
    p.add_argument("--device-id", required=True, help="device id: the CN of the CSR")
    p.add_argument(
        "--san-dns", action="append", default=[], metavar="NAME", help="DNS SAN (repeatable)"
    )
    p.set_defaults(handler=_serverkeygen)

    p = subparsers.add_parser(
        "csrattrs", parents=[server, auth], help="list the CSR attributes the server asks for"
    )
    p.set_defaults(handler=_csrattrs)

    p = subparsers.add_parser(
        "health",
        parents=[server, mtls],
        help="print the client certificate the server sees (GET /health/certificate)",
    )
    p.set_defaults(handler=_health)


# -- option groups -------------------------------------------------------------


def _server_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("server")
    g.add_argument(
        "--url",
        required=True,
        help="EST base URL with path prefix and label, e.g. https://host:8443/.well-known/est",
    )
    trust = g.add_mutually_exclusive_group(required=True)
    trust.add_argument("--trust-anchor", type=Path, metavar="FILE", help="CA certificate(s), PEM")
    trust.add_argument(
        "--fingerprint",
        metavar="SHA256",
        help="SHA-256 fingerprint of the CA to trust, checked against /cacerts (RFC 7030 4.1.1)",
    )
    add_retry_options(g, total="across all retries")
    return p


def _auth_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group(
        "authentication (a certificate, Basic, or both: then Basic when the server asks)"
    )
    g.add_argument("--cert", type=Path, metavar="FILE", help="client certificate (PEM, chain ok)")
    g.add_argument("--key", type=Path, metavar="FILE", help="its private key (PEM)")
    _add_basic_options(g)
    return p


def _mtls_options(*, basic: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    title = "authentication (and Basic when the server asks for it)" if basic else "authentication"
    g = p.add_argument_group(title)
    g.add_argument("--cert", type=Path, required=True, metavar="FILE", help="certificate (PEM)")
    g.add_argument("--key", type=Path, required=True, metavar="FILE", help="its private key (PEM)")
    if basic:
        _add_basic_options(g)
    return p


def _add_basic_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--user", help="Basic user name")
    secret = group.add_mutually_exclusive_group()
    secret.add_argument("--password", help="Basic password (visible to other users: prefer a file)")
    secret.add_argument("--password-file", type=Path, metavar="FILE", help="Basic password file")


def _output_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("output")
    g.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="directory for key.pem, cert.pem, chain.pem, fullchain.pem",
    )
    g.add_argument("--pfx", action="store_true", help="also write cert.pfx (PKCS#12, no password)")
    return p


# -- handlers ------------------------------------------------------------------


def _one_line_errors(handler: Handler) -> Handler:
    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except EnrollmentPending as exc:
            raise CliError(str(exc), exit_code=EXIT_PENDING) from exc
        except EstError as exc:
            raise CliError(str(exc)) from exc

    return run


@_one_line_errors
def _cacerts(args: argparse.Namespace) -> int:
    with _client(args, auth=None) as est:
        ca_certs = est.cacerts()
    pem = certs.certs_to_pem(ca_certs)
    if args.out is None:
        sys.stdout.write(pem.decode("ascii"))
        return 0
    out: Path = args.out
    _write(out.parent, [OutputFile(out.name, pem)])
    print(f"wrote {len(ca_certs)} CA certificate(s) to {out}")
    return 0


@_one_line_errors
def _enroll(args: argparse.Namespace) -> int:
    auth = _auth(args, required=True)
    device_id = _device_id(args)
    key = keys.generate_key(args.key_type)
    csr = _csr_factory(key, subject=_device_name(device_id), sans=_dns_sans(args))
    with _client(args, auth=auth) as est:
        issued = est.verify_issued(
            est.simpleenroll(csr),
            public_key=key.public_key(),
            now=dt.datetime.now(dt.UTC),
            common_name=device_id,
        )
    _write_issued(args.out, key, issued, pfx=args.pfx)
    print(_summary("enrolled", issued, args.out))
    return 0


@_one_line_errors
def _reenroll(args: argparse.Namespace) -> int:
    current = _load_certificate(args.cert)
    current_key = _load_key(args.key)
    if not keys.public_keys_match(current.public_key(), current_key.public_key()):
        raise CliError(f"{args.key} is not the key of {args.cert}")
    if args.keep_key:
        if args.key_type is not None:
            raise CliError("--keep-key and --key-type exclude each other")
        key = current_key
    else:
        key = keys.generate_key(args.key_type or keys.key_type_of(current_key.public_key()))
    # The Name and SAN objects of the certificate itself, so their encodings are kept.
    csr = _csr_factory(
        key, subject=current.subject, sans=names.subject_alt_names(current.extensions)
    )
    auth = Credentials(certificate=ClientCertificate(args.cert, args.key), basic=_basic(args))
    with _client(args, auth=auth) as est:
        issued = est.verify_issued(
            est.simplereenroll(csr),
            public_key=key.public_key(),
            now=dt.datetime.now(dt.UTC),
            common_name=names.common_name(current.subject),
            subject=current.subject,
        )
    _write_issued(args.out, key, issued, pfx=args.pfx)
    print(_summary("re-enrolled", issued, args.out))
    return 0


@_one_line_errors
def _serverkeygen(args: argparse.Namespace) -> int:
    auth = _auth(args, required=True)
    device_id = _device_id(args)
    # RFC 7030 4.4.1: the CSR must be signed, but the server ignores its key.
    throwaway = keys.generate_key("ec-p256")
    csr = _csr_factory(throwaway, subject=_device_name(device_id), sans=_dns_sans(args))
    with _client(args, auth=auth) as est:
        key, returned = est.serverkeygen(csr)
        issued = est.verify_issued(
            returned,
            public_key=key.public_key(),
            now=dt.datetime.now(dt.UTC),
            common_name=device_id,
        )
    _write_issued(args.out, key, issued, pfx=args.pfx)
    print(_summary("enrolled a server-made key for", issued, args.out))
    return 0


@_one_line_errors
def _csrattrs(args: argparse.Namespace) -> int:
    with _client(args, auth=_auth(args, required=False)) as est:
        attributes = est.csrattrs()
    for attribute in attributes:
        dotted = attribute.oid.dotted_string
        line = f"{dotted} {_OID_NAMES[dotted]}" if dotted in _OID_NAMES else dotted
        if attribute.values is not None:
            line += f" ({len(attribute.values)} value(s))"
        print(line)
    return 0


@_one_line_errors
def _health(args: argparse.Namespace) -> int:
    with _client(args, auth=ClientCertificate(args.cert, args.key)) as est:
        seen = est.health()
    sys.stdout.write(certs.certs_to_pem([seen]).decode("ascii"))
    if getattr(args, "verbose", False):
        print(
            f"server sees {seen.subject.rfc4514_string()} "
            f"serial {certs.serial_hex(seen.serial_number)}",
            file=sys.stderr,
        )
    return 0


# -- helpers -------------------------------------------------------------------


def _client(args: argparse.Namespace, *, auth: ClientCertificate | Credentials | None) -> EstClient:
    if args.trust_anchor is not None:
        trust = TrustAnchor.from_file(args.trust_anchor)
    else:
        trust = TrustAnchor.from_fingerprint(args.fingerprint)
    try:
        return EstClient(
            args.url,
            trust=trust,
            auth=auth,
            timeout=args.timeout,
            total_timeout=args.total_timeout,
            retries=args.retries,
        )
    except ValueError as exc:
        raise CliError(f"--url: {exc}") from exc


def _auth(args: argparse.Namespace, *, required: bool) -> Credentials | None:
    if (args.cert is None) != (args.key is None):
        raise CliError("--cert and --key go together")
    certificate = ClientCertificate(args.cert, args.key) if args.cert is not None else None
    basic = _basic(args)
    if certificate is None and basic is None:
        if required:
            raise CliError("authenticate with --cert/--key, --user/--password, or both")
        return None
    return Credentials(certificate=certificate, basic=basic)


def _basic(args: argparse.Namespace) -> BasicAuth | None:
    has_password = args.password is not None or args.password_file is not None
    if args.user is None:
        if has_password:
            raise CliError("--password needs --user")
        return None
    if not has_password:
        raise CliError("--user needs --password or --password-file")
    try:
        return BasicAuth(args.user, _password(args))
    except ValueError as exc:
        raise CliError(f"--user: {exc}") from exc


def _device_id(args: argparse.Namespace) -> str:
    device_id: str = args.device_id
    if not device_id.strip():
        raise CliError("--device-id must not be empty")
    return device_id


def _device_name(device_id: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])


def _dns_sans(args: argparse.Namespace) -> x509.SubjectAlternativeName | None:
    if not args.san_dns:
        return None
    return x509.SubjectAlternativeName([x509.DNSName(n) for n in args.san_dns])


def _csr_factory(
    key: keys.PrivateKey, *, subject: x509.Name, sans: x509.SubjectAlternativeName | None
) -> CsrFactory:
    """The CSR for ``key``, made once the client knows whether to bind it to the connection."""

    def make(challenge_password: str | None) -> x509.CertificateSigningRequest:
        return build_csr(key, subject=subject, sans=sans, challenge_password=challenge_password)

    return make


def _password(args: argparse.Namespace) -> str:
    if args.password is not None:
        password: str = args.password
        return password
    path: Path = args.password_file
    try:
        return path.read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"cannot read password file {path}: {exc}") from exc


def _load_certificate(path: Path) -> x509.Certificate:
    """The first certificate of a PEM file (the leaf; any chain after it is ignored)."""
    try:
        return certs.load_pem_certificates(path.read_bytes())[0]
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from exc
    except PkiError as exc:
        raise CliError(f"{path}: {exc}") from exc


def _load_key(path: Path) -> keys.PrivateKey:
    try:
        return keys.load_private_key_pem(path.read_bytes())
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from exc
    except PkiError as exc:
        raise CliError(f"{path}: {exc}") from exc


def _write_issued(out: Path, key: keys.PrivateKey, issued: IssuedCertificate, *, pfx: bool) -> None:
    files = [
        OutputFile("key.pem", keys.key_to_pem(key), PRIVATE),
        OutputFile("cert.pem", certs.certs_to_pem([issued.certificate])),
        OutputFile("chain.pem", certs.certs_to_pem(issued.chain)),
        OutputFile("fullchain.pem", certs.certs_to_pem(issued.fullchain)),
    ]
    if pfx:
        friendly = names.common_name(issued.certificate.subject)
        data = pkcs12.serialize_key_and_certificates(
            name=friendly.encode() if friendly else None,
            key=key,
            cert=issued.certificate,
            cas=list(issued.chain) or None,
            encryption_algorithm=NoEncryption(),
        )
        files.append(OutputFile("cert.pfx", data, PRIVATE))
    _write(out, files)


def _write(directory: Path, files: Sequence[OutputFile]) -> None:
    try:
        write_files_atomically(directory, files)
    except OSError as exc:
        raise CliError(f"cannot write to {directory}: {exc.strerror or exc}") from exc


def _summary(verb: str, issued: IssuedCertificate, out: Path) -> str:
    cert = issued.certificate
    return (
        f"{verb} {cert.subject.rfc4514_string()}: serial {certs.serial_hex(cert.serial_number)}, "
        f"not after {cert.not_valid_after_utc.isoformat()}, written to {out}"
    )
