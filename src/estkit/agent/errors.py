"""Errors of the device agent: one root, translated to exit statuses in ``cli/agent_cmds``.

AgentError
├── ConfigError      the config is unusable (``field`` names the key: ``renewal.fraction``)
│   └── UnknownKeys  keys the agent does not know (``keys``: each one, ``table.key``)
├── StateError       the state directory cannot be used (permissions, a foreign file)
├── AlreadyRunning   another agent holds the state directory
├── ClockError       the clock is before the certificate's notBefore minus the tolerance
├── RenewalError     a renewal attempt failed; try later (``retry_after`` if the server said)
└── RenewalRefused   the server refused the device for good (revoked, decommissioned)
"""

from __future__ import annotations

from collections.abc import Sequence


class AgentError(Exception):
    """Root of the agent's errors."""


class ConfigError(AgentError):
    """A config value is missing or wrong; the message starts with the field's name."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}" if field else reason)
        self.field = field
        self.reason = reason


class UnknownKeys(ConfigError):
    """The config has keys the agent does not read (a typo would silently keep a default)."""

    def __init__(self, keys: Sequence[str]) -> None:
        if not keys:
            raise ValueError("UnknownKeys needs at least one key")
        listed = ", ".join(repr(k) for k in keys)
        super().__init__("", f"unknown key{'s' if len(keys) > 1 else ''} {listed}")
        self.field = keys[0]
        self.keys = tuple(keys)


class StateError(AgentError):
    """The state directory cannot be read or written as the agent needs."""


class AlreadyRunning(AgentError):
    """Another agent process holds the state directory's lock."""


class ClockError(AgentError):
    """The local clock is implausibly early: acting on it could discard a good certificate."""


class RenewalError(AgentError):
    """One renewal attempt failed; the current certificate stays in use.

    ``retry_after`` is the server's own delay (202 pending), when it gave one;
    ``slow`` marks failures that retrying soon cannot fix (a refusal that is not
    final, a bad local file), so the next attempt waits the longest backoff.
    """

    def __init__(self, message: str, *, retry_after: float | None = None, slow: bool = False):
        super().__init__(message)
        self.retry_after = retry_after
        self.slow = slow


class RenewalRefused(AgentError):
    """The server refused this device for good (``reason`` is its text, ``code`` its
    refusal code when it sent one): renewals stop."""

    def __init__(self, reason: str, code: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code
