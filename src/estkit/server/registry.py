"""Azure IoT Hub's identity registry (its service REST API), as far as the hub sync needs it.

``GET`` and ``PUT /devices/{id}?api-version=…``, authenticated with a shared access
signature of a policy (``sas_token``). An identity is changed by reading it and
writing it back with its ETag in ``If-Match``: a change someone made at the hub
meanwhile makes the write fail (412) and is read again, never overwritten. A new
identity is written without ``If-Match``; the hub answers 409 if one exists.

RegistryError
├── Transient       429, 5xx, 408, timeouts, connection failures: try again later
│                   (``retry_after``: the hub's Retry-After, if it sent one)
├── EtagMismatch    412: the identity changed since it was read
├── IdentityExists  409 on create: it was created meanwhile
├── IdentityGone    404 on update: it was deleted meanwhile
└── Rejected        any other refusal (400, 401, 403, …): trying again will not help

The policy key is never logged nor put into an error: only the token made from it
travels, in the ``Authorization`` header, which no message here repeats.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import ssl
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import httpx

from estkit.store.outbox import HubChange, HubStatus

DEFAULT_API_VERSION = "2021-04-12"
# A token lives this long; a new one is made for every request.
TOKEN_LIFETIME = dt.timedelta(hours=1)
TIMEOUT = 10.0
# The registry's limit on statusReason.
STATUS_REASON_MAX = 128
# Reads and writes of one change at most, when the identity keeps changing (412) or
# appears and disappears (409, 404) between them.
MAX_ROUNDS = 4


class RegistryError(Exception):
    """Root of the registry client's errors; the message is one line for the operator."""


class Transient(RegistryError):
    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EtagMismatch(RegistryError):
    pass


class IdentityExists(RegistryError):
    pass


class IdentityGone(RegistryError):
    pass


class Rejected(RegistryError):
    pass


@dataclass(frozen=True, slots=True)
class SasPolicy:
    """A shared access policy of the hub (``registryWrite`` or more) and its key."""

    name: str
    key: bytes = field(repr=False)  # base64-decoded


def sas_token(host: str, policy: SasPolicy, *, expiry: int) -> str:
    """The ``Authorization`` value for the hub ``host`` until ``expiry`` (Unix seconds):
    ``SharedAccessSignature sr=…&sig=…&se=…&skn=…``, its signature the HMAC-SHA256, with
    the policy key, of the URL-encoded resource, a newline and the expiry."""
    resource = urllib.parse.quote(host.lower(), safe="")
    signed = hmac.new(policy.key, f"{resource}\n{expiry}".encode(), hashlib.sha256).digest()
    signature = urllib.parse.quote(base64.b64encode(signed).decode(), safe="")
    skn = urllib.parse.quote(policy.name, safe="")
    return f"SharedAccessSignature sr={resource}&sig={signature}&se={expiry}&skn={skn}"


@dataclass(frozen=True, slots=True)
class Identity:
    """A device identity as the registry answered it; ``etag`` unquoted."""

    body: Mapping[str, Any]
    etag: str

    @property
    def status(self) -> str | None:
        status = self.body.get("status")
        return status if isinstance(status, str) else None


class Outcome(StrEnum):
    CREATED = "created"
    UPDATED = "updated"
    UNCHANGED = "unchanged"  # the identity already had the status


