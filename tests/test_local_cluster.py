"""The local cluster of cluster/local-up.sh, started once for this module (two nodes, 1 CPU each,
token auth, 127.0.0.1) and used in file order:

1. what local-up.sh starts: the token file, the dashboard's auth, loopback-only ports, a second
   start refused;
2. a Tune sweep on a cluster without the trial_slot resource (as local-up.sh and ``ray up`` start
   them): it falls back to 0.01-CPU trial drivers and caps the concurrency instead of deadlocking;
   its driver killed midway, then resumed to the end;
3. a 2-rank run with its storage on s3:// (a real S3 server, tests/s3server.py), one rank per node,
   held after step 4 while we read what it listens on: every TCP listener of the cluster's processes,
   the driver and its actors (core workers, Train's actors, gloo, torch's TCPStore) is on loopback, or
   is named with its reason in README's "Ports and listeners" table. Listeners are read from /proc
   (tests/listeners.py: sockets in LISTEN state owned by the process trees of the two ``ray start``
   PIDs and of the driver), so other tests' Ray processes on this machine are never counted;
4. `stylegen submit`'s preflight, which runs a task on every node;
5. a node reclaim: the worker node drained while a 2-rank run waits at a report step; one
   just-in-time checkpoint there, then on to the end (last: a drained node takes no new work);
6. local-down.sh stops exactly the processes local-up.sh started.

(Each of 1-5 used to start a cluster of its own, and the killed sweep ran on another Ray; the listener
look had a DDP run of its own.)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from hooks import hook_sets, read_trace, wait_for_ranks
from listeners import (README, SECTION, Listener, Row, format_listeners, http_status, listeners, readme_rows,
                       unexplained, unobserved)
from s3server import client_env, objects, run, s3, s3_server, shard_inputs  # noqa: F401  (fixtures)
from stylegen import raycluster
from stylegen.procs import kill_group
from test_tune import cli, sweep_rows
from tiny import DEMO, TINY

ROOT = Path(__file__).resolve().parents[1]
TUNE_TOML = str(ROOT / "jobs" / "configs" / "tune.toml")

# ----------------------------------------------------------------------------- README's table and /proc

def test_readme_table_parses_and_the_check_rejects_an_unnamed_listener():
    rows = readme_rows(README.read_text())
    assert len(rows) >= 10
    exposed = [r for r in rows if not r.loopback]
    assert exposed and all(len(r.reason) > 40 for r in exposed), "each non-loopback row needs its reason"
    gcs = Listener("127.0.0.1", 6390, 1, "gcs_server")
    assert unexplained({gcs}, rows) == []
    # the same process on every interface is not covered by its loopback row
    assert unexplained({Listener("::", 6390, 1, "gcs_server")}, rows) == [Listener("::", 6390, 1, "gcs_server")]
    # an unknown process is not covered, even on loopback
    assert unexplained({Listener("127.0.0.1", 1, 1, "nc")}, rows) == [Listener("127.0.0.1", 1, 1, "nc")]
    # a row without a reason does not cover an exposure
    no_reason = [Row(r.listener, r.processes, r.loopback, "") for r in rows]
    tcpstore = Listener("::", 40000, 1, "ray::RayTrainWorker")
    assert unexplained({tcpstore}, rows) == [] and unexplained({tcpstore}, no_reason) == [tcpstore]


def test_proc_listing_sees_a_listener_of_a_child_process_only(tmp_path):
    if not Path("/proc/net/tcp").exists():
        pytest.skip("reads Linux /proc")
    code = "import socket,time; s=socket.socket(); s.bind(('127.0.0.1',0)); s.listen(); print(s.getsockname()[1], flush=True); time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        port = int(child.stdout.readline())
        mine = listeners([child.pid])
        assert Listener("127.0.0.1", port, child.pid, "python") in mine
        assert all(lst.pid == child.pid for lst in mine)
        assert not any(lst.port == port for lst in listeners([os.getpid()]) if lst.pid != child.pid)
    finally:
        child.kill()
        child.wait()


# ----------------------------------------------------------------------------- the cluster

def _script(name: str, *args: str, timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "cluster" / name), *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


@pytest.fixture(scope="module")
def local_up(tmp_path_factory, s3_server):
    """``cluster/local-up.sh --workers-node --num-cpus 1``: (cluster, its state dir, local-up's output).
    Its processes get the S3 endpoint and credentials in their environment, as a real cluster's nodes
    get them from their instance role. The last test stops it with local-down.sh; if a test before it
    failed, the cluster is stopped here."""
    state = tmp_path_factory.mktemp("local-up") / "state"
    env = {**os.environ, **client_env(s3_server)}
    # Under make test this starts while the other worker starts its own Ray on the same 2 cores, where
    # Ray's own 30 s limit for a raylet to register with its GCS can pass: start_local_cluster then
    # starts the cluster once more by itself (test_cluster_files).
    taken: set[int] = set()
    port, dash = raycluster.free_port(taken), raycluster.free_port(taken)
    up = _script("local-up.sh", "--state-dir", str(state), "--port", str(port), "--dashboard-port", str(dash),
                 "--workers-node", "--num-cpus", "1", timeout=300, env=env)
    assert up.returncode == 0, up.stderr[-3000:]
    try:
        yield raycluster.read_state(state), state, up
    finally:
        if (state / "cluster.json").exists():
            _script("local-down.sh", "--state-dir", str(state), timeout=120)


@pytest.mark.ray
@pytest.mark.slow
def test_local_up_starts_a_token_cluster_on_loopback(local_up):
    c, state, up = local_up
    token = Path(c.token_path).read_text().strip()
    assert Path(c.token_path).parent == state and stat.S_IMODE(Path(c.token_path).stat().st_mode) == 0o600
    assert c.dashboard_url in up.stdout and c.token_path in up.stdout
    assert token not in up.stdout + up.stderr
    assert int((state / "head.pid").read_text()) == c.head_pid and c.worker_pid is not None
    assert all(raycluster.group_alive(g) for g in (c.head_pid, c.worker_pid))

    base = c.dashboard_url
    with urllib.request.urlopen(f"{base}/api/authentication_mode", timeout=5) as r:
        assert json.load(r)["authentication_mode"] == "token"
    assert http_status(f"{base}/api/version") == 401
    assert http_status(f"{base}/api/version", "0" * 64) == 403
    assert http_status(f"{base}/api/version", token) == 200
    from ray._private.services import get_node_ip_address

    ip = get_node_ip_address()  # this process has no RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: routable
    if not ip.startswith("127."):  # job API and GCS are loopback only (all ports: the next test)
        for p in (c.dashboard_port, c.port):
            with pytest.raises(OSError), socket.create_connection((ip, p), timeout=3):
                pass

    again = _script("local-up.sh", "--state-dir", str(state), timeout=60)
    assert again.returncode == 2 and "already running" in again.stderr


def trials_done(sweep: Path, steps: int) -> int:
    """Trials whose Train run has checkpointed its final step (Train's own snapshot file)."""
    n = 0
    for snap in sweep.glob("trial_runs/trial-*/checkpoint_manager_snapshot.json"):
        try:
            results = json.loads(snap.read_text())["checkpoint_results"]
        except (OSError, ValueError, KeyError):
            continue  # being written
        n += any(r["metrics"].get("step") == steps for r in results)
    return n


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sweep_without_trial_slot_falls_back_then_killed_midway_resumes_and_finishes(local_up, tmp_path):
    """local-up.sh's cluster has no trial_slot resource (nor has one from ``ray up`` without our
    cluster file): trial drivers take 0.01 CPU, so only one trial's 1-CPU workers fit beside them on
    its 2 CPUs; the sweep is capped to 1 concurrent trial instead of deadlocking. Its driver is
    SIGKILLed once the first trial is done (the cluster outlives it, as with a crashed submitter):
    ``best`` reads the sweep as interrupted, ``--resume`` runs the other trial and none is resampled
    or lost, and a resume with another config is refused."""
    c, _, _ = local_up
    # one report (with its checkpoint) per trial: a trial is done when its step-5 checkpoint is
    args = ["tune", "--config", TUNE_TOML, *[f"--set={x}" for x in [*TINY, "train.steps=5", "train.report_every=5",
                                                                    "train.checkpoint_every=5", "train.sample_every=20",
                                                                    "train.max_failures=0"]],
            "--set", 'tune.space={"loss.style" = {grid = [1.0, 10.0]}}', "--scheduler", "fifo", "--samples", "1",
            "--max-concurrent", "2", "--storage", str(tmp_path), "--name", "sw", "--address", c.gcs_address]
    env = {**raycluster.cluster_env(Path(c.token_path)), "RAY_ADDRESS": c.gcs_address}  # Train's PG cleaner
    sweep, log_path = tmp_path / "sw", tmp_path / "tune.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "stylegen.cli", *args], cwd=ROOT, stdout=log_file,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while trials_done(sweep, 5) < 1:
            assert proc.poll() is None, f"the sweep ended before it could be interrupted:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no trial finished in 300 s"
            time.sleep(0.5)
        assert trials_done(sweep, 5) < 2  # one at a time: the other has not finished
        os.kill(proc.pid, signal.SIGKILL)  # a crash, not a polite Ctrl-C
        proc.wait(timeout=30)
    finally:
        kill_group(proc.pid)  # anything the killed driver started in its own process group
    out = log_path.read_text()
    assert "trials take 0.01 CPU" in out and "lowered to 1" in out, out[-3000:]

    r = cli("best", str(sweep), env=env)  # a killed sweep reads as unfinished
    assert r.returncode == 0 and "still running or interrupted" in r.stdout.splitlines()[0], (r.stdout, r.stderr)
    # Ray ends the dead driver's trial and its Train run; the resume waits for their CPUs if it must
    r = cli(*args, "--resume", timeout=360, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = sweep_rows(sweep)
    assert len(rows) == 2  # the same 2 grid points: none resampled, none lost
    assert sorted(row["loss.style"] for row in rows.values()) == [1.0, 10.0]
    assert all(row["status"] == "TERMINATED" and row["stop_reason"] == "completed" for row in rows.values()), rows
    r = cli("best", str(sweep), env=env)
    assert r.returncode == 0 and "still running" not in r.stdout

    # resuming with another config is refused (its remaining trials would train differently)
    r = cli(*args, "--set", "train.steps=6", "--resume", env=env)
    assert r.returncode == 2 and "differs from the config the sweep started with" in r.stderr


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900, method="thread")
def test_two_node_run_on_s3_and_every_listener_on_loopback_or_documented(tmp_path, s3, local_up):
    """A 2-rank run (one rank per node) with its storage on s3://, so rank 1's node never shares a disk path
    with the driver's. Both ranks wait after step 4 (``tests.hooks:pause_after_step``): DDP is up (torch's
    TCPStore and gloo's pairs listen) and Train's actors are alive while every listener of the cluster, the
    driver and its actors is read; each must be on loopback or have its row in README's table."""
    c, _, _ = local_up
    data = shard_inputs(tmp_path, s3)
    env = raycluster.cluster_env(Path(c.token_path), {**os.environ, **s3.env})
    worker_logs = Path(c.worker_temp_dir).glob
    before = set(worker_logs("session_*/logs/python-core-worker-*.log"))
    roots, waiting, log_path = [c.head_pid, c.worker_pid], tmp_path / "waiting", tmp_path / "train.log"
    found: set[Listener] = set(listeners(roots))
    looked = {}

    def look(proc: subprocess.Popen) -> None:
        t0 = time.monotonic()
        wait_for_ranks(waiting, 2, proc, log_path)
        looked["ddp_up"] = time.monotonic() - t0
        for _ in range(4):  # a few looks: idle workers and Train's actors come and go
            found.update(listeners([*roots, proc.pid]))
            time.sleep(0.5)
        (waiting / "go").touch()

    sets = [*TINY, *data, "train.steps=8", "train.report_every=4", "train.checkpoint_every=4",
            "train.sample_every=100", "train.max_failures=0", "ray.cpus_per_worker=1",
            hook_sets(pause_after=(4, waiting))]
    r = run(["train", "--config", str(DEMO), *[f"--set={x}" for x in sets], "--storage", s3.url("runs"),
             "--name", "twonode", "--address", c.gcs_address, "--no-progress"], env, log_path, 600, during=look)
    assert r.returncode == 0, r.stdout[-3000:]
    keys = objects(s3, "runs/twonode/")
    assert "runs/twonode/step_00000008/checkpoint.pt" in keys, keys
    # the worker node ran its share in a scratch dir of its own, not the head's
    assert c.worker_temp_dir and Path(c.worker_temp_dir) != Path(c.temp_dir)
    after = set(worker_logs("session_*/logs/python-core-worker-*.log"))
    assert after - before, "no task of the run ran on the worker node"

    rows = readme_rows(README.read_text())
    table = format_listeners(found)
    print(f"\nlisteners of the cluster, its actors and a DDP run (DDP up after {looked['ddp_up']:.1f} s):\n{table}")
    bad = unexplained(found, rows)
    assert not bad, (f"listeners README '{SECTION}' does not account for (off loopback without a row and "
                     f"reason, or an unnamed process):\n" + "\n".join(map(str, bad)) + f"\nall:\n{table}")
    # every port we chose is in use by the cluster, on loopback and nowhere else
    by_port: dict[int, set[str]] = {}
    for lst in found:
        by_port.setdefault(lst.port, set()).add(lst.address.removeprefix("::ffff:"))
    for node, ports in c.ports.items():
        for name, port in ports.items():
            assert by_port.get(port) == {"127.0.0.1"}, (node, name, port, by_port.get(port), table)
    # the DDP run and the actors ran: their listeners were seen
    assert any(lst.process.startswith("ray::RayTrainWorker") for lst in found), table
    # the table does not claim an exposure that no longer exists (Ray or torch fixed it: update README)
    assert unobserved(found, rows) == [], f"README rows no longer observed:\n{table}"


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900, method="thread")
def test_submit_preflight_checks_every_node(tmp_path, s3, local_up):
    """`stylegen submit` runs a tiny task on each node of a 2-node cluster before the job: a local-path
    storage is refused (more than one node), a missing bucket is named, a reachable s3:// passes."""
    c, _, _ = local_up
    data = shard_inputs(tmp_path, s3)
    env = raycluster.cluster_env(Path(c.token_path), {**os.environ, **s3.env})
    base = ["submit", "train", "--address", c.dashboard_url, "--config", str(DEMO),
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


# the worker node (the one without Ray's head resource), drained as `ray drain-node` does: with the
# preemption reason and a deadline, through the GCS, from a driver of its own
DRAIN = """
import sys, time
import ray
from ray.core.generated import autoscaler_pb2
ray.init(address=sys.argv[1], logging_level="ERROR")
workers = [n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" not in n["Resources"]]
assert len(workers) == 1, workers
gcs = ray._raylet.GcsClient(address=sys.argv[1])
accepted, why = gcs.drain_node(workers[0], autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                               "stylegen test: spot reclaim", int(time.time() * 1000) + 600_000)
assert accepted, why
print("drained", workers[0])
"""
PREEMPT_STEPS, DRAIN_AT = 12, 8  # DRAIN_AT: a report step


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_drained_node_gets_a_just_in_time_checkpoint(tmp_path, local_up):
    """A node reclaim (the autoscaler / KubeRay drain a node before a spot or scale-down termination):
    rank 0 writes one just-in-time checkpoint at the next report step, and training goes on to its end.
    One rank per node. Both wait after step 8, a report step (``tests.hooks:await_preemption_after_step``),
    until Train tells them the node is preempted; the worker node is drained meanwhile, and Train's
    preemption watcher polls every 0.5 s instead of 5 s. So the checkpoint is due at step 8 exactly,
    however fast the machine. Last before local-down: a drained node takes no new work."""
    c, _, _ = local_up
    trace, storage, waiting = tmp_path / "trace", tmp_path / "storage", tmp_path / "waiting"
    env = raycluster.cluster_env(Path(c.token_path), dict(os.environ))
    env.pop("RAY_ADDRESS", None)
    env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "1"  # Ray's default; tests/conftest.py turns it off elsewhere
    env["RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"] = "0.5"  # Train propagates both to its controller
    sets = [*TINY, f"train.steps={PREEMPT_STEPS}", "train.report_every=4", "train.checkpoint_every=1000",
            "train.sample_every=1000", "ray.cpus_per_worker=1",
            hook_sets(trace=trace, await_preemption=(DRAIN_AT, waiting))]

    def drain(proc: subprocess.Popen) -> None:
        wait_for_ranks(waiting, 2, proc, tmp_path / "driver.log")  # both ranks wait after step DRAIN_AT
        drained = subprocess.run([sys.executable, "-c", DRAIN, c.gcs_address], env=env, capture_output=True,
                                 text=True, timeout=120)
        assert drained.returncode == 0, drained.stderr[-2000:]

    r = run(["train", "--config", str(DEMO), *[f"--set={x}" for x in sets], "--address", c.gcs_address,
             "--storage", str(storage), "--name", "reclaim", "--no-progress"], env, tmp_path / "driver.log", 400,
            during=drain)
    out = r.stdout
    assert r.returncode == 0, out[-3000:]
    recs = read_trace(trace)[0]
    jit = [x["step"] for x in recs if x["checkpoint"] and x["step"] < PREEMPT_STEPS]
    # exactly one checkpoint before the final one: the just-in-time one, at the report step the drain
    # came at (the ranks waited there for it), and training went on to the end
    assert f"test: rank 0 held after step {DRAIN_AT}, released: True" in out, out[-3000:]
    assert jit == [DRAIN_AT], jit
    assert recs[-1]["step"] == PREEMPT_STEPS and recs[-1]["checkpoint"]
    assert (storage / "reclaim" / f"step_{DRAIN_AT:08d}" / "checkpoint.pt").is_file()
    # Ray's warning about the watcher's constructor arguments (every run with the watcher on) is chatter
    # that stylegen's quiet driver drops (raylogs.py); the rest of the suite runs without the watcher
    assert "PreemptionWatcher' and" not in out, out[-3000:]


@pytest.mark.ray
@pytest.mark.slow
def test_local_down_stops_only_its_cluster(local_up):
    """The module's last test: local-down.sh stops the two nodes' process groups and removes their
    scratch dirs and the state file, and nothing else (a bystander named like Ray survives)."""
    c, state, _ = local_up
    groups = [c.head_pid, c.worker_pid]
    # a bystander that looks like Ray by name: a name-based stop (`ray stop`, pkill) would hit it
    decoy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "ray", "start", "--head"],
                             start_new_session=True)
    try:
        down = _script("local-down.sh", "--state-dir", str(state), timeout=120)
        assert down.returncode == 0, down.stderr
        assert f"{c.worker_pid}, {c.head_pid}" in down.stdout
        deadline = time.monotonic() + 10
        while any(raycluster.group_alive(g) for g in groups) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(raycluster.group_alive(g) for g in groups), "processes of the cluster survived local-down"
        assert decoy.poll() is None, "local-down stopped a process it did not start"
        assert not (state / "cluster.json").exists() and not Path(c.temp_dir).exists()
        assert c.worker_temp_dir != c.temp_dir and not Path(c.worker_temp_dir).exists()  # each node's own, removed
        gone = _script("local-down.sh", "--state-dir", str(state), timeout=60)
        assert gone.returncode == 2 and "no local cluster state" in gone.stderr
    finally:
        os.killpg(decoy.pid, signal.SIGKILL)
        decoy.wait()
