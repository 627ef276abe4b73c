"""``estkit.toml`` as ``server/config.py`` reads it: every key known, every value checked.

A key the server does not read is refused by name, in every section: a typo in
a security setting (``aproval = true``) must not silently leave it off.
"""

from __future__ import annotations

import copy
import datetime as dt
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from estkit.server.config import DEFAULT_CONFIG, ConfigError, ServerConfig, parse_config
from estserver import run_estkit, set_config

DATA_DIR = Path("/srv/estkit")


def default_data() -> dict[str, Any]:
    return tomllib.loads(DEFAULT_CONFIG.format(port=7443, public_host="localhost", crl_port=7444))


def parse(changes: dict[tuple[str, ...], Any]) -> ServerConfig:
    """The default config with each ``(table, ..., key): value`` set (None: deleted)."""
    data = copy.deepcopy(default_data())
    for path, value in changes.items():
        table = data
        for part in path[:-1]:
            table = table.setdefault(part, {})
        if value is None:
            del table[path[-1]]
        else:
            table[path[-1]] = value
    return parse_config(data, DATA_DIR)


def test_the_default_config_parses_with_its_commented_settings_too() -> None:
    text = DEFAULT_CONFIG.format(port=7443, public_host="localhost", crl_port=7444)
    uncommented = (
        re.sub(r"^# ((max_sans|dns_wildcards|subject) = .*)$", r"\1", text, flags=re.M)
        .replace("{{", "{")
        .replace("}}", "}")
    )
    assert uncommented != text
    config = parse_config(tomllib.loads(uncommented), DATA_DIR)
    assert config.labels["devices"].max_sans == 10
    assert config.profiles["operational"].subject == (("O", "Contoso"), ("OU", "Sensors"))


