"""The agent config: defaults, paths, durations, and errors that name the field."""

from __future__ import annotations

import datetime as dt
import tomllib
from pathlib import Path
from typing import Any

import pytest
from agentca import DeviceCa

from estkit.agent.config import KEYS, AgentConfig, duration_seconds, load_config, parse_config
from estkit.agent.errors import ConfigError, UnknownKeys
from estkit.agent.renewal import load_credentials
from estkit.agent.state import StateDirectory
from estkit.pki.certs import certs_to_pem
from estkit.pki.keys import generate_key, key_to_pem

MINIMAL = """
device_id = "sensor-0042"
state_dir = "state"
[est]
url = "https://est.example:7443/.well-known/est"
trust_anchor = "anchor.pem"
[bootstrap]
cert = "/etc/estkit/bootstrap/cert.pem"
key = "/etc/estkit/bootstrap/key.pem"
"""

EXAMPLE = Path(__file__).parents[2] / "deploy" / "agent.example.toml"


def _parse(text: str, path: Path = Path("/etc/estkit/agent.toml")) -> AgentConfig:
    return parse_config(tomllib.loads(text), path=path)


def test_minimal_config_gets_documented_defaults() -> None:
    config = _parse(MINIMAL)
    assert config.device_id == "sensor-0042"
    assert config.state_dir == Path("/etc/estkit/state")  # relative to the config file
    assert config.est.trust_anchor == Path("/etc/estkit/anchor.pem")
    assert (config.est.timeout, config.est.total_timeout) == (20, 60)
    assert config.bootstrap.fallback is True and config.bootstrap.chain is None
    r = config.renewal
    assert (r.key_type, r.rotate_key, r.fraction, r.jitter) == ("ec-p256", True, 0.8, 0.05)
    assert (r.retry_min, r.retry_max, r.clock_tolerance) == (10, 900, 300)
    assert config.hooks.commands == () and config.hub is None


def test_full_config_from_deploy_example_is_valid() -> None:
    example = EXAMPLE
    config = load_config(example)
    assert config.hub is not None and config.hub.port == 8883
    assert config.hub.username(config.device_id) == (
        f"{config.hub.hub_name}/{config.device_id}/?api-version=2021-04-12"
    )


def test_hub_and_hooks_sections() -> None:
    config = _parse(
        MINIMAL
        + """
[hooks]
commands = ["systemctl reload my-app", ["/usr/bin/logger", "-t", "estkit", "renewed"]]
timeout = "1m"
[hub]
host = "hub.azure-devices.net"
ca_file = "/etc/ssl/hub-ca.pem"
telemetry_interval = "30s"
"""
    )
    assert config.hooks.commands == (
        ("systemctl", "reload", "my-app"),
        ("/usr/bin/logger", "-t", "estkit", "renewed"),
    )
    assert config.hooks.timeout == 60
    hub = config.hub
    assert hub is not None and hub.enabled and hub.port == 8883
    assert hub.hub_name == "hub.azure-devices.net"  # defaults to the host
    assert hub.telemetry_interval == 30 and hub.keepalive == 60


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (30, 30.0),
        (0.5, 0.5),
        ("500ms", 0.5),
        ("45s", 45.0),
        ("15m", 900.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        ("1.5h", 5400.0),
        ("2w", 14 * 86400.0),
        (" 7 ", 7.0),
    ],
    ids=["int", "float", "ms", "s", "m", "h", "d", "fraction", "w", "bare-string"],
)
def test_durations_use_the_one_grammar(value: object, seconds: float) -> None:
    assert duration_seconds(value, "x") == seconds


