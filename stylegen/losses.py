"""Pure loss functions. ``loss_terms`` returns named UNWEIGHTED terms; ``weighted_total``
is the one place the ``loss`` config weights are applied.

Feature maps are (B, C, H, W); every loss is a mean over the batch, so values do not
depend on batch size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from stylegen.features import LAYERS
from stylegen.stats import calc_mean_std, gram_matrix

# Names of the terms and the LossConfig field holding each weight (same name).
TERMS = ("content", "style", "gram", "pixel_l1", "pixel_l2", "tv", "adversarial", "identity")


def content_loss(out_feat: torch.Tensor, target_feat: torch.Tensor) -> torch.Tensor:
    """MSE between feature maps at the content layer."""
    return F.mse_loss(out_feat.float(), target_feat.float())


def style_loss_meanstd(out_feats: Sequence[torch.Tensor], style_feats: Sequence[torch.Tensor]) -> torch.Tensor:
    """AdaIN's style loss: sum over layers of MSE(mean) + MSE(std) of channel statistics."""
    total = out_feats[0].new_zeros(())
    for o, s in zip(out_feats, style_feats, strict=True):
        om, os_ = calc_mean_std(o)
        sm, ss = calc_mean_std(s)
        total = total + F.mse_loss(om, sm) + F.mse_loss(os_, ss)
    return total


def style_loss_gram(out_feats: Sequence[torch.Tensor], style_feats: Sequence[torch.Tensor]) -> torch.Tensor:
    """Johnson's style loss: sum over layers of MSE between normalised Gram matrices."""
    total = out_feats[0].new_zeros(())
    for o, s in zip(out_feats, style_feats, strict=True):
        total = total + F.mse_loss(gram_matrix(o), gram_matrix(s))
    return total


