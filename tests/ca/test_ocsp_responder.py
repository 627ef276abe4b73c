"""The OCSP responder on a real store (SQLite, then PostgreSQL): what it answers for each
kind of certificate, its cache, and how a revocation reaches the cache (the database's
revision, polled; this node's CRL state, at once)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp

from caenv import BOOTSTRAP, NOW, Cas, make_cas, make_csr
from estkit.ca.authority import Authority, IssuingCa
from estkit.ca.crl import CrlPublisher
from estkit.ca.ocsp import OcspResponder
from estkit.pki.keys import generate_key
from estkit.pki.ocsp import HASHES, issuer_hashes
from estkit.pki.profiles import issue_leaf
from estkit.store import CertificateRecord, SqlStore
from estkit.store.errors import Unavailable
from testpki import cn_name

Auth = Authority[SqlStore]
VALIDITY = dt.timedelta(hours=2)
Status = ocsp.OCSPCertStatus


def responder(authority: Auth, **kwargs: object) -> OcspResponder:
    """A responder of the authority's CAs that has polled once, as the server's has."""
    made = OcspResponder(
        **{"cas": authority.cas, "store": authority.store, "validity": VALIDITY} | kwargs
    )  # type: ignore[arg-type]
    made.poll()
    return made


def issue(authority: Auth, device_id: str = "dev-1") -> x509.Certificate:
    issued = authority.issue_bootstrap(
        make_csr(generate_key("ec-p256"), device_id), device_id=device_id, actor="t", now=NOW
    )
    return issued.certificate


def query(
    cert: x509.Certificate,
    issuer: IssuingCa | x509.Certificate,
    *,
    algorithm: str = "sha1",
    nonce: bytes | None = None,
) -> bytes:
    issuer_cert = issuer.cert if isinstance(issuer, IssuingCa) else issuer
    builder = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer_cert, HASHES[algorithm]())
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    return builder.build().public_bytes(Encoding.DER)


def read(der: bytes) -> ocsp.OCSPResponse:
    return ocsp.load_der_ocsp_response(der)


def status(der: bytes) -> Status:
    response = read(der)
    assert response.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL
    return response.certificate_status


def stranger(issuer: IssuingCa) -> x509.Certificate:
    """A certificate ``issuer``'s key signed that the authority never recorded."""
    return issue_leaf(
        profile=BOOTSTRAP,
        public_key=generate_key("ec-p256").public_key(),
        subject=cn_name("never-issued"),
        sans=None,
        issuer=issuer.cert,
        issuer_key=issuer.key,
        now=NOW,
    )


# -- what it answers --------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["sha1", "sha256"], ids=lambda a: f"ok/{a}")
def test_an_issued_certificate_is_good_signed_by_its_ca(
    authority: Auth, cas: Cas, algorithm: str
) -> None:
    cert = issue(authority)

    response = read(
        responder(authority).respond(query(cert, cas.bootstrap, algorithm=algorithm), now=NOW)
    )

    assert response.certificate_status is Status.GOOD
    assert response.serial_number == cert.serial_number
    assert response.hash_algorithm.name == algorithm
    assert (response.this_update_utc, response.next_update_utc) == (NOW, NOW + VALIDITY)
    assert (
        response.responder_key_hash
        == x509.SubjectKeyIdentifier.from_public_key(cas.bootstrap.cert.public_key()).digest
    )


def test_a_revoked_certificate_is_revoked_with_its_time_and_reason(
    authority: Auth, cas: Cas
) -> None:
    cert = issue(authority)
    at = NOW + dt.timedelta(minutes=1)
    authority.revoke(f"{cert.serial_number:X}", reason="keyCompromise", actor="t", now=at)

    response = read(responder(authority).respond(query(cert, cas.bootstrap), now=at))

    assert response.certificate_status is Status.REVOKED
    assert response.revocation_time_utc == at
    assert response.revocation_reason is x509.ReasonFlags.key_compromise


def test_an_unspecified_revocation_has_no_reason_code(authority: Auth, cas: Cas) -> None:
    cert = issue(authority)
    authority.revoke(f"{cert.serial_number:X}", reason="unspecified", actor="t", now=NOW)

    response = read(responder(authority).respond(query(cert, cas.bootstrap), now=NOW))

    assert response.certificate_status is Status.REVOKED
    assert response.revocation_reason is None


@pytest.mark.parametrize(
    "case", ["never-issued", "issued-by-another-ca"], ids=lambda c: f"ok/unknown-{c}"
)
def test_a_serial_the_ca_did_not_issue_is_unknown(authority: Auth, cas: Cas, case: str) -> None:
    if case == "never-issued":
        request = query(stranger(cas.bootstrap), cas.bootstrap)
    else:  # recorded, but as the bootstrap CA's: asked of the devices CA
        name_hash, key_hash = issuer_hashes(cas.devices.cert, "sha1")
        request = (
            ocsp.OCSPRequestBuilder()
            .add_certificate_by_hash(
                name_hash, key_hash, issue(authority).serial_number, HASHES["sha1"]()
            )
            .build()
            .public_bytes(Encoding.DER)
        )
    assert status(responder(authority).respond(request, now=NOW)) is Status.UNKNOWN


