"""An offline root: ``estkit root`` on the root's machine, ``server init --offline-root``
and ``ca import`` on the server's.

The root is made in a directory of its own (a key file, or a key in a SoftHSM2 token);
the server makes its issuing CAs' keys and requests; the root signs them and its CRL;
``ca import`` installs only what checks out. OpenSSL, a program that is not estkit,
verifies what the root signed. Until the import, every command that would need the
CAs refuses in one line, exit 78.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import stat
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from test_device_only import device_only

from estkit.pki.certs import fingerprint, serial_hex
from estkit.pki.keys import load_private_key_pem
from estkit.pki.profiles import issue_ca
from estserver import free_ports, run_estkit
from softhsm import SoftHsm, make_softhsm

SHA256 = re.compile(r"SHA-256:\s+([0-9A-F:]{95})")


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def openssl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", *map(str, args)], capture_output=True, text=True, timeout=30, check=False
    )


def cert_of(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def private_key_files(directory: Path) -> list[str]:
    return sorted(
        str(p.relative_to(directory))
        for p in directory.rglob("*")
        if p.is_file() and b"PRIVATE KEY-----" in p.read_bytes()
    )


@dataclass
class Offline:
    """The root's directory, the server's data directory, and the folder things are
    carried in between the two machines."""

    root_dir: Path
    data_dir: Path
    carried: Path
    root_fingerprint: str

    def carry_requests(self) -> None:
        self.carried.mkdir(exist_ok=True)
        for name in ("devices", "bootstrap"):
            shutil.copy(self.data_dir / "ca" / f"{name}.csr", self.carried)
        shutil.copy(self.root_dir / "root.pem", self.carried)

    def sign(self, name: str, csr: str | None = None) -> Path:
        out = self.carried / f"{name}.pem"
        run_estkit(
            "root", "sign-ca", "--dir", self.root_dir, "--name", name,
            "--csr", self.carried / f"{csr or name}.csr", "--out", out,
        )  # fmt: skip
        return out

    def crl(self, *args: str) -> Path:
        out = self.carried / "root.crl"
        run_estkit("root", "crl", "--dir", self.root_dir, "--out", out, *args)
        return out

    def ca_import(self, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_estkit("ca", "import", "--data-dir", self.data_dir, *args, check=check)

    def import_all(self) -> subprocess.CompletedProcess[str]:
        return self.ca_import(
            "--root", self.carried / "root.pem",
            "--root-fingerprint", self.root_fingerprint,
            "--cert", f"devices={self.sign('devices')}",
            "--cert", f"bootstrap={self.sign('bootstrap')}",
            "--root-crl", self.crl(),
        )  # fmt: skip


def root_init(root_dir: Path, *args: str | Path) -> str:
    """``estkit root init``; the root's SHA-256 fingerprint it printed."""
    out = run_estkit("root", "init", "--dir", root_dir, *args).stdout
    match = SHA256.search(out)
    assert match, out
    return match.group(1)


def server_init(data_dir: Path, *args: str | Path, check: bool = True) -> str:
    port, crl_port = free_ports(2)
    return run_estkit(
        "server", "init", "--data-dir", data_dir, "--port", str(port),
        "--crl-port", str(crl_port), *args, check=check,
    ).stdout  # fmt: skip


@pytest.fixture
def offline(tmp_path: Path) -> Offline:
    root_dir = tmp_path / "root"
    fp = root_init(root_dir)
    data_dir = tmp_path / "server"
    server_init(data_dir, "--offline-root")
    result = Offline(root_dir, data_dir, tmp_path / "carried", fp)
    result.carry_requests()
    return result


# -- the root's machine --------------------------------------------------------------


