"""The IoT Hub registry client and the outbox sender, against the registry stand-in
(tests/registrystandin.py): the documented SAS token, GET then PUT with the ETag,
412 read again, creation, retries with backoff, failures kept with their reason, and
no key or token in any log line."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import logging
import random
import ssl
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from estkit.server.hubsync import BACKOFF_MAX, HubSender, Result, retry_delay
from estkit.server.registry import (
    Outcome,
    RegistryClient,
    Rejected,
    SasPolicy,
    Transient,
    apply,
    sas_token,
)
from estkit.store import AuditEvent, DeviceStatus, SqlStore
from estkit.store.outbox import HubChange, HubStatus, OutboxState
from estserver import free_port
from registrystandin import RegistryStandIn, running_standin

DISABLE = HubChange("dev-1", HubStatus.DISABLED, "device-disable")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[RegistryStandIn]:
    with running_standin(tmp_path / "registry") as standin:
        yield standin


def _client(
    registry: RegistryStandIn, *, key: bytes | None = None, **options: str
) -> RegistryClient:
    return RegistryClient(
        host=options.pop("host", registry.host),
        policy=SasPolicy(registry.policy, registry.key if key is None else key),
        clock=_now,
        endpoint=options.pop("endpoint", registry.endpoint),
        verify=ssl.create_default_context(cafile=str(registry.ca_file)),
        **options,
    )


@pytest.fixture
def client(registry: RegistryStandIn) -> Iterator[RegistryClient]:
    with _client(registry) as c:
        yield c


def test_the_sas_token_is_the_one_microsofts_sample_makes() -> None:
    """Microsoft's documented Python sample (IoT Hub security guide), written out."""
    key = base64.b64encode(bytes(range(32))).decode()
    uri, expiry, policy = "myhub.azure-devices.net", 1_800_000_000, "registryReadWrite"
    signed = f"{urllib.parse.quote_plus(uri)}\n{expiry}".encode()
    signature = base64.b64encode(hmac.new(base64.b64decode(key), signed, hashlib.sha256).digest())
    sample = "SharedAccessSignature " + urllib.parse.urlencode(
        {"sr": uri, "sig": signature, "se": str(expiry), "skn": policy}
    )
    assert sas_token(uri, SasPolicy(policy, base64.b64decode(key)), expiry=expiry) == sample


def test_an_identity_is_written_back_under_its_etag_with_only_its_status_changed(
    registry: RegistryStandIn, client: RegistryClient
) -> None:
    registry.add_device("dev-1", auth="selfSigned")
    outcome, identity = apply(client, DISABLE, create_identities=False)
    assert outcome is Outcome.UPDATED
    assert registry.status("dev-1") == "disabled"
    get, put = registry.requests("dev-1")
    assert (get.method, get.status, get.api_version) == ("GET", 200, "2021-04-12")
    assert (put.method, put.status) == ("PUT", 200)
    assert put.if_match is not None and put.if_match.startswith('"')
    assert put.body is not None
    assert put.body["authentication"]["type"] == "selfSigned"  # not ours to change
    assert put.body["statusReason"] == "estkit: device-disable"
    assert identity.status == "disabled"


def test_an_identity_with_the_status_already_is_not_written(
    registry: RegistryStandIn, client: RegistryClient
) -> None:
    registry.add_device("dev-1", status="disabled")
    outcome, _ = apply(client, DISABLE, create_identities=False)
    assert outcome is Outcome.UNCHANGED
    assert [s.method for s in registry.requests("dev-1")] == ["GET"]


def test_an_identity_changed_at_the_hub_meanwhile_is_read_again(
    registry: RegistryStandIn, client: RegistryClient
) -> None:
    registry.add_device("dev-1")
    registry.change_after_get("dev-1")
    outcome, _ = apply(client, DISABLE, create_identities=False)
    assert outcome is Outcome.UPDATED
    assert [(s.method, s.status) for s in registry.requests("dev-1")] == [
        ("GET", 200),
        ("PUT", 412),
        ("GET", 200),
        ("PUT", 200),
    ]
    assert registry.status("dev-1") == "disabled"


