"""The operator's read side: ``device list|show``, ``cert list|show``, ``audit list``, and
``--json`` of every list and show, on a store seeded with devices in each state and
certificates valid, expiring, expired and revoked (on each backend)."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from backends import server_database
from estkit.cli.main import main
from estkit.cli.read_cmds import cert_filter
from estkit.store import (
    AuditEvent,
    CertificateRecord,
    CertStatus,
    DeviceStatus,
    PendingStatus,
    SqlStore,
)
from estserver import run_estkit

NOW = dt.datetime.now(dt.UTC)  # the seeds' clock; every margin below is days wide
DAY = dt.timedelta(days=1)

# name: (device, CA, not_after from NOW); serials are 0A0001...
SEEDS = {
    "far": ("meter-001", "devices", 60 * DAY),
    "soon": ("meter-001", "devices", 3 * DAY),
    "past": ("meter-001", "devices", -2 * DAY),
    "boot": ("meter-002", "bootstrap", 60 * DAY),
    "revoked": ("Gate_7", "devices", 60 * DAY),
}


def _serial(name: str) -> str:
    return f"0A{list(SEEDS).index(name) + 1:04X}"


@dataclass(frozen=True, slots=True)
class Fleet:
    data_dir: Path
    database_url: str
    serials: dict[str, str]  # seed name (and "factory") -> serial
    factory_pem: bytes  # the certificate `device bootstrap` issued to factory-9
    audit_ids: dict[str, int]  # detail of the seeded audit entries -> id


def _record(name: str) -> CertificateRecord:
    device_id, ca, valid_for = SEEDS[name]
    return CertificateRecord(
        serial=_serial(name),
        device_id=device_id,
        ca=ca,
        label=ca if ca == "devices" else None,
        profile="operational",
        subject=f"CN={device_id}",
        sans=(f"{device_id}.example",),
        not_before=NOW - 90 * DAY,
        not_after=NOW + valid_for,
        status=CertStatus.VALID,
        requested_via="est-simpleenroll",
        requested_by=f"secret:{device_id}",
        issued_at=NOW - 90 * DAY,
        der=b"\x30\x00",
    )


def _event(detail: str, *, at: dt.datetime, **fields: Any) -> AuditEvent:
    return AuditEvent(at=at, detail=detail, **fields)


def _seed(store: SqlStore) -> dict[str, int]:
    for name in SEEDS:
        record = _record(name)
        store.record_issued(
            record,
            audit=AuditEvent(
                at=record.issued_at,
                actor=record.requested_by,
                action="est-simpleenroll",
                outcome="ok",
                device_id=record.device_id,
                serial=record.serial,
                detail="issued",
            ),
        )
    for device_id, status, reason in (
        ("meter-002", DeviceStatus.DISABLED, None),
        ("Gate_7", DeviceStatus.DECOMMISSIONED, "cessationOfOperation"),
    ):
        store.set_device_status(
            device_id,
            status,
            now=NOW,
            revoke_reason=reason,
            audit=AuditEvent(at=NOW, actor="seed", action="status", outcome="ok"),
        )
    for event in (
        _event("e1", at=NOW - 10 * DAY, actor="op:alice", action="revoke", outcome="ok",
               device_id="meter-001", serial=_serial("far")),
        _event("e2", at=NOW, actor="op:alice", action="device-disable", outcome="refused",
               device_id="meter-002"),
        _event("e3", at=NOW, actor="op:bob", action="revoke", outcome="ok",
               device_id="meter-001", serial=_serial("soon")),
    ):  # fmt: skip
        store.audit(event)
    store.add_token(
        name="station-1",
        token_hash="ab" * 32,
        scopes=frozenset({"read", "provision"}),
        created_by="seed",
        now=NOW,
        expires_at=NOW + 90 * DAY,
        audit=AuditEvent(at=NOW, actor="seed", action="token-create", outcome="ok"),
    )
    request = store.add_pending(
        label="approved",
        device_id="meter-001",
        csr_sha256="cd" * 32,
        operation="simpleenroll",
        requested_by="cert:0A0001",
        now=NOW,
        audit=AuditEvent(at=NOW, actor="cert:0A0001", action="simpleenroll", outcome="pending"),
    )
    store.decide_pending(
        request.id,
        PendingStatus.DENIED,
        by="op:alice",
        reason="not ours",
        now=NOW,
        audit=AuditEvent(at=NOW, actor="seed", action="deny", outcome="ok"),
    )
    entries = store.list_audit(actor="op:alice", limit=10).items
    entries += store.list_audit(actor="op:bob", limit=10).items
    return {e.detail: e.id for e in entries if e.id is not None}


@pytest.fixture(scope="module")
def fleet(
    request: pytest.FixtureRequest, backend: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    from estkit.server.config import load_config

    root = tmp_path_factory.mktemp("read")
    data_dir = root / "data"
    database = server_database(request, backend)
    run_estkit("server", "init", "--data-dir", data_dir,
               *(["--database-url", database] if database else []))  # fmt: skip
    run_estkit("device", "bootstrap", "--data-dir", data_dir, "factory-9", "--out", root / "boot")
    url = load_config(data_dir).database_url
    store = SqlStore.open(url)
    try:
        audit_ids = _seed(store)
        (factory,) = store.certificates_of("factory-9")
    finally:
        store.close()
    serials = {name: _serial(name) for name in SEEDS} | {"factory": factory.serial}
    yield Fleet(data_dir, url, serials, (root / "boot" / "cert.pem").read_bytes(), audit_ids)


def estkit(fleet: Fleet, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run ``estkit GROUP ACTION --data-dir … ARGS`` in this process: (status, stdout, stderr)."""
    group, action, *rest = args
    status = main([group, action, "--data-dir", str(fleet.data_dir), *rest])
    out, err = capsys.readouterr()
    return status, out, err


