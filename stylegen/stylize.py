"""``stylegen stylize``: stylize image files with a trained generator.

    stylegen stylize [--checkpoint CKPT|SWEEP] --content IMG [IMG ...] --style IMG [IMG ...]
                     [--weights W [W ...] | --mask M.png] [--alpha A] [--preserve-color]
                     [--out FILE.png|DIR] [--size 64|N|native] [--tile N] [--refine N]

Every input is checked (controls, checkpoint, then all images) before anything is written, so
a bad input leaves no output behind; each output PNG is written atomically. Without
``--checkpoint`` the model shipped in the package (``stylegen/assets/pretrained.pt``) is used.
The controls (mixing, mask, colour preservation, tiles) are ``stylegen.controls``, shared
with ``stylegen serve``. ``--refine N`` then optimises each output for N Adam steps on the
training objective (``stylegen.gatys.refine``): slower, closer to the optimisation ceiling on
styles the model never saw (docs/quality.md, "Refining the output").
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from stylegen.errors import UserError
from stylegen.images import cover_crop, crop_to_multiple, load_rgb, save_png, to_float, to_uint8, to_uint8_tensor
from stylegen.loading import load_generator
from stylegen.metrics import CommandMetrics
from stylegen.storage import check_output_file, describe_write_error

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
# --size native: above --tile px a side the image is stylized in tiles (activations bounded by
# the tile), so the limit is the time a CPU takes and the full-size float buffers (~50 B/px).
NATIVE_MAX_PIXELS = 8192 * 8192
# --refine backpropagates through VGG19 up to relu4_1 at full size (~1 KB of activations per pixel)
REFINE_MAX_PIXELS = 1024 * 1024
MAX_REFINE_STEPS = 10_000
MIN_SIDE = 16


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


def prepare(content_paths: list[str], style_paths: list[str], size: int | None, mask_path: str | None = None):
    """Load and size all inputs: [(content u8 (3,H,W), [style u8 (3,H,W), ...], mask float (H,W) | None)],
    each style brought to each content's size, the mask resized to the content and cropped as it is."""
    import torch

    style_imgs = []
    for sp in style_paths:
        style_imgs.append(load_rgb(sp, what="style image"))
        _check_min_side(style_imgs[-1], sp, "style image")
    mask_img = None if mask_path is None else load_rgb(mask_path, what="mask").convert("L")
    items = []
    for c in content_paths:
        im = load_rgb(c, what="content image")
        _check_min_side(im, c, "content image")
        mk = None if mask_img is None else _fit_mask(mask_img, im, mask_path, c)
        if size is None:
            im = crop_to_multiple(im, 4)  # sides >= 16 stay >= 16
            mk = None if mk is None else crop_to_multiple(mk, 4)
            if im.width * im.height > NATIVE_MAX_PIXELS:
                raise UserError(f"content image {c!r} is {im.width}x{im.height}, over the {NATIVE_MAX_PIXELS:,}-pixel "
                                "limit of --size native; pass --size N (e.g. 512)")
        else:
            im = cover_crop(im, (size, size))
            mk = None if mk is None else cover_crop(mk, (size, size))
        # The style is brought to the content's size: the concat generator needs no match,
        # but the style's statistics then come from the scale the model was trained at.
        sts = [to_uint8_tensor(cover_crop(s, (im.height, im.width))) for s in style_imgs]
        m = None if mk is None else to_uint8_tensor(mk)[0].to(torch.float32) / 255.0
        items.append((to_uint8_tensor(im), sts, m))
    return items


def _fit_mask(mask, content, mask_path: str, content_path: str):
    """The mask (an L image) at the content's size: resized when only the scale differs (aspect
    within 2 %), a UserError when the shapes differ (it would not line up with the content)."""
    from PIL import Image

    if mask.size == content.size:
        return mask
    ratio = (mask.width / mask.height) / (content.width / content.height)
    if not 0.98 <= ratio <= 1.02:
        raise UserError(f"--mask {mask_path!r} is {mask.width}x{mask.height} but content image {content_path!r} is "
                        f"{content.width}x{content.height} (another aspect ratio); give a mask of the content's shape")
    return mask.resize(content.size, Image.Resampling.BILINEAR)


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


