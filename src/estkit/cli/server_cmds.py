"""Server-side commands: ``server``, ``ca``, ``device``, ``cert``, ``token``, ``audit``, …

They need ``estkit[server]``; imports of server modules happen inside the
handlers so that a device-only install still starts the CLI, and each handler
first checks that the extra is installed (one line saying so, exit 69).
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import getpass
import importlib.util
import re
import socket
import sys
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from estkit.cli.errors import (
    EXIT_CONFIG,
    EXIT_LISTEN,
    EXIT_NEEDS_SERVER,
    EXIT_TEMPFAIL,
    SERVER_EXTRA,
    CliError,
)

if TYPE_CHECKING:
    from estkit.ca.authority import Authority
    from estkit.ca.errors import CaError
    from estkit.server.config import ServerConfig
    from estkit.store import SqlStore

DEFAULT_DATA_DIR = Path("var/estkit")
DEFAULT_PORT = 8443  # as server/config.py, which a device-only install cannot import
KEY_TYPES = ("ec-p256", "ec-p384", "rsa-2048", "rsa-3072")
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
    from estkit.server.wiring import build_authority, open_store
    from estkit.store.errors import SchemaError

    config = _load(args)
    try:
        return build_authority(config, open_store(config))
    except SchemaError as exc:
        raise CliError(str(exc)) from None


def _ca_error(exc: CaError, *, hint: str = "") -> CliError:
    """A refusal as one line: its reason (and what would make it pass), its exit code."""
    from estkit.ca.errors import Code, Refusal

    if not isinstance(exc, Refusal):
        return CliError(str(exc))
    later = exc.code in (Code.UNAVAILABLE, Code.RATE_LIMITED) or exc.retry_after is not None
    return CliError(f"{exc.reason}{hint}", exit_code=EXIT_TEMPFAIL if later else 1)


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
    from estkit.ca.setup import create_pki
    from estkit.server.config import CONFIG_NAME, DEFAULT_CONFIG, ConfigError, parse_config
    from estkit.store import SqlStore

    data_dir: Path = args.data_dir
    if args.join is not None:
        return _join(args)
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir.chmod(0o700)
    config_path = data_dir / CONFIG_NAME
    if config_path.exists():
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
        try:  # nothing written that the next command would refuse
            parse_config(tomllib.loads(text), data_dir)
        except ConfigError as exc:
            raise CliError(str(exc), exit_code=EXIT_CONFIG) from None
        write_atomic(config_path, text.encode(), mode=0o600)
        print(f"config: created {config_path}")
    config = _load(args)
    report = create_pki(
        ca_paths={n: (c.cert, c.key) for n, c in config.cas.items()},
        tls_cert=config.tls_cert,
        tls_key=config.tls_key,
        hostnames=args.hostname,
        key_type=args.key_type,
        organization=args.organization,
        now=_now(),
    )
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
    return 0


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
    migrated and no CA is created.
    """
    import json
    import tomllib

    from estkit.ca.files import write_atomic
    from estkit.server.config import (
        CONFIG_NAME,
        ConfigError,
        default_node_name,
        load_config,
        parse_config,
    )
    from estkit.store import SqlStore
    from estkit.store.errors import StoreError

    source: Path = args.join
    data_dir: Path = args.data_dir
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
    if args.database_url is not None:
        raise CliError("--join: the database is the joined node's; leave out --database-url")
    config_path = data_dir / CONFIG_NAME
    if config_path.exists():
        raise CliError(f"--join: {config_path} exists; a joining node needs a new data directory")
    if args.port is None:
        raise CliError("--join: --port is required (the new node's HTTPS port)")
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

    text = (source / CONFIG_NAME).read_text()
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir.chmod(0o700)
    files = [(f"cas.{n}", "cert", c.cert, False) for n, c in joined.cas.items()]
    files += [(f"cas.{n}", "key", c.key, True) for n, c in joined.cas.items()]
    files += [("tls", "cert", joined.tls_cert, False), ("tls", "key", joined.tls_key, True)]
    copied = 0
    for section, key, path, secret in files:
        try:
            relative = path.relative_to(joined.data_dir)
        except ValueError:  # outside the joined node's directory: into ours
            relative = Path("ca" if section.startswith("cas.") else "tls") / path.name
        target = data_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(target, path.read_bytes(), mode=0o600 if secret else 0o644)
        copied += 1
        literal = _literal(json.dumps(str(relative)))
        text = _set_toml_value(text, section, key, literal, insert=True) or text
    for section, key, value in (
        ("server", "port", str(port)),
        ("crl", "http_port", str(crl_port)),
        ("crl", "url", json.dumps(f"http://{hostname}:{crl_port}/crl")),
    ):
        if re.search(rf"^\[{section}\][ \t]*(#.*)?$", text, re.M) is None:
            text = f"{text.rstrip()}\n\n[{section}]\n"
        text = _set_toml_value(text, section, key, _literal(value), insert=True) or text
    args.public_url, args.node_name, args.region = public_url, name, region
    text = _node_settings(text, args)
    try:
        parse_config(tomllib.loads(text), data_dir)
    except (ConfigError, tomllib.TOMLDecodeError) as exc:
        raise CliError(f"{config_path}: not written: {exc}", exit_code=EXIT_CONFIG) from None
    write_atomic(config_path, text.encode(), mode=0o600)
    print(f"config: created {config_path}")
    print(f"node: {name}, region {region}, {public_url}")
    print(f"copied {copied} CA and TLS files from {source} (keys 0600)")
    print("database: shared with the joined node, not migrated")
    return 0


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


