"""What the demos (`make demo`, `make demo-fleet`) share: the timeline they print, an
agent run echoed on it, the agent's config and the life of the working directory."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))  # the estkit command as the tests run it

from estserver import ESTKIT  # noqa: E402


def short(serial: str) -> str:
    return serial[:8] + "…"


class Timeline:
    """Lines of ``[  12.3s] source  | text``, seconds since the demo started, one line at a
    time from any thread."""

    def __init__(self, *, source_width: int) -> None:
        self.start = time.monotonic()
        self._source_width = source_width
        self._lock = threading.Lock()

    def say(self, source: str, text: str) -> None:
        with self._lock:
            print(
                f"[{time.monotonic() - self.start:6.1f}s] {source:<{self._source_width}}| {text}",
                flush=True,
            )


class AgentRun:
    """``estkit agent run --config C``: its output kept in a log file, its log lines echoed
    on the timeline under ``name``, serials shortened.

    A subclass notes what it wants from each line in ``heard``; the reading starts in
    ``__init__``, so a subclass sets what ``heard`` uses before calling it.
    """

    _PREFIX = re.compile(r"^(INFO|WARNING|ERROR) estkit\.agent\.(\w+): ")
    _SERIAL = re.compile(r"\b([0-9A-F]{16,40})\b")

    def __init__(self, timeline: Timeline, name: str, config: Path, log_path: Path) -> None:
        self.timeline = timeline
        self.name = name
        self.log_path = log_path
        self.proc = subprocess.Popen(
            [*ESTKIT, "agent", "run", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def heard(self, part: str, text: str) -> bool:
        """Note a log line of the agent's ``part`` (renewal, hub, …); whether to echo it."""
        return True

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with self.log_path.open("w") as log:
            for line in self.proc.stdout:
                log.write(line)
                line = line.rstrip()
                match = self._PREFIX.match(line)
                if match is None:
                    continue
                level, part = match.groups()
                text = line[match.end() :]
                if not self.heard(part, text):
                    continue
                text = self._SERIAL.sub(lambda m: short(m.group(1)), text)
                self.timeline.say(self.name, f"{'' if level == 'INFO' else level + ': '}{text}")

    def exit_status(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._thread.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def agent_config(
    *,
    device_id: str,
    state_dir: Path,
    est_url: str,
    trust_anchor: Path,
    bootstrap: Path,
    est_extra: str = "",
    extra: str = "",
) -> str:
    """An agent's config for a device bootstrapped into ``bootstrap`` (cert, key and chain
    PEM files), retrying within seconds; ``est_extra`` is added to ``[est]``, ``extra`` at
    the end."""
    return f"""device_id = "{device_id}"
state_dir = "{state_dir}"
[est]
url = "{est_url}"
trust_anchor = "{trust_anchor}"
{est_extra}[bootstrap]
cert = "{bootstrap / "cert.pem"}"
key = "{bootstrap / "key.pem"}"
chain = "{bootstrap / "chain.pem"}"
[renewal]
retry_min = "1s"
retry_max = "5s"
{extra}"""


def run_in_workdir(
    timeline: Timeline, run: Callable[[Path], int], *, prefix: str, keep: bool
) -> int:
    """``run`` in a new temporary directory, removed afterwards unless ``keep``; its status,
    said on the timeline."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        code = run(workdir)
    finally:
        if keep:
            timeline.say("demo", f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    timeline.say("demo", "done" if code == 0 else "FAILED")
    return code
