"""The agent's config file (TOML): read once, validated, typed.

Every error names the field (``renewal.fraction: must be …``). Relative paths
are relative to the config file's directory. Durations are estkit's one
grammar (``estkit.durations``): seconds as a number, or a string with a unit,
``"500ms"``, ``"30s"``, ``"1.5h"``, ``"1d"``, ``"2w"``. The device id follows
the one device-id rule (``estkit.pki.names.check_device_id``). Unknown keys
are errors, checked before anything else and each named: a misspelt key
(``aproval``) would otherwise silently leave a setting at its default.

Files named here are checked when the agent starts (``load_credentials``),
not when the config is read, so ``estkit agent status`` works without
read access to the bootstrap key.
"""

from __future__ import annotations

import shlex
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from estkit import durations
from estkit.agent.errors import ConfigError, UnknownKeys
from estkit.pki import certs, keys
from estkit.pki.names import check_device_id

DEFAULT_API_VERSION = "2021-04-12"
# Every key the agent reads, per table ("" is the top level).
KEYS: Mapping[str, frozenset[str]] = {
    "": frozenset({"device_id", "state_dir", "est", "bootstrap", "renewal", "hooks", "hub"}),
    "est": frozenset(
        {"url", "trust_anchor", "trust_anchor_fingerprint", "timeout", "total_timeout"}
    ),
    "bootstrap": frozenset({"cert", "key", "chain", "fallback"}),
    "renewal": frozenset(
        {
            "key_type",
            "rotate_key",
            "fraction",
            "jitter",
            "retry_min",
            "retry_max",
            "clock_tolerance",
        }
    ),
    "hooks": frozenset({"commands", "timeout"}),
    "hub": frozenset(
        {
            "enabled",
            "host",
            "port",
            "hub_name",
            "ca_file",
            "telemetry_interval",
            "api_version",
            "keepalive",
            "reconnect_max",
        }
    ),
}


@dataclass(frozen=True, slots=True)
class EstSettings:
    url: str
    trust_anchor: Path | None
    trust_anchor_fingerprint: str | None
    timeout: float  # one attempt
    total_timeout: float  # one operation, its retries included


@dataclass(frozen=True, slots=True)
class BootstrapSettings:
    cert: Path
    key: Path
    chain: Path | None
    fallback: bool


@dataclass(frozen=True, slots=True)
class RenewalSettings:
    key_type: str
    rotate_key: bool
    fraction: float
    jitter: float
    retry_min: float
    retry_max: float
    clock_tolerance: float


@dataclass(frozen=True, slots=True)
class HookSettings:
    commands: tuple[tuple[str, ...], ...]
    timeout: float


@dataclass(frozen=True, slots=True)
class HubSettings:
    enabled: bool
    host: str
    port: int
    hub_name: str
    ca_file: Path | None
    telemetry_interval: float
    api_version: str
    keepalive: int
    reconnect_max: float

    def username(self, device_id: str) -> str:
        return f"{self.hub_name}/{device_id}/?api-version={self.api_version}"


@dataclass(frozen=True, slots=True)
class AgentConfig:
    path: Path
    device_id: str
    state_dir: Path
    est: EstSettings
    bootstrap: BootstrapSettings
    renewal: RenewalSettings
    hooks: HookSettings
    hub: HubSettings | None


def duration_seconds(value: object, field: str) -> float:
    """Seconds from a duration in estkit's grammar; must be positive (``ConfigError``)."""
    try:
        return durations.parse_duration(value).total_seconds()
    except ValueError as exc:
        raise ConfigError(field, str(exc)) from None


def unknown_keys(data: Mapping[str, Any]) -> Iterator[str]:
    """Each key of ``data`` the agent does not read, as ``table.key``."""
    for key in data:
        if key not in KEYS[""]:
            yield key
        elif key in KEYS and isinstance(data[key], dict):
            yield from (f"{key}.{k}" for k in data[key] if k not in KEYS[key])


