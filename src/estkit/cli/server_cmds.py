"""Server-side commands: ``server``, ``ca``, ``device``, ``cert``, ``token``, ``audit``, …

They need ``estkit[server]``; imports of server modules happen inside the
handlers so that a device-only install still starts the CLI, and each handler
first checks that the extra is installed (one line saying so, exit 69).
"""

from __future__ import annotations

import argparse
import datetime as dt
import errno
import functools
import getpass
import importlib.util
import os
import re
import socket
import stat
import sys
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from estkit.cli.errors import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_LISTEN,
    EXIT_NEEDS_SERVER,
    EXIT_TEMPFAIL,
    SERVER_EXTRA,
    CliError,
)
from estkit.cli.pkcs11_options import labels_in_use, pin_env, pkcs11_chosen
from estkit.fileio import PRIVATE, PUBLIC

if TYPE_CHECKING:
    from cryptography import x509

    from estkit.ca.authority import Authority
    from estkit.ca.errors import CaError
    from estkit.ca.setup import CaKeyStore
    from estkit.ca.signers import TokenKeyRef
    from estkit.server.config import ServerConfig
    from estkit.store import SqlStore

DEFAULT_DATA_DIR = Path("var/estkit")
DEFAULT_PORT = 8443  # as server/config.py, which a device-only install cannot import
KEY_TYPES = ("ec-p256", "ec-p384", "rsa-2048", "rsa-3072")
EXIT_USAGE = 2  # as argparse's own refusals
# The top-level modules of the ``server`` extra (pyproject.toml) and what they pull in.
SERVER_MODULES = (
    "sqlalchemy",
    "alembic",
    "fastapi",
    "starlette",
    "fastapi_offline",
    "uvicorn",
    "httptools",
    "OpenSSL",
    "jwt",
)

Handler = Callable[[argparse.Namespace], int]


def _missing_server_module() -> str | None:
    for name in SERVER_MODULES:
        try:
            if importlib.util.find_spec(name) is None:
                return name
        except (ImportError, ValueError):  # a broken or blocked install is a missing one
            return name
    return None


def _needs_server(command: str, handler: Handler) -> Handler:
    """``handler``, refused in one line when ``estkit[server]`` is not installed."""

    def refusal(module: str) -> CliError:
        return CliError(
            f"{command} needs the server side of estkit, which is not installed "
            f"(no module {module!r}): {SERVER_EXTRA}",
            exit_code=EXIT_NEEDS_SERVER,
        )

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        if (missing := _missing_server_module()) is not None:
            raise refusal(missing)
        try:
            return handler(args)
        except ModuleNotFoundError as exc:
            module = (exc.name or "").partition(".")[0]
            if module in SERVER_MODULES:
                raise refusal(module) from None
            raise

    return run


def _command(p: argparse.ArgumentParser, handler: Handler) -> None:
    p.set_defaults(handler=_needs_server(p.prog, handler))


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _operator() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"cli:{user}@{socket.gethostname()}"


def _data_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help=f"server data directory (default {DEFAULT_DATA_DIR})",
    )


def _load(args: argparse.Namespace) -> ServerConfig:
    from estkit.server.config import ConfigError, load_config

    try:
        return load_config(args.data_dir)
    except ConfigError as exc:
        raise CliError(str(exc), exit_code=EXIT_CONFIG) from None


def _authority(args: argparse.Namespace) -> Authority[SqlStore]:
    from estkit.server.config import ConfigError
    from estkit.server.wiring import build_authority, open_store
    from estkit.store.errors import SchemaError

    config = _load(args)
    try:
        return build_authority(config, open_store(config), environ=os.environ)
    except ConfigError as exc:  # a CA key, token or PIN that does not work
        raise CliError(str(exc), exit_code=EXIT_CONFIG) from None
    except SchemaError as exc:
        raise CliError(str(exc)) from None


def _ca_error(exc: CaError, *, hint: str = "") -> CliError:
    """A refusal as one line: its reason (and what would make it pass), its exit code."""
    from estkit.ca.errors import Code, Refusal

    if not isinstance(exc, Refusal):
        return CliError(str(exc))
    later = exc.code in (Code.UNAVAILABLE, Code.RATE_LIMITED) or exc.retry_after is not None
    return CliError(f"{exc.reason}{hint}", exit_code=EXIT_TEMPFAIL if later else 1)


def _key_label_prefix(value: str) -> str:
    if not _KEY_LABEL_PREFIX.fullmatch(value):
        raise argparse.ArgumentTypeError(f"1-32 letters, digits, '.', '-' or '_', got {value!r}")
    return value


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {value!r}") from None
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"expected a port 1-65535, got {port}")
    return port


# -- server ------------------------------------------------------------------------


def cmd_server_init(args: argparse.Namespace) -> int:
    import json
    import tomllib

    from estkit.ca.files import write_atomic
    from estkit.ca.setup import create_pki, prepare_offline_pki
    from estkit.cli import audit_cmds
    from estkit.server.config import CONFIG_NAME, DEFAULT_CONFIG, ConfigError, parse_config
    from estkit.server.portal.session import load_or_create_key
    from estkit.store import SqlStore

    data_dir: Path = args.data_dir
    token = _token_options(args)
    if args.join is not None:
        if args.signer is not None or args.offline_root:
            raise CliError(
                "--join: the CAs and their keys are the joined node's ([cas.*] of its "
                "config); leave out --signer, --offline-root and the token options",
                exit_code=EXIT_USAGE,
            )
        return _join(args)
    if args.crl_url is not None:
        raise CliError(
            "--crl-url: only with --join (a first node's is crl.url in its config)",
            exit_code=EXIT_USAGE,
        )
    _check_not_a_root_dir(data_dir)
    config_path = data_dir / CONFIG_NAME
    if config_path.exists():
        existing = _load(args)
        if args.offline_root and not existing.cas["root"].offline:
            raise CliError(
                f"{config_path} exists and its root's key is on this server "
                f"(cas.root.signer = {existing.cas['root'].signer!r}): --offline-root applies "
                "only when init writes a new config",
                exit_code=EXIT_CONFIG,
            )
        if args.signer is not None:
            _check_signer_unchanged(existing, token, config_path)
        data_dir.chmod(0o700)
        changes = [
            c for c in (_update_ports(args, config_path), _update_database(args, config_path)) if c
        ]
        print(
            f"config: {', '.join(changes)} ({config_path})"
            if changes
            else f"config: exists ({config_path}), unchanged"
        )
    else:
        port = DEFAULT_PORT if args.port is None else args.port
        public_host = args.hostname[0] if args.hostname else "localhost"
        text = DEFAULT_CONFIG.format(
            port=port,
            public_host=public_host,
            crl_port=args.crl_port or port + 1,
        )
        if args.database_url is not None:
            url = json.dumps(args.database_url)
            edited = _set_toml_value(text, "database", "url", lambda _: url, insert=True)
            assert edited is not None  # the template has a [database] section
            text = edited
        text = _node_settings(text, args)
        if args.offline_root:
            text = _offline_root_config(text)
        if token is not None:
            text = _token_cas(text, token)
        try:  # nothing written that the next command would refuse
            parse_config(tomllib.loads(text), data_dir)
        except ConfigError as exc:
            raise CliError(str(exc), exit_code=EXIT_CONFIG) from None
        if token is not None:  # nor when the token would refuse
            _check_token(token, use_existing=args.use_existing_keys, offline_root=args.offline_root)
        data_dir.mkdir(parents=True, exist_ok=True)
        data_dir.chmod(0o700)
        write_atomic(config_path, text.encode(), mode=0o600)
        print(f"config: created {config_path}")
    config = _load(args)
    offline = config.cas["root"].offline
    # An offline root's issuing CAs get requests for it to sign, not certificates.
    make_pki = prepare_offline_pki if offline else functools.partial(create_pki, now=_now())
    try:
        report = make_pki(
            cas=_key_stores(config),
            tls_cert=config.tls_cert,
            tls_key=config.tls_key,
            hostnames=args.hostname,
            key_type=args.key_type,
            organization=args.organization,
        )
    except ValueError as exc:  # a CA key or PIN that the config names but cannot be used
        raise CliError(str(exc), exit_code=EXIT_CONFIG) from None
    for line in report:
        print(line)
    db_file = _sqlite_file(config.database_url)
    if db_file is not None and not db_file.exists():
        # Holds secret hashes: private from the first byte (SQLite's -wal/-shm files follow it).
        db_file.touch(mode=0o600)
    store = SqlStore.open(config.database_url)
    try:
        store.migrate()
    finally:
        store.close()
    print(f"database: schema up to date ({config.database_url.split('://')[0]})")
    audit_cmds.make_audit_key(data_dir)
    load_or_create_key(data_dir)  # the portal's session key, for `--join` to copy
    if offline:
        _print_offline_steps(config)
    return 0


