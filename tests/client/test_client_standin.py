"""The client against a stand-in EST server over real TLS on loopback: a server that demands
Basic from clients with certificates (RFC 7030 3.2.3), and channel binding (RFC 7030 3.5)."""

from __future__ import annotations

import base64
import ssl
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from client_fakes import NOW, Pki
from cryptography import x509
from standin import StandIn, serving

from estkit.client import (
    BasicAuth,
    ClientCertificate,
    Credentials,
    CsrFactory,
    EstAuthError,
    EstClient,
    TrustAnchor,
)
from estkit.pki import binding, certs, csr, keys, names
from testpki import cn_name

BASIC = BasicAuth("dev-1", "s3cret")


@pytest.fixture
def certificate(tmp_path: Path, ca: Pki) -> ClientCertificate:
    key = keys.generate_key("ec-p256")
    (tmp_path / "dev.pem").write_bytes(certs.certs_to_pem([ca.issue(key.public_key()), ca.issuing]))
    (tmp_path / "dev.key").write_bytes(keys.key_to_pem(key))
    return ClientCertificate(tmp_path / "dev.pem", tmp_path / "dev.key")


Run = Callable[[StandIn], StandIn]


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Run]:
    """Start a stand-in; it stops when the test ends."""
    with ExitStack() as stack:
        yield lambda standin: stack.enter_context(serving(standin, tmp_path))


def _client(standin: StandIn, ca: Pki, auth: ClientCertificate | Credentials) -> EstClient:
    return EstClient(
        standin.url,
        trust=TrustAnchor.from_certificates([ca.root]),
        auth=auth,
        timeout=10,
        total_timeout=20,
        retries=0,
    )


def _factory(key: keys.PrivateKey, calls: list[str | None]) -> CsrFactory:
    def make(challenge_password: str | None) -> x509.CertificateSigningRequest:
        calls.append(challenge_password)
        return csr.build_csr(key, subject=cn_name("dev-1"), challenge_password=challenge_password)

    return make


def test_client_with_a_certificate_answers_a_server_that_demands_basic(
    run: Run, ca: Pki, certificate: ClientCertificate
) -> None:
    standin = run(StandIn(ca))
    key = keys.generate_key("ec-p256")
    auth = Credentials(certificate=certificate, basic=BASIC)
    with _client(standin, ca, auth) as est:
        issued = est.verify_issued(
            est.simpleenroll(csr.build_csr(key, subject=cn_name("dev-1"))),
            public_key=key.public_key(),
            now=NOW,
            common_name="dev-1",
        )
    assert issued.chain == (ca.issuing,)
    posts = [s for s in standin.seen if s.method == "POST"]
    assert [(s.client_cert, s.authorization) for s in posts] == [
        (True, None),
        (True, standin.expected_authorization()),
    ]


def test_client_stops_after_one_answer_to_a_server_that_keeps_asking(
    run: Run, ca: Pki, certificate: ClientCertificate
) -> None:
    standin = run(StandIn(ca, accept_basic=False))
    auth = Credentials(certificate=certificate, basic=BASIC)
    with _client(standin, ca, auth) as est, pytest.raises(EstAuthError) as caught:
        est.simpleenroll(csr.build_csr(keys.generate_key("ec-p256"), subject=cn_name("dev-1")))
    assert len(standin.seen) == 2
    assert "the server refused the Basic credentials" in str(caught.value)


@pytest.mark.parametrize(
    ("max_version", "demand_basic", "probes"),
    [
        (ssl.TLSVersion.TLSv1_2, False, 1),
        (ssl.TLSVersion.MAXIMUM_SUPPORTED, False, 2),
        (ssl.TLSVersion.TLSv1_2, True, 1),
    ],
    ids=["ok/tls12-server", "ok/tls13-server-client-drops-to-tls12", "ok/tls12-and-basic"],
)
def test_csr_carries_the_tls_unique_of_the_connection_that_carries_it(
    run: Run,
    ca: Pki,
    certificate: ClientCertificate,
    max_version: ssl.TLSVersion,
    demand_basic: bool,
    probes: int,
) -> None:
    standin = run(
        StandIn(ca, announce_binding=True, demand_basic=demand_basic, max_version=max_version)
    )
    key = keys.generate_key("ec-p256")
    calls: list[str | None] = []
    auth = Credentials(certificate=certificate, basic=BASIC)
    with _client(standin, ca, auth) as est:
        issued = est.simpleenroll(_factory(key, calls))
    assert names.common_name(issued[0].subject) == "dev-1"
    gets = [s for s in standin.seen if s.method == "GET"]
    posts = [s for s in standin.seen if s.method == "POST"]
    assert len(gets) == probes
    if probes == 2:  # first over TLS 1.3, which gives no tls-unique
        assert gets[0].tls_version == "TLSv1.3"
    bound = posts[-1]
    assert bound.tls_version == "TLSv1.2" and bound.tls_unique is not None
    # One connection: the probe, the 401 when there is one, and the request it bound.
    assert {s.tls_unique for s in [gets[-1], *posts]} == {bound.tls_unique}
    assert calls == [base64.b64encode(bound.tls_unique).decode()]
    assert bound.csr is not None
    password = binding.challenge_password(bound.csr)
    assert password is not None and binding.carries_binding(password, bound.tls_unique)


def test_a_csr_bound_to_a_connection_that_closed_is_bound_again_once(
    run: Run, ca: Pki, certificate: ClientCertificate
) -> None:
    """The probe's connection ends before the CSR goes out: the server refuses the CSR
    (channel-binding-mismatch) and the client makes it again, bound to its new connection."""
    standin = run(
        StandIn(
            ca,
            announce_binding=True,
            demand_basic=False,
            max_version=ssl.TLSVersion.TLSv1_2,
            close_first_csrattrs=True,
        )
    )
    calls: list[str | None] = []
    with _client(standin, ca, certificate) as est:
        est.simpleenroll(_factory(keys.generate_key("ec-p256"), calls))
    assert [s.method for s in standin.seen] == ["GET", "POST", "GET", "POST"]
    first, second = standin.seen[1], standin.seen[3]
    assert first.tls_unique != standin.seen[0].tls_unique  # sent on another connection
    assert second.tls_unique == standin.seen[2].tls_unique  # bound to its own
    assert len(calls) == 2 and calls[0] != calls[1]


def test_no_binding_when_csrattrs_does_not_ask(
    run: Run, ca: Pki, certificate: ClientCertificate
) -> None:
    standin = run(StandIn(ca, demand_basic=False))
    calls: list[str | None] = []
    with _client(standin, ca, certificate) as est:
        est.simpleenroll(_factory(keys.generate_key("ec-p256"), calls))
    assert calls == [None]
    (post,) = [s for s in standin.seen if s.method == "POST"]
    assert post.csr is not None and binding.challenge_password(post.csr) is None


def test_serverkeygen_returns_the_server_made_key_and_its_certificate(
    run: Run, ca: Pki, certificate: ClientCertificate
) -> None:
    standin = run(StandIn(ca))
    throwaway = keys.generate_key("ec-p256")
    auth = Credentials(certificate=certificate, basic=BASIC)
    with _client(standin, ca, auth) as est:
        key, returned = est.serverkeygen(csr.build_csr(throwaway, subject=cn_name("dev-1")))
        issued = est.verify_issued(
            returned, public_key=key.public_key(), now=NOW, common_name="dev-1"
        )
    assert keys.public_keys_match(issued.certificate.public_key(), key.public_key())
    assert not keys.public_keys_match(key.public_key(), throwaway.public_key())
    assert issued.chain == (ca.issuing,)
