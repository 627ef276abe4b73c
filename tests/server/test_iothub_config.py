"""``[iothub]`` as ``server/config.py`` reads it: the hub, the policy and where its key is
(never the key itself), the endpoint and its trust anchor for tests, the API version."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from estkit.server.config import DEFAULT_CONFIG, ConfigError, IotHubConfig, parse_config

DATA_DIR = Path("/srv/estkit")
MINIMAL = {
    "host": "MyHub.azure-devices.net",
    "policy_name": "registryReadWrite",
    "policy_key_file": "iothub.key",
}


def _text() -> str:
    return DEFAULT_CONFIG.format(port=7443, public_host="localhost", crl_port=7444)


def _parse(iothub: dict[str, Any] | None) -> IotHubConfig | None:
    data = tomllib.loads(_text())
    if iothub is not None:
        data["iothub"] = iothub
    return parse_config(data, DATA_DIR).iothub


def test_without_the_section_nothing_is_synced() -> None:
    assert _parse(None) is None


def test_the_defaults_reach_the_hub_itself() -> None:
    assert _parse(MINIMAL) == IotHubConfig(
        host="myhub.azure-devices.net",
        policy_name="registryReadWrite",
        policy_key_file=DATA_DIR / "iothub.key",
        endpoint="https://MyHub.azure-devices.net",
        ca_file=None,
        api_version="2021-04-12",
        create_identities=False,
    )


def test_the_commented_section_of_the_default_config_parses() -> None:
    text = _text()
    start = text.index("# [iothub]")
    section = re.sub(r"^# (\[iothub\]|\w+ = )", r"\1", text[start:], flags=re.M)
    config = parse_config(tomllib.loads(text[:start] + section), DATA_DIR).iothub
    assert config is not None
    assert (config.host, config.policy_key_file) == (
        "myhub.azure-devices.net",
        Path("/etc/estkit/iothub.key"),
    )


def test_an_endpoint_and_trust_anchor_for_tests_are_read() -> None:
    config = _parse(
        {
            **MINIMAL,
            "endpoint": "https://127.0.0.1:8999/",
            "ca_file": "registry-ca.pem",
            "api_version": "2020-05-31-preview",
            "create_identities": True,
        }
    )
    assert config is not None
    assert config.endpoint == "https://127.0.0.1:8999"
    assert config.ca_file == DATA_DIR / "registry-ca.pem"
    assert config.api_version == "2020-05-31-preview"
    assert config.create_identities


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"create_identity": True}, "unknown key iothub.create_identity (did you mean"),
        ({"policy_key": "c2VjcmV0"}, "iothub.policy_key: a key is never written in the config"),
        ({"host": None}, "iothub.host: required"),
        ({"host": "myhub"}, "iothub.host: the hub's host name"),
        ({"policy_name": "a b"}, "iothub.policy_name: a shared access policy's name"),
        ({"policy_key_file": None}, "iothub.policy_key_file: required"),
        ({"endpoint": "http://127.0.0.1:80"}, "iothub.endpoint: an https://HOST[:PORT] URL"),
        ({"endpoint": "https://h/devices"}, "iothub.endpoint: an https://HOST[:PORT] URL"),
        ({"api_version": "latest"}, "iothub.api_version: a date such as 2021-04-12"),
        ({"create_identities": "yes"}, "iothub.create_identities: expected bool"),
        ({"ca_file": 3}, "iothub.ca_file: expected str"),
    ],
    ids=[
        "fail/typo",
        "fail/key-in-config",
        "fail/no-host",
        "fail/host-not-a-fqdn",
        "fail/policy-name",
        "fail/no-key-file",
        "fail/plain-http",
        "fail/endpoint-path",
        "fail/api-version",
        "fail/create-not-bool",
        "fail/ca-file-not-str",
    ],
)
def test_bad_values_are_refused_naming_the_field(changes: dict[str, Any], message: str) -> None:
    table = {**MINIMAL, **changes}
    table = {k: v for k, v in table.items() if v is not None}
    with pytest.raises(ConfigError, match=re.escape(message)):
        _parse(table)
