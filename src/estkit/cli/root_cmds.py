"""The offline root's commands: ``root init``, ``root sign-ca``, ``root crl``, ``root show``.

They run on the root's own machine, in the root's own directory (``--dir R``, never a
server's data directory; ``ca/offline.py`` describes it), and need no server extra: a
machine with ``pip install estkit`` (and ``estkit[hsm]`` for a key in a token) is enough.
What they make is carried to the server and installed there with ``estkit ca import``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from estkit.cli.errors import EXIT_CONFIG, EXIT_FAILURE, EXIT_NEEDS_SERVER, CliError
from estkit.cli.pkcs11_options import labels_in_use, pin_env, pkcs11_chosen

if TYPE_CHECKING:
    from cryptography import x509

    from estkit.ca.hsm import TokenKeySpec
    from estkit.ca.keyrefs import TokenKeyRef
    from estkit.ca.offline import RootDirectory
    from estkit.pki.keys import PrivateKey

KEY_TYPES = ("ec-p256", "ec-p384", "rsa-2048", "rsa-3072")
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_KEY_LABEL = re.compile(r"[A-Za-z0-9._-]{1,64}")

INIT_EPILOG = """\
The root's key is made here and never leaves this directory (--signer file:
R/root.key, 0600) or the token (--signer pkcs11: sensitive, never extractable).
R/root.toml says where it is (for a token: module, token and key label, and
where the PIN is read, never the PIN). Carry only root.pem out; compare its
SHA-256 fingerprint, printed here, when `estkit ca import` installs it.

exit status: 0 done; 1 R already holds a root, or the token a key of that label;
  2 bad arguments; 69 python-pkcs11 not installed (estkit[hsm]); 78 the module,
  token, PIN or PIN file does not work.
"""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _duration(text: str) -> dt.timedelta:
    from estkit.durations import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _name(text: str) -> str:
    if not _NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(f"1-64 letters, digits, '-' or '_', got {text!r}")
    return text


def _key_label(text: str) -> str:
    if not _KEY_LABEL.fullmatch(text):
        raise argparse.ArgumentTypeError(f"1-64 letters, digits, '.', '-' or '_', got {text!r}")
    return text


def _serial(text: str) -> str:
    from estkit.pki.certs import parse_serial, serial_hex

    try:
        return serial_hex(parse_serial(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _root_dir(args: argparse.Namespace) -> RootDirectory:
    from estkit.ca.offline import RootDirectory

    root = RootDirectory(args.dir)
    try:
        root.check_not_a_server()
    except ValueError as exc:
        raise CliError(str(exc), exit_code=EXIT_CONFIG) from None
    return root


def _print_cert(cert: x509.Certificate, *, serial: bool = False) -> None:
    """What the operator compares on the root's machine and on the server: the subject,
    (the serial,) the end of validity and the SHA-256 fingerprint."""
    from estkit.pki.certs import fingerprint, serial_hex

    print(f"  subject:     {cert.subject.rfc4514_string()}")
    if serial:
        print(f"  serial:      {serial_hex(cert.serial_number)}")
    print(f"  not after:   {cert.not_valid_after_utc.isoformat()}")
    print(f"  SHA-256:     {fingerprint(cert)}")


def _root_key(root: RootDirectory) -> PrivateKey:
    """The root's key, file or token (its PIN read as root.toml says); exit 78 if it
    cannot be used."""
    if not root.cert_path.exists():
        raise CliError(
            f"{root.cert_path}: not found; `estkit root init --dir {root.path}` makes the root",
            exit_code=EXIT_CONFIG,
        )
    try:
        return root.key(os.environ)
    except ImportError:
        raise CliError(
            "the root's key is in a token: needs python-pkcs11 (pip install 'estkit[hsm]')",
            exit_code=EXIT_NEEDS_SERVER,
        ) from None
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise CliError(f"the root's key: {why}", exit_code=EXIT_CONFIG) from None


# -- root init ---------------------------------------------------------------------------


def _token_ref(args: argparse.Namespace) -> TokenKeyRef | None:
    """The token the root's key is made in, from the options (None: a key file)."""
    from estkit.ca.keyrefs import TokenKeyRef

    use_existing = args.use_existing_key or None
    if not pkcs11_chosen(
        args, own=(("--key-label", args.key_label), ("--use-existing-key", use_existing))
    ):
        return None
    return TokenKeyRef(
        module=args.pkcs11_module.absolute(),
        token_label=args.token_label,
        key_label=args.key_label or "root",
        pin_file=None if args.pin_file is None else args.pin_file.absolute(),
        pin_env=args.pin_env,
        field="root",
    )


