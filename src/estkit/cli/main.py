"""Entry point of the ``estkit`` command.

Each command group lives in its own module exposing ``register(subparsers)``;
a command's handler returns the exit status. Errors become one line on
stderr and a non-zero exit here, in one place (``-v`` shows the traceback).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from estkit import __version__
from estkit.cli import client_cmds
from estkit.cli.errors import CliError

# Server-side command groups import server dependencies lazily inside their
# handlers, so a device-only install (no estkit[server]) can still run the client.
_GROUPS = ("estkit.cli.factory_cmds", "estkit.cli.server_cmds", "estkit.cli.agent_cmds")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="estkit", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"estkit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show details and tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    client_cmds.register(sub)
    import importlib

    for name in _GROUPS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