class RegistryClient:
    """The registry of the hub ``host``, reached at ``endpoint`` (``https://host`` but in
    tests); ``transport`` for tests that need no network."""

    def __init__(
        self,
        *,
        host: str,
        policy: SasPolicy,
        clock: Callable[[], dt.datetime],
        endpoint: str | None = None,
        api_version: str = DEFAULT_API_VERSION,
        verify: ssl.SSLContext | bool = True,
        timeout: float = TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.host = host
        self._policy = policy
        self._clock = clock
        self._api_version = api_version
        self._http = httpx.Client(
            base_url=(endpoint or f"https://{host}").rstrip("/"),
            verify=verify,
            timeout=timeout,
            transport=transport,
            follow_redirects=False,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def get(self, device_id: str) -> Identity | None:
        """The identity, or None when the registry has none of that id."""
        response = self._send("GET", device_id)
        if response.status_code == 404:
            return None
        return self._identity(response, device_id)

    def put(self, device_id: str, body: Mapping[str, Any], *, etag: str | None) -> Identity:
        """Write an identity: a new one (``etag`` None; ``IdentityExists`` if there is
        one), or one read before with that ETag (``EtagMismatch``, ``IdentityGone``)."""
        headers = {"Content-Type": "application/json; charset=utf-8"}
        if etag is not None:
            headers["If-Match"] = f'"{etag}"'
        response = self._send("PUT", device_id, content=json.dumps(body), headers=headers)
        if response.status_code == 412:
            raise EtagMismatch(_failure("PUT", device_id, response))
        if response.status_code == 409 and etag is None:
            raise IdentityExists(_failure("PUT", device_id, response))
        if response.status_code == 404 and etag is not None:
            raise IdentityGone(_failure("PUT", device_id, response))
        return self._identity(response, device_id)

    def _send(
        self,
        method: str,
        device_id: str,
        *,
        content: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        expiry = int((self._clock() + TOKEN_LIFETIME).timestamp())
        try:
            response = self._http.request(
                method,
                f"/devices/{urllib.parse.quote(device_id, safe='')}",
                params={"api-version": self._api_version},
                content=content,
                headers={
                    **(headers or {}),
                    "Accept": "application/json",
                    "Authorization": sas_token(self.host, self._policy, expiry=expiry),
                },
            )
        except httpx.TimeoutException:
            raise Transient(f"{method} {device_id}: no answer within the timeout") from None
        except httpx.RequestError as exc:  # connection, TLS, protocol
            raise Transient(f"{method} {device_id}: {str(exc) or type(exc).__name__}") from None
        if response.status_code in (408, 429) or response.status_code >= 500:
            raise Transient(
                _failure(method, device_id, response),
                retry_after=_retry_after(response.headers.get("Retry-After")),
            )
        return response

    def _identity(self, response: httpx.Response, device_id: str) -> Identity:
        method = response.request.method
        if response.status_code != 200:
            raise Rejected(_failure(method, device_id, response))
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise Rejected(f"{method} {device_id}: the answer is not a JSON device")
        etag = body.get("etag") or response.headers.get("ETag", "")
        return Identity(body=body, etag=_unquoted(str(etag)))


class Stale(RegistryError):
    """The change is no longer this sender's to write (superseded, or its lease lost)."""


def apply(
    client: RegistryClient,
    change: HubChange,
    *,
    create_identities: bool,
    may_write: Callable[[], bool] = lambda: True,
) -> tuple[Outcome, Identity]:
    """Give the device's identity ``change.status``: read it, and write it back with the
    new status under its ETag; read again when it changed meanwhile (412). An identity
    the registry lacks is created (``authentication.type = certificateAuthority``) with
    ``create_identities``, else ``Rejected``. ``Transient`` when the identity kept
    changing for ``MAX_ROUNDS`` reads. ``may_write`` is asked before every write (after
    every read): False raises ``Stale`` and nothing is written."""
    reason = f"estkit: {change.cause}"[:STATUS_REASON_MAX]
    for _ in range(MAX_ROUNDS):
        identity = client.get(change.device_id)
        if (identity is None or identity.status != change.status.value) and not may_write():
            raise Stale(f"device {change.device_id}: a newer change or another sender has it")
        try:
            if identity is None and change.status is HubStatus.DISABLED:
                # No identity: nothing at the hub can connect as this device; what the
                # change asks for holds already (and creating one only to disable it
                # is not this sender's to decide).
                return Outcome.UNCHANGED, Identity(body={}, etag="")
            if identity is None:
                if not create_identities:
                    raise Rejected(
                        f"device {change.device_id} has no identity in the hub's registry "
                        "(iothub.create_identities is off)"
                    )
                body = {
                    "deviceId": change.device_id,
                    "status": change.status.value,
                    "statusReason": reason,
                    "authentication": {"type": "certificateAuthority"},
                    "capabilities": {"iotEdge": False},
                }
                return Outcome.CREATED, client.put(change.device_id, body, etag=None)
            if identity.status == change.status.value:
                return Outcome.UNCHANGED, identity
            # Everything else stays as the registry has it (authentication, scope, …).
            body = {**identity.body, "status": change.status.value, "statusReason": reason}
            return Outcome.UPDATED, client.put(change.device_id, body, etag=identity.etag)
        except (EtagMismatch, IdentityExists, IdentityGone):
            continue  # changed at the hub meanwhile: read it again
    raise Transient(
        f"device {change.device_id}: its identity changed at the hub on each of "
        f"{MAX_ROUNDS} attempts to write it"
    )


def _failure(method: str, device_id: str, response: httpx.Response) -> str:
    """One line: what was refused, the registry's error, its request id."""
    try:
        body = response.json()
    except ValueError:
        body = None
    message = ""
    if isinstance(body, dict):
        message = str(body.get("Message") or body.get("message") or "")
    if not message:
        message = response.text
    message = " ".join(message.split())[:300]
    request_id = response.headers.get("x-ms-request-id")
    where = f" (x-ms-request-id {request_id})" if request_id else ""
    return (
        f"{method} {device_id}: {response.status_code} {response.reason_phrase}: {message}{where}"
    )


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (the hub sends integer seconds), or None."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def _unquoted(etag: str) -> str:
    etag = etag.removeprefix("W/")
    return etag[1:-1] if len(etag) > 1 and etag[0] == etag[-1] == '"' else etag
