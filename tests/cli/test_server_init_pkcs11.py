"""``estkit server init --signer pkcs11``: the CA keys made inside a PKCS#11 token.

Each test has a SoftHSM2 token of its own (``softhsm.make_softhsm``); what is in it is
read back with OpenSC's ``pkcs11-tool``, a program that is not estkit. The CA keys are
private key objects that are sensitive and never extractable, no CA key file is ever
written, and every setting that cannot work is refused in one line before anything is
written to disk or made in the token.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from backends import postgresql_only
from estkit.ca.signers import load_cas
from estkit.server.config import load_config
from estserver import free_ports, run_estkit
from softhsm import SoftHsm, make_softhsm

CA_NAMES = ("root", "devices", "bootstrap")
PIN_ENV = "ESTKIT_TEST_INIT_PIN"
SENSITIVE = "sensitive, always sensitive, never extractable, local"


@pytest.fixture
def softhsm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SoftHsm:
    return make_softhsm(tmp_path / "softhsm", monkeypatch)


def token_args(hsm: SoftHsm) -> list[str | Path]:
    return [
        "--signer", "pkcs11", "--pkcs11-module", hsm.module, "--token-label", hsm.label,
        "--pin-file", hsm.pin_file,
    ]  # fmt: skip


def init(data_dir: Path, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    port, crl_port = free_ports(2)
    return run_estkit(
        "server", "init", "--data-dir", data_dir, "--port", str(port),
        "--crl-port", str(crl_port), *args, check=check,
    )  # fmt: skip


def pkcs11_tool(hsm: SoftHsm, *args: str) -> str:
    result = subprocess.run(
        ["pkcs11-tool", "--module", str(hsm.module), "--token-label", hsm.label, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@dataclass(frozen=True)
class TokenObject:
    """One object as ``pkcs11-tool --list-objects`` shows it."""

    kind: str  # "Private Key Object; EC", "Public Key Object; RSA 2048 bits", ...
    fields: dict[str, str]

    @property
    def label(self) -> str:
        return self.fields.get("label", "")


def token_objects(hsm: SoftHsm) -> list[TokenObject]:
    """Every object in the token, as another program logged in on its own sees it."""
    listed = pkcs11_tool(hsm, "--login", "--pin", hsm.pin, "--list-objects")
    objects: list[TokenObject] = []
    for line in listed.splitlines():
        if line and not line[0].isspace():
            objects.append(TokenObject(kind=line.strip(), fields={}))
        elif ":" in line and objects:
            name, _, value = line.strip().partition(":")
            objects[-1].fields[name.strip()] = value.strip()
    return objects


def private_keys(hsm: SoftHsm) -> dict[str, TokenObject]:
    keys = [o for o in token_objects(hsm) if o.kind.startswith("Private Key Object")]
    assert len({k.label for k in keys}) == len(keys), keys
    return {k.label: k for k in keys}


def private_key_files(data_dir: Path) -> list[str]:
    """Every file under ``data_dir`` that holds a PEM private key, by its relative path."""
    return sorted(
        str(p.relative_to(data_dir))
        for p in data_dir.rglob("*")
        if p.is_file() and b"PRIVATE KEY-----" in p.read_bytes()
    )


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def ca_cert(data_dir: Path, name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((data_dir / "ca" / f"{name}.pem").read_bytes())


@pytest.mark.parametrize(
    ("key_type", "kind"),
    [("ec-p256", "EC"), ("rsa-2048", "RSA")],
    ids=["ok/ec-p256", "ok/rsa-2048"],
)
def test_init_makes_the_ca_keys_in_the_token_and_no_ca_key_file(
    softhsm: SoftHsm, tmp_path: Path, key_type: str, kind: str
) -> None:
    data_dir = tmp_path / "data"
    out = init(data_dir, *token_args(softhsm), "--key-type", key_type).stdout
    assert out.count(f"in token '{softhsm.label}'") == 3

    config = tomllib.loads((data_dir / "estkit.toml").read_text())
    for name in CA_NAMES:
        assert config["cas"][name] == {
            "cert": f"ca/{name}.pem",
            "signer": "pkcs11",
            "module": str(softhsm.module),
            "token_label": softhsm.label,
            "key_label": name,
            "pin_file": str(softhsm.pin_file),
        }
    assert private_key_files(data_dir) == ["audit/checkpoint.key", "tls/server.key"]
    assert sorted(p.name for p in data_dir.rglob("*.key")) == [
        "checkpoint.key", "portal-session.key", "server.key",
    ]  # fmt: skip

    keys = private_keys(softhsm)
    assert sorted(keys) == sorted(CA_NAMES)
    for name, key in keys.items():
        assert key.kind.startswith(f"Private Key Object; {kind}")
        assert key.fields["Access"] == SENSITIVE  # CKA_SENSITIVE, !CKA_EXTRACTABLE
        assert key.fields["Usage"] == "sign"
        # CKA_ID is the CA certificate's SubjectKeyIdentifier: the key names its certificate.
        ski = ca_cert(data_dir, name).extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        assert key.fields["ID"] == ski.value.digest.hex()

    # The server loads each CA with the key in the token (a probe signature checks it).
    cas = load_cas(load_config(data_dir).cas, environ={})
    assert {n: ca.cert for n, ca in cas.items()} == {n: ca_cert(data_dir, n) for n in CA_NAMES}
    for name in ("devices", "bootstrap"):
        verified = subprocess.run(
            ["openssl", "verify", "-CAfile", data_dir / "ca" / "root.pem",
             data_dir / "ca" / f"{name}.pem"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert verified.returncode == 0, verified.stdout + verified.stderr


def test_init_again_loads_the_token_keys_and_makes_none(softhsm: SoftHsm, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    init(data_dir, *token_args(softhsm))
    certs = {p: p.read_bytes() for p in (data_dir / "ca").iterdir()}
    objects = token_objects(softhsm)

    for again in ([], token_args(softhsm)):  # the same options say what the config says
        out = run_estkit("server", "init", "--data-dir", data_dir, *again).stdout
        assert out.count("unchanged") == 5, out  # config, three CAs, TLS certificate
    assert {p: p.read_bytes() for p in (data_dir / "ca").iterdir()} == certs
    assert token_objects(softhsm) == objects


def test_a_lost_ca_certificate_is_made_again_for_the_key_in_the_token(
    softhsm: SoftHsm, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    init(data_dir, *token_args(softhsm))
    before = ca_cert(data_dir, "devices")
    (data_dir / "ca" / "devices.pem").unlink()
    out = run_estkit("server", "init", "--data-dir", data_dir).stdout
    assert f"devices CA: created {data_dir.resolve()}/ca/devices.pem (existing key" in out
    assert ca_cert(data_dir, "devices").public_key() == before.public_key()
    assert sorted(private_keys(softhsm)) == sorted(CA_NAMES)


def test_the_pin_can_come_from_the_environment(
    softhsm: SoftHsm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PIN_ENV, softhsm.pin)
    data_dir = tmp_path / "data"
    args = [*token_args(softhsm)[:-2], "--pin-env", PIN_ENV]
    init(data_dir, *args)
    config = tomllib.loads((data_dir / "estkit.toml").read_text())
    assert config["cas"]["bootstrap"]["pin_env"] == PIN_ENV
    assert "pin_file" not in config["cas"]["bootstrap"]
    assert softhsm.pin not in (data_dir / "estkit.toml").read_text()
    # Operator commands sign in the token too: a bootstrap certificate, with the PIN
    # from the environment.
    out = tmp_path / "dev-1"
    run_estkit("device", "bootstrap", "--data-dir", data_dir, "dev-1", "--out", out)
    verified = subprocess.run(
        ["openssl", "verify", "-CAfile", data_dir / "ca" / "root.pem",
         "-untrusted", out / "chain.pem", out / "cert.pem"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert verified.returncode == 0, verified.stdout + verified.stderr
    monkeypatch.delenv(PIN_ENV)
    refused = run_estkit(
        "device", "bootstrap", "--data-dir", data_dir, "dev-2", "--out", tmp_path / "dev-2",
        check=False,
    )  # fmt: skip
    assert refused.returncode == 78
    assert f"pin_env: environment variable {PIN_ENV} is not set" in one_line(refused)


def make_key(hsm: SoftHsm, label: str, key_id: str = "c0ffee") -> None:
    """A key pair made in the token by another tool (OpenSC's), as in a key ceremony."""
    pkcs11_tool(
        hsm, "--login", "--pin", hsm.pin, "--keypairgen", "--key-type", "EC:prime256v1",
        "--label", label, "--id", key_id,
    )  # fmt: skip


# Each case changes the token options (or the token) so that they cannot work.
Case = Callable[[SoftHsm, Path, list[str | Path]], list[str | Path]]


def _without(option: str) -> Case:
    def change(hsm: SoftHsm, tmp: Path, args: list[str | Path]) -> list[str | Path]:
        at = args.index(option)
        return args[:at] + args[at + 2 :]

    return change


def _with(option: str, value: str) -> Case:
    def change(hsm: SoftHsm, tmp: Path, args: list[str | Path]) -> list[str | Path]:
        at = args.index(option)
        return [*args[: at + 1], value, *args[at + 2 :]]

    return change


def _wrong_pin(hsm: SoftHsm, tmp: Path, args: list[str | Path]) -> list[str | Path]:
    wrong = tmp / "wrong.pin"
    wrong.write_text("0000\n")
    wrong.chmod(0o600)
    return _with("--pin-file", str(wrong))(hsm, tmp, args)


def _pin_file_0644(hsm: SoftHsm, tmp: Path, args: list[str | Path]) -> list[str | Path]:
    hsm.pin_file.chmod(0o644)
    return args


def _pin_env_unset(hsm: SoftHsm, tmp: Path, args: list[str | Path]) -> list[str | Path]:
    at = args.index("--pin-file")
    return [*args[:at], "--pin-env", "ESTKIT_TEST_NO_SUCH_PIN", *args[at + 2 :]]


def _labels_taken(hsm: SoftHsm, tmp: Path, args: list[str | Path]) -> list[str | Path]:
    make_key(hsm, "devices")
    return args


def _file_signer(hsm: SoftHsm, tmp: Path, args: list[str | Path]) -> list[str | Path]:
    return ["--token-label", hsm.label]


@pytest.mark.parametrize(
    ("change", "status", "message"),
    [
        (_without("--pkcs11-module"), 2, "--signer pkcs11 needs --pkcs11-module"),
        (_without("--pin-file"), 2, "--signer pkcs11 needs --pin-file or --pin-env"),
        (_file_signer, 2, "--token-label: only with --signer pkcs11"),
        (_with("--pkcs11-module", "/nonexistent/p11.so"), 78, "/nonexistent/p11.so: no such file"),
        (_with("--token-label", "no-such-token"), 78, "no token labelled 'no-such-token'"),
        (_wrong_pin, 78, "refused the PIN (PinIncorrect)"),
        (_pin_file_0644, 78, "--pin-file: {pin_file} has mode 0644; only its owner may read"),
        (_pin_env_unset, 78, "--pin-env: environment variable ESTKIT_TEST_NO_SUCH_PIN is not set"),
        (_labels_taken, 1, "already holds keys labelled devices, and estkit never replaces"),
    ],
    ids=[
        "fail/module-option-missing",
        "fail/pin-option-missing",
        "fail/token-option-without-signer",
        "fail/module-missing",
        "fail/token-not-found",
        "fail/wrong-pin",
        "fail/pin-file-0644",
        "fail/pin-env-unset",
        "fail/labels-taken",
    ],
)
def test_token_settings_that_cannot_work_are_refused_in_one_line_before_anything_is_made(
    softhsm: SoftHsm, tmp_path: Path, change: Case, status: int, message: str
) -> None:
    args = change(softhsm, tmp_path, token_args(softhsm))
    objects = token_objects(softhsm)
    data_dir = tmp_path / "data"
    proc = init(data_dir, *args, check=False)
    assert proc.returncode == status, proc.stderr
    assert message.format(pin_file=softhsm.pin_file) in one_line(proc)
    assert not data_dir.exists()
    assert token_objects(softhsm) == objects


def test_taken_labels_are_kept_and_other_labels_or_the_keys_there_are_used_when_asked(
    softhsm: SoftHsm, tmp_path: Path
) -> None:
    make_key(softhsm, "root")
    refused = init(tmp_path / "refused", *token_args(softhsm), check=False)
    assert refused.returncode == 1
    assert "--key-label-prefix" in one_line(refused) and "--use-existing-keys" in refused.stderr

    # Other labels: three new keys beside the one that was there.
    prefixed = tmp_path / "prefixed"
    init(prefixed, *token_args(softhsm), "--key-label-prefix", "est-")
    config = tomllib.loads((prefixed / "estkit.toml").read_text())
    assert [config["cas"][n]["key_label"] for n in CA_NAMES] == [f"est-{n}" for n in CA_NAMES]
    keys = private_keys(softhsm)
    assert sorted(keys) == sorted(["root", *(f"est-{n}" for n in CA_NAMES)])
    assert keys["root"].fields["ID"] == "c0ffee"

    # The key there: the root certificate is made for it, the free labels get new keys.
    used = tmp_path / "used"
    out = init(used, *token_args(softhsm), "--use-existing-keys").stdout
    assert f"root CA: created {used.resolve()}/ca/root.pem (existing key label 'root'" in out
    public_der = tmp_path / "root.pub.der"
    pkcs11_tool(
        softhsm, "--read-object", "--type", "pubkey", "--id", "c0ffee", "-o", str(public_der)
    )
    assert ca_cert(used, "root").public_key() == serialization.load_der_public_key(
        public_der.read_bytes()
    )
    keys = private_keys(softhsm)
    assert sorted(keys) == sorted([*CA_NAMES, *(f"est-{n}" for n in CA_NAMES)])
    assert keys["root"].fields["ID"] == "c0ffee"  # the same object, not a new one
    assert private_key_files(used) == ["audit/checkpoint.key", "tls/server.key"]
    load_cas(load_config(used).cas, environ={})


OTHER_TOKEN = ["--signer", "pkcs11", "--pkcs11-module", "{module}", "--token-label", "other"]


@pytest.mark.parametrize(
    "args",
    [["--signer", "file"], [*OTHER_TOKEN, "--pin-file", "{pin_file}"]],
    ids=["fail/file-signer", "fail/other-token"],
)
def test_an_existing_config_keeps_its_signer_and_refuses_other_options(
    softhsm: SoftHsm, tmp_path: Path, args: list[str]
) -> None:
    data_dir = tmp_path / "data"
    init(data_dir, *token_args(softhsm))
    config = (data_dir / "estkit.toml").read_bytes()
    filled = [a.format(module=softhsm.module, pin_file=softhsm.pin_file) for a in args]
    proc = init(data_dir, *filled, check=False)
    assert proc.returncode == 78
    assert "--signer and the token options apply only when init writes a new config" in (
        one_line(proc)
    )
    assert (data_dir / "estkit.toml").read_bytes() == config


def test_help_says_how_token_keys_are_made_and_what_happens_to_taken_labels() -> None:
    text = " ".join(run_estkit("server", "init", "--help").stdout.split())
    for words in (
        "--signer pkcs11 --pkcs11-module LIB --token-label T (--pin-file F | --pin-env VAR)",
        "sensitive and never extractable",
        "No CA key file is written",
        "estkit never replaces a token key",
        "--key-label-prefix",
        "--use-existing-keys",
        "1 the token already holds keys under those labels",
        "78 the module, token, PIN, PIN file or existing config does not work",
    ):
        assert words in text


@postgresql_only
def test_a_joining_node_copies_the_pin_file_not_the_module(
    softhsm: SoftHsm, database_url: str, tmp_path: Path
) -> None:
    source = tmp_path / "eu-1"
    url = database_url.replace("postgresql+psycopg://", "postgresql://")
    init(source, *token_args(softhsm), "--database-url", url, "--node-name", "eu-1")
    target = tmp_path / "us-1"
    port, crl_port = free_ports(2)
    run_estkit(
        "server", "init", "--data-dir", target, "--join", source, "--region", "us",
        "--port", str(port), "--crl-port", str(crl_port), "--node-name", "us-1",
    )  # fmt: skip
    config = load_config(target)
    for name in CA_NAMES:
        token = config.cas[name].token
        assert token is not None and config.cas[name].key_file is None
        assert token.module == softhsm.module  # the host's library, named as it was
        assert token.pin_file == target.resolve() / "ca" / f"{name}.pin"
        assert stat.S_IMODE(os.stat(token.pin_file).st_mode) == 0o600
        assert token.pin_file.read_text() == softhsm.pin_file.read_text()
    assert private_key_files(target) == ["tls/server.key"]
    load_cas(config.cas, environ={})


def test_server_run_without_python_pkcs11_says_so_in_one_line(
    softhsm: SoftHsm, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    init(data_dir, *token_args(softhsm))
    # As on an install without estkit[hsm]: importing pkcs11 fails.
    blocked = (
        "import sys; sys.modules['pkcs11'] = None; "
        "from estkit.cli.main import main; sys.exit(main(sys.argv[1:]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", blocked, "server", "run", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 78, proc.stderr
    line = one_line(proc)
    assert "signer 'pkcs11' needs python-pkcs11 (pip install 'estkit[hsm]')" in line


def test_init_refuses_an_existing_key_that_can_leave_the_token(
    softhsm: SoftHsm, tmp_path: Path
) -> None:
    pkcs11_tool(
        softhsm, "--login", "--pin", softhsm.pin, "--keypairgen", "--key-type", "EC:prime256v1",
        "--label", "root", "--id", "c0ffee", "--extractable",
    )  # fmt: skip
    data_dir = tmp_path / "data"
    proc = init(data_dir, *token_args(softhsm), "--use-existing-keys", check=False)
    assert proc.returncode == 78, proc.stderr
    assert "the private key can be exported" in one_line(proc)
    assert sorted(private_keys(softhsm)) == ["root"]  # nothing made beside it