def column(out: str, index: int = 0) -> list[str]:
    return [line.split("\t")[index] for line in out.splitlines()]


# -- devices ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], {"meter-001", "meter-002", "Gate_7", "factory-9"}),
        (["--status", "active"], {"meter-001", "factory-9"}),
        (["--status", "disabled"], {"meter-002"}),
        (["--status", "decommissioned"], {"Gate_7"}),
        (["--search", "METER"], {"meter-001", "meter-002"}),
        (["--search", "_"], {"Gate_7"}),
        (["--search", "meter", "--status", "active"], {"meter-001"}),
    ],
    ids=[
        "ok/all",
        "ok/active",
        "ok/disabled",
        "ok/decommissioned",
        "ok/search-any-case",
        "ok/search-underscore-is-literal",
        "ok/search-and-status",
    ],
)
def test_device_list_filters_by_status_and_part_of_the_id(
    fleet: Fleet, capsys: pytest.CaptureFixture[str], args: list[str], expected: set[str]
) -> None:
    status, out, err = estkit(fleet, capsys, "device", "list", *args)
    assert (status, err) == (0, "")
    assert set(column(out)) == expected
    status, out, _ = estkit(fleet, capsys, "device", "list", *args, "--json")
    devices = json.loads(out)
    assert {d["device_id"] for d in devices} == expected
    assert all(set(d) == {"device_id", "status", "created_at", "updated_at"} for d in devices)


