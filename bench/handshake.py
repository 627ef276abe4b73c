"""The TLS handshake floor: server-side CPU of one handshake, stdlib ``ssl`` and estkit's own.

    python -m bench.handshake [--count N]

Client and server run in one thread over memory BIOs, no sockets and no
event loop, so what is timed (``time.thread_time`` around the server's calls
only) is OpenSSL's work plus the thin ``ssl`` wrapper: the least a Python
server on this OpenSSL can spend per new connection. Variants: TLS 1.3 and
1.2, with and without a client certificate, with OpenSSL's default two
TLS 1.3 session tickets or none; then the server's own TLS context
(``estkit.server.tls_openssl``: pyOpenSSL on the OpenSSL that the
``cryptography`` wheel bundles; the client stays stdlib ``ssl``).
"""

from __future__ import annotations

import argparse
import contextlib
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import fleet, loadgen

ROUNDS = 5


def _pump(src: ssl.MemoryBIO, dst: ssl.MemoryBIO) -> None:
    data = src.read()
    if data:
        dst.write(data)


def handshake_cpu(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, count: int
) -> tuple[float, float]:
    """Median over rounds of (server CPU ms, client CPU ms) per handshake."""
    server_ms, client_ms = [], []
    for _ in range(ROUNDS):
        server_cpu = client_cpu = 0.0
        for _ in range(count):
            s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
            server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
            client = client_ctx.wrap_bio(c_in, c_out, server_hostname=loadgen.SERVER_NAME)
            done = {"server": False, "client": False}
            for _ in range(10):
                t = time.thread_time()
                try:
                    client.do_handshake()
                    done["client"] = True
                except ssl.SSLWantReadError:
                    pass
                client_cpu += time.thread_time() - t
                _pump(c_out, s_in)
                t = time.thread_time()
                try:
                    # With TLS 1.3 this also writes the session tickets.
                    server.do_handshake()
                    done["server"] = True
                except ssl.SSLWantReadError:
                    pass
                server_cpu += time.thread_time() - t
                _pump(s_out, c_in)
                if all(done.values()):
                    break
            else:
                raise RuntimeError("handshake did not complete")
            # The client reads what followed (tickets), as a real client does.
            with contextlib.suppress(ssl.SSLWantReadError):
                client.read(1)
        server_ms.append(server_cpu * 1000 / count)
        client_ms.append(client_cpu * 1000 / count)
    return statistics.median(server_ms), statistics.median(client_ms)


def pyopenssl_handshake_cpu(data_dir: Path, device: loadgen.Device, count: int) -> float:
    """Server CPU ms per mTLS TLS 1.3 handshake with the server's own TLS context
    (``estkit.server.tls_openssl``: pyOpenSSL on the ``cryptography`` wheel's OpenSSL).

    That context sets ``OP_NO_TICKET`` with the session cache off: OpenSSL then
    still sends its two (stateful, never resumable) tickets, as pyOpenSSL has no
    call for ``SSL_CTX_set_num_tickets``.
    """
    from OpenSSL import SSL

    from estkit.server.config import load_config
    from estkit.server.tls import server_tls_context

    ctx = server_tls_context(load_config(data_dir))  # as `estkit server run` builds it
    _, client_ctx = contexts(data_dir, device, tls12=False, tickets=2)
    rounds = []
    for _ in range(ROUNDS):
        server_cpu = 0.0
        for _ in range(count):
            server = SSL.Connection(ctx, None)
            server.set_accept_state()
            c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
            client = client_ctx.wrap_bio(c_in, c_out, server_hostname=loadgen.SERVER_NAME)
            done = {"server": False, "client": False}
            for _ in range(10):
                with contextlib.suppress(ssl.SSLWantReadError):
                    client.do_handshake()
                    done["client"] = True
                data = c_out.read()
                t = time.thread_time()
                if data:
                    server.bio_write(data)
                with contextlib.suppress(SSL.WantReadError):
                    server.do_handshake()
                    done["server"] = True
                out = b""
                with contextlib.suppress(SSL.WantReadError):
                    while chunk := server.bio_read(65536):
                        out += chunk
                server_cpu += time.thread_time() - t
                if out:
                    c_in.write(out)
                if all(done.values()):
                    break
            else:
                raise RuntimeError("pyOpenSSL handshake did not complete")
        rounds.append(server_cpu * 1000 / count)
    return statistics.median(rounds)


def contexts(
    data_dir: Path, device: loadgen.Device | None, *, tls12: bool, tickets: int
) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """The stdlib reference: a server context on the ``ssl`` module (the system OpenSSL)
    with estkit's TLS settings; the client as the load generator makes it."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1_2
    server.load_cert_chain(data_dir / "tls" / "server.pem", data_dir / "tls" / "server.key")
    server.verify_mode = ssl.CERT_OPTIONAL
    server.load_verify_locations(data_dir / "run" / "client-cas.pem")
    server.verify_flags |= 0x200000  # X509_V_FLAG_NO_CHECK_TIME, as server/tls_openssl.py
    server.num_tickets = tickets
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(data_dir / "ca" / "root.pem")
    if tls12:
        client.maximum_version = ssl.TLSVersion.TLSv1_2
    if device is not None:
        client.load_cert_chain(device.cert_file, device.key_file)
    return server, client


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.handshake", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--count", type=int, default=300, help="handshakes per round")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="estkit-handshake-") as tmp:
        work = Path(tmp)
        data_dir = work / "server"
        fleet.init_server(data_dir, port=fleet.free_port(), crl_port=fleet.free_port())
        from estkit.server.app import client_ca_bundle
        from estkit.server.config import load_config

        client_ca_bundle(load_config(data_dir))
        device = fleet.make_pool(data_dir, work / "devices", 1).bootstrap[0]
        print(f"{ssl.OPENSSL_VERSION}; server ECDSA P-256; median of {ROUNDS} x {args.count}")
        print(f"{'variant':<44}{'server ms':>10}{'client ms':>10}")
        for tls12 in (False, True):
            for mtls in (True, False):
                for tickets in (2, 0) if not tls12 else (2,):
                    server, client = contexts(
                        data_dir, device if mtls else None, tls12=tls12, tickets=tickets
                    )
                    s_ms, c_ms = handshake_cpu(server, client, args.count)
                    name = (
                        f"TLS {'1.2' if tls12 else '1.3'}, "
                        f"{'client certificate' if mtls else 'no client certificate'}"
                        + ("" if tls12 else f", {tickets} tickets")
                    )
                    print(f"{name:<44}{s_ms:>10.3f}{c_ms:>10.3f}", flush=True)
        from OpenSSL import SSL

        version = SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()
        s_ms = pyopenssl_handshake_cpu(data_dir, device, args.count)
        name = f"estkit server (OpenSSL {version.split()[1]}): TLS 1.3, client cert"
        print(f"{name:<44}{s_ms:>10.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
