"""How uvicorn 0.54 speaks TLS here: ``https_protocol`` and the ASGI TLS extension.

The TLS layer is ``tls_openssl.TlsServerProtocol`` (OpenSSL of the
``cryptography`` wheel); uvicorn's HTTP protocol runs inside it.

uvicorn does not fill the ASGI TLS extension (its PRs #3132/#3133 are open).
The TLS handshake is complete when the HTTP protocol's ``connection_made``
runs, so the peer certificate is read there, once per connection, and
attached to every request's scope as ``scope["extensions"]["tls"]`` in the
shape the ASGI TLS extension specifies.
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
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from estkit.server.config import ConfigError, ServerConfig
from estkit.server.tls_openssl import TlsServerProtocol, server_context

_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}


class TlsExtensionProtocol(HttpToolsProtocol):
    _tls: dict[str, Any] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
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
        }

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._tls is not None:
            self.scope["extensions"] = {"tls": self._tls}  # type: ignore[dict-item]


def https_protocol(
    context: SSL.Context, config: Any, server_state: Any, app_state: Any, _loop: Any = None
) -> TlsServerProtocol:
    """One connection: TLS (``tls_openssl``) around ``TlsExtensionProtocol``.

    uvicorn itself runs without ``ssl``; its ``http=`` factory (``app.https_from_env``)
    calls this with the worker's context and uvicorn's own arguments.
    """
    inner = functools.partial(
        TlsExtensionProtocol,
        config=config,
        server_state=server_state,
        app_state=app_state,
        _loop=_loop,
    )
    return TlsServerProtocol(context, inner)


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
