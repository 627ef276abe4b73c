"""The client side of estkit: the EST client and the provisioning (REST API) client,
both on one HTTP client core (timeouts, retries with backoff, Retry-After, circuit breaker).

from estkit.client import BasicAuth, EstClient, TrustAnchor

anchor = TrustAnchor.from_fingerprint("AB:CD:…")
with EstClient(url, trust=anchor, auth=BasicAuth("dev-1", secret)) as est:
    issued = est.simpleenroll(csr)

``auth=`` takes one of (``estkit.client.auth``):

- ``ClientCertificate(cert, key)``: mTLS;
- ``BasicAuth(user, password)``: HTTP Basic, sent with every request;
- ``Credentials(certificate=ClientCertificate(...), basic=BasicAuth(...))``: mTLS, and
  Basic sent only when the server challenges (401 ``WWW-Authenticate: Basic``, as a
  server may ask a client with a certificate, RFC 7030 3.2.3), then with every later
  request. A challenge is answered once; a 401 after Basic was sent is final
  (``EstAuthError``), never retried by the client core.

``simpleenroll``, ``simplereenroll`` and ``serverkeygen`` take a CSR, or a
``CsrFactory``: called with the channel binding for the CSR's challengePassword
when ``/csrattrs`` lists it (RFC 7030 3.5), else None:

    def make_csr(challenge_password: str | None) -> x509.CertificateSigningRequest:
        return build_csr(key, subject=name, challenge_password=challenge_password)

    certs = est.simpleenroll(make_csr)
    key, certs = est.serverkeygen(make_csr)  # RFC 7030 4.4: the server makes the key

The binding is ``tls-unique`` (RFC 5929), which only TLS 1.2 has; Python's ``ssl``
cannot export keying material, so TLS 1.3's ``tls-exporter`` (RFC 9266) is out of
reach: to bind, the client reconnects with TLS 1.2 as its highest version.

Errors: see ``estkit.client.errors``; the core: ``estkit.client.http``.
"""

from estkit.client.auth import BasicAuth, ClientCertificate, Credentials
from estkit.client.breaker import CircuitBreaker
from estkit.client.errors import (
    ApiAnswerError,
    ApiCircuitOpen,
    ApiConnectionError,
    ApiError,
    ApiHttpError,
    ClientError,
    CredentialError,
    EnrollmentPending,
    EstAuthError,
    EstCircuitOpen,
    EstConnectionError,
    EstError,
    EstHttpError,
    EstNotFoundError,
    EstProtocolError,
    IssuedCertificateError,
    TrustAnchorError,
)
from estkit.client.est import CsrFactory, EstClient
from estkit.client.http import HttpCore, RetryPolicy
from estkit.client.issued import IssuedCertificate, check_issued
from estkit.client.provisioning import IssuedAnswer, ProvisioningApi
from estkit.client.trust import TrustAnchor
from estkit.pki.csrattrs import CsrAttribute

__all__ = [
    "ApiAnswerError",
    "ApiCircuitOpen",
    "ApiConnectionError",
    "ApiError",
    "ApiHttpError",
    "BasicAuth",
    "CircuitBreaker",
    "ClientCertificate",
    "ClientError",
    "CredentialError",
    "Credentials",
    "CsrAttribute",
    "CsrFactory",
    "EnrollmentPending",
    "EstAuthError",
    "EstCircuitOpen",
    "EstClient",
    "EstConnectionError",
    "EstError",
    "EstHttpError",
    "EstNotFoundError",
    "EstProtocolError",
    "HttpCore",
    "IssuedAnswer",
    "IssuedCertificate",
    "IssuedCertificateError",
    "ProvisioningApi",
    "RetryPolicy",
    "TrustAnchor",
    "TrustAnchorError",
    "check_issued",
]
