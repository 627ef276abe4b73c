"""The operator's read side: ``device list|show``, ``cert list|show``, ``audit list``,
and ``token list`` and ``pending list``.

They read the store only: no CA key, token or PIN is needed. A list is one page in
the order of the table's key (``--limit``, default 100), so no page sorts or counts
the whole table; when more rows match, stderr says which ``--after`` gives the next
page. Text is one row a line, its
fields separated by tabs; ``--json`` is a list of objects (a show: one object) with
the field names of the records and timestamps in ISO 8601, UTC. An empty list says
so in one line, or prints ``[]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import enum
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from estkit.cli.errors import EXIT_FAILURE, EXIT_TEMPFAIL, CliError
from estkit.cli.server_cmds import _command, _data_dir_arg, _load, _now

if TYPE_CHECKING:
    from estkit.store import (
        ApiToken,
        AuditEvent,
        CertificateRecord,
        Device,
        PendingRequest,
        SqlStore,
    )

# The values of store.DeviceStatus and of a certificate's status as shown here (a
# valid record past its not_after is expired); literal, since importing the store
# needs estkit[server], and parsing must not.
DEVICE_STATUSES = ("active", "disabled", "decommissioned")
CERT_STATUSES = ("valid", "revoked", "expired")
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000  # as the API's


def list_epilog(*, empty_says_so_on: str = "stdout") -> str:
    return (
        f"exit status: 0 listed, also when nothing matches (one line on {empty_says_so_on} "
        "says so; --json: []); 1 the database cannot be read (the line says why); 2 bad "
        "arguments; 75 the database is unavailable, try again later; 78 the config is invalid"
    )


def _show_epilog(what: str) -> str:
    return (
        f"exit status: 0 shown; 1 no such {what} (one line on stderr), or the database "
        "cannot be read; 2 bad arguments; 75 the database is unavailable, try again "
        "later; 78 the config is invalid"
    )


# -- reading the store ---------------------------------------------------------------


@contextmanager
def _reading(args: argparse.Namespace) -> Iterator[SqlStore]:
    """The store of ``--data-dir``'s config, checked to be at this estkit's schema; its
    errors as one line each."""
    from estkit.store import SqlStore
    from estkit.store.errors import StoreError, Unavailable

    store = SqlStore.open(_load(args).database_url)
    try:
        store.check_schema()
        yield store
    except Unavailable as exc:
        raise CliError(f"database unavailable: {exc}", exit_code=EXIT_TEMPFAIL) from None
    except StoreError as exc:
        raise CliError(str(exc), exit_code=EXIT_FAILURE) from None
    finally:
        store.close()


# -- records as JSON and as text -------------------------------------------------------


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.astimezone(dt.UTC).isoformat()


def _json_value(value: object) -> object:
    if isinstance(value, dt.datetime):
        return _iso(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, frozenset):
        return sorted(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def _record_json(record: Any, *, omit: Sequence[str] = ()) -> dict[str, Any]:
    """A store record's fields by name, but ``omit``."""
    return {
        f.name: _json_value(getattr(record, f.name)) for f in fields(record) if f.name not in omit
    }


def cert_status(record: CertificateRecord, *, now: dt.datetime) -> str:
    """valid, revoked, or expired: a valid record whose not_after has passed."""
    if record.status.value == "valid" and record.not_after < now:
        return "expired"
    return record.status.value


def device_json(device: Device) -> dict[str, Any]:
    return _record_json(device)


def cert_json(record: CertificateRecord, *, now: dt.datetime) -> dict[str, Any]:
    """The record's fields but the DER; ``status`` as ``cert_status``."""
    return {**_record_json(record, omit=("der",)), "status": cert_status(record, now=now)}


def audit_json(event: AuditEvent) -> dict[str, Any]:
    return {"id": event.id, **_record_json(event, omit=("id",))}


def _token_state(token: ApiToken) -> str:
    return "revoked" if token.revoked_at else "active"


def token_json(token: ApiToken) -> dict[str, Any]:
    """Its fields but the token's digest, and ``state``: active or revoked."""
    return {**_record_json(token, omit=("token_hash",)), "state": _token_state(token)}