@pytest.mark.parametrize(
    "value", [0, -1, "0s", "soon", "5 weeks", True, [1]], ids=lambda v: repr(v)
)
def test_bad_durations_name_the_field(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^renewal\.retry_min: "):
        duration_seconds(value, "renewal.retry_min")


def _replace(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new)


BAD: list[tuple[str, str, str]] = [
    ("missing/device_id", _replace(MINIMAL, 'device_id = "sensor-0042"', ""), "device_id"),
    ("fail/device-id-slash", _replace(MINIMAL, "sensor-0042", "a/b"), "device_id"),
    ("fail/device-id-wildcard", _replace(MINIMAL, "sensor-0042", "a#"), "device_id"),
    # ':' ends a Basic user name; non-ASCII look-alikes are not the same id.
    ("fail/device-id-colon", _replace(MINIMAL, "sensor-0042", "c:d"), "device_id"),
    ("fail/device-id-fullwidth", _replace(MINIMAL, "sensor-0042", "\uff44ev-a"), "device_id"),
    ("fail/device-id-dot-dot", _replace(MINIMAL, "sensor-0042", ".."), "device_id"),
    # Azure allows 128 characters, but the id is the certificate's CN (at most 64).
    ("fail/device-id-65-chars", _replace(MINIMAL, "sensor-0042", "d" * 65), "device_id"),
    ("missing/state_dir", _replace(MINIMAL, 'state_dir = "state"', ""), "state_dir"),
    ("fail/url-http", _replace(MINIMAL, "https://est", "http://est"), "est.url"),
    ("fail/url-userinfo", _replace(MINIMAL, "https://est", "https://u:p@est"), "est.url"),
    ("missing/trust", _replace(MINIMAL, 'trust_anchor = "anchor.pem"', ""), "est.trust_anchor"),
    (
        "fail/both-trusts",
        _replace(
            MINIMAL,
            'trust_anchor = "anchor.pem"',
            'trust_anchor = "a.pem"\ntrust_anchor_fingerprint = "' + "AB" * 32 + '"',
        ),
        "est.trust_anchor",
    ),
    (
        "fail/fingerprint",
        _replace(MINIMAL, 'trust_anchor = "anchor.pem"', 'trust_anchor_fingerprint = "AB:CD"'),
        "est.trust_anchor_fingerprint",
    ),
    (
        "missing/bootstrap-key",
        _replace(MINIMAL, 'key = "/etc/estkit/bootstrap/key.pem"', ""),
        "bootstrap.key",
    ),
    ("fail/fallback-type", MINIMAL + 'fallback = "yes"\n', "bootstrap.fallback"),
    ("fail/fraction-1", MINIMAL + "[renewal]\nfraction = 1.0\n", "renewal.fraction"),
    ("fail/fraction-type", MINIMAL + '[renewal]\nfraction = "80%"\n', "renewal.fraction"),
    (
        "fail/jitter-too-big",
        MINIMAL + "[renewal]\nfraction = 0.5\njitter = 0.5\n",
        "renewal.jitter",
    ),
    ("fail/key-type", MINIMAL + '[renewal]\nkey_type = "ed25519"\n', "renewal.key_type"),
    (
        "fail/retry-max-below-min",
        MINIMAL + '[renewal]\nretry_min = "1m"\nretry_max = "10s"\n',
        "renewal.retry_max",
    ),
    ("fail/hook-type", MINIMAL + "[hooks]\ncommands = [1]\n", r"hooks.commands\[0\]"),
    ("fail/hook-empty", MINIMAL + '[hooks]\ncommands = [""]\n', r"hooks.commands\[0\]"),
    ("missing/hub-host", MINIMAL + "[hub]\nport = 8883\n", "hub.host"),
    ("fail/hub-port", MINIMAL + '[hub]\nhost = "h"\nport = 70000\n', "hub.port"),
    (
        "fail/total-timeout-below-timeout",
        _replace(MINIMAL, "[bootstrap]", 'timeout = "30s"\ntotal_timeout = "10s"\n[bootstrap]'),
        "est.total_timeout",
    ),
    ("fail/section-not-table", "hub = 1\n" + MINIMAL, "hub"),
]


@pytest.mark.parametrize(("text", "field"), [(t, f) for _, t, f in BAD], ids=[i for i, _, _ in BAD])
def test_bad_config_fails_naming_the_field(text: str, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{field}: "):
        _parse(text)


@pytest.mark.parametrize(
    ("text", "keys"),
    [
        (MINIMAL + "[renewal]\nfractoin = 0.7\n", ["renewal.fractoin"]),
        ('colour = "blue"\n' + MINIMAL, ["colour"]),
        (MINIMAL + "[server]\nworkerz = 3\n", ["server"]),
        (
            _replace(MINIMAL, "[bootstrap]", "urll = 1\n[bootstrap]")
            + "aproval = true\n[hub]\nhost = 'h'\nkeepalive_s = 5\n[hooks]\ncmds = []\n",
            ["est.urll", "bootstrap.aproval", "hub.keepalive_s", "hooks.cmds"],
        ),
    ],
    ids=["fail/one-in-a-section", "fail/top-level", "fail/unknown-section", "fail/one-per-section"],
)
def test_unknown_keys_are_refused_naming_each(text: str, keys: list[str]) -> None:
    with pytest.raises(UnknownKeys) as caught:
        _parse(text)
    assert list(caught.value.keys) == keys
    assert caught.value.field == keys[0]
    listed = ", ".join(repr(k) for k in keys)
    assert str(caught.value) == f"unknown key{'s' if len(keys) > 1 else ''} {listed}"


def test_unknown_keys_are_named_before_other_errors(tmp_path: Path) -> None:
    # A misspelt required key is reported as what it is, not as the key missing.
    path = tmp_path / "agent.toml"
    path.write_text(_replace(MINIMAL, "url =", "urll ="))
    with pytest.raises(UnknownKeys, match=r"^unknown key 'est.urll'$"):
        load_config(path)


def test_every_known_key_is_in_the_deploy_example() -> None:
    example = tomllib.loads(EXAMPLE.read_text())
    commented = EXAMPLE.read_text()
    for table, keys in KEYS.items():
        present = example if not table else example.get(table, {})
        for key in keys:
            assert key in present or f"# {key} =" in commented, f"{table}.{key}"


def test_unreadable_or_invalid_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("device_id = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def _files(
    tmp_path: Path, device_ca: DeviceCa, *, device_id: str = "sensor-0042"
) -> dict[str, Any]:
    key, cert = device_ca.issue(device_id, validity=dt.timedelta(days=1))
    (tmp_path / "cert.pem").write_bytes(certs_to_pem([cert]))
    (tmp_path / "key.pem").write_bytes(key_to_pem(key))
    (tmp_path / "chain.pem").write_bytes(certs_to_pem([device_ca.issuing]))
    (tmp_path / "anchor.pem").write_bytes(certs_to_pem([device_ca.root]))
    return {"cert": cert}


def _config_with_files(tmp_path: Path, extra: str = "") -> AgentConfig:
    text = f"""
device_id = "sensor-0042"
state_dir = "state"
[est]
url = "https://est.example:7443/.well-known/est"
trust_anchor = "anchor.pem"
[bootstrap]
cert = "cert.pem"
key = "key.pem"
chain = "chain.pem"
{extra}"""
    return _parse(text, path=tmp_path / "agent.toml")


def test_credentials_are_checked_at_start_and_the_chain_is_sent_with_the_certificate(
    tmp_path: Path, device_ca: DeviceCa
) -> None:
    files = _files(tmp_path, device_ca)
    config = _config_with_files(tmp_path)
    credentials = load_credentials(config, StateDirectory(config.state_dir))
    assert credentials.bootstrap == files["cert"]
    sent = credentials.bootstrap_auth.cert_path.read_bytes()
    assert sent == certs_to_pem([files["cert"], device_ca.issuing])
    assert credentials.trust.certificates == (device_ca.root,)


@pytest.mark.parametrize(
    ("damage", "field"),
    [
        ("key-of-another-cert", "bootstrap.key"),
        ("cert-missing", "bootstrap.cert"),
        ("cert-garbage", "bootstrap.cert"),
        ("cert-for-another-device", "bootstrap.cert"),
        ("anchor-garbage", "est.trust_anchor"),
    ],
    ids=lambda v: v,
)
def test_bad_credential_files_name_the_field(
    tmp_path: Path, device_ca: DeviceCa, damage: str, field: str
) -> None:
    _files(
        tmp_path,
        device_ca,
        device_id="other" if damage == "cert-for-another-device" else "sensor-0042",
    )
    if damage == "key-of-another-cert":
        (tmp_path / "key.pem").write_bytes(key_to_pem(generate_key("ec-p256")))
    elif damage == "cert-missing":
        (tmp_path / "cert.pem").unlink()
    elif damage == "cert-garbage":
        (tmp_path / "cert.pem").write_text("not a certificate")
    elif damage == "anchor-garbage":
        (tmp_path / "anchor.pem").write_text("nope")
    config = _config_with_files(tmp_path)
    with pytest.raises(ConfigError, match=rf"^{field}: "):
        load_credentials(config, StateDirectory(config.state_dir))


def test_a_device_id_of_64_characters_is_the_longest_accepted() -> None:
    longest = "d" * 64  # a certificate CN holds at most 64 (ub-common-name)
    assert _parse(_replace(MINIMAL, "sensor-0042", longest)).device_id == longest
