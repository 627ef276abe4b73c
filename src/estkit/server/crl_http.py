"""CRLs and OCSP over plain HTTP, and keeping them fresh.

CRL distribution points are plain HTTP by convention (RFC 5280 4.2.1.13: a
relying party must not need TLS, which may itself need the CRL), and so is OCSP
(RFC 6960 appendix A; ``server/ocsp_http.py``, at ``/ocsp``). The files are
static and OCSP answers come from a cache, so a small threaded stdlib server in
the supervising process is enough: HTTP/1.1 with keep-alive, at most
``MAX_CONNECTIONS`` connections (``MAX_CONNECTIONS_PER_ADDRESS`` from one
source), each closed after ``IDLE_TIMEOUT`` seconds without a byte. A refresher
thread checks every second and republishes a CRL that a revocation on any node
made stale (the database's revision moved), or that is past half its validity:
every node serves the current CRL within about a second of a revocation made
anywhere; the same round gives the OCSP responder the revisions.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from estkit.ca.crl import CrlPublisher
from estkit.ca.limits import source_key
from estkit.ca.ocsp import OcspResponder
from estkit.pki.ocsp import OCSP_RESPONSE
from estkit.server.limits import HEAD_TIMEOUT, MAX_CONNECTIONS_PER_ADDRESS
from estkit.server.ocsp_http import BODY_TIMEOUT, MAX_REQUEST_BYTES, OCSP_PATH, OcspEndpoint
from estkit.store.errors import Unavailable

log = logging.getLogger(__name__)

_CRL_PATH = re.compile(r"^/crl/([A-Za-z0-9_-]{1,64})\.crl$")
CRL_MEDIA_TYPE = "application/pkix-crl"
# Connections served at once (a thread each), and the seconds one may stay silent.
MAX_CONNECTIONS = 256
IDLE_TIMEOUT = HEAD_TIMEOUT


def crl_file(directory: Path, request_path: str) -> Path | None:
    """The CRL file a request path names, if it names one (no traversal possible)."""
    match = _CRL_PATH.match(request_path.split("?", 1)[0])
    return directory / f"{match.group(1)}.crl" if match else None


def _handler(directory: Path, ocsp: OcspEndpoint | None) -> type[BaseHTTPRequestHandler]:
    class CrlHandler(BaseHTTPRequestHandler):
        server_version = "estkit"
        sys_version = ""
        protocol_version = "HTTP/1.1"  # keep-alive: OCSP clients ask again and again
        timeout = IDLE_TIMEOUT
        # Head and body are two writes: with Nagle the body would wait for the client's
        # delayed ACK of the head (40 ms per response on Linux).
        disable_nagle_algorithm = True

        def do_GET(self) -> None:
            if ocsp is not None and (
                self.path == OCSP_PATH or self.path.startswith(f"{OCSP_PATH}/")
            ):
                encoded = self.path[len(OCSP_PATH) + 1 :]  # nothing: malformedRequest
                self._send(200, ocsp.answer_get(encoded, source=self._source()), OCSP_RESPONSE)
                return
            path = crl_file(directory, self.path)
            try:
                body = path.read_bytes() if path is not None else None
            except OSError:
                body = None
            if body is None:
                self._send(404, b"no such CRL\n", "text/plain; charset=utf-8")
            else:
                self._send(200, body, CRL_MEDIA_TYPE)

        def do_POST(self) -> None:
            if ocsp is None or self.path.split("?", 1)[0].rstrip("/") != OCSP_PATH:
                self._refuse(404, "nothing to POST to here")
                return
            body = self._body()
            if body is not None:
                self._send(200, ocsp.answer(body, source=self._source()), OCSP_RESPONSE)

        def _body(self) -> bytes | None:
            """The request body, whole within ``BODY_TIMEOUT``; None when refused."""
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                self._refuse(411, "send the OCSP request with a Content-Length")
                return None
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                self._refuse(411, "send the OCSP request with a Content-Length")
                return None
            if not 0 <= length <= MAX_REQUEST_BYTES:
                self._refuse(413, f"an OCSP request has at most {MAX_REQUEST_BYTES} bytes")
                return None
            deadline = time.monotonic() + BODY_TIMEOUT
            chunks: list[bytes] = []
            left = length
            try:
                while left:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError
                    self.connection.settimeout(remaining)
                    chunk = self.rfile.read1(left)
                    if not chunk:
                        raise ConnectionError("closed within the body")
                    chunks.append(chunk)
                    left -= len(chunk)
            except OSError:
                self.close_connection = True
                return None
            finally:
                self.connection.settimeout(self.timeout)
            return b"".join(chunks)

        def _source(self) -> str:
            return str(self.client_address[0])

        def _refuse(self, status: int, reason: str) -> None:
            """A one-line text answer; the connection closes (a body may be left unread)."""
            self.close_connection = True
            self._send(status, f"{reason}\n".encode(), "text/plain; charset=utf-8", close=True)

        def _send(self, status: int, body: bytes, media_type: str, *, close: bool = False) -> None:
            self.send_response(status)
            self.send_header("Content-Type", media_type)
            self.send_header("Content-Length", str(len(body)))
            if close:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            log.debug("crl http: " + format, *args)

    return CrlHandler


class _Listener(ThreadingHTTPServer):
    """A thread per connection, at most ``MAX_CONNECTIONS`` of them and
    ``MAX_CONNECTIONS_PER_ADDRESS`` from one source; beyond, a connection is closed
    unanswered."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self._slots = threading.Lock()
        self._open: dict[str, int] = {}
        self._total = 0

    def process_request(self, request: Any, client_address: Any) -> None:
        source = source_key(str(client_address[0]))
        with self._slots:
            full = (
                self._total >= MAX_CONNECTIONS
                or self._open.get(source, 0) >= MAX_CONNECTIONS_PER_ADDRESS
            )
            if not full:
                self._total += 1
                self._open[source] = self._open.get(source, 0) + 1
        if full:
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release(source)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(source_key(str(client_address[0])))

    def _release(self, source: str) -> None:
        with self._slots:
            self._total -= 1
            count = self._open.pop(source, 1) - 1
            if count > 0:
                self._open[source] = count

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that goes away mid-answer; a log line, not a traceback on stderr.
        log.debug("crl http: connection from %s ended in error", client_address, exc_info=True)