def test_device_list_is_paged_and_stderr_names_the_next_page(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = estkit(fleet, capsys, "device", "list", "--search", "meter", "--limit", "1")
    assert status == 0
    assert column(out) == ["meter-001"]
    assert err == "more devices match: add --after meter-001 for the next page\n"
    status, out, err = estkit(
        fleet, capsys, "device", "list", "--search", "meter", "--limit", "1", "--after", "meter-001"
    )
    assert (status, column(out), err) == (0, ["meter-002"], "")


def test_device_show_has_its_status_and_certificate_history(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = estkit(fleet, capsys, "device", "show", "meter-001", "--json")
    assert (status, err) == (0, "")
    device = json.loads(out)
    assert (device["device_id"], device["status"]) == ("meter-001", "active")
    history = {c["serial"]: c for c in device["certificates"]}
    assert {name: history[fleet.serials[name]]["status"] for name in ("far", "soon", "past")} == {
        "far": "valid",
        "soon": "valid",
        "past": "expired",
    }
    far = history[fleet.serials["far"]]
    assert (far["ca"], far["label"]) == ("devices", "devices")
    assert dt.datetime.fromisoformat(far["not_after"]) == _record("far").not_after
    assert dt.datetime.fromisoformat(far["not_after"]).utcoffset() == dt.timedelta(0)

    status, out, _ = estkit(fleet, capsys, "device", "show", "Gate_7")
    assert status == 0
    assert "status:       decommissioned" in out
    (row,) = [line.split("\t") for line in out.splitlines() if fleet.serials["revoked"] in line]
    assert row[1:4] == ["revoked", "devices", "devices"]


# -- certificates ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--device", "meter-001"], {"far", "soon", "past"}),
        (["--device", "meter-001", "--status", "valid"], {"far", "soon"}),
        (["--status", "expired"], {"past"}),
        (["--status", "revoked"], {"revoked"}),
        (["--ca", "bootstrap"], {"boot", "factory"}),
        (["--expiring-within", "7d"], {"soon"}),
        (["--expiring-within", "90d"], {"far", "soon", "boot", "revoked"}),
        (["--expiring-within", "90d", "--status", "valid"], {"far", "soon", "boot"}),
        (["--expiring-within", "7d", "--status", "expired"], set()),
    ],
    ids=[
        "ok/device",
        "ok/device-valid",
        "ok/expired",
        "ok/revoked",
        "ok/ca",
        "ok/expiring-within",
        "ok/expiring-within-any-status",
        "ok/expiring-within-valid",
        "ok/expired-and-expiring-is-none",
    ],
)
def test_cert_list_filters(
    fleet: Fleet, capsys: pytest.CaptureFixture[str], args: list[str], expected: set[str]
) -> None:
    serials = {fleet.serials[name] for name in expected}
    status, out, err = estkit(fleet, capsys, "cert", "list", *args)
    assert (status, err) == (0, "")
    if serials:
        assert set(column(out)) == serials
    else:
        assert out == "no certificates match\n"
    status, out, _ = estkit(fleet, capsys, "cert", "list", *args, "--json")
    assert {c["serial"] for c in json.loads(out)} == serials


