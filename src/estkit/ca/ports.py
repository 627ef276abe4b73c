"""What the authority needs from storage, declared by the consumer (``SqlStore`` satisfies it).

Errors: ``estkit.store.errors`` (``NotFound``, ``Conflict`` and its kinds,
``Unavailable``); ``translated`` (below) turns them into refusals, once.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Protocol

from estkit.ca.errors import Code, Refusal, StoreUnavailable
from estkit.store import (
    AuditEvent,
    CertificateRecord,
    Device,
    DeviceStatus,
    EnrollmentSecret,
    PendingRequest,
    PendingStatus,
    PresentedCertificate,
)
from estkit.store import errors as store_errors
from estkit.store.outbox import HubChange

log = logging.getLogger("estkit.ca")

# How long a client should wait when the database cannot take requests (disk full,
# read-only, locked): long enough for an operator's fix or a lock to clear.
UNAVAILABLE_RETRY_AFTER = 30


class AuthorityStore(Protocol):
    def deferred_writes(self) -> AbstractContextManager[list[Future[Any]]]: ...

    # devices and secrets
    def get_device(self, device_id: str) -> Device | None: ...
    # ``hub``: an IoT Hub registry change written in the same transaction (store/outbox.py)
    def add_device(
        self,
        device_id: str,
        *,
        now: dt.datetime,
        audit: AuditEvent,
        hub: HubChange | None = None,
    ) -> None: ...
    def set_device_status(
        self,
        device_id: str,
        status: DeviceStatus,
        *,
        now: dt.datetime,
        audit: AuditEvent,
        revoke_reason: str | None = None,
        hub: HubChange | None = None,
    ) -> list[str]: ...
    def add_secret(
        self,
        device_id: str,
        secret_hash: bytes,
        *,
        now: dt.datetime,
        expires_at: dt.datetime,
        audit: AuditEvent,
        replace: bool = False,
        hub: HubChange | None = None,
    ) -> int: ...
    def usable_secrets(self, device_id: str, *, now: dt.datetime) -> list[EnrollmentSecret]: ...

    # certificates
    def presented_certificate(self, serial: str) -> PresentedCertificate | None: ...
    def get_certificate(self, serial: str) -> CertificateRecord | None: ...
    def certificates_of(self, device_id: str) -> list[CertificateRecord]: ...
    def record_issued(
        self,
        record: CertificateRecord,
        *,
        audit: AuditEvent,
        consume_secret: int | None = None,
        pending_id: int | None = None,
        hub: HubChange | None = None,
    ) -> None: ...
    def revoke_certificate(
        self, serial: str, *, reason: str, now: dt.datetime, audit: AuditEvent
    ) -> CertificateRecord: ...

    # approval
    def find_pending(
        self, label: str, device_id: str, csr_sha256: str
    ) -> PendingRequest | None: ...
    def add_pending(
        self,
        *,
        label: str,
        device_id: str,
        csr_sha256: str,
        operation: str,
        requested_by: str,
        now: dt.datetime,
        audit: AuditEvent,
    ) -> PendingRequest: ...
    def decide_pending(
        self,
        request_id: int,
        status: PendingStatus,
        *,
        by: str,
        reason: str | None,
        now: dt.datetime,
        audit: AuditEvent,
    ) -> PendingRequest: ...

    # audit
    def audit(self, event: AuditEvent) -> None: ...


@contextmanager
def translated() -> Iterator[None]:
    """The one place where store errors become refusals."""
    try:
        yield
    except store_errors.SecretUsed as exc:
        raise Refusal(Code.SECRET_INVALID, str(exc)) from None
    except store_errors.NotFound as exc:
        raise Refusal(Code.NOT_FOUND, str(exc)) from None
    except store_errors.Conflict as exc:
        raise Refusal(Code.CONFLICT, str(exc)) from None
    except store_errors.Unavailable as exc:
        raise _unavailable(exc) from None


def _unavailable(exc: store_errors.Unavailable) -> Refusal:
    # One line for the operator (no traceback); the client learns only that it may retry.
    log.warning("database unavailable (%s): answering 503, nothing written", exc)
    return StoreUnavailable(
        Code.UNAVAILABLE,
        "the CA cannot record decisions right now; retry later",
        retry_after=UNAVAILABLE_RETRY_AFTER,
    )


def translated_future(future: Future[Any]) -> Future[Any]:
    out: Future[Any] = Future()

    def done(f: Future[Any]) -> None:
        exc = f.exception()
        if exc is None:
            out.set_result(f.result())
            return
        try:
            with translated():
                raise exc
        except BaseException as refusal:  # handed to the waiter
            out.set_exception(refusal)

    future.add_done_callback(done)
    return out
