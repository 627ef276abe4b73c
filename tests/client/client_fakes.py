"""Helpers for the client tests: a test PKI, a fake clock, a scripted EST server."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from estkit.pki import cms, keys, profiles, wire
from testpki import cn_name, make_ca_pair

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
BASE_URL = "https://est.example:7443/.well-known/est/devices"


@dataclass(frozen=True)
class Pki:
    """A root, an issuing intermediate under it, and a way to issue device certificates."""

    root: x509.Certificate
    root_key: keys.PrivateKey
    issuing: x509.Certificate
    issuing_key: keys.PrivateKey

    def issue(
        self,
        public_key: CertificatePublicKeyTypes,
        *,
        subject: x509.Name | None = None,
        cn: str = "dev-1",
        sans: x509.SubjectAlternativeName | None = None,
        now: dt.datetime = NOW,
        validity: dt.timedelta = dt.timedelta(days=30),
    ) -> x509.Certificate:
        return profiles.issue_leaf(
            profile=profiles.Profile("device", profiles.Kind.OPERATIONAL, validity),
            public_key=public_key,
            subject=subject if subject is not None else cn_name(cn),
            sans=sans,
            issuer=self.issuing,
            issuer_key=self.issuing_key,
            now=now,
        )


def make_ca(cn: str = "Test Root") -> Pki:
    pair = make_ca_pair(cn, f"{cn} Issuing", now=NOW - dt.timedelta(days=1))
    return Pki(pair.root, pair.root_key, pair.issuing, pair.issuing_key)


def certs_body(certs: list[x509.Certificate], *, line_length: int = 0) -> bytes:
    return wire.encode_base64_body(cms.encode_certs_only(certs), line_length=line_length)


def pkcs7_response(
    certs: list[x509.Certificate], *, content_type: str = wire.ENROLL_CONTENT_TYPE
) -> httpx.Response:
    return httpx.Response(
        200,
        content=certs_body(certs),
        headers={"Content-Type": content_type, "Content-Transfer-Encoding": "base64"},
    )


def text_response(status: int, reason: str, **headers: str) -> httpx.Response:
    return httpx.Response(
        status, content=reason.encode(), headers={"Content-Type": "text/plain", **headers}
    )


@dataclass
class FakeClock:
    """Monotonic time that only moves when the client sleeps."""

    now: float = 1000.0
    sleeps: list[float] = field(default_factory=list)

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@dataclass
class Server:
    """Answers requests from a queue per path (the last answer repeats); records requests."""

    routes: dict[str, list[httpx.Response | Callable[[httpx.Request], httpx.Response]]] = field(
        default_factory=dict
    )
    requests: list[httpx.Request] = field(default_factory=list)

    def on(
        self, path: str, *answers: httpx.Response | Callable[[httpx.Request], httpx.Response]
    ) -> None:
        self.routes[path] = list(answers)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        queue = self.routes.get(request.url.path)
        if not queue:
            return text_response(404, "no such operation")
        answer = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(answer, httpx.Response):
            return answer
        return answer(request)

    def paths(self) -> list[str]:
        return [f"{r.method} {r.url.path}" for r in self.requests]
