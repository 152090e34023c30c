"""The cluster path on object storage, end to end against a real S3 server (moto on 127.0.0.1):

shard to s3:// -> verify -> 2 Ray Train workers reading shards from s3:// with checkpoints on s3:// ->
a worker SIGKILLed mid-run -> resumed from the object-store checkpoint -> a 2-trial sweep stored on
s3:// -> `best s3://...` offline (no Ray) -> export -> stylize. And a 2-node local Ray cluster (two
`ray start` processes, each with its own scratch dir) training with storage on s3://.

Every `stylegen` command runs as a subprocess, as a user runs it: its local Ray lives and dies
with that process group. Nothing here relies on a local disk shared with the workers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from s3server import S3, client_env, s3, s3_server  # noqa: F401  (fixtures)
from stylegen import storage
from stylegen.data.shard import ShardParams, build_shards, verify
from hooks import hook_sets, read_trace
from tiny import DEMO, ROOT, TINY

pytestmark = [pytest.mark.ray, pytest.mark.slow]
TUNE_TOML = str(ROOT / "jobs" / "configs" / "tune.toml")


def images(d: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        base = rng.integers(0, 256, 3)
        yy, xx = np.mgrid[0:72, 0:72]
        arr = (base + np.stack([xx * (i + 1), yy, xx + yy], -1) + rng.integers(0, 30, (72, 72, 3))) % 256
        Image.fromarray(arr.astype(np.uint8)).save(d / f"im{i:03d}.png")
    return d


def run(args: list[str], env: dict, log: Path, timeout: float) -> subprocess.CompletedProcess:
    """A stylegen command in its own process group; the group is killed if it outlives ``timeout``."""
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "stylegen", *args], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
    return subprocess.CompletedProcess(args, rc, log.read_text(errors="replace"), "")


def objects(bucket: S3, prefix: str) -> list[str]:
    out, token = [], None
    while True:
        kw = {"ContinuationToken": token} if token else {}
        resp = bucket.client().list_objects_v2(Bucket=bucket.bucket, Prefix=prefix, **kw)
        out += [o["Key"] for o in resp.get("Contents", [])]
        token = resp.get("NextContinuationToken")
        if not token:
            return out


def shard_inputs(tmp_path: Path, s3: S3) -> list[str]:
    params = ShardParams(encoding="raw", shard_size=8, val_fraction=0.25)
    c, s = s3.url("shards", "content"), s3.url("shards", "style")
    build_shards([str(images(tmp_path / "content", 24, 0))], c, params, workers=1, progress=False)
    build_shards([str(images(tmp_path / "style", 16, 1))], s, params, workers=1, progress=False)
    for url in (c, s):
        assert verify(url)[2] == []
    return [f"data.content=['{c}']", f"data.style=['{s}']"]


@pytest.mark.timeout(1200, method="thread")
def test_s3_chain_train_kill_resume_sweep_best_export_stylize(tmp_path, s3):
    data = shard_inputs(tmp_path, s3)
    env = {**os.environ, **s3.env}
    env.pop("RAY_ADDRESS", None)

    # 2 workers, shards and checkpoints on s3://, one worker SIGKILLed after step 10
    trace, flag = tmp_path / "trace", tmp_path / "kill-once"
    flag.write_text("")
    sets = [*TINY, *data, "train.steps=16", "train.report_every=4", "train.checkpoint_every=4",
            "train.sample_every=100", "train.max_failures=1", hook_sets(trace=trace, kill_after=(10, flag))]
    r = run(["train", "--config", str(DEMO), *[f"--set={x}" for x in sets], "--storage", s3.url("runs"),
             "--name", "chain", "--no-progress"], env, tmp_path / "train.log", 600)
    assert r.returncode == 0, r.stdout[-3000:]
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
    # holds a trial_slot, not a CPU: no deadlock)
    r = run(["tune", "--config", TUNE_TOML, *[f"--set={x}" for x in [*TINY, *data, "train.steps=10",
                                                                      "train.report_every=5",
                                                                      "train.checkpoint_every=5",
                                                                      "train.sample_every=20",
                                                                      "train.max_failures=0"]],
             "--set", 'tune.space={"loss.style" = {grid = [1.0, 10.0]}}', "--scheduler", "fifo",
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
             "print(json.dumps({'rc': rc, 'plain': plain, 's': time.perf_counter() - t, 'torch_plain': torch, "
             "'ray': 'ray' in sys.modules, 'torch': 'torch' in sys.modules}), file=sys.stderr)")
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr
    facts = json.loads(p.stderr.strip().splitlines()[-1])
    assert facts["rc"] == 0 and not facts["ray"], facts
    out = json.loads(p.stdout[p.stdout.rindex('{\n  "best"'):])
    assert len(out["top"]) == 2 and out["best"]["checkpoint"].startswith(s3.url("sweeps", "sw"))
    assert out["best"]["val_score"] == min(t["val_score"] for t in out["top"])
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


@pytest.fixture(scope="module")
def two_nodes(s3_server, tmp_path_factory):
    """Two `ray start` nodes on this machine, each with its own temp dir, shared by the two tests below
    (one cluster start instead of two). Their processes get the S3 endpoint and credentials in their
    environment, as a real cluster's nodes get them from their instance role."""
    from stylegen.errors import UserError
    from stylegen.raycluster import free_port, start_local_cluster, stop_local_cluster

    state = tmp_path_factory.mktemp("two-nodes")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in client_env(s3_server).items():
            mp.setenv(key, value)
        # Under make test this starts while the other worker starts its own Ray on the same 2 cores; one
        # clean-clone run saw Ray's own 30 s limit for a raylet to register with its GCS pass (ray/_private/
        # node.py, hard-coded), and that node's `ray start` exit (start_local_cluster then fails at once,
        # stopping what it started). One more start, after the first, is what the two tests' own starts
        # used to give.
        for attempt in (1, 2):
            try:
                cluster = start_local_cluster(state, port=free_port(), dashboard_port=free_port(), worker_node=True,
                                              num_cpus=1, worker_cpus=1, timeout=300)
                break
            except UserError:
                if attempt == 2:
                    raise
    try:
        yield cluster
    finally:
        stop_local_cluster(state)


