"""``[metrics]`` and ``[server] log_format`` as ``server/config.py`` reads them: off and
text by default, every value checked, unknown keys refused by name."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

import pytest

from estkit.server.config import DEFAULT_CONFIG, ConfigError, MetricsConfig, parse_config

DATA_DIR = Path("/srv/estkit")


def _data(**sections: dict[str, Any]) -> dict[str, Any]:
    data = tomllib.loads(DEFAULT_CONFIG.format(port=7443, public_host="localhost", crl_port=7444))
    data = copy.deepcopy(data)
    for name, table in sections.items():
        data.setdefault(name, {}).update(table)
    return data


def test_metrics_are_off_and_logs_are_text_by_default() -> None:
    config = parse_config(_data(), DATA_DIR)
    assert config.metrics == MetricsConfig(host="127.0.0.1", port=0)
    assert config.log_format == "text"
    config = parse_config(_data(metrics={"port": 9464}, server={"log_format": "json"}), DATA_DIR)
    assert (config.metrics.port, config.log_format) == (9464, "json")


@pytest.mark.parametrize(
    ("sections", "error"),
    [
        ({"metrics": {"prot": 9464}}, "unknown key metrics.prot (did you mean port?)"),
        ({"server": {"log_fromat": "json"}}, "unknown key server.log_fromat (did you mean log_"),
        ({"metrics": {"port": 70000}}, "metrics.port: must be 0-65535"),
        ({"metrics": {"port": "9464"}}, "metrics.port: expected int"),
        ({"metrics": {"port": 7443}}, "metrics.port: 7443 is server.port too"),
        ({"metrics": {"port": 7444}}, "metrics.port: 7444 is crl.http_port too"),
        ({"metrics": {"host": 127}}, "metrics.host: expected str"),
        ({"server": {"log_format": "xml"}}, "server.log_format: one of text, json, got 'xml'"),
    ],
    ids=["fail/typo-port", "fail/typo-log-format", "fail/port-range", "fail/port-type",
         "fail/port-is-https", "fail/port-is-crl", "fail/host-type", "fail/format"],
)  # fmt: skip
def test_a_bad_setting_fails_naming_its_field(sections: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config(_data(**sections), DATA_DIR)
    assert error in str(raised.value)


def test_uvicorns_text_access_lines_leave_the_query_out() -> None:
    import logging

    from estkit.server.logs import WithoutQuery, log_config

    config = log_config("text", level=logging.INFO)
    assert "no_query" in config["handlers"]["access"]["filters"]
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5", "GET", "/ui/oidc/callback?code=SECRET&state=S", "1.1", 200), None,
    )  # fmt: skip
    assert WithoutQuery().filter(record)
    assert "SECRET" not in record.getMessage()
    assert record.getMessage() == '127.0.0.1:5 - "GET /ui/oidc/callback HTTP/1.1" 200'
