"""bench_ddp's profile window (``--profile``): the breakdown it prints is read from these summaries."""

from __future__ import annotations

import json

from benchmarks.bench_ddp import bare_loop
from tiny import tiny_cfg


def test_profile_window_splits_a_loops_wall_time_and_writes_a_trace(tmp_path):
    cfg = tiny_cfg("data.steps_per_epoch=4")
    bare_loop(cfg, steps=3, warmup=2, threads=1, profile=str(tmp_path), label="x")
    summary = json.loads((tmp_path / "rankx.summary.json").read_text())
    assert summary["steps"] == 3 and summary["report_s"] == 0  # a bare loop reports nothing
    # the profiled window: steps 3..5, its wall split into training-thread ops and the rest
    assert 0 < summary["main_ops_s"] <= summary["wall_s"] <= summary["step_s"] + 1e-3
    assert 0 < summary["main_cpu_s"] <= summary["wall_s"] + 0.05  # /proc ticks: 10 ms each
    assert any("conv" in k for k in summary["top_self_cpu_s"])
    trace = json.loads((tmp_path / "rankx.trace.json").read_text())
    assert any(e.get("name") == "aten::convolution_backward" for e in trace["traceEvents"])
