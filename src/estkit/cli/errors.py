"""The CLI's one error type: a message for one line on stderr, and an exit code.

Exit codes of ``estkit`` (sysexits.h numbers where one fits; README "Exit codes"):

====  =====================================================================
0     done
1     failed or refused (the line says why: unknown device, conflict, ...)
2     usage: bad arguments (argparse)
69    a server command on an install without ``estkit[server]``
71    a port the server should listen on cannot be bound
75    try again later (enrollment pending approval, server busy)
77    the agent was refused for good (revoked, decommissioned)
78    configuration invalid (``estkit.toml``, ``agent.toml``)
====  =====================================================================
"""

from __future__ import annotations

EXIT_FAILURE = 1
EXIT_NEEDS_SERVER = 69  # EX_UNAVAILABLE
EXIT_LISTEN = 71  # EX_OSERR
EXIT_TEMPFAIL = 75  # EX_TEMPFAIL
EXIT_CONFIG = 78  # EX_CONFIG

SERVER_EXTRA = "pip install 'estkit[server]'"


class CliError(Exception):
    def __init__(self, message: str, *, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.exit_code = exit_code
