"""Shared settings of the tiny training runs the train/fault/Ray tests start (seconds each on CPU)."""

from pathlib import Path

from stylegen.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "jobs" / "configs" / "demo.toml"
# The tiny network: an 8-channel generator and a random VGG19 at 1/8 width (1/64 of its FLOPs: a
# 2-worker step on 2 cores takes ~0.1 s instead of ~0.5 s). Quality does not matter in these runs.
MODEL = ["model.channels=8", "model.res_blocks=1", "features.weights=random", "features.width=8"]
TINY = [*MODEL, "data.batch_size=4", "train.threads=1", "train.val_pairs=4", "metrics.enabled=false"]
TINY_NO_GRIDS = [*TINY, "train.sample_every=1000"]  # runs that need no result grids


def tiny_cfg(*overrides: str) -> Config:
    """The demo config with TINY_NO_GRIDS, then ``overrides`` (a run that wants grids sets train.sample_every)."""
    return load_config(str(DEMO), [*TINY_NO_GRIDS, *overrides])


def cli_sets(sets: list[str]) -> list[str]:
    """``["a=1", "b=2"]`` -> ``["--set", "a=1", "--set", "b=2"]`` (a stylegen command line's overrides)."""
    return [x for s in sets for x in ("--set", s)]
