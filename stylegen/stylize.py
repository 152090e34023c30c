"""``stylegen stylize``: stylize image files with a trained generator.

    stylegen stylize [--checkpoint CKPT] --content IMG [IMG ...] --style IMG
                     [--alpha A] [--out FILE.png|DIR] [--size 64|N|native]

Every input is checked (checkpoint, then all images) before anything is written, so a bad
input leaves no output behind; each output PNG is written atomically. Without
``--checkpoint`` the model shipped in the package (``stylegen/assets/pretrained.pt``) is used.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from stylegen.errors import UserError

if TYPE_CHECKING:
    import torch

    from stylegen.config import Config
    from stylegen.models.generator import Generator

log = logging.getLogger(__name__)
PRETRAINED = "assets/pretrained.pt"
# --size native: the generator's activations at 32 channels cost ~1 KB per pixel per layer.
NATIVE_MAX_PIXELS = 2048 * 2048
MIN_SIDE = 16


def shipped_checkpoint() -> Path:
    """Path of the pretrained model inside the package, or a UserError when it is not shipped."""
    import importlib.resources

    res = importlib.resources.files("stylegen").joinpath(PRETRAINED)
    if not res.is_file():
        raise UserError("no --checkpoint given and no shipped model found (stylegen/assets/pretrained.pt); "
                        "pass --checkpoint CKPT (a checkpoint.pt from `stylegen train` or `stylegen best --export`)")
    return Path(str(res))  # the package is installed from files (setuptools package-data), not a zip


def load_generator(path: str | Path | None, device: str | torch.device = "cpu") -> tuple[Generator, Config]:
    """Rebuild the generator from a checkpoint's own config and load its weights (strict), in eval mode.

    ``path`` None = the shipped pretrained model. Raises UserError for a missing file, a
    file that is not a stylegen checkpoint (random bytes, pickle payloads: loaded with
    weights_only=True), an unreadable config, or weights that do not fit the config.
    """
    from stylegen.checkpoint import generator_from_state, load_checkpoint, resolve_checkpoint_path

    p = shipped_checkpoint() if path is None else resolve_checkpoint_path(path)
    gen, cfg = generator_from_state(load_checkpoint(p, map_location="cpu"), str(p))
    return gen.to(device).eval(), cfg


def parse_size(text: str) -> int | None:
    """'native' -> None; else a side length divisible by 4 and >= 16."""
    if text == "native":
        return None
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'native' or a side length in pixels, got {text!r}") from None
    if n < MIN_SIDE or n % 4 or n > 4096:
        raise argparse.ArgumentTypeError(f"--size {n}: must be a multiple of 4 between {MIN_SIDE} and 4096 "
                                         "(or 'native')")
    return n


def parse_alpha(text: str) -> float:
    try:
        a = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= a <= 1.0:
        raise argparse.ArgumentTypeError(f"--alpha {text}: must be in [0, 1] (0 = content, 1 = full style)")
    return a


def output_paths(contents: list[str], out: str | None) -> list[Path]:
    """One output PNG per content: ``--out FILE.png`` (one content) or ``--out DIR`` (``DIR/<stem>.png``).

    Default: ``<stem>_stylized.png`` for one content, ``stylized/`` for several. Equal stems
    get ``-2``, ``-3``... so no output overwrites another.
    """
    if out is None:
        out = f"{Path(contents[0]).stem}_stylized.png" if len(contents) == 1 else "stylized"
    o = Path(out)
    as_file = not o.is_dir() and o.suffix != ""
    if as_file:
        if o.suffix.lower() != ".png":
            raise UserError(f"--out {out!r}: outputs are PNG; name the file *.png or pass a directory")
        if len(contents) > 1:
            raise UserError(f"--out {out!r} is one file but {len(contents)} --content images were given; "
                            "pass a directory for --out")
        return [o]
    paths: list[Path] = []
    seen: set[str] = set()
    for c in contents:
        stem, k = Path(c).stem, 2
        name = stem
        while name in seen:
            name, k = f"{stem}-{k}", k + 1
        seen.add(name)
        paths.append(o / f"{name}.png")
    return paths


def prepare(content_paths: list[str], style_path: str, size: int | None):
    """Load and size all inputs: [(content u8 (3,H,W), style u8 (3,H,W))], style matched to each content."""
    from stylegen.images import cover_crop, crop_to_multiple, load_rgb, to_uint8_tensor

    style_img = load_rgb(style_path, what="style image")
    _check_min_side(style_img, style_path, "style image")
    pairs = []
    for c in content_paths:
        im = load_rgb(c, what="content image")
        _check_min_side(im, c, "content image")
        if size is None:
            im = crop_to_multiple(im, 4)  # sides >= 16 stay >= 16
            if im.width * im.height > NATIVE_MAX_PIXELS:
                raise UserError(f"content image {c!r} is {im.width}x{im.height}, over the {NATIVE_MAX_PIXELS:,}-pixel "
                                "limit of --size native; pass --size N (e.g. 512)")
        else:
            im = cover_crop(im, (size, size))
        # The style is brought to the content's size: the concat generator needs no match,
        # but the style's statistics then come from the scale the model was trained at.
        st = cover_crop(style_img, (im.height, im.width))
        pairs.append((to_uint8_tensor(im), to_uint8_tensor(st)))
    return pairs


def _check_min_side(im, path: str, what: str) -> None:
    """A 1x1 (or 8x8) image upscaled to 64x64 is one flat colour: refuse it rather than stylize nothing."""
    if min(im.size) < MIN_SIDE:
        raise UserError(f"{what} {path!r} is {im.width}x{im.height}, too small to stylize; both sides must be "
                        f">= {MIN_SIDE} px")


def make_output_dirs(paths: list[Path]) -> None:
    """Create the outputs' directories (after every input is checked), or one UserError line."""
    for d in dict.fromkeys(p.parent for p in paths):
        blocker = next((a for a in [d, *d.parents] if a.exists()), None)
        if blocker is not None and not blocker.is_dir():
            raise UserError(f"cannot create output directory {str(d)!r}: {str(blocker)!r} is a file; "
                            "pass a writable --out")
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create output directory {str(d)!r} ({e.strerror or type(e).__name__}); "
                            "pass a writable --out") from None