@pytest.mark.parametrize(
    ("create", "outcome"),
    [(True, Outcome.CREATED), (False, None)],
    ids=["ok/created-with-create-identities", "fail/missing-without-create-identities"],
)
def test_a_missing_identity_is_created_only_with_create_identities(
    registry: RegistryStandIn, client: RegistryClient, create: bool, outcome: Outcome | None
) -> None:
    change = HubChange("dev-1", HubStatus.ENABLED, "provision")
    if outcome is None:
        with pytest.raises(Rejected, match="create_identities is off"):
            apply(client, change, create_identities=create)
        assert registry.status("dev-1") is None
        return
    assert apply(client, change, create_identities=create)[0] is outcome
    put = registry.requests("dev-1")[-1]
    assert (put.method, put.if_match, put.status) == ("PUT", None, 200)
    assert registry.devices["dev-1"]["authentication"]["type"] == "certificateAuthority"
    assert registry.status("dev-1") == "enabled"


@pytest.mark.parametrize(
    ("status", "retry_after", "error"),
    [
        (503, 7, Transient),
        (429, None, Transient),
        (500, None, Transient),
        (401, None, Rejected),
        (400, None, Rejected),
    ],
    ids=["retry/503", "retry/429", "retry/500", "fail/401", "fail/400"],
)
def test_answers_are_told_apart_transient_or_for_good(
    registry: RegistryStandIn,
    client: RegistryClient,
    status: int,
    retry_after: int | None,
    error: type[Exception],
) -> None:
    registry.add_device("dev-1")
    registry.fail_next(1, status=status, retry_after=retry_after)
    with pytest.raises(error, match=f"GET dev-1: {status} .*x-ms-request-id") as raised:
        apply(client, DISABLE, create_identities=False)
    if retry_after is not None:
        assert isinstance(raised.value, Transient) and raised.value.retry_after == retry_after


@pytest.mark.parametrize(
    "change",
    ["wrong-key", "other-hub", "unknown-api-version"],
)
def test_the_standin_checks_the_signature_the_hub_and_the_api_version(
    registry: RegistryStandIn, change: str
) -> None:
    registry.add_device("dev-1")
    options = {
        "wrong-key": {"key": bytes(32)},
        "other-hub": {"host": "other.azure-devices.net"},
        "unknown-api-version": {"api_version": "2099-01-01"},
    }[change]
    with _client(registry, **options) as client, pytest.raises(Rejected):  # type: ignore[arg-type]
        apply(client, DISABLE, create_identities=False)
    assert registry.status("dev-1") == "enabled"
    assert registry.requests("dev-1")[0].status in (400, 401)


def test_an_unreachable_registry_is_transient(registry: RegistryStandIn) -> None:
    with (
        _client(registry, endpoint=f"https://127.0.0.1:{free_port()}") as client,
        pytest.raises(Transient, match="GET dev-1"),
    ):
        apply(client, DISABLE, create_identities=False)


@pytest.mark.parametrize(
    ("attempts", "retry_after", "low", "high"),
    [
        (1, None, 0.5, 1.0),
        (2, None, 1.0, 2.0),
        (5, None, 8.0, 16.0),
        (30, None, BACKOFF_MAX / 2, BACKOFF_MAX),
        (1, 20.0, 20.0, 20.0),
        (1, 10_000.0, BACKOFF_MAX, BACKOFF_MAX),
    ],
    ids=["first", "second", "fifth", "capped", "retry-after", "retry-after-capped"],
)
def test_the_backoff_doubles_with_jitter_and_honours_retry_after(
    attempts: int, retry_after: float | None, low: float, high: float
) -> None:
    rng = random.Random(7)
    for _ in range(50):
        assert low <= retry_delay(attempts, retry_after=retry_after, rng=rng) <= high


def _queue(store: SqlStore, device_id: str, status: DeviceStatus) -> None:
    """Register ``device_id`` and set its status, queueing the hub change it causes."""
    now = _now()
    audit = AuditEvent(at=now, actor="test", action="device-add", outcome="ok")
    store.add_device(device_id, now=now, audit=audit)
    hub, cause = (
        (HubStatus.ENABLED, "device-enable")
        if status is DeviceStatus.ACTIVE
        else (HubStatus.DISABLED, "device-disable")
    )
    store.set_device_status(
        device_id, status, now=now, audit=audit, hub=HubChange(device_id, hub, cause)
    )


def _queue_disable(store: SqlStore, device_id: str) -> None:
    _queue(store, device_id, DeviceStatus.DISABLED)