def pending_json(request: PendingRequest) -> dict[str, Any]:
    return _record_json(request)


def _text(value: object) -> str:
    """A field in a tab-separated row: ``-`` for none."""
    if value is None or value == "":
        return "-"
    return str(_iso(value) if isinstance(value, dt.datetime) else value)


def _row(*values: object) -> str:
    return "\t".join(map(_text, values))


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2))


@dataclass(frozen=True, slots=True)
class _Listing:
    """How one kind of row is printed: its name in messages, as text, as JSON."""

    noun: str
    text: Callable[[Any], str]
    json: Callable[[Any], dict[str, Any]]


def _print_page(
    listing: _Listing, items: Sequence[Any], next_after: str | None, *, as_json: bool
) -> int:
    if as_json:
        _print_json([listing.json(i) for i in items])
    elif items:
        for item in items:
            print(listing.text(item))
    else:
        print(f"no {listing.noun} match")
    if next_after is not None:
        print(
            f"more {listing.noun} match: add --after {next_after} for the next page",
            file=sys.stderr,
        )
    return 0


# -- argument types -------------------------------------------------------------------


def _limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 1 <= value <= MAX_LIMIT:
        raise argparse.ArgumentTypeError(f"1-{MAX_LIMIT}, got {value}")
    return value


def _entry_id(text: str) -> int:
    if not text.isdigit() or len(text) > 18:
        raise argparse.ArgumentTypeError(f"an audit entry's id, got {text!r}")
    return int(text)


