"""Embedded default data: 64x64 crops of the photos and textures inside the scikit-image wheel.

scikit-image ships a few images as files in ``skimage/data/`` (the others are fetched
on demand, which we never do). We only read those files; ``skimage`` is located with
``importlib.util.find_spec`` and never imported (its import takes seconds).

The split is by source image, so that validation and evaluation measure images the
model never saw. Each file is in exactly one of three disjoint sets:

- train: content astronaut, coffee, motorcycle_left + motorcycle_right (one stereo scene,
  kept together), moon, clock_motion, horse, page, text, phantom; style brick,
  hubble_deep_field, color, logo, cell, microaneurysms, chessboard_RGB.
- val (training's val_score, Tune's metric): content rocket, coins; style grass, retina.
- eval (``stylegen eval``'s default pairs): content chelsea, camera; style gravel, ihc.

Added in v2 so that training keeps its variety: page, text, phantom (content) and cell,
microaneurysms, chessboard_RGB (style). Not used: chessboard_GRAY (the RGB board's twin),
lfw_subset.npy (25x25 faces, below half the crop size), multipage*.tif and
no_time_for_that_tiny.gif (tiny), motorcycle_disp.npz (a disparity map).

Content: 280 random 64x64 crops of random scale per image (2800 train, 560 val, 560 eval);
style: 50 per image (350 train, 100 val, 100 eval). The chosen files are staged as
symlinks (copies where links fail) under ``<root>/src/`` in ``train/`` and ``val/``
folders, which ``stylegen shard`` sends to those splits (``sources.discover``);
nothing is drawn per crop (``val_fraction`` 0). ``content``/``style`` hold the train
and val splits (what training, ``val_score`` and Tune read); ``eval/content`` and
``eval/style`` hold the eval images, all in their ``val`` split. A split's held-out
images fit in one shard whose crops are shuffled together, so even 8 fixed pairs mix
its images. The shards are raw uint8 (fastest to load), built once under the cache
root and reused while their manifest verifies. Building takes a few seconds on 2 cores.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from stylegen.data import shardio
from stylegen.data.shard import ShardParams, build_shards, fingerprint, plan_units
from stylegen.data.sources import discover
from stylegen.errors import UserError

log = logging.getLogger(__name__)
VERSION = "embedded-v2"  # v1 drew val per crop from the training images; v2 splits by image
CONTENT_SPLITS = {
    "train": ("astronaut.png", "coffee.png", "motorcycle_left.png", "motorcycle_right.png", "moon.png",
              "clock_motion.png", "horse.png", "page.png", "text.png", "phantom.png"),
    "val": ("rocket.jpg", "coins.png"),
    "eval": ("chelsea.png", "camera.png"),
}
STYLE_SPLITS = {
    "train": ("brick.png", "hubble_deep_field.jpg", "color.png", "logo.png", "cell.png", "microaneurysms.png",
              "chessboard_RGB.png"),
    "val": ("grass.png", "retina.jpg"),
    "eval": ("gravel.png", "ihc.png"),
}
CONTENT = tuple(n for names in CONTENT_SPLITS.values() for n in names)  # every content file, all sets
STYLE = tuple(n for names in STYLE_SPLITS.values() for n in names)
# shard_size = crops x held-out images: a held-out split is one shard, its crops shuffled together
CONTENT_PARAMS = ShardParams(size=64, encoding="raw", shard_size=560, crops=280, val_fraction=0.0, seed=0,
                             split_unit="image")
STYLE_PARAMS = ShardParams(size=64, encoding="raw", shard_size=100, crops=50, val_fraction=0.0, seed=1,
                           split_unit="image")


@dataclass(frozen=True)
class EmbeddedShards:
    content_dir: Path       # train split: the train images; val split: the val images
    style_dir: Path
    eval_content_dir: Path  # the eval images only (their val split): `stylegen eval`'s default pairs
    eval_style_dir: Path


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


def _stage(folder: Path, files: list[str]) -> None:
    """``folder`` holds exactly ``files`` (by name): symlinks to them, or copies where links fail.
    Every entry is replaced atomically, so a reader never sees a half-written file."""
    folder.mkdir(parents=True, exist_ok=True)
    wanted = {Path(f).name: Path(f) for f in files}
    for entry in folder.iterdir():
        if entry.name not in wanted:
            entry.unlink()  # a file an earlier image list staged here (our own folder)
    for name, target in wanted.items():
        dest = folder / name
        if dest.is_symlink() and os.readlink(dest) == str(target):
            continue
        if not dest.is_symlink() and dest.is_file() and dest.stat().st_size == target.stat().st_size:
            continue  # a copy from an earlier call
        tmp = folder / f".{name}.tmp"
        tmp.unlink(missing_ok=True)
        try:
            tmp.symlink_to(target)
        except OSError:
            shutil.copyfile(target, tmp)
        os.replace(tmp, dest)


def _is_current(out: Path, sources: list[str], params: ShardParams) -> bool:
    try:
        rows, meta = shardio.read_manifest(out)
    except Exception:
        return False
    images, npzs, _ = discover(sources)
    if not meta.get("complete") or meta.get("fingerprint") != fingerprint(plan_units(images, npzs, params), params):
        return False
    return all(shardio.verify_shard(out / r["file"], r) is None for r in rows)


def ensure_embedded(root: Path | None = None, *, workers: int | None = None) -> EmbeddedShards:
    """Build (once) and return the embedded shard dirs under ``root`` (see the module doc).

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
        shards = EmbeddedShards(root / "content", root / "style", root / "eval" / "content", root / "eval" / "style")
        src = root / "src"
        builds = (  # (shard dir, staged source dir, {folder: image names}, params)
            (shards.content_dir, src / "content", {"train": CONTENT_SPLITS["train"], "val": CONTENT_SPLITS["val"]},
             CONTENT_PARAMS),
            (shards.style_dir, src / "style", {"train": STYLE_SPLITS["train"], "val": STYLE_SPLITS["val"]},
             STYLE_PARAMS),
            (shards.eval_content_dir, src / "eval-content", {"val": CONTENT_SPLITS["eval"]}, CONTENT_PARAMS),
            (shards.eval_style_dir, src / "eval-style", {"val": STYLE_SPLITS["eval"]}, STYLE_PARAMS),
        )
        for out, staged, folders, params in builds:
            for folder, names in folders.items():
                _stage(staged / folder, _files(names))
            if not _is_current(out, [str(staged)], params):
                log.info("building embedded %s shards in %s", out.name, out)
                summary = build_shards([str(staged)], out, params, workers=workers, progress=False)
                log.info("%s", summary.line())
    return shards
