"""``make bench`` end to end, small: every scenario runs against a real server and reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def test_a_small_bench_run_measures_every_scenario(tmp_path: Path) -> None:
    """Every scenario, SQLite and PostgreSQL, the scale comparisons on 2,000 rows."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable, "-m", "bench.run",
            "--operations", "cacerts", "simpleenroll", "simplereenroll", "serverkeygen",
            "--concurrency", "2", "--workers", "1", "--devices", "4",
            "--requests", "20", "--seconds", "120",
            "--scale", "2000", "--rounds", "2", "--soak", "1000", "--soak-seconds", "120",
            "--postgresql", "--no-agent", "--quiet-wait", "0", "--output", str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=280,  # inside pytest-timeout (300 s); the run takes ≈ 35 s
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    rows = {(r["scenario"], r["database"], r["nodes"], r["operation"]): r for r in report["rows"]}
    for operation in ("cacerts", "simpleenroll", "simplereenroll", "serverkeygen"):
        row = rows[("empty store", "sqlite", 1, operation)]
        assert (row["requests"], row["errors"]) == (20, 0), row
        assert row["server_cpu_ms"] > 0 and row["client_cpu_ms"] > 0
        assert 0 < row["p50_ms"] <= row["p99_ms"]
        assert 0 < row["rss_before_mb"] <= row["rss_peak_mb"]
    _check_backends(report, rows)
    assert "postgresql: CPU per enrollment" in proc.stdout
    (keygen,) = report["serverkeygen"]
    assert (
        keygen["serverkeygen_server_cpu_ms"]
        == rows[("empty store", "sqlite", 1, "serverkeygen")]["server_cpu_ms"]
    )
    assert "serverkeygen vs simpleenroll" in proc.stdout
    # The scale comparison: a baseline copy without the bulk rows, interleaved; on
    # SQLite and on PostgreSQL.
    for database, scale in (
        ("sqlite", report["scale"]),
        ("postgresql", report["postgresql"]["scale"]),
    ):
        base = rows[("scale baseline", database, 1, "simpleenroll")]
        scaled = rows[("scale", database, 1, "simpleenroll")]
        assert base["errors"] == scaled["errors"] == 0
        assert base["requests"] > 0 and scaled["requests"] > 0
        assert scaled["store_rows"] == base["store_rows"] + 2000
        assert scale["baseline_rows"] == base["store_rows"]
        assert isinstance(scale["throughput_change_percent"], float)
        assert {q["via"] for q in scale["queries"]} == {"store", "rest"}
        assert all(q["rows"] > 0 for q in scale["queries"])
    assert report["postgresql"]["scale"]["fill"]["rows"] == 2000
    assert isinstance(report["postgresql"]["scale"]["queries_met"], bool)
    soak = report["soak"]
    assert soak["handshakes"] == 1000 and isinstance(soak["growth_percent"], float)
    assert "scenario" in proc.stdout  # the table was printed


def _check_backends(report: dict[str, Any], rows: dict[tuple[str, str, int, str], Any]) -> None:
    """SQLite, one PostgreSQL node and two, side by side: PostgreSQL's CPU is counted."""
    sqlite = rows[("backends", "sqlite", 1, "simpleenroll")]
    one = rows[("backends", "postgresql", 1, "simpleenroll")]
    two = rows[("backends", "postgresql", 2, "simpleenroll")]
    for row in (sqlite, one, two):
        assert (row["requests"], row["errors"], row["workers"]) == (20, 0, 1), row
    assert sqlite["db_cpu_ms"] == 0
    # PostgreSQL's processes are counted (in clock ticks: summed over its rows, not one).
    pg_rows = [r for r in rows.values() if r["database"] == "postgresql"]
    assert len(pg_rows) == 4 and sum(r["db_cpu_ms"] for r in pg_rows) > 0
    assert all(r["server_cpu_ms"] >= r["db_cpu_ms"] for r in pg_rows)
    compare = report["postgresql"]["compare"]
    assert report["postgresql"]["settings"]["fsync"] == "on"
    assert compare["cpu_ratio"] == round(one["server_cpu_ms"] / sqlite["server_cpu_ms"], 3)
    assert (
        compare["matrix_sqlite_server_cpu_ms"]
        == rows[("empty store", "sqlite", 1, "simpleenroll")]["server_cpu_ms"]
    )
    assert compare["two_nodes_rps"] == two["rps"] and compare["one_node_rps"] == one["rps"]
    assert (compare["speedup_target"] is None) is (compare["nproc"] < 4)


def test_a_short_basic_flood_reports_rss_and_mtls_p50(tmp_path: Path) -> None:
    """``bench.basic_flood`` end to end, small (≈ 8 s): the figures, not the verdict
    (a 3-second flood on a busy test machine says nothing about the limits)."""
    out = tmp_path / "flood.json"
    proc = subprocess.run(
        [
            sys.executable, "-m", "bench.basic_flood",
            "--seconds", "3", "--threads", "4", "--enrollments", "30", "--devices", "2",
            "--output", str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )  # fmt: skip
    assert proc.returncode in (0, 1), proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["idle"]["ok"] > 0 and report["under_flood"]["ok"] > 0
    assert 0 < report["idle_rss_mb"] <= report["flood_peak_rss_mb"]
    assert report["flood_statuses"].get("429", 0) > 0  # the wrong secrets were limited
    assert report["passed"] is (proc.returncode == 0)
    assert "verdict:" in proc.stdout
