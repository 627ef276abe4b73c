"""``estkit factory provision`` against a scripted provisioning API (httpx MockTransport).

The fake API signs what it is sent the way the contract says: ``POST
/api/v1/cas/{label}/certificates`` with a JSON body, a 201 with the PEM
certificate and chain, or RFC 9457 problem details (``detail``, ``code``) with
an error status (an older server's ``{"detail": ...}`` in some cases).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import json
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from estkit.cli import factory_cmds
from estkit.cli.errors import CliError
from estkit.durations import parse_duration
from estkit.pki import certs, keys, names, profiles
from testpki import cn_name, make_ca_pair

API = "https://est.example:7443"
TOKEN = "tok-3f9a1c"
NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)


@dataclass(frozen=True)
class Ca:
    root: x509.Certificate
    issuing: x509.Certificate
    issuing_key: keys.PrivateKey

    def issue(self, public_key: Any, cn: str, sans: Any = None) -> x509.Certificate:
        return profiles.issue_leaf(
            profile=profiles.Profile("bootstrap", profiles.Kind.BOOTSTRAP, dt.timedelta(days=3650)),
            public_key=public_key,
            subject=cn_name(cn),
            sans=sans,
            issuer=self.issuing,
            issuer_key=self.issuing_key,
            now=NOW,
        )


def _make_ca(cn: str) -> Ca:
    pair = make_ca_pair(
        cn,
        f"{cn} Bootstrap",
        now=NOW - dt.timedelta(days=1),
        root_validity=dt.timedelta(days=7300),
        issuing_validity=dt.timedelta(days=7000),
    )
    return Ca(pair.root, pair.issuing, pair.issuing_key)


@pytest.fixture(scope="module")
def ca() -> Ca:
    return _make_ca("Factory Root")


@pytest.fixture(scope="module")
def other_ca() -> Ca:
    return _make_ca("Other Root")


def _json(status: int, body: Any) -> httpx.Response:
    return httpx.Response(status, json=body)


def _problem(status: int, code: str, detail: str, **headers: str) -> httpx.Response:
    body = {
        "type": f"urn:estkit:refusal:{code}",
        "title": code,
        "status": status,
        "detail": detail,
        "code": code,
    }
    return httpx.Response(
        status,
        content=json.dumps(body).encode(),
        headers={"Content-Type": "application/problem+json", **headers},
    )


Answer = httpx.Response | Callable[[httpx.Request], httpx.Response]


@dataclass
class FakeApi:
    """Signs each CSR with ``ca`` unless a device has scripted answers (the last repeats)."""

    ca: Ca
    script: dict[str, list[Answer]] = field(default_factory=dict)
    requests: list[httpx.Request] = field(default_factory=list)

    def on(self, device_id: str, *answers: Answer) -> None:
        self.script[device_id] = list(answers)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.headers.get("authorization") != f"Bearer {TOKEN}":
            return _json(401, {"detail": "invalid or missing bearer token"})
        body = json.loads(request.content)
        queue = self.script.get(body["device_id"])
        if queue:
            answer = queue.pop(0) if len(queue) > 1 else queue[0]
            return answer if isinstance(answer, httpx.Response) else answer(request)
        return self.sign(request)

    def sign(
        self, request: httpx.Request, *, ca: Ca | None = None, cn: str | None = None
    ) -> httpx.Response:
        ca = ca or self.ca
        body = json.loads(request.content)
        csr = x509.load_pem_x509_csr(body["csr"].encode())
        cert = ca.issue(
            csr.public_key(),
            cn or body["device_id"],
            names.subject_alt_names(csr.extensions),
        )
        return _json(
            201,
            {
                "serial": certs.serial_hex(cert.serial_number),
                "device_id": body["device_id"],
                "certificate": cert.public_bytes(Encoding.PEM).decode(),
                "chain": certs.certs_to_pem([ca.issuing, ca.root]).decode(),
                "not_before": cert.not_valid_before_utc.isoformat(),
                "not_after": cert.not_valid_after_utc.isoformat(),
                "ca": "bootstrap",
            },
        )

    def devices(self) -> list[str]:
        return [json.loads(r.content)["device_id"] for r in self.requests]


@pytest.fixture
def api(ca: Ca) -> FakeApi:
    return FakeApi(ca)


@pytest.fixture
def anchor(tmp_path: Path, ca: Ca) -> Path:
    path = tmp_path / "root.pem"
    path.write_bytes(certs.certs_to_pem([ca.root]))
    return path


@dataclass
class Run:
    status: int
    stdout: str
    stderr: str
    sleeps: list[float]


class Cli:
    def __init__(self, api: FakeApi, *, tty: bool = False) -> None:
        self.api = api
        self.tty = tty
        parser = argparse.ArgumentParser(prog="estkit")
        factory_cmds.register(parser.add_subparsers(dest="command", required=True))
        self.parser = parser

    def __call__(self, *argv: str | Path, environ: dict[str, str] | None = None) -> Run:
        args = self.parser.parse_args(["factory", "provision", *(str(a) for a in argv)])
        stdout, stderr = io.StringIO(), _Stream(tty=self.tty)
        sleeps: list[float] = []
        status = factory_cmds.provision_command(
            args,
            transport=httpx.MockTransport(self.api),
            sleep=sleeps.append,
            environ=environ if environ is not None else {"ESTKIT_API_TOKEN": TOKEN},
            stdout=stdout,
            stderr=stderr,
        )
        return Run(status, stdout.getvalue(), stderr.getvalue(), sleeps)


class _Stream(io.StringIO):
    def __init__(self, *, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


@pytest.fixture
def cli(api: FakeApi) -> Cli:
    return Cli(api)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _assert_device_files(directory: Path, ca: Ca, device_id: str) -> x509.Certificate:
    """The files verify: key 0600 and the certificate's, CN, chain up to the root."""
    key = keys.load_private_key_pem((directory / "key.pem").read_bytes())
    cert = certs.load_pem_certificates((directory / "cert.pem").read_bytes())
    chain = certs.load_pem_certificates((directory / "chain.pem").read_bytes())
    assert _mode(directory / "key.pem") == 0o600
    assert len(cert) == 1
    assert keys.public_keys_match(cert[0].public_key(), key.public_key())
    assert names.common_name(cert[0].subject) == device_id
    assert chain == [ca.issuing]
    assert certs.build_path(cert[0], chain, [ca.root]) == [cert[0], ca.issuing, ca.root]
    assert not list(directory.glob(".*.tmp"))
    return cert[0]


