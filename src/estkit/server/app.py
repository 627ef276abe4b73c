"""The ASGI application and how it is served: uvicorn, with our TLS layer
(``tls_openssl``) around its HTTP protocol (``tls.https_protocol``).

With several workers uvicorn imports ``app_from_env`` and ``https_from_env`` in
each worker process; the data directory travels in ``ESTKIT_DATA_DIR``.
"""

from __future__ import annotations

import datetime as dt
import errno
import functools
import logging
import logging.config
import os
import socket
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import fastapi_offline
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from OpenSSL import SSL
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, Router
from starlette.staticfiles import StaticFiles

from estkit import __version__
from estkit.ca.authority import Authority
from estkit.ca.tokens import TokenService
from estkit.pki.certs import certs_to_pem
from estkit.server.api import ApiAuthentication, api_router
from estkit.server.audit_checkpoints import start_audit_checkpoints
from estkit.server.config import DATA_DIR_ENV, ConfigError, ServerConfig, load_config
from estkit.server.crl_http import (
    CRL_MEDIA_TYPE,
    crl_file,
    start_crl_listener,
    start_crl_refresher,
)
from estkit.server.errors import HANDLERS, text_response
from estkit.server.est import EstApp, EstRoutes
from estkit.server.hubsync import hub_sender
from estkit.server.limits import (
    MAX_CONNECTIONS_PER_ADDRESS,
    AddressSlots,
    BasicCheckPool,
    basic_threads,
)
from estkit.server.logs import log_config
from estkit.server.metric_files import prepare as prepare_metric_files
from estkit.server.nodes import (
    Heartbeat,
    NameTaken,
    claim,
    heartbeat_interval,
    stale_after,
    takeover_after,
)
from estkit.server.ocsp_http import OcspEndpoint
from estkit.server.oidc import OidcVerifier, parse_oidc_config
from estkit.server.portal import (
    PORTAL_PATH,
    Portal,
    SessionSigner,
    load_or_create_key,
    oidc_sign_in,
)
from estkit.server.telemetry import Telemetry, instrument
from estkit.server.tls import (
    client_ca_path,
    https_protocol,
    server_tls_context,
)
from estkit.server.tls_openssl import TlsServerProtocol
from estkit.server.wiring import build_authority, crl_publisher, ocsp_responder, open_store
from estkit.store import Node, SqlStore

# uvicorn's default listen backlog.
BACKLOG = 2048
# uvicorn's exit status when its server did not start.
STARTUP_FAILURE = 3
# Swagger UI's files, served locally: the API page works without internet access.
SWAGGER_STATIC = Path(fastapi_offline.__file__).parent / "static"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _oidc(config: ServerConfig) -> OidcVerifier | None:
    try:
        oidc_config = parse_oidc_config(config.api.get("oidc"), config.data_dir)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return OidcVerifier(oidc_config) if oidc_config is not None else None


def create_app(config: ServerConfig) -> Telemetry:
    """EST in front (``EstApp``), the API and everything else behind it (FastAPI), each
    request seen by ``Telemetry`` (its id, metrics, access line)."""
    return _build(config)[0]


def _build(config: ServerConfig) -> tuple[Telemetry, Authority[SqlStore]]:
    store = open_store(config)
    authority = build_authority(config, store, environ=os.environ)
    threads = basic_threads(config.workers)
    est = EstRoutes(
        authority,
        default_label=config.default_label,
        max_request_bytes=config.max_request_bytes,
        clock=utcnow,
        basic_pool=BasicCheckPool(threads=threads, queue=4 * threads),
    )
    app = FastAPI(
        title="estkit",
        summary="Provisioning and operations API of the estkit CA (EST is under /.well-known/est)",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        openapi_url="/api/openapi.json",
        routes=[Route("/crl/{name}", _crl_route(config), methods=["GET"])],
        exception_handlers=HANDLERS,  # type: ignore[arg-type]
    )
    tokens = TokenService(store)
    api = api_router(
        authority=authority,
        store=store,
        config=config,
        tokens=tokens,
        clock=utcnow,
        stale_after=stale_after(_heartbeat_interval()),
    )
    app.include_router(api)
    oidc = _oidc(config)
    signer = SessionSigner(load_or_create_key(config.data_dir))
    portal = Portal(
        authority=authority,
        store=store,
        config=config,
        tokens=tokens,
        signer=signer,
        clock=utcnow,
        stale_after=stale_after(_heartbeat_interval()),
        oidc=oidc_sign_in(config, oidc, signer),
    )
    app.mount(PORTAL_PATH, Router(portal.routes()), name="portal")
    app.add_middleware(ApiAuthentication, tokens=tokens, oidc=oidc, clock=utcnow)
    app.mount("/api/static", StaticFiles(directory=SWAGGER_STATIC), name="api-static")
    app.add_route("/api/docs", _swagger_page, methods=["GET"], include_in_schema=False)
    # The API's own routes: FastAPI's app.routes holds the included router opaquely.
    routes = [*api.routes, *app.routes]
    return instrument(config, EstApp(est, app), api_routes=routes), authority


