"""A real Prometheus (Debian's, installed by CI) scrapes stylegen metrics from two ranks.

Prometheus runs on a free loopback port with infra/prometheus/prometheus.yml rewritten to the
test's ports and paths (1 s scrape interval, tmp data dir) and is stopped by its Popen handle.
The two Ray tests share one head and one Prometheus (``ray_head``).
"""

from __future__ import annotations

import json
import logging
import time
import urllib.request
from pathlib import Path

import pytest

from stylegen import procs, prom
from stylegen.metrics import TrainMetrics
from stylegen.raycluster import free_port
from tiny import MODEL

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
PROM_DIR = ROOT / "infra" / "prometheus"
STEPS, BATCH = 6, 4


def _start_prometheus(tmp: Path, **overrides) -> tuple[object, str]:
    cfg = prom.render_config(prom.load_config(PROM_DIR / "prometheus.yml"), PROM_DIR, scrape_interval="1s",
                             sd_refresh_interval="1s", **overrides)
    config_file = prom.write_config(cfg, tmp / "prometheus.yml")
    port = free_port()
    proc = prom.start(config_file, tmp, port=port, log_file=tmp / "prometheus.log")
    base = f"http://127.0.0.1:{port}"
    try:
        prom.wait_ready(base, proc, timeout=60)
    except BaseException:
        _stop(proc)
        raise
    return proc, base


def _stop(proc) -> None:
    procs.stop(proc, timeout=15)


def _wait_for_ranks(base: str, promql: str, expected: dict[str, float], timeout: float) -> float:
    """Poll the HTTP API until ``promql`` returns ``expected`` values by rank; returns seconds waited."""
    t0 = time.monotonic()
    got: dict[str, float] = {}
    while time.monotonic() - t0 < timeout:
        got = {r["metric"].get("rank", "?"): float(r["value"][1]) for r in prom.query(base, promql)}
        if got == expected:
            return time.monotonic() - t0
        time.sleep(0.5)
    raise AssertionError(f"{promql}: got {got}, expected {expected} within {timeout:.0f} s")


@pytest.mark.slow
@pytest.mark.prometheus
def test_prometheus_scrapes_two_local_ranks_via_file_sd(tmp_path):
    ranks = [TrainMetrics.create("prometheus", run="live-local", rank=r, port=0) for r in (0, 1)]
    proc = None
    try:
        targets = [m.url.removeprefix("http://").removesuffix("/metrics") for m in ranks]
        prom.write_targets_file(tmp_path / "targets" / "ranks.json", targets)
        proc, base = _start_prometheus(tmp_path, local_targets=[],
                                       targets_files=[str(tmp_path / "targets" / "*.json")],
                                       ray_discovery_file=str(tmp_path / "no-ray.json"))
        for m in ranks:
            for _ in range(STEPS):
                m.step(0.05, BATCH, 0.005, {"content": 1.0, "style": 2.0, "total": 3.0})
        waited = _wait_for_ranks(base, 'sum by (rank) (stylegen_train_samples_total{run="live-local", job="stylegen"})',
                                 {"0": STEPS * BATCH, "1": STEPS * BATCH}, timeout=60)
        for m in ranks:  # steady state: a known target, one more step
            m.step(0.05, BATCH, 0.005, {"total": 3.0})
        steady = _wait_for_ranks(base, 'sum by (rank) (stylegen_train_samples_total{run="live-local"})',
                                 {"0": (STEPS + 1) * BATCH, "1": (STEPS + 1) * BATCH}, timeout=30)
        log.info("local: in Prometheus %.1f s after the steps (new targets), %.1f s steady state", waited, steady)
        loss = prom.query(base, 'stylegen_train_loss{run="live-local", term="style"}')
        assert sorted(r["metric"]["rank"] for r in loss) == ["0", "1"]
        alerts = prom.query(base, 'ALERTS')  # rules are evaluated; none pending for a healthy run
        assert alerts == [], [a["metric"] for a in alerts]
    finally:
        if proc is not None:
            _stop(proc)
        for m in ranks:
            m.close()


