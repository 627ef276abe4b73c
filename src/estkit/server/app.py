"""The ASGI application and how it is served (uvicorn with the TLS extension shim).

With several workers uvicorn imports ``app_from_env`` in each worker process;
the data directory travels in ``ESTKIT_DATA_DIR``.
"""

from __future__ import annotations

import datetime as dt
import os
import ssl
import threading
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from estkit.pki.certs import certs_to_pem
from estkit.server.config import ServerConfig, load_config
from estkit.server.crl_http import start_crl_listener, start_crl_refresher
from estkit.server.errors import HANDLERS
from estkit.server.est import EstRoutes
from estkit.server.wiring import build_authority, crl_publisher, open_store

DATA_DIR_ENV = "ESTKIT_DATA_DIR"
# OpenSSL's X509_V_FLAG_NO_CHECK_TIME: the handshake accepts an expired client
# certificate so that the application can refuse it with a 403 and a reason
# (and audit it) instead of a bare TLS alert. Signatures are still checked.
_X509_V_FLAG_NO_CHECK_TIME = 0x200000


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def create_app(config: ServerConfig) -> FastAPI:
    store = open_store(config)
    authority = build_authority(config, store)
    est = EstRoutes(
        authority,
        default_label=config.default_label,
        max_request_bytes=config.max_request_bytes,
        clock=utcnow,
    )
    app = FastAPI(
        title="estkit",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        routes=est.routes(),
        exception_handlers=HANDLERS,  # type: ignore[arg-type]
    )
    app.state.authority = authority
    return app


def app_from_env() -> FastAPI:
    return create_app(load_config(Path(os.environ[DATA_DIR_ENV])))


def client_ca_bundle(config: ServerConfig) -> Path:
    """Write the CAs whose certificates may authenticate clients, for the TLS layer."""
    from estkit.pki.certs import load_pem_certificates

    certs = [load_pem_certificates(c.cert.read_bytes())[0] for c in config.cas.values()]
    path = config.data_dir / "run" / "client-cas.pem"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(certs_to_pem(certs))
    return path


def ssl_context(uv_config: Any, default_factory: Any) -> ssl.SSLContext:
    """TLS 1.2 and 1.3; a client certificate is optional here and required per route."""
    ctx: ssl.SSLContext = default_factory()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_flags |= _X509_V_FLAG_NO_CHECK_TIME
    return ctx


def serve(config: ServerConfig, *, host: str, port: int, workers: int) -> None:
    import uvicorn

    from estkit.server.tls import TlsExtensionProtocol

    # Fail before binding if the config, keys or schema are wrong.
    authority = create_app(config).state.authority
    publisher = crl_publisher(config, authority)
    publisher.refresh_due(now=utcnow())
    if config.crl.http_port:
        start_crl_listener(config.crl.directory, config.crl.http_host, config.crl.http_port)
    start_crl_refresher(publisher, utcnow, stop=threading.Event())
    os.environ[DATA_DIR_ENV] = str(config.data_dir)
    uvicorn.run(
        "estkit.server.app:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        http=TlsExtensionProtocol,
        ssl_certfile=str(config.tls_cert),
        ssl_keyfile=str(config.tls_key),
        ssl_cert_reqs=ssl.CERT_OPTIONAL,
        ssl_ca_certs=str(client_ca_bundle(config)),
        ssl_context_factory=ssl_context,
        server_header=False,
        log_level="info",
        lifespan="off",
    )
