"""How the client authenticates: a TLS client certificate, HTTP Basic, or both.

``EstClient(auth=...)`` takes one of them:

- ``ClientCertificate``: mTLS only;
- ``BasicAuth``: Basic sent with every request (some servers never challenge first);
- ``Credentials(certificate=..., basic=...)``: mTLS, and Basic sent only once the server
  asks for it (RFC 7030 3.2.3: a server may want HTTP authentication from a client
  that has a certificate; libest's server does by default) with a 401 and
  ``WWW-Authenticate: Basic``, then with every later request to that server.

A 401 challenge for Basic is answered at most once per request, and only when the
request did not carry Basic already: a 401 after Basic was sent is final.
"""

from __future__ import annotations

import base64
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path

import httpx


@dataclass(frozen=True, slots=True)
class ClientCertificate:
    """mTLS with a certificate (its file may hold the chain after it) and its private key."""

    cert_path: Path
    key_path: Path


@dataclass(frozen=True, slots=True)
class BasicAuth:
    """HTTP Basic credentials: alone, sent with every request; beside a certificate
    (``Credentials``), sent once the server asks."""

    username: str
    password: str = field(repr=False)

    def __post_init__(self) -> None:
        if ":" in self.username:
            raise ValueError("a Basic user name cannot contain ':'")

    @property
    def header(self) -> str:
        """The ``Authorization`` header value (RFC 7617, UTF-8)."""
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode("ascii")
        return f"Basic {token}"


@dataclass(frozen=True, slots=True)
class Credentials:
    """Everything the client may present: a certificate for mTLS, Basic for a challenge."""

    certificate: ClientCertificate | None = None
    basic: BasicAuth | None = None

    @classmethod
    def of(cls, auth: ClientCertificate | BasicAuth | Credentials | None) -> Credentials:
        """``auth`` as ``Credentials`` (what ``EstClient(auth=...)`` accepts)."""
        if auth is None:
            return cls()
        if isinstance(auth, Credentials):
            return auth
        if isinstance(auth, ClientCertificate):
            return cls(certificate=auth)
        if isinstance(auth, BasicAuth):
            return cls(basic=auth)
        raise TypeError(
            f"auth must be ClientCertificate, BasicAuth or Credentials, not {type(auth).__name__}"
        )


def asks_for_basic(status: int, headers: httpx.Headers) -> bool:
    """True when an answer is a 401 that challenges for the Basic scheme (RFC 9110 11.6.1:
    one header or many, each a comma-separated list of challenges and their parameters)."""
    if status != 401:
        return False
    for value in headers.get_list("www-authenticate"):
        for piece in value.split(","):
            words = piece.split(None, 1)
            if words and words[0].lower() == "basic":
                return True
    return False


class BasicChallengeFlow(httpx.Auth):
    """The httpx auth flow of ``BasicAuth``: up front with every request (``up_front``), or
    in answer to a Basic challenge, after which it is sent up front to this server too.

    One flow per EST client: it remembers that the server challenged."""

    def __init__(self, basic: BasicAuth, *, up_front: bool) -> None:
        self._header = basic.header
        self._up_front = up_front

    @property
    def up_front(self) -> bool:
        """Whether Basic goes with every request now (from the start, or since a challenge)."""
        return self._up_front

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if self._up_front:
            request.headers["Authorization"] = self._header
            yield request
            return
        response = yield request
        if asks_for_basic(response.status_code, response.headers):
            self._up_front = True
            # httpx reads the 401's body before sending this, so the connection stays open
            # (what a channel binding made on it needs). A new request: the first one is
            # left as it was sent.
            headers = httpx.Headers(request.headers)
            headers["Authorization"] = self._header
            yield httpx.Request(
                request.method,
                request.url,
                headers=headers,
                content=request.read(),
                extensions=request.extensions,
            )
