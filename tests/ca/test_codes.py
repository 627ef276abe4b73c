"""The refusal codes as a contract: each has one HTTP status, and both front-ends carry it
(EST: a header beside the text/plain reason; the API: RFC 9457 problem details)."""

from __future__ import annotations

import json

import pytest
from starlette.requests import Request

from estkit.ca.errors import FINAL, Code, Refusal
from estkit.server.errors import CODE_HEADER, REASON_HEADER, STATUS, refusal_response


def request(path: str) -> Request:
    return Request(
        {"type": "http", "method": "POST", "path": path, "headers": [], "query_string": b""}
    )


def test_codes_are_stable_strings() -> None:
    """Renaming a code changes what devices in the field do: the set is pinned here."""
    assert {c.value for c in Code} == {
        "bad-csr", "key-not-permitted", "bad-request", "authentication-required",
        "secret-invalid", "token-invalid", "certificate-required", "unknown-certificate",
        "wrong-ca", "expired", "not-yet-valid", "revoked", "not-registered", "disabled",
        "decommissioned", "name-mismatch", "subject-changed", "san-not-permitted",
        "name-constraints", "channel-binding-mismatch", "scope-missing", "approval-pending",
        "approval-denied", "not-found", "conflict", "rate-limited", "unavailable",
    }  # fmt: skip
    assert {Code.REVOKED, Code.DECOMMISSIONED} == FINAL


@pytest.mark.parametrize("code", list(Code), ids=[c.value for c in Code])
def test_every_code_reaches_the_est_client(code: Code) -> None:
    response = refusal_response(
        request("/.well-known/est/simpleenroll"), Refusal(code, "why, in words", retry_after=7)
    )
    assert response.status_code == STATUS[code]
    assert response.headers[CODE_HEADER] == code.value
    if response.status_code == 401:
        # No body (Bouncy Castle cannot skip one): the reason goes in a header.
        assert response.headers["www-authenticate"] == 'Basic realm="estkit"'
        assert response.headers[REASON_HEADER] == "why, in words"
        assert bytes(response.body) == b""
    else:
        assert response.headers["content-type"].startswith("text/plain")
        assert bytes(response.body) == b"why, in words\n"
    if response.status_code in (202, 429, 503):
        assert response.headers["retry-after"] == "7"


@pytest.mark.parametrize("code", list(Code), ids=[c.value for c in Code])
def test_every_code_reaches_the_api_client_as_problem_details(code: Code) -> None:
    response = refusal_response(request("/api/v1/devices"), Refusal(code, "why,\nin words"))
    assert response.status_code == STATUS[code]
    assert response.headers["content-type"] == "application/problem+json"
    body = json.loads(bytes(response.body))
    assert body == {
        "type": f"urn:estkit:refusal:{code.value}",
        "title": body["title"],
        "status": STATUS[code],
        "detail": "why, in words",
        "code": code.value,
    }
    if response.status_code == 401:
        assert response.headers["www-authenticate"].startswith("Bearer")


def test_statuses_by_kind() -> None:
    assert STATUS[Code.BAD_CSR] == 400
    assert STATUS[Code.SECRET_INVALID] == 401
    assert STATUS[Code.REVOKED] == 403
    assert STATUS[Code.CHANNEL_BINDING_MISMATCH] == 403
    assert STATUS[Code.NAME_CONSTRAINTS] == 403
    assert STATUS[Code.RATE_LIMITED] == 429
    assert STATUS[Code.UNAVAILABLE] == 503
    assert STATUS[Code.APPROVAL_PENDING] == 202
