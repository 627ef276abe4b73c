"""The client commands, end to end against a scripted server (no network)."""

from __future__ import annotations

import argparse
import base64
import functools
import stat
from pathlib import Path
from typing import Any

import httpx
import pytest
from client_fakes import BASE_URL, FakeClock, Pki, Server, pkcs7_response, text_response
from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID

from estkit.cli import client_cmds
from estkit.cli.errors import CliError
from estkit.client import EstClient
from estkit.pki import certs, cms, csrattrs, keys, names, serverkeygen, wire

PREFIX = "/.well-known/est/devices"


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, transport: httpx.MockTransport, clock: FakeClock) -> Any:
    monkeypatch.setattr(
        client_cmds,
        "EstClient",
        functools.partial(EstClient, transport=transport, sleep=clock.sleep, clock=clock),
    )
    parser = argparse.ArgumentParser(prog="estkit")
    parser.add_argument("-v", "--verbose", action="store_true")
    client_cmds.register(parser.add_subparsers(dest="command", required=True))

    def run(*argv: str | Path) -> int:
        args = parser.parse_args([str(a) for a in argv])
        status: int = args.handler(args)
        return status

    return run


@pytest.fixture
def anchor_file(tmp_path: Path, ca: Pki) -> Path:
    path = tmp_path / "root.pem"
    path.write_bytes(certs.certs_to_pem([ca.root]))
    return path


def _issuer(ca: Pki, *, extra: tuple[x509.Certificate, ...] = (), cn: str | None = None) -> Any:
    """A server that signs the posted CSR (its subject, SAN and key), recording the CSRs."""
    seen: list[x509.CertificateSigningRequest] = []

    def answer(request: httpx.Request) -> httpx.Response:
        csr = x509.load_der_x509_csr(wire.decode_base64_body(request.content))
        seen.append(csr)
        subject = (
            csr.subject if cn is None else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        )
        leaf = ca.issue(
            csr.public_key(), subject=subject, sans=names.subject_alt_names(csr.extensions)
        )
        return pkcs7_response([leaf, *extra])

    answer.seen = seen  # type: ignore[attr-defined]
    return answer


def _bootstrap_files(
    tmp_path: Path, ca: Pki, subject: x509.Name, sans: Any = None
) -> tuple[Path, Path]:
    key = keys.generate_key("ec-p256")
    cert = ca.issue(key.public_key(), subject=subject, sans=sans)
    (tmp_path / "cur").mkdir()
    cert_path, key_path = tmp_path / "cur" / "cert.pem", tmp_path / "cur" / "key.pem"
    cert_path.write_bytes(certs.certs_to_pem([cert, ca.issuing]))
    key_path.write_bytes(keys.key_to_pem(key))
    return cert_path, key_path


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _argv(command: str, anchor_file: Path, *rest: Any) -> list[Any]:
    """``estkit COMMAND`` against the scripted server, trusting ``anchor_file``."""
    return [command, "--url", BASE_URL, "--trust-anchor", anchor_file, *rest]


def _basic_enroll(anchor_file: Path, out: Path) -> list[Any]:
    """``estkit enroll`` of dev-1 with a secret, against the scripted server."""
    return _argv(
        "enroll", anchor_file, "--device-id", "dev-1", "--user", "u", "--password", "p",
        "--out", out,
    )  # fmt: skip


