"""Agent commands: ``agent run`` (the daemon), ``agent status``, ``agent renew``.

Exit statuses: 0 done; 1 failed; 75 the server still has the enrollment
pending (``renew``); 77 the server refused the device for good, revoked or
decommissioned (``run``, ``renew``: a service manager must not restart it);
78 the config is wrong. ``status`` exits 1 when the device has no valid
certificate or its renewals were refused.

Two environment variables are test and diagnosis knobs, read only here:

``ESTKIT_AGENT_CLOCK_OFFSET``
    seconds added to the wall clock the agent acts on (``-86400``: a device
    that booted with its clock a day behind).
``ESTKIT_AGENT_PAUSE_AT``
    a step of the certificate swap (``archive-written``, ``link-created``,
    ``link-renamed``, ``before-prune``) at which the agent stops itself with
    SIGSTOP, so that a test can kill it exactly there.
"""

from __future__ import annotations

import argparse
import datetime as dt
import fcntl
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from estkit.cli.errors import CliError

EXIT_PENDING = 75
EXIT_REFUSED = 77
EXIT_CONFIG = 78
CLOCK_OFFSET_VAR = "ESTKIT_AGENT_CLOCK_OFFSET"
PAUSE_AT_VAR = "ESTKIT_AGENT_PAUSE_AT"

log = logging.getLogger("estkit.agent")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument(
        "--config", type=Path, required=True, metavar="FILE", help="agent config (TOML)"
    )
    agent = subparsers.add_parser(
        "agent", help="device agent: keep the certificate renewed and the hub connected"
    ).add_subparsers(dest="agent_command", required=True, metavar="ACTION")

    p = agent.add_parser(
        "run", parents=[config], help="run the agent until SIGTERM (or a final refusal)"
    )
    p.set_defaults(handler=_run)
    p = agent.add_parser(
        "status", parents=[config], help="current certificate, next renewal, last error"
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=_status)
    p = agent.add_parser("renew", parents=[config], help="renew now if due (once, then exit)")
    p.add_argument("--force", action="store_true", help="renew even if not yet due")
    p.set_defaults(handler=_renew)


# -- handlers --------------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    from estkit.agent import Agent, AgentError, ConfigError

    config = _config(args)
    logging.getLogger("estkit.agent").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    agent = Agent(config, clock=_clock(), pause=_pause())

    def stop(signum: int, frame: object) -> None:
        # Not inline: the handler may interrupt the main thread while it holds the lock
        # that request_stop needs.
        threading.Thread(target=agent.request_stop, name="estkit-stop").start()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return agent.run()
    except ConfigError as exc:
        raise CliError(f"{config.path}: {exc}", exit_code=EXIT_CONFIG) from exc
    except AgentError as exc:
        raise CliError(str(exc)) from exc
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _renew(args: argparse.Namespace) -> int:
    from estkit.agent import Agent, AgentError, ConfigError, RenewalError, RenewalRefused

    config = _config(args)
    agent = Agent(config, clock=_clock(), pause=_pause())
    try:
        result = agent.renew_once(force=args.force)
    except ConfigError as exc:
        raise CliError(f"{config.path}: {exc}", exit_code=EXIT_CONFIG) from exc
    except RenewalRefused as exc:
        raise CliError(f"refused for good: {exc}", exit_code=EXIT_REFUSED) from exc
    except RenewalError as exc:
        code = EXIT_PENDING if exc.retry_after is not None else 1
        raise CliError(f"renewal failed: {exc}", exit_code=code) from exc
    except AgentError as exc:
        raise CliError(str(exc)) from exc
    if result.renewal is None:
        assert result.current is not None and result.due is not None
        print(
            f"not due: certificate {result.current.serial} valid until "
            f"{result.current.not_after.isoformat()}, renewal due at {result.due.isoformat()} "
            "(--force renews now)"
        )
        return 0
    renewal = result.renewal
    version = renewal.version
    print(
        f"renewed ({renewal.operation} with the {renewal.authenticated_with} certificate): "
        f"serial {version.serial}, version {version.number}, valid until "
        f"{version.not_after.isoformat()}"
    )
    return 0