# -- server init --offline-root, ca import ------------------------------------------------

OFFLINE_EPILOG = """An offline root (--offline-root): the root's key is never on this server. init
makes the devices and bootstrap CAs' keys here (files, or in the token with
--signer pkcs11) and their certification requests (ca/devices.csr,
ca/bootstrap.csr), writes [cas.root] with signer = "offline", and prints what
to carry where: the requests to the root's machine (`estkit root sign-ca`), the
signed certificates, root.pem and the root's CRL (`estkit root crl`) back, for
`estkit ca import`. Until then `estkit server run` refuses (exit 78). The TLS
server certificate is issued by the bootstrap CA at import, for the key and
names of tls/server.csr.
"""


def _offline_root_config(text: str) -> str:
    """``text`` (the config template) with the root as certificate and CRL only."""
    root = 'cert = "ca/root.pem"\nkey = "ca/root.key"\nsigner = "file"\n'
    tls = (
        "# The server's certificate chain and key. `server init` issues one under the\n"
        "# estkit root, so the one trust anchor a device gets verifies the server too;\n"
    )
    assert text.count(root) == 1 and text.count(tls) == 1  # the template's
    text = text.replace(
        root,
        'cert = "ca/root.pem"\n'
        "# Offline: the root's key is on another machine. `estkit ca import` installs\n"
        "# its certificate and its CRL (signed there, served here, never signed here).\n"
        'signer = "offline"\n'
        'crl = "ca/root.crl"\n',
    )
    return text.replace(
        tls,
        "# The server's certificate chain and key. `estkit ca import` issues one from the\n"
        "# bootstrap CA (the root is offline), so a device's trust anchor verifies it too;\n",
    )


def _check_not_a_root_dir(data_dir: Path) -> None:
    from estkit.ca.offline import SETTINGS

    if (data_dir / SETTINGS).exists():
        raise CliError(
            f"--data-dir: {data_dir} holds an offline root ({SETTINGS}); the server's data "
            "directory is another, on another machine",
            exit_code=EXIT_CONFIG,
        )


def _print_offline_steps(config: ServerConfig) -> None:
    """What to carry to the offline root's machine, what to run there, and what to bring
    back; or that all is imported."""
    from estkit.ca.setup import request_path
    from estkit.server.wiring import offline_root_pending

    if offline_root_pending(config) is None:
        print("offline root: imported; `estkit server run` serves")
        return
    data = config.data_dir
    issuing = {name: ca for name, ca in config.cas.items() if not ca.offline}
    waiting = {name: request_path(ca.cert) for name, ca in issuing.items() if not ca.cert.exists()}
    print()
    print("The root is offline: its key stays on its own machine. To finish:")
    step = 1
    if waiting:
        print(f"{step}. carry to the root's machine: {', '.join(map(str, waiting.values()))}")
        step += 1
        print(f"{step}. there (R: the root's directory, `estkit root init --dir R` made it):")
        for name, csr in waiting.items():
            print(
                f"     estkit root sign-ca --dir R --name {name} --csr {csr.name} --out {name}.pem"
            )
    else:
        print(f"{step}. on the root's machine (R: the root's directory):")
    print("     estkit root crl --dir R --out root.crl")
    step += 1
    back = ["R/root.pem", *(f"{name}.pem" for name in waiting), "root.crl"]
    print(f"{step}. carry back: {', '.join(back)}; compare root.pem's SHA-256 fingerprint")
    print("   with the one `estkit root init` printed, then here:")
    certs = "".join(f" --cert {name}={name}.pem" for name in waiting)
    print(f"     estkit ca import --data-dir {data} --root root.pem{certs} --root-crl root.crl")
    step += 1
    print(f"{step}. estkit server run --data-dir {data}")


# -- server init --signer pkcs11 -----------------------------------------------------

INIT_EPILOG = """\
CA keys in a PKCS#11 token (an HSM; SoftHSM2 for tests):
  --signer pkcs11 --pkcs11-module LIB --token-label T (--pin-file F | --pin-env VAR)
  makes the root, devices and bootstrap CA keys inside token T: token objects,
  sensitive and never extractable, for signing only, labelled root, devices and
  bootstrap (or Proot, ... with --key-label-prefix P), with the certificate's
  SubjectKeyIdentifier as CKA_ID. estkit.toml gets signer = "pkcs11", the module,
  token and key labels and where the PIN is read (F or VAR, never the PIN
  itself). No CA key file is written; the TLS server key is a file, as always.

  Nothing is written and no key is made unless the PIN file is its owner's only,
  the module loads, the token is there and takes the PIN, and none of the labels
  is taken. estkit never replaces a token key: if the token already holds a key
  under one of the labels, init stops and names them. Then either choose other
  labels (--key-label-prefix), or make this server's CAs from the keys there
  (--use-existing-keys: each needs its public key object beside it; certificates
  are made for them, --key-type does not apply to them, labels that are free get
  new keys).

  Once estkit.toml exists it is the truth: init finds the keys where [cas.*] say
  (the token's, by label or id), makes a missing CA certificate for the key there
  (making the key only if there is none), and refuses --signer and the token
  options unless they say the same. Hand-written [cas.*] for keys made elsewhere
  work the same way.

exit status: 0 done; 1 the token already holds keys under those labels; 2 an
  option missing or out of place; 69 python-pkcs11 not installed (estkit[hsm]);
  78 the module, token, PIN, PIN file or existing config does not work.
"""

_KEY_LABEL_PREFIX = re.compile(r"[A-Za-z0-9._-]{1,32}")


@dataclass(frozen=True, slots=True)
class _TokenOptions:
    """``server init --signer pkcs11``: the token the CA keys are made in, and where the
    server reads its PIN (a file or an environment variable, never the config)."""

    module: Path
    token_label: str
    pin_file: Path | None
    pin_env: str | None
    key_label_prefix: str

    def key_label(self, ca: str) -> str:
        return f"{self.key_label_prefix}{ca}"


def _token_options(args: argparse.Namespace) -> _TokenOptions | None:
    """The token options of ``server init``, or None for file keys; an option missing or
    out of place is one line (exit 2)."""
    use_existing = args.use_existing_keys or None
    if not pkcs11_chosen(
        args,
        own=(("--key-label-prefix", args.key_label_prefix), ("--use-existing-keys", use_existing)),
    ):
        return None
    return _TokenOptions(
        module=args.pkcs11_module.absolute(),
        token_label=args.token_label,
        pin_file=None if args.pin_file is None else args.pin_file.absolute(),
        pin_env=args.pin_env,
        key_label_prefix=args.key_label_prefix or "",
    )


def _token_ref(token: _TokenOptions, ca: str) -> TokenKeyRef:
    """The ``TokenKeyRef`` that ``[cas.<ca>]`` of a config written for ``token`` parses to."""
    from estkit.ca.signers import TokenKeyRef

    return TokenKeyRef(
        module=token.module,
        token_label=token.token_label,
        key_label=token.key_label(ca),
        pin_file=token.pin_file,
        pin_env=token.pin_env,
        field=f"cas.{ca}",
    )


def _token_cas(text: str, token: _TokenOptions) -> str:
    """``text`` (the config template) with each CA's key in the token, not in a file (an
    offline root's is in neither)."""
    import json

    from estkit.server.config import CA_NAMES

    pin = (
        f"pin_file = {json.dumps(str(token.pin_file))}"
        if token.pin_file is not None
        else f"pin_env = {json.dumps(token.pin_env)}"
    )
    for ca in CA_NAMES:
        file_key = f'key = "ca/{ca}.key"\nsigner = "file"\n'
        if ca == "root" and file_key not in text:  # offline
            continue
        assert text.count(file_key) == 1  # the template's [cas.<ca>]
        lines = [
            'signer = "pkcs11"',
            f"module = {json.dumps(str(token.module))}",
            f"token_label = {json.dumps(token.token_label)}",
            f"key_label = {json.dumps(token.key_label(ca))}",
            pin,
        ]
        text = text.replace(file_key, "".join(f"{line}\n" for line in lines))
    return text


