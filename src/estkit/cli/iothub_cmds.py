"""``estkit iothub sync``: the IoT Hub outbox's backlog, and sending it now.

The server sends the outbox by itself (``server/hubsync.py``); this command shows
what is waiting (pending changes, failed ones with the reason, the last change the
hub took), sends every pending change now, whatever its backoff says, one line each,
and with ``--retry-failed`` the failed ones too. Changes a running server is sending
at that moment are left to it.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
from typing import TYPE_CHECKING, Any

from estkit.cli.errors import EXIT_CONFIG, EXIT_FAILURE, EXIT_TEMPFAIL, CliError
from estkit.cli.read_cmds import _iso, _reading
from estkit.cli.server_cmds import _command, _data_dir_arg, _load, _now

if TYPE_CHECKING:
    from estkit.server.hubsync import Sent
    from estkit.store.outbox import Backlog, OutboxEntry

SYNC_EPILOG = (
    "exit status: 0 nothing left pending or failed; 1 changes the hub refused for good remain "
    "failed (each line says why; fix it, then --retry-failed), or the database cannot be "
    "read; 2 bad arguments; 75 changes are still pending (the hub could not take them now, "
    "or a running server is sending them): the server goes on retrying, or run this again; "
    "78 no [iothub] section, or its key or trust anchor cannot be read"
)


def cmd_iothub_sync(args: argparse.Namespace) -> int:
    from estkit.server.config import ConfigError
    from estkit.server.hubsync import HubSender, registry_client

    config = _load(args)
    hub = config.iothub
    if hub is None:
        raise CliError(
            f"{args.data_dir}/estkit.toml has no [iothub] section: nothing is synced "
            '(README "IoT Hub registry sync")',
            exit_code=EXIT_CONFIG,
        )
    with _reading(args) as store:
        outbox = store.hub_outbox()
        before = outbox.backlog()
        if not args.json:
            _print_backlog(hub.host, before)
        sent: list[Sent] = []
        if not args.dry_run:
            try:
                client = registry_client(hub, clock=_now)
            except ConfigError as exc:
                raise CliError(str(exc), exit_code=EXIT_CONFIG) from None
            sender = HubSender(
                outbox,
                client,
                create_identities=hub.create_identities,
                owner=f"cli:{os.getpid()}:{secrets.token_hex(4)}",
                clock=_now,
            )
            with client:
                if args.retry_failed:
                    outbox.retry_failed(now=_now())
                after = 0
                while (result := sender.send_next(due_only=False, after=after)) is not None:
                    after = result.entry.id
                    sent.append(result)
                    if not args.json:
                        print(_sent_line(result))
        left = outbox.backlog() if not args.dry_run else before
    if args.json:
        print(
            json.dumps(
                {
                    "hub": hub.host,
                    "before": _backlog_json(before),
                    "sent": [_sent_json(s) for s in sent],
                    "after": _backlog_json(left),
                },
                indent=2,
            )
        )
    elif not args.dry_run:
        print(f"now: {left.pending} pending, {left.failed_count} failed")
    if left.failed_count:
        return EXIT_FAILURE
    return EXIT_TEMPFAIL if left.pending else 0


def _change(entry: OutboxEntry) -> str:
    c = entry.change
    return f"#{entry.id} {c.device_id} {c.status.value} ({c.cause})"


def _print_backlog(host: str, backlog: Backlog) -> None:
    oldest = backlog.oldest_pending
    since = f", oldest {_iso(oldest.created_at)}" if oldest is not None else ""
    last = backlog.last_success
    success = f"{_iso(last.done_at)} ({_change(last)})" if last is not None else "none yet"
    print(f"IoT Hub {host}: {backlog.pending} pending{since}; {backlog.failed_count} failed")
    print(f"last success: {success}")
    for entry in backlog.failed:
        print(f"failed: {_change(entry)}, {entry.attempts} attempt(s): {entry.last_error}")
    if backlog.failed_count > len(backlog.failed):
        print(f"failed: … and {backlog.failed_count - len(backlog.failed)} more")


def _sent_line(sent: Sent) -> str:
    what = _change(sent.entry)
    if sent.result.value == "sent":
        return f"{what}: sent ({sent.detail})"
    if sent.result.value == "skipped":
        return f"{what}: not written ({sent.detail})"
    if sent.result.value == "retry":
        return f"{what}: not sent, retried from {_iso(sent.next_attempt_at)}: {sent.detail}"
    return f"{what}: failed: {sent.detail}"


def _entry_json(entry: OutboxEntry) -> dict[str, Any]:
    return {
        "id": entry.id,
        "device_id": entry.change.device_id,
        "status": entry.change.status.value,
        "cause": entry.change.cause,
        "state": entry.state.value,
        "created_at": _iso(entry.created_at),
        "attempts": entry.attempts,
        "next_attempt_at": _iso(entry.next_attempt_at),
        "last_attempt_at": _iso(entry.last_attempt_at),
        "last_error": entry.last_error,
        "done_at": _iso(entry.done_at),
    }


def _backlog_json(backlog: Backlog) -> dict[str, Any]:
    return {
        "pending": backlog.pending,
        "oldest_pending": _entry_json(backlog.oldest_pending) if backlog.oldest_pending else None,
        "failed_count": backlog.failed_count,
        "failed": [_entry_json(e) for e in backlog.failed],
        "last_success": _entry_json(backlog.last_success) if backlog.last_success else None,
    }


def _sent_json(sent: Sent) -> dict[str, Any]:
    return {
        **_entry_json(sent.entry),
        "result": sent.result.value,
        "detail": sent.detail,
        "next_attempt_at": _iso(sent.next_attempt_at),
    }


def register(sub: Any) -> None:
    iothub = sub.add_parser(
        "iothub", help="Azure IoT Hub registry sync: its backlog, and sending it now"
    ).add_subparsers(dest="iothub_command", required=True, metavar="ACTION")
    p = iothub.add_parser(
        "sync",
        help="show the changes waiting for the hub's registry, and send them now",
        description="Show what waits for the hub's identity registry (pending changes, failed "
        "ones with the reason, the last change the hub took), then send every pending change "
        "now, whatever its backoff says, one line each. A running server sends them by itself; "
        "a change it is sending at that moment is left to it.",
        epilog=SYNC_EPILOG,
    )
    _data_dir_arg(p)
    p.add_argument(
        "--retry-failed",
        action="store_true",
        help="send the changes the hub refused for good again too (after fixing the cause)",
    )
    p.add_argument("--dry-run", action="store_true", help="show the backlog only; send nothing")
    p.add_argument("--json", action="store_true", help="as one JSON object")
    _command(p, cmd_iothub_sync)
