"""A short soak (issue 8, item 5): ~30 s of tiny local training, memory and open files sampled.

The full soak is ``python benchmarks/soak.py`` (figures in its docstring's format). Here the run
is shorter, so checkpoints (with pruning), result grids and a fresh loader per epoch come every
10-20 steps: whatever leaks per checkpoint or per epoch shows within the window.

Bounds (after the first 30 % of the run, which holds the allocator's and caches' growth): RSS of
the last third of the samples, by median, within 60 MB of the first third's (a 64x64 tiny run's RSS
wobbles by ~±20 MB between validation and training batches; a leak of one batch per step, 4 pairs
of 64x64 float images, ~0.4 MB, would add ~80 MB between the thirds at the ~450 steps a loaded
machine runs in 30 s, 700 on a quiet one); open fds: the last third's minimum not above the first
third's maximum (a transient checkpoint or shard file open during a sample is not growth).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import soak  # noqa: E402

RSS_GROWTH_BOUND_MB = 60.0


@pytest.mark.slow
def test_short_soak_memory_and_fds_flat(tmp_path):
    # the tests' 1/8-width VGG (tests/tiny.py): 3x the steps of the soak's own settings (469 vs 155 in 30 s),
    # so 30 s hold more checkpoints (~20), grids and epochs (~45) than 75 s did
    res = soak.run_soak(minutes=0.5, interval=1.0, out=tmp_path / "run",
                        overrides={"features.width": 8, "train.checkpoint_every": 20, "train.sample_every": 20,
                                   "train.report_every": 10, "data.steps_per_epoch": 10})
    assert res.stopped and res.clean_exit, res.stderr_tail  # SIGTERM after 30 s: checkpoint written, exit 143
    assert res.steps > 40, f"only {res.steps} steps checkpointed"
    assert len(list((tmp_path / "run" / "checkpoints").iterdir())) <= 2  # pruned to keep_checkpoints
    js = res.judged(0.3)
    assert len(js) >= 15, len(js)
    third = len(js) // 3
    first, last = js[:third], js[-third:]
    rss_first = statistics.median(s.rss_mb for s in first)
    rss_last = statistics.median(s.rss_mb for s in last)
    figures = soak.format_summary(soak.summary(res, 0.3))
    print(figures)
    assert rss_last - rss_first < RSS_GROWTH_BOUND_MB, figures
    assert min(s.fds for s in last) <= max(s.fds for s in first), figures
