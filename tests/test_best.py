"""`stylegen best` on synthetic sweep directories (the files Tune and Train V2 write), no Ray.

What a sweep dir holds (see stylegen/best.py): experiment_state-*.json (trial
status + sampled params), one dir per trial with result.json (its reports), and
trial_runs/trial-<id>/ (the Train run: checkpoint_manager_snapshot.json + checkpoints).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stylegen.config import Config, to_dict
from stylegen.errors import UserError
from stylegen.best import load_sweep, print_best, ranked, write_sweep_report

TINY = {"model.channels": 8, "model.res_blocks": 1}


def tiny_cfg() -> Config:
    from stylegen.config import with_overrides

    return with_overrides(Config(), {**TINY, "train.steps": 20})


def write_checkpoint(ckpt_dir: Path, cfg: Config, metrics: dict) -> None:
    from stylegen.checkpoint import save_checkpoint
    from stylegen.models.generator import Generator

    gen = Generator(cfg.model)
    save_checkpoint(ckpt_dir / "checkpoint.pt", {"step": int(metrics["step"]), "config": to_dict(cfg),
                                                 "generator": gen.state_dict(), "discriminator": None,
                                                 "opt_g": {}, "opt_d": None, "metrics": metrics})


def make_sweep(root: Path, trials: list[dict], *, with_checkpoints: bool = True) -> Path:
    """trials: {id, status, style, scores: [(step, val_score)], error?}; checkpoints at every score."""
    cfg = tiny_cfg()
    root.mkdir(parents=True, exist_ok=True)
    (root / "sweep_config.json").write_text(json.dumps({"sweep": root.name, "base": to_dict(cfg), "space": {}}))
    data = []
    for t in trials:
        tid = t["id"]
        trial = {"trial_id": tid, "status": t["status"], "evaluated_params": {"loss.style": t["style"]}}
        last = {}
        tdir = root / f"run_trial_{tid}_0_loss_style={t['style']}_2026"
        tdir.mkdir()
        lines = []
        snapshot = []
        for step, score in t["scores"]:
            last = {"step": step, "val_score": score, "val_content_n": score / 2, "val_style_n": score / 2,
                    "config": {"loss.style": t["style"]}}
            lines.append(json.dumps(last))
            if with_checkpoints:
                name = f"step_{step:08d}"
                write_checkpoint(root / "trial_runs" / f"trial-{tid}" / name, cfg, last | {"config": None})
                snapshot.append({"checkpoint_dir_name": name, "metrics": {k: v for k, v in last.items() if k != "config"}})
        (tdir / "result.json").write_text("\n".join(lines) + "\n")
        if with_checkpoints and snapshot:
            (root / "trial_runs" / f"trial-{tid}" / "checkpoint_manager_snapshot.json").write_text(
                json.dumps({"checkpoint_results": snapshot}))
        if "error" in t:
            (tdir / "error.txt").write_text(f"Traceback (most recent call last):\n  ...\n{t['error']}\n")
        data.append([json.dumps(trial), json.dumps({"last_result": last})])
    (root / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps({"trial_data": data}))
    return root


FINISHED = [
    {"id": "a_00000", "status": "TERMINATED", "style": 1.0, "scores": [(5, 3.0), (10, 2.9), (20, 2.7)]},
    {"id": "a_00001", "status": "TERMINATED", "style": 10.0, "scores": [(5, 2.5), (10, 2.2), (20, 2.3)]},
    {"id": "a_00002", "status": "TERMINATED", "style": 100.0, "scores": [(5, 3.5)]},
    {"id": "a_00003", "status": "ERROR", "style": 1e39, "scores": [(5, 0.1)],
     "error": "stylegen.tune.TrialFailed: FloatingPointError: non-finite generator loss at step 5"},
]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stylegen.cli", *args], capture_output=True, text=True, timeout=120)


def test_best_is_lowest_checkpointed_score_and_errored_trial_never_wins(tmp_path):
    # the errored trial reported the lowest score (0.1) before it failed: it must not rank
    sweep = make_sweep(tmp_path / "sw", FINISHED)
    rows, running = load_sweep(sweep)
    assert not running
    by_id = {r.trial_id: r for r in rows}
    assert by_id["a_00001"].val_score == pytest.approx(2.2)          # best checkpoint, not the last report
    assert by_id["a_00001"].checkpoint.endswith("step_00000010")
    assert by_id["a_00000"].stop_reason == "completed"
    assert by_id["a_00002"].stop_reason == "stopped early (scheduler)"
    assert by_id["a_00003"].stop_reason.startswith("errored: stylegen.tune.TrialFailed: FloatingPointError")
    assert [r.trial_id for r in ranked(rows, "min")] == ["a_00001", "a_00000", "a_00002"]
    assert [r.trial_id for r in ranked(rows, "max")][0] == "a_00002"


def test_sweep_report_parquet_matches_best(tmp_path, capsys):
    import pyarrow.parquet as pq

    sweep = make_sweep(tmp_path / "sw", FINISHED)
    parquet, png = write_sweep_report(sweep)
    table = pq.read_table(parquet).to_pylist()
    assert {r["trial_id"] for r in table} == {t["id"] for t in FINISHED}
    ok = [r for r in table if r["status"] != "ERROR" and not math.isnan(r["val_score"])]
    best_in_table = min(ok, key=lambda r: r["val_score"])
    assert best_in_table["trial_id"] == print_best(sweep).trial_id == "a_00001"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "errored: " in capsys.readouterr().out


def test_export_loads_in_stylize(tmp_path):
    from stylegen.loading import load_generator

    sweep = make_sweep(tmp_path / "sw", FINISHED)
    out = tmp_path / "exp"
    r = run_cli("best", str(sweep), "--export", str(out), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["best"]["trial_id"] == "a_00001" and doc["running"] is False
    gen, cfg = load_generator(out)
    assert cfg.model.channels == 8
    assert json.loads((out / "best.json").read_text())["trial_id"] == "a_00001"
    assert (out / "config.toml").is_file()


def test_best_reads_a_big_sweep_without_torch_or_ray(tmp_path, capsys):
    # 40 trials x 3 reports, no checkpoints needed for the timing of the read itself
    trials = [{"id": f"b_{i:05d}", "status": "TERMINATED", "style": float(i + 1),
               "scores": [(5, 3.0 + i / 100), (10, 2.9 + i / 100), (20, 2.5 + i / 100)]} for i in range(40)]
    sweep = make_sweep(tmp_path / "sw", trials[:3])
    make_sweep(tmp_path / "big", trials, with_checkpoints=False)
    # give the big sweep checkpoints by reusing one real file per trial (read only as paths + snapshot)
    for t in trials:
        run = tmp_path / "big" / "trial_runs" / f"trial-{t['id']}"
        (run / "step_00000020").mkdir(parents=True)
        (run / "step_00000020" / "checkpoint.pt").write_bytes(b"x")
        (run / "checkpoint_manager_snapshot.json").write_text(json.dumps({"checkpoint_results": [
            {"checkpoint_dir_name": "step_00000020", "metrics": {"val_score": t["scores"][-1][1], "step": 20}}]}))
    best = print_best(tmp_path / "big", top=10)
    assert best.trial_id == "b_00000"
    # what keeps `stylegen best` fast: a fresh interpreter reads the 40 trials without importing
    # torch or ray (asserted by what is imported, not by a wall-clock figure)
    code = ("import sys; from pathlib import Path; from stylegen.best import print_best; "
            f"assert print_best(Path({str(tmp_path / 'big')!r}), top=10).trial_id == 'b_00000'; "
            "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert print_best(sweep).trial_id == "b_00000"


def test_still_running_sweep_gives_best_so_far_marked(tmp_path):
    trials = [dict(FINISHED[0], status="RUNNING"), dict(FINISHED[1], id="a_00009", status="PENDING", scores=[])]
    sweep = make_sweep(tmp_path / "sw", trials)
    r = run_cli("best", str(sweep))
    assert r.returncode == 0, r.stderr
    assert "still running" in r.stdout.splitlines()[0] and "a_00000" in r.stdout


@pytest.mark.parametrize("case", ["missing", "empty", "garbage_state", "not_a_state", "bad_trial_entry",
                                  "running_no_checkpoint", "all_errored", "a_file"])
def test_best_bad_directories_one_line_nonzero(tmp_path, case):
    target = tmp_path / "sw"
    if case == "missing":
        pass
    elif case == "empty":
        target.mkdir()
    elif case == "garbage_state":
        target.mkdir()
        (target / "experiment_state-2026.json").write_bytes(b"\x00{not json")
    elif case == "not_a_state":
        target.mkdir()
        (target / "experiment_state-2026.json").write_text("[1, 2, 3]")
    elif case == "bad_trial_entry":
        target.mkdir()
        (target / "experiment_state-2026.json").write_text(json.dumps({"trial_data": [["{}", "oops"]]}))
    elif case == "running_no_checkpoint":
        make_sweep(target, [{"id": "r_00000", "status": "RUNNING", "style": 1.0, "scores": []}])
    elif case == "all_errored":
        make_sweep(target, [FINISHED[3]])
    elif case == "a_file":
        target.write_text("not a dir")
    r = run_cli("best", str(target), "--storage", str(tmp_path / "nowhere"))
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stylegen best: error:"), r.stderr
    assert "Traceback" not in r.stderr
    if case == "running_no_checkpoint":
        assert "still running" in lines[0]


def test_load_sweep_corrupt_raises_usererror(tmp_path):
    (tmp_path / "experiment_state-x.json").write_text('{"trial_data": [[1, 2]]}')
    with pytest.raises(UserError, match="corrupt"):
        load_sweep(tmp_path)


# ----------------------------------------------------------------------------- issue 19

def test_sweep_path_with_glob_characters_reads_that_sweep_and_no_other(tmp_path, capsys):
    # unescaped, 'sw[ab]' is a pattern matching the sibling sweeps 'swa' and 'swb': their files would be read
    make_sweep(tmp_path / "swa", [dict(FINISHED[0], id="x_00000", scores=[(5, 0.5)])])
    sweep = make_sweep(tmp_path / "sw[ab]", FINISHED)
    rows, _ = load_sweep(sweep)
    by_id = {r.trial_id: r for r in rows}
    assert set(by_id) == {t["id"] for t in FINISHED}
    assert by_id["a_00001"].val_score == pytest.approx(2.2)
    assert by_id["a_00003"].stop_reason.startswith("errored: stylegen.tune.TrialFailed")  # its error.txt was read
    assert print_best(sweep).trial_id == "a_00001"
    out = tmp_path / "exp[1]"
    r = run_cli("best", str(sweep), "--export", str(out))
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "best.json").read_text())["trial_id"] == "a_00001"


def test_export_overwrites_only_an_earlier_export_and_ignores_planted_temp_names(tmp_path):
    sweep = make_sweep(tmp_path / "sw", FINISHED[:2])
    out = tmp_path / "exp"
    out.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("must not change\n")
    for name in (".checkpoint.pt.tmp", ".config.toml.tmp", ".best.json.tmp"):  # fixed temp names, planted
        (out / name).symlink_to(victim)
    r = run_cli("best", str(sweep), "--export", str(out))
    assert r.returncode == 0, r.stderr
    assert victim.read_text() == "must not change\n" and not victim.is_symlink()
    assert (out / "checkpoint.pt").is_file() and not (out / "checkpoint.pt").is_symlink()
    again = run_cli("best", str(sweep), "--export", str(out))  # an earlier export is ours to overwrite
    assert again.returncode == 0, again.stderr
    (out / "notes.txt").write_text("now it is not only an export\n")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and not p.is_symlink()}
    third = run_cli("best", str(sweep), "--export", str(out))
    assert third.returncode == 2 and third.stdout == ""
    assert third.stderr.strip().splitlines() == [third.stderr.strip()] and "not an earlier export" in third.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and not p.is_symlink()} == before


def test_a_command_imports_only_its_own_module():
    """`stylegen best` builds only best's arguments: the other commands' modules (shard: numpy, PIL;
    train, tune, serve ...) stay unimported, so reading a sweep starts in well under a second."""
    probe = ("import sys; from stylegen.cli import COMMANDS, main\n"
             "try:\n    main(['best', '--help'])\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m, _ in COMMANDS.values() if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "['stylegen.best']"


def test_table_marks_a_trial_stopped_before_its_first_checkpoint():
    """No checkpoint: nothing to export, so no val_score; the table shows its last reported score, marked."""
    from stylegen.best import TrialRow, format_table

    done = TrialRow("00000", "TERMINATED", {"loss.style": 1.0}, 20, val_score=0.61, last_val_score=0.6,
                    val_content_n=0.2, val_style_n=0.4)
    early = TrialRow("00001", "TERMINATED", {"loss.style": 3.0}, 5, last_val_score=0.93)
    never = TrialRow("00002", "ERROR", {"loss.style": 9.0}, 0)
    lines = format_table([done, early, never]).splitlines()
    assert "0.6100" in lines[1] and "0.200" in lines[1] and "0.400" in lines[1]
    assert "(0.9300, no ckpt)" in lines[2] and "nan" not in lines[2]
    assert "nan" not in lines[3] and lines[3].split()[3] == "-"
