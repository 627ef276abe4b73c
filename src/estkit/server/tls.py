"""How uvicorn 0.54 speaks TLS here: ``https_protocol`` and the ASGI TLS extension.

The TLS layer is ``tls_openssl.TlsServerProtocol`` (OpenSSL of the
``cryptography`` wheel); uvicorn's HTTP protocol runs inside it.

uvicorn does not fill the ASGI TLS extension (its PRs #3132/#3133 are open).
The TLS handshake is complete when the HTTP protocol's ``connection_made``
runs, so the peer certificate is read there, once per connection, and
attached to every request's scope as ``scope["extensions"]["tls"]`` in the
shape the ASGI TLS extension specifies.

uvicorn's httptools protocol has no limit on a request's head and no read
timeout: ``TlsExtensionProtocol`` adds both (``limits.ConnectionLimits``). A
head over the size or field count gets 431 and the connection is closed; a head
not complete ``head_timeout`` seconds after the handshake (or after its first
byte, on a kept-alive connection), or a body not complete ``body_timeout``
seconds after its head, gets 408 and the connection is closed. Idle keep-alive
is uvicorn's own timeout.

uvicorn's httptools protocol lower-cases every response header name it writes;
some EST clients match names byte for byte, so each response head is written
with canonical names (``_CanonicalHead``, ``quirks.canonical_head``).
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
import ssl
from pathlib import Path
from typing import Any

from OpenSSL import SSL
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from estkit.server.config import ConfigError, ServerConfig
from estkit.server.limits import AddressSlots, ConnectionLimits
from estkit.server.quirks import canonical_head, canonical_name
from estkit.server.tls_openssl import TlsServerProtocol, server_context

_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}


class TlsExtensionProtocol(HttpToolsProtocol):
    _tls: dict[str, Any] | None = None
    # The head being read: raw bytes and line ends since it began (a head cut in
    # pieces is measured before the parser has it whole).
    _reading_head = True
    _head_bytes = 0
    _head_lines = 0
    _refused = False
    _deadline = 0.0  # loop time by which the head or the body must be complete
    _read_timer: asyncio.TimerHandle | None = None

    def __init__(
        self,
        config: Any,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: ConnectionLimits,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._limits = limits

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._expect_by(self._limits.head_timeout)
        ssl_object: ssl.SSLObject | None = transport.get_extra_info("ssl_object")
        if ssl_object is None:
            return
        der = ssl_object.getpeercert(binary_form=True)
        cipher = ssl_object.cipher()
        self._tls = {
            "server_cert": None,
            "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
            "client_cert_name": None,
            "client_cert_error": None,
            "tls_version": _TLS_VERSIONS.get(ssl_object.version() or ""),
            "cipher_suite": cipher[0] if cipher else None,
            # estkit's own: RFC 7030 3.5 binding (``pki.binding.ChannelBinding``) or None.
            "estkit.channel_binding": getattr(ssl_object, "channel_binding", None),
        }

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._reading_head:
            self._head_bytes += len(data)
            self._head_lines += data.count(b"\n")
        super().data_received(data)
        # A head still incomplete after all it was sent: measured on the raw bytes, so
        # the parser never holds more than the limit and one read.
        if self._reading_head and not self._refused:
            limits = self._limits
            if self._head_bytes > limits.max_header_bytes:
                self._refuse(431, f"request header fields over {limits.max_header_bytes} bytes")
            elif self._head_lines > limits.max_header_count + 1:
                self._refuse(431, f"more than {limits.max_header_count} request header fields")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._tls is not None:
            self.scope["extensions"] = {"tls": self._tls}  # type: ignore[dict-item]
        if self._read_timer is None:  # the next request on a kept-alive connection
            self._expect_by(self._limits.head_timeout)

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        limits = self._limits
        headers = self.headers
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in headers)
        if len(headers) > limits.max_header_count:
            self._refuse(431, f"more than {limits.max_header_count} request header fields")
            return
        if size > limits.max_header_bytes:
            self._refuse(431, f"request header fields over {limits.max_header_bytes} bytes")
            return
        self._reading_head = False
        self._head_bytes = self._head_lines = 0
        self._deadline = self.loop.time() + limits.body_timeout
        previous = self.cycle
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle is not previous:
            # Its task has not run yet: the head it writes goes through _CanonicalHead.
            cycle.transport = _CanonicalHead(cycle.transport)  # type: ignore[assignment]

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._reading_head = True
        self._stop_timer()  # until the next request's first byte
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request it cannot parse, with canonical header names."""
        body = msg.encode("ascii", "replace")
        head = [STATUS_LINE[400]]
        for name, value in self.server_state.default_headers:
            head += [canonical_name(name), b": ", value, b"\r\n"]
        head.append(b"Content-Type: text/plain; charset=utf-8\r\n")
        head.append(b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
        self.transport.write(b"".join(head) + body)
        self.transport.close()

    def _expect_by(self, seconds: float) -> None:
        self._deadline = self.loop.time() + seconds
        if self._read_timer is None:
            self._read_timer = self.loop.call_at(self._deadline, self._on_deadline)

    def _on_deadline(self) -> None:
        self._read_timer = None
        if self._refused:
            return
        left = self._deadline - self.loop.time()
        if left > 0:  # moved on from the head to the body since the timer was set
            self._read_timer = self.loop.call_later(left, self._on_deadline)
            return
        what = "request head" if self._reading_head else "request body"
        self._refuse(408, f"{what} not received in time")

    def _stop_timer(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _refuse(self, status: int, reason: str) -> None:
        """Answer ``status`` with a one-line reason and close; read nothing more.

        Not logged: a client can cause this as often as it connects.
        """
        self._refused = True
        self._stop_timer()
        transport = self.transport
        if transport.is_closing():
            return
        cycle = self.cycle
        if cycle is None or not cycle.response_started or cycle.response_complete:
            # Not in the middle of a response. (An app still waiting for the body hears
            # of the close when it is lost; what it writes after this is dropped.)
            body = f"{reason}\n".encode()
            transport.write(
                STATUS_LINE[status]
                + b"Content-Type: text/plain; charset=utf-8\r\n"
                + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
                + body
            )
        transport.close()


class _CanonicalHead:
    """The transport as one request's ``RequestResponseCycle`` sees it.

    uvicorn writes a response head in one ``write`` with every header name
    lower-cased; this restores canonical names in that write (``quirks``) and
    passes everything else through: an interim ``100 Continue`` before it, the
    body after it.
    """

    __slots__ = ("_head_sent", "_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._head_sent = False

    def write(self, data: bytes) -> None:
        if not self._head_sent and not data.startswith(b"HTTP/1.1 1"):
            self._head_sent = True
            data = canonical_head(data)
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def https_protocol(
    context: SSL.Context,
    config: Any,
    server_state: Any,
    app_state: Any,
    _loop: Any = None,
    *,
    limits: ConnectionLimits | None = None,
    slots: AddressSlots | None = None,
) -> TlsServerProtocol:
    """One connection: TLS (``tls_openssl``) around ``TlsExtensionProtocol``.

    uvicorn itself runs without ``ssl``; its ``http=`` factory (``app.https_from_env``)
    calls this with the worker's context, its connection count per address
    (``slots``) and uvicorn's own arguments. ``limits``: ``limits``' defaults unless given.
    """
    inner = functools.partial(
        TlsExtensionProtocol,
        config=config,
        server_state=server_state,
        app_state=app_state,
        _loop=_loop,
        limits=limits or ConnectionLimits(),
    )
    return TlsServerProtocol(context, inner, slots=slots)


def server_tls_context(config: ServerConfig) -> SSL.Context:
    """The server's TLS context; ``ConfigError`` (one line) when its files cannot serve."""
    try:
        return server_context(
            cert_chain=config.tls_cert,
            key=config.tls_key,
            client_cas=client_ca_path(config.data_dir),
        )
    except SSL.Error as exc:
        raise ConfigError(
            f"tls.cert / tls.key: {config.tls_cert} and {config.tls_key} cannot serve TLS "
            f"({_openssl_reason(exc)})"
        ) from None


def _openssl_reason(exc: SSL.Error) -> str:
    """The last reason of OpenSSL's error queue, e.g. "key values mismatch"."""
    queue = exc.args[0] if exc.args else None
    if isinstance(queue, list) and queue and isinstance(queue[-1], tuple):
        return str(queue[-1][-1])
    return str(exc) or type(exc).__name__


def client_ca_path(data_dir: Path) -> Path:
    """Where ``serve`` writes the CAs whose certificates may authenticate clients."""
    return data_dir / "run" / "client-cas.pem"


class HttpsInStartupLine(logging.Filter):
    """uvicorn names the scheme in "Uvicorn running on http://…" after its own ``ssl``
    setting, which is off here because the TLS layer is ours: say https."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        running = str(record.msg).startswith("Uvicorn running on")
        if running and isinstance(args, tuple) and args and args[0] == "http":
            record.args = ("https", *args[1:])
        return True


def uvicorn_log_config() -> dict[str, Any]:
    """uvicorn's default logging, with ``HttpsInStartupLine`` on its main handler."""
    from uvicorn.config import LOGGING_CONFIG

    log_config = copy.deepcopy(LOGGING_CONFIG)
    log_config.setdefault("filters", {})["https"] = {"()": HttpsInStartupLine}
    log_config["handlers"]["default"]["filters"] = ["https"]
    return log_config