def test_enroll_writes_key_and_certificates_and_prints_a_summary(
    cli: Any, server: Server, ca: Pki, anchor_file: Path, tmp_path: Path, capsys: Any
) -> None:
    issuer = _issuer(ca, extra=(ca.issuing,))
    server.on(f"{PREFIX}/simpleenroll", issuer)
    out = tmp_path / "out"
    status = cli(
        *_argv(
            "enroll", anchor_file, "--device-id", "dev-1", "--user", "dev-1",
            "--password", "otp", "--out", out, "--key-type", "ec-p384",
            "--san-dns", "dev-1.example", "--pfx",
        )
    )  # fmt: skip
    assert status == 0
    key = keys.load_private_key_pem((out / "key.pem").read_bytes())
    (cert,) = certs.load_pem_certificates((out / "cert.pem").read_bytes())
    assert certs.load_pem_certificates((out / "chain.pem").read_bytes()) == [ca.issuing]
    assert certs.load_pem_certificates((out / "fullchain.pem").read_bytes()) == [cert, ca.issuing]
    assert keys.public_keys_match(cert.public_key(), key.public_key())
    assert keys.key_type_of(key.public_key()) == "ec-p384"
    assert names.common_name(cert.subject) == "dev-1"
    (csr,) = issuer.seen
    assert [n.value for n in names.subject_alt_names(csr.extensions) or []] == ["dev-1.example"]
    assert _mode(out / "key.pem") == 0o600
    assert _mode(out / "cert.pfx") == 0o600
    assert _mode(out / "cert.pem") == 0o644
    pfx = pkcs12.load_pkcs12((out / "cert.pfx").read_bytes(), None)
    assert pfx.cert is not None and pfx.cert.certificate == cert
    assert [c.certificate for c in pfx.additional_certs] == [ca.issuing]
    assert sorted(p.name for p in out.iterdir()) == [
        "cert.pem",
        "cert.pfx",
        "chain.pem",
        "fullchain.pem",
        "key.pem",
    ]
    summary = capsys.readouterr().out
    assert summary.count("\n") == 1
    assert f"serial {certs.serial_hex(cert.serial_number)}" in summary
    assert cert.not_valid_after_utc.isoformat() in summary


def test_enroll_completes_the_chain_from_cacerts_when_the_response_has_only_the_leaf(
    cli: Any, server: Server, ca: Pki, anchor_file: Path, tmp_path: Path
) -> None:
    server.on(f"{PREFIX}/simpleenroll", _issuer(ca))
    server.on(f"{PREFIX}/cacerts", pkcs7_response([ca.issuing, ca.root]))
    out = tmp_path / "out"
    cli(*_basic_enroll(anchor_file, out))
    assert server.paths() == [
        f"GET {PREFIX}/csrattrs",  # asks whether to bind the CSR to the connection
        f"POST {PREFIX}/simpleenroll",
        f"GET {PREFIX}/cacerts",
    ]
    assert certs.load_pem_certificates((out / "chain.pem").read_bytes()) == [ca.issuing]


@pytest.mark.parametrize(
    ("answer", "message", "exit_code"),
    [
        ("wrong-cn", "does not have CN=dev-1", 1),
        ("other-ca", "does not chain to the trust anchor", 1),
        (text_response(403, "bootstrap certificate revoked"), "bootstrap certificate revoked", 1),
        (httpx.Response(202, headers={"Retry-After": "3600"}), "enrollment pending", 75),
    ],
    ids=["fail/cn-mismatch", "fail/untrusted-issuer", "fail/forbidden", "fail/pending"],
)
def test_enroll_failures_are_one_line_and_write_nothing(
    cli: Any,
    server: Server,
    ca: Pki,
    other_ca: Pki,
    anchor_file: Path,
    tmp_path: Path,
    answer: Any,
    message: str,
    exit_code: int,
) -> None:
    if answer == "wrong-cn":
        answer = _issuer(ca, extra=(ca.issuing,), cn="dev-2")
    elif answer == "other-ca":
        answer = _issuer(other_ca, extra=(other_ca.issuing,))
    server.on(f"{PREFIX}/simpleenroll", answer)
    server.on(f"{PREFIX}/cacerts", pkcs7_response([ca.issuing, ca.root]))
    out = tmp_path / "out"
    with pytest.raises(CliError, match=message) as caught:
        cli(*_basic_enroll(anchor_file, out))
    assert caught.value.exit_code == exit_code
    assert "\n" not in str(caught.value)
    assert not out.exists()


@pytest.mark.parametrize(
    ("auth", "message"),
    [
        ([], "authenticate with --cert/--key, --user/--password, or both"),
        (["--cert", "c.pem"], "--cert and --key go together"),
        (["--user", "u"], "--user needs --password"),
        (["--password", "p"], "--password needs --user"),
        (["--cert", "c.pem", "--key", "k.pem", "--user", "u"], "--user needs --password"),
        (["--user", "a:b", "--password", "p"], "cannot contain ':'"),
    ],
    ids=[
        "fail/none",
        "fail/cert-without-key",
        "fail/user-without-password",
        "fail/password-only",
        "fail/cert-and-user-without-password",
        "fail/colon-in-user",
    ],
)
def test_enroll_needs_complete_credentials(
    cli: Any, server: Server, anchor_file: Path, tmp_path: Path, auth: list[str], message: str
) -> None:
    with pytest.raises(CliError, match=message):
        cli(*_argv("enroll", anchor_file, "--device-id", "d", "--out", tmp_path, *auth))
    assert server.requests == []


