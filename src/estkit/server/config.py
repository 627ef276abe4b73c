"""Server configuration: ``estkit.toml`` in the data directory, loaded once and validated.

A bad config fails at start with the field name and the reason; a key the
server does not know is refused by name (a typo in a security setting must
not silently leave it off).
"""

from __future__ import annotations

import datetime as dt
import difflib
import re
import socket
import tomllib
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from estkit import durations
from estkit.ca.generations import FIRST, Generation, family_names
from estkit.ca.policy import (
    DEFAULT_MAX_SANS,
    SAN_TYPES,
    SERVERKEYGEN_KEY_TYPES,
    SUBJECT_ATTRIBUTES,
)
from estkit.ca.signers import OFFLINE, TokenKeyRef
from estkit.pki.profiles import Kind, Profile

CONFIG_NAME = "estkit.toml"
# The data directory, for processes that must find the config themselves
# (uvicorn's worker processes are spawned, not forked).
DATA_DIR_ENV = "ESTKIT_DATA_DIR"
CA_NAMES = ("root", "devices", "bootstrap")
DEFAULT_PORT = 8443
MAX_SANS_LIMIT = 100
SUBJECT_VALUE_MAX = 64

# Every key the server reads, per section. ``[cas.X]``, ``[profiles.X]`` and
# ``[labels.X]`` are tables of named tables; ``[api.oidc]`` checks its own keys
# (``server/oidc.py``), ``[profiles.X.subject]`` its attribute names.
SECTION_KEYS: Mapping[str, frozenset[str]] = {
    "server": frozenset(
        {
            "host",
            "port",
            "workers",
            "public_url",
            "max_request_bytes",
            "access_log",
            "log_format",
        }
    ),
    "tls": frozenset({"cert", "key"}),
    "database": frozenset({"url"}),
    "est": frozenset({"default_label"}),
    "enrollment": frozenset({"secret_validity"}),
    "crl": frozenset({"directory", "url", "validity", "http_host", "http_port"}),
    "ocsp": frozenset({"url", "validity"}),
    "api": frozenset({"oidc"}),
    "node": frozenset({"name", "region"}),
    "metrics": frozenset({"host", "port"}),
    "iothub": frozenset(
        {
            "host",
            "policy_name",
            "policy_key_file",
            "policy_key",
            "endpoint",
            "ca_file",
            "api_version",
            "create_identities",
        }
    ),
    "audit": frozenset({"checkpoint_file", "checkpoint_interval"}),
}
NAMED_SECTION_KEYS: Mapping[str, frozenset[str]] = {
    # ``pin`` is known so that it is refused with its own reason (``_ca``), not as a typo.
    "cas": frozenset(
        {
            "cert",
            "key",
            "signer",
            "module",
            "token_label",
            "key_label",
            "key_id",
            "pin_file",
            "pin_env",
            "pin",
            "crl",
            "replaces",
            "issues_from",
        }
    ),
    "profiles": frozenset({"kind", "validity", "subject"}),
    "labels": frozenset(
        {
            "ca",
            "profile",
            "base64_line_length",
            "permitted_san_types",
            "max_sans",
            "dns_wildcards",
            "csrattrs",
            "approval",
            "approval_retry_after",
            "serverkeygen",
            "serverkeygen_key_type",
            "require_channel_binding",
        }
    ),
}


class ConfigError(ValueError):
    """The configuration is invalid; the message names the field."""


def parse_duration(value: object, field: str) -> dt.timedelta:
    """A duration in ``estkit.durations``' grammar; the error names ``field``."""
    if value is None:
        raise ConfigError(f"{field}: required")
    try:
        return durations.parse_duration(value)
    except ValueError as exc:
        raise ConfigError(f"{field}: {exc}") from None


SIGNER_NAMES = ("file", "pkcs11", OFFLINE)
# The settings of each signer besides ``cert`` and ``signer``.
_SIGNER_KEYS: Mapping[str, frozenset[str]] = {
    "file": frozenset({"key"}),
    "pkcs11": frozenset({"module", "token_label", "key_label", "key_id", "pin_file", "pin_env"}),
    OFFLINE: frozenset({"crl"}),
}
_CA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_PIN_ENV = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True, slots=True)
class CaConfig:
    """A CA: its certificate and where its key is, a PEM file (``signer = "file"``,
    ``key_file``) or a PKCS#11 token (``signer = "pkcs11"``, ``token``), or nowhere on
    this server (``signer = "offline"``: an offline root, whose CRL, signed on its own
    machine and imported, is ``crl``)."""

    name: str
    cert: Path
    signer: str
    key_file: Path | None = None
    token: TokenKeyRef | None = None
    crl: Path | None = None
    # Rollover (``ca/generations.py``): the CA this one replaces, and from when it issues.
    generation: Generation = FIRST

    @property
    def offline(self) -> bool:
        return self.signer == OFFLINE

    @property
    def key(self) -> Path:
        """The key file of a ``file`` CA (kept for callers that know only file keys)."""
        if self.key_file is None:
            where = "not on this server" if self.offline else "in a PKCS#11 token"
            raise ConfigError(f"cas.{self.name}: its key is {where}, not in a file")
        return self.key_file