def stylize_tensor(gen, content_u8, style_u8, alpha: float = 1.0, device: str | torch.device = "cpu"):
    """uint8 (B,3,H,W) content and style -> uint8 (B,3,H,W) output."""
    import torch

    from stylegen.images import to_float, to_uint8

    with torch.inference_mode():
        out = gen(to_float(content_u8).to(device), to_float(style_u8).to(device), alpha=alpha)
    return to_uint8(out)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", metavar="CKPT",
                   help="checkpoint.pt, a dir holding one, or a --local run dir (its newest; default: the shipped model)")
    p.add_argument("--content", nargs="+", required=True, metavar="IMG",
                   help="content image(s), any format Pillow reads")
    p.add_argument("--style", required=True, metavar="IMG", help="style image")
    p.add_argument("--alpha", type=parse_alpha, default=1.0, metavar="A",
                   help="style strength in [0, 1]: 0 = the content's own style, 1 = full style (default 1)")
    p.add_argument("--out", metavar="FILE.png|DIR",
                   help="output PNG (one content) or directory (one <stem>.png per content); "
                        "default <stem>_stylized.png, or stylized/ for several contents")
    p.add_argument("--size", type=parse_size, default=64, metavar="64|N|native",
                   help="resize shorter side + centre-crop to N (default 64, the training size), "
                        "or 'native': keep the content size cropped to a multiple of 4")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="device (default cpu)")
    p.add_argument("--metrics-textfile", metavar="PATH",
                   help="also write stylegen_stylize_images_total to a Prometheus node-exporter textfile")


def run(args: argparse.Namespace) -> int:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is visible; use --device cpu")
    if args.metrics_textfile:  # a side output: refuse it now, not after the images are written
        from stylegen.storage import check_output_file

        check_output_file(args.metrics_textfile, "--metrics-textfile")
    outs = output_paths(args.content, args.out)
    inputs = {Path(x).resolve() for x in [*args.content, args.style]}
    clash = [o for o in outs if o.resolve() in inputs]
    if clash:
        raise UserError(f"output {str(clash[0])!r} would overwrite an input image; pass another --out")
    gen, _ = load_generator(args.checkpoint, args.device)
    pairs = prepare(args.content, args.style, args.size)
    from stylegen.images import save_png

    make_output_dirs(outs)
    for (c, s), path in zip(pairs, outs, strict=True):
        out = stylize_tensor(gen, c[None], s[None], args.alpha, args.device)[0]
        try:
            save_png(path, out)
        except OSError as e:  # disk full, permissions: the atomic write left nothing behind
            raise UserError(f"cannot write {str(path)!r} ({e.strerror or type(e).__name__}); "
                            "pass a writable --out") from None
        print(path)
    if args.metrics_textfile:
        from stylegen.metrics import CommandMetrics

        from stylegen.storage import describe_write_error

        m = CommandMetrics()
        m.stylized(len(outs))
        try:
            Path(args.metrics_textfile).parent.mkdir(parents=True, exist_ok=True)
            m.write_textfile(args.metrics_textfile)  # temp file + rename: nothing half-written
        except OSError as e:
            what, fix = describe_write_error(e)
            raise UserError(f"cannot write --metrics-textfile {args.metrics_textfile!r} ({what}); {fix} or pass "
                            "another path (the images above were written)") from None
        finally:
            m.close()
    return 0
