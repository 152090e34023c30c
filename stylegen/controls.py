"""Inference controls, in one place for ``stylize``, ``serve`` and the web page.

    stylize(gen, content_u8 (3,H,W), [style_u8 (3,h,w), ...], Controls(...), mask=(H,W) | None) -> (3,H,W) uint8

- ``alpha``: style strength, as the generator's (0 = the content's own style, 1 = full style).
- ``weights``: style mixing. The generator fuses content and style at its AdaIN sites (H, H/2,
  H/4 and VGG relu4_1 at H/8 for the shipped model; the style *code* for ``fusion="concat"``).
  An AdaIN target is ``norm(f_c)·std_s + mean_s``, linear in the style's (mean, std), so the
  weighted sum of the per-style AdaIN targets is AdaIN with the weighted style statistics:
  mixing happens in feature space, at every fusion site, never by blending outputs. Weights
  (1, 0) give exactly (bit for bit) the single-style output.
- ``mask`` (H, W) in [0, 1]: the first style where it is 0 (black), the second where it is 1
  (white), soft in between. Applied in feature space too: at each fusion site the target
  statistics are ``(1 - m)·stats(A) + m·stats(B)`` with ``m`` the mask area-resized to that
  site's grid, so the decoder blends the two styles' textures across the edge instead of
  cutting two outputs together.
- ``preserve_color``: luminance-only transfer (Gatys et al. 2017, "Controlling perceptual
  factors"): the model sees the content's luma Y and each style's luma matched to the
  content's luma mean/std; the output's luma is recombined with the content's chroma. Chroma is
  kept exactly: the luma is clamped to the interval in which ``Y + chroma`` stays in the RGB
  gamut (``keep_chroma``), so only uint8 rounding moves Cb/Cr (<= 0.5 of 255).
- ``tile``: an image with a side over ``tile`` px is stylized in overlapping tiles (``overlap``
  px, a linear feather across each overlap). The generator is fully convolutional but AdaIN
  statistics are per image: each tile normalised by its own statistics would shift colour tile
  by tile. So the content's (and each style's) statistics at every fusion site are computed
  first, over the whole image, from the tiles' non-overlapping cores (float64 sums), and every
  tile is normalised with those same numbers: a tiled run differs from an untiled one only
  by the tiles' borders, which the feather weights down.

Everything here works on batches (B, 3, H, W) of float images in [0, 1]; ``stylize`` and
``stylize_batch`` are the uint8 wrappers. Bad combinations raise ``UserError`` (one line).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stylegen.errors import UserError
from stylegen.models.generator import VGG_LAYER, symlog
from stylegen.stats import calc_mean_std, renormalize

Stats = dict[str, tuple[torch.Tensor, torch.Tensor]]  # site -> (mean, std), each (B, C, 1, 1) or (B, C, h, w)


@dataclass(frozen=True, kw_only=True)
class Controls:
    alpha: float = 1.0
    """Style strength in [0, 1]: 0 = the content's own style, 1 = full style."""
    preserve_color: bool = False
    """Luminance-only transfer; the output keeps the content's chroma (YCbCr, BT.601 full range)."""
    weights: tuple[float, ...] | None = None
    """Style mixing weights, one per style image (normalised to sum 1); None = equal weights."""
    tile: int = 2048
    """Images with a side larger than this (px) are stylized in overlapping tiles; a multiple of 8, >= 64."""
    overlap: int = 256
    """Overlap between neighbouring tiles (px): a multiple of 8 in [16, tile / 4]."""

    def __post_init__(self) -> None:
        if not (isinstance(self.alpha, (int, float)) and 0.0 <= self.alpha <= 1.0):
            raise UserError(f"alpha {self.alpha!r}: must be a number in [0, 1] (0 = content, 1 = full style)")
        if self.weights is not None:
            w = tuple(float(x) for x in self.weights)
            if not w or any(not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
                raise UserError(f"weights {list(self.weights)}: must be non-negative numbers with a positive sum")
            object.__setattr__(self, "weights", w)
        if self.tile < 64 or self.tile % 8:
            raise UserError(f"tile {self.tile}: must be a multiple of 8 and >= 64")
        if self.overlap < 16 or self.overlap % 8 or self.overlap * 4 > self.tile:
            raise UserError(f"overlap {self.overlap}: must be a multiple of 8 between 16 and tile/4 ({self.tile // 4})")


def check(controls: Controls, n_styles: int, has_mask: bool) -> tuple[float, ...]:
    """Validate a combination; returns the normalised style weights."""
    if n_styles < 1:
        raise UserError("no style image given; pass at least one")
    if has_mask:
        if n_styles != 2:
            raise UserError(f"a mask needs exactly two style images (the first where the mask is black, the second "
                            f"where it is white); got {n_styles}")
        if controls.weights is not None:
            raise UserError("a mask and style weights cannot be combined; the mask decides where each style goes")
        return (0.5, 0.5)  # unused: the mask blends
    w = controls.weights or (1.0,) * n_styles
    if len(w) != n_styles:
        raise UserError(f"{len(w)} style weights for {n_styles} style images; give one weight per style")
    total = sum(w)
    return tuple(x / total for x in w)


# ----------------------------------------------------------------------------- colour (pure)

def luma(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> (B, 1, H, W) Y (BT.601)."""
    r, g, b = x.unbind(1)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def rgb_to_ycbcr(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> YCbCr in [0, 1] (JPEG / BT.601 full range, chroma offset 0.5)."""
    y = luma(x)
    cb = 0.5 + (x[:, 2:3] - y) / 1.772
    cr = 0.5 + (x[:, 0:1] - y) / 1.402
    return torch.cat([y, cb, cr], dim=1)


def keep_chroma(out: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """``out``'s luma with ``content``'s chroma, (B, 3, H, W) in [0, 1].

    RGB = Y + d with d = content - Y(content) (the chroma as an RGB offset). The luma is clamped
    to [max(-d), 1 - max(d)], where every channel stays in [0, 1]: the chroma is kept exactly
    (a saturated pixel cannot be as bright or as dark as any luma)."""
    d = content - luma(content)
    lo, hi = (-d).amax(dim=1, keepdim=True), 1.0 - d.amax(dim=1, keepdim=True)
    y = torch.maximum(torch.minimum(luma(out), hi), lo)
    return (y + d).clamp(0.0, 1.0)


def match_luma(y: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """(B, 1, h, w) luma with the mean/std of ``ref`` (B, 1, H, W), clamped to [0, 1]."""
    m, s = calc_mean_std(y)
    rm, rs = calc_mean_std(ref)
    return ((y - m) / s * rs + rm).clamp(0.0, 1.0)


def grey(y: torch.Tensor) -> torch.Tensor:
    return y.expand(-1, 3, -1, -1)


# ----------------------------------------------------------------------------- tiles (pure)

def tile_layout(n: int, tile: int, overlap: int) -> tuple[int, list[int]]:
    """(tile size, starts) covering [0, n) along one axis: one tile when n <= tile; else k evenly
    spaced tiles of one size <= tile (a multiple of 8) whose starts are multiples of 8 (the
    generator's strides; the last tile ends at n) and that overlap by >= overlap. With
    overlap <= tile/4 a pixel lies in at most two tiles (one feather ramp per overlap) except
    for tiny tiles (tile 64), where the normalised weights keep a third a weighted average."""
    if n <= tile:
        return n, [0]
    k = math.ceil((n - overlap) / (tile - overlap))
    while True:  # starts are floored to multiples of 8: leave 7 px of slack in each overlap
        t = -(-math.ceil((n + (k - 1) * (overlap + 7)) / k) // 8) * 8
        if t <= tile:
            break
        k += 1
    starts = [(i * (n - t) // (k - 1)) // 8 * 8 for i in range(k - 1)] + [n - t]
    return t, starts


def blend_window(n: int, left: int, right: int) -> torch.Tensor:
    """(n,) feather weights of a tile that overlaps its neighbours by ``left`` / ``right`` px.

    Over an overlap of L px the weight is 0 for the outer L/4 (where the tile's border, seen
    through reflection padding instead of the real neighbourhood, alters the output), then a
    linear ramp over the middle L/2 up to 1. The neighbour's window mirrors it, so the two
    weights sum to 1 across the ramp and each tile alone covers its side of it."""
    w = torch.ones(n, dtype=torch.float32)
    for length, flip in ((left, False), (right, True)):
        if not length:
            continue
        edge, ramp = length // 4, length - 2 * (length // 4)
        r = torch.cat([torch.zeros(edge), (torch.arange(ramp, dtype=torch.float32) + 0.5) / ramp])
        r = r.flip(0) if flip else r
        part = w[n - len(r):] if flip else w[:len(r)]
        part.copy_(torch.minimum(part, r))
    return w


def _axis_tiles(n: int, tile: int, overlap: int) -> list[tuple[int, int, torch.Tensor, int, int]]:
    """[(start, size, feather window, core start, core end)]: cores partition [0, n) at overlap midpoints."""
    t, starts = tile_layout(n, tile, overlap)
    out = []
    for i, s in enumerate(starts):
        left = starts[i - 1] + t - s if i > 0 else 0
        right = s + t - starts[i + 1] if i + 1 < len(starts) else 0
        c0 = (s + left // 2) // 8 * 8 if i > 0 else 0
        c1 = (starts[i + 1] + right // 2) // 8 * 8 if i + 1 < len(starts) else n
        out.append((s, t, blend_window(t, left, right), c0, c1))
    return out


# ----------------------------------------------------------------------------- the generator, in pieces

def _stat_maps(gen, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Feature maps whose channel statistics the fusion uses: AdaIN sites ("f0".."f2", "vgg"), or
    for ``fusion="concat"`` the style encoder's deepest map ("code")."""
    maps: dict[str, torch.Tensor] = {}
    if gen.fusion == "adain":
        f = gen.content_encoder(x)
        for i in range(3 - gen.levels, 3):
            maps[f"f{i}"] = f[i]
    else:
        maps["code"] = gen.style_encoder(x)[2]
    if gen.vgg is not None:
        maps["vgg"] = gen.vgg(x, [VGG_LAYER])[VGG_LAYER]
    return maps


def _content_maps(gen, x: torch.Tensor, need_code: bool) -> dict[str, torch.Tensor]:
    """What the decoder consumes from the content: the AdaIN sites (adain), or the content
    encoder's deepest map "c2" (+ "code" when alpha < 1: the content's own style code) (concat)."""
    if gen.fusion == "adain":
        return _stat_maps(gen, x)
    maps = {"c2": gen.content_encoder(x)[2]}
    if need_code or gen.vgg is not None:
        maps.update({k: v for k, v in _stat_maps(gen, x).items() if k == "vgg" or need_code})
    return maps


def fuse_and_decode(gen, maps: dict[str, torch.Tensor], c_stats: Stats, target: Stats,
                    alpha: float | torch.Tensor) -> torch.Tensor:
    """The generator's forward from its fusion sites on (same operations, same order as
    ``Generator.forward``, so equal inputs give bit-equal outputs). ``c_stats``: the content's
    statistics at each site; ``target``: the style statistics to impose (global or per pixel).
    ``alpha`` a float, or a 0-d tensor (ONNX export: always blended)."""
    blend = not (isinstance(alpha, float) and alpha == 1.0)

    def mix(t: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        return alpha * t + (1.0 - alpha) * f if blend else t

    def ada(k: str) -> torch.Tensor:
        (cm, cs), (sm, ss) = c_stats[k], target[k]
        return mix(renormalize(maps[k], cm, cs, sm, ss), maps[k])

    if gen.fusion == "adain":
        fused = {k: ada(k) for k in maps if k.startswith("f")}
        h, skips = fused["f2"], [fused.get("f0"), fused.get("f1")]
    else:
        code = torch.cat(target["code"], dim=1)                                   # (B, 8C, 1|h, 1|w)
        if blend:
            code = alpha * code + (1.0 - alpha) * torch.cat(c_stats["code"], dim=1)
        c2 = maps["c2"]
        h = torch.cat([c2, code.expand(c2.shape[0], -1, *c2.shape[-2:])], dim=1)  # (B, 12C, H/4, W/4)
        skips = [None, None]
    h = gen.fuse(h)                                                               # (B, 4C, H/4, W/4)
    if gen.vgg is not None:
        v = F.interpolate(gen.vgg_in(symlog(ada("vgg"))), size=h.shape[-2:], mode="nearest")
        h = gen.vgg_mix(torch.cat([h, v], dim=1))
    return gen.decode(h, skips).clamp(0.0, 1.0)  # forward of the generator's bounded_clamp


def image_stats(gen, x: torch.Tensor, tile: int, overlap: int) -> Stats:
    """Channel mean/std of ``x`` (B, 3, H, W) at every fusion site, over the whole image.

    Up to ``tile`` px a side: ``calc_mean_std`` of one pass (what the generator computes).
    Larger: each site's features are computed tile by tile and summed (float64) over the
    tiles' non-overlapping cores, mapped onto the site's grid (stride 1, 2, 4 or 8)."""
    hh, ww = x.shape[-2:]
    if max(hh, ww) <= tile:
        return {k: calc_mean_std(v) for k, v in _stat_maps(gen, x).items()}
    sums: dict[str, list] = {}
    for y0, th, _, cy0, cy1 in _axis_tiles(hh, tile, overlap):
        for x0, tw, _, cx0, cx1 in _axis_tiles(ww, tile, overlap):
            for k, f in _stat_maps(gen, x[..., y0:y0 + th, x0:x0 + tw]).items():
                sy, sx = th / f.shape[-2], tw / f.shape[-1]
                core = f[..., round((cy0 - y0) / sy):round((cy1 - y0) / sy),
                         round((cx0 - x0) / sx):round((cx1 - x0) / sx)].double()
                acc = sums.setdefault(k, [0.0, 0.0, 0])
                acc[0] = acc[0] + core.sum(dim=(2, 3), keepdim=True)
                acc[1] = acc[1] + core.square().sum(dim=(2, 3), keepdim=True)
                acc[2] += core.shape[-2] * core.shape[-1]
    out: Stats = {}
    for k, (s, s2, n) in sums.items():
        mean = s / n
        var = (s2 / n - mean.square()).clamp_min(0.0)
        out[k] = (mean.float(), (var + 1e-5).sqrt().float())  # eps as calc_mean_std's
    return out


def _mixed(style_stats: list[Stats], weights: tuple[float, ...]) -> Stats:
    """Weighted sum of the styles' statistics (= weighted sum of their AdaIN targets)."""
    out: Stats = {}
    for k in style_stats[0]:
        mean = std = 0.0
        for w, st in zip(weights, style_stats, strict=True):
            mean, std = mean + w * st[k][0], std + w * st[k][1]
        out[k] = (mean, std)
    return out


def _masked(style_stats: list[Stats], mask: torch.Tensor, maps: dict[str, torch.Tensor]) -> Stats:
    """Per-pixel target statistics: style 0 where ``mask`` (B, 1, H, W) is 0, style 1 where 1,
    the mask area-resized to each site's grid."""
    out: Stats = {}
    for k in style_stats[0]:
        grid = maps["c2" if k == "code" else k].shape[-2:]
        m = F.interpolate(mask, size=grid, mode="area")                           # (B, 1, h, w)
        (am, asd), (bm, bsd) = style_stats[0][k], style_stats[1][k]
        out[k] = ((1 - m) * am + m * bm, (1 - m) * asd + m * bsd)
    return out


# ----------------------------------------------------------------------------- float API

@torch.inference_mode()
def stylize_float(gen, content: torch.Tensor, styles: list[torch.Tensor], controls: Controls,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """content (B, 3, H, W), styles [(B|1, 3, h, w)], mask (B|1, 1, H, W) or None; floats in [0, 1]
    -> (B, 3, H, W) in [0, 1]. H, W divisible by 4."""
    hh, ww = content.shape[-2:]
    if hh % 4 or ww % 4:
        raise UserError(f"content is {ww}x{hh}; both sides must be multiples of 4 (crop it)")
    weights = check(controls, len(styles), mask is not None)
    if mask is not None and tuple(mask.shape[-2:]) != (hh, ww):
        raise UserError(f"mask is {mask.shape[-1]}x{mask.shape[-2]} but the content is {ww}x{hh}; "
                        "give a mask of the content's size")
    src = content
    if controls.preserve_color:
        y = luma(content)
        content = grey(y)
        styles = [grey(match_luma(luma(s), y)) for s in styles]
    tile, ov = controls.tile, controls.overlap
    style_stats = [image_stats(gen, s, tile, ov) for s in styles]
    target = None if mask is not None else _mixed(style_stats, weights)
    need_code = gen.fusion == "concat" and controls.alpha != 1.0
    alpha = float(controls.alpha)
    if max(hh, ww) <= tile:
        maps = _content_maps(gen, content, need_code)
        c_stats = {k: calc_mean_std(v) for k, v in maps.items() if k != "c2"}
        out = fuse_and_decode(gen, maps, c_stats, target or _masked(style_stats, mask, maps), alpha)
    else:
        c_stats = image_stats(gen, content, tile, ov)
        out = torch.zeros_like(content)
        wsum = torch.zeros_like(content[:, :1])
        for y0, th, wy, _, _ in _axis_tiles(hh, tile, ov):
            for x0, tw, wx, _, _ in _axis_tiles(ww, tile, ov):
                sl = (..., slice(y0, y0 + th), slice(x0, x0 + tw))
                maps = _content_maps(gen, content[sl], need_code)
                tgt = target or _masked(style_stats, mask[sl], maps)
                w = (wy[:, None] * wx[None, :]).to(content.device)                # (th, tw)
                out[sl] += fuse_and_decode(gen, maps, c_stats, tgt, alpha) * w
                wsum[sl] += w
        out = out / wsum
    return keep_chroma(out, src) if controls.preserve_color else out


# ----------------------------------------------------------------------------- uint8 API

def _f(u8: torch.Tensor, device) -> torch.Tensor:
    return u8.to(device).float().div(255.0)


def _u8(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clamp(0.0, 1.0).mul(255.0).round().to("cpu").byte()


def stylize(gen, content_u8: torch.Tensor, styles_u8: list[torch.Tensor], controls: Controls = Controls(),
            mask: torch.Tensor | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
    """content uint8 (3, H, W), styles [uint8 (3, h, w)], mask float (H, W) in [0, 1] or None
    -> uint8 (3, H, W) on the CPU."""
    m = None if mask is None else mask.to(device).float()[None, None]
    out = stylize_float(gen, _f(content_u8, device)[None], [_f(s, device)[None] for s in styles_u8], controls, m)
    return _u8(out[0])


def stylize_batch(gen, contents_u8: list[torch.Tensor], styles_u8: list[list[torch.Tensor]],
                  controls: Controls = Controls(), masks: list[torch.Tensor | None] | None = None,
                  device: str | torch.device = "cpu") -> list[torch.Tensor]:
    """Many requests with the same controls: item i is ``stylize(gen, contents_u8[i], styles_u8[i],
    controls, masks[i])``. Items whose contents, styles and masks all share shapes (and fit in
    one tile) run as one batch; each sample keeps its own statistics, so results equal
    the one-by-one ones up to float rounding of batched convolutions."""
    n = len(contents_u8)
    masks = masks or [None] * n
    if len(styles_u8) != n or len(masks) != n:
        raise UserError(f"{n} contents but {len(styles_u8)} style lists and {len(masks)} masks")
    groups: dict[tuple, list[int]] = {}
    for i in range(n):
        key = (tuple(contents_u8[i].shape), tuple(tuple(s.shape) for s in styles_u8[i]), masks[i] is None)
        fits = max(contents_u8[i].shape[-2:]) <= controls.tile
        groups.setdefault(key if fits else ("single", i), []).append(i)
    out: list[torch.Tensor | None] = [None] * n
    for idx in groups.values():
        c = torch.stack([_f(contents_u8[i], device) for i in idx])
        st = [torch.stack([_f(styles_u8[i][k], device) for i in idx]) for k in range(len(styles_u8[idx[0]]))]
        m = None if masks[idx[0]] is None else torch.stack([masks[i].to(device).float()[None] for i in idx])
        res = _u8(stylize_float(gen, c, st, controls, m))
        for j, i in enumerate(idx):
            out[i] = res[j]
    return out  # type: ignore[return-value]
