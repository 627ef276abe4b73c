"""EST client library: trust-anchor bootstrap, the EST operations, retries and timeouts.

from estkit.client import BasicAuth, EstClient, TrustAnchor

anchor = TrustAnchor.from_fingerprint("AB:CD:…")
with EstClient(url, trust=anchor, auth=BasicAuth("dev-1", secret)) as est:
    issued = est.simpleenroll(csr)
"""

from estkit.client.auth import BasicAuth, ClientCertificate
from estkit.client.errors import (
    CredentialError,
    EnrollmentPending,
    EstAuthError,
    EstConnectionError,
    EstError,
    EstHttpError,
    EstNotFoundError,
    EstProtocolError,
    IssuedCertificateError,
    TrustAnchorError,
)
from estkit.client.est import EstClient
from estkit.client.issued import IssuedCertificate, check_issued
from estkit.client.trust import TrustAnchor
from estkit.pki.csrattrs import CsrAttribute

__all__ = [
    "BasicAuth",
    "ClientCertificate",
    "CredentialError",
    "CsrAttribute",
    "EnrollmentPending",
    "EstAuthError",
    "EstClient",
    "EstConnectionError",
    "EstError",
    "EstHttpError",
    "EstNotFoundError",
    "EstProtocolError",
    "IssuedCertificate",
    "IssuedCertificateError",
    "TrustAnchor",
    "TrustAnchorError",
    "check_issued",
]