@pytest.mark.parametrize(
    ("path", "named"),
    [
        (("serverz",), "unknown key serverz (did you mean server?)"),
        (("server", "workerz"), "unknown key server.workerz (did you mean workers?)"),
        (("tls", "keyfile"), "unknown key tls.keyfile (did you mean key?)"),
        (("database", "uri"), "unknown key database.uri (did you mean url?)"),
        (("cas", "root", "kye"), "unknown key cas.root.kye (did you mean key?)"),
        (
            ("profiles", "operational", "valdity"),
            "unknown key profiles.operational.valdity (did you mean validity?)",
        ),
        (
            ("profiles", "operational", "subject", "CN"),
            "unknown key profiles.operational.subject.CN"
            " (one of C, ST, L, O, OU; the CN is always the device id)",
        ),
        (
            ("labels", "devices", "aproval"),
            "unknown key labels.devices.aproval (did you mean approval?)",
        ),
        (("est", "label"), "unknown key est.label"),
        (
            ("enrollment", "secret_valdity"),
            "unknown key enrollment.secret_valdity (did you mean secret_validity?)",
        ),
        (("crl", "http_prot"), "unknown key crl.http_prot (did you mean http_port?)"),
        (("api", "oidcc"), "unknown key api.oidcc (did you mean oidc?)"),
    ],
    ids=[
        "fail/top-level",
        "fail/server",
        "fail/tls",
        "fail/database",
        "fail/cas",
        "fail/profiles",
        "fail/profile-subject",
        "fail/labels",
        "fail/est",
        "fail/enrollment",
        "fail/crl",
        "fail/api",
    ],
)
def test_unknown_keys_are_refused_by_name(path: tuple[str, ...], named: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse({path: "x"})
    assert str(caught.value) == f"estkit.toml: {named}"


def test_every_unknown_key_is_named_in_one_line() -> None:
    with pytest.raises(ConfigError) as caught:
        parse({("server", "workerz"): 3, ("labels", "devices", "aproval"): True})
    message = str(caught.value)
    assert message.startswith("estkit.toml: unknown keys ")
    assert "server.workerz" in message and "labels.devices.aproval" in message
    assert "\n" not in message


def test_a_whole_label_of_unknown_keys_is_refused() -> None:
    label = {"ca": "devices", "profile": "operational", "issuer": "x", "lifetime": "1d"}
    with pytest.raises(ConfigError) as caught:
        parse({("labels", "extra"): label})
    assert "labels.extra.issuer, labels.extra.lifetime" in str(caught.value)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({("cas", "root"): "ca/root.pem"}, "cas.root: expected a table"),
        ({("server",): 3}, "[server]: expected a table"),
        ({("labels", "devices", "max_sans"): 101}, "labels.devices.max_sans: 0-100"),
        ({("labels", "devices", "max_sans"): -1}, "labels.devices.max_sans: 0-100"),
        ({("labels", "devices", "max_sans"): "10"}, "labels.devices.max_sans: expected int"),
        ({("labels", "devices", "max_sans"): True}, "labels.devices.max_sans: expected int"),
        (
            {("labels", "devices", "dns_wildcards"): "yes"},
            "labels.devices.dns_wildcards: expected bool",
        ),
        (
            {("profiles", "operational", "subject"): "O=Contoso"},
            "profiles.operational.subject: expected Mapping",
        ),
        (
            {("profiles", "operational", "subject", "O"): ""},
            "profiles.operational.subject.O: expected a non-empty string",
        ),
        (
            {("profiles", "operational", "subject", "OU"): "x" * 65},
            "profiles.operational.subject.OU: expected a non-empty string of at most 64",
        ),
        (
            {("profiles", "operational", "subject", "O"): 7},
            "profiles.operational.subject.O: expected a non-empty string",
        ),
        (
            {("profiles", "operational", "subject", "C"): "Germany"},
            "profiles.operational.subject.C: a two-letter country code",
        ),
        ({("profiles", "operational", "validity"): "soon"}, "profiles.operational.validity:"),
        ({("profiles", "operational", "validity"): None}, "profiles.operational.validity: req"),
        ({("profiles", "operational", "validity"): "0s"}, "profiles.operational.validity:"),
        ({("crl", "validity"): "-1d"}, "crl.validity:"),
        ({("enrollment", "secret_validity"): False}, "enrollment.secret_validity:"),
        ({("labels", "devices", "ca"): "bootstrap"}, "labels.devices.ca: an EST label"),
        ({("labels", "devices", "ca"): "root"}, "labels.devices.ca: an EST label"),
        ({("server", "max_request_bytes"): 0}, "server.max_request_bytes: 4096-"),
        ({("server", "port"): 9443, ("crl", "http_port"): 9443}, "crl.http_port: 9443 is"),
        (
            {
                ("labels", "devices", "approval"): True,
                ("labels", "devices", "require_channel_binding"): True,
            },
            "labels.devices.require_channel_binding: not with approval",
        ),
    ],
    ids=[
        "fail/ca-not-a-table",
        "fail/section-not-a-table",
        "fail/max-sans-above-100",
        "fail/max-sans-negative",
        "fail/max-sans-string",
        "fail/max-sans-bool",
        "fail/dns-wildcards-string",
        "fail/subject-not-a-table",
        "fail/subject-empty",
        "fail/subject-too-long",
        "fail/subject-not-a-string",
        "fail/subject-country-name",
        "fail/validity-words",
        "fail/validity-missing",
        "fail/validity-zero",
        "fail/crl-validity-negative",
        "fail/secret-validity-bool",
        "fail/label-from-bootstrap-ca",
        "fail/label-from-root",
        "fail/max-request-bytes-zero",
        "fail/crl-port-is-server-port",
        "fail/binding-with-approval",
    ],
)
def test_bad_values_are_refused_naming_the_field(
    changes: dict[tuple[str, ...], Any], field: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(changes)
    assert str(caught.value).startswith(field), caught.value


def test_label_limits_default_to_ten_sans_and_no_wildcards() -> None:
    label = parse({}).labels["devices"]
    assert (label.max_sans, label.dns_wildcards) == (10, False)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({("labels", "devices", "max_sans"): 0}, (0, False)),
        ({("labels", "devices", "max_sans"): 100}, (100, False)),
        ({("labels", "devices", "dns_wildcards"): True}, (10, True)),
    ],
    ids=["ok/no-sans", "ok/max-100", "ok/wildcards"],
)
def test_label_limits_are_read(
    changes: dict[tuple[str, ...], Any], expected: tuple[int, bool]
) -> None:
    label = parse(changes).labels["devices"]
    assert (label.max_sans, label.dns_wildcards) == expected


def test_profile_subject_keeps_the_written_order() -> None:
    subject = {"C": "DE", "O": "Contoso", "OU": "Sensors", "L": "Berlin", "ST": "Berlin"}
    profile = parse({("profiles", "operational", "subject"): subject}).profiles["operational"]
    assert profile.subject == tuple(subject.items())
    assert parse({}).profiles["operational"].subject == ()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1.5h", dt.timedelta(minutes=90)),
        ("2w", dt.timedelta(weeks=2)),
        (90, dt.timedelta(seconds=90)),
    ],
    ids=["ok/fraction", "ok/weeks", "ok/seconds-int"],
)
def test_validity_uses_the_one_duration_grammar(value: object, expected: dt.timedelta) -> None:
    profile = parse({("profiles", "operational", "validity"): value}).profiles["operational"]
    assert profile.validity == expected


def test_a_command_refuses_a_config_with_an_unknown_key_in_one_line(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    run_estkit("server", "init", "--data-dir", data_dir, "--port", "17443")
    set_config(data_dir, "labels.devices", "aproval", "true")
    proc = run_estkit("ca", "list", "--data-dir", data_dir, check=False)
    assert proc.returncode == 78
    assert proc.stderr == (
        "estkit: estkit.toml: unknown key labels.devices.aproval (did you mean approval?)\n"
    )
