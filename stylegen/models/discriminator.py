"""PatchGAN discriminator for 64x64 images (pix2pix-style, spectral-normalised).

Unconditioned: it sees one image and says, per overlapping ~34x34 patch, whether it looks
like a *style image* (real = the batch's style images, fake = the generator's outputs).
Conditioning on the style image would need a real pair of two different crops of one
style image, which the (content, style) batches do not provide; the style-specific signal
already comes from the VGG style losses, so D only has to push outputs towards the
texture statistics of artwork in general.

Spectral norm instead of BatchNorm: no batch statistics, so DDP ranks need no sync and
train/eval behave the same.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm


class Discriminator(nn.Module):
    """(B, 3, H, W) in [0, 1] -> patch logits (B, 1, H/8, W/8); 64x64 -> (B, 1, 8, 8)."""

    def __init__(self, channels: int = 64) -> None:
        super().__init__()
        c = channels

        def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [spectral_norm(nn.Conv2d(cin, cout, 4 if stride == 2 else 3, stride, 1)), nn.LeakyReLU(0.2)]

        self.net = nn.Sequential(
            *block(3, c, 2),          # (B, C, H/2, W/2)
            *block(c, 2 * c, 2),      # (B, 2C, H/4, W/4)
            *block(2 * c, 4 * c, 2),  # (B, 4C, H/8, W/8)
            *block(4 * c, 4 * c, 1),
            nn.Conv2d(4 * c, 1, 3, 1, 1),  # (B, 1, H/8, W/8) logits
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * 2.0 - 1.0)
