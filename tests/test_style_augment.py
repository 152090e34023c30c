"""Procedural styles and colour jitter of training styles (issue 16 item 2): pure functions that are
deterministic per seed and varied across seeds; in the loader they touch training styles only, leave the
content stream and the val pairs alone, and a resumed loader repeats them exactly."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from stylegen.config import Config, ConfigError, DataConfig, load_config, set_value
from stylegen.data import shardio
from stylegen.data.augment import jitter_colors
from stylegen.data.loader import build_loader, load_pairs
from stylegen.data.procedural import GENERATORS, KINDS, MIN_STD, mix_procedural, procedural_style


# ----------------------------------------------------------------------------- generator

def test_procedural_style_is_a_pure_function_of_the_seed():
    for seed in (0, 1, 12345, 2**62):
        a, b = procedural_style(seed), procedural_style(seed)
        assert a.shape == (64, 64, 3) and a.dtype == np.uint8
        assert np.array_equal(a, b)
    assert procedural_style(7, size=32).shape == (32, 32, 3)
    assert not np.array_equal(procedural_style(0), procedural_style(1))


def test_a_hundred_seeds_give_a_hundred_distinct_textured_styles():
    ims = np.stack([procedural_style(s) for s in range(100)]).astype(np.float64)  # (100, 64, 64, 3)
    flat = ims.reshape(100, -1)
    d = np.sqrt(((flat[:, None] - flat[None]) ** 2).mean(-1))  # RMS pixel distance, 0-255
    assert d[np.triu_indices(100, 1)].min() > 5.0  # no two alike
    # distinct colour statistics: mean colour and contrast differ across seeds
    stats = np.concatenate([ims.mean((1, 2)), ims.std((1, 2))], 1)  # (100, 6)
    assert len({tuple(np.round(s / 8)) for s in stats}) >= 95
    assert ims.std((1, 2)).max(1).min() > MIN_STD * 255 * 0.9  # none flat
    # the whole range of hues and brightness is used, not one palette
    means = ims.mean((1, 2))
    assert means.min() < 60 and means.max() > 190
    assert np.ptp(means[:, 0] - means[:, 2]) > 150
    # and every kind of texture is drawn
    kinds = {KINDS[np.random.default_rng([s, 0x57E1]).integers(len(KINDS))] for s in range(100)}
    assert kinds == set(KINDS) == set(GENERATORS)


def test_mix_procedural_replaces_a_fraction_deterministically():
    batch = np.zeros((64, 64, 64, 3), np.uint8)
    keep = batch.copy()
    assert np.array_equal(mix_procedural(batch, np.random.default_rng(0), 0.0), batch)
    half = mix_procedural(batch, np.random.default_rng(0), 0.5)
    assert np.array_equal(batch, keep)  # the input is not modified
    assert np.array_equal(half, mix_procedural(batch, np.random.default_rng(0), 0.5))
    replaced = (half.reshape(64, -1).max(1) > 0).sum()
    assert 16 <= replaced <= 48
    assert (mix_procedural(batch, np.random.default_rng(1), 1.0).reshape(64, -1).max(1) > 0).all()


# ----------------------------------------------------------------------------- colour jitter

def test_jitter_keeps_shape_and_structure_and_is_deterministic():
    batch = np.stack([procedural_style(s) for s in range(8)])
    keep = batch.copy()
    a = jitter_colors(batch, np.random.default_rng(3), 1.0)
    assert a.shape == batch.shape and a.dtype == np.uint8
    assert np.array_equal(batch, keep)  # the input is not modified
    assert np.array_equal(a, jitter_colors(batch, np.random.default_rng(3), 1.0))
    assert not np.array_equal(a, jitter_colors(batch, np.random.default_rng(4), 1.0))
    assert np.array_equal(jitter_colors(batch, np.random.default_rng(3), 0.0), batch)
    # the colours move (mean colour per image), the layout stays: each output channel is an affine map
    # of the input's channels, so a least-squares fit from input RGB explains it almost exactly
    assert np.abs(a.mean((1, 2)) - batch.mean((1, 2))).max() > 20
    for x, y in zip(batch.reshape(8, -1, 3).astype(np.float64), a.reshape(8, -1, 3).astype(np.float64)):
        fitted = 0
        for c in range(3):
            inside = (y[:, c] > 0) & (y[:, c] < 255)  # pixels the map did not clip in this channel
            if inside.mean() < 0.3:
                continue
            design = np.c_[x, np.ones(len(x))][inside]
            resid = y[inside, c] - design @ np.linalg.lstsq(design, y[inside, c], rcond=None)[0]
            assert np.abs(resid).max() < 1.5  # exact up to rounding
            fitted += 1
        assert fitted >= 1
    weak = jitter_colors(batch, np.random.default_rng(3), 0.05)
    assert np.abs(weak.astype(int) - batch).mean() < np.abs(a.astype(int) - batch).mean()


# ----------------------------------------------------------------------------- loader

def write_dir(root, name, counts, base):
    """Shard dir whose sample i is a constant image of value base + i (channel 0)."""
    d = root / name
    d.mkdir()
    rows, i = [], 0
    for j, n in enumerate(counts):
        mem = []
        for _ in range(n):
            arr = np.zeros((64, 64, 3), np.uint8)
            arr[..., 0] = base + i
            mem += [(f"{i:09d}.rgb8", arr.tobytes()), (f"{i:09d}.json", b"{}")]
            i += 1
        data = shardio.tar_bytes(mem)
        for split in ("train", "val"):
            name_ = shardio.shard_name(split, j)
            (d / name_).write_bytes(data)
            rows.append({"file": name_, "split": split, "samples": n, "bytes": len(data),
                         "sha256": shardio.sha256_bytes(data), "encoding": "raw"})
    shardio.write_manifest(d, rows, {"fingerprint": "test"})
    return str(d)


@pytest.fixture
def dirs(tmp_path):
    return write_dir(tmp_path, "c", [6] * 8, 0), write_dir(tmp_path, "s", [6] * 4, 100)


def cfg(dirs, **kw) -> DataConfig:
    return DataConfig(content=[dirs[0]], style=[dirs[1]], batch_size=4, steps_per_epoch=9, shuffle_shards=2,
                      hflip=False, **kw)


def run(c: DataConfig, **kw) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(a.clone(), b.clone()) for a, b in build_loader(c, rank=0, world_size=1, epoch_seed=1, **kw)]


def test_loader_transforms_training_styles_only(dirs):
    plain = run(cfg(dirs))
    both = run(cfg(dirs, procedural_styles=0.5, style_jitter=0.5))
    assert all(torch.equal(p[0], b[0]) for p, b in zip(plain, both))  # the content stream is untouched
    styles = torch.stack([b[1] for b in both])
    plain_styles = torch.stack([p[1] for p in plain])
    assert not torch.equal(styles, plain_styles)
    textured = styles.flatten(3).float().std(-1).amax(-1) > 10  # (steps, B): procedural samples have texture
    assert 0 < textured.float().mean() < 1
    assert all(torch.equal(x[1], y[1]) for x, y in zip(both, run(cfg(dirs, procedural_styles=0.5, style_jitter=0.5))))
    assert not torch.equal(styles, torch.stack([b[1] for b in run(cfg(dirs, procedural_styles=0.5, style_jitter=0.5,
                                                                          seed=1))]))
    # val_score's fixed pairs and the val split's loader are never transformed
    c0, s0 = load_pairs(cfg(dirs), 8)
    c1, s1 = load_pairs(cfg(dirs, procedural_styles=1.0, style_jitter=1.0), 8)
    assert torch.equal(c0, c1) and torch.equal(s0, s1)
    val = [(a, b) for a, b in build_loader(cfg(dirs, procedural_styles=1.0, style_jitter=1.0), split="val",
                                            rank=0, world_size=1)]
    val0 = [(a, b) for a, b in build_loader(cfg(dirs), split="val", rank=0, world_size=1)]
    assert all(torch.equal(x[1], y[1]) for x, y in zip(val, val0))


def test_a_resumed_loader_repeats_the_transformed_styles_exactly(dirs):
    c = cfg(dirs, procedural_styles=0.5, style_jitter=1.0)
    ref = run(c)
    first = build_loader(c, rank=0, world_size=1, epoch_seed=1)
    for _ in itertools.islice(iter(first), 5):
        pass
    rest = run(c, resume=first.state())
    assert len(rest) == 4
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(rest, ref[5:]))


# ----------------------------------------------------------------------------- config

@pytest.mark.parametrize("key", ["data.procedural_styles", "data.style_jitter"])
def test_the_style_keys_validate(key):
    assert getattr(Config().data, key.split(".")[1]) == 0.0  # off by default: today's recipe unchanged
    for bad in (-0.1, 1.5, "lots", float("nan")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            set_value(Config(), key, bad)
    assert getattr(load_config(None, [f"{key}=0.25"]).data, key.split(".")[1]) == 0.25
    assert getattr(load_config(None, [f"{key}=1"]).data, key.split(".")[1]) == 1.0