def _check_token(token: _TokenOptions, *, use_existing: bool, offline_root: bool) -> None:
    """Before anything is written or made: the PIN can be read, the module loads, the token
    is there and takes the PIN (else exit 78), and no key in it has one of the labels the
    CA keys would get, unless ``use_existing`` (else exit 1)."""
    from estkit.server.config import CA_NAMES

    labels = [token.key_label(ca) for ca in CA_NAMES if not (offline_root and ca == "root")]
    taken = labels_in_use(_token_ref(token, "root"), labels)
    if taken and not use_existing:
        raise CliError(
            f"token {token.token_label!r} already holds keys labelled {', '.join(taken)}, "
            "and estkit never replaces a token key; nothing written: make new keys under "
            "other labels (--key-label-prefix P: Proot, Pdevices, Pbootstrap), or make this "
            "server's CAs from the keys there (--use-existing-keys)",
            exit_code=EXIT_FAILURE,
        )


def _check_signer_unchanged(
    config: ServerConfig, token: _TokenOptions | None, config_path: Path
) -> None:
    """``--signer`` (and the token options) on an existing config must say what its
    ``[cas.*]`` say: keys are never moved, and an option that would be ignored is refused."""
    from estkit.server.config import CA_NAMES

    for ca in CA_NAMES:
        existing = config.cas[ca]
        if existing.offline:  # its key is on no signer here
            continue
        wanted = "file" if token is None else "pkcs11"
        if existing.signer != wanted or (
            token is not None and existing.token != _token_ref(token, ca)
        ):
            what = (
                f"signer {existing.signer!r}"
                if existing.signer != wanted
                else "another token key, token or PIN source"
            )
            raise CliError(
                f"{config_path} exists and [cas.{ca}] there names {what}: --signer and the "
                "token options apply only when init writes a new config; leave them out, or "
                "edit [cas.*] there",
                exit_code=EXIT_CONFIG,
            )


def _key_stores(config: ServerConfig) -> dict[str, tuple[Path, CaKeyStore]]:
    """Each CA's certificate file and where ``create_pki`` keeps its key (an offline
    root has none here)."""
    from estkit.ca.setup import FileKeyStore, TokenKeyStore
    from estkit.ca.signers import token_key_spec

    stores: dict[str, tuple[Path, CaKeyStore]] = {}
    for name, ca in config.cas.items():
        if ca.offline:
            continue
        if ca.token is not None:
            try:
                spec = token_key_spec(name, ca.token, os.environ)
            except ValueError as exc:
                raise CliError(str(exc), exit_code=EXIT_CONFIG) from None
            stores[name] = (ca.cert, TokenKeyStore(spec))
        else:
            stores[name] = (ca.cert, FileKeyStore(ca.key))
    return stores


def _node_settings(text: str, args: argparse.Namespace) -> str:
    """``text`` (a config) with ``--public-url``, ``--node-name`` and ``--region`` set."""
    import json

    for section, key, value in (
        ("server", "public_url", args.public_url),
        ("node", "name", args.node_name),
        ("node", "region", args.region),
    ):
        if value is None:
            continue
        if re.search(rf"^\[{section}\][ \t]*(#.*)?$", text, re.M) is None:
            text = f"{text.rstrip()}\n\n[{section}]\n"
        edited = _set_toml_value(text, section, key, _literal(json.dumps(value)), insert=True)
        assert edited is not None  # the section exists now
        text = edited
    return text


def _literal(value: str) -> Callable[[str], str]:
    """A ``_set_toml_value`` change that writes the TOML literal ``value``."""
    return lambda _old: value


def _join(args: argparse.Namespace) -> int:
    """``server init --join D``: another node's data directory, made from node ``D``'s.

    The same CAs (certificates and keys), TLS material and database; its own node
    name, region, public URL and ports. The database is shared, so nothing is
    migrated and no CA is created. Everything is checked and read before anything is
    written, and the directory appears whole or not at all (``_create_data_dir``).
    """
    import json
    import tomllib

    from estkit.server.config import (
        CONFIG_NAME,
        ConfigError,
        default_node_name,
        load_config,
        parse_config,
    )
    from estkit.server.portal.session import KEY_FILE as SESSION_KEY_FILE
    from estkit.store import SqlStore
    from estkit.store.errors import StoreError

    source: Path = args.join
    data_dir: Path = args.data_dir
    if args.database_url is not None:
        raise CliError("--join: the database is the joined node's; leave out --database-url")
    if args.port is None:
        raise CliError("--join: --port is required (the new node's HTTPS port)")
    target = _new_data_dir(data_dir)
    try:
        joined = load_config(source)
    except ConfigError as exc:
        raise CliError(f"--join: {exc}", exit_code=EXIT_CONFIG) from None
    if not joined.database_url.startswith("postgresql"):
        raise CliError(
            f"--join: {source} uses SQLite; nodes need one shared PostgreSQL database "
            "(`estkit server init --database-url postgresql://…` on the first node)",
            exit_code=EXIT_CONFIG,
        )
    port = args.port
    crl_port = args.crl_port or port + 1
    hostname = args.hostname[0] if args.hostname else "localhost"
    public_url = args.public_url or f"https://{hostname}:{port}"
    region = args.region or joined.node.region
    name = args.node_name or f"{default_node_name()}-{region}-{port}"

    store = SqlStore.open(joined.database_url)
    try:
        store.check_schema()
        if any(node.name == name for node in store.list_nodes()):
            raise CliError(
                f"--node-name: a node named {name!r} is registered in the database already; "
                "give this one another name",
                exit_code=EXIT_CONFIG,
            )
    except StoreError as exc:
        raise CliError(f"--join: database: {exc}", exit_code=EXIT_TEMPFAIL) from None
    finally:
        store.close()

    copies = _join_copies(joined)
    files = [(c.name, _read_for_join(c.setting, c.source), c.mode) for c in copies]
    # The portal's session key: nodes behind one host name accept each other's sessions.
    session_key = joined.data_dir / SESSION_KEY_FILE
    shared_sessions = session_key.exists()
    if shared_sessions:
        files.append((SESSION_KEY_FILE, _read_for_join(SESSION_KEY_FILE, session_key), PRIVATE))
    text = (source / CONFIG_NAME).read_text()
    for copy in copies:
        literal = _literal(json.dumps(copy.name))
        text = _set_toml_value(text, copy.section, copy.key, literal, insert=True) or text
    for section, key, value in (
        ("server", "port", str(port)),
        ("crl", "http_port", str(crl_port)),
        ("crl", "url", json.dumps(args.crl_url or f"http://{hostname}:{crl_port}/crl")),
    ):
        if re.search(rf"^\[{section}\][ \t]*(#.*)?$", text, re.M) is None:
            text = f"{text.rstrip()}\n\n[{section}]\n"
        text = _set_toml_value(text, section, key, _literal(value), insert=True) or text
    args.public_url, args.node_name, args.region = public_url, name, region
    text = _node_settings(text, args)
    config_path = data_dir / CONFIG_NAME
    try:
        config = parse_config(tomllib.loads(text), target)
    except (ConfigError, tomllib.TOMLDecodeError) as exc:
        raise CliError(f"{config_path}: not written: {exc}", exit_code=EXIT_CONFIG) from None
    named = _named_files(config)
    for copy in copies:  # a setting the text edit could not reach would name D's file
        if named.get(copy.setting) != target / copy.name:
            raise CliError(
                f"--join: {copy.setting} in {source / CONFIG_NAME} could not be pointed at "
                f"the copy {copy.name}; write it in a [{copy.section}] table",
                exit_code=EXIT_CONFIG,
            )
    try:
        _create_data_dir(target, [*files, (CONFIG_NAME, text.encode(), 0o600)])
    except OSError as exc:
        raise CliError(f"--join: cannot create {data_dir}: {exc}; nothing written") from None
    print(f"config: created {config_path}")
    print(f"node: {name}, region {region}, {public_url}")
    into = ", ".join(sorted({f"{c.name.partition('/')[0]}/" for c in copies}))
    print(f"copied {len(copies)} files from {source} into {into} (keys 0600, the rest 0644)")
    if shared_sessions:
        print(f"portal: copied {SESSION_KEY_FILE} (0600): the nodes share portal sessions")
    else:
        print(
            f"portal: no {SESSION_KEY_FILE} in {source} (its server has not run since "
            "estkit had a portal): each node makes its own, so a portal session is valid on "
            "the node that made it only; copy it here to share them"
        )
    print("database: shared with the joined node, not migrated")
    return 0


# A CA's name names its files in a joined node's directory (``ca/<name>.pem``).
_CA_FILE_SUFFIXES = {"cert": ".pem", "key": ".key", "pin_file": ".pin", "crl": ".crl"}


@dataclass(frozen=True, slots=True)
class _JoinCopy:
    """A file the joined node's config names, and where the joining node keeps its copy."""

    section: str
    key: str
    source: Path
    name: str  # in the new data directory, by what the file is, never by its old name
    mode: int

    @property
    def setting(self) -> str:
        return f"{self.section}.{self.key}"