def cmd_root_init(args: argparse.Namespace) -> int:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    from estkit.ca.files import write_atomic
    from estkit.ca.offline import RootSettings, RootState
    from estkit.ca.setup import CaKeyStore, FileKeyStore, TokenKeyStore
    from estkit.pki.certs import certs_to_pem
    from estkit.pki.profiles import issue_ca

    root = _root_dir(args)
    ref = _token_ref(args)
    for existing in (root.cert_path, root.settings_path):
        if existing.exists():
            raise CliError(
                f"{existing} exists: {root.path} holds a root already, and estkit never "
                "replaces one (`estkit root show --dir` shows it)"
            )
    keys: CaKeyStore
    if ref is not None:
        keys = TokenKeyStore(_token_spec(ref, use_existing=args.use_existing_key))
        settings = RootSettings(signer="pkcs11", token=ref)
    else:
        keys = FileKeyStore(root.path / "root.key")
        settings = RootSettings(signer="file", key_file=root.path / "root.key")
    root.path.mkdir(parents=True, exist_ok=True)
    root.path.chmod(0o700)
    try:
        key, where = keys.new("root", args.key_type)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, args.organization),
            x509.NameAttribute(NameOID.COMMON_NAME, args.common_name),
        ]
    )
    cert = issue_ca(
        subject=subject,
        public_key=key.public_key(),
        issuer=None,
        issuer_key=key,
        validity=args.validity,
        now=_now(),
        path_length=1,
    )
    keys.keep(key)
    write_atomic(root.cert_path, certs_to_pem([cert]))
    write_atomic(root.settings_path, settings.to_toml(root.path).encode(), mode=0o600)
    root.save_state(RootState())
    print(f"root CA: created {root.cert_path} ({where})")
    _print_cert(cert)
    print(
        f"Carry {root.cert_path} to the server (the devices' trust anchor); {root.path} stays "
        "here. Next: `estkit root sign-ca` for each request of `estkit server init "
        "--offline-root`, and `estkit root crl`."
    )
    return 0


def _token_spec(ref: TokenKeyRef, *, use_existing: bool) -> TokenKeySpec:
    """The root key's place in its token, once the PIN reads, the token takes it and (unless
    ``use_existing``) no key there has the label; each refused in one line."""
    from estkit.ca.keyrefs import token_key_spec

    assert ref.key_label is not None
    taken = labels_in_use(ref, [ref.key_label])
    if taken and not use_existing:
        raise CliError(
            f"token {ref.token_label!r} already holds a key labelled {ref.key_label!r}, and "
            "estkit never replaces a token key; nothing written: choose another --key-label, "
            "or make the root from that key (--use-existing-key)",
            exit_code=EXIT_FAILURE,
        )
    return token_key_spec("root", ref, os.environ)


# -- root sign-ca --------------------------------------------------------------------------


def cmd_root_sign_ca(args: argparse.Namespace) -> int:
    from estkit.ca.files import write_atomic
    from estkit.ca.offline import load_request, sign_ca
    from estkit.pki.certs import certs_to_pem

    root = _root_dir(args)
    try:
        data = args.csr.read_bytes()
    except OSError as exc:
        raise CliError(f"--csr {args.csr}: {exc.strerror or exc}") from None
    try:
        csr = load_request(data)
    except ValueError as exc:
        raise CliError(f"--csr {args.csr}: {exc}") from None
    key = _root_key(root)
    try:
        cert = sign_ca(csr, root=root.cert(), root_key=key, validity=args.validity, now=_now())
    except ValueError as exc:
        raise CliError(f"--csr {args.csr}: {exc}") from None
    kept = root.record(args.name, cert)
    write_atomic(args.out, certs_to_pem([cert]))
    print(f"{args.name} CA: signed {args.out} (a copy in {kept})")
    _print_cert(cert, serial=True)
    print(
        f"Carry {args.out} to the server: estkit ca import --data-dir D "
        f"--cert {args.name}={args.out.name}"
    )
    return 0


# -- root crl ----------------------------------------------------------------------------