# Two 'ranks' (actors in their own worker processes) recording through ray.util.metrics, driven from
# stdin by the test: a line "STEPS BATCH" runs that many steps on both, answered "ran STEPS".
RANK_ACTORS = """
import sys
import ray
from stylegen.metrics import TrainMetrics

ray.init(address=sys.argv[1], logging_level="ERROR")


@ray.remote(num_cpus=1)
class RankActor:
    def __init__(self, rank):
        self.m = TrainMetrics.create("ray", run="live-ray", rank=rank, trial="t0")

    def run(self, steps, batch):
        for _ in range(steps):
            self.m.step(0.05, batch, 0.005, {"content": 1.0, "style": 2.0, "total": 3.0})

    def url(self):
        return self.m.url


workers = [RankActor.remote(r) for r in (0, 1)]
print("url", ray.get(workers[0].url.remote()), flush=True)
for line in sys.stdin:
    steps, batch = map(int, line.split())
    ray.get([w.run.remote(steps, batch) for w in workers])
    print("ran", steps, flush=True)
ray.shutdown()
"""


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """For the module's two Ray tests: a token-auth head (``ray start``, its own temp dir, which holds the
    discovery file its dashboard writes) and a Prometheus that finds its metrics endpoints through that
    file. (cluster, environment of a driver on it, Prometheus URL). Nothing of Ray lives in this process:
    its drivers are subprocesses, each in its own process group. (A fit in a thread of this process,
    ended by ``ray.shutdown()``, once left a thread inside ``ray.get`` that blocked the next module's
    ``ray.init`` for good.)"""
    from stylegen import raycluster

    tmp = tmp_path_factory.mktemp("ray-head")
    state = tmp / "cluster"
    with pytest.MonkeyPatch.context() as env:
        # Ray's processes export their metrics every 10 s by default; every 2 s here, so the tests'
        # waits for a value in Prometheus are shorter (the head passes it to its processes)
        env.setenv("RAY_metrics_report_interval_ms", "2000")
        c = raycluster.start_local_cluster(state, port=free_port(), dashboard_port=free_port(), num_cpus=2)
    proc = None
    try:
        proc, base = _start_prometheus(tmp, local_targets=[], targets_files=[str(tmp / "none-*.json")],
                                       ray_discovery_file=str(Path(c.temp_dir) / "prom_metrics_service_discovery.json"))
        # RAY_ADDRESS too: Train's placement-group cleaner needs it with several Rays on one machine
        yield c, {**raycluster.cluster_env(Path(c.token_path)), "RAY_ADDRESS": c.gcs_address}, base
    finally:
        if proc is not None:
            _stop(proc)
        raycluster.stop_local_cluster(state)


def _kill_group(proc) -> None:
    """A driver subprocess and whatever it started in its process group."""
    procs.kill_group(proc.pid)
    proc.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.prometheus
@pytest.mark.timeout(300)
def test_prometheus_scrapes_two_ray_ranks_via_ray_discovery_file(ray_head, tmp_path):
    import subprocess
    import sys

    c, env, base = ray_head
    with open(tmp_path / "ranks.log", "wb") as err:
        ranks = subprocess.Popen([sys.executable, "-c", RANK_ACTORS, c.gcs_address], cwd=ROOT, env=env, text=True,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, start_new_session=True)

    def run(steps: int) -> None:
        ranks.stdin.write(f"{steps} {BATCH}\n")
        ranks.stdin.flush()
        assert ranks.stdout.readline().split() == ["ran", str(steps)], (tmp_path / "ranks.log").read_text()[-3000:]

    try:
        url = ranks.stdout.readline().split()
        assert url[:1] == ["url"], (tmp_path / "ranks.log").read_text()[-3000:]
        assert url[1].startswith("http://") and url[1].endswith("/metrics")
        run(STEPS)
        waited = _wait_for_ranks(base, 'sum by (rank) (stylegen_train_samples_total{run="live-ray", job="ray"})',
                                 {"0": STEPS * BATCH, "1": STEPS * BATCH}, timeout=120)
        run(1)  # steady state: known series, one more step
        steady = _wait_for_ranks(base, 'sum by (rank) (stylegen_train_samples_total{run="live-ray"})',
                                 {"0": (STEPS + 1) * BATCH, "1": (STEPS + 1) * BATCH}, timeout=60)
        log.info("ray: in Prometheus %.1f s after the first steps, %.1f s steady state (Ray export + 1 s scrape)",
                 waited, steady)
        steps_done = STEPS + 1
        hist = prom.query(base, 'sum by (rank) (stylegen_train_step_duration_seconds_count{run="live-ray"})')
        assert {r["metric"]["rank"]: float(r["value"][1]) for r in hist} == {"0": steps_done, "1": steps_done}
        assert prom.query(base, '{__name__=~"ray_stylegen_.*"}') == []  # the prefix is stripped at scrape
        ranks.stdin.close()
        assert ranks.wait(timeout=60) == 0, (tmp_path / "ranks.log").read_text()[-3000:]
    finally:
        _kill_group(ranks)


