"""CA keys in a PKCS#11 token (``signer = "pkcs11"``), on a real SoftHSM2 token per test.

What is signed inside the token verifies with OpenSSL; the key cannot be read out;
many threads and a forked worker sign with one key; a token that goes away makes
signing refuse with ``unavailable`` (503 + Retry-After) and work again when it is
back, without a restart; the PIN never comes from the config, and a PIN file others
can read is refused.
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
import os
import subprocess
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import pkcs11
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding

from caenv import BOOTSTRAP, NOW, OPERATIONAL, Cas, label, make_csr
from estkit.ca import hsm
from estkit.ca.authority import Authority, IssuingCa
from estkit.ca.errors import SIGNER_RETRY_AFTER, Code, Refusal, SignerUnavailable
from estkit.ca.hsm import TokenKeySpec, TokenPrivateKey, existing_token_key, generate_token_key
from estkit.ca.signers import TokenKeyRef, load_cas
from estkit.pki.certs import certs_to_pem
from estkit.pki.crl import build_crl
from estkit.pki.keys import generate_key, key_to_pem
from estkit.pki.profiles import issue_ca, issue_leaf
from estkit.server.config import DEFAULT_CONFIG, CaConfig, ConfigError, parse_config
from estkit.store import SqlStore
from softhsm import SoftHsm, make_softhsm
from testpki import cn_name

T = TypeVar("T")
# OpenSSL checks validity at this time, not the wall clock's.
AT = NOW + dt.timedelta(hours=1)
PIN_ENV = "ESTKIT_TEST_TOKEN_PIN"


@pytest.fixture
def softhsm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SoftHsm:
    return make_softhsm(tmp_path / "softhsm", monkeypatch)


def token_spec(hsm: SoftHsm, key_label: str) -> TokenKeySpec:
    return TokenKeySpec(module=hsm.module, token_label=hsm.label, pin=hsm.pin, key_label=key_label)


def token_hierarchy(hsm: SoftHsm, key_type: str) -> tuple[IssuingCa, IssuingCa]:
    """A root and an issuing CA whose keys were both made inside the token."""
    root_key = generate_token_key("root", token_spec(hsm, "root"), key_type)
    root = issue_ca(
        subject=cn_name("token root"),
        public_key=root_key.public_key(),
        issuer=None,
        issuer_key=root_key,
        validity=dt.timedelta(days=3650),
        now=NOW - dt.timedelta(days=1),
        path_length=1,
    )
    issuing_key = generate_token_key("devices", token_spec(hsm, "devices"), key_type)
    issuing = issue_ca(
        subject=cn_name("token devices"),
        public_key=issuing_key.public_key(),
        issuer=root,
        issuer_key=root_key,
        validity=dt.timedelta(days=3650),
        now=NOW - dt.timedelta(days=1),
        path_length=0,
    )
    return (
        IssuingCa(name="root", cert=root, key=root_key, chain=(root,)),
        IssuingCa(name="devices", cert=issuing, key=issuing_key, chain=(issuing, root)),
    )


def leaf(ca: IssuingCa, cn: str = "dev-1") -> x509.Certificate:
    return issue_leaf(
        profile=OPERATIONAL,
        public_key=generate_key("ec-p256").public_key(),
        subject=cn_name(cn),
        sans=None,
        issuer=ca.cert,
        issuer_key=ca.key,
        now=NOW,
    )


def openssl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True)


def write_pem(path: Path, *certs: x509.Certificate) -> Path:
    path.write_bytes(certs_to_pem(certs))
    return path


def openssl_verifies(tmp: Path, chain: tuple[x509.Certificate, ...], cert: x509.Certificate) -> str:
    """``openssl verify`` of ``cert`` against ``chain`` (issuing CA first, root last)."""
    root = write_pem(tmp / "root.pem", chain[-1])
    untrusted = write_pem(tmp / "untrusted.pem", *chain[:-1]) if len(chain) > 1 else None
    target = write_pem(tmp / "target.pem", cert)
    args: list[str | Path] = ["verify", "-x509_strict", "-attime", str(int(AT.timestamp()))]
    args += ["-CAfile", root] + (["-untrusted", untrusted] if untrusted else []) + [target]
    result = openssl(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def unavailable(call: Callable[[], object]) -> SignerUnavailable:
    with pytest.raises(SignerUnavailable) as caught:
        call()
    refusal = caught.value
    assert refusal.code is Code.UNAVAILABLE
    assert refusal.retry_after == SIGNER_RETRY_AFTER
    assert refusal.reason and "\n" not in refusal.reason
    return refusal


def once_back(call: Callable[[], T], *, within: float = 10.0) -> T:
    """``call``'s result as soon as the token signs again (reopened at most once a second)."""
    deadline = time.monotonic() + within
    while True:
        try:
            return call()
        except SignerUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


