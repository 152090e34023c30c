"""Loss math against hand computations; loss_terms names; weighting applied once."""

from __future__ import annotations

import math

import pytest
import torch

from stylegen.config import LossConfig
from stylegen.features import VGGFeatures
from stylegen.losses import (TERMS, content_loss, d_loss, g_adv_loss, loss_terms, pixel_l1, pixel_l2, style_loss_gram,
                             style_loss_meanstd, target_features, tv_loss, weighted_total)
from stylegen.stats import adain, calc_mean_std, gram_matrix


@pytest.fixture(scope="module")
def vgg():
    return VGGFeatures("random")


def test_gram_matrix_by_hand():
    f = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 2, 1, 2)  # C=2, H=1, W=2
    # F Fᵀ = [[1+4, 3+8], [3+8, 9+16]] = [[5, 11], [11, 25]]; / (C·H·W = 4)
    torch.testing.assert_close(gram_matrix(f), torch.tensor([[[1.25, 2.75], [2.75, 6.25]]]))


def test_calc_mean_std_by_hand():
    f = torch.tensor([[1.0, 2.0], [3.0, 4.0], [2.0, 2.0], [2.0, 2.0]]).view(1, 2, 2, 2)
    mean, std = calc_mean_std(f, eps=1e-5)
    assert mean.shape == std.shape == (1, 2, 1, 1)
    torch.testing.assert_close(mean.flatten(), torch.tensor([2.5, 2.0]))
    # population variance of 1,2,3,4 = 1.25; of 2,2,2,2 = 0
    torch.testing.assert_close(std.flatten(), torch.tensor([math.sqrt(1.25 + 1e-5), math.sqrt(1e-5)]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_calc_mean_std_matches_var_mean_far_from_zero(dtype):
    """The two-pass statistics agree with torch.var_mean (in float64) on activations with a
    large mean and a small spread (VGG-like maps; a one-pass E[x²] − E[x]² would cancel)."""
    g = torch.Generator().manual_seed(3)
    f = (torch.randn(3, 16, 24, 20, generator=g) * 0.5 + 1000.0).to(dtype)
    mean, std = calc_mean_std(f)
    assert mean.dtype == std.dtype == torch.float32
    var64, mean64 = torch.var_mean(f.double(), dim=(2, 3), keepdim=True, correction=0)
    torch.testing.assert_close(mean.double(), mean64, rtol=1e-6, atol=0)
    torch.testing.assert_close(std.double(), (var64 + 1e-5).sqrt(), rtol=1e-4, atol=0)
    # and the gradients match var_mean's
    x = f.float().detach().clone().requires_grad_(True)
    m, sd = calc_mean_std(x)
    (m * 2 + sd * 3).sum().backward()
    y = f.double().detach().clone().requires_grad_(True)
    v64, m64 = torch.var_mean(y, dim=(2, 3), keepdim=True, correction=0)
    (m64 * 2 + (v64 + 1e-5).sqrt() * 3).sum().backward()
    torch.testing.assert_close(x.grad.double(), y.grad, rtol=1e-3, atol=1e-6)


def test_adain_carries_style_statistics():
    g = torch.Generator().manual_seed(0)
    content = torch.randn(2, 8, 16, 16, generator=g) * 3 + 1
    style = torch.randn(2, 8, 10, 12, generator=g) * torch.linspace(0.5, 4, 8).view(1, 8, 1, 1) - 2
    out = adain(content, style)
    assert out.shape == content.shape
    om, os_ = calc_mean_std(out)
    sm, ss = calc_mean_std(style)
    torch.testing.assert_close(om, sm, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(os_, ss, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(adain(content, content), content, rtol=1e-5, atol=1e-5)


def test_adain_is_the_textbook_formula_forward_and_backward_and_exact_on_itself():
    """stats.adain computes one affine map per channel; it must equal (x - mean_c) / std_c * std_s + mean_s,
    gradients included, and leave a feature map given its own statistics exactly unchanged."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(3, 5, 9, 7, generator=g, dtype=torch.float64) * 2 + 0.5).requires_grad_()
    y = (torch.randn(3, 5, 6, 8, generator=g, dtype=torch.float64) * 0.3 - 1).requires_grad_()
    w = torch.randn(3, 5, 9, 7, generator=g, dtype=torch.float64)
    (adain(x, y) * w).sum().backward()
    fast = adain(x, y).detach(), x.grad.clone(), y.grad.clone()
    x.grad = y.grad = None
    cm, cs = calc_mean_std(x)
    sm, ss = calc_mean_std(y)
    (((x - cm) / cs * ss + sm) * w).sum().backward()
    for a, b in zip(fast, (((x - cm) / cs * ss + sm).detach(), x.grad, y.grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    f = torch.randn(2, 4, 8, 8, generator=g).to(torch.bfloat16)
    assert torch.equal(adain(f, f), f.float())


def test_content_and_style_losses_by_hand():
    a = torch.tensor([[1.0, 3.0]]).view(1, 1, 1, 2)  # mean 2, std ~1
    b = torch.tensor([[0.0, 0.0]]).view(1, 1, 1, 2)  # mean 0, std ~0
    assert content_loss(a, b).item() == pytest.approx(5.0)  # (1 + 9) / 2
    _, std_a = calc_mean_std(a)
    _, std_b = calc_mean_std(b)
    expected = 2.0 * (4.0 + (std_a - std_b).item() ** 2)  # two identical layers: (Δmean² + Δstd²) each
    assert style_loss_meanstd([a, a], [b, b]).item() == pytest.approx(expected, rel=1e-5)
    # gram of a: (1 + 9) / 2 = 5, of b: 0 -> MSE 25 per layer
    assert style_loss_gram([a, a], [b, b]).item() == pytest.approx(50.0)


def test_tv_pixel_and_adversarial_by_hand():
    x = torch.tensor([[0.0, 1.0], [3.0, 5.0]]).view(1, 1, 2, 2)
    assert tv_loss(x).item() == pytest.approx(1.5 + 3.5)  # mean |1|,|2| + mean |3|,|4|
    y = torch.zeros_like(x)
    assert pixel_l1(x, y).item() == pytest.approx(9 / 4)
    assert pixel_l2(x, y).item() == pytest.approx(35 / 4)
    real, fake = torch.tensor([2.0]), torch.tensor([-1.0])
    # BCE(real -> 1) = log(1 + e^-2); BCE(fake -> 0) = log(1 + e^-1)
    assert d_loss(real, fake).item() == pytest.approx(0.5 * (math.log1p(math.exp(-2)) + math.log1p(math.exp(-1))))
    assert g_adv_loss(fake).item() == pytest.approx(math.log1p(math.exp(1)))
    assert g_adv_loss(torch.zeros(2, 1, 8, 8)).item() == pytest.approx(math.log(2))


def test_loss_terms_names_and_precomputed_targets(vgg):
    g = torch.Generator().manual_seed(1)
    c, s, o = (torch.rand(2, 3, 32, 32, generator=g) for _ in range(3))
    s_big = torch.rand(2, 3, 48, 40, generator=g)
    cfg = LossConfig()
    terms = loss_terms(o, c, s_big, vgg, cfg)
    assert set(terms) == {"content", "style", "gram", "pixel_l1", "pixel_l2", "tv"}
    assert all(t.ndim == 0 and t.item() > 0 for t in terms.values())
    cf, sf = target_features(vgg, c, s_big, cfg)
    again = loss_terms(o, c, s_big, vgg, cfg, content_feats=cf, style_feats=sf)
    for k in terms:
        torch.testing.assert_close(again[k], terms[k])
    no_gram = loss_terms(o, c, s_big, vgg, cfg, content_feats=cf, style_feats=sf, gram=False)
    assert set(no_gram) == set(terms) - {"gram"}
    for k in no_gram:
        torch.testing.assert_close(no_gram[k], terms[k])
    with_adv = loss_terms(o, c, s, vgg, cfg, torch.zeros(2, 1, 4, 4))
    assert set(with_adv) == set(TERMS) - {"identity"} and with_adv["adversarial"].item() == pytest.approx(math.log(2))
    same = loss_terms(c, c, s, vgg, cfg)
    assert same["content"].item() == 0 and same["pixel_l1"].item() == 0 and same["pixel_l2"].item() == 0


def test_weighted_total_is_the_hand_sum():
    terms = {n: torch.tensor(float(i + 1)) for i, n in enumerate(TERMS)}  # content=1, style=2, ..., identity=8
    cfg = LossConfig(content=0.5, style=10.0, gram=0.0, pixel_l1=2.0, pixel_l2=0.0, tv=3.0, adversarial=0.1, identity=0.0)
    assert weighted_total(terms, cfg).item() == pytest.approx(0.5 * 1 + 10 * 2 + 2 * 4 + 3 * 6 + 0.1 * 7)
    # a zero-weight term that is NaN does not poison the total; a missing weighted term is an error
    assert math.isfinite(weighted_total(terms | {"gram": torch.tensor(float("nan"))}, cfg).item())
    no_adv = {k: v for k, v in terms.items() if k != "adversarial"}
    with pytest.raises(KeyError, match="fake_logits"):
        weighted_total(no_adv, cfg)
    with pytest.raises(ValueError, match="all loss weights are 0"):
        weighted_total(terms, LossConfig(content=0.0, style=0.0, identity=0.0))


def test_normalized_terms_score_trivial_answers_one():
    """normalize=True: returning the content scores style 1.0, copying the style scores content 1.0."""
    from stylegen.features import VGGFeatures

    torch.manual_seed(0)
    vgg = VGGFeatures("random")
    c, s = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    cfg = LossConfig(normalize=True)
    ident = loss_terms(c, c, s, vgg, cfg)
    copy = loss_terms(s, c, s, vgg, cfg)
    assert ident["content"].item() == 0 and ident["style"].item() == pytest.approx(1.0, rel=1e-5)
    assert ident["gram"].item() == pytest.approx(1.0, rel=1e-5)
    assert copy["content"].item() == pytest.approx(1.0, rel=1e-5) and copy["style"].item() == 0


def test_per_sample_normalisation_weighs_every_pair_alike(vgg):
    """normalize_per='sample': each pair's loss over its own trivial answer's, then the mean; a pair
    styled perfectly and one left as its content score style 0.5 whatever their scales (the batch
    rule weighs them by their references instead), and the trivial answers still score 1.0."""
    torch.manual_seed(0)
    c, s = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    s[1] = c[1] * 0.9 + 0.05  # pair 1 is close in style already: a small reference
    per = LossConfig(normalize=True, normalize_per="sample", gram=0.0)
    batch = LossConfig(normalize=True, gram=0.0)
    half = torch.stack([s[0], c[1]])  # pair 0 copies its style, pair 1 returns its content
    assert loss_terms(half, c, s, vgg, per)["style"].item() == pytest.approx(0.5, rel=1e-5)
    fc, fs = vgg(c, ["relu1_1", "relu2_1", "relu3_1", "relu4_1"]), vgg(s, ["relu1_1", "relu2_1", "relu3_1", "relu4_1"])
    ref1 = style_loss_meanstd([f[1:] for f in fc.values()], [f[1:] for f in fs.values()])
    ref_all = style_loss_meanstd(list(fc.values()), list(fs.values()))
    assert loss_terms(half, c, s, vgg, batch)["style"].item() == pytest.approx((ref1 / 2 / ref_all).item(), rel=1e-4)
    ident, copy = loss_terms(c, c, s, vgg, per), loss_terms(s, c, s, vgg, per)
    assert ident["style"].item() == pytest.approx(1.0, rel=1e-5) and ident["content"].item() == 0
    assert copy["content"].item() == pytest.approx(1.0, rel=1e-5) and copy["style"].item() == 0


def test_per_sample_reference_is_floored():
    """A pair whose content already is its style (reference 0) counts at 0.1x the batch's mean
    reference instead of dividing by ~0."""
    torch.manual_seed(1)
    vgg = VGGFeatures("random")
    c, s = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    s[1] = c[1]
    per = LossConfig(normalize=True, normalize_per="sample", gram=0.0)
    out = torch.stack([c[0], s[0]])  # pair 0 left as content (ratio 1); pair 1 given pair 0's style
    layers = ["relu1_1", "relu2_1", "relu3_1", "relu4_1"]
    fo, fs, fc = vgg(out, layers), vgg(s, layers), vgg(c, layers)
    loss1 = style_loss_meanstd([f[1:] for f in fo.values()], [f[1:] for f in fs.values()])
    ref0 = style_loss_meanstd([f[:1] for f in fc.values()], [f[:1] for f in fs.values()])
    floor = 0.1 * ref0 / 2  # the batch mean of (ref0, 0), times 0.1
    got = loss_terms(out, c, s, vgg, per)["style"].item()
    assert math.isfinite(got) and got == pytest.approx(((1 + loss1 / floor) / 2).item(), rel=1e-4)