def tv_loss(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation: mean |horizontal diff| + mean |vertical diff|."""
    return (x[..., :, 1:] - x[..., :, :-1]).abs().mean() + (x[..., 1:, :] - x[..., :-1, :]).abs().mean()


def pixel_l1(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(output, target)


def pixel_l2(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(output, target)


def d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator BCE-with-logits: real -> 1, fake -> 0 (mean of the two halves)."""
    real = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
    fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    return 0.5 * (real + fake)


def g_adv_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator's non-saturating adversarial BCE: fake -> 1."""
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def feature_layers(cfg) -> tuple[str, ...]:
    """The VGG layers ``loss_terms`` needs (cfg: LossConfig), shallow to deep, no duplicates."""
    wanted = set(cfg.style_layers) | {cfg.content_layer}
    return tuple(n for n in LAYERS if n in wanted)


def target_features(vgg, content: torch.Tensor, style: torch.Tensor, cfg, *,
                    batched: bool = False) -> tuple[dict, dict]:
    """(content_feats, style_feats) for ``loss_terms``, without autograd: compute once per
    batch and reuse (e.g. across alphas, or for the D step).

    ``batched``: one VGG pass over content | style (2B, 3, H, W) when both have the same shape and
    need the same layers (loss.normalize): the same per-sample math, half the calls."""
    layers = list(feature_layers(cfg)) if getattr(cfg, "normalize", False) else None
    with torch.no_grad():
        if layers:  # the trivial references need both images at every layer
            if batched and content.shape == style.shape:
                both = vgg(torch.cat([content, style]), layers)  # {layer: (2B, C, h, w)}
                b = len(content)
                return {n: f[:b] for n, f in both.items()}, {n: f[b:] for n, f in both.items()}
            return vgg(content, layers), vgg(style, layers)
        return vgg(content, [cfg.content_layer]), vgg(style, list(cfg.style_layers))


def loss_terms(output: torch.Tensor, content: torch.Tensor, style: torch.Tensor, vgg, cfg,
               fake_logits: torch.Tensor | None = None, *,
               content_feats: Mapping[str, torch.Tensor] | None = None,
               style_feats: Mapping[str, torch.Tensor] | None = None,
               gram: bool = True) -> dict[str, torch.Tensor]:
    """Named unweighted loss terms of ``output`` (B, 3, H, W) in [0, 1].

    cfg: LossConfig. ``content``/``style`` are the batch's inputs (the style image may have
    another size). Returns content, style, pixel_l1, pixel_l2 and tv (all cheap once the
    output's VGG features exist), gram unless ``gram`` is False (its float32 Gram matrices
    over every style layer cost ~5 % of a CPU train step: the train step skips it when
    loss.gram is 0); ``adversarial`` only when ``fake_logits`` (D's logits on ``output``) is
    given. Pass ``content_feats``/``style_feats`` (see ``target_features``) to skip recomputing
    the targets' VGG features.
    """
    if content_feats is None or style_feats is None:
        cf, sf = target_features(vgg, content, style, cfg)
        content_feats = content_feats if content_feats is not None else cf
        style_feats = style_feats if style_feats is not None else sf
    out_feats = vgg(output, feature_layers(cfg))
    layers = list(cfg.style_layers)
    o_style = [out_feats[n] for n in layers]
    s_style = [style_feats[n] for n in layers]
    terms = {
        "content": content_loss(out_feats[cfg.content_layer], content_feats[cfg.content_layer]),
        "style": style_loss_meanstd(o_style, s_style),
        "pixel_l1": pixel_l1(output, content),
        "pixel_l2": pixel_l2(output, content),
        "tv": tv_loss(output),
    }
    if gram:
        terms["gram"] = style_loss_gram(o_style, s_style)
    if getattr(cfg, "normalize", False):
        # Scale-free terms, as stylegen eval scores them: each feature loss divided by the same
        # loss of the batch's trivial answer (content: copying the style image; style and gram:
        # returning the content image). 1.0 = no better than the trivial answer, so the weights
        # mean the same thing at any VGG scale and pixel terms (~0.1) sit on the same footing.
        c_style = [content_feats[n] for n in layers]
        sc, cc = style_feats[cfg.content_layer], content_feats[cfg.content_layer]
        if sc.shape[-2:] != cc.shape[-2:]:  # a style image of another size: compare at the content's grid
            sc = F.interpolate(sc, size=cc.shape[-2:], mode="bilinear", align_corners=False)
        if getattr(cfg, "normalize_per", "batch") == "sample":
            _normalise_per_sample(terms, out_feats, content_feats, sc, cc, o_style, s_style, c_style, cfg.content_layer)
        else:
            refs = {"content": content_loss(sc, cc), "style": style_loss_meanstd(c_style, s_style)}
            if gram:
                refs["gram"] = style_loss_gram(c_style, s_style)
            for k, ref in refs.items():
                terms[k] = terms[k] / ref.detach().clamp_min(1e-12)
    if fake_logits is not None:
        terms["adversarial"] = g_adv_loss(fake_logits)
    return terms


def _per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, ...) x2 -> (B,) float32 mean squared difference per sample."""
    return (a.float() - b.float()).square().flatten(1).mean(1)


def _per_sample_style(out_feats, style_feats) -> torch.Tensor:
    """style_loss_meanstd per sample, (B,): its batch mean is ``style_loss_meanstd``."""
    total = 0
    for o, s in zip(out_feats, style_feats, strict=True):
        om, os_ = calc_mean_std(o)
        sm, ss = calc_mean_std(s)
        total = total + _per_sample_mse(om, sm) + _per_sample_mse(os_, ss)
    return total


def _normalise_per_sample(terms, out_feats, content_feats, sc, cc, o_style, s_style, c_style, content_layer,
                          floor: float = 0.1) -> None:
    """terms["content"], terms["style"] := mean over samples of each sample's loss / that sample's
    trivial answer's, the reference floored at ``floor`` x its batch mean (a pair whose content is
    already the style cannot take the batch over). gram keeps the batch normalisation."""
    with torch.no_grad():
        refs = {"content": _per_sample_mse(sc, cc), "style": _per_sample_style(c_style, s_style)}
    losses = {"content": _per_sample_mse(out_feats[content_layer], content_feats[content_layer]),
              "style": _per_sample_style(o_style, s_style)}
    for k, ref in refs.items():
        ref = torch.maximum(ref, floor * ref.mean()).clamp_min(1e-12)
        terms[k] = (losses[k] / ref).mean()
    if "gram" in terms:
        terms["gram"] = terms["gram"] / style_loss_gram(c_style, s_style).detach().clamp_min(1e-12)


def weighted_total(terms: Mapping[str, torch.Tensor], cfg) -> torch.Tensor:
    """Σ cfg.<name> · terms[name] over terms with a positive weight (cfg: LossConfig).

    Zero-weight terms are skipped (so they cost no backward pass); a positive-weight term
    missing from ``terms`` is an error (e.g. adversarial > 0 but no discriminator logits).
    """
    total = None
    for name in TERMS:
        w = float(getattr(cfg, name))
        if w <= 0.0:
            continue
        if name not in terms:
            raise KeyError(f"loss.{name} = {w} but no {name!r} term was computed"
                           + (" (pass fake_logits to loss_terms)" if name == "adversarial" else "")
                           + (" (computed by the train step from G(content, content))" if name == "identity" else ""))
        total = w * terms[name] if total is None else total + w * terms[name]
    if total is None:
        raise ValueError("all loss weights are 0; set at least one of loss." + ", loss.".join(TERMS))
    return total
