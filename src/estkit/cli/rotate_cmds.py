"""``estkit ca rotate``: an issuing CA's next generation, issuing from a chosen moment.

The new generation (``devices-2``, ``devices-3``, …) gets a new key where the one it
replaces keeps its key (a file beside its certificate, or the same PKCS#11 token) and
a certificate from the same root; with an offline root, a certification request to
carry to the root's machine, and ``estkit ca import`` installs what it signed. A
``[cas.<new>]`` table with ``replaces`` and ``issues_from`` is added to estkit.toml.
Nothing is replaced: the old generation keeps authenticating its devices and signing
its CRL until its certificates have expired (README: "Rotating an issuing CA").
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import stat
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from estkit.cli.errors import EXIT_CONFIG, EXIT_TEMPFAIL, CliError

if TYPE_CHECKING:
    from cryptography import x509

    from estkit.ca.setup import CaKeyStore
    from estkit.server.config import CaConfig, ServerConfig

EXIT_USAGE = 2
DEFAULT_ISSUES_IN = "7d"

EPILOG = (
    "exit status: 0 the new generation is made (the next steps are printed); 1 refused "
    "(the line says why; nothing written); 2 bad arguments; 75 made and configured, but "
    "the audit log could not record it (the line says so); 78 the config, a CA key or its "
    "token does not work"
)


def register_rotate(ca: Any, data_dir_arg: Any, command: Any) -> None:
    """Add ``ca rotate`` to the ``ca`` subcommands."""
    p = ca.add_parser(
        "rotate",
        help="make an issuing CA's next generation (new key and certificate), issuing "
        "from --issues-from",
        description="Make the next generation of an issuing CA (devices, bootstrap or "
        "another label's CA): a new key, kept where the current one is (file or token), "
        "a new name (devices-2, devices-3, …) and a certificate from the same root "
        "(with an offline root: a request to sign there). From --issues-from on, new "
        "certificates come from it and /cacerts answers its chain; certificates of the "
        "old generation still authenticate their devices and keep their CRL until they "
        "expire. Restart every node before then. README: Rotating an issuing CA.",
        epilog=EPILOG,
    )
    data_dir_arg(p)
    p.add_argument("ca", help="the CA to rotate: devices, bootstrap (or another label's CA)")
    p.add_argument(
        "--issues-from",
        default=DEFAULT_ISSUES_IN,
        metavar="WHEN",
        help="when the new generation starts issuing: a date and time with its offset "
        "(2027-01-15T00:00:00Z) or a duration from now (7d, 12h; now or 0s for at once; "
        f"default {DEFAULT_ISSUES_IN}): time to upload and verify it at IoT Hub and to "
        "restart every node",
    )
    p.add_argument("--common-name", help="the new CA's CN (default: the current one's + ' G<n>')")
    command(p, cmd_ca_rotate)


def cmd_ca_rotate(args: argparse.Namespace) -> int:
    from estkit.ca.generations import generation_name
    from estkit.ca.rotation import check_switch, successor_subject
    from estkit.pki.certs import load_pem_certificates
    from estkit.pki.keys import key_type_of
    from estkit.server.config import CONFIG_NAME, ConfigError, load_config

    now = dt.datetime.now(dt.UTC)
    issues_from = _when(args.issues_from, now)
    try:
        config = load_config(args.data_dir)
    except ConfigError as exc:
        raise CliError(str(exc), exit_code=EXIT_CONFIG) from None
    current = _newest_generation(config, args.ca, now)
    if not current.cert.exists():
        raise CliError(
            f"{current.name}: its certificate {current.cert} is not installed yet "
            f"(`estkit ca import --cert {current.name}=FILE`); rotate it once it is"
        )
    replaced = load_pem_certificates(current.cert.read_bytes())[0]
    try:
        check_switch(replaced, issues_from, now=now)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    family = _family(config, current.name)
    name = generation_name(family, set(config.cas))
    number = int(name.rsplit("-", 1)[1])
    subject = successor_subject(replaced.subject, number)
    if args.common_name:
        subject = _with_cn(subject, args.common_name)
    _check_subject_unused(config, subject)
    new = _new_ca_config(config, current, name, issues_from)
    if leftovers := [p for p in (new.cert, new.key_file) if p is not None and p.exists()]:
        shown = " and ".join(_shown(p, config) for p in leftovers)
        raise CliError(
            f"{shown} exist(s) without a [cas.{name}] table: a rotation stopped half way; "
            "move them away and run it again"
        )
    table = _table(config, new)
    text = (args.data_dir / CONFIG_NAME).read_text()
    updated = text.rstrip("\n") + "\n\n" + table
    _check_config(updated, args.data_dir)

    keys = _key_store(new)
    offline = config.cas["root"].offline
    try:
        key, where = keys.new(name, key_type_of(replaced.public_key()))
    except ValueError as exc:
        raise CliError(str(exc), exit_code=EXIT_CONFIG) from None
    said = (
        _request(new, key, subject, where)
        if offline
        else _certify(config, new, key, keys, replaced, subject, where, now)
    )
    from estkit.ca.files import write_atomic

    config_path = args.data_dir / CONFIG_NAME
    write_atomic(config_path, updated.encode(), mode=stat.S_IMODE(config_path.stat().st_mode))
    _owned_like(args.data_dir, [config_path, *_written(new)])
    print(said)
    print(
        f"config: [cas.{name}] added to {args.data_dir / CONFIG_NAME}: replaces "
        f"{current.name}, issues from {issues_from.isoformat()}"
    )
    _audit(config, new, current.name, issues_from, subject, where)
    _print_next_steps(args, config, name, current.name, issues_from, offline)
    return 0


def _written(ca: CaConfig) -> list[Path]:
    from estkit.ca.setup import request_path

    paths = [ca.cert, request_path(ca.cert)]
    if ca.key_file is not None:
        paths.append(ca.key_file)
    return [p for p in paths if p.exists()]


def _owned_like(data_dir: Path, paths: list[Path]) -> None:
    """Run as root on a data directory the service user owns (deploy/: `User=estkit`),
    the files made here get the directory's owner: a server that cannot read its config
    or its new CA's key would not start at the restart this rotation asks for."""
    if os.geteuid() != 0:
        return
    owner = data_dir.stat()
    for path in paths:
        os.chown(path, owner.st_uid, owner.st_gid, follow_symlinks=False)