def _named_files(config: ServerConfig) -> dict[str, Path]:
    """Every file ``config`` names, by setting: the CAs' (certificate, and key file or
    token PIN file, or an offline root's CRL; a PKCS#11 module is the host's, not copied),
    TLS, the OIDC key set and the portal's OIDC client secret."""
    files: dict[str, Path] = {}
    for name, ca in config.cas.items():
        files[f"cas.{name}.cert"] = ca.cert
        if ca.key_file is not None:
            files[f"cas.{name}.key"] = ca.key_file
        if ca.token is not None and ca.token.pin_file is not None:
            files[f"cas.{name}.pin_file"] = ca.token.pin_file
        if ca.crl is not None:
            files[f"cas.{name}.crl"] = ca.crl
    files["tls.cert"] = config.tls_cert
    files["tls.key"] = config.tls_key
    oidc = config.api.get("oidc")
    if isinstance(oidc, Mapping) and isinstance(jwks := oidc.get("jwks_file"), str):
        files["api.oidc.jwks_file"] = config.data_dir / jwks  # an absolute one stays
    if isinstance(oidc, Mapping) and isinstance(
        secret := oidc.get("portal_client_secret_file"), str
    ):
        files["api.oidc.portal_client_secret_file"] = config.data_dir / secret
    return files


def _join_copies(joined: ServerConfig) -> list[_JoinCopy]:
    """What a node joining ``joined`` copies: two CAs whose files share a name (in two
    directories) get a copy each."""
    copies: list[_JoinCopy] = []
    for setting, path in _named_files(joined).items():
        section, _, key = setting.rpartition(".")
        if section.startswith("cas."):
            # The config allows only names that are file names (server/config.py _CA_NAME).
            ca = section.removeprefix("cas.")
            name = f"ca/{ca}{_CA_FILE_SUFFIXES[key]}"
        elif section == "tls":
            name = "tls/server.pem" if key == "cert" else "tls/server.key"
        elif key == "portal_client_secret_file":
            name = "api/portal-client.secret"
        else:
            name = "api/jwks.json"
        mode = PRIVATE if key in ("key", "pin_file", "portal_client_secret_file") else PUBLIC
        copies.append(_JoinCopy(section, key, path, name, mode))
    return copies


def _read_for_join(what: str, source: Path) -> bytes:
    """The bytes of ``source`` (``what``: the setting naming it, or the file); a symbolic
    link anywhere on its path, a ``..``, or anything but a regular file is refused in one
    line (exit 78)."""
    try:
        return _read_no_symlinks(source)
    except OSError as exc:
        why = (
            "a symbolic link on its path (not followed: point it at the file itself)"
            if exc.errno == errno.ELOOP
            else exc.strerror or str(exc)
        )
    except ValueError as exc:
        why = str(exc)
    raise CliError(f"--join: {what}: {source}: {why}", exit_code=EXIT_CONFIG)


def _read_no_symlinks(path: Path) -> bytes:
    """The bytes of the regular file at the absolute ``path``, opening each directory on
    the way and the file itself with ``O_NOFOLLOW``: a symbolic link anywhere is
    ``OSError(ELOOP)``, a ``..`` or a non-regular file ``ValueError``."""
    if not path.is_absolute():
        raise ValueError("not an absolute path")
    if ".." in path.parts:
        raise ValueError("a path with '..' (not followed: give the file's own path)")
    nofollow = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    directory = os.open(path.anchor, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in path.parts[1:-1]:
            try:
                inner = os.open(part, nofollow | os.O_DIRECTORY, dir_fd=directory)
            except NotADirectoryError:  # what Linux says for a symbolic link here
                entry = os.stat(part, dir_fd=directory, follow_symlinks=False)
                if stat.S_ISLNK(entry.st_mode):
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), part) from None
                raise
            os.close(directory)
            directory = inner
        # O_NONBLOCK: a FIFO planted there must not hang the command; it is refused below.
        fd = os.open(path.name, nofollow | os.O_NONBLOCK, dir_fd=directory)
    finally:
        os.close(directory)
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise ValueError("not a regular file")
        return handle.read()


def _new_data_dir(data_dir: Path) -> Path:
    """``data_dir`` resolved, when it does not exist or is an empty directory; else a
    refusal (exit 78): a joining node's directory holds nothing of anyone else's."""
    target = data_dir.resolve()
    try:
        entries = os.listdir(target)
    except FileNotFoundError:
        return target
    except OSError as exc:
        raise CliError(
            f"--data-dir: {data_dir}: {exc.strerror or exc}; a joining node needs a new "
            "(or empty) data directory",
            exit_code=EXIT_CONFIG,
        ) from None
    if entries:
        raise CliError(
            f"--data-dir: {data_dir} exists and is not empty; a joining node needs a new "
            "(or empty) data directory",
            exit_code=EXIT_CONFIG,
        )
    return target


def _create_data_dir(target: Path, files: list[tuple[str, bytes, int]]) -> None:
    """Create the data directory ``target`` (0700) holding ``files`` (relative name,
    bytes, mode), whole or not at all: built in a temporary directory beside it and
    renamed into place, over ``target`` if that is an empty directory."""
    import shutil
    import tempfile

    from estkit.fileio import fsync_directory, write_new

    target.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".join", dir=target.parent))
    try:
        for name, data, mode in files:
            path = temp / name
            path.parent.mkdir(mode=0o700, exist_ok=True)
            write_new(path, data, mode=mode)
        for directory in {(temp / name).parent for name, _, _ in files}:
            fsync_directory(directory)
        os.rename(temp, target)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    fsync_directory(target.parent)


def _update_ports(args: argparse.Namespace, path: Path) -> str | None:
    """Point an existing config at ``--port`` / ``--crl-port``; say what changed, or None.

    ``make run`` passes ``PORT`` on every run: the config stays the one truth that
    ``server info``, ``server run`` and the URLs in issued certificates agree on.
    The public URL and the CRL URL follow when they name the old port; the CRL
    port follows the main one when it is the ``port + 1`` that init wrote.
    """
    import tomllib

    from estkit.ca.files import write_atomic
    from estkit.server.config import ConfigError, parse_config

    if args.port is None and args.crl_port is None:
        return None
    config = _load(args)
    port = config.port if args.port is None else args.port
    old_crl = config.crl.http_port
    if args.crl_port is not None:
        crl_port = args.crl_port
    elif old_crl and old_crl == config.port + 1:
        crl_port = port + 1
    else:
        crl_port = old_crl
    if (port, crl_port) == (config.port, old_crl):
        return None
    text = path.read_text()
    edits = [("server", "port", lambda _: str(port), True)]
    edits.append(("server", "public_url", _with_port(config.port, port), False))
    if crl_port != old_crl:
        edits.append(("crl", "http_port", lambda _: str(crl_port), True))
        edits.append(("crl", "url", _with_port(old_crl, crl_port), False))
    for section, key, change, required in edits:
        edited = _set_toml_value(text, section, key, change, insert=required)
        if edited is None:
            raise CliError(
                f"{path}: cannot set {section}.{key} for --port {port}; edit it there",
                exit_code=EXIT_CONFIG,
            )
        text = edited
    try:
        parse_config(tomllib.loads(text), args.data_dir)
    except (ConfigError, tomllib.TOMLDecodeError) as exc:
        raise CliError(f"{path}: not changed: {exc}", exit_code=EXIT_CONFIG) from None
    write_atomic(path, text.encode(), mode=0o600)
    moved = [f"port {config.port} -> {port}"] if port != config.port else []
    if crl_port != old_crl:
        moved.append(f"CRL port {old_crl} -> {crl_port}")
    return ", ".join(moved)


def _update_database(args: argparse.Namespace, path: Path) -> str | None:
    """Point an existing config at ``--database-url``; say so, or None if it already was."""
    import json
    import tomllib

    from estkit.ca.files import write_atomic
    from estkit.server.config import ConfigError, parse_config

    if args.database_url is None:
        return None
    text = path.read_text()
    section = tomllib.loads(text).get("database", {})
    if isinstance(section, dict) and section.get("url") == args.database_url:
        return None
    if re.search(r"^\[database\][ \t]*(#.*)?$", text, re.M) is None:
        text = f"{text.rstrip()}\n\n[database]\n"
    edited = _set_toml_value(
        text, "database", "url", lambda _: json.dumps(args.database_url), insert=True
    )
    assert edited is not None  # the section exists now
    try:
        parse_config(tomllib.loads(edited), args.data_dir)
    except (ConfigError, tomllib.TOMLDecodeError) as exc:
        raise CliError(f"{path}: not changed: {exc}", exit_code=EXIT_CONFIG) from None
    write_atomic(path, edited.encode(), mode=0o600)
    return "database url changed"


