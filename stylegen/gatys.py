"""Optimisation-based stylization (Gatys et al. 2016): the quality ceiling for ``stylegen eval``.

The output pixels are optimised directly, starting from the content image, on the same
objective the generator is trained on: content MSE at ``content_layer`` +
``style_weight`` x AdaIN mean/std style loss over ``style_layers``. Adam in an
unconstrained (logit) parameterisation keeps pixels in [0, 1] without clamping away
gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from stylegen.config import CONTENT_LAYER, STYLE_LAYERS
from stylegen.losses import content_loss, style_loss_meanstd


def gatys_stylize(content: torch.Tensor, style: torch.Tensor, vgg, *, steps: int = 200,
                  content_layer: str = CONTENT_LAYER, style_layers: Sequence[str] = STYLE_LAYERS,
                  style_weight: float = 10.0, lr: float = 0.05) -> torch.Tensor:
    """content (B,3,H,W), style (B or 1,3,h,w) in [0, 1] -> stylized (B,3,H,W) in [0, 1], detached."""
    style_layers = list(style_layers)
    with torch.no_grad():
        c_target = vgg(content, [content_layer])[content_layer]
        s_feats = vgg(style, style_layers)
        s_target = [s_feats[n].expand(content.shape[0], *s_feats[n].shape[1:]) for n in style_layers]
    eps = 1e-3
    logits = torch.logit(content.detach().clamp(eps, 1 - eps)).requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=lr)
    layers = list(dict.fromkeys([*style_layers, content_layer]))
    with torch.enable_grad():
        for _ in range(steps):
            x = torch.sigmoid(logits)
            f = vgg(x, layers)
            loss = content_loss(f[content_layer], c_target) + style_weight * style_loss_meanstd(
                [f[n] for n in style_layers], s_target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return torch.sigmoid(logits).detach()