# -- signing inside the token ---------------------------------------------------------


@pytest.mark.parametrize(
    ("key_type", "algorithm"),
    [
        ("ec-p256", "ecdsa-with-SHA256"),
        ("ec-p384", "ecdsa-with-SHA384"),
        ("rsa-2048", "sha256WithRSAEncryption"),
    ],
    ids=["ok/p256", "ok/p384", "ok/rsa-2048"],
)
def test_certificates_and_crls_signed_in_the_token_verify_with_openssl(
    softhsm: SoftHsm, tmp_path: Path, key_type: str, algorithm: str
) -> None:
    root, devices = token_hierarchy(softhsm, key_type)
    device = leaf(devices)
    assert device.signature_algorithm_oid._name == algorithm
    assert openssl_verifies(tmp_path, devices.chain, device).strip().endswith(": OK")

    crl = build_crl(
        issuer=devices.cert,
        issuer_key=devices.key,
        revoked=[(f"{device.serial_number:x}", NOW, "keyCompromise")],
        now=NOW,
        validity=dt.timedelta(days=7),
        number=1,
    )
    crl_pem = tmp_path / "devices.crl"
    crl_pem.write_bytes(crl.public_bytes(Encoding.PEM))
    chain = write_pem(tmp_path / "chain.pem", *devices.chain)
    checked = openssl("crl", "-in", crl_pem, "-CAfile", chain, "-noout", "-verify")
    assert checked.returncode == 0 and "verify OK" in checked.stderr, checked.stderr
    # The CRL is in force: OpenSSL now refuses the revoked certificate.
    target = write_pem(tmp_path / "revoked.pem", device)
    root_pem = write_pem(tmp_path / "root-only.pem", root.cert)
    untrusted = write_pem(tmp_path / "issuing.pem", devices.cert)
    refused = openssl(
        "verify", "-attime", str(int(AT.timestamp())), "-crl_check", "-CRLfile", crl_pem,
        "-CAfile", root_pem, "-untrusted", untrusted, target,
    )  # fmt: skip
    assert refused.returncode != 0 and "certificate revoked" in refused.stdout + refused.stderr