def _when(value: str, now: dt.datetime) -> dt.datetime:
    from estkit.durations import parse_duration

    now = now.replace(microsecond=0)  # as estkit.toml writes it
    if value == "now":
        return now
    try:
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        try:
            return now + parse_duration(value, allow_zero=True)
        except ValueError:
            raise CliError(
                f"--issues-from: a date and time with its offset (2027-01-15T00:00:00Z) or a "
                f"duration (7d, 0s) or now, got {value!r}",
                exit_code=EXIT_USAGE,
            ) from None
    if moment.tzinfo is None:
        raise CliError(
            f"--issues-from: {value!r} has no offset; add Z or +HH:MM", exit_code=EXIT_USAGE
        )
    moment = moment.astimezone(dt.UTC).replace(microsecond=0)
    if moment < now:
        raise CliError(
            f"--issues-from: {moment.isoformat()} has passed; give a later moment, or `now` "
            "to switch at once",
            exit_code=EXIT_USAGE,
        )
    return moment


def _family(config: ServerConfig, name: str) -> str:
    from estkit.ca.generations import family_names

    return family_names({n: c.generation.replaces for n, c in config.cas.items()}).get(name, name)


def _newest_generation(config: ServerConfig, wanted: str, now: dt.datetime) -> CaConfig:
    """The newest generation of ``wanted``'s family; refused for the root, an unknown
    CA, or a family whose last rotation has not switched yet."""
    from estkit.ca.generations import family_names

    families = family_names({n: c.generation.replaces for n, c in config.cas.items()})
    family = families.get(wanted)
    if family is None and wanted in families.values():
        family = wanted
    if family is None:
        raise CliError(f"unknown CA {wanted!r}; configured: {', '.join(config.cas)}")
    if family == "root":
        raise CliError(
            "the root is not rotated this way: devices must trust a new root before they "
            "meet it; rotate the issuing CAs under it (devices, bootstrap)"
        )
    members = [n for n, f in families.items() if f == family]
    replaced = {config.cas[n].generation.replaces for n in members}
    newest = [n for n in members if n not in replaced]
    current = config.cas[newest[0]]
    start = current.generation.issues_from
    if start is not None and start > now:
        raise CliError(
            f"{family}: {current.name} replaces {current.generation.replaces} from "
            f"{start.isoformat()} already; rotate again once it issues"
        )
    return current