def _status(args: argparse.Namespace) -> int:
    from estkit.agent import StateDirectory, read_status

    config = _config(args)
    state = StateDirectory(config.state_dir)
    recorded = read_status(state.status_path)
    current = state.current()
    now = _clock()()
    report: dict[str, Any] = {
        "device_id": config.device_id,
        "state_dir": str(config.state_dir),
        "running": _agent_running(state.root / "agent.pid"),
        "state": recorded.get("state"),
        "pid": recorded.get("pid"),
        "certificate": None,
        "next_renewal": recorded.get("next_renewal"),
        "last_renewal": recorded.get("last_renewal"),
        "renewals": recorded.get("renewals", 0),
        "failures": recorded.get("failures", 0),
        "last_error": recorded.get("last_error"),
        "last_hooks": recorded.get("last_hooks"),
        "refused": recorded.get("refused"),
        "hub": recorded.get("hub"),
        "updated_at": recorded.get("updated_at"),
    }
    if current is not None:
        report["certificate"] = {
            "version": current.number,
            "serial": current.serial,
            "subject": current.certificate.subject.rfc4514_string(),
            "not_before": current.not_before.isoformat(),
            "not_after": current.not_after.isoformat(),
            "valid": current.not_before <= now <= current.not_after,
            "expires_in": round((current.not_after - now).total_seconds()),
            "fullchain": str(state.current_link / "fullchain.pem"),
            "key": str(state.current_link / "key.pem"),
        }
    if isinstance(report["hub"], dict) and not report["running"]:
        report["hub"]["connected"] = False  # whatever a killed agent last wrote
    healthy = bool(current is not None and report["certificate"]["valid"]) and not report["refused"]
    if args.json:
        json.dump(report, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(_status_text(report))
    return 0 if healthy else 1


# -- helpers ---------------------------------------------------------------------


def _config(args: argparse.Namespace) -> Any:
    from estkit.agent import ConfigError, load_config

    try:
        return load_config(args.config)
    except ConfigError as exc:
        raise CliError(f"{args.config}: {exc}", exit_code=EXIT_CONFIG) from exc


def _clock() -> Any:
    text = os.environ.get(CLOCK_OFFSET_VAR, "").strip()
    try:
        offset = dt.timedelta(seconds=float(text)) if text else dt.timedelta(0)
    except ValueError:
        raise CliError(f"{CLOCK_OFFSET_VAR} must be a number of seconds, got {text!r}") from None
    if offset:
        log.warning("%s=%s: acting on a shifted clock", CLOCK_OFFSET_VAR, text)

    def now() -> dt.datetime:
        return dt.datetime.now(dt.UTC) + offset

    return now


def _pause() -> Any:
    from estkit.agent import PAUSE_STEPS

    step = os.environ.get(PAUSE_AT_VAR, "").strip()
    if not step:
        return lambda _step: None
    if step not in PAUSE_STEPS:
        raise CliError(f"{PAUSE_AT_VAR} must be one of {', '.join(PAUSE_STEPS)}, got {step!r}")

    def pause(reached: str) -> None:
        if reached == step:
            log.warning("%s: stopping at %s (pid %d)", PAUSE_AT_VAR, step, os.getpid())
            os.kill(os.getpid(), signal.SIGSTOP)

    return pause


def _agent_running(pid_file: Path) -> bool:
    try:
        fd = os.open(pid_file, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def _status_text(report: dict[str, Any]) -> str:
    lines = [f"device:        {report['device_id']}"]
    cert = report["certificate"]
    if cert is None:
        lines.append("certificate:   none (not enrolled yet)")
    else:
        left = _duration(cert["expires_in"])
        validity = f"expires in {left}" if cert["expires_in"] > 0 else f"EXPIRED {left} ago"
        lines.append(
            f"certificate:   serial {cert['serial']} (version {cert['version']}), "
            f"valid until {cert['not_after']} ({validity})"
        )
    lines.append(f"next renewal:  {report['next_renewal'] or '-'}")
    running = "running" if report["running"] else "not running"
    lines.append(f"agent:         {running}, last state {report['state'] or '-'}")
    last = report["last_renewal"]
    if last:
        lines.append(
            f"last renewal:  {last.get('at')} ({last.get('operation')} with the "
            f"{last.get('authenticated_with')} certificate)"
        )
    if report["refused"]:
        lines.append(
            f"REFUSED:       {report['refused'].get('code') or 'no code'}: "
            f"{report['refused'].get('reason')} (at {report['refused'].get('at')}); "
            "renewals stopped"
        )
    error = report["last_error"]
    lines.append(
        f"last error:    {error['message'] + ' (at ' + error['at'] + ')' if error else '-'}"
    )
    hub = report["hub"]
    if hub:
        connected = bool(hub.get("connected"))
        state = "connected" if connected else "disconnected"
        detail = f" with serial {hub.get('serial')}" if connected else ""
        if hub.get("last_error"):
            detail += f"; last error: {hub['last_error']}"
        lines.append(f"hub:           {state}{detail}")
    return "\n".join(lines) + "\n"


def _duration(seconds: float) -> str:
    s = abs(int(seconds))
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    if s < 172800:
        return f"{s // 3600} h"
    return f"{s // 86400} d"
