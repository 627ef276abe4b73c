"""The client side of estkit: the EST client and the provisioning (REST API) client,
both on one HTTP client core (timeouts, retries with backoff, Retry-After, circuit breaker).

from estkit.client import BasicAuth, EstClient, TrustAnchor

anchor = TrustAnchor.from_fingerprint("AB:CD:…")
with EstClient(url, trust=anchor, auth=BasicAuth("dev-1", secret)) as est:
    issued = est.simpleenroll(csr)

Errors: see ``estkit.client.errors``; the core: ``estkit.client.http``.
"""

from estkit.client.auth import BasicAuth, ClientCertificate
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
from estkit.client.est import EstClient
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
    "CsrAttribute",
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
