"""The benchmark (bench/run.py) runs from a fresh clone and prints its table.

A smoke test in quick mode (3 rounds, no image): it proves the benchmark works, not that the
probe is fast. Times are never asserted; the one ratio checked has a bound wide enough for a
loaded machine and still catches a probe that waits for nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_benchmark_completes_and_prints_every_figure(tmp_path: Path) -> None:
    raw = tmp_path / "bench.json"
    markdown = tmp_path / "bench.md"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--no-image",
         "--json", str(raw), "--output", str(markdown)],
        cwd=ROOT, capture_output=True, text=True, timeout=170,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = proc.stdout
    assert "| # | figure | median |" in table
    for item in (
        "| 1 | HTTP, `python tracking.py`",
        "| 2 |",
        "| 3 | blackhole",
        "| 4 | peak RSS",
        "| 5 | start-up",
        "| 6 | image",
        "| module | imported by |",
        "Machine: ",
    ):
        assert item in table, item
    assert "| tracking | (the statement) |" in table
    assert markdown.read_text() == table.rstrip("\n") + "\n"

    results = json.loads(raw.read_text())
    runs = results["cases"]
    for name, case_runs in runs.items():
        assert case_runs and all(run["ok"] for run in case_runs), (name, case_runs)
    assert set(results["targets"]) >= {"1 http", "2 fan-out", "3 blackhole"}

    def median_delivered(name: str) -> float:
        values = sorted(run["delivered"] for run in runs[name])
        return values[len(values) // 2]

    scheme = "https" if "probe https x1" in runs else "http"
    assert median_delivered("probe %s x1" % scheme) < 5 * median_delivered("floor %s x1" % scheme)


def test_help_names_the_options() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    for option in ("--runs", "--quick", "--no-image", "--json", "--output"):
        assert option in proc.stdout