def _with_cn(subject: x509.Name, cn: str) -> x509.Name:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    if not cn.strip() or len(cn) > 64:
        raise CliError("--common-name: 1-64 characters", exit_code=EXIT_USAGE)
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn) if a.oid == NameOID.COMMON_NAME else a
            for a in subject
        ]
    )


def _check_subject_unused(config: ServerConfig, subject: x509.Name) -> None:
    """Two CAs of one name with different keys leave relying parties guessing."""
    from estkit.pki.certs import load_pem_certificates

    for name, ca in config.cas.items():
        if ca.cert.exists() and load_pem_certificates(ca.cert.read_bytes())[0].subject == subject:
            raise CliError(
                f"{subject.rfc4514_string()} is CA {name}'s name already; give the new "
                "generation another --common-name"
            )


def _new_ca_config(
    config: ServerConfig, current: CaConfig, name: str, issues_from: dt.datetime
) -> CaConfig:
    """The new generation's settings: its files beside the current one's, its token key
    in the same token (labelled after the current one's label, generation number on)."""
    from estkit.ca.generations import Generation

    ca_dir = current.cert.parent
    generation = Generation(replaces=current.name, issues_from=issues_from)
    token = current.token
    if token is not None:
        old = token.key_label or current.name
        label = old[: -len(current.name)] + name if old.endswith(current.name) else name
        token = replace(token, key_label=label, key_id=None, field=f"cas.{name}")
    return replace(
        current,
        name=name,
        cert=ca_dir / f"{name}.pem",
        key_file=None if current.key_file is None else ca_dir / f"{name}.key",
        token=token,
        generation=generation,
    )


def _shown(path: Path, config: ServerConfig) -> str:
    from estkit.server.wiring import shown_path

    return shown_path(path, config.data_dir)


def _toml_string(value: object) -> str:
    """A TOML basic string (JSON's escapes are TOML's; characters beyond the BMP as is)."""
    return json.dumps(str(value), ensure_ascii=False)


def _table(config: ServerConfig, ca: CaConfig) -> str:
    """The ``[cas.<name>]`` table of the new generation, as estkit.toml spells it."""
    assert ca.generation.issues_from is not None
    lines = [
        f"# {ca.name} replaces {ca.generation.replaces} (`estkit ca rotate`, "
        f"{dt.datetime.now(dt.UTC).date().isoformat()})",
        f"[cas.{ca.name}]",
        f"cert = {_toml_string(_shown(ca.cert, config))}",
    ]
    if ca.token is not None:
        ref = ca.token
        lines += [
            'signer = "pkcs11"',
            f"module = {_toml_string(str(ref.module))}",
            f"token_label = {_toml_string(ref.token_label)}",
            f"key_label = {_toml_string(ref.key_label)}",
        ]
        if ref.pin_file is not None:
            lines.append(f"pin_file = {_toml_string(_shown(ref.pin_file, config))}")
        else:
            lines.append(f"pin_env = {_toml_string(ref.pin_env)}")
    else:
        assert ca.key_file is not None
        lines += [f"key = {_toml_string(_shown(ca.key_file, config))}", 'signer = "file"']
    lines += [
        f"replaces = {_toml_string(ca.generation.replaces)}",
        f"issues_from = {ca.generation.issues_from.strftime('%Y-%m-%dT%H:%M:%SZ')}",
    ]
    return "\n".join(lines) + "\n"


def _check_config(text: str, data_dir: Path) -> None:
    import tomllib

    from estkit.server.config import ConfigError, parse_config

    try:
        parse_config(tomllib.loads(text), data_dir)
    except (ConfigError, tomllib.TOMLDecodeError) as exc:
        raise CliError(f"the new table would not parse: {exc}", exit_code=EXIT_CONFIG) from None


def _key_store(ca: CaConfig) -> CaKeyStore:
    from estkit.ca.setup import FileKeyStore, TokenKeyStore
    from estkit.ca.signers import token_key_spec

    if ca.token is None:
        assert ca.key_file is not None
        return FileKeyStore(ca.key_file)
    try:
        return TokenKeyStore(token_key_spec(ca.name, ca.token, os.environ))
    except ValueError as exc:
        raise CliError(str(exc), exit_code=EXIT_CONFIG) from None


