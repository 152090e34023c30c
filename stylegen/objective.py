"""The scale-free evaluation objective, shared by ``stylegen eval`` and training validation.

For fixed (content, style) pairs and any set of outputs (B,3,H,W) in [0, 1]:

    content   = MSE of VGG relu4_1 features, output vs content       (losses.content_loss)
    style     = AdaIN mean/std loss over relu1_1..relu4_1, vs style  (losses.style_loss_meanstd)
    gram      = normalised Gram loss over the same layers, vs style  (losses.style_loss_gram)
    content_n = content / content of the "style copy" answer (output = style)
    style_n   = style / style of the "identity" answer (output = content)
    gram_n    = gram / gram of the identity answer
    objective_n = content_n + style_n   (both trivial answers score 1.0; lower is better)
    style_<layer>   = the style term of one layer (relu1_1 .. relu4_1; ``style`` is their sum)
    style_n_<layer> = style_<layer> / style_<layer> of the identity answer: where the style error
                      lives (relu1_1/relu2_1 fine texture, relu4_1 coarse structure and palette);
                      1.0 = as far from the style at that layer as returning the content

Every loss is a mean over the pairs (batch-size independent); the ratios are ratios of
those means over the whole pair set, not means of per-pair ratios (one near-identical pair
would otherwise dominate).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from stylegen.config import CONTENT_LAYER, STYLE_LAYERS
from stylegen.images import to_float
from stylegen.losses import content_loss, style_loss_gram, style_loss_meanstd
from stylegen.models import eval_mode, unwrap

LOSS_KEYS = ("content", "style", "gram")
LAYER_KEYS = tuple(f"style_{n}" for n in STYLE_LAYERS)       # raw per-layer style terms
LAYER_N_KEYS = tuple(f"style_n_{n}" for n in STYLE_LAYERS)   # ... each / the identity answer's
ROW_KEYS = ("content", "style", "gram", "content_n", "style_n", "gram_n", "objective_n", *LAYER_KEYS, *LAYER_N_KEYS)


Feats = Mapping[str, torch.Tensor]


def _terms(fo: Feats, fc: Feats, fs: Feats) -> dict[str, float]:
    """Batch-mean losses of output features ``fo`` against content ``fc`` and style ``fs`` features."""
    o = [fo[n] for n in STYLE_LAYERS]
    s = [fs[n] for n in STYLE_LAYERS]
    # "style" stays the one multi-layer call (its float32 sum is the figure training reports);
    # the per-layer terms are the same function on one layer each
    return {"content": float(content_loss(fo[CONTENT_LAYER], fc[CONTENT_LAYER])),
            "style": float(style_loss_meanstd(o, s)),
            "gram": float(style_loss_gram(o, s)),
            **{k: float(style_loss_meanstd([a], [b])) for k, a, b in zip(LAYER_KEYS, o, s, strict=True)}}


def objective_style_weight(refs: Mapping[str, Mapping[str, float]]) -> float:
    """The style weight under which content + w·style is proportional to objective_n = content/c_ref +
    style/s_ref, from ``score``'s reference rows: w = c_ref/s_ref, the style copy's content loss over the
    identity's (the content's) style loss. The Gatys row and ``--refine`` optimise with it."""
    return refs["style_copy"]["content"] / max(refs["identity"]["style"], 1e-12)


def normalise(losses: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Mean losses per row (must include rows 'identity' and 'style_copy') -> rows with *_n keys.

    Per-layer terms (LAYER_KEYS) are optional: where the rows hold them, each row also gets
    them and their LAYER_N_KEYS ratios to the identity row's."""
    c_ref = losses["style_copy"]["content"]
    s_ref = losses["identity"]["style"]
    g_ref = losses["identity"]["gram"]

    def ratio(x: float, ref: float) -> float:
        return x / ref if ref > 0 else (0.0 if x == 0 else math.inf)

    rows = {}
    for name, t in losses.items():
        cn, sn = ratio(t["content"], c_ref), ratio(t["style"], s_ref)
        rows[name] = {**{k: float(t[k]) for k in LOSS_KEYS}, "content_n": cn, "style_n": sn,
                      "gram_n": ratio(t["gram"], g_ref), "objective_n": cn + sn}
        for k, kn in zip(LAYER_KEYS, LAYER_N_KEYS, strict=True):
            if k in t:
                rows[name][k] = float(t[k])
                rows[name][kn] = ratio(t[k], losses["identity"][k])
    return rows