def _serial(text: str) -> str:
    """A serial in any spelling openssl or a browser shows, as the store keeps it."""
    from estkit.pki.certs import parse_serial, serial_hex

    try:
        return serial_hex(parse_serial(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _duration(text: str) -> dt.timedelta:
    from estkit.durations import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _since(text: str) -> dt.timedelta | dt.datetime:
    """A duration back from now (``7d``) or an ISO 8601 time (no zone: UTC)."""
    from estkit.durations import EXAMPLES, parse_duration

    try:
        return parse_duration(text)
    except ValueError:
        pass
    try:
        at = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a duration ({EXAMPLES}) or an ISO 8601 time, got {text!r}"
        ) from None
    return at.replace(tzinfo=dt.UTC) if at.tzinfo is None else at.astimezone(dt.UTC)


# -- devices ---------------------------------------------------------------------------

DEVICES = _Listing(
    "devices",
    lambda d: _row(d.device_id, d.status.value, d.created_at, d.updated_at),
    device_json,
)


def cmd_device_list(args: argparse.Namespace) -> int:
    from estkit.store import DeviceStatus

    with _reading(args) as store:
        page = store.list_devices(
            status=DeviceStatus(args.status) if args.status else None,
            search=args.search,
            after=args.after,
            limit=args.limit,
        )
    return _print_page(DEVICES, page.items, page.next, as_json=args.json)


def cmd_device_show(args: argparse.Namespace) -> int:
    with _reading(args) as store:
        device = store.get_device(args.device_id)
        if device is None:
            raise CliError(f"no device {args.device_id!r}")
        certs = store.certificates_of(args.device_id)
    now = _now()
    if args.json:
        _print_json({**device_json(device), "certificates": [cert_json(c, now=now) for c in certs]})
        return 0
    print(f"device:       {device.device_id}")
    print(f"status:       {device.status.value}")
    print(f"created:      {_text(device.created_at)}")
    print(f"updated:      {_text(device.updated_at)}")
    if not certs:
        print("certificates: none")
        return 0
    print("certificates: serial, status, CA, label, not before, not after")
    for c in certs:
        status = cert_status(c, now=now)
        print(f"  {_row(c.serial, status, c.ca, c.label, c.not_before, c.not_after)}")
    return 0


# -- certificates ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CertFilter:
    """``--status`` and ``--expiring-within`` as the store's filters."""

    status: str | None  # the store's: valid or revoked
    expires_after: dt.datetime | None
    expires_before: dt.datetime | None


def cert_filter(
    status: str | None, *, expiring_within: dt.timedelta | None, now: dt.datetime
) -> CertFilter:
    """valid: not revoked, not_after ≥ now; expired: not revoked, not_after < now;
    expiring within D: now ≤ not_after < now + D, of any status unless ``status`` says."""
    ends = None if expiring_within is None else now + expiring_within
    after = now if status == "valid" or ends is not None else None
    before = now if status == "expired" else ends  # now < ends: expired and expiring is none
    return CertFilter("valid" if status == "expired" else status, after, before)


def _cert_listing(now: dt.datetime) -> _Listing:
    return _Listing(
        "certificates",
        lambda c: _row(c.serial, cert_status(c, now=now), c.device_id, c.ca, c.label, c.not_after),
        lambda c: cert_json(c, now=now),
    )


def cmd_cert_list(args: argparse.Namespace) -> int:
    from estkit.store import CertStatus

    now = _now()
    wanted = cert_filter(args.status, expiring_within=args.expiring_within, now=now)
    with _reading(args) as store:
        page = store.list_certificates(
            device_id=args.device,
            status=CertStatus(wanted.status) if wanted.status else None,
            expires_after=wanted.expires_after,
            expires_before=wanted.expires_before,
            ca=args.ca,
            after=args.after,
            limit=args.limit,
        )
    return _print_page(_cert_listing(now), page.items, page.next, as_json=args.json)


def cmd_cert_show(args: argparse.Namespace) -> int:
    from cryptography import x509

    from estkit.pki.certs import certs_to_pem

    with _reading(args) as store:
        record = store.get_certificate(args.serial)
    if record is None:
        raise CliError(f"no certificate {args.serial}")
    now = _now()
    pem = certs_to_pem([x509.load_der_x509_certificate(record.der)]).decode()
    if args.json:
        _print_json({**cert_json(record, now=now), "pem": pem})
        return 0
    for name, value in cert_json(record, now=now).items():
        shown = ", ".join(value) if isinstance(value, list) else value
        print(f"{name + ':':19}{_text(shown)}")
    if args.pem:
        sys.stdout.write(pem)
    return 0


# -- audit ------------------------------------------------------------------------------

AUDIT = _Listing(
    "audit entries",
    lambda e: _row(e.id, e.at, e.actor, e.action, e.outcome, e.device_id, e.serial, e.detail),
    audit_json,
)


def cmd_audit_list(args: argparse.Namespace) -> int:
    since = args.since
    if isinstance(since, dt.timedelta):
        since = _now() - since
    with _reading(args) as store:
        page = store.list_audit(
            since=since,
            actor=args.actor,
            device_id=args.device,
            serial=args.serial,
            action=args.action,
            outcome=args.outcome,
            after=args.after,
            limit=args.limit,
        )
    return _print_page(AUDIT, page.items, page.next, as_json=args.json)


# -- tokens, pending requests ---------------------------------------------------------------


def cmd_token_list(args: argparse.Namespace) -> int:
    with _reading(args) as store:
        tokens = store.list_tokens()  # a few API clients: no paging
    if args.json:
        _print_json([token_json(t) for t in tokens])
        return 0
    if not tokens:
        # On stderr: scripts read stdout as rows.
        print("no tokens", file=sys.stderr)
    for t in tokens:
        state = _token_state(t)
        expires = _text(t.expires_at) if t.expires_at else "never"
        used = _text(t.last_used_at) if t.last_used_at else "never"
        print(f"{t.name}\t{','.join(sorted(t.scopes))}\t{state}\texpires {expires}\tused {used}")
    return 0


def cmd_pending_list(args: argparse.Namespace) -> int:
    """Every request, not one page (the queue an operator works through), read from
    the store a page at a time."""
    from estkit.store import PendingStatus

    status = None if args.all else PendingStatus.PENDING
    requests: list[dict[str, Any]] = []
    count = 0
    with _reading(args) as store:
        after = None
        while True:
            page = store.list_pending(status=status, after=after, limit=500)
            count += len(page.items)
            for p in page.items:
                if args.json:
                    requests.append(pending_json(p))
                else:
                    print(
                        f"{p.id}\t{p.status.value}\t{p.label}\t{p.device_id}\t{p.operation}\t"
                        f"{_text(p.created_at)}\t{p.requested_by}"
                    )
            if page.next is None:
                break
            after = int(page.next)
    if args.json:
        _print_json(requests)
    elif count == 0:
        # On stderr: scripts read stdout as rows.
        print("no requests waiting" if status else "no requests", file=sys.stderr)
    return 0


# -- registration --------------------------------------------------------------------------


def _list_options(
    p: argparse.ArgumentParser, *, after: str, after_type: Callable[[str], object] = str
) -> None:
    p.add_argument(
        "--limit",
        type=_limit,
        default=DEFAULT_LIMIT,
        metavar="N",
        help=f"rows per page, 1-{MAX_LIMIT} (default %(default)s)",
    )
    p.add_argument(
        "--after",
        type=after_type,
        metavar=after,
        help=f"the page after {after} (stderr names it when more rows match)",
    )
    add_json_option(p)


def add_json_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="as JSON (timestamps ISO 8601, UTC)")


