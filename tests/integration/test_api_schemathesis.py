"""Property-based API tests: schemathesis makes requests from the live /api/openapi.json.

Whatever it sends, with an admin token or with none, the server answers
without a 5xx; without a token, with 401. The schema is loaded from a real
``estkit server run`` process that a module fixture starts, so it exists only
at run time. ``schemathesis.pytest.from_fixture`` is made for that, but its
lazy loader (schemathesis 4.32.5, pytest/lazy.py) renames the test through
``request.node._nodeid``, which pytest 9.2's nodes no longer have. So each
operation is a test of its own here, parametrized by a table that is checked
against the live schema, and drives Hypothesis with the operation's strategy
(``APIOperation.as_strategy``), the way schemathesis documents for use outside
its own decorator.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import requests
import schemathesis
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.strategies import SearchStrategy
from schemathesis import BaseSchema, Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig

from backends import server_database
from estserver import EstServer, make_server
from estutil import csr_der, http, new_key

# Each (operation, mode) gets this many generated cases: the file runs in well under a minute.
MAX_EXAMPLES = 10
FUZZ = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,  # a real server signs certificates: no per-example deadline
    database=None,  # no .hypothesis/ directory in the work tree
    derandomize=True,  # the same cases on every run, so a failure can be replayed
    phases=[Phase.explicit, Phase.generate],  # no shrinking: each step is a request
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@dataclass(frozen=True)
class Live:
    server: EstServer
    admin: str
    session: requests.Session  # one TLS connection for all the cases, not one each

    @property
    def verify(self) -> str:
        return str(self.server.root_pem)


@pytest.fixture(scope="module")
def live(
    request: pytest.FixtureRequest, backend: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Live]:
    server = make_server(
        tmp_path_factory.mktemp("fuzz"), database_url=server_database(request, backend)
    )
    admin = server.cli("token", "create", "--name", "fuzzer", "--scope", "admin").stdout.strip()
    server.start()
    try:
        _seed(server, admin)
        with requests.Session() as session:
            yield Live(server, admin, session)
    finally:
        server.stop()


def _seed(server: EstServer, admin: str) -> None:
    """A device with a certificate, so that listings and lookups are not all empty."""
    csr = x509.load_der_x509_csr(csr_der(new_key(), "dev-0001")).public_bytes(Encoding.PEM)
    with http(server.root_pem) as client:
        response = client.post(
            f"{server.origin}/api/v1/cas/bootstrap/certificates",
            headers={"Authorization": f"Bearer {admin}"},
            json={"device_id": "dev-0001", "csr": csr.decode()},
        )
    assert response.status_code == 201, response.text


@pytest.fixture(scope="module")
def api_schema(live: Live) -> BaseSchema:
    return schemathesis.openapi.from_url(
        f"{live.server.origin}/api/openapi.json",
        # The defaults, not whatever a schemathesis.toml lying around says.
        config=SchemathesisConfig(),
        verify=live.verify,
        timeout=30,
    )


# Every operation of the API. Listed here (and checked against the live schema) so each
# one is its own test with a readable id; the strategies come from the live schema.
OPERATIONS = [
    ("GET", "/api/v1/cas"),
    ("POST", "/api/v1/cas/{label}/certificates"),
    ("GET", "/api/v1/devices"),
    ("POST", "/api/v1/devices"),
    ("GET", "/api/v1/devices/{device_id}"),
    ("POST", "/api/v1/devices/{device_id}/disable"),
    ("POST", "/api/v1/devices/{device_id}/enable"),
    ("POST", "/api/v1/devices/{device_id}/decommission"),
    ("GET", "/api/v1/certificates"),
    ("GET", "/api/v1/certificates/{serial}"),
    ("POST", "/api/v1/certificates/{serial}/revoke"),
    ("GET", "/api/v1/audit"),
    ("GET", "/api/v1/pending"),
    ("POST", "/api/v1/pending/{request_id}/approve"),
    ("POST", "/api/v1/pending/{request_id}/deny"),
    ("GET", "/api/v1/nodes"),
]
OPERATION_IDS = [f"{m} {p.removeprefix('/api/v1')}" for m, p in OPERATIONS]
MODES = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]


def test_every_operation_of_the_live_schema_is_fuzzed(api_schema: BaseSchema) -> None:
    live_operations = {
        (op.method.upper(), op.path) for op in (r.ok() for r in api_schema.get_all_operations())
    }
    assert live_operations == set(OPERATIONS)


def _fuzz(strategy: SearchStrategy[Case], check: Callable[[Case], None]) -> None:
    @given(case=strategy)
    @FUZZ
    def run(case: Case) -> None:
        check(case)

    run()


@pytest.mark.parametrize("mode", MODES, ids=lambda m: f"ok/{m.value}")
@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=OPERATION_IDS)
def test_no_generated_request_with_an_admin_token_is_a_server_error(
    api_schema: BaseSchema, live: Live, method: str, path: str, mode: GenerationMode
) -> None:
    operation = api_schema[path][method]

    def check(case: Case) -> None:
        response = case.call(
            session=live.session,
            verify=live.verify,
            headers={"Authorization": f"Bearer {live.admin}"},
        )
        case.validate_response(response, checks=[not_a_server_error])
        # The admin token has every scope: whatever else is wrong, it is not the token.
        # (Negative cases may drop the Authorization header on purpose: those get 401.)
        sent = response.request.headers.get("Authorization")
        if sent == f"Bearer {live.admin}":
            assert response.status_code != 401, f"{case.method} {case.formatted_path}"
        else:
            assert response.status_code == 401, f"{case.method} {case.formatted_path}: {sent!r}"

    _fuzz(operation.as_strategy(mode), check)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: f"fail/{m.value}")
@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=OPERATION_IDS)
def test_every_generated_request_without_a_token_is_refused_with_401(
    api_schema: BaseSchema, live: Live, method: str, path: str, mode: GenerationMode
) -> None:
    operation = api_schema[path][method]

    def check(case: Case) -> None:
        case.headers = {
            k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"
        }
        response = case.call(session=live.session, verify=live.verify)
        case.validate_response(response, checks=[not_a_server_error])
        where = f"{case.method} {case.formatted_path}"
        assert response.status_code == 401, f"{where}: {response.status_code} {response.text}"
        assert response.headers.get("www-authenticate") == ['Bearer realm="estkit"'], where

    _fuzz(operation.as_strategy(mode), check)


def test_schema_is_served_without_authentication(live: Live) -> None:
    with http(live.server.root_pem) as client:
        response = client.get(f"{live.server.origin}/api/openapi.json")
    assert response.status_code == 200
    assert response.json()["openapi"].startswith("3.")
