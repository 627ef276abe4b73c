"""``python -m bench.ocsp`` end to end, small: a real server answers from its cache and
the figure against issue 15's target is reported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_a_small_ocsp_bench_run_measures_responses_per_core(tmp_path: Path) -> None:
    out = tmp_path / "ocsp.json"
    proc = subprocess.run(
        [
            sys.executable, "-m", "bench.ocsp", "--devices", "4", "--connections", "2",
            "--requests", "400", "--seconds", "60", "--output", str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert (result["responses"], result["errors"], result["certificates"]) == (400, 0, 4)
    assert result["per_core"] > 0 and result["server_cpu_s"] > 0
    assert 0 < result["p50_ms"] <= result["p99_ms"]
    assert result["target"] == 2000 and isinstance(result["met"], bool)
    assert "responses per second per core from the cache" in proc.stdout
