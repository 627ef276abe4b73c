"""The one duration grammar of estkit: server config, agent config, API and CLI.

``"90s"``, ``"15m"``, ``"1.5h"``, ``"30d"``, ``"2w"``, ``"10y"`` (365 days),
``"250ms"``, or a number of seconds (an int or float in TOML, digits in
text). A stdlib-only leaf, like ``fileio``: the device side imports it too.
"""

from __future__ import annotations

import datetime as dt
import re

__all__ = ["format_duration", "parse_duration"]

_GRAMMAR = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w|y)?\s*")
_SECONDS = {
    "ms": 0.001,
    "": 1,
    "s": 1,
    "m": 60,
    "h": 3600,
    "d": 86400,
    "w": 7 * 86400,
    "y": 365 * 86400,
}
EXAMPLES = "30d, 12h, 1.5h, 90s, 2w or 10y"
# Longer than any certificate could be asked to live, short of datetime's range.
_MAX = dt.timedelta(days=365 * 1000)


def parse_duration(value: object, *, allow_zero: bool = False) -> dt.timedelta:
    """``value`` as a duration; ``ValueError`` saying what was expected otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like {EXAMPLES}, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _GRAMMAR.fullmatch(value.lower())):
        seconds = float(match.group(1)) * _SECONDS[match.group(2) or ""]
    else:
        raise ValueError(f"expected a duration like {EXAMPLES}, got {value!r}")
    if seconds != seconds or seconds < 0 or (seconds == 0 and not allow_zero):
        raise ValueError(
            f"duration must be {'zero or ' if allow_zero else ''}positive, got {value!r}"
        )
    if seconds > _MAX.total_seconds():
        raise ValueError(f"duration {value!r} is too long")
    return dt.timedelta(seconds=seconds)


def format_duration(duration: dt.timedelta) -> str:
    """The shortest exact spelling in the grammar: ``30d``, ``12h``, ``90s``."""
    seconds = duration.total_seconds()
    for unit in ("w", "d", "h", "m", "s"):
        size = _SECONDS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