def test_the_certificate_of_a_ca_here_is_good_at_the_ca_that_issued_it(
    authority: Auth, cas: Cas
) -> None:
    answer = responder(authority).respond(query(cas.devices.cert, cas.root), now=NOW)
    assert status(answer) is Status.GOOD


def test_an_issuer_that_is_not_a_ca_here_is_unauthorized(authority: Auth, cas: Cas) -> None:
    foreign = make_cas().devices
    answer = read(responder(authority).respond(query(stranger(foreign), foreign), now=NOW))
    assert answer.response_status is ocsp.OCSPResponseStatus.UNAUTHORIZED


def test_a_hash_algorithm_not_answered_is_unauthorized(authority: Auth, cas: Cas) -> None:
    cert = issue(authority)
    request = (
        ocsp.OCSPRequestBuilder()
        .add_certificate(cert, cas.bootstrap.cert, hashes.SHA224())
        .build()
        .public_bytes(Encoding.DER)
    )
    answer = read(responder(authority).respond(request, now=NOW))
    assert answer.response_status is ocsp.OCSPResponseStatus.UNAUTHORIZED


def test_a_malformed_request_is_malformed_request(authority: Auth) -> None:
    answer = read(responder(authority).respond(b"\x30\x03\x02\x01", now=NOW))
    assert answer.response_status is ocsp.OCSPResponseStatus.MALFORMED_REQUEST


def test_the_nonce_is_echoed_and_each_nonce_gets_its_own_signature(
    authority: Auth, cas: Cas
) -> None:
    cert = issue(authority)
    ocsp_responder = responder(authority)

    first = read(ocsp_responder.respond(query(cert, cas.bootstrap, nonce=b"a" * 16), now=NOW))
    second = read(ocsp_responder.respond(query(cert, cas.bootstrap, nonce=b"b" * 16), now=NOW))

    nonces = [
        r.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce for r in (first, second)
    ]
    assert nonces == [b"a" * 16, b"b" * 16]
    assert first.certificate_status is second.certificate_status is Status.GOOD


# -- the cache ------------------------------------------------------------------------------


class CountingStore:
    """The store, counting certificate reads; ``down`` makes every read unavailable."""

    def __init__(self, store: SqlStore) -> None:
        self.store = store
        self.reads = 0
        self.down = False

    def get_certificate(self, serial: str) -> CertificateRecord | None:
        self.reads += 1
        if self.down:
            raise Unavailable("database is down")
        return self.store.get_certificate(serial)

    def crl_revisions(self) -> dict[str, int]:
        if self.down:
            raise Unavailable("database is down")
        return self.store.crl_revisions()


def test_a_cached_response_is_served_as_it_is_without_reading_or_signing(
    authority: Auth, cas: Cas
) -> None:
    cert = issue(authority)
    store = CountingStore(authority.store)
    ocsp_responder = responder(authority, store=store)
    asked: list[int] = []

    def admit() -> bool:
        asked.append(1)
        return True

    answers = [
        ocsp_responder.respond(
            query(cert, cas.bootstrap), now=NOW + dt.timedelta(minutes=m), admit=admit
        )
        for m in (0, 1, 59)
    ]

    assert answers[0] == answers[1] == answers[2]
    assert (store.reads, len(asked)) == (1, 1)


def test_a_response_is_renewed_at_half_its_validity(authority: Auth, cas: Cas) -> None:
    cert = issue(authority)
    ocsp_responder = responder(authority)
    first = read(ocsp_responder.respond(query(cert, cas.bootstrap), now=NOW))

    later = NOW + VALIDITY / 2
    renewed = read(ocsp_responder.respond(query(cert, cas.bootstrap), now=later))

    assert first.this_update_utc == NOW
    assert renewed.this_update_utc == later
    assert renewed.next_update_utc == later + VALIDITY


def test_a_revocation_on_another_node_reaches_the_cache_at_the_next_poll(
    authority: Auth, cas: Cas
) -> None:
    cert = issue(authority)
    ocsp_responder = responder(authority)
    assert status(ocsp_responder.respond(query(cert, cas.bootstrap), now=NOW)) is Status.GOOD

    # Another node revokes: the database moves, this node has not looked yet.
    authority.revoke(f"{cert.serial_number:X}", reason="keyCompromise", actor="t", now=NOW)
    assert status(ocsp_responder.respond(query(cert, cas.bootstrap), now=NOW)) is Status.GOOD

    ocsp_responder.poll()
    assert status(ocsp_responder.respond(query(cert, cas.bootstrap), now=NOW)) is Status.REVOKED


