"""A node reclaim under Ray: the node is drained (as the autoscaler / KubeRay do before a spot or
scale-down termination) and rank 0 writes a just-in-time checkpoint at the next report step.

A two-node local cluster with token auth: a 0-CPU head and a 2-CPU worker node that hosts both
Train workers. The drain goes through Ray's GCS ``DrainNode`` call with the preemption reason
(what ``ray drain-node`` sends), from a subprocess so this process never joins that cluster.
Reports closer than Train's 2 s controller poll block on its 1-slot result queue, so this run
is short in reports: ~2 s per report here, not per step (40 steps, a report every 4: 10 reports;
the drain lands at step 8 and the preemption watcher, polling every 5 s, answers within ~3 reports).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hooks import hook_sets, trace_records
from stylegen import raycluster
from tiny import DEMO, ROOT, TINY

pytestmark = [pytest.mark.ray, pytest.mark.slow]
STEPS = 40

DRAIN = """
import sys, time
import ray
from ray.core.generated import autoscaler_pb2
ray.init(address=sys.argv[1], logging_level="ERROR")
workers = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
assert len(workers) == 1, workers
gcs = ray._raylet.GcsClient(address=sys.argv[1])
accepted, why = gcs.drain_node(workers[0], autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                               "stylegen test: spot reclaim", int(time.time() * 1000) + 600_000)
assert accepted, why
print("drained", workers[0])
"""


@pytest.mark.timeout(600)
def test_drained_node_gets_a_just_in_time_checkpoint(tmp_path):
    state = tmp_path / "cluster"
    c = raycluster.start_local_cluster(state, port=raycluster.free_port(), dashboard_port=raycluster.free_port(),
                                       num_cpus=0, worker_node=True, worker_cpus=2)
    trace, storage = tmp_path / "trace", tmp_path / "storage"
    env = raycluster.cluster_env(Path(c.token_path), dict(os.environ))
    env.pop("RAY_ADDRESS", None)
    env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "2"  # Train's default: the report pacing above (conftest lowers it)
    args = [f"--set={s}" for s in [*TINY, f"train.steps={STEPS}", "train.report_every=4", "train.checkpoint_every=1000",
                                   "train.sample_every=1000", hook_sets(trace=trace)]]
    log_path = tmp_path / "driver.log"
    try:
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen([sys.executable, "-m", "stylegen", "train", "--config", str(DEMO), *args,
                                     "--address", c.gcs_address, "--storage", str(storage), "--name", "reclaim",
                                     "--no-progress"], cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None and not any(r["step"] >= 8 for r in trace_records(trace)):
            time.sleep(0.5)
        assert proc.poll() is None, log_path.read_text()[-3000:]
        drained = subprocess.run([sys.executable, "-c", DRAIN, c.gcs_address], env=env, capture_output=True,
                                 text=True, timeout=120)
        assert drained.returncode == 0, drained.stderr[-2000:]
        drained_at = max(r["step"] for r in trace_records(trace))
        rc = proc.wait(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
        raycluster.stop_local_cluster(state)
    out = log_path.read_text()
    assert rc == 0, out[-3000:]
    recs = trace_records(trace)
    jit = [r["step"] for r in recs if r["checkpoint"] and r["step"] < STEPS]
    # exactly one checkpoint before the final one: the just-in-time one, soon after the drain
    # (the watcher polls every 5 s; a report every 4 steps), and training went on to the end
    assert len(jit) == 1, jit
    assert drained_at < jit[0] < STEPS
    assert recs[-1]["step"] == STEPS and recs[-1]["checkpoint"]
    assert (storage / "reclaim" / f"step_{jit[0]:08d}" / "checkpoint.pt").is_file()
