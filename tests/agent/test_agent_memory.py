"""The agent at rest: what it imports, and freed memory handed back to the system."""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
from collections.abc import Callable

import pytest

from estkit.agent import memory


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_the_agent_without_a_hub_imports_neither_mqtt_nor_cryptographys_smime() -> None:
    # What idle code never needs stays out of the daemon's memory: paho-mqtt only with
    # [hub], cryptography's pkcs7 (and email's S/MIME parts) not at all on a device.
    code = "import json, sys, estkit.agent\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    modules = set(json.loads(done.stdout))
    assert "estkit.agent.daemon" in modules
    assert not {m for m in modules if m == "paho" or m.startswith("paho.")}
    assert "estkit.agent.hub" not in modules
    assert "cryptography.hazmat.primitives.serialization.pkcs7" not in modules


def test_release_returns_freed_heap_pages_to_the_system() -> None:
    # 40 MB in blocks below glibc's mmap threshold, the last one kept: free() alone cannot
    # shrink the heap past it, so the freed pages stay resident until malloc_trim.
    blocks = [b"x" * 100_000 for _ in range(400)]
    kept = blocks[-1]
    del blocks
    before = resident_bytes()
    memory.release_free_memory()
    assert before - resident_bytes() > 20_000_000
    assert kept[-1:] == b"x"


def answers(value: str | None) -> Callable[[str], str | None]:
    return lambda name: value


def raises(exc: Exception) -> Callable[[str], str | None]:
    def confstr(name: str) -> str | None:
        raise exc

    return confstr


@pytest.mark.parametrize(
    ("confstr", "trims"),
    [
        (answers("glibc 2.36"), True),
        (answers(None), False),
        (answers("musl"), False),
        (raises(ValueError("unrecognized configuration name")), False),
        (raises(OSError(22, "Invalid argument")), False),
    ],
    ids=["ok/glibc", "ok/undefined", "ok/other-libc", "ok/unknown-name", "ok/einval"],
)
def test_release_calls_malloc_trim_only_on_glibc(
    monkeypatch: pytest.MonkeyPatch, confstr: Callable[[str], str | None], trims: bool
) -> None:
    calls: list[int] = []

    class FakeLibc:
        def malloc_trim(self, pad: int) -> int:
            calls.append(pad)
            return 1

    monkeypatch.setattr(memory.os, "confstr", confstr)
    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibc())
    memory.release_free_memory()
    assert calls == ([0] if trims else [])