def test_cert_list_json_has_the_records_fields_but_the_der(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    _, out, _ = estkit(fleet, capsys, "cert", "list", "--device", "meter-001", "--json")
    certs = {c["serial"]: c for c in json.loads(out)}
    store = SqlStore.open(fleet.database_url)
    try:
        records = store.certificates_of("meter-001")
    finally:
        store.close()
    assert set(certs) == {r.serial for r in records}
    for r in records:
        got = certs[r.serial]
        assert set(got) == {f for f in CertificateRecord.__dataclass_fields__ if f != "der"}
        assert (got["device_id"], got["ca"], got["sans"]) == (r.device_id, r.ca, list(r.sans))
        assert dt.datetime.fromisoformat(got["not_before"]) == r.not_before
        assert dt.datetime.fromisoformat(got["issued_at"]) == r.issued_at


def test_cert_list_is_paged_by_serial(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    first, second = fleet.serials["far"], fleet.serials["soon"]
    _, out, err = estkit(fleet, capsys, "cert", "list", "--device", "meter-001", "--limit", "2")
    assert column(out) == [first, second]
    assert f"--after {second}" in err
    _, out, err = estkit(
        fleet, capsys, "cert", "list", "--device", "meter-001", "--after", second.lower()
    )
    assert (column(out), err) == ([fleet.serials["past"]], "")


def test_cert_show_prints_the_record_and_with_pem_the_certificate(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    serial = fleet.serials["factory"]
    spelled = ":".join(serial[i : i + 2] for i in range(0, len(serial), 2)).lower()
    status, out, err = estkit(fleet, capsys, "cert", "show", spelled, "--pem")
    assert (status, err) == (0, "")
    assert f"serial:            {serial}\n" in out
    assert "device_id:         factory-9\n" in out
    assert "ca:                bootstrap\n" in out
    pem = out[out.index("-----BEGIN") :].encode()
    assert x509.load_pem_x509_certificate(pem) == x509.load_pem_x509_certificate(fleet.factory_pem)

    _, out, _ = estkit(fleet, capsys, "cert", "show", serial)
    assert "BEGIN CERTIFICATE" not in out
    _, out, _ = estkit(fleet, capsys, "cert", "show", serial, "--json")
    shown = json.loads(out)
    assert (shown["serial"], shown["status"], shown["requested_via"]) == (
        serial,
        "valid",
        "cli-bootstrap",
    )
    cert = x509.load_pem_x509_certificate(shown["pem"].encode())
    assert cert == x509.load_pem_x509_certificate(fleet.factory_pem)


# -- audit --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--actor", "op:alice"], ["e1", "e2"]),
        (["--actor", "op:bob"], ["e3"]),
        (["--actor", "op:alice", "--action", "revoke"], ["e1"]),
        (["--actor", "op:alice", "--outcome", "refused"], ["e2"]),
        (["--actor", "op:alice", "--device", "meter-001"], ["e1"]),
        (["--serial", "0a:00:02", "--action", "revoke"], ["e3"]),
        (["--serial", "0A0002"], ["issued", "e3"]),
        (["--actor", "op:alice", "--since", "1d"], ["e2"]),
        (["--actor", "op:alice", "--since", (NOW - 5 * DAY).isoformat()], ["e2"]),
        (["--actor", "op:alice", "--since", (NOW - 5 * DAY).strftime("%Y-%m-%dT%H:%M")], ["e2"]),
    ],
    ids=[
        "ok/actor",
        "ok/other-actor",
        "ok/action",
        "ok/outcome",
        "ok/device",
        "ok/serial-any-spelling",
        "ok/serial",
        "ok/since-duration",
        "ok/since-iso",
        "ok/since-iso-no-zone-is-utc",
    ],
)
def test_audit_list_filters_oldest_first(
    fleet: Fleet, capsys: pytest.CaptureFixture[str], args: list[str], expected: list[str]
) -> None:
    status, out, err = estkit(fleet, capsys, "audit", "list", *args)
    assert (status, err) == (0, "")
    assert column(out, 7) == expected
    _, out, _ = estkit(fleet, capsys, "audit", "list", *args, "--json")
    entries = json.loads(out)
    assert [e["detail"] for e in entries] == expected
    seeded = [e for e in entries if e["detail"] in fleet.audit_ids]
    assert all(e["id"] == fleet.audit_ids[e["detail"]] for e in seeded)


def test_audit_list_is_paged_by_entry_id(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    e1 = fleet.audit_ids["e1"]
    _, out, err = estkit(fleet, capsys, "audit", "list", "--actor", "op:alice", "--limit", "1")
    assert column(out, 7) == ["e1"]
    assert err == f"more audit entries match: add --after {e1} for the next page\n"
    _, out, err = estkit(fleet, capsys, "audit", "list", "--actor", "op:alice", "--after", str(e1))
    assert (column(out, 7), err) == (["e2"], "")


# -- empty lists, unknown ids, bad arguments ---------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["device", "list", "--search", "no-such"], "no devices match"),
        (["cert", "list", "--device", "no-such"], "no certificates match"),
        (["audit", "list", "--actor", "no-such"], "no audit entries match"),
    ],
    ids=["ok/devices", "ok/certificates", "ok/audit"],
)
def test_an_empty_list_says_so_and_is_an_empty_json_list(
    fleet: Fleet, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert estkit(fleet, capsys, *args) == (0, f"{message}\n", "")
    assert estkit(fleet, capsys, *args, "--json") == (0, "[]\n", "")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["device", "show", "no-such"], "estkit: no device 'no-such'\n"),
        (["cert", "show", "ABCDEF"], "estkit: no certificate ABCDEF\n"),
        (["cert", "show", "0xabcdef", "--json"], "estkit: no certificate ABCDEF\n"),
    ],
    ids=["fail/unknown-device", "fail/unknown-serial", "fail/unknown-serial-json"],
)
def test_show_of_an_unknown_id_is_one_line_and_exit_1(
    fleet: Fleet, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert estkit(fleet, capsys, *args) == (1, "", message)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["cert", "show", "zz"], "hexadecimal"),
        (["cert", "list", "--limit", "0"], "1-1000"),
        (["device", "list", "--limit", "1001"], "1-1000"),
        (["cert", "list", "--status", "lost"], "invalid choice"),
        (["cert", "list", "--expiring-within", "soon"], "duration"),
        (["audit", "list", "--since", "yesterday"], "ISO 8601"),
        (["audit", "list", "--after", "x"], "entry"),
    ],
    ids=[
        "fail/serial",
        "fail/limit-zero",
        "fail/limit-too-big",
        "fail/status",
        "fail/duration",
        "fail/since",
        "fail/after",
    ],
)
def test_bad_arguments_exit_2(
    fleet: Fleet, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exited:
        estkit(fleet, capsys, *args)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "command",
    [
        ("device", "list"),
        ("device", "show"),
        ("cert", "list"),
        ("cert", "show"),
        ("audit", "list"),
        ("token", "list"),
        ("pending", "list"),
    ],
    ids="-".join,
)
def test_help_documents_the_exit_codes(
    capsys: pytest.CaptureFixture[str], command: tuple[str, str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "exit status: 0" in out
    assert "--json" in out
    for code in ("1 ", "2 bad arguments", "75 the database is unavailable", "78 the config"):
        assert f"; {code}" in out


# -- tokens and pending requests ------------------------------------------------------------


def test_token_list_json_has_no_digest(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = estkit(fleet, capsys, "token", "list", "--json")
    assert status == 0
    (token,) = json.loads(out)
    assert "token_hash" not in token
    assert (token["name"], token["scopes"], token["state"]) == (
        "station-1",
        ["provision", "read"],
        "active",
    )
    assert dt.datetime.fromisoformat(token["expires_at"]) == NOW + 90 * DAY
    _, out, _ = estkit(fleet, capsys, "token", "list")
    assert out.split("\t")[:3] == ["station-1", "provision,read", "active"]


def test_pending_list_json_and_an_empty_queue(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    # The empty queue's line is on stderr: scripts read the rows on stdout.
    assert estkit(fleet, capsys, "pending", "list") == (0, "", "no requests waiting\n")
    assert estkit(fleet, capsys, "pending", "list", "--json") == (0, "[]\n", "")
    _, out, _ = estkit(fleet, capsys, "pending", "list", "--all", "--json")
    (decided,) = json.loads(out)
    assert (decided["device_id"], decided["status"], decided["decided_by"]) == (
        "meter-001",
        "denied",
        "op:alice",
    )
    assert dt.datetime.fromisoformat(decided["created_at"]) == NOW
    _, out, _ = estkit(fleet, capsys, "pending", "list", "--all")
    assert out.split("\t")[1:4] == ["denied", "approved", "meter-001"]


# -- the filter arithmetic --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "within", "expected"),
    [
        (None, None, (None, None, None)),
        ("valid", None, ("valid", NOW, None)),
        ("expired", None, ("valid", None, NOW)),
        ("revoked", None, ("revoked", None, None)),
        (None, 7 * DAY, (None, NOW, NOW + 7 * DAY)),
        ("valid", 7 * DAY, ("valid", NOW, NOW + 7 * DAY)),
        ("expired", 7 * DAY, ("valid", NOW, NOW)),
    ],
    ids=[
        "ok/none",
        "ok/valid",
        "ok/expired",
        "ok/revoked",
        "ok/within",
        "ok/valid-within",
        "ok/expired-within-empty",
    ],
)
def test_cert_filter_as_store_filters(
    status: str | None,
    within: dt.timedelta | None,
    expected: tuple[str | None, dt.datetime | None, dt.datetime | None],
) -> None:
    wanted = cert_filter(status, expiring_within=within, now=NOW)
    assert (wanted.status, wanted.expires_after, wanted.expires_before) == expected