@pytest.mark.parametrize("key_type", ["ec-p256", "rsa-2048"], ids=["ok/ec", "ok/rsa"])
def test_the_ca_key_cannot_be_read_out_of_the_token(softhsm: SoftHsm, key_type: str) -> None:
    key = generate_token_key("devices", token_spec(softhsm, "devices"), key_type)
    with pytest.raises(TypeError, match="cannot be exported"):
        key.private_bytes(
            Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    with pytest.raises(TypeError, match="cannot be exported"):
        key.private_numbers()

    # This process is logged in, so a second session sees the private object; asking for
    # its secret value is what the token refuses.
    token = pkcs11.lib(str(softhsm.module)).get_token(token_label=softhsm.label)
    with token.open() as session:
        obj = session.get_key(object_class=pkcs11.ObjectClass.PRIVATE_KEY, label="devices")
        secret = (
            pkcs11.Attribute.VALUE if key_type == "ec-p256" else pkcs11.Attribute.PRIVATE_EXPONENT
        )
        with pytest.raises(pkcs11.exceptions.AttributeSensitive):
            obj[secret]
        A = pkcs11.Attribute
        assert (obj[A.TOKEN], obj[A.SENSITIVE], obj[A.EXTRACTABLE]) == (True, True, False)
        assert (obj[A.ALWAYS_SENSITIVE], obj[A.NEVER_EXTRACTABLE]) == (True, True)
        assert obj[A.ID] == x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest

    # Another program, logged in on its own, sees the same (OpenSC's tool).
    listed = pkcs11_tool(
        softhsm, "--login", "--pin", softhsm.pin, "--list-objects", "--type", "privkey"
    )
    assert "Access:     sensitive, always sensitive, never extractable, local" in listed
    assert "Usage:      sign\n" in listed


def pkcs11_tool(hsm: SoftHsm, *args: str) -> str:
    result = subprocess.run(
        ["pkcs11-tool", "--module", str(hsm.module), "--token-label", hsm.label, *args],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_a_generated_key_never_replaces_one_of_the_same_label_or_id(softhsm: SoftHsm) -> None:
    spec = TokenKeySpec(
        module=softhsm.module,
        token_label=softhsm.label,
        pin=softhsm.pin,
        key_label="devices",
        key_id=b"\x01\x02",
    )
    generate_token_key("devices", spec, "rsa-2048")
    with pytest.raises(ValueError, match="already holds a key with that label"):
        generate_token_key("devices", replace(spec, key_id=None), "ec-p384")
    with pytest.raises(ValueError, match="already holds a key with that id"):
        generate_token_key("devices", replace(spec, key_label="other"), "ec-p384")
    listed = pkcs11_tool(softhsm, "--login", "--pin", softhsm.pin, "--list-objects")
    assert listed.count("label:      devices") == 2 and "other" not in listed
    assert listed.count("ID:         0102") == 2


def test_many_threads_sign_with_one_token_key_at_once(softhsm: SoftHsm) -> None:
    _, devices = token_hierarchy(softhsm, "ec-p256")
    issued: list[x509.Certificate] = []
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def work(n: int) -> None:
        start.wait()
        try:
            for i in range(20):
                issued.append(leaf(devices, f"dev-{n}-{i}"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(issued) == 160
    for cert in issued:
        cert.verify_directly_issued_by(devices.cert)
    assert len({cert.signature for cert in issued}) == 160


def test_a_forked_worker_signs_with_a_session_of_its_own(softhsm: SoftHsm) -> None:
    _, devices = token_hierarchy(softhsm, "ec-p256")
    leaf(devices)  # the parent's session is open and used
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: sign, hand the certificate over, leave without cleanup
        status = 1
        try:
            os.close(read)
            os.write(write, leaf(devices, "from-child").public_bytes(Encoding.DER))
            status = 0
        finally:
            os._exit(status)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        der = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    x509.load_der_x509_certificate(der).verify_directly_issued_by(devices.cert)
    leaf(devices).verify_directly_issued_by(devices.cert)  # the parent's still works


# -- a token that goes away ----------------------------------------------------------------


def test_a_token_that_goes_away_refuses_with_unavailable_and_recovers_when_back(
    softhsm: SoftHsm, caplog: pytest.LogCaptureFixture
) -> None:
    _, devices = token_hierarchy(softhsm, "ec-p256")
    leaf(devices)
    caplog.set_level(logging.WARNING, logger="estkit.ca")

    away = softhsm.remove()
    unavailable(lambda: leaf(devices))
    time.sleep(1.1)  # past the reopen interval: the reopen is tried, and fails
    unavailable(lambda: leaf(devices))
    unavailable(  # CRLs too
        lambda: build_crl(
            issuer=devices.cert, issuer_key=devices.key, revoked=[], now=NOW,
            validity=dt.timedelta(days=1), number=2,
        )
    )  # fmt: skip
    softhsm.put_back(away)
    once_back(lambda: leaf(devices)).verify_directly_issued_by(devices.cert)

    lines = [r.getMessage() for r in caplog.records if r.name == "estkit.ca"]
    assert len([line for line in lines if "cannot sign" in line]) == 1, lines
    assert any("signs again" in line for line in lines), lines


class CountingLogins:
    """A loaded PKCS#11 library that counts logins (``Token.open`` with a user PIN):
    SoftHSM2 never locks a PIN, so the attempts a real HSM would count are counted here."""

    def __init__(self, lib: Any) -> None:
        self.lib = lib
        self.logins = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.lib, name)

    def get_token(self, **kwargs: Any) -> Any:
        return _CountedToken(self.lib.get_token(**kwargs), self)


class _CountedToken:
    def __init__(self, token: Any, counter: CountingLogins) -> None:
        self.token = token
        self.counter = counter

    def open(self, **kwargs: Any) -> Any:
        if kwargs.get("user_pin") is not None:
            self.counter.logins += 1
        return self.token.open(**kwargs)


def test_a_pin_the_token_refused_is_never_offered_again_until_restart(
    softhsm: SoftHsm, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, devices = token_hierarchy(softhsm, "ec-p256")
    leaf(devices)
    module = hsm._Module.of(softhsm.module)
    counting = CountingLogins(module._library())
    monkeypatch.setattr(module, "_lib", counting)
    monkeypatch.setattr(hsm, "REOPEN_INTERVAL", 0.0)  # every signature may reopen
    caplog.set_level(logging.WARNING, logger="estkit.ca")
    # Another program changes the PIN; this process is still logged in with the old one.
    new_pin = "0042-new"
    pkcs11_tool(softhsm, "--login", "--pin", softhsm.pin, "--change-pin", "--new-pin", new_pin)
    leaf(devices)

    away = softhsm.remove()
    unavailable(lambda: leaf(devices))  # the session is lost
    softhsm.put_back(away)
    deadline = time.monotonic() + 5  # the first reopen may wait out an earlier one
    while counting.logins == 0 and time.monotonic() < deadline:
        unavailable(lambda: leaf(devices))
        time.sleep(0.05)
    assert counting.logins == 1  # the reopen tried the old PIN
    refusals = [unavailable(lambda: leaf(devices)) for _ in range(5)]

    assert counting.logins == 1  # and never again
    assert all(isinstance(r, SignerUnavailable) and "refused the PIN" in r.cause for r in refusals)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "restarted with the right PIN" in errors[0], errors
    assert softhsm.pin not in errors[0] and new_pin not in errors[0]
    # The token is not locked: the new PIN still logs in.
    pkcs11_tool(softhsm, "--login", "--pin", new_pin, "--list-objects")


def test_two_spellings_of_one_module_share_its_library_and_sessions(
    softhsm: SoftHsm, tmp_path: Path
) -> None:
    key = generate_token_key("devices", token_spec(softhsm, "devices"), "ec-p256")
    link = tmp_path / "p11.so"
    link.symlink_to(softhsm.module)
    dotted = softhsm.module.parent / "." / softhsm.module.name
    modules = {id(hsm._Module.of(path)) for path in (softhsm.module, link, dotted)}
    assert len(modules) == 1
    via_link = hsm.open_token_key(
        "devices", replace(token_spec(softhsm, "devices"), module=link), key.public_key()
    )
    probe = b"signed through the symlink"
    via_link.public_key().verify(
        via_link.sign(probe, ec.ECDSA(hashes.SHA256())), probe, ec.ECDSA(hashes.SHA256())
    )


def test_an_authority_with_a_token_ca_issues_and_answers_unavailable_while_it_is_away(
    softhsm: SoftHsm,
    cas: Cas,
    store: SqlStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    devices_key = generate_token_key("devices", token_spec(softhsm, "devices"), "ec-p256")
    devices_cert = issue_ca(
        subject=cn_name("token devices"),
        public_key=devices_key.public_key(),
        issuer=cas.root.cert,
        issuer_key=cas.root.key,
        validity=dt.timedelta(days=3650),
        now=NOW - dt.timedelta(days=1),
        path_length=0,
    )
    files = {
        "root": (cas.root.cert, cas.root.key),
        "bootstrap": (cas.bootstrap.cert, cas.bootstrap.key),
    }
    specs: dict[str, CaConfig] = {}
    for name, (cert, key) in files.items():
        write_pem(tmp_path / f"{name}.pem", cert)
        (tmp_path / f"{name}.key").write_bytes(key_to_pem(key))
        specs[name] = CaConfig(
            name=name,
            cert=tmp_path / f"{name}.pem",
            signer="file",
            key_file=tmp_path / f"{name}.key",
        )
    specs["devices"] = CaConfig(
        name="devices",
        cert=write_pem(tmp_path / "devices.pem", devices_cert),
        signer="pkcs11",
        token=TokenKeyRef(
            module=softhsm.module,
            token_label=softhsm.label,
            key_label="devices",
            pin_env=PIN_ENV,
            field="cas.devices",
        ),
    )
    loaded = load_cas(specs, environ={PIN_ENV: softhsm.pin})
    assert isinstance(loaded["devices"].key, ec.EllipticCurvePrivateKey)
    authority = Authority(
        cas=loaded,
        labels={"devices": label()},
        bootstrap_profile=BOOTSTRAP,
        store=store,
        secret_validity=dt.timedelta(days=7),
    )
    device_label = authority.labels["devices"]
    secret = authority.add_device("dev-1", actor="t", now=NOW)
    who = authority.authenticate_secret("dev-1", secret, now=NOW)
    csr = make_csr(generate_key("ec-p256"))

    away = softhsm.remove()
    refusal = unavailable(lambda: authority.enroll(device_label, csr, who, now=NOW))
    assert isinstance(refusal, Refusal)  # the server's one mapping: 503 + Retry-After
    softhsm.put_back(away)
    # Nothing was issued, so the one-time secret is still good for the retry.
    issued = once_back(lambda: authority.enroll(device_label, csr, who, now=NOW))
    assert openssl_verifies(tmp_path, issued.chain, issued.certificate).strip().endswith(": OK")
    assert [r.serial for r in store.certificates_of("dev-1")] == [issued.record.serial]


def existing_token_ca(hsm: SoftHsm, cas: Cas, tmp_path: Path) -> Path:
    """A key pair another tool made in the token (OpenSC's pkcs11-tool), and its CA
    certificate from the file root: the PEM's path."""
    pkcs11_tool(
        hsm, "--login", "--pin", hsm.pin, "--keypairgen", "--key-type", "EC:prime256v1",
        "--label", "devices", "--id", "c0ffee",
    )  # fmt: skip
    public_der = tmp_path / "devices.pub.der"
    pkcs11_tool(
        hsm, "--read-object", "--type", "pubkey", "--label", "devices", "-o", str(public_der)
    )
    cert = issue_ca(
        subject=cn_name("token devices"),
        public_key=serialization.load_der_public_key(public_der.read_bytes()),
        issuer=cas.root.cert,
        issuer_key=cas.root.key,
        validity=dt.timedelta(days=3650),
        now=NOW - dt.timedelta(days=1),
        path_length=0,
    )
    return write_pem(tmp_path / "devices.pem", cert)


def token_ca_config(hsm: SoftHsm, cert: Path, **token: Any) -> CaConfig:
    settings: dict[str, Any] = {
        "module": hsm.module,
        "token_label": hsm.label,
        "pin_env": PIN_ENV,
        "field": "cas.devices",
    }
    return CaConfig(
        name="devices", cert=cert, signer="pkcs11", token=TokenKeyRef(**{**settings, **token})
    )


@pytest.mark.parametrize(
    "which",
    [{"key_label": "devices"}, {"key_id": bytes.fromhex("c0ffee")}],
    ids=["ok/by-label", "ok/by-id"],
)
def test_a_key_made_by_another_tool_is_used_by_label_or_id(
    softhsm: SoftHsm, cas: Cas, tmp_path: Path, which: dict[str, Any]
) -> None:
    cert = existing_token_ca(softhsm, cas, tmp_path)
    spec = token_ca_config(softhsm, cert, **which)
    devices = load_cas(
        {"devices": spec, "root": file_ca_config(tmp_path, "root", cas.root)},
        environ={PIN_ENV: softhsm.pin},
    )["devices"]
    assert devices.chain == (devices.cert, cas.root.cert)
    device = leaf(devices)
    assert device.signature_algorithm_oid._name == "ecdsa-with-SHA256"
    assert openssl_verifies(tmp_path, devices.chain, device).strip().endswith(": OK")


def file_ca_config(tmp_path: Path, name: str, ca: IssuingCa) -> CaConfig:
    write_pem(tmp_path / f"{name}.pem", ca.cert)
    (tmp_path / f"{name}.key").write_bytes(key_to_pem(ca.key))
    return CaConfig(
        name=name, cert=tmp_path / f"{name}.pem", signer="file", key_file=tmp_path / f"{name}.key"
    )


@pytest.mark.parametrize(
    ("token", "pin", "message"),
    [
        ({"token_label": "no-such-token"}, None, "no token labelled 'no-such-token'"),
        ({"key_label": "no-such-key"}, None, "no private key that may sign"),
        ({"key_id": b"\x01"}, None, "no private key that may sign"),
        ({}, "wrong-pin", "refused the PIN"),
        ({"module": Path("/nonexistent/p11.so")}, None, "/nonexistent/p11.so: no such file"),
    ],
    ids=["fail/token", "fail/key-label", "fail/key-id", "fail/pin", "fail/module"],
)
def test_a_token_setting_that_is_wrong_fails_at_start_with_one_line(
    softhsm: SoftHsm,
    cas: Cas,
    tmp_path: Path,
    token: dict[str, Any],
    pin: str | None,
    message: str,
) -> None:
    cert = existing_token_ca(softhsm, cas, tmp_path)
    spec = token_ca_config(softhsm, cert, **{"key_label": "devices", **token})
    with pytest.raises(ValueError, match=message) as caught:
        load_cas({"devices": spec}, environ={PIN_ENV: pin or softhsm.pin})
    assert "\n" not in str(caught.value)
    assert softhsm.pin not in str(caught.value)


def test_an_existing_key_that_can_leave_the_token_is_refused(softhsm: SoftHsm) -> None:
    pkcs11_tool(
        softhsm, "--login", "--pin", softhsm.pin, "--keypairgen", "--key-type", "EC:prime256v1",
        "--label", "devices", "--id", "c0ffee", "--extractable",
    )  # fmt: skip
    with pytest.raises(ValueError, match="CKA_EXTRACTABLE True") as caught:
        existing_token_key("devices", token_spec(softhsm, "devices"))
    assert "\n" not in str(caught.value) and "can be exported" in str(caught.value)
    pkcs11_tool(
        softhsm, "--login", "--pin", softhsm.pin, "--keypairgen", "--key-type", "EC:prime256v1",
        "--label", "kept", "--id", "c0ffe1",
    )  # fmt: skip
    assert existing_token_key("kept", token_spec(softhsm, "kept")) is not None


def test_a_key_that_is_not_the_certificates_is_refused_at_start(
    softhsm: SoftHsm, cas: Cas, tmp_path: Path
) -> None:
    existing_token_ca(softhsm, cas, tmp_path)
    other = token_ca_config(
        softhsm, write_pem(tmp_path / "other.pem", cas.devices.cert), key_label="devices"
    )
    with pytest.raises(ValueError, match="is not the CA certificate's key"):
        load_cas({"devices": other}, environ={PIN_ENV: softhsm.pin})


# -- the PIN and the config --------------------------------------------------------------


def test_a_pin_file_others_can_read_is_refused(softhsm: SoftHsm, cas: Cas, tmp_path: Path) -> None:
    softhsm.pin_file.chmod(0o644)
    spec = CaConfig(
        name="devices",
        cert=write_pem(tmp_path / "devices.pem", cas.devices.cert),
        signer="pkcs11",
        token=TokenKeyRef(
            module=softhsm.module,
            token_label=softhsm.label,
            key_label="devices",
            pin_file=softhsm.pin_file,
            field="cas.devices",
        ),
    )
    with pytest.raises(
        ValueError, match=r"cas\.devices\.pin_file: .* has mode 0644; only its owner"
    ):
        load_cas({"devices": spec})
    softhsm.pin_file.chmod(0o400)
    with pytest.raises(ValueError, match="no private key"):  # the PIN was read this time
        load_cas({"devices": spec})


def test_a_pin_env_that_is_not_set_is_refused(cas: Cas, tmp_path: Path) -> None:
    spec = CaConfig(
        name="devices",
        cert=write_pem(tmp_path / "devices.pem", cas.devices.cert),
        signer="pkcs11",
        token=TokenKeyRef(
            module=Path("/nonexistent/module.so"),
            token_label="estkit",
            key_label="devices",
            pin_env=PIN_ENV,
            field="cas.devices",
        ),
    )
    with pytest.raises(ValueError, match=f"cas.devices.pin_env: environment variable {PIN_ENV}"):
        load_cas({"devices": spec}, environ={})


def config_with(devices: dict[str, Any]) -> dict[str, Any]:
    data = tomllib.loads(DEFAULT_CONFIG.format(port=7443, public_host="localhost", crl_port=7444))
    data = copy.deepcopy(data)
    data["cas"]["devices"] = devices
    return data


PKCS11 = {
    "signer": "pkcs11",
    "cert": "ca/devices.pem",
    "module": "/usr/lib/softhsm/libsofthsm2.so",
    "token_label": "estkit",
    "key_label": "devices",
    "pin_file": "token.pin",
}


def test_a_pkcs11_ca_parses_to_where_its_key_is_and_where_its_pin_comes_from() -> None:
    ca = parse_config(config_with({**PKCS11, "key_id": "0a:1B"}), Path("/srv/estkit")).cas[
        "devices"
    ]
    assert ca.signer == "pkcs11" and ca.key_file is None
    assert ca.token == TokenKeyRef(
        module=Path("/usr/lib/softhsm/libsofthsm2.so"),
        token_label="estkit",
        key_label="devices",
        key_id=b"\x0a\x1b",
        pin_file=Path("/srv/estkit/token.pin"),
        field="cas.devices",
    )
    with pytest.raises(ConfigError, match="in a PKCS#11 token, not in a file"):
        _ = ca.key


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"pin": "1234"}, "cas.devices.pin: a PIN is never written in the config; use pin_file"),
        ({"key": "ca/devices.key"}, "cas.devices.key: only with signer = 'file', not 'pkcs11'"),
        ({"pin_fil": "x"}, r"unknown key cas.devices.pin_fil \(did you mean pin_file\?\)"),
        ({"pin_file": None}, "exactly one of pin_file or pin_env"),
        ({"pin_env": "PIN"}, "exactly one of pin_file or pin_env"),
        ({"pin_file": None, "pin_env": "not a name"}, "cas.devices.pin_env: an environment"),
        ({"key_label": None}, "key_label or key_id required"),
        ({"key_id": "xyz"}, "cas.devices.key_id: the key's CKA_ID in hex"),
        ({"module": None}, "cas.devices.module: required"),
        ({"token_label": None}, "cas.devices.token_label: required"),
        ({"signer": "tpm"}, r"unknown signer 'tpm' \(available: file, pkcs11, offline\)"),
    ],
    ids=[
        "fail/pin-in-config",
        "fail/key-file-with-pkcs11",
        "fail/typo",
        "fail/no-pin-source",
        "fail/two-pin-sources",
        "fail/pin-env-name",
        "fail/which-key",
        "fail/key-id-hex",
        "fail/module",
        "fail/token-label",
        "fail/signer",
    ],
)
def test_pkcs11_settings_are_checked_by_name(changes: dict[str, Any], message: str) -> None:
    table = {k: v for k, v in {**PKCS11, **changes}.items() if v is not None}
    with pytest.raises(ConfigError, match=message) as caught:
        parse_config(config_with(table), Path("/srv/estkit"))
    assert "\n" not in str(caught.value)


def test_a_file_ca_refuses_token_settings() -> None:
    devices = {"cert": "ca/devices.pem", "key": "ca/devices.key", "token_label": "estkit"}
    with pytest.raises(
        ConfigError, match=r"cas\.devices\.token_label: only with signer = 'pkcs11'"
    ):
        parse_config(config_with(devices), Path("/srv/estkit"))


def test_token_keys_are_cryptography_keys_of_the_right_kind(softhsm: SoftHsm) -> None:
    keys: dict[str, TokenPrivateKey] = {
        t: generate_token_key(t, token_spec(softhsm, t), t) for t in ("ec-p384", "rsa-2048")
    }
    assert isinstance(keys["ec-p384"], ec.EllipticCurvePrivateKey)
    assert keys["ec-p384"].curve.name == "secp384r1"
    assert isinstance(keys["rsa-2048"], rsa.RSAPrivateKey)
    assert keys["rsa-2048"].key_size == 2048
