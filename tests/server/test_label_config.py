"""The labels' serverkeygen and channel-binding settings as ``server/config.py`` reads them,
and what ``wiring`` makes of them (csrattrs asks for challengePassword where needed)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from estkit.pki.binding import CHALLENGE_PASSWORD
from estkit.server.config import DEFAULT_CONFIG, ConfigError, LabelConfig, parse_config
from estkit.server.wiring import _announced

DATA_DIR = Path("/srv/estkit")


def label(**settings: Any) -> LabelConfig:
    data = tomllib.loads(DEFAULT_CONFIG.format(port=7443, public_host="localhost", crl_port=7444))
    data["labels"]["devices"].update(settings)
    return parse_config(data, DATA_DIR).labels["devices"]


def test_serverkeygen_and_channel_binding_are_off_by_default() -> None:
    lb = label()
    assert (lb.serverkeygen, lb.serverkeygen_key_type, lb.require_channel_binding) == (
        False,
        "ec-p256",
        False,
    )


@pytest.mark.parametrize("key_type", ["ec-p256", "ec-p384", "rsa-2048", "rsa-3072"])
def test_serverkeygen_key_types(key_type: str) -> None:
    lb = label(serverkeygen=True, serverkeygen_key_type=key_type)
    assert lb.serverkeygen and lb.serverkeygen_key_type == key_type


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"serverkeygen_key_type": "rsa-4096"}, "labels.devices.serverkeygen_key_type: one of"),
        ({"serverkeygen_key_type": "ed25519"}, "labels.devices.serverkeygen_key_type: one of"),
        ({"serverkeygen": "yes"}, "labels.devices.serverkeygen: expected bool"),
        (
            {"serverkeygen": True, "approval": True},
            "labels.devices.serverkeygen: not with approval",
        ),
        ({"require_channel_binding": 1}, "labels.devices.require_channel_binding: expected bool"),
        ({"serverkeygn": True}, "did you mean serverkeygen?"),
    ],
    ids=["rsa-4096", "ed25519", "not-bool", "with-approval", "binding-not-bool", "typo"],
)
def test_bad_settings_are_refused_naming_the_field(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("?", r"\?")):
        label(**settings)


def test_csrattrs_announces_challenge_password_where_binding_is_required() -> None:
    bound = label(require_channel_binding=True)
    assert _announced(bound)[-1] == CHALLENGE_PASSWORD
    assert _announced(bound)[:-1] == bound.csrattrs
    assert CHALLENGE_PASSWORD not in _announced(label())
    listed = label(require_channel_binding=True, csrattrs=["1.2.840.113549.1.9.7"])
    assert _announced(listed) == (CHALLENGE_PASSWORD,)