def test_the_sender_retries_then_sends_and_logs_no_secret(
    store: SqlStore,
    registry: RegistryStandIn,
    client: RegistryClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)  # httpx and httpcore too
    registry.add_device("dev-1")
    _queue_disable(store, "dev-1")
    sender = HubSender(
        store.hub_outbox(), client, create_identities=False, owner="test", clock=_now
    )
    registry.fail_next(1, status=503, retry_after=1)
    first = sender.send_next()
    assert first is not None and first.result is Result.RETRY
    assert first.next_attempt_at is not None and first.next_attempt_at > first.entry.created_at
    assert sender.send_next() is None  # not due yet
    again = sender.send_next(due_only=False)
    assert again is not None and again.result is Result.SENT and again.detail == "updated"
    assert registry.status("dev-1") == "disabled"
    assert store.hub_outbox().entries("dev-1")[0].state is OutboxState.DONE
    tokens = [s.authorization or "" for s in registry.requests()]
    signatures = [t.split("sig=")[1].split("&")[0] for t in tokens if "sig=" in t]
    secrets = [registry.key_b64, *signatures, *(urllib.parse.unquote(s) for s in signatures)]
    assert signatures
    text = caplog.text + "".join(e.last_error or "" for e in store.hub_outbox().entries("dev-1"))
    assert "httpx" in caplog.text or "HTTP Request" in caplog.text  # the requests were logged
    assert not [s for s in secrets if s in text]
    assert "SharedAccessSignature" not in text


def _queue_enable(store: SqlStore, device_id: str) -> None:
    _queue(store, device_id, DeviceStatus.ACTIVE)


def test_a_disable_for_a_device_without_identity_holds_already(
    store: SqlStore, registry: RegistryStandIn, client: RegistryClient
) -> None:
    _queue_disable(store, "dev-1")  # the hub has no such identity: none can connect
    sender = HubSender(
        store.hub_outbox(), client, create_identities=False, owner="test", clock=_now
    )
    sent = sender.send_next()
    assert sent is not None and (sent.result, sent.detail) == (Result.SENT, "unchanged")
    assert registry.status("dev-1") is None
    assert [r.method for r in registry.requests("dev-1")] == ["GET"]
    assert store.hub_outbox().backlog().failed_count == 0


def test_a_change_superseded_while_it_is_sent_writes_nothing(
    store: SqlStore, registry: RegistryStandIn, client: RegistryClient
) -> None:
    registry.add_device("dev-1")
    _queue_enable(store, "dev-1")
    outbox = store.hub_outbox()
    sender = HubSender(outbox, client, create_identities=False, owner="test", clock=_now)
    entry = outbox.claim(owner="test", now=_now(), lease=dt.timedelta(minutes=5))
    assert entry is not None and entry.change.status is HubStatus.ENABLED
    registry.devices["dev-1"]["status"] = "disabled"  # so that enabling needs a write
    # The operator disables the device while the enable is on its way.
    now = _now()
    audit = AuditEvent(at=now, actor="test", action="device-disable", outcome="ok")
    store.set_device_status(
        "dev-1", DeviceStatus.DISABLED, now=now, audit=audit,
        hub=HubChange("dev-1", HubStatus.DISABLED, "device-disable"),
    )  # fmt: skip
    sent = sender._send(entry)
    assert sent.result is Result.SKIPPED
    assert [r.method for r in registry.requests("dev-1")] == ["GET"]  # no PUT of "enabled"
    assert registry.status("dev-1") == "disabled"
    newest = sender.send_next()
    assert newest is not None and newest.entry.change.status is HubStatus.DISABLED


def test_provisioning_never_queues_enabled_for_a_device_disabled_meanwhile(
    store: SqlStore,
) -> None:
    _queue_disable(store, "dev-1")
    # What a provisioning that checked the device before the disable committed writes.
    _queue_enable_without_status(store, "dev-1")
    pending = [e for e in store.hub_outbox().entries("dev-1") if e.state is OutboxState.PENDING]
    assert [e.change.status for e in pending] == [HubStatus.DISABLED]


def _queue_enable_without_status(store: SqlStore, device_id: str) -> None:
    from estkit.store.outbox import enqueue

    with store._engine.begin() as conn:
        enqueue(conn, HubChange(device_id, HubStatus.ENABLED, "provision"), _now())


def test_a_refused_change_is_kept_failed_with_the_reason(
    store: SqlStore, registry: RegistryStandIn, client: RegistryClient
) -> None:
    _queue_enable(store, "dev-1")  # the hub has no such identity, and may not create it
    sender = HubSender(
        store.hub_outbox(), client, create_identities=False, owner="test", clock=_now
    )
    sent = sender.send_next()
    assert sent is not None and sent.result is Result.FAILED
    backlog = store.hub_outbox().backlog()
    assert backlog.failed_count == 1
    assert "no identity in the hub's registry" in (backlog.failed[0].last_error or "")
