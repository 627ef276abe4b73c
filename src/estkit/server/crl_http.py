"""CRLs over plain HTTP, and keeping them fresh.

CRL distribution points are plain HTTP by convention (RFC 5280 4.2.1.13: a
relying party must not need TLS, which may itself need the CRL). The files
are static, so a small threaded stdlib server in the supervising process is
enough. A refresher thread checks every second and republishes a CRL that a
revocation on any node made stale (the database's revision moved), or that is
past half its validity: every node serves the current CRL within about a
second of a revocation made anywhere.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from estkit.ca.crl import CrlPublisher
from estkit.store.errors import Unavailable

log = logging.getLogger(__name__)

_CRL_PATH = re.compile(r"^/crl/([A-Za-z0-9_-]{1,64})\.crl$")
CRL_MEDIA_TYPE = "application/pkix-crl"


def crl_file(directory: Path, request_path: str) -> Path | None:
    """The CRL file a request path names, if it names one (no traversal possible)."""
    match = _CRL_PATH.match(request_path.split("?", 1)[0])
    return directory / f"{match.group(1)}.crl" if match else None


def _handler(directory: Path) -> type[BaseHTTPRequestHandler]:
    class CrlHandler(BaseHTTPRequestHandler):
        server_version = "estkit"
        sys_version = ""

        def do_GET(self) -> None:
            path = crl_file(directory, self.path)
            try:
                body = path.read_bytes() if path is not None else None
            except OSError:
                body = None
            if body is None:
                self._send(404, b"no such CRL\n", "text/plain; charset=utf-8")
            else:
                self._send(200, body, CRL_MEDIA_TYPE)

        def _send(self, status: int, body: bytes, media_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", media_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            log.debug("crl http: " + format, *args)

    return CrlHandler


def start_crl_listener(directory: Path, host: str, port: int) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, port), _handler(directory))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="crl-http", daemon=True).start()
    return server


def start_crl_refresher(
    publisher: CrlPublisher,
    clock: Callable[[], dt.datetime],
    *,
    stop: threading.Event,
    interval: float = 1.0,
) -> threading.Thread:
    """Check every ``interval`` seconds and republish what is stale or due."""

    def run() -> None:
        down = False  # one log line per outage, not one per second
        while not stop.wait(interval):
            try:
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
