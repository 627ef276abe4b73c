"""ASGI TLS extension for uvicorn 0.54 (which does not fill it; its PRs #3132/#3133 are open).

The TLS handshake is complete when the HTTP protocol's ``connection_made``
runs, so the peer certificate is read there, once per connection, and
attached to every request's scope as ``scope["extensions"]["tls"]`` in the
shape the ASGI TLS extension specifies. Delete the extension part when
uvicorn ships it (and the TCP_NODELAY part when uvicorn #3149 is fixed).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from pathlib import Path
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}


class TlsExtensionProtocol(HttpToolsProtocol):
    _tls: dict[str, Any] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # With several workers uvicorn's shared socket path skips TCP_NODELAY
        # (uvicorn #3149): every response would wait ~40 ms for Nagle/delayed ACK.
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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


def client_ca_path(data_dir: Path) -> Path:
    """Where ``serve`` writes the CAs whose certificates may authenticate clients."""
    return data_dir / "run" / "client-cas.pem"