def _database_url(value: str) -> str:
    from estkit.server.config import ConfigError, database_url

    try:
        database_url(value)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("database.url: ")) from None
    return value


def _with_port(old: int, new: int) -> Callable[[str], str]:
    """A TOML string literal holding a URL, with port ``old`` replaced by ``new``."""
    import json
    import tomllib

    def change(literal: str) -> str:
        try:
            url = urllib.parse.urlsplit(tomllib.loads(f"v = {literal}")["v"])
            if url.port != old or url.hostname is None:
                return literal
        except (tomllib.TOMLDecodeError, ValueError):
            return literal
        host = f"[{url.hostname}]" if ":" in url.hostname else url.hostname
        return json.dumps(urllib.parse.urlunsplit(url._replace(netloc=f"{host}:{new}")))

    return change


def _set_toml_value(
    text: str, section: str, key: str, change: Callable[[str], str], *, insert: bool
) -> str | None:
    """``text`` with ``key``'s value in ``[section]`` changed (or inserted); None if not found."""
    header = re.search(rf"^\[{re.escape(section)}\][ \t]*(#.*)?$", text, re.M)
    if header is None:
        return None
    following = re.compile(r"^[ \t]*\[", re.M).search(text, header.end())
    end = following.start() if following else len(text)
    line = re.compile(
        rf"^([ \t]*{re.escape(key)}[ \t]*=[ \t]*)(\"[^\"\n]*\"|[^ \t#\n]+)", re.M
    ).search(text, header.end(), end)
    if line is not None:
        return text[: line.start(2)] + change(line.group(2)) + text[line.end(2) :]
    if not insert:
        return text
    return f"{text[: header.end()]}\n{key} = {change('')}{text[header.end() :]}"


def _sqlite_file(url: str) -> Path | None:
    prefix = "sqlite:///"
    return Path(url.removeprefix(prefix)) if url.startswith(prefix) else None


def cmd_server_run(args: argparse.Namespace) -> int:
    from estkit.server.app import ListenError, serve
    from estkit.server.config import ConfigError
    from estkit.store.errors import SchemaError

    config = _load(args)
    try:
        serve(
            config,
            host=args.host or config.host,
            port=args.port or config.port,
            workers=args.workers or config.workers,
            port_setting="--port" if args.port else "server.port",
        )
    except ConfigError as exc:
        raise CliError(str(exc), exit_code=EXIT_CONFIG) from None
    except ListenError as exc:
        raise CliError(str(exc), exit_code=EXIT_LISTEN) from None
    except SchemaError as exc:
        raise CliError(str(exc)) from None
    return 0


def _require_imported(config: ServerConfig) -> None:
    """With an offline root, refuse (exit 78) until ``ca import`` has installed its part."""
    from estkit.server.wiring import offline_root_pending

    if (pending := offline_root_pending(config)) is not None:
        raise CliError(pending, exit_code=EXIT_CONFIG)


def cmd_server_info(args: argparse.Namespace) -> int:
    """What a person needs to point a device at this server, ready to copy."""
    from estkit.pki.certs import fingerprint, load_pem_certificates

    config = _load(args)
    _require_imported(config)
    root = load_pem_certificates(config.cas["root"].cert.read_bytes())[0]
    fp = fingerprint(root)
    data = args.data_dir
    demo = data.parent / "demo-1"
    print(f"EST URL:                 {config.est_url}")
    print(f"trust anchor (root CA):  {config.cas['root'].cert}")
    print(f"trust anchor SHA-256:    {fp}")
    print()
    print("Enroll a test device (in another terminal, once the server runs):")
    print(f"  .venv/bin/estkit device bootstrap --data-dir {data} demo-1 --out {demo}/bootstrap")
    print(
        f"  .venv/bin/estkit enroll --url {config.est_url} --device-id demo-1 "
        f"--cert {demo}/bootstrap/cert.pem --key {demo}/bootstrap/key.pem "
        f"--fingerprint {fp} --out {demo}/operational"
    )
    print()
    return 0


# -- ca ----------------------------------------------------------------------------


def cmd_ca_list(args: argparse.Namespace) -> int:
    import json

    from estkit.pki.certs import fingerprint, load_pem_certificates
    from estkit.server.nodes import est_url, region_urls
    from estkit.server.wiring import installed_cas
    from estkit.store import SqlStore
    from estkit.store.errors import StoreError

    config = _load(args)
    _require_imported(config)
    store = SqlStore.open(config.database_url)
    try:
        store.check_schema()
        regions = region_urls(store.list_nodes())
    except StoreError as exc:  # no schema yet, or the database is away: this node only
        print(f"warning: nodes not read from the database: {exc}", file=sys.stderr)
        regions = []
    finally:
        store.close()
    cas: list[dict[str, str | None]] = []
    for name, ca in installed_cas(config).items():
        cert = load_pem_certificates(ca.cert.read_bytes())[0]
        start = ca.generation.issues_from
        cas.append(
            {
                "name": name,
                "signer": ca.signer,
                "subject": cert.subject.rfc4514_string(),
                "not_after": cert.not_valid_after_utc.isoformat(),
                "fingerprint_sha256": fingerprint(cert),
                "replaces": ca.generation.replaces,
                "issues_from": None if start is None else start.isoformat(),
            }
        )
    labels: list[dict[str, Any]] = [
        {
            "name": name,
            "ca": label.ca,
            "profile": label.profile,
            "est_url": f"{config.est_url}/{name}",
            "est_urls": [
                {"region": r.region, "node": r.node, "url": est_url(r.public_url, name)}
                for r in regions
            ],
        }
        for name, label in config.labels.items()
    ]
    if args.json:
        print(json.dumps({"cas": cas, "labels": labels}, indent=2))
        return 0
    for ca_out in cas:
        offline = (
            " (offline: its key is not on this server)" if ca_out["signer"] == "offline" else ""
        )
        print(f"CA {ca_out['name']}{offline}")
        if ca_out["replaces"] is not None:
            print(f"  replaces:    {ca_out['replaces']} from {ca_out['issues_from']}")
        print(f"  subject:     {ca_out['subject']}")
        print(f"  not after:   {ca_out['not_after']}")
        print(f"  sha256:      {ca_out['fingerprint_sha256']}")
    for label_out in labels:
        name = label_out["name"]
        default = f"  (also {config.est_url}/)" if name == config.default_label else ""
        print(f"label {name}: CA {label_out['ca']}, profile {label_out['profile']}")
        print(f"  EST URL:     {label_out['est_url']}{default}")
        for r in regions:
            print(f"  region {r.region}: {est_url(r.public_url, name)}  (node {r.node})")
    return 0


def cmd_ca_chain(args: argparse.Namespace) -> int:
    from estkit.ca.signers import chain_to_root
    from estkit.pki.certs import certs_to_pem, load_pem_certificates

    config = _load(args)
    if args.ca not in config.cas:
        raise CliError(f"unknown CA {args.ca!r}; configured: {', '.join(config.cas)}")
    _require_imported(config)
    from estkit.server.wiring import installed_cas

    installed = installed_cas(config)
    if args.ca not in installed:
        missing = config.cas[args.ca].cert
        raise CliError(f"CA {args.ca}: its certificate {missing} is not imported yet")
    certs = {n: load_pem_certificates(c.cert.read_bytes())[0] for n, c in installed.items()}
    sys.stdout.write(certs_to_pem(chain_to_root(certs[args.ca], certs)).decode())
    return 0


def _import_cert_arg(value: str) -> tuple[str, Path]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"NAME=FILE (devices=devices.pem), got {value!r}")
    return name, Path(path)


