"""The device agent: keeps a device's operational certificate renewed and its IoT Hub
connection on the current certificate, from the first enrollment until decommissioning.

    from estkit.agent import Agent, load_config

    agent = Agent(load_config(Path("agent.toml")), clock=lambda: datetime.now(UTC))
    exit_status = agent.run()          # until agent.request_stop()

Parts: ``config`` (the TOML file), ``state`` (the state directory with its
atomic swap and repair), ``renewal`` (one renewal, the retry maths),
``hooks``, ``hub`` (MQTT connection, imported only when ``[hub]`` is on), ``status``
(status.json), ``memory`` (freed memory back to the system), ``daemon``.
Errors: see ``estkit.agent.errors``.
"""

from estkit.agent.config import AgentConfig, duration_seconds, load_config, parse_config
from estkit.agent.daemon import EXIT_OK, EXIT_REFUSED, Agent, RenewOnce
from estkit.agent.errors import (
    AgentError,
    AlreadyRunning,
    ClockError,
    ConfigError,
    RenewalError,
    RenewalRefused,
    StateError,
    UnknownKeys,
)
from estkit.agent.renewal import Refusal, classify_refusal, clock_is_plausible, retry_delay
from estkit.agent.state import PAUSE_STEPS, RepairReport, StateDirectory, Version
from estkit.agent.status import read_status

__all__ = [
    "EXIT_OK",
    "EXIT_REFUSED",
    "PAUSE_STEPS",
    "Agent",
    "AgentConfig",
    "AgentError",
    "AlreadyRunning",
    "ClockError",
    "ConfigError",
    "Refusal",
    "RenewOnce",
    "RenewalError",
    "RenewalRefused",
    "RepairReport",
    "StateDirectory",
    "StateError",
    "UnknownKeys",
    "Version",
    "classify_refusal",
    "clock_is_plausible",
    "duration_seconds",
    "load_config",
    "parse_config",
    "read_status",
    "retry_delay",
]
