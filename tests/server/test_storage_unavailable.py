"""Finding 3 of issue 10: a database that cannot write (full disk, read-only, locked) answers
503 + Retry-After with the code ``unavailable``, in one log line, and nothing is half-written.

In-process (httpx's ASGI transport). On SQLite the server's own engine is made
read-only by a connection hook, which a separate process could not do; on PostgreSQL
the database itself turns read-only (``default_transaction_read_only``, what a standby
that was the primary answers), and the server's pool reconnects.
"""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from backends import server_database
from estkit.server.app import _build
from estkit.server.config import load_config
from estserver import run_estkit
from estutil import csr_der, new_key


def _read_only(engine: sa.Engine) -> None:
    if engine.dialect.name == "sqlite":

        def apply(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA query_only = 1")
            cursor.close()

        sa.event.listen(engine, "connect", apply)
    else:
        admin = sa.create_engine(engine.url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
        try:
            with admin.connect() as conn:
                name = conn.exec_driver_sql("SELECT current_database()").scalar_one()
                conn.exec_driver_sql(
                    f'ALTER DATABASE "{name}" SET default_transaction_read_only = on'
                )
        finally:
            admin.dispose()
    engine.dispose()


def _call(app: Any, method: str, url: str, **kwargs: Any) -> httpx.Response:
    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="https://est.test") as c:
            return await c.request(method, url, **kwargs)

    return asyncio.run(call())


def test_read_only_database_answers_503_and_writes_nothing(
    request: pytest.FixtureRequest, backend: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    database = server_database(request, backend)
    run_estkit(
        "server", "init", "--data-dir", data, *(["--database-url", database] if database else [])
    )
    secret = run_estkit("device", "add", "--data-dir", data, "dev-1").stdout.strip()
    token = run_estkit(
        "token", "create", "--data-dir", data, "--name", "ops", "--scope", "admin"
    ).stdout.strip()
    app, authority = _build(load_config(data))
    store = authority.store
    _read_only(store._engine)
    audit_before = len(store.list_audit(limit=1000).items)
    caplog.set_level("WARNING", logger="estkit")

    body = base64.encodebytes(csr_der(new_key(), "dev-1"))
    enroll = _call(
        app,
        "POST",
        "/.well-known/est/simpleenroll",
        content=body,
        headers={"Content-Type": "application/pkcs10"},
        auth=("dev-1", secret),
    )
    assert enroll.status_code == 503, enroll.text
    assert enroll.headers["estkit-refusal-code"] == "unavailable"
    assert int(enroll.headers["retry-after"]) > 0
    assert enroll.text.count("\n") == 1 and "retry" in enroll.text

    api = _call(
        app,
        "POST",
        "/api/v1/devices",
        json={"device_id": "dev-2"},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert api.status_code == 503, api.text
    assert api.headers["content-type"] == "application/problem+json"
    assert api.json()["code"] == "unavailable"
    assert int(api.headers["retry-after"]) > 0

    assert store.count_certificates() == 0
    assert store.get_device("dev-2") is None
    assert len(store.list_audit(limit=1000).items) == audit_before
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert warnings and all(r.exc_info is None for r in caplog.records)
    assert all("database unavailable" in r.getMessage() for r in warnings)