def _parser(sub: Any, name: str, *, help: str, description: str, epilog: str) -> Any:
    p = sub.add_parser(name, help=help, description=description, epilog=epilog)
    _data_dir_arg(p)
    return p


def register(*, device: Any, cert: Any, audit: Any) -> None:
    """Add the read commands to the ``device``, ``cert`` and ``audit`` subcommands."""
    p = _parser(
        device,
        "list",
        help="devices by id, with filters",
        description="Devices by id: id, status, created, updated.",
        epilog=list_epilog(),
    )
    p.add_argument("--status", choices=DEVICE_STATUSES)
    p.add_argument("--search", metavar="TEXT", help="devices whose id contains TEXT (any case)")
    _list_options(p, after="ID")
    _command(p, cmd_device_list)

    p = _parser(
        device,
        "show",
        help="a device, its status and its certificates",
        description="A device, its status, and every certificate issued to it: serial, "
        "status, CA, label, not before, not after.",
        epilog=_show_epilog("device"),
    )
    p.add_argument("device_id")
    add_json_option(p)
    _command(p, cmd_device_show)

    p = _parser(
        cert,
        "list",
        help="issued certificates by serial, with filters",
        description="Issued certificates by serial: serial, status, device, CA, label, not "
        "after. Status: valid, revoked, or expired (valid, but past its not after).",
        epilog=list_epilog(),
    )
    p.add_argument("--device", metavar="ID", help="of this device")
    p.add_argument("--status", choices=CERT_STATUSES)
    p.add_argument("--ca", metavar="NAME", help="issued by this CA (devices, bootstrap, ...)")
    p.add_argument(
        "--expiring-within",
        type=_duration,
        metavar="DURATION",
        help="not yet expired, and expiring within DURATION (30d, 12h, 2w); with "
        "--status valid: not revoked either",
    )
    _list_options(p, after="SERIAL", after_type=_serial)
    _command(p, cmd_cert_list)

    p = _parser(
        cert,
        "show",
        help="one certificate's record (--pem: and the certificate)",
        description="One certificate's record: device, CA, label, validity, status, who "
        "requested it and how. --json has the PEM in the field pem.",
        epilog=_show_epilog("certificate"),
    )
    p.add_argument("serial", type=_serial, help="hex, as openssl prints it (colons allowed)")
    p.add_argument("--pem", action="store_true", help="then print the certificate as PEM")
    add_json_option(p)
    _command(p, cmd_cert_show)

    p = _parser(
        audit,
        "list",
        help="audit entries, oldest first, with filters",
        description="Audit entries, oldest first: id, time, actor, action, outcome, device, "
        "serial, detail.",
        epilog=list_epilog(),
    )
    p.add_argument("--device", metavar="ID")
    p.add_argument("--serial", type=_serial)
    p.add_argument("--actor", help="exactly (cli:USER@HOST, cert:SERIAL, token:NAME, ...)")
    p.add_argument("--action", help="est-simpleenroll, revoke, device-add, approve, ...")
    p.add_argument("--outcome", help="ok, refused or pending")
    p.add_argument(
        "--since",
        type=_since,
        metavar="WHEN",
        help="a duration back from now (1h, 7d) or an ISO 8601 time (no zone: UTC)",
    )
    _list_options(p, after="ID", after_type=_entry_id)
    _command(p, cmd_audit_list)