def _read_input(option: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CliError(f"{option}: {exc.strerror or exc}") from None


def _certificates(option: str, path: Path) -> list[x509.Certificate]:
    from estkit.pki.certs import load_pem_certificates

    try:
        return load_pem_certificates(_read_input(option, path))
    except ValueError:
        raise CliError(f"{option}: not a PEM certificate") from None


@dataclass(frozen=True, slots=True)
class _Install:
    """A file ``ca import`` writes once everything given has been checked."""

    path: Path
    data: bytes
    said: str


def cmd_ca_import(args: argparse.Namespace) -> int:
    """Install what the offline root's machine produced: its certificate, the issuing CA
    certificates it signed for this server's keys, and its CRL. Everything given is
    checked before anything is written; then the TLS server certificate is issued from
    the bootstrap CA if there is none yet."""
    from estkit.ca.files import write_atomic
    from estkit.ca.setup import issue_tls
    from estkit.pki.certs import load_pem_certificates
    from estkit.server.wiring import offline_root_pending

    if args.root is None and not args.cert and args.root_crl is None:
        raise CliError(
            "nothing to import: give --root, --cert NAME=FILE or --root-crl",
            exit_code=EXIT_USAGE,
        )
    config = _load(args)
    root_ca = config.cas["root"]
    if not root_ca.offline:
        raise CliError(
            f"the root of {args.data_dir} is not offline (cas.root.signer = "
            f"{root_ca.signer!r}): its certificates are made here, there is nothing to import"
        )
    now = _now()
    root, installs = _import_root(args, root_ca.cert, now=now)
    stores = _key_stores(config)
    given: set[str] = set()
    for name, path in args.cert:
        if name in given:
            raise CliError(f"--cert {name}={path}: {name} given twice", exit_code=EXIT_USAGE)
        given.add(name)
        installs += _import_ca_cert(args, name, path, stores, root=root, now=now)
    if args.root_crl is not None:
        assert root_ca.crl is not None  # an offline root's
        installs += _import_root_crl(args.root_crl, root_ca.crl, root=root, now=now)

    for install in installs:
        write_atomic(install.path, install.data)
        print(install.said)
    if not config.tls_cert.exists() and config.cas["bootstrap"].cert.exists():
        cert_path, keys = stores["bootstrap"]
        issuer = load_pem_certificates(cert_path.read_bytes())[0]
        try:
            issuer_key = keys.load("bootstrap", issuer)
            said = issue_tls(
                tls_cert=config.tls_cert,
                tls_key=config.tls_key,
                issuer=issuer,
                issuer_key=issuer_key,
                issuer_name="bootstrap",
                now=now,
            )
        except ValueError as exc:
            raise CliError(str(exc), exit_code=EXIT_CONFIG) from None
        print(said)
    pending = offline_root_pending(config)
    print(pending or f"ready: estkit server run --data-dir {args.data_dir}")
    return 0


def _import_root(
    args: argparse.Namespace, installed: Path, *, now: dt.datetime
) -> tuple[x509.Certificate, list[_Install]]:
    """The root to check the rest against: ``--root`` (checked: self-signed, a CA, the
    fingerprint asked for, the one installed if there is one), or the one installed."""
    from estkit.ca.offline import check_root
    from estkit.pki.certs import (
        certs_to_pem,
        fingerprint,
        load_pem_certificates,
        normalize_fingerprint,
    )

    current = load_pem_certificates(installed.read_bytes())[0] if installed.exists() else None
    if args.root is None:
        if current is None:
            raise CliError(
                f"--root: the root's certificate is not installed yet ({installed}): give the "
                "root.pem of the root's directory"
            )
        return current, []
    option = f"--root {args.root}"
    root, *rest = _certificates(option, args.root)
    if rest:
        raise CliError(f"{option}: one certificate expected, found {1 + len(rest)}")
    try:
        check_root(root, now=now)
    except ValueError as exc:
        raise CliError(f"{option}: {exc}") from None
    if args.root_fingerprint is not None:
        try:
            wanted = normalize_fingerprint(args.root_fingerprint)
        except ValueError as exc:
            raise CliError(f"--root-fingerprint: {exc}", exit_code=EXIT_USAGE) from None
        if fingerprint(root) != wanted:
            raise CliError(
                f"{option}: its SHA-256 fingerprint is {fingerprint(root)}, not {wanted}: "
                "not the root you meant; nothing imported"
            )
    if current is not None and current != root:
        raise CliError(
            f"{option}: another root than the one installed ({installed}, "
            f"{fingerprint(current)}); estkit never replaces the trust anchor"
        )
    if current is not None:
        print(f"root CA: {installed} unchanged")
        return root, []
    said = f"root CA: installed {installed} (SHA-256 {fingerprint(root)})"
    return root, [_Install(installed, certs_to_pem([root]), said)]


def _import_ca_cert(
    args: argparse.Namespace,
    name: str,
    path: Path,
    stores: Mapping[str, tuple[Path, CaKeyStore]],
    *,
    root: x509.Certificate,
    now: dt.datetime,
) -> list[_Install]:
    """``--cert NAME=FILE`` checked: a CA certificate under ``root`` for the key that CA
    has here (the one its request was made with)."""
    from estkit.ca.offline import check_issuing_ca
    from estkit.ca.setup import request_path
    from estkit.pki.certs import certs_to_pem, load_pem_certificates
    from estkit.pki.keys import public_keys_match

    option = f"--cert {name}={path}"
    if name not in stores:
        raise CliError(f"{option}: not an issuing CA of this server ({', '.join(stores)})")
    cert, *rest = _certificates(option, path)
    if any(extra != root for extra in rest):
        raise CliError(f"{option}: the file holds certificates other than its own and the root")
    try:
        check_issuing_ca(cert, root=root, now=now)
    except ValueError as exc:
        raise CliError(f"{option}: {exc}") from None
    cert_path, keys = stores[name]
    try:
        key = keys.pending(name)
    except (OSError, ValueError) as exc:  # a key file, token or PIN that does not work
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise CliError(f"{option}: the {name} CA's key: {why}", exit_code=EXIT_CONFIG) from None
    if key is None:
        raise CliError(
            f"{option}: the {name} CA has no key on this server yet; `estkit server init "
            f"--data-dir {args.data_dir}` makes it and its request",
            exit_code=EXIT_CONFIG,
        )
    if not public_keys_match(key.public_key(), cert.public_key()):
        raise CliError(
            f"{option}: not a certificate of the {name} CA's key (its request is "
            f"{request_path(cert_path)}); sign that request"
        )
    if cert_path.exists():
        current = load_pem_certificates(cert_path.read_bytes())[0]
        if current == cert:
            print(f"{name} CA: {cert_path} unchanged")
            return []
        if current.subject != cert.subject:
            raise CliError(
                f"{option}: the installed {cert_path} names {current.subject.rfc4514_string()}; "
                "a CA certificate is replaced only by one of the same name and key"
            )
    said = f"{name} CA: installed {cert_path} (until {cert.not_valid_after_utc.isoformat()})"
    return [_Install(cert_path, certs_to_pem([cert]), said)]


def _import_root_crl(
    path: Path, installed: Path, *, root: x509.Certificate, now: dt.datetime
) -> list[_Install]:
    """``--root-crl FILE`` checked: the root's, current, not older than the installed one."""
    from cryptography.hazmat.primitives.serialization import Encoding

    from estkit.ca.crl import crl_number, load_crl

    option = f"--root-crl {path}"
    try:
        crl = load_crl(_read_input(option, path), issuer=root)
    except ValueError as exc:
        raise CliError(f"{option}: {exc}") from None
    next_update = crl.next_update_utc
    assert next_update is not None  # load_crl checks it
    if next_update <= now:
        raise CliError(
            f"{option}: expired at {next_update.isoformat()}; sign a new one (`estkit root crl`)"
        )
    der = crl.public_bytes(Encoding.DER)
    try:
        current = load_crl(installed.read_bytes(), issuer=root)
    except (OSError, ValueError):
        current = None
    if current is not None:
        if current.public_bytes(Encoding.DER) == der:
            print(f"root CRL: {installed} unchanged")
            return []
        if crl_number(crl) < crl_number(current):
            raise CliError(
                f"{option}: CRL number {crl_number(crl)} is older than the installed one's "
                f"({crl_number(current)})"
            )
    said = (
        f"root CRL: installed {installed} (number {crl_number(crl)}, next update "
        f"{next_update.isoformat()})"
    )
    return [_Install(installed, der, said)]


# -- device and cert -----------------------------------------------------------------


def cmd_device_add(args: argparse.Namespace) -> int:
    from estkit.ca.errors import CaError

    authority = _authority(args)
    try:
        secret = authority.add_device(
            args.device_id, actor=_operator(), now=_now(), rotate_secret=args.rotate_secret
        )
    except CaError as exc:
        raise _ca_error(exc, hint=_hint(exc, "; --rotate-secret gives it a new secret")) from None
    # Alone on stdout, so scripts can capture it; shown once, stored only hashed.
    print(secret)
    return 0


def cmd_device_bootstrap(args: argparse.Namespace) -> int:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding
    from cryptography.x509.oid import NameOID

    from estkit.ca.authority import check_device_id
    from estkit.ca.errors import CaError
    from estkit.ca.files import write_atomic
    from estkit.pki.certs import certs_to_pem, serial_hex
    from estkit.pki.csr import build_csr
    from estkit.pki.keys import generate_key, key_to_pem

    try:
        check_device_id(args.device_id)
    except CaError as exc:
        raise _ca_error(exc) from None
    authority = _authority(args)
    now = _now()
    key = generate_key(args.key_type)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, args.device_id)])
    csr = build_csr(key, subject=subject)
    try:
        issued = authority.issue_bootstrap(
            csr.public_bytes(Encoding.DER),
            device_id=args.device_id,
            actor=_operator(),
            now=now,
            replace=args.force,
        )
    except CaError as exc:
        hint = "; --force issues a new one and revokes it"
        raise _ca_error(exc, hint=_hint(exc, hint)) from None
    out: Path = args.out
    serial = issued.record.serial
    try:
        write_atomic(out / "key.pem", key_to_pem(key), mode=0o600)
        write_atomic(out / "cert.pem", certs_to_pem([issued.certificate]))
        # chain.pem: what a TLS client sends after its certificate (the issuing CA), no root.
        write_atomic(out / "chain.pem", certs_to_pem(issued.chain[:-1]))
    except OSError as exc:
        # The new key is lost: its certificate must not stay valid, and the one it was
        # to replace stays in service.
        authority.revoke(serial, reason="cessationOfOperation", actor=_operator(), now=now)
        raise CliError(
            f"cannot write {out}: {exc.strerror or exc}; the new certificate {serial} was "
            "revoked, the old one is unchanged"
        ) from None
    try:
        authority.supersede(issued.replaces_serials, actor=_operator(), now=now)
    except CaError as exc:
        left = ", ".join(issued.replaces_serials)
        raise _ca_error(
            exc,
            hint=f"; the new certificate {serial} is in {out}, but {left} is still valid: "
            f"run `estkit cert revoke SERIAL --reason superseded` for it",
        ) from None
    replaced = issued.replaces_serials
    print(
        f"bootstrap certificate for {args.device_id}: serial "
        f"{serial_hex(issued.certificate.serial_number)}, valid until "
        f"{issued.certificate.not_valid_after_utc.isoformat()}, files in {out}"
    )
    if replaced:
        print(
            f"revoked the bootstrap certificate(s) it replaces (superseded): {', '.join(replaced)}"
        )
    return 0


