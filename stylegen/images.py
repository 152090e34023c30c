"""Image I/O and the few transforms stylize/eval need, written by hand (no torchvision).

- ``load_rgb``: any file Pillow reads -> an RGB ``PIL.Image``, safely: a pixel-count guard
  checked on the header *before* decoding (decompression bombs), the first frame of
  animated files, EXIF orientation applied, every mode (L, LA, P, PA, RGBA, CMYK, I, I;16,
  F, ...) brought to 8-bit RGB (transparency composited on white). Every failure is one
  ``UserError`` line naming the file.
- ``cover_crop``: resize so the image covers (H, W), then centre-crop (``--size N`` is
  ``cover_crop(img, (N, N))``: shorter side to N, centre square).
- ``crop_to_multiple``: centre-crop each side down to a multiple of m (``--size native``).
- ``to_uint8_tensor`` / ``to_float`` / ``to_uint8`` / ``encode_png`` / ``save_png``.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from stylegen import storage
from stylegen.errors import UserError

# 64 MP: far above anything the generator can stylize on a CPU, far below a bomb's gigapixels.
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB. Alpha is composited on white (dropping it would expose
    whatever colour sits under transparent pixels); >8-bit greyscale is rescaled, not clipped."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I", "F") or im.mode.startswith("I;"):
        a = np.asarray(im).astype(np.float64)
        if im.mode == "F":
            a = a * 255.0 if a.size and np.nanmax(a) <= 1.0 else a
        elif im.mode.startswith("I;16") or (a.size and a.max() > 255):
            a = a / 257.0  # 16-bit range -> 8-bit range
        a = np.clip(np.nan_to_num(a), 0, 255).round().astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def load_rgb(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS, what: str = "image") -> Image.Image:
    """Decode ``path`` (first frame) to an RGB image; any problem -> one UserError line."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} {str(p)!r} not found; pass an existing image file")
    if not p.is_file():
        raise UserError(f"{what} {str(p)!r} is not a file; pass an image file (PNG, JPEG, WebP, GIF, ...)")
    if p.stat().st_size == 0:
        raise UserError(f"{what} {str(p)!r} is empty (0 bytes); pass an image file (PNG, JPEG, WebP, GIF, ...)")
    try:
        with warnings.catch_warnings():
            # Pillow warns above MAX_IMAGE_PIXELS and raises above 2x; our own limit decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(p) as im:  # reads the header only
                w, h = im.size
                if w * h > max_pixels:
                    raise UserError(f"{what} {str(p)!r} claims {w}x{h} = {w * h:,} pixels, over the "
                                    f"limit of {max_pixels:,} (a decompression bomb or a huge image); "
                                    "downscale it first")
                if w < 1 or h < 1:
                    raise UserError(f"{what} {str(p)!r} has no pixels ({w}x{h})")
                im.seek(0)  # first frame of animated GIF/WebP/APNG/TIFF
                im.load()
                im = ImageOps.exif_transpose(im)
                return to_rgb(im).copy()
    except UserError:
        raise
    except Image.DecompressionBombError:
        raise UserError(f"{what} {str(p)!r} is a decompression bomb (too many pixels); downscale it first") from None
    except UnidentifiedImageError:
        raise UserError(f"{what} {str(p)!r} is not an image Pillow can read; "
                        "pass a PNG, JPEG, WebP, GIF, ... file") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # truncated / corrupt data
        msg = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise UserError(f"{what} {str(p)!r} is corrupt or truncated ({msg}); re-export or replace the file") from None


def cover_crop(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize (bicubic, aspect kept) so ``im`` covers ``size`` = (H, W), then centre-crop to it."""
    h, w = size
    scale = max(h / im.height, w / im.width)
    rw, rh = max(w, round(im.width * scale)), max(h, round(im.height * scale))
    if (rw, rh) != im.size:
        im = im.resize((rw, rh), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (rw - w) // 2, (rh - h) // 2
    return im.crop((left, top, left + w, top + h))


def crop_to_multiple(im: Image.Image, m: int = 4) -> Image.Image:
    """Centre-crop each side down to a multiple of ``m`` (at most m-1 pixels lost per side)."""
    w, h = im.width - im.width % m, im.height - im.height % m
    if (w, h) == im.size:
        return im
    left, top = (im.width - w) // 2, (im.height - h) // 2
    return im.crop((left, top, left + w, top + h))


def to_uint8_tensor(im: Image.Image):
    """RGB image -> uint8 tensor (3, H, W)."""
    import torch

    a = np.asarray(im.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(a.copy()).permute(2, 0, 1).contiguous()


def to_float(u8, device=None):
    """uint8 (..., 3, H, W) -> float32 in [0, 1], on ``device`` when given (moved as uint8: 4x fewer bytes)."""
    return u8.to(device).float().div(255.0)


def to_uint8(x):
    """float (..., 3, H, W) in [0, 1] -> uint8 (clamped, rounded)."""
    return x.detach().clamp(0.0, 1.0).mul(255.0).round().to("cpu").byte()


def encode_png(chw_u8) -> bytes:
    """uint8 tensor (3, H, W) -> PNG bytes."""
    a = chw_u8.permute(1, 2, 0).contiguous().numpy()
    buf = io.BytesIO()
    Image.fromarray(a, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def save_png(path: str | Path, chw_u8) -> Path:
    """Atomically write a uint8 (3, H, W) tensor as PNG."""
    storage.write_bytes(path, encode_png(chw_u8))
    return Path(path)
