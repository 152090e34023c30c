"""Exactly-once data across resume and failure: the data position is in every checkpoint.

A run stopped (SIGTERM, a SIGKILLed Ray worker, a killed driver) and resumed trains on exactly
the batches an uninterrupted run trains on, step by step (digests of every batch's bytes, recorded
by the ``trace`` hook of tests/hooks.py), and ends with the same parameters. (The Ray killed-worker and
killed-driver runs, and Ray reruns with another rank count, are in tests/test_ray_train.py.) A resume with another rank or DataLoader worker count
keeps the README's guarantee (checked on sample ids); data.sampling='epoch' sees every sample once.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hooks import batches_by_step, hook_sets, read_trace  # tests/ is on sys.path (pytest prepend mode)
from stylegen.config import load_config
from stylegen.data import loader as L
from stylegen.data.loader import build_loader
from stylegen.train.loop import LoopContext, resume_point
from stylegen.train.step import TrainState
from test_loader import cfg, ids_of, make_dir
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


def run_to_end(cmd: list[str]) -> str:
    """Its stderr (the log)."""
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stderr


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
    log = run_to_end(train_cmd(tmp_path / "b", trace, steps))
    both = read_trace(trace)[0]
    resumed = [r for r in both if r["start_step"] == stop_step]
    assert resumed and resumed[0]["data_resume_batch"] == stop_step % 7  # mid-epoch, where it stopped
    assert resumed[0]["data_resume_epoch"] == stop_step // 7
    assert 0 < resumed[0]["data_seek_s"] < 60
    assert f"data stream resumed at epoch {stop_step // 7}, batch {stop_step % 7} (seek " in log
    assert batches_by_step(both) == ref_batches  # the same batch bytes at every step
    assert both[-1]["params_digest"] == ref[-1]["params_digest"]  # bit-identical parameters


def test_a_changed_worker_count_restarts_the_epoch_with_the_stated_bound(tmp_path, caplog):
    """Saved with 2 DataLoader workers, resumed with 1: the same epoch goes on, from its first batch."""
    cfg = load_config(str(DEMO), [*SETS, "data.num_workers=1"])
    state = TrainState(generator=None, discriminator=None, opt_g=None, opt_d=None, step=10,
                       data={"epoch": 1, "batch": 3, "world": 2, "workers": 1, "positions": [[[0, 5, 0, 5]]] * 2})
    with caplog.at_level(logging.WARNING):
        resume, epoch = resume_point(cfg, state, LoopContext(device=None, world_size=1))
    assert resume is None and epoch == 1
    assert "at most 24 samples of it are seen twice" in caplog.text  # 3 batches x 2 ranks x batch 4
    resume, epoch = resume_point(cfg, state, LoopContext(device=None, world_size=2))
    assert resume is not None and (resume.epoch, resume.batch) == (1, 3)


@pytest.mark.parametrize("old,new", [(2, 1), (1, 2)])
def test_a_resume_with_another_loader_worker_count_continues_the_same_epoch(tmp_path, old, new):
    """``old`` DataLoader workers to step 9 (epoch 1, batch 2), then ``new``: the warning states the bound
    and training goes on in epoch 1 from its first batch."""
    trace = tmp_path / "t"
    run_to_end(train_cmd(tmp_path / "o", trace, 9, f"data.num_workers={old}"))
    r = subprocess.run(train_cmd(tmp_path / "o", trace, 16, f"data.num_workers={new}"), cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{old} loader worker(s), now 1 x {new}: epoch 1 restarts from its first batch" in r.stderr
    assert "at most 8 samples of it are seen twice" in r.stderr  # 2 batches x 1 rank x batch 4
    after = [x for x in read_trace(trace)[0] if x["start_step"] == 9]
    assert after and after[0]["epoch"] == 1 and "data_resume_batch" not in after[0]
    # steps 10..16 are batches 0..6 of epoch 1 with the new split: the whole epoch, nothing skipped
    assert after[-1]["step"] == 16 and (after[-1]["data"]["epoch"], after[-1]["data"]["batch"]) == (1, 7)


# ----------------------------------------------------------------------------- the loader alone (seconds)

UNEVEN = [9, 7, 8, 8, 10, 6, 8, 9]  # 65 samples; ranks of 2 get shards 0,2,4,6 (35) and 1,3,5,7 (30)


def epoch_ids(c, world: int, epoch: int = 1, resume=None) -> list[list[int]]:
    """Per rank, the content sample ids of one epoch (from ``resume`` on), as the loop builds its loaders."""
    return [[i for b, _ in build_loader(c, rank=r, world_size=world, epoch_seed=epoch, resume=resume)
             for i in ids_of(b)] for r in range(world)]


def stop_after(c, world: int, batches: int, epoch: int = 1):
    """Every rank takes ``batches`` batches of ``epoch``: (their content ids, the DataState a checkpoint holds)."""
    seen, rows = [], []
    for r in range(world):
        loader = build_loader(c, rank=r, world_size=world, epoch_seed=epoch)
        it = iter(loader)
        seen += [i for _ in range(batches) for i in ids_of(next(it)[0])]
        rows += loader.state().positions  # what gather_data_state collects from the ranks
    return seen, dataclasses.replace(loader.state(), positions=rows)


@pytest.mark.parametrize("workers,batches", [(0, 7), (2, 6)])
def test_epoch_sampling_on_uneven_shards_sees_every_sample_once_across_a_resume(tmp_path, workers, batches):
    """data.sampling='epoch', 2 ranks, uneven shards: equal batch counts per rank (the documented rule: the
    largest count every (rank, loader worker) can fill), no sample twice, and a resume after batch 3
    yields exactly the rest of the uninterrupted epoch on every rank."""
    d, ids, _ = make_dir(tmp_path, "c", UNEVEN)
    c = cfg(content=[str(d)], sampling="epoch", steps_per_epoch=999, num_workers=workers)
    full = epoch_ids(c, 2)
    # workers 0: ranks hold 35 and 30 samples -> 8 and 7 batches of 4, both take 7;
    # workers 2: (rank, worker) shards 0,4 | 2,6 | 1,5 | 3,7 hold 19 | 16 | 13 | 17 -> 4 | 4 | 3 | 4 batches,
    # each worker takes 3, so each rank 6 (the rest of the epoch, 17 samples, is dropped)
    assert [len(f) for f in full] == [batches * 4] * 2
    seen = full[0] + full[1]
    assert len(set(seen)) == len(seen) and set(seen) <= set(ids)
    assert set(full[0]).isdisjoint(full[1])
    head, saved = stop_after(c, 2, 3)
    rest = epoch_ids(c, 2, resume=saved)
    assert head[:12] + rest[0] == full[0] and head[12:] + rest[1] == full[1]


@pytest.mark.parametrize("old,new", [(2, 1), (1, 2)])
def test_a_changed_rank_count_keeps_the_stated_guarantee_on_sample_ids(tmp_path, caplog, old, new):
    """Stopped after 3 batches of epoch 1 with ``old`` ranks, resumed with ``new`` (data.sampling='epoch', as
    the loop does it: resume_point, then the loader): epoch 1 again from its first batch with the new split,
    so no sample of it is skipped, and at most the 3 x old x 4 samples already consumed are seen twice."""
    d, ids, _ = make_dir(tmp_path, "c", UNEVEN)
    c = cfg(content=[str(d)], sampling="epoch", steps_per_epoch=999)
    before, saved = stop_after(c, old, 3)
    state = TrainState(generator=None, discriminator=None, opt_g=None, opt_d=None, step=20, data=saved.to_dict())
    run_cfg = load_config(str(DEMO), [*SETS, "data.sampling=epoch"])
    with caplog.at_level(logging.WARNING):
        resume, epoch = resume_point(run_cfg, state, LoopContext(device=None, world_size=new))
    assert resume is None and epoch == 1
    assert f"at most {3 * old * 4} samples of it are seen twice" in caplog.text
    after = epoch_ids(c, new, epoch, resume)
    assert after == epoch_ids(c, new)  # the whole epoch with the new split: nothing skipped
    flat = [i for r in after for i in r]
    assert len(set(flat)) == len(flat) and len(set(before) & set(flat)) <= 3 * old * 4


def test_a_position_at_a_windows_end_resumes_without_reading_that_window(tmp_path, monkeypatch):
    """After a window's last sample the saved position is the next window's start, so the resume reads no
    more shards than a fresh start does (it used to read the finished window again, only to skip it)."""
    d, _, _ = make_dir(tmp_path, "c", [8] * 8)
    c = cfg(content=[str(d)], steps_per_epoch=9)  # windows of 2 shards = 16 samples = 4 batches of 4
    loader = build_loader(c, rank=0, world_size=1)
    it = iter(loader)
    for _ in range(4):
        next(it)
    saved, want = loader.state(), next(it)
    assert saved.positions == [[[1, 0, 1, 0]]]  # content and style at window 1's start, not [0, 16]
    reads = []
    real = L.read_url
    monkeypatch.setattr(L, "read_url", lambda url, storage_cfg=None: reads.append(url) or real(url, storage_cfg))
    next(iter(build_loader(c, rank=0, world_size=1)))
    fresh = len(reads)
    got = next(iter(build_loader(c, rank=0, world_size=1, resume=saved)))
    assert fresh == 2 * 2  # content and style: one window of 2 local shards each, nothing read ahead
    assert len(reads) - fresh == fresh  # the resume too: not the finished window again
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