def test_enroll_reads_the_password_from_a_file(
    cli: Any, server: Server, ca: Pki, anchor_file: Path, tmp_path: Path
) -> None:
    server.on(f"{PREFIX}/simpleenroll", _issuer(ca, extra=(ca.issuing,)))
    (tmp_path / "pw").write_text("otp-123\n")
    cli(
        *_argv(
            "enroll", anchor_file, "--device-id", "dev-1", "--user", "dev-1",
            "--password-file", tmp_path / "pw", "--out", tmp_path / "out",
        )
    )  # fmt: skip
    expected = base64.b64encode(b"dev-1:otp-123").decode()
    assert server.requests[0].headers["authorization"] == f"Basic {expected}"


@pytest.mark.parametrize("keep_key", [False, True], ids=["ok/rekey", "ok/keep-key"])
def test_reenroll_keeps_subject_and_san_encoding_and_writes_new_files(
    cli: Any, server: Server, ca: Pki, anchor_file: Path, tmp_path: Path, keep_key: bool
) -> None:
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Acme"),
            x509.NameAttribute(NameOID.COMMON_NAME, "dev-1", _type=_ASN1Type.PrintableString),
        ]
    )
    sans = x509.SubjectAlternativeName([x509.DNSName("dev-1.example")])
    cert_path, key_path = _bootstrap_files(tmp_path, ca, subject, sans)
    issuer = _issuer(ca, extra=(ca.issuing,))
    server.on(f"{PREFIX}/simplereenroll", issuer)
    out = tmp_path / "new"
    argv = _argv("reenroll", anchor_file, "--cert", cert_path, "--key", key_path, "--out", out)
    assert cli(*argv, *(["--keep-key"] if keep_key else [])) == 0
    (csr,) = issuer.seen
    current = certs.load_pem_certificates(cert_path.read_bytes())[0]
    assert csr.subject.public_bytes() == current.subject.public_bytes()
    assert names.subject_alt_names(csr.extensions) == sans
    old_key = keys.load_private_key_pem(key_path.read_bytes())
    new_key = keys.load_private_key_pem((out / "key.pem").read_bytes())
    assert keys.public_keys_match(old_key.public_key(), new_key.public_key()) is keep_key
    (new_cert,) = certs.load_pem_certificates((out / "cert.pem").read_bytes())
    assert keys.public_keys_match(new_cert.public_key(), new_key.public_key())
    assert server.paths()[-1] == f"POST {PREFIX}/simplereenroll"
    assert "authorization" not in server.requests[-1].headers


def test_reenroll_refuses_a_key_that_is_not_the_certificates(
    cli: Any, server: Server, ca: Pki, anchor_file: Path, tmp_path: Path
) -> None:
    cert_path, key_path = _bootstrap_files(tmp_path, ca, x509.Name([]))
    key_path.write_bytes(keys.key_to_pem(keys.generate_key("ec-p256")))
    with pytest.raises(CliError, match="is not the key of"):
        cli(
            *_argv(
                "reenroll", anchor_file, "--cert", cert_path, "--key", key_path,
                "--out", tmp_path / "new",
            )
        )  # fmt: skip
    assert server.requests == []


def test_cacerts_prints_pem_chain_or_writes_it(
    cli: Any, server: Server, ca: Pki, tmp_path: Path, capsys: Any
) -> None:
    server.on(f"{PREFIX}/cacerts", pkcs7_response([ca.root, ca.issuing]))
    fingerprint = certs.fingerprint(ca.root)
    assert cli("cacerts", "--url", BASE_URL, "--fingerprint", fingerprint) == 0
    assert certs.load_pem_certificates(capsys.readouterr().out.encode()) == [ca.issuing, ca.root]
    out = tmp_path / "ca.pem"
    cli("cacerts", "--url", BASE_URL, "--fingerprint", fingerprint, "--out", out)
    assert certs.load_pem_certificates(out.read_bytes()) == [ca.issuing, ca.root]