async def _swagger_page(_request: Request) -> Response:
    return get_swagger_ui_html(
        openapi_url="/api/openapi.json",
        title="estkit API",
        swagger_js_url="/api/static/swagger-ui-bundle.js",
        swagger_css_url="/api/static/swagger-ui.css",
        swagger_favicon_url="/api/static/favicon.png",
    )


def _crl_route(config: ServerConfig) -> Callable[[Request], Awaitable[Response]]:
    async def crl(request: Request) -> Response:
        path = crl_file(config.crl.directory, request.url.path)
        try:
            body = path.read_bytes() if path is not None else None
        except OSError:
            body = None
        if body is None:
            return text_response(404, "no such CRL")
        return Response(body, media_type=CRL_MEDIA_TYPE)

    return crl


def app_from_env() -> Telemetry:
    """The app of one server process (each uvicorn worker), which registers its node."""
    config = load_config(Path(os.environ[DATA_DIR_ENV]))
    app, authority = _build(config)
    start_heartbeat(config, authority.store)
    return app


def _heartbeat_interval() -> float:
    try:
        return heartbeat_interval()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _this_node(config: ServerConfig, now: dt.datetime) -> Node:
    return Node(
        name=config.node.name,
        region=config.node.region,
        public_url=config.public_url,
        started_at=now,
        last_seen=now,
        version=__version__,
    )


def _takeover(config: ServerConfig) -> dt.timedelta:
    shared = not config.database_url.startswith("sqlite")
    return takeover_after(shared=shared, interval=_heartbeat_interval())


def claim_node_name(config: ServerConfig, store: SqlStore) -> None:
    """Register this node, or a ``ConfigError`` naming ``node.name`` when another
    running node holds the name (a copied data directory, say)."""
    now = utcnow()
    try:
        claim(store, _this_node(config, now), now=now, takeover=_takeover(config))
    except NameTaken as exc:
        raise ConfigError(str(exc)) from None


def start_heartbeat(config: ServerConfig, store: SqlStore) -> threading.Event:
    """Register this node now and keep it seen from a daemon thread (ends with the
    process); setting the returned event stops it sooner."""
    stop = threading.Event()
    Heartbeat(
        store,
        _this_node(config, utcnow()),
        clock=utcnow,
        interval=_heartbeat_interval(),
        takeover=_takeover(config),
        stop=stop,
    ).start()
    return stop


def https_from_env(
    config: Any, server_state: Any, app_state: Any, _loop: Any = None
) -> TlsServerProtocol:
    """uvicorn's ``http=`` factory, called per connection in each worker process.

    Workers are spawned, not forked, so like ``app_from_env`` it finds the
    config through the environment; the TLS context is built once per worker,
    and so is its count of open connections per address (``limits.AddressSlots``).
    """
    return https_protocol(
        _worker_tls_context(), config, server_state, app_state, _loop, slots=_worker_slots()
    )


@functools.cache
def _worker_slots() -> AddressSlots:
    return AddressSlots(MAX_CONNECTIONS_PER_ADDRESS)


@functools.cache
def _worker_tls_context() -> SSL.Context:
    return server_tls_context(load_config(Path(os.environ[DATA_DIR_ENV])))