@pytest.mark.timeout(900, method="thread")
def test_two_node_cluster_trains_with_storage_on_s3(tmp_path, s3, two_nodes):
    """The run's storage is s3://, so rank 1's node never shares a disk path with the driver's."""
    from stylegen.raycluster import cluster_env

    data = shard_inputs(tmp_path, s3)
    env = cluster_env(Path(two_nodes.token_path), {**os.environ, **s3.env})
    sets = [*TINY, *data, "train.steps=8", "train.report_every=4", "train.checkpoint_every=4",
            "train.sample_every=100", "train.max_failures=0", "ray.cpus_per_worker=1"]
    r = run(["train", "--config", str(DEMO), *[f"--set={x}" for x in sets], "--storage", s3.url("runs"),
             "--name", "twonode", "--address", two_nodes.gcs_address, "--no-progress"], env, tmp_path / "train.log", 600)
    assert r.returncode == 0, r.stdout[-3000:]
    keys = objects(s3, "runs/twonode/")
    assert "runs/twonode/step_00000008/checkpoint.pt" in keys, keys
    # the worker node ran its share in a scratch dir of its own, not the head's
    assert two_nodes.worker_temp_dir and Path(two_nodes.worker_temp_dir) != Path(two_nodes.temp_dir)
    assert list(Path(two_nodes.worker_temp_dir).glob("session_*/logs/python-core-worker-*.log")), \
        "no task ran on the worker node"


@pytest.mark.timeout(900, method="thread")
def test_submit_preflight_checks_every_node(tmp_path, s3, two_nodes):
    """`stylegen submit` runs a tiny task on each node of a 2-node cluster before the job: a local-path
    storage is refused (more than one node), a missing bucket is named, a reachable s3:// passes."""
    from stylegen.raycluster import cluster_env

    data = shard_inputs(tmp_path, s3)
    env = cluster_env(Path(two_nodes.token_path), {**os.environ, **s3.env})
    base = ["submit", "train", "--address", two_nodes.dashboard_url, "--config", str(DEMO),
            *[f"--set={x}" for x in [*TINY, *data, "train.steps=2"]], "--name", "pf"]

    def submit(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "stylegen", *base, *extra], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)

    r = submit(f"--set=ray.storage={tmp_path / 'local-storage'}")
    err = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(err) == 1, r.stderr
    assert "is a local path but the cluster has 2 nodes" in err[0]

    r = submit("--set=ray.storage=s3://sg-no-such-bucket-zz/runs")
    err = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(err) == 1, r.stderr
    assert "s3://sg-no-such-bucket-zz/runs" in err[0] and "bucket does not exist" in err[0]

    r = submit(f"--set=ray.storage={s3.url('runs')}", "--job-args=--local --no-progress", "--wait")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "SUCCEEDED" in r.stderr
