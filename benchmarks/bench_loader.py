"""Loader and sharding throughput against bare baselines, on data generated here.

    loader_raw / loader_png: img/s of the full training pipeline (shard list, rank split,
        resampled shuffle, decode, hflip, batch, torch tensors; num_workers=0) against a tight
        loop that reads the same tars with ``tarfile`` and decodes each sample
        (``np.frombuffer`` / PIL) with no pipeline.
    loader_scaling: img/s with 2 DataLoader workers against 1 (PNG).
    shard: ``stylegen shard`` img/s (1 worker process) against an encode-only loop
        (open, crop/resize, PNG-encode) over the same images in one process.
    shard_2workers: the same with 2 worker processes (informational).

Data: 64x64 crops of the photos bundled with scikit-image (realistic PNG sizes).
Prints ``name: ours=X baseline=Y ratio=Z``; runs in about a minute.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from stylegen.config import DataConfig
from stylegen.data.embedded import CONTENT, _files
from stylegen.data.loader import build_loader
from stylegen.data.shard import ShardParams, build_shards
from stylegen.data.sources import crop_box, open_rgb, render

N_IMAGES = 4000


def make_images(folder: Path, n: int) -> list[Path]:
    """n PNG files of random 64..200 px crops of the bundled photos (so sharding resizes)."""
    rng = np.random.default_rng(0)
    photos = [open_rgb(Path(f), max_pixels=10**8) for f in _files(CONTENT)]
    folder.mkdir(parents=True)
    paths = []
    for i in range(n):
        im = photos[i % len(photos)]
        side = int(rng.integers(64, 200))
        x, y = int(rng.integers(0, im.size[0] - side)), int(rng.integers(0, im.size[1] - side))
        p = folder / f"img{i:05d}.png"
        im.crop((x, y, x + side, y + side)).save(p, compress_level=1)
        paths.append(p)
    return paths


def baseline_read(tars: list[str], ext: str) -> float:
    t, n = time.perf_counter(), 0
    for f in tars:
        with tarfile.open(f) as tar:
            for m in tar:
                if not m.name.endswith(ext):
                    continue
                data = tar.extractfile(m).read()
                if ext == ".rgb8":
                    arr = np.frombuffer(data, np.uint8).reshape(64, 64, 3)
                else:
                    arr = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
                n += arr.shape[0] > 0
    return n / (time.perf_counter() - t)


def loader_rate(shard_dir: Path, steps: int, workers: int, batch: int = 64, warm: int = 2) -> float:
    cfg = DataConfig(content=[str(shard_dir)], steps_per_epoch=steps + warm, batch_size=batch, num_workers=workers)
    it = iter(build_loader(cfg, rank=0, world_size=1))
    for _ in range(warm):  # worker start-up and shuffle-buffer fill are one-off costs
        next(it)
    t, n = time.perf_counter(), 0
    for c, s in it:
        n += c.shape[0] + s.shape[0]
    return n / (time.perf_counter() - t)


def encode_only(paths: list[Path]) -> float:
    t = time.perf_counter()
    for p in paths:
        im = open_rgb(p, max_pixels=10**8, draft=64)
        arr = render(im, crop_box(im.size[0], im.size[1], 64, None), 64)
        Image.fromarray(arr).save(io.BytesIO(), "PNG", compress_level=1)
    return len(paths) / (time.perf_counter() - t)


def line(name: str, ours: float, base: float, what: str) -> None:
    print(f"{name}: ours={ours:.0f} baseline={base:.0f} ratio={ours / base:.2f}  (img/s; baseline: {what})", flush=True)


def main() -> int:
    logging.basicConfig(level=logging.WARNING)
    print(f"# load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores before the run "
          "(other jobs share the machine; ratios are interleaved best-of-n)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = make_images(tmp / "images", N_IMAGES)
        p1 = ShardParams(encoding="png", shard_size=500, val_fraction=0.0)
        shard1 = shard2 = enc = 0.0
        for rep in range(2):  # interleaved, best of 2
            enc = max(enc, encode_only(paths))
            for workers in (1, 2):
                t = time.perf_counter()
                build_shards([str(tmp / "images")], tmp / f"png{workers}{rep}", p1, workers=workers, progress=False)
                rate = N_IMAGES / (time.perf_counter() - t)
                shard1, shard2 = (max(shard1, rate), shard2) if workers == 1 else (shard1, max(shard2, rate))
        (tmp / "png10").rename(tmp / "png")
        build_shards([str(tmp / "images")], tmp / "raw", ShardParams(encoding="raw", shard_size=500, val_fraction=0.0),
                     workers=2, progress=False)
        for name, d, ext, steps in (("loader_raw", "raw", ".rgb8", 200), ("loader_png", "png", ".png", 60)):
            tars = sorted(str(f) for f in (tmp / d).glob("*.tar"))
            base = ours = 0.0
            for _ in range(3):  # interleaved, best of 3: the machine is shared, so timings are noisy
                base = max(base, baseline_read(tars, ext))
                ours = max(ours, loader_rate(tmp / d, steps, 0))
            line(name, ours, base, f"tarfile + {'np.frombuffer' if ext == '.rgb8' else 'PIL'} loop, 1 process")
        one = two = 0.0
        for _ in range(2):
            one = max(one, loader_rate(tmp / "png", 100, 1))
            two = max(two, loader_rate(tmp / "png", 100, 2))
        line("loader_scaling", two, one, "same pipeline with 1 DataLoader worker; ours: 2 workers, PNG")
        line("shard", shard1, enc, "encode-only loop (open, crop/resize, PNG), 1 process; ours: --workers 1")
        line("shard_2workers", shard2, enc, "same encode-only loop, 1 process; ours: --workers 2")
    return 0


if __name__ == "__main__":
    sys.exit(main())
