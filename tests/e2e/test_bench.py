"""``gradstream bench --quick`` runs every contender and prints the table (a smoke test)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_bench_quick_prints_the_table_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "gradstream.client.cli", "bench", "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert "--quick: smoke test only" in result.stdout
    for scenario in ("small", "medium", "large"):
        assert scenario in result.stdout
    assert result.stdout.count("service/loop") == 3
    data = json.loads(out.read_text())
    assert data["quick"] is True
    for name in ("small", "medium", "large"):
        r = data["results"][name]
        assert r["loop"]["steps_per_s"] > 0
        assert r["raw"]["bytes_per_s"] > 0
        assert r["service"]["steps_per_s"] > 0
        assert 0 < r["service"]["latency_p50_s"] <= r["service"]["latency_p99_s"]
        assert r["service"]["server_rss_bytes"] > 10_000_000
        assert r["shm"]["steps_per_s"] > 0
        assert r["service_vs_loop"] == r["service"]["steps_per_s"] / r["loop"]["steps_per_s"]
        assert r["shm_vs_raw"] == r["shm"]["bytes_per_s"] / r["raw"]["bytes_per_s"]
