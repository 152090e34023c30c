"""What the training-style options cost the loader (issue 16 item 2), on the embedded data.

    loader_jitter:      seconds per batch of the full training loader (embedded shards, num_workers=0,
                        batch 8 as jobs/configs/pretrained.toml) with data.style_jitter=0.5, against
                        the same loader with both options off (the baseline: today's default).
    loader_procedural:  the same with data.procedural_styles=0.5 (half the styles generated).
    loader_both:        both on, as the A/B run of docs/quality.md.
    jitter_fn / procedural_fn: the pure functions alone, per batch of 8, against the baseline
                        loader's seconds per batch (how much of a batch's time they add).

Each loader row takes the best of 3 epochs of 100 batches (a busy 2-core box: the minimum is the
least disturbed). For scale: one training step of the shipped recipe takes ~0.4 s on 2 threads
here (jobs/configs/pretrained.toml), so the loader's share of a step is what matters.
Prints ``name: ours=X baseline=Y ratio=Z``.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from stylegen.config import DataConfig
from stylegen.data.augment import jitter_colors
from stylegen.data.loader import build_loader
from stylegen.data.procedural import mix_procedural

BATCH, STEPS, REPEATS = 8, 100, 3


def loader_seconds(**kw) -> float:
    """Best seconds per batch over REPEATS epochs of the default (embedded) training loader."""
    cfg = DataConfig(batch_size=BATCH, steps_per_epoch=STEPS, **kw)
    best = float("inf")
    for epoch in range(REPEATS):
        loader = build_loader(cfg, rank=0, world_size=1, epoch_seed=epoch)
        t = time.perf_counter()
        for _ in loader:
            pass
        best = min(best, (time.perf_counter() - t) / STEPS)
    return best


def fn_seconds(fn, n: int = 200) -> float:
    batch = np.random.default_rng(0).integers(0, 256, (BATCH, 64, 64, 3), np.uint8)
    best = float("inf")
    for r in range(REPEATS):
        t = time.perf_counter()
        for i in range(n):
            fn(batch, np.random.default_rng([r, i]))
        best = min(best, (time.perf_counter() - t) / n)
    return best


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    print(f"# load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; batch {BATCH}", flush=True)
    build_loader(DataConfig(batch_size=BATCH, steps_per_epoch=1), rank=0, world_size=1)  # build the cache first
    base = loader_seconds()
    what = "the same loader with data.procedural_styles = data.style_jitter = 0"
    for name, kw in (("loader_jitter", {"style_jitter": 0.5}), ("loader_procedural", {"procedural_styles": 0.5}),
                     ("loader_both", {"style_jitter": 0.5, "procedural_styles": 0.5})):
        ours = loader_seconds(**kw)
        print(f"{name}: ours={ours * 1e3:.2f}ms baseline={base * 1e3:.2f}ms ratio={ours / base:.2f}  "
              f"(s per batch; baseline: {what})", flush=True)
    for name, fn in (("jitter_fn", lambda b, rng: jitter_colors(b, rng, 0.5)),
                     ("procedural_fn", lambda b, rng: mix_procedural(b, rng, 0.5))):
        ours = fn_seconds(fn)
        print(f"{name}: ours={ours * 1e3:.2f}ms baseline={base * 1e3:.2f}ms ratio={ours / base:.2f}  "
              "(s per batch of 8 for the function alone; baseline: the plain loader's s per batch)", flush=True)
    print(f"# load average {os.getloadavg()[0]:.1f} after the run", flush=True)


if __name__ == "__main__":
    main()
