"""A stand-in of Azure IoT Hub's identity registry (the service REST API), over HTTPS.

It answers what the documented API answers for ``GET`` and ``PUT
/devices/{id}?api-version=…`` and checks what the hub checks:

- ``Authorization: SharedAccessSignature sr=…&sig=…&se=…&skn=…``: the resource is the
  hub's host name (URL-encoded), the policy is the one configured, the token has not
  expired, and ``sig`` is the HMAC-SHA256, with the policy's key, of "<sr>\\n<se>"
  (401 ``IotHubUnauthorizedAccess`` otherwise);
- ``api-version``: one the stand-in knows (400 otherwise);
- ``PUT`` without ``If-Match`` creates (409 ``DeviceAlreadyExists`` when it exists);
  with ``If-Match`` it updates when the value is ``*`` or the device's quoted ETag (412
  ``PreconditionFailed`` otherwise, 404 ``DeviceNotFound`` for none); each write gives
  the device a new ETag;
- every answer carries ``x-ms-request-id``.

Devices are kept in memory; every request is recorded (``seen``); ``fail_next`` makes the
next N requests fail (503 by default), ``change_after_get`` changes a device at the "hub"
right after it was read (so the write that follows meets 412). TLS: a certificate for
127.0.0.1 and localhost from a test CA of its own (``ca_file``), on a free loopback port.
Waiting loops are bounded in count and time.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import itertools
import json
import secrets
import ssl
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import ip_address
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from estkit.pki import keys
from estkit.pki.profiles import Kind, Profile, issue_leaf
from testpki import cn_name, make_ca_pair

HOST = "standin-hub.azure-devices.net"
POLICY = "registryReadWrite"
API_VERSIONS = frozenset({"2021-04-12"})
AUTH_TYPES = frozenset({"sas", "selfSigned", "certificateAuthority", "none"})


@dataclass(frozen=True)
class Seen:
    """One request as the stand-in saw it, and its answer."""

    method: str
    device_id: str | None
    api_version: str | None
    authorization: str | None
    if_match: str | None
    body: dict[str, Any] | None
    status: int


@dataclass
class RegistryStandIn:
    """The registry's state and what it was asked; ``key`` is the policy's key."""

    ca_file: Path
    port: int = 0
    host: str = HOST
    policy: str = POLICY
    key: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    _failures: list[tuple[int, int | None]] = field(default_factory=list)
    _changed_after_get: set[str] = field(default_factory=set)
    _etags: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def endpoint(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def key_b64(self) -> str:
        """The key as Azure shows it (and as ``policy_key_file`` holds it)."""
        return base64.b64encode(self.key).decode()

    def write_key_file(self, path: Path) -> Path:
        path.write_text(self.key_b64 + "\n")
        path.chmod(0o600)
        return path

    def config(self, key_file: Path, *, create_identities: bool = False) -> dict[str, str]:
        """The ``[iothub]`` keys (TOML literals) of a server using this stand-in."""
        return {
            "host": f'"{self.host}"',
            "policy_name": f'"{self.policy}"',
            "policy_key_file": f'"{key_file}"',
            "endpoint": f'"{self.endpoint}"',
            "ca_file": f'"{self.ca_file}"',
            "create_identities": "true" if create_identities else "false",
        }

    # -- what tests arrange ----------------------------------------------------------

    def add_device(self, device_id: str, *, status: str = "enabled", auth: str = "sas") -> None:
        """A device the hub has already (made elsewhere)."""
        with self._lock:
            self.devices[device_id] = self._device(
                {"deviceId": device_id, "status": status, "authentication": {"type": auth}}
            )

    def fail_next(self, count: int, *, status: int = 503, retry_after: int | None = None) -> None:
        """The next ``count`` requests are answered ``status`` (e.g. 503, 429, 401)."""
        with self._lock:
            self._failures.extend([(status, retry_after)] * count)

    def clear_failures(self) -> None:
        with self._lock:
            self._failures.clear()

    def change_after_get(self, device_id: str) -> None:
        """Right after the next GET of ``device_id``, change it at the hub (new ETag)."""
        with self._lock:
            self._changed_after_get.add(device_id)

    # -- what tests read -------------------------------------------------------------

    def status(self, device_id: str) -> str | None:
        with self._lock:
            device = self.devices.get(device_id)
            return None if device is None else str(device["status"])

    def wait_for_status(self, device_id: str, status: str, *, timeout: float = 15) -> float:
        """Seconds until ``device_id`` has ``status`` at the stand-in; AssertionError after
        ``timeout``."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.status(device_id) == status:
                return time.monotonic() - start
            time.sleep(0.05)
        raise AssertionError(
            f"{device_id} is {self.status(device_id)!r} at the registry stand-in, not "
            f"{status!r}, after {timeout} s; requests: {self.requests(device_id)}"
        )

    def requests(self, device_id: str | None = None) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if device_id is None or s.device_id == device_id]

    # -- the API -----------------------------------------------------------------------

    def _device(self, body: dict[str, Any]) -> dict[str, Any]:
        """A stored device: the writable fields given, the rest as the registry fills them."""
        now = dt.datetime.now(dt.UTC).isoformat()
        auth = body.get("authentication") or {"type": "sas"}
        return {
            "deviceId": body["deviceId"],
            "generationId": str(next(self._etags)),
            "etag": base64.b64encode(str(next(self._etags)).encode()).decode(),
            "connectionState": "Disconnected",
            "status": body.get("status", "enabled"),
            "statusReason": body.get("statusReason"),
            "connectionStateUpdatedTime": "0001-01-01T00:00:00Z",
            "statusUpdatedTime": now,
            "lastActivityTime": "0001-01-01T00:00:00Z",
            "cloudToDeviceMessageCount": 0,
            "authentication": {
                "symmetricKey": {"primaryKey": None, "secondaryKey": None},
                "x509Thumbprint": {"primaryThumbprint": None, "secondaryThumbprint": None},
                **auth,
            },
            "capabilities": body.get("capabilities") or {"iotEdge": False},
        }

    def authorized(self, authorization: str | None, *, now: float) -> str | None:
        """None when ``authorization`` is a valid SAS token of the policy, else why not."""
        scheme = "SharedAccessSignature "
        if not authorization or not authorization.startswith(scheme):
            return "no SharedAccessSignature"
        fields = dict(p.partition("=")[::2] for p in authorization[len(scheme) :].split("&"))
        if set(fields) != {"sr", "sig", "se", "skn"}:
            return f"token fields {sorted(fields)}"
        if urllib.parse.unquote(fields["sr"]).lower() != self.host:
            return f"resource {fields['sr']!r} is not this hub"
        if fields["skn"] != self.policy:
            return f"unknown policy {fields['skn']!r}"
        if not fields["se"].isdigit() or int(fields["se"]) <= now:
            return "token expired"
        expected = hmac.new(
            self.key, f"{fields['sr']}\n{fields['se']}".encode(), hashlib.sha256
        ).digest()
        given = urllib.parse.unquote(fields["sig"])
        if not hmac.compare_digest(base64.b64encode(expected).decode(), given):
            return "signature does not match"
        return None

    def answer(
        self, method: str, path: str, headers: dict[str, str], raw: bytes
    ) -> tuple[int, dict[str, Any] | None, dict[str, str]]:
        """(status, JSON body, extra headers) of one request; recorded in ``seen``."""
        url = urllib.parse.urlsplit(path)
        query = urllib.parse.parse_qs(url.query)
        api_version = query.get("api-version", [None])[0]
        device_id = None
        if url.path.startswith("/devices/") and url.path.count("/") == 2:
            device_id = urllib.parse.unquote(url.path.removeprefix("/devices/"))
        body: dict[str, Any] | None = None
        if raw:
            try:
                parsed = json.loads(raw)
                body = parsed if isinstance(parsed, dict) else None
            except ValueError:
                body = None
        with self._lock:
            status, out, extra = self._answer(method, device_id, api_version, headers, raw, body)
            self.seen.append(
                Seen(
                    method,
                    device_id,
                    api_version,
                    headers.get("authorization"),
                    headers.get("if-match"),
                    body,
                    status,
                )
            )
        return status, out, extra

    def _answer(
        self,
        method: str,
        device_id: str | None,
        api_version: str | None,
        headers: dict[str, str],
        raw: bytes,
        body: dict[str, Any] | None,
    ) -> tuple[int, dict[str, Any] | None, dict[str, str]]:
        if self._failures:
            status, retry_after = self._failures.pop(0)
            extra = {"Retry-After": str(retry_after)} if retry_after is not None else {}
            return status, _error("ServiceUnavailable", f"injected {status}"), extra
        if (why := self.authorized(headers.get("authorization"), now=time.time())) is not None:
            return 401, _error("IotHubUnauthorizedAccess", f"Unauthorized: {why}"), {}
        if api_version not in API_VERSIONS:
            return 400, _error("InvalidProtocolVersion", f"api-version {api_version!r}"), {}
        if device_id is None:
            return 404, _error("NotFound", "no such resource"), {}
        device = self.devices.get(device_id)
        if method == "GET":
            if device is None:
                return 404, _error("DeviceNotFound", f"device {device_id} not found"), {}
            answer = dict(device)
            if device_id in self._changed_after_get:
                self._changed_after_get.discard(device_id)
                device["etag"] = base64.b64encode(str(next(self._etags)).encode()).decode()
            return 200, answer, {"ETag": f'"{answer["etag"]}"'}
        if method != "PUT":
            return 405, _error("MethodNotAllowed", method), {}
        if body is None or body.get("deviceId") != device_id:
            return (
                400,
                _error("ArgumentInvalid", f"body is not device {device_id}: {raw[:80]!r}"),
                {},
            )
        if body.get("status", "enabled") not in ("enabled", "disabled"):
            return 400, _error("ArgumentInvalid", f"status {body.get('status')!r}"), {}
        auth = body.get("authentication") or {}
        if auth.get("type", "sas") not in AUTH_TYPES:
            return 400, _error("ArgumentInvalid", f"authentication.type {auth.get('type')!r}"), {}
        if_match = headers.get("if-match")
        if if_match is None:
            if device is not None:
                return 409, _error("DeviceAlreadyExists", f"device {device_id} exists"), {}
        elif device is None:
            return 404, _error("DeviceNotFound", f"device {device_id} not found"), {}
        elif if_match != "*" and if_match != f'"{device["etag"]}"':
            return 412, _error("PreconditionFailed", f"etag {if_match} is not current"), {}
        stored = self._device(body)
        if device is not None:
            stored["generationId"] = device["generationId"]
        self.devices[device_id] = stored
        return 200, dict(stored), {"ETag": f'"{stored["etag"]}"'}


