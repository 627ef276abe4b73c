"""``status.json`` in the state directory: what the agent last did, for ``estkit agent status``.

A flat JSON object, replaced atomically on every change so a reader never
sees half of it. Times are ISO 8601 UTC. It is a report, not the truth about
certificates: the truth is the ``current`` link, which ``status`` reads itself.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
from pathlib import Path
from typing import Any

from estkit.fileio import PRIVATE, replace_file

log = logging.getLogger(__name__)

# Agent states as reported.
RUNNING = "running"
STOPPED = "stopped"
REFUSED = "refused"  # the server refused the device for good; renewals stopped
CLOCK = "clock-refused"  # the clock is before the certificate's notBefore


def iso(when: dt.datetime | None) -> str | None:
    return None if when is None else when.astimezone(dt.UTC).isoformat(timespec="seconds")


def read_status(path: Path) -> dict[str, Any]:
    """The last status written, or ``{}`` when there is none or it cannot be read."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class StatusFile:
    """The status record, shared by the agent's threads; every update is written out."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._data = read_status(path)

    def get(self, key: str) -> Any:
        with self._lock:
            return self._data.get(key)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return json.loads(json.dumps(self._data))  # type: ignore[no-any-return]

    def update(self, **fields: Any) -> None:
        self._write(None, fields)

    def update_hub(self, **fields: Any) -> None:
        self._write("hub", fields)

    def _write(self, section: str | None, fields: dict[str, Any]) -> None:
        with self._lock:
            target = self._data
            if section is not None:
                nested = self._data.get(section)
                if not isinstance(nested, dict):
                    nested = self._data[section] = {}
                target = nested
            target.update(fields)
            self._data["updated_at"] = iso(dt.datetime.now(dt.UTC))
            text = json.dumps(self._data, indent=2, sort_keys=True) + "\n"
            try:
                replace_file(self._path, text.encode("utf-8"), mode=PRIVATE)
            except OSError as exc:
                # A full disk must not stop renewals; the next update tries again.
                log.warning("cannot write %s: %s", self._path, exc.strerror or exc)