class _Section:
    """One TOML table, read key by key (its keys were checked against ``KEYS`` first)."""

    def __init__(self, data: Mapping[str, Any], prefix: str, base: Path) -> None:
        self._data = data
        self._prefix = prefix
        self._base = base

    def field(self, key: str) -> str:
        return f"{self._prefix}{key}"

    def raw(self, key: str) -> Any:
        return self._data.get(key)

    def has(self, key: str) -> bool:
        return key in self._data

    def string(self, key: str, default: str | None = None) -> str:
        value = self.raw(key)
        if value is None:
            if default is None:
                raise ConfigError(self.field(key), "required")
            return default
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(self.field(key), f"expected a non-empty string, got {value!r}")
        return value.strip()

    def optional_string(self, key: str) -> str | None:
        if not self.has(key):
            return None
        return self.string(key)

    def path(self, key: str, *, required: bool = True) -> Path | None:
        if not self.has(key) and not required:
            return None
        path = Path(self.string(key)).expanduser()
        return path if path.is_absolute() else (self._base / path)

    def required_path(self, key: str) -> Path:
        path = self.path(key)
        assert path is not None
        return path

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ConfigError(self.field(key), f"expected true or false, got {value!r}")
        return value

    def number(self, key: str, default: float) -> float:
        value = self.raw(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(self.field(key), f"expected a number, got {value!r}")
        return float(value)

    def integer(self, key: str, default: int) -> int:
        value = self.raw(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(self.field(key), f"expected an integer, got {value!r}")
        return value

    def duration(self, key: str, default: float) -> float:
        value = self.raw(key)
        return default if value is None else duration_seconds(value, self.field(key))

    def table(self, key: str) -> _Section:
        value = self.raw(key)
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(self.field(key), "expected a table")
        return _Section(value, f"{self._prefix}{key}.", self._base)


def load_config(path: Path) -> AgentConfig:
    """Read and validate the agent config at ``path``."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("", f"cannot read config {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError("", f"config {path} is not UTF-8") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"config {path} is not valid TOML: {exc}") from exc
    return parse_config(data, path=path.resolve())


def parse_config(data: Mapping[str, Any], *, path: Path) -> AgentConfig:
    """Validate a parsed config; ``path`` is where it came from (relative paths start there)."""
    unknown = list(unknown_keys(data))
    if unknown:
        raise UnknownKeys(unknown)
    top = _Section(data, "", path.parent)
    device_id = top.string("device_id")
    try:
        check_device_id(device_id)
    except ValueError as exc:
        raise ConfigError("device_id", str(exc)) from None
    state_dir = top.required_path("state_dir")
    config = AgentConfig(
        path=path,
        device_id=device_id,
        state_dir=state_dir,
        est=_est(top.table("est")),
        bootstrap=_bootstrap(top.table("bootstrap")),
        renewal=_renewal(top.table("renewal")),
        hooks=_hooks(top.table("hooks")),
        hub=_hub(top.table("hub")) if top.has("hub") else None,
    )
    return config


def _est(s: _Section) -> EstSettings:
    url = s.string("url")
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise ConfigError(s.field("url"), f"expected https://host[:port]/path, got {url!r}")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ConfigError(s.field("url"), "must not carry credentials, a query or a fragment")
    anchor = s.path("trust_anchor", required=False)
    fingerprint = s.optional_string("trust_anchor_fingerprint")
    if (anchor is None) == (fingerprint is None):
        raise ConfigError(
            s.field("trust_anchor"), "set exactly one of trust_anchor and trust_anchor_fingerprint"
        )
    if fingerprint is not None:
        try:
            fingerprint = certs.normalize_fingerprint(fingerprint)
        except ValueError as exc:
            raise ConfigError(s.field("trust_anchor_fingerprint"), str(exc)) from exc
    timeout = s.duration("timeout", 20.0)
    # 20 s and 60 s by default, as the client core: an operation is a few attempts.
    total_timeout = s.duration("total_timeout", 3 * timeout)
    if total_timeout < timeout:
        raise ConfigError(
            s.field("total_timeout"),
            f"must not be below timeout ({timeout:g} s), got {total_timeout:g} s",
        )
    return EstSettings(
        url=url.rstrip("/"),
        trust_anchor=anchor,
        trust_anchor_fingerprint=fingerprint,
        timeout=timeout,
        total_timeout=total_timeout,
    )


def _bootstrap(s: _Section) -> BootstrapSettings:
    settings = BootstrapSettings(
        cert=s.required_path("cert"),
        key=s.required_path("key"),
        chain=s.path("chain", required=False),
        fallback=s.boolean("fallback", True),
    )
    return settings


def _renewal(s: _Section) -> RenewalSettings:
    key_type = s.string("key_type", "ec-p256")
    if key_type not in keys.KEY_TYPES:
        raise ConfigError(
            s.field("key_type"), f"expected one of {', '.join(keys.KEY_TYPES)}, got {key_type!r}"
        )
    fraction = s.number("fraction", 0.8)
    if not 0 < fraction < 1:
        raise ConfigError(s.field("fraction"), f"must be between 0 and 1, got {fraction:g}")
    jitter = s.number("jitter", 0.05)
    if not 0 <= jitter < fraction:
        raise ConfigError(
            s.field("jitter"),
            f"must be at least 0 and below fraction ({fraction:g}), got {jitter:g}",
        )
    retry_min = s.duration("retry_min", 10.0)
    retry_max = s.duration("retry_max", 900.0)
    if retry_max < retry_min:
        raise ConfigError(
            s.field("retry_max"),
            f"must not be below retry_min ({retry_min:g} s), got {retry_max:g}",
        )
    settings = RenewalSettings(
        key_type=key_type,
        rotate_key=s.boolean("rotate_key", True),
        fraction=fraction,
        jitter=jitter,
        retry_min=retry_min,
        retry_max=retry_max,
        clock_tolerance=s.duration("clock_tolerance", 300.0),
    )
    return settings


def _hooks(s: _Section) -> HookSettings:
    raw = s.raw("commands")
    commands: list[tuple[str, ...]] = []
    if raw is not None:
        if not isinstance(raw, list):
            raise ConfigError(s.field("commands"), "expected a list of commands")
        for i, item in enumerate(raw):
            field = f"{s.field('commands')}[{i}]"
            if isinstance(item, str):
                try:
                    argv = tuple(shlex.split(item))
                except ValueError as exc:
                    raise ConfigError(field, f"cannot split {item!r}: {exc}") from exc
            elif isinstance(item, list) and all(isinstance(a, str) for a in item):
                argv = tuple(item)
            else:
                raise ConfigError(field, "expected a string or a list of strings")
            if not argv or not argv[0]:
                raise ConfigError(field, "empty command")
            commands.append(argv)
    settings = HookSettings(commands=tuple(commands), timeout=s.duration("timeout", 60.0))
    return settings


def _hub(s: _Section) -> HubSettings:
    enabled = s.boolean("enabled", True)
    host = s.string("host")
    port = s.integer("port", 8883)
    if not 0 < port < 65536:
        raise ConfigError(s.field("port"), f"expected a TCP port, got {port}")
    keepalive = s.duration("keepalive", 60.0)
    if keepalive < 5:
        raise ConfigError(s.field("keepalive"), "must be at least 5 s")
    settings = HubSettings(
        enabled=enabled,
        host=host,
        port=port,
        hub_name=s.string("hub_name", host),
        ca_file=s.path("ca_file", required=False),
        telemetry_interval=s.duration("telemetry_interval", 60.0),
        api_version=s.string("api_version", DEFAULT_API_VERSION),
        keepalive=int(keepalive),
        reconnect_max=s.duration("reconnect_max", 60.0),
    )
    return settings