@dataclass(frozen=True, slots=True)
class LabelConfig:
    name: str
    ca: str
    profile: str
    # None: chosen per client (server/quirks.py); a number: for every client.
    base64_line_length: int | None
    permitted_san_types: frozenset[str]
    csrattrs: tuple[x509.ObjectIdentifier, ...]
    approval: bool = False
    retry_after: int = 60
    # At most this many subjectAltNames per certificate, on EST and the API alike.
    max_sans: int = DEFAULT_MAX_SANS
    # Whether a DNS SAN may be a wildcard (``*.example.com``).
    dns_wildcards: bool = False
    # RFC 7030 4.4 server-side key generation, and the key type it makes.
    serverkeygen: bool = False
    serverkeygen_key_type: str = "ec-p256"
    # RFC 7030 3.5: CSRs carry the TLS channel binding in their challengePassword.
    require_channel_binding: bool = False


@dataclass(frozen=True, slots=True)
class CrlConfig:
    directory: Path
    url: str  # base URL; a CA's CRL is at <url>/<ca>.crl
    http_host: str
    http_port: int  # 0: no built-in plain-HTTP listener
    validity: dt.timedelta


@dataclass(frozen=True, slots=True)
class OcspConfig:
    """OCSP (``ca/ocsp.py``), served on the CRL listener at ``/ocsp``: the URL issued
    certificates name in their AIA extension ("": none), and how long a response is valid."""

    url: str = ""
    validity: dt.timedelta = dt.timedelta(days=7)


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """This server in a fleet sharing one database: its name is unique among the nodes."""

    name: str
    region: str


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """Prometheus metrics over plain HTTP on their own port (``server/metrics.py``);
    port 0: off."""

    host: str = "127.0.0.1"
    port: int = 0


LOG_FORMATS = ("text", "json")


@dataclass(frozen=True, slots=True)
class AuditConfig:
    """Signed checkpoints of the audit log (``server/audit_checkpoints.py``): appended to
    ``checkpoint_file`` every ``checkpoint_interval``; no file, none."""

    checkpoint_file: Path | None = None
    checkpoint_interval: dt.timedelta = dt.timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class IotHubConfig:
    """Azure IoT Hub's identity registry, kept in step with the devices' status
    (``server/hubsync.py``): the hub, the shared access policy whose key is read from
    ``policy_key_file`` (never the config), where the registry is reached (``endpoint``:
    ``https://<host>`` but in tests, trusting ``ca_file`` there), its API version."""

    host: str
    policy_name: str
    policy_key_file: Path
    endpoint: str
    ca_file: Path | None
    api_version: str
    create_identities: bool


_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def default_node_name() -> str:
    """The host's short name when it is a usable node name, else ``node-1``."""
    host = socket.gethostname().split(".")[0]
    return host if _NODE_NAME.fullmatch(host) else "node-1"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    data_dir: Path
    host: str
    port: int
    workers: int
    public_url: str
    max_request_bytes: int
    access_log: bool
    tls_cert: Path
    tls_key: Path
    database_url: str
    cas: Mapping[str, CaConfig]
    profiles: Mapping[str, Profile]
    labels: Mapping[str, LabelConfig]
    default_label: str
    secret_validity: dt.timedelta
    crl: CrlConfig
    api: Mapping[str, Any]  # [api] table; parsed by the API's own modules
    node: NodeConfig = NodeConfig(name="node-1", region="default")
    ocsp: OcspConfig = OcspConfig()
    iothub: IotHubConfig | None = None  # no [iothub]: no registry sync
    audit: AuditConfig = AuditConfig()
    metrics: MetricsConfig = MetricsConfig()
    # "text", or "json": one JSON object per line with a request id (``server/logs.py``)
    log_format: str = "text"

    @property
    def est_url(self) -> str:
        return f"{self.public_url.rstrip('/')}/.well-known/est"


def unknown_keys(data: Mapping[str, Any]) -> list[str]:
    """Every key of ``data`` the server does not read, dotted, with a guess at the meant one."""
    found: list[str] = []

    def check(
        table: Mapping[str, Any],
        known: frozenset[str] | Mapping[str, Any],
        at: str,
        hint: str | None = None,
    ) -> None:
        for key in table:
            if key not in known:
                guess = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
                if hint is None and guess:
                    found.append(f"{at}{key} (did you mean {guess[0]}?)")
                else:
                    found.append(f"{at}{key}{hint or ''}")

    check(data, {**SECTION_KEYS, **NAMED_SECTION_KEYS}, "")
    for section, known in SECTION_KEYS.items():
        if isinstance(table := data.get(section), Mapping):
            check(table, known, f"{section}.")
    for section, known in NAMED_SECTION_KEYS.items():
        if not isinstance(tables := data.get(section), Mapping):
            continue
        for name, table in tables.items():
            if isinstance(table, Mapping):
                check(table, known, f"{section}.{name}.")
                if section == "profiles" and isinstance(subject := table.get("subject"), Mapping):
                    attributes = ", ".join(SUBJECT_ATTRIBUTES)
                    hint = f" (one of {attributes}; the CN is always the device id)"
                    check(subject, SUBJECT_ATTRIBUTES, f"{section}.{name}.subject.", hint)
    return found


