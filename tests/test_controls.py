"""stylegen.controls and the stylize flags that use it: each control's effect, measured.

Figures (this machine, shipped model unless said): weights (1, 0) == single style bit for bit;
preserve-color keeps Cb/Cr within 0.5 of 255 (uint8 rounding; the luma is clamped into the
gamut, so no pixel loses its chroma); tiled vs untiled at tile 128 / overlap 32 on 192x256: mean
|diff| < 1 of 255 and seams at tile borders no steeper than the untiled image's, where tiles with
their own statistics and hard cuts are ~2-3x steeper there (see test_tiles_*).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from stylegen import controls as ctl
from stylegen.cli import main
from stylegen.config import ModelConfig
from stylegen.controls import Controls, stylize, stylize_batch, stylize_float
from stylegen.errors import UserError
from stylegen.models.generator import Generator
from test_stylize import make_checkpoint  # tests/ is on sys.path (pytest prepend mode)

U8 = 1 / 255


@pytest.fixture(scope="module")
def shipped():
    from stylegen.loading import load_generator

    return load_generator(None)[0]


def tiny(fusion: str = "adain", levels: int = 3, seed: int = 0) -> Generator:
    torch.manual_seed(seed)
    g = Generator(ModelConfig(fusion=fusion, channels=8, res_blocks=2, adain_levels=levels))
    for m in g.modules():  # default init fades the signal to a constant output
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return g.eval()


def smooth(h: int, w: int, seed: int, detail: float = 0.15) -> torch.Tensor:
    """(1, 3, h, w) in [0, 1]: coloured blobs plus some texture (a photo-like test image)."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(1, 3, max(h // 16, 2), max(w // 16, 2), generator=g), size=(h, w), mode="bicubic")
    x = x + detail * F.interpolate(torch.rand(1, 3, h // 4, w // 4, generator=g), size=(h, w), mode="bilinear")
    return x.clamp(0, 1)


def stripes(h: int, w: int, rgb_a, rgb_b, period: int) -> torch.Tensor:
    """(1, 3, h, w) diagonal stripes of two colours."""
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    on = (((yy + xx) // (period // 2)) % 2).float()
    a, b = torch.tensor(rgb_a).view(3, 1, 1), torch.tensor(rgb_b).view(3, 1, 1)
    return ((1 - on) * a + on * b)[None]


def q(x: torch.Tensor) -> torch.Tensor:
    """float image -> uint8 tensor, as every output is delivered."""
    return x.clamp(0, 1).mul(255).round().byte()


# ----------------------------------------------------------------------------- the generator, reproduced

@pytest.mark.parametrize("fusion,levels", [("adain", 1), ("adain", 3), ("concat", 1)])
@pytest.mark.parametrize("alpha", [1.0, 0.4])
def test_default_controls_are_the_generator_bit_for_bit(fusion, levels, alpha):
    g = tiny(fusion, levels)
    c, s = smooth(64, 96, 1), smooth(48, 80, 2)
    with torch.inference_mode():
        want = g(c, s, alpha=alpha)
    assert torch.equal(stylize_float(g, c, [s], Controls(alpha=alpha)), want)


def test_weights_one_zero_is_the_single_style_exactly(shipped):
    c, a, b = smooth(64, 64, 1), smooth(64, 64, 2), stripes(64, 64, (0.1, 0.2, 0.9), (0.9, 0.9, 0.2), 8)
    with torch.inference_mode():
        want_a, want_b = shipped(c, a), shipped(c, b)
    assert torch.equal(stylize_float(shipped, c, [a], Controls()), want_a)  # the shipped model (VGG site too)
    assert torch.equal(stylize_float(shipped, c, [a, b], Controls(weights=(1, 0))), want_a)
    assert torch.equal(stylize_float(shipped, c, [a, b], Controls(weights=(0, 5))), want_b)  # normalised
    # mixing is in feature space: a 50/50 mix is neither style, nor the average of the two outputs
    mix = stylize_float(shipped, c, [a, b], Controls(weights=(0.5, 0.5)))
    for other in (want_a, want_b, (want_a + want_b) / 2):
        assert (mix - other).abs().mean() > 2 * U8
    # and it moves monotonically from one style to the other
    d = [(stylize_float(shipped, c, [a, b], Controls(weights=(1 - t, t))) - want_a).abs().mean().item()
         for t in (0.0, 0.3, 0.7, 1.0)]
    assert d == sorted(d) and d[0] == 0.0


def test_mask_halves_follow_their_styles(shipped):
    """Left half black, right half white: each half of the masked output is much closer to the
    output of its own style than to the other's."""
    c = smooth(64, 128, 3)
    a = stripes(64, 64, (0.9, 0.1, 0.1), (1.0, 0.9, 0.3), 16)   # warm, coarse
    b = stripes(64, 64, (0.1, 0.2, 0.8), (0.2, 0.9, 0.9), 4)    # cool, fine
    mask = torch.zeros(1, 1, 64, 128)
    mask[..., 64:] = 1.0
    out = stylize_float(shipped, c, [a, b], Controls(), mask)
    out_a, out_b = stylize_float(shipped, c, [a], Controls()), stylize_float(shipped, c, [b], Controls())
    left, right = (..., slice(0, 48)), (..., slice(80, 128))  # 16 px either side of the edge blend
    dist = {k: (out[s] - ref[s]).abs().mean().item() for k, (s, ref) in
            {"LA": (left, out_a), "LB": (left, out_b), "RA": (right, out_a), "RB": (right, out_b)}.items()}
    assert dist["LA"] * 3 < dist["LB"] and dist["RB"] * 3 < dist["RA"], dist
    # a mask of all black is style A exactly (the per-pixel targets equal A's statistics)
    assert torch.equal(stylize_float(shipped, c, [a, b], Controls(), torch.zeros(1, 1, 64, 128)), out_a)


def test_preserve_color_keeps_the_content_chroma(shipped):
    c = q(smooth(64, 96, 4, detail=0.3))                      # colourful content, uint8
    s = q(stripes(64, 64, (0.9, 0.1, 0.1), (0.1, 0.1, 0.9), 8))  # a strongly coloured style
    out = stylize(shipped, c[0], [s[0]], Controls(preserve_color=True))
    plain = stylize(shipped, c[0], [s[0]], Controls())
    ycc_out, ycc_c = ctl.rgb_to_ycbcr(out[None].float() / 255), ctl.rgb_to_ycbcr(c.float() / 255)
    chroma = (ycc_out[:, 1:] - ycc_c[:, 1:]).abs().max().item() * 255
    assert chroma <= 0.5 + 1e-3, chroma                       # uint8 rounding only
    luma = (ycc_out[:, 0] - ycc_c[:, 0]).abs().mean().item() * 255
    assert luma > 5, luma                                     # the luminance was stylized
    plain_chroma = (ctl.rgb_to_ycbcr(plain[None].float() / 255)[:, 1:] - ycc_c[:, 1:]).abs().mean().item() * 255
    assert plain_chroma > 5 * chroma + 2                      # without the flag the style's colours come through


def test_keep_chroma_is_exact_and_in_gamut():
    g = torch.Generator().manual_seed(0)
    content, out = torch.rand(4, 3, 32, 32, generator=g), torch.rand(4, 3, 32, 32, generator=g)
    content[0] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)  # saturated: the luma must give way
    res = ctl.keep_chroma(out, content)
    assert res.min() >= 0 and res.max() <= 1
    assert torch.allclose(ctl.rgb_to_ycbcr(res)[:, 1:], ctl.rgb_to_ycbcr(content)[:, 1:], atol=1e-5)
    inside = (ctl.luma(res) - ctl.luma(out)).abs() < 1e-6
    assert inside.float().mean() > 0.3  # where the gamut allows, the output's luma is kept


# ----------------------------------------------------------------------------- tiles

def test_tile_layout_covers_and_overlaps():
    for tile, ov in ((2048, 256), (128, 32), (256, 64)):
        for n in range(tile + 4, 6 * tile, 4 if tile < 2048 else 52):
            t, starts = ctl.tile_layout(n, tile, ov)
            assert t <= tile and t % 8 == 0 and starts[0] == 0 and starts[-1] + t == n
            assert all(s % 8 == 0 for s in starts[:-1])
            assert all(a + t - b >= ov for a, b in zip(starts, starts[1:]))   # every overlap >= ov
            assert all(a + t <= b for a, b in zip(starts, starts[2:]))        # never three tiles
    assert ctl.tile_layout(100, 128, 32) == (100, [0])


def test_blend_windows_sum_to_one_across_every_overlap():
    for n in (300, 517 // 4 * 4, 1000):
        tiles = ctl._axis_tiles(n, 128, 32)
        total = torch.zeros(n)
        for s, t, w, _, _ in tiles:
            total[s:s + t] += w
        assert torch.allclose(total, torch.ones(n), atol=1e-6)
        cores = [(c0, c1) for *_, c0, c1 in tiles]   # the statistics' cores partition [0, n)
        assert cores[0][0] == 0 and cores[-1][1] == n and all(a[1] == b[0] for a, b in zip(cores, cores[1:]))


def seam_ratio(out: torch.Tensor, n_h: int, n_w: int, tile: int, ov: int) -> float:
    """Mean |step| across the tiles' core borders over the mean |step| everywhere (max of x, y): ~1
    for no seam; a colour jump at the borders raises it."""
    gx = (out[..., :, 1:] - out[..., :, :-1]).abs().mean(dim=(0, 1, 2))
    gy = (out[..., 1:, :] - out[..., :-1, :]).abs().mean(dim=(0, 1, 3))
    bx = [c0 for *_, c0, _ in ctl._axis_tiles(n_w, tile, ov)][1:]
    by = [c0 for *_, c0, _ in ctl._axis_tiles(n_h, tile, ov)][1:]
    return max((gx[[b - 1 for b in bx]].mean() / gx.mean()).item(), (gy[[b - 1 for b in by]].mean() / gy.mean()).item())


def naive_tiles(gen, c: torch.Tensor, s: torch.Tensor, tile: int, ov: int) -> torch.Tensor:
    """What tiling without whole-image statistics and feathering gives: each tile on its own, cut at the cores."""
    out = torch.zeros_like(c)
    for y0, th, _, cy0, cy1 in ctl._axis_tiles(c.shape[-2], tile, ov):
        for x0, tw, _, cx0, cx1 in ctl._axis_tiles(c.shape[-1], tile, ov):
            o = stylize_float(gen, c[..., y0:y0 + th, x0:x0 + tw], [s], Controls())
            out[..., cy0:cy1, cx0:cx1] = o[..., cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
    return out


@pytest.mark.parametrize("model,limits", [("tiny", (0.2, 6.0)), ("shipped", (1.0, 25.0))])
def test_tiles_match_untiled_without_seams(model, limits, request):
    """192x256 at tile 128, overlap 32 (2x3 tiles; the default is tile 2048, overlap 256).
    Measured (of 255): tiny model mean 0.04 / max 3.3; shipped model (whose VGG path sees ~140 px,
    more than the overlap here) mean 0.42 / max 12.4, and at tile 256 / overlap 64 on 384x512 mean
    0.03 / max 1.7; tiles on their own (own statistics, hard cuts): mean 4.1-5.7, max 47-67. Seam
    ratio untiled / tiled / tiles on their own: tiny 0.81 / 0.80 / 1.96, shipped 1.35 / 1.37 / 3.27."""
    gen = tiny() if model == "tiny" else request.getfixturevalue("shipped")
    c, s = smooth(192, 256, 1), smooth(64, 64, 2)
    full = stylize_float(gen, c, [s], Controls())
    tiled = stylize_float(gen, c, [s], Controls(tile=128, overlap=32))
    naive = naive_tiles(gen, c, s, 128, 32)
    diff, naive_diff = (tiled - full).abs() * 255, (naive - full).abs() * 255
    mean_max, max_max = limits
    assert diff.mean() < mean_max and diff.max() < max_max, (diff.mean().item(), diff.max().item())
    assert naive_diff.mean() > 4 * diff.mean()
    r_full, r_tiled, r_naive = (seam_ratio(x, 192, 256, 128, 32) for x in (full, tiled, naive))
    assert r_tiled < r_full * 1.05 + 0.02, (r_full, r_tiled)
    assert r_naive > r_full * 1.5, (r_full, r_naive)  # the metric sees a seam when there is one


def test_tiles_with_mask_mixing_and_preserve_color_stay_close():
    gen = tiny(seed=1)
    c, a, b = smooth(160, 200, 5), smooth(64, 64, 6), smooth(80, 48, 7)
    mask = torch.zeros(1, 1, 160, 200)
    mask[..., :, 100:] = 1.0
    for controls, m in ((Controls(weights=(0.3, 0.7)), None), (Controls(preserve_color=True), mask),
                        (Controls(alpha=0.5), mask)):
        full = stylize_float(gen, c, [a, b], controls, m)
        tiled = stylize_float(gen, c, [a, b], Controls(**{**controls.__dict__, "tile": 128, "overlap": 32}), m)
        assert ((tiled - full).abs() * 255).mean() < 0.3


def test_large_style_statistics_are_whole_image():
    """A style over the tile size gets its statistics from all of it, not from one tile."""
    gen = tiny()
    s = torch.cat([smooth(128, 128, 8), stripes(128, 128, (0, 0, 1), (0, 1, 0), 8)], dim=-1)  # (1, 3, 128, 256)
    whole = ctl.image_stats(gen, s, 1024, 64)
    tiled = ctl.image_stats(gen, s, 128, 32)
    for k in whole:
        for a, b in zip(whole[k], tiled[k]):
            assert torch.allclose(a, b, rtol=0.02, atol=1e-3), k


# ----------------------------------------------------------------------------- uint8 API, batch

def test_stylize_batch_equals_one_by_one():
    gen = tiny()
    contents = [q(smooth(64, 64, i))[0] for i in range(3)] + [q(smooth(48, 80, 9))[0]]
    styles = [[q(smooth(64, 64, 10 + i))[0]] for i in range(4)]
    controls = Controls(alpha=0.8, preserve_color=True)
    got = stylize_batch(gen, contents, styles, controls)
    for c, s, o in zip(contents, styles, got, strict=True):
        one = stylize(gen, c, s, controls)
        assert o.shape == one.shape and o.dtype == torch.uint8
        assert (o.int() - one.int()).abs().max() <= 1  # batched convolutions round differently


# ----------------------------------------------------------------------------- bad combinations

@pytest.mark.parametrize("kwargs,n_styles,has_mask,needle", [
    ({"weights": (0.7, 0.3)}, 3, False, "2 style weights for 3 style images"),
    ({}, 1, True, "exactly two style images"),
    ({}, 3, True, "exactly two style images"),
    ({"weights": (1, 1)}, 2, True, "cannot be combined"),
    ({}, 0, False, "no style image"),
])
def test_check_refuses_bad_combinations(kwargs, n_styles, has_mask, needle):
    with pytest.raises(UserError, match=needle):
        ctl.check(Controls(**kwargs), n_styles, has_mask)


@pytest.mark.parametrize("kwargs", [{"alpha": 1.5}, {"weights": (-1, 2)}, {"weights": (0, 0)}, {"weights": ()},
                                    {"weights": (float("nan"), 1)}, {"tile": 60}, {"tile": 128, "overlap": 48}])
def test_bad_control_values(kwargs):
    with pytest.raises(UserError):
        Controls(**kwargs)


def test_mask_of_another_size_is_refused_by_the_api():
    gen = tiny()
    c, s = q(smooth(64, 64, 1))[0], q(smooth(64, 64, 2))[0]
    with pytest.raises(UserError, match="mask is 32x64 but the content is 64x64"):
        stylize(gen, c, [s, s], Controls(), torch.zeros(64, 32))


# ----------------------------------------------------------------------------- the stylize flags

def write(path, x: torch.Tensor):
    Image.fromarray(q(x)[0].permute(1, 2, 0).numpy()).save(path)
    return str(path)


@pytest.fixture
def files(tmp_path):
    ck, gen = make_checkpoint(tmp_path / "ck.pt")
    c = write(tmp_path / "c.png", smooth(96, 128, 1))
    a = write(tmp_path / "a.png", stripes(64, 64, (0.9, 0.1, 0.1), (1.0, 0.9, 0.3), 16))
    b = write(tmp_path / "b.png", stripes(64, 64, (0.1, 0.2, 0.8), (0.2, 0.9, 0.9), 4))
    mask = np.zeros((48, 64), np.uint8)  # half the content's size: resized (same aspect)
    mask[:, 32:] = 255
    Image.fromarray(mask, "L").save(tmp_path / "m.png")
    return {"ck": str(ck), "gen": gen, "c": c, "a": a, "b": b, "m": str(tmp_path / "m.png"), "dir": tmp_path}


def read(path) -> torch.Tensor:
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)


def test_cli_flags_equal_the_controls_api(files):
    from stylegen.stylize import prepare

    d = files["dir"]
    runs = {
        "mix": (["--style", files["a"], files["b"], "--weights", "0.7", "0.3"], Controls(weights=(0.7, 0.3)), False),
        "mask": (["--style", files["a"], files["b"], "--mask", files["m"], "--alpha", "0.8"], Controls(alpha=0.8), True),
        "color": (["--style", files["a"], "--preserve-color"], Controls(preserve_color=True), False),
    }
    for name, (flags, controls, masked) in runs.items():
        out = d / f"{name}.png"
        assert main(["stylize", "--checkpoint", files["ck"], "--content", files["c"], "--size", "native",
                     "--out", str(out), *flags]) == 0
        styles = [f for f in flags[1:] if f.endswith(".png") and f != files["m"]]
        (c, st, m), = prepare([files["c"]], styles, None, files["m"] if masked else None)
        assert m is None or (m.shape == (96, 128) and m[:, :60].max() == 0 and m[:, 68:].min() == 1)
        assert torch.equal(read(out), stylize(files["gen"], c, st, controls, m)), name


@pytest.mark.parametrize("flags,needle", [
    (["--style", "A", "B", "--weights", "0.7"], "--weights has 1 values for 2 --style images"),
    (["--style", "A", "--mask", "M"], "--mask needs exactly two --style images"),
    (["--style", "A", "B", "--mask", "M", "--weights", "1", "1"], "cannot be combined"),
    (["--style", "A", "B", "--weights", "1", "-1"], "non-negative"),
    (["--style", "A", "B", "--mask", "WIDE"], "another aspect ratio"),
])
def test_cli_bad_combinations_one_line_no_output(files, flags, needle, capsys):
    sub = {"A": files["a"], "B": files["b"], "M": files["m"]}
    wide = files["dir"] / "wide.png"
    Image.new("L", (100, 20)).save(wide)
    sub["WIDE"] = str(wide)
    out = files["dir"] / "out" / "o.png"
    rc = main(["stylize", "--checkpoint", files["ck"], "--content", files["c"], "--out", str(out),
               *[sub.get(f, f) for f in flags]])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("stylegen stylize: error: ") and needle in err[0], err
    assert not out.parent.exists()