def test_a_revocation_on_this_node_reaches_the_cache_at_once_through_its_crl_state(
    authority: Auth, cas: Cas, tmp_path: Path
) -> None:
    publisher = CrlPublisher(
        cas=authority.cas, store=authority.store, directory=tmp_path, validity=VALIDITY
    )
    publisher.publish_all(now=NOW)
    cert = issue(authority)
    ocsp_responder = responder(authority, local_revision=publisher.published_revision)
    assert status(ocsp_responder.respond(query(cert, cas.bootstrap), now=NOW)) is Status.GOOD

    # What on_revocation does after the commit on this node (server/wiring.py); no poll.
    authority.revoke(f"{cert.serial_number:X}", reason="keyCompromise", actor="t", now=NOW)
    publisher.publish_all(now=NOW, names=["bootstrap"])

    assert status(ocsp_responder.respond(query(cert, cas.bootstrap), now=NOW)) is Status.REVOKED


def test_misses_and_nonces_ask_admit_and_a_refusal_is_try_later(authority: Auth, cas: Cas) -> None:
    cert = issue(authority)
    ocsp_responder = responder(authority)

    def refuse() -> bool:
        return False

    miss = read(ocsp_responder.respond(query(cert, cas.bootstrap), now=NOW, admit=refuse))
    assert miss.response_status is ocsp.OCSPResponseStatus.TRY_LATER
    ocsp_responder.respond(query(cert, cas.bootstrap), now=NOW)  # cached now
    hit = ocsp_responder.respond(query(cert, cas.bootstrap), now=NOW, admit=refuse)
    assert status(hit) is Status.GOOD
    nonce = query(cert, cas.bootstrap, nonce=b"n" * 16)
    refused = read(ocsp_responder.respond(nonce, now=NOW, admit=refuse))
    assert refused.response_status is ocsp.OCSPResponseStatus.TRY_LATER


def test_an_unavailable_database_is_try_later_and_cached_answers_go_on(
    authority: Auth, cas: Cas
) -> None:
    cached, other = issue(authority, "dev-1"), issue(authority, "dev-2")
    store = CountingStore(authority.store)
    ocsp_responder = responder(authority, store=store)
    assert status(ocsp_responder.respond(query(cached, cas.bootstrap), now=NOW)) is Status.GOOD

    store.down = True
    with pytest.raises(Unavailable):
        ocsp_responder.poll()
    answer = read(ocsp_responder.respond(query(other, cas.bootstrap), now=NOW))

    assert answer.response_status is ocsp.OCSPResponseStatus.TRY_LATER
    assert status(ocsp_responder.respond(query(cached, cas.bootstrap), now=NOW)) is Status.GOOD


def test_an_unexpected_error_is_internal_error_not_an_exception(
    authority: Auth, cas: Cas, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(CountingStore):
        def get_certificate(self, serial: str) -> CertificateRecord | None:
            raise RuntimeError("bug")

    ocsp_responder = responder(authority, store=Broken(authority.store))

    answer = read(ocsp_responder.respond(query(issue(authority), cas.bootstrap), now=NOW))

    assert answer.response_status is ocsp.OCSPResponseStatus.INTERNAL_ERROR
    assert "no response for serial" in caplog.text


def test_the_cache_keeps_at_most_max_entries(authority: Auth, cas: Cas) -> None:
    certs = [issue(authority, f"dev-{i}") for i in range(5)]
    ocsp_responder = responder(authority, max_entries=4)

    for cert in certs:
        ocsp_responder.respond(query(cert, cas.bootstrap), now=NOW)

    assert len(ocsp_responder) <= 4


@pytest.mark.parametrize(
    ("validity", "max_entries"),
    [(dt.timedelta(0), 10), (VALIDITY, 0)],
    ids=["fail/no-validity", "fail/no-entries"],
)
def test_the_responder_refuses_bounds_that_cannot_work(
    authority: Auth, validity: dt.timedelta, max_entries: int
) -> None:
    with pytest.raises(ValueError):
        OcspResponder(
            cas=authority.cas, store=authority.store, validity=validity, max_entries=max_entries
        )


def test_a_ca_key_whose_token_is_away_is_try_later_without_a_traceback(
    authority: Auth, cas: Cas, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from estkit.ca import ocsp as ocsp_module
    from estkit.ca.errors import SignerUnavailable

    def token_away(**_: object) -> bytes:
        raise SignerUnavailable("bootstrap", "CKR_DEVICE_REMOVED")

    cert = issue(authority)
    monkeypatch.setattr(ocsp_module, "build_response", token_away)
    answer = read(responder(authority).respond(query(cert, cas.bootstrap), now=NOW))
    assert answer.response_status is ocsp.OCSPResponseStatus.TRY_LATER
    assert "Traceback" not in caplog.text and "no response for serial" not in caplog.text