def test_cacerts_fingerprint_mismatch_is_a_one_line_error(
    cli: Any, server: Server, ca: Pki, other_ca: Pki
) -> None:
    server.on(f"{PREFIX}/cacerts", pkcs7_response([ca.root, ca.issuing]))
    with pytest.raises(CliError, match="has SHA-256 fingerprint"):
        cli("cacerts", "--url", BASE_URL, "--fingerprint", certs.fingerprint(other_ca.root))


def test_bad_url_is_a_cli_error(cli: Any, anchor_file: Path) -> None:
    with pytest.raises(CliError, match="--url"):
        cli("cacerts", "--url", "http://est.example/.well-known/est", "--trust-anchor", anchor_file)


def test_csrattrs_prints_one_oid_per_line(
    cli: Any, server: Server, anchor_file: Path, capsys: Any
) -> None:
    der = csrattrs.encode_csrattrs(
        [x509.ObjectIdentifier("1.2.840.113549.1.9.7"), x509.ObjectIdentifier("1.3.6.1.4.1.99.1")]
    )
    server.on(
        f"{PREFIX}/csrattrs",
        httpx.Response(
            200,
            content=wire.encode_base64_body(der),
            headers={"Content-Type": "application/csrattrs"},
        ),
    )
    assert cli("csrattrs", "--url", BASE_URL, "--trust-anchor", anchor_file) == 0
    assert capsys.readouterr().out == "1.2.840.113549.1.9.7 challengePassword\n1.3.6.1.4.1.99.1\n"


def test_health_prints_the_certificate_the_server_saw(
    cli: Any, server: Server, ca: Pki, anchor_file: Path, tmp_path: Path, capsys: Any
) -> None:
    cert_path, key_path = _bootstrap_files(
        tmp_path, ca, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-1")])
    )
    seen = certs.load_pem_certificates(cert_path.read_bytes())[0]
    server.on("/health/certificate", httpx.Response(200, content=certs.certs_to_pem([seen])))
    assert (
        cli(
            "-v",
            "health",
            "--url",
            BASE_URL,
            "--trust-anchor",
            anchor_file,
            "--cert",
            cert_path,
            "--key",
            key_path,
        )
        == 0
    )
    captured = capsys.readouterr()
    assert certs.load_pem_certificates(captured.out.encode()) == [seen]
    assert captured.err == f"server sees CN=dev-1 serial {certs.serial_hex(seen.serial_number)}\n"


# -- Basic beside a certificate; serverkeygen -------------------------------------------


def _demanding_basic(answer: Any) -> Any:
    """``answer`` for requests with Basic dev-1:pw; 401 + challenge otherwise."""
    expected = "Basic " + base64.b64encode(b"dev-1:pw").decode()

    def gate(request: httpx.Request) -> httpx.Response:
        if request.headers.get("authorization") != expected:
            return text_response(401, "", **{"WWW-Authenticate": 'Basic realm="est"'})
        result: httpx.Response = answer(request)
        return result

    return gate


def test_reenroll_answers_a_basic_challenge_with_user_and_password(
    cli: Any, server: Server, ca: Pki, anchor_file: Path, tmp_path: Path
) -> None:
    cert_path, key_path = _bootstrap_files(tmp_path, ca, x509.Name([]))
    server.on(f"{PREFIX}/simplereenroll", _demanding_basic(_issuer(ca, extra=(ca.issuing,))))
    out = tmp_path / "new"
    argv = _argv(
        "reenroll", anchor_file, "--cert", cert_path, "--key", key_path,
        "--user", "dev-1", "--password", "pw", "--out", out,
    )  # fmt: skip
    assert cli(*argv) == 0
    posts = [r for r in server.requests if r.method == "POST"]
    assert [r.headers.get("authorization") is not None for r in posts] == [False, True]
    assert (out / "cert.pem").exists()


