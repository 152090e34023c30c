"""AdaIN-architecture reference (Huang & Belongie 2017, as in naoto0804/pytorch-AdaIN):
a frozen VGG19 encoder to relu4_1 + a mirrored decoder (reflection pad, nearest upsample).

Used only as the speed baseline in bench_model.py; random decoder weights are fine for
timing. The encoder is our ``VGGFeatures`` (same convs and layers as naoto's ``vgg``,
which prepends a 1x1 conv for the input normalisation that ``VGGFeatures`` does inline).
"""

from __future__ import annotations

import torch
from torch import nn

from stylegen.features import VGGFeatures
from stylegen.losses import adain, calc_mean_std, content_loss, style_loss_meanstd

STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1")


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
        return self.decoder(t)

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


__all__ = ["AdaINReference", "make_decoder", "calc_mean_std"]
