"""``estkit ca rotate``: an issuing CA's next generation, beside the one it replaces.

On a data directory that ``estkit server init`` made (no server runs): with the file
signer a new key file and a certificate from the same root, with a PKCS#11 signer a
new key in the same token (read back with OpenSC's ``pkcs11-tool``), with an offline
root a request that ``estkit root sign-ca`` signs and ``estkit ca import`` installs.
Each adds a ``[cas.<name>]`` table with ``replaces`` and ``issues_from``; each refusal
is one line, and writes nothing. OpenSSL, a program that is not estkit, verifies the
new CA certificates.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import shutil
import stat
import subprocess
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from test_offline_root import Offline, cert_of, one_line, openssl, root_init, server_init
from test_server_init_pkcs11 import (
    CA_NAMES,
    SENSITIVE,
    ca_cert,
    private_key_files,
    private_keys,
    softhsm,  # noqa: F401 (a fixture)
    token_args,
)

import serverdb
from backends import server_database
from ca.test_constraints import DNS, make_ca
from estkit.ca.authority import IssuingCa
from estkit.ca.signers import load_cas
from estkit.cli.main import main
from estkit.pki.certs import certs_to_pem, fingerprint
from estkit.pki.keys import key_to_pem, load_private_key_pem, public_keys_match
from estkit.server.config import load_config
from estkit.server.wiring import awaiting_import, installed_cas, offline_root_pending
from estserver import EstServer, make_server
from softhsm import SoftHsm

Run = subprocess.CompletedProcess[str]


def rotate(data_dir: Path, capsys: pytest.CaptureFixture[str], *args: str) -> Run:
    """``estkit ca rotate --data-dir D ARGS`` in this process, as a finished process."""
    return estkit(capsys, "ca", "rotate", "--data-dir", str(data_dir), *args)


def estkit(capsys: pytest.CaptureFixture[str], *args: str) -> Run:
    capsys.readouterr()
    status = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), status, out, err)


def snapshot(data_dir: Path) -> dict[str, bytes]:
    """Every file under ``data_dir`` and its bytes; the SQLite database by name only (a
    refused rotation writes no audit entry, read apart)."""
    return {
        str(p.relative_to(data_dir)): b"" if p.name.startswith("estkit.db") else p.read_bytes()
        for p in sorted(data_dir.rglob("*"))
        if p.is_file()
    }


def rotations(data_dir: Path) -> list[tuple[str, str]]:
    """The ``ca-rotate`` audit entries: (outcome, detail), oldest first."""
    return [
        (r[0], r[1])
        for r in serverdb.rows(
            data_dir,
            "SELECT outcome, detail FROM audit_events WHERE action = 'ca-rotate' ORDER BY id",
        )
    ]


def assert_signed_by_root(data_dir: Path, name: str) -> None:
    checked = openssl(
        "verify", "-CAfile", data_dir / "ca" / "root.pem", data_dir / "ca" / f"{name}.pem"
    )
    assert checked.returncode == 0 and checked.stdout.strip().endswith(": OK"), (
        checked.stdout + checked.stderr
    )


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# -- file signer -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ca", "common_name"),
    [("devices", "estkit Device Issuing CA G2"), ("bootstrap", "estkit Bootstrap CA G2")],
    ids=["ok/devices", "ok/bootstrap"],
)
def test_rotate_makes_the_next_generation_beside_the_old_one_signed_by_the_same_root(
    fresh_server: EstServer, capsys: pytest.CaptureFixture[str], ca: str, common_name: str
) -> None:
    data_dir = fresh_server.data_dir
    new = f"{ca}-2"
    before = snapshot(data_dir)
    started = utc_now()
    proc = rotate(data_dir, capsys, ca)
    assert proc.returncode == 0, proc.stderr
    assert f"{new} CA: created ca/{new}.pem" in proc.stdout

    # The new key file beside the old one, only its owner may read it; the old files stay.
    key_path = data_dir / "ca" / f"{new}.key"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert sorted(set(snapshot(data_dir)) - set(before)) == [f"ca/{new}.key", f"ca/{new}.pem"]
    assert {p: b for p, b in snapshot(data_dir).items() if p in before and p != "estkit.toml"} == {
        p: b for p, b in before.items() if p != "estkit.toml"
    }
    old, cert, root = ca_cert(data_dir, ca), ca_cert(data_dir, new), ca_cert(data_dir, "root")
    key = load_private_key_pem(key_path.read_bytes())
    assert public_keys_match(cert.public_key(), key.public_key())
    assert cert.public_key() != old.public_key()

    # Same root, a name of its own, the profile and lifetime of the one it replaces.
    assert_signed_by_root(data_dir, new)
    assert cert.issuer == root.subject == old.issuer
    assert cert.subject.rfc4514_string() == f"CN={common_name},O=estkit"
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    old_lifetime = old.not_valid_after_utc - old.not_valid_before_utc
    assert abs(lifetime - old_lifetime) <= dt.timedelta(seconds=1)
    assert cert.not_valid_after_utc <= root.not_valid_after_utc

    # The config: the old text unchanged, the new table after it, parsed by the server.
    text = (data_dir / "estkit.toml").read_text()
    assert text.startswith(before["estkit.toml"].decode().rstrip("\n"))
    table = tomllib.loads(text)["cas"][new]
    assert {k: v for k, v in table.items() if k != "issues_from"} == {
        "cert": f"ca/{new}.pem",
        "key": f"ca/{new}.key",
        "signer": "file",
        "replaces": ca,
    }
    generation = load_config(data_dir).cas[new].generation
    assert generation.replaces == ca and generation.issues_from is not None
    week = dt.timedelta(days=7)  # the default --issues-from
    assert started.replace(microsecond=0) + week <= generation.issues_from <= utc_now() + week
    assert f"replaces {ca}, issues from {generation.issues_from.isoformat()}" in proc.stdout

    listed = json.loads(estkit(capsys, "ca", "list", "--data-dir", str(data_dir), "--json").stdout)
    by_name = {c["name"]: c for c in listed["cas"]}
    assert by_name[new]["replaces"] == ca
    assert by_name[new]["issues_from"] == generation.issues_from.isoformat()
    assert by_name[new]["subject"] == cert.subject.rfc4514_string()
    assert by_name[ca]["replaces"] is None and by_name[ca]["issues_from"] is None

    [(outcome, detail)] = rotations(data_dir)
    assert outcome == "ok"
    assert detail.startswith(
        f"{new} ({cert.subject.rfc4514_string()}) replaces {ca} from "
        f"{generation.issues_from.isoformat()}; key "
    )
    assert detail.endswith(f"; SHA-256 {fingerprint(cert)}")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--issues-from", "now"], lambda now: now),
        (["--issues-from", "0s"], lambda now: now),
        (["--issues-from", "12h"], lambda now: now + dt.timedelta(hours=12)),
        (
            ["--issues-from", "2031-06-01T12:00:00+02:00"],
            lambda now: dt.datetime(2031, 6, 1, 10, tzinfo=dt.UTC),
        ),
    ],
    ids=["ok/now", "ok/zero-duration", "ok/duration", "ok/offset-to-utc"],
)
def test_issues_from_is_a_moment_in_utc_never_in_the_past(
    fresh_server: EstServer,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    expected: Callable[[dt.datetime], dt.datetime],
) -> None:
    started = utc_now().replace(microsecond=0)
    proc = rotate(fresh_server.data_dir, capsys, "devices", *args)
    assert proc.returncode == 0, proc.stderr
    issues_from = tomllib.loads((fresh_server.data_dir / "estkit.toml").read_text())["cas"][
        "devices-2"
    ]["issues_from"]
    assert issues_from.tzinfo is not None and issues_from.utcoffset() == dt.timedelta(0)
    assert expected(started) <= issues_from <= expected(utc_now())


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["root"], 1, "the root is not rotated this way"),
        (["nosuch"], 1, "unknown CA 'nosuch'; configured: root, devices, bootstrap"),
        (["devices", "--issues-from", "tomorrow"], 2, "--issues-from: a date and time with its"),
        (["devices", "--issues-from", "7x"], 2, "or now, got '7x'"),
        (
            ["devices", "--issues-from", "2031-01-15T00:00:00"],
            2,
            "--issues-from: '2031-01-15T00:00:00' has no offset; add Z or +HH:MM",
        ),
        (["devices", "--common-name", "x" * 65], 2, "--common-name: 1-64 characters"),
        # A mistyped year must not switch at once, before the hub knows the new CA.
        (["devices", "--issues-from", "2020-01-01T00:00:00Z"], 2, "has passed; give a later"),
        # The new generation may not take a name a CA has already.
        (["devices", "--common-name", "estkit Bootstrap CA"], 1, "is CA bootstrap's name already"),
    ],
    ids=[
        "fail/root",
        "fail/unknown-ca",
        "fail/when-not-a-time",
        "fail/when-bad-duration",
        "fail/when-without-offset",
        "fail/common-name-too-long",
        "fail/when-past",
        "fail/common-name-taken",
    ],
)
def test_a_rotation_that_cannot_be_is_refused_in_one_line_and_writes_nothing(
    fresh_server: EstServer,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    status: int,
    message: str,
) -> None:
    data_dir = fresh_server.data_dir
    before = snapshot(data_dir)
    proc = rotate(data_dir, capsys, *args)
    assert proc.returncode == status, proc.stderr
    assert message in one_line(proc)
    assert snapshot(data_dir) == before
    assert rotations(data_dir) == []


@pytest.mark.parametrize("again", ["devices", "devices-2"], ids=["fail/family", "fail/pending"])
def test_a_second_rotation_before_the_first_issues_is_refused(
    fresh_server: EstServer, capsys: pytest.CaptureFixture[str], again: str
) -> None:
    data_dir = fresh_server.data_dir
    first = rotate(data_dir, capsys, "devices", "--issues-from", "1d")
    assert first.returncode == 0, first.stderr
    before = snapshot(data_dir)

    proc = rotate(data_dir, capsys, again, "--issues-from", "now")
    assert proc.returncode == 1, proc.stderr
    line = one_line(proc)
    assert "devices: devices-2 replaces devices from " in line
    assert line.endswith("already; rotate again once it issues")
    assert snapshot(data_dir) == before
    assert len(rotations(data_dir)) == 1


def test_once_the_new_generation_issues_the_next_rotation_replaces_it(
    fresh_server: EstServer, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = fresh_server.data_dir
    assert rotate(data_dir, capsys, "devices", "--issues-from", "now").returncode == 0
    proc = rotate(data_dir, capsys, "devices", "--issues-from", "now")
    assert proc.returncode == 0, proc.stderr
    assert "devices-3 CA: created ca/devices-3.pem" in proc.stdout

    config = load_config(data_dir)
    assert config.cas["devices-3"].generation.replaces == "devices-2"
    assert config.cas["devices-2"].generation.replaces == "devices"
    third = ca_cert(data_dir, "devices-3")
    assert third.subject.rfc4514_string() == "CN=estkit Device Issuing CA G3,O=estkit"
    assert third.public_key() != ca_cert(data_dir, "devices-2").public_key()
    assert_signed_by_root(data_dir, "devices-3")
    assert config.cas["devices-3"].key_file == data_dir.resolve() / "ca" / "devices-3.key"
    assert [detail.split(" (")[0] for _, detail in rotations(data_dir)] == [
        "devices-2",
        "devices-3",
    ]
    # Every generation loads: the old ones still authenticate their devices.
    assert {"devices", "devices-2", "devices-3"} <= set(load_cas(config.cas, environ={}))


def test_common_name_names_the_new_generation(
    fresh_server: EstServer, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = fresh_server.data_dir
    proc = rotate(data_dir, capsys, "devices", "--common-name", "Contoso Devices 2027")
    assert proc.returncode == 0, proc.stderr
    subject = ca_cert(data_dir, "devices-2").subject
    assert subject.rfc4514_string() == "CN=Contoso Devices 2027,O=estkit"


# -- an operator's devices CA, under the server's root ---------------------------------


def install_devices_ca(
    data_dir: Path,
    *,
    not_before: dt.datetime,
    not_after: dt.datetime,
    constraints: x509.NameConstraints | None = None,
) -> IssuingCa:
    """``ca/devices.pem`` and its key replaced by a CA of the operator's making, signed by
    the server's root."""
    ca_dir = data_dir / "ca"
    root_cert = ca_cert(data_dir, "root")
    root = IssuingCa(
        name="root",
        cert=root_cert,
        key=load_private_key_pem((ca_dir / "root.key").read_bytes()),
        chain=(root_cert,),
    )
    ca = make_ca(
        "Acme Devices CA", root, constraints=constraints, not_before=not_before, not_after=not_after
    )
    (ca_dir / "devices.pem").write_bytes(certs_to_pem([ca.cert]))
    (ca_dir / "devices.key").write_bytes(key_to_pem(ca.key))
    return ca