def _hint(exc: CaError, hint: str) -> str:
    """``hint`` when ``exc`` is a conflict an option resolves."""
    from estkit.ca.errors import Code, Refusal

    return hint if isinstance(exc, Refusal) and exc.code is Code.CONFLICT else ""


def _set_status(args: argparse.Namespace, status_name: str) -> int:
    from estkit.ca.errors import CaError
    from estkit.store import DeviceStatus

    authority = _authority(args)
    status = DeviceStatus(status_name)
    try:
        revoked = authority.set_device_status(args.device_id, status, actor=_operator(), now=_now())
    except CaError as exc:
        raise _ca_error(exc) from None
    suffix = f"; revoked {len(revoked)} certificate(s)" if revoked else ""
    print(f"device {args.device_id}: {status.value}{suffix}")
    return 0


def cmd_cert_revoke(args: argparse.Namespace) -> int:
    from estkit.ca.errors import CaError
    from estkit.pki.certs import parse_serial, serial_hex

    authority = _authority(args)
    try:
        serial = serial_hex(parse_serial(args.serial))
        record = authority.revoke(serial, reason=args.reason, actor=_operator(), now=_now())
    except ValueError as exc:
        raise CliError(str(exc)) from None
    except CaError as exc:
        raise _ca_error(exc) from None
    print(f"certificate {record.serial} of {record.device_id}: revoked ({args.reason})")
    return 0


# -- tokens, audit, pending approval, IoT Hub -----------------------------------------


def cmd_token_create(args: argparse.Namespace) -> int:
    from estkit.ca.errors import CaError
    from estkit.ca.tokens import TokenService
    from estkit.durations import parse_duration

    try:
        lifetime = parse_duration(args.expires) if args.expires else None
    except ValueError as exc:
        raise CliError(f"--expires: {exc}") from None
    authority = _authority(args)
    now = _now()
    try:
        token = TokenService(authority.store).create(
            args.name,
            frozenset(args.scope),
            actor=_operator(),
            now=now,
            expires_at=now + lifetime if lifetime is not None else None,
        )
    except CaError as exc:
        raise _ca_error(exc) from None
    # Alone on stdout, shown once; only its digest is stored.
    print(token)
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    from estkit.ca.errors import CaError
    from estkit.ca.tokens import TokenService

    authority = _authority(args)
    try:
        TokenService(authority.store).revoke(args.name, actor=_operator(), now=_now())
    except CaError as exc:
        raise _ca_error(exc) from None
    print(f"token {args.name}: revoked")
    return 0


def _decide(args: argparse.Namespace, approve: bool) -> int:
    from estkit.ca.errors import CaError

    authority = _authority(args)
    try:
        request = authority.decide(
            args.id, approve=approve, actor=_operator(), now=_now(), reason=args.reason
        )
    except CaError as exc:
        raise _ca_error(exc) from None
    verb = "approved" if approve else "denied"
    print(f"request {request.id} of {request.device_id}: {verb}; its next retry gets the answer")
    return 0


def cmd_ca_iothub_verify(args: argparse.Namespace) -> int:
    """Azure IoT Hub's proof of possession: a certificate for CN=<code> signed by the CA."""
    from estkit.ca import iothub
    from estkit.ca.errors import CaError
    from estkit.ca.files import write_atomic
    from estkit.pki.certs import certs_to_pem

    try:
        code = iothub.check_code(args.code)
    except ValueError as exc:
        raise CliError(f"--code: {exc}") from None
    authority = _authority(args)
    try:
        cert = iothub.issue_verification(authority, args.ca, code, actor=_operator(), now=_now())
    except CaError as exc:
        raise _ca_error(exc) from None
    write_atomic(args.out, certs_to_pem([cert]))
    print(f"verification certificate for CN={code}, signed by {args.ca}: {args.out}")
    return 0


