"""Argument types and options shared by the command groups: a bad value is one argparse
error line."""

from __future__ import annotations

import argparse
from typing import Any


def positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text}")
    return value


def add_retry_options(group: Any, *, total: str) -> None:
    """``--timeout``, ``--total-timeout`` and ``--retries`` of the HTTP client core
    (``client.http.RetryPolicy``; its defaults). ``total`` says what the total covers."""
    group.add_argument(
        "--timeout",
        type=positive_number,
        default=20.0,
        metavar="S",
        help="per attempt (default: %(default)g)",
    )
    group.add_argument(
        "--total-timeout",
        type=positive_number,
        default=60.0,
        metavar="S",
        help=f"{total} (default: %(default)g)",
    )
    group.add_argument(
        "--retries", type=non_negative_int, default=3, metavar="N", help="default: %(default)s"
    )
