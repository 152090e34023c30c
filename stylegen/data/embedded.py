"""Embedded default data: 64x64 crops of the photos and textures inside the scikit-image wheel.

scikit-image ships a few images as files in ``skimage/data/`` (the others are fetched
on demand, which we never do). We only read those files; ``skimage`` is located with
``importlib.util.find_spec`` and never imported (its import takes seconds).

Content: photos (astronaut, cat, coffee, motorcycles, rocket, camera, coins, moon,
clock, horse) -> ~3000 random 64x64 crops of random scale. Style: textures and
colourful images (brick, grass, gravel, Hubble deep field, IHC stain, retina,
colour wheel, logo) -> ~400 crops. Both have a ``train`` and a ``val`` split (drawn
per crop: the demo has too few images for a per-image split). The shards are raw
uint8 (fastest to load), built once under the cache root and reused while their
manifest verifies. Building takes a few seconds on 2 cores.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from stylegen.data import shardio
from stylegen.data.shard import ShardParams, build_shards, fingerprint, plan_units
from stylegen.data.sources import discover
from stylegen.errors import UserError

log = logging.getLogger(__name__)
VERSION = "embedded-v1"
CONTENT = ("astronaut.png", "chelsea.png", "coffee.png", "motorcycle_left.png", "motorcycle_right.png",
           "rocket.jpg", "camera.png", "coins.png", "moon.png", "clock_motion.png", "horse.png")
STYLE = ("brick.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "retina.jpg",
         "color.png", "logo.png")
CONTENT_PARAMS = ShardParams(size=64, encoding="raw", shard_size=250, crops=280, val_fraction=0.05, seed=0,
                             split_unit="sample")
STYLE_PARAMS = ShardParams(size=64, encoding="raw", shard_size=100, crops=50, val_fraction=0.1, seed=1,
                           split_unit="sample")


@dataclass(frozen=True)
class EmbeddedShards:
    content_dir: Path
    style_dir: Path


def skimage_data_dir() -> Path:
    """``.../site-packages/skimage/data`` without importing skimage."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("scikit-image is not installed; it ships the embedded demo images "
                        "(pip install scikit-image) or pass data.content shards")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def default_root() -> Path:
    base = os.environ.get("STYLEGEN_CACHE")
    return Path(base) / VERSION if base else Path.home() / ".cache" / "stylegen" / VERSION


def _files(names: tuple[str, ...]) -> list[str]:
    d = skimage_data_dir()
    missing = [n for n in names if not (d / n).is_file()]
    if missing:
        raise UserError(f"scikit-image at {d} lacks the bundled images {missing}; install scikit-image==0.26.0")
    return [str(d / n) for n in names]


def _is_current(out: Path, files: list[str], params: ShardParams) -> bool:
    try:
        rows, meta = shardio.read_manifest(out)
    except Exception:
        return False
    images, npzs, _ = discover(files)
    if not meta.get("complete") or meta.get("fingerprint") != fingerprint(plan_units(images, npzs, params), params):
        return False
    return all(shardio.verify_shard(out / r["file"], r) is None for r in rows)


def ensure_embedded(root: Path | None = None, *, workers: int | None = None) -> EmbeddedShards:
    """Build (once) and return the embedded content/style shard dirs under ``root``.

    Safe to call from several processes at once (a file lock serialises the build);
    shard writes are atomic and a half-built cache is completed, not restarted.
    """
    root = Path(root) if root is not None else default_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / ".lock", "a+")
    except OSError as e:
        raise UserError(f"cannot create the embedded data cache {str(root)!r} ({e.strerror or e}); "
                        "set STYLEGEN_CACHE to a writable directory") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        shards = EmbeddedShards(root / "content", root / "style")
        for out, names, params in ((shards.content_dir, CONTENT, CONTENT_PARAMS), (shards.style_dir, STYLE, STYLE_PARAMS)):
            files = _files(names)
            if not _is_current(out, files, params):
                log.info("building embedded %s shards in %s", out.name, out)
                summary = build_shards(files, out, params, workers=workers, progress=False)
                log.info("%s", summary.line())
    return shards
