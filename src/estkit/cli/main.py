"""Entry point of the ``estkit`` command.

Each command group lives in its own module exposing ``register(subparsers)``;
a command's handler returns the exit status. Errors become one line on
stderr and a non-zero exit here, in one place (``-v`` shows the traceback);
the exit codes are listed in ``cli/errors.py``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from estkit import __version__
from estkit.cli.errors import CliError

# Each command group's module and the command words it registers. A command
# loads only its own group: the agent daemon runs for months and should not
# hold the server's or the factory's code in memory. Help and unknown words
# load them all. Server-side groups import server dependencies inside their
# handlers, so a device-only install (no estkit[server]) still runs the rest.
_GROUPS = {
    "estkit.cli.client_cmds": ("cacerts", "enroll", "reenroll", "csrattrs", "health"),
    "estkit.cli.factory_cmds": ("factory",),
    "estkit.cli.server_cmds": ("server", "ca", "device", "cert", "token", "audit", "pending"),
    "estkit.cli.agent_cmds": ("agent",),
    "estkit.cli.root_cmds": ("root",),
    "estkit.cli.iothub_cmds": ("iothub",),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser for ``command``'s group, or for every group when it names none."""
    parser = argparse.ArgumentParser(prog="estkit", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"estkit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show details and tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = [m for m, words in _GROUPS.items() if command in words] or list(_GROUPS)
    for name in modules:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    command = next((w for w in words if not w.startswith("-")), None)
    parser = build_parser(command)
    args = parser.parse_args(words)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        status: int = args.handler(args)
    except CliError as exc:
        if args.verbose:
            logging.exception("failed")
        print(f"estkit: {exc}", file=sys.stderr)
        return exc.exit_code
    except (OSError, ValueError) as exc:
        # Anything a handler did not translate still gets one line, not a traceback.
        if args.verbose:
            logging.exception("failed")
        print(f"estkit: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
