"""benchmarks/quality_sets.py cannot rot: its pairs are the splits it names (the eval set is
``stylegen eval``'s own pairs) and a dry run prints a ratio row per set."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import quality_sets  # noqa: E402

from stylegen.data.embedded import ensure_embedded  # noqa: E402
from stylegen.evaluate import load_eval_pairs  # noqa: E402


def test_eval_set_is_stylegen_evals_pairs_and_mixed_sets_take_each_side_from_its_split():
    shards = ensure_embedded()
    (c_attr, c_split), (s_attr, s_split) = quality_sets.SETS["eval x eval"]
    got = quality_sets.pairs((str(getattr(shards, c_attr)), c_split), (str(getattr(shards, s_attr)), s_split), 4)
    want = load_eval_pairs(argparse.Namespace(content_shards=[], style_shards=[], pairs=4), 64)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    (c_attr, c_split), (s_attr, s_split) = quality_sets.SETS["train x eval"]
    c, s = quality_sets.pairs((str(getattr(shards, c_attr)), c_split), (str(getattr(shards, s_attr)), s_split), 4)
    assert c.shape == s.shape == (4, 3, 64, 64) and c.dtype == torch.uint8
    # a new style on a training content: the styles are the eval styles' pixels, the contents are not eval's
    every_eval_style = quality_sets.pairs((str(shards.eval_style_dir), "val"), (str(shards.eval_style_dir), "val"), 50)
    eval_styles = {bytes(x.numpy()) for half in every_eval_style for x in half}  # all 100 eval style crops
    assert {bytes(x.numpy()) for x in s} <= eval_styles
    assert not {bytes(x.numpy()) for x in c} & {bytes(x.numpy()) for x in want[0]}


def test_dry_run_prints_a_ratio_row_per_set():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quality_sets.py"), "--features", "random",
                        "--pairs", "2", "--gatys-steps", "2", "--sets", "train x eval", "eval x eval"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| train x eval") or line.startswith("| eval x eval")]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        model, gatys, ratio = float(cells[1]), float(cells[5]), float(cells[8].strip("*"))
        assert abs(ratio - model / gatys) < 0.01