def test_the_name_constraints_of_the_old_ca_carry_over(
    fresh_server: EstServer, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = fresh_server.data_dir
    now = utc_now()
    constraints = x509.NameConstraints(
        permitted_subtrees=[DNS(".devices.example")],
        excluded_subtrees=[x509.IPAddress(ipaddress.ip_network("10.0.0.0/8"))],
    )
    old = install_devices_ca(
        data_dir,
        not_before=now - dt.timedelta(days=1),
        not_after=now + dt.timedelta(days=365),
        constraints=constraints,
    )
    proc = rotate(data_dir, capsys, "devices", "--issues-from", "now")
    assert proc.returncode == 0, proc.stderr

    cert = ca_cert(data_dir, "devices-2")
    assert cert.subject.rfc4514_string() == "CN=Acme Devices CA G2"
    copied = cert.extensions.get_extension_for_class(x509.NameConstraints)
    original = old.cert.extensions.get_extension_for_class(x509.NameConstraints)
    assert copied.value == original.value == constraints
    assert copied.critical == original.critical
    assert_signed_by_root(data_dir, "devices-2")
    # The server's check of the chain's constraints accepts both generations.
    config = load_config(data_dir)
    assert {"devices", "devices-2"} <= set(load_cas(config.cas, environ={}))


def test_the_new_generation_is_never_valid_beyond_the_root(
    fresh_server: EstServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """An old CA valid until the root's end, from 30 days ago: the same lifetime from
    now would outlive the root."""
    data_dir = fresh_server.data_dir
    root = ca_cert(data_dir, "root")
    install_devices_ca(
        data_dir,
        not_before=utc_now() - dt.timedelta(days=30),
        not_after=root.not_valid_after_utc,
    )
    proc = rotate(data_dir, capsys, "devices", "--issues-from", "now")
    assert proc.returncode == 0, proc.stderr
    assert ca_cert(data_dir, "devices-2").not_valid_after_utc == root.not_valid_after_utc
    assert_signed_by_root(data_dir, "devices-2")


def test_an_old_ca_that_expires_before_the_switch_is_refused(
    fresh_server: EstServer, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = fresh_server.data_dir
    now = utc_now()
    old = install_devices_ca(
        data_dir, not_before=now - dt.timedelta(days=1), not_after=now + dt.timedelta(days=2)
    )
    before = snapshot(data_dir)
    proc = rotate(data_dir, capsys, "devices", "--issues-from", "3d")
    assert proc.returncode == 1, proc.stderr
    line = one_line(proc)
    assert f"CN=Acme Devices CA expires on {old.cert.not_valid_after_utc.isoformat()}" in line
    assert line.endswith("choose an earlier --issues-from")
    assert snapshot(data_dir) == before
    assert rotations(data_dir) == []

    # Before its end the switch can be.
    assert rotate(data_dir, capsys, "devices", "--issues-from", "1d").returncode == 0
    assert (data_dir / "ca" / "devices-2.pem").exists()


# -- an offline root -------------------------------------------------------------------


@pytest.fixture
def offline(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> Offline:
    """A server under an offline root, its first CAs imported, on each backend."""
    database = server_database(request, backend)
    root_dir = tmp_path / "root"
    fp = root_init(root_dir)
    data_dir = tmp_path / "server"
    server_init(data_dir, "--offline-root", *(["--database-url", database] if database else []))
    made = Offline(root_dir, data_dir, tmp_path / "carried", fp)
    made.carry_requests()
    made.import_all()
    return made


def test_under_an_offline_root_rotate_writes_a_request_that_the_import_completes(
    offline: Offline, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir, ca_dir = offline.data_dir, offline.data_dir / "ca"
    proc = rotate(data_dir, capsys, "devices", "--issues-from", "now")
    assert proc.returncode == 0, proc.stderr
    assert "to be signed by the offline root" in proc.stdout

    # A request and a key (0600), no certificate yet.
    csr = x509.load_pem_x509_csr((ca_dir / "devices-2.csr").read_bytes())
    key = load_private_key_pem((ca_dir / "devices-2.key").read_bytes())
    assert stat.S_IMODE((ca_dir / "devices-2.key").stat().st_mode) == 0o600
    assert csr.is_signature_valid and public_keys_match(csr.public_key(), key.public_key())
    assert csr.subject.rfc4514_string() == "CN=estkit Device Issuing CA G2,O=estkit"
    assert not (ca_dir / "devices-2.pem").exists()
    assert private_key_files(data_dir) == [
        "audit/checkpoint.key", "ca/bootstrap.key", "ca/devices-2.key", "ca/devices.key",
        "tls/server.key",
    ]  # fmt: skip

    # The server would start, devices going on issuing, and says what it waits for.
    config = load_config(data_dir)
    assert config.cas["devices-2"].generation.replaces == "devices"
    assert offline_root_pending(config) is None
    [waiting] = awaiting_import(config)
    assert waiting.startswith("CA devices-2: its certificate ca/devices-2.pem is not imported")
    assert waiting.endswith("devices goes on issuing")
    assert "devices-2" not in installed_cas(config)
    assert set(load_cas(installed_cas(config), environ={})) == {"devices", "bootstrap"}
    assert [r[0] for r in rotations(data_dir)] == ["ok"]

    # A generation whose certificate is not there is not rotated further.
    before = snapshot(data_dir)
    again = rotate(data_dir, capsys, "devices", "--issues-from", "now")
    assert again.returncode == 1
    assert "devices-2: its certificate" in one_line(again)
    assert "is not installed yet" in one_line(again)
    assert snapshot(data_dir) == before

    # On the root's machine, then back here.
    shutil.copy(ca_dir / "devices-2.csr", offline.carried)
    signed = offline.sign("devices-2")
    checked = openssl("verify", "-CAfile", offline.root_dir / "root.pem", signed)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    imported = offline.ca_import("--cert", f"devices-2={signed}")
    assert "devices-2 CA: installed" in imported.stdout
    assert cert_of(ca_dir / "devices-2.pem") == cert_of(signed)

    config = load_config(data_dir)
    assert awaiting_import(config) == []
    assert offline_root_pending(config) is None
    cas = load_cas(installed_cas(config), environ={})
    assert cas["devices-2"].cert.subject == csr.subject
    assert [c.subject for c in cas["devices-2"].chain] == [
        csr.subject,
        cert_of(offline.root_dir / "root.pem").subject,
    ]


def test_under_an_offline_root_the_printed_sign_ca_step_is_a_command_that_runs(
    offline: Offline, capsys: pytest.CaptureFixture[str]
) -> None:
    """The next steps name ``estkit root sign-ca`` with the options it takes (--dir,
    --name, --csr, --out), as ``server init --offline-root`` does."""
    proc = rotate(offline.data_dir, capsys, "devices", "--issues-from", "now")
    assert proc.returncode == 0, proc.stderr
    step = proc.stdout.split("`estkit root sign-ca", 1)[1].split("`", 1)[0].split()
    assert "--dir" in step and "--csr" in step, proc.stdout
    assert step[step.index("--name") + 1] == "devices-2", proc.stdout


# -- a PKCS#11 token -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "labels"),
    [
        ([], ("devices-2", "devices-3")),
        (["--key-label-prefix", "est-"], ("est-devices-2", "est-devices-3")),
    ],
    ids=["ok/labels", "ok/prefixed-labels"],
)
def test_with_the_keys_in_a_token_the_new_key_is_made_in_the_same_token(
    request: pytest.FixtureRequest,
    backend: str,
    tmp_path: Path,
    softhsm: SoftHsm,  # noqa: F811 (the fixture)
    prefix: list[str],
    labels: tuple[str, str],
) -> None:
    server = make_server(
        tmp_path,
        database_url=server_database(request, backend),
        init_args=[*token_args(softhsm), *prefix],
    )
    data_dir = server.data_dir
    before = private_keys(softhsm)
    assert sorted(before) == sorted(f"{prefix[-1] if prefix else ''}{n}" for n in CA_NAMES)
    proc = server.cli("ca", "rotate", "devices", "--issues-from", "now")
    assert f"devices-2 CA: created ca/devices-2.pem (new key label '{labels[0]}'" in proc.stdout

    keys = private_keys(softhsm)
    assert sorted(keys) == sorted([*before, labels[0]])
    made = keys[labels[0]]
    assert made.fields["Access"] == SENSITIVE  # CKA_SENSITIVE, !CKA_EXTRACTABLE
    assert made.fields["Usage"] == "sign"
    old_kind = before[labels[0].removesuffix("-2")].kind
    assert made.kind.split(";")[1] == old_kind.split(";")[1]  # the same key type
    cert = ca_cert(data_dir, "devices-2")
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert made.fields["ID"] == ski.digest.hex()
    assert private_key_files(data_dir) == ["audit/checkpoint.key", "tls/server.key"]
    assert not list(data_dir.rglob("devices-2.key"))
    assert_signed_by_root(data_dir, "devices-2")

    table = tomllib.loads((data_dir / "estkit.toml").read_text())["cas"]["devices-2"]
    assert {k: v for k, v in table.items() if k != "issues_from"} == {
        "cert": "ca/devices-2.pem",
        "signer": "pkcs11",
        "module": str(softhsm.module),
        "token_label": softhsm.label,
        "key_label": labels[0],
        "pin_file": str(softhsm.pin_file),
        "replaces": "devices",
    }
    # The server loads it with the key in the token (a probe signature checks the pair).
    cas = load_cas(load_config(data_dir).cas, environ={})
    assert cas["devices-2"].cert == cert

    # Once it issues, the next generation is labelled after it, in the same token.
    server.cli("ca", "rotate", "devices", "--issues-from", "now")
    assert labels[1] in private_keys(softhsm)
    assert (
        tomllib.loads((data_dir / "estkit.toml").read_text())["cas"]["devices-3"]["key_label"]
        == labels[1]
    )
    assert private_key_files(data_dir) == ["audit/checkpoint.key", "tls/server.key"]


def test_a_rotation_stopped_half_way_is_named_not_taken_over(
    fresh_server: EstServer, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = fresh_server.data_dir
    # The key and certificate were written, the config was not (a crash in between).
    (data_dir / "ca" / "devices-2.key").write_bytes(b"left over")
    before = snapshot(data_dir)
    proc = rotate(data_dir, capsys, "devices")
    assert proc.returncode == 1
    assert proc.stderr.strip().endswith(
        "ca/devices-2.key exist(s) without a [cas.devices-2] table: a rotation stopped half "
        "way; move them away and run it again"
    ), proc.stderr
    assert snapshot(data_dir) == before and rotations(data_dir) == []