def _certify(
    config: ServerConfig,
    new: CaConfig,
    key: Any,
    keys: CaKeyStore,
    replaced: x509.Certificate,
    subject: x509.Name,
    where: str,
    now: dt.datetime,
) -> str:
    """The new generation's certificate from the root, whose key is here."""
    from estkit.ca.files import write_atomic
    from estkit.ca.rotation import issue_successor
    from estkit.ca.signers import load_cas
    from estkit.pki.certs import certs_to_pem, fingerprint

    try:
        root = load_cas({"root": config.cas["root"]}, environ=os.environ, now=now)["root"]
        cert = issue_successor(
            replaced=replaced,
            subject=subject,
            public_key=key.public_key(),
            root=root.cert,
            root_key=root.key,
            now=now,
        )
    except ValueError as exc:
        raise CliError(str(exc), exit_code=EXIT_CONFIG) from None
    keys.keep(key)
    write_atomic(new.cert, certs_to_pem([cert]))
    return (
        f"{new.name} CA: created {_shown(new.cert, config)} ({where}), "
        f"{subject.rfc4514_string()}, until {cert.not_valid_after_utc.isoformat()}, "
        f"SHA-256 {fingerprint(cert)}"
    )


def _request(new: CaConfig, key: Any, subject: x509.Name, where: str) -> str:
    """With an offline root: the new generation's certification request, to sign there."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    from estkit.ca.files import write_atomic
    from estkit.ca.setup import FileKeyStore, request_path
    from estkit.pki.keys import signature_hash

    csr = (
        x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, signature_hash(key))
    )
    if isinstance(new_store := _key_store(new), FileKeyStore):
        new_store.keep(key)
    path = request_path(new.cert)
    write_atomic(path, csr.public_bytes(Encoding.PEM))
    return f"{new.name} CA: {where}, request {path} created, to be signed by the offline root"


def _audit(
    config: ServerConfig,
    new: CaConfig,
    old: str,
    issues_from: dt.datetime,
    subject: x509.Name,
    where: str,
) -> None:
    from estkit.cli.server_cmds import _operator
    from estkit.store import AuditEvent, SqlStore
    from estkit.store.errors import StoreError

    store = SqlStore.open(config.database_url)
    try:
        store.check_schema()
        store.audit(
            AuditEvent(
                at=dt.datetime.now(dt.UTC),
                actor=_operator(),
                action="ca-rotate",
                outcome="ok",
                detail=f"{new.name} ({subject.rfc4514_string()}) replaces {old} from "
                f"{issues_from.isoformat()}; {where}{_fingerprint(new)}",
            )
        )
    except StoreError as exc:
        raise CliError(
            f"{new.name} is made and configured, but the audit log could not record it ({exc}); "
            "note the rotation by hand",
            exit_code=EXIT_TEMPFAIL,
        ) from None
    finally:
        store.close()


def _fingerprint(ca: CaConfig) -> str:
    from estkit.pki.certs import fingerprint, load_pem_certificates

    if not ca.cert.exists():
        return "; certificate to be signed by the offline root"
    return f"; SHA-256 {fingerprint(load_pem_certificates(ca.cert.read_bytes())[0])}"


def _print_next_steps(
    args: argparse.Namespace,
    config: ServerConfig,
    name: str,
    old: str,
    issues_from: dt.datetime,
    offline: bool,
) -> None:
    d = args.data_dir
    steps = []
    if offline:
        steps.append(
            f"carry ca/{name}.csr to the root's machine: `estkit root sign-ca --dir R --name "
            f"{name} --csr {name}.csr --out {name}.pem`; "
            f"here: `estkit ca import --data-dir {d} --cert {name}={name}.pem` (until then "
            f"{old} goes on issuing)"
        )
    steps += [
        f"IoT Hub: upload {name}.pem (`estkit ca chain --data-dir {d} --ca {name}`), then "
        f"`estkit ca iothub-verify --data-dir {d} --ca {name} --code CODE --out verify.pem` "
        "and upload verify.pem",
        f"restart the server on every node before {issues_from.isoformat()} (each node "
        f"needs the [cas.{name}] table and {name}'s certificate and key)",
        f"from then on devices get {name} certificates when they renew; {old} keeps "
        "authenticating its devices and signing its CRL until its certificates expire; "
        f"remove {old} from IoT Hub after that",
    ]
    print("next:")
    for i, step in enumerate(steps, 1):
        print(f"  {i}. {step}")
