"""Training faults (issue 8, item 1): each ends in a finished run or one clear error, never a hang.

- a shard truncated while the run reads it: skipped, counted in ``data_skipped``, the run finishes;
- a checkpoint dir left half-written by a crash during save: ignored on resume (local and Ray);
- the newest checkpoint corrupted on disk: the previous one is used (local: test_train_local.py; Ray:
  test_ray_train.py's killed-driver run, rerun past a cut-short checkpoint file and an empty dir);
- the output/storage directory read-only before or during training: one clear line, exit 2 (local),
  and a failed Ray run (exit 1 with the reason) instead of a hang.

(Worker killed, driver killed and SIGTERM are in test_ray_train.py and test_train_local.py.)
Read-only storage is simulated with a read-only bind mount in a private mount namespace
(``unshare -m``) when running as root (root ignores file modes), else with ``chmod``.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hooks import Trace, hook_sets, trace_records
from stylegen.procs import kill_group
from tiny import DEMO, ROOT, tiny_cfg
from tiny import TINY_NO_GRIDS as TINY

ERR = "cannot write to the output directory"


def run_local(cfg, out: Path, trace: Path) -> dict:
    """``stylegen train --local`` in this process, the trace hook writing into ``trace``."""
    from stylegen.train.loop import run_local as _run

    return _run(cfg, out, progress=False, metrics_backend="none", hooks=(Trace(trace),))


def make_shards(d: Path, n: int = 4, per: int = 8) -> list[Path]:
    from stylegen.data.shardio import tar_bytes

    rng = np.random.default_rng(0)
    d.mkdir(parents=True)
    paths = []
    for s in range(n):
        members = [(f"{s:02d}{i:04d}.rgb8", rng.integers(0, 256, 64 * 64 * 3, dtype=np.uint8).tobytes())
                   for i in range(per)]
        p = d / f"train-{s:06d}.tar"
        p.write_bytes(tar_bytes(members))
        paths.append(p)
    return paths


@pytest.mark.timeout(120)
def test_shard_truncated_mid_run_is_skipped_counted_and_the_run_finishes(tmp_path, caplog):
    shards = make_shards(tmp_path / "shards")
    trace = tmp_path / "trace"
    victim = shards[1]

    def truncate_after_first_report():
        deadline = time.monotonic() + 100
        while not trace_records(trace) and time.monotonic() < deadline:
            time.sleep(0.05)
        data = victim.read_bytes()
        victim.write_bytes(data[:len(data) // 2 + 100])  # cut inside a member

    watcher = threading.Thread(target=truncate_after_first_report, daemon=True)
    watcher.start()
    cfg = tiny_cfg(f"data.content=['{tmp_path / 'shards' / 'train-*.tar'}']", "data.shuffle_shards=1",
                   "train.steps=40", "train.report_every=2", "train.checkpoint_every=40")
    with caplog.at_level(logging.WARNING, logger="stylegen.data.loader"):
        last = run_local(cfg, tmp_path / "out", trace)
    watcher.join(5)
    recs = trace_records(trace)
    assert recs[0]["data_skipped"] == 0  # intact before the cut
    assert last["step"] == 40  # ...and the run finished
    # 4 shards of 2 batches, resampled by 2 streams over ~38 steps: the torn shard is read again
    assert last["data_skipped"] >= 1
    assert "skipping rest of shard" in caplog.text and victim.name in caplog.text


def test_half_written_checkpoint_dir_is_ignored_on_resume(tmp_path, caplog):
    out, trace = tmp_path / "out", tmp_path / "trace"
    run_local(tiny_cfg("train.steps=6", "train.report_every=3", "train.checkpoint_every=3"), out, trace)
    # a crash during the save of step 9: its dir exists, with only atomic_write_bytes' temp file in it
    torn = out / "checkpoints" / "step_00000009"
    torn.mkdir()
    good = (out / "checkpoints" / "step_00000006" / "checkpoint.pt").read_bytes()
    (torn / ".checkpoint.pt.x1y2.tmp").write_bytes(good[: len(good) // 3])
    (trace / "rank0.jsonl").unlink()
    with caplog.at_level(logging.WARNING, logger="stylegen.train.loop"):
        last = run_local(tiny_cfg("train.steps=9", "train.report_every=3", "train.checkpoint_every=3"), out, trace)
    assert [(r["start_step"], r["step"]) for r in trace_records(trace)] == [(6, 9)]
    assert last["step"] == 9
    assert "step_00000009" in caplog.text  # the torn dir was named in a warning
    from stylegen.checkpoint import load_checkpoint

    assert load_checkpoint(torn)["step"] == 9  # and replaced by the real step-9 checkpoint


# ----------------------------------------------------------------------------- read-only storage

def _ro_available() -> str:
    if os.geteuid() != 0:
        return "chmod"
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    assert probe.returncode == 0, ("running as root without `unshare -m` (CAP_SYS_ADMIN): cannot make a "
                                   f"read-only directory for this test: {probe.stderr.decode()[-200:]}")
    return "unshare"


def _cmd_local(out: Path, *sets: str) -> list[str]:
    return [sys.executable, "-m", "stylegen.cli", "train", "--local", "--config", str(DEMO),
            *[f"--set={s}" for s in [*TINY, *sets]], "--out", str(out), "--no-progress"]


def _run_readonly(base: Path, cmd: list[str], wait_for: Path | None, timeout: float) -> subprocess.CompletedProcess:
    """Run ``cmd``; make ``base`` read-only at once (wait_for None) or once ``wait_for`` exists."""
    how = _ro_available()
    if how == "unshare":
        wait = f'while [ ! -e "{wait_for}" ] && kill -0 $pid 2>/dev/null; do sleep 0.1; done; ' if wait_for else ""
        # the kernel refuses a read-only remount (EBUSY) while the run has a file open for writing on
        # it (a checkpoint every 2 steps): try again for up to ~5 s
        ro = (f'n=0; until mount -o remount,bind,ro "{base}" 2>/dev/null; do n=$((n+1)); '
              '[ $n -ge 250 ] && exit 98; sleep 0.02; done')
        script = (f'mount --bind "{base}" "{base}" || exit 97; '
                  + ('mount -o remount,bind,ro "$0" || exit 98; exec "$@"' if wait_for is None else
                     f'"$@" & pid=$!; {wait}{ro}; wait $pid'))
        cmd = ["unshare", "-m", "sh", "-c", script, str(base), *cmd]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        if how == "unshare":
            out, err = proc.communicate(timeout=timeout)
            return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    finally:
        kill_group(proc.pid)
    if wait_for is not None:
        while not wait_for.exists() and proc.poll() is None:
            time.sleep(0.1)
    for d in [base, *[p for p in base.rglob("*") if p.is_dir()]]:
        d.chmod(0o555)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        kill_group(proc.pid)
        for d in [base, *[p for p in base.rglob("*") if p.is_dir()]]:
            d.chmod(0o755)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.timeout(120)
def test_read_only_output_dir_is_a_clear_error_before_training(tmp_path):
    base = tmp_path / "store"
    (base / "out").mkdir(parents=True)
    res = _run_readonly(base, _cmd_local(base / "out", "train.steps=4"), None, 100)
    assert res.returncode == 2, res.stderr[-2000:]
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("stylegen train: error: " + ERR) and "Traceback" not in res.stderr


@pytest.mark.timeout(120)
def test_output_dir_turning_read_only_mid_run_is_a_clear_error(tmp_path):
    base = tmp_path / "store"
    out = base / "out"
    out.mkdir(parents=True)
    trace = tmp_path / "trace"  # outside the read-only tree: every report the run made, in order
    first = out / "checkpoints" / "step_00000002" / "checkpoint.pt"
    res = _run_readonly(base, _cmd_local(out, "train.steps=200", "train.checkpoint_every=2", "train.report_every=2",
                                         hook_sets(trace=trace)), first, 100)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1].startswith("stylegen train: error: " + ERR)
    from stylegen.checkpoint import load_checkpoint

    steps = sorted(int(p.name.removeprefix("step_")) for p in (out / "checkpoints").iterdir())
    reported = [r["step"] for r in trace_records(trace)]  # a report is traced after its checkpoint is written
    # stopped at the first checkpoint it could not write: no report after the newest checkpoint on disk (a
    # run that went on after a failed write would trace later steps; the last traced report is that
    # checkpoint's, or the one before when the storage turned read-only between checkpoint.pt and
    # metrics.json), and well before the end
    assert steps and reported and steps[-1] - 2 <= reported[-1] <= steps[-1] < 200, (reported, steps)
    assert load_checkpoint(out / "checkpoints" / f"step_{steps[-1]:08d}")["step"] == steps[-1]  # intact
    assert not list(out.rglob("*.tmp"))  # and no temp file was left behind


def _file_size_limit(limit: int):
    """preexec_fn: writes past ``limit`` bytes fail with EFBIG (SIGXFSZ ignored), as a full disk fails with ENOSPC."""
    def apply() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.timeout(120)
@pytest.mark.parametrize("limit, written", [(32_000, []), (200_000, ["samples/epoch_0000.png"])],
                         ids=["result-grid-fails", "checkpoint-fails"])
def test_file_size_limit_during_local_training_is_one_line_and_leaves_no_partial_file(tmp_path, limit, written):
    # the tiny run writes a ~75 KB result grid, then a ~580 KB checkpoint at its last step
    from PIL import Image
    from tiny import TINY as TINY_WITH_GRIDS

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "stylegen.cli", "train", "--local", "--config", str(DEMO),
           *[f"--set={s}" for s in [*TINY_WITH_GRIDS, "train.steps=2"]], "--out", str(out), "--no-progress"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=100,
                         preexec_fn=_file_size_limit(limit))
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    errors = [ln for ln in res.stderr.splitlines() if "error:" in ln]
    assert errors == [res.stderr.strip().splitlines()[-1]], res.stderr[-2000:]
    assert errors[0].startswith("stylegen train: error: " + ERR) and "EFBIG" in errors[0] and "ulimit -f" in errors[0]
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == written  # nothing half-written (no temp file, no torn checkpoint)
    for f in written:
        Image.open(out / f).load()  # complete


# ----------------------------------------------------------------------------- Ray

@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ray_storage_turning_read_only_fails_the_run_cleanly(tmp_path):
    base = tmp_path / "store"
    base.mkdir()
    cmd = [sys.executable, "-m", "stylegen.cli", "train", "--config", str(DEMO),
           *[f"--set={s}" for s in [*TINY, "train.steps=40", "train.checkpoint_every=4", "train.report_every=4",
                                    "train.max_failures=1"]],
           "--storage", str(base), "--name", "ro", "--no-progress"]
    env_cmd = ["env", "-u", "RAY_ADDRESS", *cmd]
    res = _run_readonly(base, env_cmd, base / "ro" / "step_00000004" / "checkpoint.pt", 360)
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("stylegen train: error: training run 'ro' failed:"), last
    assert "read-only file system" in last.lower()
