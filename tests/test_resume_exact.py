"""Exactly-once data across resume and failure: the data position is in every checkpoint.

A run stopped (SIGTERM, a SIGKILLed Ray worker, a killed driver) and resumed trains on exactly
the batches an uninterrupted run trains on, step by step (digests of every batch's bytes, recorded
by the ``trace`` hook of tests/hooks.py), and ends with the same parameters.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hooks import batches_by_step, hook_sets, read_trace  # tests/ is on sys.path (pytest prepend mode)
from tiny import DEMO, ROOT
from tiny import TINY_NO_GRIDS as TINY

# two epochs of 7 batches: resumes land mid-epoch and cross an epoch boundary
SETS = [*TINY, "data.steps_per_epoch=7", "data.shuffle_shards=2", "train.report_every=2",
        "train.checkpoint_every=4"]


def train_cmd(out: Path, trace: Path, steps: int, *extra: str) -> list[str]:
    """`stylegen train --local` tracing its reports into ``trace``."""
    sets = [*SETS, f"train.steps={steps}", *extra, hook_sets(trace=trace)]
    return [sys.executable, "-m", "stylegen", "train", "--local", "--config", str(DEMO),
            *[f"--set={s}" for s in sets], "--out", str(out), "--no-progress"]


def run_to_end(cmd: list[str]) -> None:
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def test_local_run_stopped_by_sigterm_and_resumed_is_the_same_run(tmp_path):
    steps = 16
    run_to_end(train_cmd(tmp_path / "a", tmp_path / "ta", steps))
    ref = read_trace(tmp_path / "ta")[0]
    ref_batches = batches_by_step(ref)
    assert sorted(ref_batches) == list(range(1, steps + 1))

    trace = tmp_path / "tb"
    proc = subprocess.Popen(train_cmd(tmp_path / "b", trace, steps, "train.report_every=1"), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if any(r["step"] >= 9 for r in read_trace(trace).get(0, [])):
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    stopped = read_trace(trace)[0]
    stop_step = stopped[-1]["step"]
    assert 9 <= stop_step < steps and stopped[-1]["checkpoint"], err[-2000:]
    run_to_end(train_cmd(tmp_path / "b", trace, steps))
    both = read_trace(trace)[0]
    resumed = [r for r in both if r["start_step"] == stop_step]
    assert resumed and resumed[0]["data_resume_batch"] == stop_step % 7  # mid-epoch, where it stopped
    assert resumed[0]["data_resume_epoch"] == stop_step // 7
    assert batches_by_step(both) == ref_batches  # the same batch bytes at every step
    assert both[-1]["params_digest"] == ref[-1]["params_digest"]  # bit-identical parameters


def test_a_changed_worker_count_restarts_the_epoch_with_the_stated_bound(tmp_path, caplog):
    """Saved with 2 DataLoader workers, resumed with 1: the same epoch goes on, from its first batch."""
    import logging

    from stylegen.config import load_config
    from stylegen.train.loop import LoopContext, resume_point
    from stylegen.train.step import TrainState

    cfg = load_config(str(DEMO), [*SETS, "data.num_workers=1"])
    state = TrainState(generator=None, discriminator=None, opt_g=None, opt_d=None, step=10,
                       data={"epoch": 1, "batch": 3, "world": 2, "workers": 1, "positions": [[[0, 5, 0, 5]]] * 2})
    with caplog.at_level(logging.WARNING):
        resume, epoch = resume_point(cfg, state, LoopContext(device=None, world_size=1))
    assert resume is None and epoch == 1
    assert "at most 24 samples of it are seen twice" in caplog.text  # 3 batches x 2 ranks x batch 4
    resume, epoch = resume_point(cfg, state, LoopContext(device=None, world_size=2))
    assert resume is not None and (resume.epoch, resume.batch) == (1, 3)


def test_a_resume_with_another_loader_worker_count_continues_the_same_epoch(tmp_path):
    """2 DataLoader workers to step 9 (epoch 1, batch 2), then 1 worker: the warning states the bound and
    training goes on in epoch 1 from its first batch."""
    trace = tmp_path / "t"
    run_to_end(train_cmd(tmp_path / "o", trace, 9, "data.num_workers=2"))
    r = subprocess.run(train_cmd(tmp_path / "o", trace, 16, "data.num_workers=1"), cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 loader worker(s), now 1 x 1: epoch 1 restarts from its first batch" in r.stderr
    assert "at most 8 samples of it are seen twice" in r.stderr  # 2 batches x 1 rank x batch 4
    after = [x for x in read_trace(trace)[0] if x["start_step"] == 9]
    assert after and after[0]["epoch"] == 1 and "data_resume_batch" not in after[0]
    # steps 10..16 are batches 0..6 of epoch 1 with the new split: the whole epoch, nothing skipped
    assert after[-1]["step"] == 16 and (after[-1]["data"]["epoch"], after[-1]["data"]["batch"]) == (1, 7)
