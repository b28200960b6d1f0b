"""Smoke test of scripts/bench.py: one quick round end to end, no timing assertions."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

BENCH = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"


@pytest.mark.launcher  # its two-process settings run under mpiexec and torchrun
def test_bench_quick_run_writes_its_report(tmp_path: Path) -> None:
    out = tmp_path / "bench-out"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--rounds", "1", "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name in ("results.md", "results.json", "step_times.png"):
        assert (out / name).stat().st_size > 0, name
    doc = json.loads((out / "results.json").read_text())
    # every part ran, the two-process ones through their launchers
    assert {s: r["status"] for s, r in doc["settings"].items()} == {
        "local": "ok", "mpirun": "ok", "torchrun": "ok"}, proc.stderr[-4000:]
    assert {t["verdict"] for t in doc["targets"]} <= {"PASS", "MISS"}
    # the run (and its launchers' children) had glibc's malloc thresholds fixed
    assert doc["meta"]["malloc"].startswith("MALLOC_MMAP_THRESHOLD_="), doc["meta"]["malloc"]
    assert "syncbn_gloo" in doc["settings"]["torchrun"]["peers"]
    report = (out / "results.md").read_text()
    assert "## Targets" in report and report in proc.stdout
