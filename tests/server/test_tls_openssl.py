"""The TLS layer (server/tls_openssl.py) in one process: how connections end, and what
each one leaves behind."""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import socket
import ssl
import threading
import weakref
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from OpenSSL import SSL

from estkit.server import tls_openssl
from estkit.server.tls_openssl import TlsServerProtocol, server_context
from testpki import make_ca_pair


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory) -> SSL.Context:
    d = tmp_path_factory.mktemp("tls")
    cas = make_ca_pair("Root", "Issuing", now=dt.datetime.now(dt.UTC))
    (d / "server.pem").write_bytes(cas.issuing.public_bytes(Encoding.PEM))
    (d / "server.key").write_bytes(
        cas.issuing_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    )
    (d / "cas.pem").write_bytes(cas.root.public_bytes(Encoding.PEM))
    return server_context(
        cert_chain=d / "server.pem", key=d / "server.key", client_cas=d / "cas.pem"
    )


class _Answer(asyncio.Protocol):
    """Answers the first bytes with ``reply(data)``, then closes: one request per connection.
    ``lost`` is set when the connection is gone."""

    def __init__(self, reply: Callable[[bytes], bytes], lost: threading.Event) -> None:
        self.reply = reply
        self.lost = lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport  # the link every protocol holds back to its transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(self.reply(data))
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set()


def _client() -> ssl.SSLContext:
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    return client


def _exchange(port: int, payload: bytes) -> bytes:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        _client().wrap_socket(raw) as tls,
    ):
        tls.sendall(payload)
        reply = b""
        while chunk := tls.recv(4096):
            reply += chunk
        return reply


def _serve(
    context: SSL.Context, inner: Callable[[], asyncio.Protocol], client: Callable[[int], object]
) -> object:
    """Run the layer on a loopback port around ``inner``; return ``client(port)``'s result
    (it runs in a thread, so the server keeps serving)."""

    async def main() -> object:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: TlsServerProtocol(context, inner), "127.0.0.1", 0)
        try:
            return await asyncio.to_thread(client, server.sockets[0].getsockname()[1])
        finally:
            server.close()
            await server.wait_closed()

    return asyncio.run(main())


def test_a_closed_connection_is_freed_by_reference_counting(context: SSL.Context) -> None:
    """With the cyclic GC off, nothing of a finished connection stays alive: each one's
    OpenSSL state would otherwise wait for a full collection (the server's RSS grew)."""
    layers: list[weakref.ref[TlsServerProtocol]] = []
    inners: list[weakref.ref[asyncio.Protocol]] = []

    def inner() -> asyncio.Protocol:
        protocol = _Answer(bytes.upper, threading.Event())
        inners.append(weakref.ref(protocol))
        return protocol

    async def serve_three() -> list[bytes]:
        def layer() -> TlsServerProtocol:
            protocol = TlsServerProtocol(context, inner)
            layers.append(weakref.ref(protocol))
            return protocol

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


def test_the_clients_close_notify_is_answered(context: SSL.Context) -> None:
    """RFC 8446 6.1: a close_notify gets one back before the connection closes
    (``unwrap`` raises if the server just drops TCP)."""

    def client(port: int) -> bool:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            _client().wrap_socket(raw) as tls,
        ):
            tls.do_handshake()
            plain = tls.unwrap()  # sends close_notify, waits for the server's
            return plain.recv(1) == b""

    assert _serve(context, lambda: _Answer(bytes.upper, threading.Event()), client) is True


def test_a_peer_that_stops_reading_is_cut_off_after_the_close_timeout(
    context: SSL.Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server closes after a reply bigger than the socket buffers; the client never
    reads it. The connection must not stay open for good holding the rest."""
    monkeypatch.setattr(tls_openssl, "CLOSE_TIMEOUT", 0.5)
    lost = threading.Event()

    def client(port: int) -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            with _client().wrap_socket(raw) as tls:
                tls.sendall(b"send me a lot")
                return lost.wait(10)  # bounded; without the timeout it never comes

    cut = _serve(context, lambda: _Answer(lambda _: b"x" * 32_000_000, lost), client)
    assert cut is True, "the server kept the connection open"
