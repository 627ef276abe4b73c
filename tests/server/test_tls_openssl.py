"""The TLS layer (server/tls_openssl.py) in one process: what it leaves behind per connection."""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import socket
import ssl
import weakref
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from estkit.server.tls_openssl import TlsServerProtocol, server_context
from testpki import make_ca_pair


class _UpperOnce(asyncio.Protocol):
    """Answers the first bytes in upper case, then closes: one request per connection."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport  # the link every protocol holds back to its transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data.upper())
        self.transport.close()


def _exchange(port: int, payload: bytes) -> bytes:
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        client.wrap_socket(raw) as tls,
    ):
        tls.sendall(payload)
        reply = b""
        while chunk := tls.recv(4096):
            reply += chunk
        return reply


def test_a_closed_connection_is_freed_by_reference_counting(tmp_path: Path) -> None:
    """With the cyclic GC off, nothing of a finished connection stays alive: each one's
    OpenSSL state would otherwise wait for a full collection (the server's RSS grew)."""
    cas = make_ca_pair("Root", "Issuing", now=dt.datetime.now(dt.UTC))
    (tmp_path / "server.pem").write_bytes(cas.issuing.public_bytes(Encoding.PEM))
    (tmp_path / "server.key").write_bytes(
        cas.issuing_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    )
    (tmp_path / "cas.pem").write_bytes(cas.root.public_bytes(Encoding.PEM))
    context = server_context(
        cert_chain=tmp_path / "server.pem",
        key=tmp_path / "server.key",
        client_cas=tmp_path / "cas.pem",
    )
    layers: list[weakref.ref[TlsServerProtocol]] = []
    inners: list[weakref.ref[asyncio.Protocol]] = []

    def inner() -> asyncio.Protocol:
        protocol = _UpperOnce()
        inners.append(weakref.ref(protocol))
        return protocol

    def layer() -> TlsServerProtocol:
        protocol = TlsServerProtocol(context, inner)
        layers.append(weakref.ref(protocol))
        return protocol

    async def serve_three() -> list[bytes]:
        server = await asyncio.get_running_loop().create_server(layer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        replies = [await asyncio.to_thread(_exchange, port, b"ping %d" % i) for i in range(3)]
        server.close()
        await server.wait_closed()
        return replies

    gc.collect()
    gc.disable()
    try:
        replies = asyncio.run(serve_three())
        alive = [r for r in layers + inners if r() is not None]
    finally:
        gc.enable()
    assert replies == [b"PING 0", b"PING 1", b"PING 2"]
    assert len(layers) == len(inners) == 3
    assert alive == []