def test_enroll_takes_a_certificate_and_a_password_file_together(
    cli: Any, server: Server, ca: Pki, anchor_file: Path, tmp_path: Path
) -> None:
    cert_path, key_path = _bootstrap_files(tmp_path, ca, x509.Name([]))
    server.on(f"{PREFIX}/simpleenroll", _demanding_basic(_issuer(ca, extra=(ca.issuing,))))
    (tmp_path / "pw").write_text("pw\n")
    out = tmp_path / "op"
    argv = _argv(
        "enroll", anchor_file, "--device-id", "dev-1", "--cert", cert_path, "--key", key_path,
        "--user", "dev-1", "--password-file", tmp_path / "pw", "--out", out,
    )  # fmt: skip
    assert cli(*argv) == 0
    assert server.paths() == [
        f"GET {PREFIX}/csrattrs",
        f"POST {PREFIX}/simpleenroll",
        f"POST {PREFIX}/simpleenroll",
    ]


def _serverkeygen_answer(
    ca: Pki, *, key_first: bool = True, newline: bytes = b"\r\n", wrong_key: bool = False
) -> Any:
    """A serverkeygen that makes a key and certifies it (or, wrongly, another key)."""

    def answer(request: httpx.Request) -> httpx.Response:
        csr = x509.load_der_x509_csr(wire.decode_base64_body(request.content))
        key = keys.generate_key("ec-p256")
        certified = keys.generate_key("ec-p256") if wrong_key else key
        leaf = ca.issue(certified.public_key(), subject=csr.subject)
        key_part = (serverkeygen.KEY_PART, serverkeygen.private_key_der(key))
        body = serverkeygen.encode_multipart(
            [key_part, (serverkeygen.CERT_PART, cms.encode_certs_only([leaf, ca.issuing]))][
                :: 1 if key_first else -1
            ]
        )
        return httpx.Response(
            200,
            content=body.replace(b"\r\n", newline),
            headers={"Content-Type": serverkeygen.CONTENT_TYPE},
        )

    return answer


@pytest.mark.parametrize(
    ("key_first", "newline"),
    [(True, b"\r\n"), (False, b"\n")],
    ids=["ok/key-first-crlf", "ok/certs-first-lf"],
)
def test_serverkeygen_writes_the_server_made_key_0600_with_its_certificates(
    cli: Any,
    server: Server,
    ca: Pki,
    anchor_file: Path,
    tmp_path: Path,
    capsys: Any,
    key_first: bool,
    newline: bytes,
) -> None:
    server.on(
        f"{PREFIX}/serverkeygen",
        _demanding_basic(_serverkeygen_answer(ca, key_first=key_first, newline=newline)),
    )
    out = tmp_path / "out"
    argv = _argv(
        "serverkeygen", anchor_file, "--device-id", "dev-1", "--user", "dev-1",
        "--password", "pw", "--out", out,
    )  # fmt: skip
    assert cli(*argv) == 0
    assert _mode(out / "key.pem") == 0o600
    key = keys.load_private_key_pem((out / "key.pem").read_bytes())
    assert (out / "key.pem").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    (cert,) = certs.load_pem_certificates((out / "cert.pem").read_bytes())
    assert keys.public_keys_match(cert.public_key(), key.public_key())
    assert names.common_name(cert.subject) == "dev-1"
    assert certs.load_pem_certificates((out / "chain.pem").read_bytes()) == [ca.issuing]
    (post,) = [r for r in server.requests if r.method == "POST"]
    sent = x509.load_der_x509_csr(wire.decode_base64_body(post.content))
    assert sent.is_signature_valid and names.common_name(sent.subject) == "dev-1"
    assert not keys.public_keys_match(sent.public_key(), key.public_key())
    assert "dev-1" in capsys.readouterr().out


def test_serverkeygen_refuses_a_certificate_for_another_key(
    cli: Any, server: Server, ca: Pki, anchor_file: Path, tmp_path: Path
) -> None:
    server.on(f"{PREFIX}/serverkeygen", _serverkeygen_answer(ca, wrong_key=True))
    out = tmp_path / "out"
    argv = _argv(
        "serverkeygen", anchor_file, "--device-id", "dev-1", "--user", "dev-1",
        "--password", "pw", "--out", out,
    )  # fmt: skip
    with pytest.raises(CliError, match="no certificate in the response is for the key sent"):
        cli(*argv)
    assert not out.exists()
