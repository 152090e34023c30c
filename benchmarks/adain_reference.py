"""AdaIN-architecture reference (Huang & Belongie 2017, as in naoto0804/pytorch-AdaIN):
a frozen VGG19 encoder to relu4_1 + a mirrored decoder (reflection pad, nearest upsample).

The speed baseline of bench_model.py (random decoder weights are fine for timing) and issue 9's
quality reference: ``train`` fits the decoder with *our* losses (the train step of
``stylegen.train.step``: normalised content + style + identity), our data and our optimiser, for a
step or wall-clock budget, then scores it with ``stylegen eval``'s code on the same held-out pairs:

    python benchmarks/adain_reference.py train --config jobs/configs/quality/base.toml \
        --steps 880 --out runs/quality/adain_ref

The model itself lives in ``stylegen.references`` (``stylegen eval --reference adain=OUT/decoder.pt``
scores the saved decoder beside the model on eval's pairs).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from stylegen import storage
from stylegen.features import VGGFeatures
from stylegen.references import AdaINReference, make_decoder
from stylegen.stats import calc_mean_std


def train_reference(cfg_path: str | None, overrides: list[str], out: Path, *, steps: int, minutes: float,
                    pairs: int, init: Path | None = None) -> dict:
    """Train the reference's decoder with our step on our data; returns ``stylegen eval``'s rows (+ budget).

    ``init``: a decoder.pt to continue from (a fresh optimiser and schedule; its steps are not counted)."""
    from tqdm import tqdm

    from stylegen.checkpoint import save_checkpoint
    from stylegen.config import DataConfig, load_config
    from stylegen.data.loader import build_loader, load_pairs
    from stylegen.evaluate import json_safe, evaluate, format_table
    from stylegen.train.step import TrainState, cpu_bf16_for, train_step

    cfg = load_config(cfg_path, overrides)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    device = torch.device("cpu")
    model = AdaINReference(cfg.features.weights)
    if init is not None:
        from stylegen.checkpoint import load_checkpoint

        model.decoder.load_state_dict(load_checkpoint(init)["decoder"])
    opt = torch.optim.Adam(model.decoder.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2))
    state = TrainState(model, None, opt, None, 0)
    vgg = VGGFeatures(cfg.features.weights)
    total = steps or 10**9  # a wall-clock budget: the schedule spans the steps estimated after 20 steps
    deadline = time.perf_counter() + minutes * 60 if minutes else float("inf")
    bar = tqdm(total=steps or None, unit="step", dynamic_ncols=True)
    t0, epoch = time.perf_counter(), 0
    cpu_bf16 = cpu_bf16_for(cfg.train.cpu_bf16, device)
    while state.step < total and time.perf_counter() < deadline:
        for content, style in build_loader(cfg.data, split="train", rank=0, world_size=1, epoch_seed=epoch):
            terms = train_step(state, vgg, content, style, loss_cfg=cfg.loss, optim_cfg=cfg.optim,
                               total_steps=total, device=device, amp=False, cpu_bf16=cpu_bf16)
            bar.update(1)
            bar.set_postfix(loss=f"{terms['total']:.3g}")
            if minutes and state.step == 20 and not steps:
                per_step = (time.perf_counter() - t0) / 20
                total = int(minutes * 60 / per_step)
            if state.step >= total or time.perf_counter() >= deadline:
                break
        epoch += 1
    bar.close()
    seconds = time.perf_counter() - t0
    content_u8, style_u8 = load_pairs(DataConfig(image_size=cfg.data.image_size), pairs, split="val")
    rows = evaluate(model, vgg, content_u8, style_u8, gatys_steps=0)
    print(format_table(rows))
    result = {"reference": "adain (VGG19 relu4_1 encoder + mirrored decoder)", "config": cfg_path,
              "init": str(init) if init else None,
              "overrides": overrides, "steps": state.step, "train_seconds": seconds, "pairs": len(content_u8),
              "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    storage.write_bytes(out / "eval.json", (json.dumps(json_safe(result), indent=2) + "\n").encode())
    save_checkpoint(out / "decoder.pt", {"decoder": model.decoder.state_dict()})
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="AdaIN reference trainer (issue 9's same-budget comparison)")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train the decoder with stylegen's losses and data, then evaluate")
    t.add_argument("--config", help="stylegen TOML config (data, loss, optim, train.threads, features)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    t.add_argument("--steps", type=int, default=0, help="step budget (0 = use --minutes)")
    t.add_argument("--minutes", type=float, default=0.0, help="wall-clock budget when --steps is 0")
    t.add_argument("--pairs", type=int, default=16, help="held-out eval pairs (stylegen eval's default 16)")
    t.add_argument("--out", type=Path, default=Path("runs/quality/adain_ref"))
    t.add_argument("--init", type=Path, help="continue from this decoder.pt (fresh optimiser and schedule)")
    args = p.parse_args(argv)
    if not (args.steps > 0) ^ (args.minutes > 0):
        p.error("give exactly one budget: --steps N or --minutes M")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    train_reference(args.config, args.overrides, args.out, steps=args.steps, minutes=args.minutes, pairs=args.pairs,
                    init=args.init)
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["AdaINReference", "make_decoder", "calc_mean_std", "train_reference"]
