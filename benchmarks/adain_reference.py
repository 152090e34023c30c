"""AdaIN-architecture reference (Huang & Belongie 2017, as in naoto0804/pytorch-AdaIN):
a frozen VGG19 encoder to relu4_1 + a mirrored decoder (reflection pad, nearest upsample).

The speed baseline of bench_model.py (random decoder weights are fine for timing) and issue 9's
quality reference: ``train`` fits the decoder with *our* losses (the train step of
``stylegen.train.step``: normalised content + style + identity), our data and our optimiser, for a
step or wall-clock budget, then scores it with ``stylegen eval``'s code on the same held-out pairs:

    python benchmarks/adain_reference.py train --config jobs/configs/quality/base.toml \
        --steps 880 --out runs/quality/adain_ref

The encoder is our ``VGGFeatures`` (same convs and layers as naoto's ``vgg``, which prepends a
1x1 conv for the input normalisation that ``VGGFeatures`` does inline).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
from torch import nn

from stylegen import storage
from stylegen.config import STYLE_LAYERS
from stylegen.features import VGGFeatures
from stylegen.losses import content_loss, style_loss_meanstd
from stylegen.stats import adain, calc_mean_std


def _conv(cin: int, cout: int, relu: bool = True) -> list[nn.Module]:
    return [nn.ReflectionPad2d(1), nn.Conv2d(cin, cout, 3)] + ([nn.ReLU()] if relu else [])


def make_decoder() -> nn.Sequential:
    """naoto0804/pytorch-AdaIN ``net.decoder``: relu4_1 (512) -> RGB."""
    up = lambda: nn.Upsample(scale_factor=2, mode="nearest")  # noqa: E731
    return nn.Sequential(
        *_conv(512, 256), up(),
        *_conv(256, 256), *_conv(256, 256), *_conv(256, 256), *_conv(256, 128), up(),
        *_conv(128, 128), *_conv(128, 64), up(),
        *_conv(64, 64), *_conv(64, 3, relu=False),
    )


class AdaINReference(nn.Module):
    def __init__(self, vgg_weights: str = "random") -> None:
        super().__init__()
        self.encoder = VGGFeatures(vgg_weights)
        self.decoder = make_decoder()

    def forward(self, content: torch.Tensor, style: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        fc = self.encoder(content, ["relu4_1"])["relu4_1"]
        fs = self.encoder(style, ["relu4_1"])["relu4_1"]
        t = alpha * adain(fc, fs) + (1 - alpha) * fc
        out = self.decoder(t)
        return out if self.training else out.clamp(0, 1)  # images, as ours (and naoto's saved outputs) are

    def train_loss(self, content: torch.Tensor, style: torch.Tensor, style_weight: float = 10.0) -> torch.Tensor:
        """naoto's training objective: encoder features of the output vs the AdaIN target t
        (content) and the style's relu1_1..relu4_1 mean/std (style)."""
        with torch.no_grad():
            s_feats = self.encoder(style, STYLE_LAYERS)
            t = adain(self.encoder(content, ["relu4_1"])["relu4_1"], s_feats["relu4_1"])
        g = self.decoder(t)
        o_feats = self.encoder(g, STYLE_LAYERS)
        loss_s = style_loss_meanstd([o_feats[n] for n in STYLE_LAYERS], [s_feats[n] for n in STYLE_LAYERS])
        return content_loss(o_feats["relu4_1"], t) + style_weight * loss_s


def train_reference(cfg_path: str | None, overrides: list[str], out: Path, *, steps: int, minutes: float,
                    pairs: int) -> dict:
    """Train the reference's decoder with our step on our data; returns ``stylegen eval``'s rows (+ budget)."""
    from tqdm import tqdm

    from stylegen.checkpoint import save_checkpoint
    from stylegen.config import DataConfig, load_config
    from stylegen.data.loader import build_loader, load_pairs
    from stylegen.evaluate import _json_safe, evaluate, format_table
    from stylegen.train.step import TrainState, train_step

    cfg = load_config(cfg_path, overrides)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    device = torch.device("cpu")
    model = AdaINReference(cfg.features.weights)
    opt = torch.optim.Adam(model.decoder.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2))
    state = TrainState(model, None, opt, None, 0)
    vgg = VGGFeatures(cfg.features.weights)
    total = steps or 10**9  # a wall-clock budget: the schedule spans the steps estimated after 20 steps
    deadline = time.perf_counter() + minutes * 60 if minutes else float("inf")
    bar = tqdm(total=steps or None, unit="step", dynamic_ncols=True)
    t0, epoch = time.perf_counter(), 0
    while state.step < total and time.perf_counter() < deadline:
        for content, style in build_loader(cfg.data, split="train", rank=0, world_size=1, epoch_seed=epoch):
            terms = train_step(state, vgg, content, style, loss_cfg=cfg.loss, optim_cfg=cfg.optim,
                               total_steps=total, device=device, amp=False)
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
              "overrides": overrides, "steps": state.step, "train_seconds": seconds, "pairs": len(content_u8),
              "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    storage.write_bytes(out / "eval.json", (json.dumps(_json_safe(result), indent=2) + "\n").encode())
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
    args = p.parse_args(argv)
    if not (args.steps > 0) ^ (args.minutes > 0):
        p.error("give exactly one budget: --steps N or --minutes M")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    train_reference(args.config, args.overrides, args.out, steps=args.steps, minutes=args.minutes, pairs=args.pairs)
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["AdaINReference", "make_decoder", "calc_mean_std", "train_reference"]