def client_ca_bundle(config: ServerConfig) -> Path:
    """Write the CAs whose certificates may authenticate clients, for the TLS layer."""
    from estkit.pki.certs import load_pem_certificates
    from estkit.server.wiring import installed_cas

    cas = installed_cas(config).values()
    certs = [load_pem_certificates(c.cert.read_bytes())[0] for c in cas]
    path = client_ca_path(config.data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(certs_to_pem(certs))
    return path


class ListenError(Exception):
    """A port cannot be listened on; the message names the address, port and setting."""


def listen(host: str, port: int, *, setting: str) -> socket.socket:
    """A listening TCP socket on ``host:port``, or ``ListenError`` naming ``setting``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    address = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise ListenError(_listen_failure(address, setting, exc)) from None
    sock.set_inheritable(True)  # handed to uvicorn's spawned workers
    return sock


def _listen_failure(address: str, setting: str, exc: OSError) -> str:
    why = exc.strerror or str(exc)
    if exc.errno == errno.EADDRINUSE:
        why = "address already in use by another process"
    return f"cannot listen on {address} ({setting}): {why}"


def config_warnings(config: ServerConfig) -> list[str]:
    """Settings that are valid but probably not what the operator wants, one line each."""
    from estkit.server.wiring import awaiting_import

    return awaiting_import(config) + [
        f"labels.{name}.base64_line_length = 0 sends one-line base64 to every client; "
        "clients that read base64 through OpenSSL (libest, `openssl base64 -d`) cannot: "
        "remove the setting to let estkit choose per client (README: Interop quirks)"
        for name, label in config.labels.items()
        if label.base64_line_length == 0
    ]


def serve(
    config: ServerConfig,
    *,
    host: str,
    port: int,
    workers: int,
    port_setting: str = "server.port",
) -> None:
    """Check everything the configuration names, then listen, then serve until stopped.

    No port is bound before the CA keys, the schema, the node name, the client-CA
    bundle and the TLS certificate and key have been checked: a broken config is
    reported as itself, not as whatever a busy port says. uvicorn gets the bound socket
    (``sockets=``), so the one place a port error is raised and worded is here;
    ``port_setting`` says where ``port`` came from (``server.port``, ``--port``).
    """
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    logging_config = log_config(config.log_format, level=logging.getLogger().getEffectiveLevel())
    if config.log_format == "json":
        logging.config.dictConfig(logging_config)  # the lines before uvicorn starts too
    # First: prometheus-client reads where the metric files go when it is imported.
    metric_files = (
        prepare_metric_files(config.data_dir, environ=os.environ, pid=os.getpid())
        if config.metrics.port
        else None
    )
    _, authority = _build(config)
    claim_node_name(config, authority.store)
    client_ca_bundle(config)
    server_tls_context(config)  # a bad TLS certificate or key fails here, not per connection
    hub = hub_sender(config, authority.store, clock=utcnow)  # a bad [iothub] key fails here
    publisher = crl_publisher(config, authority)
    publisher.refresh_due(now=utcnow())
    ocsp = ocsp_responder(config, authority, publisher)
    ocsp.poll()
    start_audit_checkpoints(config, authority.store, clock=utcnow, stop=threading.Event())

    sock = listen(host, port, setting=port_setting)
    if config.crl.http_port:
        try:
            start_crl_listener(
                config.crl.directory,
                config.crl.http_host,
                config.crl.http_port,
                ocsp=OcspEndpoint(ocsp, utcnow),
            )
        except OSError as exc:
            sock.close()
            address = f"{config.crl.http_host}:{config.crl.http_port}"
            raise ListenError(_listen_failure(address, "crl.http_port", exc)) from None
    if metric_files is not None:
        from estkit.server.metrics import start_metrics  # after prepare_metric_files

        try:
            start_metrics(config, directory=metric_files, store=authority.store, clock=utcnow)
        except OSError as exc:
            sock.close()
            address = f"{config.metrics.host}:{config.metrics.port}"
            raise ListenError(_listen_failure(address, "metrics.port", exc)) from None
    start_crl_refresher(publisher, utcnow, stop=threading.Event(), ocsp=ocsp)
    if hub is not None:
        hub.start(threading.Event())
    os.environ[DATA_DIR_ENV] = str(config.data_dir)
    uv_config = uvicorn.Config(
        "estkit.server.app:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        backlog=BACKLOG,
        http=https_from_env,  # type: ignore[arg-type]  # a factory, as uvicorn calls it
        # Not "auto": that switches to uvloop wherever it happens to be installed. The TLS
        # layer runs on it too, but the asyncio loop is the one tested and soaked, and
        # uvloop measured no clear gain per enrollment (bench/README.md).
        loop="asyncio",
        server_header=False,
        # estkit terminates TLS itself, so a proxy in front passes raw TCP and every
        # client would arrive from its address: X-Forwarded-For would then let any
        # client name its own source (and so escape the per-source limits).
        proxy_headers=False,
        forwarded_allow_ips="",
        log_level="info",
        log_config=logging_config,
        # JSON access lines are estkit's own (server/telemetry.py), with route and duration.
        access_log=config.access_log and config.log_format == "text",
        lifespan="off",
    )
    shown = f"[{host}]" if ":" in host else host
    for warning in config_warnings(config):
        logging.getLogger("uvicorn.error").warning("%s", warning)
    # uvicorn logs this line only for sockets it binds itself; tests and people wait for it.
    logging.getLogger("uvicorn.error").info(
        "Uvicorn running on https://%s:%d (Press CTRL+C to quit)", shown, port
    )
    server = uvicorn.Server(uv_config)
    try:
        if workers > 1:
            Multiprocess(uv_config, sockets=[sock]).run()
        else:
            server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    if workers == 1 and not server.started:
        raise SystemExit(STARTUP_FAILURE)