@torch.no_grad()
def loss_sums(vgg, content: torch.Tensor, style: torch.Tensor, outputs: Mapping[str, torch.Tensor],
              batch: int = 16, cache: dict | None = None) -> dict[str, dict[str, float]]:
    """Per-row sums over the pairs (not means) of every loss term, for 'identity', 'style_copy' and
    each named output set. Sums, so that shards of the pairs (one per DDP rank) add up exactly to
    the whole; ``score`` divides by the pair count and normalises. No pairs: every sum is 0.

    content, style, outputs[name]: float (N,3,H,W) in [0, 1] on vgg's device (style may
    have another H, W). The targets' VGG features are computed once per batch and shared by
    every row. ``cache`` (a dict the caller keeps) holds those target features across calls
    with the same pairs: training validates the same fixed pairs at every report.
    """
    names = ["identity", "style_copy", *[k for k in outputs if k not in ("identity", "style_copy")]]
    sums = {k: dict.fromkeys((*LOSS_KEYS, *LAYER_KEYS), 0.0) for k in names}
    layers = list(STYLE_LAYERS)
    for i in range(0, len(content), batch):
        c, s = content[i:i + batch], style[i:i + batch]
        if cache is not None and i in cache:
            fc, fs = cache[i]
        else:
            fc, fs = vgg(c, layers), vgg(s, layers)
            if cache is not None:
                cache[i] = (fc, fs)
        m = len(c)
        for k in names:
            if k == "identity":
                fo = fc
            elif k == "style_copy":
                fo = fs
            else:
                fo = vgg(outputs[k][i:i + batch], layers)
            for key, v in _terms(fo, fc, fs).items():
                sums[k][key] += m * v
    return sums


def score(vgg, content: torch.Tensor, style: torch.Tensor, outputs: Mapping[str, torch.Tensor],
          batch: int = 16, cache: dict | None = None) -> dict[str, dict[str, float]]:
    """Rows of ROW_KEYS for each named output set, plus the reference rows 'identity' and 'style_copy'
    (arguments as ``loss_sums``)."""
    n = len(content)
    if n == 0:
        raise ValueError("score needs at least one pair")
    return rows_from_sums(loss_sums(vgg, content, style, outputs, batch=batch, cache=cache), n)


@torch.no_grad()
def generate(generator, content: torch.Tensor, style: torch.Tensor, alpha: float = 1.0,
             batch: int = 16) -> torch.Tensor:
    """generator outputs for all pairs, in batches (float in, float (N,3,H,W) out)."""
    return torch.cat([generator(content[i:i + batch], style[i:i + batch], alpha=alpha)
                      for i in range(0, len(content), batch)])


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean over images of 10·log10(1 / MSE) for [0, 1] images (B,3,H,W); MSE floored at 1e-10 (100 dB)."""
    mse = (x.float() - ref.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return float((-10.0 * torch.log10(mse)).mean())


def score_generator(generator, vgg, content_u8: torch.Tensor, style_u8: torch.Tensor,
                    device: torch.device | str = "cpu", batch: int = 16, cache: dict | None = None) -> dict[str, float]:
    """The model row for fixed uint8 pairs: content, style, gram and their *_n, objective_n.

    Pass the same ``cache`` dict for repeated calls on the same pairs (see ``score``).

    The generator is run in eval mode and restored to its previous mode.
    """
    if len(content_u8) == 0:
        raise ValueError("score needs at least one pair")
    return rows_from_sums(generator_loss_sums(generator, vgg, content_u8, style_u8, device, batch, cache),
                          len(content_u8))["model"]


def generator_loss_sums(generator, vgg, content_u8: torch.Tensor, style_u8: torch.Tensor,
                        device: torch.device | str = "cpu", batch: int = 16,
                        cache: dict | None = None) -> dict[str, dict[str, float]]:
    """``loss_sums`` of the generator's outputs (row 'model') on uint8 pairs (none: all sums 0)."""
    with eval_mode(unwrap(generator)) as g:
        c, s = to_float(content_u8, device), to_float(style_u8, device)
        out = generate(g, c, s, batch=batch) if len(c) else c
        return loss_sums(vgg, c, s, {"model": out}, batch=batch, cache=cache)


def rows_from_sums(sums: Mapping[str, Mapping[str, float]], n: int) -> dict[str, dict[str, float]]:
    """``loss_sums`` over ``n`` pairs (possibly added up over shards) -> the rows ``score`` returns."""
    return normalise({k: {key: v / n for key, v in t.items()} for k, t in sums.items()})