def register(sub: Any) -> None:
    from estkit.cli import audit_cmds, read_cmds
    from estkit.pki.revocation import REASONS

    server = sub.add_parser("server", help="initialise and run the EST server").add_subparsers(
        dest="server_command", required=True, metavar="ACTION"
    )
    p = server.add_parser(
        "init",
        help="create config, CAs, TLS certificate and database once",
        description="Create the config, the root, devices and bootstrap CAs, the TLS\n"
        "certificate and the database, whichever is missing; what exists is kept.",
        epilog=f"{INIT_EPILOG}\n{OFFLINE_EPILOG}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _data_dir_arg(p)
    p.add_argument("--hostname", action="append", default=[], help="TLS name (repeatable)")
    p.add_argument(
        "--key-type",
        choices=KEY_TYPES,
        default="ec-p256",
        help="of the keys made: CAs and TLS (default %(default)s)",
    )
    p.add_argument("--organization", default="estkit", help="O= of the CA names")
    p.add_argument(
        "--port",
        type=_port,
        help=f"HTTPS port (default {DEFAULT_PORT}); on an existing config, changes it there",
    )
    p.add_argument(
        "--crl-port",
        type=_port,
        help="plain-HTTP port for CRLs (default: port+1, following --port while it is port+1)",
    )
    p.add_argument(
        "--database-url",
        type=_database_url,
        metavar="URL",
        help="sqlite:///FILE (default: estkit.db in the data directory) or "
        "postgresql://USER@HOST:PORT/DB; on an existing config, changes it there; "
        "the database is migrated to the newest schema",
    )
    p.add_argument(
        "--join",
        type=Path,
        metavar="DIR",
        help="make another node of the server whose data directory is DIR: the same CAs, "
        "TLS material and PostgreSQL database, this node's own name, region, URL and ports",
    )
    p.add_argument("--region", help="this node's region (default: default; --join: DIR's)")
    p.add_argument(
        "--public-url", metavar="URL", help="the URL devices reach this node at (server.public_url)"
    )
    p.add_argument(
        "--crl-url",
        metavar="URL",
        help="--join: the CRL URL this node writes into the certificates it issues "
        "(crl.url; default: its own CRL listener, http://HOSTNAME:CRL_PORT/crl); give a "
        "URL every node serves, such as a load balancer's, to keep CRLs reachable when "
        "one node is down",
    )
    p.add_argument(
        "--node-name",
        metavar="NAME",
        help="unique among the nodes (default: the host's short name; --join: host-region-port)",
    )
    hsm = p.add_argument_group(
        "CA keys in a PKCS#11 token (HSM)", "with the estkit[hsm] extra; see the end of this help"
    )
    hsm.add_argument(
        "--signer",
        choices=("file", "pkcs11"),
        help="where the CA keys are made: file (default; PEM files in the data directory) "
        "or pkcs11 (inside the token)",
    )
    hsm.add_argument(
        "--pkcs11-module", type=Path, metavar="LIB", help="the token vendor's PKCS#11 library"
    )
    hsm.add_argument("--token-label", metavar="LABEL", help="the token's label")
    hsm.add_argument(
        "--pin-file",
        type=Path,
        metavar="FILE",
        help="the token's user PIN, in a file only its owner may read (0600 or 0400)",
    )
    hsm.add_argument(
        "--pin-env",
        type=pin_env,
        metavar="VAR",
        help="or: the environment variable holding the PIN (here and when the server runs)",
    )
    hsm.add_argument(
        "--key-label-prefix",
        type=_key_label_prefix,
        metavar="P",
        help="label the keys Proot, Pdevices, Pbootstrap (default: root, devices, bootstrap)",
    )
    p.add_argument(
        "--offline-root",
        action="store_true",
        help="the root's key stays on another machine (`estkit root`): make the issuing CAs' "
        "keys and requests here, for `estkit ca import` (see the end of this help)",
    )
    hsm.add_argument(
        "--use-existing-keys",
        action="store_true",
        default=None,
        help="make the CAs' certificates for keys the token already holds under those "
        "labels (made in a key ceremony, say) instead of refusing; missing ones are made",
    )
    _command(p, cmd_server_init)
    p = server.add_parser("info", help="print the EST URL, trust anchor and an example")
    _data_dir_arg(p)
    _command(p, cmd_server_info)
    p = server.add_parser("run", help="serve EST over HTTPS")
    _data_dir_arg(p)
    p.add_argument("--host", help="listen address (default from config: 127.0.0.1)")
    p.add_argument("--port", type=_port, help="port, for this run (default from config: 8443)")
    p.add_argument("--workers", type=int, help="worker processes (default from config: 1)")
    _command(p, cmd_server_run)

    ca = sub.add_parser("ca", help="inspect the CAs").add_subparsers(
        dest="ca_command", required=True, metavar="ACTION"
    )
    p = ca.add_parser(
        "list", help="each CA and EST label, EST URL (per region) and SHA-256 fingerprint"
    )
    _data_dir_arg(p)
    p.add_argument("--json", action="store_true", help="as JSON")
    _command(p, cmd_ca_list)
    from estkit.cli.rotate_cmds import register_rotate

    register_rotate(ca, _data_dir_arg, _command)
    p = ca.add_parser("chain", help="print a CA's PEM chain (root: the devices' trust anchor)")
    _data_dir_arg(p)
    p.add_argument("--ca", default="root", help="devices, bootstrap or root (default)")
    _command(p, cmd_ca_chain)
    p = ca.add_parser(
        "import",
        help="install what an offline root signed: its certificate, the CA certificates, its CRL",
        description="Install what the offline root's machine produced for this server "
        "(`server init --offline-root`): the root's certificate, the issuing CA "
        "certificates it signed from this server's requests, and the root's CRL. "
        "Each is checked before anything is written: the root is self-signed, each CA "
        "certificate is a CA's, chains to the root and is for the key of that CA here, the "
        "CRL is the root's and current. Then the TLS server certificate is issued from the "
        "bootstrap CA, if there is none yet. Run it again with a new --root-crl whenever "
        "the root signs one; a running server serves it within a second.",
        epilog="exit status: 0 imported (what is still missing is printed); 1 refused (the "
        "line says why; nothing written); 2 bad arguments; 78 the config, a CA key or its "
        "token does not work",
    )
    _data_dir_arg(p)
    p.add_argument("--root", type=Path, metavar="FILE", help="root.pem of the root's directory")
    p.add_argument(
        "--root-fingerprint",
        metavar="SHA256",
        help="refuse --root unless its SHA-256 fingerprint is this (as `root init` printed it)",
    )
    p.add_argument(
        "--cert",
        type=_import_cert_arg,
        action="append",
        default=[],
        metavar="NAME=FILE",
        help="an issuing CA's certificate, signed by the root (devices=devices.pem); repeatable",
    )
    p.add_argument(
        "--root-crl", type=Path, metavar="FILE", help="the root's CRL (`estkit root crl`)"
    )
    _command(p, cmd_ca_import)

    device = sub.add_parser("device", help="register and manage devices").add_subparsers(
        dest="device_command", required=True, metavar="ACTION"
    )
    p = device.add_parser("add", help="register a device; print a one-time enrollment secret")
    _data_dir_arg(p)
    p.add_argument("device_id")
    p.add_argument(
        "--rotate-secret",
        action="store_true",
        help="the device exists: give it a new secret (its unused ones stop working)",
    )
    _command(p, cmd_device_add)
    p = device.add_parser("bootstrap", help="local factory: key + bootstrap certificate")
    _data_dir_arg(p)
    p.add_argument("device_id")
    p.add_argument("--out", type=Path, required=True, help="directory for key/cert/chain.pem")
    p.add_argument("--key-type", choices=KEY_TYPES, default="ec-p256")
    p.add_argument(
        "--force",
        action="store_true",
        help="the device has a bootstrap certificate: replace it and revoke the old one",
    )
    _command(p, cmd_device_bootstrap)
    for action, status, text in (
        ("revoke", "decommissioned", "decommission: revoke all its certificates, refuse it"),
        ("decommission", "decommissioned", "same as revoke"),
        ("disable", "disabled", "refuse the device until enabled again"),
        ("enable", "active", "accept a disabled device again"),
    ):
        p = device.add_parser(action, help=text)
        _data_dir_arg(p)
        p.add_argument("device_id")
        _command(p, functools.partial(_set_status, status_name=status))

    p = ca.add_parser(
        "iothub-verify", help="Azure IoT Hub proof-of-possession certificate for a code"
    )
    _data_dir_arg(p)
    p.add_argument("--code", required=True, help="the verification code IoT Hub shows")
    p.add_argument("--out", type=Path, required=True, help="PEM file to upload to IoT Hub")
    p.add_argument("--ca", default="devices", help="CA being verified (default devices)")
    _command(p, cmd_ca_iothub_verify)

    token = sub.add_parser("token", help="API clients and their bearer tokens").add_subparsers(
        dest="token_command", required=True, metavar="ACTION"
    )
    p = token.add_parser("create", help="create a token; printed once, alone on stdout")
    _data_dir_arg(p)
    p.add_argument("--name", required=True, help="the API client's name (unique)")
    p.add_argument(
        "--scope",
        action="append",
        required=True,
        choices=("provision", "read", "admin"),
        help="provision (factory), read, admin; repeatable",
    )
    p.add_argument("--expires", help="lifetime, e.g. 90d (default: no expiry)")
    _command(p, cmd_token_create)
    p = token.add_parser(
        "list",
        help="tokens with scopes, state, expiry, last use",
        epilog=read_cmds.list_epilog(empty_says_so_on="stderr"),
    )
    _data_dir_arg(p)
    read_cmds.add_json_option(p)
    _command(p, read_cmds.cmd_token_list)
    p = token.add_parser("revoke", help="revoke a token by name")
    _data_dir_arg(p)
    p.add_argument("name")
    _command(p, cmd_token_revoke)

    audit = sub.add_parser("audit", help="the audit log").add_subparsers(
        dest="audit_command", required=True, metavar="ACTION"
    )
    audit_cmds.register(audit)  # verify, checkpoint, public-key

    pending = sub.add_parser("pending", help="enrollments waiting for approval").add_subparsers(
        dest="pending_command", required=True, metavar="ACTION"
    )
    p = pending.add_parser(
        "list",
        help="requests waiting (--all: decided ones too)",
        epilog=read_cmds.list_epilog(empty_says_so_on="stderr"),
    )
    _data_dir_arg(p)
    p.add_argument("--all", action="store_true")
    read_cmds.add_json_option(p)
    _command(p, read_cmds.cmd_pending_list)
    for action, approve in (("approve", True), ("deny", False)):
        p = pending.add_parser(action, help=f"{action} a waiting request")
        _data_dir_arg(p)
        p.add_argument("id", type=int)
        p.add_argument("--reason", help="recorded in the audit log (and told the device if denied)")
        _command(p, functools.partial(_decide, approve=approve))

    cert = sub.add_parser("cert", help="manage issued certificates").add_subparsers(
        dest="cert_command", required=True, metavar="ACTION"
    )
    p = cert.add_parser("revoke", help="revoke one certificate by serial (hex)")
    _data_dir_arg(p)
    p.add_argument("serial")
    p.add_argument("--reason", choices=tuple(REASONS), default="unspecified")
    _command(p, cmd_cert_revoke)

    read_cmds.register(device=device, cert=cert, audit=audit)
