"""The TLS layer (server/tls_openssl.py) in one process: how connections end, and what
each one leaves behind."""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import pytest
import uvicorn
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from OpenSSL import SSL
from uvicorn.server import ServerState

from estkit.server import tls_openssl
from estkit.server.limits import AddressSlots, ConnectionLimits
from estkit.server.tls import https_protocol
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


# -- limits: connections per address, and the HTTP protocol's head and read timeouts -------


def test_connections_over_the_per_address_cap_are_closed_before_the_handshake(
    context: SSL.Context,
) -> None:
    slots = AddressSlots(2)

    def client(port: int) -> tuple[bool, bool, int]:
        held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
        try:
            try:
                _exchange(port, b"over the cap")
                refused = False
            except (ssl.SSLError, OSError):
                refused = True
        finally:
            for sock in held:
                sock.close()
        for _ in range(100):  # bounded: until the server has seen both closes
            if slots.open("127.0.0.1") == 0:
                break
            time.sleep(0.02)
        served = _exchange(port, b"again") == b"AGAIN"
        for _ in range(100):  # bounded: the server counts the last close back on its loop
            if len(slots) == 0:
                break
            time.sleep(0.02)
        return refused, served, len(slots)

    async def main() -> object:
        loop = asyncio.get_running_loop()

        def layer() -> TlsServerProtocol:
            return TlsServerProtocol(
                context, lambda: _Answer(bytes.upper, threading.Event()), slots=slots
            )

        server = await loop.create_server(layer, "127.0.0.1", 0)
        try:
            return await asyncio.to_thread(client, server.sockets[0].getsockname()[1])
        finally:
            server.close()
            await server.wait_closed()

    refused, served, left = asyncio.run(main())  # type: ignore[misc]
    assert refused, "a third connection from one address was served"
    assert served
    assert left == 0  # every connection was counted back


async def _ok(scope: Any, receive: Any, send: Any) -> None:
    """An ASGI app that reads the whole body, then answers 200."""
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False) and message["type"] == "http.request"
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"3")]})  # fmt: skip
    await send({"type": "http.response.body", "body": b"ok\n"})


def _serve_http(
    context: SSL.Context, limits: ConnectionLimits, client: Callable[[int], object]
) -> object:
    """``https_protocol`` (TLS around uvicorn's protocol with the limits) on a loopback port."""
    config = uvicorn.Config(app=_ok, log_level="warning", timeout_keep_alive=5)
    config.load()
    state = ServerState()

    async def main() -> object:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: https_protocol(context, config, state, {}, limits=limits), "127.0.0.1", 0
        )
        try:
            return await asyncio.to_thread(client, server.sockets[0].getsockname()[1])
        finally:
            server.close()
            await server.wait_closed()

    return asyncio.run(main())


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        (b"", b"request head not received in time"),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Le", b"request head not received in time"),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789",
         b"request body not received in time"),
    ],
    ids=["fail/silent", "fail/head-unfinished", "fail/body-unfinished"],
)  # fmt: skip
def test_a_request_not_received_in_time_gets_408_and_is_closed(
    context: SSL.Context, sent: bytes, expected: bytes
) -> None:
    limits = ConnectionLimits(head_timeout=0.3, body_timeout=0.6)

    def client(port: int) -> bytes:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            _client().wrap_socket(raw) as tls,
        ):
            tls.sendall(sent)
            reply = b""
            while chunk := tls.recv(4096):  # bounded by the socket timeout
                reply += chunk
            return reply

    reply = _serve_http(context, limits, client)
    assert isinstance(reply, bytes)
    assert reply.startswith(b"HTTP/1.1 408 ") and reply.endswith(b"\r\n\r\n" + expected + b"\n")


def test_kept_alive_requests_each_get_the_head_timeout_from_their_first_byte(
    context: SSL.Context,
) -> None:
    """Two requests, the second started after longer than the head timeout: the first
    byte of each request starts its own deadline (idle time is keep-alive's)."""
    limits = ConnectionLimits(head_timeout=0.3, body_timeout=0.3)
    request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"

    def client(port: int) -> list[bytes]:
        replies = []
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            _client().wrap_socket(raw) as tls,
        ):
            for _ in range(2):
                tls.sendall(request)
                reply = b""
                while not reply.endswith(b"ok\n"):  # bounded by the socket timeout
                    reply += tls.recv(4096)
                replies.append(reply)
                time.sleep(0.6)
        return replies

    replies = _serve_http(context, limits, client)
    assert isinstance(replies, list)
    assert [r.split(b"\r\n", 1)[0] for r in replies] == [b"HTTP/1.1 200 OK"] * 2


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(11)) + b"\r\n",
        b"GET / HTTP/1.1\r\nX-Big: " + b"v" * 2000 + b"\r\n\r\n",
        b"GET / HTTP/1.1\r\nX-Big: " + b"v" * 5000,  # never finished
        b"GET / HTTP/1.1\r\n" + b"X: v\r\n" * 12,  # never finished
    ],
    ids=["fail/count", "fail/size", "fail/size-unfinished", "fail/count-unfinished"],
)
def test_a_head_over_the_limits_gets_431_and_is_closed(context: SSL.Context, head: bytes) -> None:
    limits = ConnectionLimits(max_header_bytes=1024, max_header_count=10, head_timeout=5)

    def client(port: int) -> bytes:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            _client().wrap_socket(raw) as tls,
        ):
            tls.sendall(head)
            reply = b""
            while chunk := tls.recv(4096):
                reply += chunk
            return reply

    reply = _serve_http(context, limits, client)
    assert isinstance(reply, bytes)
    assert reply.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert b"\r\nContent-Type: text/plain; charset=utf-8\r\n" in reply


def test_a_closed_http_connection_leaves_nothing_for_the_cyclic_gc(context: SSL.Context) -> None:
    """The read timer (``tls.TlsExtensionProtocol``) adds no cycle to what connection_lost
    breaks: with the cyclic GC off, each finished connection's layers are freed."""
    layers: list[weakref.ref[TlsServerProtocol]] = []
    config = uvicorn.Config(app=_ok, log_level="warning")
    config.load()
    state = ServerState()
    request = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"

    async def serve_three() -> list[bytes]:
        def layer() -> TlsServerProtocol:
            protocol = https_protocol(context, config, state, {}, slots=AddressSlots(4))
            layers.append(weakref.ref(protocol))
            return protocol

        server = await asyncio.get_running_loop().create_server(layer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        replies = [await asyncio.to_thread(_exchange, port, request) for _ in range(3)]
        for _ in range(100):  # the server side's connection_lost runs after the client's close
            if not state.connections:
                break
            await asyncio.sleep(0.01)
        server.close()
        await server.wait_closed()
        return replies

    gc.collect()
    gc.disable()
    try:
        replies = asyncio.run(serve_three())
        alive = [r for r in layers if r() is not None]
    finally:
        gc.enable()
    assert all(r.startswith(b"HTTP/1.1 200") for r in replies)
    assert len(layers) == 3
    assert alive == []