def test_root_init_makes_a_self_signed_root_and_a_private_key_file(tmp_path: Path) -> None:
    root_dir = tmp_path / "root"
    fp = root_init(root_dir, "--organization", "Contoso", "--validity", "10y")

    root = cert_of(root_dir / "root.pem")
    assert fingerprint(root) == fp
    assert root.subject == root.issuer
    assert root.subject.rfc4514_string() == "CN=estkit Root CA,O=Contoso"
    constraints = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 1
    usage = root.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    lifetime = root.not_valid_after_utc - root.not_valid_before_utc
    assert dt.timedelta(days=3649) < lifetime < dt.timedelta(days=3651)
    assert stat.S_IMODE((root_dir / "root.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(root_dir.stat().st_mode) == 0o700
    assert tomllib.loads((root_dir / "root.toml").read_text())["root"] == {
        "cert": "root.pem",
        "signer": "file",
        "key": "root.key",
    }
    checked = openssl("verify", "-CAfile", root_dir / "root.pem", root_dir / "root.pem")
    assert checked.returncode == 0, checked.stdout + checked.stderr

    again = run_estkit("root", "init", "--dir", root_dir, check=False)
    assert again.returncode == 1
    assert "holds a root already, and estkit never replaces one" in one_line(again)
    assert cert_of(root_dir / "root.pem") == root


def test_the_root_never_shares_a_servers_data_directory(tmp_path: Path) -> None:
    data_dir = tmp_path / "server"
    server_init(data_dir)
    refused = run_estkit("root", "init", "--dir", data_dir, check=False)
    assert refused.returncode == 78
    assert "is an estkit server's data directory" in one_line(refused)
    assert not (data_dir / "root.toml").exists()

    root_dir = tmp_path / "root"
    root_init(root_dir)
    refused = run_estkit("server", "init", "--data-dir", root_dir, "--offline-root", check=False)
    assert refused.returncode == 78
    assert "holds an offline root" in one_line(refused)
    assert not (root_dir / "estkit.toml").exists()


def test_sign_ca_gives_the_request_the_profile_of_estkit_issuing_cas(offline: Offline) -> None:
    signed = offline.sign("devices")

    cert, root = cert_of(signed), cert_of(offline.root_dir / "root.pem")
    csr = x509.load_pem_x509_csr((offline.carried / "devices.csr").read_bytes())
    assert cert.subject == csr.subject
    assert cert.public_key() == csr.public_key()
    assert cert.issuer == root.subject
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(csr.public_key())
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    root_ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == root_ski.digest
    assert cert.not_valid_after_utc <= root.not_valid_after_utc
    checked = openssl("verify", "-x509_strict", "-CAfile", offline.root_dir / "root.pem", signed)
    assert checked.returncode == 0, checked.stdout + checked.stderr

    listing = json.loads(run_estkit("root", "show", "--dir", offline.root_dir, "--json").stdout)
    assert listing["root"]["fingerprint_sha256"] == offline.root_fingerprint
    serial = serial_hex(cert.serial_number)
    assert [(s["name"], s["serial"], s["revoked"]) for s in listing["signed"]] == [
        ("devices", serial, None)
    ]
    assert cert_of(offline.root_dir / "issued" / f"{serial}.pem") == cert


def _tampered(csr_pem: bytes) -> bytes:
    der = bytearray(x509.load_pem_x509_csr(csr_pem).public_bytes(Encoding.DER))
    der[-3] ^= 0x01  # inside the signature
    return bytes(der)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (
            lambda o: _tampered((o.carried / "devices.csr").read_bytes()),
            "signature does not verify",
        ),
        (lambda o: b"not a request", "not a certification request"),
        (
            lambda o: (
                x509.CertificateSigningRequestBuilder()
                .subject_name(x509.Name.from_rfc4514_string("CN=again"))
                .sign(load_private_key_pem((o.root_dir / "root.key").read_bytes()), hashes.SHA256())
                .public_bytes(Encoding.PEM)
            ),
            "a request for the root's own key",
        ),
    ],
    ids=["fail/bad-signature", "fail/not-a-csr", "fail/root-key"],
)
def test_sign_ca_refuses_a_request_it_cannot_trust(offline: Offline, make, reason: str) -> None:  # type: ignore[no-untyped-def]
    csr = offline.carried / "odd.csr"
    csr.write_bytes(make(offline))
    out = offline.carried / "odd.pem"
    proc = run_estkit(
        "root", "sign-ca", "--dir", offline.root_dir, "--name", "devices", "--csr", csr,
        "--out", out, check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert reason in one_line(proc)
    assert not out.exists()
    assert not list(offline.root_dir.glob("issued/*.pem"))


def test_root_crl_numbers_increase_and_list_every_revocation(offline: Offline) -> None:
    root_pem = offline.root_dir / "root.pem"
    devices = cert_of(offline.sign("devices"))
    first = offline.crl("--validity", "400d")
    crl = x509.load_der_x509_crl(first.read_bytes())
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 1
    assert len(crl) == 0
    assert crl.next_update_utc is not None
    lifetime = crl.next_update_utc - crl.last_update_utc
    assert abs(lifetime - dt.timedelta(days=400)) < dt.timedelta(seconds=5)
    checked = openssl(
        "crl", "-inform", "DER", "-in", first, "-noout", "-verify", "-CAfile", root_pem
    )
    assert checked.returncode == 0 and "verify OK" in checked.stdout + checked.stderr

    serial = f"{devices.serial_number:x}"
    second = offline.crl("--revoke", serial, "--reason", "cACompromise")
    crl = x509.load_der_x509_crl(second.read_bytes())
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 2
    entry = crl.get_revoked_certificate_by_serial_number(devices.serial_number)
    assert entry is not None
    reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason is x509.ReasonFlags.ca_compromise
    # A later CRL still lists it.
    third = x509.load_der_x509_crl(offline.crl().read_bytes())
    assert third.get_revoked_certificate_by_serial_number(devices.serial_number) is not None
    assert third.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 3

    unknown = run_estkit(
        "root", "crl", "--dir", offline.root_dir, "--out", offline.carried / "x.crl",
        "--revoke", "0123AB", check=False,
    )  # fmt: skip
    assert unknown.returncode == 1
    assert "not a CA certificate this root signed" in one_line(unknown)
    assert not (offline.carried / "x.crl").exists()


@pytest.fixture
def softhsm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SoftHsm:
    return make_softhsm(tmp_path / "softhsm", monkeypatch)


def test_a_root_in_a_token_signs_with_no_key_file(softhsm: SoftHsm, tmp_path: Path) -> None:
    root_dir = tmp_path / "root"
    token = [
        "--signer", "pkcs11", "--pkcs11-module", softhsm.module,
        "--token-label", softhsm.label, "--pin-file", softhsm.pin_file,
    ]  # fmt: skip
    root_init(root_dir, *token, "--key-type", "ec-p384")
    assert private_key_files(root_dir) == []
    settings = tomllib.loads((root_dir / "root.toml").read_text())["root"]
    assert settings["signer"] == "pkcs11" and settings["key_label"] == "root"
    assert "pin" not in settings and settings["pin_file"] == str(softhsm.pin_file)
    listed = subprocess.run(
        ["pkcs11-tool", "--module", str(softhsm.module), "--token-label", softhsm.label,
         "--login", "--pin", softhsm.pin, "--list-objects", "--type", "privkey"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert "label:      root" in listed
    assert "sensitive, always sensitive, never extractable" in listed

    data_dir = tmp_path / "server"
    server_init(data_dir, "--offline-root")
    csr = data_dir / "ca" / "devices.csr"
    out = tmp_path / "devices.pem"
    run_estkit(
        "root", "sign-ca", "--dir", root_dir, "--name", "devices", "--csr", csr, "--out", out
    )
    checked = openssl("verify", "-CAfile", root_dir / "root.pem", out)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    crl = tmp_path / "root.crl"
    run_estkit("root", "crl", "--dir", root_dir, "--out", crl)
    checked = openssl("crl", "-inform", "DER", "-in", crl, "-noout", "-verify", "-CAfile",
                      root_dir / "root.pem")  # fmt: skip
    assert checked.returncode == 0 and "verify OK" in checked.stdout + checked.stderr

    # The label is taken now: a second root in that token is refused before anything.
    again = run_estkit("root", "init", "--dir", tmp_path / "root2", *token, check=False)
    assert again.returncode == 1
    assert "already holds a key labelled 'root'" in one_line(again)
    assert not (tmp_path / "root2" / "root.pem").exists()


def test_the_root_commands_need_no_server_extra(tmp_path: Path) -> None:
    """The root's machine installs ``pip install estkit`` only."""
    root_dir = tmp_path / "root"
    made = device_only("root", "init", "--dir", root_dir)
    assert made.returncode == 0, made.stderr
    data_dir = tmp_path / "server"
    server_init(data_dir, "--offline-root")
    out = tmp_path / "devices.pem"
    signed = device_only(
        "root", "sign-ca", "--dir", root_dir, "--name", "devices",
        "--csr", data_dir / "ca" / "devices.csr", "--out", out,
    )  # fmt: skip
    assert signed.returncode == 0, signed.stderr
    crl = device_only("root", "crl", "--dir", root_dir, "--out", tmp_path / "root.crl")
    assert crl.returncode == 0, crl.stderr
    shown = device_only("root", "show", "--dir", root_dir, "--json")
    assert shown.returncode == 0 and '"devices"' in shown.stdout


# -- the server's machine ----------------------------------------------------------


def test_init_offline_root_writes_no_root_key_and_says_what_to_carry(tmp_path: Path) -> None:
    data_dir = tmp_path / "server"
    out = server_init(data_dir, "--offline-root")

    config = tomllib.loads((data_dir / "estkit.toml").read_text())
    assert config["cas"]["root"] == {
        "cert": "ca/root.pem",
        "signer": "offline",
        "crl": "ca/root.crl",
    }
    assert sorted(p.name for p in (data_dir / "ca").iterdir()) == [
        "bootstrap.csr", "bootstrap.key", "devices.csr", "devices.key",
    ]  # fmt: skip
    assert not list(data_dir.rglob("root.key"))
    for name in ("devices", "bootstrap"):
        csr = x509.load_pem_x509_csr((data_dir / "ca" / f"{name}.csr").read_bytes())
        assert csr.is_signature_valid
        key = load_private_key_pem((data_dir / "ca" / f"{name}.key").read_bytes())
        assert csr.public_key() == key.public_key()
    assert f"carry to the root's machine: {data_dir.resolve()}/ca/devices.csr" in out
    assert "estkit root sign-ca --dir R --name devices --csr devices.csr --out devices.pem" in out
    assert "estkit root crl --dir R --out root.crl" in out
    assert (
        f"estkit ca import --data-dir {data_dir.resolve()} --root root.pem "
        "--cert devices=devices.pem --cert bootstrap=bootstrap.pem --root-crl root.crl"
    ) in out

    # Run again: nothing is made anew, the same requests stand.
    before = {p: p.read_bytes() for p in (data_dir / "ca").iterdir()}
    again = server_init(data_dir)
    assert "request" in again and "unchanged" in again
    assert {p: p.read_bytes() for p in (data_dir / "ca").iterdir()} == before


@pytest.mark.parametrize(
    "command",
    [
        ("server", "run"),
        ("server", "info"),
        ("ca", "list"),
        ("device", "add", "dev-1"),
        ("device", "bootstrap", "dev-1", "--out", "boot"),
    ],
    ids=lambda c: "fail/" + "-".join(c[:2]),
)
def test_commands_that_need_the_cas_refuse_until_the_import(
    offline: Offline, command: tuple[str, ...]
) -> None:
    group, action, *rest = command
    proc = run_estkit(group, action, "--data-dir", offline.data_dir, *rest, check=False, timeout=60)
    assert proc.returncode == 78, proc.stderr
    line = one_line(proc)
    assert line.startswith("estkit: offline root: not imported yet: ca/root.pem, ca/devices.pem, ")
    assert "sign ca/devices.csr and ca/bootstrap.csr on the root's machine" in line
    assert f"estkit ca import --data-dir {offline.data_dir.resolve()}" in line


def test_import_installs_the_root_the_cas_the_crl_and_a_tls_certificate(
    offline: Offline,
) -> None:
    out = offline.import_all().stdout
    data = offline.data_dir
    assert out.rstrip().endswith(f"ready: estkit server run --data-dir {data}")
    root = cert_of(data / "ca" / "root.pem")
    assert fingerprint(root) == offline.root_fingerprint
    for name in ("devices", "bootstrap"):
        checked = openssl(
            "verify", "-CAfile", data / "ca" / "root.pem", data / "ca" / f"{name}.pem"
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
    assert (data / "ca" / "root.crl").read_bytes() == (offline.carried / "root.crl").read_bytes()
    # The TLS certificate: from the bootstrap CA, its chain in the file, for tls/server.key.
    tls_chain = x509.load_pem_x509_certificates((data / "tls" / "server.pem").read_bytes())
    assert [c.subject for c in tls_chain[1:]] == [cert_of(data / "ca" / "bootstrap.pem").subject]
    tls_key = load_private_key_pem((data / "tls" / "server.key").read_bytes())
    assert tls_chain[0].public_key() == tls_key.public_key()
    checked = openssl(
        "verify", "-CAfile", data / "ca" / "root.pem", "-untrusted", data / "ca" / "bootstrap.pem",
        "-purpose", "sslserver", data / "tls" / "server.pem",
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert private_key_files(data) == [
        "audit/checkpoint.key", "ca/bootstrap.key", "ca/devices.key", "tls/server.key",
    ]  # fmt: skip

    # Again with the same files: nothing changes. A newer CRL replaces the old one.
    again = offline.ca_import(
        "--root", offline.carried / "root.pem", "--cert", f"devices={offline.carried}/devices.pem",
    ).stdout  # fmt: skip
    assert "root CA: " in again and "devices CA: " in again and again.count("unchanged") == 2
    newer = offline.crl()
    assert "number 2" in offline.ca_import("--root-crl", newer).stdout
    info = run_estkit("server", "info", "--data-dir", data).stdout
    assert offline.root_fingerprint in info


def _other_root_signed(offline: Offline, tmp_path: Path) -> Path:
    other = tmp_path / "other-root"
    root_init(other)
    out = tmp_path / "other-devices.pem"
    run_estkit(
        "root", "sign-ca", "--dir", other, "--name", "devices",
        "--csr", offline.carried / "devices.csr", "--out", out,
    )  # fmt: skip
    return out


def _leaf_for_devices_key(offline: Offline, tmp_path: Path) -> Path:
    """A certificate for the devices CA's key, signed by the root, that is no CA's."""
    root = cert_of(offline.root_dir / "root.pem")
    root_key = load_private_key_pem((offline.root_dir / "root.key").read_bytes())
    csr = x509.load_pem_x509_csr((offline.carried / "devices.csr").read_bytes())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name(root.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(root_key, hashes.SHA256())
    )
    out = tmp_path / "leaf.pem"
    out.write_bytes(cert.public_bytes(Encoding.PEM))
    return out


def _expired_ca(offline: Offline, tmp_path: Path) -> Path:
    root = cert_of(offline.root_dir / "root.pem")
    root_key = load_private_key_pem((offline.root_dir / "root.key").read_bytes())
    csr = x509.load_pem_x509_csr((offline.carried / "devices.csr").read_bytes())
    cert = issue_ca(
        subject=csr.subject, public_key=csr.public_key(), issuer=root, issuer_key=root_key,
        validity=dt.timedelta(days=1), now=dt.datetime.now(dt.UTC) - dt.timedelta(days=3),
        path_length=0,
    )  # fmt: skip
    out = tmp_path / "expired.pem"
    out.write_bytes(cert.public_bytes(Encoding.PEM))
    return out


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (
            lambda o, t: ["--cert", f"bootstrap={o.sign('devices')}"],
            "not a certificate of the bootstrap CA's key (its request is ",
        ),
        (
            lambda o, t: ["--cert", f"devices={_other_root_signed(o, t)}"],
            "it does not chain to the root CN=estkit Root CA,O=estkit",
        ),
        (
            lambda o, t: ["--cert", f"devices={_leaf_for_devices_key(o, t)}"],
            "it is not a CA certificate (basicConstraints CA:TRUE)",
        ),
        (lambda o, t: ["--cert", f"devices={_expired_ca(o, t)}"], "it expired at "),
        (
            lambda o, t: ["--cert", f"devices={o.carried / 'root.pem'}"],
            "it is the root's own certificate",
        ),
        (
            lambda o, t: [
                "--root-fingerprint",
                "AB" * 32,
                "--cert",
                f"devices={o.sign('devices')}",
            ],
            "not the root you meant; nothing imported",
        ),
        (
            lambda o, t: ["--root-crl", _crl_of_other_root(t)],
            "its signature is not CN=estkit Root CA,O=estkit's",
        ),
        (lambda o, t: ["--cert", f"ca={o.sign('devices')}"], "not an issuing CA of this server"),
    ],
    ids=[
        "fail/not-its-key",
        "fail/other-root",
        "fail/not-a-ca",
        "fail/expired",
        "fail/the-root-itself",
        "fail/root-fingerprint",
        "fail/crl-of-another-root",
        "fail/unknown-ca",
    ],
)
def test_import_refuses_what_does_not_belong_and_writes_nothing(
    offline: Offline,
    tmp_path: Path,
    args,
    reason: str,  # type: ignore[no-untyped-def]
) -> None:
    before = sorted(p.name for p in (offline.data_dir / "ca").iterdir())
    proc = offline.ca_import("--root", offline.carried / "root.pem", *args(offline, tmp_path),
                             check=False)  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert reason in one_line(proc)
    assert sorted(p.name for p in (offline.data_dir / "ca").iterdir()) == before
    assert not (offline.data_dir / "tls" / "server.pem").exists()


def _crl_of_other_root(tmp_path: Path) -> Path:
    other = tmp_path / "r3"
    root_init(other)
    out = tmp_path / "other.crl"
    run_estkit("root", "crl", "--dir", other, "--out", out)
    return out


def test_import_never_replaces_the_installed_root(offline: Offline, tmp_path: Path) -> None:
    offline.import_all()
    other = tmp_path / "other-root"
    root_init(other)
    proc = offline.ca_import("--root", other / "root.pem", check=False)
    assert proc.returncode == 1
    assert "another root than the one installed" in one_line(proc)
    assert fingerprint(cert_of(offline.data_dir / "ca" / "root.pem")) == offline.root_fingerprint


def test_import_refuses_an_older_crl(offline: Offline) -> None:
    older = offline.carried / "older.crl"
    shutil.copy(offline.crl(), older)
    offline.import_all()  # CRL number 2
    proc = offline.ca_import("--root-crl", older, check=False)
    assert proc.returncode == 1
    assert "CRL number 1 is older than the installed one's (2)" in one_line(proc)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            '[cas.root]\ncert = "ca/root.pem"\nsigner = "offline"\nkey = "ca/root.key"\n',
            'cas.root.key: the key of an offline root is never on this server (signer = "offline")',
        ),
        (
            '[cas.devices]\ncert = "ca/devices.pem"\nsigner = "offline"\n',
            "cas.devices.signer: only the root may be 'offline'; CA 'devices' signs on this server",
        ),
        (
            '[cas.root]\ncert = "ca/root.pem"\nkey = "ca/root.key"\ncrl = "ca/root.crl"\n',
            "cas.root.crl: only with signer = 'offline', not 'file'",
        ),
    ],
    ids=["fail/offline-with-key", "fail/offline-issuing-ca", "fail/crl-without-offline"],
)
def test_config_refuses_an_offline_ca_that_cannot_be(
    tmp_path: Path, table: str, message: str
) -> None:
    data_dir = tmp_path / "server"
    server_init(data_dir)
    config = data_dir / "estkit.toml"
    name = table.split("]")[0] + "]"
    text = config.read_text()
    start = text.index(name)
    end = text.index("\n[", start + 1)
    config.write_text(text[:start] + table + text[end:])
    proc = run_estkit("server", "run", "--data-dir", data_dir, check=False, timeout=60)
    assert proc.returncode == 78
    assert message in one_line(proc)


def test_offline_root_is_refused_on_an_existing_online_config(tmp_path: Path) -> None:
    data_dir = tmp_path / "server"
    server_init(data_dir)
    proc = run_estkit("server", "init", "--data-dir", data_dir, "--offline-root", check=False)
    assert proc.returncode == 78
    assert "its root's key is on this server" in one_line(proc)
    assert (data_dir / "ca" / "root.key").exists()