@pytest.mark.prometheus
def test_stylegen_prometheus_command_serves_rules_and_stops_with_it(tmp_path):
    import signal
    import subprocess
    import sys

    port = free_port()
    cmd = subprocess.Popen([sys.executable, "-m", "stylegen.cli", "prometheus", "--port", str(port),
                            "--data-dir", str(tmp_path), "--ray-discovery-file", str(tmp_path / "ray.json")],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert cmd.stdout.readline().startswith(f"Prometheus: http://127.0.0.1:{port}")
        base = f"http://127.0.0.1:{port}"
        prom.wait_ready(base, cmd, timeout=60)
        with urllib.request.urlopen(f"{base}/api/v1/rules", timeout=5) as r:
            groups = json.load(r)["data"]["groups"]
        assert len([rule for g in groups for rule in g["rules"]]) == 5
        deadline, scrape = time.monotonic() + 20, set()
        while time.monotonic() < deadline and not scrape:  # targets appear after the first SD sync
            with urllib.request.urlopen(f"{base}/api/v1/targets", timeout=5) as r:
                scrape = {t["scrapeUrl"] for t in json.load(r)["data"]["activeTargets"]}
            time.sleep(0.5)
        assert scrape == {"http://127.0.0.1:9464/metrics"}  # the local default target
        cmd.send_signal(signal.SIGTERM)  # forwarded to prometheus: nothing is left listening
        assert cmd.wait(timeout=20) == 0
        with pytest.raises(OSError):
            urllib.request.urlopen(f"{base}/-/ready", timeout=2)
    finally:
        if cmd.poll() is None:
            cmd.send_signal(signal.SIGTERM)  # stops its prometheus too; kill would orphan it
            try:
                cmd.wait(timeout=20)
            except subprocess.TimeoutExpired:
                cmd.kill()
                cmd.wait()


def test_local_training_run_samples_equal_steps_times_batch(tmp_path):
    """A real (tiny) local training loop exporting through the local backend: samples == steps x batch."""
    import torch

    from stylegen.config import load_config
    from stylegen.features import build_features
    from stylegen.train.loop import LocalSink, LoopContext, training_loop
    from stylegen.train.step import build_state

    steps, batch = 5, 3
    cfg = load_config(None, [f"train.steps={steps}", f"data.batch_size={batch}", *MODEL, "model.channels=4",
                             "train.report_every=5",
                             "train.checkpoint_every=5", "train.sample_every=5", "train.val_pairs=2"])
    metrics = TrainMetrics.create("prometheus", run="live-local", rank=0, port=0)
    try:
        dev = torch.device("cpu")
        training_loop(cfg, build_state(cfg, dev), build_features(cfg.features),
                      LoopContext(device=dev, progress=False, metrics=metrics), LocalSink(cfg, tmp_path, metrics))
        with urllib.request.urlopen(metrics.url, timeout=5) as r:
            text = r.read().decode()
    finally:
        metrics.close()
    line = next(ln for ln in text.splitlines() if ln.startswith("stylegen_train_samples_total{"))
    assert float(line.rsplit(" ", 1)[1]) == steps * batch
    steps_line = next(ln for ln in text.splitlines() if ln.startswith("stylegen_train_steps_total{"))
    assert float(steps_line.rsplit(" ", 1)[1]) == steps


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.prometheus
@pytest.mark.timeout(420)
def test_prometheus_scrapes_a_two_worker_ray_train_run(ray_head, tmp_path):
    """Prometheus finds both ranks of a real 2-worker Ray Train run through Ray's discovery file: an
    endless ``stylegen train`` driver on the module's head, stopped by its process group in ``finally``."""
    import subprocess
    import sys

    c, env, base = ray_head
    driver = None
    log_path = tmp_path / "driver.log"
    try:
        sets = ["train.steps=100000", "data.batch_size=2", *MODEL, "model.channels=4",
                "train.report_every=1000", "train.checkpoint_every=100000",
                "train.sample_every=100000", "train.val_pairs=2", "train.threads=1", "ray.workers=2",
                "train.max_failures=0"]
        with open(log_path, "wb") as log_file:
            driver = subprocess.Popen([sys.executable, "-m", "stylegen", "train", *[f"--set={s}" for s in sets],
                                       "--address", c.gcs_address, "--storage", str(tmp_path / "runs"),
                                       "--name", "prom-live", "--no-progress"],
                                      cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 240
        seen: dict[str, float] = {}
        while time.monotonic() < deadline and not (len(seen) == 2 and all(v > 0 for v in seen.values())):
            assert driver.poll() is None, f"the driver exited ({driver.returncode}):\n{log_path.read_text()[-3000:]}"
            time.sleep(2)
            rows = prom.query(base, 'sum by (rank) (stylegen_train_samples_total{run="prom-live"})')
            seen = {r["metric"]["rank"]: float(r["value"][1]) for r in rows}
        assert set(seen) == {"0", "1"} and all(v > 0 for v in seen.values()), (seen, log_path.read_text()[-3000:])
    finally:
        if driver is not None:  # the endless run: its whole group (Ray ends its Train run with the driver)
            _kill_group(driver)
