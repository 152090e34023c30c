"""The cluster path on object storage, end to end against a real S3 server (moto on 127.0.0.1):

shard to s3:// -> verify -> 2 Ray Train workers reading shards from s3:// with checkpoints on s3:// ->
a worker SIGKILLed mid-run -> resumed from the object-store checkpoint -> a 2-trial sweep stored on
s3:// (one trial errored, never ranked) -> `best s3://...` offline (no Ray) -> export -> stylize.
(A 2-node cluster training with its storage on s3://, and `stylegen submit`'s per-node preflight:
tests/test_local_cluster.py.)

Every `stylegen` command runs as a subprocess, as a user runs it: its local Ray lives and dies
with that process group. Nothing here relies on a local disk shared with the workers.

The training run is also where the Ray that `stylegen train` starts without `--address` is checked
(issue 8's security items; tests/test_security.py's other checks): it runs with a HOME of its own, so
its token is the one that Ray writes for it. While both ranks wait after step 4 (DDP up), its job API
must answer 401 without the token, 403 with a wrong one and 200 with it; every listener of its
process tree must be named in README's in-process table; and only the DDP run's TCPStore may accept
a connection on the machine's other address.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hooks import hook_sets, read_trace, wait_for_ranks
from listeners import (Listener, accepts, exposed_ports, format_listeners, http_status, in_process_rows, listeners,
                       other_address, unexplained, unobserved)
from s3server import objects, run, s3, s3_server, shard_inputs  # noqa: F401  (fixtures)
from stylegen.data.embedded import default_root
from stylegen.errors import UserError
from stylegen.raycluster import find_token, free_port
from tiny import DEMO, ROOT, TINY

pytestmark = [pytest.mark.ray, pytest.mark.slow]
TUNE_TOML = str(ROOT / "jobs" / "configs" / "tune.toml")




@pytest.mark.timeout(1200, method="thread")
def test_s3_chain_train_kill_resume_sweep_best_export_stylize(tmp_path, s3):
    data = shard_inputs(tmp_path, s3)
    env = {**os.environ, **s3.env}
    env.pop("RAY_ADDRESS", None)

    # 2 workers, shards and checkpoints on s3://, one worker SIGKILLed after step 10; held after step 4
    # while its local Ray is looked at (the module doc)
    trace, flag, held, home = tmp_path / "trace", tmp_path / "kill-once", tmp_path / "held", tmp_path / "home"
    flag.write_text("")
    home.mkdir()
    train_env = {k: v for k, v in env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    train_env.update(HOME=str(home), STYLEGEN_CACHE=str(default_root().parent), RAY_USAGE_STATS_ENABLED="0",
                     # Ray's fixed defaults (44227, 44217) are taken while another Ray runs here, and then
                     # these endpoints do not start at all: free ports, so that their rows are observed
                     DASHBOARD_METRIC_PORT=str(free_port()), AUTOSCALER_METRIC_PORT=str(free_port()))
    seen: dict = {"listeners": set()}
    sets = [*TINY, *data, "train.steps=16", "train.report_every=4", "train.checkpoint_every=4",
            "train.sample_every=100", "train.max_failures=1",
            hook_sets(trace=trace, kill_after=(10, flag), pause_after=(4, held))]
    r = run(["train", "--config", str(DEMO), *[f"--set={x}" for x in sets], "--storage", s3.url("runs"),
             "--name", "chain", "--no-progress"], train_env, tmp_path / "train.log", 600,
            during=lambda proc: look_at_local_ray(proc, held, home, tmp_path / "train.log", seen))
    assert r.returncode == 0, r.stdout[-3000:]
    check_local_ray(seen, home)
    assert not flag.exists(), "the fault hook never fired"
    for rank, recs in read_trace(trace).items():
        pids = list(dict.fromkeys(x["pid"] for x in recs))
        assert len(pids) == 2, f"rank {rank} was not restarted"
        after = [x for x in recs if x["pid"] == pids[1]]
        assert {x["start_step"] for x in after} == {8}, recs  # resumed from the object-store checkpoint
        assert after[-1]["step"] == 16
    keys = objects(s3, "runs/chain/")
    assert "runs/chain/step_00000016/checkpoint.pt" in keys, keys
    assert not (ROOT / "s3:").exists() and not (tmp_path / "s3:").exists()

    # the run's best checkpoint, offline, straight from the bucket
    r = run(["best", s3.url("runs", "chain"), "--json"], env, tmp_path / "best-run.log", 120)
    assert r.returncode == 0, r.stdout
    best_run = json.loads(r.stdout[r.stdout.index("{"):])["best"]
    assert best_run["checkpoint"].startswith(s3.url("runs", "chain", "step_"))

    # a 2-trial sweep with its storage on s3://, both trials at once on the 2 CPUs (each trial's driver
    # holds a trial_slot, not a CPU: no deadlock); the second one's loss weight overflows (FloatingPointError)
    r = run(["tune", "--config", TUNE_TOML, *[f"--set={x}" for x in [*TINY, *data, "train.steps=10",
                                                                      "train.report_every=5",
                                                                      "train.checkpoint_every=5",
                                                                      "train.sample_every=20",
                                                                      "train.max_failures=0"]],
             "--set", 'tune.space={"loss.style" = {grid = [1.0, 1e39]}}', "--scheduler", "fifo",
             "--samples", "1", "--max-concurrent", "2", "--storage", s3.url("sweeps"), "--name", "sw"],
            env, tmp_path / "tune.log", 600)
    assert r.returncode == 0, r.stdout[-3000:]
    assert "sweep_config.json" in {k.rsplit("/", 1)[-1] for k in objects(s3, "sweeps/sw/")}
    # best, offline: no Ray running, nothing of Ray or torch imported, the sweep read from the bucket
    probe = ("import json, sys, time; t = time.perf_counter(); from stylegen.cli import main; "
             f"rc = main(['best', 'sw', '--storage', {s3.url('sweeps')!r}, '--json', '--top', '2']); "
             "plain = time.perf_counter() - t; torch = 'torch' in sys.modules; "
             f"rc = rc or main(['best', 'sw', '--storage', {s3.url('sweeps')!r}, '--json', '--top', '2', "
             f"'--export', {str(tmp_path / 'best')!r}]); "
             "from stylegen.best import read_location; "
             f"rows = [[r.params, r.status, r.stop_reason, r.trial_id] for r in read_location({s3.url('sweeps', 'sw')!r}, "
             "'val_score', 'min')[0]]; "
             "print(json.dumps({'rc': rc, 'plain': plain, 's': time.perf_counter() - t, 'torch_plain': torch, "
             "'rows': rows, 'ray': 'ray' in sys.modules, 'torch': 'torch' in sys.modules}), file=sys.stderr)")
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr
    facts = json.loads(p.stderr.strip().splitlines()[-1])
    assert facts["rc"] == 0 and not facts["ray"], facts
    out = json.loads(p.stdout[p.stdout.rindex('{\n  "best"'):])
    # the errored trial is marked with its reason and never ranks: the top 2 asked for hold the healthy one
    rows = {params["loss.style"]: (status, reason, tid) for params, status, reason, tid in facts["rows"]}
    assert sorted(rows) == [1.0, 1e39], rows
    assert rows[1.0][:2] == ("TERMINATED", "completed") and rows[1e39][0] == "ERROR", rows
    assert "FloatingPointError" in rows[1e39][1] and "non-finite" in rows[1e39][1], rows
    assert [t["trial_id"] for t in out["top"]] == [rows[1.0][2]], out["top"]
    assert out["best"]["checkpoint"].startswith(s3.url("sweeps", "sw"))
    assert not facts["torch_plain"]  # reading a sweep needs neither Ray nor torch
    print(f"best s3://.../sw (2 trials): {facts['plain']:.2f} s in a fresh process, imports included; "
          f"then with --export: {facts['s'] - facts['plain']:.2f} s more")
    assert (tmp_path / "best" / "checkpoint.pt").is_file()

    # stylize with the exported checkpoint, and straight from the bucket
    img = tmp_path / "content" / "im000.png"
    for ckpt, name in ((str(tmp_path / "best"), "a.png"), (out["best"]["checkpoint"], "b.png")):
        r = run(["stylize", "--checkpoint", ckpt, "--content", str(img), "--style",
                 str(tmp_path / "style" / "im001.png"), "--out", str(tmp_path / name)], env,
                tmp_path / "stylize.log", 120)
        assert r.returncode == 0, r.stdout
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def look_at_local_ray(proc: subprocess.Popen, held: Path, home: Path, log: Path, seen: dict) -> None:
    """While both ranks are held: the listeners of the driver's process tree (its local Ray, the run's
    actors), the job API's answers, and what the machine's other address accepts; then release them."""
    wait_for_ranks(held, 2, proc, log)
    for _ in range(4):  # a few looks: idle workers and Train's actors come and go
        seen["listeners"] |= listeners([proc.pid])
        time.sleep(0.5)
    token = (home / ".ray" / "auth_token").read_text().strip()
    seen["job_api"] = {}
    for lst in seen["listeners"]:
        if lst.process == "dashboard.py":  # the job API, or the dashboard's own /metrics
            url = f"http://127.0.0.1:{lst.port}/api/version"
            seen["job_api"][lst.port] = (http_status(url), http_status(url, "0" * 64), http_status(url, token))
    other = other_address()
    # a port that another process (another test's Ray) listens on beyond loopback answers for that process
    foreign = exposed_ports() - {lst.port for lst in seen["listeners"] if not lst.loopback}
    seen["other_open"] = {lst for lst in seen["listeners"]
                          if other and lst.port not in foreign and accepts(other, lst.port)}
    (held / "go").touch()


def check_local_ray(seen: dict, home: Path) -> None:
    found: set[Listener] = seen["listeners"]
    table = format_listeners(found)
    print(f"\nlisteners of `stylegen train`'s own Ray and its run (held after step 4):\n{table}\njob API answers "
          f"(no token, wrong, right) by dashboard.py port: {seen['job_api']}; open on the other address: "
          f"{sorted((x.process, x.port) for x in seen['other_open'])}")
    # the job API needs the token Ray wrote to this HOME: 401 without, 403 with a wrong one
    job = [port for port, answers in seen["job_api"].items() if answers == (401, 403, 200)]
    assert len(job) == 1, (seen["job_api"], table)
    assert {x.address for x in found if x.port == job[0]} == {"127.0.0.1"}, table
    token_file = home / ".ray" / "auth_token"
    if token_file.stat().st_mode & 0o077:  # Ray writes it with the umask's mode (0644 under 022): submit refuses it
        with pytest.raises(UserError, match=re.escape(f"chmod 600 {token_file}")):
            find_token({}, home)
    token_file.chmod(0o600)
    assert find_token({}, home)[1] == str(token_file)
    # every listener is named in README's in-process table; only the TCPStore binds beyond loopback
    rows = in_process_rows((ROOT / "README.md").read_text())
    assert len(rows) >= 8 and all(len(r.reason) > 40 for r in rows if not r.loopback)
    assert any(x.process.startswith("ray::RayTrainWorker") for x in found), table
    assert unexplained(found, rows) == [], f"listeners README's in-process table does not name:\n{table}"
    assert unobserved(found, rows) == [], f"README rows no longer observed:\n{table}"
    # from another machine, only the DDP run's TCPStore (README's one exposed row) can be reached
    assert all(x.process.startswith("ray::RayTrainWorker") and not x.loopback for x in seen["other_open"]), (
        seen["other_open"], table)