def _error(code: str, message: str) -> dict[str, Any]:
    return {
        "Message": f"ErrorCode:{code};{message}",
        "ExceptionMessage": f"Tracking ID:{uuid.uuid4().hex}-TimeStamp:{dt.datetime.now(dt.UTC)}",
    }


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    timeout = 10

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def _handle(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        headers = {k.lower(): v for k, v in self.headers.items()}
        status, body, extra = self.server.standin.answer(self.command, self.path, headers, raw)
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-ms-request-id", str(uuid.uuid4()))
        for name, value in extra.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    standin: RegistryStandIn


def _tls_context(directory: Path) -> tuple[ssl.SSLContext, Path]:
    """The stand-in's TLS server context and the trust anchor (root PEM) that verifies it."""
    now = dt.datetime.now(dt.UTC)
    pair = make_ca_pair("Registry Stand-in Root", "Registry Stand-in CA", now=now)
    key = keys.generate_key("ec-p256")
    names: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ip_address("127.0.0.1")),
    ]
    cert = issue_leaf(
        profile=Profile("registry-standin", Kind.TLS_SERVER, dt.timedelta(days=2)),
        public_key=key.public_key(),
        subject=cn_name("localhost"),
        sans=x509.SubjectAlternativeName(names),
        issuer=pair.issuing,
        issuer_key=pair.issuing_key,
        now=now,
    )
    directory.mkdir(parents=True, exist_ok=True)
    chain, key_path, ca_file = (
        directory / "server.pem",
        directory / "server.key",
        directory / "ca.pem",
    )
    chain.write_bytes(cert.public_bytes(Encoding.PEM) + pair.issuing.public_bytes(Encoding.PEM))
    key_path.write_bytes(keys.key_to_pem(key))
    key_path.chmod(0o600)
    ca_file.write_bytes(pair.root.public_bytes(Encoding.PEM))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(chain, key_path)
    return context, ca_file


@contextmanager
def running_standin(
    directory: Path, *, configure: Callable[[RegistryStandIn], None] | None = None
) -> Iterator[RegistryStandIn]:
    """A registry stand-in serving on a free loopback port until the block ends."""
    context, ca_file = _tls_context(directory)
    standin = RegistryStandIn(ca_file=ca_file)
    if configure is not None:
        configure(standin)
    server = _Server(("127.0.0.1", 0), _Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    server.standin = standin
    standin.port = int(server.server_address[1])
    thread = threading.Thread(
        target=server.serve_forever, args=(0.05,), name="registry-standin", daemon=True
    )
    thread.start()
    try:
        yield standin
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
