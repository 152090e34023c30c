"""Input sources for ``stylegen shard``: image folders, ImageNet64 npz batches, single files.

Discovery is cheap (paths, sizes, npz headers); pixels are read later, by the shard
workers. Every rejected input becomes a ``Skip(path, reason)``, never an exception.

Decisions (documented in the README):
- Inputs that are not regular files (FIFOs, devices, sockets) are skipped unread: a FIFO
  would block forever, /dev/zero never ends.
- An npz is checked from its headers at discovery; a body that turns out corrupt when its
  rows are read (bad CRC, broken deflate stream) skips that npz's rows, reported like any input.
- Folders are walked recursively in sorted order; dotfiles are ignored; files with
  other extensions than jpg/jpeg/png/webp/bmp/npz are reported as "not an image".
- Images whose shorter side is below half the target size are rejected ("too small");
  between half and full size they are upscaled (bicubic).
- Transparent images are composited onto white; 16-bit/32-bit/float images are
  rescaled to 8 bits; EXIF orientation is applied; animations use their first frame.
- Inputs under a folder named ``valid*``/``val`` and npz files named ``val_data*``
  are validation data: all their samples go to the ``val`` split.
"""

from __future__ import annotations

import io
import re
import stat
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stylegen.errors import UserError
from stylegen.images import to_rgb  # one converter for shard and stylize

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
NPZ_NAME = re.compile(r"^(train_data_batch_\d+|val_data)(\.npz)?$")
VAL_DIR = re.compile(r"^(valid|val|validation)(_\d+x\d+)?$", re.IGNORECASE)


class SkipInput(Exception):
    """An input that cannot be used; ``str(e)`` is the reason."""


@dataclass(frozen=True)
class ImageFile:
    path: Path
    key: str        # location-independent name: "<src basename>/<relative path>"
    val: bool       # explicitly a validation input


@dataclass(frozen=True)
class NpzFile:
    path: Path
    key: str
    rows: int
    side: int       # images are side x side (64 for ImageNet64)
    val: bool


@dataclass(frozen=True)
class Skip:
    path: str
    reason: str


def normalize_path(text: str) -> Path:
    """A path as given, or with Windows backslashes turned into slashes when that exists."""
    p = Path(text).expanduser()
    if not p.exists() and "\\" in text:
        alt = Path(text.replace("\\", "/")).expanduser()
        if alt.exists():
            return alt
    return p


def discover(specs: list[str]) -> tuple[list[ImageFile], list[NpzFile], list[Skip]]:
    """Expand SRC arguments into image files, npz files and skipped inputs (sorted, deterministic)."""
    images: list[ImageFile] = []
    npzs: list[NpzFile] = []
    skipped: list[Skip] = []
    for spec in specs:
        root = normalize_path(spec)
        if not root.exists() and not root.is_symlink():
            raise UserError(f"source {spec!r} does not exist; pass an image folder, an ImageNet64 npz file "
                            "(or a folder of them) or an image file")
        if root.is_dir():
            base = root.resolve().name
            files = sorted(p for p in root.rglob("*") if not any(part.startswith(".") for part in p.relative_to(root).parts))
            for p in files:
                if p.is_dir():
                    continue
                rel = p.relative_to(root)
                is_val = any(VAL_DIR.match(part) for part in (base, *rel.parts[:-1]))
                _classify(p, f"{base}/{rel.as_posix()}", is_val, images, npzs, skipped)
        else:
            _classify(root, root.name, any(VAL_DIR.match(part) for part in root.parent.parts[-2:]),
                      images, npzs, skipped, single=True)
    return images, npzs, skipped


def _not_regular(p: Path) -> str | None:
    """Why ``p`` (after symlinks) is not a regular file, or None. Reading a FIFO blocks forever and a
    device such as /dev/zero never ends: they are skipped, not read."""
    try:
        mode = p.stat().st_mode
    except OSError as e:
        return f"unreadable ({type(e).__name__}: {e.strerror or e})"
    if stat.S_ISREG(mode):
        return None
    kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a character device" if stat.S_ISCHR(mode)
            else "a block device" if stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a file")
    return f"not a regular file ({kind}); pass image or npz files"


def _classify(p: Path, key: str, is_val: bool, images: list, npzs: list, skipped: list, single: bool = False) -> None:
    ext = p.suffix.lower()
    why = _not_regular(p)
    if why is not None:
        skipped.append(Skip(str(p), why))
        return
    if ext == ".npz" or NPZ_NAME.match(p.name):
        try:
            npzs.append(inspect_npz(p, key))
        except SkipInput as e:
            skipped.append(Skip(str(p), str(e)))
    elif ext in IMAGE_EXTS or single:
        images.append(ImageFile(p, key, is_val))
    else:
        skipped.append(Skip(str(p), f"not an image (unsupported extension {ext or '(none)'!r})"))


# ----------------------------------------------------------------------------- npz

def _npy_header(zf: zipfile.ZipFile, member: str) -> tuple[tuple[int, ...], np.dtype]:
    with zf.open(member) as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)  # header only: the body is not decompressed
    return shape, dtype