def _section(data: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, Mapping):
        raise ConfigError(f"[{name}]: expected a table")
    return value


def _named_tables(data: Mapping[str, Any], name: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """``[name.X]`` tables: each X with its table."""
    for key, table in _section(data, name).items():
        if not isinstance(table, Mapping):
            raise ConfigError(f"{name}.{key}: expected a table ([{name}.{key}])")
        yield key, table


def _get(table: Mapping[str, Any], key: str, kind: type, field: str, default: Any = None) -> Any:
    value = table.get(key, default)
    if value is None:
        raise ConfigError(f"{field}: required")
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise ConfigError(f"{field}: expected {kind.__name__}, got {value!r}")
    return value


def load_config(data_dir: Path) -> ServerConfig:
    """Read and validate ``DATA_DIR/estkit.toml``."""
    path = data_dir / CONFIG_NAME
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: not found; run `estkit server init --data-dir {data_dir}`"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return parse_config(data, data_dir)


def parse_config(data: Mapping[str, Any], data_dir: Path) -> ServerConfig:
    if unknown := unknown_keys(data):
        plural = "s" if len(unknown) > 1 else ""
        raise ConfigError(f"{CONFIG_NAME}: unknown key{plural} {', '.join(unknown)}")
    base = data_dir.resolve()

    def path_of(value: str) -> Path:
        p = Path(value)
        return p if p.is_absolute() else base / p

    server = _section(data, "server")
    port = _get(server, "port", int, "server.port", DEFAULT_PORT)
    if not 0 < port < 65536:
        raise ConfigError("server.port: must be 1-65535")
    workers = _get(server, "workers", int, "server.workers", 1)
    if workers < 1:
        raise ConfigError("server.workers: must be at least 1")
    max_bytes = _get(server, "max_request_bytes", int, "server.max_request_bytes", 65536)
    if not 4096 <= max_bytes <= 16 * 1024 * 1024:
        raise ConfigError("server.max_request_bytes: 4096-16777216 (a CSR is a few KB)")
    tls = _section(data, "tls")
    db = _section(data, "database")
    db_url = database_url(_get(db, "url", str, "database.url", "sqlite:///estkit.db"))
    if db_url.startswith("sqlite:///") and not db_url.startswith("sqlite:////"):
        db_url = f"sqlite:///{path_of(db_url.removeprefix('sqlite:///'))}"

    cas = {name: _ca(name, table, path_of) for name, table in _named_tables(data, "cas")}
    families = _families(cas)
    for name in ("root", "bootstrap"):
        if name not in families.values():
            raise ConfigError(f"cas.{name}: required")

    profiles = {name: _profile(name, table) for name, table in _named_tables(data, "profiles")}
    if "bootstrap" not in profiles:
        raise ConfigError("profiles.bootstrap: required")
    labels = {
        name: _label(name, table, families=families, profiles=profiles)
        for name, table in _named_tables(data, "labels")
    }
    est = _section(data, "est")
    default_label = _get(est, "default_label", str, "est.default_label", "devices")
    if default_label not in labels:
        raise ConfigError(f"est.default_label: unknown label {default_label!r}")
    enrollment = _section(data, "enrollment")
    crl = _section(data, "crl")
    crl_port = _get(crl, "http_port", int, "crl.http_port", 0)
    if not 0 <= crl_port < 65536:
        raise ConfigError("crl.http_port: must be 0-65535")
    if crl_port == port:
        raise ConfigError(f"crl.http_port: {crl_port} is server.port too; give it another")
    crl_url = _get(crl, "url", str, "crl.url", "")
    if crl_url and not crl_url.startswith(("http://", "https://")):
        raise ConfigError(
            "crl.url: must be an http:// URL (or empty for no CRL distribution point)"
        )
    return ServerConfig(
        data_dir=base,
        host=_get(server, "host", str, "server.host", "127.0.0.1"),
        port=port,
        workers=workers,
        public_url=_get(
            server, "public_url", str, "server.public_url", f"https://localhost:{port}"
        ),
        max_request_bytes=max_bytes,
        access_log=_get(server, "access_log", bool, "server.access_log", False),
        tls_cert=path_of(_get(tls, "cert", str, "tls.cert", "tls/server.pem")),
        tls_key=path_of(_get(tls, "key", str, "tls.key", "tls/server.key")),
        database_url=db_url,
        cas=cas,
        profiles=profiles,
        labels=labels,
        default_label=default_label,
        secret_validity=parse_duration(
            enrollment.get("secret_validity", "7d"), "enrollment.secret_validity"
        ),
        crl=CrlConfig(
            directory=path_of(_get(crl, "directory", str, "crl.directory", "crl")),
            url=crl_url.rstrip("/"),
            http_host=_get(crl, "http_host", str, "crl.http_host", "127.0.0.1"),
            http_port=crl_port,
            validity=parse_duration(crl.get("validity", "7d"), "crl.validity"),
        ),
        api=_section(data, "api"),
        node=_node(_section(data, "node")),
        ocsp=_ocsp(_section(data, "ocsp"), crl),
        iothub=_iothub(_section(data, "iothub"), path_of) if "iothub" in data else None,
        audit=_audit(_section(data, "audit"), path_of),
        metrics=_metrics(
            _section(data, "metrics"), taken={"server.port": port, "crl.http_port": crl_port}
        ),
        log_format=_log_format(server),
    )


def _families(cas: Mapping[str, CaConfig]) -> dict[str, str]:
    """Each CA's family (``ca/generations.py``); the root has no generations here."""
    try:
        families = family_names({n: ca.generation.replaces for n, ca in cas.items()})
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    for name, family in families.items():
        if family == "root" and name != "root":
            raise ConfigError(
                f"cas.{name}.replaces: the root is not rotated this way (a new root needs "
                "its devices to trust it first); rotate the issuing CAs under it"
            )
    return families


def _generation(name: str, table: Mapping[str, Any], f: str) -> Generation:
    replaces = table.get("replaces")
    start = table.get("issues_from")
    if replaces is None and start is None:
        return FIRST
    if replaces is None:
        raise ConfigError(f"{f}.issues_from: only with replaces (the CA this one replaces)")
    if not isinstance(replaces, str) or not _CA_NAME.fullmatch(replaces):
        raise ConfigError(f"{f}.replaces: a CA's name, got {replaces!r}")
    if start is None:
        raise ConfigError(
            f"{f}.issues_from: required with replaces: the moment this CA starts issuing "
            "(e.g. issues_from = 2027-01-15T00:00:00Z)"
        )
    if isinstance(start, str):
        try:
            start = dt.datetime.fromisoformat(start)
        except ValueError:
            start = None
    if not isinstance(start, dt.datetime) or start.tzinfo is None:
        raise ConfigError(
            f"{f}.issues_from: a date and time with its offset, e.g. 2027-01-15T00:00:00Z"
        )
    return Generation(replaces=replaces, issues_from=start.astimezone(dt.UTC))


def _ca(name: str, table: Mapping[str, Any], path_of: Callable[[str], Path]) -> CaConfig:
    f = f"cas.{name}"
    if not _CA_NAME.fullmatch(name):
        raise ConfigError(f"{f}: CA names are 1-64 letters, digits, '-' or '_'")
    generation = _generation(name, table, f)
    if "pin" in table:
        raise ConfigError(
            f"{f}.pin: a PIN is never written in the config; use pin_file (a file only its "
            "owner can read) or pin_env (an environment variable)"
        )
    signer = _get(table, "signer", str, f"{f}.signer", "file")
    if signer not in SIGNER_NAMES:
        raise ConfigError(
            f"{f}.signer: unknown signer {signer!r} (available: {', '.join(SIGNER_NAMES)})"
        )
    if signer == OFFLINE and name != "root":
        raise ConfigError(
            f"{f}.signer: only the root may be {OFFLINE!r}; CA {name!r} signs on this server"
        )
    key_settings = _SIGNER_KEYS["file"] | _SIGNER_KEYS["pkcs11"]
    if signer == OFFLINE and (stray := sorted(key_settings & set(table))):
        raise ConfigError(
            f"{f}.{stray[0]}: the key of an offline root is never on this server "
            '(signer = "offline"); remove it'
        )
    for other, keys in _SIGNER_KEYS.items():
        if other != signer and (stray := sorted(keys & set(table))):
            raise ConfigError(f"{f}.{stray[0]}: only with signer = {other!r}, not {signer!r}")
    cert = path_of(_get(table, "cert", str, f"{f}.cert"))
    if signer == OFFLINE:
        crl = path_of(_get(table, "crl", str, f"{f}.crl", f"ca/{name}.crl"))
        if generation.replaces is not None:
            raise ConfigError(f"{f}.replaces: an offline root is not rotated this way")
        return CaConfig(name=name, cert=cert, signer=signer, crl=crl)
    if signer == "file":
        key = path_of(_get(table, "key", str, f"{f}.key"))
        return CaConfig(name=name, cert=cert, signer=signer, key_file=key, generation=generation)
    module = _get(table, "module", str, f"{f}.module")
    token_label = _get(table, "token_label", str, f"{f}.token_label")
    key_label = table.get("key_label")
    if key_label is not None and not (isinstance(key_label, str) and key_label):
        raise ConfigError(f"{f}.key_label: expected a non-empty string, got {key_label!r}")
    key_id = None
    if "key_id" in table:
        raw = _get(table, "key_id", str, f"{f}.key_id")
        try:
            key_id = bytes.fromhex(raw.replace(":", ""))
        except ValueError:
            key_id = b""
        if not key_id:
            raise ConfigError(f'{f}.key_id: the key\'s CKA_ID in hex (e.g. "01a2"), got {raw!r}')
    if key_label is None and key_id is None:
        raise ConfigError(f"{f}: key_label or key_id required (which key in the token)")
    pin_file = pin_env = None
    if "pin_file" in table:
        pin_file = path_of(_get(table, "pin_file", str, f"{f}.pin_file"))
    if "pin_env" in table:
        pin_env = _get(table, "pin_env", str, f"{f}.pin_env")
        if not _PIN_ENV.fullmatch(pin_env):
            raise ConfigError(f"{f}.pin_env: an environment variable's name, got {pin_env!r}")
    if (pin_file is None) == (pin_env is None):
        raise ConfigError(f"{f}: exactly one of pin_file or pin_env (where the PIN is read)")
    token = TokenKeyRef(
        module=path_of(module),
        token_label=token_label,
        key_label=key_label,
        key_id=key_id,
        pin_file=pin_file,
        pin_env=pin_env,
        field=f,
    )
    return CaConfig(name=name, cert=cert, signer=signer, token=token, generation=generation)


def _metrics(table: Mapping[str, Any], *, taken: Mapping[str, int]) -> MetricsConfig:
    """``[metrics]``; ``taken``: the other ports of this server, by setting."""
    port = _get(table, "port", int, "metrics.port", 0)
    if not 0 <= port < 65536:
        raise ConfigError("metrics.port: must be 0-65535 (0: no metrics)")
    for setting, other in taken.items():
        if port and port == other:
            raise ConfigError(f"metrics.port: {port} is {setting} too; give it another")
    return MetricsConfig(host=_get(table, "host", str, "metrics.host", "127.0.0.1"), port=port)


def _log_format(server: Mapping[str, Any]) -> str:
    log_format = _get(server, "log_format", str, "server.log_format", "text")
    if log_format not in LOG_FORMATS:
        raise ConfigError(f"server.log_format: one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    return str(log_format)


def _audit(table: Mapping[str, Any], path_of: Callable[[str], Path]) -> AuditConfig:
    interval = parse_duration(table.get("checkpoint_interval", "1h"), "audit.checkpoint_interval")
    if interval < dt.timedelta(seconds=1):
        raise ConfigError("audit.checkpoint_interval: at least 1s")
    file = _get(table, "checkpoint_file", str, "audit.checkpoint_file", "")
    return AuditConfig(path_of(file) if file else None, interval)


_HUB_HOST = re.compile(r"(?=.{1,253}$)[A-Za-z0-9-]{1,63}(\.[A-Za-z0-9-]{1,63})+")
_API_VERSION = re.compile(r"\d{4}-\d{2}-\d{2}(-preview)?")


def _iothub(table: Mapping[str, Any], path_of: Callable[[str], Path]) -> IotHubConfig:
    if "policy_key" in table:
        raise ConfigError(
            "iothub.policy_key: a key is never written in the config; use policy_key_file "
            "(a file only its owner can read, holding the policy's base64 key)"
        )
    host = _get(table, "host", str, "iothub.host")
    if not _HUB_HOST.fullmatch(host):
        raise ConfigError(
            f"iothub.host: the hub's host name (myhub.azure-devices.net), got {host!r}"
        )
    policy = _get(table, "policy_name", str, "iothub.policy_name")
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", policy):
        raise ConfigError(
            f"iothub.policy_name: a shared access policy's name (registryReadWrite), got {policy!r}"
        )
    endpoint = _get(table, "endpoint", str, "iothub.endpoint", f"https://{host}").rstrip("/")
    parsed = urllib.parse.urlsplit(endpoint)
    if parsed.scheme != "https" or not parsed.hostname or parsed.path or parsed.query:
        raise ConfigError(f"iothub.endpoint: an https://HOST[:PORT] URL, got {endpoint!r}")
    api_version = _get(table, "api_version", str, "iothub.api_version", "2021-04-12")
    if not _API_VERSION.fullmatch(api_version):
        raise ConfigError(f"iothub.api_version: a date such as 2021-04-12, got {api_version!r}")
    ca_file = _get(table, "ca_file", str, "iothub.ca_file", "")
    return IotHubConfig(
        host=host.lower(),
        policy_name=policy,
        policy_key_file=path_of(_get(table, "policy_key_file", str, "iothub.policy_key_file")),
        endpoint=endpoint,
        ca_file=path_of(ca_file) if ca_file else None,
        api_version=api_version,
        create_identities=_get(table, "create_identities", bool, "iothub.create_identities", False),
    )


def _ocsp(table: Mapping[str, Any], crl: Mapping[str, Any]) -> OcspConfig:
    """``[ocsp]``; ``crl`` is the (valid) ``[crl]`` table: by default the URL is the
    CRL listener's, as ``crl.url`` names it, at ``/ocsp`` (none without that listener
    or without ``crl.url``), and responses are valid as long as a CRL is."""
    default = ""
    crl_url = urllib.parse.urlsplit(str(crl.get("url", "")))
    if crl_url.netloc and crl.get("http_port", 0):
        default = f"{crl_url.scheme}://{crl_url.netloc}/ocsp"
    url = _get(table, "url", str, "ocsp.url", default).rstrip("/")
    if url and not url.startswith(("http://", "https://")):
        raise ConfigError("ocsp.url: must be an http:// URL (or empty for no OCSP in certificates)")
    validity = parse_duration(table.get("validity", crl.get("validity", "7d")), "ocsp.validity")
    if validity < dt.timedelta(seconds=2):
        raise ConfigError("ocsp.validity: at least 2s (a response is renewed at half of it)")
    return OcspConfig(url=url, validity=validity)


def _node(table: Mapping[str, Any]) -> NodeConfig:
    name = _get(table, "name", str, "node.name", default_node_name())
    region = _get(table, "region", str, "node.region", "default")
    for field, value in (("node.name", name), ("node.region", region)):
        if not _NODE_NAME.fullmatch(value):
            raise ConfigError(
                f"{field}: 1-64 letters, digits, '.', '-' or '_' (starting with a letter "
                f"or digit), got {value!r}"
            )
    return NodeConfig(name=name, region=region)


def _profile(name: str, table: Mapping[str, Any]) -> Profile:
    f = f"profiles.{name}"
    kind_name = _get(table, "kind", str, f"{f}.kind")
    try:
        kind = Kind(kind_name)
    except ValueError:
        raise ConfigError(f"{f}.kind: one of operational, bootstrap") from None
    validity = parse_duration(table.get("validity"), f"{f}.validity")
    subject: list[tuple[str, str]] = []
    for attribute, value in _get(table, "subject", Mapping, f"{f}.subject", {}).items():
        where = f"{f}.subject.{attribute}"
        if not isinstance(value, str) or not value.strip() or len(value) > SUBJECT_VALUE_MAX:
            raise ConfigError(
                f"{where}: expected a non-empty string of at most {SUBJECT_VALUE_MAX} "
                f"characters, got {value!r}"
            )
        if attribute == "C" and not re.fullmatch(r"[A-Z]{2}", value):
            raise ConfigError(f"{where}: a two-letter country code (ISO 3166), got {value!r}")
        subject.append((attribute, value))
    return Profile(name=name, kind=kind, validity=validity, subject=tuple(subject))


def _label(
    name: str,
    table: Mapping[str, Any],
    *,
    families: Mapping[str, str],
    profiles: Mapping[str, Profile],
) -> LabelConfig:
    f = f"labels.{name}"
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
        raise ConfigError(f"{f}: label names are 1-64 letters, digits, '-' or '_'")
    ca = _get(table, "ca", str, f"{f}.ca")
    if ca not in families and ca not in families.values():
        raise ConfigError(f"{f}.ca: unknown CA {ca!r}")
    ca = families.get(ca, ca)  # a label issues from a family: its current generation
    if ca in ("root", "bootstrap"):
        # The root signs only CAs; the bootstrap CA's certificates are for the factory,
        # and a label issuing from it would take bootstrap certificates for operational ones.
        raise ConfigError(f"{f}.ca: an EST label issues from an issuing CA, not {ca!r}")
    profile = _get(table, "profile", str, f"{f}.profile")
    if profile not in profiles:
        raise ConfigError(f"{f}.profile: unknown profile {profile!r}")
    line = None
    if "base64_line_length" in table:
        line = _get(table, "base64_line_length", int, f"{f}.base64_line_length")
        if line < 0 or line % 4:
            raise ConfigError(f"{f}.base64_line_length: 0 or a positive multiple of 4")
    sans = _get(table, "permitted_san_types", list, f"{f}.permitted_san_types", ["dns", "uri"])
    if not all(isinstance(s, str) for s in sans):
        raise ConfigError(f"{f}.permitted_san_types: a list of {', '.join(SAN_TYPES)}")
    if unknown := set(sans) - set(SAN_TYPES):
        raise ConfigError(f"{f}.permitted_san_types: unknown {sorted(unknown)}")
    max_sans = _get(table, "max_sans", int, f"{f}.max_sans", DEFAULT_MAX_SANS)
    if not 0 <= max_sans <= MAX_SANS_LIMIT:
        raise ConfigError(f"{f}.max_sans: 0-{MAX_SANS_LIMIT}, got {max_sans}")
    oids = _get(table, "csrattrs", list, f"{f}.csrattrs", [])
    try:
        csrattrs = tuple(x509.ObjectIdentifier(o) for o in oids)
    except (ValueError, TypeError):
        raise ConfigError(f"{f}.csrattrs: dotted OIDs expected") from None
    retry_after = _get(table, "approval_retry_after", int, f"{f}.approval_retry_after", 60)
    if not 1 <= retry_after <= 86400:
        raise ConfigError(f"{f}.approval_retry_after: 1-86400 seconds")
    approval = _get(table, "approval", bool, f"{f}.approval", False)
    serverkeygen = _get(table, "serverkeygen", bool, f"{f}.serverkeygen", False)
    if serverkeygen and approval:
        raise ConfigError(
            f"{f}.serverkeygen: not with approval = true (the generated key would have to be "
            "kept until an operator decides; estkit never stores one)"
        )
    binding = _get(table, "require_channel_binding", bool, f"{f}.require_channel_binding", False)
    if binding and approval:
        raise ConfigError(
            f"{f}.require_channel_binding: not with approval = true (a device retries its "
            "pending CSR on later connections, where its binding no longer holds)"
        )
    key_type = _get(table, "serverkeygen_key_type", str, f"{f}.serverkeygen_key_type", "ec-p256")
    if key_type not in SERVERKEYGEN_KEY_TYPES:
        raise ConfigError(
            f"{f}.serverkeygen_key_type: one of {', '.join(SERVERKEYGEN_KEY_TYPES)}, "
            f"got {key_type!r}"
        )
    return LabelConfig(
        name=name,
        ca=ca,
        profile=profile,
        base64_line_length=line,
        permitted_san_types=frozenset(sans),
        csrattrs=csrattrs,
        approval=approval,
        retry_after=retry_after,
        max_sans=max_sans,
        dns_wildcards=_get(table, "dns_wildcards", bool, f"{f}.dns_wildcards", False),
        serverkeygen=serverkeygen,
        serverkeygen_key_type=key_type,
        require_channel_binding=binding,
    )


def database_url(url: str) -> str:
    """``url`` checked to name a backend estkit supports; ``postgresql://`` gets its
    driver (psycopg 3, the ``estkit[postgres]`` extra)."""
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url.removeprefix("postgresql://")
    if url.startswith(("sqlite:///", "postgresql+psycopg://")):
        return url
    raise ConfigError(
        f"database.url: expected sqlite:///FILE or postgresql://USER@HOST:PORT/DB, got {url!r}"
    )


DEFAULT_CONFIG = """\
# estkit server configuration, written by `estkit server init`.
# Relative paths are relative to this file's directory (the data directory).

[server]
# Address to listen on; 0.0.0.0 or :: to serve other machines.
host = "127.0.0.1"
port = {port}
# Worker processes; they share the listening socket and the database.
workers = 1
# The URL devices use to reach this server (printed by `estkit ca list`).
public_url = "https://{public_host}:{port}"
# Request bodies above this many bytes get 413.
max_request_bytes = 65536
# One line per HTTP request on stderr. Off: every decision is in the audit
# log already (`estkit audit`), and the line costs CPU on every enrollment.
access_log = false
# "text", or "json": one JSON object per log line (time, level, logger, message,
# request_id; method, route, status, duration_ms, client on access lines).
# Every response carries its request id in X-Request-ID.
log_format = "text"

[tls]
# The server's certificate chain and key. `server init` issues one under the
# estkit root, so the one trust anchor a device gets verifies the server too;
# point these at an operator-supplied certificate instead if you have one.
cert = "tls/server.pem"
key = "tls/server.key"

[database]
# SQLite file in the data directory; postgresql://user@host:port/db (the
# estkit[postgres] extra) for several nodes on one database.
url = "sqlite:///estkit.db"

# The CAs. `root` is the trust anchor devices are given; `devices` issues the
# short-lived operational certificates; `bootstrap` the factory certificates.
# signer = "file": the key is a PEM file (0600). signer = "offline" (the root
# only): its key is on another machine; cert and crl are what `estkit ca import`
# installed from there. signer = "pkcs11": the key is in a PKCS#11 token (an HSM;
# the estkit[hsm] extra), and never leaves it:
#   signer = "pkcs11"
#   module = "/usr/lib/softhsm/libsofthsm2.so"   # the vendor's PKCS#11 library
#   token_label = "estkit"
#   key_label = "devices"                         # and/or key_id = "<CKA_ID in hex>"
#   pin_file = "/etc/estkit/token.pin"            # 0600; or pin_env = "ESTKIT_TOKEN_PIN"
# (never the PIN itself in this file).
# `estkit ca rotate devices` adds the CA's next generation, [cas.devices-2], with
#   replaces = "devices"                          # and issues from then on:
#   issues_from = 2027-01-15T00:00:00Z
# (README "Rotating an issuing CA"); labels keep naming "devices".
[cas.root]
cert = "ca/root.pem"
key = "ca/root.key"
signer = "file"

[cas.devices]
cert = "ca/devices.pem"
key = "ca/devices.key"
signer = "file"

[cas.bootstrap]
cert = "ca/bootstrap.pem"
key = "ca/bootstrap.key"
signer = "file"

# Certificate profiles. validity: "30d", "12h", "1.5h", "90s", "2w", "10y"
# (seconds are fine for tests).
[profiles.operational]
kind = "operational"
validity = "30d"
# The issued subject is CN = device id plus these fixed attributes (C, ST, L, O,
# OU), in this order; nothing of a CSR's subject is copied.
# subject = {{ O = "Contoso", OU = "Sensors" }}

[profiles.bootstrap]
kind = "bootstrap"
validity = "3650d"

[est]
# The label served at /.well-known/est/ without a label segment.
default_label = "devices"

# EST labels: /.well-known/est/<label>/...
[labels.devices]
ca = "devices"
profile = "operational"
# Base64 line length of responses. Unset: each client gets what it can read
# (one line for strongSwan's pki, 64 columns for everyone else; README "Interop
# quirks"). Set, it applies to every client: 0 for one line, 64 or 76.
# base64_line_length = 64
# subjectAltName types a CSR may ask for: dns, uri, email, ip.
permitted_san_types = ["dns", "uri"]
# At most this many subjectAltNames per certificate (EST and API alike; 0-100).
# max_sans = 10
# Whether a DNS name may be a wildcard such as *.example.com.
# dns_wildcards = false
# OIDs announced by /csrattrs (here: ecdsa-with-SHA256). Empty: 204.
csrattrs = ["1.2.840.10045.4.3.2"]
# Manual approval: requests answer 202 + Retry-After until an operator approves
# (`estkit pending approve ID`, or the API); the device retries the same CSR.
approval = false
approval_retry_after = 60
# Server-side key generation (POST .../serverkeygen, RFC 7030 4.4): the server makes
# the key (ec-p256, ec-p384, rsa-2048 or rsa-3072) and returns it once, never storing
# it. Not with approval.
# serverkeygen = false
# serverkeygen_key_type = "ec-p256"
# Proof of possession linked to TLS (RFC 7030 3.5): CSRs must carry the connection's
# channel binding (tls-unique on TLS 1.2, tls-exporter on TLS 1.3) as their
# challengePassword; csrattrs then asks for it. Breaks behind a TLS-terminating proxy.
# require_channel_binding = false

[enrollment]
# How long a one-time enrollment secret from `estkit device add` stays usable.
secret_validity = "7d"

[crl]
# One CRL per CA, rewritten after every revocation and before half its validity
# has passed, as <directory>/<ca>.crl. Issued certificates carry <url>/<ca>.crl
# as their CRL distribution point (empty url: none).
directory = "crl"
url = "http://{public_host}:{crl_port}/crl"
validity = "7d"
# The built-in plain-HTTP listener that serves them (0: off, e.g. when another
# web server serves the directory).
http_host = "127.0.0.1"
http_port = {crl_port}

[ocsp]
# OCSP (RFC 6960) for every CA that signs here, on the same listener at /ocsp
# (GET and POST): good, revoked or unknown, signed by the CA. Issued certificates
# name url in their Authority Information Access (default: crl.url's host and
# port, /ocsp; "" for none). Responses are valid for validity (default: as long
# as a CRL) and renewed at half of it, or at once after a revocation.
# url = "http://{public_host}:{crl_port}/ocsp"
# validity = "7d"

[audit]
# Signed checkpoints of the audit log's head (entry count, last entry, its hash),
# appended by this node every checkpoint_interval to checkpoint_file, one line each,
# signed with its audit key (audit/checkpoint.key; `estkit audit public-key` prints
# the public key). Keep copies of both away from the database host: `estkit audit
# verify --checkpoints FILE --public-key PEM` then finds a log cut short, deleted or
# rewritten (README "Audit checkpoints"). No file: `estkit audit checkpoint` only.
# checkpoint_file = "/var/log/estkit/audit-checkpoints.jsonl"
# checkpoint_interval = "1h"

[metrics]
# Prometheus metrics of every worker, over plain HTTP at http://host:port/metrics
# (0: off). No authentication: keep host an address only the scraper reaches
# (README "Metrics and logs").
host = "127.0.0.1"
port = 0

[node]
# This node among the nodes sharing one PostgreSQL database: a name unique among
# them (default: this host's short name) and its region. `estkit server init
# --join` writes both for another node; `GET /api/v1/nodes` lists the nodes.
# name = "eu-1"
# region = "default"

[api]
# The REST API (/api/v1, OpenAPI at /api/openapi.json, Swagger UI at /api/docs)
# takes bearer tokens from `estkit token create`, and JWTs from an OIDC
# provider such as Entra ID when configured:
# [api.oidc]
# issuer = "https://login.microsoftonline.com/<tenant>/v2.0"
# audience = "api://estkit"
# jwks_url = "https://login.microsoftonline.com/<tenant>/discovery/v2.0/keys"
# The portal's "Sign in with …" (authorization code + PKCE): its own client at the
# provider, whose redirect URI is <public_url>/ui/login/oidc/callback, and a file
# with its client secret when the provider wants one:
# portal_client_id = "<client id of the portal's app registration>"
# portal_client_secret_file = "api/portal-client.secret"
# [api.oidc.clients]
# "<client id of the factory's service principal>" = ["provision"]
# "<sub of a person's ID token>" = ["admin"]    # signs in to the portal

# Azure IoT Hub's identity registry follows the devices (README "IoT Hub registry
# sync"): disabling or decommissioning a device disables its identity at the hub,
# which checks no CRL; enabling enables it again. Changes wait in the database
# until the hub has them (`estkit iothub sync` shows and sends them).
# [iothub]
# host = "myhub.azure-devices.net"
# policy_name = "registryReadWrite"          # a shared access policy with registry write
# policy_key_file = "/etc/estkit/iothub.key"  # its key in base64, mode 0600; never the key here
# create_identities = false                   # true: registering or provisioning a device
#                                             # creates its identity (certificateAuthority)
"""
