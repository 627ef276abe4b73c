"""`make demo-fleet` (scripts/demo_fleet.py) as a user runs it, with 10 s certificates:
its timeline shows each milestone, and what it leaves behind (``--keep``) agrees with
it: each node's access log, node B's CRL file, each agent's status file.

One test, so that pytest-xdist never runs the demo twice.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "scripts" / "demo_fleet.py"
REENROLL = '"POST /.well-known/est/devices/simplereenroll HTTP/1.1"'


def _status(device_dir: Path) -> dict[str, Any]:
    status: dict[str, Any] = json.loads((device_dir / "state" / "status.json").read_text())
    return status


def _one(pattern: str, text: str) -> re.Match[str]:
    match = re.search(pattern, text, re.M)
    assert match is not None, f"no line matching {pattern!r} in:\n{text}"
    return match


def _run_demo(*args: str, timeout: float) -> tuple[int, str, str]:
    """The demo's exit status, stdout and stderr. Past ``timeout`` it gets SIGTERM, on
    which it stops its agents, nodes and PostgreSQL (its own deadline comes first)."""
    with subprocess.Popen(
        [sys.executable, "-W", "error", str(DEMO), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            out, err = proc.communicate(timeout=60)
            err += f"\n(test: stopped after {timeout:g} s)"
    return proc.returncode, out, err


@pytest.mark.timeout(260)
def test_demo_fleet_renews_in_two_regions_and_a_revocation_on_a_is_honoured_by_b() -> None:
    status, out, err = _run_demo("--validity", "10", "--keep", timeout=170)
    workdir = Path(_one(r"working directory (\S+)$", out).group(1))
    try:
        assert status == 0, f"{out}\n{err}"
        assert "Traceback" not in err, err

        # Two nodes in two regions on one database, an EST URL for each region.
        _one(r"\| +weu-1 +region westeurope +https://localhost:\d+ ", out)
        _one(r"\| +eus-1 +region eastus +https://localhost:\d+ ", out)
        assert "STALE" not in out
        _one(r"\| +westeurope +https://localhost:\d+/\.well-known/est/devices +\(node weu-1\)", out)
        _one(r"\| +eastus +https://localhost:\d+/\.well-known/est/devices +\(node eus-1\)", out)

        # A renewal through each node: the agents say so, each node's access log too.
        _one(r"agent 1 +\| renewed: simplereenroll with the operational certificate", out)
        _one(r"agent 2 +\| renewed: simplereenroll with the operational certificate", out)
        log_a = (workdir / "node-a" / "server.log").read_text()
        log_b = (workdir / "node-b" / "server.log").read_text()
        assert f"{REENROLL} 200" in log_a
        assert f"{REENROLL} 200" in log_b
        for number in (1, 2):
            last = _status(workdir / f"device-{number}")["last_renewal"]
            assert last["operation"] == "simplereenroll"

        # Revoked through A's API; B refuses the certificate with its code.
        serial = _one(r"POST weu-1 /api/v1/certificates/([0-9A-F]+)/revoke .*: 200", out).group(1)
        _one(r"POST eus-1 simplereenroll .*: HTTP 403, Estkit-Refusal-Code: revoked", out)
        assert f"{REENROLL} 403" in log_b
        assert f"{REENROLL} 403" not in log_a
        _one(r"agent 2 exited with status 77", out)
        refused = _status(workdir / "device-2")
        assert refused["state"] == "refused"
        assert refused["certificate"]["serial"] == serial

        # B's CRL lists the serial under a higher number, within 2 s of the revocation.
        before_b = int(_one(r"eus-1 CRL number (\d+)", out).group(1))
        served = _one(
            rf"eus-1 http://localhost:\d+/crl/devices\.crl: CRL number {before_b} → (\d+), "
            rf"lists {serial} .*, ([\d.]+) s after the revocation on weu-1",
            out,
        )
        assert int(served.group(1)) > before_b
        assert float(served.group(2)) <= 2.0
        crl = x509.load_der_x509_crl((workdir / "node-b" / "crl" / "devices.crl").read_bytes())
        issuer = x509.load_pem_x509_certificate(
            (workdir / "node-b" / "ca" / "devices.pem").read_bytes()
        )
        issuer_key = issuer.public_key()
        assert isinstance(issuer_key, ec.EllipticCurvePublicKey)  # server init's default
        assert crl.is_signature_valid(issuer_key)
        entry = crl.get_revoked_certificate_by_serial_number(int(serial, 16))
        assert entry is not None
        reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
        assert reason is x509.ReasonFlags.key_compromise
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        assert number >= int(served.group(1))
        # Agent 1, renewing through A, is not on it.
        current_1 = x509.load_pem_x509_certificate(
            (workdir / "device-1" / "state" / "current" / "cert.pem").read_bytes()
        )
        assert crl.get_revoked_certificate_by_serial_number(current_1.serial_number) is None

        assert out.rstrip().endswith("| done")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
