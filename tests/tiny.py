"""Shared settings of the tiny training runs the train/fault/Ray tests start (seconds each on CPU)."""

from pathlib import Path

from stylegen.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "jobs" / "configs" / "demo.toml"
TINY = ["model.channels=8", "model.res_blocks=1", "data.batch_size=4", "features.weights=random",
        "train.threads=1", "train.val_pairs=4", "metrics.enabled=false"]
TINY_NO_GRIDS = [*TINY, "train.sample_every=1000"]  # runs that need no result grids


def tiny_cfg(*overrides: str) -> Config:
    """The demo config with TINY_NO_GRIDS, then ``overrides`` (a run that wants grids sets train.sample_every)."""
    return load_config(str(DEMO), [*TINY_NO_GRIDS, *overrides])