def cmd_server_info(args: argparse.Namespace) -> int:
    """What a person needs to point a device at this server, ready to copy."""
    from estkit.pki.certs import fingerprint, load_pem_certificates

    config = _load(args)
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
    from estkit.store import SqlStore
    from estkit.store.errors import StoreError

    config = _load(args)
    store = SqlStore.open(config.database_url)
    try:
        store.check_schema()
        regions = region_urls(store.list_nodes())
    except StoreError as exc:  # no schema yet, or the database is away: this node only
        print(f"warning: nodes not read from the database: {exc}", file=sys.stderr)
        regions = []
    finally:
        store.close()
    cas: list[dict[str, str]] = []
    for name, ca in config.cas.items():
        cert = load_pem_certificates(ca.cert.read_bytes())[0]
        cas.append(
            {
                "name": name,
                "subject": cert.subject.rfc4514_string(),
                "not_after": cert.not_valid_after_utc.isoformat(),
                "fingerprint_sha256": fingerprint(cert),
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
        print(f"CA {ca_out['name']}")
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
    certs = {n: load_pem_certificates(c.cert.read_bytes())[0] for n, c in config.cas.items()}
    sys.stdout.write(certs_to_pem(chain_to_root(certs[args.ca], certs)).decode())
    return 0


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


def cmd_token_list(args: argparse.Namespace) -> int:
    authority = _authority(args)
    for t in authority.store.list_tokens():
        state = "revoked" if t.revoked_at else "active"
        expires = t.expires_at.isoformat() if t.expires_at else "never"
        used = t.last_used_at.isoformat() if t.last_used_at else "never"
        print(f"{t.name}\t{','.join(sorted(t.scopes))}\t{state}\texpires {expires}\tused {used}")
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


def cmd_audit_verify(args: argparse.Namespace) -> int:
    authority = _authority(args)
    checked, broken, why = authority.store.verify_audit_chain()
    if broken is not None:
        raise CliError(
            f"audit log broken at entry {broken}: {why} ({checked} entries intact before it)"
        )
    print(f"audit log: {checked} entries, hash chain intact")
    return 0


def cmd_pending_list(args: argparse.Namespace) -> int:
    from estkit.store import PendingStatus

    authority = _authority(args)
    status = None if args.all else PendingStatus.PENDING
    after = None
    while True:
        page = authority.store.list_pending(status=status, after=after, limit=500)
        for p in page.items:
            print(
                f"{p.id}\t{p.status.value}\t{p.label}\t{p.device_id}\t{p.operation}\t"
                f"{p.created_at.isoformat()}\t{p.requested_by}"
            )
        if page.next is None:
            return 0
        after = int(page.next)


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
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    from estkit.ca.files import write_atomic
    from estkit.pki.certs import certs_to_pem
    from estkit.pki.keys import generate_key
    from estkit.pki.profiles import Kind, Profile, issue_leaf

    code = args.code.strip()
    if not code or len(code) > 64 or not code.isprintable():
        raise CliError("--code: the verification code IoT Hub shows (1-64 printable characters)")
    authority = _authority(args)
    if args.ca not in authority.cas:
        raise CliError(f"unknown CA {args.ca!r}; configured: {', '.join(authority.cas)}")
    ca = authority.cas[args.ca]
    # The key proves nothing and is thrown away: IoT Hub checks only the CA's signature.
    key = generate_key("ec-p256")
    cert = issue_leaf(
        profile=Profile("iothub-verification", Kind.OPERATIONAL, dt.timedelta(days=30)),
        public_key=key.public_key(),
        subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, code)]),
        sans=None,
        issuer=ca.cert,
        issuer_key=ca.key,
        now=_now(),
    )
    write_atomic(args.out, certs_to_pem([cert]))
    print(f"verification certificate for CN={code}, signed by {args.ca}: {args.out}")
    return 0


def register(sub: Any) -> None:
    from estkit.pki.revocation import REASONS

    server = sub.add_parser("server", help="initialise and run the EST server").add_subparsers(
        dest="server_command", required=True, metavar="ACTION"
    )
    p = server.add_parser("init", help="create config, CAs, TLS certificate and database once")
    _data_dir_arg(p)
    p.add_argument("--hostname", action="append", default=[], help="TLS name (repeatable)")
    p.add_argument("--key-type", choices=KEY_TYPES, default="ec-p256")
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
        "--node-name",
        metavar="NAME",
        help="unique among the nodes (default: the host's short name; --join: host-region-port)",
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
    p = ca.add_parser("chain", help="print a CA's PEM chain (root: the devices' trust anchor)")
    _data_dir_arg(p)
    p.add_argument("--ca", default="root", help="devices, bootstrap or root (default)")
    _command(p, cmd_ca_chain)

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
    p = token.add_parser("list", help="tokens with scopes, state, expiry, last use")
    _data_dir_arg(p)
    _command(p, cmd_token_list)
    p = token.add_parser("revoke", help="revoke a token by name")
    _data_dir_arg(p)
    p.add_argument("name")
    _command(p, cmd_token_revoke)

    audit = sub.add_parser("audit", help="the audit log").add_subparsers(
        dest="audit_command", required=True, metavar="ACTION"
    )
    p = audit.add_parser("verify", help="check the hash chain; name the first broken entry")
    _data_dir_arg(p)
    _command(p, cmd_audit_verify)

    pending = sub.add_parser("pending", help="enrollments waiting for approval").add_subparsers(
        dest="pending_command", required=True, metavar="ACTION"
    )
    p = pending.add_parser("list", help="requests waiting (--all: decided ones too)")
    _data_dir_arg(p)
    p.add_argument("--all", action="store_true")
    _command(p, cmd_pending_list)
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