def parse_tile(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a tile side in pixels, got {text!r}") from None
    if n < 256 or n % 8:
        raise argparse.ArgumentTypeError(f"--tile {n}: must be a multiple of 8, >= 256")
    return n


def parse_refine(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of steps, got {text!r}") from None
    if not 0 <= n <= MAX_REFINE_STEPS:
        raise argparse.ArgumentTypeError(f"--refine {n}: must be between 0 and {MAX_REFINE_STEPS}")
    return n


def check_refine(args: argparse.Namespace) -> None:
    """--refine optimises one output against one style's objective: refuse the controls it cannot honour."""
    if not args.refine:
        return
    clash = [flag for flag, on in (("--mask", bool(args.mask)), ("--weights", bool(args.weights)),
                                   ("--alpha", args.alpha != 1.0), ("--preserve-color", args.preserve_color)) if on]
    if len(args.style) != 1 or clash:
        what = f"{len(args.style)} --style images" if len(args.style) != 1 else " and ".join(clash)
        raise UserError(f"--refine optimises the output toward one style at full strength, so it cannot be "
                        f"combined with {what}; drop --refine or use one --style without those options")


def refine_u8(out_u8, content_u8, style_u8, vgg, steps: int, device: str):
    """The uint8 (3, H, W) output after ``steps`` refine steps (``stylegen.gatys.refine``) toward its pair."""
    from stylegen.gatys import refine  # lazy: torch; not for `stylegen --help`

    r = refine(*(to_float(x, device)[None] for x in (out_u8, content_u8, style_u8)), vgg, steps)
    return to_uint8(r[0])


def controls_from_args(args: argparse.Namespace):
    """``Controls`` of the flags, checked against the number of styles and the mask (UserError)."""
    from stylegen.controls import Controls, check  # lazy: torch; not for `stylegen --help`

    c = Controls(alpha=args.alpha, preserve_color=args.preserve_color,
                 weights=tuple(args.weights) if args.weights else None, tile=args.tile,
                 overlap=args.tile // 64 * 8)
    if args.weights and len(args.weights) != len(args.style):
        raise UserError(f"--weights has {len(args.weights)} values for {len(args.style)} --style images; "
                        "give one weight per style")
    if args.mask and len(args.style) != 2:
        raise UserError(f"--mask needs exactly two --style images (the first where the mask is black, the second "
                        f"where it is white); got {len(args.style)}")
    if args.mask and args.weights:
        raise UserError("--mask and --weights cannot be combined; the mask decides where each style goes")
    check(c, len(args.style), bool(args.mask))
    return c


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", metavar="CKPT|SWEEP",
                   help="checkpoint.pt, a dir holding one, a run dir (its newest), a Tune sweep dir (its best), local "
                        "or s3://... (default: the shipped model)")
    p.add_argument("--content", nargs="+", required=True, metavar="IMG",
                   help="content image(s), any format Pillow reads")
    p.add_argument("--style", nargs="+", required=True, metavar="IMG",
                   help="style image(s); several are mixed (--weights) or placed by --mask")
    p.add_argument("--weights", nargs="+", type=float, metavar="W",
                   help="style mixing weights, one per --style (normalised; default equal), mixed in feature space")
    p.add_argument("--mask", metavar="M.png",
                   help="with two --style images: the second where the mask is white, the first where black "
                        "(grey blends); the content's shape, resized to its size")
    p.add_argument("--alpha", type=parse_alpha, default=1.0, metavar="A",
                   help="style strength in [0, 1]: 0 = the content's own style, 1 = full style (default 1)")
    p.add_argument("--preserve-color", action="store_true",
                   help="luminance-only transfer: the output keeps the content's colours (chroma)")
    p.add_argument("--tile", type=parse_tile, default=2048, metavar="N",
                   help="images with a side over N px are stylized in overlapping tiles (N/8 overlap, "
                        "feathered; default 2048)")
    p.add_argument("--out", metavar="FILE.png|DIR",
                   help="output PNG (one content) or directory (one <stem>.png per content); "
                        "default <stem>_stylized.png, or stylized/ for several contents")
    p.add_argument("--size", type=parse_size, default=64, metavar="64|N|native",
                   help="resize shorter side + centre-crop to N (default 64, the training size), "
                        "or 'native': keep the content size cropped to a multiple of 4")
    p.add_argument("--refine", type=parse_refine, default=0, metavar="N",
                   help="then optimise each output for N Adam steps on the training objective (content + style "
                        "loss of the model's VGG19) toward its style: closer to the optimisation ceiling on styles "
                        "the model never saw (N = 20: a few seconds for 64x64 on 2 CPU cores); one --style only; "
                        "default 0 (off)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="device (default cpu)")
    p.add_argument("--metrics-textfile", metavar="PATH",
                   help="also write stylegen_stylize_images_total to a Prometheus node-exporter textfile")


def run(args: argparse.Namespace) -> int:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is visible; use --device cpu")
    if args.metrics_textfile:  # a side output: refuse it now, not after the images are written
        check_output_file(args.metrics_textfile, "--metrics-textfile")
    controls = controls_from_args(args)
    check_refine(args)
    outs = output_paths(args.content, args.out)
    inputs = {Path(x).resolve() for x in [*args.content, *args.style, *([args.mask] if args.mask else [])]}
    clash = [o for o in outs if o.resolve() in inputs]
    if clash:
        raise UserError(f"output {str(clash[0])!r} would overwrite an input image; pass another --out")
    gen, cfg = load_generator(args.checkpoint, args.device)
    items = prepare(args.content, args.style, args.size, args.mask)
    vgg = None
    if args.refine:
        big = [p for (c, _, _), p in zip(items, args.content, strict=True)
               if c.shape[1] * c.shape[2] > REFINE_MAX_PIXELS]
        if big:
            raise UserError(f"content image {big[0]!r} is over the {REFINE_MAX_PIXELS:,}-pixel limit of --refine at "
                            "this --size; pass a smaller --size (e.g. 512) or drop --refine")
        from stylegen.features import build_features  # lazy: torch; not for `stylegen --help`

        vgg = build_features(cfg.features).to(args.device)
    from stylegen.controls import stylize as stylize_one  # lazy: torch; not for `stylegen --help`

    make_output_dirs(outs)
    for (c, styles, mask), path in zip(items, outs, strict=True):
        out = stylize_one(gen, c, styles, controls, mask, args.device)
        if vgg is not None:
            out = refine_u8(out, c, styles[0], vgg, args.refine, args.device)
        try:
            save_png(path, out)
        except OSError as e:  # disk full, permissions: the atomic write left nothing behind
            raise UserError(f"cannot write {str(path)!r} ({e.strerror or type(e).__name__}); "
                            "pass a writable --out") from None
        print(path)
    if args.metrics_textfile:
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