def _results(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _batch_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "devices.csv"
    path.write_text(text)
    return path


# -- one device ------------------------------------------------------------------------


def test_provision_sends_only_the_csr_and_writes_verified_files(
    cli: Cli, api: FakeApi, ca: Ca, anchor: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out" / "dev-1"
    run = cli(
        "--api", f"{API}/", "--trust-anchor", anchor, "--device-id", "dev-1",
        "--out", tmp_path / "out",
    )  # fmt: skip
    assert run.status == 0
    cert = _assert_device_files(out, ca, "dev-1")
    assert sorted(p.name for p in out.iterdir()) == ["cert.pem", "chain.pem", "key.pem"]

    [request] = api.requests
    assert request.method == "POST"
    assert str(request.url) == f"{API}/api/v1/cas/bootstrap/certificates"
    assert request.headers["authorization"] == f"Bearer {TOKEN}"
    assert request.headers["content-type"] == "application/json"
    body = json.loads(request.content)
    assert set(body) == {"device_id", "csr"}
    assert body["device_id"] == "dev-1"
    assert "PRIVATE KEY" not in request.content.decode()
    csr = x509.load_pem_x509_csr(body["csr"].encode())
    assert csr.is_signature_valid
    assert csr.subject == cn_name("dev-1")
    assert keys.public_keys_match(csr.public_key(), cert.public_key())

    serial = certs.serial_hex(cert.serial_number)
    assert run.stdout == (
        f"dev-1: serial {serial}, not after {cert.not_valid_after_utc.isoformat()}, "
        f"written to {out}\n"
    )
    assert TOKEN not in run.stdout + run.stderr


def test_provision_asks_for_validity_label_key_type_and_dns_names(
    cli: Cli, api: FakeApi, anchor: Path, tmp_path: Path
) -> None:
    run = cli(
        "--api", API, "--trust-anchor", anchor, "--device-id", "dev-2", "--out", tmp_path / "o",
        "--validity", "10y", "--label", "line-7", "--key-type", "rsa-2048",
        "--san-dns", "dev-2.example", "--san-dns", "dev-2.local",
    )  # fmt: skip
    assert run.status == 0
    [request] = api.requests
    assert request.url.path == "/api/v1/cas/line-7/certificates"
    body = json.loads(request.content)
    assert body["validity"] == "3650d"
    assert body["sans"] == ["dev-2.example", "dev-2.local"]
    csr = x509.load_pem_x509_csr(body["csr"].encode())
    assert keys.key_type_of(csr.public_key()) == "rsa-2048"
    sans = names.subject_alt_names(csr.extensions)
    assert sans is not None
    assert sans.get_values_for_type(x509.DNSName) == ["dev-2.example", "dev-2.local"]


def test_without_trust_anchor_the_chain_must_reach_its_own_root(
    cli: Cli, api: FakeApi, ca: Ca, tmp_path: Path
) -> None:
    assert cli("--api", API, "--device-id", "dev-3", "--out", tmp_path / "a").status == 0
    _assert_device_files(tmp_path / "a" / "dev-3", ca, "dev-3")

    def chain_without_root(request: httpx.Request) -> httpx.Response:
        body = json.loads(api.sign(request).content)
        body["chain"] = certs.certs_to_pem([ca.issuing]).decode()
        return _json(201, body)

    api.on("dev-4", chain_without_root)
    with pytest.raises(CliError, match="no root certificate; give --trust-anchor"):
        cli("--api", API, "--device-id", "dev-4", "--out", tmp_path / "b")
    assert not (tmp_path / "b" / "dev-4").exists()


def _other_key(api: FakeApi) -> Callable[[httpx.Request], httpx.Response]:
    def answer(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        cert = api.ca.issue(keys.generate_key("ec-p256").public_key(), body["device_id"])
        good = json.loads(api.sign(request).content)
        return _json(201, {**good, "certificate": cert.public_bytes(Encoding.PEM).decode()})

    return answer


@pytest.mark.parametrize(
    ("answer", "refusal"),
    [
        (lambda api, other: _other_key(api), "not for the requested key"),
        (lambda api, other: lambda r: api.sign(r, cn="dev-9"), "does not have CN=dev-5"),
        (lambda api, other: lambda r: api.sign(r, ca=other), "does not chain to the trust anchor"),
        (lambda api, other: _json(201, {"serial": "01"}), "answer has no certificate"),
        (lambda api, other: httpx.Response(201, content=b"<html>"), "answer is not JSON"),
        (
            lambda api, other: _json(201, {"certificate": "-----BEGIN CERTIFICATE-----\nAA"}),
            "not a PEM certificate",
        ),
        (lambda api, other: _json(200, {}), "unexpected HTTP 200"),
    ],
    ids=[
        "fail/other-key",
        "fail/other-cn",
        "fail/other-root",
        "fail/no-certificate",
        "fail/not-json",
        "fail/bad-pem",
        "fail/not-201",
    ],
)
def test_an_answer_that_fails_the_checks_writes_nothing(
    cli: Cli,
    api: FakeApi,
    other_ca: Ca,
    anchor: Path,
    tmp_path: Path,
    answer: Callable[[FakeApi, Ca], Answer],
    refusal: str,
) -> None:
    api.on("dev-5", answer(api, other_ca))
    out = tmp_path / "out"
    with pytest.raises(CliError, match=refusal) as info:
        cli("--api", API, "--trust-anchor", anchor, "--device-id", "dev-5", "--out", out)
    assert str(info.value).startswith("dev-5: ")
    assert "\n" not in str(info.value)
    assert not out.exists()


@pytest.mark.parametrize(
    ("status", "detail", "message"),
    [
        (401, "invalid token", "dev-6: HTTP 401 Unauthorized: invalid token"),
        (
            403,
            "device dev-6 is decommissioned\nsee audit log",
            "dev-6: HTTP 403 Forbidden: device dev-6 is decommissioned see audit log",
        ),
        (400, "CSR signature does not verify", "dev-6: HTTP 400 Bad Request: CSR signature"),
        (404, "unknown label 'bootstrap'", "dev-6: HTTP 404 Not Found: unknown label"),
        (
            422,
            [{"loc": ["body", "csr"], "msg": "field required", "type": "missing"}],
            "dev-6: HTTP 422 Unprocessable",
        ),
    ],
    ids=["fail/401", "fail/403-two-lines", "fail/400", "fail/404", "fail/422-fastapi-list"],
)
def test_refusals_are_one_line_and_never_retried(
    cli: Cli,
    api: FakeApi,
    anchor: Path,
    tmp_path: Path,
    status: int,
    detail: Any,
    message: str,
) -> None:
    api.on("dev-6", _json(status, {"detail": detail}))
    with pytest.raises(CliError) as info:
        cli("--api", API, "--trust-anchor", anchor, "--device-id", "dev-6", "--out", tmp_path / "o")
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)
    assert TOKEN not in str(info.value)
    assert len(api.requests) == 1
    if status == 422:
        assert "body.csr: field required" in str(info.value)


def test_transient_errors_are_retried_with_backoff(
    cli: Cli, api: FakeApi, ca: Ca, anchor: Path, tmp_path: Path
) -> None:
    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    api.on(
        "dev-7",
        _json(503, {"detail": "database busy"}),
        refused,
        httpx.Response(502, text="bad gateway"),
        api.sign,
    )
    run = cli("--api", API, "--trust-anchor", anchor, "--device-id", "dev-7", "--out", tmp_path)
    assert run.status == 0
    assert len(api.requests) == 4
    assert len(run.sleeps) == 3
    _assert_device_files(tmp_path / "dev-7", ca, "dev-7")


def test_retry_after_is_honoured_and_retries_run_out(
    cli: Cli, api: FakeApi, anchor: Path, tmp_path: Path
) -> None:
    api.on("dev-8", httpx.Response(503, headers={"Retry-After": "7"}, json={"detail": "busy"}))
    with pytest.raises(CliError, match=r"^dev-8: HTTP 503 Service Unavailable: busy$"):
        cli(
            "--api", API, "--trust-anchor", anchor, "--device-id", "dev-8", "--out", tmp_path,
            "--retries", "2",
        )  # fmt: skip
    assert len(api.requests) == 3


def test_rate_limit_is_retried_after_its_retry_after(
    cli: Cli, api: FakeApi, ca: Ca, anchor: Path, tmp_path: Path
) -> None:
    api.on(
        "dev-7",
        _problem(429, "rate-limited", "too many requests", **{"Retry-After": "4"}),
        _problem(503, "unavailable", "database is locked", **{"Retry-After": "2"}),
        api.sign,
    )
    run = cli("--api", API, "--trust-anchor", anchor, "--device-id", "dev-7", "--out", tmp_path)
    assert run.status == 0
    assert run.sleeps == [4.0, 2.0]
    _assert_device_files(tmp_path / "dev-7", ca, "dev-7")


@pytest.mark.parametrize(
    ("answer", "code", "detail"),
    [
        (_problem(403, "decommissioned", "device dev-6 is decommissioned"), "decommissioned", ""),
        (_problem(400, "bad-csr", "CSR signature does not verify"), "bad-csr", ""),
        (_json(403, {"detail": "device dev-6 is decommissioned"}), None, ""),
        (httpx.Response(403, text="forbidden"), None, "forbidden"),
    ],
    ids=["ok/problem-json", "ok/problem-400", "ok/old-detail-json", "ok/plain-text"],
)
def test_api_refusal_carries_its_code_beside_the_reason(
    api: FakeApi,
    anchor: Path,
    answer: httpx.Response,
    code: str | None,
    detail: str,
) -> None:
    from estkit.client import ApiHttpError, ProvisioningApi, TrustAnchor
    from estkit.pki.csr import build_csr

    api.on("dev-6", answer)
    key = keys.generate_key("ec-p256")
    csr = build_csr(key, subject=cn_name("dev-6"), sans=None)
    with (
        ProvisioningApi(
            API,
            token=TOKEN,
            trust=TrustAnchor.from_file(anchor),
            transport=httpx.MockTransport(api),
        ) as client,
        pytest.raises(ApiHttpError) as caught,
    ):
        client.issue("bootstrap", device_id="dev-6", csr=csr)
    assert caught.value.code == code
    assert caught.value.detail == (detail or json.loads(answer.content)["detail"])
    assert str(caught.value).endswith(f": {caught.value.detail}")
    assert len(api.requests) == 1


def test_batch_stops_when_the_api_keeps_failing(
    cli: Cli, api: FakeApi, anchor: Path, tmp_path: Path
) -> None:
    # 5 transient failures in a row open the circuit breaker: the line stops rather than
    # failing every later device at once; a re-run continues where it stopped.
    batch = _batch_file(tmp_path, "device_id\ndev-a\ndev-b\ndev-c\n")
    out = tmp_path / "out"
    for device in ("dev-a", "dev-b", "dev-c"):
        api.on(device, httpx.Response(502, text="bad gateway"))
    with pytest.raises(CliError, match=r"^stopped: .*not tried: 5 failures in a row") as caught:
        cli("--api", API, "--trust-anchor", anchor, "--batch", batch, "--out", out)
    assert "(last: HTTP 502); will try again in 30 s" in str(caught.value)
    assert api.devices() == ["dev-a"] * 4 + ["dev-b"]
    rows = _results(out / "results.csv")
    assert [(r["device_id"], r["status"]) for r in rows] == [
        ("dev-a", "failed"),
        ("dev-b", "failed"),
    ]
    assert rows[0]["error"] == "HTTP 502 Bad Gateway: bad gateway"


def test_connection_failure_names_the_url_after_the_retries(
    cli: Cli, api: FakeApi, anchor: Path, tmp_path: Path
) -> None:
    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    api.on("dev-9", refused)
    with pytest.raises(CliError) as info:
        cli("--api", API, "--trust-anchor", anchor, "--device-id", "dev-9", "--out", tmp_path)
    assert str(info.value) == (
        f"dev-9: {API}/api/v1/cas/bootstrap/certificates: connection refused (after 4 attempts)"
    )


def test_existing_certificate_is_kept_unless_forced(
    cli: Cli, api: FakeApi, ca: Ca, anchor: Path, tmp_path: Path
) -> None:
    base = ("--api", API, "--trust-anchor", anchor, "--device-id", "dev-10", "--out", tmp_path)
    cli(*base)
    cert_pem = tmp_path / "dev-10" / "cert.pem"
    first = cert_pem.read_bytes()
    run = cli(*base)
    assert run.status == 0
    assert "exists" in run.stdout
    assert len(api.requests) == 1
    assert cert_pem.read_bytes() == first
    assert cli(*base, "--force").status == 0
    assert len(api.requests) == 2
    assert cert_pem.read_bytes() != first
    _assert_device_files(tmp_path / "dev-10", ca, "dev-10")


def test_one_device_is_written_to_its_own_directory_under_out(
    cli: Cli, api: FakeApi, ca: Ca, anchor: Path, tmp_path: Path
) -> None:
    # A second device into the same --out is provisioned, not skipped as "exists".
    out = tmp_path / "out"
    common = ("--api", API, "--trust-anchor", anchor, "--out", out)
    assert cli(*common, "--device-id", "dev-a").status == 0
    run = cli(*common, "--device-id", "dev-b")
    assert run.status == 0
    assert "exists" not in run.stdout
    assert run.stdout.endswith(f"written to {out / 'dev-b'}\n")
    assert api.devices() == ["dev-a", "dev-b"]
    assert sorted(p.name for p in out.iterdir()) == ["dev-a", "dev-b"]
    _assert_device_files(out / "dev-a", ca, "dev-a")
    _assert_device_files(out / "dev-b", ca, "dev-b")


def test_force_replaces_only_that_devices_files(
    cli: Cli, api: FakeApi, ca: Ca, anchor: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    common = ("--api", API, "--trust-anchor", anchor, "--out", out)
    cli(*common, "--device-id", "dev-a")
    cli(*common, "--device-id", "dev-b")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*.pem")}
    assert cli(*common, "--device-id", "dev-b", "--force").status == 0
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*.pem")}
    assert after.keys() == before.keys()
    changed = sorted(str(p) for p in after if after[p] != before[p])
    assert changed == ["dev-b/cert.pem", "dev-b/key.pem"]  # the chain is the same CA's
    _assert_device_files(out / "dev-a", ca, "dev-a")
    _assert_device_files(out / "dev-b", ca, "dev-b")


# -- token and API options ---------------------------------------------------------------


def test_token_comes_from_option_file_or_environment(
    cli: Cli, api: FakeApi, anchor: Path, tmp_path: Path
) -> None:
    common = ("--api", API, "--trust-anchor", anchor, "--device-id")
    token_file = tmp_path / "token"
    token_file.write_text(f"{TOKEN}\n")
    cli(*common, "a", "--out", tmp_path / "a", "--token-file", token_file, environ={})
    cli(*common, "b", "--out", tmp_path / "b", "--token", TOKEN, environ={})
    cli(*common, "c", "--out", tmp_path / "c", environ={"ESTKIT_API_TOKEN": TOKEN})
    assert [r.headers["authorization"] for r in api.requests] == [f"Bearer {TOKEN}"] * 3


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        ((), {}, "no API token"),
        (("--token", "two words"), {}, "--token: the API token must be one word"),
        (("--token-file", "/nonexistent/token"), {}, "cannot read token file"),
        (("--api", "http://est.example:7443"), None, "--api: expected the server origin"),
        (("--api", f"{API}/api/v1"), None, "--api: expected only the origin"),
        (("--label", "../admin"), None, "--label: not a CA label"),
        (("--trust-anchor", "/nonexistent/root.pem"), None, "cannot read trust anchor"),
    ],
    ids=[
        "fail/no-token",
        "fail/token-with-space",
        "fail/token-file-missing",
        "fail/api-not-https",
        "fail/api-with-path",
        "fail/label-path",
        "fail/trust-anchor-missing",
    ],
)
def test_bad_options_are_one_line_errors_before_any_request(
    cli: Cli,
    api: FakeApi,
    tmp_path: Path,
    argv: tuple[str, ...],
    environ: dict[str, str] | None,
    message: str,
) -> None:
    with pytest.raises(CliError, match=message) as info:
        cli("--api", API, "--device-id", "dev-1", "--out", tmp_path, *argv, environ=environ)
    assert "\n" not in str(info.value)
    assert api.requests == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10y", "3650d"),
        ("3650d", "3650d"),
        ("52W", "52w"),
        ("12h", "12h"),
        ("1.5h", "90m"),
        ("14d", "2w"),
        ("90", "90s"),
    ],
    ids=[
        "ok/years",
        "ok/days",
        "ok/weeks",
        "ok/hours",
        "ok/fraction",
        "ok/days-as-weeks",
        "ok/secs",
    ],
)
def test_validity_is_sent_in_the_one_duration_grammar(text: str, expected: str) -> None:
    assert factory_cmds._validity(text) == expected
    assert parse_duration(expected) == parse_duration(text)  # what the server will read


