"""The README's main job, as a user runs it: `python train.py` on real Fashion-MNIST (slow)."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, needs_fashion


@pytest.mark.slow
@needs_fashion
def test_default_training_reaches_the_accuracy_goals(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "train.py", f"paths.log_dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=2400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = {
        m.group(1): float(m.group(3))
        for m in re.finditer(r"(TINY|LIGHT|MEDIUM|HEAVY)\s*│\s*([\d.]+)%[^│]*│[^│]*│\s*([\d.]+)%", proc.stdout)
    }
    assert set(table) == {"TINY", "LIGHT", "MEDIUM", "HEAVY"}, proc.stdout[-3000:]
    metrics_files = list(tmp_path.glob("train/runs/*/csv/*/metrics.csv"))
    assert len(metrics_files) == 1
    rows = [r for r in csv.DictReader(metrics_files[0].open()) if r.get("test/acc/heavy")]
    heavy, tiny = float(rows[-1]["test/acc/heavy"]), float(rows[-1]["test/acc/tiny"])
    assert table["HEAVY"] == pytest.approx(100 * heavy, abs=0.01)
    assert heavy >= 0.90, f"HEAVY test accuracy {heavy:.4f} < 0.90"
    assert tiny >= 0.85, f"TINY test accuracy {tiny:.4f} < 0.85"
    assert "routers (knob fitted on the calibration split)" in proc.stdout
