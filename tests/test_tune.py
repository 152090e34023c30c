"""`stylegen tune`: search-space errors, the no-deadlock concurrency rule, the trial label, and
(marked ray/slow) a real sweep on this machine's CPUs: ASHA + best/export/stylize (an errored trial:
tests/test_s3_ray.py).

The sweep runs `stylegen tune` as a subprocess (as a user would), pointed with --address at the
session's shared local Ray (``local_ray``, tests/conftest.py: what `stylegen tune` starts without
--address). `best` and `stylize` read the results in this process (``main``: the same code as the
CLI, without a Python start each). The sweep on a cluster without trial_slot, killed midway and
resumed, is in tests/test_local_cluster.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from stylegen.tune import first_difference, max_trials
from tiny import MODEL, cli_sets

ROOT = Path(__file__).resolve().parents[1]
TUNE_TOML = str(ROOT / "jobs" / "configs" / "tune.toml")
# tiny and fast: quality does not matter here, only the sweep mechanics
TINY = [*cli_sets(MODEL), "--set", "data.batch_size=4", "--set", "train.val_pairs=4", "--set", "train.report_every=5",
        "--set", "train.checkpoint_every=5", "--set", "train.sample_every=20", "--set", "train.max_failures=0"]


def cli(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stylegen.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, **kw)


def in_process(capsys, *args: str) -> tuple[int, str, str]:
    """``stylegen ARGS`` through ``stylegen.cli.main`` here: (exit code, stdout, stderr)."""
    from stylegen.cli import main

    capsys.readouterr()
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def sweep_cli(local_ray, *args: str, **kw) -> subprocess.CompletedProcess:
    """`stylegen ARGS --address` on the shared Ray."""
    env = local_ray.client_env()
    return cli(*args, "--address", env["RAY_ADDRESS"], env=env, **kw)


# ----------------------------------------------------------------------------- fast

@pytest.mark.parametrize("space, needle", [
    ('{"loss.nope" = {uniform = [1.0, 2.0]}}', "loss.nope"),
    ('{"nosection.style" = {uniform = [1.0, 2.0]}}', "nosection"),
    ('{"loss.style" = {gauss = [1.0, 2.0]}}', "unknown distribution 'gauss'"),
    ('{"loss.style" = {loguniform = [0.0, 2.0]}}', "low > 0"),
    ('{"loss.style" = {uniform = [5.0, 2.0]}}', "low < high"),
    ('{"loss.style" = {uniform = [1.0]}}', "[low, high]"),
    ('{"loss.style" = {choice = []}}', "non-empty list"),
    ('{"loss.style" = {choice = [1.0, -3.0]}}', "loss.style"),
    ('{"loss.style" = {uniform = [1.0, 2.0], choice = [1.0]}}', "one distribution"),
    ('{"optim.lr" = {grid = [0.001, 100.0]}}', "optim.lr"),
    ('{"tune.samples" = {grid = [1, 2]}}', "cannot be searched"),
])
def test_tune_rejects_bad_search_space_in_one_line(space, needle):
    r = cli("tune", "--config", TUNE_TOML, "--set", f"tune.space={space}", "--storage", "/nonexistent/never-created")
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stylegen tune: error:"), r.stderr
    assert needle in lines[0]
    assert not Path("/nonexistent/never-created").exists()


@pytest.mark.parametrize("cpus, per_trial, driver, requested, expect", [
    (2, 1, 0.0, 2, 2),       # trial_slot resource: drivers hold no CPU
    (2, 1, 0.01, 2, 1),      # CPU-sliver fallback: a 2nd driver would leave 0.98 CPU for its worker
    (2, 1, 0.01, 8, 1),
    (4.02, 1, 0.01, 8, 3),   # 4 x 1.01 = 4.04 > 4.02
    (16, 2, 0.01, 4, 4),     # the cap when resources are plenty
    (1, 2, 0.0, 2, 0),       # a trial does not fit at all
])
def test_max_trials_never_oversubscribes(cpus, per_trial, driver, requested, expect):
    n = max_trials(cpus, per_trial, driver, requested)
    assert n == expect
    assert n * (per_trial + driver) <= cpus + 1e-9


def test_max_trials_counts_gpus():
    assert max_trials(64, 1, 0.0, 8, gpus=4, gpus_per_trial=2) == 2


def test_first_difference_names_the_changed_key():
    a = {"train": {"steps": 20, "seed": 0}, "loss": {"style": 1.0}}
    assert first_difference(a, a) is None
    assert first_difference(a, {"train": {"steps": 30, "seed": 0}, "loss": {"style": 1.0}}) == "train.steps"
    assert first_difference(a, {"train": {"steps": 20, "seed": 0, "new_field": 1}, "loss": {"style": 1.0}}) is None


def test_trial_label_reaches_trainer_config_and_metrics():
    """build_trainer hands trial= to every worker (train_loop_config), which labels its metrics with it."""
    from stylegen.config import Config
    from stylegen.metrics import TrainMetrics
    from stylegen.train.ray_worker import build_trainer

    trainer = build_trainer(Config(), name="trial-t_00001", storage="/tmp/stylegen-never-written", trial="t_00001")
    assert trainer.train_loop_config["trial"] == "t_00001"
    # the worker calls TrainMetrics.create(..., trial=config.get("trial", "")): the label is exported
    m = TrainMetrics.create("prometheus", run="trial-t_00001", rank=0, trial="t_00001", port=0)
    try:
        m.step(0.1, 4, 0.0, {"total": 1.0})
        text = urllib.request.urlopen(m.url, timeout=10).read().decode()
    finally:
        m.close()
    assert 'trial="t_00001"' in text


# ----------------------------------------------------------------------------- Ray sweeps

def sweep_rows(sweep: Path) -> dict[str, dict]:
    import pyarrow.parquet as pq

    return {r["trial_id"]: r for r in pq.read_table(sweep / "trials.parquet").to_pylist()}


@pytest.mark.ray
@pytest.mark.slow
def test_sweep_asha_stops_the_stuck_trial_best_export_stylize(local_ray, tmp_path, capsys):
    """2 trials, one at a time: ASHA stops the trial that cannot learn (lr 1e-12) early, the learning
    one (lr 3e-3) completes, best = lowest val_score in trials.parquet, and the exported checkpoint
    stylizes an image.

    Grid order (the first key varies fastest): lr 3e-3, then 1e-12. One trial at a time, the
    lr=1e-12 trial's first rung result always meets the learning trial's: ASHA's decision is
    deterministic, not a race. (Two trials at once on 2 CPUs, without a deadlock, one of them
    errored and never ranked: the sweep of tests/test_s3_ray.py.)"""
    t0 = time.perf_counter()
    space = '{"optim.lr" = {grid = [3e-3, 1e-12]}, "loss.style" = {grid = [3.0]}}'
    r = sweep_cli(local_ray, "tune", "--config", TUNE_TOML, *TINY, "--set", "train.steps=20",
                  "--set", "tune.grace_period=5", "--set", f"tune.space={space}", "--samples", "1",
                  "--max-concurrent", "1", "--storage", str(tmp_path), "--name", "sw", timeout=420)
    assert r.returncode == 0, r.stderr[-3000:]
    # a quiet driver (no -v): our trial lines, not Tune's header box nor Ray's own chatter (raylogs.py;
    # the preemption watcher's warning: the drained-node test of tests/test_local_cluster.py, the one
    # test that runs the watcher)
    assert "trial 00000 started" in r.stderr
    for noise in ("Configuration for experiment", "View detailed results", "tensorboard --logdir",
                  "PYTHON worker processes have been started", "Cleaning up placement group"):
        assert noise not in r.stdout + r.stderr, noise
    sweep = tmp_path / "sw"
    rows = sweep_rows(sweep)
    assert len(rows) == 2
    healthy = {row["optim.lr"]: row for row in rows.values() if row["status"] == "TERMINATED"}
    assert sorted(healthy) == [1e-12, 3e-3], rows
    stuck = healthy[1e-12]
    assert stuck["stop_reason"] == "stopped early (scheduler)" and stuck["steps"] < 20, rows
    assert healthy[3e-3]["stop_reason"] == "completed" and healthy[3e-3]["steps"] == 20, rows
    healthy = list(healthy.values())

    rc, out, err = in_process(capsys, "best", str(sweep), "--json", "--top", "5")
    assert rc == 0, err
    best = json.loads(out)
    expect = min(healthy, key=lambda row: row["val_score"])
    assert best["best"]["trial_id"] == expect["trial_id"]
    assert [t["trial_id"] for t in best["top"]] == [row["trial_id"] for row in sorted(healthy, key=lambda r: r["val_score"])]

    exported = tmp_path / "exp"
    rc, _, err = in_process(capsys, "best", str(sweep), "--export", str(exported))
    assert rc == 0, err
    from stylegen.data.embedded import skimage_data_dir

    img = tmp_path / "stylized.png"
    rc, _, err = in_process(capsys, "stylize", "--checkpoint", str(exported), "--content",
                            str(skimage_data_dir() / "chelsea.png"), "--style", str(skimage_data_dir() / "gravel.png"),
                            "--out", str(img))
    assert rc == 0, err
    assert img.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (sweep / "sweep.png").is_file()
    print(f"sweep of 2 trials: {time.perf_counter() - t0:.0f} s")


def test_trial_line_names_the_trial_its_params_step_and_score():
    from stylegen.tune import trial_line

    assert trial_line("started", "03823_00001", None, 60, {"loss.style": 1.554051, "loss.adversarial": 0}) == \
        "trial 00001 started loss.adversarial=0 loss.style=1.554"
    assert trial_line("at", "03823_00001", {"step": 30, "val_score": 0.81234}, 60) == \
        "trial 00001 at step 30/60 val_score 0.8123"
    assert trial_line("failed at", "x_00002", {}, 60) == "trial 00002 failed at"


def test_sweep_resolves_and_checks_train_init_before_ray(monkeypatch, tmp_path):
    """Trials run in their own working dirs: ``run_sweep`` hands them train.init as an absolute path,
    and a wrong one is one UserError before Ray starts."""
    import stylegen.train.ray_worker as ray_worker
    import stylegen.tune as tune
    from stylegen.config import load_config, with_overrides
    from stylegen.errors import UserError

    root = Path(__file__).resolve().parents[1]
    seen, started = {}, []

    class Captured(Exception):
        pass

    def capture(cfg, *args, **kwargs):
        seen["cfg"] = cfg
        raise Captured

    monkeypatch.setattr(ray_worker, "ensure_ray", lambda address: started.append(address))
    monkeypatch.setattr(tune, "build_tuner", capture)
    monkeypatch.chdir(root)
    cfg = load_config(str(root / "jobs" / "configs" / "pretrained.toml"),
                      ["train.init=stylegen/assets/pretrained.pt", f"ray.storage={tmp_path}"])
    with pytest.raises(Captured):
        tune.run_sweep(cfg, sweep="s")
    assert seen["cfg"].train.init == str(root / "stylegen" / "assets" / "pretrained.pt")
    started.clear()
    with pytest.raises(UserError, match=r"train\.init: checkpoint 'nope' not found"):
        tune.run_sweep(with_overrides(cfg, {"train.init": "nope"}), sweep="s")
    assert not started