@pytest.mark.parametrize("text", ["0d", "0", "ten years", "-1y", "1y2d", ""])
def test_bad_validity_is_an_argument_error(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        factory_cmds._validity(text)


# -- batches -------------------------------------------------------------------------------


def test_batch_continues_past_a_failure_and_reports_it(
    cli: Cli, api: FakeApi, ca: Ca, anchor: Path, tmp_path: Path
) -> None:
    batch = _batch_file(
        tmp_path,
        "\ufeffDevice_ID,dns,model\ndev-a,dev-a.example;dev-a.local,x1\ndev-b,,x1\n\ndev-c,,x1\n",
    )
    api.on("dev-b", _json(403, {"detail": "device dev-b is decommissioned"}))
    out = tmp_path / "out"
    run = cli("--api", API, "--trust-anchor", anchor, "--batch", batch, "--out", out)
    assert run.status == 1
    assert api.devices() == ["dev-a", "dev-b", "dev-c"]
    _assert_device_files(out / "dev-a", ca, "dev-a")
    _assert_device_files(out / "dev-c", ca, "dev-c")
    assert not (out / "dev-b").exists()
    assert json.loads(api.requests[0].content)["sans"] == ["dev-a.example", "dev-a.local"]

    rows = _results(out / "results.csv")
    assert list(rows[0]) == ["device_id", "status", "serial", "not_after", "error"]
    assert [(r["device_id"], r["status"]) for r in rows] == [
        ("dev-a", "ok"),
        ("dev-b", "failed"),
        ("dev-c", "ok"),
    ]
    assert rows[1]["error"] == "HTTP 403 Forbidden: device dev-b is decommissioned"
    cert_a = certs.load_pem_certificates((out / "dev-a" / "cert.pem").read_bytes())[0]
    assert rows[0]["serial"] == certs.serial_hex(cert_a.serial_number)
    assert rows[0]["not_after"] == cert_a.not_valid_after_utc.isoformat()

    assert run.stdout == f"2 ok, 1 failed, 0 exists; results in {out / 'results.csv'}\n"
    lines = run.stderr.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("[1/3] dev-a: ok (serial ")
    assert lines[1] == "[2/3] dev-b: failed: HTTP 403 Forbidden: device dev-b is decommissioned"


def test_batch_rerun_skips_devices_already_done_and_retries_the_failed(
    cli: Cli, api: FakeApi, anchor: Path, tmp_path: Path
) -> None:
    batch = _batch_file(tmp_path, "device_id\ndev-a\ndev-b\n")
    out, result = tmp_path / "out", tmp_path / "line-1.csv"
    base = ("--api", API, "--trust-anchor", anchor, "--batch", batch, "--out", out)
    api.on("dev-b", _json(400, {"detail": "bad CSR"}), api.sign)
    assert cli(*base).status == 1
    run = cli(*base, "--result", result)
    assert run.status == 0
    assert api.devices() == ["dev-a", "dev-b", "dev-b"]
    rows = _results(result)
    assert [(r["device_id"], r["status"]) for r in rows] == [("dev-a", "exists"), ("dev-b", "ok")]
    assert rows[0]["serial"]  # read back from the existing cert.pem
    assert run.stdout.startswith("1 ok, 0 failed, 1 exists;")
    assert cli(*base, "--force").status == 0
    assert api.devices()[3:] == ["dev-a", "dev-b"]


def test_batch_rows_with_bad_ids_fail_alone(
    cli: Cli, api: FakeApi, anchor: Path, tmp_path: Path
) -> None:
    batch = _batch_file(
        tmp_path, "device_id,dns\n../escape,\ndev-a,\ndev-a,\n,x.example\ndev-b,not a name\n"
    )
    out = tmp_path / "out"
    run = cli("--api", API, "--trust-anchor", anchor, "--batch", batch, "--out", out)
    assert run.status == 1
    assert api.devices() == ["dev-a"]
    rows = _results(out / "results.csv")
    allowed = names.DEVICE_ID_CHARACTERS
    with pytest.raises(ValueError) as bad_dns:  # the server's own rule and wording
        names.check_dns_name("not a name")
    assert [(r["device_id"], r["status"], r["error"]) for r in rows] == [
        ("../escape", "failed", f"line 2: device id '../escape' may only hold ASCII {allowed}"),
        ("dev-a", "ok", ""),
        ("dev-a", "failed", "line 4: duplicate device id"),
        ("", "failed", "line 5: device id must be 1-64 characters, got 0"),
        ("dev-b", "failed", f"line 6: {bad_dns.value}"),
    ]
    assert not (tmp_path / "escape").exists()


def test_batch_rows_that_would_clash_on_disk_or_in_a_spreadsheet(
    cli: Cli, api: FakeApi, anchor: Path, tmp_path: Path
) -> None:
    batch = _batch_file(tmp_path, 'device_id\nDev-1\ndev-1\nresults.csv\n"=SUM(1,2)"\n@x\n')
    out = tmp_path / "out"
    run = cli("--api", API, "--trust-anchor", anchor, "--batch", batch, "--out", out)
    assert run.status == 1
    assert api.devices() == ["Dev-1", "=SUM(1,2)", "@x"]
    rows = _results(out / "results.csv")
    assert [(r["device_id"], r["status"]) for r in rows] == [
        ("Dev-1", "ok"),
        ("dev-1", "failed"),  # one directory on a case-insensitive file system
        ("results.csv", "failed"),  # its directory would be the results file
        ("'=SUM(1,2)", "ok"),  # shown as text by a spreadsheet, never run
        ("'@x", "ok"),
    ]
    assert rows[1]["error"] == "line 3: duplicate device id"
    assert (out / "=SUM(1,2)" / "cert.pem").exists()


def test_batch_stops_when_the_token_is_refused(
    cli: Cli, api: FakeApi, anchor: Path, tmp_path: Path
) -> None:
    batch = _batch_file(tmp_path, "device_id\ndev-a\ndev-b\ndev-c\n")
    out = tmp_path / "out"
    with pytest.raises(CliError, match=r"^stopped: HTTP 401 Unauthorized: invalid or missing"):
        cli(
            "--api", API, "--trust-anchor", anchor, "--batch", batch, "--out", out,
            environ={"ESTKIT_API_TOKEN": "expired-token"},
        )  # fmt: skip
    assert api.devices() == ["dev-a"]
    assert [r["status"] for r in _results(out / "results.csv")] == ["failed"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty, expected a header row"),
        ("serial,dns\n1,a\n", "no device_id column"),
        ("device_id\n\n", "no devices"),
    ],
    ids=["fail/empty", "fail/no-device-id-column", "fail/no-rows"],
)
def test_unusable_batch_file_is_refused_before_any_request(
    cli: Cli, api: FakeApi, anchor: Path, tmp_path: Path, text: str, message: str
) -> None:
    batch = _batch_file(tmp_path, text)
    with pytest.raises(CliError, match=message):
        cli("--api", API, "--trust-anchor", anchor, "--batch", batch, "--out", tmp_path / "o")
    assert api.requests == []


