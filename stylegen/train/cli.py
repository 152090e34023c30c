"""``stylegen train``: ``--local`` runs one process; otherwise Ray Train DDP on N workers."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path

from stylegen import storage
from stylegen.config import load_config
from stylegen.config_cli import add_config_arguments, flag_overrides
from stylegen.errors import UserError

log = logging.getLogger(__name__)
# A run stopped by SIGTERM (preemption, `ray job stop`) has checkpointed but not finished: it exits as a
# process killed by SIGTERM would, so schedulers (a Kubernetes Job, a Ray job, a shell `&&`) do not
# take it for a finished run. Rerunning the same command resumes it.
EXIT_STOPPED = 128 + signal.SIGTERM


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    p.add_argument("--local", action="store_true", help="train in this process (no Ray)")
    p.add_argument("--out", help="--local: output directory (default: train.out)")
    p.add_argument("--workers", type=int, help="Ray Train workers (ray.workers)")
    p.add_argument("--gpus-per-worker", type=float, help="GPUs per worker (ray.gpus_per_worker); > 0 uses NCCL")
    p.add_argument("--cpus-per-worker", type=float, help="CPUs per worker (ray.cpus_per_worker)")
    p.add_argument("--name", help="run name (ray.name); the same name and storage resumes")
    p.add_argument("--storage", help="run storage: local path or s3://bucket/prefix (ray.storage)")
    p.add_argument("--address", help="Ray cluster address (ray.address; default RAY_ADDRESS or a new local Ray)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def train_overrides(args: argparse.Namespace) -> list[str]:
    """CLI flags win over --set, which wins over the file."""
    return flag_overrides(args, [("workers", "ray.workers"), ("gpus_per_worker", "ray.gpus_per_worker"),
                                 ("cpus_per_worker", "ray.cpus_per_worker"), ("name", "ray.name"),
                                 ("storage", "ray.storage"), ("address", "ray.address"), ("out", "train.out")])


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, [*args.overrides, *train_overrides(args)])
    if args.local:
        from stylegen.train.loop import run_local  # lazy: torch; not for `stylegen --help`

        out = Path(cfg.train.out)
        stop = threading.Event()
        try:
            metrics = run_local(cfg, out, progress=not args.no_progress, stop=stop)
        except FloatingPointError as e:  # diverged: the message names the step and the fix
            raise UserError(f"training diverged: {e}; the last good checkpoint is kept in {out / 'checkpoints'}") from None
        print(f"run directory: {out.resolve()}")
        print(f"checkpoints:   {(out / 'checkpoints').resolve()}")
        print(f"result grids:  {(out / 'samples').resolve()}")
        print(f"final val_score={metrics.get('val_score', float('nan')):.4f}  {throughput_line(metrics)}")
        if stop.is_set():
            log.warning("stopped by SIGTERM at step %s with a checkpoint; rerun the same command to resume",
                        metrics.get("step"))
            return EXIT_STOPPED
        return 0

    from stylegen.train.ray_worker import fit  # lazy: torch; not for `stylegen --help`

    result, stopped = fit(cfg, name=cfg.ray.name, storage=cfg.ray.storage, address=cfg.ray.address,
                          progress=not args.no_progress)  # failures raise UserError
    if stopped:
        log.warning("stopped by SIGTERM at step %s with a checkpoint; rerun the same command to resume",
                    result.metrics.get("step"))
    best = result.get_best_checkpoint(metric="val_score", mode="min") if result.best_checkpoints else None
    run_dir = storage.join(storage.absolute(cfg.ray.storage), cfg.ray.name)

    def where(ckpt) -> str | None:  # Ray prints remote paths without their scheme
        return storage.join(run_dir, storage.name(ckpt.path)) if ckpt else None
    print(f"run directory: {run_dir}")
    print(f"latest checkpoint: {where(result.checkpoint)}")
    print(f"best checkpoint:   {where(best)}")
    grids = f" and {run_dir}/samples" if not storage.is_remote(run_dir) else ""
    print(f"result grids: in each checkpoint directory (epoch_XXXX.png){grids}")
    print(f"final metrics: val_score={result.metrics.get('val_score', float('nan')):.4f} step={result.metrics.get('step')}  "
          f"{throughput_line(result.metrics)}")
    return EXIT_STOPPED if stopped else 0


def throughput_line(metrics: dict) -> str:
    """'img/s, GFLOP/s per worker, MFU' of the last report (empty for a run that reported nothing new)."""
    if "flops_per_s" not in metrics:
        return ""
    return (f"img/s={metrics.get('img_per_s', 0):.1f} GFLOP/s per worker={metrics['flops_per_s'] / 1e9:.1f} "
            f"MFU={100 * metrics.get('mfu', 0):.1f}% (train.peak_flops sets the peak)")