def cmd_root_crl(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives.serialization import Encoding

    from estkit.ca.files import write_atomic

    root = _root_dir(args)
    key = _root_key(root)
    now = _now()
    try:
        crl = root.sign_crl(
            key=key,
            revoke=[(serial, args.reason) for serial in args.revoke],
            validity=args.validity,
            now=now,
        )
    except ValueError as exc:
        raise CliError(f"--revoke {exc}") from None
    write_atomic(args.out, crl.public_bytes(Encoding.DER))
    number = root.state().crl_number
    revoked = len(list(crl))
    assert crl.next_update_utc is not None  # build_crl sets it
    print(
        f"root CRL: signed {args.out} (DER), number {number}, {revoked} revoked, "
        f"next update {crl.next_update_utc.isoformat()}"
    )
    print(
        f"Carry {args.out} to the server: estkit ca import --data-dir D --root-crl "
        f"{args.out.name}; sign the next one before its next update"
    )
    return 0


# -- root show ---------------------------------------------------------------------------


def cmd_root_show(args: argparse.Namespace) -> int:
    from estkit.pki.certs import fingerprint, serial_hex

    root = _root_dir(args)
    try:
        settings = root.settings()
        cert = root.cert()
        state = root.state()
        signed = root.signed()
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise CliError(f"{root.path}: {why}", exit_code=EXIT_CONFIG) from None
    shown: dict[str, Any] = {
        "root": {
            "subject": cert.subject.rfc4514_string(),
            "not_after": cert.not_valid_after_utc.isoformat(),
            "fingerprint_sha256": fingerprint(cert),
            "signer": settings.signer,
            "key": settings.describe(),
        },
        "crl_number": state.crl_number,
        "signed": [
            {
                "name": s.name,
                "serial": serial_hex(s.cert.serial_number),
                "subject": s.cert.subject.rfc4514_string(),
                "not_after": s.cert.not_valid_after_utc.isoformat(),
                "revoked": None
                if s.revoked is None
                else {"at": s.revoked.revoked_at.isoformat(), "reason": s.revoked.reason},
            }
            for s in signed
        ],
    }
    if args.json:
        print(json.dumps(shown, indent=2))
        return 0
    print(f"root CA {root.cert_path} ({shown['root']['key']})")
    _print_cert(cert)
    print(
        f"  last CRL:    number {state.crl_number}" if state.crl_number else "  last CRL:    none"
    )
    for entry in shown["signed"]:
        revoked = entry["revoked"]
        state_text = f"revoked {revoked['at']} ({revoked['reason']})" if revoked else "valid"
        print(
            f"signed {entry['name'] or '?'}: {entry['serial']}  {entry['subject']}  "
            f"until {entry['not_after']}  {state_text}"
        )
    return 0


def register(sub: Any) -> None:
    from estkit.pki.revocation import REASONS

    root = sub.add_parser(
        "root",
        help="the offline root, on its own machine: make it, sign CA certificates and its CRL",
    ).add_subparsers(dest="root_command", required=True, metavar="ACTION")

    def dir_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--dir",
            type=Path,
            required=True,
            metavar="R",
            help="the root's directory (never a server's data directory)",
        )

    p = root.add_parser(
        "init",
        help="make the root's key and self-signed certificate",
        epilog=INIT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    dir_arg(p)
    p.add_argument("--key-type", choices=KEY_TYPES, default="ec-p256", help="default %(default)s")
    p.add_argument("--organization", default="estkit", help="O= of the root's name")
    p.add_argument("--common-name", default="estkit Root CA", help="CN= of the root's name")
    p.add_argument(
        "--validity", type=_duration, default=_duration("20y"), metavar="D", help="default 20y"
    )
    token = p.add_argument_group("the root's key in a PKCS#11 token (the estkit[hsm] extra)")
    token.add_argument("--signer", choices=("file", "pkcs11"), default="file")
    token.add_argument("--pkcs11-module", type=Path, metavar="LIB")
    token.add_argument("--token-label", metavar="LABEL")
    token.add_argument("--pin-file", type=Path, metavar="FILE", help="0600 or 0400")
    token.add_argument("--pin-env", type=pin_env, metavar="VAR")
    token.add_argument("--key-label", type=_key_label, metavar="LABEL", help="default root")
    token.add_argument(
        "--use-existing-key",
        action="store_true",
        default=None,
        help="make the root from the key the token holds under that label",
    )
    p.set_defaults(handler=cmd_root_init)

    p = root.add_parser(
        "sign-ca",
        help="sign an issuing CA's certificate from its request",
        description="Sign an issuing CA certificate for the subject and key of a request "
        "(`estkit server init --offline-root` writes them): CA:TRUE pathlen 0, keyCertSign "
        "and cRLSign, subject and authority key identifiers; the request's extensions are "
        "ignored. The root keeps a copy in R/issued/.",
    )
    dir_arg(p)
    p.add_argument("--csr", type=Path, required=True, metavar="FILE", help="PEM or DER")
    p.add_argument(
        "--name", type=_name, required=True, help="the CA it is for: devices, bootstrap, ..."
    )
    p.add_argument("--out", type=Path, required=True, metavar="FILE", help="PEM certificate")
    p.add_argument(
        "--validity",
        type=_duration,
        default=_duration("15y"),
        metavar="D",
        help="default 15y, never past the root's",
    )
    p.set_defaults(handler=cmd_root_sign_ca)

    p = root.add_parser(
        "crl",
        help="sign the root's CRL, for a long period",
        description="Sign the root's next CRL (DER), listing every CA certificate revoked "
        "so far and those of --revoke; its CRL number is kept in R and only increases. "
        "The server serves the imported CRL and warns in its log from 30 days before its "
        "next update.",
    )
    dir_arg(p)
    p.add_argument("--out", type=Path, required=True, metavar="FILE")
    p.add_argument(
        "--validity",
        type=_duration,
        default=_duration("365d"),
        metavar="D",
        help="until its next update (default 365d)",
    )
    p.add_argument(
        "--revoke",
        type=_serial,
        action="append",
        default=[],
        metavar="SERIAL",
        help="a CA certificate the root signed (hex serial); repeatable",
    )
    p.add_argument("--reason", choices=tuple(REASONS), default="unspecified")
    p.set_defaults(handler=cmd_root_crl)

    p = root.add_parser("show", help="the root, its last CRL number and what it signed")
    dir_arg(p)
    p.add_argument("--json", action="store_true", help="as JSON")
    p.set_defaults(handler=cmd_root_show)
