"""What one renewal does on each kind of refusal, against a scripted EST server:
stop for good, enroll again with the bootstrap certificate, or retry later."""

from __future__ import annotations

import datetime as dt
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from agentca import DeviceCa
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from estkit.agent.config import AgentConfig, parse_config
from estkit.agent.errors import RenewalError, RenewalRefused
from estkit.agent.renewal import Renewer, load_credentials
from estkit.agent.state import StateDirectory, Version
from estkit.pki import cms, wire
from estkit.pki.certs import certs_to_pem
from estkit.pki.keys import key_to_pem
from estkit.pki.profiles import Kind, Profile, issue_leaf
from testpki import cn_name

DEVICE = "sensor-0042"


@dataclass
class FakeEst:
    """simplereenroll answers ``reenroll``; simpleenroll issues from ``ca``."""

    ca: DeviceCa
    reenroll: httpx.Response
    enroll: httpx.Response | None = None
    paths: list[str] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        operation = request.url.path.rsplit("/", 1)[-1]
        self.paths.append(operation)
        if operation == "simplereenroll":
            return self.reenroll
        if operation == "simpleenroll":
            if self.enroll is not None:
                return self.enroll
            csr = x509.load_der_x509_csr(wire.decode_base64_body(request.content))
            cert = self._issue_for(csr.public_key())
            body = wire.encode_base64_body(cms.encode_certs_only([cert, self.ca.issuing]))
            return httpx.Response(
                200,
                content=body,
                headers={"Content-Type": wire.PKCS7_MIME, "Content-Transfer-Encoding": "base64"},
            )
        return httpx.Response(404, text="no such operation")

    def _issue_for(self, public_key: CertificatePublicKeyTypes) -> x509.Certificate:
        return issue_leaf(
            profile=Profile("op", Kind.OPERATIONAL, dt.timedelta(hours=2)),
            public_key=public_key,
            subject=cn_name(DEVICE),
            sans=None,
            issuer=self.ca.issuing,
            issuer_key=self.ca.issuing_key,
            now=dt.datetime.now(dt.UTC),
        )


def _refusal(status: int, reason: str, code: str | None) -> httpx.Response:
    headers = {"Content-Type": "text/plain"}
    if code is not None:
        headers["Estkit-Refusal-Code"] = code
    return httpx.Response(status, content=reason.encode(), headers=headers)


def _config(tmp_path: Path, device_ca: DeviceCa) -> AgentConfig:
    key, cert = device_ca.issue(DEVICE, validity=dt.timedelta(days=1))
    (tmp_path / "cert.pem").write_bytes(certs_to_pem([cert]))
    (tmp_path / "key.pem").write_bytes(key_to_pem(key))
    (tmp_path / "anchor.pem").write_bytes(certs_to_pem([device_ca.root]))
    text = f"""
device_id = "{DEVICE}"
state_dir = "state"
[est]
url = "https://est.example:7443/.well-known/est"
trust_anchor = "anchor.pem"
[bootstrap]
cert = "cert.pem"
key = "key.pem"
"""
    return parse_config(tomllib.loads(text), path=tmp_path / "agent.toml")


@dataclass
class Device:
    renewer: Renewer
    current: Version
    est: FakeEst


def _device(tmp_path: Path, device_ca: DeviceCa, est: FakeEst) -> Device:
    config = _config(tmp_path, device_ca)
    state = StateDirectory(config.state_dir)
    state.prepare()
    current = device_ca.install(state, device_id=DEVICE)
    state.activate(current)
    renewer = Renewer(
        config,
        state,
        load_credentials(config, state),
        clock=lambda: dt.datetime.now(dt.UTC),
        transport=httpx.MockTransport(est),
    )
    return Device(renewer, current, est)


# (status, code, reason) → what the renewal does. The reasons are worded so that the old
# text heuristics would decide otherwise: only the code may count.
CASES = [
    ("final/revoked", 403, "revoked", "certificate withdrawn by operator", "final"),
    ("final/decommissioned", 403, "decommissioned", "device retired", "final"),
    ("fallback/expired", 403, "expired", "certificate past its date", "fallback"),
    ("fallback/not-yet-valid", 403, "not-yet-valid", "certificate from the future", "fallback"),
    ("fallback/unknown-certificate", 403, "unknown-certificate", "who are you?", "fallback"),
    ("fallback/wrong-ca", 403, "wrong-ca", "device is revoked elsewhere", "fallback"),
    ("other/disabled", 403, "disabled", "client certificate is revoked", "other"),
    ("other/subject-changed", 403, "subject-changed", "client certificate expired", "other"),
    ("other/rate-limited", 429, "rate-limited", "slow down", "other"),
    ("text/revoked", 403, None, "client certificate is revoked", "final"),
    ("text/expired", 403, None, "client certificate is expired or not yet valid", "fallback"),
    ("text/other", 403, None, "device is disabled", "other"),
    # Only 401/403 refuse credentials: an error page elsewhere never stops or diverts.
    ("other/502-page-says-revoked", 502, None, "upstream TLS: peer certificate revoked", "other"),
    ("other/500-page-says-decommissioned", 500, None, "decommissioned backend", "other"),
    ("other/404-says-expired", 404, None, "route expired", "other"),
    ("other/503-with-final-code", 503, "revoked", "maintenance", "other"),
]


@pytest.mark.parametrize(
    ("status", "code", "reason", "outcome"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_renewal_acts_on_the_refusal_code(
    tmp_path: Path,
    device_ca: DeviceCa,
    status: int,
    code: str | None,
    reason: str,
    outcome: str,
) -> None:
    device = _device(tmp_path, device_ca, FakeEst(device_ca, _refusal(status, reason, code)))
    if outcome == "final":
        with pytest.raises(RenewalRefused) as refused:
            device.renewer.renew(device.current)
        assert refused.value.reason == reason
        assert refused.value.code == code  # logged and in status.json beside the reason
        assert device.est.paths == ["simplereenroll"]
    elif outcome == "fallback":
        renewal = device.renewer.renew(device.current)
        assert (renewal.operation, renewal.authenticated_with) == ("simpleenroll", "bootstrap")
        assert device.est.paths == ["simplereenroll", "simpleenroll"]
    else:
        with pytest.raises(RenewalError) as failed:
            device.renewer.renew(device.current)
        assert reason in str(failed.value)
        assert device.est.paths.count("simpleenroll") == 0


@pytest.mark.parametrize(
    ("code", "final"),
    [("decommissioned", True), ("revoked", True), ("expired", False), ("disabled", False)],
    ids=["final/decommissioned", "final/revoked", "other/expired", "other/disabled"],
)
def test_bootstrap_enrollment_stops_only_on_a_final_code(
    tmp_path: Path, device_ca: DeviceCa, code: str, final: bool
) -> None:
    est = FakeEst(
        device_ca,
        _refusal(403, "certificate expired", "expired"),
        enroll=_refusal(403, "not today", code),
    )
    device = _device(tmp_path, device_ca, est)
    expected = RenewalRefused if final else RenewalError
    with pytest.raises(expected):
        device.renewer.renew(device.current)
    assert est.paths == ["simplereenroll", "simpleenroll"]