def test_progress_bar_is_drawn_in_place_on_a_terminal(
    api: FakeApi, anchor: Path, tmp_path: Path
) -> None:
    batch = _batch_file(tmp_path, "device_id\ndev-a\ndev-b\ndev-c\ndev-d\n")
    api.on("dev-c", _json(403, {"detail": "not allowed"}))
    run = Cli(api, tty=True)(
        "--api", API, "--trust-anchor", anchor, "--batch", batch, "--out", tmp_path / "o"
    )
    assert run.status == 1
    assert run.stderr.count("\r\x1b[K[") == 4
    assert "\r\x1b[Kdev-c: failed: HTTP 403 Forbidden: not allowed\n" in run.stderr
    assert f"[{'#' * 30}] 4/4  ok 3  failed 1  exists 0\n" in run.stderr
    assert run.stderr.endswith("\n")
    assert run.stderr.count("\n") == 2  # the failure, and the end of the bar


def test_register_adds_factory_provision() -> None:
    parser = argparse.ArgumentParser(prog="estkit")
    factory_cmds.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["factory", "provision", "--api", API, "--device-id", "d", "--out", "o"]
    )
    assert args.handler is factory_cmds._provision
    assert (args.label, args.key_type, args.retries, args.force) == (
        "bootstrap",
        "ec-p256",
        3,
        False,
    )
    with pytest.raises(SystemExit):
        parser.parse_args(
            ["factory", "provision", "--api", API, "--device-id", "d", "--batch", "b", "--out", "o"]
        )
