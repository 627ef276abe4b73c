"""TLS for the server on the OpenSSL that the ``cryptography`` wheel bundles (via pyOpenSSL).

Python's ``ssl`` module links the system OpenSSL (3.0 on Debian 12), whose
mutual-TLS handshake costs ≈ 0.9 ms of CPU here; the OpenSSL 4 inside the
``cryptography`` wheel does the same handshake in ≈ 0.7 ms, and a protocol
written for one request-response exchange does less per connection than
asyncio's general SSL transport (bench/README.md has the figures).

``TlsServerProtocol`` sits between the socket and uvicorn's HTTP protocol:
it runs the handshake over memory BIOs, then hands the HTTP protocol a
transport (``TlsTransport``) that encrypts what it writes. The peer
certificate is offered through ``get_extra_info("ssl_object")`` in the shape
``server/tls.py`` reads from the stdlib ``ssl`` object. Connections from one
address beyond ``limits.AddressSlots``' limit are closed before their handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from OpenSSL import SSL, crypto

from estkit.pki.binding import (
    EXPORTER_LABEL,
    EXPORTER_LENGTH,
    TLS_EXPORTER,
    TLS_UNIQUE,
    ChannelBinding,
    binding_kind,
)
from estkit.server.limits import AddressSlots

# OpenSSL's X509_V_FLAG_NO_CHECK_TIME: the handshake accepts an expired client
# certificate so that the application can refuse it with a 403 and a reason
# (and audit it) instead of a bare TLS alert. Signatures are still checked.
_X509_V_FLAG_NO_CHECK_TIME = 0x200000
_HANDSHAKE_TIMEOUT = 30.0
# How long a closing connection may take to hand its last bytes to a peer that
# does not read them (asyncio's SSL transport waits as long for its shutdown).
CLOSE_TIMEOUT = 30.0
_READ_SIZE = 65536


def server_context(*, cert_chain: Path, key: Path, client_cas: Path) -> SSL.Context:
    """TLS 1.2-1.3; a client certificate of ``client_cas`` is optional (required per route)."""
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.use_certificate_chain_file(str(cert_chain))
    ctx.use_privatekey_file(str(key))
    ctx.check_privatekey()
    ctx.load_verify_locations(str(client_cas))
    ctx.load_client_ca(bytes(client_cas))  # the CA names sent in CertificateRequest
    ctx.set_verify(SSL.VERIFY_PEER, None)
    ctx.get_cert_store().set_flags(_X509_V_FLAG_NO_CHECK_TIME)  # type: ignore[union-attr]
    # No resumption: devices renew days apart. OP_NO_TICKET makes TLS 1.3 tickets
    # stateful (no encrypted session holding the client certificate to build), and
    # with the cache off none can be resumed. OpenSSL still sends two: pyOpenSSL
    # cannot set SSL_CTX_set_num_tickets to 0.
    ctx.set_options(SSL.OP_NO_TICKET | SSL.OP_NO_RENEGOTIATION)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    return ctx


class _PeerInfo:
    """What ``server/tls.py`` reads from an ``ssl.SSLObject``, from a pyOpenSSL connection."""

    def __init__(self, conn: SSL.Connection) -> None:
        # Not get_peer_certificate(as_cryptography=True): in pyOpenSSL 26.4 that path
        # leaks the X509 it converts (the soak in bench/README.md found it).
        cert = conn.get_peer_certificate()
        self._der = None if cert is None else crypto.dump_certificate(crypto.FILETYPE_ASN1, cert)
        self._cipher = conn.get_cipher_name()
        self._version = conn.get_protocol_version_name()
        self.channel_binding = _channel_binding(conn, self._version)

    def getpeercert(self, binary_form: bool = False) -> bytes | None:
        assert binary_form
        return self._der

    def cipher(self) -> tuple[str, str, int] | None:
        return (self._cipher, self._version, 0) if self._cipher else None

    def version(self) -> str:
        return self._version


def _channel_binding(conn: SSL.Connection, version: str) -> ChannelBinding | None:
    """This connection's channel binding (RFC 7030 3.5): ``tls-unique`` on TLS 1.2, the
    first Finished message (RFC 5929), which in a full handshake is the client's: the
    server's ``get_peer_finished`` (``server_context`` allows no resumption, whose
    abbreviated handshake would start with the server's); ``tls-exporter`` on TLS 1.3
    (RFC 9266)."""
    kind = binding_kind(version)
    data: bytes | None = None
    if kind == TLS_UNIQUE:
        # Correct only without resumption (then the first Finished is the server's), which
        # server_context turns off; pyOpenSSL cannot tell whether a session was reused.
        data = conn.get_peer_finished()
    elif kind == TLS_EXPORTER:
        data = conn.export_keying_material(EXPORTER_LABEL, EXPORTER_LENGTH, None)
    return ChannelBinding(kind, data) if kind is not None and data else None


class TlsTransport(asyncio.Transport):
    """The HTTP protocol's view of one TLS connection: plaintext in, records out."""

    def __init__(self, outer: TlsServerProtocol, raw: asyncio.Transport, peer: _PeerInfo) -> None:
        super().__init__()
        self._outer = outer
        self._raw = raw
        self._peer = peer
        self._closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._peer
        if name == "sslcontext":
            return self._outer.context
        return self._raw.get_extra_info(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not data:
            return
        self._outer.send(bytes(data))

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self._outer.shutdown()

    def abort(self) -> None:
        self._closing = True
        self._outer.abort()  # also stops delivering what is still buffered

    def is_closing(self) -> bool:
        return self._closing or self._raw.is_closing()

    def pause_reading(self) -> None:
        self._raw.pause_reading()

    def resume_reading(self) -> None:
        self._raw.resume_reading()

    def is_reading(self) -> bool:
        return self._raw.is_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._raw.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._raw.get_write_buffer_size()

    def can_write_eof(self) -> bool:
        return False

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._outer.inner = protocol  # type: ignore[assignment]

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._outer.inner is not None
        return self._outer.inner


class TlsServerProtocol(asyncio.Protocol):
    """Handshake, then relay plaintext between the socket and ``inner`` (uvicorn's protocol)."""

    def __init__(
        self,
        context: SSL.Context,
        inner_factory: Callable[[], asyncio.Protocol],
        *,
        slots: AddressSlots | None = None,
    ) -> None:
        """``slots``: open connections per source address; one over its limit is closed
        before its handshake costs anything."""
        self.context = context
        self._inner_factory = inner_factory
        self.inner: asyncio.Protocol | None = None
        self._raw: asyncio.Transport | None = None
        self._conn: SSL.Connection | None = None
        self._timeout: asyncio.TimerHandle | None = None
        self._slots = slots
        self._address: str | None = None  # counted in ``slots`` until connection_lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; not always an asyncio.Transport subclass (uvloop's is not).
        raw = cast(asyncio.Transport, transport)
        if self._slots is not None:
            peer = raw.get_extra_info("peername")
            address = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
            if not self._slots.acquire(address):
                raw.abort()  # closed at once: no TLS state, no handshake
                return
            self._address = address
        self._raw = raw
        # Set here for every worker count: uvicorn's shared-socket path (workers >= 2)
        # skips it (uvicorn #3149), and each response then waited ~40 ms for the
        # client's delayed ACK.
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._conn = SSL.Connection(self.context, None)
        self._conn.set_accept_state()
        self._timeout = asyncio.get_running_loop().call_later(_HANDSHAKE_TIMEOUT, self._raw.abort)

    def data_received(self, data: bytes) -> None:
        conn = self._conn
        if conn is None:
            return
        conn.bio_write(data)
        if self.inner is None and not self._handshake(conn):
            return
        self._receive(conn)

    def _handshake(self, conn: SSL.Connection) -> bool:
        assert self._raw is not None
        try:
            conn.do_handshake()
        except SSL.WantReadError:
            self._flush()
            return False
        except SSL.Error:
            self._flush()  # the alert, so the client learns why
            self._close_raw()
            return False
        if self._timeout is not None:
            self._timeout.cancel()
            self._timeout = None
        self._flush()
        self.inner = self._inner_factory()
        self.inner.connection_made(TlsTransport(self, self._raw, _PeerInfo(conn)))
        return True

    def _receive(self, conn: SSL.Connection) -> None:
        while self.inner is not None and self._conn is not None:
            try:
                chunk = conn.recv(_READ_SIZE)
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:  # the peer's close_notify: answer it (RFC 8446 6.1)
                self.inner.eof_received()
                self.shutdown()
                return
            except SSL.Error:
                self.abort()
                return
            self.inner.data_received(chunk)
        self._flush()

    def send(self, data: bytes) -> None:
        if self._conn is None:
            return
        try:
            self._conn.sendall(data)
        except SSL.Error:
            self.abort()
            return
        self._flush()

    def shutdown(self) -> None:
        """Send close_notify and close, without waiting for the peer's (RFC 8446 6.1 allows it)."""
        if self._conn is not None:
            with contextlib.suppress(SSL.Error):
                self._conn.shutdown()
            self._flush()
        self._close_raw()

    def _flush(self) -> None:
        conn, raw = self._conn, self._raw
        if conn is None or raw is None:
            return
        while True:
            try:
                out = conn.bio_read(_READ_SIZE)
            except SSL.WantReadError:
                return
            raw.write(out)
            if len(out) < _READ_SIZE:  # a memory BIO hands over all it holds, up to the size
                return

    def _close_raw(self) -> None:
        """Close once what is queued is sent; a peer that stops reading gets
        ``CLOSE_TIMEOUT`` seconds for it, then the connection is cut."""
        self._conn = None
        raw = self._raw
        if raw is None:
            return
        raw.close()
        if raw.get_write_buffer_size() and self._timeout is None:
            self._timeout = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, raw.abort)

    def abort(self) -> None:
        self._conn = None
        if self._raw is not None:
            self._raw.abort()

    def eof_received(self) -> bool | None:
        if self.inner is not None:
            self.inner.eof_received()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timeout is not None:
            self._timeout.cancel()
        if self._address is not None and self._slots is not None:
            self._slots.release(self._address)
            self._address = None
        # Drop every link of the cycle this layer closes (uvicorn's protocol -> our
        # transport -> this protocol -> uvicorn's protocol), as asyncio's SSL protocol
        # does: left to the cyclic GC, each connection's garbage waited for a full
        # collection and the server's RSS grew 9 % over 40,000 handshakes (1 % without).
        self._conn = None
        self._timeout = None
        self._raw = None
        inner, self.inner = self.inner, None
        if inner is not None:
            inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()