def start_crl_listener(
    directory: Path, host: str, port: int, *, ocsp: OcspEndpoint | None = None
) -> ThreadingHTTPServer:
    """Serve ``directory``'s CRLs at ``/crl/<ca>.crl`` and, with ``ocsp``, OCSP at
    ``/ocsp`` on ``host:port`` from daemon threads."""
    server = _Listener((host, port), _handler(directory, ocsp))
    threading.Thread(target=server.serve_forever, name="crl-http", daemon=True).start()
    return server


def start_crl_refresher(
    publisher: CrlPublisher,
    clock: Callable[[], dt.datetime],
    *,
    stop: threading.Event,
    interval: float = 1.0,
    ocsp: OcspResponder | None = None,
) -> threading.Thread:
    """Check every ``interval`` seconds and republish what is stale or due; give ``ocsp``
    the database's revocation revisions first."""

    def run() -> None:
        down = False  # one log line per outage, not one per second
        while not stop.wait(interval):
            try:
                if ocsp is not None:
                    ocsp.poll()
                due = publisher.refresh_due(now=clock())
            except Unavailable as exc:
                if not down:
                    log.warning("CRL refresh: database unavailable (%s); retrying", exc)
                down = True
                continue
            except Exception:  # keep refreshing; the next round may succeed
                log.exception("CRL refresh failed")
                continue
            if down:
                log.info("CRL refresh: database reachable again")
            down = False
            if due:
                log.info("republished CRLs: %s", ", ".join(due))

    thread = threading.Thread(target=run, name="crl-refresh", daemon=True)
    thread.start()
    return thread