def inspect_npz(path: Path, key: str) -> NpzFile:
    """Check an ImageNet64-format npz from its headers: ``data`` uint8 (N, 3*S*S), optional ``labels`` (N,)."""
    try:
        if path.stat().st_size == 0:
            raise SkipInput("empty file")
        with zipfile.ZipFile(path) as zf:
            names = {n.removesuffix(".npy"): n for n in zf.namelist()}
            if "data" not in names:
                raise SkipInput(f"npz without key 'data' (has {sorted(names)}); expected ImageNet64 format "
                                "(data: uint8 N x 12288, labels: N)")
            shape, dtype = _npy_header(zf, names["data"])
            lshape, ldtype = _npy_header(zf, names["labels"]) if "labels" in names else (None, None)
    except SkipInput:
        raise
    except zipfile.BadZipFile:
        raise SkipInput("not an npz file (bad zip; pickled ImageNet64 batches are not supported: use the npz release)") from None
    except (OSError, ValueError) as e:
        raise SkipInput(f"unreadable npz ({type(e).__name__}: {e})") from None
    if dtype != np.uint8:
        raise SkipInput(f"npz 'data' has dtype {dtype}, expected uint8")
    if len(shape) == 2:
        side = int(round((shape[1] / 3) ** 0.5))
        ok = 3 * side * side == shape[1] and side > 0
    else:
        ok, side = False, 0
    if not ok:
        raise SkipInput(f"npz 'data' has shape {shape}, expected (N, 3*S*S) channel-planar RGB such as (N, 12288)")
    if shape[0] == 0:
        raise SkipInput("npz 'data' has no rows")
    if lshape is not None and tuple(lshape) != (shape[0],):
        raise SkipInput(f"npz 'labels' has shape {tuple(lshape)}, expected ({shape[0]},) to match 'data'")
    if ldtype is not None and ldtype.kind not in "iu":  # floats would be truncated, strings fail later
        raise SkipInput(f"npz 'labels' has dtype {ldtype}, expected integer class labels (int64 like ImageNet64's)")
    return NpzFile(path, key, int(shape[0]), side, bool(path.name.startswith("val_data")))


def load_npz(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """``(images (N, S, S, 3) uint8 view, labels (N,) int64 or None)`` from a checked npz.

    The view is strided (no 1.5 GB copy per ImageNet64 batch); index a row and copy it. Raises
    SkipInput when the arrays' bodies are corrupt (bad CRC, broken deflate stream, cut short): the
    headers :func:`inspect_npz` checked can be fine while the data is not."""
    try:
        with np.load(path, allow_pickle=False) as z:
            data = z["data"]
            labels = z["labels"] if "labels" in z.files else None
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise SkipInput(f"corrupt npz data ({type(e).__name__}: {' '.join(str(e).split())[:120]})") from None
    if labels is not None:
        if labels.dtype.kind not in "iu" or (labels.dtype == np.uint64 and labels.size
                                              and labels.max() > np.iinfo(np.int64).max):
            raise SkipInput(f"npz 'labels' has dtype {labels.dtype} or values beyond int64, expected integer class labels")
        labels = labels.astype(np.int64)
    side = int(round((data.shape[1] / 3) ** 0.5))
    return data.reshape(-1, 3, side, side).transpose(0, 2, 3, 1), labels  # planar (N, 3, S, S) -> (N, S, S, 3)


# ----------------------------------------------------------------------------- images

def open_rgb(path: Path, *, max_pixels: int, draft: int | None = None):
    """Open an image file as an RGB PIL image, or raise SkipInput with the reason."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        data = path.read_bytes()
    except OSError as e:
        raise SkipInput(f"unreadable ({type(e).__name__}: {e.strerror or e})") from None
    if not data:
        raise SkipInput("empty file")
    old_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            if draft and im.format == "JPEG":
                im.draft("RGB", (draft, draft))  # decode at reduced scale; keeps the shorter side >= draft
            im.load()
            im = ImageOps.exif_transpose(im)
            return to_rgb(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SkipInput(f"decompression bomb ({e})") from None
    except UnidentifiedImageError:
        raise SkipInput("not an image (unidentified format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise SkipInput(f"corrupt or truncated image ({type(e).__name__}: {str(e)[:120]})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = old_limit


def crop_box(w: int, h: int, size: int, rng: np.random.Generator | None) -> tuple[int, int, int, int]:
    """rng None: the centred square of the shorter side; else a random square of side in [size, shorter side]."""
    short = min(w, h)
    if rng is None or short <= size:
        x, y = (w - short) // 2, (h - short) // 2
        return x, y, x + short, y + short
    side = int(rng.integers(size, short + 1))
    x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    return x, y, x + side, y + side


def render(im, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """The box resized to ``size`` x ``size`` (antialiased bicubic): (size, size, 3) uint8."""
    from PIL import Image

    if box == (0, 0, size, size) and im.size == (size, size):
        return np.asarray(im)
    return np.asarray(im.resize((size, size), Image.BICUBIC, box=box))
