"""benchmarks/bench_refine.py cannot rot: a dry run prints its table and both ratios, and its runs are
``stylegen.gatys`` runs (on_step sees exactly what a run of that many steps returns)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import torch

from stylegen.features import VGGFeatures
from stylegen.gatys import gatys_stylize

ROOT = Path(__file__).resolve().parents[1]


def test_on_step_sees_each_steps_image_as_a_shorter_run_returns_it():
    vgg = VGGFeatures("random", width=8)
    g = torch.Generator().manual_seed(0)
    c, s, x = (torch.rand(2, 3, 32, 32, generator=g) for _ in range(3))
    seen = {}
    last = gatys_stylize(c, s, vgg, steps=4, style_weight=3.0, lr=0.1, init=x, on_step=lambda k, y: seen.update({k: y}))
    assert sorted(seen) == [1, 2, 3, 4] and torch.equal(seen[4], last)
    assert torch.allclose(seen[2], gatys_stylize(c, s, vgg, steps=2, style_weight=3.0, lr=0.1, init=x), atol=1e-6)


def test_dry_run_prints_the_table_and_both_ratios():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_refine.py"), "--features", "random",
                        "--pairs", "2", "--steps", "2", "4"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| from the")]
    assert len(rows) == 3 and all(len(re.findall(r"\d\.\d{3}", line)) == 2 for line in rows), r.stdout
    assert re.search(r"^refine_4_vs_gatys_4: ours=\d\.\d{4} baseline=\d\.\d{4} ratio=\d+\.\d{3} ", r.stdout, re.M), r.stdout
    assert re.search(r"^warm_start_steps: ours=4 baseline[=>]\d+ ratio[=>]\d+\.\d{2} ", r.stdout, re.M), r.stdout
