"""``python -m bench.portal`` end to end, small: every portal page answers on a filled
store and the report names the slowest page and query."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_a_small_portal_bench_times_every_page(tmp_path: Path) -> None:
    out = tmp_path / "portal.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.portal", "--rows", "2000", "--repeat", "1",
         "--output", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,  # inside pytest-timeout (300 s); the run takes ≈ 15 s
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    pages = {p["name"]: p for p in report["pages"]}
    assert {"dashboard", "certificates", "device", "audit (newest first)", "API tokens"} <= set(
        pages
    )
    assert all(p["status"] == 200 and p["median_ms"] > 0 for p in pages.values())
    assert pages["dashboard"]["queries"] >= 5 and pages["dashboard"]["slowest_query"]
    assert report["rows"] == 2000 and report["audit_entries"] > report["rows"]
    assert report["audit_chain"]["status"] == 200
    assert report["audit_chain"]["says"].startswith("Hash chain intact: ")
    assert report["slowest_page"] in pages
    assert "portal: slowest page " in proc.stdout
