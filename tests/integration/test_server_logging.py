"""The server's stderr: the access log is off unless configured, and never carries credentials."""

from __future__ import annotations

import base64
import ssl
import urllib.request

import pytest

from estserver import EstServer, set_config


def _get(server: EstServer, path: str, headers: dict[str, str] | None = None) -> int:
    ctx = ssl.create_default_context(cafile=str(server.root_pem))
    request = urllib.request.Request(f"{server.origin}{path}", headers=headers or {})
    with urllib.request.urlopen(request, context=ctx, timeout=10) as response:
        return int(response.status)


@pytest.mark.parametrize("access_log", [True, False], ids=["on", "off (default)"])
def test_access_log_lines_follow_the_config(fresh_server: EstServer, access_log: bool) -> None:
    if access_log:
        set_config(fresh_server.data_dir, "server", "access_log", "true")
    fresh_server.start()
    secret = "not-for-logs-" + "x" * 12
    basic = base64.b64encode(f"dev:{secret}".encode()).decode()
    assert _get(fresh_server, "/.well-known/est/cacerts", {"Authorization": f"Basic {basic}"})
    assert _get(fresh_server, "/health?marker=1") == 200
    fresh_server.stop()  # every line the server would write is written by now
    log = fresh_server.log()
    assert ("GET /.well-known/est/cacerts HTTP/1.1" in log) is access_log
    assert secret not in log and basic not in log
