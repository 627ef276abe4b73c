"""``[server] log_format = "json"`` on a real server with two workers: every line of its
output is one JSON object, every request has an id (the client's when sane) that its
response returns and its access line carries, and no secret or token is in any line."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from backends import server_database
from estserver import EstServer, make_server
from estutil import csr_der, http, issued_cert, new_key, post_csr

FIELDS = {"time", "level", "logger", "message", "request_id"}
ACCESS_FIELDS = FIELDS | {"method", "route", "path", "status", "duration_ms", "client"}
GENERATED_ID = re.compile(r"[0-9a-f]{24}")


@pytest.fixture
def server(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> Iterator[EstServer]:
    made = make_server(
        tmp_path,
        config={
            ("server", "workers"): "2",
            ("server", "log_format"): '"json"',
            ("server", "access_log"): "true",
        },
        database_url=server_database(request, backend),
    )
    made.start()
    try:
        yield made
    finally:
        made.stop()


def _lines(server: EstServer) -> list[dict[str, Any]]:
    """Every line the server wrote (stdout and stderr), each parsed as JSON."""
    assert server.log_path is not None
    text = server.log_path.read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines
    parsed = []
    for line in lines:
        entry = json.loads(line)  # a line that is not JSON fails here, with its text
        assert isinstance(entry, dict), line
        assert entry.keys() >= FIELDS, line
        parsed.append(entry)
    return parsed


def test_every_line_is_json_with_its_request_id_and_no_secret_or_token(
    server: EstServer, device_id: str
) -> None:
    secret = server.cli("device", "add", device_id).stdout.strip()
    token = server.cli("token", "create", "--name", "logs", "--scope", "read").stdout.strip()
    basic = base64.b64encode(f"{device_id}:{secret}".encode()).decode()
    with http(server.root_pem) as client:
        enrolled = post_csr(
            client,
            server.url + "/simpleenroll",
            csr_der(new_key(), device_id),
            auth=(device_id, secret),
        )
        issued_cert(enrolled)
        listed = client.get(
            f"{server.origin}/api/v1/devices/{device_id}?token={token}",
            headers={"Authorization": f"Bearer {token}"},
        )
        assert listed.status_code == 200, listed.text
        refused = client.get(
            f"{server.origin}/api/v1/devices", headers={"Authorization": f"Bearer {token}x"}
        )
        assert refused.status_code == 401
        sane = client.get(server.url + "/cacerts", headers={"X-Request-ID": "trace-42.a_b"})
        insane = client.get(server.url + "/cacerts", headers={"X-Request-ID": "x" * 65})
    assert sane.headers["x-request-id"] == "trace-42.a_b"
    assert GENERATED_ID.fullmatch(insane.headers["x-request-id"])
    server.stop()  # every line the server would write is written by now

    text = server.log_path.read_text() if server.log_path else ""
    for credential in (secret, basic, token):
        assert credential not in text
    entries = _lines(server)
    access = {e["request_id"]: e for e in entries if e["logger"] == "estkit.access"}
    for entry in access.values():
        assert entry.keys() >= ACCESS_FIELDS, entry
        assert isinstance(entry["duration_ms"], float | int) and entry["duration_ms"] >= 0
        assert re.fullmatch(r"127\.0\.0\.1:\d+", entry["client"]), entry
    expected = [
        (enrolled, "POST", "/.well-known/est/simpleenroll", 200, None),
        (listed, "GET", "/api/v1/devices/{device_id}", 200, None),
        (refused, "GET", "/api/v1/devices", 401, "token-invalid"),
        (sane, "GET", "/.well-known/est/cacerts", 200, None),
        (insane, "GET", "/.well-known/est/cacerts", 200, None),
    ]
    for answer, method, route, status, code in expected:
        entry = access.pop(answer.headers["x-request-id"])
        assert (entry["method"], entry["route"], entry["status"]) == (method, route, status)
        assert entry.get("code") == code
        assert "?" not in entry["path"]  # never the query string
    # Each request had an id of its own; the others were the readiness checks.
    assert {e["route"] for e in access.values()} == {"/health"}
    # The workers' and the supervisor's own lines are JSON too.
    assert any(
        e["logger"] == "uvicorn.error" and "Started server process" in e["message"] for e in entries
    )
