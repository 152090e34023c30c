"""Feature statistics shared by the model and the losses (as pytorch-AdaIN's ``function.py``):
Gram matrices, per-channel mean/std and adaptive instance normalisation. Pure functions.

Feature maps are (B, C, H, W).
"""

from __future__ import annotations

import torch


def gram_matrix(f: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, C): F Fᵀ / (C·H·W) (Johnson et al.'s normalisation)."""
    b, c, h, w = f.shape
    x = f.float().reshape(b, c, h * w)
    with torch.autocast(f.device.type, enabled=False):  # float32 even under bf16 autocast
        return torch.bmm(x, x.transpose(1, 2)) / (c * h * w)


def calc_mean_std(f: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel mean and std over H, W, each (B, C, 1, 1).

    std = sqrt(population variance + eps): the population (not unbiased) variance keeps a
    1x1 map finite, and using the same eps on both sides makes ``adain(x, x) == x``.
    """
    x = f.float()  # float32 under bf16 autocast
    mean = x.mean(dim=(2, 3), keepdim=True)
    # two passes, not torch.var_mean: same float32 accuracy, and on CPU (torch 2.13) 4-15x faster
    # forward and 1.1-4x with backward (benchmarks/bench_model.py: mean_std)
    var = (x - mean).square().mean(dim=(2, 3), keepdim=True)
    return mean, (var + eps).sqrt()


def adain(content_feat: torch.Tensor, style_feat: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Adaptive instance norm (Huang & Belongie 2017): content normalised per channel, then
    scaled/shifted to the style's channel std/mean. Sizes of H, W may differ."""
    return renormalize(content_feat, *calc_mean_std(content_feat, eps), *calc_mean_std(style_feat, eps))


def renormalize(x: torch.Tensor, x_mean: torch.Tensor, x_std: torch.Tensor, mean: torch.Tensor,
                std: torch.Tensor) -> torch.Tensor:
    """(x - x_mean) / x_std * std + mean, as one affine map: one pass over x (and one backward) instead of
    four, in float32 as before. Statistics broadcast over x ((B, C, 1, 1), or per pixel); equal
    statistics give exactly x (scale 1, shift 0)."""
    scale = std / x_std
    return torch.addcmul(mean - x_mean * scale, x, scale)
